//! Locating the project's binaries for end-to-end tests (`cargo xtask test` builds them first).
use std::path::PathBuf;

use anyhow::{Result, bail};

/// The `mesh-agent` binary: `$MESH_AGENT_BIN`, else `<target dir>/debug/mesh-agent`.
pub fn mesh_agent() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("MESH_AGENT_BIN") {
        return Ok(PathBuf::from(path));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("debug/mesh-agent");
    if !path.is_file() {
        bail!(
            "{} not found: build it first (`cargo build --bins`, which `cargo xtask test` does) or set MESH_AGENT_BIN",
            path.display()
        );
    }
    Ok(path)
}
