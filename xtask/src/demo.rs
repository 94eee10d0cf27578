//! `cargo xtask demo`: the mesh on a 2-node testbed, end to end, with real clients.
//!
//! Builds everything (after setup if needed), creates a throwaway CA and a testbed with a client
//! and a server pod per node (enrolled) and a non-enrolled pod, runs one agent per node in local
//! mode, sends real traffic (curl and iperf3), checks on the fabric link that cross-node mesh
//! bytes are TLS (a sniffer finds no plaintext marker, while it does find the marker of a non-mesh
//! flow), prints each agent's key metrics and one access-log line per connection with
//! identities and bytes; then the L7 act (`demo_l7.rs`): a waypoint in front of a three-version
//! service, one traffic-management feature per step; and tears it all down.
use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_testbed::{Background, Pod, Testbed, TestbedSpec};
use serde_json::Value;

use crate::{cargo, cmd, ensure_setup, setup, workspace_root};

const MARKER: &str = "DEMO-PLAINTEXT-MARKER-7f3a";

pub fn run() -> Result<()> {
    if !setup::is_root() {
        bail!("the demo builds network namespaces and loads eBPF: run it as root");
    }
    step("setup");
    ensure_setup()?;
    step("build");
    cmd::run(&mut cargo(&["build", "--bins"]))?;
    let bin = workspace_root().join("target/debug");
    let (agent, probe) = (bin.join("mesh-agent"), bin.join("mtb-probe"));

    step("testbed: 2 nodes, 6 pods each (pods 1-2 enrolled, pod 3 not; pods 4-6 for the L7 act)");
    let tb = Testbed::build(TestbedSpec {
        nodes: 2,
        pods_per_node: 6,
    })?;
    let ca = std::env::temp_dir().join(format!("mesh-demo-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&ca);
    let result = demo(&tb, &agent, &probe, &ca);
    let _ = std::fs::remove_dir_all(&ca);
    step("teardown");
    tb.teardown_verified().context("tearing the testbed down")?;
    match &result {
        Ok(()) => println!("\n✓ demo passed"),
        Err(e) => println!("\n✗ demo failed: {e:#}"),
    }
    result
}

fn demo(tb: &Testbed, agent: &Path, probe: &Path, ca: &Path) -> Result<()> {
    step("mesh CA");
    cmd::run(
        std::process::Command::new(agent)
            .args(["ca", "init", "--out"])
            .arg(ca),
    )?;

    step("node agents (local mode, HBONE)");
    let mut agents = Vec::new();
    for node in 1..=2 {
        let config = ca.join(format!("node{node}.yaml"));
        std::fs::write(&config, config_yaml(tb, node, ca))?;
        let bpffs = tb.bpffs_dir().join(format!("agent-node{node}"));
        let mut a = tb.node(node).place.spawn(
            agent.to_str().context("path")?,
            &[
                "--log-format",
                "json",
                "node",
                "--config",
                config.to_str().context("path")?,
                "--bpffs-dir",
                bpffs.to_str().context("path")?,
            ],
        )?;
        for port in [15001, 15006, 15008] {
            a.wait_listening(port, Duration::from_secs(20))
                .with_context(|| format!("agent of node{node}"))?;
        }
        println!("  node{node}: agent up (15001 outbound, 15006 plaintext in, 15008 HBONE)");
        agents.push(a);
    }

    step("servers: an HTTP server and iperf3 in each node's pod 2");
    let mut servers: Vec<Background> = Vec::new();
    for node in 1..=2 {
        let p = tb.pod(node, 2);
        let mut http = p
            .place
            .spawn(probe.to_str().context("path")?, &["http", "8080", p.name()])?;
        http.wait_listening(8080, Duration::from_secs(10))?;
        servers.push(http);
    }

    step("sniffer on the fabric (the LAN between the nodes)");
    let sniffer = tb.info().fabric.spawn(
        "tcpdump",
        &["-i", "br0", "-n", "-l", "-A", "-s", "0", "tcp"],
    )?;
    std::thread::sleep(Duration::from_millis(500));

    step("traffic");
    let (c1, s1, c2, s2, plain) = (
        tb.pod(1, 1),
        tb.pod(1, 2),
        tb.pod(2, 1),
        tb.pod(2, 2),
        tb.pod(1, 3),
    );
    for v6 in [false, true] {
        curl(c1, s2, v6, "cross-node, through HBONE")?;
        curl(c2, s1, v6, "cross-node, the other way")?;
    }
    curl(
        c1,
        s1,
        false,
        "same node: no TLS needed, nothing leaves the node",
    )?;
    // The client is not in the mesh, so this one is plaintext on the wire by design (PERMISSIVE):
    // the sniffer must see its marker, or it would not have caught a leak either.
    curl(
        plain,
        s2,
        false,
        "non-enrolled client to an enrolled server (PERMISSIVE, not meshed)",
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let wire = String::from_utf8_lossy(&sniffer.kill()?.stdout).into_owned();
    iperf3(c1, s2)?;
    step("what crossed the fabric");
    let leaks = wire.matches(&format!("{MARKER}-mesh")).count();
    let control = wire.matches(&format!("{MARKER}-plain")).count();
    let hbone = wire.lines().filter(|l| l.contains(".15008")).count();
    println!("  packets to/from port 15008 (HBONE):           {hbone}");
    println!("  mesh marker seen in plaintext:                {leaks}");
    println!("  non-mesh control marker seen in plaintext:    {control}");
    ensure!(hbone > 0, "no HBONE traffic on the fabric");
    ensure!(leaks == 0, "mesh traffic crossed the fabric in plaintext");
    ensure!(
        control > 0,
        "the sniffer saw no plaintext at all: it would not have caught a leak"
    );
    println!("  ✓ cross-node mesh traffic is TLS on the wire");

    step(
        "metrics, as each agent's Prometheus endpoint (:15020) reports them (`mesh-agent metrics`)",
    );
    for node in 1..=2 {
        let out = tb
            .node(node)
            .place
            .run(agent.to_str().context("path")?, &["metrics", "--top", "6"])?;
        println!("  node{node}:");
        for line in out.lines() {
            println!("    {line}");
        }
    }

    crate::demo_l7::run(tb, agent, probe, ca, &config_yaml(tb, 1, ca))?;

    step("flows, as the agents' access logs recorded them");
    println!(
        "  (iperf3's data connection ends in a reset: its server closes it with the last bytes"
    );
    println!("   still in flight; the reset crossed the mesh like the data did)");
    drop(servers);
    let mut l7 = 0;
    for (i, a) in agents.into_iter().enumerate() {
        let out = a.terminate(Duration::from_secs(10))?;
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            if let Some(f) = flow_line(i + 1, line) {
                // The L7 act's connections (to the VIP, from the waypoint) are summed up.
                if f.contains(crate::demo_l7::VIP) || f.contains("/sa/waypoint") {
                    l7 += 1;
                } else {
                    println!("  {f}");
                }
            }
        }
    }
    println!(
        "  … and {l7} connections of the L7 act (clients → waypoint, waypoint → reviews pods)"
    );
    Ok(())
}

pub fn step(what: &str) {
    println!("\n==> {what}");
}

fn curl(client: &Pod, server: &Pod, v6: bool, what: &str) -> Result<()> {
    let host = if v6 {
        format!("[{}]", server.ipv6)
    } else {
        server.ipv4.to_string()
    };
    let kind = if what.contains("not meshed") {
        "plain"
    } else {
        "mesh"
    };
    let out = client.place.run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "-H",
            &format!("x-demo: {MARKER}-{kind}"),
            &format!("http://{host}:8080/"),
        ],
    )?;
    println!(
        "  {:<11} → {:<11} {:<5} {what}: {}",
        client.name(),
        server.name(),
        if v6 { "IPv6" } else { "IPv4" },
        out.trim()
    );
    Ok(())
}

