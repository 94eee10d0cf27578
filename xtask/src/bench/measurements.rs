//! How each figure is taken on a running [`Rig`]: one trial of every test of a scenario on one
//! path (iperf3, the probe's request/response and connection-rate clients, CPU and RSS of the
//! agents, the splice share, the metrics scrape loop), and the perf recording `--perf` asks for.
//! Setting up and tearing down the rig stays in `mod.rs`.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_testbed::{Pod, metrics};
use serde_json::Value;

use super::{
    AgentProcess, BenchPath, IPERF_PORT, MESH_PODS, ONCE_PORT_MESH, ONCE_PORT_PLAIN, RR_PORT,
    Results, Rig, Scenario, Trial, config_yaml, sampler, value,
};

impl Rig<'_> {
    fn pod(&self, id: (usize, usize)) -> &Pod {
        self.tb.pod(id.0, id.1)
    }

    /// Rewrites both agents' configs for `path` and waits until the capture follows.
    pub(super) fn set_path(&self, path: BenchPath, ca: &Path) -> Result<()> {
        for a in &self.agents {
            std::fs::write(&a.config, config_yaml(self.tb, a.node, ca, path))?;
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for a in &self.agents {
            let want = match path {
                BenchPath::Plain => 0,
                BenchPath::Mesh(_) => MESH_PODS.iter().filter(|p| p.0 == a.node).count(),
            };
            while a.enrolled_links() != want {
                ensure!(
                    Instant::now() < deadline,
                    "node{}: enrolment did not follow the config",
                    a.node
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Let the un-enrolled pods' draining and the reload settle.
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }

    fn client_json(&self, s: &Scenario, args: &[&str]) -> Result<Value> {
        let out = self
            .pod(s.client)
            .place
            .run(self.probe.to_str().context("path")?, args)
            .with_context(|| format!("{} {}", s.name, args.join(" ")))?;
        serde_json::from_str(out.trim()).with_context(|| format!("load tool said {out:?}"))
    }

    fn server_addr(&self, s: &Scenario, port: u16) -> String {
        std::net::SocketAddr::new(self.pod(s.server).ipv4.into(), port).to_string()
    }

    pub(super) fn rr(&self, s: &Scenario, secs: f64) -> Result<Value> {
        self.client_json(s, &["rr", &self.server_addr(s, RR_PORT), &secs.to_string()])
    }

    /// The request/response test while a scraper in each node fetches its agent's /metrics
    /// back to back on a kept-alive connection: (rr result, scrapes per second, both agents).
    fn rr_while_scraping(&self, s: &Scenario) -> Result<(Value, f64)> {
        let stop = std::sync::atomic::AtomicBool::new(false);
        let started = Instant::now();
        let (rr, scrapes) = std::thread::scope(|scope| {
            let scrapers: Vec<_> = (1..=2)
                .map(|node| {
                    let (place, stop) = (&self.tb.node(node).place, &stop);
                    scope.spawn(move || {
                        place
                            .in_netns(|| scrape_loop(stop).unwrap_or(0))
                            .unwrap_or(0)
                    })
                })
                .collect();
            let rr = self.rr(s, self.secs);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let scrapes: u64 = scrapers.into_iter().map(|h| h.join().unwrap_or(0)).sum();
            (rr, scrapes)
        });
        Ok((rr?, scrapes as f64 / started.elapsed().as_secs_f64()))
    }

    /// (spliced, deferred) bytes of both nodes' data paths so far (`mesh_ebpf_events`, pinned
    /// counters); None if an agent does not answer.
    fn splice_bytes(&self) -> Option<(f64, f64)> {
        let mut total = (0.0, 0.0);
        for node in 1..=2 {
            let scrape = metrics::scrape_place(&self.tb.node(node).place).ok()?;
            let events =
                |reason| metrics::value(&scrape, "mesh_ebpf_events", &[("reason", reason)]);
            total.0 += events("spliced_bytes");
            total.1 += events("splice_deferred_bytes");
        }
        Some(total)
    }

    fn iperf3(&self, s: &Scenario, streams: u32) -> Result<f64> {
        let (client, server) = (self.pod(s.client), self.pod(s.server));
        let port = IPERF_PORT.to_string();
        let mut srv = server.place.spawn("iperf3", &["-s", "-1", "-p", &port])?;
        srv.wait_listening(IPERF_PORT, Duration::from_secs(10))?;
        let out = client.place.run(
            "iperf3",
            &[
                "-c",
                &server.ipv4.to_string(),
                "-p",
                &port,
                "-t",
                &self.secs.to_string(),
                "-P",
                &streams.to_string(),
                "-J",
            ],
        )?;
        let _ = srv.wait(Duration::from_secs(10));
        let v: Value = serde_json::from_str(&out).context("iperf3 -J output")?;
        if let Some(e) = v.get("error").and_then(Value::as_str) {
            bail!("iperf3: {e}");
        }
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("iperf3 reported no received rate")?;
        Ok(bps / 1e9)
    }

    /// `perf record` of both agents into `DIR/<file>` until [`stop_perf`] (first default mesh
    /// trial of cross_node only).
    fn start_perf(
        &self,
        s: &Scenario,
        path: BenchPath,
        results: &Results,
        file: &str,
    ) -> Result<Option<std::process::Child>> {
        let Some(dir) = &self.perf else {
            return Ok(None);
        };
        let first = !results
            .trials
            .contains_key(&(s.name.to_owned(), "rss_load", path.name()));
        if !path.is_default_mesh() || s.name != "cross_node" || !first {
            return Ok(None);
        }
        std::fs::create_dir_all(dir)?;
        let pids: Vec<String> = self.agents.iter().map(|a| a.pid().to_string()).collect();
        let out = dir.join(file);
        let child = std::process::Command::new("perf")
            .args(["record", "-g", "-F", "999", "-p", &pids.join(","), "-o"])
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting perf record")?;
        println!("  perf: recording both agents into {}", out.display());
        Ok(Some(child))
    }

    /// Every test of one scenario on one path, adding one trial each.
    pub(super) fn scenario(
        &self,
        s: &Scenario,
        path: BenchPath,
        results: &mut Results,
    ) -> Result<()> {
        let perf = self.start_perf(s, path, results, "cross_node_mesh.perf.data")?;
        let p = path.name();
        let secs = self.secs.to_string();
        let idle = self
            .agents
            .iter()
            .map(AgentProcess::rss_mib)
            .fold(0.0, f64::max);
        results.add(s.name, "rss_idle", p, value(idle));
        let sampler = sampler::RssSampler::start(&self.agents);

        let mut throughput = |test: &'static str, streams: u32| match self.iperf3(s, streams) {
            Ok(t) => {
                results.add(s.name, test, p, value(t));
                t
            }
            Err(e) => {
                results.fail(s.name, test, p, format!("{e:#}"));
                f64::NAN
            }
        };
        let splice_before = self.splice_bytes();
        let t1 = throughput("throughput_1", 1);
        let t16 = throughput("throughput_16", 16);
        if let (BenchPath::Mesh(_), Some((s0, d0)), Some((s1, d1))) =
            (path, splice_before, self.splice_bytes())
        {
            // The share of the bulk bytes the pod<->agent hops moved socket to socket; the rest
            // took TCP because the reading side was a bound behind (docs/ARCHITECTURE.md
            // "Splicing"). A speed figure, so it is measured here and not asserted in tests.
            let (spliced, deferred) = (s1 - s0, d1 - d0);
            if spliced + deferred > 0.0 {
                results.add(
                    s.name,
                    "splice_share",
                    p,
                    value(100.0 * spliced / (spliced + deferred)),
                );
            }
        }

        let rr = Trial::latency(&self.rr(s, self.secs)?)?;
        stop_perf(perf);
        results.add(s.name, "rr_1kib", p, rr);
        if path.is_default_mesh() {
            let (scraped, scrapes) = self.rr_while_scraping(s)?;
            results.add(s.name, "rr_1kib_scraped", p, Trial::latency(&scraped)?);
            results.add(s.name, "scrapes_per_s", p, value(scrapes));
        }
        let once = match path {
            BenchPath::Plain => ONCE_PORT_PLAIN,
            BenchPath::Mesh(_) => ONCE_PORT_MESH,
        };
        let perf = self.start_perf(s, path, results, "cross_node_connrate.perf.data")?;
        for (test, conc) in [("connrate_c1", "1"), ("connrate_c8", "8")] {
            let v = self.client_json(s, &["connrate", &self.server_addr(s, once), conc, &secs])?;
            results.add(
                s.name,
                test,
                p,
                value(v["per_second"].as_f64().context("rate")?),
            );
        }
        stop_perf(perf);

        let before: Vec<f64> = self
            .agents
            .iter()
            .map(AgentProcess::cpu_seconds)
            .collect::<Result<_>>()?;
        let paced =
            self.client_json(s, &["paced", &self.server_addr(s, RR_PORT), "1000", &secs])?;
        let after: Vec<f64> = self
            .agents
            .iter()
            .map(AgentProcess::cpu_seconds)
            .collect::<Result<_>>()?;
        let (rps, wall) = (
            paced["achieved_rps"].as_f64().context("rps")?,
            paced["seconds"].as_f64().context("seconds")?,
        );
        let cpu: f64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
        results.add(
            s.name,
            "cpu_per_1k_rps",
            p,
            value(cpu / wall / (rps / 1000.0)),
        );

        results.add(s.name, "rss_load", p, value(sampler.stop()));
        println!(
            "  {:<10} {:<5} 1 stream {t1:.2} Gbit/s · 16 streams {t16:.2} Gbit/s · rr p50 {:.0} µs p99 {:.0} µs",
            s.name,
            p,
            rr.value,
            rr.p99.unwrap_or_default()
        );
        Ok(())
    }
}

/// Ends a recording [`Rig::start_perf`] started (perf writes its file on SIGINT).
fn stop_perf(perf: Option<std::process::Child>) {
    if let Some(mut child) = perf {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let _ = child.wait();
    }
}

/// GET /metrics over one kept-alive connection (as Prometheus scrapes) to the agent of the
/// calling thread's network namespace, until `stop`; the number of complete scrapes.
fn scrape_loop(stop: &std::sync::atomic::AtomicBool) -> std::io::Result<u64> {
    use std::io::{BufRead as _, Read as _, Write as _};
    let mut n = 0;
    let s = std::net::TcpStream::connect(("127.0.0.1", 15020))?;
    let mut reader = std::io::BufReader::new(s.try_clone()?);
    let mut writer = s;
    let mut body = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        writer.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        let mut length = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some(v) = line
                .split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            {
                length = v.1.trim().parse::<usize>().ok();
            }
        }
        let length = length.ok_or_else(|| std::io::Error::other("no content-length"))?;
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
        n += 1;
    }
    Ok(n)
}
