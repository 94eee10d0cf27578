//! Handing the data path from a running agent to its successor (an upgrade, or a second agent
//! started on purpose), so that no new connection is refused and no live one is dropped.
//!
//! One agent owns a bpffs directory at a time: it holds an exclusive `flock` on the directory
//! (the *data path lock*) and is the only one that attaches programs and writes maps. A second
//! agent that finds the lock held becomes its successor, in two steps, each announced by an
//! exclusive `flock` the owner polls for:
//! 1. *starting* (`<dir>/successor-starting`, held from the successor's first moment until it
//!    owns the data path): the owner closes its admin, metrics and readiness endpoints, so the
//!    successor can bind the same ports and the kubelet's probes of the new pod reach the new
//!    agent, never the old one. If the successor dies before taking over, the lock goes with it
//!    and the owner opens its endpoints again. Everything else carries on.
//! 2. *ready* (`<dir>/handover`, taken once the successor has read its configuration): the owner
//!    steps down — it tells its HBONE peers GOAWAY (they open new connections, which reach the
//!    successor), stops reconciling and releases the data path lock. It keeps serving the
//!    connections it owns, and its listeners stay in `MESH_LISTENERS` until the successor
//!    registers its own, so new connections are served throughout.
//!
//! The successor then takes the data path lock, reconciles (its programs replace the old ones'
//! links without a gap) and registers its listeners: from then on every new connection is its
//! own. Only then does it let go of its *starting* announcement, and only then does the owner
//! tell its HBONE peers GOAWAY: told earlier, their new connections would still reach the old
//! agent's listeners (the successor's are not registered yet) and be told GOAWAY at once, and a
//! stream refused twice is a connection reset (the soak caught that under 10,000 connections,
//! when loading the successor's programs took half a second). Established connections stay with
//! the old agent's sockets (steered by 4-tuple). The old agent exits once it has been told to
//! stop (SIGTERM) and its last connection has ended, or at its drain limit. A third agent
//! arriving meanwhile is refused.
use std::{
    fs::File,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};
use tracing::info;

/// How often a successor tries a lock held by the owner.
const RETRY: Duration = Duration::from_millis(20);

/// The exclusive lock on a bpffs directory: whoever holds it owns the data path.
pub type DataPathLock = Flock<File>;

/// What a starting agent holds before it reads its configuration.
pub enum Claim {
    /// Nobody else uses the directory: the data path is ours.
    Owner(DataPathLock),
    /// Another agent owns it; we have announced ourselves as its successor.
    Successor { starting: Flock<File> },
}

/// What an owner sees of a successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Successor {
    None,
    /// Started, not ready yet: the owner's endpoints must make room.
    Starting,
    /// Ready: the owner hands the data path over.
    Ready,
}

fn starting_path(root: &Path) -> PathBuf {
    root.join("successor-starting")
}

fn handover_path(root: &Path) -> PathBuf {
    root.join("handover")
}

/// `<dir>/handover` and `<dir>/successor-starting`, for `--uninstall`.
pub fn lock_dirs(root: &Path) -> [PathBuf; 2] {
    [handover_path(root), starting_path(root)]
}

/// How long a successor retries its own announcement locks: the owner holds them (shared) only
/// for a moment at a time while it checks; longer means another successor holds them.
const ANNOUNCE_WAIT: Duration = Duration::from_millis(500);

/// Takes the data path lock of `root`, or, when another agent holds it, announces this agent as
/// its successor (refused when another successor is already there).
pub fn claim(root: &Path) -> anyhow::Result<Claim> {
    if let Some(lock) = try_exclusive(root)? {
        return Ok(Claim::Owner(lock));
    }
    let starting = starting_path(root);
    std::fs::create_dir_all(&starting)
        .with_context(|| format!("creating {}", starting.display()))?;
    let Some(starting) = exclusive_within(&starting, ANNOUNCE_WAIT)? else {
        anyhow::bail!(
            "another agent is already taking over {}; one agent per node and bpffs directory",
            root.display()
        );
    };
    info!(bpffs = %root.display(), "another agent owns the data path: starting as its successor");
    Ok(Claim::Successor { starting })
}

