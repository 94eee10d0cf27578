//! DestinationRule resilience as Envoy applies it per service (and subset): circuit breaking
//! (connection-pool thresholds; beyond them 503 with flag UO), endpoint choice by load-balancing
//! policy, and outlier detection (endpoints that keep failing are ejected for a while).
use std::{
    collections::{BTreeMap, HashMap},
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::sync::Notify;

use super::route::{
    destination::{ConnectionPool, LoadBalancer, OutlierDetection},
    model::AttemptOutcome,
};

/// The request could not even wait for a slot: 503 UO.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow;

/// Concurrent requests to one service (subset): at most `min(maxConnections, http2MaxRequests)`
/// in flight (an HTTP/1.1 request holds a connection), `http1MaxPendingRequests` more waiting.
#[derive(Default)]
pub struct Breaker {
    state: Mutex<(u32, u32)>,
    freed: Notify,
}

/// A slot in flight; dropping it lets a waiting request in.
pub struct Permit(Arc<Breaker>);

/// One place in the queue of pending requests, given back however the wait ends.
struct Waiting(Arc<Breaker>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner()).1 -= 1;
        // Another waiter may take the slot this one was woken for.
        self.0.freed.notify_one();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner()).0 -= 1;
        self.0.freed.notify_one();
    }
}

impl Breaker {
    /// A slot now, or after waiting as one of the pending requests, or [`Overflow`]. A waiter
    /// that gives up (its future dropped, e.g. by the route timeout) leaves the queue.
    pub async fn admit(self: &Arc<Self>, pool: &ConnectionPool) -> Result<Permit, Overflow> {
        let limit = pool.max_connections.min(pool.max_requests);
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if s.0 < limit {
                s.0 += 1;
                return Ok(Permit(Arc::clone(self)));
            }
            if s.1 >= pool.max_pending_requests {
                return Err(Overflow);
            }
            s.1 += 1;
        }
        let waiting = Waiting(Arc::clone(self));
        loop {
            let notified = self.freed.notified();
            {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if s.0 < limit {
                    s.0 += 1;
                    drop(s);
                    drop(waiting);
                    return Ok(Permit(Arc::clone(self)));
                }
            }
            notified.await;
        }
    }

    /// Requests in flight and waiting.
    pub fn load(&self) -> (u32, u32) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A service host and subset.
type ServiceSubset = (String, Option<String>);

/// Breakers by (service host, subset).
#[derive(Default)]
pub struct Breakers(Mutex<HashMap<ServiceSubset, Arc<Breaker>>>);

impl Breakers {
    pub fn get(&self, host: &str, subset: Option<&str>) -> Arc<Breaker> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            m.entry((host.to_owned(), subset.map(str::to_owned)))
                .or_default(),
        )
    }
}

/// One endpoint's failure record.
#[derive(Clone, Debug, Default)]
struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// Passive health of a service's endpoints (Envoy's consecutive-errors outlier detection).
#[derive(Default)]
pub struct Outliers {
    endpoints: Mutex<BTreeMap<SocketAddr, Health>>,
}

impl Outliers {
    /// Records how an attempt to `ep` ended; may eject it (never beyond
    /// `maxEjectionPercent` of `total` endpoints). Ejection time grows with each ejection.
    pub fn record(
        &self,
        ep: SocketAddr,
        outcome: AttemptOutcome,
        od: &OutlierDetection,
        total: usize,
        now: Instant,
    ) {
        let mut m = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let ejected_now = m
            .values()
            .filter(|h| h.ejected_until.is_some_and(|t| t > now))
            .count();
        let h = m.entry(ep).or_default();
        let (server_error, gateway_error) = match outcome {
            AttemptOutcome::Response { status, .. } => {
                ((500..=599).contains(&status), matches!(status, 502..=504))
            }
            // No answer counts as a gateway error (Envoy maps it to 503).
            AttemptOutcome::ConnectFailure
            | AttemptOutcome::Reset
            | AttemptOutcome::RefusedStream
            | AttemptOutcome::PerTryTimeout => (true, true),
        };
        h.consecutive_5xx = if server_error {
            h.consecutive_5xx + 1
        } else {
            0
        };
        h.consecutive_gateway = if gateway_error {
            h.consecutive_gateway + 1
        } else {
            0
        };
        let tripped = od.consecutive_5xx.is_some_and(|n| h.consecutive_5xx >= n)
            || od
                .consecutive_gateway_errors
                .is_some_and(|n| h.consecutive_gateway >= n);
        let already = h.ejected_until.is_some_and(|t| t > now);
        let room = (ejected_now + 1) * 100 <= total * od.max_ejection_percent as usize
            // Envoy always allows one ejection when the percentage rounds below one host.
            || ejected_now == 0 && od.max_ejection_percent > 0;
        if tripped && !already && room {
            h.ejections += 1;
            h.ejected_until = Some(now + od.base_ejection_time * h.ejections);
            h.consecutive_5xx = 0;
            h.consecutive_gateway = 0;
        }
    }

