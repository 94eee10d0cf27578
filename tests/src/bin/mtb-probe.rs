//! `mtb-probe`: the probe protocol (see `mesh_testbed::probe`) as a process, for tests that need
//! the client or server inside a pod's cgroup (socket-level hooks attach to cgroups).
//!
//! ```text
//! mtb-probe send <addr:port> <bytes>   connect, print the first line, send, check the summary
//! mtb-probe serve <port>               serve the probe protocol until killed
//! mtb-probe http <port> <name>         a minimal HTTP/1.1 server (for curl): answers every
//!                                      request with "<name> saw <peer>"
//! mtb-probe load-server <rr-port> <once-port>...  the benchmark servers (see mesh_testbed::load)
//! mtb-probe rr <addr:port> <secs>              1 KiB request/response latency (JSON)
//! mtb-probe connrate <addr:port> <conc> <secs> connect, 1 KiB exchange, close: conn/s (JSON)
//! mtb-probe paced <addr:port> <rps> <secs>     1 KiB exchanges at a fixed rate (JSON)
//! ```
use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, bail};
use mesh_testbed::{
    load,
    probe::{Probe, ProbeServer},
};

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

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
        ["load-server", rr, once @ ..] if !once.is_empty() => load::serve(
            rr.parse().context("port")?,
            &once
                .iter()
                .map(|p| p.parse().context("port"))
                .collect::<Result<Vec<u16>>>()?,
            16,
        ),
        ["rr", dst, secs] => print_json(&load::request_response(
            dst.parse().context("destination")?,
            Duration::from_secs_f64(secs.parse().context("seconds")?),
        )?),
        ["connrate", dst, conc, secs] => print_json(&load::connection_rate(
            dst.parse().context("destination")?,
            conc.parse().context("concurrency")?,
            Duration::from_secs_f64(secs.parse().context("seconds")?),
        )?),
        ["paced", dst, rps, secs] => print_json(&load::paced(
            dst.parse().context("destination")?,
            rps.parse().context("rate")?,
            Duration::from_secs_f64(secs.parse().context("seconds")?),
        )?),
        ["http", port, name] => {
            let port: u16 = port.parse().context("port")?;
            http(port, name)
        }
        _ => bail!(
            "usage: mtb-probe send <addr:port> <bytes> | serve <port> | http <port> <name> | load-server <rr-port> <once-port> | rr <addr:port> <secs> | connrate <addr:port> <conc> <secs> | paced <addr:port> <rps> <secs>"
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
