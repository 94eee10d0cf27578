//! Runs the conformance table (`conformance.yaml`): each case compiles its policies for a fixed
//! set of workloads, decides one connection and checks the verdict, the reason, the deciding
//! policy and the rejection errors against what Istio does.
use std::{collections::BTreeMap, net::IpAddr};

use serde::Deserialize;

use super::{ConnectionAttrs, PolicySet, RawObject, WorkloadInfo};
use crate::identity::SpiffeId;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Case {
    name: String,
    istio: String,
    #[serde(default)]
    root_namespace: Option<String>,
    policies: Vec<RawObject>,
    #[serde(default)]
    conn: Conn,
    expect: Verdict,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    audited: Option<Vec<String>>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize, PartialEq, Eq, Debug, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Allow,
    Deny,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Conn {
    /// A principal without `spiffe://`, or `plaintext`.
    from: Option<String>,
    source_ip: Option<IpAddr>,
    destination_ip: Option<IpAddr>,
    port: Option<u16>,
}

fn workload(
    key: &str,
    labels: &[(&str, &str)],
    ips: &[&str],
    service: Option<&str>,
) -> WorkloadInfo {
    let (ns, _) = key.split_once('/').unwrap();
    WorkloadInfo {
        key: key.into(),
        namespace: ns.into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
        ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        services: service
            .map(|s| vec![(ns.to_owned(), s.to_owned())])
            .unwrap_or_default(),
        waypoints: Vec::new(),
    }
}

fn workloads() -> Vec<WorkloadInfo> {
    vec![
        workload(
            "foo/httpbin",
            &[("app", "httpbin"), ("version", "v1")],
            &["10.0.0.10", "fd00::10"],
            Some("httpbin"),
        ),
        workload(
            "foo/other",
            &[("app", "other")],
            &["10.0.0.11"],
            Some("other"),
        ),
        workload("bar/db", &[("app", "db")], &["10.0.1.10"], None),
        workload("istio-system/gw", &[("app", "gw")], &["10.0.2.10"], None),
    ]
}

fn attrs(c: &Conn) -> ConnectionAttrs {
    let from = c
        .from
        .as_deref()
        .unwrap_or("cluster.local/ns/sleep/sa/sleep");
    ConnectionAttrs {
        source: (from != "plaintext")
            .then(|| SpiffeId::parse(&format!("spiffe://{from}")).expect("case principal")),
        source_ip: c.source_ip.unwrap_or_else(|| "10.1.0.5".parse().unwrap()),
        destination_ip: c
            .destination_ip
            .unwrap_or_else(|| "10.0.0.10".parse().unwrap()),
        destination_port: c.port.unwrap_or(8080),
        service_host: None,
    }
}

/// Runs one case; `Err` describes the first mismatch.
fn run(case: &Case) -> Result<(), String> {
    let root = case.root_namespace.as_deref().unwrap_or("istio-system");
    let set = PolicySet::compile(&case.policies, &workloads(), root);
    let d = set.evaluate(&attrs(&case.conn));
    let got = if d.allowed {
        Verdict::Allow
    } else {
        Verdict::Deny
    };
    let errors: Vec<String> = set.errors.iter().map(ToString::to_string).collect();
    if got != case.expect {
        return Err(format!(
            "expected {:?}, got {got:?} ({d:?}); errors {errors:?}",
            case.expect
        ));
    }
    if let Some(r) = &case.reason
        && r != d.reason.as_str()
    {
        return Err(format!("expected reason {r}, got {d:?}"));
    }
    if let Some(p) = &case.policy
        && d.policy.as_deref() != Some(p.as_str())
    {
        return Err(format!("expected deciding policy {p}, got {d:?}"));
    }
    if let Some(a) = &case.audited {
        let got: Vec<&str> = d.audited.iter().map(|x| &**x).collect();
        if got != *a {
            return Err(format!("expected audited {a:?}, got {got:?}"));
        }
    }
    match &case.error {
        Some(want) if !errors.iter().any(|e| e.contains(want.as_str())) => {
            return Err(format!(
                "expected an error containing {want:?}, got {errors:?}"
            ));
        }
        None if !errors.is_empty() => return Err(format!("unexpected errors {errors:?}")),
        _ => {}
    }
    Ok(())
}

#[test]
fn istio_policy_conformance() {
    let table: Table = serde_yaml::from_str(include_str!("conformance.yaml")).unwrap();
    assert!(table.cases.len() >= 60, "{} cases", table.cases.len());
    let mut names = std::collections::HashSet::new();
    let mut failures = Vec::new();
    for case in &table.cases {
        assert!(names.insert(&case.name), "duplicate case {}", case.name);
        assert!(
            !case.istio.is_empty(),
            "{}: says which Istio behaviour",
            case.name
        );
        if let Err(e) = run(case) {
            failures.push(format!("{} ({}): {e}", case.name, case.istio));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        table.cases.len(),
        failures.join("\n")
    );
    eprintln!("{} conformance cases passed", table.cases.len());
}

/// The table's own checks can fail: a case with the wrong expectation is reported.
#[test]
fn a_wrong_expectation_is_caught() {
    let mut case: Case =
        serde_yaml::from_str("{name: x, istio: y, policies: [], expect: deny}").unwrap();
    assert!(run(&case).is_err());
    case.expect = Verdict::Allow;
    case.reason = Some("allow_matched".into());
    assert!(run(&case).is_err(), "reason is checked");
}
