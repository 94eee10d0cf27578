//! Builds `mesh-ebpf` for bpfel-unknown-none (nightly, -Z build-std=core, bpf-linker) through
//! aya-build and leaves the object in OUT_DIR, where `ebpf::object` embeds it.
use std::{env, path::PathBuf};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
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
