//! Locating the project's binaries for end-to-end tests (`cargo xtask test` builds them first).
use std::path::PathBuf;

use anyhow::{Result, bail};

/// The `mesh-agent` binary: `$MESH_AGENT_BIN`, else `<target dir>/debug/mesh-agent`.
pub fn mesh_agent() -> Result<PathBuf> {
    binary("MESH_AGENT_BIN", "mesh-agent")
}

/// The `mtb-probe` binary (this crate's): `$MTB_PROBE_BIN`, else `<target dir>/debug/mtb-probe`.
pub fn mtb_probe() -> Result<PathBuf> {
    binary("MTB_PROBE_BIN", "mtb-probe")
}

fn binary(env: &str, name: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("debug").join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build it first (`cargo build --bins`, which `cargo xtask test` does) or set {env}",
            path.display()
        );
    }
    Ok(path)
}
