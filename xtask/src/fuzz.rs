//! `cargo xtask fuzz`: the cargo-fuzz targets of `mesh-agent/fuzz` (libFuzzer, nightly,
//! AddressSanitizer, or a quick unsanitised dev build for CI), each for a bounded time, with its
//! committed seeds and the corpus it grew before; a summary of executions per target, and a
//! failure naming the target and its crash artifact when one crashes.
use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

/// The targets, in `mesh-agent/fuzz/fuzz_targets/`.
pub const TARGETS: [&str; 4] = ["hbone_connect", "config_file", "csr_check", "metric_labels"];

#[derive(clap::Args, Debug)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 600)]
    pub seconds: u64,
    /// Only these targets (default: all).
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Build in the dev profile without a sanitizer: ~3.5 minutes on 2 cores instead of ~11
    /// (an optimised, AddressSanitizer build with one codegen unit), for CI's bounded run. The
    /// targets run slower and memory errors in unsafe code go unseen; panics and the checks'
    /// invariants are caught the same.
    #[arg(long)]
    pub quick_build: bool,
    /// Run the targets at the same time (each still for `--seconds`) rather than one after
    /// another.
    #[arg(long)]
    pub parallel: bool,
}

/// What one run did, from libFuzzer's final statistics.
#[derive(Debug, PartialEq)]
pub struct RunStats {
    pub executions: u64,
    pub seconds: u64,
}

impl RunStats {
    /// Executions per second (a run shorter than a second counts as one).
    fn per_second(&self) -> u64 {
        self.executions / self.seconds.max(1)
    }
}

/// Reads `Done <n> runs in <s> second(s)` from libFuzzer's output.
pub fn parse_done(output: &str) -> Option<RunStats> {
    output.lines().rev().find_map(|l| {
        let rest = l.trim().strip_prefix("Done ")?;
        let (runs, rest) = rest.split_once(" runs in ")?;
        let secs = rest.split_whitespace().next()?;
        Some(RunStats {
            executions: runs.parse().ok()?,
            seconds: secs.parse().ok()?,
        })
    })
}

pub fn run(args: FuzzArgs) -> Result<()> {
    ensure_cargo_fuzz()?;
    let crate_dir = crate::workspace_root().join("mesh-agent");
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in &args.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("no fuzz target {t:?} (targets: {})", TARGETS.join(", "));
            }
        }
        args.targets.iter().map(String::as_str).collect()
    };
    let build = build_flags(args.quick_build);
    // One build first: runs started together would otherwise queue on cargo's lock.
    println!("• build the fuzz targets ({})", build.join(" "));
    crate::cmd::run(
        Command::new("cargo")
            .current_dir(&crate_dir)
            .args(["+nightly", "fuzz", "build"])
            .args(&build),
    )?;
    let results: Vec<(&str, Result<RunStats>)> = if args.parallel {
        println!(
            "• fuzz {} at once for {} s",
            targets.join(", "),
            args.seconds
        );
        std::thread::scope(|scope| {
            let runs: Vec<_> = targets
                .iter()
                .map(|&t| {
                    let (dir, build) = (&crate_dir, &build);
                    (t, scope.spawn(move || run_one(dir, t, build, args.seconds)))
                })
                .collect();
            runs.into_iter()
                .map(|(t, run)| {
                    let result = run.join().unwrap_or_else(|_| {
                        Err(anyhow::anyhow!("the thread running {t} panicked"))
                    });
                    (t, result)
                })
                .collect()
        })
    } else {
        targets
            .iter()
            .map(|&t| {
                println!("• fuzz {t} for {} s", args.seconds);
                (t, run_one(&crate_dir, t, &build, args.seconds))
            })
            .collect()
    };
    let mut summary = Vec::new();
    let mut failed = Vec::new();
    for (t, result) in results {
        match result {
            Ok(stats) => {
                println!(
                    "  {t}: {} executions in {} s ({}/s), no crash",
                    stats.executions,
                    stats.seconds,
                    stats.per_second()
                );
                summary.push((t, stats));
            }
            Err(e) => {
                eprintln!("  {t}: {e:#}");
                failed.push(t);
            }
        }
    }
    println!("\n| target | executions | seconds | per second |\n|---|---|---|---|");
    for (t, s) in summary {
        println!(
            "| {t} | {} | {} | {} |",
            s.executions,
            s.seconds,
            s.per_second()
        );
    }
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

/// `cargo fuzz` build flags: optimised with AddressSanitizer, or (quick) dev without one.
fn build_flags(quick: bool) -> Vec<&'static str> {
    if quick {
        vec!["--dev", "--sanitizer", "none"]
    } else {
        vec!["-O"]
    }
}

fn run_one(crate_dir: &Path, target: &str, build: &[&str], seconds: u64) -> Result<RunStats> {
    let corpus = crate_dir.join("fuzz/corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let seeds = crate_dir.join("fuzz/seeds").join(target);
    let mut cmd = Command::new("cargo");
    cmd.current_dir(crate_dir)
        .args(["+nightly", "fuzz", "run"])
        .args(build)
        .arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-print_final_stats=1",
        ]);
    println!("  → {}", crate::cmd::display(&cmd));
    let out = cmd
        .output()
        .with_context(|| format!("starting cargo fuzz for {target}"))?;
    let text = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz target {target} failed ({}); the crashing input is under mesh-agent/fuzz/artifacts/{target}/:\n{}",
            out.status,
            tail.join("\n")
        );
    }
    parse_done(&text).with_context(|| format!("no final statistics from {target}"))
}

/// cargo-fuzz from crates.io when it is missing (the nightly toolchain is setup's).
fn ensure_cargo_fuzz() -> Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        crate::cmd::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_final_statistics_are_read() {
        let out = "#1000\tpulse  cov: 10\nstat::number_of_executed_units: 726343\nDone 726343 runs in 11 second(s)\n";
        assert_eq!(
            parse_done(out),
            Some(RunStats {
                executions: 726343,
                seconds: 11
            })
        );
        assert_eq!(parse_done("==1== ERROR: AddressSanitizer\n"), None);
    }
}
