//! The fuzz targets' checks (`mesh_agent::fuzz_checks`) on every test run: each target's seeds,
//! then random mutations of them for a bounded time — 30 s per target under CI (CI=true), 3 s
//! otherwise, `MESH_FUZZ_SMOKE_SECONDS` to choose. Unguided (no coverage feedback: the
//! instrumented cargo-fuzz build takes ~11 minutes, more than a CI run can spend), so it finds
//! what is near the seeds; `cargo xtask fuzz` runs the coverage-guided targets for as long as
//! wanted. A failing input is printed and written under `target/fuzz-smoke/`. The seed of the
//! mutations is printed too (`MESH_FUZZ_SMOKE_SEED` replays a run).
use std::{
    cell::Cell,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    sync::Once,
    time::{Duration, Instant},
};

use mesh_agent::fuzz_checks;

/// Tokens the mutations insert, so that inputs stay near what the parsers read.
const CONNECT_TOKENS: &[&str] = &[
    "[",
    "]",
    ":",
    "::ffff:",
    "10.0.0.1",
    "fe80::1%eth0",
    ":15008",
    ":+80",
    ":65536",
    "for=",
    "host=",
    ";",
    ",",
    "\"",
    "\n",
    "by=",
    "proto=",
    "%2F",
    "@",
    "/",
    "0x",
    "-1",
];
const CONFIG_TOKENS: &[&str] = &[
    "\n",
    "  ",
    "- ",
    ": ",
    "{",
    "}",
    "[",
    "]",
    "\"",
    "*",
    "/",
    "10.0.0.0/33",
    "::/0",
    "~",
    "null",
    "true",
    "0",
    "-1",
    "65536",
    "apiVersion: ",
    "kind: ",
    "metadata: ",
    "spec: ",
    "rules:",
    "from:",
    "to:",
    "when:",
    "source:",
    "operation:",
    "principals:",
    "paths:",
    "ports:",
    "methods:",
    "selector:",
    "matchLabels:",
    "action: DENY",
    "mtls:",
    "mode: STRICT",
    "portLevelMtls:",
    "http:",
    "route:",
    "destination:",
    "host: ",
    "weight: ",
    "match:",
    "uri:",
    "prefix: ",
    "regex: ",
    "exact: ",
    "fault:",
    "retries:",
    "timeout: ",
    "mirror:",
    "trafficPolicy:",
    "subsets:",
    "parentRefs:",
    "backendRefs:",
    "hostnames:",
    "jwtRules:",
    "issuer: ",
    "jwks: ",
    "AuthorizationPolicy",
    "PeerAuthentication",
    "VirtualService",
    "DestinationRule",
    "HTTPRoute",
    "Gateway",
    "RequestAuthentication",
    "workloads:",
    "services:",
    "namespaces:",
    "policies:",
    "ips: ",
    "vips: ",
    "labels: ",
];
const LABEL_TOKENS: &[&str] = &[
    "\0", "\"", "\\", "\n", "=", ",", "{", "}", " ", "\u{2028}", "é",
];
const NO_TOKENS: &[&str] = &[];

fn seconds() -> u64 {
    if let Some(s) = std::env::var("MESH_FUZZ_SMOKE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return s;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        30
    } else {
        3
    }
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a directory entry").path();
            let bytes = std::fs::read(&path).expect("a seed");
            (path, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out.into_iter().map(|(_, b)| b).collect()
}

/// One input changed by 1–8 random edits: bits flipped, bytes set, inserted or removed,
/// ranges duplicated or taken from another seed, tokens inserted.
fn mutate(rng: &mut fastrand::Rng, input: &[u8], seeds: &[Vec<u8>], tokens: &[&str]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.usize(1..=8) {
        let at = rng.usize(0..=out.len());
        match rng.u8(0..7) {
            0 if !out.is_empty() => {
                let i = rng.usize(0..out.len());
                out[i] ^= 1 << rng.u8(0..8);
            }
            1 if !out.is_empty() => {
                let i = rng.usize(0..out.len());
                out[i] = rng.u8(..);
            }
            2 => out.insert(at, rng.u8(..)),
            3 if !out.is_empty() => {
                let end = (at + rng.usize(1..=16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            4 if !out.is_empty() => {
                let start = rng.usize(0..out.len());
                let end = (start + rng.usize(1..=32)).min(out.len());
                let piece = out[start..end].to_vec();
                out.splice(at..at, piece);
            }
            5 => {
                let other = &seeds[rng.usize(0..seeds.len())];
                if !other.is_empty() {
                    let start = rng.usize(0..other.len());
                    let end = (start + rng.usize(1..=64)).min(other.len());
                    out.splice(at..at, other[start..end].iter().copied());
                }
            }
            6 if !tokens.is_empty() => {
                let token = tokens[rng.usize(0..tokens.len())];
                out.splice(at..at, token.bytes());
            }
            _ => {}
        }
    }
    out.truncate(64 * 1024);
    out
}

thread_local!(static QUIET: Cell<bool> = const { Cell::new(false) });

/// Whether panics on this thread print (the tests run on threads of their own; a panic
/// caught while fuzzing would print every time, the final failure must).
fn quiet_panics(quiet: bool) {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                default(info);
            }
        }));
    });
    QUIET.with(|q| q.set(quiet));
}

/// Runs `check` on the seeds, then on mutations of them until the time is up; fails naming
/// the input that broke an invariant.
fn run(target: &str, check: fn(&[u8]), tokens: &[&str]) {
    let seeds = seeds(target);
    let seed = std::env::var("MESH_FUZZ_SMOKE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let deadline = Duration::from_secs(seconds());
    // Inputs to mutate further: the seeds, then some of what was generated (a short walk away
    // from the seeds reaches further than one step from them).
    let mut pool = seeds.clone();
    let started = Instant::now();
    let mut runs = 0u64;
    let mut next = 0usize;
    quiet_panics(true); // the failing input is reported below instead
    let failure = loop {
        let input = if next < seeds.len() {
            next += 1;
            seeds[next - 1].clone()
        } else {
            if started.elapsed() >= deadline {
                break None;
            }
            let base = &pool[rng.usize(0..pool.len())];
            mutate(&mut rng, base, &seeds, tokens)
        };
        runs += 1;
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&input))) {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            break Some((input, why));
        }
        if pool.len() < 256 {
            pool.push(input);
        } else if rng.u8(..) < 16 {
            let i = rng.usize(seeds.len()..pool.len());
            pool[i] = input;
        }
    };
    quiet_panics(false);
    println!(
        "{target}: {runs} inputs in {:.1} s (seed {seed}, {} seeds)",
        started.elapsed().as_secs_f64(),
        seeds.len()
    );
    if let Some((input, why)) = failure {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-smoke");
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join(format!("{target}-{seed}"));
        let _ = std::fs::write(&file, &input);
        panic!(
            "{target}: an invariant broke on input {:?} (written to {}; MESH_FUZZ_SMOKE_SEED={seed} replays the run): {why}",
            String::from_utf8_lossy(&input),
            file.display()
        );
    }
}

#[test]
fn hbone_connect() {
    run("hbone_connect", fuzz_checks::hbone_connect, CONNECT_TOKENS);
}

#[test]
fn config_file() {
    run("config_file", fuzz_checks::config_file, CONFIG_TOKENS);
}

#[test]
fn csr_check() {
    run("csr_check", fuzz_checks::csr_check, NO_TOKENS);
}

#[test]
fn metric_labels() {
    run("metric_labels", fuzz_checks::metric_labels, LABEL_TOKENS);
}
