//! `mesh-agent status`: what the local agent is doing, from its admin API, as tables.
use std::net::SocketAddr;

use serde_json::Value;

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn join(v: &Value) -> String {
    v.as_array()
        .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
        .unwrap_or_else(|| s(v))
}

/// The report as text, from `/config_dump` and `/certs`.
pub fn render(dump: &Value, certs: &Value) -> String {
    let mut out = String::new();
    let ready = if dump["ready"].as_bool() == Some(true) {
        "READY".to_owned()
    } else {
        format!("NOT READY ({})", join(&dump["notReady"]))
    };
    out += &format!(
        "node {} · handler {} · {ready} · log filter {}\n",
        s(&dump["node"]["name"]),
        s(&dump["handler"]),
        s(&dump["logFilter"])
    );
    let enrolled = dump["enrolled"].as_array().cloned().unwrap_or_default();
    let splice = s(&dump["runtime"]["splice"]);
    // A pod's hops are spliced when its cgroup is known (config, or found by UID).
    let with_cgroup = enrolled.iter().filter(|p| p["cgroup"].is_string()).count();
    let pods = if splice.starts_with("on") {
        format!(" ({with_cgroup} of {} enrolled pods)", enrolled.len())
    } else {
        String::new()
    };
    out += &format!(
        "worker threads {} ({}) · splicing {splice}{pods} · memory cap {}\n\n",
        s(&dump["runtime"]["workerThreads"]),
        s(&dump["runtime"]["workerThreadsReason"]),
        s(&dump["runtime"]["memoryCap"]),
    );
    let identity_of = |pod: &str| {
        dump["workloads"]
            .as_array()
            .and_then(|ws| {
                ws.iter()
                    .find(|w| format!("{}/{}", s(&w["namespace"]), s(&w["name"])) == pod)
            })
            .map(|w| s(&w["identity"]))
            .unwrap_or_else(|| "-".into())
    };
    out += &format!("enrolled pods ({})\n", enrolled.len());
    out += &format!(
        "  {:<28} {:<12} {:<34} {}\n",
        "POD", "INTERFACE", "ADDRESSES", "IDENTITY"
    );
    for p in &enrolled {
        let pod = s(&p["pod"]);
        out += &format!(
            "  {:<28} {:<12} {:<34} {}\n",
            pod,
            s(&p["interface"]),
            join(&p["ips"]),
            identity_of(&pod)
        );
    }
    let list = certs["certificates"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    out += &format!("\ncertificates ({})\n", list.len());
    out += &format!("  {:<52} {:<20} {}\n", "IDENTITY", "EXPIRES IN", "SERIAL");
    for c in &list {
        let secs = c["secondsToExpiry"].as_f64().unwrap_or(0.0);
        out += &format!(
            "  {:<52} {:<20} {}\n",
            s(&c["identity"]),
            format!(
                "{}h {:02}m",
                (secs / 3600.0) as u64,
                ((secs % 3600.0) / 60.0) as u64
            ),
            s(&c["serial"])
        );
    }
    let conns = &dump["connections"];
    out += &format!(
        "\nconnections: {} inbound open · HBONE pool {} connections / {} streams · {} closed by policy changes\n",
        s(&conns["inboundLive"]),
        s(&conns["hbonePool"]["connections"]),
        s(&conns["hbonePool"]["streams"]),
        s(&conns["revokedByPolicy"]),
    );
    let pol = &dump["policies"];
    out += &format!(
        "policies: {} AuthorizationPolicy · {} PeerAuthentication (root namespace {})\n",
        s(&pol["authorizationPolicies"]),
        s(&pol["peerAuthentications"]),
        s(&pol["rootNamespace"]),
    );
    let rejected = pol["rejected"].as_array().cloned().unwrap_or_default();
    if rejected.is_empty() {
        out += "errors: none\n";
    } else {
        out += &format!("errors: {} rejected policies\n", rejected.len());
        for r in rejected {
            out += &format!("  {}\n", s(&r));
        }
    }
    out
}

/// `mesh-agent status`.
pub async fn run(admin: SocketAddr) -> anyhow::Result<String> {
    let dump: Value = serde_json::from_str(&super::get(admin, "/config_dump").await?)?;
    let certs: Value = serde_json::from_str(&super::get(admin, "/certs").await?)?;
    Ok(render(&dump, &certs))
}
