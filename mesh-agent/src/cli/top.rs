//! `mesh-agent metrics`: the agent's Prometheus endpoint, summarised. By default the busiest
//! workload pairs (bytes both ways, connections), then the node's own `mesh_*` figures.
use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::Context as _;

/// One scrape, parsed.
pub struct Scrape(prometheus_parse::Scrape);

impl Scrape {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        Ok(Self(
            prometheus_parse::Scrape::parse(lines).context("parsing the metrics exposition")?,
        ))
    }

    /// Samples of `name` (with or without OpenMetrics' `_total`) and their labels.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = (&'a prometheus_parse::Labels, f64)> + 'a {
        self.0.samples.iter().filter_map(move |s| {
            let base = s.metric.strip_suffix("_total").unwrap_or(&s.metric);
            if base != name && s.metric != name {
                return None;
            }
            let v = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            Some((&s.labels, v))
        })
    }

    /// The sum of `name` over samples whose labels include every pair of `want`.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples(name)
            .filter(|(l, _)| want.iter().all(|(k, v)| l.get(k) == Some(*v)))
            .map(|(_, v)| v)
            .sum()
    }
}

#[derive(Default)]
struct Pair {
    opened: f64,
    closed: f64,
    failed: f64,
    received: f64,
    sent: f64,
}

fn mib(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

/// The summary as text.
pub fn render(scrape: &Scrape, top: usize) -> String {
    let mut pairs: BTreeMap<(String, String, String), Pair> = BTreeMap::new();
    for (metric, field) in [
        ("istio_tcp_connections_opened", 0),
        ("istio_tcp_connections_closed", 1),
        ("istio_tcp_connections_failed", 2),
        ("istio_tcp_received_bytes", 3),
        ("istio_tcp_sent_bytes", 4),
    ] {
        for (l, v) in scrape.samples(metric) {
            let get = |k: &str| l.get(k).unwrap_or("?").to_owned();
            let key = (
                get("reporter"),
                format!(
                    "{}/{}",
                    get("source_workload_namespace"),
                    get("source_workload")
                ),
                format!(
                    "{}/{}",
                    get("destination_workload_namespace"),
                    get("destination_workload")
                ),
            );
            let p = pairs.entry(key).or_default();
            match field {
                0 => p.opened += v,
                1 => p.closed += v,
                2 => p.failed += v,
                3 => p.received += v,
                _ => p.sent += v,
            }
        }
    }
    let mut rows: Vec<_> = pairs.into_iter().collect();
    rows.sort_by(|a, b| (b.1.received + b.1.sent).total_cmp(&(a.1.received + a.1.sent)));
    let mut out = format!(
        "{:<12} {:<28} {:<28} {:>7} {:>7} {:>7} {:>11} {:>11}\n",
        "REPORTER", "SOURCE", "DESTINATION", "OPENED", "CLOSED", "FAILED", "REQUEST", "RESPONSE"
    );
    for ((reporter, src, dst), p) in rows.iter().take(top) {
        out += &format!(
            "{reporter:<12} {src:<28} {dst:<28} {:>7} {:>7} {:>7} {:>11} {:>11}\n",
            p.opened,
            p.closed,
            p.failed,
            mib(p.received),
            mib(p.sent)
        );
    }
    if rows.is_empty() {
        out += "(no proxied connections yet)\n";
    }
    out += "\nnode\n";
    for (label, metric) in [
        ("enrolled pods", "mesh_enrolled_pods"),
        ("inbound connections open", "mesh_inbound_connections"),
        ("HBONE pool connections", "mesh_hbone_pool_connections"),
        ("HBONE pool streams", "mesh_hbone_pool_streams"),
        ("certificates", "mesh_certificates"),
        (
            "policy-revoked connections",
            "mesh_policy_revoked_connections",
        ),
        ("open file descriptors", "process_open_fds"),
    ] {
        out += &format!("  {label:<28} {}\n", scrape.sum(metric, &[]) + 0.0);
    }
    out += &format!(
        "  {:<28} {}\n",
        "resident memory",
        mib(scrape.sum("process_resident_memory_bytes", &[]))
    );
    let denials = scrape.sum("mesh_policy_decisions", &[("decision", "deny")]) + 0.0;
    out += &format!("  {:<28} {denials}\n", "policy denials");
    let mut drops: Vec<(String, f64)> = scrape
        .samples("mesh_ebpf_events")
        .filter(|(l, v)| {
            *v > 0.0
                && l.get("reason")
                    .is_some_and(|r| r.starts_with("dropped") || r.starts_with("refused"))
        })
        .map(|(l, v)| (l.get("reason").unwrap_or("?").to_owned(), v))
        .collect();
    drops.sort_by(|a, b| a.0.cmp(&b.0));
    for (reason, v) in drops {
        out += &format!("  {:<28} {v}\n", format!("eBPF {reason}"));
    }
    out
}

/// `mesh-agent metrics`.
pub async fn run(addr: SocketAddr, top: usize, raw: bool) -> anyhow::Result<String> {
    let text = super::get(addr, "/metrics").await?;
    if raw {
        return Ok(text);
    }
    Ok(render(&Scrape::parse(&text)?, top))
}
