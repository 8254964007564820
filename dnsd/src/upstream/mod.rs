//! Upstream resolvers: udp://, tcp:// and tls:// (DoT) transports, pooling, failover and health.
//!
//! [`Upstreams::query`] forwards one client query: it picks upstreams by [`Strategy`], skips
//! those marked down, tries the next on failure or per-attempt timeout, and gives up at one
//! overall deadline. Stream transports pool and pipeline their connections (`pool`), and a
//! query whose connection dies is retried on another connection or upstream. TLS is never
//! downgraded to plaintext.

mod config;
mod health;
mod message;
mod pool;
mod tcp;
mod tls;
mod udp;

#[cfg(test)]
mod testutil;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;

pub use config::{Protocol, Strategy, UpstreamConfig, server_addrs};
pub use health::UpstreamHealth;
pub use message::{
    QUERY_BLOCK_LEN, plain_question_len, strip_padding, strip_padding_message, ttl_offsets,
};
pub use tls::spki_pin;

pub(crate) use message::{HEADER_LEN, id_of};

use health::{Health, Policy, State};
use message::Prepared;
use pool::{Connector, Pool};
use udp::UdpReply;

/// With `fastest`, one query in this many goes first to a random other upstream, so that
/// the srtt of the others stays current.
const EXPLORE_ONE_IN: u32 = 20;

/// Slack past an attempt's deadline before a stream attempt is abandoned from outside; the
/// transports enforce the deadline themselves. The UDP exchange waits under one timer of
/// its own and gets no second one (a timer costs a clock read and two wheel updates per
/// query).
const DEADLINE_SLACK: Duration = Duration::from_millis(50);

/// `fut`'s result, or [`UpstreamError::Timeout`] for `addr` once `deadline` has passed. A
/// mapped future rather than an `async fn`: the UDP miss path awaits it, and another state
/// machine around the timer cost ~400 instructions per miss (callgrind).
pub(crate) fn by_deadline<T>(
    deadline: Instant,
    addr: SocketAddr,
    fut: impl Future<Output = Result<T, UpstreamError>>,
) -> impl Future<Output = Result<T, UpstreamError>> {
    use futures_util::FutureExt;
    timeout_at(deadline, fut).map(move |r| r.unwrap_or(Err(UpstreamError::Timeout { addr })))
}

/// Errors of the upstream layer. Per-query errors mean "answer SERVFAIL".
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The configuration did not validate; every problem is listed.
    #[error("invalid upstream configuration: {}", .0.join("; "))]
    InvalidConfig(Vec<String>),
    /// The CA file could not be used.
    #[error("upstream.ca_file {}: {reason}", path.display())]
    CaFile {
        /// The configured file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// tls:// needs trust roots and the system has none.
    #[error("no system trust roots for tls:// upstreams ({reason}); set upstream.ca_file")]
    NoSystemRoots {
        /// Why loading failed.
        reason: String,
    },
    /// The TLS client configuration could not be built.
    #[error("TLS client configuration: {0}")]
    TlsConfig(String),
    /// The client's query is not a forwardable DNS query.
    #[error("malformed query: {0}")]
    MalformedQuery(String),
    /// `max_in_flight` queries are already waiting on upstreams.
    #[error("too many queries in flight (max {max})")]
    Overloaded {
        /// The configured limit.
        max: usize,
    },
    /// No answer from this upstream in time.
    #[error("upstream {addr} did not answer in time")]
    Timeout {
        /// The upstream.
        addr: SocketAddr,
    },
    /// The query's overall deadline passed before any upstream could be tried.
    #[error("no upstream could be tried within {}", humantime::format_duration(*timeout))]
    DeadlineExceeded {
        /// The configured overall timeout.
        timeout: Duration,
    },
    /// The upstream could not be reached (connection refused, unreachable).
    #[error("cannot connect to upstream {addr}: {source}")]
    Connect {
        /// The upstream.
        addr: SocketAddr,
        /// The socket error.
        source: Arc<std::io::Error>,
    },
    /// The TLS handshake failed: certificate, name or pin verification, or protocol.
    #[error("TLS handshake with upstream {addr} (name {name}) failed: {source}")]
    TlsHandshake {
        /// The upstream.
        addr: SocketAddr,
        /// The name the certificate was checked against.
        name: String,
        /// The TLS error.
        source: Arc<std::io::Error>,
    },
    /// A pooled connection died with the query in flight.
    #[error("connection to upstream {addr} lost: {reason}")]
    ConnectionLost {
        /// The upstream.
        addr: SocketAddr,
        /// Why it closed.
        reason: String,
    },
    /// A socket operation failed.
    #[error("I/O with upstream {addr}: {source}")]
    Io {
        /// The upstream.
        addr: SocketAddr,
        /// The socket error.
        source: Arc<std::io::Error>,
    },
    /// The upstream's response does not answer the query or is not DNS.
    #[error("bad response from upstream {addr}: {reason}")]
    BadResponse {
        /// The upstream.
        addr: SocketAddr,
        /// What is wrong with it.
        reason: String,
    },
}

