//! The benchmark's load generator (run inside pods through `mtb-probe`): request/response
//! latency with an HDR histogram, connection rate, and a paced request stream for CPU cost.
//! Blocking sockets and plain threads: the client's own overhead is the same on every path.
use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Request and response size of every benchmark exchange.
pub const MESSAGE: usize = 1024;

/// Serves both load protocols until the process is killed: on `rr_port`, every 1 KiB read is
/// answered with 1 KiB (a persistent connection); on each of `once_ports`, one 1 KiB exchange,
/// then the server closes. A fixed set of threads accepts, so no thread is spawned per
/// connection.
pub fn serve(rr_port: u16, once_ports: &[u16], threads: usize) -> Result<()> {
    let rr = listen(rr_port)?;
    let mut handles = Vec::new();
    for _ in 0..threads {
        let rr = rr.try_clone()?;
        handles.push(thread::spawn(move || {
            while let Ok((s, _)) = rr.accept() {
                let _ = echo_until_eof(s);
            }
        }));
    }
    for port in once_ports {
        let once = listen(*port)?;
        for _ in 0..threads {
            let once = once.try_clone()?;
            handles.push(thread::spawn(move || {
                while let Ok((s, _)) = once.accept() {
                    let _ = exchange_once(s);
                }
            }));
        }
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn listen(port: u16) -> Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())
        .with_context(|| format!("binding port {port}"))?;
    s.listen(4096)?;
    Ok(s.into())
}

