//! The query pipeline: ACL and rate limit, parsing, domain policy, cache, upstream, chain extraction, authorize-before-answer, encoding.
//!
//! Every path that releases an A/AAAA answer naming a grantable address goes through fwd's
//! Authorize first (or through a cache entry whose committed grant outlives the TTL told to
//! the client, and which no revocation has touched since: see [`crate::revocations`]). The
//! answer is encoded only after fwd's reply; when fwd fails, the client gets SERVFAIL (fail
//! closed) unless `on_fwd_error = "answer"`, or, for a cache hit, unless fwd is down for sure
//! and the grant it committed before still covers the answer.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::answer::{self, Cacheability};
use crate::authorize::{self, AuthorizeError, Authorizer, Verdict as GrantVerdict};
use crate::cache::{self, Cache, Key};
use crate::config::{Config, DomainAction, OnFwdError};
use crate::forward::Forward;
use crate::metrics::{InFlight, Metrics};
use crate::policy::{Acl, DomainPolicy, RateLimiter, Verdict};
use crate::upstream::HEADER_LEN;
use crate::wire;

/// The EDNS payload size dnsd advertises upstream (DNS flag day 2020).
const UPSTREAM_PAYLOAD: u16 = 1232;
/// The smallest possible resource record (root name, type, class, TTL, rdlength).
const MIN_RR_LEN: usize = 11;
/// The smallest possible question (root name, type, class).
const MIN_QUESTION_LEN: usize = 5;

/// How a query arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP: answers are limited to the client's payload size and truncated beyond it.
    Udp,
    /// TCP (RFC 7766).
    Tcp,
    /// DNS over TLS (RFC 7858).
    Tls,
}

/// The parts of the configuration that SIGHUP may replace, swapped atomically as a whole.
#[derive(Debug)]
pub struct Live {
    /// Upstream resolvers.
    pub upstreams: Arc<dyn Forward>,
    /// Client allow list.
    pub acl: Acl,
    /// Per-client rate limits (the table restarts empty on reload).
    pub rate: RateLimiter,
    /// Domain allow/deny list.
    pub domains: DomainPolicy,
}

impl Live {
    /// Builds the reloadable state from a validated config and its upstreams.
    pub fn new(cfg: &Config, upstreams: Arc<dyn Forward>) -> Self {
        Live {
            upstreams,
            acl: Acl::new(&cfg.acl),
            rate: RateLimiter::new(
                cfg.acl.rate_limit_qps,
                cfg.acl.rate_limit_burst,
                cfg.acl.rate_limit_clients,
            ),
            domains: DomainPolicy::new(&cfg.domains),
        }
    }
}

/// Settings fixed for the life of the process.
#[derive(Debug, Clone)]
struct Settings {
    log_queries: bool,
    udp_payload: u16,
    min_ttl: u32,
    max_ttl: u32,
    negative_max_ttl: u32,
    never_authorize: answer::Never,
    refresh_margin: Duration,
    per_client: bool,
    max_batch: usize,
    on_fwd_error: OnFwdError,
    /// Off only in the test that compares the wire lane with the `Message` path.
    #[cfg(test)]
    wire_lane: bool,
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// A query admitted under the in-flight limit.
#[derive(Debug)]
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    _in_flight: InFlight,
}

/// A successfully parsed client query.
#[derive(Debug, Clone)]
struct ClientQuery {
    id: u16,
    query: Query,
    rd: bool,
    cd: bool,
    /// The client's EDNS payload size, if it sent EDNS.
    edns_payload: Option<u16>,
    dnssec_ok: bool,
    /// The length of the question after the header, when it is a single uncompressed one
    /// (what a cached answer in wire form can echo).
    question_len: Option<usize>,
}

impl ClientQuery {
    /// The client's question as it is on the wire (`wire` is this query's bytes), when it is
    /// a single uncompressed one.
    fn question<'w>(&self, wire: &'w [u8]) -> Option<&'w [u8]> {
        wire.get(HEADER_LEN..HEADER_LEN + self.question_len?)
    }
}

/// How far [`Handler::begin`] got.
#[derive(Debug)]
pub enum Early {
    /// Done: send this (or nothing).
    Answered(Option<Vec<u8>>),
    /// The rest needs [`Handler::finish`].
    Later(Box<Later>),
}

/// A query that passed the ACL, rate limit and parsing, for [`Handler::finish`].
#[derive(Debug)]
pub struct Later {
    q: ClientQuery,
    client: IpAddr,
    live: Arc<Live>,
    /// When the query arrived, if its log line will say how long it took.
    started: Option<StdInstant>,
    /// The cache key and what the cache held for it; `None` when the domain policy refused
    /// the name (nothing was looked up).
    looked_up: Option<(Key, Option<cache::Hit>)>,
}

/// How to cache an upstream's answer (all of [`cache::Insert`] but the message).
#[derive(Debug)]
struct Store {
    key: Key,
    ttl: u32,
    negative: bool,
    needs_grant: bool,
    grant: Option<(Option<IpAddr>, u64)>,
    epoch: u64,
}

/// The cache key of a query.
fn cache_key(q: &ClientQuery) -> Key {
    Key::new(
        q.query.name().to_lowercase(),
        q.query.query_type(),
        q.query.query_class(),
        q.dnssec_ok,
    )
}

/// What [`Handler::resolve`] produced.
#[derive(Debug)]
enum Resolved {
    /// A response still to be finalized for the client.
    Message(Message),
    /// An upstream's answer still to be finalized for the client, then cached as `Store`
    /// says (cached after encoding, so that it is not cloned). Boxed, so that every
    /// `Resolved` moved up through the miss path's futures is half the size.
    Fresh(Message, Option<Box<Store>>),
    /// The client's answer, ready to send, and its response code (a cache hit served from
    /// its wire form).
    Wire(Vec<u8>, ResponseCode),
}

/// What to do with bytes that are not a usable query.
#[derive(Debug, PartialEq, Eq)]
enum Reject {
    /// No parseable header, or a response: say nothing.
    Drop,
    /// Answer with this code and no question (the header was parseable).
    Reply(ResponseCode),
}

/// The query handler shared by every listener.
#[derive(Debug)]
pub struct Handler {
    live: watch::Receiver<Arc<Live>>,
    cache: Cache,
    authorizer: Authorizer,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    settings: Settings,
}

impl Handler {
    /// Builds a handler; `live` carries the reloadable state.
    pub fn new(cfg: &Config, live: watch::Receiver<Arc<Live>>, metrics: Arc<Metrics>) -> Self {
        Handler {
            live,
            cache: Cache::new(cfg.cache.size),
            authorizer: Authorizer::with_options(
                &cfg.authorize.socket,
                cfg.authorize.timeout,
                cfg.authorize.max_batch,
                metrics.clone(),
            )
            .with_alias_records(cfg.authorize.alias_records_per_grant),
            metrics,
            slots: Arc::new(Semaphore::new(cfg.listen.max_in_flight)),
            settings: Settings {
                log_queries: cfg.log_queries,
                udp_payload: cfg.listen.udp_payload,
                min_ttl: secs(cfg.cache.min_ttl),
                max_ttl: secs(cfg.cache.max_ttl),
                negative_max_ttl: secs(cfg.cache.negative_max_ttl),
                never_authorize: answer::Never::new(&cfg.authorize.never_authorize),
                refresh_margin: cfg.authorize.refresh_margin,
                per_client: cfg.authorize.per_client,
                max_batch: cfg.authorize.max_batch,
                on_fwd_error: cfg.authorize.on_fwd_error,
                #[cfg(test)]
                wire_lane: true,
            },
        }
    }

    /// The answer cache (for the control service).
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The Authorize client of fwd (for the revocation watch, which clears its memory).
    pub fn authorizer(&self) -> &Authorizer {
        &self.authorizer
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The current reloadable state.
    pub fn live(&self) -> Arc<Live> {
        self.live.borrow().clone()
    }

    /// Takes an in-flight slot, or `None` when `listen.max_in_flight` queries are already
    /// being processed. Listeners call this before spawning work for a query.
    pub fn admit(&self) -> Option<Admission> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(Admission {
            _permit: permit,
            _in_flight: self.metrics.start_query(),
        })
    }

