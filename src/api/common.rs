//! Types shared by several weft.dev resources: durations, references to
//! Services, HTTP matches, and the status block every policy carries.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The duration grammar of Gateway API (`GEP-2257`): up to four `<number><unit>`
/// groups, units `h`, `m`, `s`, `ms`. Kept identical so policies read the same
/// as HTTPRoute timeouts.
pub const DURATION_PATTERN: &str = "^([0-9]{1,5}(h|m|s|ms)){1,4}$";

/// A duration written the Gateway API way: `250ms`, `5s`, `1m30s`, `24h`.
///
/// The schema carries the pattern, so the API server rejects `5 seconds`; the
/// Rust side parses it once, so nothing downstream handles strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(std::time::Duration);

/// Parses a duration written as in the CRDs (`500ms`, `15s`, `1m30s`), for
/// command-line flags.
pub fn parse_std_duration(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<Duration>()
        .map(|d| d.as_std())
        .map_err(|e| e.to_string())
}

impl Duration {
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }

    pub const fn from_secs(s: u64) -> Self {
        Self(std::time::Duration::from_secs(s))
    }

    pub fn as_std(self) -> std::time::Duration {
        self.0
    }

    pub fn as_millis(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }
}

/// A short, stable revision of `value` (the first 8 bytes of the SHA-256
/// of its JSON, in hex): what a staged change runs for, so that an edit
/// of it, and only of it, starts the change again.
pub fn revision_of<T: Serialize + ?Sized>(value: &T) -> String {
    use sha2::{Digest, Sha256};
    let text = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(&Sha256::digest(&text)[..8])
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: write up to four number+unit groups with units h, m, s or ms, such as 250ms, 5s or 1m30s"
)]
pub struct DurationError {
    input: String,
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DurationError {
            input: s.to_owned(),
        };
        let bytes = s.as_bytes();
        let (mut i, mut groups, mut total_ms) = (0usize, 0u32, 0u64);
        if bytes.is_empty() {
            return Err(err());
        }
        while i < bytes.len() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let digits = &s[start..i];
            if digits.is_empty() || digits.len() > 5 {
                return Err(err());
            }
            let n: u64 = digits.parse().map_err(|_| err())?;
            let unit_ms = if s[i..].starts_with("ms") {
                i += 2;
                1
            } else {
                let unit = match bytes.get(i) {
                    Some(b'h') => 3_600_000,
                    Some(b'm') => 60_000,
                    Some(b's') => 1_000,
                    _ => return Err(err()),
                };
                i += 1;
                unit
            };
            groups += 1;
            if groups > 4 {
                return Err(err());
            }
            total_ms += n * unit_ms;
        }
        Ok(Self::from_millis(total_ms))
    }
}

impl fmt::Display for Duration {
    /// Prints the shortest canonical form, so a round trip is stable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
            if ms >= size {
                write!(f, "{}{unit}", ms / size)?;
                ms %= size;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<'de, str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
        })
    }
}

/// A reference to a Service in the policy's own namespace, shaped like a
/// Gateway API `parentRef`/`targetRef` in mesh (GAMMA) mode.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceReference {
    /// API group of the referent: always the core group, written `""`.
    #[serde(default)]
    #[schemars(extend("enum" = [""]))]
    pub group: String,
    /// Kind of the referent: always `Service`.
    #[serde(default)]
    pub kind: ServiceKind,
    /// Name of the Service, in the same namespace as this policy.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}

impl ServiceReference {
    pub fn service(name: impl Into<String>) -> Self {
        Self {
            group: String::new(),
            kind: ServiceKind::Service,
            name: name.into(),
        }
    }
}

/// The only kind a Service reference may name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ServiceKind {
    #[default]
    Service,
}

/// An HTTP request method.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

impl HttpMethod {
    /// Methods RFC 9110 defines as idempotent: safe to send twice.
    pub const IDEMPOTENT: [HttpMethod; 6] = [
        HttpMethod::Get,
        HttpMethod::Head,
        HttpMethod::Options,
        HttpMethod::Put,
        HttpMethod::Delete,
        HttpMethod::Trace,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Head => "HEAD",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Connect => "CONNECT",
            HttpMethod::Options => "OPTIONS",
            HttpMethod::Trace => "TRACE",
            HttpMethod::Patch => "PATCH",
        }
    }

    /// Every method, in declaration order.
    pub const ALL: [HttpMethod; 9] = [
        HttpMethod::Get,
        HttpMethod::Head,
        HttpMethod::Post,
        HttpMethod::Put,
        HttpMethod::Delete,
        HttpMethod::Connect,
        HttpMethod::Options,
        HttpMethod::Trace,
        HttpMethod::Patch,
    ];

    /// The method named exactly `name` (methods are case-sensitive,
    /// RFC 9110 §9.1); `None` for extension methods.
    pub fn from_name(name: &str) -> Option<HttpMethod> {
        Self::ALL.into_iter().find(|m| m.as_str() == name)
    }
}

/// How a path is compared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum PathMatchType {
    /// The whole path equals `value` (the query string is ignored).
    Exact,
    /// The path starts with `value` at a `/` boundary: `/api` matches `/api`
    /// and `/api/cart`, not `/apix`.
    #[default]
    PathPrefix,
}

/// A request path to match.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PathMatch {
    /// `Exact` or `PathPrefix` (the default).
    #[serde(default, rename = "type")]
    pub type_: PathMatchType,
    /// The path, starting with `/`.
    #[schemars(regex(pattern = r"^/[^\s?#]*$"), length(max = 1024))]
    pub value: String,
}

/// The status every weft policy carries.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`, `ResolvedRefs` and `Programmed`, as in Gateway API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_gateway_api() {
        let ok = [
            ("250ms", 250),
            ("5s", 5_000),
            ("1m30s", 90_000),
            ("24h", 86_400_000),
            ("1h1m1s1ms", 3_661_001),
            ("0s", 0),
        ];
        for (text, ms) in ok {
            let d: Duration = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(d.as_millis(), ms, "{text}");
        }
        for bad in [
            "",
            "5",
            "5 seconds",
            "-1s",
            "1.5s",
            "1d",
            "123456s",
            "1h1m1s1ms1h",
            "s",
        ] {
            let err = bad.parse::<Duration>().expect_err(bad);
            assert!(err.to_string().contains("such as 250ms"), "{bad}: {err}");
        }
    }

    #[test]
    fn durations_print_canonically() {
        for (text, canonical) in [
            ("90s", "1m30s"),
            ("1500ms", "1s500ms"),
            ("0ms", "0s"),
            ("24h", "24h"),
        ] {
            let d: Duration = text.parse().expect(text);
            assert_eq!(d.to_string(), canonical);
            assert_eq!(canonical.parse::<Duration>().expect(canonical), d);
        }
    }

    #[test]
    fn duration_pattern_agrees_with_the_parser() {
        let re = regex::Regex::new(DURATION_PATTERN).expect("pattern compiles");
        for s in ["250ms", "1m30s", "5 seconds", "1.5s", "1d", "123456s", ""] {
            assert_eq!(re.is_match(s), s.parse::<Duration>().is_ok(), "{s}");
        }
    }
}
