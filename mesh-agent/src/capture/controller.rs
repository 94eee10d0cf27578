//! The capture controller: owns the loaded data path and converges the kernel to a desired set of
//! enrolled pods and watched interfaces — maps, tcx attachments and their pins — adopting or
//! replacing whatever an earlier agent instance left in bpffs.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use mesh_common::{PodIpEntry, capture::POD_IP_ENROLLED};
use tracing::{info, warn};

use super::{
    cgroup::cgroup_id,
    pins::{BpffsLayout, LinkTarget, instance_name, is_on_bpffs, remove_link_pin},
};
use crate::ebpf::{
    CgroupAttachment, Datapath, NetnsAttachment, TcAttachment, TcHook, addrs_of, ifindex_of,
    pod_addrs,
    programs::{SK_LOOKUP, SOCK_OPS_AGENT, SOCK_OPS_POD, TC_FROM_POD, TC_TO_PODS},
};

/// The calling thread's network namespace (the node's: the agent runs in it).
const OWN_NETNS: &str = "/proc/thread-self/ns/net";

/// A pod of this node as the capture needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCapture {
    /// `namespace/name`, for logs and attribution.
    pub key: String,
    /// The pod's interface in the node's network namespace (the host side of its veth).
    pub host_iface: String,
    pub ips: Vec<IpAddr>,
    /// The pod's cgroup v2 directory; when known, the pod's captured sockets are spliced.
    pub cgroup: Option<PathBuf>,
}

/// What the kernel should look like.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredCapture {
    /// Pods whose traffic is captured.
    pub enrolled: Vec<PodCapture>,
    /// Pods on this node that are not enrolled (their interfaces still watch for traffic *to*
    /// enrolled pods, and their connections through the agent drain).
    pub bystanders: Vec<PodCapture>,
    /// Interfaces traffic from other nodes arrives on.
    pub uplinks: Vec<String>,
    /// The agent's own cgroup, for same-node splicing (None: no splicing).
    pub agent_cgroup: Option<PathBuf>,
}

/// The capture view in force: read by every captured connection without a lock, replaced
/// whole by the controller (the only writer).
pub type SharedCaptureView = Arc<arc_swap::ArcSwap<CaptureView>>;

/// Who a captured connection belongs to, as the handlers see it.
#[derive(Clone, Debug, Default)]
pub struct CaptureView {
    /// Enrolled pods by host-interface ifindex.
    pub by_ifindex: HashMap<u32, PodCapture>,
    /// Enrolled pods by address.
    pub by_ip: HashMap<IpAddr, PodCapture>,
}

/// One attachment made by this instance.
enum Attached {
    Tc(TcAttachment),
    Cgroup(CgroupAttachment),
    Netns(NetnsAttachment),
}

