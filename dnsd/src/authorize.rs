//! The Authorize client of fwd: coalesces the requests of concurrent queries into `AuthorizeMany` calls on one persistent gRPC channel, and remembers what fwd committed so that an answer whose grants are all already committed long enough is released without waiting.
//!
//! "Granted" means committed in the kernel: fwd returns only after the nft elements exist,
//! and dnsd releases an answer only after fwd's reply, or after finding every one of its
//! grants in the memory of what fwd confirmed before (below). Anything else (fwd down, slow
//! past the deadline, refusing the call, or answering nonsense) is an error the handler turns
//! into SERVFAIL (unless `on_fwd_error = "answer"`).
//!
//! **Coalescing.** [`Authorizer::authorize`] queues its request, with a oneshot for the
//! reply, to one task that owns the calls. That task sends at once while fewer than
//! [`MAX_CALLS_IN_FLIGHT`] calls are out, so at low load an answer costs one round trip as
//! before; when both are out, the requests of the queries arriving meanwhile accumulate and
//! leave together in the next call, up to `authorize.max_batch` requests and as many grants in
//! total (fwd refuses a larger call whole). Each request keeps its own deadline
//! (`authorize.timeout`, queueing included); a call's own deadline is the timeout from when it
//! is sent. A request fwd refuses in its slot fails alone, as [`AuthorizeError::Refused`].
//!
//! **Memory.** For each (client, address) the authorizer remembers the `expires_unix_ms` fwd
//! last confirmed. A request whose every grant is already committed until at least
//! `now + ttl + MEMORY_SAFETY` is answered from memory at once; its name still reaches fwd's
//! audit as a non-blocking "alias" request, sent by a task of its own. Their queue is bounded
//! ([`ALIAS_QUEUE`]): when fwd falls behind, alias records are dropped and counted
//! (`dnsd_authorize_alias_dropped_total`). Grants are never affected, only the audit record of
//! a name whose addresses were already granted under another name.
//!
//! Why remembering is safe: fwd's expiry is a promise that the kernel element exists until
//! then, and only a revocation breaks it early. The memory is believed only while the
//! revocation watch ([`crate::revocations`]) is up and has applied its stream's catch-alls;
//! every revocation it receives forgets the addresses it covers, and a disconnect, a failed
//! call, or any inconsistency forgets everything. A result is remembered only if nothing was
//! forgotten between queueing its request and its reply (an epoch), so a revocation that
//! overtakes a reply is not undone. What is left is the instant between fwd committing a
//! revocation and dnsd receiving it on the stream, where an answer may be released from memory
//! for an address just revoked. That answer is not a hole: the kernel refuses the connection,
//! because the kernel, not dnsd, enforces. Stale memory can only ever make dnsd skip a wait
//! for a rule that was revoked; it never creates or extends one. The answer cache has the
//! same window for the same reason.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use guard_proto::UnixChannel;
use guard_proto::v1::firewall_client::FirewallClient;
use guard_proto::v1::{
    AuthorizeManyRequest, AuthorizeManyResponse, AuthorizeRequest, Grant, GrantResult, Outcome,
};
use hickory_proto::rr::Name;
use ipnet::IpNet;
use parking_lot::Mutex;
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tonic::Code;

use crate::metrics::Metrics;

/// The default of `authorize.max_batch`, and fwd's default `limits.max_batch`.
pub const DEFAULT_MAX_BATCH: usize = 256;
/// Most `AuthorizeMany` calls carrying answers that are out at once. Requests arriving while
/// they are out wait and leave together in the next call.
pub const MAX_CALLS_IN_FLIGHT: usize = 2;
/// Most alias records waiting to be sent; beyond it they are dropped and counted.
pub const ALIAS_QUEUE: usize = 4096;
/// Most (client, address) grants remembered. When full, expired ones are evicted; if none
/// has expired, everything is forgotten (which only costs round trips to fwd).
pub const MEMORY_ENTRIES: usize = 65_536;
/// A remembered grant releases an answer only if it outlives the answer's TTL by this much.
pub const MEMORY_SAFETY: Duration = Duration::from_secs(1);
/// The reason sent with the audit record of an answer released from memory.
pub const ALIAS_REASON: &str = "alias";
/// The default of `authorize.alias_records_per_grant`.
pub const DEFAULT_ALIAS_RECORDS: u32 = 16;

/// Why an Authorize request failed as a whole.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// fwd refused the call, or this request in its slot (permission denied, batch too
    /// large, empty request, ...).
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
    /// The query name (for fwd's audit log). It is written out only for a request that
    /// reaches fwd: most answers are released from memory without it.
    pub qname: &'a Name,
    /// The DNS client.
    pub client: IpAddr,
    /// "answer" or "cache-refresh".
    pub reason: &'a str,
}

/// The client of fwd's `Firewall.AuthorizeMany`.
#[derive(Debug)]
pub struct Authorizer {
    shared: Arc<Shared>,
    max_batch: usize,
    /// The queues of the coalescing tasks, started by the first request (so that building an
    /// Authorizer needs no runtime). The tasks end when the Authorizer is dropped.
    queues: OnceLock<Queues>,
}

/// What the Authorizer and its calls share.
#[derive(Debug)]
struct Shared {
    path: PathBuf,
    timeout: Duration,
    client: Mutex<Option<FirewallClient<UnixChannel>>>,
    memory: Memory,
    metrics: Arc<Metrics>,
    /// `authorize.alias_records_per_grant`.
    alias_records: AtomicU32,
    /// Answer requests queued and not yet sent (or dropped because their caller left).
    queued: AtomicUsize,
}

#[derive(Debug)]
struct Queues {
    /// Requests whose answers wait for fwd. Unbounded: their number is bounded by
    /// `listen.max_in_flight`, and each caller gives up at its own deadline.
    answers: mpsc::UnboundedSender<Job>,
    /// Alias records: nobody waits for them.
    aliases: mpsc::Sender<Job>,
}

/// One request in the queue.
#[derive(Debug)]
struct Job {
    body: AuthorizeRequest,
    grants: Vec<(IpAddr, u32)>,
    client: IpAddr,
    /// The memory's epoch when the request was queued.
    epoch: u64,
    /// `None` for alias records.
    reply: Option<oneshot::Sender<Result<Vec<Verdict>, AuthorizeError>>>,
}

