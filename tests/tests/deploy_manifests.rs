//! deploy/ checked offline: every kustomization renders (`kubectl kustomize`), every object
//! parses into its k8s-openapi type with no field lost (a misspelled field is one the type does
//! not know), the Istio objects compile with the agent's own policy compiler, and the DaemonSet,
//! CA Deployment, Services and RBAC agree with what the binary actually uses (its ports, flags
//! and defaults, read from `mesh-agent --help`; the kinds discovery watches; the CA's names).
//! The Dockerfile is checked for the properties the issue asks for. Each capability the
//! DaemonSet grants is shown to be needed (root: the eBPF object does not load without it).
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use mesh_testbed::{binaries, can_run, deploy};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The kustomizations a user applies.
const KUSTOMIZATIONS: [&str; 7] = [
    "base",
    "crds",
    "crds/gateway-api",
    "overlays/kind",
    "overlays/minikube",
    "demo",
    "waypoint",
];

fn kubectl_available(test: &str) -> bool {
    mesh_testbed::privilege::has_tools(
        test,
        &["kubectl"],
        "its built-in kustomize renders deploy/; not a Debian package, so setup cannot add it",
    )
}

/// Paths present in `original` but missing or different after a typed round trip.
fn lost_fields(original: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (k, v) in o {
                let p = format!("{path}.{k}");
                match t.get(k) {
                    Some(tv) => lost_fields(v, tv, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(o), Value::Array(t)) if o.len() == t.len() => {
            for (i, (ov, tv)) in o.iter().zip(t).enumerate() {
                lost_fields(ov, tv, &format!("{path}[{i}]"), out);
            }
        }
        (o, t) if o == t => {}
        (o, t) => out.push(format!("{path}: {o} became {t}")),
    }
}

fn round_trip<T: DeserializeOwned + Serialize>(obj: &Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(obj.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut lost = Vec::new();
    lost_fields(obj, &back, "", &mut lost);
    if lost.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fields the type does not know: {}",
            lost.join(", ")
        ))
    }
}

/// Checks one rendered object against its type.
fn check_object(obj: &Value) -> Result<(), String> {
    let api = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    match (api, kind) {
        ("v1", "Namespace") => round_trip::<Namespace>(obj),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(obj),
        ("v1", "Service") => round_trip::<Service>(obj),
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(obj),
        ("apps/v1", "DaemonSet") => round_trip::<DaemonSet>(obj),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(obj),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(obj),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<ClusterRoleBinding>(obj)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(obj),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(obj),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            round_trip::<CustomResourceDefinition>(obj)
        }
        ("security.istio.io/v1", "AuthorizationPolicy") => {
            let raw: mesh_agent::policy::RawObject =
                serde_json::from_value(obj.clone()).map_err(|e| e.to_string())?;
            let entry = mesh_agent::policy::compile::compile_authorization(
                &raw,
                mesh_agent::policy::DEFAULT_ROOT_NAMESPACE,
            );
            match (&entry.policy, entry.notes.is_empty()) {
                (Ok(_), true) => Ok(()),
                (Ok(_), false) => Err(format!("compiles with notes: {:?}", entry.notes)),
                (Err(e), _) => Err(format!("the agent refuses it: {e}")),
            }
        }
        ("gateway.networking.k8s.io/v1", "Gateway") => {
            let raw: mesh_agent::policy::RawObject =
                serde_json::from_value(obj.clone()).map_err(|e| e.to_string())?;
            let (w, errors) = mesh_agent::l7::binding::Waypoints::build(&[raw]);
            match errors.first() {
                Some(e) => Err(format!("the agent refuses it: {e}")),
                None if w
                    .get(&mesh_agent::l7::binding::WaypointRef {
                        name: obj["metadata"]["name"].as_str().unwrap_or_default().into(),
                        namespace: obj["metadata"]["namespace"]
                            .as_str()
                            .unwrap_or_default()
                            .into(),
                    })
                    .is_none() =>
                {
                    Err("not a waypoint".into())
                }
                None => Ok(()),
            }
        }
        _ => Err(format!("no check for {api} {kind}: add one")),
    }
}

