//! `guardctl history`: fwd's append-only audit trail, newest first.

use clap::Args;
use guard_proto::v1::{Event, EventKind, HistoryRequest, HistoryResponse};
use serde::Serialize;

use crate::args::{self, Target};
use crate::client::Daemon;
use crate::cmd::Context;
use crate::format::{self, or_dash};
use crate::output::{print, print_json};
use crate::table::Table;

/// Arguments of `guardctl history`.
#[derive(Debug, Args)]
pub struct History {
    /// Only events about this address or inside this CIDR.
    #[arg(long, value_name = "IP|CIDR")]
    ip: Option<Target>,
    /// Only events about this DNS name.
    #[arg(long, value_name = "NAME", value_parser = args::name)]
    name: Option<String>,
    /// Only events newer than this (30s, 5m, 1h, 2d, ...).
    #[arg(long, value_name = "DURATION", value_parser = args::seconds)]
    since: Option<u64>,
    /// Show at most N events (default: fwd's limit).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    limit: Option<u32>,
}

impl History {
    /// Asks fwd for the matching events and prints them.
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let request = HistoryRequest {
            ip: self.ip.map(|t| t.to_string()).unwrap_or_default(),
            name: self.name.unwrap_or_default(),
            since_s: self.since.unwrap_or(0),
            limit: self.limit.unwrap_or(0),
        };
        let mut fwd = ctx.fwd().await?;
        let response = ctx.call(Daemon::Fwd, fwd.history(request)).await?;
        if ctx.json {
            print_json(&HistoryJson::from(&response))
        } else {
            print(&render(&response, format::now_ms()))
        }
    }
}

/// Stable event names, the same as fwd's audit store uses.
fn kind_name(e: &Event) -> &'static str {
    match e.kind() {
        EventKind::Granted => "granted",
        EventKind::Extended => "extended",
        EventKind::Revoked => "revoked",
        EventKind::Expired => "expired",
        EventKind::ManualAllow => "manual_allow",
        EventKind::Rejected => "rejected",
        EventKind::Denied => "denied",
        EventKind::Renewed => "renewed",
        EventKind::Started => "started",
        EventKind::Named => "named",
        EventKind::Unspecified => "unknown",
    }
}

/// fwd sends -1 for events it raised itself.
fn cred(v: i64) -> Option<i64> {
    (v >= 0).then_some(v)
}

fn render(r: &HistoryResponse, now_ms: u64) -> String {
    if r.events.is_empty() {
        return "no events\n".to_owned();
    }
    let mut table = Table::new(&[
        "TIME", "EVENT", "IP", "CLIENT", "NAME", "UID", "PID", "REASON", "EXPIRES",
    ])
    .right(&[5, 6]);
    let dash = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    for e in &r.events {
        table.row(vec![
            format::local_short(e.at_unix_ms),
            kind_name(e).to_owned(),
            or_dash(&e.ip).into_owned(),
            or_dash(&e.client).into_owned(),
            or_dash(&e.name).into_owned(),
            dash(cred(e.uid)),
            dash(cred(e.pid)),
            or_dash(&e.reason).into_owned(),
            format::relative(e.expires_unix_ms, now_ms),
        ]);
    }
    table.render("")
}

// === JSON ===

/// `guardctl history --json`.
#[derive(Debug, Serialize)]
struct HistoryJson {
    /// Newest first.
    events: Vec<EventJson>,
}

#[derive(Debug, Serialize)]
struct EventJson {
    id: u64,
    at_unix_ms: Option<u64>,
    at_rfc3339: Option<String>,
    event: &'static str,
    ip: Option<String>,
    client: Option<String>,
    name: Option<String>,
    uid: Option<i64>,
    pid: Option<i64>,
    reason: String,
    expires_unix_ms: Option<u64>,
    expires_rfc3339: Option<String>,
}

impl From<&HistoryResponse> for HistoryJson {
    fn from(r: &HistoryResponse) -> Self {
        HistoryJson {
            events: r.events.iter().map(EventJson::from).collect(),
        }
    }
}

