//! Workload certificates rotate while a connection through HBONE is carrying data, and the
//! connection never notices: established TLS sessions do not depend on the certificate staying
//! current, and new connections use the new one.
mod support;

use std::{
    io::{BufRead, BufReader, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use mesh_testbed::{
    Testbed, TestbedSpec, can_run,
    probe::{Fnv, ProbeServer},
};
use support::{Agent, TempDir, pods};

#[test]
fn certificates_rotate_during_a_long_transfer_without_interrupting_it() {
    if !can_run("certificate rotation", &["ip"]) {
        return;
    }
    let tb = Testbed::build(TestbedSpec {
        nodes: 2,
        pods_per_node: 1,
    })
    .unwrap();
    let ca = TempDir::with_ca(&tb.info().run);
    let enrolled = pods(&[(1, 1), (2, 1)]);
    // 10 s certificates: each is replaced after about 5 s.
    let mut a1 = Agent::start_full(&tb, 1, "mesh", &enrolled, Some(ca.path()), Some(10)).unwrap();
    let mut a2 = Agent::start_full(&tb, 2, "mesh", &enrolled, Some(ca.path()), Some(10)).unwrap();
    let (client, server) = (tb.pod(1, 1), tb.pod(2, 1));
    let _srv = ProbeServer::start(&server.place, &[8080]).unwrap();
    let dst = SocketAddr::new(server.ipv4.into(), 8080);

    // One connection sending a little every 50 ms for 14 s: across at least two rotations.
    let (sent, digest, summary) = client
        .place
        .in_netns(|| -> std::io::Result<(u64, String, String)> {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut reader = BufReader::new(s.try_clone()?);
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let (mut sent, mut h) = (0u64, Fnv::new());
            let until = Instant::now() + Duration::from_secs(14);
            let mut i = 0u64;
            while Instant::now() < until {
                let chunk = format!("chunk {i} of a long transfer\n");
                s.write_all(chunk.as_bytes())?;
                h.update(chunk.as_bytes());
                sent += chunk.len() as u64;
                i += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            s.shutdown(Shutdown::Write)?;
            line.clear();
            reader.read_line(&mut line)?;
            Ok((sent, h.hex(), line))
        })
        .unwrap()
        .unwrap();
    let summary: serde_json::Value = serde_json::from_str(summary.trim()).unwrap();
    assert_eq!(summary["bytes"], sent, "{summary}");
    assert_eq!(summary["digest"], digest.as_str(), "{summary}");
    // A new connection after the rotations works with the new certificates.
    let mut p = mesh_testbed::probe::Probe::connect(&client.place, dst, Duration::from_secs(5))
        .unwrap()
        .unwrap();
    p.hello().unwrap();
    p.finish(1000).unwrap();
    let (log1, log2) = (a1.stop().unwrap(), a2.stop().unwrap());
    let issued = |log: &str, sa: &str| {
        log.lines()
            .filter(|l| l.contains("workload certificate issued") && l.contains(sa))
            .count()
    };
    let client_sa = format!("sa/sa-{}", client.name());
    let server_sa = format!("sa/sa-{}", server.name());
    assert!(
        issued(&log1, &client_sa) >= 3,
        "client certificate issued {} times:\n{log1}",
        issued(&log1, &client_sa)
    );
    assert!(
        issued(&log2, &server_sa) >= 3,
        "server certificate issued {} times",
        issued(&log2, &server_sa)
    );
    drop((a1, a2, _srv, ca));
    tb.teardown_verified().unwrap();
}
