//! `cargo xtask testbed up|status|down|exec` (filled in with the testbed library).
use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum TestbedCmd {}

pub fn run(command: TestbedCmd) -> Result<()> {
    match command {}
}
