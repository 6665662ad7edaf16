//! Offline validation of Kubernetes objects against a CRD version's `openAPIV3Schema`.
//!
//! `weft compile` runs this over every rendered document so that whatever `kubectl apply` with
//! strict server-side field validation would reject (misspelt or unknown fields, wrong types,
//! out-of-range values, duplicate list-map keys, a bad `metadata.name`) is reported with a field
//! path before anything reaches a cluster, and without needing one.
//!
//! It implements the structural-schema subset of OpenAPI v3 that the API server enforces. CEL
//! rules (`x-kubernetes-validations`) are evaluated by another library and ignored here, as are
//! `default`s: we judge what the user wrote, not what the server would fill in.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;

use regex::Regex;
use serde_json::{Map, Value};

/// Deepest nesting we follow. Real CRDs are far shallower; the limit keeps a runaway document
/// from exhausting the stack.
const MAX_DEPTH: usize = 64;

/// Deliberately loose RFC 3339: it catches "yesterday" and "2024-01-02", not February 30th.
const DATE_TIME: &str = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$";

/// Keys every Kubernetes object (and embedded resource) may carry whatever its schema says.
const ENVELOPE: [&str; 3] = ["apiVersion", "kind", "metadata"];

type Obj = Map<String, Value>;

/// One thing the schema rejects, at a field path such as `spec.rules[0].backendRefs[1].weight`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaViolation {
    /// Field path from the object root (`spec.selector["app.kubernetes.io/name"]`); empty for
    /// the root itself.
    pub path: String,
    /// What is wrong and, where possible, what a correct value looks like.
    pub message: String,
}

impl fmt::Display for SchemaViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "(root)"
        } else {
            &self.path
        };
        write!(f, "{path}: {}", self.message)
    }
}

/// Validate `value` (a whole object: apiVersion, kind, metadata, spec, status) against the CRD
/// version's openAPIV3Schema. Returns every violation found, in document order, empty when valid.
///
/// Object keys are visited in the order `serde_json` keeps them; an object's own problems
/// (missing required fields, size limits) come before those of its fields.
pub fn validate(schema: &Value, value: &Value) -> Vec<SchemaViolation> {
    let mut checker = Checker::default();
    match value.as_object() {
        Some(obj) => {
            checker.metadata(obj, "", true);
            checker.node(schema, value, "", 0, false);
        }
        None => checker.push("", type_error("object", value)),
    }
    checker.out
}

#[derive(Default)]
struct Checker {
    out: Vec<SchemaViolation>,
    /// Patterns repeat across list items, so each is compiled once. `None` marks a pattern the
    /// `regex` crate cannot compile (lookaround, backreferences): we stay silent rather than guess.
    regexes: HashMap<String, Option<Regex>>,
}

impl Checker {
    fn push(&mut self, path: &str, message: impl Into<String>) {
        let (path, message) = (path.to_string(), message.into());
        self.out.push(SchemaViolation { path, message });
    }

    /// `branch` is set inside allOf/anyOf/oneOf/not: those schemas only add value constraints to
    /// a structural schema and never declare fields, so unknown-field checks are off there.
    fn node(&mut self, s: &Value, v: &Value, path: &str, depth: usize, branch: bool) {
        if depth > MAX_DEPTH {
            return self.push(path, "document nested too deeply");
        }
        let int_or_string = flag(s, "x-kubernetes-int-or-string");
        let expected = int_or_string
            .then_some("integer or string")
            .or(text(s, "type"));
        // Typeless nodes (preserve-unknown-fields, value-only branches) accept null.
        if v.is_null() && (expected.is_none() || flag(s, "nullable")) {
            return;
        }
        let type_ok = match expected {
            Some(_) if int_or_string => v.is_string() || as_int(v).is_some(),
            Some(t) => has_type(t, v),
            None => true,
        };
        if let Some(t) = expected
            && !type_ok
        {
            return self.push(path, type_error(t, v));
        }
        if let Some(allowed) = s.get("enum").and_then(Value::as_array)
            && !allowed.iter().any(|a| same(a, v, 0))
        {
            let list = allowed.iter().map(show).collect::<Vec<_>>().join(", ");
            self.push(path, format!("must be one of {list} (got {})", show(v)));
        }
        match v {
            Value::Object(m) => self.object(s, m, path, depth, branch),
            Value::Array(items) => self.array(s, items, path, depth, branch),
            Value::String(text) => self.string(s, text, v, path),
            Value::Number(_) => self.number(s, v, path),
            Value::Null | Value::Bool(_) => {}
        }
        self.combinators(s, v, path, depth);
    }

