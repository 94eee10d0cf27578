//! `--worker-threads`: how many threads carry connections, chosen by the node's cores unless
//! the operator says.
//!
//! The agent shares a node's cores with the pods it serves, and every connection it carries is
//! also carried by those pods: a second agent thread only pays off when the pods leave a core
//! idle. On a 2-core node one thread measured better than two (cross-thread wake-ups are
//! inter-processor interrupts; docs/PERFORMANCE.md), so `auto` gives one thread per four cores
//! the process may use, between 1 and [`AUTO_MAX`].
use std::{fmt, str::FromStr};

/// The most threads `auto` picks: past this, one HBONE connection per peer node (which one
/// thread drives) is the limit, not the thread count.
pub const AUTO_MAX: usize = 4;

/// Cores per worker thread under `auto`.
pub const CORES_PER_THREAD: usize = 4;

/// `--worker-threads`: a count, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerThreads {
    Auto,
    Fixed(u16),
}

impl FromStr for WorkerThreads {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        match s.parse::<u16>() {
            Ok(n @ 1..=256) => Ok(Self::Fixed(n)),
            _ => Err(format!(
                "`{s}` is neither `auto` nor a thread count from 1 to 256"
            )),
        }
    }
}

/// The thread count in force and why, for the runtime and `mesh-agent status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerChoice {
    pub count: usize,
    /// `auto: N cores available` or `--worker-threads N`.
    pub reason: String,
}

impl fmt::Display for WorkerChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.count, self.reason)
    }
}

impl WorkerThreads {
    /// The count for a process that may use `cores` cores (`available_parallelism`: affinity
    /// and cgroup CPU quota included, so a DaemonSet's CPU limit counts).
    pub fn choose(self, cores: usize) -> WorkerChoice {
        match self {
            Self::Fixed(n) => WorkerChoice {
                count: n.into(),
                reason: format!("--worker-threads {n}"),
            },
            Self::Auto => WorkerChoice {
                count: (cores / CORES_PER_THREAD).clamp(1, AUTO_MAX),
                reason: format!(
                    "auto: {cores} core{} available",
                    if cores == 1 { "" } else { "s" }
                ),
            },
        }
    }

    /// [`Self::choose`] for this process.
    pub fn choose_here(self) -> WorkerChoice {
        self.choose(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_gives_one_thread_per_four_cores_between_one_and_four() {
        for (cores, want) in [
            (1, 1),
            (2, 1),
            (4, 1),
            (7, 1),
            (8, 2),
            (12, 3),
            (16, 4),
            (64, 4),
        ] {
            assert_eq!(
                WorkerThreads::Auto.choose(cores).count,
                want,
                "{cores} cores"
            );
        }
        assert_eq!(
            WorkerThreads::Auto.choose(2).to_string(),
            "1 (auto: 2 cores available)"
        );
    }

    #[test]
    fn a_fixed_count_wins_over_the_cores() {
        let c = WorkerThreads::Fixed(2).choose(64);
        assert_eq!((c.count, c.reason.as_str()), (2, "--worker-threads 2"));
    }

    #[test]
    fn parsing_accepts_auto_and_counts_and_names_what_is_wrong() {
        assert_eq!("auto".parse(), Ok(WorkerThreads::Auto));
        assert_eq!("3".parse(), Ok(WorkerThreads::Fixed(3)));
        for bad in ["0", "257", "two", "", "-1"] {
            let e = bad.parse::<WorkerThreads>().unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
    }
}
