//! What `/healthz/ready` answers: ready only when the configuration is loaded, the capture is in
//! place, and every local enrolled workload's certificate is held (in mesh mode).
use std::sync::Mutex;

/// The three conditions, each with why it is not met.
#[derive(Default)]
pub struct Readiness {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    config: Option<String>,
    capture: Option<String>,
    certificates: Option<String>,
    initialised: [bool; 3],
    draining: bool,
}

impl Readiness {
    /// Nothing is ready yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn update(&self, slot: usize, problem: Option<String>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.initialised[slot] = true;
        match slot {
            0 => s.config = problem,
            1 => s.capture = problem,
            _ => s.certificates = problem,
        }
    }

    /// `None`: a configuration is loaded; `Some(why)`: none is.
    pub fn config(&self, problem: Option<String>) {
        self.update(0, problem);
    }

    /// `None`: the last reconciliation applied everything and the listeners are up.
    pub fn capture(&self, problem: Option<String>) {
        self.update(1, problem);
    }

    /// `None`: every local enrolled identity has a certificate (or none is needed).
    pub fn certificates(&self, problem: Option<String>) {
        self.update(2, problem);
    }

    /// The agent is shutting down: not ready any more, whatever else holds.
    pub fn draining(&self) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .draining = true;
    }

    /// Ready, and otherwise why not.
    pub fn check(&self) -> (bool, Vec<String>) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut why = Vec::new();
        if s.draining {
            why.push("draining: the agent is shutting down".to_owned());
        }
        for (i, (name, problem)) in [
            ("config", &s.config),
            ("capture", &s.capture),
            ("certificates", &s.certificates),
        ]
        .into_iter()
        .enumerate()
        {
            if !s.initialised[i] {
                why.push(format!("{name}: not yet"));
            } else if let Some(p) = problem {
                why.push(format!("{name}: {p}"));
            }
        }
        (why.is_empty(), why)
    }
}

#[cfg(test)]
mod tests {
    use super::Readiness;

    #[test]
    fn ready_only_when_all_three_are() {
        let r = Readiness::new();
        assert!(!r.check().0);
        r.config(None);
        r.capture(None);
        assert_eq!(r.check().1, vec!["certificates: not yet".to_owned()]);
        r.certificates(Some("ns/sa: CA refused".into()));
        assert!(!r.check().0);
        r.certificates(None);
        assert!(r.check().0);
        r.capture(Some("1 error".into()));
        assert_eq!(r.check().1, vec!["capture: 1 error".to_owned()]);
        r.capture(None);
        r.draining();
        assert_eq!(
            r.check().1,
            vec!["draining: the agent is shutting down".to_owned()]
        );
    }
}
