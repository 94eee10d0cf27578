//! The load of `cargo xtask soak`: many long-lived connections that keep exchanging checked
//! chunks, plus a steady churn of short ones, run by `mtb-probe soak-client` in client pods
//! against `mtb-probe soak-server` (an echo server) in server pods.
//!
//! Every connection ends in one [`Outcome`]. The client counts the completed ones and keeps a
//! record of every other one (when, where to, what happened), so the soak can hold each against
//! the faults it injected ([`verdict`]): a reset while an agent on the path was killed is the
//! documented failure model; a truncated or corrupted stream is never acceptable.
//!
//! Each chunk starts with [`MARKER`], so a capture on the fabric can prove none crossed it in
//! plaintext.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    time::timeout,
};

pub mod verdict;

/// The first bytes of every chunk a soak client sends.
pub const MARKER: &[u8; 16] = b"MESH-SOAK-PLAIN:";

/// How many records of connections that did not complete a client keeps (beyond that they are
/// only counted), so a broken run cannot exhaust the client's memory.
pub const MAX_RECORDS: usize = 200_000;

/// What a soak client does (`mtb-probe soak-client '<json>'`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientPlan {
    /// Servers to pick from (uniformly, per connection).
    pub targets: Vec<SocketAddr>,
    /// Long-lived connections held open at once: each slot opens the next when one ends.
    pub connections: usize,
    /// A long connection's lifetime, drawn uniformly from [min, max] milliseconds.
    pub lifetime_ms: (u64, u64),
    /// Pause between a long connection's exchanges, drawn uniformly from [min, max] ms.
    pub interval_ms: (u64, u64),
    /// Bytes per exchange (at least the marker's 16).
    pub chunk: usize,
    /// Short connections a second (connect, one exchange, close).
    pub churn_per_sec: u32,
    /// How long the client opens connections; every connection ends by then.
    pub duration_ms: u64,
    /// The slots start spread over this long, so the agents are not flooded at once.
    pub ramp_ms: u64,
    /// A read or write that makes no progress for this long counts as a stall.
    pub stall_ms: u64,
    /// Seed of the lifetimes, pauses and targets (connections' ids are unique per client).
    pub seed: u64,
}

/// How one connection ended.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every byte sent came back, then a clean close.
    Completed,
    /// The connection was refused (RST to the SYN).
    Refused,
    /// No answer to the SYN in time.
    ConnectTimeout,
    /// Any other error while connecting.
    ConnectFailed,
    /// Reset (or aborted) after it was established.
    Reset,
    /// A clean end of stream before every byte came back: silent data loss.
    Truncated,
    /// A byte came back different from what was sent, or more came than was sent.
    Corrupted,
    /// No progress for [`ClientPlan::stall_ms`].
    Stalled,
    /// Any other I/O error.
    Failed,
}

impl Outcome {
    /// Loses or alters data without an error: never explained by a fault.
    pub fn is_silent_loss(self) -> bool {
        matches!(self, Outcome::Truncated | Outcome::Corrupted)
    }
}

/// Long-lived or churn.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Long,
    Churn,
}

/// A connection that did not complete.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ended {
    pub kind: Kind,
    pub target: SocketAddr,
    /// Wall clock (ms since the Unix epoch), so it compares with the soak's fault times.
    pub started_ms: u64,
    pub ended_ms: u64,
    pub outcome: Outcome,
    /// Bytes that came back intact before the end.
    pub bytes: u64,
    pub detail: String,
}

/// What a soak client reports at the end (one JSON line on stdout).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientReport {
    pub completed_long: u64,
    pub completed_churn: u64,
    /// Bytes echoed intact over every connection (completed or not), one way.
    pub bytes: u64,
    /// The most long-lived connections established at once.
    pub peak_open: u64,
    /// Established long-lived connections every 5 s from the start.
    pub open_curve: Vec<u64>,
    /// Connections that did not complete, up to [`MAX_RECORDS`].
    pub not_completed: Vec<Ended>,
    /// Connections that did not complete beyond [`MAX_RECORDS`] (counted only).
    pub unrecorded: u64,
}

