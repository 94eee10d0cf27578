//! `cargo xtask code-order`: which of the agent's functions run, so the linker can put them
//! next to each other.
//!
//! Why: the kernel maps an executable's code into a process 64 KiB around every page it
//! touches (fault-around), so an agent that runs a few MiB of functions scattered over 15 MiB
//! of `.text` ends up with most of `.text` in its resident set. Laid out together, the same
//! functions take a fraction of the pages. This is the function ordering browsers and
//! Android do with an "order file": an instrumented build (`-C profile-generate`) runs the
//! bench's workload, every function whose counters moved is listed, and `build.rs` hands the
//! list to lld (`--symbol-ordering-file`) for release builds.
//!
//! The list holds the release build's own symbol names. Rust's symbol hashes follow what cargo
//! knows of a build (profile, flags, target, features), so the instrumented build is the
//! release build exactly, with the instrumentation added behind cargo's back: this program
//! is its `RUSTC_WRAPPER` ([`rustc_wrapper`]). The names stay valid while the code changes; a
//! toolchain, profile or dependency bump renames them. Names the release build no longer has
//! are ignored by the linker and new functions land after the listed ones, so a stale file
//! costs memory, never correctness: regenerate it after such bumps.
use std::{
    collections::{HashMap, HashSet},
    ffi::OsString,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{bench, cmd, setup, workspace_root};

/// The order file, relative to the workspace root (build.rs reads it).
pub const ORDER_FILE: &str = "mesh-agent/code-order.txt";
/// Where the instrumented build goes (its own target directory: same names, other code).
const TARGET_DIR: &str = "target/code-order";
/// Starts the header line naming the toolchain the names belong to.
const TOOLCHAIN_PREFIX: &str = "made with ";
/// Set (to anything) when this program runs as cargo's `RUSTC_WRAPPER`.
pub const WRAPPER_ENV: &str = "MESH_XTASK_RUSTC_WRAPPER";
/// What the wrapper adds to the agent's own and its dependencies' compilations. Pre-inlining
/// off: every function keeps its own counters. Value profiling off: not needed, and the
/// profile reader does not read it.
const INSTRUMENT: [&str; 6] = [
    "-C",
    "profile-generate",
    "-C",
    "llvm-args=-disable-preinline",
    "-C",
    "llvm-args=-disable-vp",
];

/// Options of `cargo xtask code-order`.
#[derive(clap::Args, Debug)]
pub struct CodeOrderArgs {
    /// Write the list here instead of mesh-agent/code-order.txt.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use the .profraw files already in this directory instead of building and running.
    #[arg(long)]
    profiles: Option<PathBuf>,
}

pub fn run(args: CodeOrderArgs) -> Result<()> {
    let out = args
        .out
        .unwrap_or_else(|| workspace_root().join(ORDER_FILE));
    let profiles = match args.profiles {
        Some(dir) => dir,
        None => record()?,
    };
    let executed = executed_functions(&profiles)?;
    ensure!(
        executed.len() > 1000,
        "only {} functions ran: the workload did not reach the agent's data path",
        executed.len()
    );
    // Only what the release binary has: the rest was inlined away there.
    println!("• build (release, for its symbol table)");
    cmd::run(&mut crate::release_agent_build())?;
    let release = release_dir().join("mesh-agent");
    let Binary {
        functions: symbols,
        rustc,
    } = Binary::read(&release)?;
    let toolchain = rustc.with_context(|| {
        format!(
            "{} names no rustc in its .comment section",
            release.display()
        )
    })?;
    let instrumented = workspace_root().join(TARGET_DIR).join("release/mesh-agent");
    if instrumented.is_file() {
        // Same flags and features as cargo sees them: the same names. Had anything differed,
        // (almost) none would be shared.
        let shared = Binary::read(&instrumented)?
            .functions
            .intersection(&symbols)
            .count();
        ensure!(
            shared * 2 > symbols.len(),
            "only {shared} of the {} function names of {} are in the instrumented build {}: \
             were they built differently (profile, features, RUSTFLAGS)?",
            symbols.len(),
            release.display(),
            instrumented.display()
        );
    }
    let mut listed = order(&executed, &symbols);
    let ran = listed.len();
    listed.extend(merge_survivors(&executed, &symbols));
    std::fs::write(&out, render(&listed, &toolchain))
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "✓ {} functions ran; the {ran} of them {} has, and {} instances their code may have been \
         merged into, are listed in {} (release builds apply it)",
        executed.len(),
        release.display(),
        listed.len() - ran,
        out.display()
    );
    Ok(())
}

/// target/release, or under $CARGO_TARGET_DIR.
fn release_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("release")
}

