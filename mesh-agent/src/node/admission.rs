//! Connection admission: what keeps an unauthenticated flood from taking the agent's file
//! descriptors (and with them every listener, outbound capture included).
//!
//! The accept loops ask [`AdmissionControl::admit`] before handing a connection to its handler;
//! a refused connection is reset at once (SO_LINGER 0: no descriptor held, no TIME_WAIT), so
//! the listen backlog keeps draining. Limits, in the order they are checked:
//!
//! - **HBONE handshakes per source address** (15008, [`HANDSHAKES_PER_SOURCE`]): the permit
//!   lasts until the TLS handshake ends, either way. The source of an HBONE connection is the
//!   client pod's own address (agents dial transparently) and the client agent pools its
//!   connections, so a real client has a few handshakes at a time; 64 leaves room for a burst
//!   to many destinations and stops one pod holding descriptors for 10 s timeouts by the
//!   thousand.
//! - **HBONE handshakes in all** ([`HANDSHAKES_GLOBAL`]): bounds the TLS work and the memory
//!   a distributed flood can pin (a handshake buffers up to a few tens of KiB).
//! - **Plaintext connects per source** (15006, [`CONNECTS_PER_SOURCE`]): connections still
//!   waiting for their upstream connect (a destination that drops SYNs keeps them 10 s).
//! - **The descriptor reserve**: inbound connections (15006, 15008) may together hold at most
//!   the open-files limit minus a reserve ([`Limits::from_fd_limit`]), counting two descriptors
//!   each (their socket and the upstream one); the reserve stays for the outbound listener,
//!   its upstream sockets, HBONE client connections and the agent's own files.
//!
//! Before all of them, on every listener, outbound (15001) included: **the memory cap**
//! ([`crate::memory_cap`]): above it, new connections are refused and established ones kept.
//! Otherwise outbound connections come from enrolled pods of this node and are never refused
//! here. Every refusal is counted (`mesh_connections_refused_total{listener,reason}`) and
//! logged at most once a second with the number left unlogged.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_common::FlowKind;
use tracing::{info, warn};

use super::handler::listener_name;
use crate::{log_limit::LogLimiter, memory_cap::MemoryCap, metrics::AdmissionMetrics};

/// HBONE TLS handshakes in flight from one source address.
pub const HANDSHAKES_PER_SOURCE: usize = 64;
/// HBONE TLS handshakes in flight in all.
pub const HANDSHAKES_GLOBAL: usize = 1024;
/// Plaintext inbound connections from one source address waiting for their upstream connect.
pub const CONNECTS_PER_SOURCE: usize = 64;
/// Descriptors an inbound connection is counted for: its socket and its upstream socket.
pub const FDS_PER_INBOUND: u64 = 2;
/// The smallest reserve, for small limits where a quarter is too little to serve anything.
const MIN_RESERVE: u64 = 256;

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many HBONE handshakes in flight from this source")]
    HandshakesPerSource,
    #[error("too many HBONE handshakes in flight")]
    HandshakesGlobal,
    #[error("too many connections from this source waiting for their upstream")]
    ConnectsPerSource,
    #[error("inbound connections reached their file-descriptor budget")]
    FdReserve,
    #[error("the agent's memory is above its cap (--max-memory-mib)")]
    Memory,
}

impl Refusal {
    /// The `reason` label.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::HandshakesPerSource => "handshake_per_source",
            Refusal::HandshakesGlobal => "handshake_global",
            Refusal::ConnectsPerSource => "pending_per_source",
            Refusal::FdReserve => "fd_reserve",
            Refusal::Memory => "memory",
        }
    }
}

/// The limits, derived from the open-files limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub fd_limit: u64,
    /// Descriptors inbound connections may hold together.
    pub inbound_fds: u64,
    pub handshakes: usize,
    pub handshakes_per_source: usize,
    pub connects_per_source: usize,
}

