//! The weft container image, built without a container engine (`make image`,
//! through the `weft-image` developer binary): an OCI image archive of one
//! layer that holds `/weft`, `/weft-proxy` and `/weft-demo` and Debian's
//! iptables with what it needs to run, laid out as `docker save` (Docker 25
//! and later) writes it, so `docker load`, `kind load image-archive` and
//! `ctr -n k8s.io images import` all take it.
//!
//! What makes it work in a pod, and why each piece is here:
//!
//! - `weft-init` runs as uid 65534 with NET_ADMIN and NET_RAW added, which a
//!   runtime puts in the bounding set only. iptables gains them from FILE
//!   capabilities (`security.capability`, carried as the PAX record
//!   `SCHILY.xattr.security.capability`, which containerd and Docker apply on
//!   unpack) on the two xtables multi-binaries, as Linkerd's proxy-init
//!   image does. Never on `/weft` or `/weft-proxy`: the kernel refuses to
//!   exec a binary whose file capabilities are effective but not all
//!   grantable, and the proxy and control plane drop ALL.
//! - `/run/xtables.lock` exists: legacy iptables opens it with `O_CREAT`
//!   (iptables 1.8.9 `xshared.c`, `xtables_lock`) and exits when that fails,
//!   which it does for uid 65534 in a root-owned `/run`, and on a read-only
//!   root filesystem for anyone; an existing file opens read-only anywhere.
//! - Debian makes `/usr/sbin/iptables` and friends with update-alternatives
//!   in a maintainer script, which nothing runs here: the image carries the
//!   links Debian defaults to (the nf_tables variants).
//! - Debian bookworm merges `/bin`, `/sbin` and `/lib*` into `/usr`; the
//!   packages' files land under `/usr` and the top-level names are links,
//!   as on a Debian system (the binaries' interpreter is
//!   `/lib64/ld-linux-x86-64.so.2`).
//!
//! The layer is deterministic: entries sorted by path, owned by 0:0, every
//! mtime `SOURCE_DATE_EPOCH` (0 by default), gzip without a name or a time;
//! the same inputs give the same digests.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::json;
use sha2::{Digest, Sha256};

/// Where the image is published; its tag is the crate version, which is the
/// chart's appVersion, so the chart's default image is what `make image` builds.
pub const REPOSITORY: &str = "ghcr.io/weft-mesh/weft";

/// The binaries at the image's root: the injector and the chart run `/weft`
/// and `/weft-proxy`; the demo shop runs `/weft-demo`.
pub const BINARIES: [&str; 3] = ["weft", "weft-proxy", "weft-demo"];

/// The Debian packages unpacked into the image: iptables and everything its
/// binaries, its extensions and the weft binaries load (`ldd`), and netbase,
/// iptables' one other dependency (`/etc/protocols` for protocol names).
pub const PACKAGES: [&str; 11] = [
    "iptables",
    "libip4tc2",
    "libip6tc2",
    "libxtables12",
    "libnftnl11",
    "libmnl0",
    "libnetfilter-conntrack3",
    "libnfnetlink0",
    "libc6",
    "libgcc-s1",
    "netbase",
];

/// The files that carry [`NET_ADMIN_NET_RAW_EP`]; every `iptables*` command
/// is a link to one of them.
pub const CAPABLE_BINARIES: [&str; 2] = [
    "usr/sbin/xtables-nft-multi",
    "usr/sbin/xtables-legacy-multi",
];

/// The extended attribute that holds file capabilities: the one `weft
/// init` reads.
pub const CAPABILITY_XATTR: &str = crate::init::FileCaps::XATTR;

/// `cap_net_admin,cap_net_raw+ep` as the kernel stores it (`struct
/// vfs_cap_data`, revision 2): magic `VFS_CAP_REVISION_2 |
/// VFS_CAP_FLAGS_EFFECTIVE`, then permitted and inheritable for capabilities
/// 0-31 and 32-63, little-endian. NET_ADMIN is bit 12, NET_RAW bit 13. The
/// encoding is `weft init`'s, so what it checks is what the image carries.
pub const NET_ADMIN_NET_RAW_EP: [u8; 20] = crate::init::FileCaps::net_admin_and_raw().encode();

/// The image's default user. Every container weft makes sets its own
/// (control plane 1451, proxy 1450, init 65534); this is for the rest, the
/// demo shop's apps among them.
pub const DEFAULT_USER: &str = "65534:65534";

