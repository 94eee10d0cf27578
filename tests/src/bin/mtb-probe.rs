//! `mtb-probe`: the probe protocol (see `mesh_testbed::probe`) as a process, for tests that need
//! the client or server inside a pod's cgroup (socket-level hooks attach to cgroups).
//!
//! ```text
//! mtb-probe send <addr:port> <bytes>   connect, print the first line, send, check the summary
//! mtb-probe serve <port>               serve the probe protocol until killed
//! mtb-probe http <port> <name>         a minimal HTTP/1.1 server (for curl): answers every
//!                                      request with "<name> saw <peer>"
//! mtb-probe http-app <port> <name> [fail]  the L7 test application (see mesh_testbed::httpapp)
//! mtb-probe load-server <rr-port> <once-port>...  the benchmark servers (see mesh_testbed::load)
//! mtb-probe rr <addr:port> <secs>              1 KiB request/response latency (JSON)
//! mtb-probe connrate <addr:port> <conc> <secs> connect, 1 KiB exchange, close: conn/s (JSON)
//! mtb-probe paced <addr:port> <rps> <secs>     1 KiB exchanges at a fixed rate (JSON)
//! mtb-probe http-paced <addr:port> <host> <path> <rps> <secs>  HTTP/1.1 GETs at a fixed rate:
//!                                              rate and latency percentiles (JSON)
//! mtb-probe tls-flood <addr:port> <threads> <secs>  TLS handshakes without a client
//!                                              certificate, as fast as they go (JSON)
//! mtb-probe hold <addr:port> <count>           open <count> idle connections and hold them: prints
//!                                              {"opened","failed"}, then the sockets' TCP states
//!                                              for each line read on stdin; closes all at EOF
//! mtb-probe sink <port> <hold-secs>            one connection: read nothing for a while, then
//!                                              read to EOF (see mesh_testbed::stall)
//! mtb-probe stall-send <addr:port> <bytes>     write until blocked, say how much, write the rest
//! mtb-probe soak-client <plan-json>            the soak's long-lived and churn connections (see
//!                                              mesh_testbed::soak): its report (JSON)
//! mtb-probe soak-server <port>...              the soak's echo server
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
        ["connect-loop", dst, rate, secs] => print_json(&load::connect_loop(
            dst.parse().context("destination")?,
            rate.parse().context("rate")?,
            Duration::from_secs_f64(secs.parse().context("seconds")?),
        )),
        ["paced", dst, rps, secs] => print_json(&load::paced(
            dst.parse().context("destination")?,
            rps.parse().context("rate")?,
            Duration::from_secs_f64(secs.parse().context("seconds")?),
        )?),
        ["http-paced", dst, host, path, rps, secs] => print_json(&load::http_paced(
            dst.parse().context("destination")?,
            host,
            path,
            rps.parse().context("rate")?,
            Duration::from_secs_f64(secs.parse().context("seconds")?),
        )?),
        ["tls-flood", dst, threads, secs] => print_json(&mesh_testbed::tlsflood::flood(
            dst.parse().context("destination")?,
            threads.parse().context("threads")?,
            Duration::from_secs_f64(secs.parse().context("seconds")?),
        )?),
        ["hold", dst, count] => hold(
            dst.parse().context("destination")?,
            count.parse().context("count")?,
        ),
        ["http-app", port, name, rest @ ..] => mesh_testbed::httpapp::serve(
            port.parse().context("port")?,
            name,
            rest.first().is_some_and(|m| *m == "fail"),
        ),
        ["sink", port, hold] => print_json(&mesh_testbed::stall::sink(
            port.parse().context("port")?,
            Duration::from_secs_f64(hold.parse().context("seconds")?),
        )?),
        ["stall-send", dst, bytes] => print_json(&mesh_testbed::stall::stall_send(
            dst.parse().context("destination")?,
            bytes.parse().context("byte count")?,
        )?),
        ["soak-client", plan] => print_json(&mesh_testbed::soak::run_client(
            serde_json::from_str(plan).context("soak plan (JSON)")?,
        )?),
        ["soak-server", ports @ ..] if !ports.is_empty() => mesh_testbed::soak::serve(
            &ports
                .iter()
                .map(|p| p.parse().context("port"))
                .collect::<Result<Vec<u16>>>()?,
        ),
        ["http", port, name] => {
            let port: u16 = port.parse().context("port")?;
            http(port, name)
        }
        _ => bail!(
            "usage: mtb-probe send <addr:port> <bytes> | serve <port> | http <port> <name> | load-server <rr-port> <once-port> | rr <addr:port> <secs> | connrate <addr:port> <conc> <secs> | paced <addr:port> <rps> <secs> | connect-loop <addr:port> <rate> <secs> | hold <addr:port> <count> | sink <port> <hold-secs> | stall-send <addr:port> <bytes> | soak-client <plan-json> | soak-server <port>..."
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

/// Opens `count` connections to `dst` without sending anything (non-blocking connects: a flood
/// of idle clients) and reports their TCP states on request, until stdin ends.
fn hold(dst: SocketAddr, count: usize) -> Result<()> {
    use std::io::BufRead;
    let mut held = Vec::with_capacity(count);
    let mut failed = 0usize;
    for _ in 0..count {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(dst),
            socket2::Type::STREAM,
            None,
        )?;
        s.set_nonblocking(true)?;
        match s.connect(&dst.into()) {
            Ok(()) => held.push(s),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => held.push(s),
            Err(_) => failed += 1,
        }
    }
    print_json(&serde_json::json!({"opened": held.len(), "failed": failed}))?;
    for line in std::io::stdin().lock().lines() {
        line?;
        let mut states = std::collections::BTreeMap::<&str, usize>::new();
        for s in &held {
            *states.entry(tcp_state(s)).or_default() += 1;
        }
        print_json(&states)?;
    }
    Ok(())
}

/// The socket's TCP state (TCP_INFO), by the kernel's name; `reset` is CLOSE (what an RST leaves).
fn tcp_state(s: &socket2::Socket) -> &'static str {
    use std::os::fd::AsRawFd as _;
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: as above; the fd is open for the call.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return "unknown";
    }
    match info.tcpi_state {
        1 => "established",
        2 => "connecting",
        7 => "reset",
        8 => "close_wait",
        _ => "other",
    }
}
