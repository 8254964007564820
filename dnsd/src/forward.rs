//! The seam between the query handler and the upstream module: what the handler needs from "something that answers queries".
//!
//! The handler depends on this trait rather than on `upstream::Upstreams` directly, so that the
//! authorize-before-answer logic is tested with in-process fakes and the upstream module can
//! evolve on its own. The production implementation wraps `upstream::Upstreams`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use guard_proto::v1::UpstreamHealth;

/// A response from an upstream.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// The response in wire format, with the query's ID.
    pub wire: Vec<u8>,
    /// Which upstream answered (its URL), for metrics.
    pub upstream: Arc<str>,
    /// How long it took.
    pub latency: Duration,
}

/// Why no upstream answered.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ForwardError {
    /// The upstream that failed last, if one was tried.
    pub upstream: Option<String>,
    /// A short label for metrics ("timeout", "overloaded", "io", ...).
    pub kind: &'static str,
    /// Human-readable detail (never includes the query name).
    pub message: String,
}

/// A boxed future returned by [`Forward::forward`].
pub type ForwardFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Forwarded, ForwardError>> + Send + 'a>>;

/// Something that resolves queries through upstream servers.
pub trait Forward: Send + Sync + std::fmt::Debug + 'static {
    /// Sends `query` (wire format) upstream and returns the response. The future must end
    /// by itself, within about the upstreams' `timeout`: the handler sets no timer of its own
    /// on top (the upstream module bounds every attempt by the query's deadline).
    fn forward<'a>(&'a self, query: &'a [u8]) -> ForwardFuture<'a>;
    /// Per-upstream health, for the `Upstreams` RPC.
    fn health(&self) -> Vec<UpstreamHealth>;
    /// The selection strategy name, for the `Upstreams` RPC.
    fn strategy(&self) -> String;
    /// Closes pooled connections (after a reload replaced these upstreams, or at shutdown).
    fn close<'a>(&'a self) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async {})
    }
}

// === impl Forward for the upstream module ===

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::upstream::{UpstreamConfig, UpstreamError, Upstreams};

/// The production [`Forward`]: the upstream module's resolvers.
#[derive(Debug)]
pub struct UpstreamForwarder {
    upstreams: Upstreams,
    /// Upstream URLs by address, so that error metrics carry the same label as latency.
    urls: HashMap<SocketAddr, Arc<str>>,
}

impl UpstreamForwarder {
    /// Builds the upstreams of a (validated) `[upstream]` section; opens no connection.
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, UpstreamError> {
        let upstreams = Upstreams::new(cfg)?;
        let urls = upstreams
            .health()
            .into_iter()
            .filter_map(|h| {
                let rest = h.url.split_once("://")?.1;
                let hostport = rest.split('#').next()?;
                let addr: SocketAddr = hostport.parse().ok()?;
                Some((addr, Arc::from(h.url.as_str())))
            })
            .collect();
        Ok(UpstreamForwarder { upstreams, urls })
    }

    fn describe(&self, e: &UpstreamError) -> (Option<String>, &'static str) {
        let (addr, kind) = match e {
            UpstreamError::Overloaded { .. } => (None, "overloaded"),
            UpstreamError::DeadlineExceeded { .. } => (None, "deadline"),
            UpstreamError::MalformedQuery(_) => (None, "malformed_query"),
            UpstreamError::Timeout { addr } => (Some(addr), "timeout"),
            UpstreamError::Connect { addr, .. } => (Some(addr), "connect"),
            UpstreamError::TlsHandshake { addr, .. } => (Some(addr), "tls"),
            UpstreamError::ConnectionLost { addr, .. } => (Some(addr), "connection_lost"),
            UpstreamError::Io { addr, .. } => (Some(addr), "io"),
            UpstreamError::BadResponse { addr, .. } => (Some(addr), "bad_response"),
            _ => (None, "config"),
        };
        let label = addr.map(|a| {
            self.urls
                .get(a)
                .map_or_else(|| a.to_string(), |u| u.to_string())
        });
        (label, kind)
    }
}

impl Forward for UpstreamForwarder {
    fn forward<'a>(&'a self, query: &'a [u8]) -> ForwardFuture<'a> {
        Box::pin(async move {
            match self.upstreams.query(query).await {
                Ok(a) => Ok(Forwarded {
                    wire: a.response,
                    upstream: a.url,
                    latency: a.latency,
                }),
                Err(e) => {
                    let (upstream, kind) = self.describe(&e);
                    Err(ForwardError {
                        upstream,
                        kind,
                        message: e.to_string(),
                    })
                }
            }
        })
    }

    fn health(&self) -> Vec<UpstreamHealth> {
        self.upstreams
            .health()
            .into_iter()
            .map(|h| UpstreamHealth {
                url: h.url,
                healthy: h.healthy,
                srtt_us: h.srtt_us,
                queries: h.queries,
                errors: h.errors,
                open_connections: h.open_connections,
                last_error: h.last_error,
            })
            .collect()
    }

    fn strategy(&self) -> String {
        self.upstreams.strategy().as_str().to_owned()
    }

    fn close<'a>(&'a self) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(self.upstreams.shutdown())
    }
}
