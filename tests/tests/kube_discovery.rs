//! Kubernetes-mode discovery against an API server double: the real kube-rs watchers list and
//! watch recorded objects of a kind cluster (`tests/fixtures/kind-cluster.json`), and the
//! agent's state follows — enrolment by namespace label and pod opt-out, label flips, service
//! endpoints, policies — across watch expiry (410 Gone → re-list) and API outages (the last
//! state stays), with the redirection annotation kept in step.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_agent::discovery::{
    ConfigUpdate, LocalConfig,
    kube::{KubeDiscovery, Located, PodLocator, SnapshotSettings, annotate::Annotator},
};
use mesh_testbed::fakeapi::FakeApi;
use serde_json::{Value, json};

const NODE: &str = "kind-worker";

/// Interfaces by pod address, as the routing table of `kind-worker` would say.
struct FakeLocator(HashMap<IpAddr, &'static str>);

impl PodLocator for FakeLocator {
    fn locate(&self, _uid: &str, ips: &[IpAddr]) -> Option<Located> {
        ips.iter().find_map(|ip| self.0.get(ip)).map(|i| Located {
            interface: (*i).to_owned(),
            cgroup: None,
        })
    }
}

fn fixture() -> Vec<Value> {
    serde_json::from_str(include_str!("../fixtures/kind-cluster.json")).unwrap()
}

fn locator() -> Arc<FakeLocator> {
    Arc::new(FakeLocator(HashMap::from([
        ("10.244.1.5".parse().unwrap(), "veth1f3a9c2e"),
        ("10.244.1.6".parse().unwrap(), "veth2b7d0e41"),
        ("10.244.1.7".parse().unwrap(), "veth3c8e1f52"),
        ("10.244.1.8".parse().unwrap(), "veth4d9f2063"),
    ])))
}

fn settings() -> SnapshotSettings {
    SnapshotSettings {
        node_name: NODE.into(),
        trust_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
        uplinks: vec![],
        ca: None,
    }
}

async fn client(api: &FakeApi) -> kube::Client {
    let config = kube::Config::new(api.url().parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn start(client: kube::Client) -> KubeDiscovery {
    KubeDiscovery::start(
        client,
        settings(),
        locator(),
        Arc::new(|| vec!["eth0".into(), "lo".into(), "veth1f3a9c2e".into()]),
    )
}

/// Waits until the configuration in force satisfies `ok`, applying each update as the agent
/// would (what it says otherwise, on timeout).
async fn until(
    d: &mut KubeDiscovery,
    what: &str,
    ok: impl Fn(&LocalConfig) -> bool,
) -> Arc<LocalConfig> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(c) = d.current()
            && ok(&c)
        {
            return Arc::new(c);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out waiting for: {what}; last: {:#?}",
            d.current().map(|c| c.workloads)
        );
        if let Ok(applied) = tokio::time::timeout(left, d.apply_next()).await {
            applied.expect("an update the agent would refuse");
        }
    }
}

/// Applies every update the discovery publishes until it publishes none for a while (as the
/// agent would), and returns the configuration in force then.
async fn settle(d: &mut KubeDiscovery) -> LocalConfig {
    while let Ok(applied) = tokio::time::timeout(Duration::from_millis(500), d.apply_next()).await {
        applied.expect("an update the agent would refuse");
    }
    d.current().expect("a configuration in force")
}

fn enrolled(c: &LocalConfig, ns: &str, prefix: &str) -> Option<bool> {
    c.workloads
        .iter()
        .find(|w| w.namespace == ns && w.name.starts_with(prefix))
        .map(|w| c.is_enrolled(w))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_state_follows_the_api_through_expiry_and_outages() {
    let api = FakeApi::start();
    for obj in fixture() {
        api.apply(obj);
    }
    let mut d = start(client(&api).await);

    // The recorded cluster, as the agent sees it.
    let c = until(&mut d, "the first snapshot", |c| !c.workloads.is_empty()).await;
    assert_eq!(c.node.name, NODE);
    assert_eq!(
        enrolled(&c, "demo", "web-7d9f8c6b5-x2x4k"),
        Some(true),
        "namespace label enrols"
    );
    assert_eq!(enrolled(&c, "demo", "sleep"), Some(true));
    assert_eq!(
        enrolled(&c, "demo", "debug"),
        Some(false),
        "pod label none opts out"
    );
    assert_eq!(
        enrolled(&c, "legacy", "legacy-app"),
        Some(false),
        "namespace without the label"
    );
    assert_eq!(
        enrolled(&c, "kube-system", "kindnet"),
        Some(false),
        "host network never"
    );
    assert!(
        c.workloads.iter().all(|w| !w.name.starts_with("job-once")),
        "finished pods are gone (their address is reused)"
    );
    let web = c
        .workloads
        .iter()
        .find(|w| w.name == "web-7d9f8c6b5-x2x4k")
        .unwrap();
    assert_eq!(web.service_account, "web");
    assert_eq!(
        web.host_interface.as_deref(),
        Some("veth1f3a9c2e"),
        "found through the host, not by name"
    );
    let remote = c
        .workloads
        .iter()
        .find(|w| w.name == "web-7d9f8c6b5-p4t6z")
        .unwrap();
    assert_eq!(remote.node, "kind-worker2");
    assert_eq!(remote.host_interface, None);
    assert_eq!(
        c.node.uplinks,
        vec!["eth0".to_owned()],
        "every interface but loopback and pods'"
    );
    // Services: the VIP, the named target port resolved through the EndpointSlice, ready
    // endpoints only, TCP only, headless services skipped.
    assert_eq!(c.services.len(), 1, "{:?}", c.services);
    let svc = &c.services[0];
    assert_eq!(svc.vips, vec!["10.96.120.15".parse::<IpAddr>().unwrap()]);
    assert_eq!(svc.ports.len(), 1);
    assert_eq!(
        (svc.ports[0].port, svc.ports[0].target_port),
        (80, Some(8080))
    );
    let mut eps = svc.endpoints.clone().unwrap();
    eps.sort();
    assert_eq!(
        eps,
        vec![
            "10.244.1.5".parse::<IpAddr>().unwrap(),
            "10.244.2.9".parse().unwrap()
        ]
    );
    // Policies, in the local file's model.
    let kinds: Vec<_> = c
        .policies
        .iter()
        .map(|p| format!("{} {}/{}", p.kind, p.metadata.namespace, p.metadata.name))
        .collect();
    assert_eq!(
        kinds,
        [
            "AuthorizationPolicy demo/web-from-sleep",
            "PeerAuthentication istio-system/default"
        ]
    );
    let set = c.compile_policies();
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    assert_eq!(set.authorization_policies, 1);
    // Watches resume from the list's resourceVersion.
    let watches: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.query.contains("watch=true"))
        .collect();
    assert!(
        watches.iter().all(|w| w.query.contains("resourceVersion=")),
        "{watches:?}"
    );

    // Label flips enrol and un-enrol running pods.
    let mut legacy_ns = api.get("namespaces", "", "legacy").unwrap();
    legacy_ns["metadata"]["labels"]["istio.io/dataplane-mode"] = json!("ambient");
    api.apply(legacy_ns.clone());
    until(&mut d, "legacy enrolled by its namespace label", |c| {
        enrolled(c, "legacy", "legacy-app") == Some(true)
    })
    .await;
    let mut debug = api.get("pods", "demo", "debug-0").unwrap();
    debug["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("istio.io/dataplane-mode");
    api.apply(debug);
    until(
        &mut d,
        "debug-0 enrolled once its opt-out is removed",
        |c| enrolled(c, "demo", "debug") == Some(true),
    )
    .await;

    // The redirection annotation follows enrolment.
    let annotator = Annotator::new(d.client.clone());
    let c = until(&mut d, "current", |_| true).await;
    annotator.sync(&c).await;
    let annotated = |ns: &str, name: &str| {
        api.get("pods", ns, name).unwrap()["metadata"]["annotations"]["ambient.istio.io/redirection"]
            == json!("enabled")
    };
    assert!(
        annotated("demo", "web-7d9f8c6b5-x2x4k")
            && annotated("legacy", "legacy-app-6f5d4c3b2-m9n8b")
    );
    assert!(
        !annotated("demo", "web-7d9f8c6b5-p4t6z"),
        "another node's pod is that node's agent's business"
    );

    // Watch expiry (compaction): the watchers get 410 Gone, re-list, and carry on.
    let lists_before = api
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && !r.query.contains("watch=true"))
        .count();
    api.expire_watches();
    let mut sleep = api.get("pods", "demo", "sleep-5c7d8f9b6-q8w2e").unwrap();
    sleep["metadata"]["labels"]["istio.io/dataplane-mode"] = json!("none");
    api.apply(sleep);
    until(&mut d, "a change made after expiry arrives", |c| {
        enrolled(c, "demo", "sleep") == Some(false)
    })
    .await;
    let lists_after = api
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && !r.query.contains("watch=true"))
        .count();
    assert!(
        lists_after > lists_before,
        "410 Gone made the watchers list again"
    );

    // An outage: the agent keeps its last state (nothing vanishes), and catches up afterwards.
    let before = settle(&mut d).await;
    api.fail_with(Some(503));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = settle(&mut d).await;
    assert_eq!(during, before, "an unreachable API changes nothing");
    api.fail_with(None);
    legacy_ns["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("istio.io/dataplane-mode");
    api.apply(legacy_ns);
    until(&mut d, "the change made after the outage", |c| {
        enrolled(c, "legacy", "legacy-app") == Some(false)
    })
    .await;

    // The pod that left the mesh loses its annotation; the agent's exit removes the rest.
    let c = until(&mut d, "current", |_| true).await;
    annotator.sync(&c).await;
    assert!(!annotated("legacy", "legacy-app-6f5d4c3b2-m9n8b"));
    annotator.clear().await;
    assert!(!annotated("demo", "web-7d9f8c6b5-x2x4k"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_istio_crds_mean_no_policies_but_a_failing_list_means_no_state() {
    // No Istio CRDs installed: 404, treated as empty.
    let api = FakeApi::start();
    for obj in fixture()
        .into_iter()
        .filter(|o| !o["apiVersion"].as_str().unwrap().contains("istio"))
    {
        api.apply(obj);
    }
    for r in [
        "authorizationpolicies",
        "peerauthentications",
        "requestauthentications",
    ] {
        api.not_served(r);
    }
    let mut d = start(client(&api).await);
    let c = until(&mut d, "a snapshot without CRDs", |c| {
        !c.workloads.is_empty()
    })
    .await;
    assert!(c.policies.is_empty());

    // An API that fails from the start: no state is published at all (never a half-known
    // cluster, never a mesh without its policies).
    let failing = FakeApi::start();
    for obj in fixture() {
        failing.apply(obj);
    }
    failing.fail_with(Some(500));
    let d = start(client(&failing).await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        d.current().is_none(),
        "published state while the API was failing"
    );
}

/// Waypoints in Kubernetes mode: the Gateway and the routes come from the API like the
/// policies, a `istio.io/use-waypoint` label on the Service binds it to the Gateway, and the
/// Gateway's deletion leaves the binding pointing at nothing — refused, never bypassed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoints_and_routes_come_from_the_api() {
    use mesh_agent::l7::{
        binding::{Binding, WaypointRef, Waypoints},
        route::RouteTable,
    };
    let api = FakeApi::start();
    for obj in fixture() {
        api.apply(obj);
    }
    let gateway = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "demo"},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}});
    api.apply(gateway.clone());
    api.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "web", "namespace": "demo"},
        "spec": {"hosts": ["web"], "http": [{"timeout": "1s", "route": [{"destination": {"host": "web"}}]}]}}));
    let mut service = fixture()
        .into_iter()
        .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == "web")
        .unwrap();
    service["metadata"]["labels"]["istio.io/use-waypoint"] = json!("waypoint");
    api.apply(service);
    let mut d = start(client(&api).await);
    let c = until(&mut d, "the routing objects and the bound Service", |c| {
        c.policies.iter().any(|p| p.kind == "VirtualService")
            && c.services
                .iter()
                .any(|s| s.labels.contains_key("istio.io/use-waypoint"))
    })
    .await;
    let (routes, errors) = RouteTable::build(&c.policies);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(routes.len(), 1);
    let web = c.services.iter().find(|s| s.name == "web").unwrap();
    let (waypoints, errors) = Waypoints::of_config(&c);
    assert!(errors.is_empty(), "{errors:?}");
    let wp = WaypointRef {
        name: "waypoint".into(),
        namespace: "demo".into(),
    };
    assert_eq!(waypoints.of_service(&c, web), Binding::Waypoint(wp.clone()));

    api.delete(&gateway);
    let c = until(&mut d, "the Gateway gone", |c| {
        !c.policies.iter().any(|p| p.kind == "Gateway")
    })
    .await;
    let web = c.services.iter().find(|s| s.name == "web").unwrap();
    let (waypoints, _) = Waypoints::of_config(&c);
    assert_eq!(waypoints.of_service(&c, web), Binding::Missing(wp));
}