impl Attached {
    fn pin_path(&self) -> Option<&std::path::Path> {
        match self {
            Attached::Tc(a) => a.pin_path(),
            Attached::Cgroup(a) => a.pin_path(),
            Attached::Netns(a) => a.pin_path(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Attached::Tc(a) => a.iface().to_owned(),
            Attached::Cgroup(a) => a.cgroup().display().to_string(),
            Attached::Netns(a) => a.netns().display().to_string(),
        }
    }

    fn detach(self) -> Result<(), crate::ebpf::DatapathError> {
        match self {
            Attached::Tc(a) => a.detach(),
            Attached::Cgroup(a) => a.detach(),
            Attached::Netns(a) => a.detach(),
        }
    }
}

type LinkKey = (&'static str, LinkTarget);

pub struct CaptureController {
    /// Exclusive lock on the bpffs directory: one agent per data path. None once handed over
    /// to a successor (see [`super::handover`]): the kernel is then the successor's to change.
    lock: Option<super::handover::DataPathLock>,
    /// A successor's *starting* announcement, let go once its listeners are registered: the
    /// previous agent sends its peers GOAWAY only then.
    announcement: Option<nix::fcntl::Flock<std::fs::File>>,
    datapath: Datapath,
    layout: BpffsLayout,
    instance: String,
    attached: BTreeMap<LinkKey, Attached>,
    view: SharedCaptureView,
    /// Addresses of pods that left the mesh recently, until when their TIME_WAIT sockets are
    /// retired.
    recently_left: HashMap<IpAddr, std::time::Instant>,
    splice_sweeper: super::splice_sweep::SpliceSweeper,
}

/// Per-item problems of one reconciliation (the rest of the desired state still applies).
#[derive(Debug, Default)]
pub struct ReconcileReport {
    pub errors: Vec<String>,
    /// TIME_WAIT sockets of pods that left the mesh, destroyed (see [`super::time_wait`]).
    pub time_wait_destroyed: usize,
}

/// How long after a pod leaves the mesh its TIME_WAIT sockets keep being retired: the TIME_WAIT
/// period (60 s) plus a margin, so draining connections that finish later are covered too.
const RETIRE_TIME_WAIT_FOR: std::time::Duration = std::time::Duration::from_secs(70);

/// How long a starting agent waits for a running one to hand the data path over: the running
/// one notices within 100 ms and steps down in well under a second.
/// Version of the splice queue accounting's map semantics. An agent keeps a pinned
/// `mesh_splice_read` of its own version (another attachment would count reads twice); bump it
/// when `SpliceQueue`'s meaning changes.
const SPLICE_READ_VERSION: &str = "v1";

const HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl CaptureController {
    /// Claims `layout`'s data path at an agent's start, before anything slow (see
    /// [`super::handover`]): owned at once, or announced as the running agent's successor.
    pub fn claim(layout: &BpffsLayout) -> anyhow::Result<super::handover::Claim> {
        layout
            .create()
            .with_context(|| format!("creating {}", layout.root.display()))?;
        anyhow::ensure!(
            is_on_bpffs(&layout.root),
            "{} is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)",
            layout.root.display()
        );
        super::handover::claim(&layout.root)
    }

    /// Takes the data path over as `claim` allows (at once, or once the running agent has
    /// handed it over), loads it with its maps pinned (adopting existing ones) under `layout`,
    /// and pins the programs. Nothing is attached until [`CaptureController::reconcile`].
    pub fn start(layout: BpffsLayout, claim: super::handover::Claim) -> anyhow::Result<Self> {
        let takeover = super::handover::take_over(&layout.root, claim, HANDOVER_WAIT)?;
        let mut datapath =
            Datapath::load_pinned(&layout.maps()).context("loading the eBPF data path")?;
        datapath
            .verify_all()
            .context("loading the capture programs into the kernel")?;
        datapath.pin_programs(&layout.progs())?;
        datapath
            .set_agent_netns()
            .context("telling the splice programs the agent's network namespace")?;
        datapath
            .attach_splice_verdict()
            .context("attaching the splice verdict to MESH_SPLICE")?;
        Ok(Self {
            lock: Some(takeover.lock),
            announcement: takeover.announcement,
            datapath,
            layout,
            instance: instance_name(),
            attached: BTreeMap::new(),
            view: Arc::default(),
            recently_left: HashMap::new(),
            splice_sweeper: super::splice_sweep::SpliceSweeper::default(),
        })
    }

    /// Makes same-node splicing safe to turn on: the bound on what one spliced socket may hold
    /// unread, and the read accounting that enforces it (`mesh_splice_read`, pinned and shared
    /// with later agents of the same accounting version). Without the accounting there is no
    /// backpressure, so an error here means splicing must stay off.
    pub fn enable_splice(&mut self, queue_bytes: u64) -> anyhow::Result<()> {
        self.datapath
            .set_splice_queue_bytes(queue_bytes)
            .context("setting the splice queue bound")?;
        let pin = self.layout.link_path(
            crate::ebpf::programs::SPLICE_READ,
            &LinkTarget::Trace,
            SPLICE_READ_VERSION,
        );
        let attached = self.datapath.attach_splice_reader(&pin).with_context(|| {
            format!("attaching the splice read accounting at {}", pin.display())
        })?;
        if attached {
            info!(pin = %pin.display(), "splice read accounting attached");
        }
        Ok(())
    }

    /// Whether another agent is starting to take this data path over, or ready to (poll a few
    /// times a second while this agent owns it).
    pub fn successor(&self) -> super::handover::Successor {
        super::handover::successor(&self.layout.root)
    }

    /// Hands the data path to the waiting successor: from now on this controller changes
    /// nothing in the kernel (reconciliations, node addresses and TIME_WAIT retirement are the
    /// successor's). What this agent attached stays until the successor replaces it.
    pub fn hand_over(&mut self) {
        self.lock = None;
        // Our link descriptors go (the pins keep the links attached): once the successor has
        // attached its own and removed our pins, nothing holds ours and the kernel detaches
        // them. Kept, they would leave our programs in each interface's tcx chain, behind the
        // successor's, until this process exits.
        self.attached.clear();
    }

    /// Whether this agent still owns the data path (it has not handed it over).
    pub fn owns_data_path(&self) -> bool {
        self.lock.is_some()
    }

    pub fn view(&self) -> SharedCaptureView {
        Arc::clone(&self.view)
    }

    pub fn layout(&self) -> &BpffsLayout {
        &self.layout
    }

    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    /// Brings `MESH_NODE_ADDRS` in line with the node's interfaces (uplinks, pods' gateway
    /// addresses). Called by every reconciliation and periodically: an address added between two
    /// is treated as a remote destination by the capture meanwhile, and refused by the agent
    /// (see `node::upstream`), never relayed from the node's address.
    /// Removes the splice entries of sockets that closed unseen (see [`super::splice_sweep`]);
    /// only while this agent owns the data path.
    pub fn sweep_splice(&mut self) -> anyhow::Result<super::splice_sweep::SweepReport> {
        if !self.owns_data_path() {
            return Ok(Default::default());
        }
        let report = self.splice_sweeper.sweep(&self.layout.maps())?;
        if report != Default::default() {
            info!(
                sockets = report.sockets,
                queues = report.queues,
                "removed splice entries of sockets that closed unseen"
            );
        }
        Ok(report)
    }

    pub fn sync_node_addresses(&mut self) -> Result<(), String> {
        if !self.owns_data_path() {
            return Ok(());
        }
        let want = crate::ebpf::node_addresses()
            .map_err(|e| format!("listing the node's addresses: {e}"))?;
        let change = self
            .datapath
            .sync_node_addrs(&want)
            .map_err(|e| format!("updating the node's addresses in the data path: {e}"))?;
        if !change.added.is_empty() || !change.removed.is_empty() {
            info!(added = ?change.added, removed = ?change.removed, "node addresses updated");
        }
        Ok(())
    }

    /// Converges maps, attachments and pins to `desired`. New attachments are made before old ones
    /// are removed, so an interface is never left uncaptured in between.
    /// After [`CaptureController::hand_over`] it changes nothing and says so.
    pub fn reconcile(&mut self, desired: &DesiredCapture) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        if !self.owns_data_path() {
            info!("configuration change left to the agent that took the data path over");
            return report;
        }
        let mut view = CaptureView::default();
        if let Err(e) = self.sync_node_addresses() {
            report.errors.push(e);
        }

        // 0. Resolve the enrolled pods' interfaces, and let the handlers know the new pods
        //    before the kernel starts capturing them. Pods being un-enrolled stay known until
        //    this reconciliation ends; a connection still in the accept queue after that is
        //    reset (its pod is no longer enrolled).
        let mut resolved = Vec::new();
        for pod in &desired.enrolled {
            match ifindex_of(&pod.host_iface) {
                Ok(ifindex) => resolved.push((pod, ifindex)),
                Err(e) => report.errors.push(format!("pod {}: {e}", pod.key)),
            }
        }
        if !resolved.is_empty() {
            let mut current = CaptureView::clone(&self.view.load());
            for (pod, ifindex) in &resolved {
                current.by_ifindex.insert(*ifindex, (*pod).clone());
                for ip in &pod.ips {
                    current.by_ip.insert(*ip, (*pod).clone());
                }
            }
            self.view.store(Arc::new(current));
        }

        // 1. Enrolled pods: maps first (the program ignores interfaces it does not know), then
        //    the program.
        let mut wanted_links: HashSet<LinkKey> = HashSet::new();
        let mut enrolled_ifindexes = HashSet::new();
        let mut wanted_ips: HashMap<IpAddr, PodIpEntry> = HashMap::new();
        let mut failed_targets: HashSet<LinkTarget> = HashSet::new();
        for (pod, ifindex) in resolved {
            // The program first: it ignores an interface until the maps name it, so attaching
            // early is harmless, and a failed attach leaves the maps (and the interface's
            // previous program) exactly as they were.
            match self.ensure_tc(TC_FROM_POD, &pod.host_iface, ifindex) {
                Ok(key) => {
                    wanted_links.insert(key);
                }
                Err(e) => {
                    report.errors.push(format!("pod {}: {e:#}", pod.key));
                    failed_targets.insert(LinkTarget::Interface(ifindex));
                    continue;
                }
            }
            let v4 = pod.ips.iter().find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            });
            let v6 = pod.ips.iter().find_map(|ip| match ip {
                IpAddr::V6(v6) => Some(*v6),
                IpAddr::V4(_) => None,
            });
            if let Err(e) = self.datapath.set_pod(ifindex, pod_addrs(v4, v6)) {
                report.errors.push(format!("pod {}: {e}", pod.key));
                failed_targets.insert(LinkTarget::Interface(ifindex));
                continue;
            }
            for ip in pod.ips.iter().copied() {
                wanted_ips.insert(
                    ip,
                    PodIpEntry {
                        ifindex,
                        flags: POD_IP_ENROLLED,
                    },
                );
                view.by_ip.insert(ip, pod.clone());
            }
            enrolled_ifindexes.insert(ifindex);
            view.by_ifindex.insert(ifindex, pod.clone());
            // The pod's side of splicing, only while the agent's side is there to meet it.
            let splice_cgroup = pod
                .cgroup
                .as_ref()
                .filter(|_| desired.agent_cgroup.is_some());
            if let Some(cgroup) = splice_cgroup {
                match self.ensure_sock_ops(SOCK_OPS_POD, cgroup) {
                    Ok(key) => {
                        wanted_links.insert(key);
                    }
                    Err(e) => report
                        .errors
                        .push(format!("pod {} (splice): {e:#}", pod.key)),
                }
            }
        }

