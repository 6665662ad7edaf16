//! Whether the users a network-namespace pod runs as can reach what they
//! read: the proxy (uid 1450) its config and identity under the state
//! directory, and each process its own binary.
//!
//! `up` makes the state directory itself traversable (o+x, nothing more:
//! the files in it say who may read them), as it is weft's to use even when
//! the user made it (`mktemp -d` makes it 0700). A directory above it is the
//! user's, and weft never changes it: when one shuts a pod's user out, `up`
//! stops before starting anything and names it, with both fixes, rather
//! than leave the proxies failing to read their files one by one.
//!
//! The check reads the mode bits as the kernel applies them to a process
//! with one uid and the same gid and no supplementary groups (what
//! `setpriv --reuid U --regid U --clear-groups` leaves); ACLs are not read.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// A pod's process: who it runs as, and what it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodUser {
    pub uid: u32,
    pub what: &'static str,
}

/// A directory on the way that `user` cannot search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub dir: PathBuf,
    pub mode: u32,
    pub owner: u32,
    pub user: PodUser,
    /// What the user was trying to reach.
    pub target: PathBuf,
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (uid {}) cannot reach {}: {} is mode {:04o}, owned by uid {}, with no search (x) \
             permission for it",
            self.user.what,
            self.user.uid,
            self.target.display(),
            self.dir.display(),
            self.mode & 0o7777,
            self.owner
        )
    }
}

/// Whether a process of `uid` (gid the same, no other groups) may search
/// a directory with `mode` owned by `owner`:`group`.
fn may_search(uid: u32, owner: u32, group: u32, mode: u32) -> bool {
    let bit = if uid == 0 {
        return true;
    } else if uid == owner {
        0o100
    } else if uid == group {
        0o010
    } else {
        0o001
    };
    mode & bit != 0
}

/// The first directory from `/` down to `target` (itself included when it
/// is a directory) that `user` cannot search.
pub fn first_blocked(target: &Path, user: PodUser) -> std::io::Result<Option<Blocked>> {
    let target = target.canonicalize()?;
    let mut dirs: Vec<&Path> = target.ancestors().collect();
    dirs.reverse();
    for dir in dirs {
        let meta = std::fs::metadata(dir)?;
        if meta.is_dir() && !may_search(user.uid, meta.uid(), meta.gid(), meta.mode()) {
            return Ok(Some(Blocked {
                dir: dir.to_owned(),
                mode: meta.mode(),
                owner: meta.uid(),
                user,
                target: target.clone(),
            }));
        }
    }
    Ok(None)
}

/// Creates the state directory `dir` and lets the pods' users through it
/// (o+x); then every `(user, path)` must be reachable. The error names the
/// first directory in the way and says how to fix it; when that directory
/// is already there, nothing is created first.
pub fn prepare(dir: &Path, reads: &[(PodUser, PathBuf)]) -> anyhow::Result<()> {
    let dir = std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
    // What exists already on the way to each path (the state directory
    // aside, which is opened below): a user shut out there is shut out
    // whatever `up` creates.
    let existing: Vec<(PodUser, PathBuf, PathBuf)> = reads
        .iter()
        .filter_map(|(user, path)| {
            let path = std::path::absolute(path).ok()?;
            let from = match path.starts_with(&dir) {
                true => dir.parent()?,
                false => &path,
            };
            let there = from.ancestors().find(|a| a.exists())?.to_owned();
            Some((*user, there, path))
        })
        .collect();
    check(&dir, &existing)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mode = std::fs::metadata(&dir)?.permissions().mode();
    if mode & 0o001 == 0 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode | 0o001))
            .with_context(|| format!("letting the pods' users through {}", dir.display()))?;
    }
    // A path that still does not exist (a binary) is not this check's to
    // report: it is named where it is started.
    let reads: Vec<(PodUser, PathBuf, PathBuf)> = reads
        .iter()
        .filter(|(_, p)| p.exists())
        .map(|(user, p)| (*user, p.clone(), p.clone()))
        .collect();
    check(&dir, &reads)
}

/// Each `(user, path, target)`: `user` must search every directory down
/// to `path`, on its way to `target`.
fn check(dir: &Path, reads: &[(PodUser, PathBuf, PathBuf)]) -> anyhow::Result<()> {
    for (user, path, target) in reads {
        let blocked = first_blocked(path, *user)
            .with_context(|| format!("checking who can reach {}", path.display()))?;
        let Some(mut b) = blocked else { continue };
        b.target = target.clone();
        let fix = if dir.starts_with(&b.dir) {
            format!(
                "pass a --state-dir they can reach (the default as root is /run/weft-local), \
                 or let them through: chmod o+x {}",
                b.dir.display()
            )
        } else {
            format!(
                "install the binaries where they can reach them, or let them through: \
                 chmod o+x {}",
                b.dir.display()
            )
        };
        anyhow::bail!("the pods' users cannot reach their files: {b}. Nothing was started; {fix}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROXY: PodUser = PodUser {
        uid: 1450,
        what: "the proxy",
    };

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn search_follows_owner_group_and_other_bits() {
        assert!(may_search(1450, 1450, 0, 0o700));
        assert!(!may_search(1450, 0, 0, 0o700));
        assert!(may_search(1450, 0, 1450, 0o710));
        assert!(
            !may_search(1450, 0, 1450, 0o701),
            "the group bits apply, not other"
        );
        assert!(may_search(1450, 0, 0, 0o701));
        assert!(may_search(0, 1, 1, 0o000));
    }

    /// `mktemp -d` gives 0700: as the state directory itself it is made
    /// traversable; as a parent of it, `prepare` refuses, naming it.
    #[test]
    fn a_private_state_dir_is_opened_and_a_private_parent_is_named() {
        let tmp = tempfile::tempdir().expect("tmp");
        let me = std::fs::metadata(tmp.path()).expect("meta").uid();
        if me == PROXY.uid {
            eprintln!("SKIPPED: this test runs as uid {me}, the proxy's own");
            return;
        }
        chmod(tmp.path(), 0o755);

        // The state dir itself, 0700 as mktemp -d makes it.
        let state = tmp.path().join("state");
        std::fs::create_dir(&state).expect("mkdir");
        chmod(&state, 0o700);
        let config = state.join("pods");
        prepare(&state, &[(PROXY, state.clone())]).expect("the state dir is opened");
        let mode = std::fs::metadata(&state)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o701, "o+x and nothing more");
        std::fs::create_dir(&config).expect("mkdir");
        assert_eq!(first_blocked(&config, PROXY).expect("check"), None);

        // A state dir below a private directory of the user's.
        let private = tmp.path().join("private");
        std::fs::create_dir(&private).expect("mkdir");
        chmod(&private, 0o700);
        let nested = private.join("state");
        let err = prepare(&nested, &[(PROXY, nested.clone())])
            .expect_err("a parent shuts the proxy out")
            .to_string();
        assert!(!nested.exists(), "nothing is created in the way");
        let private = private.canonicalize().expect("canonical");
        assert!(
            err.contains(&format!("{} is mode 0700", private.display())),
            "{err}"
        );
        assert!(
            err.contains(&format!("chmod o+x {}", private.display())),
            "{err}"
        );
        assert!(err.contains("the proxy (uid 1450)"), "{err}");
        let mode = std::fs::metadata(&private)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "weft never changes a parent");
    }
}
