//! Tier 1: the fuzz targets' bodies (`weft::fuzzing`) over their seeds in
//! `fuzz/seeds/<target>/` and a fixed set of mutations of those seeds. Every
//! `make test` so builds what `make fuzz-smoke` runs and checks the targets'
//! properties on inputs shaped like real traffic; libFuzzer explores further.
//! The mutations come from a fixed-seed generator: a failure names the
//! input, and the same input fails again on the next run.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

/// The seed files of one target, sorted by name.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display())))
        .collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// xorshift64*: small, fixed-seed, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).expect("fits")).expect("fits")
    }
}

/// Bytes that sit on the parsers' boundaries.
const INTERESTING: &[u8] = b"\x00\xff\r\n%/:.,?#@ \t\x16\x03\x01";

/// `count` inputs, each a seed with one to four edits: a byte changed,
/// inserted or removed, a cut, a repeated run, or a splice with another seed.
fn mutations(seeds: &[Vec<u8>], count: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Rng(seed);
    (0..count)
        .map(|_| {
            let mut input = seeds[rng.below(seeds.len())].clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(input.len() + 1);
                match rng.below(7) {
                    0 if at < input.len() => input[at] ^= 1 << rng.below(8),
                    1 if at < input.len() => input[at] = INTERESTING[rng.below(INTERESTING.len())],
                    2 => input.insert(at, INTERESTING[rng.below(INTERESTING.len())]),
                    3 if at < input.len() => {
                        let end = (at + 1 + rng.below(8)).min(input.len());
                        input.drain(at..end);
                    }
                    4 => input.truncate(at),
                    5 if at < input.len() => {
                        let end = (at + 1 + rng.below(16)).min(input.len());
                        let run = input[at..end].to_vec();
                        input.splice(at..at, run);
                    }
                    _ => {
                        let other = &seeds[rng.below(seeds.len())];
                        let from = rng.below(other.len() + 1);
                        input.truncate(at);
                        input.extend_from_slice(&other[from..]);
                    }
                }
            }
            input
        })
        .collect()
}

/// A value on the injector's edges, mostly of the same JSON type as
/// `now` (so the document stays a Pod more often than not): the proxy's
/// own ports and names, empty and odd strings, out-of-range numbers.
fn odd_value(now: &serde_json::Value, rng: &mut Rng) -> serde_json::Value {
    use serde_json::{Value, json};
    let numbers = [15001, 15006, 15020, 15101, 15121, 0, 65535, -1].map(|n| json!(n));
    let strings = [
        "",
        "weft-proxy",
        "weft-init",
        "/healthz",
        "15121",
        "true",
        "a b",
    ]
    .map(|s| json!(s));
    let any = [json!(null), json!([]), json!({}), json!(true)];
    let pick = |values: &[Value], rng: &mut Rng| values[rng.below(values.len())].clone();
    match (now, rng.below(8)) {
        (_, 0) => pick(&any, rng),
        (Value::Number(_), _) => pick(&numbers, rng),
        (Value::String(_), _) => pick(&strings, rng),
        _ => pick(&any, rng),
    }
}

/// `count` inputs shaped like the seeds (JSON): in each, one to four
/// values anywhere in the document replaced with an odd one, removed, or
/// an array's element repeated. Byte edits mostly break the JSON; these
/// reach the injector with Pods it has not seen.
fn json_mutations(seeds: &[Vec<u8>], count: usize, seed: u64) -> Vec<Vec<u8>> {
    use serde_json::Value;
    fn paths(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        out.push(at.clone());
        let children: Vec<(String, &Value)> = match v {
            Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (i.to_string(), v))
                .collect(),
            _ => Vec::new(),
        };
        for (k, child) in children {
            at.push(k);
            paths(child, at, out);
            at.pop();
        }
    }
    let docs: Vec<Value> = seeds
        .iter()
        .map(|s| serde_json::from_slice(s).expect("a JSON seed"))
        .collect();
    let mut rng = Rng(seed);
    (0..count)
        .map(|_| {
            let mut doc = docs[rng.below(docs.len())].clone();
            for _ in 0..=rng.below(4) {
                let mut all = Vec::new();
                paths(&doc, &mut Vec::new(), &mut all);
                let path = &all[1 + rng.below(all.len() - 1)];
                let pointer: String = path
                    .iter()
                    .map(|k| format!("/{}", k.replace('~', "~0").replace('/', "~1")))
                    .collect();
                let (parent, key) = pointer.rsplit_once('/').expect("not the root");
                let choice = rng.below(3);
                let now = doc.pointer(&pointer).cloned().unwrap_or_default();
                let replacement = odd_value(&now, &mut rng);
                match (doc.pointer_mut(parent).unwrap_or(&mut Value::Null), choice) {
                    (Value::Object(m), 0) => {
                        m.remove(&key.replace("~1", "/").replace("~0", "~"));
                    }
                    (Value::Array(a), 0) => {
                        let i: usize = key.parse().expect("an index");
                        let again = a[i].clone();
                        a.insert(i, again);
                    }
                    _ => {
                        if let Some(v) = doc.pointer_mut(&pointer) {
                            *v = replacement;
                        }
                    }
                }
            }
            serde_json::to_vec(&doc).expect("JSON")
        })
        .collect()
}

