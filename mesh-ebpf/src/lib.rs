//! Library target of the eBPF crate: empty on purpose (see Cargo.toml).
#![no_std]
