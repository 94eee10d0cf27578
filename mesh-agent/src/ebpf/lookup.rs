//! `mesh_sk_lookup` on the node's network namespace, and the listener sockmap it answers from
//! (see mesh-ebpf `lookup.rs` for why the capture needs it).
use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::SockMap,
    programs::{Program, SkLookup, links::FdLink},
};
use mesh_common::{
    FlowKind,
    capture::{LISTENERS_MAP, listener_slot},
};

use super::{Datapath, DatapathError, programs, tc::Link};

/// `mesh_sk_lookup` attached to one network namespace.
#[derive(Debug)]
pub struct NetnsAttachment {
    netns: PathBuf,
    link: Link,
}

impl NetnsAttachment {
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    pub fn pin_path(&self) -> Option<&Path> {
        self.link.pin_path()
    }

    pub fn detach(self) -> Result<(), DatapathError> {
        self.link.detach()
    }
}

impl Datapath {
    /// Attaches `mesh_sk_lookup` to the network namespace at `netns` (e.g.
    /// `/proc/thread-self/ns/net`), pinning the link at `pin` if given. Several sk_lookup links
    /// coexist on a namespace (they run in order), so an overlapping restart never leaves a gap.
    pub fn attach_sk_lookup(
        &mut self,
        netns: &Path,
        pin: Option<&Path>,
    ) -> Result<NetnsAttachment, DatapathError> {
        let name = programs::SK_LOOKUP;
        let file = std::fs::File::open(netns).map_err(|source| DatapathError::Cgroup {
            cgroup: netns.to_owned(),
            source,
        })?;
        let prog = self.sk_lookup()?;
        let id = prog
            .attach(&file)
            .map_err(|source| DatapathError::Program { name, source })?;
        let link = prog
            .take_link(id)
            .map_err(|source| DatapathError::Program { name, source })?;
        Ok(NetnsAttachment {
            netns: netns.to_owned(),
            link: Link::new(FdLink::from(link), pin)?,
        })
    }

    /// Puts a capture listener where `mesh_sk_lookup` finds it. The kernel drops the entry when
    /// the socket closes, so a stopped agent leaves nothing behind in the map.
    pub fn register_listener(
        &mut self,
        kind: FlowKind,
        ipv6: bool,
        socket: &impl AsRawFd,
    ) -> Result<(), DatapathError> {
        let map = self
            .ebpf_mut()
            .map_mut(LISTENERS_MAP)
            .ok_or(DatapathError::MissingMap(LISTENERS_MAP))?;
        let mut sockets = SockMap::try_from(map).map_err(|source| DatapathError::Map {
            name: LISTENERS_MAP,
            source,
        })?;
        sockets
            .set(listener_slot(kind as u32, ipv6), socket, 0)
            .map_err(|source| DatapathError::Map {
                name: LISTENERS_MAP,
                source,
            })
    }

    pub(super) fn sk_lookup(&mut self) -> Result<&mut SkLookup, DatapathError> {
        let name = programs::SK_LOOKUP;
        match self.loaded_program(name)? {
            Program::SkLookup(p) => Ok(p),
            _ => Err(super::splice::unexpected_type(name)),
        }
    }
}
