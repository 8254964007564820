//! The Authorize client of fwd: one persistent gRPC channel over fwd's Unix socket, rebuilt after failures, with a deadline on every call.
//!
//! "Granted" means committed in the kernel: fwd returns only after the nft elements exist,
//! and dnsd releases an answer only after this call returns. Anything else (fwd down, slow
//! past the deadline, refusing the call, or answering nonsense) is an error the handler turns
//! into SERVFAIL (unless `on_fwd_error = "answer"`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use guard_proto::v1::firewall_client::FirewallClient;
use guard_proto::v1::{AuthorizeRequest, Grant, Outcome};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::UnixStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// Why an Authorize call failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    /// fwd did not answer within the configured deadline.
    #[error("fwd at {path} did not answer within {timeout:?}")]
    Timeout {
        /// fwd's socket.
        path: PathBuf,
        /// The deadline.
        timeout: Duration,
    },
    /// fwd could not be reached (socket missing, connection refused or reset).
    #[error("fwd unreachable at {path}: {status}")]
    Unavailable {
        /// fwd's socket.
        path: PathBuf,
        /// The transport status.
        status: Box<tonic::Status>,
    },
    /// fwd refused the whole call (permission denied, batch too large, ...).
    #[error("fwd at {path} refused the call: {status}")]
    Refused {
        /// fwd's socket.
        path: PathBuf,
        /// fwd's answer.
        status: Box<tonic::Status>,
    },
    /// fwd's answer does not match the request (count or addresses differ).
    #[error("fwd at {path} sent a malformed answer: {what}")]
    Malformed {
        /// fwd's socket.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
}

impl AuthorizeError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            AuthorizeError::Timeout { .. } => "timeout",
            AuthorizeError::Unavailable { .. } => "unavailable",
            AuthorizeError::Refused { .. } => "refused",
            AuthorizeError::Malformed { .. } => "malformed",
        }
    }
}

/// fwd's verdict on one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Committed in the kernel until this wall-clock Unix time (ms).
    Granted {
        /// `expires_unix_ms` from fwd.
        expires_unix_ms: u64,
    },
    /// Refused; nothing was committed for it.
    Rejected {
        /// fwd's reason.
        error: String,
    },
}

/// One Authorize request, already filtered by the handler.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Addresses on the chain, each with the TTL the client will be told.
    pub grants: &'a [(IpAddr, u32)],
    /// The query name (for fwd's audit log).
    pub qname: &'a str,
    /// The DNS client.
    pub client: IpAddr,
    /// "answer" or "cache-refresh".
    pub reason: &'a str,
}

/// The client of fwd's `Firewall.Authorize`.
#[derive(Debug)]
pub struct Authorizer {
    path: PathBuf,
    timeout: Duration,
    client: Mutex<Option<FirewallClient<Channel>>>,
}

fn lazy_channel(path: &Path, timeout: Duration) -> Channel {
    let path = path.to_path_buf();
    Endpoint::from_static("http://fwd.guard.invalid")
        .connect_timeout(timeout)
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
}