/// Builds the instrumented agent and runs the bench's quick workload with it (one trial of
/// every scenario: node agents cross-node and same-node, the waypoint, the CA); returns the
/// directory of the agents' profiles.
fn record() -> Result<PathBuf> {
    if !setup::is_root() {
        bail!("the workload is the bench (network namespaces, eBPF): run as root");
    }
    let root = workspace_root();
    let wrapper = std::env::current_exe().context("locating cargo-xtask")?;
    println!(
        "• build (the release build, instrumented: -C profile-generate through a RUSTC_WRAPPER)"
    );
    cmd::run(
        crate::release_agent_build()
            .env("CARGO_TARGET_DIR", root.join(TARGET_DIR))
            .env("RUSTC_WRAPPER", wrapper)
            .env(WRAPPER_ENV, "1")
            .env("MESH_CODE_ORDER", "off"),
    )?;
    let agent = root.join(TARGET_DIR).join("release/mesh-agent");
    let profiles = root.join(TARGET_DIR).join("profiles");
    let _ = std::fs::remove_dir_all(&profiles);
    std::fs::create_dir_all(&profiles)?;
    // Every agent process the bench starts (node agents, waypoint, CA) writes its counters
    // here when it exits; the bench ends each with SIGTERM.
    // SAFETY: single-threaded at this point (nothing else reads the environment).
    unsafe { std::env::set_var("LLVM_PROFILE_FILE", profiles.join("agent-%p.profraw")) };
    println!("• workload: cargo xtask bench --quick --trials 1 with the instrumented agent");
    bench::run(bench::BenchArgs::for_workload(agent))?;
    Ok(profiles)
}

/// Runs as cargo's `RUSTC_WRAPPER` (`cargo-xtask <rustc> <args>…`): the compilation as cargo
/// asked for it, plus [`INSTRUMENT`] where [`instrumented`] says so. Never returns on success.
pub fn rustc_wrapper() -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let mut args = std::env::args_os().skip(1);
    let rustc = args.next().context("RUSTC_WRAPPER: no rustc to run")?;
    let args: Vec<OsString> = args.collect();
    let mut command = std::process::Command::new(&rustc);
    command.args(&args);
    if instrumented(&args) {
        command.args(INSTRUMENT);
    }
    Err(command.exec()).with_context(|| format!("running {}", rustc.to_string_lossy()))
}

/// Whether one rustc invocation compiles code that ends up in the agent: a release-profile
/// crate (`opt-level=3`; build scripts and proc macros and their dependencies build at
/// opt-level 0) that is neither a build script nor a proc macro (rustc loads those; they
/// would need the profiler's runtime) nor part of the nested eBPF build.
fn instrumented(args: &[OsString]) -> bool {
    let args: Vec<&str> = args.iter().filter_map(|a| a.to_str()).collect();
    let after = |flag: &'static str| args.windows(2).filter(move |w| w[0] == flag).map(|w| w[1]);
    let release = after("-C").any(|v| v == "opt-level=3");
    let build_script = after("--crate-name").any(|n| n.starts_with("build_script_"));
    let proc_macro = after("--crate-type").any(|t| t == "proc-macro");
    let bpf = after("--target").any(|t| t.starts_with("bpf"));
    release && !build_script && !proc_macro && !bpf
}

/// Every function with a non-zero counter in any profile in `dir`, with its total count.
fn executed_functions(dir: &Path) -> Result<HashMap<String, u64>> {
    let mut counts: HashMap<String, u64> = HashMap::new();
    let mut files = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let empty = std::fs::metadata(&path).map_or(true, |m| m.len() == 0);
        if path.extension().is_none_or(|e| e != "profraw") || empty {
            continue;
        }
        let profile = llvm_profparser::instrumentation_profile::parse(&path)
            .with_context(|| format!("parsing {}", path.display()))?;
        files += 1;
        for record in profile.records() {
            let total: u64 = record.record.counts.iter().sum();
            let Some(name) = record.name.as_deref().and_then(symbol_of) else {
                continue;
            };
            if total > 0 {
                *counts.entry(name.to_owned()).or_default() += total;
            }
        }
    }
    ensure!(
        files > 0,
        "no (non-empty) .profraw files in {}",
        dir.display()
    );
    println!("  {files} profiles read");
    Ok(counts)
}

/// The linker symbol in a profile's function name: the name itself, or for a function with
/// internal linkage the part after `<source file>;` (older LLVM: `:`). Mangled Rust names
/// contain neither.
fn symbol_of(pgo_name: &str) -> Option<&str> {
    let symbol = pgo_name.rsplit([';', ':']).next()?;
    (!symbol.is_empty()).then_some(symbol)
}

