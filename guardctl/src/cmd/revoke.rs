//! `guardctl revoke`: remove every grant and manual allowance inside an address or CIDR.

use clap::Args;
use guard_proto::v1::RevokeRequest;
use serde::Serialize;

use crate::args::Target;
use crate::client::Daemon;
use crate::cmd::Context;
use crate::output::{count, print, print_json};

/// Arguments of `guardctl revoke`.
#[derive(Debug, Args)]
pub struct Revoke {
    /// The address or CIDR whose grants and allowances to remove.
    #[arg(value_name = "IP|CIDR")]
    target: Target,
    /// A note recorded in the audit history.
    #[arg(long, value_name = "TEXT")]
    comment: Option<String>,
}

impl Revoke {
    /// Asks fwd to revoke and prints how many entries went away.
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let request = RevokeRequest {
            cidr: self.target.to_string(),
            comment: self.comment.unwrap_or_default(),
        };
        let mut fwd = ctx.fwd().await?;
        let response = ctx.call(Daemon::Fwd, fwd.revoke(request)).await?;
        let json = RevokeJson {
            cidr: self.target.to_string(),
            revoked: response.revoked,
        };
        if ctx.json {
            print_json(&json)
        } else {
            print(&render(&json))
        }
    }
}

/// `guardctl revoke --json`.
#[derive(Debug, Serialize)]
struct RevokeJson {
    cidr: String,
    revoked: u64,
}

fn render(r: &RevokeJson) -> String {
    if r.revoked == 0 {
        // Not an error: the end state the user asked for holds.
        format!("nothing to revoke inside {}\n", r.cidr)
    } else {
        format!(
            "revoked {} inside {} (established connections are not cut)\n",
            count(r.revoked, "grant", "grants"),
            r.cidr
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use serde_json::json;

    use super::*;

    #[test]
    fn human_output() {
        let r = |n| RevokeJson {
            cidr: "192.0.2.0/24".into(),
            revoked: n,
        };
        assert_eq!(render(&r(0)), "nothing to revoke inside 192.0.2.0/24\n");
        assert_eq!(
            render(&r(1)),
            "revoked 1 grant inside 192.0.2.0/24 (established connections are not cut)\n"
        );
        assert!(render(&r(3)).starts_with("revoked 3 grants inside"));
    }

    #[test]
    fn json_shape() {
        let r = RevokeJson {
            cidr: "192.0.2.7".into(),
            revoked: 2,
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"cidr": "192.0.2.7", "revoked": 2})
        );
    }
}