/// Runs `body` over every input; on a panic, fails naming the input.
fn run_all(target: &str, body: fn(&[u8]), inputs: &[Vec<u8>]) {
    for (i, input) in inputs.iter().enumerate() {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| body(input))) {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(ToString::to_string))
                .unwrap_or_default();
            panic!(
                "{target}: input {i} of {} broke a property ({why}): {:?}",
                inputs.len(),
                String::from_utf8_lossy(input)
            );
        }
    }
}

fn seeds_and_mutations(target: &str, count: usize) -> Vec<Vec<u8>> {
    let seeds = seeds(target);
    let mut inputs = mutations(&seeds, count, 0x5eed_0000 ^ target.len() as u64);
    inputs.splice(0..0, seeds);
    inputs
}

#[test]
fn proxy_detect_http_holds_over_its_seeds_and_their_mutations() {
    let inputs = seeds_and_mutations("proxy_detect_http", 300);
    run_all(
        "proxy_detect_http",
        weft::fuzzing::proxy_detect_http,
        &inputs,
    );
}

#[test]
fn inbound_path_holds_over_its_seeds_and_their_mutations() {
    let inputs = seeds_and_mutations("inbound_path", 5000);
    run_all("inbound_path", weft::fuzzing::inbound_path, &inputs);
}

#[test]
fn webhook_admission_holds_over_its_seeds_and_their_mutations() {
    let seeds = seeds("webhook_admission");
    // Each golden pod with the other sidecar style too (the first byte's
    // low bit picks it: `{` is odd, a leading space even).
    let mut inputs: Vec<Vec<u8>> = seeds
        .iter()
        .map(|s| [b" ".as_slice(), s].concat())
        .collect();
    inputs.extend(seeds.iter().cloned());
    inputs.extend(mutations(&seeds, 100, 0x5eed_0001));
    let shaped = json_mutations(&seeds, 400, 0x5eed_0002);
    // Still a Pod, alone or as a review's object: what reaches the injector.
    let pods = shaped
        .iter()
        .filter_map(|i| serde_json::from_slice::<serde_json::Value>(i).ok())
        .filter(|v| {
            let pod = v.pointer("/request/object").unwrap_or(v).clone();
            serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(pod).is_ok()
        })
        .count();
    assert!(
        pods > 200,
        "only {pods} of 400 shaped inputs are still Pods"
    );
    inputs.extend(shaped);
    run_all(
        "webhook_admission",
        weft::fuzzing::webhook_admission,
        &inputs,
    );
}

#[test]
fn probe_paths_and_ids_hold_over_their_seeds_and_their_mutations() {
    let inputs = seeds_and_mutations("probe_paths_and_ids", 5000);
    run_all(
        "probe_paths_and_ids",
        weft::fuzzing::probe_paths_and_ids,
        &inputs,
    );
}

/// The mutations reach past the seeds: most inputs differ from every seed,
/// and the same seed gives the same inputs (a failure reproduces).
#[test]
fn mutations_are_new_inputs_and_reproducible() {
    let seeds = seeds("probe_paths_and_ids");
    let a = mutations(&seeds, 500, 7);
    assert_eq!(a, mutations(&seeds, 500, 7));
    let new = a.iter().filter(|m| !seeds.contains(m)).count();
    assert!(
        new > 400,
        "only {new} of 500 mutations differ from the seeds"
    );
}