        // 2. Every other way in: bystander pods' interfaces and the uplinks.
        let existing_ips: HashMap<IpAddr, PodIpEntry> = match self.datapath.pod_ips() {
            Ok(v) => v.into_iter().collect(),
            Err(e) => {
                report.errors.push(format!("reading pod addresses: {e}"));
                HashMap::new()
            }
        };
        let bystander_ifaces = desired.bystanders.iter().map(|p| (Some(p), &p.host_iface));
        let uplinks = desired.uplinks.iter().map(|u| (None, u));
        for (pod, iface) in bystander_ifaces.chain(uplinks) {
            let what = pod.map_or_else(|| format!("uplink {iface}"), |p| format!("pod {}", p.key));
            let ifindex = match ifindex_of(iface) {
                Ok(i) => i,
                Err(e) => {
                    report.errors.push(format!("{what}: {e}"));
                    continue;
                }
            };
            match self.ensure_tc(TC_TO_PODS, iface, ifindex) {
                Ok(key) => {
                    wanted_links.insert(key);
                }
                Err(e) => {
                    report.errors.push(format!("{what}: {e:#}"));
                    failed_targets.insert(LinkTarget::Interface(ifindex));
                }
            }
            // A pod that was enrolled keeps draining: connections the agent owns stay with it.
            if let Some(pod) = pod {
                for ip in &pod.ips {
                    if existing_ips.contains_key(ip) && !wanted_ips.contains_key(ip) {
                        wanted_ips.insert(*ip, PodIpEntry { ifindex, flags: 0 });
                    }
                }
            }
        }

