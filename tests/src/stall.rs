//! A writer facing a reader that stops: what a bounded data path must do is block the writer
//! after a bounded number of bytes, and deliver everything intact once the reader resumes.
//!
//! - [`sink`]: accepts one connection, reads nothing for a while, then reads to EOF and reports
//!   the byte count and whether the bytes are the probe payload.
//! - [`stall_send`]: writes the probe payload without blocking until no byte goes out for a
//!   second, reports how much went out (`stalled_at`, one JSON line, flushed), then writes the
//!   rest blocking and closes.
use std::{
    io::{self, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use crate::probe::{Fnv, fill, payload_digest};

/// How long without progress counts as "the writer is blocked".
const STALL: Duration = Duration::from_secs(1);

/// Serves one connection on `port`: `hold` without reading, then reads to EOF.
pub fn sink(port: u16, hold: Duration) -> Result<Value> {
    let listener = TcpListener::bind(("::", port)).context("binding")?;
    let (mut conn, peer) = listener.accept().context("accepting")?;
    std::thread::sleep(hold);
    let mut digest = Fnv::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut bytes = 0u64;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                digest.update(&buf[..n]);
                bytes += n as u64;
            }
            // A blocking socket in a sockmap can wake with nothing to read (see probe.rs).
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => return Err(e).context("reading"),
        }
    }
    Ok(json!({
        "peer": peer.to_string(),
        "bytes": bytes,
        "intact": digest.hex() == payload_digest(bytes),
    }))
}

/// Sends `total` bytes of the probe payload to `dst`, printing `{"stalled_at": N}` once the
/// writer has been blocked for [`STALL`]; returns the final summary.
pub fn stall_send(dst: SocketAddr, total: u64) -> Result<Value> {
    let mut conn = TcpStream::connect_timeout(&dst, Duration::from_secs(10))
        .with_context(|| format!("connecting to {dst}"))?;
    conn.set_nonblocking(true)?;
    let mut buf = vec![0u8; 64 << 10];
    let mut sent = 0u64;
    let mut stalled_at = None;
    let mut last_progress = Instant::now();
    while sent < total {
        let n = (total - sent).min(buf.len() as u64) as usize;
        fill(sent, &mut buf[..n]);
        let mut off = 0;
        while off < n {
            match conn.write(&buf[off..n]) {
                Ok(w) => {
                    off += w;
                    last_progress = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if stalled_at.is_none() && last_progress.elapsed() >= STALL {
                        stalled_at = Some(sent + off as u64);
                        println!("{}", json!({"stalled_at": sent + off as u64}));
                        io::stdout().flush()?;
                    }
                    wait_writable(&conn, Duration::from_millis(50));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("writing at byte {}", sent + off as u64));
                }
            }
        }
        sent += n as u64;
    }
    conn.set_nonblocking(false)?;
    conn.shutdown(Shutdown::Write)?;
    // Wait for the sink to close: every byte was read.
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    Ok(json!({"sent": sent, "stalled_at": stalled_at}))
}

fn wait_writable(conn: &TcpStream, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: conn.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
}
