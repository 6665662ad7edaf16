//! The weft image archive (`make image`, src/image.rs), built here by the
//! same code from this test build's binaries and the Debian packages `make
//! image-debs` caches in target/image/debs (`make test` fetches them first;
//! without them these tests FAIL, naming that target), then read back the
//! way `docker load` and containerd's importer read it: the OCI layout, the
//! docker-compatible manifest.json, every digest and size, the config, and
//! the layer's files, links and file capabilities.
//!
//! As root with `tar`, `chroot`, `ip` and `setpriv`, the layer is also
//! unpacked with its extended attributes (GNU tar reads the
//! `SCHILY.xattr.*` records containerd applies) and run as a pod runs the
//! weft-init container: uid 65534, NET_ADMIN and NET_RAW in the bounding
//! set only (what a runtime does with `capabilities.add`; no ambient or
//! inheritable capabilities, see the Linux capabilities(7) exec rules), a
//! read-only root filesystem, a network namespace of its own, `/proc` and
//! `/dev/null` mounted as the runtime mounts them. Without those tools that
//! part says SKIPPED.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::read::GzDecoder;
use serde_json::Value;
use sha2::{Digest, Sha256};
use weft::image::{
    ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME, BuiltImage, CAPABILITY_XATTR, ImageSpec,
    NET_ADMIN_NET_RAW_EP, PACKAGES,
};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const BINARIES: [&str; 3] = [
    env!("CARGO_BIN_EXE_weft"),
    env!("CARGO_BIN_EXE_weft-proxy"),
    env!("CARGO_BIN_EXE_weft-demo"),
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The cached .debs, or a failure that says how to get them.
fn debs() -> Vec<PathBuf> {
    let dir = repo().join("target/image/debs");
    PACKAGES
        .iter()
        .map(|p| weft::image::find_deb(&dir, p))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| {
            panic!("{e}\nthe image tests build the image from these packages; `make image-debs` downloads them (apt-get download) and `make test` runs it first")
        })
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn blob_path(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

/// The archive's regular files by name, and every name in order.
fn read_archive(path: &Path) -> (BTreeMap<String, Vec<u8>>, Vec<String>) {
    let file = std::fs::File::open(path).expect("archive");
    let mut archive = tar::Archive::new(file);
    let mut files = BTreeMap::new();
    let mut names = Vec::new();
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        // Directories by their type, with or without the trailing slash.
        let name = String::from_utf8_lossy(&entry.path_bytes())
            .trim_end_matches('/')
            .to_owned();
        let h = entry.header();
        assert_eq!(
            (h.uid().unwrap(), h.gid().unwrap(), h.mtime().unwrap()),
            (0, 0, 0),
            "{name}"
        );
        names.push(name.clone());
        if h.entry_type() == tar::EntryType::Regular {
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("read");
            files.insert(name, data);
        }
    }
    (files, names)
}

/// One entry of the layer.
#[derive(Debug)]
struct LayerEntry {
    kind: tar::EntryType,
    mode: u32,
    size: u64,
    link: Option<String>,
    capability: Option<Vec<u8>>,
}

fn read_layer(gz: &[u8]) -> (Vec<(String, LayerEntry)>, String) {
    let mut raw = Vec::new();
    GzDecoder::new(gz).read_to_end(&mut raw).expect("gunzip");
    let diff_id = sha256(&raw);
    let mut archive = tar::Archive::new(&raw[..]);
    let mut out = Vec::new();
    for entry in archive.entries().expect("layer entries") {
        let mut entry = entry.expect("layer entry");
        let path = String::from_utf8_lossy(&entry.path_bytes())
            .trim_end_matches('/')
            .to_owned();
        let capability = entry.pax_extensions().expect("pax").and_then(|exts| {
            exts.filter_map(Result::ok)
                .find(|e| e.key().ok() == Some(&format!("SCHILY.xattr.{CAPABILITY_XATTR}")[..]))
                .map(|e| e.value_bytes().to_vec())
        });
        let h = entry.header();
        assert_eq!(
            (h.uid().unwrap(), h.gid().unwrap(), h.mtime().unwrap()),
            (0, 0, 0),
            "{path}: owned by root, mtime SOURCE_DATE_EPOCH"
        );
        let link = entry
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned());
        out.push((
            path,
            LayerEntry {
                kind: h.entry_type(),
                mode: h.mode().unwrap(),
                size: h.size().unwrap(),
                link,
                capability,
            },
        ));
    }
    (out, diff_id)
}

