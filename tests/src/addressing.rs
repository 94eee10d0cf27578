//! The testbed's address plan (dual stack everywhere), kindnet-style ptp pod networking.
//!
//! | what | IPv4 | IPv6 |
//! |---|---|---|
//! | node `i` uplink on the fabric LAN | 172.30.0.i/24 | fd00:30::i/64 |
//! | node `i` pod CIDR | 10.240.i.0/24 | fd00:240:i::/64 |
//! | pod `k` on node `i` | 10.240.i.(10+k)/32 | fd00:240:i::(10+k)/128 |
//! | pod's gateway (on every host-side veth) | 169.254.1.1 | fe80::1 |
//!
//! IPv6 groups are written with the same digits as the IPv4 octets so the two read alike.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Result, bail};

pub const MAX_NODES: usize = 200;
pub const MAX_PODS_PER_NODE: usize = 200;
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// `n` written as hex digits that read like the decimal number (12 -> 0x12), for IPv6 groups.
fn decimal_looking(n: usize) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).expect("small numbers are valid hex")
}

pub fn check_size(nodes: usize, pods_per_node: usize) -> Result<()> {
    if !(1..=MAX_NODES).contains(&nodes) || pods_per_node > MAX_PODS_PER_NODE {
        bail!(
            "testbed size {nodes} nodes x {pods_per_node} pods is outside 1..={MAX_NODES} x 0..={MAX_PODS_PER_NODE}"
        );
    }
    Ok(())
}

/// Node numbers and pod numbers are 1-based, like their names (node1, node1-pod1).
pub fn node_ipv4(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, 0, node as u8)
}

pub fn node_ipv6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, decimal_looking(node))
}

pub fn pod_cidr_v4(node: usize) -> String {
    format!("10.240.{node}.0/24")
}

pub fn pod_cidr_v6(node: usize) -> String {
    format!("fd00:240:{}::/64", node)
}

pub fn pod_ipv4(node: usize, pod: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 240, node as u8, (10 + pod) as u8)
}

pub fn pod_ipv6(node: usize, pod: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0x240,
        decimal_looking(node),
        0,
        0,
        0,
        0,
        decimal_looking(10 + pod),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_reads_alike_in_both_families() {
        assert_eq!(node_ipv4(2).to_string(), "172.30.0.2");
        assert_eq!(node_ipv6(2).to_string(), "fd00:30::2");
        assert_eq!(pod_ipv4(1, 2).to_string(), "10.240.1.12");
        assert_eq!(pod_ipv6(1, 2).to_string(), "fd00:240:1::12");
        assert_eq!(pod_cidr_v6(3), "fd00:240:3::/64");
    }

    #[test]
    fn pods_are_inside_their_node_cidr_and_unique() {
        let mut seen_v4 = std::collections::HashSet::new();
        let mut seen_v6 = std::collections::HashSet::new();
        for node in 1..=12 {
            for pod in 1..=30 {
                let v4 = pod_ipv4(node, pod);
                assert_eq!(v4.octets()[2] as usize, node);
                assert!(seen_v4.insert(v4), "duplicate {v4}");
                let v6 = pod_ipv6(node, pod);
                assert!(
                    v6.to_string().starts_with(&format!("fd00:240:{node}::")),
                    "{v6}"
                );
                assert!(seen_v6.insert(v6), "duplicate {v6}");
            }
        }
    }

    #[test]
    fn sizes_are_bounded() {
        assert!(check_size(2, 2).is_ok());
        assert!(check_size(0, 2).is_err());
        assert!(check_size(2, 500).is_err());
    }
}
