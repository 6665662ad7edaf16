//! The bodies of the fuzz targets in `fuzz/`, here so that they build, and
//! run over their seeds, with every `make test` (`tests/fuzz_seeds.rs`).
//! Kept in `fuzz/fuzz_targets/` they needed nightly to build, and a change
//! of signature went unnoticed until someone fuzzed.
//!
//! Each takes one input and panics when a property breaks; libFuzzer (`make
//! fuzz-smoke`) and the seed test call them alike. Not part of weft's API.

use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::identity::SpiffeId;
use crate::inject::webhook::{AllMeshed, Webhook, review};
use crate::inject::{ClusterCaps, Decision, InjectSettings, NamespaceInfo, inject};
use crate::proxy::admin::{ProbeTarget, canonical_probe_path, parse_probe_target};
use crate::proxy::detect::{Protocol, classify, detect};
use crate::proxy::http::body;
use crate::proxy::server::{Drain, InFlight, serve_http};

/// What the proxy reads off the wire before any policy applies: the TLS
/// ClientHello reader, protocol detection on every prefix of the input,
/// then the whole input served as a client's bytes by the proxy's HTTP
/// server (HTTP/1 head parsing, HTTP/2 framing) with its real limits.
/// Neither may panic or hang.
pub fn proxy_detect_http(data: &[u8]) {
    // The ClientHello reader never asks for less than it was given.
    if let crate::proxy::hello::Hello::NeedMore(n) = crate::proxy::hello::parse(data) {
        assert!(
            n > data.len(),
            "asked for {n} bytes with {} in hand",
            data.len()
        );
    }

    // Detection is monotonic: once decided, longer prefixes agree.
    let mut decided = None;
    for end in 0..=data.len().min(64) {
        match (decided, classify(&data[..end])) {
            (None, d) => decided = d,
            (Some(a), Some(b)) => assert_eq!(a, b, "detection changed its mind at {end} bytes"),
            (Some(_), None) => panic!("detection forgot its decision at {end} bytes"),
        }
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let drain = Drain::new();
        let in_flight = InFlight::new(
            "inbound",
            "inbound-max-in-flight",
            10_000,
            Default::default(),
        );
        let serve = async move {
            let Ok(d) = detect(server, Duration::from_millis(10)).await else {
                return;
            };
            if matches!(d.protocol, Protocol::Http1 | Protocol::Http2) {
                serve_http(
                    d.io,
                    &drain,
                    &Default::default(),
                    &in_flight,
                    |_req| async { http::Response::new(body::full("ok")) },
                )
                .await;
            }
        };
        let talk = async move {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
        };
        let _ =
            tokio::time::timeout(Duration::from_secs(2), async { tokio::join!(serve, talk) }).await;
    });
}

/// The inbound path's decisions on a client's first bytes: detection,
/// the HTTP head as parsers read it, and authorization. Properties:
/// - anything an HTTP/1 parser (httparse: hyper's, and the parse most
///   applications share) reads as a request line with an origin-form (`/`),
///   asterisk or absolute (`http://`, `https://`) target is never relayed
///   as opaque TCP, where it would reach the application past the access
///   checks and with a client's own `weft-client-id`;
/// - detection is monotonic (checked in [`proxy_detect_http`] too);
/// - the AccessPolicy check of the request, with its path normalised as
///   the application will see it, never panics, and a rule that names
///   paths or methods never admits a connection that carries no request
///   (opaque TCP).
pub fn inbound_path(data: &[u8]) {
    use crate::config::{AccessRuleConfig, Authorization, IdentityMatch, InboundConfig};
    use crate::proxy::authz::{Access, HttpRequest, PortNames, check};
    use crate::proxy::http::route::normalize_path;

    // `None`: the bytes never decide. The proxy then either sees the
    // client close (the application gets an unfinished head, no request)
    // or times detection out and waits for the client's next bytes or the
    // application's, serving still-undecided bytes as HTTP
    // (`first_speaker` in the inbound path; the dripped cases of
    // `a_leading_empty_line_does_not_make_a_request_opaque`). Only an
    // explicit opaque decision relays a request unchecked.
    let decided = (0..=data.len()).find_map(|end| classify(&data[..end]));
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = req.parse(data).is_ok();
    if parsed && let (Some(method), Some(path)) = (req.method, req.path) {
        let target_is_http = path.starts_with('/')
            || path == "*"
            || path
                .get(..7)
                .is_some_and(|p| p.eq_ignore_ascii_case("http://"))
            || path
                .get(..8)
                .is_some_and(|p| p.eq_ignore_ascii_case("https://"));
        if target_is_http {
            assert_ne!(
                decided,
                Some(Protocol::Opaque),
                "an HTTP parser reads {method} {path} as a request, detection called it opaque"
            );
        }
        let inbound: InboundConfig = InboundConfig {
            mode: crate::config::InboundMode::Strict,
            plaintext_ports: Vec::new(),
            authorizations: vec![Authorization {
                policy: "shop/payments-callers".into(),
                service: None,
                selector: None,
                ports: Vec::new(),
                rules: vec![AccessRuleConfig {
                    identities: vec![IdentityMatch {
                        namespace: "shop".into(),
                        service_account: Some("checkout".into()),
                    }],
                    ports: Vec::new(),
                    paths: vec![crate::config::PathMatchConfig {
                        type_: crate::api::PathMatchType::PathPrefix,
                        value: "/charges".into(),
                    }],
                    methods: Vec::new(),
                }],
                audit: false,
                revision: String::new(),
            }],
            rate_limits: Vec::new(),
        };
        let names = PortNames::new([]);
        let caller = SpiffeId::new("cluster.local", "shop", "checkout");
        if let Ok(method) = http::Method::from_bytes(method.as_bytes()) {
            let path = normalize_path(path.split('?').next().unwrap_or(""));
            let _ = check(
                &inbound,
                &names,
                None,
                8080,
                Some(&caller),
                Some(HttpRequest {
                    method: &method,
                    path: &path,
                }),
            );
        }
        assert!(
            matches!(
                check(&inbound, &names, None, 8080, Some(&caller), None),
                Access::Denied { .. }
            ),
            "a path rule admitted a connection without a request"
        );
    }
}

