//! The `inet guard` ruleset: atomic setup and refresh through the `nftables` crate (not the hot path).
//!
//! Setup is one `nft -j -f` transaction. It creates what is missing and replaces the chain's rules
//! and the static sets, but never flushes the authorized sets: a restart must not drop grants.

use std::time::Duration;

use ipnet::IpNet;
use nftables::helper;
use nftables::schema::Nftables;
use serde_json::{Value, json};

use crate::config::{Mode, Policy, Settings};

/// Authorized DNS grants, IPv4 (flags timeout).
pub const AUTH4: &str = "auth4";
/// Authorized DNS grants, IPv6 (flags timeout).
pub const AUTH6: &str = "auth6";
/// Per-client grants `saddr . daddr`, IPv4.
pub const AUTH4C: &str = "auth4c";
/// Per-client grants `saddr . daddr`, IPv6.
pub const AUTH6C: &str = "auth6c";
/// Manual allowances, IPv4 (interval, timeout).
pub const MANUAL4: &str = "manual4";
/// Manual allowances, IPv6 (interval, timeout).
pub const MANUAL6: &str = "manual6";

/// Every set the ruleset defines (start-up rebuilds the ruleset when one is missing).
pub const SETS: [&str; 10] = [
    AUTH4,
    AUTH6,
    AUTH4C,
    AUTH6C,
    MANUAL4,
    MANUAL6,
    "allow4",
    "allow6",
    "upstream4",
    "upstream6",
];

/// Named counters fwd reads for `status`.
pub const COUNTERS: [&str; 5] = [
    "accepted_dns",
    "accepted_manual",
    "accepted_static",
    "rejected",
    "invalid",
];

/// Failures talking to nft.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// nft failed or could not run.
    #[error("nft {what}: {source}")]
    Exec {
        /// What we were doing.
        what: &'static str,
        /// The crate's error (carries nft's stderr).
        source: helper::NftablesError,
    },
    /// We built JSON the nftables schema refused: a bug in fwd.
    #[error("nft {what}: internal schema error: {source}")]
    Schema {
        /// What we were doing.
        what: &'static str,
        /// The serde error.
        source: serde_json::Error,
    },
}

fn nft_err(what: &'static str) -> impl FnOnce(helper::NftablesError) -> NftError {
    move |source| NftError::Exec { what, source }
}

/// Turns nft's error into the operator-facing text (nft's stderr when there is one).
pub fn error_text(e: &NftError) -> String {
    match e {
        NftError::Exec {
            source: helper::NftablesError::NftFailed { stderr, .. },
            ..
        } => stderr.trim().to_string(),
        other => other.to_string(),
    }
}

/// A manual allowance to (re)install: network and remaining lifetime (None: permanent).
#[derive(Debug, Clone, Copy)]
pub struct ManualElem {
    /// The network.
    pub net: IpNet,
    /// Remaining lifetime.
    pub remaining: Option<Duration>,
}

fn prefix(n: &IpNet) -> Value {
    if n.prefix_len() == n.max_prefix_len() {
        json!(n.addr().to_string())
    } else {
        json!({"prefix": {"addr": n.network().to_string(), "len": n.prefix_len()}})
    }
}

fn manual_value(e: &ManualElem) -> Value {
    match e.remaining {
        // nft's JSON timeouts are whole seconds; round up so an allowance never ends early.
        Some(d) => {
            json!({"elem": {"val": prefix(&e.net), "timeout": d.as_millis().div_ceil(1000).max(1) as u64}})
        }
        None => prefix(&e.net),
    }
}

