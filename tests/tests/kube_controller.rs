//! The control plane's controllers, end to end: a real `mesh-agent ca serve` process against the
//! Kubernetes API server double. A Gateway of class mesh-waypoint becomes a ServiceAccount,
//! Deployment and Service (owned by the Gateway, running the CA's own image with real flags of
//! the binary), one ClusterRoleBinding lists the waypoints' accounts, the Gateway's status
//! follows its pod; drift is repaired, a deleted Gateway takes its objects along, and what is
//! not ours is never touched (a Gateway named like a workload's ServiceAccount is refused).
//! Every namespace gets the root ConfigMap. Needs no privileges.
mod support;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use mesh_agent::controller::{
    root_cert::ROOT_CONFIGMAP,
    waypoint::{MANAGED_BY_LABEL, WAYPOINT_CLASS, WAYPOINT_CLUSTER_ROLE, WAYPOINT_ROLE_BINDING},
};
use mesh_testbed::{binaries, deploy, fakeapi::FakeApi};
use serde_json::{Value, json};
use support::TempDir;

/// The CA process, killed (and its log printed) when the test ends, passing or not.
struct Ca {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- the CA's log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

fn gateway(ns: &str, name: &str, class: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns, "generation": 1},
        "spec": {"gatewayClassName": class,
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    })
}

/// Polls `f` until it gives Some, for up to 20 s.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_ca(api: &FakeApi, work: &Path) -> Ca {
    // The CA's own pod: waypoints run its image and pull policy.
    api.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "mesh-ca-0", "namespace": "mesh-system"},
        "spec": {"containers": [{"name": "mesh-ca", "image": "mesh-agent:dev", "imagePullPolicy": "Never"}]},
    }));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let kc = api.write_kubeconfig(work);
    let log = work.join("ca.log");
    let child = Command::new(binaries::mesh_agent().unwrap())
        .args(["ca", "serve", "--listen", &format!("127.0.0.1:{port}")])
        // Not the host's 15014: other tests and agents may run on this machine.
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(["--namespace", "mesh-system", "--pod-name", "mesh-ca-0"])
        .arg("--kubeconfig")
        .arg(&kc)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Ca { child, log }
}

