//! The command line: global flags and the subcommands, each defined in its `cmd` module.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::cmd::{allow, cache, completions, history, list, man, revoke, status, upstreams};

/// Inspect and steer guard, the DNS egress firewall: its grants (fwd) and resolver (dnsd).
#[derive(Debug, Parser)]
#[command(
    name = "guardctl",
    version,
    propagate_version = true,
    after_help = "Exit status: 0 on success, 1 when a daemon is unreachable, denies or rejects \
                  the request, 2 on usage errors."
)]
pub struct Cli {
    /// fwd's control socket.
    #[arg(
        long = "socket",
        value_name = "PATH",
        env = "GUARD_FWD_SOCKET",
        default_value = "/run/guard/fwd.sock",
        global = true,
        help_heading = "Global options"
    )]
    pub fwd_socket: PathBuf,

    /// dnsd's control socket.
    #[arg(
        long = "dnsd-socket",
        value_name = "PATH",
        env = "GUARD_DNSD_SOCKET",
        default_value = "/run/guard/dnsd.sock",
        global = true,
        help_heading = "Global options"
    )]
    pub dnsd_socket: PathBuf,

    /// Print one machine-readable JSON document on stdout instead of text.
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,

    /// Give up on a daemon that does not answer within this long.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "10s",
        value_parser = parse_timeout,
        global = true,
        help_heading = "Global options"
    )]
    pub timeout: Duration,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the current grants (fwd).
    List(list::List),
    /// Allow an address or CIDR by hand (fwd, admin).
    Allow(allow::Allow),
    /// Revoke every grant and allowance inside an address or CIDR (fwd, admin).
    Revoke(revoke::Revoke),
    /// Show the audit history, newest first (fwd).
    History(history::History),
    /// Show the state of fwd and dnsd.
    Status(status::Status),
    /// Manage dnsd's answer cache.
    #[command(subcommand)]
    Cache(cache::Cache),
    /// Show dnsd's upstream resolvers and their health.
    Upstreams(upstreams::Upstreams),
    /// Print shell completions.
    Completions(completions::Completions),
    /// Print the man page (roff).
    Man(man::Man),
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("the timeout must be longer than 0s".to_owned()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!(
            "'{s}' is not a duration ({e}; expected e.g. 500ms, 10s)"
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use clap::CommandFactory;
    use clap::error::ErrorKind;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("guardctl").chain(args.iter().copied()))
    }

    fn kind(args: &[&str]) -> ErrorKind {
        parse(args).map(|_| ()).unwrap_err().kind()
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let cli = parse(&[
            "list",
            "--json",
            "--socket",
            "/tmp/f.sock",
            "--timeout",
            "2s",
        ])
        .unwrap();
        assert!(cli.json);
        assert_eq!(cli.fwd_socket, PathBuf::from("/tmp/f.sock"));
        assert_eq!(cli.timeout, Duration::from_secs(2));
        let cli = parse(&["--dnsd-socket", "/tmp/d.sock", "upstreams"]).unwrap();
        assert_eq!(cli.dnsd_socket, PathBuf::from("/tmp/d.sock"));
        assert!(!cli.json);
    }

    #[test]
    fn bad_values_are_usage_errors() {
        assert_eq!(kind(&["allow", "192.0.2.1/24"]), ErrorKind::ValueValidation);
        assert_eq!(kind(&["allow", "example.com"]), ErrorKind::ValueValidation);
        assert_eq!(
            kind(&["allow", "192.0.2.1", "--ttl", "5"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            kind(&["allow", "192.0.2.1", "--ttl", "0s"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(kind(&["revoke", "10.0.0.0/33"]), ErrorKind::ValueValidation);
        assert_eq!(
            kind(&["list", "--cidr", "nope"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(kind(&["list", "--limit", "0"]), ErrorKind::ValueValidation);
        assert_eq!(kind(&["list", "--limit", "-1"]), ErrorKind::UnknownArgument);
        assert_eq!(kind(&["list", "--limit", "x"]), ErrorKind::ValueValidation);
        assert_eq!(
            kind(&["list", "--limit", "4294967296"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            kind(&["history", "--since", "yesterday"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            kind(&["history", "--ip", "192.0.2.300"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            kind(&["--timeout", "0s", "status"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(kind(&["completions", "tcsh"]), ErrorKind::InvalidValue);
        assert_eq!(kind(&["allow"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            kind(&["cache"]),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
        assert_eq!(kind(&["frobnicate"]), ErrorKind::InvalidSubcommand);
    }

    #[test]
    fn usage_errors_exit_2() {
        assert_eq!(parse(&["allow", "nope"]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn bad_cidr_message_is_clear() {
        let e = parse(&["allow", "192.0.2.1/24"]).unwrap_err().to_string();
        assert!(
            e.contains("has host bits set; the network is 192.0.2.0/24"),
            "{e}"
        );
    }
}
