//! Local-mode config reloads racing a slow writer (issue 15, item 5): a file rewritten in place
//! is applied only once its writer closed it, never half-written (a prefix of the file is often
//! valid YAML that enrols nothing, and applying it sent the pods' traffic out in plaintext); a
//! reload that would un-enrol every pod is refused unless the file says so.
mod support;

use std::{
    collections::BTreeSet,
    io::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use mesh_testbed::{Testbed, TestbedSpec, can_run, metrics};
use support::{Agent, config_yaml, pods};

const SPEC: TestbedSpec = TestbedSpec {
    nodes: 1,
    pods_per_node: 3,
};

/// Enrolled interface sets, in the order seen.
type Sets = Arc<Mutex<Vec<BTreeSet<u32>>>>;

/// Samples the enrolment map every 15 ms and keeps every set seen, in order (repeats folded).
struct Checker {
    stop: Arc<AtomicBool>,
    seen: Sets,
    thread: Option<thread::JoinHandle<()>>,
}

impl Checker {
    fn start(agent: &Agent) -> Self {
        let (stop, seen): (Arc<AtomicBool>, Sets) = Default::default();
        let maps = agent.maps();
        let (s, v) = (Arc::clone(&stop), Arc::clone(&seen));
        let thread = thread::spawn(move || {
            loop {
                // One last sample after the stop, so the final state is always seen.
                let stopping = s.load(Ordering::Acquire);
                let now: BTreeSet<u32> = maps
                    .pods()
                    .expect("pinned MESH_PODS readable")
                    .into_iter()
                    .map(|(i, _)| i)
                    .collect();
                let mut v = v.lock().unwrap();
                if v.last() != Some(&now) {
                    v.push(now);
                }
                drop(v);
                if stopping {
                    break;
                }
                thread::sleep(Duration::from_millis(15));
            }
        });
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Every distinct enrolled set observed.
    fn finish(mut self) -> Vec<BTreeSet<u32>> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().expect("checker thread");
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// Rewrites `path` in place as a slow writer does: truncate, then the text in 8 pieces cut at
/// line ends (so most prefixes parse) with `pause` between them, holding the file open.
fn slow_write(path: &std::path::Path, text: &str, pause: Duration) {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut f = std::fs::File::create(path).expect("open the config for writing");
    for i in 0..8 {
        let piece: String = lines[i * lines.len() / 8..(i + 1) * lines.len() / 8].concat();
        f.write_all(piece.as_bytes()).expect("write");
        f.flush().expect("flush");
        thread::sleep(pause);
    }
    drop(f);
}

/// Writes `path` the documented way: a temporary file in the same directory, renamed over it.
fn replace(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).expect("write the temporary file");
    std::fs::rename(&tmp, path).expect("rename into place");
}

/// Node 1's agent's one series of `name` with the label `key="value"`.
fn metric(tb: &Testbed, name: &str, (key, value): (&str, &str)) -> f64 {
    metrics::value(&metrics::scrape(tb, 1), name, &[(key, value)])
}

#[test]
fn a_reload_racing_a_slow_writer_never_unenrols_and_unenrol_all_must_be_explicit() {
    if !can_run("config reload racing a slow writer", &["ip"]) {
        return;
    }
    let tb = Testbed::build(SPEC).unwrap();
    let two = pods(&[(1, 1), (1, 2)]);
    let three = pods(&[(1, 1), (1, 2), (1, 3)]);
    let mut agent = Agent::start(&tb, 1, "passthrough", &two).unwrap();
    let (want_two, want_three) = (
        agent.ifindexes(&tb, &two).unwrap(),
        agent.ifindexes(&tb, &three).unwrap(),
    );

    // A writer slower than the reload interval (100 ms): 8 pieces, 300 ms apart.
    let checker = Checker::start(&agent);
    let t0 = Instant::now();
    slow_write(
        &agent.config,
        &config_yaml(&tb, 1, &three),
        Duration::from_millis(300),
    );
    let written = t0.elapsed();
    agent.wait_enrolled(&tb, &three).unwrap();
    let applied_after_close = t0.elapsed() - written;
    let seen = checker.finish();
    println!(
        "slow write took {written:?}; applied {applied_after_close:?} after the close; sets seen: {seen:?}"
    );
    let shrunk: Vec<_> = seen.iter().filter(|s| !s.is_superset(&want_two)).collect();
    assert!(
        shrunk.is_empty(),
        "a half-written file was applied: enrolled sets {shrunk:?} (want {want_two:?} throughout, then {want_three:?})"
    );
    assert_eq!(seen.last(), Some(&want_three), "{seen:?}");
    assert_eq!(
        metric(&tb, "mesh_config_reloads", ("outcome", "rejected")),
        0.0,
        "no partial file should even have been read"
    );

    // A file that enrols nothing (every pod in a plain namespace) is refused and kept out.
    let checker = Checker::start(&agent);
    replace(&agent.config, &config_yaml(&tb, 1, &BTreeSet::new()));
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&tb, "mesh_config_rejections", ("reason", "unenrolls_all")) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the un-enrol-all file was not refused"
        );
        thread::sleep(Duration::from_millis(50));
    }
    // Ten reload intervals more: still nothing un-enrolled.
    thread::sleep(Duration::from_secs(1));
    let seen = checker.finish();
    assert_eq!(
        seen,
        vec![want_three.clone()],
        "the refused file changed the capture"
    );
    assert_eq!(
        metric(&tb, "mesh_config_reloads", ("outcome", "rejected")),
        1.0
    );

    // Said explicitly, it is applied.
    let mut yaml = config_yaml(&tb, 1, &BTreeSet::new());
    yaml += "mesh: {allowUnenrollAll: true}\n";
    replace(&agent.config, &yaml);
    agent.wait_enrolled(&tb, &BTreeSet::new()).unwrap();

    let log = agent.stop().unwrap();
    let refusal = log
        .lines()
        .find(|l| l.contains("configuration rejected"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
    assert!(
        refusal.contains("unenrolls_all")
            && refusal.contains(&agent.config.display().to_string())
            && refusal.contains("allowUnenrollAll"),
        "{refusal}"
    );
}
