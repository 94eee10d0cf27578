//! The agent's side of `MESH_FLOWS`: on accept, the entry the tc program wrote for the
//! connection's SYN says which interface it came from (the unforgeable source identity) and which
//! listener it was meant for. The entry is taken (removed) so the LRU only holds pending flows.
use std::{net::SocketAddr, path::Path, sync::Mutex};

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData};
use mesh_common::{FlowInfo, FlowKey, FlowKind, capture::FLOWS_MAP};

use crate::ebpf::ip_key;

/// A handle on the pinned flow table, usable from any task.
pub struct FlowTable {
    map: Mutex<HashMap<MapData, FlowKey, FlowInfo>>,
}

/// What the kernel recorded about a captured connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapturedFlow {
    pub ifindex: u32,
    pub kind: FlowKind,
}

impl FlowTable {
    /// Opens the table the running data path pinned in `maps_dir`.
    pub fn open(maps_dir: &Path) -> anyhow::Result<Self> {
        let path = maps_dir.join(FLOWS_MAP);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening the pinned flow table {}", path.display()))?;
        let map = HashMap::try_from(Map::LruHashMap(data))
            .with_context(|| format!("{} is not the flow table", path.display()))?;
        Ok(Self {
            map: Mutex::new(map),
        })
    }

    /// Takes the record of the connection from `client` to `original_dst`, if the kernel made one.
    pub fn take(&self, client: SocketAddr, original_dst: SocketAddr) -> Option<CapturedFlow> {
        let key = flow_key(client, original_dst);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let info = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(CapturedFlow {
            ifindex: info.ifindex,
            kind: FlowKind::from_u32(info.kind)?,
        })
    }
}

/// The map key for a connection (addresses v4-mapped, ports host order).
pub fn flow_key(client: SocketAddr, original_dst: SocketAddr) -> FlowKey {
    FlowKey {
        src: ip_key(client.ip()),
        dst: ip_key(original_dst.ip()),
        sport: client.port(),
        dport: original_dst.port(),
    }
}
