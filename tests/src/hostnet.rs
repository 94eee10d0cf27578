//! A snapshot of the host (root) network namespace, to prove a run left nothing there.
use anyhow::Result;

use crate::sys;

/// Links, routes (all tables) and rules of the calling thread's network namespace, both families.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostNetSnapshot {
    lines: Vec<String>,
}

const QUERIES: &[&[&str]] = &[
    &["-o", "link", "show"],
    &["-4", "route", "show", "table", "all"],
    &["-6", "route", "show", "table", "all"],
    &["-4", "rule", "show"],
    &["-6", "rule", "show"],
];

impl HostNetSnapshot {
    pub fn take() -> Result<Self> {
        let mut lines = Vec::new();
        for query in QUERIES {
            let out = sys::run("ip", query)?;
            lines.extend(
                out.lines()
                    // Expiring (RA, cache) routes come and go on their own.
                    .filter(|l| !l.contains("expires"))
                    .map(|l| format!("ip {}: {}", query.join(" "), normalize(l))),
            );
        }
        lines.sort();
        Ok(Self { lines })
    }

    /// Lines present now that were not in `before`: what someone added.
    pub fn added_since(&self, before: &HostNetSnapshot) -> Vec<String> {
        self.lines
            .iter()
            .filter(|l| !before.lines.contains(l))
            .cloned()
            .collect()
    }
}

/// Drops the parts of a link line that change without anyone adding anything (state, qdisc
/// counters are not printed by -o link; operstate is).
fn normalize(line: &str) -> String {
    line.split_whitespace()
        .scan(false, |skip_next, word| {
            if *skip_next {
                *skip_next = false;
                return Some(None);
            }
            if word == "state" {
                *skip_next = true;
                return Some(None);
            }
            Some(Some(word))
        })
        .flatten()
        .collect::<Vec<_>>()
        .join(" ")
}