    fn object(&mut self, s: &Value, m: &Obj, path: &str, depth: usize, branch: bool) {
        let root = path.is_empty();
        let embedded = flag(s, "x-kubernetes-embedded-resource") && !branch && !root;
        let mut required = strs(s, "required");
        if embedded {
            // The API server insists on these for embedded resources even if the schema doesn't.
            required.extend(["apiVersion", "kind"]);
        }
        for r in required.into_iter().filter(|r| !m.contains_key(*r)) {
            self.push(&child(path, r), "required field is missing");
        }
        self.sizes(s, path, m.len(), "Properties");
        if embedded {
            self.metadata(m, path, false);
        }
        let props = s.get("properties").and_then(Value::as_object);
        let envelope = root || embedded;
        let typed = envelope || props.is_some() || text(s, "type") == Some("object");
        // Kubernetes does not inherit preserve-unknown-fields into declared properties, so it
        // opens up this one level only.
        let open = !typed || flag(s, "x-kubernetes-preserve-unknown-fields");
        for (key, x) in m {
            let p = child(path, key);
            let declared = props.and_then(|ps| ps.get(key));
            match (declared, s.get("additionalProperties")) {
                // Root metadata belongs to the API server: `metadata` checks it, not the CRD.
                (Some(_), _) if root && key == "metadata" => {}
                (Some(ps), _) => self.node(ps, x, &p, depth + 1, branch),
                _ if envelope && ENVELOPE.contains(&key.as_str()) => {}
                (None, Some(ap @ Value::Object(_))) => self.node(ap, x, &p, depth + 1, branch),
                (None, Some(Value::Bool(true))) => {}
                (None, Some(Value::Bool(false))) if !branch => {
                    self.unknown(&p, key, props, envelope)
                }
                _ if open || branch => {}
                _ => self.unknown(&p, key, props, envelope),
            }
        }
    }

    fn unknown(&mut self, path: &str, key: &str, props: Option<&Obj>, envelope: bool) {
        let extra = if envelope { &ENVELOPE[..] } else { &[] };
        let (lower, len) = (key.to_lowercase(), key.chars().count());
        let hint = props
            .into_iter()
            .flat_map(|p| p.keys().map(String::as_str))
            .chain(extra.iter().copied())
            // The distance is at least the length difference; this also bounds work on huge keys.
            .filter(|k| k.chars().count().abs_diff(len) <= 2)
            .map(|k| (edit_distance(&lower, &k.to_lowercase()), k))
            .filter(|(d, _)| *d <= 2)
            .min_by_key(|(d, _)| *d);
        let msg = match hint {
            Some((_, k)) => format!("unknown field {} (did you mean {}?)", quote(key), quote(k)),
            None => format!("unknown field {}", quote(key)),
        };
        self.push(path, msg);
    }

    /// The slice of ObjectMeta the API server checks before schema validation even starts.
    fn metadata(&mut self, obj: &Obj, path: &str, need_name: bool) {
        let mp = child(path, "metadata");
        let (np, meta) = (child(&mp, "name"), obj.get("metadata"));
        let meta = match meta {
            Some(Value::Object(meta)) => meta,
            None | Some(Value::Null) if need_name => {
                return self.push(&np, "required field is missing");
            }
            None | Some(Value::Null) => return,
            Some(other) => return self.push(&mp, type_error("object", other)),
        };
        match meta.get("name").filter(|n| !n.is_null()) {
            Some(Value::String(name)) if !dns_subdomain(name) => {
                let msg = "must be a lowercase RFC 1123 subdomain: a-z, 0-9, '-' and '.', starting \
                           and ending with a letter or digit, at most 253 characters";
                self.push(&np, format!("{msg} (got {})", quote(name)));
            }
            Some(Value::String(_)) => {}
            Some(other) => self.push(&np, type_error("string", other)),
            None if need_name && !meta.get("generateName").is_some_and(Value::is_string) => {
                self.push(
                    &np,
                    "required field is missing (or set metadata.generateName)",
                );
            }
            None => {}
        }
        for key in ["labels", "annotations"] {
            let lp = child(&mp, key);
            match meta.get(key) {
                Some(Value::Object(map)) => {
                    for (k, v) in map.iter().filter(|(_, v)| !v.is_string()) {
                        self.push(&child(&lp, k), type_error("string", v));
                    }
                }
                None | Some(Value::Null) => {}
                Some(other) => self.push(&lp, type_error("map of strings", other)),
            }
        }
    }

