//! Attaching the splice programs: `mesh_sops_pod` / `mesh_sops_agent` (sock_ops) to cgroups,
//! `mesh_sk_msg` to the `MESH_SPLICE` sockhash, and `mesh_splice_read` (the queue accounting that
//! bounds what a spliced socket can hold) to the `sock_recv_length` tracepoint.
use std::{fs::File, path::Path};

use aya::{
    maps::{Array, SockHash},
    programs::{CgroupAttachMode, Program, SkMsg, SockOps, links::FdLink},
};
use mesh_common::capture::{
    CONFIG_AGENT_NETNS_COOKIE, CONFIG_MAP, CONFIG_SPLICE_QUEUE_BYTES, SPLICE_MAP, SpliceKey,
};

use super::{Datapath, DatapathError, programs, tc::Link};

/// A sock_ops program attached to one cgroup.
#[derive(Debug)]
pub struct CgroupAttachment {
    cgroup: std::path::PathBuf,
    link: Link,
}

impl CgroupAttachment {
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    pub fn pin_path(&self) -> Option<&Path> {
        self.link.pin_path()
    }

    pub fn detach(self) -> Result<(), DatapathError> {
        self.link.detach()
    }
}

impl Datapath {
    /// Attaches sock_ops program `name` to the cgroup v2 directory `cgroup` as a bpf_link (links
    /// on a cgroup always coexist — with other tools' programs and with our own during an
    /// overlapping restart; the kernel wants no attach flags for them).
    pub fn attach_sock_ops(
        &mut self,
        name: &'static str,
        cgroup: &Path,
        pin: Option<&Path>,
    ) -> Result<CgroupAttachment, DatapathError> {
        let attach_err = |source| DatapathError::AttachCgroup {
            name,
            cgroup: cgroup.to_owned(),
            source: Box::new(source),
        };
        let dir = File::open(cgroup).map_err(|source| DatapathError::Cgroup {
            cgroup: cgroup.to_owned(),
            source,
        })?;
        let prog = self.sock_ops(name)?;
        let id = prog
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        let link = FdLink::try_from(link).map_err(|source| DatapathError::Link {
            iface: cgroup.display().to_string(),
            source,
        })?;
        Ok(CgroupAttachment {
            cgroup: cgroup.to_owned(),
            link: Link::new(link, pin)?,
        })
    }

    /// Attaches `mesh_sk_msg` to `MESH_SPLICE`. The attachment belongs to the map (pinned), not to
    /// this process: it is deliberately not detached when the agent exits, and a restarted agent's
    /// attach replaces it.
    pub fn attach_splice_verdict(&mut self) -> Result<(), DatapathError> {
        let map_fd = {
            let map = self
                .ebpf_mut()
                .map(SPLICE_MAP)
                .ok_or(DatapathError::MissingMap(SPLICE_MAP))?;
            let hash =
                SockHash::<_, SpliceKey>::try_from(map).map_err(|source| DatapathError::Map {
                    name: SPLICE_MAP,
                    source,
                })?;
            hash.fd()
                .try_clone()
                .map_err(|source| DatapathError::Cgroup {
                    cgroup: SPLICE_MAP.into(),
                    source,
                })?
        };
        let name = programs::SK_MSG;
        let prog = self.sk_msg()?;
        let id = prog
            .attach(&map_fd)
            .map_err(|source| DatapathError::Program { name, source })?;
        let link = prog
            .take_link(id)
            .map_err(|source| DatapathError::Program { name, source })?;
        std::mem::forget(link);
        Ok(())
    }

    /// Attaches `mesh_splice_read` (raw tracepoint `sock_recv_length`), which counts what the owner
    /// of a spliced socket reads: without it the splice has no bound and must stay off. The link is
    /// pinned at `pin` and outlives the agent, so spliced sockets stay accounted across a restart;
    /// an existing pin is kept rather than replaced, because two attachments would both subtract.
    /// Returns whether it attached now.
    pub fn attach_splice_reader(&mut self, pin: &Path) -> Result<bool, DatapathError> {
        if pin.exists() {
            return Ok(false);
        }
        let name = programs::SPLICE_READ;
        let err = |source| DatapathError::Program { name, source };
        let prog = match self
            .ebpf_mut()
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
        {
            Program::RawTracePoint(p) => p,
            _ => return Err(unexpected_type(name)),
        };
        if prog.fd().is_err() {
            prog.load().map_err(err)?;
        }
        let id = prog.attach(programs::SPLICE_READ_TRACEPOINT).map_err(err)?;
        let link = FdLink::from(prog.take_link(id).map_err(err)?);
        link.pin(pin).map_err(|source| DatapathError::Pin {
            path: pin.to_owned(),
            source,
        })?;
        Ok(true)
    }

    /// Sets the bound on bytes redirected into one spliced socket and not yet read.
    pub fn set_splice_queue_bytes(&mut self, bytes: u64) -> Result<(), DatapathError> {
        self.set_config(CONFIG_SPLICE_QUEUE_BYTES, bytes)
    }

    /// Tells the programs the agent's network-namespace cookie (the calling thread's namespace):
    /// sk_msg tells agent sockets from pod sockets by it.
    pub fn set_agent_netns(&mut self) -> Result<(), DatapathError> {
        let cookie = own_netns_cookie().map_err(|source| DatapathError::Cgroup {
            cgroup: "SO_NETNS_COOKIE".into(),
            source,
        })?;
        self.set_config(CONFIG_AGENT_NETNS_COOKIE, cookie)
    }

    fn set_config(&mut self, slot: u32, value: u64) -> Result<(), DatapathError> {
        let map_err = |source| DatapathError::Map {
            name: CONFIG_MAP,
            source,
        };
        let map = self
            .ebpf_mut()
            .map_mut(CONFIG_MAP)
            .ok_or(DatapathError::MissingMap(CONFIG_MAP))?;
        Array::<_, u64>::try_from(map)
            .map_err(map_err)?
            .set(slot, value, 0)
            .map_err(map_err)
    }

    pub(super) fn sock_ops(&mut self, name: &'static str) -> Result<&mut SockOps, DatapathError> {
        let program = self.loaded_program(name)?;
        match program {
            Program::SockOps(p) => Ok(p),
            _ => Err(unexpected_type(name)),
        }
    }

    pub(super) fn sk_msg(&mut self) -> Result<&mut SkMsg, DatapathError> {
        let name = programs::SK_MSG;
        match self.loaded_program(name)? {
            Program::SkMsg(p) => Ok(p),
            _ => Err(unexpected_type(name)),
        }
    }

    /// Program `name`, loaded into the kernel (verified) on first use.
    pub(super) fn loaded_program(
        &mut self,
        name: &'static str,
    ) -> Result<&mut Program, DatapathError> {
        let program = self
            .ebpf_mut()
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?;
        let result = match program {
            Program::SockOps(p) if p.fd().is_err() => p.load(),
            Program::SkMsg(p) if p.fd().is_err() => p.load(),
            Program::SkLookup(p) if p.fd().is_err() => p.load(),
            _ => Ok(()),
        };
        result.map_err(|source| DatapathError::Program { name, source })?;
        Ok(program)
    }
}

/// The cookie of the calling thread's network namespace (Linux ≥ 5.14).
fn own_netns_cookie() -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a u64 out-parameter of the advertised length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

pub(super) fn unexpected_type(name: &'static str) -> DatapathError {
    DatapathError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    }
}