impl From<&Event> for EventJson {
    fn from(e: &Event) -> Self {
        let (at_unix_ms, at_rfc3339) = format::json_time(e.at_unix_ms);
        let (expires_unix_ms, expires_rfc3339) = format::json_time(e.expires_unix_ms);
        EventJson {
            id: e.id,
            at_unix_ms,
            at_rfc3339,
            event: kind_name(e),
            ip: format::non_empty(&e.ip),
            client: format::non_empty(&e.client),
            name: format::non_empty(&e.name),
            uid: cred(e.uid),
            pid: cred(e.pid),
            reason: e.reason.clone(),
            expires_unix_ms,
            expires_rfc3339,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use serde_json::json;

    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn sample() -> HistoryResponse {
        HistoryResponse {
            events: vec![
                Event {
                    id: 42,
                    at_unix_ms: NOW - 5_000,
                    kind: EventKind::Granted as i32,
                    ip: "192.0.2.7".into(),
                    client: String::new(),
                    name: "example.com".into(),
                    uid: 998,
                    pid: 1234,
                    reason: "answer".into(),
                    expires_unix_ms: NOW + 300_000,
                },
                Event {
                    id: 1,
                    at_unix_ms: NOW - 86_400_000,
                    kind: EventKind::Started as i32,
                    ip: String::new(),
                    client: String::new(),
                    name: String::new(),
                    uid: -1,
                    pid: -1,
                    reason: "reconciled 0 grants".into(),
                    expires_unix_ms: 0,
                },
            ],
        }
    }

    #[test]
    fn table_columns() {
        let s = render(&sample(), NOW);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("TIME"));
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            header,
            [
                "TIME", "EVENT", "IP", "CLIENT", "NAME", "UID", "PID", "REASON", "EXPIRES"
            ]
        );
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            &row[1..],
            [
                "granted",
                "192.0.2.7",
                "-",
                "example.com",
                "998",
                "1234",
                "answer",
                "in",
                "5m"
            ]
        );
        assert_eq!(row[0], format::local_short(NOW - 5_000));
        let row: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            &row[1..],
            [
                "started",
                "-",
                "-",
                "-",
                "-",
                "-",
                "reconciled",
                "0",
                "grants",
                "-"
            ]
        );
        // UID and PID are right-aligned: the column ends line up.
        let uid_end = lines[0].find("UID").unwrap() + 3;
        assert_eq!(&lines[1][uid_end - 3..uid_end], "998");
    }

    #[test]
    fn empty_history() {
        assert_eq!(
            render(&HistoryResponse { events: vec![] }, NOW),
            "no events\n"
        );
    }

    #[test]
    fn json_shape() {
        let v = serde_json::to_value(HistoryJson::from(&sample())).unwrap();
        assert_eq!(
            v["events"][0],
            json!({
                "id": 42,
                "at_unix_ms": NOW - 5_000,
                "at_rfc3339": "2023-11-14T22:13:15.000Z",
                "event": "granted",
                "ip": "192.0.2.7",
                "client": null,
                "name": "example.com",
                "uid": 998,
                "pid": 1234,
                "reason": "answer",
                "expires_unix_ms": NOW + 300_000,
                "expires_rfc3339": "2023-11-14T22:18:20.000Z",
            })
        );
        assert_eq!(v["events"][1]["event"], "started");
        assert_eq!(v["events"][1]["uid"], serde_json::Value::Null);
        assert_eq!(v["events"][1]["ip"], serde_json::Value::Null);
    }

    #[test]
    fn every_kind_has_a_name() {
        for k in 0..=9 {
            let e = Event {
                kind: k,
                ..Event::default()
            };
            assert_ne!(kind_name(&e), "", "{k}");
        }
        let e = Event {
            kind: 99,
            ..Event::default()
        };
        assert_eq!(kind_name(&e), "unknown");
    }
}