    fn array(&mut self, s: &Value, items: &[Value], path: &str, depth: usize, branch: bool) {
        self.sizes(s, path, items.len(), "Items");
        let list_type = text(s, "x-kubernetes-list-type");
        if flag(s, "uniqueItems") || list_type == Some("set") {
            for (j, x) in items.iter().enumerate() {
                if let Some(i) = items[..j].iter().position(|y| same(x, y, 0)) {
                    let msg = format!(
                        "duplicate entry {} (same as [{i}]); items must be unique",
                        show(x)
                    );
                    self.push(&format!("{path}[{j}]"), msg);
                }
            }
        }
        let keys = strs(s, "x-kubernetes-list-map-keys");
        if list_type == Some("map") && !keys.is_empty() {
            // An unset key counts as null; the API server requires or defaults map keys anyway.
            let key_of = |o: &Obj| -> Vec<Value> {
                keys.iter()
                    .map(|k| o.get(*k).cloned().unwrap_or(Value::Null))
                    .collect()
            };
            let tuples: Vec<_> = items.iter().map(|x| x.as_object().map(key_of)).collect();
            for (j, t) in tuples.iter().enumerate() {
                let Some(t) = t else { continue };
                let dup = |u: &Option<Vec<Value>>| {
                    u.as_ref()
                        .is_some_and(|u| t.iter().zip(u).all(|(a, b)| same(a, b, 0)))
                };
                if let Some(i) = tuples[..j].iter().position(dup) {
                    let shown: Vec<_> = keys
                        .iter()
                        .zip(t)
                        .map(|(k, v)| format!("{k}={}", show(v)))
                        .collect();
                    let msg = format!("duplicate entry with {} (same as [{i}])", shown.join(", "));
                    self.push(&format!("{path}[{j}]"), msg);
                }
            }
        }
        if let Some(item_schema) = s.get("items").filter(|i| i.is_object()) {
            for (i, x) in items.iter().enumerate() {
                self.node(item_schema, x, &format!("{path}[{i}]"), depth + 1, branch);
            }
        }
    }

    fn string(&mut self, s: &Value, text_value: &str, v: &Value, path: &str) {
        self.sizes(s, path, text_value.chars().count(), "Length");
        if let Some(p) = text(s, "pattern")
            && self.mismatch(p, text_value)
        {
            self.push(path, format!("must match pattern {p} (got {})", show(v)));
        }
        if text(s, "format") == Some("date-time") && self.mismatch(DATE_TIME, text_value) {
            let example = "an RFC 3339 date-time such as 2006-01-02T15:04:05Z";
            self.push(path, format!("must be {example} (got {})", show(v)));
        }
    }

    fn mismatch(&mut self, pattern: &str, text: &str) -> bool {
        let entry = self.regexes.entry(pattern.to_string());
        let re = entry.or_insert_with(|| Regex::new(pattern).ok());
        re.as_ref().is_some_and(|re| !re.is_match(text))
    }

    fn number(&mut self, s: &Value, v: &Value, path: &str) {
        const BOUNDS: [(&str, &str, bool); 2] = [
            ("minimum", "exclusiveMinimum", true),
            ("maximum", "exclusiveMaximum", false),
        ];
        for (key, exclusive_key, lower) in BOUNDS {
            // OpenAPI v3.0 makes exclusive* a boolean modifier; later JSON Schema makes it the bound.
            let (limit, exclusive) = match (s.get(key), s.get(exclusive_key)) {
                (_, Some(e @ Value::Number(_))) => (e, true),
                (Some(m @ Value::Number(_)), e) => (m, e.and_then(Value::as_bool) == Some(true)),
                _ => continue,
            };
            let Some(ord) = num_cmp(v, limit) else {
                continue;
            };
            let (bad, relation) = match (lower, exclusive) {
                (true, false) => (ord == Ordering::Less, "at least"),
                (true, true) => (ord != Ordering::Greater, "greater than"),
                (false, false) => (ord == Ordering::Greater, "at most"),
                (false, true) => (ord != Ordering::Less, "less than"),
            };
            if bad {
                self.push(path, format!("must be {relation} {limit} (got {v})"));
            }
        }
        if let Some(m) = s.get("multipleOf")
            && !multiple_of(v, m)
        {
            self.push(path, format!("must be a multiple of {m} (got {v})"));
        }
        let (lo, hi) = match text(s, "format") {
            Some("int32") => (i128::from(i32::MIN), i128::from(i32::MAX)),
            Some("int64") => (i128::from(i64::MIN), i128::from(i64::MAX)),
            _ => return,
        };
        if as_int(v).is_some_and(|i| !(lo..=hi).contains(&i)) {
            let format = text(s, "format").unwrap_or_default();
            self.push(
                path,
                format!("must fit in {format}, between {lo} and {hi} (got {v})"),
            );
        }
    }

