//! `guardctl status`: one view of fwd (grants, counters, database) and dnsd (queries, cache).
//!
//! fwd is the one that matters: without it nothing is allowed out, so its absence fails the
//! command (exit 1). dnsd being down is reported but is not an error of `status` itself.

use std::process::ExitCode;

use clap::Args;
use guard_proto::v1::{StatsRequest, StatsResponse, StatusRequest, StatusResponse};
use serde::Serialize;

use crate::client::Daemon;
use crate::cmd::Context;
use crate::format::{self, sanitize};
use crate::output::{print, print_json};
use crate::table::Table;

/// Arguments of `guardctl status` (none besides the global ones).
#[derive(Debug, Args)]
pub struct Status {}

impl Status {
    /// Queries both daemons at once and prints what each said, or why it could not.
    pub async fn run(self, ctx: &Context) -> anyhow::Result<ExitCode> {
        let (fwd, dnsd) = tokio::join!(fwd_status(ctx), dnsd_stats(ctx));
        let code = if fwd.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
        let report = Report {
            fwd: Part::from(fwd.map(|r| FwdJson::from(&r))),
            dnsd: Part::from(dnsd.map(|r| DnsdJson::from(&r))),
        };
        if ctx.json {
            print_json(&report)?;
        } else {
            print(&render(&report))?;
        }
        Ok(code)
    }
}

async fn fwd_status(ctx: &Context) -> anyhow::Result<StatusResponse> {
    let mut fwd = ctx.fwd().await?;
    ctx.call(Daemon::Fwd, fwd.status(StatusRequest {})).await
}

async fn dnsd_stats(ctx: &Context) -> anyhow::Result<StatsResponse> {
    let mut dnsd = ctx.dnsd().await?;
    ctx.call(Daemon::Dnsd, dnsd.stats(StatsRequest {})).await
}

// === JSON ===

/// `guardctl status --json`: each daemon's part is its answer or `{"error": "..."}`.
#[derive(Debug, Serialize)]
struct Report {
    fwd: Part<FwdJson>,
    dnsd: Part<DnsdJson>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Part<T> {
    Up(T),
    Down { error: String },
}

impl<T> From<anyhow::Result<T>> for Part<T> {
    fn from(r: anyhow::Result<T>) -> Self {
        match r {
            Ok(v) => Part::Up(v),
            Err(e) => Part::Down {
                error: format!("{e:#}"),
            },
        }
    }
}

#[derive(Debug, Serialize)]
struct FwdJson {
    api_version: String,
    daemon_version: String,
    mode: String,
    per_client: bool,
    policy: String,
    grants_v4: u64,
    grants_v6: u64,
    manual: u64,
    counters: Vec<CounterJson>,
    db_bytes: u64,
    uptime_s: u64,
    audit_events: u64,
}

#[derive(Debug, Serialize)]
struct CounterJson {
    name: String,
    packets: u64,
    bytes: u64,
}

impl From<&StatusResponse> for FwdJson {
    fn from(r: &StatusResponse) -> Self {
        FwdJson {
            api_version: r.api_version.clone(),
            daemon_version: r.daemon_version.clone(),
            mode: r.mode.clone(),
            per_client: r.per_client,
            policy: r.policy.clone(),
            grants_v4: r.grants_v4,
            grants_v6: r.grants_v6,
            manual: r.manual,
            counters: r
                .counters
                .iter()
                .map(|c| CounterJson {
                    name: c.name.clone(),
                    packets: c.packets,
                    bytes: c.bytes,
                })
                .collect(),
            db_bytes: r.db_bytes,
            uptime_s: r.uptime_s,
            audit_events: r.audit_events,
        }
    }
}

#[derive(Debug, Serialize)]
struct DnsdJson {
    api_version: String,
    daemon_version: String,
    uptime_s: u64,
    queries: u64,
    cache_hits: u64,
    cache_misses: u64,
    cache_entries: u64,
    servfail: u64,
    refused: u64,
    authorize_calls: u64,
    authorize_failures: u64,
    in_flight: u64,
}

impl From<&StatsResponse> for DnsdJson {
    fn from(r: &StatsResponse) -> Self {
        DnsdJson {
            api_version: r.api_version.clone(),
            daemon_version: r.daemon_version.clone(),
            uptime_s: r.uptime_s,
            queries: r.queries,
            cache_hits: r.cache_hits,
            cache_misses: r.cache_misses,
            cache_entries: r.cache_entries,
            servfail: r.servfail,
            refused: r.refused,
            authorize_calls: r.authorize_calls,
            authorize_failures: r.authorize_failures,
            in_flight: r.in_flight,
        }
    }
}

// === text ===

fn render(report: &Report) -> String {
    let mut out = match &report.fwd {
        Part::Up(f) => render_fwd(f),
        Part::Down { error } => format!("fwd: not reachable ({error})\n"),
    };
    out.push('\n');
    out.push_str(&match &report.dnsd {
        Part::Up(d) => render_dnsd(d),
        Part::Down { error } => format!("dnsd: not reachable ({error})\n"),
    });
    out
}

fn title(daemon: &str, version: &str, api: &str, uptime_s: u64) -> String {
    format!(
        "{daemon}: up {} (version {}, api {})\n",
        format::duration(uptime_s),
        sanitize(version),
        sanitize(api)
    )
}

/// Two-column "key  value" lines, keys padded to the longest.
fn pairs(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("  {k:width$}  {v}\n"))
        .collect()
}