/// Debian's default PATH; iptables lives in /usr/sbin.
pub const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The commands Debian's iptables postinst points at the nf_tables variants
/// with update-alternatives.
const ALTERNATIVES: [&str; 6] = [
    "iptables",
    "iptables-save",
    "iptables-restore",
    "ip6tables",
    "ip6tables-save",
    "ip6tables-restore",
];

/// The top-level directories merged into /usr on Debian bookworm.
const MERGED_USR: [&str; 6] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// containerd's (and `docker save`'s) annotation naming the image a manifest is.
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
/// The OCI layout's annotation naming a manifest: the tag.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

const NEEDS_DEBIAN: &str =
    "make image needs a Debian or Ubuntu machine: apt-get download and dpkg-deb";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{NEEDS_DEBIAN} (running {tool} failed)")]
    NeedsDebian {
        tool: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    ToolFailed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error(
        "`strip` (binutils) is needed to strip debug info from {binary}: apt-get install binutils"
    )]
    NoStrip {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no .deb of {package} for {arch} in {dir}: run `make image-debs`")]
    MissingDeb {
        package: &'static str,
        arch: String,
        dir: PathBuf,
    },
    #[error(
        "several .debs of {package} in {dir} ({files}): remove the stale ones, or the directory, and run `make image-debs`"
    )]
    SeveralDebs {
        package: &'static str,
        dir: PathBuf,
        files: String,
    },
    #[error("{deb}: {what}")]
    BadDeb { deb: PathBuf, what: String },
    #[error("the image is built for {0}, which has no Debian architecture name here")]
    UnknownArchitecture(&'static str),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// `repository:version`, the reference `make image` produces and the chart
/// runs by default.
pub fn reference() -> String {
    format!("{REPOSITORY}:{}", env!("CARGO_PKG_VERSION"))
}

/// The OCI `architecture` of the machine this was built for (the images'
/// binaries and packages are this machine's).
pub fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The Debian architecture of the packages to fetch: this machine's.
pub fn debian_architecture() -> Result<&'static str, ImageError> {
    Ok(match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "i386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64el",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => return Err(ImageError::UnknownArchitecture(other)),
    })
}