    /// `min<suffix>`/`max<suffix>` limits: Items, Properties or Length.
    fn sizes(&mut self, s: &Value, path: &str, n: usize, suffix: &str) {
        let what = if suffix == "Length" {
            "characters".to_string()
        } else {
            suffix.to_lowercase()
        };
        let n = n as u64;
        let limit = |bound: &str| s.get(format!("{bound}{suffix}")).and_then(Value::as_u64);
        if let Some(min) = limit("min").filter(|min| n < *min) {
            self.push(path, format!("must have at least {min} {what} (got {n})"));
        }
        if let Some(max) = limit("max").filter(|max| n > *max) {
            self.push(path, format!("must have at most {max} {what} (got {n})"));
        }
    }

    fn combinators(&mut self, s: &Value, v: &Value, path: &str, depth: usize) {
        for b in list(s, "allOf") {
            self.node(b, v, path, depth + 1, true);
        }
        let any = self.trials(list(s, "anyOf"), v, path, depth);
        if !any.is_empty() && any.iter().all(|r| !r.is_empty()) {
            let (n, why) = (any.len(), summary(&any, path));
            self.push(
                path,
                format!("must match at least one of {n} alternatives ({why})"),
            );
        }
        let one = self.trials(list(s, "oneOf"), v, path, depth);
        let matched = one.iter().enumerate().filter(|(_, r)| r.is_empty());
        let matched: Vec<_> = matched.map(|(i, _)| format!("#{}", i + 1)).collect();
        let n = one.len();
        if n > 0 && matched.is_empty() {
            let why = summary(&one, path);
            self.push(
                path,
                format!("must match exactly one of {n} alternatives, matched none ({why})"),
            );
        } else if matched.len() > 1 {
            let which = matched.join(", ");
            self.push(
                path,
                format!("must match exactly one of {n} alternatives, matched {which}"),
            );
        }
        if let Some(not) = s.get("not")
            && self.trial(not, v, path, depth).is_empty()
        {
            self.push(path, format!("must not match the schema {}", show(not)));
        }
    }

    fn trials(
        &mut self,
        branches: &[Value],
        v: &Value,
        path: &str,
        depth: usize,
    ) -> Vec<Vec<SchemaViolation>> {
        branches
            .iter()
            .map(|b| self.trial(b, v, path, depth))
            .collect()
    }

    /// Validates against one branch without committing its violations.
    fn trial(&mut self, s: &Value, v: &Value, path: &str, depth: usize) -> Vec<SchemaViolation> {
        let saved = std::mem::take(&mut self.out);
        self.node(s, v, path, depth + 1, true);
        std::mem::replace(&mut self.out, saved)
    }
}

/// Says why each failed branch failed, with paths relative to the combinator's node.
fn summary(results: &[Vec<SchemaViolation>], path: &str) -> String {
    let describe =
        |x: &SchemaViolation| match x.path.strip_prefix(path).map(|p| p.trim_start_matches('.')) {
            Some("") => x.message.clone(),
            Some(rel) => format!("{rel}: {}", x.message),
            None => x.to_string(),
        };
    let failed = results.iter().enumerate().filter(|(_, r)| !r.is_empty());
    let alts: Vec<_> = failed
        .map(|(i, r)| {
            format!(
                "#{}: {}",
                i + 1,
                r.iter().map(describe).collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    alts.join("; ")
}

fn flag(s: &Value, key: &str) -> bool {
    s.get(key).and_then(Value::as_bool) == Some(true)
}

fn text<'a>(s: &'a Value, key: &str) -> Option<&'a str> {
    s.get(key).and_then(Value::as_str)
}

fn list<'a>(s: &'a Value, key: &str) -> &'a [Value] {
    s.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn strs<'a>(s: &'a Value, key: &str) -> Vec<&'a str> {
    list(s, key).iter().filter_map(Value::as_str).collect()
}

/// Identifier keys join with '.'; anything else (label keys, dotted names) is quoted.
fn child(path: &str, key: &str) -> String {
    let ident = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    match (ident, path.is_empty()) {
        (false, _) => format!("{path}[{}]", quote(key)),
        (true, true) => key.to_string(),
        (true, false) => format!("{path}.{key}"),
    }
}

fn quote(s: &str) -> String {
    Value::from(s).to_string()
}

/// JSON rendering for messages, cut short so one huge value cannot swamp the report.
fn show(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(80) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) if as_int(v).is_some() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_error(expected: &str, v: &Value) -> String {
    match v {
        Value::Null | Value::Array(_) | Value::Object(_) => {
            format!("must be {expected}, got {}", kind(v))
        }
        _ => format!("must be {expected}, got {} {}", kind(v), show(v)),
    }
}

fn has_type(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "integer" => as_int(v).is_some(),
        "number" => v.is_number(),
        _ => !v.is_null(),
    }
}

