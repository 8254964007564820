//! `guardctl list`: the current grants, as a table or JSON.

use clap::Args;
use guard_proto::v1::{GrantEntry, ListRequest, ListResponse, Source};
use serde::Serialize;

use crate::args::{self, Target};
use crate::client::Daemon;
use crate::cmd::Context;
use crate::format::{self, or_dash, sanitize};
use crate::output::{count, print, print_json};
use crate::table::Table;

/// How many names a table row shows before summarizing the rest as "+N".
const NAMES_SHOWN: usize = 3;

/// Arguments of `guardctl list`.
#[derive(Debug, Args)]
pub struct List {
    /// Only grants inside this address or CIDR.
    #[arg(long, value_name = "CIDR")]
    cidr: Option<Target>,
    /// Only grants named by this DNS name (exact, case-insensitive).
    #[arg(long, value_name = "NAME", value_parser = args::name)]
    name: Option<String>,
    /// Show at most N grants (default: fwd's limit).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    limit: Option<u32>,
}

impl List {
    /// Asks fwd for the grants and prints them.
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let request = ListRequest {
            cidr: self.cidr.map(|c| c.to_string()).unwrap_or_default(),
            name: self.name.unwrap_or_default(),
            limit: self.limit.unwrap_or(0),
        };
        let mut fwd = ctx.fwd().await?;
        let response = ctx.call(Daemon::Fwd, fwd.list(request)).await?;
        if ctx.json {
            print_json(&ListJson::from(&response))
        } else {
            print(&render(&response, format::now_ms()))
        }
    }
}

fn source_name(entry: &GrantEntry) -> &'static str {
    match entry.source() {
        Source::Dns => "dns",
        Source::Manual => "manual",
        Source::Unspecified => "unknown",
    }
}

/// The human table with its "N of TOTAL grants" footer.
fn render(response: &ListResponse, now_ms: u64) -> String {
    let shown = response.grants.len() as u64;
    let footer = format!(
        "{shown} of {}\n",
        count(response.total.max(shown), "grant", "grants")
    );
    if response.grants.is_empty() {
        return footer;
    }
    let mut table = Table::new(&["IP", "NAMES", "CLIENT", "EXPIRES-IN", "SOURCE", "COMMENT"]);
    for g in &response.grants {
        table.row(vec![
            sanitize(&g.ip).into_owned(),
            names(&g.names),
            or_dash(&g.client).into_owned(),
            format::expires_in(g.expires_unix_ms, now_ms),
            source_name(g).to_owned(),
            sanitize(&g.comment).into_owned(),
        ]);
    }
    table.render("") + &footer
}

fn names(names: &[String]) -> String {
    if names.is_empty() {
        return "-".to_owned();
    }
    let mut out: Vec<String> = names
        .iter()
        .take(NAMES_SHOWN)
        .map(|n| sanitize(n).into_owned())
        .collect();
    if names.len() > NAMES_SHOWN {
        out.push(format!("+{}", names.len() - NAMES_SHOWN));
    }
    out.join(",")
}

// === JSON ===

/// `guardctl list --json`.
#[derive(Debug, Serialize)]
struct ListJson {
    grants: Vec<GrantJson>,
    /// How many grants this document holds.
    returned: usize,
    /// How many grants matched, which may exceed `returned`.
    total: u64,
}

#[derive(Debug, Serialize)]
struct GrantJson {
    ip: String,
    names: Vec<String>,
    client: Option<String>,
    source: &'static str,
    comment: String,
    first_granted_unix_ms: Option<u64>,
    first_granted_rfc3339: Option<String>,
    last_granted_unix_ms: Option<u64>,
    last_granted_rfc3339: Option<String>,
    expires_unix_ms: Option<u64>,
    expires_rfc3339: Option<String>,
}

impl From<&ListResponse> for ListJson {
    fn from(r: &ListResponse) -> Self {
        let grants: Vec<GrantJson> = r.grants.iter().map(GrantJson::from).collect();
        ListJson {
            returned: grants.len(),
            total: r.total.max(grants.len() as u64),
            grants,
        }
    }
}

