//! The agent's side of `MESH_FLOWS`: on accept, the entry the tc program wrote for the
//! connection's SYN says which interface it came from (the unforgeable source identity) and which
//! listener it was meant for. The entry is taken (removed) so the LRU only holds pending flows.
use std::{
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;
use aya::maps::{MapData, MapType};
use mesh_common::{FlowInfo, FlowKey, FlowKind, capture::FLOWS_MAP};

use crate::ebpf::{ip_key, raw};

/// A handle on the pinned flow table, usable from any task (system calls on one descriptor).
pub struct FlowTable {
    map: MapData,
    /// BPF_MAP_LOOKUP_AND_DELETE_ELEM on hash maps needs Linux 5.14; older kernels answer
    /// ENOTSUPP (4.20-5.13) or EINVAL (unknown command) and the table falls back to a lookup
    /// and a delete (two calls per connection).
    lookup_and_delete: AtomicBool,
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
        let map = MapData::from_pin(&path)
            .with_context(|| format!("opening the pinned flow table {}", path.display()))?;
        let info = map
            .info()
            .with_context(|| format!("reading {}'s description", path.display()))?;
        let sizes = (info.key_size() as usize, info.value_size() as usize);
        anyhow::ensure!(
            info.map_type().ok() == Some(MapType::LruHash)
                && sizes == (size_of::<FlowKey>(), size_of::<FlowInfo>()),
            "{} is not the flow table (type {:?}, key and value sizes {sizes:?})",
            path.display(),
            info.map_type().ok()
        );
        Ok(Self {
            map,
            lookup_and_delete: AtomicBool::new(true),
        })
    }

    /// Takes the record of the connection from `client` to `original_dst`, if the kernel made one.
    pub fn take(&self, client: SocketAddr, original_dst: SocketAddr) -> Option<CapturedFlow> {
        let key = flow_key(client, original_dst);
        let info = if self.lookup_and_delete.load(Ordering::Relaxed) {
            match self.call(raw::MAP_LOOKUP_AND_DELETE_ELEM, &key, true) {
                Err(e) if unsupported(&e) => {
                    self.lookup_and_delete.store(false, Ordering::Relaxed);
                    return self.take(client, original_dst);
                }
                other => other.ok()?,
            }
        } else {
            let info = self.call(raw::MAP_LOOKUP_ELEM, &key, true).ok()?;
            let _ = self.call(raw::MAP_DELETE_ELEM, &key, false);
            info
        };
        Some(CapturedFlow {
            ifindex: info.ifindex,
            kind: FlowKind::from_u32(info.kind)?,
        })
    }

    /// One element command on `key`, reading the value when `value` (aya offers no
    /// lookup-and-delete on hash maps).
    fn call(&self, cmd: libc::c_long, key: &FlowKey, value: bool) -> std::io::Result<FlowInfo> {
        #[repr(C)]
        struct ElemAttr {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let mut info = FlowInfo::default();
        let attr = ElemAttr {
            map_fd: self.map.fd().as_fd().as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(key) as u64,
            value: if value {
                std::ptr::from_mut(&mut info) as u64
            } else {
                0
            },
            flags: 0,
        };
        // SAFETY: the attribute points at a key and a value of the map's sizes (checked in
        // `open`) that outlive the call.
        unsafe { raw::bpf(cmd, &attr) }?;
        Ok(info)
    }
}

/// The kernel does not know lookup-and-delete on hash maps (ENOTSUPP is the kernel's 524, which
/// libc does not name).
fn unsupported(e: &std::io::Error) -> bool {
    const ENOTSUPP: i32 = 524;
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
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