/// Builds the whole setup transaction for `s`, reinstalling `manual` into the manual sets.
/// `existing_chains` are the base chains present now (a mode switch deletes the other one).
pub fn setup_batch(s: &Settings, manual: &[ManualElem], existing_chains: &[String]) -> Value {
    let t = s.raw.table.as_str();
    let mut cmds: Vec<Value> = Vec::new();
    let add = |o: Value| json!({"add": o});
    cmds.push(add(json!({"table": {"family": "inet", "name": t}})));
    let set = |name: &str, ty: Value, flags: &[&str]| json!({"set": {"family": "inet", "table": t, "name": name, "type": ty, "flags": flags}});
    let defs = [
        (AUTH4, json!("ipv4_addr"), &["timeout"][..]),
        (AUTH6, json!("ipv6_addr"), &["timeout"][..]),
        (AUTH4C, json!(["ipv4_addr", "ipv4_addr"]), &["timeout"][..]),
        (AUTH6C, json!(["ipv6_addr", "ipv6_addr"]), &["timeout"][..]),
        (MANUAL4, json!("ipv4_addr"), &["interval", "timeout"][..]),
        (MANUAL6, json!("ipv6_addr"), &["interval", "timeout"][..]),
        ("allow4", json!("ipv4_addr"), &["interval"][..]),
        ("allow6", json!("ipv6_addr"), &["interval"][..]),
        (
            "upstream4",
            json!(["ipv4_addr", "inet_proto", "inet_service"]),
            &[][..],
        ),
        (
            "upstream6",
            json!(["ipv6_addr", "inet_proto", "inet_service"]),
            &[][..],
        ),
    ];
    for (name, ty, flags) in &defs {
        cmds.push(add(set(name, ty.clone(), flags)));
    }
    for c in COUNTERS {
        cmds.push(add(
            json!({"counter": {"family": "inet", "table": t, "name": c}}),
        ));
    }
    // Static sets are rebuilt from config in the same transaction: flush + refill is atomic.
    for (name, ty, flags) in defs.iter().skip(4) {
        cmds.push(json!({"flush": set(name, ty.clone(), flags)}));
    }
    let elems = |name: &str, v: Vec<Value>| json!({"add": {"element": {"family": "inet", "table": t, "name": name, "elem": v}}});
    let (a4, a6): (Vec<_>, Vec<_>) = s.allow.iter().partition(|n| matches!(n, IpNet::V4(_)));
    for (name, nets) in [("allow4", a4), ("allow6", a6)] {
        if !nets.is_empty() {
            cmds.push(elems(name, nets.iter().map(prefix).collect()));
        }
    }
    let mut up4 = Vec::new();
    let mut up6 = Vec::new();
    for sa in &s.upstreams {
        for proto in ["tcp", "udp"] {
            let v = json!({"concat": [sa.ip().to_string(), proto, sa.port()]});
            if sa.is_ipv4() {
                up4.push(v)
            } else {
                up6.push(v)
            }
        }
    }
    for (name, v) in [("upstream4", up4), ("upstream6", up6)] {
        if !v.is_empty() {
            cmds.push(elems(name, v));
        }
    }
    let (m4, m6): (Vec<_>, Vec<_>) = manual.iter().partition(|m| matches!(m.net, IpNet::V4(_)));
    for (name, v) in [(MANUAL4, m4), (MANUAL6, m6)] {
        if !v.is_empty() {
            cmds.push(elems(name, v.into_iter().map(manual_value).collect()));
        }
    }
    // One base chain, named after its hook; a mode switch removes the other in the same transaction.
    let (chain, other) = match s.raw.mode {
        Mode::Local => ("output", "forward"),
        Mode::Gateway => ("forward", "output"),
    };
    if existing_chains.iter().any(|c| c == other) {
        cmds.push(json!({"delete": {"chain": {"family": "inet", "table": t, "name": other}}}));
    }
    let policy = if s.raw.policy == Policy::Audit {
        "accept"
    } else {
        "drop"
    };
    cmds.push(add(json!({"chain": {
        "family": "inet", "table": t, "name": chain, "type": "filter",
        "hook": chain, "prio": 0, "policy": policy
    }})));
    cmds.push(json!({"flush": {"chain": {"family": "inet", "table": t, "name": chain}}}));
    for expr in rules(s) {
        cmds.push(add(
            json!({"rule": {"family": "inet", "table": t, "chain": chain, "expr": expr}}),
        ));
    }
    json!({ "nftables": cmds })
}

fn m(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}
fn payload(proto: &str, field: &str) -> Value {
    json!({"payload": {"protocol": proto, "field": field}})
}
fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

