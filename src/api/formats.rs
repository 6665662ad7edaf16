//! The `format`s a CRD schema may carry: only those the API server knows.
//!
//! schemars names Rust's integer widths (`uint16`, `uint32`, ...), which no
//! API server recognises: it strips them from the schema it validates
//! with and answers every CRD apply with `Warning: unrecognized format
//! "uint32"`. The rules are those of apiextensions-apiserver
//! `pkg/apiserver/validation/formats.go` (`GetUnrecognizedFormats`, the
//! same source of truth as `StripUnsupportedFormatsPostProcessorForVersion`):
//! an `integer` may say `int32` or `int64`, a `number` `float` or `double`,
//! a `string` (or an untyped node) one of [`STRING_FORMATS`], and no other
//! type any format. So an unsigned width becomes the signed format that
//! holds it, with the bounds the Rust type had (`minimum: 0`, and the
//! `maximum` of a `u8`/`u16`/`u32`) made explicit, so the API server still
//! refuses what the operator could not read; and a string format the API
//! server does not know is dropped, as the API server itself would.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    JSONSchemaPropsOrStringArray,
};

/// String formats a CRD schema may use, as `supportedVersionedFormats` in
/// apiextensions-apiserver lists them (the last two since 1.34; tier 5
/// runs 1.36). The API server compares them with `-` removed (`date-time`
/// is `datetime`).
pub const STRING_FORMATS: [&str; 27] = [
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
    "quantity",
    "k8s-short-name",
    "k8s-long-name",
];

/// Whether the API server recognises `format` on a node of type `type_`
/// (`None`: untyped), as `GetUnrecognizedFormats` decides.
pub fn recognised(type_: Option<&str>, format: &str) -> bool {
    match type_.unwrap_or("") {
        "" | "string" => {
            let normalised = format.replace('-', "");
            STRING_FORMATS
                .iter()
                .any(|f| f.replace('-', "") == normalised)
        }
        "integer" => matches!(format, "int32" | "int64"),
        "number" => matches!(format, "float" | "double"),
        _ => false,
    }
}

/// Every `(path, format)` in `schema` the API server would warn about.
pub fn unrecognised(schema: &JSONSchemaProps) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut schema = schema.clone();
    visit(&mut schema, "", &mut |s, path| {
        if let Some(f) = &s.format
            && !recognised(s.type_.as_deref(), f)
        {
            found.push((path.to_owned(), f.clone()));
        }
    });
    found
}

/// Rewrites every schema of `crd` to formats the API server knows.
pub fn to_api_server_formats(crd: &mut CustomResourceDefinition) {
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            visit(schema, "", &mut |s, _| rewrite(s));
        }
    }
}

/// The format an integer width becomes, with the bounds of the Rust type
/// that int32/int64 do not already imply.
fn integer_width(format: &str) -> Option<(&'static str, Option<f64>, Option<f64>)> {
    let bounds = |lo: f64, hi: f64| (Some(lo), Some(hi));
    let (signed, (lo, hi)) = match format {
        "int8" => ("int32", bounds(i8::MIN.into(), i8::MAX.into())),
        "int16" => ("int32", bounds(i16::MIN.into(), i16::MAX.into())),
        "uint8" => ("int32", bounds(0.0, u8::MAX.into())),
        "uint16" => ("int32", bounds(0.0, u16::MAX.into())),
        "uint32" => ("int64", bounds(0.0, u32::MAX.into())),
        // Above i64::MAX a value is no int64 anyway: 0 is the bound left.
        "uint64" | "uint" | "uint128" => ("int64", (Some(0.0), None)),
        "int" | "int128" => ("int64", (None, None)),
        _ => return None,
    };
    Some((signed, lo, hi))
}

fn rewrite(s: &mut JSONSchemaProps) {
    let Some(format) = s.format.clone() else {
        return;
    };
    if recognised(s.type_.as_deref(), &format) {
        return;
    }
    match (s.type_.as_deref(), integer_width(&format)) {
        (Some("integer"), Some((signed, lo, hi))) => {
            s.format = Some(signed.to_owned());
            // Keep a tighter bound the author wrote; never loosen one.
            if let Some(lo) = lo
                && s.minimum.is_none_or(|m| m < lo)
            {
                s.minimum = Some(lo);
                s.exclusive_minimum = None;
            }
            if let Some(hi) = hi
                && s.maximum.is_none_or(|m| m > hi)
            {
                s.maximum = Some(hi);
                s.exclusive_maximum = None;
            }
        }
        // What the API server would strip anyway.
        _ => s.format = None,
    }
}

