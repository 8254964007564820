//! The subcommands, one module each, and the context they share (sockets, output mode).

pub mod allow;
pub mod cache;
pub mod completions;
pub mod history;
pub mod list;
pub mod man;
pub mod revoke;
pub mod status;
pub mod upstreams;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use guard_proto::v1::firewall_client::FirewallClient;
use guard_proto::v1::resolver_client::ResolverClient;
use tonic::transport::Channel;

use crate::cli::{Cli, Command};
use crate::client::{self, Daemon};

/// What every command needs from the global flags.
#[derive(Debug, Clone)]
pub struct Context {
    /// fwd's control socket.
    pub fwd_socket: PathBuf,
    /// dnsd's control socket.
    pub dnsd_socket: PathBuf,
    /// Print JSON instead of text.
    pub json: bool,
    /// Deadline for connecting and for each RPC.
    pub timeout: Duration,
}

impl Context {
    /// Connects to fwd.
    pub async fn fwd(&self) -> anyhow::Result<FirewallClient<Channel>> {
        let channel = client::connect(Daemon::Fwd, &self.fwd_socket, self.timeout).await?;
        Ok(FirewallClient::new(channel))
    }

    /// Connects to dnsd.
    pub async fn dnsd(&self) -> anyhow::Result<ResolverClient<Channel>> {
        let channel = client::connect(Daemon::Dnsd, &self.dnsd_socket, self.timeout).await?;
        Ok(ResolverClient::new(channel))
    }

    /// Awaits one RPC to `daemon` within the deadline, mapping failures to messages.
    pub async fn call<T>(
        &self,
        daemon: Daemon,
        rpc: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> anyhow::Result<T> {
        client::call(daemon, self.timeout, rpc).await
    }
}

/// Runs the parsed command line. `status` is the one command that can fail after printing
/// (fwd down), so commands report an exit code rather than only success.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ctx = Context {
        fwd_socket: cli.fwd_socket,
        dnsd_socket: cli.dnsd_socket,
        json: cli.json,
        timeout: cli.timeout,
    };
    match cli.command {
        Command::List(cmd) => cmd.run(&ctx).await?,
        Command::Allow(cmd) => cmd.run(&ctx).await?,
        Command::Revoke(cmd) => cmd.run(&ctx).await?,
        Command::History(cmd) => cmd.run(&ctx).await?,
        Command::Status(cmd) => return cmd.run(&ctx).await,
        Command::Cache(cmd) => cmd.run(&ctx).await?,
        Command::Upstreams(cmd) => cmd.run(&ctx).await?,
        Command::Completions(cmd) => cmd.run()?,
        Command::Man(cmd) => cmd.run()?,
    }
    Ok(ExitCode::SUCCESS)
}
