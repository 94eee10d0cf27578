//! [`Datapath`]: the loaded eBPF object and the operations the agent performs on it.
use std::path::Path;

use aya::{
    Ebpf,
    maps::{Map, MapData, PerCpuArray},
    programs::{Program, SchedClassifier},
};
use mesh_common::{COUNTERS_MAP, Counter};

use super::{
    CounterSnapshot, DatapathError, OBJECT, TcAttachment, TcHook, programs::TC_OBSERVE, tc,
};

/// The eBPF object loaded into the kernel. Programs are verified lazily, the first time they are
/// attached, so a kernel that lacks one program type only fails the features that need it.
pub struct Datapath {
    ebpf: Ebpf,
}

/// One program or map of the object, for operators (`mesh-agent ebpf check`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectEntry {
    pub kind: &'static str,
    pub name: String,
    pub detail: String,
}

impl Datapath {
    /// Loads the embedded object: creates its maps; programs are verified when first attached.
    pub fn load() -> Result<Self, DatapathError> {
        Ok(Self {
            ebpf: Ebpf::load(OBJECT)?,
        })
    }

    /// Runs every program through the kernel verifier now, instead of at first attach.
    pub fn verify_all(&mut self) -> Result<(), DatapathError> {
        self.classifier(TC_OBSERVE)?;
        self.classifier(super::programs::TC_FROM_POD)?;
        Ok(())
    }

    /// Programs and maps of the object with their kernel types.
    pub fn describe(&self) -> Vec<ObjectEntry> {
        let programs = self.ebpf.programs().map(|(name, prog)| ObjectEntry {
            kind: "program",
            name: name.to_owned(),
            detail: format!(
                "{:?}{}",
                prog.prog_type(),
                if prog.fd().is_ok() { ", verified" } else { "" }
            ),
        });
        let maps = self.ebpf.maps().map(|(name, map)| ObjectEntry {
            kind: "map",
            name: name.to_owned(),
            detail: map_kind(map).to_owned(),
        });
        programs.chain(maps).collect()
    }

    /// Attaches the frame-counting observer to `iface` (in the calling thread's network namespace)
    /// through tcx. With `pin`, the link is pinned there and outlives this process.
    pub fn attach_tc_observer(
        &mut self,
        iface: &str,
        hook: TcHook,
        pin: Option<&Path>,
    ) -> Result<TcAttachment, DatapathError> {
        self.attach_tc(TC_OBSERVE, iface, hook, pin)
    }

    /// Attaches the named tc program (see [`super::programs`]) to `iface`.
    pub(super) fn attach_tc(
        &mut self,
        name: &'static str,
        iface: &str,
        hook: TcHook,
        pin: Option<&Path>,
    ) -> Result<TcAttachment, DatapathError> {
        let prog = self.classifier(name)?;
        tc::attach(prog, name, iface, hook, pin)
    }

    /// The underlying object, for sibling modules that own other maps.
    pub(super) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<CounterSnapshot, DatapathError> {
        let map = self
            .ebpf
            .map(COUNTERS_MAP)
            .ok_or(DatapathError::MissingMap(COUNTERS_MAP))?;
        let array =
            PerCpuArray::<&MapData, u64>::try_from(map).map_err(|source| DatapathError::Map {
                name: COUNTERS_MAP,
                source,
            })?;
        let mut values = Vec::with_capacity(Counter::ALL.len());
        for counter in Counter::ALL {
            let per_cpu = array
                .get(&counter.slot(), 0)
                .map_err(|source| DatapathError::Map {
                    name: COUNTERS_MAP,
                    source,
                })?;
            values.push((counter, per_cpu.iter().sum()));
        }
        Ok(CounterSnapshot::new(values))
    }

    /// The named tc program, loaded (verified) if it was not yet.
    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        let program = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?;
        let classifier: &mut SchedClassifier = match program {
            Program::SchedClassifier(p) => p,
            _ => {
                return Err(DatapathError::Program {
                    name,
                    source: aya::programs::ProgramError::UnexpectedProgramType,
                });
            }
        };
        if classifier.fd().is_err() {
            classifier
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(classifier)
    }
}

/// The map's kind as aya names it (for display; aya keeps the raw kernel map type private).
fn map_kind(map: &Map) -> &'static str {
    match map {
        Map::Array(_) => "Array",
        Map::PerCpuArray(_) => "PerCpuArray",
        Map::HashMap(_) => "HashMap",
        Map::PerCpuHashMap(_) => "PerCpuHashMap",
        Map::LruHashMap(_) => "LruHashMap",
        Map::LpmTrie(_) => "LpmTrie",
        Map::SockHash(_) => "SockHash",
        Map::SockMap(_) => "SockMap",
        Map::RingBuf(_) => "RingBuf",
        _ => "other",
    }
}
