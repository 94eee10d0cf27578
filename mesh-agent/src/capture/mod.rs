//! Traffic capture: the agent side of the eBPF data path. Loads and pins the programs and maps,
//! keeps their attachments and the enrolment maps in line with the pods of this node, owns the
//! policy routing that delivers steered packets locally, binds the transparent listeners, and
//! tells a handler which pod each accepted connection came from. See docs/ARCHITECTURE.md,
//! "Capture".

pub mod cgroup;
pub mod controller;
pub mod flows;
pub mod handover;
pub mod inspect;
pub mod listeners;
pub mod pins;
pub mod routing;
pub mod splice_sweep;
pub mod time_wait;

use std::{fmt::Write as _, path::Path};

pub use controller::{
    CaptureController, CaptureView, DesiredCapture, PodCapture, ReconcileReport, SharedCaptureView,
};
pub use flows::{CapturedFlow, FlowTable};
pub use inspect::PinnedMaps;
pub use pins::BpffsLayout;

/// Default bpffs directory of the node agent's data path.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/mesh";

/// Removes every kernel object the capture owns: link pins (detaching the programs), program and
/// map pins, the bpffs directory, and the routing rule and table. Idempotent.
pub fn remove_all(layout: &BpffsLayout) -> anyhow::Result<()> {
    if layout.root.exists() {
        // Never under a running agent.
        let dir = std::fs::File::open(&layout.root)?;
        let _lock = nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| {
                anyhow::anyhow!(
                    "an agent is running on {} ({e}); stop it first",
                    layout.root.display()
                )
            })?;
        // Links first, detached synchronously, so nothing steers to the routing table below
        // once it is gone.
        for pin in layout.link_pins()? {
            pins::remove_link_pin(&pin.path)?;
        }
        for dir in handover::lock_dirs(&layout.root) {
            remove_dir_if_present(&dir)?;
        }
        for dir in [layout.links(), layout.progs(), layout.maps()] {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    std::fs::remove_file(entry.path())?;
                }
            }
            remove_dir_if_present(&dir)?;
        }
        remove_dir_if_present(&layout.root)?;
    }
    routing::remove()
}

fn remove_dir_if_present(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A human-readable list of every kernel object the capture owns on this node: pinned maps,
/// programs and tcx links (with the interface each link is on), and the routing rule and routes.
pub fn explain(layout: &BpffsLayout) -> anyhow::Result<String> {
    let mut out = String::new();
    writeln!(out, "bpffs directory: {}", layout.root.display())?;
    let pins = layout.all_pins()?;
    if pins.is_empty() {
        writeln!(out, "  (nothing pinned)")?;
    }
    let links = layout.link_pins()?;
    for pin in pins {
        let full = layout.root.join(&pin);
        let detail = links
            .iter()
            .find(|l| l.path == full)
            .map(|l| format!("  {}, agent instance {}", l.target.describe(), l.instance))
            .unwrap_or_default();
        writeln!(out, "  {}{detail}", pin.display())?;
    }
    let maps = PinnedMaps::new(&layout.maps());
    if let Ok(pods) = maps.pods() {
        writeln!(out, "enrolled interfaces (MESH_PODS):")?;
        for (ifindex, addrs) in pods {
            let iface = pins::iface_name(ifindex);
            writeln!(
                out,
                "  {iface} (ifindex {ifindex}): {}",
                controller::describe_pod_ips(&addrs)
            )?;
        }
    }
    if let Ok(ips) = maps.pod_ips() {
        writeln!(out, "watched pod addresses (MESH_POD_IPS):")?;
        for (ip, entry) in ips {
            let state = if entry.flags & mesh_common::capture::POD_IP_ENROLLED != 0 {
                "enrolled"
            } else {
                "draining"
            };
            writeln!(out, "  {ip} -> ifindex {} ({state})", entry.ifindex)?;
        }
    }
    if let Ok(counters) = maps.counters() {
        writeln!(out, "counters (MESH_COUNTERS, all CPUs):")?;
        for (counter, value) in counters.iter().filter(|(_, v)| *v > 0) {
            writeln!(out, "  {:<28} {value}", counter.name())?;
        }
    }
    writeln!(out, "routing:")?;
    let routing = routing::describe()?;
    if routing.is_empty() {
        writeln!(out, "  (no rule or route installed)")?;
    }
    for r in routing {
        writeln!(out, "  {:<9} {}", r.kind, r.description)?;
    }
    writeln!(
        out,
        "listeners (while the agent runs): IP_TRANSPARENT tcp 0.0.0.0 and [::] ports {}, {}, {}",
        mesh_common::capture::PORT_OUTBOUND,
        mesh_common::capture::PORT_INBOUND_PLAINTEXT,
        mesh_common::capture::PORT_INBOUND_HBONE
    )?;
    Ok(out)
}
