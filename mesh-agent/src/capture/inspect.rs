//! Read-only views of a running (or stopped) agent's pinned maps, for `--explain-datapath`, the
//! admin API and tests: nothing here needs the agent process or loads a program.
use std::{net::IpAddr, path::Path};

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use mesh_common::{COUNTERS_MAP, PODS_MAP, PodAddrs, PodIpEntry, capture::POD_IPS_MAP};

use crate::ebpf::{CounterSnapshot, ip_from_key, read_counters};

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

    fn open(&self, name: &str) -> anyhow::Result<MapData> {
        let path = self.dir.join(name);
        MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))
    }

    /// Counters summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<CounterSnapshot> {
        let array =
            PerCpuArray::<MapData, u64>::try_from(Map::PerCpuArray(self.open(COUNTERS_MAP)?))?;
        Ok(read_counters(&array)?)
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