/// Sorted, so that two configurations built in different orders compare.
fn contents(c: &LocalConfig) -> Vec<String> {
    let mut out: Vec<String> = c
        .workloads
        .iter()
        .map(|w| format!("{w:?}"))
        .chain(c.services.iter().map(|s| {
            let mut s = s.clone();
            if let Some(e) = s.endpoints.as_mut() {
                e.sort();
            }
            format!("{s:?}")
        }))
        .collect();
    out.sort();
    out
}

/// Waits for the next update and applies it as the agent would.
async fn next_update(d: &mut KubeDiscovery) -> ConfigUpdate {
    tokio::time::timeout(Duration::from_secs(15), d.apply_next())
        .await
        .expect("no update")
        .expect("an update the agent would refuse")
}

/// Issue #19: other nodes' pods and the Services' endpoints change by delta (what changed, not
/// the whole cluster), and what the deltas add up to equals a fresh agent's full build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_pod_and_endpoint_churn_arrives_as_deltas_equal_to_a_full_build() {
    let api = FakeApi::start();
    for obj in fixture() {
        api.apply(obj);
    }
    let mut d = start(client(&api).await);
    assert!(matches!(next_update(&mut d).await, ConfigUpdate::Full(_)));

    // A new pod on another node, then one relabelled, then one gone.
    let mut pod = api.get("pods", "demo", "web-7d9f8c6b5-p4t6z").unwrap();
    pod["metadata"]["name"] = json!("web-7d9f8c6b5-zz9zz");
    pod["metadata"]["uid"] = json!("uid-zz9zz");
    pod["status"]["podIP"] = json!("10.244.2.33");
    pod["status"]["podIPs"] = json!([{"ip": "10.244.2.33"}]);
    api.apply(pod.clone());
    match next_update(&mut d).await {
        ConfigUpdate::Delta(delta) => {
            let keys: Vec<_> = delta.workloads.keys().collect();
            assert_eq!(
                keys,
                [&("demo".to_owned(), "web-7d9f8c6b5-zz9zz".to_owned())]
            );
            assert!(delta.services.is_empty());
        }
        other => panic!("a remote pod's arrival made {other:?}"),
    }
    let mut relabelled = api.get("pods", "demo", "web-7d9f8c6b5-p4t6z").unwrap();
    relabelled["metadata"]["labels"]["version"] = json!("v2");
    api.apply(relabelled);
    assert!(matches!(next_update(&mut d).await, ConfigUpdate::Delta(_)));
    api.delete(&pod);
    match next_update(&mut d).await {
        ConfigUpdate::Delta(delta) => assert_eq!(delta.new_workloads().count(), 0, "{delta:?}"),
        other => panic!("a remote pod's deletion made {other:?}"),
    }

    // An endpoint joins the Service through its EndpointSlice.
    let mut slice = api.get("endpointslices", "demo", "web-k7x2q").unwrap();
    slice["endpoints"]
        .as_array_mut()
        .unwrap()
        .push(json!({"addresses": ["10.244.2.40"], "conditions": {"ready": true}}));
    api.apply(slice);
    match next_update(&mut d).await {
        ConfigUpdate::Delta(delta) => {
            let keys: Vec<_> = delta.services.keys().collect();
            assert_eq!(keys, [&("demo".to_owned(), "web".to_owned())]);
        }
        other => panic!("an endpoint change made {other:?}"),
    }

    // A change to this node's pod too, its interface looked up again.
    let mut local = api.get("pods", "demo", "web-7d9f8c6b5-x2x4k").unwrap();
    local["metadata"]["labels"]["version"] = json!("v3");
    api.apply(local);
    match next_update(&mut d).await {
        ConfigUpdate::Delta(delta) => {
            let w = delta.new_workloads().next().unwrap();
            assert_eq!(w.host_interface.as_deref(), Some("veth1f3a9c2e"));
        }
        other => panic!("a local pod's relabelling made {other:?}"),
    }
    // A local pod whose interface is not there yet waits in a full build (and is looked for
    // again).
    let mut new_local = api.get("pods", "demo", "sleep-5c7d8f9b6-q8w2e").unwrap();
    new_local["metadata"]["name"] = json!("sleep-5c7d8f9b6-new01");
    new_local["metadata"]["uid"] = json!("uid-new01");
    new_local["status"]["podIP"] = json!("10.244.1.99");
    new_local["status"]["podIPs"] = json!([{"ip": "10.244.1.99"}]);
    api.apply(new_local);
    assert!(matches!(next_update(&mut d).await, ConfigUpdate::Full(_)));

    // Everything together equals what a freshly started agent builds whole.
    let by_deltas = settle(&mut d).await;
    let mut fresh = start(client(&api).await);
    let whole = until(&mut fresh, "a fresh full build", |c| {
        !c.workloads.is_empty()
    })
    .await;
    assert_eq!(contents(&by_deltas), contents(&whole));
}

