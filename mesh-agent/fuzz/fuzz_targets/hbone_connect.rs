//! What a peer controls in a CONNECT: its `:authority` and its `forwarded` header
//! (`mesh_agent::fuzz_checks::hbone_connect` says what is checked).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mesh_agent::fuzz_checks::hbone_connect(data));
