//! Writing objects the way controllers should: server-side apply with our field manager, and
//! only when what is observed does not already say what we want (no write per resync).
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams},
};
use serde_json::Value;

/// The field manager of everything the controller writes.
pub const FIELD_MANAGER: &str = "mesh-agent-controller";

/// Whether every field of `desired` is in `observed` with the same value: the server adds
/// defaults and status, so equality would never hold. Lists must match element by element.
pub fn covers(observed: &Value, desired: &Value) -> bool {
    match (observed, desired) {
        (Value::Object(o), Value::Object(d)) => d
            .iter()
            .all(|(k, dv)| o.get(k).is_some_and(|ov| covers(ov, dv)) || is_empty(dv)),
        (Value::Array(o), Value::Array(d)) => {
            o.len() == d.len() && o.iter().zip(d).all(|(ov, dv)| covers(ov, dv))
        }
        // The server echoes integers we write as numbers, ports as ints or names.
        (o, d) => o == d,
    }
}

/// Empty maps and lists, and nulls, are what the server omits (also nested: `{a: {}}`).
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.values().all(is_empty),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// The Api for an object of `ar` in `namespace` (cluster-scoped when None).
pub fn api(client: &Client, ar: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    }
}

/// Server-side apply of `obj` (created when missing), taking over fields other managers set.
pub async fn apply(client: &Client, ar: &ApiResource, obj: &Value) -> kube::Result<()> {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let namespace = obj["metadata"]["namespace"].as_str();
    api(client, ar, namespace)
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await
        .map(drop)
}

/// Deletes an object; one already gone is fine.
pub async fn delete(
    client: &Client,
    ar: &ApiResource,
    namespace: Option<&str>,
    name: &str,
) -> kube::Result<()> {
    match api(client, ar, namespace)
        .delete(name, &DeleteParams::background())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn server_defaults_do_not_count_as_differences_but_our_fields_do() {
        let desired = json!({"spec": {"ports": [{"port": 15008}], "selector": {"a": "b"}}, "metadata": {"annotations": {}}});
        let observed = json!({"spec": {"ports": [{"port": 15008, "protocol": "TCP"}], "selector": {"a": "b"}, "clusterIP": "10.96.0.1"}, "status": {}});
        assert!(covers(&observed, &desired));
        let changed = json!({"spec": {"ports": [{"port": 15009, "protocol": "TCP"}], "selector": {"a": "b"}}});
        assert!(!covers(&changed, &desired));
        let extra_port =
            json!({"spec": {"ports": [{"port": 15008}, {"port": 1}], "selector": {"a": "b"}}});
        assert!(!covers(&extra_port, &desired), "lists are ours whole");
        let missing = json!({"spec": {"ports": [{"port": 15008}]}});
        assert!(!covers(&missing, &desired));
    }
}
