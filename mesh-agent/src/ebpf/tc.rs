//! Attaching tc programs with tcx links, optionally pinned so they survive the agent.
use std::path::{Path, PathBuf};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::TcAttachOptions,
};

use super::DatapathError;

/// Which direction of an interface a tc program sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcHook {
    /// Frames the interface receives (for a pod's host-side veth: what the pod sends).
    Ingress,
    /// Frames the interface transmits (for a pod's host-side veth: what the pod receives).
    Egress,
}

impl From<TcHook> for TcAttachType {
    fn from(hook: TcHook) -> Self {
        match hook {
            TcHook::Ingress => TcAttachType::Ingress,
            TcHook::Egress => TcAttachType::Egress,
        }
    }
}

/// A tc program attached to one interface. Dropping an unpinned attachment detaches it; a pinned
/// one stays in the kernel until [`TcAttachment::detach`] (or removal of the pin).
#[derive(Debug)]
pub struct TcAttachment {
    iface: String,
    hook: TcHook,
    link: Link,
}

/// A link either owned by this process (detached when dropped) or pinned in bpffs (outlives us).
#[derive(Debug)]
pub(super) enum Link {
    Owned(FdLink),
    Pinned { link: PinnedLink, path: PathBuf },
}

impl Link {
    /// Wraps a fresh link, pinning it at `pin` if given.
    pub(super) fn new(link: FdLink, pin: Option<&Path>) -> Result<Self, DatapathError> {
        Ok(match pin {
            None => Link::Owned(link),
            Some(path) => {
                let pinned = link.pin(path).map_err(|source| DatapathError::Pin {
                    path: path.to_owned(),
                    source,
                })?;
                Link::Pinned {
                    link: pinned,
                    path: path.to_owned(),
                }
            }
        })
    }

    pub(super) fn pin_path(&self) -> Option<&Path> {
        match self {
            Link::Owned(_) => None,
            Link::Pinned { path, .. } => Some(path),
        }
    }

    /// Detaches now (an unpinned link's last fd is closed here, which detaches synchronously).
    pub(super) fn detach(self) -> Result<(), DatapathError> {
        match self {
            Link::Owned(link) => drop(link),
            Link::Pinned { link, path } => {
                let link = link
                    .unpin()
                    .map_err(|source| DatapathError::Unpin { path, source })?;
                drop(link);
            }
        }
        Ok(())
    }
}

impl TcAttachment {
    /// The interface the program is attached to.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// The direction it is attached to.
    pub fn hook(&self) -> TcHook {
        self.hook
    }

    /// Where the link is pinned, if it is.
    pub fn pin_path(&self) -> Option<&Path> {
        self.link.pin_path()
    }

    /// Removes the pin (if any) and releases the link, which detaches the program.
    pub fn detach(self) -> Result<(), DatapathError> {
        self.link.detach()
    }
}

pub(super) fn attach(
    prog: &mut SchedClassifier,
    name: &'static str,
    iface: &str,
    hook: TcHook,
    pin: Option<&Path>,
) -> Result<TcAttachment, DatapathError> {
    let attach_err = |source| DatapathError::Attach {
        name,
        iface: iface.to_owned(),
        source,
    };
    // `mesh_tc_from_pod` goes first on its interface: while a pod is being enrolled, the
    // interface still carries `mesh_tc_to_pods`, which must not see the pod's packets before
    // the anti-spoofing check has. Everything else is appended.
    let order = if name == super::programs::TC_FROM_POD {
        LinkOrder::first()
    } else {
        LinkOrder::default()
    };
    let id = prog
        .attach_with_options(iface, hook.into(), TcAttachOptions::TcxOrder(order))
        .map_err(attach_err)?;
    let link = prog.take_link(id).map_err(attach_err)?;
    let link = FdLink::try_from(link).map_err(|source| DatapathError::Link {
        iface: iface.to_owned(),
        source,
    })?;
    let link = Link::new(link, pin)?;
    Ok(TcAttachment {
        iface: iface.to_owned(),
        hook,
        link,
    })
}