/// A forwarded query's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The response in wire format, with the client query's ID and without EDNS padding.
    pub response: Vec<u8>,
    /// Index of the upstream that answered in `UpstreamConfig::servers`.
    pub upstream: usize,
    /// That upstream as a normalized URL (as in [`UpstreamHealth::url`]).
    pub url: Arc<str>,
    /// The transport that carried the answer (`Tcp` for a truncated UDP answer retried).
    pub protocol: Protocol,
    /// Latency of the successful attempt: the upstream's RTT, including any connection setup.
    pub latency: Duration,
    /// Time from the call to the answer, including failed attempts.
    pub elapsed: Duration,
    /// Upstream attempts made, the successful one included.
    pub attempts: u32,
}

/// The configured upstream resolvers. Cheap to clone; clones share connections and health.
#[derive(Debug, Clone)]
pub struct Upstreams {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    upstreams: Vec<Upstream>,
    strategy: Strategy,
    timeout: Duration,
    attempt_timeout: Duration,
    padding: bool,
    health_check: bool,
    max_in_flight: usize,
    limit: Semaphore,
    round_robin: AtomicUsize,
}

#[derive(Debug)]
struct Upstream {
    addr: SocketAddr,
    url: Arc<str>,
    health: Arc<Health>,
    transport: Transport,
}

#[derive(Debug)]
enum Transport {
    /// UDP, with a TCP pool for truncated answers.
    Udp { udp: udp::UdpPool, tcp: Arc<Pool> },
    /// A pooled stream: TCP or TLS.
    Stream { pool: Arc<Pool>, tls: bool },
}

// === impl Upstreams ===

impl Upstreams {
    /// Builds the upstreams from a configuration. Validates it, reads the CA file or the
    /// system roots if a tls:// server is configured, and opens no connection: they are
    /// opened on first use.
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, UpstreamError> {
        let errors = cfg.validate();
        if !errors.is_empty() {
            return Err(UpstreamError::InvalidConfig(errors));
        }
        let urls = cfg.parsed_servers();
        let tls_connector = if urls.iter().any(|u| u.protocol == Protocol::Tls) {
            Some(TlsConnector::from(tls::client_config(cfg)?))
        } else {
            None
        };
        let policy = Policy {
            max_failures: cfg.max_failures,
            backoff_initial: cfg.backoff_initial,
            backoff_max: cfg.backoff_max,
        };
        let upstreams = urls
            .into_iter()
            .map(|url| {
                let pool = |connector| {
                    Arc::new(Pool::new(
                        url.addr,
                        connector,
                        cfg.tls_connections,
                        cfg.idle_timeout,
                        cfg.attempt_timeout,
                    ))
                };
                let health = Arc::new(Health::new(policy));
                let transport = match (&url.protocol, &tls_connector) {
                    (Protocol::Udp, _) => Transport::Udp {
                        udp: udp::UdpPool::new(url.addr, health.clone()),
                        tcp: pool(Connector::Tcp),
                    },
                    (Protocol::Tcp, _) => Transport::Stream {
                        pool: pool(Connector::Tcp),
                        tls: false,
                    },
                    (Protocol::Tls, Some(connector)) => Transport::Stream {
                        pool: pool(Connector::Tls {
                            connector: connector.clone(),
                            name: url.server_name(),
                        }),
                        tls: true,
                    },
                    (Protocol::Tls, None) => {
                        return Err(UpstreamError::TlsConfig("no TLS connector".into()));
                    }
                };
                Ok(Upstream {
                    addr: url.addr,
                    url: Arc::from(url.to_string()),
                    health,
                    transport,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                upstreams,
                strategy: cfg.strategy,
                timeout: cfg.timeout,
                attempt_timeout: cfg.attempt_timeout,
                padding: cfg.padding,
                health_check: cfg.health_check,
                max_in_flight: cfg.max_in_flight,
                limit: Semaphore::new(cfg.max_in_flight),
                round_robin: AtomicUsize::new(0),
            }),
        })
    }