fn render_fwd(f: &FwdJson) -> String {
    let mode = if f.per_client {
        format!("{}, per-client", sanitize(&f.mode))
    } else {
        sanitize(&f.mode).into_owned()
    };
    let mut out = title("fwd", &f.daemon_version, &f.api_version, f.uptime_s);
    out.push_str(&pairs(&[
        ("mode", mode),
        ("policy", sanitize(&f.policy).into_owned()),
        (
            "grants",
            format!(
                "{} IPv4, {} IPv6, {} manual",
                f.grants_v4, f.grants_v6, f.manual
            ),
        ),
        ("database", format::bytes(f.db_bytes)),
        ("audit events", f.audit_events.to_string()),
    ]));
    if !f.counters.is_empty() {
        let mut table = Table::new(&["COUNTER", "PACKETS", "BYTES"]).right(&[1, 2]);
        for c in &f.counters {
            table.row(vec![
                sanitize(&c.name).into_owned(),
                c.packets.to_string(),
                format::bytes(c.bytes),
            ]);
        }
        out.push('\n');
        out.push_str(&table.render("  "));
    }
    out
}

fn render_dnsd(d: &DnsdJson) -> String {
    let mut out = title("dnsd", &d.daemon_version, &d.api_version, d.uptime_s);
    out.push_str(&pairs(&[
        ("queries", d.queries.to_string()),
        (
            "cache",
            format!(
                "{} hits, {} misses, {} entries",
                d.cache_hits, d.cache_misses, d.cache_entries
            ),
        ),
        ("servfail", d.servfail.to_string()),
        ("refused", d.refused.to_string()),
        (
            "authorize",
            format!(
                "{} calls, {} failures",
                d.authorize_calls, d.authorize_failures
            ),
        ),
        ("in flight", d.in_flight.to_string()),
    ]));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use guard_proto::v1::Counter;
    use serde_json::json;

    use super::*;

    fn fwd() -> StatusResponse {
        StatusResponse {
            api_version: "guard.v1".into(),
            daemon_version: "0.1.0".into(),
            mode: "gateway".into(),
            per_client: true,
            policy: "reject".into(),
            grants_v4: 12,
            grants_v6: 3,
            manual: 1,
            counters: vec![
                Counter {
                    name: "accepted".into(),
                    packets: 1234,
                    bytes: 1_572_864,
                },
                Counter {
                    name: "rejected".into(),
                    packets: 5,
                    bytes: 300,
                },
            ],
            db_bytes: 2048,
            uptime_s: 3 * 3600 + 120,
            audit_events: 4521,
        }
    }

    fn dnsd() -> StatsResponse {
        StatsResponse {
            api_version: "guard.v1".into(),
            daemon_version: "0.1.0".into(),
            uptime_s: 59,
            queries: 1000,
            cache_hits: 800,
            cache_misses: 200,
            cache_entries: 512,
            servfail: 3,
            refused: 0,
            authorize_calls: 200,
            authorize_failures: 1,
            in_flight: 2,
        }
    }

    #[test]
    fn human_output_both_up() {
        let report = Report {
            fwd: Part::Up(FwdJson::from(&fwd())),
            dnsd: Part::Up(DnsdJson::from(&dnsd())),
        };
        assert_eq!(
            render(&report),
            "fwd: up 3h 2m (version 0.1.0, api guard.v1)\n\
            \x20 mode          gateway, per-client\n\
            \x20 policy        reject\n\
            \x20 grants        12 IPv4, 3 IPv6, 1 manual\n\
            \x20 database      2.0 KiB\n\
            \x20 audit events  4521\n\
            \n\
            \x20 COUNTER   PACKETS    BYTES\n\
            \x20 accepted     1234  1.5 MiB\n\
            \x20 rejected        5    300 B\n\
            \n\
            dnsd: up 59s (version 0.1.0, api guard.v1)\n\
            \x20 queries    1000\n\
            \x20 cache      800 hits, 200 misses, 512 entries\n\
            \x20 servfail   3\n\
            \x20 refused    0\n\
            \x20 authorize  200 calls, 1 failures\n\
            \x20 in flight  2\n"
        );
    }

    #[test]
    fn human_output_dnsd_down() {
        let report = Report {
            fwd: Part::Up(FwdJson::from(&fwd())),
            dnsd: Part::from(Err::<DnsdJson, _>(anyhow::anyhow!("cannot reach dnsd"))),
        };
        let s = render(&report);
        assert!(
            s.ends_with("\ndnsd: not reachable (cannot reach dnsd)\n"),
            "{s}"
        );
    }

    #[test]
    fn json_shape() {
        let report = Report {
            fwd: Part::Up(FwdJson::from(&fwd())),
            dnsd: Part::from(Err::<DnsdJson, _>(
                anyhow::anyhow!("io").context("cannot reach dnsd"),
            )),
        };
        let v = serde_json::to_value(&report).unwrap();
        assert_eq!(
            v["fwd"],
            json!({
                "api_version": "guard.v1",
                "daemon_version": "0.1.0",
                "mode": "gateway",
                "per_client": true,
                "policy": "reject",
                "grants_v4": 12,
                "grants_v6": 3,
                "manual": 1,
                "counters": [
                    {"name": "accepted", "packets": 1234, "bytes": 1_572_864},
                    {"name": "rejected", "packets": 5, "bytes": 300},
                ],
                "db_bytes": 2048,
                "uptime_s": 10_920,
                "audit_events": 4521,
            })
        );
        // The whole chain, so scripts see the cause too.
        assert_eq!(v["dnsd"], json!({"error": "cannot reach dnsd: io"}));
        let v = serde_json::to_value(DnsdJson::from(&dnsd())).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 12);
        assert_eq!(v["cache_hits"], 800);
        assert_eq!(v["in_flight"], 2);
    }
}
