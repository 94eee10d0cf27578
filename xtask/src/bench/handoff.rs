//! What a hand-off between two tasks costs on this machine, measured before the trials.
//!
//! Why: every meshed exchange is a chain of hand-offs (client → agent → agent → server and
//! back), and what one costs depends on the machine far more than on our code. On the 2-core VM
//! of 2026-12-05 a wake-up of a task on the *other* vCPU cost ~20 µs of CPU on each side (the
//! inter-processor interrupt and the idle vCPU's exit through the hypervisor), one on the *same*
//! vCPU ~1 µs. Plain TCP figures moved 4× between two hosts with the same kernel for that
//! reason, so the bench records these two numbers next to its own.
use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};

/// Round trips per measurement: ~0.1 s across CPUs on the slow VM.
const ROUND_TRIPS: u32 = 2_000;

/// Ping-pong of one byte over two pipes between two processes, both pinned to CPU 0, then
/// pinned to CPUs 0 and 1: wall time and CPU time per round trip (two hand-offs).
pub fn measure() -> Result<Value> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let same = ping_pong(0, 0)?;
    let across = if cores > 1 {
        Some(ping_pong(0, 1)?)
    } else {
        None
    };
    let figures =
        |(wall, cpu): (f64, f64)| json!({"round_trip_us": round(wall), "cpu_us": round(cpu)});
    Ok(json!({
        "same_cpu": figures(same),
        "across_cpus": across.map(figures),
    }))
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// (wall µs, CPU µs of both processes) per round trip.
fn ping_pong(cpu_a: usize, cpu_b: usize) -> Result<(f64, f64)> {
    let (to_child_r, to_child_w) = pipe()?;
    let (to_parent_r, to_parent_w) = pipe()?;
    let saved = Affinity::save()?;
    let children_before = cpu_seconds(libc::RUSAGE_CHILDREN);
    // SAFETY: the child only pins itself, reads, writes and leaves (async-signal-safe calls).
    let child = unsafe { libc::fork() };
    ensure!(child >= 0, "fork: {}", std::io::Error::last_os_error());
    if child == 0 {
        let mut byte = [0u8];
        // SAFETY: valid descriptors and a one-byte buffer; _exit skips the parent's
        // destructors and atexit handlers.
        unsafe {
            Affinity::only(cpu_b).apply();
            for _ in 0..ROUND_TRIPS {
                libc::read(to_child_r.as_raw_fd(), byte.as_mut_ptr().cast(), 1);
                libc::write(to_parent_w.as_raw_fd(), byte.as_ptr().cast(), 1);
            }
            libc::_exit(0);
        }
    }
    Affinity::only(cpu_a).apply();
    let before = cpu_seconds(libc::RUSAGE_SELF);
    let started = Instant::now();
    let mut byte = [1u8];
    let mut ok = true;
    for _ in 0..ROUND_TRIPS {
        // SAFETY: valid descriptors and a one-byte buffer.
        ok = unsafe {
            libc::write(to_child_w.as_raw_fd(), byte.as_ptr().cast(), 1) == 1
                && libc::read(to_parent_r.as_raw_fd(), byte.as_mut_ptr().cast(), 1) == 1
        };
        if !ok {
            break;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let mine = cpu_seconds(libc::RUSAGE_SELF) - before;
    drop(to_child_w);
    let mut status = 0;
    // SAFETY: our own child (it sees the closed pipe if we stopped early).
    unsafe { libc::waitpid(child, &mut status, 0) };
    let theirs = cpu_seconds(libc::RUSAGE_CHILDREN) - children_before;
    saved.apply();
    ensure!(ok, "ping-pong pipe: {}", std::io::Error::last_os_error());
    let per = |s: f64| s * 1e6 / f64::from(ROUND_TRIPS);
    Ok((per(wall), per(mine + theirs)))
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd as _;
    let mut fds = [0; 2];
    // SAFETY: a two-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    // SAFETY: fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// CPU seconds (user + system) of `who`.
fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage fills the struct.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut usage);
        usage
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// A CPU set for the calling thread.
struct Affinity(libc::cpu_set_t);

impl Affinity {
    /// The calling thread's set now, to put back after the measurement.
    fn save() -> Result<Self> {
        // SAFETY: sched_getaffinity fills a zeroed set.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            ensure!(
                libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) == 0,
                "sched_getaffinity: {}",
                std::io::Error::last_os_error()
            );
            Ok(Self(set))
        }
    }

    fn only(cpu: usize) -> Self {
        // SAFETY: a zeroed set with one CPU in it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            Self(set)
        }
    }

    fn apply(&self) {
        // SAFETY: a valid set for the calling thread; a failure leaves the old one, which
        // only makes the figure less precise.
        unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_pong_measures_round_trips_and_restores_the_affinity() {
        let before = Affinity::save().unwrap();
        let (wall, cpu) = ping_pong(0, 0).unwrap();
        assert!(wall > 0.0 && wall < 10_000.0, "{wall} µs per round trip");
        assert!(cpu > 0.0, "{cpu} µs of CPU per round trip");
        let after = Affinity::save().unwrap();
        // SAFETY: plain bit sets.
        assert!(unsafe { libc::CPU_EQUAL(&before.0, &after.0) });
        let figures = measure().unwrap();
        assert!(figures["same_cpu"]["round_trip_us"].as_f64().unwrap() > 0.0);
    }
}
