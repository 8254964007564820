//! The revocation watch: follows fwd's `WatchRevocations` stream and makes the cache and the authorizer's memory forget the grants of every revoked address, so that the next answer naming it re-authorizes.
//!
//! A cache hit is served without fwd while the grant fwd reported at authorization time
//! outlives the TTL told to the client. An admin's `guardctl revoke` ends that grant early, in
//! fwd and in the kernel, without dnsd having asked; without this watch dnsd would keep handing
//! out an address the kernel now refuses until the entry expires.
//!
//! fwd sends each revocation once it is committed to the kernel. Every new stream starts with
//! the catch-alls `0.0.0.0/0` and `::/0` (the subscriber may have missed revocations while it
//! was away), and a subscriber that lags gets them again. dnsd therefore believes cached grants
//! only while a stream is up *and* both of that stream's catch-alls have been applied: before
//! that, and whenever the stream is down, the cache is untrusted and every A/AAAA hit goes
//! through fwd. If that call fails, the hit gets SERVFAIL, with one exception: when fwd cannot
//! be reached at all (connection refused, socket gone) the hit is served under the grant fwd
//! committed before, if it outlives the TTL. A dead fwd revokes nothing and the kernel expires
//! its elements on their own timeouts, so that address is still reachable; the one revocation
//! this can miss is one committed in the instant before fwd died, before it was streamed.
//! The authorizer's memory of confirmed grants ([`crate::authorize`]) follows the same rule:
//! each revocation forgets the addresses it covers (the catch-alls everything), it is believed
//! only once both catch-alls of a stream are applied, and it is forgotten whenever the stream
//! ends.
//! Reconnects back off from [`INITIAL_BACKOFF`], doubling up to [`MAX_BACKOFF`]; the end-to-end
//! tests wait for the debug line `cached grants forgotten` with `cidr=...` (keep its wording).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use guard_proto::v1::firewall_client::FirewallClient;
use guard_proto::v1::{Revocation, WatchRevocationsRequest};
use hyper_util::rt::TokioIo;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::handler::Handler;

/// The first pause before resubscribing after the stream ended or could not be opened.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause between subscription attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why a subscription ended (or never started).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// fwd's socket could not be connected to.
    #[error("cannot connect to fwd at {path}: {source}")]
    Connect {
        /// fwd's socket.
        path: PathBuf,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// fwd did not answer the subscription in time.
    #[error("fwd at {path} did not accept WatchRevocations within {timeout:?}")]
    Timeout {
        /// fwd's socket.
        path: PathBuf,
        /// The deadline (`authorize.timeout`).
        timeout: Duration,
    },
    /// fwd refused the subscription (permission denied, an fwd without the RPC, ...).
    #[error("fwd at {path} refused WatchRevocations: {status}")]
    Refused {
        /// fwd's socket.
        path: PathBuf,
        /// fwd's answer.
        status: Box<tonic::Status>,
    },
    /// The stream failed (fwd stopped, connection reset, ...).
    #[error("revocation stream from fwd at {path} failed: {status}")]
    Stream {
        /// fwd's socket.
        path: PathBuf,
        /// The stream's final status.
        status: Box<tonic::Status>,
    },
    /// fwd closed the stream.
    #[error("fwd at {path} ended the revocation stream")]
    Ended {
        /// fwd's socket.
        path: PathBuf,
    },
}

/// The networks a revocation covers. A network dnsd cannot parse is taken to be everything:
/// forgetting too much only costs Authorize calls, forgetting too little serves dead addresses.
pub fn revoked_nets(cidr: &str) -> Vec<IpNet> {
    let cidr = cidr.trim();
    if let Ok(net) = cidr.parse::<IpNet>() {
        return vec![net];
    }
    if let Ok(ip) = cidr.parse::<std::net::IpAddr>() {
        return vec![IpNet::from(ip)];
    }
    tracing::warn!(
        cidr,
        "unparseable revocation from fwd; forgetting every cached grant"
    );
    EVERYTHING.to_vec()
}

/// The catch-all networks, which fwd sends first on every stream.
const EVERYTHING: [IpNet; 2] = [
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0)),
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 0)),
];

/// Opens a subscription on a fresh connection (not the Authorize channel, whose resets must
/// not cut the stream). The client is returned with the stream to keep the connection alive.
async fn subscribe(
    path: &Path,
    timeout: Duration,
) -> Result<(FirewallClient<Channel>, tonic::Streaming<Revocation>), WatchError> {
    let socket = path.to_path_buf();
    let channel = Endpoint::from_static("http://fwd.guard.invalid")
        .connect_timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| WatchError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let mut client = FirewallClient::new(channel);
    match tokio::time::timeout(
        timeout,
        client.watch_revocations(WatchRevocationsRequest {}),
    )
    .await
    {
        Err(_) => Err(WatchError::Timeout {
            path: path.to_path_buf(),
            timeout,
        }),
        Ok(Err(status)) => Err(WatchError::Refused {
            path: path.to_path_buf(),
            status: Box::new(status),
        }),
        Ok(Ok(resp)) => Ok((client, resp.into_inner())),
    }
}

