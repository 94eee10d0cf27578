//! The CA's check of a certificate signing request
//! (`mesh_agent::fuzz_checks::csr_check` says what is checked).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mesh_agent::fuzz_checks::csr_check(data));