    /// Answers one query. `None` means send nothing.
    pub async fn handle(
        &self,
        admission: Admission,
        wire: &[u8],
        peer: SocketAddr,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        match self.begin(wire, peer, transport) {
            Early::Answered(out) => out,
            Early::Later(later) => self.finish(admission, later, wire, transport).await,
        }
    }

    /// Takes a query as far as it goes without waiting: ACL, rate limit and parsing, and a
    /// cache hit that needs no authorization and is served from its wire form. Everything
    /// else is left to [`Handler::finish`]. Listeners call this before admitting and spawning
    /// work for the query, so that the commonest answer costs neither.
    pub fn begin(&self, wire: &[u8], peer: SocketAddr, transport: Transport) -> Early {
        let client = peer.ip().to_canonical();
        let live = self.live();
        match live.acl.check(client) {
            Verdict::Allow => {}
            Verdict::Drop => {
                self.metrics.dropped("acl");
                return Early::Answered(None);
            }
            Verdict::Refuse => {
                return Early::Answered(self.header_only(wire, ResponseCode::Refused));
            }
        }
        if !live.rate.allow(client) {
            self.metrics.dropped("rate_limit");
            // Over UDP silence is the only safe answer (no reflection); a stream client
            // gets REFUSED so that it does not wait for its timeout.
            return Early::Answered(match transport {
                Transport::Udp => None,
                _ => self.header_only(wire, ResponseCode::Refused),
            });
        }
        let q = match parse_query(wire) {
            Ok(q) => q,
            Err(Reject::Drop) => {
                self.metrics.dropped("malformed");
                return Early::Answered(None);
            }
            Err(Reject::Reply(rcode)) => return Early::Answered(self.header_only(wire, rcode)),
        };
        // Read the clock only for a log line that reports the time taken (a hit reads it once
        // more, for the TTLs).
        let started = (self.settings.log_queries || tracing::enabled!(tracing::Level::DEBUG))
            .then(StdInstant::now);
        let mut looked_up = None;
        if live.domains.permits(q.query.name()) {
            let key = cache_key(&q);
            let scope = self.settings.per_client.then_some(client);
            let hit = self.cache.get(&key, scope);
            if let Some(hit) = &hit
                && let Some(Resolved::Wire(bytes, rcode)) =
                    self.serve_hit_wire(&q, wire, hit, transport)
            {
                self.metrics.cache_hit();
                self.metrics.answered(Some(q.query.query_type()), rcode);
                self.log_query(&q, client, rcode, "cache", started);
                return Early::Answered(Some(bytes));
            }
            looked_up = Some((key, hit));
        }
        Early::Later(Box::new(Later {
            q,
            client,
            live,
            started,
            looked_up,
        }))
    }

    /// Answers a query [`Handler::begin`] could not (`wire` is the same query's bytes).
    pub async fn finish(
        &self,
        _admission: Admission,
        later: Box<Later>,
        wire: &[u8],
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let Later {
            q,
            client,
            live,
            started,
            looked_up,
        } = *later;
        let (resolved, source) = self
            .resolve(&q, wire, client, &live, transport, looked_up)
            .await;
        let out = match resolved {
            Resolved::Message(mut msg) => self.finalize(&mut msg, &q, transport),
            Resolved::Fresh(mut msg, store) => {
                let out = self.finalize(&mut msg, &q, transport);
                if let Some(store) = store {
                    // The answer as finalized for this client: a later hit resets the
                    // header, question and EDNS anyway, and the key fixes the DO bit.
                    self.cache.insert(
                        store.key,
                        cache::Insert {
                            msg,
                            ttl: store.ttl,
                            negative: store.negative,
                            needs_grant: store.needs_grant,
                            grant: store.grant,
                            epoch: store.epoch,
                        },
                    );
                }
                out
            }
            Resolved::Wire(bytes, rcode) => {
                self.metrics.answered(Some(q.query.query_type()), rcode);
                (bytes, rcode)
            }
        };
        self.log_query(&q, client, out.1, source, started);
        Some(out.0)
    }

    fn log_query(
        &self,
        q: &ClientQuery,
        client: IpAddr,
        rcode: ResponseCode,
        source: &'static str,
        started: Option<StdInstant>,
    ) {
        let elapsed_us = started.map(|t| t.elapsed().as_micros() as u64);
        if self.settings.log_queries {
            tracing::info!(
                client = %client,
                qname = %q.query.name(),
                qtype = %q.query.query_type(),
                rcode = %rcode,
                source,
                elapsed_us,
                "query"
            );
        } else {
            tracing::debug!(
                qtype = %q.query.query_type(),
                rcode = %rcode,
                source,
                elapsed_us,
                "query"
            );
        }
    }

    /// A header-only answer built from the raw query's header, or nothing when the header is
    /// not there or is a response.
    fn header_only(&self, wire: &[u8], rcode: ResponseCode) -> Option<Vec<u8>> {
        let out = raw_error(wire, rcode);
        match out {
            Some(_) => self.metrics.answered(None, rcode),
            None => self.metrics.dropped("malformed"),
        }
        out
    }

    /// Resolves a parsed query to a response (ID and flags are set by `finalize`).
    /// `looked_up` is the cache lookup `begin` made (its wire-form hit could not be served),
    /// `None` when the domain policy refused the name.
    async fn resolve(
        &self,
        q: &ClientQuery,
        wire: &[u8],
        client: IpAddr,
        live: &Live,
        transport: Transport,
        looked_up: Option<(Key, Option<cache::Hit>)>,
    ) -> (Resolved, &'static str) {
        // `begin` looks the name up unless the domain policy refuses it.
        let Some((key, hit)) = looked_up else {
            let rcode = match live.domains.action() {
                DomainAction::Nxdomain => ResponseCode::NXDomain,
                DomainAction::Refused => ResponseCode::Refused,
            };
            return (Resolved::Message(error_msg(rcode)), "policy");
        };
        let scope = self.settings.per_client.then_some(client);
        if let Some(hit) = hit {
            self.metrics.cache_hit();
            // Boxed for the same reason as the Authorize call: most hits never get here.
            let msg = Box::pin(self.serve_hit(q, client, &key, scope, hit)).await;
            return (Resolved::Message(msg), "cache");
        }
        self.metrics.cache_miss();
        let resolved = self
            .resolve_upstream(q, wire, client, key, live, transport)
            .await;
        (resolved, "upstream")
    }

    /// Serves a cache hit straight from its wire form when it needs no authorization first
    /// and fits the client's limit; `None` means "take the long way".
    fn serve_hit_wire(
        &self,
        q: &ClientQuery,
        wire: &[u8],
        hit: &cache::Hit,
        transport: Transport,
    ) -> Option<Resolved> {
        let stored = hit.wire.as_ref()?;
        if hit.needs_grant
            && cache::needs_authorization(
                hit.grant_until_ms,
                authorize::now_unix_ms(),
                hit.remaining,
                self.settings.refresh_margin,
            )
        {
            return None;
        }
        let question = q.question(wire)?;
        let asked = cache::Asked {
            id: q.id,
            rd: q.rd,
            cd: q.cd,
            question,
            edns: q
                .edns_payload
                .map(|_| (self.settings.udp_payload, q.dnssec_ok)),
        };
        let bytes = stored.render(&asked, hit.elapsed, self.answer_limit(q, transport))?;
        Some(Resolved::Wire(bytes, hit.response_code()))
    }

    /// The largest answer the client takes: its EDNS payload size (at most ours) over UDP,
    /// 512 octets without EDNS, the whole message over streams.
    fn answer_limit(&self, q: &ClientQuery, transport: Transport) -> usize {
        match transport {
            Transport::Udp => match q.edns_payload {
                Some(p) => usize::from(p.clamp(512, self.settings.udp_payload)),
                None => 512,
            },
            Transport::Tcp | Transport::Tls => usize::from(u16::MAX),
        }
    }

