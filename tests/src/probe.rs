//! The two-line probe protocol the end-to-end tests speak with servers in pods and with the
//! agent's `report` handler: on connect the answering side sends one JSON line about itself (a
//! server: `{"role":"server","peer":..,"local":..}`; the agent: what the capture learnt), then reads
//! until the client half-closes and answers `{"bytes":N,"digest":"<fnv1a64 hex>"}`. So a test
//! learns from the first line *who* answered, and from the second that the bytes arrived intact.
use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::place::Place;

/// `mtb-probe serve port` as a process in `place` — in its cgroup, where the agent's sock_ops
/// sees its sockets (a [`ProbeServer`] runs in the test's own process) — once it listens.
pub fn serve_process(place: &Place, port: u16) -> Result<crate::Background> {
    let probe = crate::binaries::mtb_probe()?;
    let mut server = place.spawn(
        probe.to_str().context("path")?,
        &["serve", &port.to_string()],
    )?;
    server.wait_listening(port, Duration::from_secs(10))?;
    Ok(server)
}

/// `mtb-probe send dst bytes` as a process in `place` (in its cgroup, see [`serve_process`]):
/// its report (`seconds`, the server's hello...). Fails unless the server saw every byte
/// intact.
pub fn send_process(place: &Place, dst: SocketAddr, bytes: u64) -> Result<Value> {
    let probe = crate::binaries::mtb_probe()?;
    let out = place.output(
        probe.to_str().context("path")?,
        &["send", &dst.to_string(), &bytes.to_string()],
    )?;
    if !out.status.success() {
        bail!(
            "mtb-probe send {dst} from {}: {}",
            place.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("mtb-probe send report")
}

/// FNV-1a 64 (the agent's report digest), streaming.
#[derive(Clone, Copy, Debug)]
pub struct Fnv(u64);

impl Fnv {
    pub fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

impl Default for Fnv {
    fn default() -> Self {
        Self::new()
    }
}

/// Byte `i` of a probe payload.
fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_mul(31).wrapping_add(i >> 13) % 251) as u8
}

/// The FNV digest of `bytes` bytes of the probe payload.
pub fn payload_digest(bytes: u64) -> String {
    let mut h = Fnv::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut off = 0;
    while off < bytes {
        let n = (bytes - off).min(buf.len() as u64) as usize;
        fill(off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.hex()
}

/// Fills `buf` with the probe payload from byte `offset` on.
pub fn fill(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(offset + i as u64);
    }
}

/// A probe server in a place: dual-stack, every port given, one thread per connection.
pub struct ProbeServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl ProbeServer {
    pub fn start(place: &Place, ports: &[u16]) -> Result<Self> {
        let listeners = place
            .in_netns(|| {
                ports
                    .iter()
                    .map(|p| listen(*p))
                    .collect::<io::Result<Vec<_>>>()
            })?
            .with_context(|| format!("probe server in {}", place.name))?;
        Ok(Self::serve_on(listeners))
    }

    /// A probe server in the calling process's own network namespace (the `mtb-probe` binary).
    pub fn start_here(ports: &[u16]) -> Result<Self> {
        let listeners = ports
            .iter()
            .map(|p| listen(*p))
            .collect::<io::Result<Vec<_>>>()
            .context("probe server")?;
        Ok(Self::serve_on(listeners))
    }

    fn serve_on(listeners: Vec<TcpListener>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = listeners
            .into_iter()
            .map(|listener| {
                let stop = Arc::clone(&stop);
                thread::spawn(move || accept_loop(listener, &stop))
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for ProbeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn listen(port: u16) -> io::Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

fn accept_loop(listener: TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                thread::spawn(move || {
                    let _ = serve(stream, peer);
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn serve(mut stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let local = stream.local_addr()?;
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let hello = serde_json::json!({"role": "server", "peer": canon(peer).to_string(), "local": canon(local).to_string()});
    stream.write_all(format!("{hello}\n").as_bytes())?;
    let mut h = Fnv::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let r = stream.read(&mut buf)?;
        if r == 0 {
            break;
        }
        h.update(&buf[..r]);
        n += r as u64;
    }
    stream.write_all(format!("{{\"bytes\":{n},\"digest\":\"{}\"}}\n", h.hex()).as_bytes())?;
    stream.shutdown(Shutdown::Write)
}

/// A client connection speaking the probe protocol.
pub struct Probe {
    reader: BufReader<TcpStream>,
    pub dst: SocketAddr,
    /// Payload bytes sent so far (by [`Probe::send`]).
    sent: u64,
}

impl Probe {
    /// Connects from `place` to `dst` (the socket lives in the place's netns).
    pub fn connect(place: &Place, dst: SocketAddr, timeout: Duration) -> Result<io::Result<Self>> {
        place.in_netns(|| Self::connect_here(dst, timeout))
    }

    /// Connects from the calling thread's network namespace (inside [`Place::in_netns`]).
    pub fn connect_here(dst: SocketAddr, timeout: Duration) -> io::Result<Self> {
        let s = TcpStream::connect_timeout(&dst, timeout)?;
        // Blocking reads with a timeout as a backstop; read_json bounds the total wait.
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Probe {
            reader: BufReader::new(s),
            dst,
            sent: 0,
        })
    }

    /// The answering side's first line.
    pub fn hello(&mut self) -> Result<Value> {
        read_json(&mut self.reader).with_context(|| format!("first line from {}", self.dst))
    }

    /// Sends the next `bytes` of the payload without closing (a long-lived connection).
    pub fn send(&mut self, bytes: u64) -> io::Result<()> {
        let stream = self.reader.get_mut();
        let mut buf = vec![0u8; bytes.min(64 << 10) as usize];
        let end = self.sent + bytes;
        while self.sent < end {
            let n = (end - self.sent).min(buf.len() as u64) as usize;
            fill(self.sent, &mut buf[..n]);
            stream.write_all(&buf[..n])?;
            self.sent += n as u64;
        }
        Ok(())
    }

    /// Whether the other side closed or reset the connection within `wait` (the probe server
    /// says nothing until the client half-closes, so anything readable means closed).
    pub fn closed_within(&mut self, wait: Duration) -> io::Result<bool> {
        let stream = self.reader.get_mut();
        stream.set_read_timeout(Some(wait))?;
        let mut b = [0u8; 1];
        let closed = match stream.read(&mut b) {
            Ok(_) => true,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            Err(_) => true,
        };
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(closed)
    }

    /// Sends the payload up to `bytes` in total (including what [`Probe::send`] sent),
    /// half-closes, and returns the answering side's summary after checking it received
    /// exactly those bytes.
    pub fn finish(mut self, bytes: u64) -> Result<()> {
        let stream = self.reader.get_mut();
        let mut buf = vec![0u8; 64 << 10];
        let mut off = self.sent;
        while off < bytes {
            let n = (bytes - off).min(buf.len() as u64) as usize;
            fill(off, &mut buf[..n]);
            stream.write_all(&buf[..n])?;
            off += n as u64;
        }
        stream.shutdown(Shutdown::Write)?;
        let summary =
            read_json(&mut self.reader).with_context(|| format!("summary from {}", self.dst))?;
        let want = payload_digest(bytes);
        if summary["bytes"] != bytes || summary["digest"] != want.as_str() {
            bail!(
                "{}: sent {bytes} bytes (digest {want}), the other side got {summary}",
                self.dst
            );
        }
        Ok(())
    }

    /// Like [`Probe::finish`], with the payload made of `marker` repeated (so a sniffer can look
    /// for it) to about `bytes`.
    pub fn finish_with_marker(mut self, marker: &str, bytes: usize) -> Result<()> {
        let mut payload = Vec::with_capacity(bytes + marker.len());
        while payload.len() < bytes {
            payload.extend_from_slice(marker.as_bytes());
            payload.push(b' ');
        }
        let stream = self.reader.get_mut();
        stream.write_all(&payload)?;
        stream.shutdown(Shutdown::Write)?;
        let summary =
            read_json(&mut self.reader).with_context(|| format!("summary from {}", self.dst))?;
        let mut h = Fnv::new();
        h.update(&payload);
        if summary["bytes"] != payload.len() as u64 || summary["digest"] != h.hex().as_str() {
            bail!(
                "{}: sent {} marked bytes, the other side got {summary}",
                self.dst,
                payload.len()
            );
        }
        Ok(())
    }

    /// The local address of the client socket.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.reader.get_ref().local_addr()
    }
}

/// Reads one JSON line. A blocking socket in a sockmap (a spliced pod socket) can return EAGAIN
/// from `recv` after a wakeup that brought no data (the kernel's `tcp_bpf_recvmsg` does that, see
/// docs/ARCHITECTURE.md "Splicing"); like any robust client we retry until our own deadline.
fn read_json(reader: &mut BufReader<TcpStream>) -> Result<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut line = String::new();
    loop {
        match reader.read_line(&mut line) {
            Ok(0) if line.is_empty() => bail!("connection closed before a line arrived"),
            Ok(_) => break,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) && std::time::Instant::now() < deadline =>
            {
                continue;
            }
            Err(e) => return Err(e.into()),
        }
    }
    serde_json::from_str(line.trim()).with_context(|| format!("not JSON: {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_and_payload_digest_are_stable() {
        let mut h = Fnv::new();
        h.update(b"foobar");
        assert_eq!(h.hex(), "85944171f73967e8");
        assert_eq!(payload_digest(0), "cbf29ce484222325");
        assert_ne!(payload_digest(100_000), payload_digest(100_001));
    }
}
