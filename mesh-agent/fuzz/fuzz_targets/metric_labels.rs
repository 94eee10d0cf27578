//! Istio's metric labels with values from anywhere, through the text exposition
//! (`mesh_agent::fuzz_checks::metric_labels` says what is checked).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mesh_agent::fuzz_checks::metric_labels(data));