fn inject_settings(native: bool) -> InjectSettings {
    InjectSettings::new(
        "weft:fuzz",
        ClusterCaps {
            native_sidecars: native,
        },
    )
}

/// The admission webhook end to end in process: AdmissionReview decoding
/// and the sidecar patch builder. Any input: the webhook answers with a
/// message or a review, never panics. A Pod it injects: the patch applies,
/// yields a Pod, and a second injection changes nothing. The first byte's
/// low bit picks native sidecars or classic ones.
pub fn webhook_admission(data: &[u8]) {
    let native = data.first().is_some_and(|b| b & 1 == 1);
    let hook = Webhook::new(inject_settings(native), Box::new(AllMeshed));
    if let Ok(answer) = review(&hook, data) {
        let answer = serde_json::to_value(answer).expect("a review serializes");
        // The patch travels as Go's []byte: a base64 string or byte values.
        let bytes: Option<Vec<u8>> = match &answer["response"]["patch"] {
            serde_json::Value::String(p) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(p)
                    .expect("base64 patch"),
            ),
            serde_json::Value::Array(a) => Some(
                a.iter()
                    .map(|b| {
                        u8::try_from(b.as_u64().expect("a byte value")).expect("a byte in 0..=255")
                    })
                    .collect(),
            ),
            _ => None,
        };
        if let Some(bytes) = bytes {
            let _: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSON Patch");
        }
    }
    if let Ok(pod) = serde_json::from_slice::<Pod>(data) {
        let s = inject_settings(native);
        let first = inject(&pod, &NamespaceInfo::meshed("shop"), &s);
        let mut value = serde_json::to_value(&pod).expect("pod json");
        json_patch::patch(&mut value, &first.patch).expect("the patch applies to its pod");
        let injected: Pod = serde_json::from_value(value).expect("the patched pod is a Pod");
        if first.decision == Decision::Injected {
            let second = inject(&injected, &NamespaceInfo::meshed("shop"), &s);
            assert!(
                second.patch.0.is_empty(),
                "injecting twice is injecting once"
            );
        }
    }
}

/// What may stand unescaped in a URI path (RFC 3986 `pchar` and `/`).
fn may_stand_in_path(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b)
}

/// The parsers of untrusted names the proxy compares for access: the probe
/// port's canonical path form (anyone who can reach the pod sends it
/// paths), probe targets as the injector writes them, and SPIFFE ids as
/// read from peer certificates. None may panic; the canonical form must be
/// stable and only hold what may stand in a URI path; a target and an id
/// must read back as what was written.
pub fn probe_paths_and_ids(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    let canonical = canonical_probe_path(text);
    assert_eq!(
        canonical_probe_path(&canonical),
        canonical,
        "stable for {text:?}"
    );
    let bytes = canonical.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let escape = bytes.get(i + 1..i + 3).unwrap_or_default();
            assert!(
                escape.len() == 2
                    && escape
                        .iter()
                        .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b)),
                "a broken escape in {canonical:?}"
            );
            i += 3;
        } else {
            assert!(
                may_stand_in_path(bytes[i]),
                "{:?} may not stand in {canonical:?}",
                bytes[i] as char
            );
            i += 1;
        }
    }

    // A probe target the injector writes reads back as itself.
    if text.starts_with('/') && !text.contains(',') {
        let target = ProbeTarget::http(8080, text);
        assert_eq!(
            parse_probe_target(&target.to_string()),
            Ok(target.clone()),
            "{text:?}"
        );
    }
    // Whatever a target entry holds, parsing it does not panic.
    let _ = parse_probe_target(text);

    // A SPIFFE id that parses prints as the same id.
    if let Ok(id) = text.parse::<SpiffeId>() {
        assert_eq!(id.to_string().parse::<SpiffeId>().ok(), Some(id));
    }
}