/// The watchers list in pages of 500, as client-go does, and the API server answers each with a
/// continue token: a cluster larger than one page arrives whole, and a pod listed on the last
/// page is as present as one on the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_longer_than_one_page_arrives_whole() {
    let api = FakeApi::start();
    for obj in fixture() {
        api.apply(obj);
    }
    let template = api.get("pods", "demo", "web-7d9f8c6b5-p4t6z").unwrap();
    const EXTRA: usize = 1_234;
    for i in 0..EXTRA {
        let mut pod = template.clone();
        let ip = format!("10.250.{}.{}", i / 200, i % 200 + 1);
        pod["metadata"]["name"] = json!(format!("paged-{i:04}"));
        pod["metadata"]["uid"] = json!(format!("uid-paged-{i}"));
        pod["spec"]["nodeName"] = json!("kind-worker2");
        pod["status"]["podIP"] = json!(ip);
        pod["status"]["podIPs"] = json!([{ "ip": ip }]);
        api.apply(pod);
    }
    let mut d = start(client(&api).await);
    let c = until(&mut d, "every paged pod", |c| {
        c.workloads
            .iter()
            .filter(|w| w.name.starts_with("paged-"))
            .count()
            == EXTRA
    })
    .await;
    assert!(c.workloads.iter().any(|w| w.name == "paged-1233"));
    assert!(c.workloads.iter().any(|w| w.name == "web-7d9f8c6b5-p4t6z"));
    let pages = api
        .requests()
        .iter()
        .filter(|r| r.path == "/api/v1/pods" && !r.query.contains("watch="))
        .map(|r| r.query.contains("continue="))
        .collect::<Vec<_>>();
    assert!(
        pages.iter().filter(|c| **c).count() >= 2,
        "the pods were not listed in pages: {pages:?}"
    );
}
