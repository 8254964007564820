//! Calls fwd's Firewall.Authorize once and prints the result as JSON, so tests can call it as another uid.
//!
//! ```text
//! guard-test-client --socket PATH --ip IP [--ip IP ...] [--raw-ip HEX] [--ttl S] [--qname N]
//!                   [--client IP] [--reason R]
//! ```
//! Exit 0 with `{"results": [...]}`; 1 with `{"error": {"code": "PermissionDenied", ...}}` when
//! the call fails; 2 when the socket cannot be reached; 64 on bad arguments.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use guard_proto::v1::firewall_client::FirewallClient;
use guard_proto::v1::{AuthorizeRequest, Grant, Outcome};
use serde_json::json;

struct Args {
    socket: PathBuf,
    ips: Vec<Vec<u8>>,
    ttl: u32,
    qname: String,
    client: Vec<u8>,
    reason: String,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        socket: PathBuf::new(),
        ips: Vec::new(),
        ttl: 60,
        qname: "e2e.test.".to_owned(),
        client: Vec::new(),
        reason: "guard-test-client".to_owned(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--socket" => a.socket = value()?.into(),
            "--ip" => a.ips.push(guard_proto::ip_to_bytes(parse_ip(&value()?)?)),
            "--raw-ip" => a.ips.push(parse_hex(&value()?)?),
            "--ttl" => a.ttl = value()?.parse().map_err(|e| format!("--ttl: {e}"))?,
            "--qname" => a.qname = value()?,
            "--client" => a.client = guard_proto::ip_to_bytes(parse_ip(&value()?)?),
            "--reason" => a.reason = value()?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.socket.as_os_str().is_empty() {
        return Err("--socket is required".to_owned());
    }
    Ok(a)
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|e| format!("{s}: {e}"))
}

fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("--raw-ip {s}: odd number of hex digits"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| format!("--raw-ip {s}: not hex"))
        })
        .collect()
}

fn ip_text(b: &[u8]) -> String {
    guard_proto::ip_from_bytes(b).map_or_else(
        || b.iter().map(|x| format!("{x:02x}")).collect(),
        |ip| ip.to_string(),
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("guard-test-client: {e}");
            return ExitCode::from(64);
        }
    };
    let channel = match guard_proto::connect_unix(&args.socket).await {
        Ok(c) => c,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            println!("{}", json!({"connect_error": msg}));
            return ExitCode::from(2);
        }
    };
    let req = AuthorizeRequest {
        grants: args
            .ips
            .into_iter()
            .map(|ip| Grant {
                ip,
                ttl_s: args.ttl,
            })
            .collect(),
        qname: args.qname,
        client: args.client,
        reason: args.reason,
    };
    match FirewallClient::new(channel).authorize(req).await {
        Ok(resp) => {
            let results: Vec<_> = resp
                .into_inner()
                .results
                .iter()
                .map(|r| {
                    json!({
                        "ip": ip_text(&r.ip),
                        "outcome": Outcome::try_from(r.outcome)
                            .map_or("UNKNOWN", |o| o.as_str_name()),
                        "expires_unix_ms": r.expires_unix_ms,
                        "effective_ttl_s": r.effective_ttl_s,
                        "error": r.error,
                    })
                })
                .collect();
            println!("{}", json!({ "results": results }));
            ExitCode::SUCCESS
        }
        Err(s) => {
            println!(
                "{}",
                json!({"error": {
                    "code": format!("{:?}", s.code()),
                    "code_num": s.code() as i32,
                    "message": s.message(),
                }})
            );
            ExitCode::from(1)
        }
    }
}
