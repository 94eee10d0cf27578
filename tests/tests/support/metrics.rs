//! Reading an agent's Prometheus exposition (`:15020/metrics` in the node's namespace), shared by
//! the end-to-end tests that check counters.
use mesh_testbed::{Testbed, http::http_get};
use prometheus_parse::{Sample, Scrape, Value};

/// One parsed scrape of node `node`'s agent; a failure if it does not answer 200 or parse.
pub fn scrape(tb: &Testbed, node: usize) -> Scrape {
    let (status, body) = http_get(
        &tb.node(node).place,
        "127.0.0.1:15020".parse().unwrap(),
        "GET",
        "/metrics",
    )
    .unwrap();
    assert!(status.contains("200"), "node{node} /metrics: {status}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("node{node}: the exposition does not parse: {e}\n{body}"))
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
