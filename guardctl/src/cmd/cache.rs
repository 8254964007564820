//! `guardctl cache flush [NAME]`: drop dnsd's cached answers, all or below one name.

use clap::{Args, Subcommand};
use guard_proto::v1::FlushCacheRequest;
use serde::Serialize;

use crate::args;
use crate::client::Daemon;
use crate::cmd::Context;
use crate::output::{count, print, print_json};

/// The `cache` subcommands.
#[derive(Debug, Subcommand)]
pub enum Cache {
    /// Flush the whole cache, or NAME and every name below it (dnsd, admin).
    Flush(Flush),
}

/// Arguments of `guardctl cache flush`.
#[derive(Debug, Args)]
pub struct Flush {
    /// Flush only this name and the names below it, e.g. example.com.
    #[arg(value_name = "NAME", value_parser = args::name)]
    name: Option<String>,
}

impl Cache {
    /// Runs the chosen cache subcommand.
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        match self {
            Cache::Flush(flush) => flush.run(ctx).await,
        }
    }
}

impl Flush {
    async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let request = FlushCacheRequest {
            name: self.name.clone().unwrap_or_default(),
        };
        let mut dnsd = ctx.dnsd().await?;
        let response = ctx.call(Daemon::Dnsd, dnsd.flush_cache(request)).await?;
        let json = FlushJson {
            name: self.name,
            flushed: response.flushed,
        };
        if ctx.json {
            print_json(&json)
        } else {
            print(&render(&json))
        }
    }
}

/// `guardctl cache flush --json`; `name` is null for a full flush.
#[derive(Debug, Serialize)]
struct FlushJson {
    name: Option<String>,
    flushed: u64,
}

fn render(f: &FlushJson) -> String {
    let entries = count(f.flushed, "cache entry", "cache entries");
    match &f.name {
        Some(name) => format!("flushed {entries} at or below {name}\n"),
        None => format!("flushed {entries}\n"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use serde_json::json;

    use super::*;

    #[test]
    fn human_output() {
        let all = FlushJson {
            name: None,
            flushed: 12,
        };
        assert_eq!(render(&all), "flushed 12 cache entries\n");
        let one = FlushJson {
            name: Some("example.com".into()),
            flushed: 1,
        };
        assert_eq!(
            render(&one),
            "flushed 1 cache entry at or below example.com\n"
        );
    }

    #[test]
    fn json_shape() {
        let all = FlushJson {
            name: None,
            flushed: 0,
        };
        assert_eq!(
            serde_json::to_value(&all).unwrap(),
            json!({"name": null, "flushed": 0})
        );
    }
}
