//! The JSON documents of `/config_dump` and `/certs`.
use std::time::SystemTime;

use serde_json::{Value, json};

use super::AdminState;

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Workloads, services, policies and enrolments as this agent sees them, plus its readiness.
pub fn config_dump(state: &AdminState) -> Value {
    let config = state
        .config
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let workloads: Vec<Value> = config
        .workloads
        .iter()
        .map(|w| {
            json!({
                "name": w.name,
                "namespace": w.namespace,
                "serviceAccount": w.service_account,
                "identity": config.identity_of(w).uri(),
                "node": w.node,
                "ips": w.ips,
                "labels": w.labels,
                "hostNetwork": w.host_network,
                "enrolled": config.is_enrolled(w),
                "local": w.node == config.node.name,
            })
        })
        .collect();
    let services: Vec<Value> = config
        .services
        .iter()
        .map(|s| {
            let endpoints: Vec<String> = config
                .endpoints_of(s)
                .map(|w| format!("{}/{}", w.namespace, w.name))
                .collect();
            json!({
                "name": s.name,
                "namespace": s.namespace,
                "vips": s.vips,
                "ports": s.ports.iter().map(|p| json!({"port": p.port, "targetPort": p.target_port.unwrap_or(p.port)})).collect::<Vec<_>>(),
                "endpoints": endpoints,
            })
        })
        .collect();
    let set = state.enforcer.current();
    let view = state.view.load();
    let mut enrolled: Vec<Value> = view
        .by_ifindex
        .iter()
        .map(|(ifindex, p)| {
            json!({"pod": p.key, "interface": p.host_iface, "ifindex": ifindex, "ips": p.ips, "cgroup": p.cgroup})
        })
        .collect();
    enrolled.sort_by(|a, b| a["pod"].as_str().cmp(&b["pod"].as_str()));
    let (ready, not_ready) = state.readiness.check();
    let pool = state.pool.as_ref().map(|p| {
        let s = p.stats();
        json!({"connections": s.connections, "streams": s.streams})
    });
    json!({
        "node": {
            "name": config.node.name,
            "trustDomain": config.node.trust_domain,
            "uplinks": config.node.uplinks,
        },
        "handler": state.handler,
        "runtime": {
            "workerThreads": state.runtime.worker_threads.count,
            "workerThreadsReason": state.runtime.worker_threads.reason,
            "splice": state.runtime.splice,
            "memoryCap": state.runtime.memory_cap,
        },
        "ready": ready,
        "notReady": not_ready,
        "enrolled": enrolled,
        "workloads": workloads,
        "services": services,
        "policies": {
            "rootNamespace": config.mesh.root_namespace,
            "authorizationPolicies": set.authorization_policies,
            "peerAuthentications": set.peer_authentications,
            "rejected": set.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "notes": set.notes,
        },
        "connections": {
            "inboundLive": state.enforcer.live_connections(),
            "revokedByPolicy": state.enforcer.revoked_connections(),
            "hbonePool": pool,
        },
        "logFilter": state.log.current(),
    })
}

/// Every workload certificate held: identity, serial, validity, seconds to expiry.
pub fn certs(state: &AdminState) -> Value {
    let Some(certs) = &state.certs else {
        return json!({"certificates": [], "note": "this handler holds no workload certificates"});
    };
    let now = SystemTime::now();
    let list: Vec<Value> = certs
        .certificates()
        .iter()
        .map(|c| {
            let leaf = c.chain().first();
            let serial = leaf
                .and_then(|der| x509_parser::parse_x509_certificate(der).ok())
                .map(|(_, cert)| cert.raw_serial_as_string())
                .unwrap_or_default();
            let left = c
                .not_after
                .duration_since(now)
                .map_or(0.0, |d| d.as_secs_f64());
            json!({
                "identity": c.identity.uri(),
                "serial": serial,
                "notBefore": unix(c.not_before),
                "notAfter": unix(c.not_after),
                "secondsToExpiry": left.round(),
                "chainLength": c.chain().len(),
            })
        })
        .collect();
    let (ok, failed) = certs.request_outcomes();
    json!({"certificates": list, "caRequests": {"success": ok, "failure": failed}})
}
