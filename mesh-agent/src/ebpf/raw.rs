//! bpf(2) commands aya does not offer on the maps we hold (key iteration of an untyped map,
//! lookup-and-delete of a hash map element), as one system call each.

/// BPF_MAP_LOOKUP_ELEM.
pub const MAP_LOOKUP_ELEM: libc::c_long = 1;
/// BPF_MAP_DELETE_ELEM.
pub const MAP_DELETE_ELEM: libc::c_long = 3;
/// BPF_MAP_GET_NEXT_KEY.
pub const MAP_GET_NEXT_KEY: libc::c_long = 4;
/// BPF_MAP_LOOKUP_AND_DELETE_ELEM (hash maps: Linux 5.14).
pub const MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// Runs the bpf(2) command `cmd` with `attr` (a `union bpf_attr` member, `#[repr(C)]`).
///
/// # Safety
/// Every pointer in `attr` must point at memory of the size the command and the map expect,
/// valid (and writable where the kernel writes) for the duration of the call.
pub unsafe fn bpf<A>(cmd: libc::c_long, attr: &A) -> std::io::Result<()> {
    // SAFETY: the caller vouches for the pointers inside `attr`; `attr` itself is a live
    // reference of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_ref(attr), size_of::<A>()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