fn iperf3(client: &Pod, server: &Pod) -> Result<()> {
    let t = mesh_testbed::traffic::iperf3_send(
        &client.place,
        &server.place,
        server.ipv4.into(),
        5201,
        256 << 20,
    )?;
    println!(
        "  {:<11} → {:<11} IPv4  iperf3 through HBONE: {} MiB sent",
        client.name(),
        server.name(),
        t.bytes_sent >> 20
    );
    Ok(())
}

/// One line per finished connection from an agent's JSON access log.
fn flow_line(node: usize, line: &str) -> Option<String> {
    let v: Value = serde_json::from_str(line).ok()?;
    if v["target"].as_str() != Some("access") {
        return None;
    }
    let f = &v["fields"];
    let s = |k: &str| f[k].as_str().unwrap_or("-").to_owned();
    let outcome = match (s("response_flags").as_str(), s("error").as_str()) {
        ("-", "-") => "ok".to_owned(),
        ("-", e) => format!("reset ({e})"),
        (flags, e) => format!("{flags} ({e})"),
    };
    Some(format!(
        "node{node} {:<8} {} ({}) → {} ({}) {} · {} · {} B request / {} B response · {}",
        s("direction"),
        s("src.workload"),
        s("src.identity"),
        s("dst.workload"),
        s("dst.identity"),
        s("dst.addr"),
        f["security"].as_str().unwrap_or("-"),
        f["bytes_recv"],
        f["bytes_sent"],
        outcome
    ))
}

fn config_yaml(tb: &Testbed, node: usize, ca: &Path) -> String {
    let mut y = format!(
        "node: {{name: node{node}, uplinks: [{}]}}\nca: {{dir: {}}}\nnamespaces:\n  - {{name: demo, labels: {{istio.io/dataplane-mode: ambient}}}}\n  - {{name: plain}}\nworkloads:\n",
        tb.node(node).uplink,
        ca.display()
    );
    for p in tb.pods() {
        let (ns, sa, labels) = match (p.index, crate::demo_l7::role((p.node, p.index))) {
            (_, Some((name, labels))) => ("demo", name, labels),
            (1, None) => ("demo", "client", ""),
            (2, None) => ("demo", "server", ""),
            _ => ("plain", "default", ""),
        };
        y += &format!(
            "  - {{name: {}, namespace: {ns}, serviceAccount: {sa}, node: node{}, ips: [{}, \"{}\"], hostInterface: {}, cgroup: {}, labels: {{{labels}}}}}\n",
            p.name(),
            p.node,
            p.ipv4,
            p.ipv6,
            p.host_veth,
            p.place.cgroup.display()
        );
    }
    y + &crate::demo_l7::config_tail()
}