fn render(dir: &str) -> Vec<Value> {
    deploy::kustomize(&deploy::deploy_dir().join(dir)).unwrap_or_else(|e| panic!("{e:#}"))
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn typed<T: DeserializeOwned>(v: &Value) -> T {
    serde_json::from_value(v.clone()).unwrap()
}

/// `--flag`'s default as `mesh-agent <sub> --help` prints it.
fn help_default(help: &str, flag: &str) -> String {
    let start = help
        .find(&format!("--{flag} "))
        .or_else(|| help.find(&format!("--{flag}\n")))
        .unwrap_or_else(|| panic!("--{flag} not in help"));
    let rest = &help[start..];
    let end = rest.find("\n  -").unwrap_or(rest.len());
    let entry = &rest[..end];
    let d = entry
        .find("[default: ")
        .unwrap_or_else(|| panic!("--{flag} has no default: {entry}"));
    let v = &entry[d + "[default: ".len()..];
    v[..v.find(']').unwrap()].to_owned()
}

fn container_ports(c: &Container) -> BTreeSet<u16> {
    c.ports
        .iter()
        .flatten()
        .map(|p| p.container_port as u16)
        .collect()
}

fn pod_spec(workload: &Value) -> PodSpec {
    typed(&workload["spec"]["template"]["spec"])
}

#[test]
fn every_kustomization_renders_into_known_typed_objects() {
    if !kubectl_available("deploy manifests render") {
        return;
    }
    let mut problems = Vec::new();
    for dir in KUSTOMIZATIONS {
        let objs = render(dir);
        assert!(!objs.is_empty(), "{dir} rendered nothing");
        for obj in &objs {
            if let Err(e) = check_object(obj) {
                problems.push(format!(
                    "{dir}: {} {}: {e}",
                    obj["kind"], obj["metadata"]["name"]
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The round trip does catch a misspelling (the check can fail).
    let mut bad = find(&render("base"), "DaemonSet", "mesh-agent").clone();
    bad["spec"]["template"]["spec"]["hostNetwrk"] = Value::Bool(true);
    let err = check_object(&bad).unwrap_err();
    assert!(err.contains("hostNetwrk"), "{err}");
}

#[test]
fn the_daemonset_matches_what_the_agent_uses() {
    if !kubectl_available("DaemonSet vs agent") {
        return;
    }
    let objs = render("overlays/kind");
    let ds = find(&objs, "DaemonSet", "mesh-agent");
    let spec = pod_spec(ds);
    let agent = spec
        .containers
        .iter()
        .find(|c| c.name == "mesh-agent")
        .unwrap();
    let node_help = deploy::help(&["node"]);

    // Host networking: the agent attaches to the host's pod interfaces and listens there.
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));

    // Ports: none declared. With hostNetwork a declared port is a host port to the scheduler,
    // and the surge pod of an upgrade would stay Pending beside the old one
    // (kubernetes/kubernetes#106417).
    let metrics: u16 = help_default(&node_help, "metrics-port").parse().unwrap();
    let readiness: u16 = help_default(&node_help, "readiness-port").parse().unwrap();
    assert_eq!(container_ports(agent), BTreeSet::new());

    // Rollout: the new pod starts beside the old one and takes over; nothing is unavailable.
    let strategy = &ds["spec"]["updateStrategy"];
    assert_eq!(strategy["type"], "RollingUpdate");
    assert_eq!(strategy["rollingUpdate"]["maxSurge"], 1);
    assert_eq!(strategy["rollingUpdate"]["maxUnavailable"], 0);
    for probe in [&agent.readiness_probe, &agent.startup_probe] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap();
        assert_eq!(get.path.as_deref(), Some("/healthz/ready"));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(readiness.into())
        );
    }
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], metrics.to_string());

    // Arguments are real flags; the node name comes from the downward API.
    assert_eq!(agent.args.as_ref().unwrap()[0], "node");
    deploy::assert_flags_exist(agent.args.as_ref().unwrap(), &node_help, "DaemonSet");
    let env = agent.env.as_ref().unwrap();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
    assert!(node_help.contains("[env: NODE_NAME="));

    // Mounts: bpffs where the pins go, the CA root and token where the agent reads them.
    let mounts = agent.volume_mounts.as_ref().unwrap();
    let mount_of = |path: &str| {
        let path = Path::new(path);
        let m = mounts
            .iter()
            .filter(|m| path.starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("nothing mounted over {}", path.display()));
        let rel = path.strip_prefix(&m.mount_path).unwrap().to_owned();
        let vol = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .unwrap();
        (m.clone(), vol.clone(), rel)
    };
    let bpffs = help_default(&node_help, "bpffs-dir");
    assert_eq!(bpffs, mesh_agent::capture::DEFAULT_BPFFS_DIR);
    let (m, vol, _) = mount_of(&bpffs);
    assert_eq!(vol.host_path.as_ref().unwrap().path, "/sys/fs/bpf");
    assert_eq!(m.mount_propagation.as_deref(), Some("HostToContainer"));

    // Splicing finds pods' cgroups in the host's hierarchy, mounted read-only where the flag
    // points.
    let root = agent
        .args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix("--pod-cgroup-root="))
        .expect("the DaemonSet passes --pod-cgroup-root");
    let (m, vol, rel) = mount_of(root);
    assert_eq!(vol.host_path.as_ref().unwrap().path, "/sys/fs/cgroup");
    assert_eq!((m.read_only, rel), (Some(true), PathBuf::new()));

    let (_, vol, rel) = mount_of(&help_default(&node_help, "ca-root"));
    let cm = vol.config_map.unwrap();
    let names = mesh_agent::ca::root::RootObjects::new("mesh-system");
    assert_eq!(cm.name, names.root_configmap);
    assert_eq!(rel, Path::new(mesh_agent::identity::ca::ROOT_CERT_FILE));

    let (_, vol, rel) = mount_of(&help_default(&node_help, "ca-token"));
    let token = vol.projected.unwrap().sources.unwrap()[0]
        .service_account_token
        .clone()
        .unwrap();
    assert_eq!(
        token.audience.as_deref(),
        Some(mesh_agent::ca::auth::CA_AUDIENCE)
    );
    assert_eq!(Path::new(&token.path), rel);

    // The CA address names the CA's Service and port.
    let ca_address = agent
        .args
        .as_ref()
        .unwrap()
        .iter()
        .find_map(|a| a.strip_prefix("--ca-address="))
        .unwrap();
    let svc: Service = typed(find(&objs, "Service", "mesh-ca"));
    let port = svc.spec.unwrap().ports.unwrap()[0].port;
    assert_eq!(
        ca_address,
        format!(
            "https://mesh-ca.{}.svc:{port}",
            ds["metadata"]["namespace"].as_str().unwrap()
        )
    );

    // Privileges: uid 0 with exactly the capabilities tests/tests/kube_mode.rs runs it with.
    let sc = agent.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().add.clone().unwrap(),
        deploy::node_agent_capabilities().unwrap()
    );

    // Graceful termination: the old agent of an upgrade keeps its connections up to the
    // drain limit (the binary's default, 1 h), and the grace period outlasts it.
    let drain: i64 = agent
        .args
        .as_ref()
        .unwrap()
        .iter()
        .find_map(|a| a.strip_prefix("--drain-seconds="))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(drain.to_string(), help_default(&node_help, "drain-seconds"));
    assert!(spec.termination_grace_period_seconds.unwrap() > drain);
    assert!(agent.resources.as_ref().unwrap().requests.is_some());

    // The service account is the one the CA lets ask for other identities.
    let ca_help = deploy::help(&["ca", "serve"]);
    assert_eq!(
        help_default(&ca_help, "node-agent"),
        format!(
            "{}/{}",
            ds["metadata"]["namespace"].as_str().unwrap(),
            spec.service_account_name.as_deref().unwrap()
        )
    );
}

