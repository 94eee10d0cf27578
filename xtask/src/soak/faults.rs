//! The faults of the soak: the agents it upgrades, kills and restarts, the CA it stops and
//! starts, the policy it applies and removes, on a fixed schedule spread over the run; and the
//! capture that proves nothing crossed the fabric in plaintext.
use std::{
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use mesh_testbed::{
    Background,
    kubemesh::KubeMesh,
    soak::{
        MARKER, now_ms,
        verdict::{Fault, FaultKind},
    },
};
use serde_json::{Value, json};

use super::DENIED_PORT;

/// Flags of every agent of the soak. The drain limit stays the production default (1 h): an
/// agent that handed over leaves when its last connection ends.
const AGENT_ARGS: &[&str] = &[];

/// An agent's log: which agent, what it wrote to stderr.
pub type AgentLog = (String, Vec<u8>);

/// The agents of both nodes: the serving one, and those that handed over and still carry
/// connections; the logs of those that ended.
pub struct Agents {
    current: Vec<Option<Background>>,
    draining: Vec<(usize, Background)>,
    logs: Vec<AgentLog>,
}

impl Agents {
    pub fn start(km: &KubeMesh<'_>) -> Result<Self> {
        let current = (1..=2)
            .map(|n| km.start_agent(n, AGENT_ARGS).map(Some))
            .collect::<Result<_>>()?;
        Ok(Agents {
            current,
            draining: Vec::new(),
            logs: Vec::new(),
        })
    }

    /// Waits until both agents answer ready (their workloads' certificates in hand).
    pub fn wait_ready(&mut self, km: &KubeMesh<'_>, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for n in 1..=2 {
            while !km.readiness(n).0.contains("200") {
                if Instant::now() > deadline {
                    bail!("node{n}'s agent is not ready after {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Process ids of node `n`'s agents (serving and draining).
    pub fn pids(&self, n: usize) -> Vec<u32> {
        self.all_pids()
            .into_iter()
            .filter(|(m, _)| *m == n)
            .map(|(_, p)| p)
            .collect()
    }

    /// (node, pid) of every agent process.
    pub fn all_pids(&self) -> Vec<(usize, u32)> {
        let serving = self
            .current
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.as_ref().map(|a| (i + 1, a.pid())));
        serving
            .chain(self.draining.iter().map(|(n, a)| (*n, a.pid())))
            .collect()
    }

    /// A successor beside node `n`'s agent takes over; the old one is told to stop (as the
    /// DaemonSet controller does once the new pod is ready). Returns the takeover time.
    fn upgrade(&mut self, km: &KubeMesh<'_>, n: usize) -> Result<Duration> {
        let (next, took) = km.start_successor(n, AGENT_ARGS)?;
        let old = self.current[n - 1].replace(next).context("no agent")?;
        // SAFETY: a signal to a child we have not reaped (its pid cannot have been reused).
        if unsafe { libc::kill(old.pid() as i32, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error()).context("SIGTERM to the old agent");
        }
        self.draining.push((n, old));
        Ok(took)
    }

    /// SIGKILL to node `n`'s serving agent, then at once a new one (as the kubelet restarts a
    /// crashed container). Returns the time from the kill to the new agent's readiness.
    fn kill_and_restart(&mut self, km: &KubeMesh<'_>, n: usize) -> Result<Duration> {
        let old = self.current[n - 1].take().context("no agent")?;
        let killed = Instant::now();
        let out = old.kill()?;
        self.logs
            .push((format!("node{n} agent (killed)"), out.stderr));
        let mut next = km.spawn_agent(n, AGENT_ARGS)?;
        while !km.readiness(n).0.contains("200") {
            if killed.elapsed() > Duration::from_secs(30) || next.try_wait()?.is_some() {
                let out = next.kill()?;
                bail!(
                    "node{n}: the restarted agent never became ready:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.current[n - 1] = Some(next);
        Ok(killed.elapsed())
    }

    /// Waits up to `timeout` for every agent that handed over to exit by itself; what is wrong
    /// (still running, a failed exit) as failures.
    pub fn wait_drained(&mut self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut failures = Vec::new();
        for (n, a) in std::mem::take(&mut self.draining) {
            let left = deadline.saturating_duration_since(Instant::now());
            let pid = a.pid();
            match a.wait(left) {
                Ok(out) => {
                    if !out.status.success() {
                        failures.push(format!(
                            "node{n}: the agent that handed over (pid {pid}) exited with {}",
                            out.status
                        ));
                    }
                    self.logs
                        .push((format!("node{n} agent {pid} (handed over)"), out.stderr));
                }
                Err(e) => failures.push(format!(
                    "node{n}: the agent that handed over (pid {pid}) did not leave: {e:#}"
                )),
            }
        }
        failures
    }

    /// Stops the serving agents (SIGTERM); every agent's log.
    fn finish(mut self) -> Result<Vec<AgentLog>> {
        for (i, a) in self.current.iter_mut().enumerate() {
            if let Some(a) = a.take() {
                let out = a.terminate(Duration::from_secs(30))?;
                self.logs.push((format!("node{} agent", i + 1), out.stderr));
            }
        }
        for (n, a) in self.draining.drain(..) {
            let out = a.kill()?;
            self.logs
                .push((format!("node{n} agent (still draining)"), out.stderr));
        }
        Ok(self.logs)
    }
}

/// One step of the schedule.
#[derive(Clone, Copy, Debug)]
enum Step {
    Upgrade(usize),
    Kill(usize),
    CaStop,
    CaStart,
    DenyOn,
    DenyOff,
}

/// When each step comes, as a fraction of the run. Certificates rotate throughout (the CA's
/// short lifetime); the CA is down for less than half of one, as a restart of its Deployment is.
const STEPS: [(f64, Step); 11] = [
    (0.10, Step::Upgrade(1)),
    (0.18, Step::CaStop),
    (0.22, Step::CaStart),
    (0.30, Step::Kill(2)),
    (0.40, Step::DenyOn),
    (0.48, Step::DenyOff),
    (0.55, Step::Upgrade(2)),
    (0.65, Step::Kill(1)),
    (0.75, Step::Upgrade(1)),
    (0.82, Step::DenyOn),
    (0.87, Step::DenyOff),
];

/// What the schedule did: the faults the verdict weighs connections against, and a log of
/// every step with its measurements.
pub struct Events {
    pub faults: Vec<Fault>,
    pub log: Vec<Value>,
}

pub struct Schedule {
    duration: Duration,
    start_ms: u64,
    ca: Option<Background>,
    ca_args: Vec<String>,
    ca_log: Vec<u8>,
}

fn deny_policy() -> Value {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "soak-deny", "namespace": "mesh"},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": [DENIED_PORT.to_string()]}}]}]}
    })
}

impl Schedule {
    pub fn new(duration: Duration, start_ms: u64, ca: Background, ca_args: [String; 2]) -> Self {
        Schedule {
            duration,
            start_ms,
            ca: Some(ca),
            ca_args: ca_args.to_vec(),
            ca_log: Vec::new(),
        }
    }

    /// Runs every step at its time; `pids` follows the agent processes for the sampler.
    pub fn run(
        &mut self,
        km: &KubeMesh<'_>,
        agents: &mut Agents,
        pids: &Mutex<Vec<(usize, u32)>>,
    ) -> Result<Events> {
        let mut events = Events {
            faults: Vec::new(),
            log: Vec::new(),
        };
        let mut denied_since = None;
        for (at, step) in STEPS {
            let due = self.start_ms + (self.duration.as_secs_f64() * at * 1000.0) as u64;
            if let Some(wait) = due.checked_sub(now_ms()) {
                std::thread::sleep(Duration::from_millis(wait));
            }
            let began = now_ms();
            let detail = match step {
                Step::Upgrade(n) => {
                    let took = agents.upgrade(km, n)?;
                    json!({"takeover_ms": took.as_millis() as u64})
                }
                Step::Kill(n) => {
                    let took = agents.kill_and_restart(km, n)?;
                    events.faults.push(Fault {
                        kind: FaultKind::AgentKilled { node: n },
                        from_ms: began,
                        to_ms: now_ms(),
                    });
                    json!({"kill_to_ready_ms": took.as_millis() as u64})
                }
                Step::CaStop => {
                    let ca = self.ca.take().context("the CA is not running")?;
                    self.ca_log
                        .extend(ca.terminate(Duration::from_secs(10))?.stderr);
                    json!({})
                }
                Step::CaStart => {
                    let args: Vec<&str> = self.ca_args.iter().map(String::as_str).collect();
                    self.ca = Some(km.start_ca(&args)?);
                    json!({})
                }
                Step::DenyOn => {
                    km.api.apply(deny_policy());
                    denied_since = Some(began);
                    json!({"port": DENIED_PORT})
                }
                Step::DenyOff => {
                    km.api.delete(&deny_policy());
                    events.faults.push(Fault {
                        kind: FaultKind::Denied { port: DENIED_PORT },
                        from_ms: denied_since.take().context("deny off before on")?,
                        to_ms: began,
                    });
                    json!({"port": DENIED_PORT})
                }
            };
            *pids.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = agents.all_pids();
            let t_s = (began - self.start_ms) as f64 / 1000.0;
            println!("  t={t_s:>6.1} s  {step:?} {detail}");
            events
                .log
                .push(json!({"t_s": t_s, "step": format!("{step:?}"), "detail": detail}));
        }
        Ok(events)
    }

    /// Stops the CA and the agents: the CA's log and every agent's.
    pub fn finish(mut self, agents: Agents) -> Result<(String, Vec<AgentLog>)> {
        if let Some(ca) = self.ca.take() {
            self.ca_log
                .extend(ca.terminate(Duration::from_secs(10))?.stderr);
        }
        Ok((
            String::from_utf8_lossy(&self.ca_log).into_owned(),
            agents.finish()?,
        ))
    }
}

/// How many of the applications' packets the report shows, when there are any.
const PLAINTEXT_EXAMPLES: usize = 40;

/// What the capture of the fabric saw of the applications: packets to or from their `ports`
/// (the first few timed from `since_ms`, the start of the load), and occurrences of the
/// chunks' marker anywhere in it.
pub fn plaintext(pcap: &Path, ports: &[u16], since_ms: u64) -> Result<Value> {
    let bytes = std::fs::read(pcap).with_context(|| format!("reading {}", pcap.display()))?;
    let marker_hits = bytes
        .windows(MARKER.len())
        .filter(|w| *w == MARKER.as_slice())
        .count();
    let filter = ports
        .iter()
        .map(|p| format!("tcp port {p}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let out = std::process::Command::new("tcpdump")
        .args(["-n", "-tt", "-r", pcap.to_str().context("path")?, &filter])
        .output()
        .context("tcpdump -r")?;
    if !out.status.success() {
        bail!(
            "tcpdump -r {}: {}",
            pcap.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // The first few, timed from the start of the load, to tell which fault let them through.
    let first: Vec<String> = text
        .lines()
        .take(PLAINTEXT_EXAMPLES)
        .map(|line| {
            let (stamp, rest) = line.split_once(' ').unwrap_or((line, ""));
            match stamp.parse::<f64>() {
                Ok(s) => format!("t={:.3}s {rest}", s - since_ms as f64 / 1000.0),
                Err(_) => line.to_owned(),
            }
        })
        .collect();
    Ok(json!({
        "capture_bytes": bytes.len(),
        "app_port_packets": text.lines().count(),
        "marker_hits": marker_hits,
        "first_app_port_packets": first,
    }))
}