fn strip_available() -> bool {
    Command::new("strip")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn build_from_test_binaries(dir: &Path) -> (BuiltImage, [PathBuf; 3]) {
    let debs = debs();
    let binaries: [PathBuf; 3] = BINARIES.map(|b| {
        if strip_available() {
            weft::image::strip_debug_into(Path::new(b), &dir.join("bin")).expect("strip")
        } else {
            PathBuf::from(b)
        }
    });
    let spec = ImageSpec {
        binaries: binaries.clone(),
        debs,
        reference: weft::image::reference(),
        source_date_epoch: 0,
        // Fast: the test binaries are ~150 MB even stripped.
        gzip_level: 1,
    };
    let out = dir.join(format!("weft-{VERSION}.oci.tar"));
    (weft::image::build(&spec, &out).expect("build"), binaries)
}

#[test]
fn the_image_archive_loads_as_docker_and_containerd_read_it_and_holds_the_mesh() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (built, binaries) = build_from_test_binaries(tmp.path());
    let reference = format!("ghcr.io/weft-mesh/weft:{VERSION}");
    assert_eq!(built.reference, reference);

    let (files, names) = read_archive(&built.path);
    let blob = |digest: &str| -> &Vec<u8> {
        files
            .get(&blob_path(digest))
            .unwrap_or_else(|| panic!("no blob {digest} in {names:?}"))
    };

    // The OCI layout (containerd prefers it; docker load too, since 25).
    assert_eq!(files["oci-layout"], br#"{"imageLayoutVersion":"1.0.0"}"#);
    let index: Value = serde_json::from_slice(&files["index.json"]).expect("index.json");
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let manifests = index["manifests"].as_array().expect("manifests");
    assert_eq!(manifests.len(), 1, "{index}");
    let m = &manifests[0];
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(m["annotations"][ANNOTATION_IMAGE_NAME], reference.as_str());
    assert_eq!(m["annotations"][ANNOTATION_REF_NAME], VERSION);
    let manifest_digest = m["digest"].as_str().expect("digest");
    let manifest_bytes = blob(manifest_digest);
    assert_eq!(sha256(manifest_bytes), manifest_digest);
    assert_eq!(m["size"], manifest_bytes.len());
    assert_eq!(manifest_digest, built.manifest.digest);

    let manifest: Value = serde_json::from_slice(manifest_bytes).expect("manifest");
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("config digest");
    let config_bytes = blob(config_digest);
    assert_eq!(sha256(config_bytes), config_digest);
    assert_eq!(manifest["config"]["size"], config_bytes.len());
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "one layer");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let layer_digest = layers[0]["digest"].as_str().expect("layer digest");
    let layer_bytes = blob(layer_digest);
    assert_eq!(sha256(layer_bytes), layer_digest);
    assert_eq!(layers[0]["size"], layer_bytes.len());

    // docker load before 25 reads manifest.json only.
    let docker: Value = serde_json::from_slice(&files["manifest.json"]).expect("manifest.json");
    assert_eq!(
        docker,
        serde_json::json!([{
            "Config": blob_path(config_digest),
            "RepoTags": [reference],
            "Layers": [blob_path(layer_digest)],
        }])
    );
    let mut expected_names = vec![
        "blobs".to_owned(),
        "blobs/sha256".to_owned(),
        blob_path(config_digest),
        blob_path(manifest_digest),
        blob_path(layer_digest),
    ];
    expected_names[2..].sort();
    expected_names.extend(["index.json", "manifest.json", "oci-layout"].map(String::from));
    assert_eq!(names, expected_names, "only what docker save writes");

    // The config.
    let config: Value = serde_json::from_slice(config_bytes).expect("config");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], weft::image::oci_architecture());
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/weft"]));
    assert_eq!(config["config"]["User"], "65534:65534");
    let env = config["config"]["Env"].as_array().expect("Env");
    assert!(
        env.iter().any(|e| e.as_str().is_some_and(
            |e| e.starts_with("PATH=") && e.split([':', '=']).any(|d| d == "/usr/sbin")
        )),
        "PATH holds /usr/sbin, where iptables is: {env:?}"
    );
    assert_eq!(
        config["config"]["Labels"]["org.opencontainers.image.version"],
        VERSION
    );
    assert_eq!(config["rootfs"]["type"], "layers");

    // The layer: diff_id is the digest of the uncompressed tar.
    let (entries, diff_id) = read_layer(layer_bytes);
    assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!([diff_id]));
    assert_eq!(diff_id, built.diff_id);
    let paths: Vec<&str> = entries.iter().map(|(p, _)| p.as_str()).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        paths, sorted,
        "entries sorted and unique (a reproducible digest)"
    );
    let by_path: BTreeMap<&str, &LayerEntry> =
        entries.iter().map(|(p, e)| (p.as_str(), e)).collect();
    for p in &paths {
        if let Some((parent, _)) = p.rsplit_once('/') {
            assert!(
                by_path
                    .get(parent)
                    .is_some_and(|e| e.kind == tar::EntryType::Directory),
                "{p}: its directory {parent} has an entry"
            );
        }
    }
    let get = |p: &str| -> &LayerEntry {
        by_path
            .get(p)
            .unwrap_or_else(|| panic!("no {p} in the layer"))
    };

    for (name, staged) in ["weft", "weft-proxy", "weft-demo"].iter().zip(&binaries) {
        let e = get(name);
        assert_eq!(e.kind, tar::EntryType::Regular, "/{name}");
        assert_eq!(e.mode & 0o111, 0o111, "/{name} is executable: {:o}", e.mode);
        assert_eq!(e.size, std::fs::metadata(staged).unwrap().len(), "/{name}");
        // Effective file capabilities the bounding set cannot grant make
        // exec fail: the proxy and control plane drop ALL.
        assert_eq!(e.capability, None, "/{name} carries no file capabilities");
    }
    for multi in [
        "usr/sbin/xtables-nft-multi",
        "usr/sbin/xtables-legacy-multi",
    ] {
        let e = get(multi);
        assert_eq!(e.kind, tar::EntryType::Regular, "{multi}");
        assert_eq!(
            e.capability.as_deref(),
            Some(&NET_ADMIN_NET_RAW_EP[..]),
            "{multi}: cap_net_admin,cap_net_raw+ep"
        );
    }
    assert_eq!(
        NET_ADMIN_NET_RAW_EP,
        [
            1, 0, 0, 2, 0, 0x30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
        ],
        "VFS_CAP_REVISION_2 | effective, permitted = NET_ADMIN | NET_RAW"
    );
    // What weft init looks for on the iptables it runs is what the image carries.
    assert_eq!(weft::init::FileCaps::XATTR, CAPABILITY_XATTR);
    assert_eq!(
        weft::init::FileCaps::net_admin_and_raw().encode(),
        NET_ADMIN_NET_RAW_EP
    );
    let capable: Vec<&str> = entries
        .iter()
        .filter(|(_, e)| e.capability.is_some())
        .map(|(p, _)| p.as_str())
        .collect();
    assert_eq!(
        capable,
        [
            "usr/sbin/xtables-legacy-multi",
            "usr/sbin/xtables-nft-multi"
        ]
    );

    // The commands weft init runs, as Debian's alternatives make them.
    for (link, target) in [
        ("usr/sbin/iptables", "iptables-nft"),
        ("usr/sbin/iptables-save", "iptables-nft-save"),
        ("usr/sbin/iptables-restore", "iptables-nft-restore"),
        ("usr/sbin/ip6tables", "ip6tables-nft"),
        ("usr/sbin/ip6tables-save", "ip6tables-nft-save"),
        ("usr/sbin/ip6tables-restore", "ip6tables-nft-restore"),
        ("usr/sbin/iptables-nft", "xtables-nft-multi"),
        ("usr/sbin/iptables-nft-save", "xtables-nft-multi"),
        ("usr/sbin/iptables-nft-restore", "xtables-nft-multi"),
        ("usr/sbin/ip6tables-nft-restore", "xtables-nft-multi"),
        ("usr/sbin/iptables-legacy", "xtables-legacy-multi"),
        ("usr/sbin/iptables-legacy-save", "xtables-legacy-multi"),
        ("usr/sbin/iptables-legacy-restore", "xtables-legacy-multi"),
        ("usr/sbin/ip6tables-legacy-restore", "xtables-legacy-multi"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
    ] {
        let e = get(link);
        assert_eq!(
            (e.kind, e.link.as_deref()),
            (tar::EntryType::Symlink, Some(target)),
            "{link}"
        );
    }
    // What the binaries load (ldd of weft and of the xtables binaries and
    // their extensions).
    for lib in [
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "libxtables.so.12",
        "libnftnl.so.11",
        "libmnl.so.0",
        "libip4tc.so.2",
        "libip6tc.so.2",
        "libnetfilter_conntrack.so.3",
        "libnfnetlink.so.0",
    ] {
        assert!(
            paths
                .iter()
                .any(|p| p.starts_with("usr/lib/") && p.ends_with(&format!("/{lib}"))),
            "{lib} in the image"
        );
    }
    assert!(
        paths
            .iter()
            .any(|p| p.ends_with("xtables/libxt_REDIRECT.so")),
        "the REDIRECT target"
    );

    // Legacy iptables opens /run/xtables.lock with O_CREAT: as uid 65534 on
    // a read-only root it can only open one that exists.
    let lock = get("run/xtables.lock");
    assert_eq!(
        (lock.kind, lock.mode, lock.size),
        (tar::EntryType::Regular, 0o644, 0)
    );
    let tmp_dir = get("tmp");
    assert_eq!(
        (tmp_dir.kind, tmp_dir.mode),
        (tar::EntryType::Directory, 0o1777)
    );

    run_as_the_init_container(layer_bytes, tmp.path());
}