impl Job {
    /// Whether anyone still waits for the answer (alias records are always wanted).
    fn wanted(&self) -> bool {
        self.reply.as_ref().is_none_or(|r| !r.is_closed())
    }
}

/// Wall-clock now in Unix ms.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A query name as fwd's audit log keeps it: lower case, without the root's trailing dot.
/// `to_ascii` writes a label's letters as they are and escapes octets only with `\` and
/// digits or punctuation, so lowering its output lowers just the name's letters, as
/// `Name::to_lowercase` does (one `String` instead of a lowered `Name` and its `String`).
pub fn audit_name(name: &Name) -> String {
    let mut s = name.to_ascii();
    s.make_ascii_lowercase();
    if name.is_fqdn() {
        s.pop();
    }
    s
}

fn request_body(req: &Request<'_>, client: IpAddr, reason: &str) -> AuthorizeRequest {
    AuthorizeRequest {
        grants: req
            .grants
            .iter()
            .map(|(ip, ttl)| Grant {
                ip: guard_proto::ip_to_bytes(*ip),
                ttl_s: *ttl,
            })
            .collect(),
        qname: audit_name(req.qname),
        client: guard_proto::ip_to_bytes(client),
        reason: reason.to_owned(),
    }
}

// === impl Authorizer ===

impl Authorizer {
    /// A client for fwd's socket at `path` with the default batch bound and private metrics;
    /// nothing is connected until the first call.
    pub fn new(path: &Path, timeout: Duration) -> Self {
        Self::with_options(path, timeout, DEFAULT_MAX_BATCH, Arc::new(Metrics::new()))
    }

    /// A client for fwd's socket at `path`, sending at most `max_batch` requests (and grants)
    /// per call (`authorize.max_batch`, at most fwd's `limits.max_batch`), counting in
    /// `metrics`.
    pub fn with_options(
        path: &Path,
        timeout: Duration,
        max_batch: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Authorizer {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                timeout,
                client: Mutex::new(None),
                memory: Memory::new(MEMORY_ENTRIES),
                metrics,
                alias_records: AtomicU32::new(DEFAULT_ALIAS_RECORDS),
                queued: AtomicUsize::new(0),
            }),
            max_batch: max_batch.max(1),
            queues: OnceLock::new(),
        }
    }

    /// Sets `authorize.alias_records_per_grant`: how many answers released from memory are
    /// recorded per address and grant period.
    #[must_use]
    pub fn with_alias_records(self, n: u32) -> Self {
        self.set_alias_records(n);
        self
    }

    /// Changes `authorize.alias_records_per_grant` at run time.
    pub fn set_alias_records(&self, n: u32) {
        self.shared.alias_records.store(n, Ordering::Relaxed);
    }

    fn queues(&self) -> &Queues {
        self.queues.get_or_init(|| {
            let (answers, answers_rx) = mpsc::unbounded_channel();
            let (aliases, aliases_rx) = mpsc::channel(ALIAS_QUEUE);
            tokio::spawn(coalesce(self.shared.clone(), self.max_batch, answers_rx));
            tokio::spawn(send_aliases(
                self.shared.clone(),
                self.max_batch,
                aliases_rx,
            ));
            Queues { answers, aliases }
        })
    }

    /// Asks fwd to commit `req.grants`; returns one verdict per grant, in order. Answered
    /// from memory when every grant is known to be committed long enough (see the module
    /// documentation).
    pub async fn authorize(&self, req: Request<'_>) -> Result<Vec<Verdict>, AuthorizeError> {
        match self.from_memory(&req) {
            Some(verdicts) => Ok(verdicts),
            None => self.call(req).await,
        }
    }

    /// The verdicts of `req` when memory covers every one of its grants (see the module
    /// documentation), queueing its alias record; `None` when fwd must be asked
    /// ([`Authorizer::call`]). It never waits, so the handler checks it before it sets up
    /// a call.
    pub fn from_memory(&self, req: &Request<'_>) -> Option<Vec<Verdict>> {
        let client = req.client.to_canonical();
        let shared = &self.shared;
        let budget = shared.alias_records.load(Ordering::Relaxed);
        let (verdicts, record) = shared
            .memory
            .covers(client, req.grants, now_unix_ms(), budget)?;
        shared.metrics.released_from_memory();
        if record {
            self.alias(req, client);
        } else {
            shared.metrics.alias_unrecorded();
        }
        Some(verdicts)
    }

    /// Asks fwd to commit `req.grants` (memory is not consulted: see
    /// [`Authorizer::from_memory`]); one verdict per grant, in order.
    pub async fn call(&self, req: Request<'_>) -> Result<Vec<Verdict>, AuthorizeError> {
        let deadline = Instant::now() + self.shared.timeout;
        let client = req.client.to_canonical();
        let shared = &self.shared;
        let (tx, rx) = oneshot::channel();
        let job = Job {
            body: request_body(&req, client, req.reason),
            grants: req.grants.to_vec(),
            client,
            epoch: shared.memory.epoch(),
            reply: Some(tx),
        };
        shared.queued.fetch_add(1, Ordering::Relaxed);
        if self.queues().answers.send(job).is_err() {
            // The coalescing task is gone (it only ends with the Authorizer): fail closed.
            shared.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(AuthorizeError::Unavailable {
                path: shared.path.clone(),
                status: Box::new(tonic::Status::unavailable("authorize queue closed")),
            });
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AuthorizeError::Unavailable {
                path: shared.path.clone(),
                status: Box::new(tonic::Status::unavailable("authorize call abandoned")),
            }),
            Err(_) => Err(AuthorizeError::Timeout {
                path: shared.path.clone(),
                timeout: shared.timeout,
            }),
        }
    }

    /// Queues the audit record of an answer released from memory, or drops and counts it
    /// when the queue is full.
    fn alias(&self, req: &Request<'_>, client: IpAddr) {
        let job = Job {
            body: request_body(req, client, ALIAS_REASON),
            grants: req.grants.to_vec(),
            client,
            epoch: self.shared.memory.epoch(),
            reply: None,
        };
        if self.queues().aliases.try_send(job).is_err() {
            self.shared.metrics.alias_dropped();
        }
    }

    /// Whether fwd is certainly down: nothing accepts connections on its socket (refused, or
    /// the socket file is gone). A slow, hung or refusing fwd is not down. Only asked after a
    /// call failed as [`AuthorizeError::Unavailable`], which also covers statuses a live fwd
    /// can send (its cancellation at the deadline, an unavailable state store).
    pub async fn fwd_is_down(&self) -> bool {
        match tokio::time::timeout(self.shared.timeout, UnixStream::connect(&self.shared.path))
            .await
        {
            Ok(Err(e)) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ),
            Ok(Ok(_)) | Err(_) => false,
        }
    }

    /// Sets whether remembered grants may be believed. The revocation watch sets it once its
    /// stream's catch-alls are applied and clears it when the stream ends; clearing forgets
    /// everything.
    pub fn set_trusted(&self, trusted: bool) {
        self.shared.memory.set_trusted(trusted);
    }

    /// Forgets the remembered grants of every address inside `net` (a revocation from fwd);
    /// returns how many were forgotten.
    pub fn revoked(&self, net: &IpNet) -> usize {
        self.shared.memory.revoke(net)
    }

    /// Forgets every remembered grant.
    pub fn forget_all(&self) {
        self.shared.memory.forget_all();
    }

    /// How many (client, address) grants are remembered.
    pub fn remembered(&self) -> usize {
        self.shared.memory.len()
    }

    /// How many answer requests wait to be sent.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }
}

