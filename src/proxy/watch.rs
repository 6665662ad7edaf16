//! Keeping the config current. The mounted file is polled (the kubelet
//! swaps ConfigMap volumes by re-pointing a symlink, which a poll of the
//! resolved file's identity sees reliably); a file that cannot be read or
//! parsed leaves the last good config in force and is counted.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

use crate::config::ProxyConfig;

use super::state::ConfigStore;

/// How often the file is checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// What identifies one version of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn stamp(path: &Path) -> std::io::Result<FileStamp> {
    let m = std::fs::metadata(path)?;
    Ok(FileStamp {
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

/// The mounted config file, or its gzip sibling: above
/// [`crate::config::COMPRESS_ABOVE`] the ConfigMap holds only
/// `config.json.gz`, and the kubelet mounts no `config.json` at all.
pub fn effective_path(path: &Path) -> PathBuf {
    if path.exists() {
        return path.to_path_buf();
    }
    let mut gz = path.as_os_str().to_owned();
    gz.push(".gz");
    let gz = PathBuf::from(gz);
    if gz.exists() { gz } else { path.to_path_buf() }
}

/// Reads and applies the file (or its gzip sibling) once. `Ok(false)`:
/// read but unchanged.
pub fn load_file(path: &Path, store: &ConfigStore) -> Result<bool, String> {
    let path = &effective_path(path);
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let config = ProxyConfig::from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(store.apply(config))
}

/// Reads and applies the endpoints file (or its gzip sibling) once.
pub fn load_endpoints_file(path: &Path, store: &ConfigStore) -> Result<bool, String> {
    // The API watch, once it delivered, is newer than the kubelet's copy.
    if store.endpoints_watched() {
        return Ok(false);
    }
    let path = &effective_path(path);
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let endpoints = crate::config::EndpointsConfig::from_bytes(&bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(store.apply_endpoints(endpoints))
}

/// Polls the endpoints file until the process ends (the fallback of the
/// API watch, as for the config).
pub async fn watch_endpoints_file(path: PathBuf, store: Arc<ConfigStore>) {
    poll(path, store, load_endpoints_file, |store| {
        // The ConfigMap was deleted (the projection drops the key): back
        // to ClusterIPs, unless the API watch decides.
        if !store.endpoints_watched() {
            store.clear_endpoints();
        }
    })
    .await
}

/// Polls `path` until the process ends.
pub async fn watch_file(path: PathBuf, store: Arc<ConfigStore>) {
    // A config that disappears stays in force: the proxy keeps serving.
    poll(path, store, load_file, |_| {}).await
}

/// Polls `path`, loading it with `load` whenever it changed, and calling
/// `gone` when a file it had read is no longer there.
async fn poll(
    path: PathBuf,
    store: Arc<ConfigStore>,
    load: fn(&Path, &ConfigStore) -> Result<bool, String>,
    gone: fn(&ConfigStore),
) {
    let mut last: Option<FileStamp> = None;
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let now = match stamp(&effective_path(&path)) {
            Ok(s) => s,
            Err(e) => {
                if last.is_some() || store.load().is_none() {
                    tracing::debug!(path = %path.display(), error = %e, "config file not readable yet");
                }
                if e.kind() == std::io::ErrorKind::NotFound && last.take().is_some() {
                    gone(&store);
                }
                continue;
            }
        };
        if last == Some(now) {
            continue;
        }
        last = Some(now);
        if let Err(why) = load(&path, &store) {
            store.record_failure(&why);
        }
    }
}

/// Parses the downward API's labels file: one `key="value"` line per label
/// (Go-quoted; label keys and values have no characters that need more
/// than `\"` and `\\`).
pub fn parse_labels(text: &str) -> Result<super::authz::PodLabels, String> {
    let mut labels = super::authz::PodLabels::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let quoted = line
            .split_once('=')
            .and_then(|(k, v)| Some((k, v.strip_prefix('"')?.strip_suffix('"')?)));
        let Some((key, value)) = quoted else {
            return Err(format!(
                "line {}: {line:?} is not key=\"value\" as the downward API writes labels",
                n + 1
            ));
        };
        labels.insert(
            key.to_owned(),
            value.replace("\\\"", "\"").replace("\\\\", "\\"),
        );
    }
    Ok(labels)
}

/// Reads the labels file once; an unreadable or malformed file keeps the
/// labels last read (none at start: every Service guard then applies).
pub fn load_labels(path: &Path, into: &ArcSwapOption<super::authz::PodLabels>) {
    let parsed = std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|text| parse_labels(&text));
    match parsed {
        Ok(labels) => {
            if into.load().as_deref() != Some(&labels) {
                tracing::info!(path = %path.display(), count = labels.len(), "pod labels loaded");
                into.store(Some(Arc::new(labels)));
            }
        }
        Err(why) => {
            tracing::warn!(path = %path.display(), error = %why, "pod labels not read; keeping the last ones")
        }
    }
}

/// Polls the labels file (the kubelet rewrites it when the pod is
/// relabelled, which can move it in or out of a Service).
pub async fn watch_labels(path: PathBuf, into: Arc<ArcSwapOption<super::authz::PodLabels>>) {
    let mut last = stamp(&path).ok();
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let now = stamp(&path).ok();
        if now.is_some() && now != last {
            last = now;
            load_labels(&path, &into);
        }
    }
}

