//! Rate limits for log lines about things a peer or a pod can make happen at will (refusals,
//! policy decisions): a few lines per kind and window, and the next line that gets through says
//! how many were held back, so a flood costs a counter increment rather than a log line each.
//! Every event is still counted by its metric; only the lines are limited.
use std::{
    collections::HashMap,
    hash::Hash,
    sync::Mutex,
    time::{Duration, Instant},
};

struct Window {
    start: Instant,
    logged: u32,
    held_back: u64,
}

/// At most `burst` lines per key and `window`. Keys are a bounded set (reasons, policy names
/// from the config), never addresses or identities a peer chooses.
pub struct LogLimiter<K> {
    burst: u32,
    window: Duration,
    windows: Mutex<HashMap<K, Window>>,
}

impl<K: Hash + Eq> LogLimiter<K> {
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// `burst` lines per key and second.
    pub fn per_second(burst: u32) -> Self {
        Self::new(burst, Duration::from_secs(1))
    }

    /// `Some(n)`: log this one now, `n` lines of the same key were held back since the last.
    pub fn allow(&self, key: K) -> Option<u64> {
        self.allow_at(key, Instant::now())
    }

    /// [`LogLimiter::allow`] at a given time (tests step the clock).
    pub fn allow_at(&self, key: K, now: Instant) -> Option<u64> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let w = windows.entry(key).or_insert(Window {
            start: now,
            logged: 0,
            held_back: 0,
        });
        if now.saturating_duration_since(w.start) >= self.window {
            w.start = now;
            w.logged = 0;
        }
        if w.logged >= self.burst {
            w.held_back += 1;
            return None;
        }
        w.logged += 1;
        Some(std::mem::take(&mut w.held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_key_and_window_then_the_held_back_count() {
        let l = LogLimiter::per_second(10);
        let t0 = Instant::now();
        let logged = (0..100).filter(|_| l.allow_at("a", t0).is_some()).count();
        assert_eq!(logged, 10);
        assert_eq!(
            l.allow_at("b", t0),
            Some(0),
            "another key has its own budget"
        );
        let almost = t0 + Duration::from_millis(999);
        assert_eq!(l.allow_at("a", almost), None, "still the same window");
        assert_eq!(
            l.allow_at("a", t0 + Duration::from_secs(1)),
            Some(91),
            "the next window's first line reports the held-back ones"
        );
        assert_eq!(l.allow_at("a", t0 + Duration::from_secs(1)), Some(0));
    }
}