        // Pods leaving the mesh now: their TIME_WAIT sockets are retired below and for a while.
        let now = std::time::Instant::now();
        for (ip, entry) in &existing_ips {
            let still = wanted_ips
                .get(ip)
                .is_some_and(|e| e.flags & POD_IP_ENROLLED != 0);
            if entry.flags & POD_IP_ENROLLED != 0 && !still {
                self.recently_left.insert(*ip, now + RETIRE_TIME_WAIT_FOR);
            }
        }
        for ip in wanted_ips.keys() {
            if wanted_ips[ip].flags & POD_IP_ENROLLED != 0 {
                self.recently_left.remove(ip);
            }
        }

        if let Some(cgroup) = &desired.agent_cgroup {
            match self.ensure_sock_ops(SOCK_OPS_AGENT, cgroup) {
                Ok(key) => {
                    wanted_links.insert(key);
                }
                Err(e) => report.errors.push(format!("agent cgroup (splice): {e:#}")),
            }
        }

        // The namespace's socket lookup, for captured SYNs that meet an agent socket in
        // TIME_WAIT (whenever anything is captured at all).
        if *desired != DesiredCapture::default() {
            match self.ensure_sk_lookup() {
                Ok(key) => {
                    wanted_links.insert(key);
                }
                Err(e) => report
                    .errors
                    .push(format!("node namespace (sk_lookup): {e:#}")),
            }
        }

