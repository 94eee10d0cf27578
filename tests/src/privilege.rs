//! The gate every privileged end-to-end test passes first: run when root (and the tools exist),
//! skip with a printed reason otherwise — except under CI (CI=true), where skipping is a failure.
use std::io::Write as _;

/// Writes straight to stderr: libtest captures `eprintln!` of passing tests, and a skip reason
/// must be seen.
pub fn report(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{message}");
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether `test` can run: root and every program in `tools` on PATH. When it cannot, prints why
/// and returns false, or panics under CI.
pub fn can_run(test: &str, tools: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions.
    let reason = if unsafe { libc::geteuid() } != 0 {
        Some("needs root (network namespaces, veths, cgroups, eBPF)".to_owned())
    } else {
        missing(tools, " (`cargo xtask setup` installs it)")
    };
    gate(test, reason)
}

/// The same gate for a test that needs no root, only `tools` on PATH (`how` says where they
/// come from).
pub fn has_tools(test: &str, tools: &[&str], how: &str) -> bool {
    gate(test, missing(tools, &format!(" ({how})")))
}

fn missing(tools: &[&str], hint: &str) -> Option<String> {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    (!missing.is_empty()).then(|| format!("needs {} on PATH{hint}", missing.join(", ")))
}

/// Run (true), skip with the reason printed (false), or fail under CI.
fn gate(test: &str, reason: Option<String>) -> bool {
    match reason {
        None => true,
        Some(reason) if under_ci() => panic!("{test}: {reason}; CI=true, so this is a failure"),
        Some(reason) => {
            report(&format!("SKIP {test}: {reason}"));
            false
        }
    }
}

/// Whether `program` is a file in one of PATH's directories.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