fn echo_until_eof(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = [0u8; MESSAGE];
    loop {
        // Server sockets have no timeout: every EAGAIN is spurious.
        match read_exact_patiently(&mut s, &mut buf, Duration::MAX) {
            Ok(()) => s.write_all(&buf)?,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn exchange_once(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = [0u8; MESSAGE];
    read_exact_patiently(&mut s, &mut buf, Duration::MAX)?;
    s.write_all(&buf)?;
    // The server closes first (as an HTTP/1.0 server would): its side keeps the TIME_WAIT, so
    // clients never run out of ports.
    s.shutdown(Shutdown::Write)?;
    let _ = read_patiently(&mut s, &mut buf, Duration::MAX);
    Ok(())
}

/// Client read timeout.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// One `read`, retrying the spurious EAGAIN a blocking socket in a sockmap can return after a
/// wake-up that brought no data (the agent's `--splice` mode, see docs/ARCHITECTURE.md
/// "Splicing"). With a read timeout set on the socket, EAGAIN after `patience` is the timeout.
fn read_patiently(s: &mut TcpStream, buf: &mut [u8], patience: Duration) -> io::Result<usize> {
    let started = Instant::now();
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && started.elapsed() < patience => {
                continue;
            }
            other => return other,
        }
    }
}

/// A client read (the socket has READ_TIMEOUT).
fn read_some(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    read_patiently(s, buf, READ_TIMEOUT)
}

/// `read_exact` over [`read_some`].
fn read_full(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<()> {
    read_exact_patiently(s, buf, READ_TIMEOUT)
}

/// `read_exact` over [`read_patiently`].
fn read_exact_patiently(
    s: &mut TcpStream,
    mut buf: &mut [u8],
    patience: Duration,
) -> io::Result<()> {
    while !buf.is_empty() {
        match read_patiently(s, buf, patience)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => buf = &mut buf[n..],
        }
    }
    Ok(())
}

fn connect(dst: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    Ok(s)
}

/// Latency of 1 KiB request/response exchanges on one connection.
#[derive(Debug, Serialize)]
pub struct RrResult {
    pub requests: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
}

/// Ping-pongs 1 KiB on one connection for `duration` (after a short warm-up).
pub fn request_response(dst: SocketAddr, duration: Duration) -> Result<RrResult> {
    let mut s = connect(dst).with_context(|| format!("connecting to {dst}"))?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut buf = [7u8; MESSAGE];
    for _ in 0..200 {
        s.write_all(&buf)?;
        read_full(&mut s, &mut buf)?;
    }
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let t = Instant::now();
        s.write_all(&buf)?;
        read_full(&mut s, &mut buf)?;
        hist.record(t.elapsed().as_nanos().max(1) as u64)?;
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(RrResult {
        requests: hist.len(),
        p50_us: us(hist.value_at_quantile(0.5)),
        p99_us: us(hist.value_at_quantile(0.99)),
        mean_us: hist.mean() / 1000.0,
    })
}

/// New connections completed per second.
#[derive(Debug, Serialize)]
pub struct ConnRateResult {
    pub connections: u64,
    pub errors: u64,
    pub per_second: f64,
}

/// `concurrency` threads each loop: connect, one 1 KiB exchange, close — for `duration`.
pub fn connection_rate(
    dst: SocketAddr,
    concurrency: usize,
    duration: Duration,
) -> Result<ConnRateResult> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (done, errors, stop) = (Arc::clone(&done), Arc::clone(&errors), Arc::clone(&stop));
            thread::spawn(move || {
                let mut buf = [7u8; MESSAGE];
                while !stop.load(Ordering::Relaxed) {
                    let ok = (|| -> io::Result<()> {
                        let mut s = connect(dst)?;
                        s.write_all(&buf)?;
                        read_full(&mut s, &mut buf)?;
                        // Wait for the server's close, then close.
                        let _ = read_some(&mut s, &mut buf[..1]);
                        Ok(())
                    })();
                    match ok {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let connections = done.load(Ordering::Relaxed);
    let errors = errors.load(Ordering::Relaxed);
    // A run where nothing completed is a (bad) figure, not a crash: the caller reports errors.
    Ok(ConnRateResult {
        connections,
        errors,
        per_second: connections as f64 / elapsed,
    })
}

/// What a paced connect loop saw (see [`connect_loop`]).
#[derive(Debug, Serialize)]
pub struct ConnectLoopResult {
    pub attempts: u64,
    pub completed: u64,
    /// `connect` refused (RST to the SYN: no listener took it).
    pub refused: u64,
    /// Anything else that failed: a reset or early close after connecting, a timeout.
    pub failed: u64,
    /// The first few failures, for the report.
    pub first_failures: Vec<String>,
}

/// New connections at `rate` per second for `duration`, each one 1 KiB exchange with a
/// load server's once port: the steady arrivals an agent upgrade must not refuse.
pub fn connect_loop(dst: SocketAddr, rate: u32, duration: Duration) -> ConnectLoopResult {
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let started = Instant::now();
    let mut next = started;
    let mut r = ConnectLoopResult {
        attempts: 0,
        completed: 0,
        refused: 0,
        failed: 0,
        first_failures: Vec::new(),
    };
    let mut buf = [7u8; MESSAGE];
    while started.elapsed() < duration {
        let now = Instant::now();
        if now < next {
            thread::sleep(next - now);
        }
        next += interval;
        r.attempts += 1;
        let at = started.elapsed().as_secs_f64();
        let outcome = match connect(dst) {
            Err(e) => Err((true, e)),
            Ok(mut s) => s
                .write_all(&buf)
                .and_then(|()| read_full(&mut s, &mut buf))
                .map_err(|e| (false, e)),
        };
        match outcome {
            Ok(()) => r.completed += 1,
            Err((at_connect, e)) => {
                if at_connect && e.kind() == io::ErrorKind::ConnectionRefused {
                    r.refused += 1;
                } else {
                    r.failed += 1;
                }
                if r.first_failures.len() < 5 {
                    r.first_failures.push(format!("at {at:.2} s: {e}"));
                }
            }
        }
    }
    r
}

/// A paced request stream.
#[derive(Debug, Serialize)]
pub struct PacedResult {
    pub requests: u64,
    pub achieved_rps: f64,
    pub seconds: f64,
}

/// Sends 1 KiB exchanges at `rps` on one connection for `duration` (for the CPU cost per
/// request rate: the load is the same on every path, so CPU differences are the path's).
pub fn paced(dst: SocketAddr, rps: u32, duration: Duration) -> Result<PacedResult> {
    let mut s = connect(dst).with_context(|| format!("connecting to {dst}"))?;
    let mut buf = [7u8; MESSAGE];
    let interval = Duration::from_secs_f64(1.0 / f64::from(rps.max(1)));
    let started = Instant::now();
    let mut next = started;
    let mut requests = 0u64;
    while started.elapsed() < duration {
        let now = Instant::now();
        if now < next {
            thread::sleep(next - now);
        }
        s.write_all(&buf)?;
        read_full(&mut s, &mut buf)?;
        requests += 1;
        next += interval;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(PacedResult {
        requests,
        achieved_rps: requests as f64 / seconds,
        seconds,
    })
}

/// A paced HTTP/1.1 stream with its latency.
#[derive(Debug, Serialize)]
pub struct HttpPacedResult {
    pub requests: u64,
    pub errors: u64,
    pub achieved_rps: f64,
    pub seconds: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// GET `path` (a 1 KiB answer from the L7 test application's `/bytes/1024`) at `rps` on one
/// kept-alive HTTP/1.1 connection for `duration`: the achieved rate and the latency
/// percentiles (for the waypoint's added latency and CPU per request rate).
pub fn http_paced(
    dst: SocketAddr,
    host: &str,
    path: &str,
    rps: u32,
    duration: Duration,
) -> Result<HttpPacedResult> {
    use std::io::BufRead as _;
    let s = connect(dst).with_context(|| format!("connecting to {dst}"))?;
    let mut reader = io::BufReader::new(s.try_clone()?);
    let mut writer = s;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut hist = Histogram::<u64>::new(3)?;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rps.max(1)));
    let started = Instant::now();
    let mut next = started;
    let (mut requests, mut errors) = (0u64, 0u64);
    let mut body = Vec::new();
    while started.elapsed() < duration {
        let now = Instant::now();
        if now < next {
            thread::sleep(next - now);
        }
        let sent = Instant::now();
        writer.write_all(request.as_bytes())?;
        let mut status = String::new();
        reader.read_line(&mut status)?;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                anyhow::bail!("connection closed mid-response");
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().context("content-length")?;
            }
        }
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
        hist.record(sent.elapsed().as_micros() as u64)?;
        if !status.contains(" 200 ") {
            errors += 1;
        }
        requests += 1;
        next += interval;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(HttpPacedResult {
        requests,
        errors,
        achieved_rps: requests as f64 / seconds,
        seconds,
        p50_us: hist.value_at_quantile(0.5) as f64,
        p99_us: hist.value_at_quantile(0.99) as f64,
    })
}
