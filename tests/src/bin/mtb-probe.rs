//! `mtb-probe`: the probe protocol (see `mesh_testbed::probe`) as a process, for tests that need
//! the client or server inside a pod's cgroup (socket-level hooks attach to cgroups).
//!
//! ```text
//! mtb-probe send <addr:port> <bytes>   connect, print the first line, send, check the summary
//! mtb-probe serve <port>               serve the probe protocol until killed
//! ```
use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, bail};
use mesh_testbed::probe::{Probe, ProbeServer};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["send", dst, bytes] => {
            let dst: SocketAddr = dst.parse().context("destination")?;
            let bytes: u64 = bytes.parse().context("byte count")?;
            let mut probe = Probe::connect_here(dst, Duration::from_secs(10))
                .with_context(|| format!("connecting to {dst}"))?;
            let local = probe.local_addr()?;
            let hello = probe.hello()?;
            let started = std::time::Instant::now();
            probe.finish(bytes)?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{}",
                serde_json::json!({"hello": hello, "local": local.to_string(), "bytes": bytes, "seconds": secs})
            );
            Ok(())
        }
        ["serve", port] => {
            let port: u16 = port.parse().context("port")?;
            let _server = ProbeServer::start_here(&[port])?;
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        _ => bail!("usage: mtb-probe send <addr:port> <bytes> | mtb-probe serve <port>"),
    }
}