impl Limits {
    /// A quarter of the limit (at least 256, at most half) stays for everything but inbound.
    pub fn from_fd_limit(fd_limit: u64) -> Self {
        let reserve = (fd_limit / 4).max(MIN_RESERVE).min(fd_limit / 2);
        Self {
            fd_limit,
            inbound_fds: fd_limit - reserve,
            handshakes: HANDSHAKES_GLOBAL,
            handshakes_per_source: HANDSHAKES_PER_SOURCE,
            connects_per_source: CONNECTS_PER_SOURCE,
        }
    }
}

/// The open-files limit before and after [`raise_fd_limit`].
#[derive(Clone, Copy, Debug)]
pub struct FdLimit {
    pub before: u64,
    pub now: u64,
}

/// Raises RLIMIT_NOFILE's soft limit to the hard one: the default soft limit (1024 on most
/// hosts) is a few hundred proxied connections.
pub fn raise_fd_limit() -> std::io::Result<FdLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok(FdLimit {
        before,
        now: lim.rlim_cur,
    })
}

/// What a setup permit counts: an HBONE handshake or a plaintext upstream connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Handshake,
    Connect,
}

#[derive(Default)]
struct Counts {
    inbound_fds: u64,
    handshakes: usize,
    handshakes_by_source: HashMap<IpAddr, usize>,
    connects_by_source: HashMap<IpAddr, usize>,
}

/// The admission service the accept loops call.
pub struct AdmissionControl {
    limits: Limits,
    /// Above it, every listener refuses new connections (`crate::memory_cap`).
    memory: Arc<MemoryCap>,
    counts: Mutex<Counts>,
    metrics: Arc<AdmissionMetrics>,
    /// One line a second for refusals and one for accept failures (a flood is counted, not logged).
    logs: LogLimiter<&'static str>,
}

/// What an admitted connection holds. Dropping a permit gives its share back.
#[derive(Default)]
pub struct Admitted {
    /// Its share of the descriptor budget, for as long as the connection lives.
    pub connection: Option<ConnectionPermit>,
    /// Until the TLS handshake (15008) or the upstream connect (15006) ends.
    pub setup: Option<SetupPermit>,
}

pub struct ConnectionPermit {
    ctl: Arc<AdmissionControl>,
}

pub struct SetupPermit {
    ctl: Arc<AdmissionControl>,
    source: IpAddr,
    stage: Stage,
}

impl AdmissionControl {
    pub fn new(
        limits: Limits,
        metrics: Arc<AdmissionMetrics>,
        memory: Arc<MemoryCap>,
    ) -> Arc<Self> {
        metrics.fd_limit.set(gauge_value(limits.fd_limit));
        metrics
            .inbound_fd_budget
            .set(gauge_value(limits.inbound_fds));
        Arc::new(Self {
            limits,
            memory,
            counts: Mutex::default(),
            metrics,
            logs: LogLimiter::new(1, LOG_INTERVAL),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Admits a connection accepted on `kind`'s listener from `source`, or says why not (the
    /// refusal is already counted and logged; the caller resets the connection).
    pub fn admit(self: &Arc<Self>, kind: FlowKind, source: IpAddr) -> Result<Admitted, Refusal> {
        let source = source.to_canonical();
        // Refuse new, keep old: established connections are never touched here.
        if self.memory.over() {
            return Err(self.refused(kind, source, Refusal::Memory));
        }
        let stage = match kind {
            FlowKind::Outbound => return Ok(Admitted::default()),
            FlowKind::InboundHbone => Stage::Handshake,
            FlowKind::InboundPlaintext => Stage::Connect,
        };
        let result = self
            .take(stage, source)
            .map_err(|refusal| self.refused(kind, source, refusal));
        result.map(|()| Admitted {
            connection: Some(ConnectionPermit {
                ctl: Arc::clone(self),
            }),
            setup: Some(SetupPermit {
                ctl: Arc::clone(self),
                source,
                stage,
            }),
        })
    }

    /// Counts and (rate-limited) logs a refusal.
    fn refused(&self, kind: FlowKind, source: IpAddr, refusal: Refusal) -> Refusal {
        self.metrics.refused(listener_name(kind), refusal.reason());
        if let Some(unlogged) = self.logs.allow("refusal") {
            warn!(
                listener = listener_name(kind),
                %source,
                reason = refusal.reason(),
                unlogged,
                "refusing connection: {refusal}"
            );
        }
        refusal
    }

    /// Takes a setup slot and the descriptor share, all or nothing.
    fn take(&self, stage: Stage, source: IpAddr) -> Result<(), Refusal> {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let per_source = match stage {
            Stage::Handshake => {
                let n = c.handshakes_by_source.get(&source).copied().unwrap_or(0);
                if n >= self.limits.handshakes_per_source {
                    return Err(Refusal::HandshakesPerSource);
                }
                if c.handshakes >= self.limits.handshakes {
                    return Err(Refusal::HandshakesGlobal);
                }
                n
            }
            Stage::Connect => {
                let n = c.connects_by_source.get(&source).copied().unwrap_or(0);
                if n >= self.limits.connects_per_source {
                    return Err(Refusal::ConnectsPerSource);
                }
                n
            }
        };
        if c.inbound_fds + FDS_PER_INBOUND > self.limits.inbound_fds {
            return Err(Refusal::FdReserve);
        }
        c.inbound_fds += FDS_PER_INBOUND;
        match stage {
            Stage::Handshake => {
                c.handshakes += 1;
                c.handshakes_by_source.insert(source, per_source + 1);
                self.metrics
                    .handshakes
                    .set(gauge_value(c.handshakes as u64));
            }
            Stage::Connect => {
                c.connects_by_source.insert(source, per_source + 1);
            }
        }
        self.metrics.inbound_fds.set(gauge_value(c.inbound_fds));
        Ok(())
    }

    fn release_setup(&self, stage: Stage, source: IpAddr) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let by_source = match stage {
            Stage::Handshake => {
                c.handshakes = c.handshakes.saturating_sub(1);
                self.metrics
                    .handshakes
                    .set(gauge_value(c.handshakes as u64));
                &mut c.handshakes_by_source
            }
            Stage::Connect => &mut c.connects_by_source,
        };
        // Entries go when they reach zero: the map holds only sources with something in flight.
        if let Some(n) = by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                by_source.remove(&source);
            }
        }
    }