#[test]
fn the_ca_deployment_services_and_rbac_match_the_binary() {
    if !kubectl_available("CA, Services, RBAC vs agent") {
        return;
    }
    let objs = render("overlays/minikube");
    let ca_help = deploy::help(&["ca", "serve"]);

    // The CA: its real flags, its listen port exposed by the Service, non-root.
    let spec = pod_spec(find(&objs, "Deployment", "mesh-ca"));
    let ca = &spec.containers[0];
    let args = ca.args.as_ref().unwrap();
    assert_eq!(&args[..2], ["ca", "serve"]);
    deploy::assert_flags_exist(args, &ca_help, "CA Deployment");
    let listen = args
        .iter()
        .find_map(|a| a.strip_prefix("--listen="))
        .map_or_else(|| help_default(&ca_help, "listen"), str::to_owned);
    let listen_port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
    let metrics_port: u16 = help_default(&ca_help, "metrics-listen")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        container_ports(ca),
        BTreeSet::from([listen_port, metrics_port])
    );
    let ca_annotations =
        &find(&objs, "Deployment", "mesh-ca")["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        ca_annotations["prometheus.io/port"],
        metrics_port.to_string()
    );
    assert!(ca_help.contains("[env: POD_NAMESPACE="));
    assert!(ca.env.iter().flatten().any(|e| e.name == "POD_NAMESPACE"));
    let psc = spec.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    let svc: Service = typed(find(&objs, "Service", "mesh-ca"));
    let sp = &svc.spec.unwrap().ports.unwrap()[0];
    assert_eq!(sp.port, i32::from(listen_port));

    // Every image is the locally loaded one, never pulled.
    for o in objs.iter().filter(|o| o["spec"]["template"].is_object()) {
        let spec = pod_spec(o);
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            assert_eq!(c.image.as_deref(), Some("mesh-agent:dev"), "{}", c.name);
            assert_eq!(c.image_pull_policy.as_deref(), Some("Never"), "{}", c.name);
        }
    }

    // RBAC: the agent may watch every kind discovery watches and nothing it does not use.
    let agent: ClusterRole = typed(find(&objs, "ClusterRole", "mesh-agent"));
    let rules = agent.rules.unwrap();
    let allows = |rules: &[PolicyRule], group: &str, resource: &str, verb: &str| {
        rules.iter().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    for (group, resource) in [
        ("", "namespaces"),
        ("", "pods"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
    ]
    .into_iter()
    .chain(
        mesh_agent::discovery::kube::ISTIO_KINDS
            .iter()
            .map(|(_, plural)| ("security.istio.io", *plural)),
    )
    .chain(
        mesh_agent::discovery::kube::ROUTING_KINDS
            .iter()
            .map(|(group, _, _, plural)| (*group, *plural)),
    ) {
        for verb in ["list", "watch"] {
            assert!(
                allows(&rules, group, resource, verb),
                "{verb} {group}/{resource}"
            );
        }
    }
    assert!(allows(&rules, "", "pods", "patch"));
    for r in &rules {
        assert!(
            !r.resources
                .iter()
                .flatten()
                .any(|x| x == "secrets" || x == "*")
        );
        assert!(
            !r.verbs
                .iter()
                .any(|v| ["*", "create", "delete", "update"].contains(&v.as_str()))
        );
    }
    // The CA: token reviews and pod lookups cluster-wide; its own Secrets and ConfigMap.
    let ca_rules = typed::<ClusterRole>(find(&objs, "ClusterRole", "mesh-ca"))
        .rules
        .unwrap();
    assert!(allows(
        &ca_rules,
        "authentication.k8s.io",
        "tokenreviews",
        "create"
    ));
    assert!(allows(&ca_rules, "", "pods", "list"));
    assert!(
        !ca_rules
            .iter()
            .any(|r| r.resources.iter().flatten().any(|x| x == "secrets"))
    );
    let role = typed::<Role>(find(&objs, "Role", "mesh-ca")).rules.unwrap();
    let names = mesh_agent::ca::root::RootObjects::new("mesh-system");
    for secret in [&names.cacerts_secret, &names.root_secret] {
        assert!(role.iter().any(|r| {
            r.resource_names.iter().flatten().any(|n| n == secret)
                && r.verbs.iter().any(|v| v == "get")
        }));
    }
    assert!(role.iter().any(|r| {
        r.resource_names
            .iter()
            .flatten()
            .any(|n| *n == names.root_configmap)
            && r.verbs.iter().any(|v| v == "update")
    }));

    // The metrics Service and its scrape annotations point at the agent's metrics port.
    let node_help = deploy::help(&["node"]);
    let metrics = help_default(&node_help, "metrics-port");
    let m = find(&objs, "Service", "mesh-agent-metrics");
    assert_eq!(m["metadata"]["annotations"]["prometheus.io/port"], metrics);
    assert_eq!(m["spec"]["ports"][0]["port"].to_string(), metrics);
}

/// The hand-written waypoint: its pods carry the labels that make them the Gateway's (and keep
/// node agents from capturing them), its flags are the binary's, its RBAC covers the watches.
#[test]
fn the_waypoint_manifest_and_the_controllers_rbac_match_the_binary() {
    if !kubectl_available("waypoint manifest") {
        return;
    }
    // The user writes a Gateway only; the CA's controller makes the rest.
    let objs = render("waypoint");
    assert_eq!(objs.len(), 1, "only the Gateway");
    let gateway = find(&objs, "Gateway", "waypoint");
    let class = gateway["spec"]["gatewayClassName"].as_str().unwrap();
    assert!(mesh_agent::l7::binding::WAYPOINT_CLASSES.contains(&class));

    let base = render("base");
    let allows = |rules: &[PolicyRule], group: &str, resource: &str, verb: &str, name: &str| {
        rules.iter().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
                && r.resource_names
                    .as_ref()
                    .is_none_or(|names| names.iter().any(|n| n == name))
        })
    };
    // What waypoints may read: every kind they watch, and nothing else.
    let waypoint_role = mesh_agent::controller::waypoint::WAYPOINT_CLUSTER_ROLE;
    let rules = typed::<ClusterRole>(find(&base, "ClusterRole", waypoint_role))
        .rules
        .unwrap();
    for (group, _, _, plural) in mesh_agent::discovery::kube::ROUTING_KINDS {
        assert!(
            allows(&rules, group, plural, "watch", ""),
            "watch {group}/{plural}"
        );
    }
    for resource in ["namespaces", "services", "pods"] {
        assert!(
            allows(&rules, "", resource, "watch", ""),
            "watch {resource}"
        );
    }
    assert!(
        rules
            .iter()
            .all(|r| r.verbs.iter().all(|v| v == "list" || v == "watch"))
    );
    // What the controller in the CA writes.
    let ca = typed::<ClusterRole>(find(&base, "ClusterRole", "mesh-ca"))
        .rules
        .unwrap();
    let binding = mesh_agent::controller::waypoint::WAYPOINT_ROLE_BINDING;
    let class = mesh_agent::controller::waypoint::WAYPOINT_CLASS;
    let configmap = mesh_agent::controller::root_cert::ROOT_CONFIGMAP;
    for (group, resource, verbs, name) in [
        (
            "gateway.networking.k8s.io",
            "gateways",
            &["list", "watch"][..],
            "",
        ),
        (
            "gateway.networking.k8s.io",
            "gateways/status",
            &["patch"],
            "",
        ),
        (
            "gateway.networking.k8s.io",
            "gatewayclasses",
            &["create", "patch"],
            class,
        ),
        (
            "",
            "serviceaccounts",
            &["get", "list", "watch", "create", "patch", "delete"],
            "",
        ),
        (
            "",
            "services",
            &["get", "list", "watch", "create", "patch", "delete"],
            "",
        ),
        (
            "apps",
            "deployments",
            &["get", "list", "watch", "create", "patch", "delete"],
            "",
        ),
        (
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            &["list", "watch", "create", "patch"],
            binding,
        ),
        (
            "rbac.authorization.k8s.io",
            "clusterroles",
            &["bind"],
            waypoint_role,
        ),
        ("", "namespaces", &["list", "watch"], ""),
        (
            "",
            "configmaps",
            &["list", "watch", "create", "patch"],
            configmap,
        ),
    ] {
        for verb in verbs {
            assert!(
                allows(&ca, group, resource, verb, name),
                "mesh-ca: {verb} {group}/{resource} {name}"
            );
        }
    }
    // bind only for the waypoints' role: the CA cannot hand out any other.
    for r in ca.iter().filter(|r| r.verbs.iter().any(|v| v == "bind")) {
        assert_eq!(
            r.resource_names.as_deref(),
            Some(&[waypoint_role.to_owned()][..])
        );
    }
    // Waypoints run the CA pod's own image: it knows its pod name.
    let spec = pod_spec(find(&base, "Deployment", "mesh-ca"));
    assert!(
        spec.containers[0]
            .env
            .iter()
            .flatten()
            .any(|e| e.name == "POD_NAME")
    );
    assert!(deploy::help(&["ca", "serve"]).contains("[env: POD_NAME="));
}

