//! Reading an agent's Prometheus exposition (`:15020/metrics` in the node's namespace), shared by
//! the end-to-end tests that check counters and by the bench and soak, which report some of them.
use anyhow::{Context as _, bail};
pub use prometheus_parse::Scrape;
use prometheus_parse::{Sample, Value};

use crate::{Place, Testbed, http::http_get};

/// Where every agent serves its metrics, in its node's namespace (DESIGN.md §7).
const METRICS_ADDR: &str = "127.0.0.1:15020";

/// One parsed scrape of the agent serving in `place`; an error if it does not answer 200 or its
/// exposition does not parse.
pub fn scrape_place(place: &Place) -> anyhow::Result<Scrape> {
    let (status, body) = http_get(
        place,
        METRICS_ADDR.parse().expect("literal"),
        "GET",
        "/metrics",
    )
    .context("GET /metrics")?;
    if !status.contains("200") {
        bail!("/metrics answered {status}");
    }
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .with_context(|| format!("the exposition does not parse:\n{body}"))
}

/// One parsed scrape of node `node`'s agent; a failure (panic) if it does not answer or parse —
/// for tests, where that is the finding.
pub fn scrape(tb: &Testbed, node: usize) -> Scrape {
    scrape_place(&tb.node(node).place).unwrap_or_else(|e| panic!("node{node}: {e:#}"))
}

/// The samples of `metric` (OpenMetrics `_total` included) whose labels include all of `want`.
fn matching<'a>(
    s: &'a Scrape,
    metric: &'a str,
    want: &'a [(&str, &str)],
) -> impl Iterator<Item = f64> + 'a {
    s.samples
        .iter()
        .filter(move |x| x.metric == metric || x.metric == format!("{metric}_total"))
        .filter(move |x| want.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x: &Sample| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

/// The value of the one series of `metric` matching `want`; 0 when there is none, and a failure
/// when several match (the test meant a narrower selection).
pub fn value(s: &Scrape, metric: &str, want: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = matching(s, metric, want).collect();
    assert!(
        found.len() <= 1,
        "{metric} {want:?}: {} series",
        found.len()
    );
    found.first().copied().unwrap_or(0.0)
}

/// The sum over every series of `metric` matching `want`; 0 when there is none.
pub fn sum(s: &Scrape, metric: &str, want: &[(&str, &str)]) -> f64 {
    matching(s, metric, want).sum()
}
