//! Counters and histograms (Prometheus text format over a tiny HTTP endpoint), plus the totals the `Stats` RPC reports.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Labels of `dnsd_queries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    qtype: &'static str,
    rcode: &'static str,
}

/// Labels of per-upstream series. Built only when an upstream's latency series is first
/// looked up (`Metrics::latency_series` finds it after that).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

/// Labels of per-upstream error series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamErrorLabels {
    upstream: String,
    kind: &'static str,
}

/// Labels of authorize failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~3.3 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// Most upstream latency series found by label address (see `latency_series`).
const LATENCY_SERIES_MAX: usize = 64;

/// Every metric dnsd exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    queries: Family<QueryLabels, Counter>,
    /// The `queries` series already created, by (qtype, rcode) label index: counting a query
    /// is then an atomic increment, instead of hashing its labels and taking the family's
    /// lock (about 1 % of dnsd's CPU per cache hit). A series still appears only once used.
    query_series: Box<[OnceLock<Counter>]>,
    cache_hits: Counter,
    cache_misses: Counter,
    upstream_latency: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    /// The `upstream_latency` series already created, by the address of the upstream's label
    /// (each upstream keeps one `Arc<str>` for its life): observing a miss's latency is then a
    /// pointer comparison per upstream, instead of hashing the label (about 1 % of dnsd's
    /// instructions per miss). At most [`LATENCY_SERIES_MAX`] entries: when full, entries of
    /// upstreams a reload dropped (only this list still holds their label) make room, and an
    /// upstream beyond the limit is observed through the family's hash as before.
    latency_series: parking_lot::RwLock<Vec<(Arc<str>, Histogram)>>,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    authorize_latency: Histogram,
    authorize_failures: Family<ReasonLabels, Counter>,
    in_flight: Gauge,
    dropped: Family<ReasonLabels, Counter>,
    revocations: Counter,
    revocation_watch_up: Gauge,
    authorize_batch_size: Histogram,
    memory_hits: Counter,
    alias_dropped: Counter,
    alias_unrecorded: Counter,
    totals: Totals,
}

/// Plain totals for the `Stats` RPC.
#[derive(Debug, Default)]
struct Totals {
    queries: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    servfail: AtomicU64,
    refused: AtomicU64,
    authorize_calls: AtomicU64,
    authorize_failures: AtomicU64,
    in_flight: AtomicU64,
}

/// A snapshot of the totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Queries answered.
    pub queries: u64,
    /// Answers served from cache.
    pub cache_hits: u64,
    /// Cache misses.
    pub cache_misses: u64,
    /// SERVFAIL answers.
    pub servfail: u64,
    /// REFUSED answers.
    pub refused: u64,
    /// Authorize calls made to fwd.
    pub authorize_calls: u64,
    /// Authorize calls that failed.
    pub authorize_failures: u64,
    /// Queries being processed now.
    pub in_flight: u64,
}

/// Bounded label values for query types: anything unusual is "other", so that a client
/// cannot grow the metric set by asking for 65536 types.
/// Label values of `qtype`, indexed by [`qtype_index`].
const QTYPE_LABELS: [&str; 17] = [
    "A", "AAAA", "CNAME", "MX", "NS", "PTR", "SOA", "SRV", "TXT", "HTTPS", "SVCB", "CAA", "DS",
    "DNSKEY", "ANY", "other", "none",
];

fn qtype_index(t: Option<RecordType>) -> usize {
    match t {
        Some(RecordType::A) => 0,
        Some(RecordType::AAAA) => 1,
        Some(RecordType::CNAME) => 2,
        Some(RecordType::MX) => 3,
        Some(RecordType::NS) => 4,
        Some(RecordType::PTR) => 5,
        Some(RecordType::SOA) => 6,
        Some(RecordType::SRV) => 7,
        Some(RecordType::TXT) => 8,
        Some(RecordType::HTTPS) => 9,
        Some(RecordType::SVCB) => 10,
        Some(RecordType::CAA) => 11,
        Some(RecordType::DS) => 12,
        Some(RecordType::DNSKEY) => 13,
        Some(RecordType::ANY) => 14,
        Some(_) => 15,
        None => 16,
    }
}

/// Label values of `rcode`, indexed by [`rcode_index`].
const RCODE_LABELS: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "other",
];

