//! The local configuration file, and every object compiler behind it: workloads, services,
//! namespaces, and the `policies:` list (AuthorizationPolicy, PeerAuthentication,
//! RequestAuthentication, VirtualService, DestinationRule, Gateway API routes). Invariants: no
//! panic; an accepted file builds the data path's state, its policies and its routes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::{discovery::LocalConfig, l7::route::RouteTable, node::state::MeshState};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = LocalConfig::parse(text) else {
        return;
    };
    let _ = config.compile_policies();
    let _ = MeshState::from_config(&config);
    let _ = RouteTable::build(&config.policies);
});