/// The rule list, in evaluation order.
fn rules(s: &Settings) -> Vec<Vec<Value>> {
    let accept = json!({"accept": null});
    let mut r: Vec<Vec<Value>> = vec![
        vec![
            json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}),
            accept.clone(),
        ],
        vec![
            json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}}),
            json!({"counter": "invalid"}),
            json!({"drop": null}),
        ],
    ];
    if s.raw.mode == Mode::Local {
        r.push(vec![m(meta("oif"), json!("lo")), accept.clone()]);
    }
    if s.raw.allow.dhcp {
        r.push(vec![
            m(meta("nfproto"), json!("ipv4")),
            m(payload("udp", "sport"), json!(68)),
            m(payload("udp", "dport"), json!(67)),
            accept.clone(),
        ]);
        r.push(vec![
            m(meta("nfproto"), json!("ipv6")),
            m(payload("udp", "sport"), json!(546)),
            m(payload("udp", "dport"), json!(547)),
            accept.clone(),
        ]);
    }
    if s.raw.allow.ndp {
        r.push(vec![
            m(
                payload("icmpv6", "type"),
                json!({"set": ["nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert", "mld-listener-report", "mld2-listener-report"]}),
            ),
            accept.clone(),
        ]);
    }
    if s.raw.allow.icmp_errors {
        r.push(vec![
            m(
                payload("icmp", "type"),
                json!({"set": ["destination-unreachable", "time-exceeded", "parameter-problem"]}),
            ),
            accept.clone(),
        ]);
        r.push(vec![
            m(
                payload("icmpv6", "type"),
                json!({"set": ["destination-unreachable", "packet-too-big", "time-exceeded", "parameter-problem"]}),
            ),
            accept.clone(),
        ]);
    }
    r.push(vec![
        m(payload("ip", "daddr"), json!("@allow4")),
        json!({"counter": "accepted_static"}),
        accept.clone(),
    ]);
    r.push(vec![
        m(payload("ip6", "daddr"), json!("@allow6")),
        json!({"counter": "accepted_static"}),
        accept.clone(),
    ]);
    r.push(vec![
        m(
            json!({"concat": [payload("ip", "daddr"), meta("l4proto"), payload("th", "dport")]}),
            json!("@upstream4"),
        ),
        json!({"counter": "accepted_static"}),
        accept.clone(),
    ]);
    r.push(vec![
        m(
            json!({"concat": [payload("ip6", "daddr"), meta("l4proto"), payload("th", "dport")]}),
            json!("@upstream6"),
        ),
        json!({"counter": "accepted_static"}),
        accept.clone(),
    ]);
    r.push(vec![
        m(payload("ip", "daddr"), json!("@manual4")),
        json!({"counter": "accepted_manual"}),
        accept.clone(),
    ]);
    r.push(vec![
        m(payload("ip6", "daddr"), json!("@manual6")),
        json!({"counter": "accepted_manual"}),
        accept.clone(),
    ]);
    if s.raw.per_client {
        r.push(vec![
            m(
                json!({"concat": [payload("ip", "saddr"), payload("ip", "daddr")]}),
                json!("@auth4c"),
            ),
            json!({"counter": "accepted_dns"}),
            accept.clone(),
        ]);
        r.push(vec![
            m(
                json!({"concat": [payload("ip6", "saddr"), payload("ip6", "daddr")]}),
                json!("@auth6c"),
            ),
            json!({"counter": "accepted_dns"}),
            accept.clone(),
        ]);
    } else {
        r.push(vec![
            m(payload("ip", "daddr"), json!("@auth4")),
            json!({"counter": "accepted_dns"}),
            accept.clone(),
        ]);
        r.push(vec![
            m(payload("ip6", "daddr"), json!("@auth6")),
            json!({"counter": "accepted_dns"}),
            accept.clone(),
        ]);
    }
    match s.raw.policy {
        Policy::Reject => {
            r.push(vec![
                m(meta("l4proto"), json!("tcp")),
                json!({"counter": "rejected"}),
                json!({"reject": {"type": "tcp reset"}}),
            ]);
            r.push(vec![
                json!({"counter": "rejected"}),
                json!({"reject": {"type": "icmpx", "expr": "admin-prohibited"}}),
            ]);
        }
        Policy::Drop => r.push(vec![json!({"counter": "rejected"}), json!({"drop": null})]),
        Policy::Audit => r.push(vec![
            json!({"counter": "rejected"}),
            json!({"log": {"prefix": "guard-audit: "}}),
            accept,
        ]),
    }
    r
}

/// Runs one JSON transaction through the nftables crate (typed schema check, then `nft -j -f -`).
pub fn apply(what: &'static str, batch: Value) -> Result<(), NftError> {
    let typed: Nftables =
        serde_json::from_value(batch).map_err(|source| NftError::Schema { what, source })?;
    helper::apply_ruleset(&typed).map_err(nft_err(what))
}