    /// Serves a cache hit, re-authorizing first when the committed grant would not outlive
    /// the TTL the client is about to be told.
    async fn serve_hit(
        &self,
        q: &ClientQuery,
        client: IpAddr,
        key: &Key,
        scope: Option<IpAddr>,
        hit: cache::Hit,
    ) -> Message {
        let Some(mut msg) = hit.msg() else {
            // Cannot happen for an entry we stored, but never serve what we cannot read.
            self.cache.remove(key);
            return error_msg(ResponseCode::ServFail);
        };
        let now_ms = authorize::now_unix_ms();
        if !hit.needs_grant
            || !cache::needs_authorization(
                hit.grant_until_ms,
                now_ms,
                hit.remaining,
                self.settings.refresh_margin,
            )
        {
            return msg;
        }
        let qtype = q.query.query_type();
        let Ok(chain) = answer::follow_chain(&msg, q.query.name(), qtype) else {
            // Cannot happen for an entry we stored, but never serve what we cannot check.
            self.cache.remove(key);
            return error_msg(ResponseCode::ServFail);
        };
        let grants = self.grants_for(&chain, hit.remaining);
        if grants.is_empty() {
            return msg;
        }
        match self.authorize(&grants, q, client, "cache-refresh").await {
            Ok(result) => {
                answer::remove_addresses(&mut msg, &result.rejected);
                if !result.rejected.is_empty() {
                    // The cached answer names addresses fwd now refuses: refetch next time.
                    self.cache.remove(key);
                }
                if let Some(until) = result.until_ms {
                    self.cache
                        .record_grant(key, hit.inserted, hit.epoch, scope, until);
                    answer::cap_ttls(&mut msg, self.grant_cap(until));
                }
                msg
            }
            Err(e) => {
                if matches!(e, AuthorizeError::Unavailable { .. })
                    && !self.cache.is_trusted()
                    && !cache::needs_authorization(
                        hit.unconfirmed_grant_until_ms,
                        authorize::now_unix_ms(),
                        hit.remaining,
                        self.settings.refresh_margin,
                    )
                    && self.authorizer.fwd_is_down().await
                {
                    // fwd cannot be reached and its revocation stream is gone: it is down, so
                    // nobody can have revoked since the stream broke, and the kernel element it
                    // committed outlives this TTL on its own timeout.
                    tracing::warn!(error = %e, "fwd unreachable; serving a cached answer under the grant fwd committed before it went away");
                    return msg;
                }
                self.fwd_failed(&e);
                match self.settings.on_fwd_error {
                    OnFwdError::Servfail => error_msg(ResponseCode::ServFail),
                    OnFwdError::Answer => msg,
                }
            }
        }
    }

    /// The grantable addresses of a chain, at most `max_batch`, each with `ttl`.
    fn grants_for(&self, chain: &answer::Chain, ttl: u32) -> Vec<(IpAddr, u32)> {
        chain
            .addrs
            .iter()
            .filter(|a| answer::grantable(a.ip, &self.settings.never_authorize))
            .map(|a| (a.ip, ttl))
            .collect()
    }

    /// Seconds of TTL that a grant ending at `until_ms` covers, keeping the refresh margin.
    fn grant_cap(&self, until_ms: u64) -> u32 {
        let margin = u64::try_from(self.settings.refresh_margin.as_millis()).unwrap_or(u64::MAX);
        let left = until_ms
            .saturating_sub(authorize::now_unix_ms())
            .saturating_sub(margin);
        u32::try_from(left / 1000).unwrap_or(u32::MAX)
    }

    /// Logs a failed Authorize call, saying what the client gets.
    fn fwd_failed(&self, e: &AuthorizeError) {
        match self.settings.on_fwd_error {
            OnFwdError::Servfail => {
                tracing::warn!(error = %e, "authorize failed; answering SERVFAIL");
            }
            OnFwdError::Answer => {
                tracing::warn!(error = %e, "authorize failed; releasing the answer anyway (on_fwd_error = answer)");
            }
        }
    }

    /// Authorizes from memory, or else calls fwd, and sorts the verdicts; `Err` means the
    /// call failed as a whole (counted, not yet logged: see [`Handler::fwd_failed`]).
    async fn authorize(
        &self,
        grants: &[(IpAddr, u32)],
        q: &ClientQuery,
        client: IpAddr,
        reason: &'static str,
    ) -> Result<AuthorizeResult, AuthorizeError> {
        let req = authorize::Request {
            grants,
            qname: q.query.name(),
            client,
            reason,
        };
        // Memory first: most answers name addresses fwd already committed, and releasing
        // them needs neither the call's state nor the clock for the latency histogram, which
        // counts calls to fwd only.
        let verdicts = match self.authorizer.from_memory(&req) {
            Some(verdicts) => verdicts,
            None => {
                let started = StdInstant::now();
                // Boxed: the call's state is large, and every query's task would otherwise
                // carry it (and copy it on spawn) whether or not it calls fwd.
                let res = Box::pin(self.authorizer.call(req)).await;
                self.metrics.authorize(
                    started.elapsed(),
                    res.as_ref().err().map(AuthorizeError::kind),
                );
                res?
            }
        };
        let mut rejected = HashSet::new();
        let mut until_ms: Option<u64> = None;
        for ((ip, _), v) in grants.iter().zip(verdicts) {
            match v {
                GrantVerdict::Granted { expires_unix_ms } => {
                    until_ms = Some(until_ms.map_or(expires_unix_ms, |u| u.min(expires_unix_ms)));
                }
                GrantVerdict::Rejected { error } => {
                    if self.settings.log_queries {
                        let qname = authorize::audit_name(q.query.name());
                        tracing::info!(ip = %ip, qname, %error, "fwd rejected address; removed from answer");
                    } else {
                        tracing::debug!(%error, "fwd rejected an address; removed from answer");
                    }
                    rejected.insert(*ip);
                }
            }
        }
        Ok(AuthorizeResult { rejected, until_ms })
    }

