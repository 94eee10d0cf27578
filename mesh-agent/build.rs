//! Builds `mesh-ebpf` for bpfel-unknown-none (nightly, -Z build-std=core, bpf-linker) through
//! aya-build and leaves the object in OUT_DIR, where `ebpf::object` embeds it; and generates the
//! CA's gRPC code.
use std::{env, path::PathBuf};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    grpc()?;
    // Link options for the release binary only (dev and test builds stay as they are).
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    code_order(release);
    packed_relocations(release);
    if which::which("bpf-linker").is_err() {
        bail!(
            "bpf-linker is not on PATH; run `cargo xtask setup` (it builds bpf-linker against the nightly's LLVM)"
        );
    }
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .context("mesh-agent has no parent directory")?
        .join("mesh-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("mesh-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mesh-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// The CA's gRPC service (Istio's `istio.v1.auth.IstioCertificateService`), compiled by protox
/// (a pure-Rust protobuf compiler: no protoc on the build machine).
fn grpc() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["istio/v1/auth/ca.proto"], ["proto"])
        .context("compiling proto/istio/v1/auth/ca.proto")?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)
        .context("generating the gRPC code")?;
    Ok(())
}

/// Release builds lay out first, and together, the functions `cargo xtask code-order` saw run
/// (code-order.txt): an agent then has a fraction of its code pages resident
/// (docs/ARCHITECTURE.md "Build pipeline"). It needs lld, rustc's linker on x86_64 Linux since
/// 1.90; `MESH_CODE_ORDER=off` builds without it (another linker, or the instrumented build).
fn code_order(release: bool) {
    println!("cargo:rerun-if-changed=code-order.txt");
    println!("cargo:rerun-if-env-changed=MESH_CODE_ORDER");
    let x86_64_linux = env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    let off = env::var("MESH_CODE_ORDER").is_ok_and(|v| v == "off");
    let file =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join("code-order.txt");
    if !release || !x86_64_linux || off || !file.is_file() {
        return;
    }
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
        file.display()
    );
    // Names the code no longer has (it changed since the file was made) are expected.
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}

/// Release builds store their relative relocations packed (`DT_RELR`, glibc ≥ 2.36; the image
/// runs trixie's 2.41): a position-independent binary has ~25,000 of them, 580 KiB as plain
/// `RELA` entries that the loader reads once at start and that then stay in the agent's
/// resident set; packed they take a few KiB. Only where the binary will run on the build
/// machine's glibc and that glibc reads them (lld marks the binary as needing
/// `GLIBC_ABI_DT_RELR`, which an older glibc refuses to load); `MESH_PACKED_RELOCS=off`
/// builds without.
fn packed_relocations(release: bool) {
    println!("cargo:rerun-if-env-changed=MESH_PACKED_RELOCS");
    let target = env::var("TARGET").unwrap_or_default();
    let native = env::var("HOST").is_ok_and(|h| h == target);
    let off = env::var("MESH_PACKED_RELOCS").is_ok_and(|v| v == "off");
    if !release || !native || !target.ends_with("-linux-gnu") || off {
        return;
    }
    match glibc_version() {
        Some(v) if v >= (2, 36) => {
            println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
        }
        v => println!(
            "cargo:warning=relative relocations not packed: this machine's glibc ({v:?}) is \
             older than 2.36 or unknown, and would refuse to load such a binary"
        ),
    }
}

/// The build machine's glibc version (`getconf GNU_LIBC_VERSION` prints `glibc 2.36`).
fn glibc_version() -> Option<(u32, u32)> {
    let out = std::process::Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let (major, minor) = text.trim().strip_prefix("glibc ")?.split_once('.')?;
    let minor = minor.split('.').next()?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}