        // 3. Map contents: exactly the wanted entries.
        for (ip, entry) in &wanted_ips {
            if existing_ips.get(ip) != Some(entry)
                && let Err(e) = self.datapath.set_pod_ip(*ip, *entry)
            {
                report.errors.push(format!("address {ip}: {e}"));
            }
        }
        for ip in existing_ips
            .keys()
            .filter(|ip| !wanted_ips.contains_key(ip))
        {
            if let Err(e) = self.datapath.remove_pod_ip(*ip) {
                report.errors.push(format!("address {ip}: {e}"));
            }
        }
        match self.datapath.pods() {
            Ok(pods) => {
                for (ifindex, _) in pods {
                    if !enrolled_ifindexes.contains(&ifindex)
                        && let Err(e) = self.datapath.remove_pod_iface(ifindex)
                    {
                        report.errors.push(format!("interface {ifindex}: {e}"));
                    }
                }
            }
            Err(e) => report.errors.push(format!("reading enrolled pods: {e}")),
        }

        // 4. Attachments this instance made that are no longer wanted, then every pin that is
        //    not one of ours (earlier instances, vanished interfaces). Where an attach failed,
        //    whatever covered the interface before stays: better the old program than none.
        let stale: Vec<_> = self
            .attached
            .keys()
            .filter(|k| !wanted_links.contains(k) && !failed_targets.contains(&k.1))
            .cloned()
            .collect();
        for key in stale {
            if let Some(a) = self.attached.remove(&key) {
                let target = a.describe();
                info!(program = key.0, target, "detaching");
                if let Err(e) = a.detach() {
                    report
                        .errors
                        .push(format!("detaching {} from {target}: {e}", key.0));
                }
            }
        }
        self.remove_foreign_link_pins(&failed_targets, &mut report);

