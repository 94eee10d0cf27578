//! `mtb-probe`: the probe protocol (see `mesh_testbed::probe`) as a process, for tests that need
//! the client or server inside a pod's cgroup (socket-level hooks attach to cgroups).
//!
//! ```text
//! mtb-probe send <addr:port> <bytes>   connect, print the first line, send, check the summary
//! mtb-probe serve <port>               serve the probe protocol until killed
//! mtb-probe http <port> <name>         a minimal HTTP/1.1 server (for curl): answers every
//!                                      request with "<name> saw <peer>"
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
        ["http", port, name] => {
            let port: u16 = port.parse().context("port")?;
            http(port, name)
        }
        _ => bail!(
            "usage: mtb-probe send <addr:port> <bytes> | mtb-probe serve <port> | mtb-probe http <port> <name>"
        ),
    }
}

/// Answers each HTTP/1.1 request (headers only; bodies are ignored) with a short text body naming
/// the server and the client address it saw, then closes.
fn http(port: u16, name: &str) -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind(("::", port)).context("binding")?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let name = name.to_owned();
        std::thread::spawn(move || {
            let peer = conn
                .peer_addr()
                .map(|p| p.ip().to_canonical().to_string())
                .unwrap_or_default();
            let mut reader = BufReader::new(conn.try_clone()?);
            let mut line = String::new();
            while reader.read_line(&mut line)? > 2 {
                line.clear();
            }
            let body = format!("{name} saw {peer}\n");
            write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )?;
            Ok::<_, std::io::Error>(())
        });
    }
    Ok(())
}