impl From<&GrantEntry> for GrantJson {
    fn from(g: &GrantEntry) -> Self {
        let (first_granted_unix_ms, first_granted_rfc3339) =
            format::json_time(g.first_granted_unix_ms);
        let (last_granted_unix_ms, last_granted_rfc3339) =
            format::json_time(g.last_granted_unix_ms);
        let (expires_unix_ms, expires_rfc3339) = format::json_time(g.expires_unix_ms);
        GrantJson {
            ip: g.ip.clone(),
            names: g.names.clone(),
            client: format::non_empty(&g.client),
            source: source_name(g),
            comment: g.comment.clone(),
            first_granted_unix_ms,
            first_granted_rfc3339,
            last_granted_unix_ms,
            last_granted_rfc3339,
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

    fn sample() -> ListResponse {
        ListResponse {
            grants: vec![
                GrantEntry {
                    ip: "192.0.2.7".into(),
                    client: String::new(),
                    names: vec!["example.com".into(), "www.example.com".into()],
                    first_granted_unix_ms: NOW - 60_000,
                    last_granted_unix_ms: NOW - 1_000,
                    expires_unix_ms: NOW + 299_500,
                    source: Source::Dns as i32,
                    comment: String::new(),
                },
                GrantEntry {
                    ip: "198.51.100.0/24".into(),
                    client: "10.0.0.5".into(),
                    names: vec![],
                    first_granted_unix_ms: NOW - 3_600_000,
                    last_granted_unix_ms: NOW - 3_600_000,
                    expires_unix_ms: 0,
                    source: Source::Manual as i32,
                    comment: "backup \u{1b}target".into(),
                },
            ],
            total: 5,
        }
    }

    #[test]
    fn table_has_all_columns_and_footer() {
        assert_eq!(
            render(&sample(), NOW),
            "IP               NAMES                        CLIENT    EXPIRES-IN  SOURCE  COMMENT\n\
             192.0.2.7        example.com,www.example.com  -         5m          dns\n\
             198.51.100.0/24  -                            10.0.0.5  never       manual  backup \\u{1b}target\n\
             2 of 5 grants\n"
        );
    }

    #[test]
    fn empty_list_is_just_the_footer() {
        let r = ListResponse {
            grants: vec![],
            total: 0,
        };
        assert_eq!(render(&r, NOW), "0 of 0 grants\n");
    }

    #[test]
    fn long_name_lists_are_summarized() {
        let n: Vec<String> = (0..5).map(|i| format!("n{i}.example")).collect();
        assert_eq!(names(&n), "n0.example,n1.example,n2.example,+2");
    }

    #[test]
    fn json_shape() {
        let v = serde_json::to_value(ListJson::from(&sample())).unwrap();
        assert_eq!(v["returned"], 2);
        assert_eq!(v["total"], 5);
        assert_eq!(
            v["grants"][0],
            json!({
                "ip": "192.0.2.7",
                "names": ["example.com", "www.example.com"],
                "client": null,
                "source": "dns",
                "comment": "",
                "first_granted_unix_ms": NOW - 60_000,
                "first_granted_rfc3339": "2023-11-14T22:12:20.000Z",
                "last_granted_unix_ms": NOW - 1_000,
                "last_granted_rfc3339": "2023-11-14T22:13:19.000Z",
                "expires_unix_ms": NOW + 299_500,
                "expires_rfc3339": "2023-11-14T22:18:19.500Z",
            })
        );
        assert_eq!(v["grants"][1]["client"], "10.0.0.5");
        assert_eq!(v["grants"][1]["source"], "manual");
        assert_eq!(v["grants"][1]["expires_unix_ms"], serde_json::Value::Null);
        assert_eq!(v["grants"][1]["expires_rfc3339"], serde_json::Value::Null);
        // JSON keeps the raw text; escaping is for terminals.
        assert_eq!(v["grants"][1]["comment"], "backup \u{1b}target");
    }
}