fn as_int(v: &Value) -> Option<i128> {
    let whole = |f: f64| f.fract() == 0.0 && f.abs() < 1e30;
    // YAML hands us 2.0 for `2.0`, and the API server accepts whole floats as integers.
    let float = || v.as_f64().filter(|f| whole(*f)).map(|f| f as i128);
    v.as_i64()
        .map(i128::from)
        .or_else(|| v.as_u64().map(i128::from))
        .or_else(float)
}

/// Exact for integers (i64 and u64 both fit i128), IEEE for the rest.
fn num_cmp(a: &Value, b: &Value) -> Option<Ordering> {
    match (as_int(a), as_int(b)) {
        (Some(x), Some(y)) => Some(x.cmp(&y)),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

fn multiple_of(v: &Value, m: &Value) -> bool {
    match (as_int(v), as_int(m), v.as_f64(), m.as_f64()) {
        (Some(a), Some(b), _, _) if b > 0 => a % b == 0,
        (_, _, Some(a), Some(b)) if b > 0.0 => {
            let q = a / b;
            (q - q.round()).abs() <= 1e-9 * q.abs().max(1.0)
        }
        _ => true,
    }
}

/// JSON equality, except that 1 and 1.0 are the same number (YAML may produce either).
/// Values nested beyond the depth limit never compare equal.
fn same(a: &Value, b: &Value, depth: usize) -> bool {
    let all = |x: &[Value], y: &[Value]| {
        x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b, depth + 1))
    };
    match (a, b) {
        _ if depth > MAX_DEPTH => false,
        (Value::Number(_), Value::Number(_)) => num_cmp(a, b) == Some(Ordering::Equal),
        (Value::Array(x), Value::Array(y)) => all(x, y),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, a)| y.get(k).is_some_and(|b| same(a, b, depth + 1)))
        }
        _ => a == b,
    }
}

