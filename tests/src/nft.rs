//! Independent kernel checks: what `nft -j` inside a namespace says, not what fwd reports.

use serde_json::Value;

use crate::error::{Context, Error, Result};
use crate::netns::Netns;

/// One element of an nftables set, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetElem {
    /// The key in text: `192.0.2.10`, `198.51.100.2 . 192.0.2.10` (concatenation),
    /// `192.0.2.16/30` (prefix) or `192.0.2.16-192.0.2.20` (range).
    pub key: String,
    /// The element's timeout in seconds, when it has one.
    pub timeout_s: Option<u64>,
    /// Seconds until it expires, when it has a timeout.
    pub expires_s: Option<u64>,
}

/// Whether table `inet TABLE` exists in `ns`.
pub fn table_exists(ns: &Netns, table: &str) -> Result<bool> {
    let out = ns.exec(&["nft", "-j", "list", "tables"])?;
    let out = out
        .ok()
        .context(format!("listing tables in {}", ns.name()))?;
    let v: Value = serde_json::from_str(&out)?;
    Ok(items(&v, "table")
        .any(|t| t["family"].as_str() == Some("inet") && t["name"].as_str() == Some(table)))
}

/// The elements of set `inet TABLE SET` in `ns`. Fails when the set does not exist.
pub fn set_elements(ns: &Netns, table: &str, set: &str) -> Result<Vec<SetElem>> {
    let out = ns
        .exec_ok(&["nft", "-j", "list", "set", "inet", table, set])
        .context(format!("listing set inet {table} {set}"))?;
    parse_set(&out)
}

/// The keys of set `inet TABLE SET` in `ns`.
pub fn set_keys(ns: &Netns, table: &str, set: &str) -> Result<Vec<String>> {
    Ok(set_elements(ns, table, set)?
        .into_iter()
        .map(|e| e.key)
        .collect())
}

/// Whether set `inet TABLE SET` in `ns` has an element whose key is exactly `key`.
pub fn set_contains(ns: &Netns, table: &str, set: &str, key: &str) -> Result<bool> {
    Ok(set_keys(ns, table, set)?.iter().any(|k| k == key))
}

/// Parses `nft -j list set` output into its elements.
pub fn parse_set(json: &str) -> Result<Vec<SetElem>> {
    let v: Value = serde_json::from_str(json)?;
    let set = items(&v, "set")
        .next()
        .ok_or_else(|| Error::msg(format!("no set in nft output: {json}")))?;
    let mut out = Vec::new();
    for e in set["elem"].as_array().into_iter().flatten() {
        // Elements with attributes are wrapped: {"elem": {"val": ..., "timeout": ..}}.
        let (val, attrs) = match e.get("elem") {
            Some(inner) => (&inner["val"], Some(inner)),
            None => (e, None),
        };
        out.push(SetElem {
            key: key_text(val)?,
            timeout_s: attrs.and_then(|a| a["timeout"].as_u64()),
            expires_s: attrs.and_then(|a| a["expires"].as_u64()),
        });
    }
    Ok(out)
}

fn items<'a>(v: &'a Value, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(move |o| o.get(kind))
}

fn key_text(v: &Value) -> Result<String> {
    if let Some(s) = v.as_str() {
        return Ok(s.to_owned());
    }
    if let Some(n) = v.as_u64() {
        return Ok(n.to_string());
    }
    if let Some(parts) = v.get("concat").and_then(Value::as_array) {
        let parts: Result<Vec<String>> = parts.iter().map(key_text).collect();
        return Ok(parts?.join(" . "));
    }
    if let Some(p) = v.get("prefix") {
        return Ok(format!("{}/{}", key_text(&p["addr"])?, p["len"]));
    }
    if let Some(r) = v.get("range").and_then(Value::as_array)
        && let [a, b] = r.as_slice()
    {
        return Ok(format!("{}-{}", key_text(a)?, key_text(b)?));
    }
    Err(Error::msg(format!("unrecognised set element key: {v}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_wrapped_concat_prefix_and_range_elements() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"set": {"family": "inet", "name": "s", "table": "t", "type": "ipv4_addr",
            "elem": ["192.0.2.1",
              {"elem": {"val": "192.0.2.2", "timeout": 61, "expires": 59}},
              {"elem": {"val": {"concat": ["198.51.100.2", "192.0.2.10"]}, "timeout": 5, "expires": 4}},
              {"prefix": {"addr": "192.0.2.16", "len": 30}},
              {"range": ["192.0.2.16", "192.0.2.20"]}]}}]}"#;
        let got = parse_set(json).map_err(|e| e.to_string());
        assert_eq!(
            got,
            Ok(vec![
                SetElem {
                    key: "192.0.2.1".into(),
                    timeout_s: None,
                    expires_s: None
                },
                SetElem {
                    key: "192.0.2.2".into(),
                    timeout_s: Some(61),
                    expires_s: Some(59)
                },
                SetElem {
                    key: "198.51.100.2 . 192.0.2.10".into(),
                    timeout_s: Some(5),
                    expires_s: Some(4)
                },
                SetElem {
                    key: "192.0.2.16/30".into(),
                    timeout_s: None,
                    expires_s: None
                },
                SetElem {
                    key: "192.0.2.16-192.0.2.20".into(),
                    timeout_s: None,
                    expires_s: None
                },
            ])
        );
    }

    #[test]
    fn empty_set_has_no_elements() {
        let json = r#"{"nftables": [{"set": {"family": "inet", "name": "s", "table": "t"}}]}"#;
        assert_eq!(parse_set(json).map_err(|e| e.to_string()), Ok(vec![]));
    }
}
