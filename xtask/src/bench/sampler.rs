//! The agents as the benchmark watches them: RSS and CPU time from /proc, and whether the
//! capture has followed an enrolment change (its link pins).
use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};
use mesh_testbed::Background;

/// One running node agent.
pub struct AgentProcess {
    pub node: usize,
    process: Background,
    pub config: PathBuf,
    bpffs: PathBuf,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl AgentProcess {
    pub fn new(node: usize, process: Background, config: PathBuf, bpffs: PathBuf) -> Self {
        Self {
            node,
            process,
            config,
            bpffs,
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn rss_mib(&self) -> f64 {
        rss_mib_of(self.process.pid())
    }

    /// User + system CPU time so far, seconds.
    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds_of(self.process.pid())
    }

    /// How many enrolled pods have their tc link pinned (the capture reconciled).
    pub fn enrolled_links(&self) -> usize {
        std::fs::read_dir(self.bpffs.join("links"))
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with("mesh_tc_from_pod-if")
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// SIGTERM, wait for it to exit, and return its log.
    pub fn stop(self) -> Result<Vec<u8>> {
        Ok(self.process.terminate(Duration::from_secs(10))?.stderr)
    }
}

/// User + system CPU time of process `pid` so far, seconds.
pub fn cpu_seconds_of(pid: u32) -> Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).context("process /proc stat")?;
    // Fields after the command name (which may contain spaces) start at `state`.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// Resident memory of process `pid`, MiB (0 when it is gone).
pub fn rss_mib_of(pid: u32) -> f64 {
    rss_kib(pid).unwrap_or(0) as f64 / 1024.0
}

/// Samples the agents' RSS every 100 ms in the background; `stop` returns the largest value of
/// the largest agent, MiB.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    max_kib: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(agents: &[AgentProcess]) -> Self {
        Self::start_pids(agents.iter().map(|a| a.process.pid()).collect())
    }

    /// Samples these processes.
    pub fn start_pids(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max_kib = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, max_kib) = (Arc::clone(&stop), Arc::clone(&max_kib));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for pid in &pids {
                        if let Some(k) = rss_kib(*pid) {
                            max_kib.fetch_max(k, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Self {
            stop,
            max_kib,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.max_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }
}
