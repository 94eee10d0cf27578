//! Clean-up of splice entries whose socket closed unseen. `mesh_sops_*` forget a socket at
//! `TCP_CLOSE`, but only while a sock_ops program is attached to its cgroup: a pod that leaves the
//! capture with spliced connections open, or an agent restarted with `--splice=off`, leaves the
//! entries of those sockets behind when they close. Left alone they would fill the maps (65,536
//! entries), after which new sockets stay on TCP. Nothing here is needed for correctness: a
//! missing entry only ever sends bytes by TCP.
use std::{collections::HashSet, path::Path};

use super::inspect::PinnedMaps;
use aya::maps::{HashMap, Map, MapData, SockHash};
use mesh_common::capture::{
    SPLICE_MAP, SPLICE_QUEUE_MAP, SPLICE_SOCKETS_MAP, SpliceKey, SpliceQueue,
};

/// What one sweep removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub sockets: usize,
    pub queues: usize,
}

/// Sweeps the pinned splice maps in `maps_dir` now and then. A queue entry is removed only when
/// no live socket claimed it in two sweeps in a row: a socket joining during a sweep has its queue
/// entry before it is in the sockhash.
#[derive(Debug, Default)]
pub struct SpliceSweeper {
    suspects: HashSet<u64>,
}

impl SpliceSweeper {
    pub fn sweep(&mut self, maps_dir: &Path) -> anyhow::Result<SweepReport> {
        let mut report = SweepReport::default();
        let maps = PinnedMaps::new(maps_dir);
        let mut queues = HashMap::<MapData, u64, SpliceQueue>::try_from(Map::HashMap(
            maps.open(SPLICE_QUEUE_MAP)?,
        ))?;
        let mut sockets = HashMap::<MapData, SpliceKey, u64>::try_from(Map::HashMap(
            maps.open(SPLICE_SOCKETS_MAP)?,
        ))?;
        let spliced =
            SockHash::<MapData, SpliceKey>::try_from(Map::SockHash(maps.open(SPLICE_MAP)?))?;
        // Order matters. Queue keys first: a queue entry made after this read is not judged.
        // Then the socket entries, then the sockhash: a socket enters the sockhash before its
        // socket entry is written, so an entry read here whose key is not in the sockhash read
        // after it belongs to a socket that has closed.
        let queue_keys: Vec<u64> = queues.keys().filter_map(Result::ok).collect();
        let entries: Vec<(SpliceKey, u64)> = sockets.iter().filter_map(Result::ok).collect();
        let live_keys: HashSet<SpliceKey> = spliced.keys().filter_map(Result::ok).collect();
        let mut live = HashSet::new();
        for (key, addr) in entries {
            if live_keys.contains(&key) {
                live.insert(addr);
            } else if sockets.remove(&key).is_ok() {
                report.sockets += 1;
            }
        }
        let mut suspects = HashSet::new();
        for addr in queue_keys.into_iter().filter(|a| !live.contains(a)) {
            if self.suspects.contains(&addr) {
                if queues.remove(&addr).is_ok() {
                    report.queues += 1;
                }
            } else {
                suspects.insert(addr);
            }
        }
        self.suspects = suspects;
        Ok(report)
    }
}
