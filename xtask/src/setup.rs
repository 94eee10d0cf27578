//! `cargo xtask setup`: everything a fresh machine needs to build and test mesh-agent, installed
//! idempotently. Each step first checks and only acts when something is missing or stale.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// Debian packages the tests, demo and benchmarks use, with what for.
pub const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip: network namespaces, veths, routes, rules"),
    ("util-linux", "nsenter, mount"),
    ("iperf3", "throughput tests and baseline traffic"),
    ("curl", "HTTP client traffic"),
    ("nghttp2-client", "h2load: HTTP/2 load through the waypoint"),
    ("wrk", "HTTP/1.1 load through the waypoint"),
    ("bpftool", "inspecting pinned programs and maps"),
    ("tcpdump", "captures on the fabric link"),
    ("procps", "ps/pgrep for process checks"),
];

/// bpf-linker release line known to support our nightly's LLVM via its llvm-N features.
const BPF_LINKER_VERSION: &str = "^0.13";

/// What setup found and did, for the caller's summary.
#[derive(Default)]
pub struct Report {
    pub actions: Vec<String>,
    pub warnings: Vec<String>,
}

/// Checks every prerequisite and installs what is missing.
pub fn run() -> Result<Report> {
    let mut report = Report::default();
    debian_packages(&mut report)?;
    stable_components(&mut report)?;
    let nightly = nightly_toolchain(&mut report)?;
    bpf_linker(&nightly, &mut report)?;
    Ok(report)
}

/// Whether a quick check says setup has nothing to do (used by `test`/`build` to decide whether to
/// run setup at all).
pub fn looks_complete() -> bool {
    missing_packages().map(|m| m.is_empty()).unwrap_or(false)
        && missing_components().is_empty()
        && Nightly::detect().is_ok_and(|n| n.has_rust_src() && bpf_linker_ok(&n).unwrap_or(false))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn missing_packages() -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for (pkg, _) in DEBIAN_PACKAGES {
        let status = Command::new("dpkg-query")
            .args(["-W", "-f=${db:Status-Status}", pkg])
            .output()
            .context("running dpkg-query (is this a Debian-based system?)")?;
        if String::from_utf8_lossy(&status.stdout).trim() != "installed" {
            missing.push(*pkg);
        }
    }
    Ok(missing)
}

