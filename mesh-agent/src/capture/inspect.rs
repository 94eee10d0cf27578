//! Read-only views of a running (or stopped) agent's pinned maps, for `--explain-datapath`, the
//! admin API and tests: nothing here needs the agent process or loads a program.
use std::{net::IpAddr, path::Path};

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use mesh_common::{COUNTERS_MAP, PODS_MAP, PodAddrs, PodIpEntry, capture::POD_IPS_MAP};

use crate::ebpf::{CounterSnapshot, ip_from_key, raw, read_counters};

/// The pinned maps of one data path.
pub struct PinnedMaps {
    dir: std::path::PathBuf,
}

impl PinnedMaps {
    /// `maps_dir` is `<bpffs dir>/maps`.
    pub fn new(maps_dir: &Path) -> Self {
        Self {
            dir: maps_dir.to_owned(),
        }
    }

    pub(crate) fn open(&self, name: &str) -> anyhow::Result<MapData> {
        let path = self.dir.join(name);
        MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))
    }

    /// Counters summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<CounterSnapshot> {
        Ok(read_counters(&self.counters_map()?)?)
    }

    /// The counter map, opened (keep it to read the counters repeatedly without reopening).
    pub fn counters_map(&self) -> anyhow::Result<PerCpuArray<MapData, u64>> {
        Ok(PerCpuArray::<MapData, u64>::try_from(Map::PerCpuArray(
            self.open(COUNTERS_MAP)?,
        ))?)
    }

    /// Enrolled interfaces (ifindex, addresses), sorted by ifindex.
    pub fn pods(&self) -> anyhow::Result<Vec<(u32, PodAddrs)>> {
        let map = HashMap::<MapData, u32, PodAddrs>::try_from(Map::HashMap(self.open(PODS_MAP)?))?;
        let mut out = map.iter().collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|(i, _)| *i);
        Ok(out)
    }

    /// Watched pod addresses, sorted.
    pub fn pod_ips(&self) -> anyhow::Result<Vec<(IpAddr, PodIpEntry)>> {
        let map = HashMap::<MapData, [u8; 16], PodIpEntry>::try_from(Map::HashMap(
            self.open(POD_IPS_MAP)?,
        ))?;
        let mut out = map
            .iter()
            .map(|r| r.map(|(k, v)| (ip_from_key(k), v)))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|(ip, _)| *ip);
        Ok(out)
    }
}

/// How full one map is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapOccupancy {
    pub name: &'static str,
    pub entries: u64,
    pub capacity: u64,
    /// Counting stopped at the limit given to [`PinnedMaps::occupancy`].
    pub truncated: bool,
}

/// The hash-type maps whose number of entries means something (arrays are always full).
const COUNTED_MAPS: [&str; 8] = [
    PODS_MAP,
    POD_IPS_MAP,
    mesh_common::capture::FLOWS_MAP,
    mesh_common::capture::CAPTURED_MAP,
    mesh_common::capture::SPLICE_MAP,
    mesh_common::capture::SPLICE_PEERS_MAP,
    mesh_common::capture::SPLICE_SOCKETS_MAP,
    mesh_common::capture::SPLICE_QUEUE_MAP,
];

impl PinnedMaps {
    /// Every spliced socket's [`SpliceQueue`] (bytes sent to it and read by it, by path): what
    /// the splice's bound is enforced on.
    pub fn splice_queues(&self) -> anyhow::Result<Vec<mesh_common::capture::SpliceQueue>> {
        let map = HashMap::<MapData, u64, mesh_common::capture::SpliceQueue>::try_from(
            Map::HashMap(self.open(mesh_common::capture::SPLICE_QUEUE_MAP)?),
        )?;
        Ok(map
            .iter()
            .map(|r| r.map(|(_, q)| q))
            .collect::<Result<_, _>>()?)
    }
}

impl PinnedMaps {
    /// Entries and capacity of every hash-type map, counting at most `limit` keys per map. Each
    /// key is a syscall that walks the map's buckets from the last key (the first one walks all
    /// of them: ~65,536 buckets for an empty flow table), so callers cache the result.
    pub fn occupancy(&self, limit: u64) -> Vec<MapOccupancy> {
        COUNTED_MAPS
            .iter()
            .filter_map(|&name| {
                let map = self.open(name).ok()?;
                let info = map.info().ok()?;
                let (entries, truncated) = count_keys(&map, info.key_size() as usize, limit);
                Some(MapOccupancy {
                    name,
                    entries,
                    capacity: u64::from(info.max_entries()),
                    truncated,
                })
            })
            .collect()
    }
}

/// Walks a map's keys with BPF_MAP_GET_NEXT_KEY (aya exposes key iteration only for typed maps).
fn count_keys(map: &MapData, key_size: usize, limit: u64) -> (u64, bool) {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    #[repr(C)]
    struct NextKeyAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut key = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut count = 0u64;
    let mut first = true;
    while count < limit {
        let attr = NextKeyAttr {
            map_fd: fd,
            _pad: 0,
            // A null key asks for the first key.
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: the attribute points at buffers of the map's key size that outlive the call.
        if unsafe { raw::bpf(raw::MAP_GET_NEXT_KEY, &attr) }.is_err() {
            return (count, false);
        }
        count += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    (count, true)
}