    /// Cache miss: ask upstream, check the answer, authorize its addresses, cache it.
    async fn resolve_upstream(
        &self,
        q: &ClientQuery,
        wire: &[u8],
        client: IpAddr,
        key: Key,
        live: &Live,
        transport: Transport,
    ) -> Resolved {
        let qtype = q.query.query_type();
        let Some(upstream_query) = upstream_query(q, wire) else {
            return Resolved::Message(error_msg(ResponseCode::ServFail));
        };
        // No timer here: `forward` ends by its own deadline (see [`Forward::forward`]).
        let fwd = match live.upstreams.forward(&upstream_query.1).await {
            Ok(f) => f,
            Err(e) => {
                self.metrics
                    .upstream_error(e.upstream.as_deref().unwrap_or("none"), e.kind);
                tracing::debug!(error = %e, "upstream failed; answering SERVFAIL");
                return Resolved::Message(error_msg(ResponseCode::ServFail));
            }
        };
        self.metrics.upstream_latency(&fwd.upstream, fwd.latency);
        if let Some(lane) = self.wire_lane(q, wire, &fwd.wire, upstream_query.0, transport) {
            return self
                .resolve_on_wire(q, wire, client, key, &fwd.wire, lane, transport)
                .await;
        }
        let Some(mut msg) = parse_upstream(&fwd.wire, upstream_query.0, &q.query) else {
            self.metrics.upstream_error(&fwd.upstream, "malformed");
            tracing::warn!(upstream = %fwd.upstream, "unusable upstream answer; answering SERVFAIL");
            return Resolved::Message(error_msg(ResponseCode::ServFail));
        };
        let rcode = msg.metadata.response_code;
        if !matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain) {
            // Pass the error on, without whatever records came with it.
            return Resolved::Message(error_msg(rcode));
        }
        let chain = match answer::follow_chain(&msg, q.query.name(), qtype) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "broken CNAME chain; answering SERVFAIL");
                return Resolved::Message(error_msg(ResponseCode::ServFail));
            }
        };
        let address_query = answer::is_address_query(qtype);
        if address_query {
            answer::strip_off_chain(&mut msg, &chain);
            if rcode == ResponseCode::NXDomain {
                // Addresses in a "does not exist" answer are contradictory; never serve them
                // unauthorized.
                let all: HashSet<IpAddr> = chain.addrs.iter().map(|a| a.ip).collect();
                answer::remove_addresses(&mut msg, &all);
            }
        }
        let s = &self.settings;
        let (mut ttl, negative) = match answer::cacheability(&msg, &chain) {
            Cacheability::Positive(t) => (self.clamp_ttl(t), false),
            Cacheability::Negative(t) => (t.min(s.negative_max_ttl), true),
            Cacheability::No => (0, false),
        };
        if negative {
            answer::cap_ttls(&mut msg, ttl);
        } else {
            answer::clamp_ttls(&mut msg, s.min_ttl, s.max_ttl);
        }
        let mut needs_grant = false;
        let mut until_ms = None;
        // Read before asking fwd: a revocation that overtakes fwd's reply moves it on.
        let epoch = self.cache.epoch();
        if address_query && rcode == ResponseCode::NoError && !chain.addrs.is_empty() {
            // The grant TTL is the minimum along the chain (clamped like the records), and
            // no record may be served for longer than the grant.
            let chain_ttl = self.chain_ttl(&chain);
            answer::cap_ttls(&mut msg, chain_ttl);
            ttl = ttl.min(chain_ttl);
            let mut grants = self.grants_for(&chain, chain_ttl);
            if grants.len() > s.max_batch {
                let extra: HashSet<IpAddr> = grants[s.max_batch..].iter().map(|g| g.0).collect();
                answer::remove_addresses(&mut msg, &extra);
                grants.truncate(s.max_batch);
            }
            if !grants.is_empty() {
                needs_grant = true;
                match self.authorize(&grants, q, client, "answer").await {
                    Ok(result) => {
                        until_ms = self.apply_verdicts(&mut msg, &result, &mut ttl);
                        if result.rejected.len() == grants.len() {
                            needs_grant = false;
                        }
                    }
                    Err(e) => {
                        self.fwd_failed(&e);
                        if s.on_fwd_error == OnFwdError::Servfail {
                            return Resolved::Message(error_msg(ResponseCode::ServFail));
                        }
                    }
                }
            }
        }
        let scope = self.settings.per_client.then_some(client);
        let store = (ttl > 0).then(|| {
            Box::new(Store {
                key,
                ttl,
                negative,
                needs_grant,
                grant: until_ms.map(|u| (scope, u)),
                epoch,
            })
        });
        Resolved::Fresh(msg, store)
    }

    /// A TTL clamped into the cache's `[min_ttl, max_ttl]`, as records are.
    fn clamp_ttl(&self, ttl: u32) -> u32 {
        let s = &self.settings;
        ttl.clamp(s.min_ttl, s.max_ttl.max(s.min_ttl))
    }

    /// The TTL of a chain's grants: the minimum along it, clamped like the records.
    fn chain_ttl(&self, chain: &answer::Chain) -> u32 {
        self.clamp_ttl(chain.min_ttl.unwrap_or(0))
    }

    /// For a wire-lane answer: its grants' TTL, and its cache lifetime before any grant cap
    /// (as the `Message` path computes them).
    fn lane_ttls(&self, lane: &wire::Scanned) -> (u32, u32) {
        let chain_ttl = self.chain_ttl(&lane.chain);
        (
            chain_ttl,
            self.clamp_ttl(lane.answer_min_ttl).min(chain_ttl),
        )
    }

    /// Applies fwd's verdicts to an answer: rejected addresses leave it, and its TTLs (and
    /// `ttl`, the cache lifetime) are capped to what the grant covers. Returns the grant's
    /// end (Unix ms), `None` when every address was rejected.
    fn apply_verdicts(
        &self,
        msg: &mut Message,
        result: &AuthorizeResult,
        ttl: &mut u32,
    ) -> Option<u64> {
        answer::remove_addresses(msg, &result.rejected);
        let until = result.until_ms?;
        let cap = self.grant_cap(until);
        answer::cap_ttls(msg, cap);
        *ttl = (*ttl).min(cap);
        Some(until)
    }

    /// Whether an upstream answer can take the wire lane ([`crate::wire`]): the client asked
    /// an A/AAAA question in plain form, the answer has the lane's shape and fits the
    /// client's limit with dnsd's OPT, and its addresses fit in one Authorize call.
    fn wire_lane(
        &self,
        q: &ClientQuery,
        wire: &[u8],
        resp: &[u8],
        id: u16,
        transport: Transport,
    ) -> Option<wire::Scanned> {
        #[cfg(test)]
        if !self.settings.wire_lane {
            return None;
        }
        let question = q.question(wire)?;
        if crate::upstream::id_of(resp)? != id {
            return None;
        }
        let lane = wire::scan(resp, question, q.query.name(), q.query.query_type())?;
        let opt_len = if q.edns_payload.is_some() {
            cache::OPT_LEN
        } else {
            0
        };
        let grantable = lane
            .chain
            .addrs
            .iter()
            .filter(|a| answer::grantable(a.ip, &self.settings.never_authorize))
            .count();
        (lane.stored_len() + opt_len <= self.answer_limit(q, transport)
            && grantable <= self.settings.max_batch)
            .then_some(lane)
    }

    /// The rest of a cache miss for an answer on the wire lane: the same decisions as the
    /// `Message` path (TTL clamps and caps, Authorize, caching), made on the bytes.
    #[allow(clippy::too_many_arguments)]
    async fn resolve_on_wire(
        &self,
        q: &ClientQuery,
        wire: &[u8],
        client: IpAddr,
        key: Key,
        resp: &[u8],
        lane: wire::Scanned,
        transport: Transport,
    ) -> Resolved {
        let s = &self.settings;
        let (chain_ttl, mut ttl) = self.lane_ttls(&lane);
        let mut cap = chain_ttl;
        let mut needs_grant = false;
        let mut until_ms = None;
        let epoch = self.cache.epoch();
        let grants = self.grants_for(&lane.chain, chain_ttl);
        if !grants.is_empty() {
            needs_grant = true;
            match self.authorize(&grants, q, client, "answer").await {
                Ok(result) if result.rejected.is_empty() => {
                    if let Some(until) = result.until_ms {
                        let grant_cap = self.grant_cap(until);
                        cap = cap.min(grant_cap);
                        ttl = ttl.min(grant_cap);
                        until_ms = Some(until);
                    }
                }
                Ok(result) => {
                    // Addresses must leave the answer: that edit takes the `Message` path.
                    return self.rejected_on_wire(client, key, resp, &lane, &result, epoch);
                }
                Err(e) => {
                    self.fwd_failed(&e);
                    if s.on_fwd_error == OnFwdError::Servfail {
                        return Resolved::Message(error_msg(ResponseCode::ServFail));
                    }
                }
            }
        }
        let addrs: Vec<IpAddr> = lane.chain.addrs.iter().map(|a| a.ip).collect();
        let question = q.question(wire);
        let answer = lane.into_answer(resp, s.min_ttl, s.max_ttl, cap);
        let (Some(answer), Some(question)) = (answer, question) else {
            // `wire_lane` checked all of this.
            tracing::warn!("an answer on the wire lane could not be shaped; answering SERVFAIL");
            return Resolved::Message(error_msg(ResponseCode::ServFail));
        };
        let asked = cache::Asked {
            id: q.id,
            rd: q.rd,
            cd: q.cd,
            question,
            edns: q.edns_payload.map(|_| (s.udp_payload, q.dnssec_ok)),
        };
        let Some(bytes) = answer.render(&asked, 0, self.answer_limit(q, transport)) else {
            tracing::warn!("an answer on the wire lane could not be rendered; answering SERVFAIL");
            return Resolved::Message(error_msg(ResponseCode::ServFail));
        };
        let scope = s.per_client.then_some(client);
        self.cache.insert_wire(
            key,
            cache::InsertWire {
                answer,
                addrs,
                ttl,
                needs_grant,
                grant: until_ms.map(|u| (scope, u)),
                epoch,
            },
        );
        Resolved::Wire(bytes, ResponseCode::NoError)
    }

    /// A wire-lane answer some of whose addresses fwd rejected: decoded, and shaped as the
    /// `Message` path shapes it with the same verdicts (fwd is not asked again).
    fn rejected_on_wire(
        &self,
        client: IpAddr,
        key: Key,
        resp: &[u8],
        lane: &wire::Scanned,
        result: &AuthorizeResult,
        epoch: u64,
    ) -> Resolved {
        let s = &self.settings;
        let Ok(mut msg) = Message::from_vec(resp) else {
            return Resolved::Message(error_msg(ResponseCode::ServFail));
        };
        answer::strip_off_chain(&mut msg, &lane.chain);
        answer::clamp_ttls(&mut msg, s.min_ttl, s.max_ttl);
        let (chain_ttl, mut ttl) = self.lane_ttls(lane);
        answer::cap_ttls(&mut msg, chain_ttl);
        let until_ms = self.apply_verdicts(&mut msg, result, &mut ttl);
        let scope = s.per_client.then_some(client);
        let store = (ttl > 0).then(|| {
            Box::new(Store {
                key,
                ttl,
                negative: false,
                needs_grant: until_ms.is_some(),
                grant: until_ms.map(|u| (scope, u)),
                epoch,
            })
        });
        Resolved::Fresh(msg, store)
    }

    /// Sets the header, question and EDNS for the client and encodes, truncating over UDP.
    /// Returns the bytes and the rcode sent.
    fn finalize(
        &self,
        msg: &mut Message,
        q: &ClientQuery,
        transport: Transport,
    ) -> (Vec<u8>, ResponseCode) {
        let rcode = msg.metadata.response_code;
        msg.metadata.id = q.id;
        msg.metadata.message_type = MessageType::Response;
        msg.metadata.op_code = OpCode::Query;
        msg.metadata.authoritative = false;
        msg.metadata.truncation = false;
        msg.metadata.recursion_desired = q.rd;
        msg.metadata.recursion_available = true;
        msg.metadata.checking_disabled = q.cd;
        msg.metadata.authentic_data &= q.dnssec_ok;
        msg.queries = vec![q.query.clone()];
        msg.signature = None;
        msg.edns = q.edns_payload.map(|_| {
            let mut e = Edns::new();
            e.set_max_payload(self.settings.udp_payload);
            e.set_dnssec_ok(q.dnssec_ok);
            e
        });
        let limit = self.answer_limit(q, transport);
        let bytes = match msg.to_vec() {
            Ok(b) if b.len() <= limit => b,
            Ok(_) => {
                let mut t = msg.truncate();
                t.metadata.truncation = true;
                t.to_vec()
                    .unwrap_or_else(|_| header_bytes(q.id, q.rd, ResponseCode::ServFail))
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not encode an answer; answering SERVFAIL");
                self.metrics
                    .answered(Some(q.query.query_type()), ResponseCode::ServFail);
                return (
                    header_bytes(q.id, q.rd, ResponseCode::ServFail),
                    ResponseCode::ServFail,
                );
            }
        };
        self.metrics.answered(Some(q.query.query_type()), rcode);
        (bytes, rcode)
    }
}

