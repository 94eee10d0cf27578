//! Running a pinned tc program on a packet we make, through the kernel's `BPF_PROG_TEST_RUN`: the
//! verifier-checked program, its real maps, no interface or traffic needed. What the program
//! answers (`TC_ACT_*`) is what it would do with that frame on the interface named in the
//! context. Also [`tcx_ingress_programs`]: what is attached to an interface (the Debian
//! bpftool predates tcx).
use std::{ffi::CString, os::fd::FromRawFd, os::fd::OwnedFd, path::Path};

use anyhow::{Context as _, Result, bail};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_TCX_INGRESS: u32 = 46;

/// `TC_ACT_SHOT`: the frame is dropped.
pub const TC_ACT_SHOT: i32 = 2;

/// `bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Default)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `bpf_attr.test` for `BPF_PROG_TEST_RUN`.
#[repr(C)]
#[derive(Default)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `bpf_attr.query` for `BPF_PROG_QUERY`.
#[repr(C)]
#[derive(Default)]
struct Query {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    count: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// How many programs the tcx ingress chain of interface `ifindex` (in the calling thread's
/// network namespace) holds.
pub fn tcx_ingress_programs(ifindex: u32) -> Result<u32> {
    let mut attr = Query {
        target_ifindex: ifindex,
        attach_type: BPF_TCX_INGRESS,
        ..Query::default()
    };
    bpf(BPF_PROG_QUERY, &mut attr).context("BPF_PROG_QUERY")?;
    Ok(attr.count)
}

/// `struct __sk_buff` up to `ifindex`: the only field set (the kernel zero-fills the rest).
#[repr(C)]
#[derive(Default)]
struct SkBuffCtx {
    len: u32,
    pkt_type: u32,
    mark: u32,
    queue_mapping: u32,
    protocol: u32,
    vlan_present: u32,
    vlan_tci: u32,
    vlan_proto: u32,
    priority: u32,
    ingress_ifindex: u32,
    ifindex: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a valid, initialised bpf_attr member of the advertised size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// A pinned program, opened by its pin path.
pub struct PinnedProgram(OwnedFd);

impl PinnedProgram {
    pub fn open(pin: &Path) -> Result<Self> {
        let path = CString::new(pin.as_os_str().as_encoded_bytes())?;
        let mut attr = ObjGet {
            pathname: path.as_ptr() as u64,
            ..ObjGet::default()
        };
        let fd =
            bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("opening {}", pin.display()))?;
        // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// Runs the (tc) program once on `frame` as if it arrived on interface `ifindex` of the
    /// calling thread's network namespace; its return code. `None` when the kernel's test
    /// harness refuses the frame itself (EINVAL: e.g. an IPv4 or IPv6 frame shorter than its
    /// fixed header, which it parses before the program runs).
    pub fn run_tc(&self, frame: &[u8], ifindex: u32) -> Result<Option<i32>> {
        use std::os::fd::AsRawFd as _;
        if frame.len() < 14 {
            bail!("a frame has at least an Ethernet header");
        }
        let ctx = SkBuffCtx {
            ifindex,
            ..SkBuffCtx::default()
        };
        let mut attr = TestRun {
            prog_fd: self.0.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat: 1,
            ctx_size_in: std::mem::size_of::<SkBuffCtx>() as u32,
            ctx_in: &ctx as *const SkBuffCtx as u64,
            ..TestRun::default()
        };
        match bpf(BPF_PROG_TEST_RUN, &mut attr) {
            Ok(_) => Ok(Some(attr.retval as i32)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(e) => Err(e).context("BPF_PROG_TEST_RUN"),
        }
    }
}
