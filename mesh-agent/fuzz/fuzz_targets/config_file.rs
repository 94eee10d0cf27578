//! The local configuration file and every object compiler behind it
//! (`mesh_agent::fuzz_checks::config_file` says what is checked).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mesh_agent::fuzz_checks::config_file(data));