/// The outcome of a successful Authorize call.
#[derive(Debug)]
struct AuthorizeResult {
    rejected: HashSet<IpAddr>,
    /// The earliest expiry over the granted addresses (`None` when all were rejected).
    until_ms: Option<u64>,
}

/// A header-only SERVFAIL for a raw query (used when a stream query cannot be admitted).
pub fn servfail_for(wire: &[u8]) -> Option<Vec<u8>> {
    raw_error(wire, ResponseCode::ServFail)
}

/// An empty response carrying only `rcode`.
fn error_msg(rcode: ResponseCode) -> Message {
    Message::error_msg(0, OpCode::Query, rcode)
}

/// A 12-byte response header.
fn header_bytes(id: u16, rd: bool, rcode: ResponseCode) -> Vec<u8> {
    let code = u16::from(rcode) & 0x000f;
    let flags: u16 = 0x8000 | if rd { 0x0100 } else { 0 } | 0x0080 | code;
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    out
}

/// A header-only error answer echoing the raw query's ID, opcode and RD; `None` when there is
/// no complete header or the message is itself a response.
fn raw_error(wire: &[u8], rcode: ResponseCode) -> Option<Vec<u8>> {
    if wire.len() < HEADER_LEN || wire[2] & 0x80 != 0 {
        return None;
    }
    let id = u16::from_be_bytes([wire[0], wire[1]]);
    let mut out = header_bytes(id, wire[2] & 0x01 != 0, rcode);
    // Echo the opcode.
    out[2] |= wire[2] & 0x78;
    Some(out)
}

/// Parses and checks a client query.
fn parse_query(wire: &[u8]) -> Result<ClientQuery, Reject> {
    if wire.len() < HEADER_LEN {
        return Err(Reject::Drop);
    }
    if wire[2] & 0x80 != 0 {
        // A response sent to us: never answer it (reflection loops).
        return Err(Reject::Drop);
    }
    let opcode = (wire[2] >> 3) & 0x0f;
    if opcode != 0 {
        return Err(Reject::Reply(ResponseCode::NotImp));
    }
    let count = |i: usize| usize::from(u16::from_be_bytes([wire[i], wire[i + 1]]));
    let (qd, an, ns, ar) = (count(4), count(6), count(8), count(10));
    if qd != 1 {
        return Err(Reject::Reply(ResponseCode::FormErr));
    }
    // Lying counts: refuse before the parser sizes buffers from them.
    if HEADER_LEN + MIN_QUESTION_LEN + (an + ns + ar) * MIN_RR_LEN > wire.len() {
        return Err(Reject::Reply(ResponseCode::FormErr));
    }
    let parsed = match (an, ns, ar) {
        (0, 0, 0 | 1) => plain_query(wire, ar == 1),
        _ => None,
    };
    let p = match parsed {
        Some(p) => p,
        None => full_query(wire)?,
    };
    match p.query.query_type() {
        RecordType::OPT => return Err(Reject::Reply(ResponseCode::FormErr)),
        RecordType::AXFR | RecordType::IXFR => return Err(Reject::Reply(ResponseCode::Refused)),
        _ => {}
    }
    if p.query.query_class() != DNSClass::IN {
        return Err(Reject::Reply(ResponseCode::Refused));
    }
    Ok(ClientQuery {
        id: p.id,
        query: p.query,
        rd: p.rd,
        cd: p.cd,
        edns_payload: p.edns.map(|(payload, _)| payload.max(512)),
        dnssec_ok: p.edns.is_some_and(|(_, dnssec_ok)| dnssec_ok),
        question_len: crate::upstream::plain_question_len(wire),
    })
}

/// What [`parse_query`] reads of a query before checking it.
#[derive(Debug, PartialEq)]
struct Parsed {
    id: u16,
    query: Query,
    rd: bool,
    cd: bool,
    /// The EDNS payload size as sent, and the DO bit.
    edns: Option<(u16, bool)>,
}

/// The whole message through hickory's decoder.
fn full_query(wire: &[u8]) -> Result<Parsed, Reject> {
    let msg = Message::from_vec(wire).map_err(|_| Reject::Reply(ResponseCode::FormErr))?;
    let Some(query) = msg.queries.first().cloned() else {
        return Err(Reject::Reply(ResponseCode::FormErr));
    };
    Ok(Parsed {
        id: msg.metadata.id,
        query,
        rd: msg.metadata.recursion_desired,
        cd: msg.metadata.checking_disabled,
        edns: msg
            .edns
            .as_ref()
            .map(|e| (e.max_payload(), e.flags().dnssec_ok)),
    })
}