    fn release_connection(&self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.inbound_fds = c.inbound_fds.saturating_sub(FDS_PER_INBOUND);
        self.metrics.inbound_fds.set(gauge_value(c.inbound_fds));
    }

    /// An accept failed (EMFILE, ENFILE, ENOBUFS...): counted and logged at most once a second.
    /// The connection stays in the backlog and is accepted once descriptors free up.
    pub fn accept_failed(&self, kind: FlowKind, error: &std::io::Error) {
        let listener = listener_name(kind);
        self.metrics.refused(listener, "accept_error");
        if let Some(unlogged) = self.logs.allow("accept") {
            warn!(listener, error = %error, unlogged, "accept failed; backing off");
        }
    }

    /// Sources with handshakes in flight, and the total (tests, diagnostics).
    #[cfg(test)]
    fn in_flight(&self) -> (usize, usize, u64) {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        (c.handshakes, c.handshakes_by_source.len(), c.inbound_fds)
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.ctl.release_connection();
    }
}

impl Drop for SetupPermit {
    fn drop(&mut self) {
        self.ctl.release_setup(self.stage, self.source);
    }
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Lets one log line through per second; says how many were held back since the last one.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Raises the open-files limit and builds the admission service from it; logs the figures.
pub fn start(metrics: Arc<AdmissionMetrics>, memory: Arc<MemoryCap>) -> Arc<AdmissionControl> {
    let limit = match raise_fd_limit() {
        Ok(l) => {
            info!(
                before = l.before,
                now = l.now,
                "open-files limit (RLIMIT_NOFILE)"
            );
            l.now
        }
        Err(e) => {
            let now = crate::metrics::process::read().max_fds;
            warn!(error = %e, limit = now, "could not raise the open-files limit");
            now
        }
    };
    let limits = Limits::from_fd_limit(limit);
    info!(
        fd_limit = limits.fd_limit,
        inbound_fd_budget = limits.inbound_fds,
        handshakes = limits.handshakes,
        handshakes_per_source = limits.handshakes_per_source,
        connects_per_source = limits.connects_per_source,
        "connection admission limits"
    );
    AdmissionControl::new(limits, metrics, memory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::admission::RefusalLabels;

    fn control(limits: Limits) -> (Arc<AdmissionControl>, Arc<AdmissionMetrics>) {
        let metrics = Arc::new(AdmissionMetrics::default());
        (
            AdmissionControl::new(limits, Arc::clone(&metrics), MemoryCap::unlimited()),
            metrics,
        )
    }

    fn refused(m: &AdmissionMetrics, listener: &'static str, reason: &'static str) -> u64 {
        m.refused
            .get_or_create(&RefusalLabels { listener, reason })
            .get()
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn above_the_memory_cap_every_listener_refuses_new_connections_and_admitted_ones_stay() {
        let metrics = Arc::new(AdmissionMetrics::default());
        let memory = MemoryCap::new(Some(100 << 20));
        memory.set_resident(50 << 20);
        let ctl = AdmissionControl::new(
            Limits::from_fd_limit(1 << 20),
            Arc::clone(&metrics),
            Arc::clone(&memory),
        );
        let held = ctl.admit(FlowKind::InboundHbone, A).unwrap();
        assert_eq!(ctl.in_flight(), (1, 1, FDS_PER_INBOUND));
        memory.set_resident((100 << 20) + 1);
        let kinds = [
            FlowKind::Outbound,
            FlowKind::InboundPlaintext,
            FlowKind::InboundHbone,
        ];
        for kind in kinds {
            assert_eq!(ctl.admit(kind, B).err(), Some(Refusal::Memory));
            assert_eq!(refused(&metrics, listener_name(kind), "memory"), 1);
        }
        // Nothing taken by the refusals; what was admitted before is still held.
        assert_eq!(ctl.in_flight(), (1, 1, FDS_PER_INBOUND));
        drop(held);
        assert_eq!(ctl.in_flight(), (0, 0, 0));
        memory.set_resident(99 << 20);
        for kind in kinds {
            assert!(ctl.admit(kind, B).is_ok(), "{kind:?} under the cap");
        }
    }

    #[test]
    fn the_reserve_is_a_quarter_with_a_floor() {
        assert_eq!(Limits::from_fd_limit(1 << 20).inbound_fds, 786_432);
        assert_eq!(Limits::from_fd_limit(4096).inbound_fds, 3072);
        // 1024 / 4 = 256: the floor.
        assert_eq!(Limits::from_fd_limit(1024).inbound_fds, 768);
        assert_eq!(Limits::from_fd_limit(800).inbound_fds, 544);
        // Never more than half held back.
        assert_eq!(Limits::from_fd_limit(300).inbound_fds, 150);
    }

    #[test]
    fn handshakes_are_capped_per_source_and_released_on_drop() {
        let (ctl, m) = control(Limits::from_fd_limit(1 << 20));
        let held: Vec<_> = (0..HANDSHAKES_PER_SOURCE)
            .map(|_| ctl.admit(FlowKind::InboundHbone, A).unwrap())
            .collect();
        assert_eq!(
            ctl.admit(FlowKind::InboundHbone, A).err(),
            Some(Refusal::HandshakesPerSource)
        );
        // The v4-mapped form is the same source.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            ctl.admit(FlowKind::InboundHbone, mapped).err(),
            Some(Refusal::HandshakesPerSource)
        );
        // Another source is not affected.
        let other = ctl.admit(FlowKind::InboundHbone, B).unwrap();
        assert_eq!(refused(&m, "inbound_hbone", "handshake_per_source"), 2);
        assert_eq!(m.handshakes.get(), HANDSHAKES_PER_SOURCE as i64 + 1);
        drop(held);
        assert_eq!(ctl.in_flight().0, 1);
        assert!(ctl.admit(FlowKind::InboundHbone, A).is_ok());
        drop(other);
        assert_eq!(ctl.in_flight(), (0, 0, 0), "every permit given back");
        assert_eq!(m.handshakes.get(), 0);
    }

    #[test]
    fn the_handshake_permit_ends_before_the_connection() {
        let (ctl, m) = control(Limits::from_fd_limit(1 << 20));
        let Admitted { connection, setup } = ctl.admit(FlowKind::InboundHbone, A).unwrap();
        drop(setup);
        assert_eq!(ctl.in_flight(), (0, 0, FDS_PER_INBOUND));
        assert_eq!(m.inbound_fds.get(), FDS_PER_INBOUND as i64);
        drop(connection);
        assert_eq!(ctl.in_flight(), (0, 0, 0));
    }

    #[test]
    fn handshakes_are_capped_globally() {
        let limits = Limits {
            handshakes: 10,
            handshakes_per_source: 4,
            ..Limits::from_fd_limit(1 << 20)
        };
        let (ctl, m) = control(limits);
        let held: Vec<_> = (0..10u8)
            .map(|i| {
                let ip = IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, i));
                ctl.admit(FlowKind::InboundHbone, ip).unwrap()
            })
            .collect();
        assert_eq!(
            ctl.admit(FlowKind::InboundHbone, A).err(),
            Some(Refusal::HandshakesGlobal)
        );
        assert_eq!(refused(&m, "inbound_hbone", "handshake_global"), 1);
        drop(held);
        assert!(ctl.admit(FlowKind::InboundHbone, A).is_ok());
    }