        self.view.store(Arc::new(view));
        match self.retire_time_wait() {
            Ok(n) => report.time_wait_destroyed = n,
            Err(e) => report.errors.push(e),
        }
        for e in &report.errors {
            warn!(error = %e, "capture reconciliation");
        }
        report
    }

    /// Destroys the agent's TIME_WAIT sockets of pods that left the mesh in the last
    /// [`RETIRE_TIME_WAIT_FOR`]: once a pod is no longer captured, a SYN of its meeting one is
    /// dropped by the node and the pod hangs for up to a minute. Returns how many.
    pub fn retire_time_wait(&mut self) -> Result<usize, String> {
        if !self.owns_data_path() {
            return Ok(0);
        }
        let now = std::time::Instant::now();
        self.recently_left.retain(|_, until| *until > now);
        let ips: HashSet<IpAddr> = self.recently_left.keys().copied().collect();
        let n = super::time_wait::destroy_time_wait(&ips)
            .map_err(|e| format!("retiring TIME_WAIT sockets of pods that left the mesh: {e}"))?;
        if n > 0 {
            info!(sockets = n, pods_addresses = ?ips, "retired TIME_WAIT sockets of pods that left the mesh");
        }
        Ok(n)
    }

    /// Detaches everything and forgets every enrolment (maps emptied); the pins of maps and
    /// programs stay until [`remove_all`](super::remove_all).
    pub fn detach_all(&mut self) -> ReconcileReport {
        self.reconcile(&DesiredCapture::default())
    }

    /// Whether this instance's attachment for `key` exists and its pin is still there (a pin
    /// removed behind our back means someone detached it: forget it, so it is attached again).
    fn still_attached(&mut self, key: &LinkKey) -> bool {
        let Some(a) = self.attached.get(key) else {
            return false;
        };
        if a.pin_path().is_none_or(|p| p.exists()) {
            return true;
        }
        warn!(
            program = key.0,
            target = a.describe(),
            "our link pin disappeared; attaching again"
        );
        // Dropping our handle releases whatever is left of the link.
        drop(self.attached.remove(key));
        false
    }

    fn ensure_tc(
        &mut self,
        program: &'static str,
        iface: &str,
        ifindex: u32,
    ) -> anyhow::Result<LinkKey> {
        let key = (program, LinkTarget::Interface(ifindex));
        if self.still_attached(&key) {
            return Ok(key);
        }
        let pin = self.layout.link_path(program, &key.1, &self.instance);
        let attachment = self
            .datapath
            .attach_tc(program, iface, TcHook::Ingress, Some(&pin))?;
        info!(program, iface, ifindex, pin = %pin.display(), "attached");
        self.attached.insert(key.clone(), Attached::Tc(attachment));
        Ok(key)
    }

    fn ensure_sock_ops(&mut self, program: &'static str, cgroup: &Path) -> anyhow::Result<LinkKey> {
        let id = cgroup_id(cgroup).with_context(|| format!("cgroup {}", cgroup.display()))?;
        let key = (program, LinkTarget::Cgroup(id));
        if self.still_attached(&key) {
            return Ok(key);
        }
        let pin = self.layout.link_path(program, &key.1, &self.instance);
        let attachment = self.datapath.attach_sock_ops(program, cgroup, Some(&pin))?;
        info!(program, cgroup = %cgroup.display(), pin = %pin.display(), "attached");
        self.attached
            .insert(key.clone(), Attached::Cgroup(attachment));
        Ok(key)
    }

    fn ensure_sk_lookup(&mut self) -> anyhow::Result<LinkKey> {
        use std::os::unix::fs::MetadataExt as _;
        let inode = std::fs::metadata(OWN_NETNS)
            .with_context(|| format!("reading {OWN_NETNS}"))?
            .ino();
        let key = (SK_LOOKUP, LinkTarget::Netns(inode));
        if self.still_attached(&key) {
            return Ok(key);
        }
        let pin = self.layout.link_path(SK_LOOKUP, &key.1, &self.instance);
        let attachment = self
            .datapath
            .attach_sk_lookup(Path::new(OWN_NETNS), Some(&pin))?;
        info!(program = SK_LOOKUP, netns = inode, pin = %pin.display(), "attached");
        self.attached
            .insert(key.clone(), Attached::Netns(attachment));
        Ok(key)
    }

    /// Registers the agent's capture listeners in `MESH_LISTENERS`, where the tc programs and
    /// `mesh_sk_lookup` take them from: from this moment every new connection is this agent's
    /// (during a handover, the previous agent's listeners are replaced here).
    pub fn register_listeners(
        &mut self,
        listeners: &[super::listeners::CaptureListener],
    ) -> anyhow::Result<()> {
        for l in listeners {
            let ipv6 = l.listener.local_addr()?.is_ipv6();
            self.datapath
                .register_listener(l.kind, ipv6, &l.listener)
                .with_context(|| format!("registering the {:?} listener", l.kind))?;
        }
        if self.announcement.take().is_some() {
            info!("listeners registered: the previous agent may now send its peers GOAWAY");
        }
        Ok(())
    }

    fn remove_foreign_link_pins(
        &self,
        keep_targets: &HashSet<LinkTarget>,
        report: &mut ReconcileReport,
    ) {
        let pins = match self.layout.link_pins() {
            Ok(p) => p,
            Err(e) => {
                report.errors.push(format!("listing link pins: {e}"));
                return;
            }
        };
        let ours: HashSet<_> = self
            .attached
            .values()
            .filter_map(|a| a.pin_path().map(|p| p.to_owned()))
            .collect();
        // Tracing links are shared by agent instances (see `enable_splice`).
        let foreign = pins.into_iter().filter(|p| {
            !ours.contains(&p.path)
                && !keep_targets.contains(&p.target)
                && p.target != LinkTarget::Trace
        });
        for pin in foreign {
            info!(pin = %pin.path.display(), instance = %pin.instance, "removing link pin left by an earlier agent");
            if let Err(e) = remove_link_pin(&pin.path) {
                report
                    .errors
                    .push(format!("removing {}: {e}", pin.path.display()));
            }
        }
    }
}

/// Addresses of an enrolled pod entry, for display.
pub fn describe_pod_ips(entry: &mesh_common::PodAddrs) -> String {
    addrs_of(entry)
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