fn rcode_index(r: ResponseCode) -> usize {
    match r {
        ResponseCode::NoError => 0,
        ResponseCode::FormErr => 1,
        ResponseCode::ServFail => 2,
        ResponseCode::NXDomain => 3,
        ResponseCode::NotImp => 4,
        ResponseCode::Refused => 5,
        _ => 6,
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let queries = Family::<QueryLabels, Counter>::default();
        let cache_hits = Counter::default();
        let cache_misses = Counter::default();
        let upstream_latency =
            Family::<UpstreamLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        let authorize_latency = latency_histogram();
        let authorize_failures = Family::<ReasonLabels, Counter>::default();
        let in_flight = Gauge::default();
        let dropped = Family::<ReasonLabels, Counter>::default();
        let revocations = Counter::default();
        let revocation_watch_up = Gauge::default();
        // 1 .. 256 requests (fwd's default max_batch), one bucket per power of two.
        let authorize_batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 9));
        let memory_hits = Counter::default();
        let alias_dropped = Counter::default();
        let alias_unrecorded = Counter::default();
        registry.register(
            "dnsd_queries",
            "Queries answered, by query type and response code",
            queries.clone(),
        );
        registry.register(
            "dnsd_cache_hits",
            "Answers served from the cache",
            cache_hits.clone(),
        );
        registry.register(
            "dnsd_cache_misses",
            "Cache lookups that missed",
            cache_misses.clone(),
        );
        registry.register(
            "dnsd_upstream_latency_seconds",
            "Upstream answer latency",
            upstream_latency.clone(),
        );
        registry.register(
            "dnsd_upstream_errors",
            "Upstream failures by upstream and kind",
            upstream_errors.clone(),
        );
        registry.register(
            "dnsd_authorize_latency_seconds",
            "Latency of Authorize calls to fwd",
            authorize_latency.clone(),
        );
        registry.register(
            "dnsd_authorize_failures",
            "Authorize calls that failed, by reason",
            authorize_failures.clone(),
        );
        registry.register(
            "dnsd_in_flight",
            "Queries being processed",
            in_flight.clone(),
        );
        registry.register(
            "dnsd_dropped",
            "Queries dropped without an answer, by reason (send_buffer_full: the answer was built, and counted in dnsd_queries, but found no room in the socket buffer)",
            dropped.clone(),
        );
        registry.register(
            "dnsd_revocations",
            "Revocations received from fwd's WatchRevocations stream, catch-alls included",
            revocations.clone(),
        );
        registry.register(
            "dnsd_revocation_watch_up",
            "1 while the revocation watch is connected and cached grants are trusted; 0 while every A/AAAA cache hit re-authorizes",
            revocation_watch_up.clone(),
        );
        registry.register(
            "dnsd_authorize_batch_size",
            "Requests per AuthorizeMany call to fwd (answers of concurrent queries coalesced, alias records included)",
            authorize_batch_size.clone(),
        );
        registry.register(
            "dnsd_authorize_memory_hits",
            "Answers released at once because fwd had already confirmed every grant until past their TTL",
            memory_hits.clone(),
        );
        registry.register(
            "dnsd_authorize_alias_dropped",
            "Audit records of answers released from memory dropped because the queue to fwd was full (no grant is affected)",
            alias_dropped.clone(),
        );
        registry.register(
            "dnsd_authorize_alias_unrecorded",
            "Answers released from memory whose addresses had used up authorize.alias_records_per_grant: counted here, not sent to fwd's audit",
            alias_unrecorded.clone(),
        );
        Metrics {
            registry,
            queries,
            query_series: (0..QTYPE_LABELS.len() * RCODE_LABELS.len())
                .map(|_| OnceLock::new())
                .collect(),
            cache_hits,
            cache_misses,
            upstream_latency,
            latency_series: parking_lot::RwLock::new(Vec::new()),
            upstream_errors,
            authorize_latency,
            authorize_failures,
            in_flight,
            dropped,
            revocations,
            revocation_watch_up,
            authorize_batch_size,
            memory_hits,
            alias_dropped,
            alias_unrecorded,
            totals: Totals::default(),
        }
    }

    /// Counts one answered query.
    pub fn answered(&self, qtype: Option<RecordType>, rcode: ResponseCode) {
        let (t, r) = (qtype_index(qtype), rcode_index(rcode));
        let series = &self.query_series[t * RCODE_LABELS.len() + r];
        series
            .get_or_init(|| {
                self.queries
                    .get_or_create(&QueryLabels {
                        qtype: QTYPE_LABELS[t],
                        rcode: RCODE_LABELS[r],
                    })
                    .clone()
            })
            .inc();
        self.totals.queries.fetch_add(1, Ordering::Relaxed);
        match rcode {
            ResponseCode::ServFail => {
                self.totals.servfail.fetch_add(1, Ordering::Relaxed);
            }
            ResponseCode::Refused => {
                self.totals.refused.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Counts a query dropped without answer.
    pub fn dropped(&self, reason: &'static str) {
        self.dropped.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts a cache hit.
    pub fn cache_hit(&self) {
        self.cache_hits.inc();
        self.totals.cache_hits.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a cache miss.
    pub fn cache_miss(&self) {
        self.cache_misses.inc();
        self.totals.cache_misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one upstream answer's latency.
    pub fn upstream_latency(&self, upstream: &Arc<str>, latency: Duration) {
        let seconds = latency.as_secs_f64();
        if let Some((_, h)) = self
            .latency_series
            .read()
            .iter()
            .find(|(label, _)| Arc::ptr_eq(label, upstream))
        {
            h.observe(seconds);
            return;
        }
        // The family's key is a copy: a clone of the upstream's `Arc` would keep it alive,
        // and the list below tells dropped upstreams by their label's count.
        let h = self
            .upstream_latency
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .clone();
        h.observe(seconds);
        let mut series = self.latency_series.write();
        // Another thread may have added it since the read.
        if series.iter().any(|(label, _)| Arc::ptr_eq(label, upstream)) {
            return;
        }
        if series.len() >= LATENCY_SERIES_MAX {
            series.retain(|(label, _)| Arc::strong_count(label) > 1);
        }
        if series.len() < LATENCY_SERIES_MAX {
            series.push((Arc::clone(upstream), h));
        }
    }

    /// Counts one upstream failure.
    pub fn upstream_error(&self, upstream: &str, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                upstream: upstream.to_owned(),
                kind,
            })
            .inc();
    }

    /// Records one Authorize call; `failure` names why it failed.
    pub fn authorize(&self, latency: Duration, failure: Option<&'static str>) {
        self.authorize_latency.observe(latency.as_secs_f64());
        self.totals.authorize_calls.fetch_add(1, Ordering::Relaxed);
        if let Some(reason) = failure {
            self.authorize_failures
                .get_or_create(&ReasonLabels { reason })
                .inc();
            self.totals
                .authorize_failures
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one revocation received from fwd.
    pub fn revocation(&self) {
        self.revocations.inc();
    }

    /// Records whether the revocation watch is up (cached grants trusted).
    pub fn revocation_watch_up(&self, up: bool) {
        self.revocation_watch_up.set(i64::from(up));
    }

    /// Records the number of requests carried by one AuthorizeMany call.
    pub fn authorize_batch(&self, requests: usize) {
        self.authorize_batch_size.observe(requests as f64);
    }

    /// Counts one answer released from the memory of confirmed grants.
    pub fn released_from_memory(&self) {
        self.memory_hits.inc();
    }

    /// Counts one alias audit record dropped because its queue was full.
    pub fn alias_dropped(&self) {
        self.alias_dropped.inc();
    }

    /// Counts one answer released from memory beyond its addresses' alias record budget.
    pub fn alias_unrecorded(&self) {
        self.alias_unrecorded.inc();
    }

    /// Marks a query as started; the guard marks it finished when dropped.
    pub fn start_query(self: &Arc<Self>) -> InFlight {
        self.in_flight.inc();
        self.totals.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// The totals for the `Stats` RPC.
    pub fn snapshot(&self) -> Snapshot {
        let t = &self.totals;
        Snapshot {
            queries: t.queries.load(Ordering::Relaxed),
            cache_hits: t.cache_hits.load(Ordering::Relaxed),
            cache_misses: t.cache_misses.load(Ordering::Relaxed),
            servfail: t.servfail.load(Ordering::Relaxed),
            refused: t.refused.load(Ordering::Relaxed),
            authorize_calls: t.authorize_calls.load(Ordering::Relaxed),
            authorize_failures: t.authorize_failures.load(Ordering::Relaxed),
            in_flight: t.in_flight.load(Ordering::Relaxed),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Decrements the in-flight gauge when a query finishes, however it finishes.
#[derive(Debug)]
pub struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
        self.0.totals.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

// === HTTP endpoint ===

async fn respond(
    req: Request<Incoming>,
    metrics: Arc<Metrics>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    if req.method() != Method::GET {
        *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    } else if req.uri().path() != "/metrics" {
        *resp.status_mut() = StatusCode::NOT_FOUND;
    } else {
        *resp.body_mut() = Full::new(Bytes::from(metrics.encode()));
        if let Ok(v) = "application/openmetrics-text; version=1.0.0; charset=utf-8".parse() {
            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
    }
    Ok(resp)
}

/// Serves `GET /metrics` on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, _) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if conns.len() >= 64 {
            // A scraper needs one connection; refuse to be a resource sink.
            drop(stream);
            continue;
        }
        while conns.try_join_next().is_some() {}
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| respond(req, metrics.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::timeout(Duration::from_secs(30), conn) => {}
            }
        });
    }
    conns.shutdown().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// Latency series found by label address count into the family's series, the same one
    /// for equal labels held in different `Arc`s; beyond the list's limit, upstreams are
    /// still counted, and the labels of dropped upstreams make room.
    #[test]
    fn upstream_latency_series_by_label_address() {
        let m = Metrics::new();
        let ms = Duration::from_millis(1);
        let a: Arc<str> = Arc::from("udp://192.0.2.1:53");
        let same_text: Arc<str> = Arc::from("udp://192.0.2.1:53");
        let b: Arc<str> = Arc::from("tls://192.0.2.2:853");
        m.upstream_latency(&a, ms);
        m.upstream_latency(&a, ms);
        m.upstream_latency(&same_text, ms);
        m.upstream_latency(&b, ms);
        assert_eq!(m.latency_series.read().len(), 3, "one entry per label Arc");
        // More live upstreams than the list keeps: the extra ones go through the family.
        let others: Vec<Arc<str>> = (0..LATENCY_SERIES_MAX)
            .map(|i| Arc::from(format!("udp://198.51.100.{i}:53")))
            .collect();
        for o in others.iter().chain(&others) {
            m.upstream_latency(o, ms);
        }
        assert_eq!(m.latency_series.read().len(), LATENCY_SERIES_MAX);
        m.upstream_latency(&a, ms);
        let text = m.encode();
        for want in [
            "dnsd_upstream_latency_seconds_count{upstream=\"udp://192.0.2.1:53\"} 4",
            "dnsd_upstream_latency_seconds_count{upstream=\"tls://192.0.2.2:853\"} 1",
            "dnsd_upstream_latency_seconds_count{upstream=\"udp://198.51.100.0:53\"} 2",
            "dnsd_upstream_latency_seconds_count{upstream=\"udp://198.51.100.63:53\"} 2",
        ] {
            assert!(text.contains(want), "missing {want} in:\n{text}");
        }
        // A reload drops the old upstreams: their entries make room for a new one.
        drop(others);
        let new: Arc<str> = Arc::from("udp://203.0.113.1:53");
        m.upstream_latency(&new, ms);
        let series = m.latency_series.read();
        assert!(series.iter().any(|(label, _)| Arc::ptr_eq(label, &new)));
        assert!(
            series.len() <= 4,
            "dropped upstreams' entries pruned: {}",
            series.len()
        );
    }

    #[test]
    fn counters_and_text() {
        let m = Arc::new(Metrics::new());
        m.answered(Some(RecordType::A), ResponseCode::NoError);
        m.answered(Some(RecordType::A), ResponseCode::NoError);
        m.answered(Some(RecordType::from(65_000)), ResponseCode::ServFail);
        m.answered(None, ResponseCode::FormErr);
        m.cache_hit();
        m.cache_miss();
        m.upstream_latency(&Arc::from("udp://127.0.0.1:53"), Duration::from_millis(3));
        m.upstream_error("udp://127.0.0.1:53", "timeout");
        m.authorize(Duration::from_millis(1), None);
        m.authorize(Duration::from_millis(1), Some("unavailable"));
        m.revocation();
        m.revocation_watch_up(true);
        m.authorize_batch(3);
        m.released_from_memory();
        m.alias_dropped();
        m.alias_unrecorded();
        {
            let _q = m.start_query();
            assert_eq!(m.snapshot().in_flight, 1);
        }
        let s = m.snapshot();
        assert_eq!(
            s,
            Snapshot {
                queries: 4,
                cache_hits: 1,
                cache_misses: 1,
                servfail: 1,
                refused: 0,
                authorize_calls: 2,
                authorize_failures: 1,
                in_flight: 0,
            }
        );
        let text = m.encode();
        for want in [
            "dnsd_queries_total{qtype=\"A\",rcode=\"NOERROR\"} 2",
            "dnsd_queries_total{qtype=\"none\",rcode=\"FORMERR\"} 1",
            "dnsd_queries_total{qtype=\"other\",rcode=\"SERVFAIL\"} 1",
            "dnsd_cache_hits_total 1",
            "dnsd_upstream_latency_seconds_count{upstream=\"udp://127.0.0.1:53\"} 1",
            "dnsd_upstream_errors_total{upstream=\"udp://127.0.0.1:53\",kind=\"timeout\"} 1",
            "dnsd_authorize_failures_total{reason=\"unavailable\"} 1",
            "dnsd_authorize_latency_seconds_count 2",
            "dnsd_revocations_total 1",
            "dnsd_revocation_watch_up 1",
            "dnsd_authorize_batch_size_count 1",
            "dnsd_authorize_batch_size_bucket{le=\"4.0\"} 1",
            "dnsd_authorize_memory_hits_total 1",
            "dnsd_authorize_alias_dropped_total 1",
            "dnsd_authorize_alias_unrecorded_total 1",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        // Only the series used appear (the lookup table holds no others).
        assert_eq!(text.matches("dnsd_queries_total{").count(), 3, "{text}");
    }

    #[tokio::test]
    async fn http_endpoint() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let m = Arc::new(Metrics::new());
        m.cache_hit();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let server = tokio::spawn(serve(listener, m, token.clone()));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("dnsd_cache_hits_total 1"), "{text}");
        token.cancel();
        server.await.unwrap();
    }
}