/// One subscription: applies revocations until the stream ends. Sets `trusted` once both
/// catch-alls of this stream have been applied (the cache is then trusted again), and then
/// fires `settled`.
async fn session(
    path: &Path,
    timeout: Duration,
    handler: &Handler,
    trusted: &mut bool,
    settled: &mut Option<oneshot::Sender<()>>,
) -> WatchError {
    let (_client, mut stream) = match subscribe(path, timeout).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    let cache = handler.cache();
    let authorizer = handler.authorizer();
    let metrics = handler.metrics();
    let (mut v4_reset, mut v6_reset) = (false, false);
    loop {
        let revocation = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return WatchError::Ended {
                    path: path.to_path_buf(),
                };
            }
            Err(status) => {
                return WatchError::Stream {
                    path: path.to_path_buf(),
                    status: Box::new(status),
                };
            }
        };
        metrics.revocation();
        for net in revoked_nets(&revocation.cidr) {
            let entries = cache.revoke(&net);
            let remembered = authorizer.revoked(&net);
            if net.prefix_len() == 0 {
                match net {
                    IpNet::V4(_) => v4_reset = true,
                    IpNet::V6(_) => v6_reset = true,
                }
            }
            tracing::debug!(cidr = %net, entries, remembered, "revocation from fwd: cached grants forgotten");
        }
        if !*trusted && v4_reset && v6_reset {
            // Everything granted before this stream began is forgotten; from here on every
            // revocation arrives on it.
            cache.set_trusted(true);
            authorizer.set_trusted(true);
            metrics.revocation_watch_up(true);
            *trusted = true;
            tracing::info!(fwd = %path.display(), "revocation watch connected; cached grants trusted");
            if let Some(tx) = settled.take() {
                let _ = tx.send(());
            }
        }
    }
}

/// Follows fwd's revocations on `path` until `shutdown`, resubscribing with back-off.
/// `timeout` bounds connecting and subscribing (`authorize.timeout`). `settled` fires when
/// the first attempt has either made the cache trusted or failed.
pub async fn watch(
    path: PathBuf,
    timeout: Duration,
    handler: Arc<Handler>,
    shutdown: CancellationToken,
    settled: oneshot::Sender<()>,
) {
    let mut settled = Some(settled);
    let cache = handler.cache();
    let metrics = handler.metrics();
    let mut backoff = INITIAL_BACKOFF;
    // Warn once per outage; repeated failures while fwd stays away are debug.
    let mut warned = false;
    loop {
        let mut trusted = false;
        let err = tokio::select! {
            _ = shutdown.cancelled() => break,
            e = session(&path, timeout, &handler, &mut trusted, &mut settled) => e,
        };
        if let Some(tx) = settled.take() {
            let _ = tx.send(());
        }
        cache.set_trusted(false);
        // Forgets every remembered grant: revocations may be missed until the next stream.
        handler.authorizer().set_trusted(false);
        metrics.revocation_watch_up(false);
        if trusted {
            backoff = INITIAL_BACKOFF;
            warned = false;
        }
        if !warned {
            tracing::warn!(error = %err, retry_in = ?backoff, "revocation watch down; every A/AAAA cache hit re-authorizes until it is back");
            warned = true;
        } else {
            tracing::debug!(error = %err, retry_in = ?backoff, "revocation watch still down");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    cache.set_trusted(false);
    handler.authorizer().set_trusted(false);
    metrics.revocation_watch_up(false);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn revocations_parse_and_fail_safe() {
        let one =
            |s: &str| -> Vec<String> { revoked_nets(s).iter().map(ToString::to_string).collect() };
        assert_eq!(one("192.0.2.7/32"), ["192.0.2.7/32"]);
        assert_eq!(one("2001:db8::/48"), ["2001:db8::/48"]);
        assert_eq!(one("0.0.0.0/0"), ["0.0.0.0/0"]);
        assert_eq!(one("::/0"), ["::/0"]);
        assert_eq!(one(" 192.0.2.7 "), ["192.0.2.7/32"]);
        // Garbage is everything.
        assert_eq!(one("bogus"), ["0.0.0.0/0", "::/0"]);
        assert_eq!(one(""), ["0.0.0.0/0", "::/0"]);
    }

    #[test]
    fn backoff_bounds() {
        let mut b = INITIAL_BACKOFF;
        for _ in 0..20 {
            b = (b * 2).min(MAX_BACKOFF);
        }
        assert_eq!(b, MAX_BACKOFF);
    }
}
