//! [`Datapath`]: the loaded eBPF object and the operations the agent performs on it.
use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, PerCpuArray},
    programs::{Program, SchedClassifier},
};
use mesh_common::COUNTERS_MAP;

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

    /// Loads the object with every map pinned in `maps_dir` (created if missing): maps already
    /// pinned there by a previous agent are adopted with their contents, the others are created
    /// and pinned. This is what lets enrolments and captured flows survive an agent restart.
    pub fn load_pinned(maps_dir: &Path) -> Result<Self, DatapathError> {
        std::fs::create_dir_all(maps_dir).map_err(|source| DatapathError::PinDir {
            path: maps_dir.to_owned(),
            source,
        })?;
        let mut loader = EbpfLoader::new();
        for name in super::MAPS {
            loader.map_pin_path(name, maps_dir.join(name));
        }
        Ok(Self {
            ebpf: loader.load(OBJECT)?,
        })
    }

    /// Runs every program through the kernel verifier now, instead of at first attach.
    pub fn verify_all(&mut self) -> Result<(), DatapathError> {
        for name in super::programs::ALL_TC {
            self.classifier(name)?;
        }
        for name in super::programs::ALL_SOCK_OPS {
            self.sock_ops(name)?;
        }
        self.sk_msg()?;
        self.sk_lookup()?;
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
    /// Attaches program `name` to `iface` (calling thread's netns) at `hook`, pinning the link at
    /// `pin` if given (the attachment then outlives this process until the pin is removed).
    pub fn attach_tc(
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
    /// Pins every tc program at `<dir>/<program>`, replacing pins of an earlier instance, so
    /// `bpftool prog show pinned` finds what is running.
    pub fn pin_programs(&mut self, dir: &Path) -> Result<(), DatapathError> {
        let names = super::programs::ALL_TC
            .into_iter()
            .chain(super::programs::ALL_SOCK_OPS)
            .chain([super::programs::SK_MSG, super::programs::SK_LOOKUP]);
        for name in names {
            let path = dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(DatapathError::Unpin { path, source }),
            }
            let pinned = if super::programs::ALL_TC.contains(&name) {
                self.classifier(name)?.pin(&path)
            } else if name == super::programs::SK_MSG {
                self.sk_msg()?.pin(&path)
            } else if name == super::programs::SK_LOOKUP {
                self.sk_lookup()?.pin(&path)
            } else {
                self.sock_ops(name)?.pin(&path)
            };
            pinned.map_err(|source| DatapathError::Pin { path, source })?;
        }
        Ok(())
    }

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
        super::counters::read_counters(&array).map_err(|source| DatapathError::Map {
            name: COUNTERS_MAP,
            source,
        })
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
