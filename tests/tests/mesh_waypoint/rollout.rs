//! Step 14 of the waypoint test: a rollout of the waypoint, as a Deployment does it.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mesh_testbed::{http::http_get, probe::Probe};

use super::{ALL_TO_V1, NEW_WAYPOINT_POD, REVIEWS_VIP, Rig, WAYPOINT_POD, reviews};

/// Step 14: a TCP connection opened through the old waypoint stays open (idle) across the
/// rollout (the old pod signalled, then listed as terminating, then gone once it exited) and
/// then carries 8 MiB intact; a loop of new connections and a keep-alive client
/// (10 requests/s on one connection while it lasts) see only 200s throughout, first from the
/// old waypoint, at the end from the new one — the keep-alive one because the draining waypoint
/// closed its connection after a request; the old one exits by itself once the TCP connection
/// ends. Returns the old waypoint's output.
pub(super) fn waypoint_rollout(rig: &mut Rig) -> std::process::Output {
    let client = rig.pod(1, 1);
    let (old_ip, new_ip) = (
        rig.pod(WAYPOINT_POD.0, WAYPOINT_POD.1).ipv4,
        rig.pod(NEW_WAYPOINT_POD.0, NEW_WAYPOINT_POD.1).ipv4,
    );
    let mut held = Probe::connect(
        &client.place,
        format!("{REVIEWS_VIP}:7000").parse().unwrap(),
        Duration::from_secs(5),
    )
    .unwrap()
    .unwrap();
    let hello = held.hello().unwrap();
    let peer: SocketAddr = hello["peer"].as_str().unwrap().parse().unwrap();
    assert_eq!(peer.ip(), IpAddr::V4(old_ip), "{hello}");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let requests = {
        let (place, stop) = (client.place.clone(), std::sync::Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = place
                    .output(
                        "curl",
                        &[
                            "-s",
                            "-m",
                            "5",
                            "-w",
                            "\n%{http_code}",
                            &reviews("/rollout"),
                        ],
                    )
                    .unwrap();
                seen.push(String::from_utf8_lossy(&out.stdout).into_owned());
            }
            seen
        })
    };
    let keep_alive = {
        let place = client.place.clone();
        std::thread::spawn(move || {
            let mut args = vec!["-s", "-m", "30", "--rate", "10/s", "-w"];
            args.push("\n%{http_code} connects=%{num_connects}\n@@\n");
            let url = reviews("/keep-alive");
            args.extend(std::iter::repeat_n(url.as_str(), 65));
            let out = place.output("curl", &args).unwrap();
            String::from_utf8_lossy(&out.stdout)
                .split("@@\n")
                .filter(|r| !r.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    // The new pod joins and is ready (serving HBONE); the agents list both.
    rig.waypoint_pods = vec![(WAYPOINT_POD, false), (NEW_WAYPOINT_POD, false)];
    let write_all = |rig: &Rig| {
        std::fs::write(&rig.waypoint_config, rig.config(1, true, ALL_TO_V1)).unwrap();
        for (i, agent) in rig.agents.iter().enumerate() {
            agent.rewrite_config(&rig.config(i + 1, true, "")).unwrap();
        }
    };
    write_all(rig);
    let new = rig.start_waypoint(NEW_WAYPOINT_POD);
    std::thread::sleep(Duration::from_millis(1000));

    // The old one is told to go while the agents still send to it, and is listed as terminating
    // a second later (its deletion reaching them: still a waypoint pod, sent no new
    // connections).
    let old_place = &rig.tb.pod(WAYPOINT_POD.0, WAYPOINT_POD.1).place;
    let ready = || {
        http_get(
            old_place,
            "127.0.0.1:15021".parse().unwrap(),
            "GET",
            "/healthz/ready",
        )
        .unwrap()
        .0
    };
    assert!(ready().contains("200"), "{}", ready());
    let mut old = rig.waypoint.replace(new).unwrap();
    old.sigterm().unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let status = ready();
    assert!(
        status.contains("503"),
        "a draining waypoint is not ready: {status}"
    );
    rig.waypoint_pods = vec![(WAYPOINT_POD, true), (NEW_WAYPOINT_POD, false)];
    write_all(rig);
    // Past the old waypoint's accept window (1 s here): it stays for the connection it holds.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        old.try_wait().unwrap().is_none(),
        "the old waypoint left with a connection open"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = requests.join().unwrap();
    let kept = keep_alive.join().unwrap();

    // The held connection, idle all along, carries 8 MiB intact (the probe checks the digest).
    held.finish(8 << 20).unwrap();
    let out = old.wait(Duration::from_secs(10)).unwrap_or_else(|e| {
        panic!("{e:#}: the old waypoint did not leave once its last connection ended")
    });
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{log}", out.status);
    assert!(log.contains("waypoint: draining"), "{log}");
    assert!(log.contains("waypoint: drained, exiting"), "{log}");
    // The pod object goes once its process has exited.
    rig.waypoint_pods = vec![(NEW_WAYPOINT_POD, false)];
    write_all(rig);

    let failed: Vec<&String> = seen.iter().filter(|s| !s.ends_with("\n200")).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the rollout: {failed:?}",
        failed.len(),
        seen.len()
    );
    assert!(seen.len() >= 20, "too few requests to tell: {}", seen.len());
    let via = |ip: std::net::Ipv4Addr| {
        let saw = format!("saw {ip}");
        seen.iter().filter(|s| s.contains(&saw)).count()
    };
    assert!(via(old_ip) > 0 && via(new_ip) > 0, "{seen:?}");
    // The last 20 came well after the agents listed the old pod as terminating: none of them
    // went to it (were it still chosen, round robin would send it half).
    let late: Vec<bool> = seen[seen.len() - 20..]
        .iter()
        .map(|s| s.contains(&format!("saw {new_ip}")))
        .collect();
    assert!(
        late.iter().all(|&new| new),
        "new connections still went to the terminating waypoint (true: the new one): {late:?}"
    );
    eprintln!(
        "rollout: {} requests, all 200 ({} through the old waypoint, {} through the new)",
        seen.len(),
        via(old_ip),
        via(new_ip)
    );

    // The keep-alive client: 65 answers, all 200, the first through the old waypoint, the last
    // through the new one, on a new connection it was made to open.
    // Each answer as `<status>/<old|new|?>[+]` (+: on a new connection).
    let answers: Vec<String> = kept
        .iter()
        .map(|r| {
            let status = r.rsplit('\n').nth(1).unwrap_or("").split(' ').next();
            let via = if r.contains(&format!("saw {old_ip}")) {
                "old"
            } else if r.contains(&format!("saw {new_ip}")) {
                "new"
            } else {
                "?"
            };
            let new_connection = if r.trim_end().ends_with("connects=0") {
                ""
            } else {
                "+"
            };
            format!("{}/{via}{new_connection}", status.unwrap_or(""))
        })
        .collect();
    assert_eq!(kept.len(), 65, "{answers:?}\n{kept:?}");
    assert!(answers.iter().all(|a| a.starts_with("200/")), "{answers:?}");
    assert!(
        answers[0].starts_with("200/old") && answers[64].starts_with("200/new"),
        "the keep-alive client did not move to the new waypoint: {answers:?}"
    );
    let connects = answers.iter().filter(|a| a.ends_with('+')).count();
    assert!(connects >= 2, "one connection throughout: {answers:?}");
    let through_old = answers.iter().filter(|a| a.contains("/old")).count();
    eprintln!(
        "rollout: the keep-alive client made {connects} connections for 65 requests, {through_old} through the old waypoint"
    );
    out
}