/// Runs a tool the image build depends on; a tool that is not installed
/// gets the message naming what `make image` needs.
fn run_tool(tool: &'static str, cmd: &mut Command) -> Result<std::process::Output, ImageError> {
    let out = cmd.output().map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => ImageError::NeedsDebian { tool, source },
        _ => ImageError::Io {
            what: format!("running {tool}"),
            source,
        },
    })?;
    if !out.status.success() {
        return Err(ImageError::ToolFailed {
            command: format!("{cmd:?}"),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// The one .deb of `package` for this architecture in `dir`.
pub fn find_deb(dir: &Path, package: &'static str) -> Result<PathBuf, ImageError> {
    let arch = debian_architecture()?;
    let missing = || ImageError::MissingDeb {
        package,
        arch: arch.to_owned(),
        dir: dir.to_owned(),
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
        Err(e) => return Err(io_err(format!("reading {}", dir.display()))(e)),
    };
    let mut found: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(format!("reading {}", dir.display())))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // `<package>_<version>_<arch>.deb`; the underscore keeps libc6 from
        // matching libc6-dev.
        let Some(rest) = name.strip_prefix(package).and_then(|r| r.strip_prefix('_')) else {
            continue;
        };
        let Some(rest) = rest.strip_suffix(".deb") else {
            continue;
        };
        if rest.ends_with(&format!("_{arch}")) || rest.ends_with("_all") {
            found.push(entry.path());
        }
    }
    found.sort();
    match found.len() {
        0 => Err(missing()),
        1 => Ok(found.remove(0)),
        _ => Err(ImageError::SeveralDebs {
            package,
            dir: dir.to_owned(),
            files: found
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Downloads (`apt-get download`) every package of [`PACKAGES`] that `dir`
/// has no .deb of yet; returns the .debs, one per package.
pub fn fetch_debs(dir: &Path) -> Result<Vec<PathBuf>, ImageError> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let mut missing = Vec::new();
    for package in PACKAGES {
        match find_deb(dir, package) {
            Ok(_) => {}
            Err(ImageError::MissingDeb { .. }) => missing.push(package),
            Err(e) => return Err(e),
        }
    }
    if !missing.is_empty() {
        // As root, apt drops to its sandbox user `_apt`, which cannot write
        // into a root-owned build tree; download as the caller instead.
        run_tool(
            "apt-get",
            Command::new("apt-get")
                .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
                .args(&missing)
                .current_dir(dir)
                .stdin(Stdio::null()),
        )
        .map_err(|e| match e {
            ImageError::ToolFailed {
                command,
                status,
                stderr,
            } => ImageError::ToolFailed {
                command,
                status,
                stderr: format!("{stderr}\n(apt-get download needs the package lists: run `apt-get update` first)"),
            },
            e => e,
        })?;
    }
    PACKAGES.iter().map(|p| find_deb(dir, p)).collect()
}

/// Copies `binary` into `dir` without its debug info (`strip
/// --strip-debug`); the original is left as it is.
pub fn strip_debug_into(binary: &Path, dir: &Path) -> Result<PathBuf, ImageError> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let name = binary.file_name().ok_or_else(|| ImageError::Io {
        what: format!("{}", binary.display()),
        source: io::Error::other("not a file name"),
    })?;
    let out = dir.join(name);
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(binary)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ImageError::NoStrip {
            binary: binary.to_owned(),
            source,
        })?;
    if !status.status.success() {
        return Err(ImageError::ToolFailed {
            command: format!(
                "strip --strip-debug -o {} {}",
                out.display(),
                binary.display()
            ),
            status: status.status,
            stderr: String::from_utf8_lossy(&status.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// What to build.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// `/weft`, `/weft-proxy`, `/weft-demo`: the files to copy, in
    /// [`BINARIES`] order.
    pub binaries: [PathBuf; 3],
    /// One .deb per package of [`PACKAGES`] (see [`fetch_debs`]).
    pub debs: Vec<PathBuf>,
    /// `repository:tag`.
    pub reference: String,
    /// Every file's mtime and the config's `created`, in seconds.
    pub source_date_epoch: u64,
    /// gzip level of the layer (0-9).
    pub gzip_level: u32,
}

impl ImageSpec {
    /// The image `make image` builds: these binaries, the .debs in
    /// `debs_dir`, [`reference`], gzip level 9.
    pub fn new(binaries: [PathBuf; 3], debs_dir: &Path) -> Result<Self, ImageError> {
        let debs = PACKAGES
            .iter()
            .map(|p| find_deb(debs_dir, p))
            .collect::<Result<_, _>>()?;
        Ok(ImageSpec {
            binaries,
            debs,
            reference: reference(),
            source_date_epoch: 0,
            gzip_level: 9,
        })
    }
}

/// A blob of the archive: its digest (`sha256:...`) and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
}

/// What [`build`] wrote.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub path: PathBuf,
    pub reference: String,
    pub manifest: Blob,
    pub config: Blob,
    /// The compressed layer.
    pub layer: Blob,
    /// sha256 of the uncompressed layer (the config's `rootfs.diff_ids`).
    pub diff_id: String,
    /// Size of the uncompressed layer.
    pub layer_uncompressed_size: u64,
}

/// One path of the root filesystem.
#[derive(Debug, Clone)]
enum Node {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        data: FileData,
        xattrs: Vec<(String, Vec<u8>)>,
    },
    Symlink {
        target: String,
    },
}

#[derive(Debug, Clone)]
enum FileData {
    Bytes(Vec<u8>),
    Path(PathBuf),
}

/// The root filesystem, by path relative to `/` (no leading or trailing
/// slash); sorted, so parents come before their children.
type Rootfs = BTreeMap<String, Node>;

/// A path from a package's data archive, where it lands on a merged-/usr
/// system: `./lib/x86_64-linux-gnu/libc.so.6` is
/// `usr/lib/x86_64-linux-gnu/libc.so.6`.
fn merged_usr_path(raw: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(raw);
    let s = s
        .trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/');
    if s.is_empty() || s == "." {
        return None;
    }
    let top = s.split('/').next().unwrap_or(s);
    if MERGED_USR.contains(&top) {
        Some(format!("usr/{s}"))
    } else {
        Some(s.to_owned())
    }
}

/// Unpacks one .deb's data (`dpkg-deb --fsys-tarfile`) into `rootfs`.
fn add_deb(rootfs: &mut Rootfs, deb: &Path) -> Result<(), ImageError> {
    let bad = |what: String| ImageError::BadDeb {
        deb: deb.to_owned(),
        what,
    };
    let out = run_tool(
        "dpkg-deb",
        Command::new("dpkg-deb")
            .arg("--fsys-tarfile")
            .arg(deb)
            .stdin(Stdio::null()),
    )?;
    let mut archive = tar::Archive::new(&out.stdout[..]);
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("reading its data: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("reading its data: {e}")))?;
        let Some(path) = merged_usr_path(&entry.path_bytes()) else {
            continue;
        };
        let header = entry.header();
        let mode = header.mode().map_err(|e| bad(format!("{path}: {e}")))? & 0o7777;
        let kind = header.entry_type();
        let node = match kind {
            tar::EntryType::Directory => {
                // A directory several packages ship keeps its first mode.
                rootfs.entry(path).or_insert(Node::Dir { mode });
                continue;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut data = Vec::new();
                entry
                    .read_to_end(&mut data)
                    .map_err(|e| bad(format!("{path}: {e}")))?;
                Node::File {
                    mode,
                    data: FileData::Bytes(data),
                    xattrs: Vec::new(),
                }
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad(format!("{path}: symlink without a target")))?;
                Node::Symlink {
                    target: String::from_utf8_lossy(&target).into_owned(),
                }
            }
            tar::EntryType::Link => {
                // A hard link becomes a copy of the file it names.
                let target = entry
                    .link_name_bytes()
                    .and_then(|t| merged_usr_path(&t))
                    .ok_or_else(|| bad(format!("{path}: hard link without a target")))?;
                rootfs.get(&target).cloned().ok_or_else(|| {
                    bad(format!("{path}: hard link to {target}, not seen before it"))
                })?
            }
            other => return Err(bad(format!("{path}: unexpected entry type {other:?}"))),
        };
        rootfs.insert(path, node);
    }
    Ok(())
}

/// The image's root filesystem: the packages, Debian's defaults their
/// maintainer scripts would make, the weft binaries, the lock file and the
/// capabilities.
fn rootfs(spec: &ImageSpec) -> Result<Rootfs, ImageError> {
    let mut fs = Rootfs::new();
    for deb in &spec.debs {
        add_deb(&mut fs, deb)?;
    }
    for top in MERGED_USR {
        if matches!(fs.get(&format!("usr/{top}")), Some(Node::Dir { .. })) {
            fs.insert(
                top.to_owned(),
                Node::Symlink {
                    target: format!("usr/{top}"),
                },
            );
        }
    }
    for name in ALTERNATIVES {
        let nft = match name.split_once('-') {
            Some((base, what)) => format!("{base}-nft-{what}"),
            None => format!("{name}-nft"),
        };
        if !fs.contains_key(&format!("usr/sbin/{nft}")) {
            return Err(ImageError::BadDeb {
                deb: PathBuf::from("iptables"),
                what: format!("no usr/sbin/{nft} to point {name} at"),
            });
        }
        fs.insert(format!("usr/sbin/{name}"), Node::Symlink { target: nft });
    }
    for path in CAPABLE_BINARIES {
        match fs.get_mut(path) {
            Some(Node::File { xattrs, .. }) => {
                xattrs.push((CAPABILITY_XATTR.to_owned(), NET_ADMIN_NET_RAW_EP.to_vec()));
            }
            _ => {
                return Err(ImageError::BadDeb {
                    deb: PathBuf::from("iptables"),
                    what: format!("no regular file {path} to give capabilities to"),
                });
            }
        }
    }
    for (name, path) in BINARIES.iter().zip(&spec.binaries) {
        std::fs::metadata(path).map_err(io_err(format!("{name}: {}", path.display())))?;
        fs.insert(
            (*name).to_owned(),
            Node::File {
                mode: 0o755,
                data: FileData::Path(path.clone()),
                xattrs: Vec::new(),
            },
        );
    }
    let text = |mode: u32, s: &str| Node::File {
        mode,
        data: FileData::Bytes(s.as_bytes().to_vec()),
        xattrs: Vec::new(),
    };
    fs.insert("run".to_owned(), Node::Dir { mode: 0o755 });
    fs.insert("run/xtables.lock".to_owned(), text(0o644, ""));
    fs.insert("tmp".to_owned(), Node::Dir { mode: 0o1777 });
    // Names for the users weft runs as (control plane 1451, proxy 1450,
    // init 65534), and name lookups as Debian does them.
    fs.insert(
        "etc/passwd".to_owned(),
        text(
            0o644,
            "root:x:0:0:root:/root:/usr/sbin/nologin\n\
             weft-proxy:x:1450:1450:weft proxy:/nonexistent:/usr/sbin/nologin\n\
             weft:x:1451:1451:weft control plane:/nonexistent:/usr/sbin/nologin\n\
             nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        ),
    );
    fs.insert(
        "etc/group".to_owned(),
        text(
            0o644,
            "root:x:0:\nweft-proxy:x:1450:\nweft:x:1451:\nnogroup:x:65534:\n",
        ),
    );
    fs.insert(
        "etc/nsswitch.conf".to_owned(),
        text(
            0o644,
            "passwd: files\ngroup: files\nhosts: files dns\nnetworks: files\n\
             protocols: files\nservices: files\nethers: files\nrpc: files\n",
        ),
    );
    // Every parent directory has an entry of its own.
    let parents: Vec<String> = fs
        .keys()
        .flat_map(|p| {
            p.match_indices('/')
                .map(|(i, _)| p[..i].to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    for parent in parents {
        fs.entry(parent).or_insert(Node::Dir { mode: 0o755 });
    }
    Ok(fs)
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    fn finish(self) -> (W, Blob) {
        let digest = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        (
            self.inner,
            Blob {
                digest,
                size: self.len,
            },
        )
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h
}

/// Writes the layer tar of `fs` into `out`.
fn write_layer<W: Write>(fs: &Rootfs, mtime: u64, out: W) -> Result<W, ImageError> {
    let mut tar = tar::Builder::new(out);
    for (path, node) in fs {
        let err = io_err(format!("writing {path} into the layer"));
        match node {
            Node::Dir { mode } => {
                let mut h = header(tar::EntryType::Directory, *mode, 0, mtime);
                tar.append_data(&mut h, format!("{path}/"), io::empty())
                    .map_err(err)?;
            }
            Node::Symlink { target } => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0, mtime);
                tar.append_link(&mut h, path, target).map_err(err)?;
            }
            Node::File { mode, data, xattrs } => {
                if !xattrs.is_empty() {
                    let records: Vec<(String, &[u8])> = xattrs
                        .iter()
                        .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                        .collect();
                    tar.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
                        .map_err(io_err(format!("writing {path}'s extended attributes")))?;
                }
                match data {
                    FileData::Bytes(bytes) => {
                        let mut h =
                            header(tar::EntryType::Regular, *mode, bytes.len() as u64, mtime);
                        tar.append_data(&mut h, path, &bytes[..]).map_err(err)?;
                    }
                    FileData::Path(src) => {
                        let file = File::open(src)
                            .map_err(io_err(format!("opening {}", src.display())))?;
                        let len = file
                            .metadata()
                            .map_err(io_err(format!("reading {}", src.display())))?
                            .len();
                        let mut h = header(tar::EntryType::Regular, *mode, len, mtime);
                        // A file that changes length while it is read would
                        // corrupt the archive: read exactly `len` bytes.
                        tar.append_data(&mut h, path, file.take(len)).map_err(err)?;
                    }
                }
            }
        }
    }
    tar.into_inner()
        .map_err(io_err("finishing the layer".to_owned()))
}

/// `2006-01-02T15:04:05Z` for `secs` since the epoch.
fn rfc3339(secs: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The tag of `repository:tag` (a registry port is not a tag).
fn tag_of(reference: &str) -> &str {
    match reference.rsplit_once(':') {
        Some((_, tag)) if !tag.contains('/') => tag,
        _ => "latest",
    }
}

/// `name_version_arch.deb` as `name=version`, for the config's label.
fn package_version(deb: &Path) -> String {
    let name = deb
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut parts = name.trim_end_matches(".deb").splitn(3, '_');
    match (parts.next(), parts.next()) {
        (Some(p), Some(v)) => format!("{p}={}", v.replace("%3a", ":")),
        _ => name,
    }
}

/// Builds the image archive at `out` (written beside it, then renamed).
pub fn build(spec: &ImageSpec, out: &Path) -> Result<BuiltImage, ImageError> {
    let fs = rootfs(spec)?;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image.oci.tar".to_owned());
    let layer_tmp = dir.join(format!(".{file_name}.layer.tmp"));
    let archive_tmp = dir.join(format!(".{file_name}.tmp"));

    // The layer: tar -> hash (diff_id) -> gzip -> hash (digest) -> file.
    let result = (|| {
        let file = File::create(&layer_tmp)
            .map_err(io_err(format!("creating {}", layer_tmp.display())))?;
        let compressed = Hashing::new(BufWriter::new(file));
        let gz = flate2::GzBuilder::new()
            .mtime(0)
            .write(compressed, flate2::Compression::new(spec.gzip_level));
        let uncompressed = write_layer(&fs, spec.source_date_epoch, Hashing::new(gz))?;
        let (gz, diff) = uncompressed.finish();
        let compressed: Hashing<BufWriter<File>> = gz
            .finish()
            .map_err(io_err("compressing the layer".to_owned()))?;
        let (mut file, layer) = compressed.finish();
        file.flush()
            .map_err(io_err(format!("writing {}", layer_tmp.display())))?;
        drop(file);

        let created = rfc3339(spec.source_date_epoch);
        let version = tag_of(&spec.reference).to_owned();
        let packages: Vec<String> = spec.debs.iter().map(|d| package_version(d)).collect();
        let config = json!({
            "created": created,
            "architecture": oci_architecture(),
            "os": "linux",
            "config": {
                "User": DEFAULT_USER,
                "Env": [PATH_ENV],
                "Entrypoint": ["/weft"],
                "WorkingDir": "/",
                "Labels": {
                    "org.opencontainers.image.title": "weft",
                    "org.opencontainers.image.description": "Weft service mesh: control plane (/weft), sidecar proxy (/weft-proxy), init (iptables), demo service (/weft-demo)",
                    "org.opencontainers.image.version": version,
                    "org.opencontainers.image.created": created,
                    "dev.weft.debian-packages": packages.join(" "),
                },
            },
            "rootfs": { "type": "layers", "diff_ids": [diff.digest] },
            "history": [{
                "created": created,
                "created_by": "weft-image build (make image)",
                "comment": "/weft /weft-proxy /weft-demo, Debian iptables with file capabilities",
            }],
        });
        let config = serde_json::to_vec(&config)
            .map_err(|e| io_err("encoding the config".to_owned())(e.into()))?;
        let config_blob = blob_of(&config);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": { "mediaType": MEDIA_TYPE_CONFIG, "digest": config_blob.digest, "size": config_blob.size },
            "layers": [{ "mediaType": MEDIA_TYPE_LAYER, "digest": layer.digest, "size": layer.size }],
        });
        let manifest = serde_json::to_vec(&manifest)
            .map_err(|e| io_err("encoding the manifest".to_owned())(e.into()))?;
        let manifest_blob = blob_of(&manifest);
        let index = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": [{
                "mediaType": MEDIA_TYPE_MANIFEST,
                "digest": manifest_blob.digest,
                "size": manifest_blob.size,
                "platform": { "architecture": oci_architecture(), "os": "linux" },
                "annotations": {
                    ANNOTATION_IMAGE_NAME: spec.reference,
                    ANNOTATION_REF_NAME: version,
                },
            }],
        });
        let path_of = |b: &Blob| format!("blobs/sha256/{}", b.digest.trim_start_matches("sha256:"));
        let docker_manifest = json!([{
            "Config": path_of(&config_blob),
            "RepoTags": [spec.reference],
            "Layers": [path_of(&layer)],
        }]);
        let index = serde_json::to_vec(&index)
            .map_err(|e| io_err("encoding index.json".to_owned())(e.into()))?;
        let docker_manifest = serde_json::to_vec(&docker_manifest)
            .map_err(|e| io_err("encoding manifest.json".to_owned())(e.into()))?;

        // The archive, in the order `docker save` writes it.
        let file = File::create(&archive_tmp)
            .map_err(io_err(format!("creating {}", archive_tmp.display())))?;
        let mut tar = tar::Builder::new(BufWriter::new(file));
        let err = || io_err(format!("writing {}", archive_tmp.display()));
        let mtime = spec.source_date_epoch;
        for d in ["blobs/", "blobs/sha256/"] {
            let mut h = header(tar::EntryType::Directory, 0o755, 0, mtime);
            tar.append_data(&mut h, d, io::empty()).map_err(err())?;
        }
        let mut blobs: Vec<(String, Box<dyn Read>, u64)> = vec![
            (
                path_of(&config_blob),
                Box::new(io::Cursor::new(config.clone())),
                config_blob.size,
            ),
            (
                path_of(&manifest_blob),
                Box::new(io::Cursor::new(manifest.clone())),
                manifest_blob.size,
            ),
            (
                path_of(&layer),
                Box::new(
                    File::open(&layer_tmp)
                        .map_err(io_err(format!("opening {}", layer_tmp.display())))?
                        .take(layer.size),
                ),
                layer.size,
            ),
        ];
        blobs.sort_by(|a, b| a.0.cmp(&b.0));
        for (path, data, size) in blobs {
            let mut h = header(tar::EntryType::Regular, 0o644, size, mtime);
            tar.append_data(&mut h, path, data).map_err(err())?;
        }
        for (path, data) in [
            ("index.json", &index),
            ("manifest.json", &docker_manifest),
            ("oci-layout", &br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
        ] {
            let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64, mtime);
            tar.append_data(&mut h, path, &data[..]).map_err(err())?;
        }
        let mut file = tar.into_inner().map_err(err())?;
        file.flush().map_err(err())?;
        drop(file);
        std::fs::rename(&archive_tmp, out).map_err(io_err(format!(
            "renaming {} to {}",
            archive_tmp.display(),
            out.display()
        )))?;
        Ok(BuiltImage {
            path: out.to_owned(),
            reference: spec.reference.clone(),
            manifest: manifest_blob,
            config: config_blob,
            layer,
            diff_id: diff.digest,
            layer_uncompressed_size: diff.size,
        })
    })();
    let _ = std::fs::remove_file(&layer_tmp);
    if result.is_err() {
        let _ = std::fs::remove_file(&archive_tmp);
    }
    result
}

