//! The soak's report: every figure in one JSON document, the checks that decide the run, and a
//! markdown summary.
use std::{collections::BTreeMap, net::IpAddr};

use mesh_testbed::{
    Testbed,
    soak::{
        ClientReport,
        verdict::{Fault, Path, Verdict},
    },
};
use serde_json::{Value, json};

use super::SoakArgs;

/// What the run produced.
pub struct Inputs<'a> {
    pub args: &'a SoakArgs,
    pub tb: &'a Testbed,
    /// One per client pod, node 1 first.
    pub reports: &'a [ClientReport],
    pub faults: &'a [Fault],
    pub events: &'a [Value],
    pub grace_ms: u64,
    pub start_resources: &'a [Value],
    pub end_resources: &'a [Value],
    pub curve: &'a [Value],
    pub plaintext: &'a Value,
    /// Per node, the data path's fail-closed counters at the end.
    pub datapath: &'a [Value],
    pub ca_log: &'a str,
    pub agent_logs: &'a [super::faults::AgentLog],
}

fn git(args: &[&str]) -> String {
    std::process::Command::new("git")
        .args(args)
        .current_dir(crate::workspace_root())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The JSON document of the run (without `failures`, which [`judge`] decides).
pub fn assemble(i: Inputs<'_>) -> Value {
    let node_of: BTreeMap<IpAddr, usize> =
        i.tb.pods()
            .iter()
            .flat_map(|p| {
                [
                    (IpAddr::from(p.ipv4), p.node),
                    (IpAddr::from(p.ipv6), p.node),
                ]
            })
            .collect();
    let mut verdict = Verdict::default();
    for (c, r) in i.reports.iter().enumerate() {
        for e in &r.not_completed {
            let path = Path {
                client_node: c + 1,
                server_node: node_of.get(&e.target.ip()).copied().unwrap_or(0),
            };
            verdict.add(e, path, i.faults, i.grace_ms);
        }
    }
    // Long-lived connections open at once: the clients' curves added up, sample by sample.
    let samples = i
        .reports
        .iter()
        .map(|r| r.open_curve.len())
        .max()
        .unwrap_or(0);
    let open: Vec<u64> = (0..samples)
        .map(|k| {
            i.reports
                .iter()
                .map(|r| r.open_curve.get(k).copied().unwrap_or(0))
                .sum()
        })
        .collect();
    let sum = |f: fn(&ClientReport) -> u64| i.reports.iter().map(f).sum::<u64>();
    let panicked: Vec<&str> = i
        .agent_logs
        .iter()
        .filter(|(_, log)| String::from_utf8_lossy(log).contains("panicked"))
        .map(|(what, _)| what.as_str())
        .collect();
    json!({
        "header": {
            "commit": git(&["rev-parse", "--short=12", "HEAD"]),
            "dirty": !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty(),
            "date": std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default(),
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "build": if i.args.dev_build { "dev" } else { "release" },
        },
        "plan": {
            "minutes": i.args.minutes,
            "connections": i.args.connections,
            "churn_per_s": i.args.churn * 2,
            "cert_ttl_s": i.args.cert_ttl,
            "seed": i.args.seed,
            "grace_ms": i.grace_ms,
        },
        "connections": {
            "completed_long": sum(|r| r.completed_long),
            "completed_churn": sum(|r| r.completed_churn),
            "not_completed": i.reports.iter().map(|r| r.not_completed.len() as u64).sum::<u64>(),
            "unrecorded": sum(|r| r.unrecorded),
            "bytes_echoed": sum(|r| r.bytes),
            "peak_open": open.iter().copied().max().unwrap_or(0),
            "open_curve_5s": open,
        },
        "verdict": verdict,
        "events": i.events,
        "faults": i.faults,
        "certificates_issued": i.ca_log.lines().filter(|l| l.contains("certificate issued")).count(),
        "resources": {
            "start": i.start_resources,
            "end": i.end_resources,
            "curve_5s": i.curve,
        },
        "plaintext": i.plaintext,
        "datapath_events": i.datapath,
        "agent_logs_with_panics": panicked,
        "agents_run": i.agent_logs.len(),
    })
}

/// The checks that decide the run: what failed, in words (empty when it passed).
pub fn judge(doc: &Value, fd_margin: i64, rss_margin_mib: f64) -> Vec<String> {
    let mut failures = Vec::new();
    let v = &doc["verdict"];
    let unexplained: u64 = v["unexplained"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    if unexplained > 0 {
        failures.push(format!(
            "{unexplained} connections ended in a way no fault explains: {} (first: {})",
            v["unexplained"], v["examples"]
        ));
    }
    let c = &doc["connections"];
    if c["unrecorded"].as_u64() != Some(0) {
        failures.push(format!(
            "{} connections that did not complete were not recorded, so not judged",
            c["unrecorded"]
        ));
    }
    let planned = doc["plan"]["connections"].as_u64().unwrap_or(0);
    let peak = c["peak_open"].as_u64().unwrap_or(0);
    if peak * 100 < planned * 95 {
        failures.push(format!(
            "the load never held {planned} connections at once (peak {peak})"
        ));
    }
    let p = &doc["plaintext"];
    if p["app_port_packets"].as_u64() != Some(0) || p["marker_hits"].as_u64() != Some(0) {
        failures.push(format!("plaintext crossed the fabric: {p}"));
    }
    let r = &doc["resources"];
    for n in 0..2 {
        let (start, end) = (&r["start"][n], &r["end"][n]);
        let fds = |x: &Value| x["fds"].as_i64().unwrap_or(i64::MAX);
        let rss = |x: &Value| x["rss_mib"].as_f64().unwrap_or(f64::INFINITY);
        if fds(end) > fds(start) + fd_margin {
            failures.push(format!(
                "node{}: agent descriptors {} at the end, {} at the start (margin {fd_margin})",
                n + 1,
                fds(end),
                fds(start)
            ));
        }
        if rss(end) > rss(start) + rss_margin_mib {
            failures.push(format!(
                "node{}: agent RSS {:.1} MiB at the end, {:.1} MiB at the start (margin {rss_margin_mib} MiB)",
                n + 1,
                rss(end),
                rss(start)
            ));
        }
    }
    if let Some(p) = doc["agent_logs_with_panics"].as_array()
        && !p.is_empty()
    {
        failures.push(format!("agents panicked: {}", Value::Array(p.clone())));
    }
    failures
}

/// The summary for people.
pub fn markdown(doc: &Value) -> String {
    let c = &doc["connections"];
    let plan = &doc["plan"];
    let mut md = format!(
        "## Soak: {} min, {} long-lived connections, {} short ones a second ({} build, commit {}, {})\n\n",
        plan["minutes"],
        plan["connections"],
        plan["churn_per_s"],
        doc["header"]["build"].as_str().unwrap_or("?"),
        doc["header"]["commit"].as_str().unwrap_or("?"),
        doc["header"]["date"].as_str().unwrap_or("?"),
    );
    md += "| Connections | Count |\n|---|---|\n";
    for (what, key) in [
        ("long-lived, completed intact", "completed_long"),
        ("short, completed intact", "completed_churn"),
        ("not completed", "not_completed"),
        ("most long-lived open at once", "peak_open"),
    ] {
        md += &format!("| {what} | {} |\n", c[key]);
    }
    md += &format!(
        "| bytes echoed and checked | {:.1} MiB |\n",
        c["bytes_echoed"].as_f64().unwrap_or(0.0) / 1048576.0
    );
    md += "\n| Not completed, explained by | Count |\n|---|---|\n";
    if let Some(m) = doc["verdict"]["explained"].as_object() {
        for (k, v) in m {
            md += &format!("| {k} | {v} |\n");
        }
    }
    if let Some(m) = doc["verdict"]["unexplained"].as_object() {
        for (k, v) in m {
            md += &format!("| **unexplained**: {k} | {v} |\n");
        }
    }
    md += "\n| t (s) | Step | Measured |\n|---|---|---|\n";
    for e in doc["events"].as_array().into_iter().flatten() {
        md += &format!(
            "| {} | {} | {} |\n",
            e["t_s"],
            e["step"].as_str().unwrap_or(""),
            e["detail"]
        );
    }
    md += &format!(
        "\nCertificates issued by the CA: {}. Agent processes over the run: {}.\n",
        doc["certificates_issued"], doc["agents_run"]
    );
    let r = &doc["resources"];
    md += "\n| Node | Start: RSS, fds | Peak: RSS, fds (all its agents) | End: RSS, fds |\n|---|---|---|---|\n";
    for n in 0..2 {
        let curve = r["curve_5s"].as_array().cloned().unwrap_or_default();
        let peak_rss = curve
            .iter()
            .filter_map(|s| s["nodes"][n]["rss_mib"].as_f64())
            .fold(0.0, f64::max);
        let peak_fds = curve
            .iter()
            .filter_map(|s| s["nodes"][n]["fds"].as_u64())
            .max()
            .unwrap_or(0);
        md += &format!(
            "| node{} | {} MiB, {} | {peak_rss:.1} MiB, {peak_fds} | {} MiB, {} |\n",
            n + 1,
            r["start"][n]["rss_mib"],
            r["start"][n]["fds"],
            r["end"][n]["rss_mib"],
            r["end"][n]["fds"],
        );
    }
    let p = &doc["plaintext"];
    md += &format!(
        "\nFabric capture (everything but HBONE's port): {} packets of the applications' ports, {} occurrences of the payload marker, {} bytes captured.\n",
        p["app_port_packets"], p["marker_hits"], p["capture_bytes"]
    );
    if let Some(nodes) = doc["datapath_events"].as_array() {
        for (n, events) in nodes.iter().enumerate() {
            md += &format!(
                "Data path of node{} (fail-closed counters): {events}\n",
                n + 1
            );
        }
    }
    if let Some(first) = p["first_app_port_packets"]
        .as_array()
        .filter(|f| !f.is_empty())
    {
        md += "\nThe first of them (t from the start of the load):\n\n```\n";
        for line in first {
            md += line.as_str().unwrap_or_default();
            md += "\n";
        }
        md += "```\n";
    }
    let failures = doc["failures"].as_array().cloned().unwrap_or_default();
    md += &if failures.is_empty() {
        "\n**Passed.**\n".to_owned()
    } else {
        format!("\n**Failed:** {}\n", Value::Array(failures))
    };
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        json!({
            "verdict": {"unexplained": {}, "examples": []},
            "connections": {"unrecorded": 0, "peak_open": 9990},
            "plan": {"connections": 10000},
            "plaintext": {"app_port_packets": 0, "marker_hits": 0},
            "resources": {
                "start": [{"fds": 100, "rss_mib": 20.0}, {"fds": 100, "rss_mib": 20.0}],
                "end": [{"fds": 110, "rss_mib": 30.0}, {"fds": 100, "rss_mib": 20.0}],
            },
            "agent_logs_with_panics": [],
        })
    }

    #[test]
    fn a_clean_run_passes_and_each_check_can_fail_it() {
        assert_eq!(judge(&doc(), 64, 48.0), Vec::<String>::new());
        type Spoil = fn(&mut Value);
        let cases: [(&str, Spoil); 6] = [
            ("no fault explains", |d| {
                d["verdict"]["unexplained"]["truncated"] = json!(1)
            }),
            ("not recorded", |d| {
                d["connections"]["unrecorded"] = json!(3)
            }),
            ("never held", |d| d["connections"]["peak_open"] = json!(100)),
            ("plaintext", |d| d["plaintext"]["marker_hits"] = json!(1)),
            ("descriptors", |d| {
                d["resources"]["end"][1]["fds"] = json!(500)
            }),
            ("RSS", |d| d["resources"]["end"][0]["rss_mib"] = json!(90.0)),
        ];
        for (want, spoil) in cases {
            let mut d = doc();
            spoil(&mut d);
            let f = judge(&d, 64, 48.0);
            assert!(f.len() == 1 && f[0].contains(want), "{want}: {f:?}");
        }
    }
}