fn dns_subdomain(name: &str) -> bool {
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        b.first().is_some_and(u8::is_ascii_alphanumeric)
            && b.last().is_some_and(u8::is_ascii_alphanumeric)
            && b.iter()
                .all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'-'))
    };
    name.len() <= 253 && name.split('.').all(label_ok)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur.push(substitute.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev.last().copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// (name, schema, document, expected (path, message substring) in order; empty = valid).
    type Case = (
        &'static str,
        Value,
        Value,
        &'static [(&'static str, &'static str)],
    );

    /// Root schema the way kube-rs emits it: `spec` required, `status` free-form.
    fn crd(spec: Value) -> Value {
        let status = json!({"type": "object", "nullable": true, "x-kubernetes-preserve-unknown-fields": true});
        json!({"type": "object", "required": ["spec"], "properties": {"spec": spec, "status": status}})
    }

    fn doc(spec: Value) -> Value {
        json!({"apiVersion": "weft.dev/v1", "kind": "Route", "metadata": {"name": "demo"}, "spec": spec})
    }

    /// A case about the single field `spec.f`.
    fn field(
        name: &'static str,
        schema: Value,
        value: Value,
        expect: &'static [(&'static str, &'static str)],
    ) -> Case {
        (
            name,
            crd(json!({"type": "object", "properties": {"f": schema}})),
            doc(json!({"f": value})),
            expect,
        )
    }

    fn run(cases: Vec<Case>) {
        for (name, schema, value, expect) in cases {
            let got = validate(&schema, &value);
            let matches = |(g, (path, msg)): (&SchemaViolation, &(&str, &str))| {
                g.path == *path && g.message.contains(msg)
            };
            let ok = got.len() == expect.len() && got.iter().zip(expect).all(matches);
            assert!(ok, "case {name:?}: expected {expect:?}, got {got:#?}");
        }
    }

    #[test]
    #[rustfmt::skip]
    fn fields_and_types() {
        let retries = crd(json!({"type": "object", "properties": {
            "retries": {"type": "object", "properties": {"attempts": {"type": "integer"}}}}}));
        let host = crd(json!({"type": "object", "required": ["host"], "properties": {"host": {"type": "string"}}}));
        let ios = json!({"x-kubernetes-int-or-string": true});
        run(vec![
            ("valid", retries.clone(), doc(json!({"retries": {"attempts": 3}})), &[]),
            ("typo hint", retries.clone(), doc(json!({"retries": {"attemps": 3}})),
                &[("spec.retries.attemps", r#"unknown field "attemps" (did you mean "attempts"?)"#)]),
            ("case-only hint", retries.clone(), doc(json!({"retries": {"Attempts": 3}})),
                &[("spec.retries.Attempts", r#"(did you mean "attempts"?)"#)]),
            ("root typo", retries.clone(), json!({"metdata": {}, "metadata": {"name": "a"}, "spec": {}}),
                &[("metdata", r#"(did you mean "metadata"?)"#)]),
            ("missing required", host.clone(), doc(json!({})), &[("spec.host", "required field is missing")]),
            ("missing spec", host, json!({"metadata": {"name": "a"}}), &[("spec", "required field is missing")]),
            ("wrong type", retries.clone(), doc(json!({"retries": {"attempts": "3"}})),
                &[("spec.retries.attempts", r#"must be integer, got string "3""#)]),
            ("root not object", retries, json!([1]), &[("", "must be object, got array")]),
            field("float for integer", json!({"type": "integer"}), json!(1.5), &[("spec.f", "must be integer, got number 1.5")]),
            field("whole float is integer", json!({"type": "integer"}), json!(2.0), &[]),
            field("number takes floats", json!({"type": "number"}), json!(1.5), &[]),
            field("boolean", json!({"type": "boolean"}), json!("true"), &[("spec.f", "must be boolean, got string")]),
            field("null", json!({"type": "string"}), Value::Null, &[("spec.f", "must be string, got null")]),
            field("nullable", json!({"type": "string", "nullable": true}), Value::Null, &[]),
            field("int-or-string int", ios.clone(), json!(80), &[]),
            field("int-or-string str", ios.clone(), json!("80%"), &[]),
            field("int-or-string float", ios.clone(), json!(1.5), &[("spec.f", "must be integer or string, got number")]),
            field("int-or-string bool", ios, json!(true), &[("spec.f", "must be integer or string, got boolean")]),
            // Declared properties are still checked, and `b` does not inherit the openness.
            field("preserve-unknown-fields",
                json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                       "properties": {"a": {"type": "integer"}, "b": {"type": "object", "properties": {}}}}),
                json!({"a": "x", "anything": {"deep": [1]}, "b": {"c": 1}}),
                &[("spec.f.a", "must be integer"), ("spec.f.b.c", r#"unknown field "c""#)]),
            field("additionalProperties map", json!({"type": "object", "additionalProperties": {"type": "string"}}),
                json!({"app.kubernetes.io/name": 3, "tier": "web"}),
                &[(r#"spec.f["app.kubernetes.io/name"]"#, "must be string, got integer 3")]),
            field("additionalProperties true", json!({"type": "object", "additionalProperties": true}), json!({"x": 1}), &[]),
            field("embedded resource",
                json!({"type": "object", "x-kubernetes-embedded-resource": true, "properties": {"spec": {"type": "object"}}}),
                json!({"kind": "Pod", "metadata": {"labels": {"a": 1}}, "spec": {}}),
                &[("spec.f.apiVersion", "required field is missing"), ("spec.f.metadata.labels.a", "must be string")]),
        ]);
    }

    #[test]
    fn unknown_field_without_hint_and_display() {
        let schema = crd(json!({"type": "object", "properties": {"port": {"type": "integer"}}}));
        let got = validate(&schema, &doc(json!({"zzzzzz": 1})));
        let message = "unknown field \"zzzzzz\"".to_string();
        assert_eq!(
            got,
            vec![SchemaViolation {
                path: "spec.zzzzzz".into(),
                message
            }]
        );
        assert_eq!(got[0].to_string(), "spec.zzzzzz: unknown field \"zzzzzz\"");
        let root = validate(&schema, &json!(1));
        assert_eq!(root[0].to_string(), "(root): must be object, got integer 1");
    }

    #[test]
    #[rustfmt::skip]
    fn strings_and_numbers() {
        let weight = json!({"type": "integer", "minimum": 0, "maximum": 1000});
        let open_unit = json!({"type": "number", "minimum": 0, "exclusiveMinimum": true, "maximum": 1, "exclusiveMaximum": true});
        let mode = json!({"type": "string", "enum": ["Permissive", "Strict"]});
        let duration = json!({"type": "string", "pattern": "^([0-9]{1,5}(h|m|s|ms)){1,4}$"});
        let date = json!({"type": "string", "format": "date-time"});
        run(vec![
            field("enum ok", mode.clone(), json!("Strict"), &[]),
            field("enum", mode, json!("Stric"), &[("spec.f", r#"must be one of "Permissive", "Strict" (got "Stric")"#)]),
            field("enum int", json!({"type": "integer", "enum": [1, 2]}), json!(3), &[("spec.f", "must be one of 1, 2 (got 3)")]),
            field("duration ms", duration.clone(), json!("250ms"), &[]),
            field("duration h m", duration.clone(), json!("1h30m"), &[]),
            field("duration words", duration.clone(), json!("5 seconds"),
                &[("spec.f", r#"must match pattern ^([0-9]{1,5}(h|m|s|ms)){1,4}$ (got "5 seconds")"#)]),
            field("duration negative", duration, json!("-1s"), &[("spec.f", r#"must match pattern ^([0-9]"#)]),
            field("unanchored pattern", json!({"type": "string", "pattern": "b+"}), json!("abba"), &[]),
            field("uncompilable pattern", json!({"type": "string", "pattern": "(?<=x)y("}), json!("y"), &[]),
            field("minLength chars", json!({"type": "string", "minLength": 3}), json!("né"),
                &[("spec.f", "must have at least 3 characters (got 2)")]),
            field("maxLength chars", json!({"type": "string", "maxLength": 2}), json!("né"), &[]),
            field("date-time ok", date.clone(), json!("2024-05-01T10:00:00.5+02:00"), &[]),
            field("date-time bad", date, json!("yesterday"), &[("spec.f", "must be an RFC 3339 date-time")]),
            field("other formats ignored", json!({"type": "string", "format": "hostname"}), json!("not a host!"), &[]),
            field("max", weight.clone(), json!(1200), &[("spec.f", "must be at most 1000 (got 1200)")]),
            field("min", weight.clone(), json!(-1), &[("spec.f", "must be at least 0 (got -1)")]),
            field("bounds inclusive", weight, json!(1000), &[]),
            field("exclusive min", open_unit.clone(), json!(0), &[("spec.f", "must be greater than 0 (got 0)")]),
            field("exclusive max", open_unit.clone(), json!(1.0), &[("spec.f", "must be less than 1 (got 1.0)")]),
            field("exclusive inside", open_unit, json!(0.5), &[]),
            field("multipleOf", json!({"type": "integer", "multipleOf": 5}), json!(12), &[("spec.f", "must be a multiple of 5 (got 12)")]),
            field("multipleOf float", json!({"type": "number", "multipleOf": 0.1}), json!(0.3), &[]),
            field("int32", json!({"type": "integer", "format": "int32"}), json!(3_000_000_000u64), &[("spec.f", "must fit in int32")]),
            field("int64", json!({"type": "integer", "format": "int64"}), json!(u64::MAX), &[("spec.f", "must fit in int64")]),
        ]);
    }

    #[test]
    #[rustfmt::skip]
    fn lists() {
        let sized = json!({"type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "string"}});
        let set = json!({"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}});
        let ports = json!({"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name", "protocol"],
            "items": {"type": "object", "properties": {"name": {"type": "string"}, "protocol": {"type": "string"}, "port": {"type": "integer"}}}});
        let backend = json!({"type": "object", "properties": {"weight": {"type": "integer", "maximum": 1000}}});
        let rules = crd(json!({"type": "object", "properties": {"rules": {"type": "array", "items": {
            "type": "object", "properties": {"backendRefs": {"type": "array", "items": backend}}}}}}));
        run(vec![
            field("minItems", sized.clone(), json!([]), &[("spec.f", "must have at least 1 items (got 0)")]),
            field("maxItems", sized.clone(), json!(["a", "b", "c"]), &[("spec.f", "must have at most 2 items (got 3)")]),
            field("item type", sized, json!(["a", 1]), &[("spec.f[1]", "must be string, got integer")]),
            field("set ok", set.clone(), json!(["a", "b"]), &[]),
            field("set dup", set, json!(["a", "b", "a"]), &[("spec.f[2]", r#"duplicate entry "a" (same as [0])"#)]),
            field("uniqueItems 1 == 1.0", json!({"type": "array", "uniqueItems": true}), json!([1, 1.0]), &[("spec.f[1]", "duplicate")]),
            field("map ok", ports.clone(), json!([{"name": "http", "protocol": "TCP"}, {"name": "http", "protocol": "UDP"}]), &[]),
            field("map dup", ports,
                json!([{"name": "http", "protocol": "TCP", "port": 80}, {"name": "dns"}, {"name": "http", "protocol": "TCP", "port": 81}]),
                &[("spec.f[2]", r#"duplicate entry with name="http", protocol="TCP" (same as [0])"#)]),
            ("nested array path", rules, doc(json!({"rules": [{"backendRefs": [{"weight": 1}, {"weight": 1200, "wieght": 1}]}]})),
                &[("spec.rules[0].backendRefs[1].weight", "must be at most 1000 (got 1200)"),
                  ("spec.rules[0].backendRefs[1].wieght", r#"(did you mean "weight"?)"#)]),
        ]);
    }

    #[test]
    #[rustfmt::skip]
    fn combinators() {
        let either = |key: &str| {
            let mut s = json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}});
            s[key] = json!([{"required": ["a"]}, {"required": ["b"]}]);
            s
        };
        let port = json!({"x-kubernetes-int-or-string": true,
            "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": "^[0-9]+%$"}]});
        let not_none = json!({"type": "string", "not": {"enum": ["none"]}});
        run(vec![
            field("anyOf ok", either("anyOf"), json!({"b": 1}), &[]),
            field("anyOf none", either("anyOf"), json!({}), &[("spec.f",
                "must match at least one of 2 alternatives (#1: a: required field is missing; #2: b: required field is missing)")]),
            field("oneOf ok", either("oneOf"), json!({"a": 1}), &[]),
            field("oneOf both", either("oneOf"), json!({"a": 1, "b": 2}), &[("spec.f", "must match exactly one of 2 alternatives, matched #1, #2")]),
            field("oneOf none", either("oneOf"), json!({}), &[("spec.f", "must match exactly one of 2 alternatives, matched none (#1: a:")]),
            field("branches don't open unknown fields", either("anyOf"), json!({"a": 1, "c": 2}), &[("spec.f.c", "unknown field")]),
            field("allOf", json!({"type": "integer", "allOf": [{"minimum": 1}, {"maximum": 5}]}), json!(9), &[("spec.f", "must be at most 5")]),
            field("not", not_none.clone(), json!("none"), &[("spec.f", r#"must not match the schema {"enum":["none"]}"#)]),
            field("not ok", not_none, json!("some"), &[]),
            field("int-or-string anyOf int", port.clone(), json!(5), &[]),
            field("int-or-string anyOf pct", port.clone(), json!("50%"), &[]),
            field("int-or-string anyOf bad", port, json!("half"), &[("spec.f", "#2: must match pattern ^[0-9]+%$")]),
        ]);
    }

    #[test]
    #[rustfmt::skip]
    fn metadata() {
        let schema = crd(json!({"type": "object"}));
        let case = |name, meta: Value, expect: &'static [(&'static str, &'static str)]| (name, schema.clone(), json!({"metadata": meta, "spec": {}}), expect);
        run(vec![
            case("dotted name", json!({"name": "web.v1-2"}), &[]),
            case("uppercase", json!({"name": "My_Name"}), &[("metadata.name", "must be a lowercase RFC 1123 subdomain")]),
            case("trailing dash", json!({"name": "web-"}), &[("metadata.name", r#"(got "web-")"#)]),
            case("empty label", json!({"name": "a..b"}), &[("metadata.name", "RFC 1123")]),
            case("too long", json!({"name": "a".repeat(254)}), &[("metadata.name", "at most 253 characters")]),
            case("missing name", json!({}), &[("metadata.name", "required field is missing")]),
            case("generateName", json!({"generateName": "web-"}), &[]),
            case("name type", json!({"name": 5}), &[("metadata.name", "must be string, got integer")]),
            case("labels", json!({"name": "a", "labels": {"app.kubernetes.io/name": 1, "ok": "x"}}),
                &[(r#"metadata.labels["app.kubernetes.io/name"]"#, "must be string, got integer 1")]),
            case("annotations", json!({"name": "a", "annotations": ["x"]}), &[("metadata.annotations", "must be map of strings, got array")]),
            case("metadata not object", json!("a"), &[("metadata", "must be object, got string")]),
            ("no metadata", schema.clone(), json!({"spec": {}}), &[("metadata.name", "required field is missing")]),
            // Some CRDs declare `metadata: {type: object}`; that must not make `name` unknown.
            ("declared metadata", json!({"type": "object", "properties": {"metadata": {"type": "object"}}}),
                json!({"metadata": {"name": "a"}}), &[]),
        ]);
    }

    #[test]
    fn deep_nesting_is_bounded() {
        let (mut schema, mut value) = (json!({"type": "integer"}), json!(1));
        for _ in 0..100 {
            schema = json!({"type": "object", "properties": {"a": schema}});
            value = json!({"a": value});
        }
        let got = validate(&crd(schema), &doc(value));
        let path = format!("spec{}", ".a".repeat(MAX_DEPTH));
        let message = "document nested too deeply".to_string();
        assert_eq!(got, vec![SchemaViolation { path, message }]);

        // A deep value under a free-form or duplicate-checked node must not blow the stack.
        // Built by hand: `json!` would re-serialise `deep` at every level.
        let mut deep = json!(1);
        for _ in 0..2000 {
            deep = Value::Array(vec![deep]);
        }
        let set = json!({"type": "array", "uniqueItems": true});
        let free = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true, "properties": {"set": set}});
        let mut value = doc(json!({}));
        value["spec"]["set"] = Value::Array(vec![deep.clone(), json!([[1]])]);
        value["spec"]["free"] = deep;
        let got = validate(&crd(free), &value);
        assert!(got.is_empty(), "{got:#?}");
    }
}