/// Polls the mounted identity Secret (`tls.crt`, `tls.key`, `ca.crt`) and
/// installs each complete, valid version. A half-written or invalid set,
/// or a certificate for another ServiceAccount than this proxy's, leaves
/// the current identity in use and is counted.
pub async fn watch_identity(
    dir: PathBuf,
    service_account: String,
    identity: Arc<super::tls::MeshIdentity>,
    metrics: Arc<super::metrics::ProxyMetrics>,
) {
    let files = identity_files(&dir);
    let mut last: Option<Vec<FileStamp>> = None;
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Ok(stamps) = files
            .iter()
            .map(|f| stamp(f))
            .collect::<std::io::Result<Vec<_>>>()
        else {
            continue;
        };
        if last.as_ref() == Some(&stamps) {
            continue;
        }
        last = Some(stamps);
        match load_identity(&files, &service_account, &identity, &metrics) {
            Ok(()) => tracing::info!(dir = %dir.display(), "identity loaded"),
            Err(why) => {
                metrics.identity_reload_failures.inc();
                tracing::warn!(error = %why, "identity not loaded; keeping the last good one");
            }
        }
    }
}

/// The files of an identity directory: certificate, key, trust bundle.
pub fn identity_files(dir: &Path) -> [PathBuf; 3] {
    use crate::identity::{CA_CERT_KEY, TLS_CERT_KEY, TLS_KEY_KEY};
    [
        dir.join(TLS_CERT_KEY),
        dir.join(TLS_KEY_KEY),
        dir.join(CA_CERT_KEY),
    ]
}

fn load_identity(
    files: &[PathBuf; 3],
    service_account: &str,
    identity: &super::tls::MeshIdentity,
    metrics: &super::metrics::ProxyMetrics,
) -> Result<(), String> {
    let read =
        |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let (cert, key, bundle) = (read(&files[0])?, read(&files[1])?, read(&files[2])?);
    let info = crate::identity::inspect_pem(&cert).map_err(|e| e.to_string())?;
    // A pod spec can name any Secret of its namespace: a proxy presents
    // only its own ServiceAccount's identity, whatever is mounted.
    let named = info.spiffe_id();
    if named.as_ref().map(|id| id.service_account.as_str()) != Some(service_account) {
        return Err(format!(
            "{} is a certificate for {}, not for ServiceAccount {service_account} that this \
             proxy runs as; the pod must mount its own ServiceAccount's identity Secret",
            files[0].display(),
            named.map_or_else(|| "no mesh identity".to_owned(), |id| id.to_string()),
        ));
    }
    identity
        .update(&cert, &key, &bundle)
        .map_err(|e| e.to_string())?;
    let expiry = info
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    metrics
        .certificate_expiry
        .set(i64::try_from(expiry.as_secs()).unwrap_or(i64::MAX));
    metrics.trust_bundle.clear();
    if let Some(hash) = identity.bundle_hash() {
        metrics
            .trust_bundle
            .get_or_create(&super::metrics::BundleLabels { hash })
            .set(1);
    }
    // Which root its certificate chains to (none: a peer would refuse
    // it, and the series says so by its absence).
    metrics.certificate_root.clear();
    if let Some(fingerprint) =
        crate::identity::root_of(&cert, &bundle, std::time::SystemTime::now())
    {
        metrics
            .certificate_root
            .get_or_create(&super::metrics::RootLabels { fingerprint })
            .set(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::authz::PodLabels;

    #[test]
    fn a_config_mounted_only_gzipped_is_read() {
        use std::io::Write;
        let json = r#"{"schemaVersion":"1.0","generation":"g1","namespace":"shop","trustDomain":"cluster.local","inbound":{"mode":"permissive"},"outbound":{"defaults":{"retry":{"maxRetries":0,"retryOn":["connect-failure"],"methods":["GET"],"idempotencyHeader":"idempotency-key","budget":{"percent":20,"minPerSecond":10,"windowMs":10000},"backoffBaseMs":25,"backoffMaxMs":250},"loadBalancer":"PeakEwma"},"services":[]}}"#;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(json.as_bytes()).expect("gzip");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("config.json.gz"),
            gz.finish().expect("gzip"),
        )
        .expect("write");
        let store = ConfigStore::new(
            Arc::new(super::super::metrics::ProxyMetrics::new()),
            Default::default(),
        );
        let configured = dir.path().join("config.json");
        assert_eq!(load_file(&configured, &store), Ok(true));
        assert_eq!(store.load().expect("loaded").config.generation, "g1");
    }

    #[test]
    fn labels_parse_as_the_downward_api_writes_them() {
        let text = "app=\"payments\"\npod-template-hash=\"7d9f\"\nweft.dev/tier=\"\"\n";
        let labels = parse_labels(text).expect("parses");
        assert_eq!(labels.get("app").map(String::as_str), Some("payments"));
        assert_eq!(
            labels.get("pod-template-hash").map(String::as_str),
            Some("7d9f")
        );
        assert_eq!(labels.get("weft.dev/tier").map(String::as_str), Some(""));
        assert_eq!(parse_labels("").expect("empty file"), PodLabels::new());
    }

    #[test]
    fn a_malformed_labels_file_names_the_line_and_keeps_the_last_labels() {
        let err = parse_labels("app=\"web\"\nbroken\n").unwrap_err();
        assert!(
            err.contains("line 2") && err.contains("key=\"value\""),
            "{err}"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("labels");
        let into = ArcSwapOption::empty();
        std::fs::write(&path, "app=\"web\"\n").expect("write");
        load_labels(&path, &into);
        std::fs::write(&path, "garbage").expect("write");
        load_labels(&path, &into);
        let kept = into.load_full().expect("labels kept");
        assert_eq!(kept.get("app").map(String::as_str), Some("web"));
    }
}
