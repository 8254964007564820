//! `guardctl upstreams`: dnsd's upstream resolvers, their health and latency.

use clap::Args;
use guard_proto::v1::{UpstreamsRequest, UpstreamsResponse};
use serde::Serialize;

use crate::client::Daemon;
use crate::cmd::Context;
use crate::format::{self, or_dash, sanitize};
use crate::output::{print, print_json};
use crate::table::Table;

/// Arguments of `guardctl upstreams` (none besides the global ones).
#[derive(Debug, Args)]
pub struct Upstreams {}

impl Upstreams {
    /// Asks dnsd for its upstreams and prints them.
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let mut dnsd = ctx.dnsd().await?;
        let response = ctx
            .call(Daemon::Dnsd, dnsd.upstreams(UpstreamsRequest {}))
            .await?;
        if ctx.json {
            print_json(&UpstreamsJson::from(&response))
        } else {
            print(&render(&response))
        }
    }
}

fn render(r: &UpstreamsResponse) -> String {
    let mut out = format!("strategy: {}\n", or_dash(&r.strategy));
    if r.upstreams.is_empty() {
        out.push_str("no upstreams\n");
        return out;
    }
    let mut table = Table::new(&[
        "URL",
        "HEALTHY",
        "SRTT",
        "QUERIES",
        "ERRORS",
        "CONNS",
        "LAST ERROR",
    ])
    .right(&[2, 3, 4, 5]);
    for u in &r.upstreams {
        table.row(vec![
            sanitize(&u.url).into_owned(),
            if u.healthy { "yes" } else { "no" }.to_owned(),
            format::rtt(u.srtt_us),
            u.queries.to_string(),
            u.errors.to_string(),
            u.open_connections.to_string(),
            or_dash(&u.last_error).into_owned(),
        ]);
    }
    out.push_str(&table.render(""));
    out
}

// === JSON ===

/// `guardctl upstreams --json`.
#[derive(Debug, Serialize)]
struct UpstreamsJson {
    strategy: String,
    upstreams: Vec<UpstreamJson>,
}

#[derive(Debug, Serialize)]
struct UpstreamJson {
    url: String,
    healthy: bool,
    /// null until the first sample.
    srtt_us: Option<u64>,
    queries: u64,
    errors: u64,
    open_connections: u32,
    last_error: Option<String>,
}

impl From<&UpstreamsResponse> for UpstreamsJson {
    fn from(r: &UpstreamsResponse) -> Self {
        UpstreamsJson {
            strategy: r.strategy.clone(),
            upstreams: r
                .upstreams
                .iter()
                .map(|u| UpstreamJson {
                    url: u.url.clone(),
                    healthy: u.healthy,
                    srtt_us: (u.srtt_us != 0).then_some(u.srtt_us),
                    queries: u.queries,
                    errors: u.errors,
                    open_connections: u.open_connections,
                    last_error: format::non_empty(&u.last_error),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use guard_proto::v1::UpstreamHealth;
    use serde_json::json;

    use super::*;

    fn sample() -> UpstreamsResponse {
        UpstreamsResponse {
            strategy: "failover".into(),
            upstreams: vec![
                UpstreamHealth {
                    url: "tls://192.0.2.53:853#dns.example".into(),
                    healthy: true,
                    srtt_us: 12_345,
                    queries: 900,
                    errors: 2,
                    open_connections: 1,
                    last_error: String::new(),
                },
                UpstreamHealth {
                    url: "udp://198.51.100.53:53".into(),
                    healthy: false,
                    srtt_us: 0,
                    queries: 10,
                    errors: 10,
                    open_connections: 0,
                    last_error: "timed out".into(),
                },
            ],
        }
    }

    #[test]
    fn table() {
        assert_eq!(
            render(&sample()),
            "strategy: failover\n\
             URL                               HEALTHY    SRTT  QUERIES  ERRORS  CONNS  LAST ERROR\n\
             tls://192.0.2.53:853#dns.example  yes      12.3ms      900       2      1  -\n\
             udp://198.51.100.53:53            no            -       10      10      0  timed out\n"
        );
    }

    #[test]
    fn json_shape() {
        let v = serde_json::to_value(UpstreamsJson::from(&sample())).unwrap();
        assert_eq!(v["strategy"], "failover");
        assert_eq!(
            v["upstreams"][0],
            json!({
                "url": "tls://192.0.2.53:853#dns.example",
                "healthy": true,
                "srtt_us": 12_345,
                "queries": 900,
                "errors": 2,
                "open_connections": 1,
                "last_error": null,
            })
        );
        assert_eq!(v["upstreams"][1]["srtt_us"], serde_json::Value::Null);
        assert_eq!(v["upstreams"][1]["last_error"], "timed out");
    }
}
