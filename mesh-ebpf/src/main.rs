//! mesh-agent's eBPF programs. One object (`mesh`) holds every program and map; the agent loads it
//! once and attaches each program where the data path needs it.
#![no_std]
#![no_main]

mod counters;
mod from_pod;
mod lookup;
mod maps;
mod observe;
mod packet;
mod refuse;
mod splice;
mod steer;
mod to_pods;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible licence: several helpers the data path needs (e.g. `bpf_sk_assign`) are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