/// The common query read without building a hickory `Message` (about 2 % of dnsd's CPU per
/// cache hit): the header's counts already checked to be one question and nothing else, or
/// one more record that must be an OPT without options. The question is read with hickory's
/// decoder; the OPT by hand. `None` for anything else (an OPT with options, another record,
/// bytes after the last one), which [`full_query`] then reads: both give the same result
/// wherever this one gives one (see the differential test).
fn plain_query(wire: &[u8], with_opt: bool) -> Option<Parsed> {
    let mut d = BinDecoder::new(wire);
    d.read_slice(HEADER_LEN).ok()?;
    let query = Query::read(&mut d).ok()?;
    let rest = wire.get(d.index()..)?;
    let edns = if with_opt {
        // Root owner, TYPE 41, CLASS = payload, TTL = extended RCODE, version, flags, and an
        // empty RDATA ending the message.
        let [0, 0, 41, p0, p1, _rc, _version, f0, _f1, 0, 0] = *rest else {
            return None;
        };
        Some((u16::from_be_bytes([p0, p1]), f0 & 0x80 != 0))
    } else {
        if !rest.is_empty() {
            return None;
        }
        None
    };
    Some(Parsed {
        id: u16::from_be_bytes([wire[0], wire[1]]),
        query,
        rd: wire[2] & 0x01 != 0,
        cd: wire[3] & 0x10 != 0,
        edns,
    })
}

/// The query dnsd sends upstream: a fresh message with its own ID, the client's question,
/// RD set, and only the EDNS that dnsd chooses (the client's options, such as client subnet,
/// are not forwarded).
fn upstream_query(q: &ClientQuery, wire: &[u8]) -> Option<(u16, Vec<u8>)> {
    let id: u16 = rand::random();
    if let Some(question) = q.question(wire) {
        // The same message written directly: header (RD, CD as asked, one question, one
        // additional), the client's question bytes, and an OPT record without options.
        let mut out = Vec::with_capacity(HEADER_LEN + question.len() + 11);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&[0x01, if q.cd { 0x10 } else { 0 }, 0, 1, 0, 0, 0, 0, 0, 1]);
        out.extend_from_slice(question);
        let [p0, p1] = UPSTREAM_PAYLOAD.to_be_bytes();
        let flags = if q.dnssec_ok { 0x80 } else { 0 };
        out.extend_from_slice(&[0, 0, 41, p0, p1, 0, 0, flags, 0, 0, 0]);
        return Some((id, out));
    }
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.checking_disabled = q.cd;
    m.add_query(q.query.clone());
    let mut e = Edns::new();
    e.set_max_payload(UPSTREAM_PAYLOAD);
    e.set_dnssec_ok(q.dnssec_ok);
    m.set_edns(e);
    m.to_vec().ok().map(|w| (id, w))
}