fn debian_packages(report: &mut Report) -> Result<()> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        println!("✓ Debian packages: {}", names(DEBIAN_PACKAGES));
        return Ok(());
    }
    if !is_root() {
        let msg = format!(
            "Debian packages missing and not root, so not installed: {} (root-only tests will skip)",
            missing.join(" ")
        );
        println!("! {msg}");
        report.warnings.push(msg);
        return Ok(());
    }
    println!("• installing Debian packages: {}", missing.join(" "));
    cmd::run(
        Command::new("apt-get")
            .args(["-q", "update"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    cmd::run(
        Command::new("apt-get")
            .args(["-q", "install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    report
        .actions
        .push(format!("installed Debian packages {}", missing.join(" ")));
    Ok(())
}

/// Components of the default (stable) toolchain that `cargo xtask test` runs: the lints.
const STABLE_COMPONENTS: &[(&str, &str)] = &[("rustfmt", "fmt"), ("clippy", "clippy")];

fn missing_components() -> Vec<&'static str> {
    STABLE_COMPONENTS
        .iter()
        .filter(|(_, sub)| {
            !Command::new("cargo")
                .args([sub, "--version"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(component, _)| *component)
        .collect()
}

fn stable_components(report: &mut Report) -> Result<()> {
    let missing = missing_components();
    if missing.is_empty() {
        println!("✓ rustfmt and clippy");
        return Ok(());
    }
    println!("• adding toolchain components: {}", missing.join(" "));
    cmd::run(
        Command::new("rustup")
            .args(["component", "add"])
            .args(&missing),
    )?;
    report
        .actions
        .push(format!("added components {}", missing.join(" ")));
    Ok(())
}

fn names(pkgs: &[(&str, &str)]) -> String {
    pkgs.iter().map(|(p, _)| *p).collect::<Vec<_>>().join(" ")
}

/// The nightly toolchain that builds the eBPF crate, and the LLVM inside it.
pub struct Nightly {
    sysroot: PathBuf,
    version: String,
    llvm_major: u32,
}

impl Nightly {
    fn detect() -> Result<Self> {
        let vv = cmd::output(Command::new("rustc").args(["+nightly", "-vV"]))?;
        let (version, llvm_major) = parse_rustc_vv(&vv)?;
        let sysroot = cmd::output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
        Ok(Self {
            sysroot: PathBuf::from(sysroot.trim()),
            version,
            llvm_major,
        })
    }

    fn has_rust_src(&self) -> bool {
        self.sysroot
            .join("lib/rustlib/src/rust/library/Cargo.lock")
            .exists()
    }

    /// The real libLLVM shared object of this toolchain (not the linker script next to it). Its
    /// file name is its soname, which bpf-linker records as DT_NEEDED.
    fn libllvm(&self) -> Result<PathBuf> {
        let lib = self.sysroot.join("lib");
        for entry in fs::read_dir(&lib).with_context(|| format!("listing {}", lib.display()))? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with("libLLVM.so.") && is_elf(&path) {
                return Ok(path);
            }
        }
        bail!("no libLLVM.so.* ELF file in {}", lib.display())
    }
}

/// The release and LLVM major version from `rustc -vV` output.
fn parse_rustc_vv(vv: &str) -> Result<(String, u32)> {
    let field = |key: &str| vv.lines().find_map(|l| l.strip_prefix(key)).map(str::trim);
    let version = field("release:").context("rustc -vV printed no release")?;
    let llvm = field("LLVM version:").context("rustc -vV printed no LLVM version")?;
    let llvm_major = llvm
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("unparseable LLVM version {llvm:?}"))?;
    Ok((version.to_owned(), llvm_major))
}

fn is_elf(path: &Path) -> bool {
    use std::io::Read as _;
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

fn nightly_toolchain(report: &mut Report) -> Result<Nightly> {
    let nightly = match Nightly::detect() {
        Ok(n) => n,
        Err(_) => {
            println!("• installing the nightly toolchain (eBPF programs need -Z build-std)");
            cmd::run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))?;
            report.actions.push("installed nightly toolchain".into());
            Nightly::detect()?
        }
    };
    if nightly.has_rust_src() {
        println!(
            "✓ nightly {} (LLVM {}) with rust-src",
            nightly.version, nightly.llvm_major
        );
    } else {
        println!("• adding rust-src to nightly {}", nightly.version);
        cmd::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        report.actions.push("added rust-src to nightly".into());
    }
    Ok(nightly)
}

pub fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

fn bpf_linker_path() -> PathBuf {
    cargo_home().join("bin/bpf-linker")
}

/// bpf-linker is usable when it exists and its libLLVM resolves to this nightly's own libLLVM:
/// a linker built against another LLVM emits bitcode the nightly's rustc cannot link.
fn bpf_linker_ok(nightly: &Nightly) -> Result<bool> {
    let linker = bpf_linker_path();
    if !linker.exists() {
        return Ok(false);
    }
    let want = fs::canonicalize(nightly.libllvm()?)?;
    let ldd = cmd::output(Command::new("ldd").arg(&linker))?;
    Ok(ldd_libllvm(&ldd).is_some_and(|p| fs::canonicalize(p).is_ok_and(|p| p == want)))
}

/// The path `ldd` resolved libLLVM to (None if not linked or "not found").
fn ldd_libllvm(ldd: &str) -> Option<&str> {
    ldd.lines()
        .filter(|line| line.contains("libLLVM"))
        .find_map(|line| line.split("=>").nth(1)?.split_whitespace().next())
        .filter(|path| path.starts_with('/'))
}

fn bpf_linker(nightly: &Nightly, report: &mut Report) -> Result<()> {
    if bpf_linker_ok(nightly)? {
        println!(
            "✓ bpf-linker at {} uses the nightly's LLVM {}",
            bpf_linker_path().display(),
            nightly.llvm_major
        );
        return Ok(());
    }
    let libllvm = nightly.libllvm()?;
    let soname = libllvm
        .file_name()
        .context("libLLVM path has no file name")?;
    // bpf-linker's llvm-sys wants LLVM_PREFIX/lib/libLLVM.so; the binary keeps LLVM_PREFIX/lib as
    // its RUNPATH, so the prefix must outlive the build: keep it under CARGO_HOME, per soname.
    let prefix = cargo_home()
        .join("mesh-agent/llvm")
        .join(soname.to_string_lossy().as_ref());
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for link in [lib.join("libLLVM.so"), lib.join(soname)] {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), libllvm.display()))?;
    }
    println!(
        "• building bpf-linker against the nightly's {} (about a minute)",
        soname.to_string_lossy()
    );
    let feature = format!("llvm-{}", nightly.llvm_major);
    let install = |version: Option<&str>| {
        let mut cargo = Command::new("cargo");
        cargo.args(["install", "bpf-linker", "--locked", "--force"]);
        if let Some(v) = version {
            cargo.args(["--version", v]);
        }
        cargo
            .args(["--no-default-features", "--features", &feature])
            // Where bpf_linker_ok() looks, whatever install.root/CARGO_INSTALL_ROOT say.
            .arg("--root")
            .arg(cargo_home())
            .env("LLVM_PREFIX", &prefix);
        cmd::run(&mut cargo)
    };
    // The known-good line first; a nightly with a newer LLVM needs a newer bpf-linker.
    if let Err(e) = install(Some(BPF_LINKER_VERSION)) {
        println!(
            "! bpf-linker {BPF_LINKER_VERSION} with {feature} failed ({e:#}); trying the newest release"
        );
        install(None)?;
    }
    if !bpf_linker_ok(nightly)? {
        bail!(
            "bpf-linker was built but does not resolve {}; check `ldd {}`",
            libllvm.display(),
            bpf_linker_path().display()
        );
    }
    report
        .actions
        .push(format!("built bpf-linker with {feature}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_release_and_llvm_major_from_rustc_vv() {
        let vv = "rustc 1.97.0-nightly (abc 2026-05-19)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\n\
                  release: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(
            parse_rustc_vv(vv).unwrap(),
            ("1.97.0-nightly".to_owned(), 22)
        );
        assert!(parse_rustc_vv("release: 1.0\n").is_err());
    }

    #[test]
    fn finds_where_ldd_resolved_libllvm() {
        let ok = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibLLVM.so.22.1-rust-1.97.0-nightly => \
                  /root/.cargo/mesh-agent/llvm/x/lib/libLLVM.so.22.1-rust-1.97.0-nightly (0x00007f36)\n";
        assert_eq!(
            ldd_libllvm(ok),
            Some("/root/.cargo/mesh-agent/llvm/x/lib/libLLVM.so.22.1-rust-1.97.0-nightly")
        );
        let missing = "\tlibLLVM.so.21.1-rust-1.96.0-nightly => not found\n";
        assert_eq!(ldd_libllvm(missing), None);
        assert_eq!(ldd_libllvm("\tlibc.so.6 => /lib/libc.so.6 (0x1)\n"), None);
    }
}
