//! Stopping a waypoint without refusing or dropping anything (issue #18), which is what a
//! Deployment rollout does to it: the new pod is ready, then the old one is sent SIGTERM while
//! the clients' node agents still list it (they learn of the change through the API a moment
//! later). So on the signal:
//! - readiness turns false (the rollout and the endpoints see it);
//! - every HBONE peer is told GOAWAY (its next streams go on new connections, to the pods its
//!   agent lists then), connections accepted afterwards at once;
//! - every inner HTTP connection closes after its current (or first) request: HTTP/1.1
//!   answers `connection: close`, HTTP/2 sends GOAWAY — the client's next request opens a new
//!   connection, which its agent sends to a waypoint that stays;
//! - the listener keeps accepting for [`DrainTimes::accept_for`], and everything open keeps
//!   being served (opaque TCP through the waypoint, long streams) until it ends;
//! - the process exits once that window is over and no connection is left, or at
//!   [`DrainTimes::limit`], or at a second signal ([`crate::drain`], as the node agent).
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Notify,
};
use tracing::{info, warn};

use crate::{
    drain::{DrainTimes, Drained, until_drained},
    hbone::server::GoawaySignal,
};

/// How often the drain looks at the connections left.
const POLL: Duration = Duration::from_millis(100);

/// The waypoint's drain state, shared by the listener, every connection and the admin port.
#[derive(Default)]
pub struct Drain {
    /// Fired at the signal: HBONE connections send GOAWAY, HTTP ones close after a request.
    pub goaway: GoawaySignal,
    /// HBONE connections open (accepted, not yet ended).
    live: AtomicUsize,
}

/// Held by each HBONE connection while it is open.
pub struct LiveConnection(Arc<Drain>);

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drain {
    /// Counts a connection open until the returned guard drops.
    pub fn enter(self: &Arc<Self>) -> LiveConnection {
        self.live.fetch_add(1, Ordering::Relaxed);
        LiveConnection(Arc::clone(self))
    }

    /// Whether the drain has begun (readiness answers 503 from then on).
    pub fn started(&self) -> bool {
        self.goaway.is_fired()
    }

    /// Resolves once the drain has begun and the connection has taken a request (`requests`
    /// is notified by each): then asking the connection to close loses nothing. Closing one
    /// that has not read its first request would drop that request; closing one idle between
    /// requests is the usual keep-alive race, which clients retry.
    pub async fn close_after_a_request(&self, requests: &Notify) {
        // Cannot fail: the sender is `self.goaway`, alive while `self` is borrowed.
        let _ = self.goaway.subscribe().wait_for(|s| *s).await;
        requests.notified().await;
    }

    /// Waits for SIGTERM or SIGINT, drains, and returns when the process should exit.
    pub async fn on_signal(&self, times: DrainTimes) -> anyhow::Result<()> {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
        self.goaway.fire();
        info!(
            connections = self.live.load(Ordering::Relaxed),
            accept_for_s = times.accept_for.as_secs_f64(),
            limit_s = times.limit.as_secs_f64(),
            "waypoint: draining (readiness false, peers told GOAWAY, still accepting)"
        );
        let open = || self.live.load(Ordering::Relaxed);
        match until_drained(open, times, POLL, [&mut sigterm, &mut sigint], || {}).await {
            Drained::Empty { after } => {
                info!(after_s = after.as_secs_f64(), "waypoint: drained, exiting");
            }
            Drained::TimeOver { open } => warn!(
                connections = open,
                "waypoint: drain time over, closing the connections still open"
            ),
            Drained::Signalled => warn!("waypoint: second signal, exiting now"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_is_asked_to_close_only_after_the_drain_began_and_a_request_came() {
        let drain = Arc::new(Drain::default());
        let requests = Notify::new();
        let close = drain.close_after_a_request(&requests);
        tokio::pin!(close);
        // A request before the drain: nothing yet.
        requests.notify_one();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), close.as_mut())
                .await
                .is_err()
        );
        // The drain begins: the request already taken counts.
        drain.goaway.fire();
        tokio::time::timeout(Duration::from_secs(1), close)
            .await
            .expect("closes once draining");

        // A connection accepted while draining waits for its first request.
        let fresh = Notify::new();
        let close = drain.close_after_a_request(&fresh);
        tokio::pin!(close);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), close.as_mut())
                .await
                .is_err()
        );
        fresh.notify_one();
        tokio::time::timeout(Duration::from_secs(1), close)
            .await
            .expect("closes after its first request");
    }

    #[test]
    fn live_connections_are_counted_until_their_guard_drops() {
        let drain = Arc::new(Drain::default());
        let (a, b) = (drain.enter(), drain.enter());
        assert_eq!(drain.live.load(Ordering::Relaxed), 2);
        drop(a);
        assert_eq!(drain.live.load(Ordering::Relaxed), 1);
        drop(b);
        assert_eq!(drain.live.load(Ordering::Relaxed), 0);
        assert!(!drain.started());
        drain.goaway.fire();
        assert!(drain.started());
    }
}