/// Wall clock in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// splitmix64: enough randomness for lifetimes and payloads, reproducible from a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi] (hi included; lo when hi < lo).
    pub fn between(&mut self, (lo, hi): (u64, u64)) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// Chunk `seq` of connection `id`: the marker, the id and sequence number, then bytes derived
/// from both, so a chunk delivered to the wrong connection or out of order is caught.
pub fn chunk(id: u64, seq: u64, buf: &mut [u8]) {
    let mut rng = Rng::new(id.rotate_left(32) ^ seq);
    let head = MARKER.len().min(buf.len());
    buf[..head].copy_from_slice(&MARKER[..head]);
    for (i, b) in buf.iter_mut().enumerate().skip(head) {
        *b = match i - head {
            n @ 0..8 => id.to_be_bytes()[n],
            n @ 8..16 => seq.to_be_bytes()[n - 8],
            _ => rng.next_u64() as u8,
        };
    }
}

/// Raises RLIMIT_NOFILE's soft limit to the hard one: a client holds thousands of sockets.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Runs the plan to its end and reports.
pub fn run_client(plan: ClientPlan) -> Result<ClientReport> {
    anyhow::ensure!(!plan.targets.is_empty(), "a soak client needs targets");
    anyhow::ensure!(
        plan.chunk >= MARKER.len(),
        "chunks carry the {}-byte marker",
        MARKER.len()
    );
    raise_fd_limit();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the client's runtime")?
        .block_on(client(Arc::new(plan)))
}

/// Shared counters of one client.
#[derive(Default)]
struct Tally {
    completed_long: AtomicU64,
    completed_churn: AtomicU64,
    bytes: AtomicU64,
    open: AtomicU64,
    peak_open: AtomicU64,
    unrecorded: AtomicU64,
    records: Mutex<Vec<Ended>>,
}