// === the coalescing tasks ===

/// Forms calls from the answer queue until the Authorizer is dropped: each call takes one of
/// [`MAX_CALLS_IN_FLIGHT`] slots, and the requests arriving while no slot is free leave
/// together in the next one.
async fn coalesce(
    shared: Arc<Shared>,
    max_batch: usize,
    mut answers: mpsc::UnboundedReceiver<Job>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CALLS_IN_FLIGHT));
    // A request taken from the queue that did not fit in the call being formed.
    let mut carry: Option<Job> = None;
    loop {
        let first = match carry.take() {
            Some(job) => job,
            None => match answers.recv().await {
                Some(job) => job,
                None => break,
            },
        };
        if !first.wanted() {
            shared.queued.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        shared.queued.fetch_sub(1, Ordering::Relaxed);
        let mut batch = Batch::new(max_batch, first);
        while let Ok(job) = answers.try_recv() {
            if !job.wanted() {
                shared.queued.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            if !batch.fits(&job) {
                carry = Some(job);
                break;
            }
            shared.queued.fetch_sub(1, Ordering::Relaxed);
            batch.push(job);
        }
        tokio::spawn(call(shared.clone(), batch.jobs, Some(permit)));
    }
}

/// Sends the alias records, one call at a time, each with every record waiting (up to
/// `max_batch`). A task of its own: alias records never wait for an answer's slot, never make
/// an answer's call larger (fwd's time per call grows with its requests), and are not starved
/// while answers keep both slots busy.
async fn send_aliases(shared: Arc<Shared>, max_batch: usize, mut aliases: mpsc::Receiver<Job>) {
    let mut carry: Option<Job> = None;
    loop {
        let first = match carry.take() {
            Some(job) => job,
            None => match aliases.recv().await {
                Some(job) => job,
                None => break,
            },
        };
        let mut batch = Batch::new(max_batch, first);
        while let Ok(job) = aliases.try_recv() {
            if !batch.fits(&job) {
                carry = Some(job);
                break;
            }
            batch.push(job);
        }
        call(shared.clone(), batch.jobs, None).await;
    }
}

/// A call being formed: at most `max` requests and `max` grants in total (fwd's bound on
/// both), except that a single request is always sent, whatever its size.
struct Batch {
    max: usize,
    grants: usize,
    jobs: Vec<Job>,
}

impl Batch {
    fn new(max: usize, first: Job) -> Self {
        Batch {
            max,
            grants: first.grants.len(),
            jobs: vec![first],
        }
    }

    fn fits(&self, job: &Job) -> bool {
        self.jobs.len() < self.max && self.grants + job.grants.len() <= self.max
    }

    fn push(&mut self, job: Job) {
        self.grants += job.grants.len();
        self.jobs.push(job);
    }
}

/// Sends one call and hands each request its result.
async fn call(shared: Arc<Shared>, jobs: Vec<Job>, _slot: Option<OwnedSemaphorePermit>) {
    shared.metrics.authorize_batch(jobs.len());
    let request = AuthorizeManyRequest {
        requests: jobs.iter().map(|j| j.body.clone()).collect(),
    };
    let deadline = Instant::now() + shared.timeout;
    let response = shared.send(request, deadline).await.and_then(|r| {
        if r.responses.len() == jobs.len() {
            Ok(r)
        } else {
            Err(shared.malformed(format!(
                "{} responses for {} requests",
                r.responses.len(),
                jobs.len()
            )))
        }
    });
    let response = match response {
        Ok(r) => r,
        Err(e) => {
            shared.memory.forget_all();
            if jobs.iter().all(|j| j.reply.is_none()) {
                tracing::debug!(error = %e, records = jobs.len(), "alias records not delivered to fwd");
            }
            for job in jobs {
                if let Some(tx) = job.reply {
                    let _ = tx.send(Err(e.clone()));
                }
            }
            return;
        }
    };
    let now_ms = now_unix_ms();
    for (job, one) in jobs.into_iter().zip(response.responses) {
        let result = if one.error.is_empty() {
            shared.check(&job.grants, one.results, now_ms)
        } else {
            Err(AuthorizeError::Refused {
                path: shared.path.clone(),
                status: Box::new(tonic::Status::invalid_argument(one.error)),
            })
        };
        match &result {
            Ok(verdicts) => shared.memory.record(
                job.epoch,
                job.client,
                &job.grants,
                verdicts,
                now_ms,
                job.reply.is_some(),
            ),
            Err(_) => shared.memory.forget_all(),
        }
        if let Some(tx) = job.reply {
            let _ = tx.send(result);
        }
    }
}

// === impl Shared ===

impl Shared {
    fn client(&self) -> FirewallClient<UnixChannel> {
        let mut slot = self.client.lock();
        slot.get_or_insert_with(|| FirewallClient::new(UnixChannel::lazy(&self.path, self.timeout)))
            .clone()
    }

    /// Forgets the channel so that the next call connects afresh.
    fn reset(&self) {
        *self.client.lock() = None;
    }

    fn malformed(&self, what: String) -> AuthorizeError {
        AuthorizeError::Malformed {
            path: self.path.clone(),
            what,
        }
    }

    /// One `AuthorizeMany` call, retried once when the transport failed.
    async fn send(
        &self,
        request: AuthorizeManyRequest,
        deadline: Instant,
    ) -> Result<AuthorizeManyResponse, AuthorizeError> {
        // One retry when the transport failed: after fwd restarts, the first call on the old
        // connection fails although a new one would succeed. Authorize is idempotent.
        let mut retried = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut call = tonic::Request::new(request.clone());
            call.set_timeout(left);
            let mut client = self.client();
            match tokio::time::timeout_at(deadline, client.authorize_many(call)).await {
                Err(_) => {
                    self.reset();
                    return Err(AuthorizeError::Timeout {
                        path: self.path.clone(),
                        timeout: self.timeout,
                    });
                }
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(status)) => match status.code() {
                    Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled => {
                        self.reset();
                        if status.code() == Code::Unavailable
                            && !retried
                            && Instant::now() < deadline
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
        }
    }

    /// Matches fwd's results to the request, failing closed on anything inconsistent.
    fn check(
        &self,
        grants: &[(IpAddr, u32)],
        results: Vec<GrantResult>,
        now_ms: u64,
    ) -> Result<Vec<Verdict>, AuthorizeError> {
        if results.len() != grants.len() {
            return Err(self.malformed(format!(
                "{} results for {} grants",
                results.len(),
                grants.len()
            )));
        }
        let mut out = Vec::with_capacity(results.len());
        for (i, (r, (ip, _))) in results.into_iter().zip(grants).enumerate() {
            if guard_proto::ip_from_bytes(&r.ip) != Some(*ip) {
                return Err(self.malformed(format!("result {i} is not for {ip}")));
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

// === impl Memory ===

/// The grants fwd confirmed, per (client, address): see the module documentation.
#[derive(Debug)]
struct Memory {
    capacity: usize,
    state: Mutex<MemoryState>,
}

#[derive(Debug, Default)]
struct MemoryState {
    /// Believed only while the revocation watch is up.
    trusted: bool,
    /// Bumped whenever anything is forgotten or trust changes: a reply to a request queued
    /// in an earlier epoch may predate what was forgotten, so it is not remembered.
    epoch: u64,
    /// Per (client, address): the expiry fwd confirmed, and how many alias records were
    /// sent since (the budget restarts when fwd confirms a later expiry).
    grants: HashMap<(IpAddr, IpAddr), Remembered>,
}

#[derive(Debug, Clone, Copy)]
struct Remembered {
    expires_ms: u64,
    aliases: u32,
}

impl Memory {
    fn new(capacity: usize) -> Self {
        Memory {
            capacity,
            state: Mutex::new(MemoryState::default()),
        }
    }

    fn epoch(&self) -> u64 {
        self.state.lock().epoch
    }

    fn len(&self) -> usize {
        self.state.lock().grants.len()
    }

    /// The remembered grants of `grants`, when every one is committed until at least
    /// `now + its TTL + MEMORY_SAFETY`; with whether this answer's alias record is still
    /// within `budget` for one of its addresses (charged to all of them when it is).
    fn covers(
        &self,
        client: IpAddr,
        grants: &[(IpAddr, u32)],
        now_ms: u64,
        budget: u32,
    ) -> Option<(Vec<Verdict>, bool)> {
        if grants.is_empty() {
            return None;
        }
        let safety = u64::try_from(MEMORY_SAFETY.as_millis()).unwrap_or(u64::MAX);
        let mut state = self.state.lock();
        if !state.trusted {
            return None;
        }
        let mut under_budget = false;
        let verdicts: Vec<Verdict> = grants
            .iter()
            .map(|(ip, ttl)| {
                let r = state.grants.get(&(client, *ip))?;
                let needed = now_ms
                    .saturating_add(u64::from(*ttl).saturating_mul(1000))
                    .saturating_add(safety);
                under_budget |= r.aliases < budget;
                (r.expires_ms >= needed).then_some(Verdict::Granted {
                    expires_unix_ms: r.expires_ms,
                })
            })
            .collect::<Option<_>>()?;
        // Once every address has used its alias budget (the steady state of a busy name),
        // nothing is charged and the addresses are not looked up again.
        if under_budget {
            for (ip, _) in grants {
                if let Some(r) = state.grants.get_mut(&(client, *ip))
                    && r.aliases < budget
                {
                    r.aliases += 1;
                }
            }
        }
        Some((verdicts, under_budget))
    }

    /// Remembers fwd's verdicts on a request queued in `epoch`, unless something was
    /// forgotten since.
    /// `new_period`: the verdicts answer a request an answer waited for, so a later expiry
    /// starts a new alias budget. fwd's reply to an alias record may also carry a (slightly)
    /// later expiry; it is remembered but keeps the budget, or every alias record would
    /// reopen it and the bound would not hold.
    fn record(
        &self,
        epoch: u64,
        client: IpAddr,
        grants: &[(IpAddr, u32)],
        verdicts: &[Verdict],
        now_ms: u64,
        new_period: bool,
    ) {
        let mut state = self.state.lock();
        if !state.trusted || state.epoch != epoch {
            return;
        }
        for ((ip, _), verdict) in grants.iter().zip(verdicts) {
            let key = (client, *ip);
            match verdict {
                Verdict::Granted { expires_unix_ms } => {
                    if state.grants.len() >= self.capacity && !state.grants.contains_key(&key) {
                        state.grants.retain(|_, r| r.expires_ms > now_ms);
                        if state.grants.len() >= self.capacity {
                            state.grants.clear();
                        }
                    }
                    let r = state.grants.entry(key).or_insert(Remembered {
                        expires_ms: 0,
                        aliases: 0,
                    });
                    if *expires_unix_ms > r.expires_ms {
                        // A new grant or an extension for an answer: a new period, a new
                        // alias budget.
                        r.expires_ms = *expires_unix_ms;
                        if new_period {
                            r.aliases = 0;
                        }
                    }
                }
                Verdict::Rejected { .. } => {
                    state.grants.remove(&key);
                }
            }
        }
    }

    fn revoke(&self, net: &IpNet) -> usize {
        let mut state = self.state.lock();
        state.epoch += 1;
        let before = state.grants.len();
        // An IPv4-mapped address is revoked with its IPv4 network (fwd stores it as IPv4).
        state
            .grants
            .retain(|(_, ip), _| !net.contains(ip) && !net.contains(&ip.to_canonical()));
        before - state.grants.len()
    }

    fn forget_all(&self) {
        let mut state = self.state.lock();
        state.epoch += 1;
        state.grants.clear();
    }

    fn set_trusted(&self, trusted: bool) {
        let mut state = self.state.lock();
        state.epoch += 1;
        state.trusted = trusted;
        if !trusted {
            state.grants.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::HashSet;

    use guard_proto::v1::firewall_server::{Firewall, FirewallServer};
    use guard_proto::v1::*;
    use tokio_util::sync::CancellationToken;
    use tonic::{Response, Status};

    use super::*;

    fn qname(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    #[test]
    fn audit_names_are_lower_case_without_the_root_dot() {
        for (name, audit) in [
            ("Example.COM.", "example.com"),
            ("Example.COM", "example.com"),
            (".", ""),
            ("x\\.Y.test.", "x\\.y.test"),
        ] {
            assert_eq!(audit_name(&qname(name)), audit, "{name}");
        }
        // As the name's own lower-casing writes it (the form dnsd sent before), for labels
        // of any octets.
        let labels: [&[u8]; 6] = [
            b"WWW",
            b"Caf\xc3\xa9",
            b"a B",
            b"_TCP",
            b"\x00\x7fZ",
            b"x.Y",
        ];
        for pair in labels.windows(2) {
            let mut n = Name::from_labels(pair.iter().map(|l| l.to_vec())).unwrap();
            for fqdn in [false, true] {
                n.set_fqdn(fqdn);
                assert_eq!(
                    audit_name(&n),
                    n.to_lowercase().to_ascii().trim_end_matches('.'),
                    "{n:?}"
                );
            }
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

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

    // === a fake fwd serving AuthorizeMany ===

    /// What the fake fwd does with a call.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Mode {
        Grant,
        /// Refuse the whole call (PERMISSION_DENIED).
        Refuse,
        /// Never answer.
        Hang,
    }

    /// The fake fwd's state. Every call is recorded on arrival; while `hold` is set, calls
    /// wait before answering.
    struct Fake {
        batches: Mutex<Vec<Vec<AuthorizeRequest>>>,
        mode: Mutex<Mode>,
        /// Requests with these names are refused in their slot.
        refuse_names: Mutex<HashSet<String>>,
        hold: tokio::sync::watch::Sender<bool>,
        margin_ms: u64,
    }

    impl Fake {
        fn new() -> Arc<Fake> {
            Arc::new(Fake {
                batches: Mutex::new(Vec::new()),
                mode: Mutex::new(Mode::Grant),
                refuse_names: Mutex::new(HashSet::new()),
                hold: tokio::sync::watch::channel(false).0,
                margin_ms: 5_000,
            })
        }

        fn calls(&self) -> usize {
            self.batches.lock().len()
        }

        fn requests(&self) -> Vec<AuthorizeRequest> {
            self.batches.lock().iter().flatten().cloned().collect()
        }

        fn sizes(&self) -> Vec<usize> {
            self.batches.lock().iter().map(Vec::len).collect()
        }
    }

    #[derive(Clone)]
    struct FakeService(Arc<Fake>);

    type Revocations =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Revocation, Status>> + Send>>;

    #[tonic::async_trait]
    impl Firewall for FakeService {
        type WatchRevocationsStream = Revocations;

        async fn authorize_many(
            &self,
            req: tonic::Request<AuthorizeManyRequest>,
        ) -> Result<Response<AuthorizeManyResponse>, Status> {
            let fake = &self.0;
            let requests = req.into_inner().requests;
            fake.batches.lock().push(requests.clone());
            let mut hold = fake.hold.subscribe();
            let _ = hold.wait_for(|h| !*h).await;
            let mode = *fake.mode.lock();
            match mode {
                Mode::Refuse => return Err(Status::permission_denied("not an authorizer")),
                Mode::Hang => std::future::pending::<()>().await,
                Mode::Grant => {}
            }
            let refuse = fake.refuse_names.lock().clone();
            let now = now_unix_ms();
            let responses = requests
                .into_iter()
                .map(|r| {
                    if refuse.contains(&r.qname) {
                        return AuthorizeOne {
                            results: Vec::new(),
                            error: "refused in its slot".into(),
                        };
                    }
                    let results = r
                        .grants
                        .iter()
                        .map(|g| GrantResult {
                            ip: g.ip.clone(),
                            outcome: Outcome::Granted as i32,
                            expires_unix_ms: now + u64::from(g.ttl_s) * 1000 + fake.margin_ms,
                            effective_ttl_s: g.ttl_s,
                            error: String::new(),
                        })
                        .collect();
                    AuthorizeOne {
                        results,
                        error: String::new(),
                    }
                })
                .collect();
            Ok(Response::new(AuthorizeManyResponse { responses }))
        }

        async fn authorize(
            &self,
            _: tonic::Request<AuthorizeRequest>,
        ) -> Result<Response<AuthorizeResponse>, Status> {
            Err(Status::unimplemented("dnsd must use AuthorizeMany"))
        }
        async fn watch_revocations(
            &self,
            _: tonic::Request<WatchRevocationsRequest>,
        ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn allow(
            &self,
            _: tonic::Request<AllowRequest>,
        ) -> Result<Response<AllowResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn revoke(
            &self,
            _: tonic::Request<RevokeRequest>,
        ) -> Result<Response<RevokeResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn list(
            &self,
            _: tonic::Request<ListRequest>,
        ) -> Result<Response<ListResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn history(
            &self,
            _: tonic::Request<HistoryRequest>,
        ) -> Result<Response<HistoryResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn status(
            &self,
            _: tonic::Request<StatusRequest>,
        ) -> Result<Response<StatusResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
    }

    /// A fake fwd on a socket in a tempdir, and an Authorizer for it.
    struct Rig {
        fake: Arc<Fake>,
        authorizer: Arc<Authorizer>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        server: tokio::task::JoinHandle<()>,
        _dir: tempfile::TempDir,
    }

    fn rig(max_batch: usize, timeout: Duration) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fwd.sock");
        let fake = Fake::new();
        let stop = CancellationToken::new();
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (svc, token) = (FakeService(fake.clone()), stop.clone());
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(FirewallServer::new(svc))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    token.cancelled_owned(),
                )
                .await
                .unwrap();
        });
        let metrics = Arc::new(Metrics::new());
        let authorizer = Arc::new(Authorizer::with_options(
            &path,
            timeout,
            max_batch,
            metrics.clone(),
        ));
        Rig {
            fake,
            authorizer,
            metrics,
            stop,
            server,
            _dir: dir,
        }
    }

    /// Waits (up to 10 s) for `cond`: a bound on failure, not a readiness signal.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Spawns `authorize` for `name` naming `addr` with `ttl`, from 127.0.0.1.
    fn ask(a: &Arc<Authorizer>, name: &str, addr: &str, ttl: u32) -> Pending {
        let (a, name, grants) = (a.clone(), qname(name), vec![(ip(addr), ttl)]);
        tokio::spawn(async move {
            a.authorize(Request {
                grants: &grants,
                qname: &name,
                client: ip("127.0.0.1"),
                reason: "answer",
            })
            .await
        })
    }

    type Pending = tokio::task::JoinHandle<Result<Vec<Verdict>, AuthorizeError>>;

    /// Holds fwd and occupies both call slots with one request each.
    async fn busy(r: &Rig) -> Vec<Pending> {
        r.fake.hold.send_replace(true);
        let a = ask(&r.authorizer, "a.test", "192.0.2.1", 60);
        until("first call", || r.fake.calls() == 1).await;
        let b = ask(&r.authorizer, "b.test", "192.0.2.1", 60);
        until("second call", || r.fake.calls() == 2).await;
        vec![a, b]
    }

    fn granted(r: &Result<Vec<Verdict>, AuthorizeError>) -> bool {
        matches!(r.as_deref(), Ok([Verdict::Granted { .. }]))
    }

    // === tests ===

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
            .shared
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
        assert!(a.shared.check(&grants, vec![], 1000).is_err());
        let swapped = vec![
            result("192.0.2.2", Outcome::Granted, 2000),
            result("192.0.2.1", Outcome::Granted, 2000),
            result("192.0.2.3", Outcome::Granted, 2000),
            result("192.0.2.4", Outcome::Granted, 2000),
        ];
        assert!(matches!(
            a.shared.check(&grants, swapped, 1000),
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
                qname: &qname("example.com"),
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

    #[tokio::test]
    async fn alone_a_request_is_one_call_at_once() {
        let r = rig(256, Duration::from_secs(5));
        let grants = [(ip("192.0.2.1"), 60), (ip("192.0.2.2"), 60)];
        let v = r
            .authorizer
            .authorize(Request {
                grants: &grants,
                qname: &qname("example.com"),
                client: ip("::ffff:127.0.0.1"),
                reason: "answer",
            })
            .await
            .unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(r.fake.sizes(), [1]);
        let sent = &r.fake.requests()[0];
        assert_eq!(sent.qname, "example.com");
        assert_eq!(sent.reason, "answer");
        assert_eq!(sent.client, [127, 0, 0, 1], "client sent canonical");
        assert_eq!(sent.grants.len(), 2);
    }

    /// The proof of coalescing: while both call slots are held by fwd, 20 more requests
    /// queue, and on release they leave together in one call (max_batch 256), or in calls of
    /// at most max_batch requests.
    #[tokio::test]
    async fn requests_queued_behind_busy_calls_leave_together() {
        for (max_batch, want) in [(256, vec![1, 1, 20]), (8, vec![1, 1, 8, 8, 4])] {
            let r = rig(max_batch, Duration::from_secs(10));
            let mut pending = busy(&r).await;
            for i in 2..22 {
                pending.push(ask(&r.authorizer, &format!("n{i}.test"), "192.0.2.2", 60));
            }
            until("20 queued", || r.authorizer.queued() == 20).await;
            assert_eq!(r.fake.calls(), 2, "no third call while two are out");
            r.fake.hold.send_replace(false);
            for p in pending {
                assert!(granted(&p.await.unwrap()));
            }
            assert_eq!(r.fake.sizes(), want, "max_batch {max_batch}");
            assert_eq!(r.authorizer.queued(), 0);
            let text = r.metrics.encode();
            assert!(
                text.contains(&format!("dnsd_authorize_batch_size_count {}", want.len())),
                "{text}"
            );
        }
    }

    /// fwd's bound is on grants too: requests are split so that no call carries more than
    /// max_batch grants in total.
    #[tokio::test]
    async fn batches_are_bounded_by_total_grants() {
        let r = rig(4, Duration::from_secs(10));
        let mut pending = busy(&r).await;
        for i in 0..3 {
            let a = r.authorizer.clone();
            pending.push(tokio::spawn(async move {
                let grants = [(ip("192.0.2.7"), 60), (ip("192.0.2.8"), 60)];
                a.authorize(Request {
                    grants: &grants,
                    qname: &qname(&format!("two{i}.test")),
                    client: ip("127.0.0.1"),
                    reason: "answer",
                })
                .await
            }));
        }
        until("3 queued", || r.authorizer.queued() == 3).await;
        r.fake.hold.send_replace(false);
        for p in pending {
            assert!(p.await.unwrap().is_ok());
        }
        let grants: Vec<usize> = r
            .fake
            .batches
            .lock()
            .iter()
            .map(|b| b.iter().map(|q| q.grants.len()).sum())
            .collect();
        assert_eq!(grants, [1, 1, 4, 2]);
    }

    #[tokio::test]
    async fn a_slot_error_refuses_that_request_only() {
        let r = rig(256, Duration::from_secs(10));
        r.fake.refuse_names.lock().insert("bad.test".into());
        let first = busy(&r).await;
        let bad = ask(&r.authorizer, "bad.test", "192.0.2.2", 60);
        let good = ask(&r.authorizer, "good.test", "192.0.2.3", 60);
        until("2 queued", || r.authorizer.queued() == 2).await;
        r.fake.hold.send_replace(false);
        for p in first {
            assert!(granted(&p.await.unwrap()));
        }
        assert!(matches!(
            bad.await.unwrap(),
            Err(AuthorizeError::Refused { .. })
        ));
        assert!(granted(&good.await.unwrap()));
        assert_eq!(r.fake.sizes(), [1, 1, 2], "bad and good shared a call");
    }

    #[tokio::test]
    async fn refused_call_and_timeout_keep_their_error_kinds() {
        let r = rig(256, Duration::from_millis(300));
        *r.fake.mode.lock() = Mode::Refuse;
        let err = ask(&r.authorizer, "a.test", "192.0.2.1", 60)
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, AuthorizeError::Refused { .. }), "{err}");
        *r.fake.mode.lock() = Mode::Hang;
        let err = ask(&r.authorizer, "a.test", "192.0.2.1", 60)
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, AuthorizeError::Timeout { .. }), "{err}");
    }

    /// Memory: a second name for an address fwd already committed long enough is released
    /// without waiting for fwd (fwd is holding every call), and its name still reaches fwd as
    /// an alias record.
    #[tokio::test]
    async fn remembered_grant_releases_without_waiting_and_sends_an_alias() {
        let r = rig(256, Duration::from_secs(10));
        r.authorizer.set_trusted(true);
        assert!(granted(
            &ask(&r.authorizer, "www.test", "192.0.2.1", 60)
                .await
                .unwrap()
        ));
        assert_eq!(r.authorizer.remembered(), 1);
        r.fake.hold.send_replace(true);
        let v = tokio::time::timeout(
            Duration::from_secs(5),
            ask(&r.authorizer, "shop.test", "192.0.2.1", 60),
        )
        .await
        .expect("released from memory without waiting for fwd")
        .unwrap();
        assert!(granted(&v));
        until("alias record sent", || r.fake.calls() == 2).await;
        let alias = r.fake.requests().pop().unwrap();
        assert_eq!(
            (alias.qname.as_str(), alias.reason.as_str()),
            ("shop.test", ALIAS_REASON)
        );
        let text = r.metrics.encode();
        assert!(
            text.contains("dnsd_authorize_memory_hits_total 1"),
            "{text}"
        );
        // A longer TTL than the grant covers, another address, or another client waits.
        let longer = ask(&r.authorizer, "long.test", "192.0.2.1", 3600);
        let other = ask(&r.authorizer, "other.test", "192.0.2.9", 60);
        until("both sent to fwd", || r.fake.calls() == 3).await;
        assert!(!longer.is_finished() && !other.is_finished());
        r.fake.hold.send_replace(false);
        assert!(granted(&longer.await.unwrap()));
        assert!(granted(&other.await.unwrap()));
    }

    /// When fwd falls behind, alias records are dropped and counted; the answers are not
    /// affected. (The test runtime is single-threaded and a release from memory never yields,
    /// so the alias task takes nothing from the queue during the loop.)
    #[tokio::test]
    async fn alias_records_beyond_the_queue_are_dropped_and_counted() {
        let r = rig(256, Duration::from_secs(10));
        r.authorizer.set_trusted(true);
        // No budget in the way: every answer would be recorded.
        r.authorizer.set_alias_records(u32::MAX);
        ask(&r.authorizer, "www.test", "192.0.2.1", 60)
            .await
            .unwrap()
            .unwrap();
        let extra = 10;
        let grants = [(ip("192.0.2.1"), 60)];
        for i in 0..ALIAS_QUEUE + extra {
            let v = r
                .authorizer
                .authorize(Request {
                    grants: &grants,
                    qname: &qname(&format!("n{i}.test")),
                    client: ip("127.0.0.1"),
                    reason: "answer",
                })
                .await;
            assert!(granted(&v), "answer {i}");
        }
        let text = r.metrics.encode();
        assert!(
            text.contains(&format!("dnsd_authorize_alias_dropped_total {extra}")),
            "{text}"
        );
        until("every queued alias record sent", || {
            r.fake.requests().len() == 1 + ALIAS_QUEUE
        })
        .await;
        assert!(
            r.fake.sizes()[1..].iter().all(|&n| n <= 256),
            "{:?}",
            r.fake.sizes()
        );
    }

    #[tokio::test]
    async fn revocation_makes_the_next_answer_wait_for_fwd() {
        let r = rig(256, Duration::from_secs(10));
        r.authorizer.set_trusted(true);
        ask(&r.authorizer, "a.test", "192.0.2.1", 60)
            .await
            .unwrap()
            .unwrap();
        ask(&r.authorizer, "b.test", "198.51.100.1", 60)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.authorizer.remembered(), 2);
        assert_eq!(r.authorizer.revoked(&net("203.0.113.0/24")), 0);
        assert_eq!(r.authorizer.revoked(&net("192.0.2.0/24")), 1);
        r.fake.hold.send_replace(true);
        let calls = r.fake.calls();
        // Still remembered: released at once.
        assert!(granted(
            &ask(&r.authorizer, "c.test", "198.51.100.1", 60)
                .await
                .unwrap()
        ));
        // Revoked: waits for fwd's answer.
        let revoked = ask(&r.authorizer, "d.test", "192.0.2.1", 60);
        until("sent to fwd", || {
            r.fake.requests().iter().any(|q| q.qname == "d.test")
        })
        .await;
        assert!(!revoked.is_finished(), "released before fwd answered");
        r.fake.hold.send_replace(false);
        assert!(granted(&revoked.await.unwrap()));
        assert!(r.fake.calls() > calls);
        // The catch-all forgets everything, as does the end of the watch.
        assert_eq!(r.authorizer.revoked(&net("0.0.0.0/0")), 2);
        ask(&r.authorizer, "e.test", "::ffff:192.0.2.5", 60)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            r.authorizer.revoked(&net("192.0.2.5/32")),
            1,
            "mapped address"
        );
        ask(&r.authorizer, "f.test", "2001:db8::1", 60)
            .await
            .unwrap()
            .unwrap();
        r.authorizer.set_trusted(false);
        assert_eq!(r.authorizer.remembered(), 0);
    }

    /// A revocation that overtakes fwd's reply: the reply may predate it, so it is not
    /// remembered.
    #[tokio::test]
    async fn a_reply_overtaken_by_a_revocation_is_not_remembered() {
        let r = rig(256, Duration::from_secs(10));
        r.authorizer.set_trusted(true);
        r.fake.hold.send_replace(true);
        let pending = ask(&r.authorizer, "a.test", "192.0.2.1", 60);
        until("sent", || r.fake.calls() == 1).await;
        r.authorizer.revoked(&net("192.0.2.1/32"));
        r.fake.hold.send_replace(false);
        assert!(granted(&pending.await.unwrap()));
        assert_eq!(r.authorizer.remembered(), 0);
    }

    #[tokio::test]
    async fn untrusted_memory_is_neither_used_nor_filled() {
        let r = rig(256, Duration::from_secs(10));
        ask(&r.authorizer, "a.test", "192.0.2.1", 60)
            .await
            .unwrap()
            .unwrap();
        ask(&r.authorizer, "b.test", "192.0.2.1", 60)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.authorizer.remembered(), 0);
        assert_eq!(r.fake.calls(), 2);
        assert!(r.fake.requests().iter().all(|q| q.reason == "answer"));
    }

    /// A failed call forgets everything, and with fwd gone the next answer fails closed.
    #[tokio::test]
    async fn failures_forget_and_fail_closed() {
        let r = rig(256, Duration::from_millis(500));
        r.authorizer.set_trusted(true);
        ask(&r.authorizer, "a.test", "192.0.2.1", 60)
            .await
            .unwrap()
            .unwrap();
        ask(&r.authorizer, "b.test", "192.0.2.2", 60)
            .await
            .unwrap()
            .unwrap();
        *r.fake.mode.lock() = Mode::Refuse;
        assert!(
            ask(&r.authorizer, "c.test", "192.0.2.3", 60)
                .await
                .unwrap()
                .is_err()
        );
        assert_eq!(r.authorizer.remembered(), 0, "a failed call forgets");
        assert!(
            ask(&r.authorizer, "a.test", "192.0.2.1", 60)
                .await
                .unwrap()
                .is_err(),
            "not released from memory"
        );
        // fwd stops (the revocation watch then distrusts the memory): fail closed.
        *r.fake.mode.lock() = Mode::Grant;
        ask(&r.authorizer, "a.test", "192.0.2.1", 60)
            .await
            .unwrap()
            .unwrap();
        r.stop.cancel();
        let _ = r.server.await;
        r.authorizer.set_trusted(false);
        let err = ask(&r.authorizer, "a.test", "192.0.2.1", 60)
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(
                err,
                AuthorizeError::Unavailable { .. } | AuthorizeError::Timeout { .. }
            ),
            "{err}"
        );
    }

    /// One grant of `s` for 10 s, as an answer asks it.
    fn one(s: &str) -> [(IpAddr, u32); 1] {
        [(ip(s), 10)]
    }

    /// fwd's verdict on one grant: committed until `ms` (Unix ms).
    fn upto(ms: u64) -> [Verdict; 1] {
        [Verdict::Granted {
            expires_unix_ms: ms,
        }]
    }

    /// The alias budget: at most `budget` records per address and grant period; a later
    /// expiry from fwd (an extension) starts a new period; 0 records none.
    #[test]
    fn alias_records_are_bounded_per_address_and_grant_period() {
        let m = Memory::new(16);
        m.set_trusted(true);
        let c = ip("127.0.0.1");
        let epoch = m.epoch();
        m.record(epoch, c, &one("192.0.2.1"), &upto(100_000), 1_000, true);
        m.record(epoch, c, &one("192.0.2.2"), &upto(100_000), 1_000, true);
        let record = |s: &str, budget| m.covers(c, &one(s), 2_000, budget).map(|(_, r)| r);
        assert_eq!(record("192.0.2.1", 3), Some(true));
        assert_eq!(record("192.0.2.1", 3), Some(true));
        assert_eq!(record("192.0.2.1", 3), Some(true));
        assert_eq!(record("192.0.2.1", 3), Some(false), "budget used up");
        // Released all the same, and the other address has its own budget.
        assert!(m.covers(c, &one("192.0.2.1"), 2_000, 3).is_some());
        assert_eq!(record("192.0.2.2", 3), Some(true));
        // An answer naming both is recorded while one of them has budget left.
        let both = [(ip("192.0.2.1"), 10), (ip("192.0.2.2"), 10)];
        // (192.0.2.2 has used 1 of 3.)
        assert_eq!(m.covers(c, &both, 2_000, 3).map(|(_, r)| r), Some(true));
        assert_eq!(m.covers(c, &both, 2_000, 3).map(|(_, r)| r), Some(true));
        assert_eq!(m.covers(c, &both, 2_000, 3).map(|(_, r)| r), Some(false));
        // The same expiry again is not a new period; a later one is.
        m.record(epoch, c, &one("192.0.2.1"), &upto(100_000), 3_000, true);
        assert_eq!(record("192.0.2.1", 3), Some(false));
        // fwd's reply to an alias record (a later expiry) keeps the budget used up...
        m.record(epoch, c, &one("192.0.2.1"), &upto(130_000), 3_000, false);
        assert_eq!(record("192.0.2.1", 3), Some(false));
        // ...an answer's grant or extension starts a new period.
        m.record(epoch, c, &one("192.0.2.1"), &upto(160_000), 3_000, true);
        assert_eq!(record("192.0.2.1", 3), Some(true));
        // 0 records none.
        assert_eq!(record("192.0.2.1", 0), Some(false));
    }

    #[test]
    fn memory_is_bounded_and_evicts_expired_first() {
        let m = Memory::new(2);
        m.set_trusted(true);
        let c = ip("127.0.0.1");
        let epoch = m.epoch();
        m.record(epoch, c, &one("192.0.2.1"), &upto(1_500), 1_000, true);
        m.record(epoch, c, &one("192.0.2.2"), &upto(100_000), 1_000, true);
        // Full: the expired one goes.
        m.record(epoch, c, &one("192.0.2.3"), &upto(100_000), 2_000, true);
        assert_eq!(m.len(), 2);
        assert!(m.covers(c, &one("192.0.2.1"), 2_000, 16).is_none());
        assert!(m.covers(c, &one("192.0.2.2"), 2_000, 16).is_some());
        // Full of live grants: everything is forgotten.
        m.record(epoch, c, &one("192.0.2.4"), &upto(100_000), 2_000, true);
        assert_eq!(m.len(), 1);
        // The safety margin: 10 s TTL needs the grant to last 11 s more.
        assert!(m.covers(c, &one("192.0.2.4"), 89_000, 16).is_some());
        assert!(m.covers(c, &one("192.0.2.4"), 89_001, 16).is_none());
        // A rejection forgets; another client knows nothing.
        assert!(
            m.covers(ip("127.0.0.2"), &one("192.0.2.4"), 2_000, 16)
                .is_none()
        );
        let rejected = [Verdict::Rejected { error: "x".into() }];
        m.record(epoch, c, &one("192.0.2.4"), &rejected, 2_000, true);
        assert_eq!(m.len(), 0);
    }
}
