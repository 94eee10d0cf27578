//! Reading the per-CPU `MESH_COUNTERS` map.
use mesh_common::Counter;

/// Reads every counter of a `MESH_COUNTERS` array (owned by a loaded object or opened from its
/// pin), summed over CPUs.
pub fn read_counters<T: std::borrow::Borrow<aya::maps::MapData>>(
    array: &aya::maps::PerCpuArray<T, u64>,
) -> Result<CounterSnapshot, aya::maps::MapError> {
    let mut values = Vec::with_capacity(Counter::ALL.len());
    for counter in Counter::ALL {
        let per_cpu = array.get(&counter.slot(), 0)?;
        values.push((counter, per_cpu.iter().sum()));
    }
    Ok(CounterSnapshot::new(values))
}

/// The data path's counters summed over all CPUs at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    values: Vec<(Counter, u64)>,
}

impl CounterSnapshot {
    pub(crate) fn new(values: Vec<(Counter, u64)>) -> Self {
        Self { values }
    }

    /// The value of one counter (0 if it was never bumped).
    pub fn get(&self, counter: Counter) -> u64 {
        self.values
            .iter()
            .find(|(c, _)| *c == counter)
            .map_or(0, |(_, v)| *v)
    }

    /// Every counter with its value, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (Counter, u64)> + '_ {
        self.values.iter().copied()
    }

    /// How much each counter grew since `earlier` (counters only grow; saturates at 0).
    pub fn since(&self, earlier: &CounterSnapshot) -> CounterSnapshot {
        CounterSnapshot::new(
            self.values
                .iter()
                .map(|&(c, v)| (c, v.saturating_sub(earlier.get(c))))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_subtracts_per_counter_and_missing_reads_as_zero() {
        let before = CounterSnapshot::new(vec![(Counter::ObservedBytes, 100)]);
        let after = CounterSnapshot::new(vec![
            (Counter::ObservedBytes, 350),
            (Counter::ObservedIpv4Packets, 3),
        ]);
        let delta = after.since(&before);
        assert_eq!(delta.get(Counter::ObservedBytes), 250);
        assert_eq!(delta.get(Counter::ObservedIpv4Packets), 3);
        assert_eq!(delta.get(Counter::ObservedIpv6Packets), 0);
    }
}