#[test]
fn waypoint_gateways_are_provisioned_kept_in_step_and_cleaned_up() {
    let work =
        TempDir(std::env::temp_dir().join(format!("mesh-controller-{}", std::process::id())));
    std::fs::create_dir_all(work.path()).unwrap();
    let api = FakeApi::start();
    for ns in ["mesh-system", "demo", "other", "kube-system"] {
        api.apply(namespace(ns));
    }
    // A workload's own ServiceAccount, not ours.
    api.apply(json!({"apiVersion": "v1", "kind": "ServiceAccount",
                     "metadata": {"name": "reviews", "namespace": "demo"}}));
    let _ca = start_ca(&api, work.path());

    // The root in every namespace but Kubernetes' own.
    let root = wait_for("the CA's root", || {
        api.get("configmaps", "mesh-system", ROOT_CONFIGMAP)
    })["data"]["root-cert.pem"]
        .clone();
    for ns in ["demo", "other"] {
        let cm = wait_for(&format!("the root in {ns}"), || {
            api.get("configmaps", ns, ROOT_CONFIGMAP)
        });
        assert_eq!(cm["data"]["root-cert.pem"], root);
    }
    assert!(
        api.get("configmaps", "kube-system", ROOT_CONFIGMAP)
            .is_none()
    );
    // The class, as istiod creates istio-waypoint.
    let class = wait_for("the GatewayClass", || {
        api.get("gatewayclasses", "", WAYPOINT_CLASS)
    });
    assert_eq!(
        class["spec"]["controllerName"],
        "mesh-agent.io/waypoint-controller"
    );

    // A waypoint Gateway, and one of another class.
    let gw = api.apply(gateway("demo", "waypoint", "mesh-waypoint"));
    api.apply(gateway("demo", "ingress", "nginx"));
    let deployment = wait_for("the waypoint Deployment", || {
        api.get("deployments", "demo", "waypoint")
    });
    let sa = wait_for("its ServiceAccount", || {
        api.get("serviceaccounts", "demo", "waypoint")
    });
    let svc = wait_for("its Service", || api.get("services", "demo", "waypoint"));
    for obj in [&deployment, &sa, &svc] {
        let owner = &obj["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Gateway");
        assert_eq!(owner["uid"], gw["metadata"]["uid"], "owned by the Gateway");
        assert_eq!(
            obj["metadata"]["labels"][MANAGED_BY_LABEL],
            "mesh-agent-controller"
        );
    }
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "mesh-agent:dev", "the CA's own image");
    assert_eq!(container["imagePullPolicy"], "Never");
    assert_eq!(pod["serviceAccountName"], "waypoint");
    let args: Vec<String> = serde_json::from_value(container["args"].clone()).unwrap();
    assert_eq!(args[0], "waypoint");
    deploy::assert_flags_exist(
        &args[1..],
        &deploy::help(&["waypoint"]),
        "provisioned waypoint",
    );
    assert!(
        args.contains(&"--gateway=demo/waypoint".to_owned()),
        "{args:?}"
    );
    assert!(
        args.iter()
            .any(|a| a.starts_with("--ca-address=https://mesh-ca.mesh-system.svc:")),
        "{args:?}"
    );
    assert_eq!(svc["spec"]["ports"][0]["port"], 15008);
    assert!(
        api.get("deployments", "demo", "ingress").is_none(),
        "not our class"
    );
    let crb = wait_for("the waypoints' ClusterRoleBinding", || {
        api.get("clusterrolebindings", "", WAYPOINT_ROLE_BINDING)
    });
    assert_eq!(crb["roleRef"]["name"], WAYPOINT_CLUSTER_ROLE);
    assert_eq!(
        crb["subjects"],
        json!([{"kind": "ServiceAccount", "name": "waypoint", "namespace": "demo"}])
    );

    // Status: accepted, not programmed until a pod is available; then programmed, with the
    // Service's address.
    let status = |want: &str| {
        wait_for(&format!("Programmed={want}"), || {
            let g = api.get("gateways", "demo", "waypoint")?;
            let conditions = g["status"]["conditions"].as_array()?.clone();
            let programmed = conditions.iter().find(|c| c["type"] == "Programmed")?;
            (programmed["status"] == want).then(|| g["status"].clone())
        })
    };
    let pending = status("False");
    assert_eq!(pending["conditions"][0]["type"], "Accepted");
    assert_eq!(pending["conditions"][0]["status"], "True");
    let mut ready = api.get("deployments", "demo", "waypoint").unwrap();
    ready["status"] = json!({"availableReplicas": 1});
    api.apply(ready);
    let mut with_ip = api.get("services", "demo", "waypoint").unwrap();
    with_ip["spec"]["clusterIP"] = json!("10.96.7.7");
    api.apply(with_ip);
    let programmed = status("True");
    assert_eq!(programmed["addresses"][0]["value"], "10.96.7.7");

    // Drift: a deleted Deployment is made again; an edited one is put back.
    let before = api.get("deployments", "demo", "waypoint").unwrap();
    api.delete(&before);
    wait_for("the Deployment made again", || {
        api.get("deployments", "demo", "waypoint")
    });
    let mut edited = api.get("deployments", "demo", "waypoint").unwrap();
    edited["spec"]["template"]["spec"]["serviceAccountName"] = json!("reviews");
    api.apply(edited);
    wait_for("the Deployment put back", || {
        let d = api.get("deployments", "demo", "waypoint")?;
        (d["spec"]["template"]["spec"]["serviceAccountName"] == "waypoint").then_some(())
    });

    // A Gateway named like a workload's ServiceAccount would run with that identity: refused.
    api.apply(gateway("demo", "reviews", "istio-waypoint"));
    let refused = wait_for("the refusal in the status", || {
        let g = api.get("gateways", "demo", "reviews")?;
        let c = g["status"]["conditions"].as_array()?.get(1)?.clone();
        (c["reason"] == "Invalid").then_some(c)
    });
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("ServiceAccount demo/reviews exists and is not managed by mesh-agent"),
        "{refused}"
    );
    assert!(api.get("deployments", "demo", "reviews").is_none());
    let theirs = api.get("serviceaccounts", "demo", "reviews").unwrap();
    assert!(
        theirs["metadata"]["labels"].is_null(),
        "left as it was: {theirs}"
    );

    // A second waypoint elsewhere joins the binding; a new namespace gets the root.
    api.apply(namespace("late"));
    api.apply(gateway("late", "wp", "mesh-waypoint"));
    wait_for("both accounts bound", || {
        let crb = api.get("clusterrolebindings", "", WAYPOINT_ROLE_BINDING)?;
        (crb["subjects"].as_array()?.len() == 2).then_some(())
    });
    wait_for("the root in a new namespace", || {
        api.get("configmaps", "late", ROOT_CONFIGMAP)
    });

    // A deleted Gateway takes its objects along, and leaves the binding.
    api.delete(&api.get("gateways", "demo", "waypoint").unwrap());
    for resource in ["deployments", "services", "serviceaccounts"] {
        wait_for(&format!("{resource} demo/waypoint deleted"), || {
            api.get(resource, "demo", "waypoint")
                .is_none()
                .then_some(())
        });
    }
    let crb = wait_for("the binding without it", || {
        let crb = api.get("clusterrolebindings", "", WAYPOINT_ROLE_BINDING)?;
        (crb["subjects"].as_array()?.len() == 1).then_some(crb)
    });
    assert_eq!(crb["subjects"][0]["namespace"], "late");
    assert!(api.get("deployments", "late", "wp").is_some());
    assert!(
        api.get("serviceaccounts", "demo", "reviews").is_some(),
        "never ours"
    );
}
