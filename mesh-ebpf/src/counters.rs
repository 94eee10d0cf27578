//! The per-reason counter map and the one way programs bump it.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use mesh_common::Counter;

/// Per-CPU so that bumping a counter never contends between CPUs; userspace sums the slots.
#[map(name = "MESH_COUNTERS")]
static MESH_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::SLOTS, 0);

/// Adds `n` to `counter` on this CPU.
#[inline(always)]
pub fn add(counter: Counter, n: u64) {
    if let Some(slot) = MESH_COUNTERS.get_ptr_mut(counter.slot()) {
        // SAFETY: the pointer comes from the map lookup and is only touched by this CPU.
        unsafe { *slot += n };
    }
}
