//! Holding every connection that did not complete against the faults the soak injected.
//!
//! The failure model (docs/RELIABILITY.md) says what a fault may do to a connection:
//! - an agent killed (SIGKILL) resets the connections it carried and refuses new ones of its
//!   node's pods until it is back;
//! - a policy that denies a port resets that port's connections and refuses new ones.
//!
//! So a connection that was refused or reset is explained when its lifetime overlaps such a
//! fault on its path (the agent of its client's or its server's node, or its port). Nothing
//! explains a truncated or corrupted stream, a stall, or a failure without a fault on the path.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Ended, Outcome};

/// A fault the soak injected.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    /// Wall clock (ms since the Unix epoch): when it began...
    pub from_ms: u64,
    /// ...and when it was over (the agent ready again, the policy gone).
    pub to_ms: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case", tag = "fault")]
pub enum FaultKind {
    /// The agent of `node` was killed with SIGKILL (and restarted).
    AgentKilled { node: usize },
    /// A policy denied connections to `port` of the server pods.
    Denied { port: u16 },
}

/// Where a connection ran: its client's and its server's node.
#[derive(Clone, Copy, Debug)]
pub struct Path {
    pub client_node: usize,
    pub server_node: usize,
}

/// Outcomes a fault may cause: the connection is refused or reset, loudly.
fn fault_may_cause(o: Outcome) -> bool {
    matches!(
        o,
        Outcome::Refused | Outcome::ConnectTimeout | Outcome::ConnectFailed | Outcome::Reset
    )
}

/// The fault that explains `e`, if any. `grace_ms` widens each fault's window at its end: a
/// policy change takes the agents' reload to land, a restarted agent a moment to be found.
pub fn explain<'a>(e: &Ended, path: Path, faults: &'a [Fault], grace_ms: u64) -> Option<&'a Fault> {
    if !fault_may_cause(e.outcome) {
        return None;
    }
    faults.iter().find(|f| {
        let on_path = match f.kind {
            FaultKind::AgentKilled { node } => node == path.client_node || node == path.server_node,
            FaultKind::Denied { port } => port == e.target.port(),
        };
        on_path && e.started_ms <= f.to_ms + grace_ms && e.ended_ms + grace_ms >= f.from_ms
    })
}

/// Every non-completed connection sorted out.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Verdict {
    /// (fault, outcome) -> count, for the explained ones.
    pub explained: BTreeMap<String, u64>,
    /// outcome -> count, for the rest.
    pub unexplained: BTreeMap<String, u64>,
    /// The first unexplained ones, for the report.
    pub examples: Vec<Ended>,
}

impl Verdict {
    pub fn unexplained_total(&self) -> u64 {
        self.unexplained.values().sum()
    }

    pub fn explained_total(&self) -> u64 {
        self.explained.values().sum()
    }

    /// Adds `e` (run on `path`).
    pub fn add(&mut self, e: &Ended, path: Path, faults: &[Fault], grace_ms: u64) {
        let outcome = serde_json::to_value(e.outcome)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        match explain(e, path, faults, grace_ms) {
            Some(f) => {
                let fault = match f.kind {
                    FaultKind::AgentKilled { node } => format!("agent of node{node} killed"),
                    FaultKind::Denied { port } => format!("port {port} denied"),
                };
                *self
                    .explained
                    .entry(format!("{fault}: {outcome}"))
                    .or_default() += 1;
            }
            None => {
                *self.unexplained.entry(outcome).or_default() += 1;
                if self.examples.len() < 20 {
                    self.examples.push(e.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soak::Kind;

    fn ended(outcome: Outcome, port: u16, started_ms: u64, ended_ms: u64) -> Ended {
        Ended {
            kind: Kind::Long,
            target: format!("10.0.0.1:{port}").parse().unwrap(),
            started_ms,
            ended_ms,
            outcome,
            bytes: 0,
            detail: String::new(),
        }
    }

    const PATH: Path = Path {
        client_node: 1,
        server_node: 2,
    };

    #[test]
    fn resets_and_refusals_are_explained_only_by_a_fault_on_their_path_and_in_time() {
        let faults = [
            Fault {
                kind: FaultKind::AgentKilled { node: 2 },
                from_ms: 1000,
                to_ms: 1300,
            },
            Fault {
                kind: FaultKind::Denied { port: 8081 },
                from_ms: 5000,
                to_ms: 6000,
            },
        ];
        // Spanning the kill of the server's node: explained.
        let e = ended(Outcome::Reset, 8080, 500, 1100);
        assert_eq!(explain(&e, PATH, &faults, 0), Some(&faults[0]));
        // Refused while it was down, and just after (grace).
        let e = ended(Outcome::Refused, 8080, 1350, 1350);
        assert_eq!(explain(&e, PATH, &faults, 0), None);
        assert_eq!(explain(&e, PATH, &faults, 100), Some(&faults[0]));
        // A node not on the path.
        let other = Path {
            client_node: 1,
            server_node: 1,
        };
        let e = ended(Outcome::Reset, 8080, 500, 1100);
        assert_eq!(explain(&e, other, &faults, 0), None);
        // Before the fault began.
        let e = ended(Outcome::Reset, 8080, 100, 900);
        assert_eq!(explain(&e, PATH, &faults, 0), None);
        // The denied port, not another one.
        let e = ended(Outcome::Reset, 8081, 5500, 5500);
        assert_eq!(explain(&e, other, &faults, 0), Some(&faults[1]));
        let e = ended(Outcome::Reset, 8080, 5500, 5500);
        assert_eq!(explain(&e, other, &faults, 0), None);
    }

    #[test]
    fn silent_loss_and_stalls_are_never_explained() {
        let faults = [Fault {
            kind: FaultKind::AgentKilled { node: 1 },
            from_ms: 0,
            to_ms: u64::MAX / 2,
        }];
        for o in [
            Outcome::Truncated,
            Outcome::Corrupted,
            Outcome::Stalled,
            Outcome::Failed,
        ] {
            let e = ended(o, 8080, 10, 20);
            assert_eq!(explain(&e, PATH, &faults, 1000), None, "{o:?}");
        }
        let mut v = Verdict::default();
        v.add(&ended(Outcome::Truncated, 8080, 10, 20), PATH, &faults, 0);
        v.add(&ended(Outcome::Reset, 8080, 10, 20), PATH, &faults, 0);
        assert_eq!(v.unexplained_total(), 1);
        assert_eq!(v.unexplained["truncated"], 1);
        assert_eq!(v.explained["agent of node1 killed: reset"], 1);
        assert_eq!(v.examples.len(), 1);
    }
}