    pub fn is_ejected(&self, ep: SocketAddr, now: Instant) -> bool {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ep)
            .is_some_and(|h| h.ejected_until.is_some_and(|t| t > now))
    }
}

/// Endpoint choice for one service (subset).
#[derive(Default)]
pub struct Balancer {
    next: Mutex<usize>,
    active: Mutex<HashMap<SocketAddr, u32>>,
}

impl Balancer {
    /// Picks among `endpoints` those not ejected (all of them when fewer than
    /// `min_health_percent` are healthy: Envoy's panic mode). `hash`: the consistent-hash key's
    /// hash when the policy is consistent hashing; `rng` for random and least-request.
    pub fn pick(
        &self,
        endpoints: &[SocketAddr],
        lb: &LoadBalancer,
        hash: Option<u64>,
        outliers: Option<(&Outliers, u32)>,
        rng: &mut fastrand::Rng,
        now: Instant,
    ) -> Option<SocketAddr> {
        if endpoints.is_empty() {
            return None;
        }
        let healthy: Vec<SocketAddr> = match outliers {
            Some((o, _)) => endpoints
                .iter()
                .copied()
                .filter(|e| !o.is_ejected(*e, now))
                .collect(),
            None => endpoints.to_vec(),
        };
        let min_health = outliers.map_or(0, |(_, p)| p as usize);
        let pool = if healthy.is_empty() || healthy.len() * 100 < endpoints.len() * min_health {
            endpoints.to_vec()
        } else {
            healthy
        };
        Some(match lb {
            LoadBalancer::RoundRobin | LoadBalancer::Passthrough => {
                let mut n = self.next.lock().unwrap_or_else(|e| e.into_inner());
                *n = n.wrapping_add(1);
                pool[*n % pool.len()]
            }
            LoadBalancer::Random => pool[rng.usize(..pool.len())],
            LoadBalancer::ConsistentHash(_) => {
                // Rendezvous hashing: stable per key, moves only the keys of a removed endpoint.
                let key = hash.unwrap_or_else(|| rng.u64(..));
                *pool
                    .iter()
                    .max_by_key(|e| {
                        let mut h = std::collections::hash_map::DefaultHasher::new();
                        (key, e).hash(&mut h);
                        h.finish()
                    })
                    .expect("pool is not empty")
            }
            LoadBalancer::LeastRequest => {
                // Envoy's default: the less loaded of two random endpoints.
                let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
                let a = pool[rng.usize(..pool.len())];
                let b = pool[rng.usize(..pool.len())];
                let load = |e: &SocketAddr| active.get(e).copied().unwrap_or(0);
                if load(&b) < load(&a) { b } else { a }
            }
        })
    }

    /// Counts a request in flight to `ep` for least-request, until the guard drops.
    pub fn start(self: &Arc<Self>, ep: SocketAddr) -> InFlight {
        *self
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(ep)
            .or_default() += 1;
        InFlight(Arc::clone(self), ep)
    }
}

/// A request in flight to one endpoint.
pub struct InFlight(Arc<Balancer>, SocketAddr);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut a = self.0.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = a.get_mut(&self.1) {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn pool(max_connections: u32, pending: u32) -> ConnectionPool {
        ConnectionPool {
            max_connections,
            max_pending_requests: pending,
            ..ConnectionPool::default()
        }
    }

