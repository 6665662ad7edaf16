//! Fuzzes the admission webhook end to end in process: AdmissionReview
//! decoding and the sidecar patch builder. Any input: the webhook answers
//! with a message or a review, never panics. A Pod it injects: the patch
//! applies, yields a Pod, and a second injection changes nothing.
//! Seeds: `fuzz/seeds/webhook_admission` (reviews and pods from the golden
//! files).
#![no_main]

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;
use weft::inject::webhook::{AllMeshed, Webhook, review};
use weft::inject::{ClusterCaps, Decision, InjectSettings, NamespaceInfo, inject};

fn settings(native: bool) -> InjectSettings {
    InjectSettings::new("weft:fuzz", ClusterCaps { native_sidecars: native })
}

fuzz_target!(|data: &[u8]| {
    let native = data.first().is_some_and(|b| b & 1 == 1);
    let hook = Webhook::new(settings(native), Box::new(AllMeshed));
    if let Ok(answer) = review(&hook, data) {
        let answer = serde_json::to_value(answer).expect("a review serializes");
        // The patch travels as Go's []byte: a base64 string or byte values.
        let bytes: Option<Vec<u8>> = match &answer["response"]["patch"] {
            serde_json::Value::String(p) => {
                Some(base64::engine::general_purpose::STANDARD.decode(p).expect("base64 patch"))
            }
            serde_json::Value::Array(a) => {
                Some(a.iter().map(|b| b.as_u64().expect("a byte") as u8).collect())
            }
            _ => None,
        };
        if let Some(bytes) = bytes {
            let _: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSON Patch");
        }
    }
    if let Ok(pod) = serde_json::from_slice::<Pod>(data) {
        let s = settings(native);
        let first = inject(&pod, &NamespaceInfo::meshed("shop"), &s);
        let mut value = serde_json::to_value(&pod).expect("pod json");
        json_patch::patch(&mut value, &first.patch).expect("the patch applies to its pod");
        let injected: Pod = serde_json::from_value(value).expect("the patched pod is a Pod");
        if first.decision == Decision::Injected {
            let second = inject(&injected, &NamespaceInfo::meshed("shop"), &s);
            assert!(second.patch.0.is_empty(), "injecting twice is injecting once");
        }
    }
});
