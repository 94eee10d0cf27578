//! The policy routing the capture needs in the node's network namespace: packets the tc programs
//! mark with [`MARK_DELIVER_LOCAL`] are looked up in [`ROUTE_TABLE`], whose only routes are
//! `local default dev lo` (IPv4 and IPv6), so the node delivers them to the agent's sockets although
//! their destination is a pod or a remote address.
//!
//! Managed through iproute2 (`ip -j`), idempotently: `ensure` converges to exactly our rule and
//! route per family, `remove` deletes them, `describe` lists what is there.
use std::process::Command;

use anyhow::{Context as _, bail};
use mesh_common::capture::{MARK_DELIVER_LOCAL, ROUTE_TABLE, RULE_PRIORITY};
use serde::Deserialize;

const FAMILIES: [&str; 2] = ["-4", "-6"];

/// One routing object we own, for `--explain-datapath`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingObject {
    pub kind: &'static str,
    pub description: String,
}

#[derive(Deserialize, Debug)]
struct RuleJson {
    priority: Option<u32>,
    fwmark: Option<String>,
    fwmask: Option<String>,
    table: Option<String>,
}

/// Installs (or repairs) the rule and the local route for both families.
pub fn ensure() -> anyhow::Result<()> {
    for family in FAMILIES {
        let rules = our_rules(family)?;
        let wanted = rules.len() == 1 && rule_is_ours(&rules[0]);
        if !wanted {
            for _ in 0..rules.len() {
                ip(&[family, "rule", "del", "pref", &RULE_PRIORITY.to_string()])?;
            }
            ip(&[
                family,
                "rule",
                "add",
                "pref",
                &RULE_PRIORITY.to_string(),
                "fwmark",
                &format!("{MARK_DELIVER_LOCAL:#x}/{MARK_DELIVER_LOCAL:#x}"),
                "lookup",
                &ROUTE_TABLE.to_string(),
            ])?;
        }
        let default = if family == "-4" { "0.0.0.0/0" } else { "::/0" };
        ip(&[
            family,
            "route",
            "replace",
            "local",
            default,
            "dev",
            "lo",
            "table",
            &ROUTE_TABLE.to_string(),
        ])?;
    }
    Ok(())
}

/// Deletes every rule at our priority and flushes our table, for both families.
pub fn remove() -> anyhow::Result<()> {
    for family in FAMILIES {
        for _ in 0..our_rules(family)?.len() {
            ip(&[family, "rule", "del", "pref", &RULE_PRIORITY.to_string()])?;
        }
        // Flushing an empty or missing table fails with "FIB table does not exist" on some kernels.
        let _ = run_ip(&[family, "route", "flush", "table", &ROUTE_TABLE.to_string()]);
    }
    Ok(())
}

/// The rules at our priority and the routes in our table, as iproute2 prints them.
pub fn describe() -> anyhow::Result<Vec<RoutingObject>> {
    let mut out = Vec::new();
    for family in FAMILIES {
        let rules = run_ip(&[family, "rule", "show", "pref", &RULE_PRIORITY.to_string()])?;
        for line in rules.lines().filter(|l| !l.trim().is_empty()) {
            out.push(RoutingObject {
                kind: "ip rule",
                description: format!("{family} {}", line.trim()),
            });
        }
        let routes = run_ip(&[family, "route", "show", "table", &ROUTE_TABLE.to_string()])
            .unwrap_or_default();
        for line in routes.lines().filter(|l| !l.trim().is_empty()) {
            out.push(RoutingObject {
                kind: "ip route",
                description: format!("{family} table {ROUTE_TABLE}: {}", line.trim()),
            });
        }
    }
    Ok(out)
}

fn our_rules(family: &str) -> anyhow::Result<Vec<RuleJson>> {
    let json = run_ip(&[
        "-j",
        family,
        "rule",
        "show",
        "pref",
        &RULE_PRIORITY.to_string(),
    ])?;
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let rules: Vec<RuleJson> = serde_json::from_str(&json)
        .with_context(|| format!("parsing `ip -j rule` output: {json}"))?;
    Ok(rules
        .into_iter()
        .filter(|r| r.priority == Some(RULE_PRIORITY))
        .collect())
}

fn rule_is_ours(rule: &RuleJson) -> bool {
    let num = |s: &Option<String>| {
        s.as_deref()
            .and_then(|v| u32::from_str_radix(v.trim_start_matches("0x"), 16).ok())
    };
    num(&rule.fwmark) == Some(MARK_DELIVER_LOCAL)
        && num(&rule.fwmask) == Some(MARK_DELIVER_LOCAL)
        && rule.table.as_deref() == Some(ROUTE_TABLE.to_string().as_str())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run_ip(args).map(drop)
}

fn run_ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2 is required on the node)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_our_rule_in_iproute2_json() {
        let json = format!(
            r#"[{{"priority":{RULE_PRIORITY},"src":"all","fwmark":"{MARK_DELIVER_LOCAL:#x}","fwmask":"{MARK_DELIVER_LOCAL:#x}","table":"{ROUTE_TABLE}"}}]"#
        );
        let rules: Vec<RuleJson> = serde_json::from_str(&json).unwrap();
        assert!(rule_is_ours(&rules[0]));
        let other: Vec<RuleJson> = serde_json::from_str(&format!(
            r#"[{{"priority":{RULE_PRIORITY},"src":"all","fwmark":"0x1","table":"main"}}]"#
        ))
        .unwrap();
        assert!(!rule_is_ours(&other[0]));
    }
}