/// Calls `f` on `s` and every schema below it (not on data such as
/// `default`, `enum` or `example`), with a dotted path for messages.
fn visit(s: &mut JSONSchemaProps, path: &str, f: &mut impl FnMut(&mut JSONSchemaProps, &str)) {
    f(s, path);
    let at = |key: &str| format!("{path}.{key}");
    for (name, child) in s.properties.iter_mut().flatten() {
        visit(child, &at(name), f);
    }
    for (name, child) in s.pattern_properties.iter_mut().flatten() {
        visit(child, &at(&format!("/{name}/")), f);
    }
    for (name, child) in s.definitions.iter_mut().flatten() {
        visit(child, &at(&format!("definitions.{name}")), f);
    }
    for (name, child) in s.dependencies.iter_mut().flatten() {
        if let JSONSchemaPropsOrStringArray::Schema(child) = child {
            visit(child, &at(&format!("dependencies.{name}")), f);
        }
    }
    match &mut s.items {
        Some(JSONSchemaPropsOrArray::Schema(child)) => visit(child, &format!("{path}[]"), f),
        Some(JSONSchemaPropsOrArray::Schemas(all)) => {
            for (i, child) in all.iter_mut().enumerate() {
                visit(child, &format!("{path}[{i}]"), f);
            }
        }
        None => {}
    }
    for (key, child) in [
        ("additionalProperties", &mut s.additional_properties),
        ("additionalItems", &mut s.additional_items),
    ] {
        if let Some(JSONSchemaPropsOrBool::Schema(child)) = child {
            visit(child, &at(key), f);
        }
    }
    for (key, all) in [
        ("allOf", &mut s.all_of),
        ("anyOf", &mut s.any_of),
        ("oneOf", &mut s.one_of),
    ] {
        for (i, child) in all.iter_mut().flatten().enumerate() {
            visit(child, &at(&format!("{key}[{i}]")), f);
        }
    }
    if let Some(child) = &mut s.not {
        visit(child, &at("not"), f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::crds;

    fn schema(crd: &CustomResourceDefinition) -> &JSONSchemaProps {
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema")
    }

    fn at<'a>(mut s: &'a JSONSchemaProps, path: &[&str]) -> &'a JSONSchemaProps {
        for key in path {
            s = match *key {
                "[]" => match &s.items {
                    Some(JSONSchemaPropsOrArray::Schema(item)) => item,
                    other => panic!("{path:?}: items {other:?}"),
                },
                key => &s.properties.as_ref().expect("properties")[key],
            };
        }
        s
    }

    /// What `kubectl apply -f crds/` would print as `Warning: unrecognized
    /// format ...`: nothing, for every CRD weft generates.
    #[test]
    fn no_generated_crd_carries_a_format_the_api_server_does_not_know() {
        for crd in crds() {
            let found = unrecognised(schema(&crd));
            assert!(
                found.is_empty(),
                "{}: {found:?}",
                crd.spec.names.kind.as_str()
            );
        }
    }

    /// The rewrite keeps every bound the Rust type and the author set.
    #[test]
    fn unsigned_widths_become_signed_formats_with_their_bounds() {
        let all = crds();
        let traffic = all
            .iter()
            .find(|c| c.spec.names.kind == "TrafficPolicy")
            .expect("TrafficPolicy");
        let spec = at(schema(traffic), &["spec"]);
        // u32 with the author's range 1..=1000.
        let failures = at(spec, &["circuitBreaker", "consecutiveFailures"]);
        assert_eq!(failures.format.as_deref(), Some("int64"));
        assert_eq!(
            (failures.minimum, failures.maximum),
            (Some(1.0), Some(1000.0))
        );
        // u32 with only a minimum: the type's maximum comes back.
        let min_requests = at(spec, &["circuitBreaker", "failureRate", "minRequests"]);
        assert_eq!(min_requests.format.as_deref(), Some("int64"));
        assert_eq!(
            (min_requests.minimum, min_requests.maximum),
            (Some(1.0), Some(f64::from(u32::MAX)))
        );
        // u16 items with the author's range 100..=599.
        let codes = at(spec, &["retries", "statusCodes", "[]"]);
        assert_eq!(codes.format.as_deref(), Some("int32"));
        assert_eq!((codes.minimum, codes.maximum), (Some(100.0), Some(599.0)));
    }

    #[test]
    fn the_rewrite_follows_the_api_servers_rules() {
        let mut s = JSONSchemaProps {
            type_: Some("integer".into()),
            format: Some("uint16".into()),
            ..Default::default()
        };
        rewrite(&mut s);
        assert_eq!(s.format.as_deref(), Some("int32"));
        assert_eq!((s.minimum, s.maximum), (Some(0.0), Some(65535.0)));

        let mut s = JSONSchemaProps {
            type_: Some("integer".into()),
            format: Some("uint64".into()),
            minimum: Some(-3.0),
            ..Default::default()
        };
        rewrite(&mut s);
        assert_eq!(s.format.as_deref(), Some("int64"));
        assert_eq!((s.minimum, s.maximum), (Some(0.0), None));

        let mut s = JSONSchemaProps {
            type_: Some("string".into()),
            format: Some("int-or-string".into()),
            ..Default::default()
        };
        rewrite(&mut s);
        assert_eq!(s.format, None);

        for (type_, format) in [
            (Some("string"), "date-time"),
            (None, "k8s-long-name"),
            (Some("string"), "uri"),
            (Some("number"), "double"),
            (Some("integer"), "int32"),
        ] {
            assert!(recognised(type_, format), "{type_:?} {format}");
        }
        for (type_, format) in [
            (Some("integer"), "uint32"),
            (Some("number"), "int64"),
            (Some("boolean"), "byte"),
            (Some("string"), "regex"),
        ] {
            assert!(!recognised(type_, format), "{type_:?} {format}");
        }
    }
}