/// The data path lock: at once for an owner; for a successor, once the owner, told that this
/// agent is ready, lets go — within `wait`.
pub fn take_over(root: &Path, claim: Claim, wait: Duration) -> anyhow::Result<Takeover> {
    let starting = match claim {
        Claim::Owner(lock) => {
            return Ok(Takeover {
                lock,
                announcement: None,
            });
        }
        Claim::Successor { starting } => starting,
    };
    let handover = handover_path(root);
    std::fs::create_dir_all(&handover)
        .with_context(|| format!("creating {}", handover.display()))?;
    let Some(_ready) = exclusive_within(&handover, ANNOUNCE_WAIT)? else {
        anyhow::bail!("{} is held by another agent", handover.display());
    };
    info!(bpffs = %root.display(), wait_s = wait.as_secs_f64(), "ready: asking the owner to hand the data path over");
    let Some(lock) = exclusive_within(root, wait)? else {
        anyhow::bail!(
            "the agent using {} did not hand the data path over within {wait:?} (an agent without upgrade support, or a hung one); stop it first",
            root.display()
        );
    };
    info!(bpffs = %root.display(), "the previous agent handed the data path over");
    Ok(Takeover {
        lock,
        announcement: Some(starting),
    })
}

/// The data path lock, and for a successor its *starting* announcement, held until its
/// listeners are registered (`CaptureController::register_listeners` lets it go): the previous
/// owner waits for it to go before it sends its peers GOAWAY.
pub struct Takeover {
    pub lock: DataPathLock,
    pub announcement: Option<Flock<File>>,
}

/// Whether a successor has announced itself, and how far it is. Cheap (an open and a
/// non-blocking shared `flock` per lock), meant to be polled a few times a second.
pub fn successor(root: &Path) -> Successor {
    if held(&handover_path(root)) {
        Successor::Ready
    } else if held(&starting_path(root)) {
        Successor::Starting
    } else {
        Successor::None
    }
}

fn held(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    matches!(
        Flock::lock(file, FlockArg::LockSharedNonblock),
        Err((_, Errno::EWOULDBLOCK))
    )
}

/// [`try_exclusive`], tried again every [`RETRY`] for up to `wait`; None if still held then.
fn exclusive_within(path: &Path, wait: Duration) -> anyhow::Result<Option<Flock<File>>> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(lock) = try_exclusive(path)? {
            return Ok(Some(lock));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(RETRY);
    }
}

/// An exclusive non-blocking `flock` on `path`; None when someone else holds a lock on it.
fn try_exclusive(path: &Path) -> anyhow::Result<Option<Flock<File>>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(anyhow::anyhow!("locking {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-handover-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_free_directory_is_owned_at_once_and_nobody_waits() {
        let dir = scratch("free");
        let claim = claim(&dir).unwrap();
        assert!(matches!(claim, Claim::Owner(_)));
        let taken = take_over(&dir, claim, Duration::ZERO).unwrap();
        assert!(taken.announcement.is_none(), "an owner announces nothing");
        assert_eq!(successor(&dir), Successor::None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_successor_is_seen_starting_then_ready_and_gets_the_lock_once_the_owner_lets_go() {
        let dir = scratch("handover");
        let owner = take_over(&dir, claim(&dir).unwrap(), Duration::ZERO).unwrap();
        let next = claim(&dir).unwrap();
        assert!(matches!(next, Claim::Successor { .. }));
        assert_eq!(successor(&dir), Successor::Starting);
        // A third agent is refused while one is taking over.
        let Err(third) = claim(&dir) else {
            panic!("a third agent was let in");
        };
        assert!(
            format!("{third:#}").contains("already taking over"),
            "{third:#}"
        );
        let taking = {
            let dir = dir.clone();
            std::thread::spawn(move || take_over(&dir, next, Duration::from_secs(10)))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while successor(&dir) != Successor::Ready {
            assert!(Instant::now() < deadline, "successor never seen ready");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(owner);
        let taken = taking.join().unwrap().unwrap();
        assert_eq!(
            successor(&dir),
            Successor::Starting,
            "announced until its listeners are registered"
        );
        let Takeover { lock, announcement } = taken;
        drop(announcement);
        assert_eq!(
            successor(&dir),
            Successor::None,
            "then nothing is announced"
        );
        drop(lock);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_successor_that_dies_before_taking_over_is_seen_gone() {
        let dir = scratch("gone");
        let _owner = take_over(&dir, claim(&dir).unwrap(), Duration::ZERO).unwrap();
        let next = claim(&dir).unwrap();
        assert_eq!(successor(&dir), Successor::Starting);
        drop(next);
        assert_eq!(successor(&dir), Successor::None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_owner_that_never_lets_go_gets_a_clear_error_after_the_wait() {
        let dir = scratch("stuck");
        let _owner = take_over(&dir, claim(&dir).unwrap(), Duration::ZERO).unwrap();
        let next = claim(&dir).unwrap();
        let Err(err) = take_over(&dir, next, Duration::from_millis(100)) else {
            panic!("took over from an owner that never let go");
        };
        assert!(
            format!("{err:#}").contains("did not hand the data path over"),
            "{err:#}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
