//! Writing results to stdout: human text or one JSON document, quietly stopping on a closed pipe.

use std::io::{self, Write as _};

use anyhow::Context as _;
use serde::Serialize;

/// Writes `text` to stdout as is. A closed pipe (`guardctl list | head`) is not an error.
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to stdout"),
    }
}

/// Writes `value` as one pretty-printed JSON document followed by a newline.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    print(&to_json(value)?)
}

/// The JSON document [`print_json`] writes.
pub fn to_json<T: Serialize>(value: &T) -> anyhow::Result<String> {
    let mut s = serde_json::to_string_pretty(value).context("cannot encode the JSON output")?;
    s.push('\n');
    Ok(s)
}

/// A count with its noun in the right number: "1 grant", "3 grants", "2 entries".
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn json_is_one_document_with_newline() {
        let s = to_json(&serde_json::json!({"a": 1})).unwrap();
        assert!(s.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["a"], 1);
    }

    #[test]
    fn counts() {
        assert_eq!(count(0, "grant", "grants"), "0 grants");
        assert_eq!(count(1, "grant", "grants"), "1 grant");
        assert_eq!(count(2, "entry", "entries"), "2 entries");
    }
}