    /// Sends `query` (a DNS query in wire format, any ID, exactly one question) upstream and
    /// returns the response with the SAME ID as `query`, without EDNS padding, plus which
    /// upstream answered and how fast. Any response that answers the question is returned
    /// as is, whatever its RCODE. Fails at once with [`UpstreamError::Overloaded`] when
    /// `max_in_flight` queries are pending; otherwise with the last attempt's error.
    ///
    /// Responses from tcp:// and tls:// upstreams may exceed a UDP client's buffer size:
    /// truncating them for the client is the caller's job.
    pub async fn query(&self, query: &[u8]) -> Result<Answer, UpstreamError> {
        let started = Instant::now();
        let inner = &self.inner;
        let Ok(_permit) = inner.limit.try_acquire() else {
            return Err(UpstreamError::Overloaded {
                max: inner.max_in_flight,
            });
        };
        let prepared = Prepared::parse(query)?;
        let deadline = started + inner.timeout;
        let order = self.order(started);
        let mut last_error = None;
        let mut attempts = 0;
        // The clock is read once before each attempt (the first reuses `started`) and once
        // after it: a read costs as much as some whole steps of a cache miss.
        let mut now = started;
        for (pos, &idx) in order.iter().enumerate() {
            let Some(up) = inner.upstreams.get(idx) else {
                continue;
            };
            if attempts > 0 {
                now = Instant::now();
            }
            if now >= deadline {
                break;
            }
            let attempt_deadline = if pos + 1 == order.len() {
                deadline
            } else {
                (now + inner.attempt_timeout).min(deadline)
            };
            attempts += 1;
            match up
                .attempt(&prepared, now, attempt_deadline, inner.padding)
                .await
            {
                Ok((response, protocol, done)) => {
                    return Ok(Answer {
                        response,
                        upstream: idx,
                        url: up.url.clone(),
                        protocol,
                        latency: done.saturating_duration_since(now),
                        elapsed: done.saturating_duration_since(started),
                        attempts,
                    });
                }
                Err(e) => {
                    tracing::debug!(upstream = %up.url, error = %e, "upstream attempt failed");
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or(UpstreamError::DeadlineExceeded {
            timeout: inner.timeout,
        }))
    }

    /// Health and counters of every upstream, in configuration order.
    pub fn health(&self) -> Vec<UpstreamHealth> {
        self.inner
            .upstreams
            .iter()
            .map(|up| {
                let pool = match &up.transport {
                    Transport::Udp { tcp, .. } => tcp,
                    Transport::Stream { pool, .. } => pool,
                };
                let open = u32::try_from(pool.open_connections()).unwrap_or(u32::MAX);
                let mut h = up.health.snapshot(up.url.to_string(), open);
                h.tls_handshakes_full = pool.handshakes.full.load(Ordering::Relaxed);
                h.tls_handshakes_resumed = pool.handshakes.resumed.load(Ordering::Relaxed);
                h
            })
            .collect()
    }

    /// The configured strategy.
    pub fn strategy(&self) -> Strategy {
        self.inner.strategy
    }

    /// Queries currently waiting on upstreams (bounded by `max_in_flight`).
    pub fn in_flight(&self) -> usize {
        self.inner
            .max_in_flight
            .saturating_sub(self.inner.limit.available_permits())
    }

    /// Closes all pooled connections (shutdown or reload). Queries still in flight on them
    /// are retried on new connections; the upstreams stay usable and reconnect lazily.
    pub async fn shutdown(&self) {
        for up in &self.inner.upstreams {
            match &up.transport {
                Transport::Udp { udp, tcp } => {
                    udp.close_all();
                    tcp.close_all();
                }
                Transport::Stream { pool, .. } => pool.close_all(),
            }
        }
        // Let the writers send their close_notify / FIN.
        tokio::task::yield_now().await;
    }

    /// The order in which upstreams are tried for one query: by strategy, healthy first,
    /// then those due for a retry, then those still backing off (better than no answer).
    fn order(&self, now: Instant) -> Vec<usize> {
        let inner = &self.inner;
        let n = inner.upstreams.len();
        // The strategy's order; the one vector that is returned.
        let base: Vec<usize> = match inner.strategy {
            Strategy::Failover => (0..n).collect(),
            Strategy::RoundRobin => {
                let start = inner.round_robin.fetch_add(1, Ordering::Relaxed) % n.max(1);
                (0..n).map(|i| (start + i) % n).collect()
            }
            Strategy::Fastest => {
                let mut v: Vec<(u64, usize)> = inner
                    .upstreams
                    .iter()
                    .enumerate()
                    .map(|(i, up)| (up.health.srtt_us(), i))
                    .collect();
                // An upstream without a sample sorts first, so every one gets measured.
                v.sort_unstable();
                let mut v: Vec<usize> = v.into_iter().map(|(_, i)| i).collect();
                if n > 1 && rand::random_ratio(1, EXPLORE_ONE_IN) {
                    v.swap(0, rand::random_range(1..n));
                }
                v
            }
        };
        // Up first, then those waiting for a probe, then the down ones, each group in the
        // strategy's order. Every upstream's state is read once (reading it may start a probe),
        // and the ranks sit on the stack for the usual few upstreams: this runs per miss.
        let mut small = [0u8; 8];
        let mut large = Vec::new();
        let ranks: &mut [u8] = if n <= small.len() {
            &mut small
        } else {
            large.resize(n, 0);
            &mut large
        };
        for &i in &base {
            let (Some(up), Some(rank)) = (inner.upstreams.get(i), ranks.get_mut(i)) else {
                continue;
            };
            *rank = match up.health.state(now) {
                State::Up => 0,
                State::Retry if inner.health_check => {
                    self.spawn_probe(i);
                    1
                }
                // Without health checks a client query is the probe.
                State::Retry => 0,
                State::Down => 2,
            };
        }
        let mut order = base;
        // Stable, with keys fixed above: the strategy's order holds within each group.
        order.sort_by_key(|&i| ranks.get(i).copied().unwrap_or(u8::MAX));
        order
    }

    /// Probes a down upstream whose back-off ended with `. IN NS`, at most one at a time.
    fn spawn_probe(&self, idx: usize) {
        let Some(up) = self.inner.upstreams.get(idx) else {
            return;
        };
        if !up.health.start_probe() {
            return;
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let Some(up) = inner.upstreams.get(idx) else {
                return;
            };
            match probe_query() {
                Ok(prepared) => {
                    let start = Instant::now();
                    let deadline = start + inner.attempt_timeout;
                    match up.attempt(&prepared, start, deadline, inner.padding).await {
                        Ok(_) => tracing::info!(upstream = %up.url, "health check succeeded"),
                        Err(e) => {
                            tracing::debug!(upstream = %up.url, error = %e, "health check failed")
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot build the health check query"),
            }
            up.health.end_probe();
        });
    }
}

/// `. IN NS`, recursion desired.
fn probe_query() -> Result<Prepared, UpstreamError> {
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::root(), RecordType::NS));
    let wire = msg
        .to_vec()
        .map_err(|e| UpstreamError::MalformedQuery(e.to_string()))?;
    Prepared::parse(&wire)
}

// === impl Upstream ===

impl Upstream {
    /// One attempt on this upstream, begun at `start`, recorded in its health. An answer
    /// comes with when it came.
    async fn attempt(
        &self,
        prepared: &Prepared,
        start: Instant,
        deadline: Instant,
        padding: bool,
    ) -> Result<(Vec<u8>, Protocol, Instant), UpstreamError> {
        self.health.on_attempt();
        let result = self.exchange(prepared, deadline, padding).await;
        let done = Instant::now();
        match result {
            Ok((answer, protocol)) => {
                self.health
                    .on_success(done.saturating_duration_since(start));
                Ok((answer, protocol, done))
            }
            Err(e) => {
                let timed_out =
                    matches!(e, UpstreamError::Timeout { .. }).then(|| deadline - start);
                self.health.on_failure(&e.to_string(), timed_out, done);
                Err(e)
            }
        }
    }

    async fn exchange(
        &self,
        prepared: &Prepared,
        deadline: Instant,
        padding: bool,
    ) -> Result<(Vec<u8>, Protocol), UpstreamError> {
        let bad = |reason| UpstreamError::BadResponse {
            addr: self.addr,
            reason,
        };
        // Bounds a stream exchange from outside too, in case a connect or a lock wait
        // overstays its deadline.
        let backstop = |fut| by_deadline(deadline + DEADLINE_SLACK, self.addr, fut);
        match &self.transport {
            Transport::Udp { udp, tcp } => match udp.exchange(prepared, deadline).await? {
                UdpReply::Answer(answer) => Ok((answer, Protocol::Udp)),
                UdpReply::Truncated => {
                    tracing::debug!(upstream = %self.url, "truncated over UDP, retrying over TCP");
                    let resp = backstop(tcp.exchange(prepared.wire(), deadline)).await?;
                    let answer = prepared.accept(&resp, false).map_err(bad)?;
                    Ok((answer, Protocol::Tcp))
                }
            },
            Transport::Stream { pool, tls } => {
                let padded = *tls && padding;
                let wire = if padded {
                    prepared.padded_wire()?
                } else {
                    prepared.wire()
                };
                let resp = backstop(pool.exchange(wire, deadline)).await?;
                let answer = prepared.accept(&resp, padded).map_err(bad)?;
                let protocol = if *tls { Protocol::Tls } else { Protocol::Tcp };
                Ok((answer, protocol))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::sync::atomic::Ordering;

    use super::testutil::{assert_answers, closed_tcp_port, config, query, udp_server, wait_for};
    use super::*;

    #[tokio::test]
    async fn down_upstreams_go_last_in_the_strategys_order() {
        // Nothing listens: `order` only reads the upstreams' health.
        // `n` upstreams, of which one failure puts `down` down for a minute.
        let now = Instant::now();
        let with_down = |n: u16, strategy: Strategy, down: &[usize]| {
            let urls = (0..n)
                .map(|i| format!("udp://127.0.0.1:{}", 9 + i))
                .collect();
            let ups = Upstreams::new(&UpstreamConfig {
                strategy,
                max_failures: 1,
                backoff_initial: Duration::from_secs(60),
                ..config(urls)
            })
            .unwrap();
            for &i in down {
                ups.inner.upstreams[i].health.on_failure("test", None, now);
            }
            ups
        };
        let ups = with_down(10, Strategy::Failover, &[0, 2]);
        assert_eq!(ups.order(now), vec![1, 3, 4, 5, 6, 7, 8, 9, 0, 2]);
        // More upstreams than the ranks kept on the stack: the same order.
        let ups = with_down(12, Strategy::Failover, &[0, 5, 11]);
        assert_eq!(ups.order(now), vec![1, 2, 3, 4, 6, 7, 8, 9, 10, 0, 5, 11]);
        // Round robin: rotated, the down one still last.
        let ups = with_down(3, Strategy::RoundRobin, &[1]);
        let orders: Vec<Vec<usize>> = (0..3).map(|_| ups.order(now)).collect();
        assert_eq!(orders, vec![vec![0, 2, 1], vec![2, 0, 1], vec![2, 0, 1]]);
    }

    #[tokio::test]
    async fn failover_skips_a_dead_upstream_and_marks_it_down() {
        let good = udp_server().await;
        let dead = closed_tcp_port();
        let cfg = UpstreamConfig {
            backoff_initial: Duration::from_secs(30),
            ..config(vec![format!("tcp://{dead}"), good.udp_url()])
        };
        let ups = Upstreams::new(&cfg).unwrap();
        assert_eq!(ups.strategy(), Strategy::Failover);
        for i in 0..3 {
            let a = ups.query(&query("a.test.", i)).await.unwrap();
            assert_answers(&a.response, "a.test.", i);
            assert_eq!((a.upstream, a.attempts), (1, 2), "tried the dead one first");
        }
        let h = ups.health();
        assert!(!h[0].healthy, "{h:?}");
        assert_eq!(h[0].consecutive_failures, 3);
        assert!(h[0].last_error.contains("cannot connect"), "{h:?}");
        assert!(h[1].healthy);
        // Marked down: the next queries go straight to the second upstream.
        for i in 0..5 {
            let a = ups.query(&query("b.test.", i)).await.unwrap();
            assert_eq!((a.upstream, a.attempts), (1, 1));
        }
        assert_eq!(ups.health()[0].queries, 3);
        assert_eq!(good.queries(), 8);
    }

    #[tokio::test]
    async fn down_upstream_is_probed_after_backoff_and_recovers() {
        let first = udp_server().await;
        let second = udp_server().await;
        first.behavior.silent.store(true, Ordering::SeqCst);
        let cfg = UpstreamConfig {
            attempt_timeout: Duration::from_millis(150),
            backoff_initial: Duration::from_millis(100),
            max_failures: 2,
            ..config(vec![first.udp_url(), second.udp_url()])
        };
        let ups = Upstreams::new(&cfg).unwrap();
        for _ in 0..2 {
            let a = ups.query(&query("a.test.", 1)).await.unwrap();
            assert_eq!(a.upstream, 1);
        }
        assert!(!ups.health()[0].healthy);
        let probed_before = ups.health()[0].queries;
        first.behavior.silent.store(false, Ordering::SeqCst);
        // While it backs off and is probed, clients are served by the second upstream.
        let give_up = Instant::now() + Duration::from_secs(5);
        while !ups.health()[0].healthy {
            assert!(
                Instant::now() < give_up,
                "never recovered: {:#?}",
                ups.health()
            );
            let a = ups.query(&query("c.test.", 1)).await.unwrap();
            assert_eq!(a.upstream, 1);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ups.health()[0].queries > probed_before, "probed");
        let a = ups.query(&query("back.test.", 1)).await.unwrap();
        assert_eq!(
            (a.upstream, a.attempts),
            (0, 1),
            "first upstream is used again"
        );
    }

    #[tokio::test]
    async fn without_health_checks_a_client_query_is_the_probe() {
        let first = udp_server().await;
        let second = udp_server().await;
        first.behavior.silent.store(true, Ordering::SeqCst);
        let cfg = UpstreamConfig {
            attempt_timeout: Duration::from_millis(150),
            backoff_initial: Duration::from_millis(50),
            max_failures: 1,
            health_check: false,
            ..config(vec![first.udp_url(), second.udp_url()])
        };
        let ups = Upstreams::new(&cfg).unwrap();
        assert_eq!(ups.query(&query("a.test.", 1)).await.unwrap().upstream, 1);
        assert!(!ups.health()[0].healthy);
        first.behavior.silent.store(false, Ordering::SeqCst);
        wait_for(&ups, "back-off to end", |u| {
            u.inner.upstreams[0].health.state(Instant::now()) == State::Retry
        })
        .await;
        let a = ups.query(&query("b.test.", 1)).await.unwrap();
        assert_eq!((a.upstream, a.attempts), (0, 1));
        assert!(ups.health()[0].healthy);
    }

    #[tokio::test]
    async fn round_robin_spreads_queries_evenly() {
        let servers = [udp_server().await, udp_server().await, udp_server().await];
        let cfg = UpstreamConfig {
            strategy: Strategy::RoundRobin,
            ..config(servers.iter().map(|s| s.udp_url()).collect())
        };
        let ups = Upstreams::new(&cfg).unwrap();
        let mut used = [0; 3];
        for i in 0..30 {
            let a = ups.query(&query("rr.test.", i)).await.unwrap();
            used[a.upstream] += 1;
        }
        assert_eq!(used, [10, 10, 10]);
        for s in &servers {
            assert_eq!(s.queries(), 10);
        }
    }

    #[tokio::test]
    async fn fastest_prefers_the_lower_srtt() {
        let slow = udp_server().await;
        let fast = udp_server().await;
        slow.behavior.delay_ms.store(40, Ordering::SeqCst);
        let cfg = UpstreamConfig {
            strategy: Strategy::Fastest,
            ..config(vec![slow.udp_url(), fast.udp_url()])
        };
        let ups = Upstreams::new(&cfg).unwrap();
        let mut used = [0; 2];
        for i in 0..60 {
            used[ups.query(&query("f.test.", i)).await.unwrap().upstream] += 1;
        }
        let h = ups.health();
        assert!(h[0].srtt_us > h[1].srtt_us, "{h:?}");
        assert!(used[1] >= 50, "{used:?}");
        assert!(used[0] >= 1, "the slow one was measured: {used:?}");
    }

    #[tokio::test]
    async fn max_in_flight_rejects_the_excess_at_once() {
        let server = udp_server().await;
        server.behavior.delay_ms.store(300, Ordering::SeqCst);
        let cfg = UpstreamConfig {
            max_in_flight: 2,
            ..config(vec![server.udp_url()])
        };
        let ups = Upstreams::new(&cfg).unwrap();
        let running: Vec<_> = (0..2)
            .map(|i| {
                let ups = ups.clone();
                tokio::spawn(async move { ups.query(&query("slow.test.", i)).await })
            })
            .collect();
        while ups.in_flight() < 2 {
            tokio::task::yield_now().await;
        }
        let started = Instant::now();
        let err = ups.query(&query("third.test.", 3)).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Overloaded { max: 2 }), "{err}");
        assert!(started.elapsed() < Duration::from_millis(100));
        for r in running {
            r.await.unwrap().unwrap();
        }
        assert_eq!(ups.in_flight(), 0);
        ups.query(&query("fourth.test.", 4)).await.unwrap();
    }

    #[tokio::test]
    async fn the_overall_timeout_bounds_every_attempt() {
        let a = udp_server().await;
        let b = udp_server().await;
        let cfg = UpstreamConfig {
            timeout: Duration::from_millis(400),
            attempt_timeout: Duration::from_millis(150),
            ..config(vec![a.udp_url(), b.udp_url()])
        };
        let ups = Upstreams::new(&cfg).unwrap();
        let started = Instant::now();
        let err = ups.query(&query("silent.test.", 1)).await.unwrap_err();
        let took = started.elapsed();
        assert!(matches!(err, UpstreamError::Timeout { .. }), "{err}");
        assert!(
            took >= Duration::from_millis(390) && took < Duration::from_millis(700),
            "{took:?}"
        );
        let h = ups.health();
        assert_eq!((h[0].errors, h[1].errors), (1, 1));
        assert!(h[0].srtt_us >= 140_000, "a timeout raises the srtt: {h:?}");
    }

    #[tokio::test]
    async fn malformed_queries_are_rejected_before_any_upstream() {
        let server = udp_server().await;
        let ups = Upstreams::new(&config(vec![server.udp_url()])).unwrap();
        for bad in [&b""[..], b"\x00\x01", &[0xFF; 40]] {
            let err = ups.query(bad).await.unwrap_err();
            assert!(matches!(err, UpstreamError::MalformedQuery(_)), "{err}");
        }
        assert_eq!(server.queries(), 0);
        assert_eq!(ups.health()[0].queries, 0);
    }

    #[test]
    fn new_rejects_an_invalid_config_with_every_error() {
        let cfg = UpstreamConfig {
            servers: vec!["dns://1.1.1.1".into(), "udp://example.com".into()],
            ..UpstreamConfig::default()
        };
        match Upstreams::new(&cfg) {
            Err(UpstreamError::InvalidConfig(errors)) => assert_eq!(errors.len(), 2),
            other => panic!("{other:?}"),
        }
    }
}