/// Parses an upstream answer and checks it belongs to our query; `None` means unusable.
fn parse_upstream(wire: &[u8], id: u16, question: &Query) -> Option<Message> {
    if wire.len() < HEADER_LEN {
        return None;
    }
    let count = |i: usize| usize::from(u16::from_be_bytes([wire[i], wire[i + 1]]));
    let total = count(4) * MIN_QUESTION_LEN + (count(6) + count(8) + count(10)) * MIN_RR_LEN;
    if HEADER_LEN + total > wire.len() {
        return None;
    }
    let msg = Message::from_vec(wire).ok()?;
    if msg.metadata.id != id || msg.metadata.message_type != MessageType::Response {
        return None;
    }
    match msg.queries.as_slice() {
        [q] if q.name() == question.name()
            && q.query_type() == question.query_type()
            && q.query_class() == question.query_class() => {}
        _ => return None,
    }
    Some(msg)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn query_bytes(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(
            hickory_proto::rr::Name::from_ascii(name).unwrap(),
            qtype,
        ));
        if let Some(p) = edns {
            let mut e = Edns::new();
            e.set_max_payload(p);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    /// Makes an upstream's answer from the query it got.
    type Answerer = Arc<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;

    /// An upstream that answers every query with `answer(query)`.
    struct Canned(Answerer);

    impl std::fmt::Debug for Canned {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Canned")
        }
    }

    impl Forward for Canned {
        fn forward<'a>(&'a self, query: &'a [u8]) -> crate::forward::ForwardFuture<'a> {
            let wire = (self.0)(query);
            Box::pin(async move {
                Ok(crate::forward::Forwarded {
                    wire,
                    upstream: Arc::from("canned"),
                    latency: Duration::ZERO,
                })
            })
        }
        fn health(&self) -> Vec<guard_proto::v1::UpstreamHealth> {
            Vec::new()
        }
        fn strategy(&self) -> String {
            "canned".to_owned()
        }
    }

    /// A handler (fwd never asked: every address is in never_authorize) whose upstream
    /// answers with `answer`; `wire_lane` false forces the `Message` path.
    fn canned_handler(answer: Answerer, wire_lane: bool) -> Handler {
        let mut h = handler_with(Arc::new(Canned(answer)));
        h.settings.wire_lane = wire_lane;
        h
    }

    /// A handler (fwd never asked: every address is in never_authorize) that forwards to
    /// `upstream`.
    pub(crate) fn handler_with(upstream: Arc<dyn Forward>) -> Handler {
        let cfg = crate::Config::parse(
            r#"
            [upstream]
            servers = ["udp://127.0.0.1:9"]
            [cache]
            min_ttl = "30s"
            max_ttl = "1h"
            [authorize]
            socket = "/nonexistent/fwd.sock"
            never_authorize = ["0.0.0.0/0", "::/0"]
            "#,
        )
        .unwrap();
        let live = Live::new(&cfg, upstream);
        let (_tx, rx) = watch::channel(Arc::new(live));
        Handler::new(&cfg, rx, Arc::new(Metrics::new()))
    }

    /// A random upstream answer to `query`: CNAME chains, addresses (duplicates, off-chain
    /// ones, wrong types), authority and additional records of several kinds, EDNS, flags,
    /// TTLs on both sides of the cache's clamps, with and without name compression.
    fn random_answer(query: &[u8], seed: u64) -> Vec<u8> {
        use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, SOA, TXT};
        use hickory_proto::rr::{Name, RData, Record};
        use hickory_proto::serialize::binary::{BinEncodable, BinEncoder, NameEncoding};
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};

        let mut r = StdRng::seed_from_u64(seed);
        let q = Message::from_vec(query).unwrap();
        let question = q.queries[0].clone();
        let qtype = question.query_type();
        let mut m = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
        m.metadata.authoritative = r.random_bool(0.5);
        m.metadata.authentic_data = r.random_bool(0.3);
        m.metadata.recursion_available = true;
        m.metadata.recursion_desired = q.metadata.recursion_desired;
        if r.random_bool(0.05) {
            m.metadata.response_code = ResponseCode::NXDomain;
        }
        m.add_query(question.clone());
        let ttl = |r: &mut StdRng| match r.random_range(0..4) {
            0 => r.random_range(0..30),
            1 => r.random_range(3000..100_000),
            _ => r.random_range(30..3600),
        };
        let n = |s: &str| Name::from_ascii(s).unwrap();
        let mut owner = question.name().clone();
        for i in 0..r.random_range(0..4) {
            let target = n(&format!("Hop{i}.CDN.test."));
            m.add_answer(Record::from_rdata(
                owner.clone(),
                ttl(&mut r),
                RData::CNAME(CNAME(target.clone())),
            ));
            owner = target;
        }
        let addr = |r: &mut StdRng, v6: bool| {
            if v6 {
                RData::AAAA(AAAA(std::net::Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    0,
                    0,
                    0,
                    0,
                    0,
                    r.random_range(1..4),
                )))
            } else {
                RData::A(A(std::net::Ipv4Addr::new(
                    198,
                    51,
                    100,
                    r.random_range(1..4),
                )))
            }
        };
        let v6 = qtype == RecordType::AAAA;
        for _ in 0..r.random_range(0..4) {
            m.add_answer(Record::from_rdata(
                owner.clone(),
                ttl(&mut r),
                addr(&mut r, v6),
            ));
        }
        match r.random_range(0..12) {
            0 => m.add_answer(Record::from_rdata(
                n("off.chain.test."),
                ttl(&mut r),
                addr(&mut r, v6),
            )),
            1 => m.add_answer(Record::from_rdata(
                owner.clone(),
                ttl(&mut r),
                addr(&mut r, !v6),
            )),
            2 => m.add_answer(Record::from_rdata(
                owner.clone(),
                ttl(&mut r),
                RData::TXT(TXT::new(vec!["t".into()])),
            )),
            3 => m.add_answer(Record::from_rdata(
                question.name().clone(),
                ttl(&mut r),
                RData::CNAME(CNAME(n("loop.test."))),
            )),
            _ => &mut m,
        };
        if r.random_bool(0.6) {
            m.add_authority(Record::from_rdata(
                n("cdn.test."),
                ttl(&mut r),
                RData::NS(NS(n("ns1.CDN.test."))),
            ));
            if r.random_bool(0.5) {
                m.add_additional(Record::from_rdata(
                    n("ns1.cdn.test."),
                    ttl(&mut r),
                    addr(&mut r, false),
                ));
            }
            if r.random_bool(0.3) {
                m.add_additional(Record::from_rdata(
                    n("ns1.cdn.test."),
                    ttl(&mut r),
                    addr(&mut r, true),
                ));
            }
        }
        if r.random_bool(0.2) {
            let soa = SOA::new(
                n("ns1.cdn.test."),
                n("hostmaster.cdn.test."),
                1,
                3600,
                600,
                86400,
                r.random_range(0..600),
            );
            m.add_authority(Record::from_rdata(
                n("cdn.test."),
                ttl(&mut r),
                RData::SOA(soa),
            ));
        }
        if r.random_bool(0.05) {
            m.add_additional(Record::from_rdata(
                n("x.test."),
                ttl(&mut r),
                RData::TXT(TXT::new(vec!["x".into()])),
            ));
        }
        if r.random_bool(0.7) {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            e.set_dnssec_ok(r.random_bool(0.5));
            m.set_edns(e);
        }
        let mut out = Vec::new();
        let mut enc = BinEncoder::new(&mut out);
        if r.random_bool(0.3) {
            enc.set_name_encoding(NameEncoding::Uncompressed);
        }
        m.emit(&mut enc).unwrap();
        out
    }

    /// The hand-read query ([`plain_query`]) agrees with hickory's full decode on every query
    /// it reads, across random well-formed queries and random damage to them; it reads most
    /// well-formed ones (so the comparison is not vacuous), and parse_query never panics.
    #[test]
    fn plain_query_reads_as_the_full_decoder_does() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};

        let mut r = StdRng::seed_from_u64(7);
        let (mut compared, mut plain, mut well_formed) = (0, 0, 0);
        for round in 0..20_000u32 {
            let labels = r.random_range(0..4);
            let mut name = String::new();
            for _ in 0..labels {
                let len = r.random_range(1..12);
                for _ in 0..len {
                    name.push(*b"abcXYZ09".get(r.random_range(0..8)).unwrap() as char);
                }
                name.push('.');
            }
            if name.is_empty() {
                name.push('.');
            }
            let qtype = [
                RecordType::A,
                RecordType::AAAA,
                RecordType::TXT,
                RecordType::OPT,
            ][r.random_range(0..4)];
            let edns = r.random_bool(0.6).then(|| r.random_range(0..5000u16));
            let mut wire = query_bytes(&name, qtype, edns);
            wire[2] = r.random::<u8>() & 0x79; // a query: QR clear, any RD/TC/AA, opcode 0
            wire[3] = r.random();
            if edns.is_some() && r.random_bool(0.5) {
                let n = wire.len();
                wire[n - 4] = r.random(); // DO and the other flags
                wire[n - 5] = r.random(); // EDNS version
            }
            let damaged = round % 2 == 1;
            if damaged {
                match r.random_range(0..4) {
                    0 => {
                        let i = r.random_range(0..wire.len());
                        wire[i] = r.random();
                    }
                    1 => wire.truncate(r.random_range(0..wire.len())),
                    2 => wire.push(r.random()),
                    _ => {
                        let i = r.random_range(HEADER_LEN..wire.len());
                        wire[i] ^= 0xc0;
                    }
                }
            } else {
                well_formed += 1;
            }
            let _ = parse_query(&wire);
            if wire.len() < HEADER_LEN {
                continue;
            }
            let count = |i: usize| u16::from_be_bytes([wire[i], wire[i + 1]]);
            let (qd, an, ns, ar) = (count(4), count(6), count(8), count(10));
            if qd != 1 || an != 0 || ns != 0 || ar > 1 {
                continue;
            }
            if let Some(p) = plain_query(&wire, ar == 1) {
                compared += 1;
                plain += usize::from(!damaged);
                let full = full_query(&wire)
                    .unwrap_or_else(|_| panic!("plain read what hickory refuses: {wire:02x?}"));
                let norm = |e: Option<(u16, bool)>| e.map(|(p, d)| (p.max(512), d));
                assert_eq!(
                    (&p.query, p.id, p.rd, p.cd, norm(p.edns)),
                    (&full.query, full.id, full.rd, full.cd, norm(full.edns)),
                    "{wire:02x?}"
                );
            }
        }
        assert!(
            plain * 10 > well_formed * 9,
            "{plain} of {well_formed} read by hand"
        );
        assert!(
            compared > plain,
            "damaged queries read by hand too: {compared}"
        );
    }

    /// The wire lane and the `Message` path give clients the same answers, on the miss and
    /// on the cache hit that follows, for random upstream answers of every shape; and the
    /// lane takes a good share of them (so the comparison is not vacuous).
    #[tokio::test]
    async fn wire_lane_answers_as_the_message_path_does() {
        let peer: SocketAddr = "127.0.0.1:5353".parse().unwrap();
        let mut on_lane = 0;
        let rounds = 600u64;
        for seed in 0..rounds {
            let answer: Answerer = Arc::new(move |q: &[u8]| random_answer(q, seed));
            let lane = canned_handler(answer.clone(), true);
            let plain = canned_handler(answer.clone(), false);
            let name = ["WwW.Example.TEST.", "a.b.example.test.", "x.test."][(seed % 3) as usize];
            let qtype = if seed % 4 == 0 {
                RecordType::AAAA
            } else {
                RecordType::A
            };
            let edns = match seed % 5 {
                0 => None,
                1 => Some(512),
                _ => Some(1232),
            };
            let query = query_bytes(name, qtype, edns);
            let upstream_view = answer(&query);
            let question_len = crate::upstream::plain_question_len(&query).unwrap();
            let q = Message::from_vec(&query).unwrap();
            if let Some(lane) = wire::scan(
                &upstream_view,
                &query[HEADER_LEN..HEADER_LEN + question_len],
                q.queries[0].name(),
                qtype,
            ) {
                on_lane += 1;
                // What gets authorized: the same chain, addresses and TTL.
                let decoded = Message::from_vec(&upstream_view).unwrap();
                let chain = answer::follow_chain(&decoded, q.queries[0].name(), qtype).unwrap();
                assert_eq!(lane.chain, chain, "seed {seed}");
            }
            for round in ["miss", "hit"] {
                let a = lane
                    .handle(lane.admit().unwrap(), &query, peer, Transport::Udp)
                    .await
                    .unwrap();
                let b = plain
                    .handle(plain.admit().unwrap(), &query, peer, Transport::Udp)
                    .await
                    .unwrap();
                // Debug, not ==: hickory's record equality ignores TTLs.
                let (a, b) = (
                    Message::from_vec(&a).unwrap(),
                    Message::from_vec(&b).unwrap(),
                );
                assert_eq!(
                    format!("{a:?}"),
                    format!("{b:?}"),
                    "seed {seed}, {round}: upstream sent {:?}",
                    Message::from_vec(&upstream_view)
                );
            }
        }
        assert!(
            on_lane > rounds / 5,
            "only {on_lane} of {rounds} answers took the wire lane"
        );
    }

    #[test]
    fn well_formed_query_parses() {
        let q = parse_query(&query_bytes("Example.COM.", RecordType::AAAA, Some(4096))).unwrap();
        assert_eq!(q.id, 0x1234);
        assert!(q.rd);
        assert_eq!(q.edns_payload, Some(4096));
        assert_eq!(q.query.query_type(), RecordType::AAAA);
        assert_eq!(q.query.name().to_ascii(), "Example.COM.");
    }

    #[test]
    fn malformed_queries() {
        // Too short for a header: dropped.
        assert_eq!(parse_query(&[0x12]).unwrap_err(), Reject::Drop);
        assert_eq!(parse_query(&[0; 11]).unwrap_err(), Reject::Drop);
        // Responses are never answered.
        let mut resp = query_bytes("example.com.", RecordType::A, None);
        resp[2] |= 0x80;
        assert_eq!(parse_query(&resp).unwrap_err(), Reject::Drop);
        assert_eq!(raw_error(&resp, ResponseCode::FormErr), None);
        // Header only, no question: FORMERR.
        let mut hdr = vec![0u8; 12];
        hdr[0] = 0xab;
        assert_eq!(
            parse_query(&hdr).unwrap_err(),
            Reject::Reply(ResponseCode::FormErr)
        );
        // Truncated question.
        let full = query_bytes("example.com.", RecordType::A, None);
        for cut in 12..full.len() {
            assert_eq!(
                parse_query(&full[..cut]).unwrap_err(),
                Reject::Reply(ResponseCode::FormErr),
                "cut at {cut}"
            );
        }
        // Lying counts.
        let mut lying = full.clone();
        lying[6] = 0xff;
        lying[7] = 0xff;
        assert_eq!(
            parse_query(&lying).unwrap_err(),
            Reject::Reply(ResponseCode::FormErr)
        );
        // Two questions.
        let mut two = full.clone();
        two[5] = 2;
        assert_eq!(
            parse_query(&two).unwrap_err(),
            Reject::Reply(ResponseCode::FormErr)
        );
        // Compression loop in the question name: a pointer to itself.
        let mut looped = full[..12].to_vec();
        looped.extend_from_slice(&[0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01]);
        assert_eq!(
            parse_query(&looped).unwrap_err(),
            Reject::Reply(ResponseCode::FormErr)
        );
        // Other opcodes: NOTIMP.
        let mut notify = full.clone();
        notify[2] = (4 << 3) | 0x01;
        assert_eq!(
            parse_query(&notify).unwrap_err(),
            Reject::Reply(ResponseCode::NotImp)
        );
        // Zone transfers and other classes: REFUSED.
        assert_eq!(
            parse_query(&query_bytes("example.com.", RecordType::AXFR, None)).unwrap_err(),
            Reject::Reply(ResponseCode::Refused)
        );
    }

    #[test]
    fn garbage_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for len in [0usize, 1, 11, 12, 13, 40, 512, 4096, 65_535] {
            for _ in 0..50 {
                let mut buf = vec![0u8; len];
                rng.fill(&mut buf[..]);
                let _ = parse_query(&buf);
                let _ = parse_upstream(&buf, 1, &Query::new());
                let _ = raw_error(&buf, ResponseCode::FormErr);
            }
        }
    }

    /// The parse -> extract -> re-encode path on mutated answers: whatever survives the
    /// parser must be followable, editable and encodable without panicking.
    #[test]
    fn mutated_answers_never_panic() {
        use hickory_proto::rr::rdata::{A, CNAME};
        use hickory_proto::rr::{Name, RData, Record};
        use rand::{Rng, SeedableRng};
        let q = parse_query(&query_bytes("www.example.com.", RecordType::A, Some(1232))).unwrap();
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.add_query(q.query.clone());
        let n = |s: &str| Name::from_ascii(s).unwrap();
        m.add_answer(Record::from_rdata(
            n("www.example.com."),
            60,
            RData::CNAME(CNAME(n("edge.cdn.test."))),
        ));
        for i in 1..4u8 {
            m.add_answer(Record::from_rdata(
                n("edge.cdn.test."),
                300,
                RData::A(A([192, 0, 2, i].into())),
            ));
        }
        let valid = m.to_vec().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        for _ in 0..5000 {
            let mut b = valid.clone();
            for _ in 0..rng.random_range(1..6) {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
            if rng.random_ratio(1, 4) {
                b.truncate(rng.random_range(0..b.len()));
            }
            let Some(mut msg) = parse_upstream(&b, 7, &q.query) else {
                continue;
            };
            if let Ok(chain) = answer::follow_chain(&msg, q.query.name(), RecordType::A) {
                answer::strip_off_chain(&mut msg, &chain);
                let _ = answer::cacheability(&msg, &chain);
                answer::clamp_ttls(&mut msg, 0, 86_400);
                answer::cap_ttls(&mut msg, chain.min_ttl.unwrap_or(0));
                let _ = msg.to_vec();
            }
        }
    }

    #[test]
    fn upstream_query_written_directly_matches_the_encoded_one() {
        for (name, edns, dnssec_ok, cd) in [
            ("Example.COM.", Some(4096), false, false),
            ("a.b.example.", None, false, true),
            ("x.example.", Some(1232), true, false),
        ] {
            let mut wire = query_bytes(name, RecordType::AAAA, edns);
            if dnssec_ok {
                let mut m = Message::from_vec(&wire).unwrap();
                if let Some(e) = m.edns.as_mut() {
                    e.set_dnssec_ok(true);
                }
                wire = m.to_vec().unwrap();
            }
            if cd {
                wire[3] |= 0x10;
            }
            let q = parse_query(&wire).unwrap();
            assert!(q.question_len.is_some());
            let (id, direct) = upstream_query(&q, &wire).unwrap();
            let (_, encoded) = upstream_query(&q, &[]).unwrap();
            let (d, e) = (
                Message::from_vec(&direct).unwrap(),
                Message::from_vec(&encoded).unwrap(),
            );
            assert_eq!(d.metadata.id, id);
            assert_eq!(d.queries, e.queries);
            assert_eq!(d.queries[0].name().to_ascii(), name, "the client's case");
            assert_eq!(d.metadata.recursion_desired, e.metadata.recursion_desired);
            assert_eq!(d.metadata.checking_disabled, cd);
            assert_eq!(d.metadata.message_type, MessageType::Query);
            assert_eq!(d.edns, e.edns);
            assert_eq!(
                d.edns.as_ref().map(|e| e.flags().dnssec_ok),
                Some(dnssec_ok)
            );
            assert_eq!(direct.len(), encoded.len());
        }
    }

    #[test]
    fn raw_error_echoes_id_opcode_rd() {
        let q = query_bytes("example.com.", RecordType::A, None);
        let e = raw_error(&q, ResponseCode::Refused).unwrap();
        assert_eq!(e.len(), 12);
        let m = Message::from_vec(&e).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert!(m.metadata.recursion_desired);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn upstream_answer_must_match_question_and_id() {
        let q = parse_query(&query_bytes("example.com.", RecordType::A, None)).unwrap();
        let (id, wire) = upstream_query(&q, &[]).unwrap();
        let mut resp = Message::from_vec(&wire).unwrap();
        resp.metadata.message_type = MessageType::Response;
        let ok = resp.to_vec().unwrap();
        assert!(parse_upstream(&ok, id, &q.query).is_some());
        assert!(parse_upstream(&ok, id.wrapping_add(1), &q.query).is_none());
        let mut other = resp.clone();
        other.queries[0].set_name(hickory_proto::rr::Name::from_ascii("evil.example.").unwrap());
        assert!(parse_upstream(&other.to_vec().unwrap(), id, &q.query).is_none());
        // Case differences (0x20) are fine.
        let mut upper = resp.clone();
        upper.queries[0].set_name(hickory_proto::rr::Name::from_ascii("EXAMPLE.com.").unwrap());
        assert!(parse_upstream(&upper.to_vec().unwrap(), id, &q.query).is_some());
        // The upstream query carries no client EDNS options.
        let up = Message::from_vec(&wire).unwrap();
        assert!(up.metadata.recursion_desired);
        assert_eq!(up.edns.as_ref().map(|e| e.max_payload()), Some(1232));
    }
}