    #[test]
    fn inbound_stops_at_the_reserve_and_outbound_never_does() {
        // 1024 descriptors: 768 for inbound, 384 connections of two descriptors.
        let (ctl, m) = control(Limits::from_fd_limit(1024));
        let mut live = Vec::new();
        for i in 0..384u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let kind = if i % 2 == 0 {
                FlowKind::InboundHbone
            } else {
                FlowKind::InboundPlaintext
            };
            let a = ctl.admit(kind, ip).unwrap();
            // Established: the setup part is over, the descriptors are still held.
            live.push(a.connection);
        }
        assert_eq!(
            ctl.admit(FlowKind::InboundPlaintext, B).err(),
            Some(Refusal::FdReserve)
        );
        assert_eq!(
            ctl.admit(FlowKind::InboundHbone, B).err(),
            Some(Refusal::FdReserve)
        );
        assert_eq!(refused(&m, "inbound_plaintext", "fd_reserve"), 1);
        assert_eq!(refused(&m, "inbound_hbone", "fd_reserve"), 1);
        // A refusal leaves no per-source entry behind.
        assert_eq!(ctl.in_flight(), (0, 0, 768));
        let out = ctl.admit(FlowKind::Outbound, A).unwrap();
        assert!(out.connection.is_none() && out.setup.is_none());
        live.pop();
        assert!(ctl.admit(FlowKind::InboundPlaintext, B).is_ok());
    }

    #[test]
    fn plaintext_connects_are_capped_per_source() {
        let (ctl, m) = control(Limits::from_fd_limit(1 << 20));
        let held: Vec<_> = (0..CONNECTS_PER_SOURCE)
            .map(|_| ctl.admit(FlowKind::InboundPlaintext, A).unwrap())
            .collect();
        assert_eq!(
            ctl.admit(FlowKind::InboundPlaintext, A).err(),
            Some(Refusal::ConnectsPerSource)
        );
        assert_eq!(refused(&m, "inbound_plaintext", "pending_per_source"), 1);
        // Handshakes and connects are counted apart.
        assert!(ctl.admit(FlowKind::InboundHbone, A).is_ok());
        // Connected: the setup permits go, the connections stay and the source may connect again.
        let _connections: Vec<_> = held.into_iter().map(|a| a.connection).collect();
        assert!(ctl.admit(FlowKind::InboundPlaintext, A).is_ok());
    }

    #[test]
    fn accept_errors_are_counted() {
        let (ctl, m) = control(Limits::from_fd_limit(1024));
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        ctl.accept_failed(FlowKind::Outbound, &emfile);
        ctl.accept_failed(FlowKind::Outbound, &emfile);
        assert_eq!(refused(&m, "outbound", "accept_error"), 2);
        assert_eq!(m.fd_limit.get(), 1024);
        assert_eq!(m.inbound_fd_budget.get(), 768);
    }

    #[test]
    fn raising_the_limit_reaches_the_hard_limit() {
        let l = raise_fd_limit().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct we own.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(l.now, lim.rlim_cur);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert!(l.now >= l.before);
    }
}