/// Wall-clock now in Unix ms.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Authorizer {
    /// A client for fwd's socket at `path`; nothing is connected until the first call.
    pub fn new(path: &Path, timeout: Duration) -> Self {
        Authorizer {
            path: path.to_path_buf(),
            timeout,
            client: Mutex::new(None),
        }
    }

    fn client(&self) -> FirewallClient<Channel> {
        let mut slot = self.client.lock();
        slot.get_or_insert_with(|| FirewallClient::new(lazy_channel(&self.path, self.timeout)))
            .clone()
    }

    /// Forgets the channel so that the next call connects afresh.
    fn reset(&self) {
        *self.client.lock() = None;
    }

    /// Asks fwd to commit `req.grants`; returns one verdict per grant, in order.
    pub async fn authorize(&self, req: Request<'_>) -> Result<Vec<Verdict>, AuthorizeError> {
        let body = AuthorizeRequest {
            grants: req
                .grants
                .iter()
                .map(|(ip, ttl)| Grant {
                    ip: guard_proto::ip_to_bytes(*ip),
                    ttl_s: *ttl,
                })
                .collect(),
            qname: req.qname.to_owned(),
            client: guard_proto::ip_to_bytes(req.client.to_canonical()),
            reason: req.reason.to_owned(),
        };
        // One retry when the transport failed: after fwd restarts, the first call on the old
        // connection fails although a new one would succeed. Authorize is idempotent.
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut retried = false;
        let resp = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let mut request = tonic::Request::new(body.clone());
            request.set_timeout(left);
            let mut client = self.client();
            match tokio::time::timeout_at(deadline, client.authorize(request)).await {
                Err(_) => {
                    self.reset();
                    return Err(AuthorizeError::Timeout {
                        path: self.path.clone(),
                        timeout: self.timeout,
                    });
                }
                Ok(Ok(r)) => break r.into_inner(),
                Ok(Err(status)) => match status.code() {
                    Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled => {
                        self.reset();
                        if status.code() == Code::Unavailable
                            && !retried
                            && tokio::time::Instant::now() < deadline
                        {
                            retried = true;
                            continue;
                        }
                        return Err(AuthorizeError::Unavailable {
                            path: self.path.clone(),
                            status: Box::new(status),
                        });
                    }
                    Code::DeadlineExceeded => {
                        self.reset();
                        return Err(AuthorizeError::Timeout {
                            path: self.path.clone(),
                            timeout: self.timeout,
                        });
                    }
                    _ => {
                        return Err(AuthorizeError::Refused {
                            path: self.path.clone(),
                            status: Box::new(status),
                        });
                    }
                },
            }
        };
        self.check(req.grants, resp.results, now_unix_ms())
    }

    /// Whether fwd is certainly down: nothing accepts connections on its socket (refused, or
    /// the socket file is gone). A slow, hung or refusing fwd is not down. Only asked after a
    /// call failed as [`AuthorizeError::Unavailable`], which also covers statuses a live fwd
    /// can send (its cancellation at the deadline, an unavailable state store).
    pub async fn fwd_is_down(&self) -> bool {
        match tokio::time::timeout(self.timeout, UnixStream::connect(&self.path)).await {
            Ok(Err(e)) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ),
            Ok(Ok(_)) | Err(_) => false,
        }
    }

    /// Matches fwd's results to the request, failing closed on anything inconsistent.
    fn check(
        &self,
        grants: &[(IpAddr, u32)],
        results: Vec<guard_proto::v1::GrantResult>,
        now_ms: u64,
    ) -> Result<Vec<Verdict>, AuthorizeError> {
        let malformed = |what: String| AuthorizeError::Malformed {
            path: self.path.clone(),
            what,
        };
        if results.len() != grants.len() {
            return Err(malformed(format!(
                "{} results for {} grants",
                results.len(),
                grants.len()
            )));
        }
        let mut out = Vec::with_capacity(results.len());
        for (i, (r, (ip, _))) in results.into_iter().zip(grants).enumerate() {
            if guard_proto::ip_from_bytes(&r.ip) != Some(*ip) {
                return Err(malformed(format!("result {i} is not for {ip}")));
            }
            let verdict = match Outcome::try_from(r.outcome) {
                Ok(Outcome::Granted | Outcome::Extended | Outcome::Unchanged) => {
                    if r.expires_unix_ms <= now_ms {
                        // A grant that has already ended protects nothing.
                        Verdict::Rejected {
                            error: format!("grant already expired ({} ms)", r.expires_unix_ms),
                        }
                    } else {
                        Verdict::Granted {
                            expires_unix_ms: r.expires_unix_ms,
                        }
                    }
                }
                Ok(Outcome::Rejected) => Verdict::Rejected { error: r.error },
                Ok(Outcome::Unspecified) | Err(_) => Verdict::Rejected {
                    error: format!("unknown outcome {}", r.outcome),
                },
            };
            out.push(verdict);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use guard_proto::v1::GrantResult;

    use super::*;

    fn result(ip: &str, outcome: Outcome, expires: u64) -> GrantResult {
        GrantResult {
            ip: guard_proto::ip_to_bytes(ip.parse().unwrap()),
            outcome: outcome as i32,
            expires_unix_ms: expires,
            effective_ttl_s: 60,
            error: if outcome == Outcome::Rejected {
                "never-authorize".into()
            } else {
                String::new()
            },
        }
    }

    #[test]
    fn results_are_checked_against_the_request() {
        let a = Authorizer::new(Path::new("/nonexistent"), Duration::from_secs(1));
        let grants = [
            ("192.0.2.1".parse().unwrap(), 60),
            ("192.0.2.2".parse().unwrap(), 60),
            ("192.0.2.3".parse().unwrap(), 60),
            ("192.0.2.4".parse().unwrap(), 60),
        ];
        let v = a
            .check(
                &grants,
                vec![
                    result("192.0.2.1", Outcome::Granted, 2000),
                    result("192.0.2.2", Outcome::Rejected, 0),
                    result("192.0.2.3", Outcome::Unchanged, 500),
                    GrantResult {
                        outcome: 99,
                        ..result("192.0.2.4", Outcome::Granted, 2000)
                    },
                ],
                1000,
            )
            .unwrap();
        assert_eq!(
            v[0],
            Verdict::Granted {
                expires_unix_ms: 2000
            }
        );
        assert!(matches!(v[1], Verdict::Rejected { .. }));
        assert!(matches!(v[2], Verdict::Rejected { .. }), "expired grant");
        assert!(matches!(v[3], Verdict::Rejected { .. }), "unknown outcome");
        // Count mismatch and reordering are malformed as a whole.
        assert!(a.check(&grants, vec![], 1000).is_err());
        let swapped = vec![
            result("192.0.2.2", Outcome::Granted, 2000),
            result("192.0.2.1", Outcome::Granted, 2000),
            result("192.0.2.3", Outcome::Granted, 2000),
            result("192.0.2.4", Outcome::Granted, 2000),
        ];
        assert!(matches!(
            a.check(&grants, swapped, 1000),
            Err(AuthorizeError::Malformed { .. })
        ));
    }

    #[tokio::test]
    async fn fwd_is_down_only_when_nothing_listens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fwd.sock");
        let a = Authorizer::new(&path, Duration::from_millis(500));
        assert!(a.fwd_is_down().await, "no socket file");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        assert!(
            !a.fwd_is_down().await,
            "listening (even if it never answers)"
        );
        drop(listener);
        assert!(
            a.fwd_is_down().await,
            "stale socket file: connection refused"
        );
    }

    #[tokio::test]
    async fn missing_fwd_is_unavailable_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authorizer::new(&dir.path().join("fwd.sock"), Duration::from_millis(500));
        let grants = [("192.0.2.1".parse().unwrap(), 60)];
        let err = a
            .authorize(Request {
                grants: &grants,
                qname: "example.com",
                client: "127.0.0.1".parse().unwrap(),
                reason: "answer",
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                AuthorizeError::Unavailable { .. } | AuthorizeError::Timeout { .. }
            ),
            "{err}"
        );
    }
}