#[test]
fn crds_serve_the_versions_the_agent_reads() {
    if !kubectl_available("CRDs") {
        return;
    }
    let objs = render("crds");
    for (kind, plural) in mesh_agent::discovery::kube::ISTIO_KINDS {
        let crd: CustomResourceDefinition = typed(find(
            &objs,
            "CustomResourceDefinition",
            &format!("{plural}.security.istio.io"),
        ));
        assert_eq!(crd.spec.names.kind, kind);
        assert_eq!(crd.spec.scope, "Namespaced");
        let served: Vec<_> = crd
            .spec
            .versions
            .iter()
            .filter(|v| v.served)
            .map(|v| (v.name.as_str(), v.storage))
            .collect();
        assert_eq!(served, [("v1", true), ("v1beta1", false)], "{kind}");
    }
    // The routing kinds: Istio's networking kinds here, Gateway API's in crds/gateway-api.
    let gateway_api = render("crds/gateway-api");
    for (group, version, kind, plural) in mesh_agent::discovery::kube::ROUTING_KINDS {
        let objs = if group == "networking.istio.io" {
            &objs
        } else {
            &gateway_api
        };
        let crd: CustomResourceDefinition = typed(find(
            objs,
            "CustomResourceDefinition",
            &format!("{plural}.{group}"),
        ));
        assert_eq!(crd.spec.names.kind, kind);
        assert!(
            crd.spec
                .versions
                .iter()
                .any(|v| v.name == version && v.served && v.storage),
            "{kind} {version}"
        );
        if kind == "Gateway" {
            let v = &crd.spec.versions[0];
            assert!(
                v.subresources.as_ref().is_some_and(|s| s.status.is_some()),
                "status"
            );
        }
    }
}

