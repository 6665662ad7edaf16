//! "Pods" as Linux network namespaces, for tier-4 tests and `weft local`:
//! each pod gets its own namespace with an `eth0` joined by a veth pair to
//! a bridge that lives in a namespace of its own, and an address from one
//! private /24 that exists only inside these namespaces. Processes run
//! inside a pod as a given user (with `setpriv`).
//!
//! Everything is torn down on drop — processes killed, namespaces (and with
//! them their links) deleted — so a failing test leaves nothing behind.
//! Needs root, `ip` (iproute2) and `setpriv` (util-linux).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};

/// The uid weft-init runs as (the injector's default).
pub const INIT_UID: u32 = 65534;
/// What the injector adds to weft-init's `capabilities` (after `drop: [ALL]`).
pub const INIT_CAPS: &str = "+net_admin,+net_raw";

/// The /24 the pods' addresses come from (first three octets).
pub const SUBNET: [u8; 3] = [10, 77, 0];
/// The /64 the pods of a dual-stack network also get an address from
/// (unique-local, as kind's `fd00:10:244::/56` pod range is); a pod's
/// interface id is its IPv4 host number.
pub const SUBNET6: [u16; 4] = [0xfd00, 0x77, 0, 0];

/// Why this machine cannot run network-namespace pods, if it cannot.
pub fn missing_prerequisite() -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        return Some("not running as root (network namespaces and iptables need it)".into());
    }
    for tool in [
        "ip",
        "iptables",
        "iptables-save",
        "setpriv",
        "xtables-nft-multi",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "{tool} is not installed (apt-get install -y iptables iproute2 util-linux)"
            ));
        }
    }
    None
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name])?;
        Ok(Self {
            name: name.to_owned(),
        })
    }

    /// `ip` inside this namespace.
    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend(args);
        ip(&all)
    }

    /// A command inside this namespace, as `uid` (and the same gid) when
    /// given, started the way a container runtime starts a non-root
    /// container: `caps` (such as `+net_admin,+net_raw`, what
    /// `securityContext.capabilities.add` lists after `drop: [ALL]`) go into
    /// the bounding set only, and the process holds no permitted, effective,
    /// inheritable or ambient capability. That is what runc does for a
    /// non-root user (the kernel clears the permitted and effective sets on
    /// the switch from uid 0, and containerd and CRI-O set no inheritable
    /// or ambient capabilities since CVE-2022-24769), and what a real
    /// cluster showed in weft-init: `CapPrm 0, CapEff 0, CapBnd 0x3000,
    /// CapAmb 0`. Such a process gains a capability only by executing a
    /// file that carries it (capabilities(7), "Transformation of
    /// capabilities during execve()"; Kubernetes documents `capabilities`
    /// at <https://kubernetes.io/docs/tasks/configure-pod-container/security-context/#set-capabilities-for-a-container>).
    pub fn command(&self, uid: Option<u32>, caps: &str, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]);
        if let Some(uid) = uid {
            let uid = uid.to_string();
            let bounding = if caps.is_empty() {
                "-all".to_owned()
            } else {
                format!("-all,{caps}")
            };
            c.args([
                "setpriv",
                "--reuid",
                &uid,
                "--regid",
                &uid,
                "--clear-groups",
                "--inh-caps",
                "-all",
                "--ambient-caps",
                "-all",
                "--bounding-set",
                &bounding,
            ]);
        }
        c.args(argv);
        c
    }

    /// `weft init` (the binary `weft`) run in this pod as a real pod runs
    /// its weft-init container: as uid 65534 with NET_ADMIN and NET_RAW in
    /// the bounding set only (see [`Netns::command`]), against the
    /// iptables of the weft image, [`ImageIptables`], and nothing else on
    /// `PATH`.
    pub fn run_init(
        &self,
        weft: &str,
        iptables: &ImageIptables,
        extra: &[&str],
    ) -> anyhow::Result<Output> {
        let path = iptables.path_env();
        let mut argv = vec!["/usr/bin/env", path.as_str(), weft, "init"];
        argv.extend(extra);
        self.run(Some(INIT_UID), INIT_CAPS, &argv)
    }

    /// Writes `/etc/netns/<name>/<file>`, which `ip netns exec` mounts over
    /// `/etc/<file>` for the processes it starts (such as `hosts`).
    pub fn set_etc_file(&self, file: &str, text: &str) -> anyhow::Result<()> {
        let dir = etc_dir(&self.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Runs a command to completion inside this namespace.
    pub fn run(&self, uid: Option<u32>, caps: &str, argv: &[&str]) -> anyhow::Result<Output> {
        self.command(uid, caps, argv)
            .output()
            .with_context(|| format!("running {argv:?} in {}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_namespace(&self.name);
    }
}

/// The iptables of the weft image, for the pods of this machine: copies of
/// its `xtables-nft-multi` and `xtables-legacy-multi` carrying the file
/// capabilities `cap_net_admin,cap_net_raw+ep` (the `security.capability`
/// xattr, exactly as `make image` sets them and as Linkerd's proxy-init
/// image does), under the command names the image has (`iptables`,
/// `iptables-nft-restore`, ...), in a directory of their own that is
/// removed on drop. The machine's own iptables is left untouched.
pub struct ImageIptables {
    dir: PathBuf,
}

impl ImageIptables {
    /// With `file_caps` false the copies carry none: a runtime or image
    /// store that strips xattrs, where weft init must say what is wrong.
    pub fn new(file_caps: bool) -> anyhow::Result<Self> {
        static COPIES: AtomicU32 = AtomicU32::new(0);
        let n = COPIES.fetch_add(1, Ordering::Relaxed);
        // The kernel ignores file capabilities on a nosuid mount (systemd's
        // tmpfs /tmp is one): the first candidate that is not.
        let base = [std::env::temp_dir(), PathBuf::from("/var/tmp")]
            .into_iter()
            .find(|d| {
                nix::sys::statvfs::statvfs(d.as_path())
                    .is_ok_and(|v| !v.flags().contains(nix::sys::statvfs::FsFlags::ST_NOSUID))
            })
            .context(
                "no temporary directory outside a nosuid mount (tried $TMPDIR and /var/tmp): \
                 file capabilities would be ignored there",
            )?;
        let dir = base.join(format!("weft-image-iptables-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let this = Self { dir };
        // The pods' users must reach the copies.
        std::fs::set_permissions(&this.dir, std::fs::Permissions::from_mode(0o755))?;
        for backend in ["nft", "legacy"] {
            let multi = format!("xtables-{backend}-multi");
            let source = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(|d| Path::new(d).join(&multi))
                .find(|p| p.is_file())
                .with_context(|| {
                    format!("{multi} is not installed (apt-get install -y iptables)")
                })?;
            let copy = this.dir.join(&multi);
            std::fs::copy(&source, &copy)
                .with_context(|| format!("copying {}", source.display()))?;
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
            if file_caps {
                xattr::set(
                    &copy,
                    crate::init::FileCaps::XATTR,
                    &crate::init::FileCaps::net_admin_and_raw().encode(),
                )
                .with_context(|| {
                    format!(
                        "setting file capabilities on {} (the file system of {} must keep security xattrs)",
                        copy.display(),
                        std::env::temp_dir().display()
                    )
                })?;
            }
            for family in ["iptables", "ip6tables"] {
                for what in ["", "-save", "-restore"] {
                    let name = format!("{family}-{backend}{what}");
                    std::os::unix::fs::symlink(&multi, this.dir.join(name))?;
                    // The image's plain names are the nft ones, Debian's default.
                    if backend == "nft" {
                        std::os::unix::fs::symlink(
                            &multi,
                            this.dir.join(format!("{family}{what}")),
                        )?;
                    }
                }
            }
        }
        Ok(this)
    }

    /// `PATH=...` for `env`: these commands first, and no directory of the
    /// machine's own iptables.
    pub fn path_env(&self) -> String {
        format!("PATH={}:/usr/local/bin:/usr/bin:/bin", self.dir.display())
    }
}

impl Drop for ImageIptables {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn etc_dir(netns: &str) -> std::path::PathBuf {
    std::path::Path::new("/etc/netns").join(netns)
}

/// Deletes a network namespace (its links go with it) and its
/// `/etc/netns` files; quiet when it is already gone.
pub fn delete_namespace(name: &str) {
    let _ = Command::new("ip").args(["netns", "del", name]).output();
    let _ = std::fs::remove_dir_all(etc_dir(name));
}

/// The network namespaces that exist, by name (`ip netns list`).
pub fn list_namespaces() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// A TCP connection made from inside network namespace `netns` (the
/// socket stays in it; the calling process does not move). A short-lived
/// thread enters the namespace, so the caller's threads are untouched.
pub fn connect_in(
    netns: &str,
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<std::net::TcpStream> {
    let path = std::path::Path::new("/run/netns").join(netns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path)?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            std::net::TcpStream::connect_timeout(&addr, timeout)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("connect thread panicked")))
    })
}

/// One pod: a namespace with an address, and the processes started in it.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address, on a dual-stack network.
    pub ip6: Option<Ipv6Addr>,
    children: Vec<Child>,
    // Dropped last: the processes go before their namespace.
    pub ns: Netns,
}

impl Pod {
    /// Starts a long-running process in the pod, its output to `log`.
    pub fn spawn(
        &mut self,
        uid: Option<u32>,
        argv: &[&str],
        log: &std::path::Path,
    ) -> anyhow::Result<()> {
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = file.try_clone()?;
        let child = self
            .ns
            .command(uid, "", argv)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {argv:?} in pod {}", self.name))?;
        self.children.push(child);
        Ok(())
    }
}

impl Pod {
    /// The processes started in this pod.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A bridge and the pods on it.
pub struct Network {
    tag: String,
    next_host: u8,
    dual_stack: bool,
    /// Declared before the bridge: pods are torn down first.
    pub pods: Vec<Pod>,
    bridge: Netns,
}

static NETWORKS: AtomicU32 = AtomicU32::new(0);

impl Network {
    /// A new bridge; `tag` keeps names apart (namespaces are global).
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let n = NETWORKS.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{tag}{}x{n}", std::process::id());
        let bridge = Netns::new(&format!("wbr-{tag}"))?;
        bridge.ip(&["link", "add", "br0", "type", "bridge"])?;
        bridge.ip(&["link", "set", "br0", "up"])?;
        bridge.ip(&["link", "set", "lo", "up"])?;
        Ok(Self {
            tag,
            next_host: 10,
            dual_stack: false,
            pods: Vec::new(),
            bridge,
        })
    }

    /// A network whose pods have an IPv6 address as well, as on a
    /// dual-stack cluster (every pod gets one address of each family:
    /// <https://kubernetes.io/docs/concepts/services-networking/dual-stack/>).
    pub fn new_dual_stack(tag: &str) -> anyhow::Result<Self> {
        let mut net = Self::new(tag)?;
        net.dual_stack = true;
        Ok(net)
    }

    /// Every namespace of this network: the bridge's and the pods'.
    pub fn namespace_names(&self) -> Vec<String> {
        let mut names = vec![self.bridge.name.clone()];
        names.extend(self.pods.iter().map(|p| p.ns.name.clone()));
        names
    }

    /// Adds a pod with the next free address; returns its index.
    pub fn add_pod(&mut self, name: &str) -> anyhow::Result<usize> {
        let host = self.next_host;
        if host == 250 {
            bail!("this network holds at most 240 pods");
        }
        self.next_host += 1;
        let ns = Netns::new(&format!("wp-{}-{name}", self.tag))?;
        let addr = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], host);
        // Interface names are at most 15 bytes: short, unique per network.
        let (pod_end, bridge_end) = (format!("wv{host}p"), format!("wv{host}b"));
        ip(&[
            "link",
            "add",
            &pod_end,
            "netns",
            &ns.name,
            "type",
            "veth",
            "peer",
            "name",
            &bridge_end,
            "netns",
            &self.bridge.name,
        ])?;
        ns.ip(&["link", "set", &pod_end, "name", "eth0"])?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["link", "set", "lo", "up"])?;
        // Every destination leaves by eth0, so a connect to an address no
        // pod has (a Service's ClusterIP) reaches the OUTPUT chain and its
        // redirect to the sidecar instead of failing "unreachable".
        ns.ip(&["route", "add", "default", "dev", "eth0"])?;
        let ip6 = if self.dual_stack {
            let [a, b, c, d] = SUBNET6;
            let addr6 = Ipv6Addr::new(a, b, c, d, 0, 0, 0, u16::from(host));
            // `nodad`: the address is usable at once, as a CNI plugin's is
            // by the time the pod's containers start.
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{addr6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ns.ip(&["-6", "route", "add", "default", "dev", "eth0"])?;
            Some(addr6)
        } else {
            None
        };
        self.bridge
            .ip(&["link", "set", &bridge_end, "master", "br0"])?;
        self.bridge.ip(&["link", "set", &bridge_end, "up"])?;
        self.pods.push(Pod {
            name: name.to_owned(),
            ip: addr,
            ip6,
            children: Vec::new(),
            ns,
        });
        Ok(self.pods.len() - 1)
    }
}