/// What this program needs of an ELF binary, from one read of it.
struct Binary {
    /// Its function symbols.
    functions: HashSet<String>,
    /// The compiler that built it, as `rustc -V` prints it: from the `.comment` section rustc
    /// leaves in every binary (`rustc version 1.95.0 (…)`), so it is the one that built the
    /// release agent even if `rustc` on PATH is another.
    rustc: Option<String>,
}

impl Binary {
    fn read(path: &Path) -> Result<Self> {
        use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let file =
            object::File::parse(&*data).with_context(|| format!("parsing {}", path.display()))?;
        let functions = file
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text)
            .filter_map(|s| s.name().ok().map(str::to_owned))
            .collect();
        let comment = file
            .section_by_name(".comment")
            .and_then(|s| s.data().ok())
            .unwrap_or_default();
        Ok(Self {
            functions,
            rustc: rustc_of_comment(comment),
        })
    }
}

/// `rustc 1.95.0 (…)` out of a `.comment` section (NUL-separated producer strings).
fn rustc_of_comment(comment: &[u8]) -> Option<String> {
    comment
        .split(|b| *b == 0)
        .filter_map(|s| std::str::from_utf8(s).ok())
        .find_map(|s| s.strip_prefix("rustc version "))
        .map(|v| format!("rustc {v}"))
}

/// The functions that ran and `symbols` has, hottest first (they share cache lines and TLB
/// entries best), ties by name so the file is stable from run to run.
fn order(executed: &HashMap<String, u64>, symbols: &HashSet<String>) -> Vec<String> {
    let mut ran: Vec<(&String, u64)> = executed
        .iter()
        .filter(|(name, _)| symbols.contains(*name))
        .map(|(name, count)| (name, *count))
        .collect();
    ran.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    ran.into_iter().map(|(name, _)| name.clone()).collect()
}

/// Where the code of functions that ran but are not in the release binary may live: the
/// release build merges functions whose code is identical (the same generic body for another
/// type), and the instance that survives is often one the profile saw at zero (instrumented,
/// each had its own counters, so nothing was identical). A function can also be missing
/// because the release build inlined it everywhere; its siblings by name (other closures of
/// the same function) are then listed for nothing — a few dozen, memory only. So: every
/// release instance of a generic that has an instance which ran and is missing from the
/// release binary, unless it ran itself (then it is listed already). Listed after the functions that ran, the group's
/// hottest first: they are candidates, and the few that run sit among them rather than
/// scattered over `.text`.
fn merge_survivors(executed: &HashMap<String, u64>, symbols: &HashSet<String>) -> Vec<String> {
    let mut heat: HashMap<&str, u64> = HashMap::new();
    for (name, count) in executed {
        if !symbols.contains(name) {
            *heat.entry(unhashed(name)).or_default() += count;
        }
    }
    let mut candidates: Vec<(u64, &String)> = symbols
        .iter()
        .filter(|s| !executed.contains_key(*s))
        .filter_map(|s| heat.get(unhashed(s)).map(|h| (*h, s)))
        .collect();
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    candidates.into_iter().map(|(_, s)| s.clone()).collect()
}

/// A legacy-mangled Rust symbol without its hash (`…17h0123456789abcdefE` → `…`): what the
/// instances of one generic share.
fn unhashed(symbol: &str) -> &str {
    let Some(at) = symbol.len().checked_sub(20) else {
        return symbol;
    };
    let hash = symbol.get(at..).unwrap_or_default();
    let is_hash = hash.starts_with("17h")
        && hash.ends_with('E')
        && hash[3..19].bytes().all(|b| b.is_ascii_hexdigit());
    if is_hash { &symbol[..at] } else { symbol }
}

