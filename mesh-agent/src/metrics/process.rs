//! The agent process as Prometheus' process collectors report it (`process_*`), read from
//! /proc/self at scrape time.

/// One reading of this process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub threads: u64,
    pub start_time_seconds: f64,
}

/// Reads /proc/self; missing pieces stay zero.
pub fn read() -> ProcessStats {
    let mut s = ProcessStats::default();
    // SAFETY: sysconf has no preconditions.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
        )
    };
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name, which is in parentheses and may contain spaces.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            // rest[0] is field 3 (state): utime = field 14, stime = 15, num_threads = 20,
            // starttime = 22, vsize = 23, rss = 24.
            s.cpu_seconds = (num(11) + num(12)) as f64 / ticks;
            s.threads = num(17);
            s.virtual_bytes = num(20);
            s.resident_bytes = num(21) * page;
            if let Some(boot) = boot_time() {
                s.start_time_seconds = boot + num(19) as f64 / ticks;
            }
        }
    }
    s.open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        s.max_fds = lim.rlim_cur;
    }
    s
}

/// The boot time, read once (/proc/stat is long: one line per CPU and interrupt).
fn boot_time() -> Option<f64> {
    static BOOT: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
    *BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_plausible_figures_of_this_process() {
        let s = super::read();
        assert!(s.resident_bytes > 1 << 20, "{s:?}");
        assert!(s.threads >= 1 && s.open_fds >= 3, "{s:?}");
        assert!(s.start_time_seconds > 1.6e9, "{s:?}");
        assert!(s.max_fds >= s.open_fds, "{s:?}");
    }
}