/// Whether this machine can unpack the layer and run it as a pod; the
/// reason when it cannot.
fn pod_prerequisite_missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    for tool in ["tar", "chroot", "ip", "setpriv", "mount", "umount", "ldd"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

/// Mounts and the network namespace of the pod emulation, undone on drop
/// (in reverse), also when an assertion fails.
struct Pod {
    netns: String,
    mounts: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg(m).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn sh(argv: &[&str]) -> std::process::Output {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_as_the_init_container(layer: &[u8], tmp: &Path) {
    if let Some(why) = pod_prerequisite_missing() {
        eprintln!("\n*** SKIPPED the image run as a pod (tier 4): {why}\n");
        return;
    }
    let rootfs = tmp.join("rootfs");
    let ro = tmp.join("ro");
    std::fs::create_dir_all(&rootfs).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    let layer_file = tmp.join("layer.tar.gz");
    std::fs::write(&layer_file, layer).unwrap();
    // GNU tar applies the SCHILY.xattr records, as containerd does.
    sh(&[
        "tar",
        "--xattrs",
        "--xattrs-include=*",
        "-xpzf",
        layer_file.to_str().unwrap(),
        "-C",
        rootfs.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&layer_file);
    let rootfs_s = rootfs.to_str().unwrap();
    if Command::new("getcap").arg("--help").output().is_ok() {
        let caps = sh(&["getcap", &format!("{rootfs_s}/usr/sbin/xtables-nft-multi")]);
        assert!(
            String::from_utf8_lossy(&caps.stdout).contains("cap_net_admin,cap_net_raw=ep"),
            "{}",
            String::from_utf8_lossy(&caps.stdout)
        );
    }

    // Test tooling, not the image's: setpriv and the libraries it loads, run
    // through the image's own loader; and the mount points a runtime makes.
    let proof = rootfs.join("proof");
    std::fs::create_dir_all(&proof).unwrap();
    std::fs::copy(which("setpriv"), proof.join("setpriv")).unwrap();
    let ldd = sh(&["ldd", which("setpriv").to_str().unwrap()]);
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        if let Some((_, rest)) = line.split_once("=> ") {
            let lib = Path::new(rest.split_whitespace().next().unwrap_or(""));
            if lib.is_file() {
                std::fs::copy(lib, proof.join(lib.file_name().unwrap())).unwrap();
            }
        }
    }
    std::fs::create_dir_all(rootfs.join("proc")).unwrap();
    std::fs::create_dir_all(rootfs.join("dev")).unwrap();
    std::fs::write(rootfs.join("dev/null"), "").unwrap();

    let mut pod = Pod {
        netns: format!("weft-image-{}", std::process::id()),
        mounts: Vec::new(),
        dirs: vec![rootfs.clone()],
    };
    let ro_s = ro.to_str().unwrap().to_owned();
    sh(&["mount", "--bind", rootfs_s, &ro_s]);
    pod.mounts.push(ro.clone());
    sh(&["mount", "-o", "remount,bind,ro", &ro_s]);
    sh(&["mount", "-t", "proc", "proc", &format!("{ro_s}/proc")]);
    pod.mounts.push(ro.join("proc"));
    sh(&["mount", "--bind", "/dev/null", &format!("{ro_s}/dev/null")]);
    pod.mounts.push(ro.join("dev/null"));
    sh(&["ip", "netns", "add", &pod.netns]);

    let loader = if cfg!(target_arch = "x86_64") {
        "/lib64/ld-linux-x86-64.so.2"
    } else {
        "/lib/ld-linux-aarch64.so.1"
    };
    let in_pod = |bounding: &str, argv: &[&str]| {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &pod.netns,
            "env",
            "-i",
            weft::image::PATH_ENV,
            "chroot",
            &ro_s,
        ])
        .args([loader, "--library-path", "/proof", "/proof/setpriv"])
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--inh-caps",
            "-all",
        ])
        .args(["--bounding-set", bounding])
        .args(argv);
        cmd.output().expect("run in the pod")
    };
    let show = |o: &std::process::Output| {
        format!(
            "{}: {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let pod_caps = "-all,+net_admin,+net_raw";

    let version = in_pod(pod_caps, &["iptables", "--version"]);
    assert!(
        String::from_utf8_lossy(&version.stdout).contains("nf_tables"),
        "{}",
        show(&version)
    );
    for cmd in [
        "iptables-nft",
        "iptables-legacy",
        "ip6tables-nft",
        "ip6tables-legacy",
    ] {
        let out = in_pod(pod_caps, &[cmd, "-t", "nat", "-N", "WEFT_IMAGE_TEST"]);
        assert!(
            out.status.success(),
            "{cmd} as uid 65534 with the file capabilities: {}",
            show(&out)
        );
    }
    for save in [
        "iptables-nft-save",
        "iptables-legacy-save",
        "ip6tables-nft-save",
    ] {
        let out = sh(&["ip", "netns", "exec", &pod.netns, save, "-t", "nat"]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(":WEFT_IMAGE_TEST"),
            "{save}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // Without the two capabilities in the bounding set the kernel refuses
    // to exec a binary whose file capabilities are effective.
    let refused = in_pod("-all", &["iptables-nft", "-t", "nat", "-N", "NO_CAPS"]);
    assert!(!refused.status.success(), "{}", show(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Operation not permitted"),
        "{}",
        show(&refused)
    );
    // The binaries run as their containers run them.
    for bin in ["/weft", "/weft-proxy"] {
        let out = in_pod("-all", &[bin, "--version"]);
        assert!(
            out.status.success(),
            "{bin} with no capabilities at all: {}",
            show(&out)
        );
    }
    drop(pod);
}

fn which(tool: &str) -> PathBuf {
    let out = sh(&["sh", "-c", &format!("command -v {tool}")]);
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn the_same_inputs_give_the_same_digests() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Stand-ins for the binaries keep this fast; the packages are real.
    let binaries = ["weft", "weft-proxy", "weft-demo"].map(|b| {
        let p = tmp.path().join(b);
        std::fs::write(&p, format!("#!/bin/false {b}\n")).unwrap();
        p
    });
    let spec = ImageSpec {
        binaries,
        debs: debs(),
        reference: weft::image::reference(),
        source_date_epoch: 0,
        gzip_level: 1,
    };
    let a = weft::image::build(&spec, &tmp.path().join("a.tar")).expect("build a");
    let b = weft::image::build(&spec, &tmp.path().join("b.tar")).expect("build b");
    assert_eq!(
        (&a.manifest, &a.layer, &a.diff_id),
        (&b.manifest, &b.layer, &b.diff_id)
    );
    assert_eq!(
        std::fs::read(&a.path).unwrap(),
        std::fs::read(&b.path).unwrap(),
        "byte for byte"
    );
    let later = ImageSpec {
        source_date_epoch: 1_700_000_000,
        ..spec
    };
    let c = weft::image::build(&later, &tmp.path().join("c.tar")).expect("build c");
    assert_ne!(
        a.diff_id, c.diff_id,
        "SOURCE_DATE_EPOCH is every file's mtime"
    );
}

#[test]
fn missing_packages_fail_naming_make_image_debs() {
    let empty = tempfile::tempdir().expect("tempdir");
    let err = weft::image::find_deb(empty.path(), "iptables").expect_err("no .deb");
    assert!(err.to_string().contains("make image-debs"), "{err}");
}

#[test]
fn the_chart_runs_the_image_make_image_builds() {
    let chart: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo().join("charts/weft/Chart.yaml")).unwrap(),
    )
    .expect("Chart.yaml");
    assert_eq!(
        chart["appVersion"], VERSION,
        "Chart.yaml appVersion is the crate version"
    );
    let values: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo().join("charts/weft/values.yaml")).unwrap(),
    )
    .expect("values.yaml");
    assert_eq!(values["image"]["repository"], weft::image::REPOSITORY);
    assert_eq!(values["image"]["tag"], "", "the tag defaults to appVersion");
    // The rendered manifests run exactly that reference.
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("manifests")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            if line.contains(weft::image::REPOSITORY) {
                seen += 1;
                assert!(
                    line.trim_end().ends_with(&weft::image::reference()),
                    "manifests/ names {line:?}, not {}",
                    weft::image::reference()
                );
            }
        }
    }
    assert!(
        seen >= 2,
        "the control plane's image and the proxy image it injects"
    );
}
