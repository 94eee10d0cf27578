//! Running host tools (iproute2, mount) with errors that say what failed.
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// Runs `ip <args>` and fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args).map(drop)
}

/// Runs `ip -n <netns> <args>`, with `args` one whitespace-separated string (names and addresses
/// never contain spaces), so topology code reads like the commands a person would type.
pub fn ip_in(netns: &str, args: &str) -> Result<()> {
    let mut argv = vec!["-n", netns];
    argv.extend(args.split_whitespace());
    ip(&argv)
}

/// Runs `program args`, returning stdout; a non-zero exit becomes an error naming the command.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {program} (is it installed? `cargo xtask setup`)"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