fn blob_of(data: &[u8]) -> Blob {
    Blob {
        digest: format!("sha256:{}", hex::encode(Sha256::digest(data))),
        size: data.len() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_land_where_a_merged_usr_system_has_them() {
        assert_eq!(
            merged_usr_path(b"./lib/x86_64-linux-gnu/libc.so.6").as_deref(),
            Some("usr/lib/x86_64-linux-gnu/libc.so.6")
        );
        assert_eq!(
            merged_usr_path(b"./lib64/ld-linux-x86-64.so.2").as_deref(),
            Some("usr/lib64/ld-linux-x86-64.so.2")
        );
        assert_eq!(merged_usr_path(b"./usr/sbin/").as_deref(), Some("usr/sbin"));
        assert_eq!(
            merged_usr_path(b"./etc/protocols").as_deref(),
            Some("etc/protocols")
        );
        assert_eq!(
            merged_usr_path(b"./libexec/x").as_deref(),
            Some("libexec/x")
        );
        assert_eq!(merged_usr_path(b"./"), None);
    }

    #[test]
    fn the_capability_is_net_admin_and_net_raw_effective() {
        let word = |i: usize| {
            u32::from_le_bytes([
                NET_ADMIN_NET_RAW_EP[i],
                NET_ADMIN_NET_RAW_EP[i + 1],
                NET_ADMIN_NET_RAW_EP[i + 2],
                NET_ADMIN_NET_RAW_EP[i + 3],
            ])
        };
        // VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE
        assert_eq!(word(0), 0x0200_0001);
        assert_eq!(word(4), (1 << 12) | (1 << 13));
        assert_eq!((word(8), word(12), word(16)), (0, 0, 0));
    }

    #[test]
    fn tags_and_times() {
        assert_eq!(tag_of("ghcr.io/weft-mesh/weft:0.1.0"), "0.1.0");
        assert_eq!(tag_of("localhost:5000/weft"), "latest");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(
            package_version(Path::new("/x/libc6_2.36-9+deb12u14_amd64.deb")),
            "libc6=2.36-9+deb12u14"
        );
        assert_eq!(
            reference(),
            format!("ghcr.io/weft-mesh/weft:{}", env!("CARGO_PKG_VERSION"))
        );
    }
}
