//! Waiting out a drain, shared by the node agent and the waypoint: once told to stop, a process
//! keeps serving until nothing is open (and a minimum time has passed), until a limit, or until
//! a second signal asks it to go at once.
use std::time::Duration;

use tokio::{signal::unix::Signal, time::Instant};

/// How long a draining process stays.
#[derive(Clone, Copy, Debug)]
pub struct DrainTimes {
    /// Stay at least this long, however few connections are open (a waypoint keeps accepting
    /// while its clients learn it is going).
    pub accept_for: Duration,
    /// Leave at the latest this long after the drain began, closing what is still open.
    pub limit: Duration,
}

/// How a drain ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// Nothing left open, `after` the drain began.
    Empty { after: Duration },
    /// The limit passed with `open` connections left.
    TimeOver { open: usize },
    /// A second SIGTERM or SIGINT.
    Signalled,
}

/// Looks at `open` (the connections still open) every `poll`, calling `tick` after each wait,
/// until the drain ends one of the [`Drained`] ways.
pub async fn until_drained(
    open: impl Fn() -> usize,
    times: DrainTimes,
    poll: Duration,
    [sigterm, sigint]: [&mut Signal; 2],
    mut tick: impl FnMut(),
) -> Drained {
    let started = Instant::now();
    loop {
        let (open, elapsed) = (open(), started.elapsed());
        if open == 0 && elapsed >= times.accept_for {
            return Drained::Empty { after: elapsed };
        }
        if elapsed >= times.limit {
            return Drained::TimeOver { open };
        }
        tokio::select! {
            () = tokio::time::sleep(poll) => tick(),
            _ = sigterm.recv() => return Drained::Signalled,
            _ = sigint.recv() => return Drained::Signalled,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        cell::Cell,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use tokio::signal::unix::{SignalKind, signal};

    use super::*;

    const POLL: Duration = Duration::from_millis(100);

    #[tokio::test(start_paused = true)]
    async fn a_drain_ends_when_nothing_is_open_but_not_before_its_minimum_or_at_its_limit() {
        let (mut term, mut int) = (
            signal(SignalKind::terminate()).unwrap(),
            signal(SignalKind::interrupt()).unwrap(),
        );
        let times = |accept_for, limit| DrainTimes {
            accept_for: Duration::from_secs(accept_for),
            limit: Duration::from_secs(limit),
        };
        // Nothing open and no minimum: at once, without waiting.
        let ticks = Cell::new(0);
        let d = until_drained(
            || 0,
            times(0, 60),
            POLL,
            [&mut term, &mut int],
            || {
                ticks.set(ticks.get() + 1);
            },
        )
        .await;
        assert_eq!(
            (d, ticks.get()),
            (
                Drained::Empty {
                    after: Duration::ZERO
                },
                0
            )
        );
        // Nothing open, but a minimum: it stays that long.
        let d = until_drained(|| 0, times(2, 60), POLL, [&mut term, &mut int], || {}).await;
        assert!(
            matches!(d, Drained::Empty { after } if after >= Duration::from_secs(2)),
            "{d:?}"
        );
        // A connection that ends on the third look.
        let open = AtomicUsize::new(1);
        let looks = Cell::new(0);
        let d = until_drained(
            || open.load(Ordering::Relaxed),
            times(0, 60),
            POLL,
            [&mut term, &mut int],
            || {
                looks.set(looks.get() + 1);
                if looks.get() == 2 {
                    open.store(0, Ordering::Relaxed);
                }
            },
        )
        .await;
        assert_eq!(d, Drained::Empty { after: 2 * POLL });
        // One that never ends: the limit.
        let d = until_drained(|| 3, times(0, 5), POLL, [&mut term, &mut int], || {}).await;
        assert_eq!(d, Drained::TimeOver { open: 3 });
    }
}