impl Tally {
    fn record(&self, e: Ended) {
        self.bytes.fetch_add(e.bytes, Ordering::Relaxed);
        match (e.outcome, e.kind) {
            (Outcome::Completed, Kind::Long) => {
                self.completed_long.fetch_add(1, Ordering::Relaxed);
            }
            (Outcome::Completed, Kind::Churn) => {
                self.completed_churn.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                let mut r = self.records.lock().unwrap_or_else(|e| e.into_inner());
                if r.len() < MAX_RECORDS {
                    r.push(e);
                } else {
                    self.unrecorded.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

async fn client(plan: Arc<ClientPlan>) -> Result<ClientReport> {
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let deadline = start + Duration::from_millis(plan.duration_ms);
    let mut tasks = Vec::new();
    for slot in 0..plan.connections {
        let (plan, tally) = (plan.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let delay = plan.ramp_ms * slot as u64 / plan.connections.max(1) as u64;
            tokio::time::sleep(Duration::from_millis(delay)).await;
            long_slot(slot as u64, &plan, &tally, deadline).await;
        }));
    }
    if plan.churn_per_sec > 0 {
        let (plan, tally) = (plan.clone(), tally.clone());
        tasks.push(tokio::spawn(
            async move { churn(&plan, tally, deadline).await },
        ));
    }
    let curve = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (tally, curve) = (tally.clone(), curve.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let open = tally.open.load(Ordering::Relaxed);
                curve.lock().unwrap_or_else(|e| e.into_inner()).push(open);
            }
        })
    };
    for t in tasks {
        t.await.context("a soak task panicked")?;
    }
    sampler.abort();
    let open_curve = std::mem::take(&mut *curve.lock().unwrap_or_else(|e| e.into_inner()));
    let records = std::mem::take(&mut *tally.records.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(ClientReport {
        completed_long: tally.completed_long.load(Ordering::Relaxed),
        completed_churn: tally.completed_churn.load(Ordering::Relaxed),
        bytes: tally.bytes.load(Ordering::Relaxed),
        peak_open: tally.peak_open.load(Ordering::Relaxed),
        open_curve,
        not_completed: records,
        unrecorded: tally.unrecorded.load(Ordering::Relaxed),
    })
}

/// One slot: long connections back to back until the deadline; after a failure it waits a
/// second, as a client's reconnect backoff would.
async fn long_slot(slot: u64, plan: &ClientPlan, tally: &Tally, deadline: Instant) {
    let mut rng = Rng::new(plan.seed ^ slot.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut n = 0u64;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let lifetime = Duration::from_millis(rng.between(plan.lifetime_ms)).min(left);
        if lifetime < Duration::from_millis(plan.lifetime_ms.0.min(1000)) {
            return;
        }
        let target = plan.targets[(rng.next_u64() % plan.targets.len() as u64) as usize];
        let id = (slot << 24) | n;
        n += 1;
        let ended = one(plan, tally, Kind::Long, id, target, lifetime, &mut rng).await;
        let failed = ended.outcome != Outcome::Completed;
        tally.record(ended);
        if failed {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Short connections at `churn_per_sec` until the deadline (ids above every slot's).
async fn churn(plan: &ClientPlan, tally: Arc<Tally>, deadline: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / plan.churn_per_sec.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rng = Rng::new(plan.seed ^ 0xc4u64);
    let mut running = tokio::task::JoinSet::new();
    let mut n = 0u64;
    while Instant::now() < deadline {
        tick.tick().await;
        let target = plan.targets[(rng.next_u64() % plan.targets.len() as u64) as usize];
        let id = (1u64 << 60) | n;
        n += 1;
        let (plan, tally) = (plan.clone(), tally.clone());
        let mut rng = Rng::new(rng.next_u64());
        running.spawn(async move {
            let e = one(
                &plan,
                &tally,
                Kind::Churn,
                id,
                target,
                Duration::ZERO,
                &mut rng,
            )
            .await;
            tally.record(e);
        });
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}

/// Counts a long connection as open while it lives.
struct OpenGuard<'a>(&'a Tally);

impl<'a> OpenGuard<'a> {
    fn new(t: &'a Tally) -> Self {
        let now = t.open.fetch_add(1, Ordering::Relaxed) + 1;
        t.peak_open.fetch_max(now, Ordering::Relaxed);
        OpenGuard(t)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One connection: exchanges chunks (each echoed back and compared) until `lifetime` has
/// passed (at least one), then half-closes and expects a clean end of stream.
async fn one(
    plan: &ClientPlan,
    tally: &Tally,
    kind: Kind,
    id: u64,
    target: SocketAddr,
    lifetime: Duration,
    rng: &mut Rng,
) -> Ended {
    let started_ms = now_ms();
    let mut bytes = 0u64;
    let end = |outcome, bytes, detail: String| Ended {
        kind,
        target,
        started_ms,
        ended_ms: now_ms(),
        outcome,
        bytes,
        detail,
    };
    let mut stream = match timeout(Duration::from_secs(5), TcpStream::connect(target)).await {
        Err(_) => return end(Outcome::ConnectTimeout, 0, "no answer in 5 s".into()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return end(Outcome::Refused, 0, e.to_string());
        }
        Ok(Err(e)) => return end(Outcome::ConnectFailed, 0, e.to_string()),
        Ok(Ok(s)) => s,
    };
    let _open = (kind == Kind::Long).then(|| OpenGuard::new(tally));
    let stall = Duration::from_millis(plan.stall_ms);
    let born = Instant::now();
    let mut sent = vec![0u8; plan.chunk];
    let mut back = vec![0u8; plan.chunk];
    for seq in 0.. {
        chunk(id, seq, &mut sent);
        match timeout(stall, stream.write_all(&sent)).await {
            Err(_) => return end(Outcome::Stalled, bytes, format!("write of chunk {seq}")),
            Ok(Err(e)) => return end(io_outcome(&e), bytes, format!("write: {e}")),
            Ok(Ok(())) => {}
        }
        match timeout(stall, stream.read_exact(&mut back)).await {
            Err(_) => return end(Outcome::Stalled, bytes, format!("echo of chunk {seq}")),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return end(
                    Outcome::Truncated,
                    bytes,
                    format!("end of stream in chunk {seq}"),
                );
            }
            Ok(Err(e)) => return end(io_outcome(&e), bytes, format!("read: {e}")),
            Ok(Ok(_)) => {}
        }
        if back != sent {
            return end(
                Outcome::Corrupted,
                bytes,
                format!("chunk {seq} came back altered"),
            );
        }
        bytes += plan.chunk as u64;
        let left = lifetime.saturating_sub(born.elapsed());
        if left.is_zero() {
            break;
        }
        let pause = Duration::from_millis(rng.between(plan.interval_ms)).min(left);
        tokio::time::sleep(pause).await;
    }
    if let Err(e) = stream.shutdown().await {
        return end(io_outcome(&e), bytes, format!("half-close: {e}"));
    }
    let mut extra = [0u8; 64];
    match timeout(stall, stream.read(&mut extra)).await {
        Err(_) => end(
            Outcome::Stalled,
            bytes,
            "no end of stream after half-close".into(),
        ),
        Ok(Ok(0)) => end(Outcome::Completed, bytes, String::new()),
        Ok(Ok(n)) => end(
            Outcome::Corrupted,
            bytes,
            format!("{n} bytes more than sent"),
        ),
        Ok(Err(e)) => end(io_outcome(&e), bytes, format!("final read: {e}")),
    }
}

fn io_outcome(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe => Outcome::Reset,
        TimedOut => Outcome::Stalled,
        _ => Outcome::Failed,
    }
}

/// The soak's server: echoes every connection on every port until killed (dual-stack).
pub fn serve(ports: &[u16]) -> Result<()> {
    raise_fd_limit();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the server's runtime")?
        .block_on(async {
            let mut accepts = tokio::task::JoinSet::new();
            for &port in ports {
                let listener =
                    dual_stack_listener(port).with_context(|| format!("listening on {port}"))?;
                accepts.spawn(accept_loop(listener));
            }
            while accepts.join_next().await.is_some() {}
            Ok(())
        })
}

fn dual_stack_listener(port: u16) -> Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(TcpListener::from_std(s.into())?)
}

async fn accept_loop(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(echo(stream));
            }
            // Out of descriptors: let some connections end.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn echo(stream: TcpStream) {
    let (mut r, mut w) = stream.into_split();
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        let _ = w.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_carry_the_marker_and_differ_by_connection_and_sequence() {
        let (mut a, mut b, mut c) = (vec![0u8; 64], vec![0u8; 64], vec![0u8; 64]);
        chunk(1, 0, &mut a);
        chunk(2, 0, &mut b);
        chunk(1, 1, &mut c);
        assert!(a.starts_with(MARKER) && b.starts_with(MARKER) && c.starts_with(MARKER));
        assert_ne!(a, b);
        assert_ne!(a, c);
        let mut again = vec![0u8; 64];
        chunk(1, 0, &mut again);
        assert_eq!(a, again);
    }

    #[test]
    fn rng_stays_in_range() {
        let mut r = Rng::new(7);
        for _ in 0..1000 {
            let v = r.between((10, 20));
            assert!((10..=20).contains(&v));
        }
        assert_eq!(r.between((5, 5)), 5);
        assert_eq!(r.between((9, 3)), 9);
    }

    /// A loopback run: every connection completes and echoes intact; a stopped server turns
    /// into refusals the report records.
    #[test]
    fn a_client_against_a_loopback_echo_server_completes_everything() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        std::thread::spawn(move || serve(&[port]));
        std::thread::sleep(Duration::from_millis(200));
        let plan = ClientPlan {
            targets: vec![SocketAddr::from(([127, 0, 0, 1], port))],
            connections: 20,
            lifetime_ms: (300, 600),
            interval_ms: (20, 80),
            chunk: 512,
            churn_per_sec: 50,
            duration_ms: 1500,
            ramp_ms: 100,
            stall_ms: 5000,
            seed: 1,
        };
        let r = run_client(plan.clone()).unwrap();
        assert!(r.completed_long >= 20, "{r:?}");
        assert!(r.completed_churn >= 30, "{r:?}");
        assert!(r.not_completed.is_empty(), "{r:?}");
        assert!(r.peak_open >= 10 && r.peak_open <= 20, "{r:?}");
        assert!(r.bytes >= 512 * 50, "{r:?}");

        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let r = run_client(ClientPlan {
            targets: vec![closed],
            connections: 2,
            churn_per_sec: 0,
            duration_ms: 1200,
            ..plan
        })
        .unwrap();
        assert_eq!(r.completed_long, 0, "{r:?}");
        assert!(!r.not_completed.is_empty(), "{r:?}");
        assert!(
            r.not_completed
                .iter()
                .all(|e| e.outcome == Outcome::Refused),
            "{r:?}"
        );
    }
}
