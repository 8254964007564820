//! Harness for guard end-to-end tests: network namespaces, topologies, in-namespace probes and echo servers, and guards around the real daemons.
//!
//! Everything here is built to be torn down: every namespace and process is owned by a guard
//! whose `Drop` removes it, also when the test panics. Names are unique per process and per
//! object, so tests run in parallel.
//!
//! The pieces:
//! - [`Netns`]: one network namespace (`ip netns add`), commands in it, closures on a thread in it.
//! - [`Topology`]: `local()` (guarded + net) and `gateway()` (clients A, B → gw → net).
//! - [`probe`]: TCP/UDP probes that tell "refused" from "timed out"; [`EchoServer`] to answer them.
//! - [`Fwd`] / [`FwdConfig`] / [`FwdClient`]: the real fwd, readiness by sd_notify, a sync gRPC client.
//! - [`Dnsd`] / [`DnsdConfig`]: the real dnsd, readiness by sd_notify; [`dnsd::dig`] and
//!   [`dnsd::kdig_tls`] as clients; [`ScriptedUpstream`] for answers no real resolver gives.
//! - [`Unbound`] / [`UnboundConfig`]: the real unbound serving a test zone over plain DNS and
//!   DNS over TLS, with a test CA made by `openssl` ([`unbound::Pki`]).
//! - [`nft`]: independent kernel checks through `nft -j`.
//! - [`cmd`]: commands with a deadline, guardctl, binaries in the target directory.
//!
//! A typical test (see `tests/fwd_e2e.rs`):
//!
//! ```no_run
//! use guard_tests::topology::service_v4;
//! use guard_tests::{EchoServer, Fwd, FwdConfig, OrFail, Topology, probe};
//!
//! let topo = Topology::local().or_fail("topology");
//! let _echo = EchoServer::services(&topo.net).or_fail("echo");
//! let fwd = Fwd::start(&topo.fwd, FwdConfig::local()).or_fail("fwd");
//! probe::expect_tcp_refused(&topo.fwd, service_v4(0)).or_fail("default deny");
//! fwd.client().or_fail("client").authorize(&[(service_v4(0), 60)], "example.com.").or_fail("authorize");
//! probe::expect_tcp_open(&topo.fwd, service_v4(0)).or_fail("granted");
//! // Dropping fwd, then the echo servers, then the topology cleans everything up.
//! ```
#![forbid(unsafe_code)]

pub mod cmd;
pub mod dnsd;
pub mod echo;
pub mod error;
pub mod fwd;
pub mod netns;
pub mod nft;
pub mod probe;
pub mod topology;
pub mod unbound;

use std::time::{Duration, Instant};

pub use cmd::{Out, bin, guardctl};
pub use dnsd::{Dnsd, DnsdConfig, ScriptedUpstream};
pub use echo::{ECHO_PORT, EchoServer};
pub use error::{Context, Error, OrFail, Result};
pub use fwd::{Fwd, FwdClient, FwdConfig};
pub use netns::Netns;
pub use topology::{Client, Topology};
pub use unbound::{Unbound, UnboundConfig};

/// The uid/gid of `nobody`, used for "wrong caller" tests.
pub const NOBODY: u32 = 65534;

/// Fails unless the tests can do their job: root, and `ip` and `nft` on PATH.
///
/// Called by [`Netns::new`], so every test that builds a namespace fails (never skips) with a
/// message saying what is missing.
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::msg(
            "the end-to-end tests need root (network namespaces, nftables); run them as root",
        ));
    }
    for tool in ["ip", "nft"] {
        if which(tool).is_none() {
            return Err(Error::msg(format!(
                "`{tool}` is not on PATH; install iproute2 and nftables"
            )));
        }
    }
    Ok(())
}

/// The full path of `tool` on PATH, if any.
pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Polls `cond` until it returns `Ok(true)` or `timeout` passes.
///
/// Only for behaviour that is time-based by nature (a grant expiring, a sweep recording it),
/// never as readiness. The error names `what` and the last error `cond` returned, if any.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match cond() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            let why = last_err
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default();
            return Err(Error::msg(format!(
                "timed out after {timeout:?} waiting for {what}{why}"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Milliseconds since the Unix epoch, as fwd's `*_unix_ms` fields count them.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