#[test]
fn the_kind_config_and_dockerfile_are_sound() {
    let dir = deploy::deploy_dir();
    let kind = std::fs::read_to_string(dir.join("kind/cluster.yaml")).unwrap();
    let kind: Value = deploy::parse_documents(&kind).unwrap().remove(0);
    assert_eq!(kind["apiVersion"], "kind.x-k8s.io/v1alpha4");
    assert_eq!(kind["kind"], "Cluster");
    let roles: Vec<_> = kind["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["role"].clone())
        .collect();
    assert!(
        roles.iter().filter(|r| *r == "worker").count() >= 2,
        "traffic must cross nodes"
    );
    // kindnet (routed /32 per pod) is what the agent's host locator expects: keep it.
    assert!(kind["networking"]["disableDefaultCNI"] != true);

    let text = std::fs::read_to_string(dir.join("Dockerfile")).unwrap();
    let problems = mesh_testbed::deploy::lint_dockerfile(&text);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The lint can fail.
    assert!(!mesh_testbed::deploy::lint_dockerfile("FROM debian:latest\nRUN true\n").is_empty());
    let ignore = std::fs::read_to_string(dir.join("Dockerfile.dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "the build context must skip target/"
    );
    // The builder (the first FROM) is the workspace's rust-version, and exactly the
    // toolchain the code layout's names come from.
    let builder = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("FROM "))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a FROM instruction");
    let tag = builder
        .strip_prefix("rust:")
        .unwrap_or_else(|| panic!("the builder is {builder}, not a rust image"));
    let workspace = std::fs::read_to_string(dir.join("../Cargo.toml")).unwrap();
    let want = workspace
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    assert!(
        tag.starts_with(&format!("{want}.")) || tag.starts_with(&format!("{want}-")),
        "builder {builder} must be rust {want}"
    );
    let order = std::fs::read_to_string(dir.join("../mesh-agent/code-order.txt")).unwrap();
    let made_with = order
        .lines()
        .find_map(|l| l.strip_prefix("# made with rustc "))
        .and_then(|l| l.split_whitespace().next())
        .expect("code-order.txt names the toolchain it was made with");
    assert!(
        tag.starts_with(&format!("{made_with}-")),
        "builder {builder} must be rust:{made_with}-…, the toolchain of mesh-agent/code-order.txt"
    );
}

#[test]
fn each_capability_the_daemonset_grants_is_needed() {
    if !can_run("capabilities are needed", &["setpriv"]) {
        return;
    }
    let caps = deploy::node_agent_capabilities().unwrap();
    let bin = binaries::mesh_agent().unwrap();
    let check = |caps: &[String]| {
        let argv = deploy::with_only_capabilities(caps, bin.to_str().unwrap(), &["ebpf", "check"]);
        Command::new("setpriv").args(&argv).output().unwrap()
    };
    let all = check(&caps);
    assert!(
        all.status.success(),
        "{}",
        String::from_utf8_lossy(&all.stderr)
    );
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let out = check(&fewer);
        assert!(
            !out.status.success(),
            "the data path loads without CAP_{missing}: drop it from the DaemonSet"
        );
    }
}
