//! `guardctl allow`: open an address or CIDR by hand, for a while or for good.

use clap::Args;
use guard_proto::v1::{AllowRequest, AllowResponse};
use serde::Serialize;

use crate::args::{self, Target};
use crate::client::Daemon;
use crate::cmd::Context;
use crate::format::{self, sanitize};
use crate::output::{print, print_json};

/// Arguments of `guardctl allow`.
#[derive(Debug, Args)]
pub struct Allow {
    /// The address or CIDR to allow, e.g. 192.0.2.7 or 2001:db8::/48.
    #[arg(value_name = "IP|CIDR")]
    target: Target,
    /// Expire the allowance after this long (30s, 5m, 1h, 2d, ...); without it, it never expires.
    #[arg(long, value_name = "DURATION", value_parser = args::seconds)]
    ttl: Option<u64>,
    /// A note kept with the allowance and in the audit history.
    #[arg(long, value_name = "TEXT")]
    comment: Option<String>,
}

impl Allow {
    /// Asks fwd to allow the target and prints what it committed.
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let request = AllowRequest {
            cidr: self.target.to_string(),
            ttl_s: self.ttl.unwrap_or(0),
            comment: self.comment.unwrap_or_default(),
        };
        let mut fwd = ctx.fwd().await?;
        let mut response = ctx.call(Daemon::Fwd, fwd.allow(request)).await?;
        if response.cidr.is_empty() {
            response.cidr = self.target.to_string();
        }
        if ctx.json {
            print_json(&AllowJson::from(&response))
        } else {
            print(&render(&response, format::now_ms()))
        }
    }
}

fn render(r: &AllowResponse, now_ms: u64) -> String {
    let cidr = sanitize(&r.cidr);
    if r.expires_unix_ms == 0 {
        format!("allowed {cidr} with no expiry\n")
    } else {
        format!(
            "allowed {cidr} until {} (in {})\n",
            format::local_short(r.expires_unix_ms),
            format::expires_in(r.expires_unix_ms, now_ms)
        )
    }
}

/// `guardctl allow --json`.
#[derive(Debug, Serialize)]
struct AllowJson {
    cidr: String,
    expires_unix_ms: Option<u64>,
    expires_rfc3339: Option<String>,
}

impl From<&AllowResponse> for AllowJson {
    fn from(r: &AllowResponse) -> Self {
        let (expires_unix_ms, expires_rfc3339) = format::json_time(r.expires_unix_ms);
        AllowJson {
            cidr: r.cidr.clone(),
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

    #[test]
    fn human_output() {
        let r = AllowResponse {
            cidr: "192.0.2.0/24".into(),
            expires_unix_ms: 0,
        };
        assert_eq!(render(&r, NOW), "allowed 192.0.2.0/24 with no expiry\n");
        let r = AllowResponse {
            cidr: "192.0.2.7".into(),
            expires_unix_ms: NOW + 3_600_000,
        };
        let s = render(&r, NOW);
        assert!(s.starts_with("allowed 192.0.2.7 until 2023-11-1"), "{s}");
        assert!(s.ends_with(" (in 1h)\n"), "{s}");
    }

    #[test]
    fn json_shape() {
        let r = AllowResponse {
            cidr: "2001:db8::/48".into(),
            expires_unix_ms: NOW,
        };
        assert_eq!(
            serde_json::to_value(AllowJson::from(&r)).unwrap(),
            json!({
                "cidr": "2001:db8::/48",
                "expires_unix_ms": NOW,
                "expires_rfc3339": "2023-11-14T22:13:20.000Z",
            })
        );
        let r = AllowResponse {
            cidr: "192.0.2.7".into(),
            expires_unix_ms: 0,
        };
        assert_eq!(
            serde_json::to_value(AllowJson::from(&r)).unwrap(),
            json!({"cidr": "192.0.2.7", "expires_unix_ms": null, "expires_rfc3339": null})
        );
    }
}