/// A digest of the ruleset `s` asks for (everything but the manual elements): when it matches
/// the one recorded at the last setup and the table is in place, start-up skips `nft` entirely.
pub fn fingerprint(s: &Settings) -> String {
    use sha2::{Digest, Sha256};
    let batch = setup_batch(s, &[], &[]).to_string();
    let d = Sha256::digest(format!("{}\n{batch}", env!("CARGO_PKG_VERSION")).as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates or refreshes the ruleset atomically, keeping the authorized sets' elements.
/// `chains` are the table's chains now (from netlink; empty when the table is new).
pub fn setup(s: &Settings, manual: &[ManualElem], chains: &[String]) -> Result<(), NftError> {
    apply("setup", setup_batch(s, manual, chains))
}

/// The set of the throw-away table [`create_probe_table`] makes.
pub const PROBE_SET: &str = "s";

/// Creates a throw-away table `name` (no chains, so it filters nothing) holding one IPv4 set
/// with timeouts, for probing what the kernel does with set elements.
pub fn create_probe_table(name: &str) -> Result<(), NftError> {
    apply(
        "probe table",
        json!({"nftables": [
            {"add": {"table": {"family": "inet", "name": name}}},
            {"add": {"set": {"family": "inet", "table": name, "name": PROBE_SET, "type": "ipv4_addr", "flags": ["timeout"]}}},
        ]}),
    )
}

/// Deletes the whole table (the documented way to remove guard's filtering). `exists` comes
/// from netlink (listing through `nft` would load every set element first).
pub fn remove_table(table: &str, exists: bool) -> Result<bool, NftError> {
    if !exists {
        return Ok(false);
    }
    apply(
        "delete table",
        json!({"nftables": [{"delete": {"table": {"family": "inet", "name": table}}}]}),
    )?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn settings(text: &str) -> Settings {
        Config::parse(Path::new("t"), text)
            .unwrap()
            .validate(Path::new("t"))
            .unwrap()
    }

    /// Every variant of the setup batch must pass the nftables crate's schema.
    #[test]
    fn setup_batches_fit_the_schema() {
        for text in [
            "",
            "policy = \"drop\"",
            "policy = \"audit\"",
            "mode = \"gateway\"\nper_client = true",
            "[allow]\ncidrs = [\"192.0.2.0/24\", \"2001:db8::/32\", \"198.51.100.7\"]\nupstreams = [\"192.0.2.53:853\", \"[2001:db8::53]:53\"]\ndhcp = false\nndp = false\nicmp_errors = false",
        ] {
            let s = settings(text);
            let manual = [
                ManualElem {
                    net: "203.0.113.0/24".parse().unwrap(),
                    remaining: Some(Duration::from_millis(1500)),
                },
                ManualElem {
                    net: "2001:db8:5::/48".parse().unwrap(),
                    remaining: None,
                },
            ];
            let v = setup_batch(&s, &manual, &["forward".into()]);
            for cmd in v["nftables"].as_array().unwrap() {
                let one = json!({"nftables": [cmd]});
                let typed: Result<Nftables, _> = serde_json::from_value(one);
                assert!(typed.is_ok(), "{text}: {typed:?}\n{cmd:#}");
            }
        }
    }

    #[test]
    fn mode_switch_deletes_the_other_chain() {
        let s = settings("mode = \"gateway\"");
        let v = setup_batch(&s, &[], &["output".into()]).to_string();
        assert!(
            v.contains(r#"{"delete":{"chain":{"family":"inet","name":"output","table":"guard"}}}"#),
            "{v}"
        );
        let v = setup_batch(&s, &[], &["forward".into()]).to_string();
        assert!(!v.contains("\"delete\""));
    }

    #[test]
    fn manual_timeouts_round_up_to_seconds() {
        let e = ManualElem {
            net: "192.0.2.0/24".parse().unwrap(),
            remaining: Some(Duration::from_millis(1001)),
        };
        assert_eq!(manual_value(&e)["elem"]["timeout"], 2);
        let e = ManualElem {
            net: "192.0.2.0/24".parse().unwrap(),
            remaining: Some(Duration::from_millis(1)),
        };
        assert_eq!(manual_value(&e)["elem"]["timeout"], 1);
    }
}
