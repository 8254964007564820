//! fwd-bench: drives fwd's Authorize RPC over its Unix socket and prints one JSON object per run.
//!
//! Addresses are generated in 2001:db8::/32 (documentation range): they only ever become set
//! elements in the benchmark's own network namespace, no packet is sent to them.
#![forbid(unsafe_code)]

use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use guard_proto::UnixChannel;
use guard_proto::v1::{self as pb, firewall_client::FirewallClient};
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// fwd's socket.
    #[arg(long)]
    socket: PathBuf,
    /// Third group of the generated addresses (2001:db8:SEED::/48), so runs do not collide.
    #[arg(long, default_value_t = 1)]
    seed: u16,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Sequential calls, one new address each: latency percentiles.
    Latency {
        #[arg(long, default_value_t = 5000)]
        calls: u64,
    },
    /// Concurrent callers, one new address per call: aggregate new addresses per second.
    Throughput {
        #[arg(long, default_value_t = 32)]
        callers: u64,
        #[arg(long, default_value_t = 100_000)]
        total: u64,
        /// Addresses per call (1 = one new IP per Authorize).
        #[arg(long, default_value_t = 1)]
        batch: u64,
        /// gRPC connections shared by the callers.
        #[arg(long, default_value_t = 4)]
        connections: u64,
        /// Requests per call: above 0, each call is one AuthorizeMany of this many requests of
        /// `batch` addresses each (the way dnsd coalesces answers); 0 = plain Authorize.
        #[arg(long, default_value_t = 0)]
        many: u64,
    },
    /// The peers' way: one `nft add element` exec per grant, in the same namespace.
    NftExec {
        #[arg(long, default_value_t = 300)]
        calls: u64,
        #[arg(long, default_value = "guard")]
        table: String,
    },
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn addr(seed: u16, n: u64) -> Vec<u8> {
    let hi = (n >> 32) as u16;
    let a = Ipv6Addr::new(0x2001, 0xdb8, seed, hi, 0, 0, (n >> 16) as u16, n as u16);
    a.octets().to_vec()
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn request(ips: Vec<Vec<u8>>) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        grants: ips
            .into_iter()
            .map(|ip| pb::Grant { ip, ttl_s: 3600 })
            .collect(),
        qname: "bench.example".into(),
        reason: "bench".into(),
        ..Default::default()
    }
}

fn check(results: &[pb::GrantResult]) -> Result<()> {
    for g in results {
        if g.outcome == pb::Outcome::Rejected as i32 || g.outcome == pb::Outcome::Unspecified as i32
        {
            bail!("unexpected outcome {} ({})", g.outcome, g.error);
        }
    }
    Ok(())
}

async fn call(c: &mut FirewallClient<UnixChannel>, ips: Vec<Vec<u8>>) -> Result<()> {
    let r = c.authorize(request(ips)).await?.into_inner();
    check(&r.results)
}

/// One AuthorizeMany carrying `per` addresses in each request.
async fn call_many(
    c: &mut FirewallClient<UnixChannel>,
    ips: Vec<Vec<u8>>,
    per: usize,
) -> Result<()> {
    let requests = ips
        .chunks(per.max(1))
        .map(|c| request(c.to_vec()))
        .collect();
    let r = c
        .authorize_many(pb::AuthorizeManyRequest { requests })
        .await?
        .into_inner();
    for one in &r.responses {
        if !one.error.is_empty() {
            bail!("request refused: {}", one.error);
        }
        check(&one.results)?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    match args.cmd {
        Cmd::Latency { calls } => {
            // The transport dnsd uses to reach fwd.
            let mut c = FirewallClient::new(UnixChannel::lazy(&args.socket, CONNECT_TIMEOUT));
            // Warm the connection and the committer.
            for i in 0..100 {
                call(&mut c, vec![addr(args.seed, (1 << 40) + i)]).await?;
            }
            let mut lat = Vec::with_capacity(calls as usize);
            for i in 0..calls {
                let t = Instant::now();
                call(&mut c, vec![addr(args.seed, i)]).await?;
                lat.push(t.elapsed().as_micros() as u64);
            }
            lat.sort_unstable();
            let mean = lat.iter().sum::<u64>() as f64 / lat.len().max(1) as f64;
            println!(
                "{}",
                json!({"run": "latency", "calls": calls, "p50_us": pct(&lat, 0.50), "p90_us": pct(&lat, 0.90),
                       "p99_us": pct(&lat, 0.99), "p999_us": pct(&lat, 0.999), "max_us": lat.last().copied().unwrap_or(0), "mean_us": mean.round()})
            );
        }
        Cmd::Throughput {
            callers,
            total,
            batch,
            connections,
            many,
        } => {
            let mut chans = Vec::new();
            for _ in 0..connections.max(1) {
                chans.push(UnixChannel::lazy(&args.socket, CONNECT_TIMEOUT));
            }
            let next = Arc::new(AtomicU64::new(0));
            let t = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..callers {
                let mut c = FirewallClient::new(chans[(i % connections.max(1)) as usize].clone());
                let next = next.clone();
                let seed = args.seed;
                let per_call = batch * many.max(1);
                tasks.spawn(async move {
                    loop {
                        let start = next.fetch_add(per_call, Ordering::Relaxed);
                        if start >= total {
                            return Ok::<(), anyhow::Error>(());
                        }
                        let ips = (start..(start + per_call).min(total))
                            .map(|n| addr(seed, n))
                            .collect();
                        if many > 0 {
                            call_many(&mut c, ips, batch as usize).await?;
                        } else {
                            call(&mut c, ips).await?;
                        }
                    }
                });
            }
            while let Some(r) = tasks.join_next().await {
                r??;
            }
            let secs = t.elapsed().as_secs_f64();
            println!(
                "{}",
                json!({"run": "throughput", "callers": callers, "batch": batch, "many": many, "connections": connections,
                       "total": total, "seconds": (secs * 1000.0).round() / 1000.0, "ips_per_s": (total as f64 / secs).round()})
            );
        }
        Cmd::NftExec { calls, table } => {
            let mut lat = Vec::with_capacity(calls as usize);
            for i in 0..calls {
                let ip = Ipv6Addr::from(<[u8; 16]>::try_from(addr(args.seed, i).as_slice())?);
                let t = Instant::now();
                let st = Command::new("nft")
                    .arg(format!(
                        "add element inet {table} auth6 {{ {ip} timeout 3600s }}"
                    ))
                    .status()
                    .context("exec nft")?;
                lat.push(t.elapsed().as_micros() as u64);
                if !st.success() {
                    bail!("nft failed for {ip}");
                }
            }
            lat.sort_unstable();
            println!(
                "{}",
                json!({"run": "nft_exec", "calls": calls, "p50_us": pct(&lat, 0.50), "p99_us": pct(&lat, 0.99),
                       "ips_per_s": (1e6 / (lat.iter().sum::<u64>() as f64 / lat.len().max(1) as f64)).round()})
            );
        }
    }
    let _ = Duration::ZERO;
    Ok(())
}