/// The file's text. `toolchain` (`rustc -V`) goes into the header: the names are that
/// toolchain's, and the image's builder must be the same release for them to apply there
/// (checked by the deploy tests).
fn render(symbols: &[String], toolchain: &str) -> String {
    let mut s = String::from(
        "# Functions of mesh-agent that ran under the bench's workload, hottest first, then the\n\
         # instances their code may have been merged into: lld lays them out first and together\n\
         # (build.rs, release builds). Generated by\n\
         # `cargo xtask code-order`; see docs/ARCHITECTURE.md \"Build pipeline\". Do not edit.\n",
    );
    s.push_str(&format!("# {TOOLCHAIN_PREFIX}{}\n", toolchain.trim()));
    for name in symbols {
        s.push_str(name);
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbol_of_strips_the_source_file_of_internal_functions() {
        assert_eq!(
            symbol_of("mesh-agent/src/main.rs;_ZN10mesh_agent4main17h0123456789abcdefE"),
            Some("_ZN10mesh_agent4main17h0123456789abcdefE")
        );
        assert_eq!(
            symbol_of("src/lib.rs:_ZN3foo3bar17h0123456789abcdefE"),
            Some("_ZN3foo3bar17h0123456789abcdefE")
        );
        assert_eq!(
            symbol_of("_ZN4core3fmt5write17h0123456789abcdefE"),
            Some("_ZN4core3fmt5write17h0123456789abcdefE")
        );
        assert_eq!(symbol_of("file.rs;"), None);
    }

    fn args(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn only_the_agents_release_code_is_instrumented() {
        let crate_ = "--crate-name tokio --edition=2021 src/lib.rs --crate-type lib -C opt-level=3 -C embed-bitcode=yes";
        assert!(instrumented(&args(crate_)));
        let agent = "--crate-name mesh_agent --edition=2024 src/main.rs --crate-type bin -C opt-level=3 -C lto";
        assert!(instrumented(&args(agent)));
        // Build-time code: build scripts, proc macros and their dependencies.
        let build_dep = "--crate-name syn src/lib.rs --crate-type lib -C debug-assertions=off";
        assert!(!instrumented(&args(build_dep)));
        let script = "--crate-name build_script_build build.rs --crate-type bin -C opt-level=3";
        assert!(!instrumented(&args(script)));
        let proc_macro =
            "--crate-name serde_derive src/lib.rs --crate-type proc-macro -C opt-level=3";
        assert!(!instrumented(&args(proc_macro)));
        // The nested eBPF build and cargo's queries of rustc.
        let bpf = "--crate-name mesh_ebpf --target bpfel-unknown-none -C opt-level=3";
        assert!(!instrumented(&args(bpf)));
        assert!(!instrumented(&args("-vV")));
    }

    #[test]
    fn the_toolchain_comes_from_the_rustc_producer_string() {
        let comment = b"\0Linker: LLD 22.1.2\0rustc version 1.95.0 (59807616e 2026-04-14)\0GCC: (Debian 12.2.0-14) 12.2.0\0";
        assert_eq!(
            rustc_of_comment(comment).as_deref(),
            Some("rustc 1.95.0 (59807616e 2026-04-14)")
        );
        assert_eq!(rustc_of_comment(b"GCC: (Debian 12.2.0-14) 12.2.0\0"), None);
    }

    #[test]
    fn unhashed_strips_only_a_legacy_hash() {
        assert_eq!(
            unhashed("_ZN10mesh_agent4main17h0123456789abcdefE"),
            "_ZN10mesh_agent4main"
        );
        assert_eq!(unhashed("_ZN10mesh_agent4mainE"), "_ZN10mesh_agent4mainE");
        assert_eq!(
            unhashed("_ZN10mesh_agent4main17hXYZ3456789abcdefE"),
            "_ZN10mesh_agent4main17hXYZ3456789abcdefE"
        );
        assert_eq!(unhashed("memcpy"), "memcpy");
        // A cut inside a multi-byte character is no hash, and no panic.
        assert_eq!(
            unhashed("_ZNé0123456789abcdefghE"),
            "_ZNé0123456789abcdefghE"
        );
    }

    #[test]
    fn merge_survivors_are_the_other_instances_of_generics_whose_instance_vanished() {
        let h = |n: &str, x: char| format!("_ZN3fmt{n}17h{}E", x.to_string().repeat(16));
        // `a`: one instance ran and is gone (merged); `b`: the instance that ran is there.
        let executed = HashMap::from([(h("1a", '1'), 7), (h("1b", '3'), 9), (h("1a", '5'), 2)]);
        let symbols: HashSet<String> = [
            h("1a", '2'),
            h("1a", '4'),
            h("1a", '5'),
            h("1b", '3'),
            h("1b", '6'),
            h("1c", '7'),
        ]
        .into();
        assert_eq!(
            merge_survivors(&executed, &symbols),
            [h("1a", '2'), h("1a", '4')]
        );
    }

    #[test]
    fn order_lists_what_ran_and_the_binary_has_hottest_first() {
        let executed = HashMap::from([
            ("_ZN1a1f".to_owned(), 5),
            ("_ZN1b1g".to_owned(), 9),
            ("_ZN1c1h".to_owned(), 1),
            ("_ZN1d1k".to_owned(), 5),
        ]);
        let symbols: HashSet<String> = ["_ZN1a1f", "_ZN1b1g", "_ZN1d1k", "_ZN1e1m"]
            .map(str::to_owned)
            .into();
        assert_eq!(
            order(&executed, &symbols),
            ["_ZN1b1g", "_ZN1a1f", "_ZN1d1k"]
        );
        let text = render(
            &order(&executed, &symbols),
            "rustc 1.95.0 (59807616e 2026-04-14)\n",
        );
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 3);
        assert!(text.contains("\n# made with rustc 1.95.0 (59807616e 2026-04-14)\n"));
    }
}