    fn od() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: Some(2),
            consecutive_gateway_errors: None,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 50,
            min_health_percent: 0,
        }
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 8080))
    }

    const FAIL: AttemptOutcome = AttemptOutcome::Response {
        status: 503,
        grpc_status: None,
    };
    const OK: AttemptOutcome = AttemptOutcome::Response {
        status: 200,
        grpc_status: None,
    };

    /// Istio's circuit-breaking task: maxConnections 1, http1MaxPendingRequests 1 — one in
    /// flight, one waiting, the third overflows (503 UO).
    #[tokio::test]
    async fn the_breaker_admits_one_queues_one_and_overflows_the_rest() {
        let b = Arc::new(Breaker::default());
        let p = pool(1, 1);
        let first = b.admit(&p).await.unwrap();
        let waiting = {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.admit(&pool(1, 1)).await.map(|_| ()) })
        };
        while b.load().1 == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(b.admit(&p).await.err(), Some(Overflow));
        drop(first);
        assert_eq!(
            waiting.await.unwrap(),
            Ok(()),
            "the pending request got the slot"
        );
        assert_eq!(b.load(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_leaves_the_queue() {
        let b = Arc::new(Breaker::default());
        let p = pool(1, 1);
        let _busy = b.admit(&p).await.unwrap();
        let gave_up = tokio::time::timeout(Duration::from_millis(10), b.admit(&p)).await;
        assert!(gave_up.is_err(), "it waited");
        assert_eq!(b.load(), (1, 0), "the queue place is free again");
        drop(_busy);
        let again = b.admit(&p).await;
        assert!(again.is_ok());
    }

    #[tokio::test]
    async fn http2_max_requests_bounds_requests_too() {
        let b = Arc::new(Breaker::default());
        let p = ConnectionPool {
            max_requests: 2,
            max_pending_requests: 1,
            ..ConnectionPool::default()
        };
        let _a = b.admit(&p).await.unwrap();
        let _b = b.admit(&p).await.unwrap();
        let _queued = {
            let (b, p) = (Arc::clone(&b), p.clone());
            tokio::spawn(async move { b.admit(&p).await.map(|_| ()) })
        };
        while b.load().1 == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(b.admit(&p).await.err(), Some(Overflow));
    }

    #[test]
    fn consecutive_errors_eject_for_a_growing_time() {
        let o = Outliers::default();
        let now = Instant::now();
        o.record(addr(1), FAIL, &od(), 4, now);
        assert!(!o.is_ejected(addr(1), now), "one error is not enough");
        o.record(addr(1), OK, &od(), 4, now);
        o.record(addr(1), FAIL, &od(), 4, now);
        assert!(!o.is_ejected(addr(1), now), "a success resets the count");
        o.record(addr(1), FAIL, &od(), 4, now);
        assert!(o.is_ejected(addr(1), now));
        assert!(o.is_ejected(addr(1), now + Duration::from_secs(29)));
        let back = now + Duration::from_secs(30);
        assert!(!o.is_ejected(addr(1), back), "back after baseEjectionTime");
        o.record(addr(1), FAIL, &od(), 4, back);
        o.record(addr(1), FAIL, &od(), 4, back);
        assert!(
            o.is_ejected(addr(1), back + Duration::from_secs(59)),
            "twice as long the second time"
        );
        assert!(!o.is_ejected(addr(1), back + Duration::from_secs(60)));
    }

    #[test]
    fn ejection_stops_at_max_ejection_percent() {
        let o = Outliers::default();
        let now = Instant::now();
        for n in 1..=4 {
            for _ in 0..2 {
                o.record(addr(n), FAIL, &od(), 4, now);
            }
        }
        let ejected = (1..=4).filter(|n| o.is_ejected(addr(*n), now)).count();
        assert_eq!(ejected, 2, "50% of 4");
    }

    #[test]
    fn connect_failures_count_as_gateway_errors() {
        let o = Outliers::default();
        let now = Instant::now();
        let gw = OutlierDetection {
            consecutive_5xx: None,
            consecutive_gateway_errors: Some(1),
            ..od()
        };
        o.record(
            addr(1),
            AttemptOutcome::Response {
                status: 500,
                grpc_status: None,
            },
            &gw,
            2,
            now,
        );
        assert!(!o.is_ejected(addr(1), now), "500 is not a gateway error");
        o.record(addr(1), AttemptOutcome::ConnectFailure, &gw, 2, now);
        assert!(o.is_ejected(addr(1), now));
    }

    #[test]
    fn balancing_skips_ejected_endpoints_unless_too_few_are_healthy() {
        let b = Balancer::default();
        let o = Outliers::default();
        let now = Instant::now();
        let eps = [addr(1), addr(2)];
        for _ in 0..2 {
            o.record(addr(1), FAIL, &od(), 2, now);
        }
        let mut rng = fastrand::Rng::with_seed(5);
        for _ in 0..20 {
            let e = b.pick(
                &eps,
                &LoadBalancer::RoundRobin,
                None,
                Some((&o, 0)),
                &mut rng,
                now,
            );
            assert_eq!(e, Some(addr(2)));
        }
        // minHealthPercent 100: one healthy of two is below it, so everything is used.
        let picks: std::collections::BTreeSet<_> = (0..20)
            .filter_map(|_| {
                b.pick(
                    &eps,
                    &LoadBalancer::RoundRobin,
                    None,
                    Some((&o, 100)),
                    &mut rng,
                    now,
                )
            })
            .collect();
        assert_eq!(picks.len(), 2, "panic mode uses every endpoint");
    }

    #[test]
    fn round_robin_cycles_and_random_spreads() {
        let b = Balancer::default();
        let eps = [addr(1), addr(2), addr(3)];
        let mut rng = fastrand::Rng::with_seed(9);
        let now = Instant::now();
        let rr: Vec<_> = (0..6)
            .map(|_| {
                b.pick(&eps, &LoadBalancer::RoundRobin, None, None, &mut rng, now)
                    .unwrap()
            })
            .collect();
        assert_eq!(&rr[..3], &rr[3..], "a cycle of three");
        assert_eq!(
            rr[..3]
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            3
        );
        let mut counts = BTreeMap::new();
        for _ in 0..3000 {
            *counts
                .entry(
                    b.pick(&eps, &LoadBalancer::Random, None, None, &mut rng, now)
                        .unwrap(),
                )
                .or_insert(0) += 1;
        }
        assert!(
            counts.values().all(|c| (900..=1100).contains(c)),
            "{counts:?}"
        );
    }

    #[test]
    fn consistent_hashing_is_stable_and_moves_only_a_removed_endpoints_keys() {
        use super::super::route::destination::HashKey;
        let b = Balancer::default();
        let lb = LoadBalancer::ConsistentHash(HashKey::SourceIp);
        let mut rng = fastrand::Rng::with_seed(1);
        let now = Instant::now();
        let all = [addr(1), addr(2), addr(3)];
        let without_3 = [addr(1), addr(2)];
        for key in 0..200u64 {
            let a = b.pick(&all, &lb, Some(key), None, &mut rng, now).unwrap();
            assert_eq!(
                b.pick(&all, &lb, Some(key), None, &mut rng, now),
                Some(a),
                "stable"
            );
            let c = b
                .pick(&without_3, &lb, Some(key), None, &mut rng, now)
                .unwrap();
            if a != addr(3) {
                assert_eq!(c, a, "key {key} moved though its endpoint stayed");
            }
        }
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let b = Arc::new(Balancer::default());
        let eps = [addr(1), addr(2)];
        let _busy: Vec<_> = (0..5).map(|_| b.start(addr(1))).collect();
        let mut rng = fastrand::Rng::with_seed(2);
        let now = Instant::now();
        let to_idle = (0..400)
            .filter(|_| {
                b.pick(&eps, &LoadBalancer::LeastRequest, None, None, &mut rng, now)
                    == Some(addr(2))
            })
            .count();
        // Two random choices: the busy one wins only when both draws pick it (1 in 4).
        assert!(to_idle > 250, "{to_idle} of 400");
    }
}
