//! The grant engine: one committer thread that group-commits Authorize calls into one SQLite
//! transaction and one netlink batch, keeps the committed view, sweeps expiries and reconciles at start.
//! A lone call on a quiet engine is committed on its caller's thread instead, under the same lock
//! (one writer at a time either way), which saves the wake-ups to the committer thread and back.
//!
//! Invariant: an entry in `committed` means the kernel holds that element with an expiry at least
//! as late as the entry's. Entries are inserted or raised only after the kernel commit, and removed
//! before a kernel delete. So a caller told "granted" or "unchanged" always has a live kernel rule.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock, TryLockError};
use std::time::{Duration, Instant};

use guard_proto::v1 as pb;
use ipnet::IpNet;
use tokio::sync::oneshot;

use crate::command::{self, Authorize, Refusal};
use crate::config::Settings;
use crate::model::{AuditEvent, Caller, Change, EventKind, GrantKey, Source, now_ms};
use crate::nft::{self, AUTH4, AUTH4C, AUTH6, AUTH6C, ManualElem};
use crate::store::Store;
use crate::sys::{DeleteMode, ElemOp, KeyType, Netlink, SetKey, SysError};

/// Grace after a recorded expiry before the sweeper forgets an entry. The kernel's own expiry is
/// never earlier than ours (it started its clock after we read ours), so after this the element is gone.
const EXPIRY_GRACE_MS: u64 = 2_000;
/// Largest number of jobs folded into one group commit.
const MAX_GROUP: usize = 1024;
/// After a group ends with calls queued behind it, calls go to the committer thread (group
/// commit) for at least this long before one may again be committed on its caller's thread.
const BUSY_FOR: Duration = Duration::from_millis(20);
/// Up to this many live grants, reconcile reads the kernel sets back and removes strangers;
/// above it, it re-adds every grant without a dump (set dumps cost quadratic kernel time).
const DUMP_LIMIT: usize = 100_000;
#[cfg(test)]
thread_local! {
    /// Lets a test exercise the no-dump path without 100k grants.
    static TEST_DUMP_LIMIT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

fn dump_limit() -> usize {
    #[cfg(test)]
    if let Some(v) = TEST_DUMP_LIMIT.with(|c| c.get()) {
        return v;
    }
    DUMP_LIMIT
}

/// Metadata key of the commit high-water mark: every grant written before it is in the kernel.
const COMMITTED_META: &str = "committed_upto_ms";
/// A group's intent transaction also records the mark when the stored one is older than this,
/// so after a kill -9 restart re-adds only the last moments of grants (not everything since the
/// last sweep), at the price of one metadata row in some transactions.
const MARK_EVERY_MS: u64 = 200;

/// Test hook: holds a committer between a group's SQLite intent and its kernel commit, so a
/// test can observe the state in that window deterministically (no sleeps).
#[cfg(test)]
struct TestGate {
    /// The committer reports here when it reaches the gate.
    reached: mpsc::Sender<()>,
    /// ... and then waits here until the test lets it go (or drops the sender).
    release: std::sync::Mutex<mpsc::Receiver<()>>,
    /// Name of the thread that reached the gate: the committer's, or a caller's (inline commit).
    by: std::sync::Mutex<Option<String>>,
}
/// Metadata key of the installed ruleset's fingerprint.
const RULESET_META: &str = "ruleset_fingerprint";

/// Whether our table and base chain exist (then only a configuration change needs `nft`).
fn ruleset_in_place(nl: &mut Netlink, table: &str, chain: &str) -> Result<bool, StartError> {
    if !nl.table_exists(table)? {
        return Ok(false);
    }
    let sets = nl.sets(table)?;
    let all_sets = nft::SETS.iter().all(|want| sets.iter().any(|s| s == want));
    Ok(all_sets && nl.chains(table)?.iter().any(|c| c == chain))
}

/// Reconcile commits in chunks of this many ops (not one transaction: each chunk only adds
/// granted elements or removes ungranted ones, so partial progress is always safe).
const RECONCILE_CHUNK: usize = 20_000;

/// A committed grant: its expiry and a tag of the name the store has at the front of the grant's
/// name list (0: not known, e.g. after a restart). Byte arrays (alignment 1) make a map entry
/// 45 bytes instead of 56 for a `(SetKey, u64, u32)`: at 1M grants the map is most of fwd's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    expiry: [u8; 8],
    name: [u8; 4],
}

impl Held {
    fn new(expiry: u64, name: u32) -> Self {
        Held {
            expiry: expiry.to_ne_bytes(),
            name: name.to_ne_bytes(),
        }
    }

    fn expiry(&self) -> u64 {
        u64::from_ne_bytes(self.expiry)
    }

    fn name(&self) -> u32 {
        u32::from_ne_bytes(self.name)
    }
}

/// The 32-bit tag of a name as the store normalizes it; never 0 ("not known"). Two names that
/// collide (one pair in 2^32) would skip recording the second as an alias of a granted address.
fn name_tag(name: &str) -> u32 {
    use std::hash::{Hash, Hasher};
    // DefaultHasher::new() has fixed keys: the tag is stable within the process, which is all
    // it needs (tags are never stored).
    let mut h = std::hash::DefaultHasher::new();
    crate::store::normalize_name(name).hash(&mut h);
    (h.finish() as u32).max(1)
}

/// Failures the engine reports to RPC callers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The state store failed; nothing was committed (fail closed).
    #[error("state store failed, nothing committed: {0}")]
    Store(String),
    /// The kernel refused or netlink failed; nothing was committed.
    #[error("kernel commit failed: {0}")]
    Kernel(String),
    /// The request conflicts with existing state.
    #[error("{0}")]
    Conflict(String),
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The committer thread is gone.
    #[error("fwd is shutting down")]
    Stopped,
}

/// Errors at start-up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Netlink could not be opened or listed.
    #[error("netlink: {0}")]
    Netlink(#[from] SysError),
    /// Ruleset setup failed.
    #[error("ruleset: {0}")]
    Nft(#[from] nft::NftError),
    /// The store failed.
    #[error("state store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// Reconcile commit failed.
    #[error("reconcile: {0}")]
    Reconcile(String),
    /// The committer thread could not start.
    #[error("cannot start committer thread: {0}")]
    Thread(std::io::Error),
}

/// What reconcile did at start (also written to the audit).
#[derive(Debug, Default, Clone)]
pub struct ReconcileReport {
    /// Unexpired grants loaded from SQLite.
    pub loaded: usize,
    /// Grants already present in the kernel with a long enough timeout.
    pub kept: usize,
    /// Grants (re-)added to the kernel.
    pub added: usize,
    /// Kernel elements removed because SQLite does not grant them.
    pub removed_stale: usize,
    /// Grants that expired while fwd was down.
    pub expired: usize,
    /// Manual allowances reinstalled.
    pub manual: usize,
    /// Manual allowances the kernel had wrong (missing, stale or with another timeout), fixed.
    pub manual_fixed: usize,
    /// Kernel elements deleted because they were revoked (tombstones) before a crash.
    pub tombstoned: usize,
    /// The ruleset was already in place with this configuration; `nft` was not run.
    pub setup_skipped: bool,
    /// How deletes of possibly-expired elements are sent ("if-present" or "strict").
    pub delete_mode: &'static str,
    /// How a grant's kernel timeout is extended ("re-add" or "delete+add").
    pub extend_mode: &'static str,
    /// Wall time taken.
    pub took: Duration,
}

/// Result of a manual allow.
#[derive(Debug, Clone, Copy)]
pub struct Allowed {
    /// Expiry, if any.
    pub expires_ms: Option<u64>,
}

enum Job {
    Authorize {
        cmd: Authorize,
        caller: Caller,
        reply: oneshot::Sender<Result<Vec<pb::GrantResult>, EngineError>>,
    },
    Allow {
        net: IpNet,
        ttl: Option<Duration>,
        comment: String,
        caller: Caller,
        reply: oneshot::Sender<Result<Allowed, EngineError>>,
    },
    Revoke {
        net: IpNet,
        comment: String,
        caller: Caller,
        reply: oneshot::Sender<Result<u64, EngineError>>,
    },
    Audit(Vec<AuditEvent>),
    Reload {
        settings: Arc<Settings>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// Persist the commit mark and end the committer thread.
    Stop,
}

struct Shared {
    /// The committer thread, joined by [`Engine::stop`].
    committer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Committed revocations, for WatchRevocations subscribers (dnsd drops cached grant knowledge).
    revocations: tokio::sync::broadcast::Sender<IpNet>,
    /// Swapped whole on SIGHUP reload; readers take a snapshot.
    settings: RwLock<Arc<Settings>>,
    committed: RwLock<HashMap<SetKey, Held>>,
    manual: RwLock<HashMap<IpNet, Option<u64>>>,
    heartbeat_ms: AtomicU64,
    /// Authorize jobs sent to the committer thread and not yet answered, plus the group being
    /// committed inline. Only a call that finds it at 0 commits on its own thread: while jobs
    /// queue, they go to the committer thread and are committed as one group.
    inflight: AtomicUsize,
    /// Until when (µs since `epoch`) the engine counts as busy: set whenever a group ends with
    /// Authorize jobs queued behind it. Inline commits are for a quiet engine only: under load,
    /// the jobs that queue while the committer thread wakes up make bigger groups (one
    /// transaction and one netlink batch for many calls), where committing each call on its
    /// caller's thread would cost a transaction per call and keep a tokio worker from serving
    /// the others (so fewer calls queue, which would otherwise make the engine look quiet).
    busy_until_us: AtomicU64,
    /// Origin of `busy_until_us`.
    epoch: Instant,
    #[cfg(test)]
    commit_gate: std::sync::Mutex<Option<Arc<TestGate>>>,
    /// Tests that hold a commit from their own thread turn the inline path off.
    #[cfg(test)]
    inline_off: std::sync::atomic::AtomicBool,
    /// Authorize groups committed (test observability of group commit).
    #[cfg(test)]
    groups: AtomicU64,
}

impl Shared {
    /// Counts `n` Authorize jobs as answered; if others queued behind their group, the engine
    /// is busy for [`BUSY_FOR`].
    fn answered(&self, n: usize) {
        if self.inflight.fetch_sub(n, Ordering::AcqRel) != n {
            let until = self.now_us() + BUSY_FOR.as_micros() as u64;
            self.busy_until_us.store(until, Ordering::Relaxed);
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn settings(&self) -> Arc<Settings> {
        match self.settings.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// Keys that cannot change without a restart: they define the table, its hook, the sockets and
/// the identity of stored grants. Returns the first that differs.
pub fn restart_only_change(old: &Settings, new: &Settings) -> Option<&'static str> {
    let (o, n) = (&old.raw, &new.raw);
    if o.mode != n.mode {
        return Some("mode");
    }
    if o.per_client != n.per_client {
        return Some("per_client");
    }
    if o.table != n.table {
        return Some("table");
    }
    if o.socket != n.socket || o.socket_group != n.socket_group || o.socket_mode != n.socket_mode {
        return Some("socket");
    }
    if o.database != n.database {
        return Some("database");
    }
    if o.user != n.user {
        return Some("user");
    }
    None
}

/// Handle to the engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Job>,
    /// The committer's state. The committer thread takes it for each group it drains from
    /// `tx`; an Authorize that finds the engine idle takes it on its own thread instead,
    /// which saves the two cross-thread wake-ups (to the committer and back) of a lone call.
    /// The committer thread takes it out (closing the store) when it ends.
    core: Arc<Mutex<Option<Committer>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// Counts for status.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    /// Live IPv4 DNS grants.
    pub v4: u64,
    /// Live IPv6 DNS grants.
    pub v6: u64,
    /// Manual allowances.
    pub manual: u64,
}

/// Whether a grant committed until `expiry` already serves a request wanting `want`: it is
/// live, and short of `want` by at most half the margin (the rule that keeps repeated answers
/// from rewriting the kernel element each time). All in Unix ms.
fn covers(expiry: u64, now: u64, want: u64, margin: u64) -> bool {
    expiry > now && expiry + margin / 2 >= want
}

/// Builds the kernel key of a grant.
pub fn set_key(ip: IpAddr, client: Option<IpAddr>) -> Option<SetKey> {
    Some(match (ip, client) {
        (IpAddr::V4(d), None) => SetKey::V4(d),
        (IpAddr::V6(d), None) => SetKey::V6(d),
        (IpAddr::V4(dst), Some(IpAddr::V4(client))) => SetKey::V4Pair { client, dst },
        (IpAddr::V6(dst), Some(IpAddr::V6(client))) => SetKey::V6Pair { client, dst },
        _ => return None,
    })
}

fn key_parts(k: &SetKey) -> (IpAddr, Option<IpAddr>) {
    match *k {
        SetKey::V4(d) => (d.into(), None),
        SetKey::V6(d) => (d.into(), None),
        SetKey::V4Pair { client, dst } => (dst.into(), Some(client.into())),
        SetKey::V6Pair { client, dst } => (dst.into(), Some(client.into())),
    }
}

fn grant_key(k: &SetKey) -> GrantKey {
    let (ip, client) = key_parts(k);
    GrantKey::host(ip, client)
}

fn manual_set(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => nft::MANUAL4,
        IpNet::V6(_) => nft::MANUAL6,
    }
}

fn set_of(k: &SetKey) -> &'static str {
    match k {
        SetKey::V4(_) => AUTH4,
        SetKey::V6(_) => AUTH6,
        SetKey::V4Pair { .. } => AUTH4C,
        SetKey::V6Pair { .. } => AUTH6C,
    }
}

fn add_op(k: SetKey, timeout_ms: u64) -> ElemOp {
    ElemOp::Add {
        set: set_of(&k).into(),
        key: k,
        timeout: Some(Duration::from_millis(timeout_ms.max(1))),
    }
}

fn del_op(k: SetKey) -> ElemOp {
    ElemOp::Delete {
        set: set_of(&k).into(),
        key: k,
    }
}

/// The ops that give `k` a kernel timeout of `timeout_ms`: an add, after a delete when the
/// element may be `present` and re-adding does not set its timeout (see [`readd_extends`]).
fn timeout_ops(
    k: SetKey,
    timeout_ms: u64,
    present: bool,
    readd: bool,
) -> impl Iterator<Item = ElemOp> {
    (present && !readd)
        .then(|| del_op(k))
        .into_iter()
        .chain(std::iter::once(add_op(k, timeout_ms)))
}

fn event(
    kind: EventKind,
    target: Option<String>,
    caller: Caller,
    reason: impl Into<String>,
) -> AuditEvent {
    AuditEvent {
        id: 0,
        at_ms: now_ms(),
        kind,
        target,
        client: None,
        name: None,
        caller,
        reason: reason.into(),
        expires_ms: None,
    }
}

/// Commits `ops` as one transaction when the kernel accepts it. `group[i]` ties op `i` to its
/// key. When the kernel refuses:
/// - a key whose op failed for a reason other than a missing element is dropped whole (its
///   delete never goes through without its re-add) and reported;
/// - deletes reported ENOENT may only be collateral (the kernel fails a whole message of several
///   elements): their keys are taken out and committed one key per transaction, where an ENOENT
///   is unambiguous and only then is the delete dropped. A delete is never dropped on a guess,
///   so a revoke can never silently not happen.
///
/// Returns the indices of ops that failed, with their errno text.
fn commit_tolerant(
    nl: &mut Netlink,
    table: &str,
    ops: &[ElemOp],
    group: &[usize],
) -> Result<Vec<(usize, String)>, String> {
    let gid = |i: usize| group.get(i).copied().unwrap_or(usize::MAX - i);
    let mut live: Vec<usize> = (0..ops.len()).collect();
    let mut failed: Vec<(usize, String)> = Vec::new();
    let mut isolate: Vec<usize> = Vec::new(); // group ids to retry one key at a time
    for _attempt in 0..4 {
        let batch: Vec<ElemOp> = live.iter().map(|&i| ops[i].clone()).collect();
        match nl.commit(table, &batch) {
            Ok(()) => {
                live.clear();
                break;
            }
            Err(SysError::Rejected { failures }) => {
                let mut drop_groups: HashSet<usize> = HashSet::new();
                for (bi, errno) in failures {
                    let Some(&oi) = live.get(bi) else { continue };
                    let g = gid(oi);
                    if errno == libc::ENOENT
                        && matches!(ops[oi], ElemOp::Delete { .. } | ElemOp::DeleteRange { .. })
                    {
                        if drop_groups.insert(g) {
                            isolate.push(g);
                        }
                    } else if drop_groups.insert(g) {
                        isolate.retain(|x| *x != g);
                        failed.push((oi, std::io::Error::from_raw_os_error(errno).to_string()));
                    }
                }
                if drop_groups.is_empty() {
                    return Err("kernel rejected the batch without naming an element".into());
                }
                live.retain(|i| !drop_groups.contains(&gid(*i)));
                if live.is_empty() {
                    break;
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    if !live.is_empty() {
        return Err("kernel kept rejecting the batch".into());
    }
    for g in isolate {
        let mut mine: Vec<usize> = (0..ops.len()).filter(|i| gid(*i) == g).collect();
        loop {
            let batch: Vec<ElemOp> = mine.iter().map(|&i| ops[i].clone()).collect();
            match nl.commit(table, &batch) {
                Ok(()) => break,
                Err(SysError::Rejected { failures }) => {
                    // One key per transaction: an ENOENT delete here really is absent.
                    let mut gone = Vec::new();
                    for (bi, errno) in failures {
                        let Some(&oi) = mine.get(bi) else { continue };
                        if errno == libc::ENOENT
                            && matches!(ops[oi], ElemOp::Delete { .. } | ElemOp::DeleteRange { .. })
                        {
                            gone.push(oi);
                        } else {
                            failed.push((oi, std::io::Error::from_raw_os_error(errno).to_string()));
                            mine.clear();
                        }
                    }
                    if gone.is_empty() && !mine.is_empty() {
                        return Err(
                            "kernel rejected a single-key batch without naming an op".into()
                        );
                    }
                    mine.retain(|i| !gone.contains(i));
                    if mine.is_empty() {
                        break;
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    Ok(failed)
}

/// Picks delete-if-present when the kernel has it (Linux 6.3+): an element that expired between
/// our bookkeeping and the commit is then not an error at all. Older kernels keep strict deletes,
/// which `commit_tolerant` resolves key by key.
fn choose_delete_mode(nl: &mut Netlink, table: &str) -> &'static str {
    nl.set_delete_mode(DeleteMode::IfPresent);
    // 0.0.0.0 is never granted (validation refuses it), so this delete never removes anything.
    let probe = [ElemOp::Delete {
        set: AUTH4.into(),
        key: SetKey::V4(std::net::Ipv4Addr::UNSPECIFIED),
    }];
    match nl.commit(table, &probe) {
        Ok(()) => "if-present",
        Err(_) => {
            nl.set_delete_mode(DeleteMode::Strict);
            "strict"
        }
    }
}

/// Whether re-adding an element sets its timeout, checked on a throw-away table (the kernel
/// learned it in 6.x; older ones keep the old timeout). Then an extension is one add instead of
/// a delete and an add: 6 µs per netlink batch instead of 10 at p50, 8 instead of 22 at p99
/// (`bench_commit_latency` in sys.rs).
fn readd_extends(nl: &mut Netlink, table: &str) -> bool {
    // A fixed name: one left behind by a crash is reused, then removed.
    let probe = format!("{table}_probe");
    if let Err(e) = nft::create_probe_table(&probe) {
        tracing::warn!(error = %nft::error_text(&e), "cannot probe set element updates; extending by delete and add");
        return false;
    }
    let key = SetKey::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    let add = |ms| ElemOp::Add {
        set: nft::PROBE_SET.into(),
        key,
        timeout: Some(Duration::from_millis(ms)),
    };
    let updated = nl.commit(&probe, &[add(5_000)]).is_ok()
        && nl.commit(&probe, &[add(600_000)]).is_ok()
        && nl.list(&probe, nft::PROBE_SET, KeyType::V4).is_ok_and(|l| {
            l.iter()
                .any(|(k, left)| *k == key && left.is_some_and(|d| d > Duration::from_secs(60)))
        });
    if let Err(e) = nft::remove_table(&probe, true) {
        tracing::warn!(table = %probe, error = %nft::error_text(&e), "cannot remove the probe table");
    }
    updated
}

/// Op-to-key grouping for `commit_tolerant` from the key of each op.
fn groups_of(ops: &[ElemOp]) -> Vec<usize> {
    #[derive(PartialEq, Eq, Hash)]
    enum G {
        Elem(SetKey),
        Range(IpNet),
    }
    let mut ids: HashMap<G, usize> = HashMap::new();
    ops.iter()
        .map(|op| {
            let k = match op {
                ElemOp::Add { key, .. } | ElemOp::Delete { key, .. } => G::Elem(*key),
                ElemOp::AddRange { net, .. } | ElemOp::DeleteRange { net, .. } => G::Range(*net),
            };
            let n = ids.len();
            *ids.entry(k).or_insert(n)
        })
        .collect()
}

impl Engine {
    /// Reconciles SQLite with the kernel, sets up the ruleset and starts the committer thread.
    pub fn start(
        settings: Arc<Settings>,
        mut store: Store,
    ) -> Result<(Engine, ReconcileReport), StartError> {
        let t0 = Instant::now();
        let s = &settings;
        let table = s.raw.table.clone();
        let now = now_ms();
        let mut report = ReconcileReport::default();
        // Sized once: growing by doubling would briefly hold two tables (a 1M-grant peak).
        let mut committed: HashMap<SetKey, Held> =
            HashMap::with_capacity(store.grant_count()? as usize);
        let mut manual: HashMap<IpNet, Option<u64>> = HashMap::new();
        let mut expired: Vec<(GrantKey, &'static str)> = Vec::new();
        // Grants written after this mark may not have reached the kernel before fwd stopped.
        let committed_upto: u64 = store
            .meta(COMMITTED_META)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut recent: Vec<SetKey> = Vec::new();
        store.for_each_grant_since(|key, exp, source, last_ms| match source {
            Source::Dns => {
                let k = (key.net.prefix_len() == key.net.max_prefix_len())
                    .then(|| set_key(key.net.addr(), key.client))
                    .flatten()
                    .filter(|k| {
                        matches!(k, SetKey::V4Pair { .. } | SetKey::V6Pair { .. })
                            == s.raw.per_client
                    });
                match (k, exp) {
                    (Some(k), Some(e)) if e > now => {
                        committed.insert(k, Held::new(e, 0));
                        if last_ms >= committed_upto {
                            recent.push(k);
                        }
                    }
                    (Some(_), _) => expired.push((key, "expired while fwd was down")),
                    (None, _) => {
                        expired.push((key, "dropped: grant shape does not match per_client mode"))
                    }
                }
            }
            Source::Manual => match exp {
                Some(e) if e <= now => expired.push((key, "expired while fwd was down")),
                _ => {
                    manual.insert(key.net, exp);
                }
            },
        })?;
        report.loaded = committed.len();
        tracing::info!(
            ms = t0.elapsed().as_millis() as u64,
            "reconcile: store loaded"
        );
        report.expired = expired.len();
        report.manual = manual.len();
        let tombstones = store.live_tombstones(now)?;
        let melems: Vec<ManualElem> = manual
            .iter()
            .map(|(net, e)| ManualElem {
                net: *net,
                remaining: e.map(|e| Duration::from_millis(e.saturating_sub(now))),
            })
            .collect();
        // The ruleset is rebuilt only when it is missing or the configuration changed: on Debian 12
        // every `nft` run costs time proportional to the live grants.
        let fingerprint = nft::fingerprint(s);
        let chain = match s.raw.mode {
            crate::config::Mode::Local => "output",
            crate::config::Mode::Gateway => "forward",
        };
        let mut nl = Netlink::open()?;
        let in_place = ruleset_in_place(&mut nl, &table, chain)?;
        if in_place && store.meta(RULESET_META)?.as_deref() == Some(fingerprint.as_str()) {
            report.setup_skipped = true;
        } else {
            nft::setup(s, &melems, &nl.chains(&table)?)?;
            store.set_meta(RULESET_META, &fingerprint)?;
        }
        tracing::info!(
            ms = t0.elapsed().as_millis() as u64,
            skipped = report.setup_skipped,
            "reconcile: ruleset"
        );
        report.delete_mode = choose_delete_mode(&mut nl, &table);
        let readd = readd_extends(&mut nl, &table);
        report.extend_mode = if readd { "re-add" } else { "delete+add" };

        let sets: [(&str, KeyType); 2] = if s.raw.per_client {
            [(AUTH4C, KeyType::V4Pair), (AUTH6C, KeyType::V6Pair)]
        } else {
            [(AUTH4, KeyType::V4), (AUTH6, KeyType::V6)]
        };
        let mut ops: Vec<ElemOp> = Vec::new();
        let now = now_ms();
        if committed.len() <= dump_limit() {
            // Small enough to read back (kernel set dumps cost quadratic time): make the kernel
            // equal to SQLite, removing elements nobody granted.
            let mut seen: HashSet<SetKey> = HashSet::new();
            for (set, kt) in sets {
                for (k, remaining) in nl.list(&table, set, kt)? {
                    match committed.get(&k) {
                        None => {
                            ops.push(del_op(k));
                            report.removed_stale += 1;
                        }
                        Some(e) => {
                            seen.insert(k);
                            let want = e.expiry().saturating_sub(now);
                            let have = remaining.map(|d| d.as_millis() as u64);
                            if have.is_none_or(|h| h + 1_000 < want) {
                                ops.extend(timeout_ops(k, want, true, readd));
                                report.added += 1;
                            } else {
                                report.kept += 1;
                            }
                        }
                    }
                }
            }
            for (k, e) in &committed {
                if !seen.contains(k) {
                    ops.push(add_op(*k, e.expiry().saturating_sub(now)));
                    report.added += 1;
                }
            }
        } else {
            // Too large to dump (set dumps cost quadratic kernel time). If the ruleset was in
            // place, the kernel holds every grant committed before the high-water mark: add again
            // only the ones written after it (their commit may not have happened). Otherwise the
            // sets are new and empty: add everything.
            let readd: Box<dyn Iterator<Item = (&SetKey, &Held)>> = if in_place {
                Box::new(recent.iter().filter_map(|k| committed.get_key_value(k)))
            } else {
                Box::new(committed.iter())
            };
            for (k, e) in readd {
                ops.push(add_op(*k, e.expiry().saturating_sub(now)));
                report.added += 1;
            }
            report.kept = committed.len() - report.added;
        }
        for key in tombstones
            .iter()
            .filter(|k| k.net.prefix_len() == k.net.max_prefix_len())
        {
            if let Some(k) =
                set_key(key.net.addr(), key.client).filter(|k| !committed.contains_key(k))
            {
                ops.push(del_op(k));
                report.tombstoned += 1;
            }
        }
        // Manual allowances are few: always make the kernel's interval sets equal to SQLite.
        for (set, v6) in [(nft::MANUAL4, false), (nft::MANUAL6, true)] {
            let mut have: HashMap<IpNet, Option<Duration>> =
                nl.list_ranges(&table, set, v6)?.into_iter().collect();
            for (net, exp) in manual
                .iter()
                .filter(|(n, _)| matches!(n, IpNet::V6(_)) == v6)
            {
                let want = exp.map(|e| Duration::from_millis(e.saturating_sub(now)));
                match have.remove(net) {
                    Some(got)
                        if got.is_none() == want.is_none()
                            && got
                                .zip(want)
                                .is_none_or(|(g, w)| g + Duration::from_secs(2) >= w) => {}
                    Some(_) => {
                        ops.push(ElemOp::DeleteRange {
                            set: set.into(),
                            net: *net,
                        });
                        ops.push(ElemOp::AddRange {
                            set: set.into(),
                            net: *net,
                            timeout: want,
                        });
                        report.manual_fixed += 1;
                    }
                    None => {
                        ops.push(ElemOp::AddRange {
                            set: set.into(),
                            net: *net,
                            timeout: want,
                        });
                        report.manual_fixed += 1;
                    }
                }
            }
            for net in have.into_keys() {
                ops.push(ElemOp::DeleteRange {
                    set: set.into(),
                    net,
                });
                report.manual_fixed += 1;
            }
        }
        tracing::info!(
            ms = t0.elapsed().as_millis() as u64,
            ops = ops.len(),
            "reconcile: kernel diff ready"
        );
        for chunk in ops.chunks(RECONCILE_CHUNK) {
            let failed = commit_tolerant(&mut nl, &table, chunk, &groups_of(chunk))
                .map_err(StartError::Reconcile)?;
            if let Some((i, e)) = failed.first() {
                return Err(StartError::Reconcile(format!("{:?}: {e}", chunk[*i])));
            }
        }
        let mut changes = Vec::new();
        let mut events = Vec::new();
        for (key, why) in &expired {
            changes.push(Change::Remove { key: *key });
            let mut ev = event(
                EventKind::Expired,
                Some(key.net.to_string()),
                Caller::default(),
                *why,
            );
            ev.client = key.client;
            events.push(ev);
        }
        report.took = t0.elapsed();
        events.push(event(
            EventKind::Started,
            None,
            Caller::default(),
            format!(
                "reconciled in {:?}: {} grants loaded, {} kept, {} (re)added, {} stale removed, {} revoked before a crash removed, {} expired while down, {} manual{}",
                report.took, report.loaded, report.kept, report.added, report.removed_stale, report.tombstoned, report.expired, report.manual,
                if report.setup_skipped { ", ruleset unchanged" } else { ", ruleset installed" }
            ),
        ));
        store.apply(&changes, &events)?;
        drop(ops);
        crate::sys::release_free_memory();
        // Everything SQLite grants is in the kernel now.
        let mark = now_ms().max(committed_upto) + 1;
        store.set_meta(COMMITTED_META, &mark.to_string())?;

        let shared = Arc::new(Shared {
            committer: std::sync::Mutex::new(None),
            revocations: tokio::sync::broadcast::channel(1024).0,
            settings: RwLock::new(settings.clone()),
            committed: RwLock::new(committed),
            manual: RwLock::new(manual),
            heartbeat_ms: AtomicU64::new(now_ms()),
            inflight: AtomicUsize::new(0),
            busy_until_us: AtomicU64::new(0),
            epoch: Instant::now(),
            #[cfg(test)]
            commit_gate: std::sync::Mutex::new(None),
            #[cfg(test)]
            inline_off: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            groups: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let core = Arc::new(Mutex::new(Some(Committer {
            shared: shared.clone(),
            store,
            nl,
            table,
            last_now: mark,
            committed_upto: mark,
            persisted_upto: mark,
            mark_frozen: false,
            stopping: false,
            readd_extends: readd,
        })));
        let handle = {
            let (shared, core) = (shared.clone(), core.clone());
            std::thread::Builder::new()
                .name("committer".into())
                .spawn(move || Committer::run(&shared, &core, &rx))
                .map_err(StartError::Thread)?
        };
        if let Ok(mut h) = shared.committer.lock() {
            *h = Some(handle);
        }
        Ok((Engine { shared, tx, core }, report))
    }

    /// The settings the engine runs with.
    pub fn settings(&self) -> Arc<Settings> {
        self.shared.settings()
    }

    /// Wall-clock ms of the committer's last loop; the watchdog pings only while it advances.
    pub fn heartbeat_ms(&self) -> u64 {
        self.shared.heartbeat_ms.load(Ordering::Relaxed)
    }

    /// Live grant counts.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        if let Ok(m) = self.shared.committed.read() {
            for k in m.keys() {
                match k {
                    SetKey::V4(_) | SetKey::V4Pair { .. } => c.v4 += 1,
                    SetKey::V6(_) | SetKey::V6Pair { .. } => c.v6 += 1,
                }
            }
        }
        if let Ok(m) = self.shared.manual.read() {
            c.manual = m.len() as u64;
        }
        c
    }

    /// Authorizes a validated batch. Returns only after every accepted address is committed.
    pub async fn authorize(
        &self,
        cmd: Authorize,
        caller: Caller,
    ) -> Result<Vec<pb::GrantResult>, EngineError> {
        let mut r = self.authorize_many(vec![cmd], caller).await?;
        r.pop().ok_or(EngineError::Stopped)
    }

    /// Authorizes several validated batches (one AuthorizeMany) as one group commit; the
    /// results are in the order of `cmds`. Returns only after every accepted address is committed.
    pub async fn authorize_many(
        &self,
        cmds: Vec<Authorize>,
        caller: Caller,
    ) -> Result<Vec<Vec<pb::GrantResult>>, EngineError> {
        // Fast path: everything already committed long enough, and no new name to record. A
        // call that names a grant by another name than the one recorded last goes through the
        // committer even when the kernel needs nothing, so that the reply comes after its audit
        // record (an alias of a granted address is recorded).
        let mut out: Vec<Option<Vec<pb::GrantResult>>> = Vec::with_capacity(cmds.len());
        let mut jobs = Vec::new();
        let mut answers = Vec::new();
        for cmd in cmds {
            if let Some(results) = self.fast_path(&cmd) {
                out.push(Some(results));
                continue;
            }
            let (reply, rx) = oneshot::channel();
            jobs.push(Job::Authorize { cmd, caller, reply });
            answers.push((out.len(), rx));
            out.push(None);
        }
        if !jobs.is_empty() {
            if let Err(jobs) = self.commit_inline(jobs) {
                for job in jobs {
                    self.tx.send(job).map_err(|_| EngineError::Stopped)?;
                }
            }
            for (i, mut rx) in answers {
                // Inline, every answer is already there: no waker is registered.
                let r = match rx.try_recv() {
                    Ok(r) => r,
                    Err(_) => rx.await.map_err(|_| EngineError::Stopped)?,
                };
                out[i] = Some(r?);
            }
        }
        out.into_iter()
            .map(|r| r.ok_or(EngineError::Stopped))
            .collect()
    }

    /// Commits `jobs` as one group on the calling thread when nothing else is queued or being
    /// committed and the committer's state is free; otherwise hands the jobs back, counted in
    /// `inflight`, for the committer thread. The group is the same code as on the committer
    /// thread, under the same lock, so every ordering rule holds: groups still commit one after
    /// another, the intent is written before the kernel commit and the answers after it.
    fn commit_inline(&self, jobs: Vec<Job>) -> Result<(), Vec<Job>> {
        let n = jobs.len();
        let idle = self.shared.inflight.fetch_add(n, Ordering::AcqRel) == 0
            && self.shared.now_us() >= self.shared.busy_until_us.load(Ordering::Relaxed);
        #[cfg(test)]
        let idle = idle && !self.shared.inline_off.load(Ordering::Relaxed);
        if !idle {
            return Err(jobs);
        }
        let mut guard = match self.core.try_lock() {
            Ok(c) => c,
            // Busy (a sweep, an admin job): the committer thread takes the jobs after it.
            // Poisoned: a commit panicked; the committer thread ends on it, and the jobs then
            // fail with `Stopped` like every later call.
            Err(TryLockError::WouldBlock | TryLockError::Poisoned(_)) => return Err(jobs),
        };
        // Stopped: the jobs fail with `Stopped` once the committer thread is gone.
        let Some(core) = guard.as_mut().filter(|c| !c.stopping) else {
            return Err(jobs);
        };
        core.authorize_group(jobs);
        drop(guard);
        self.shared.answered(n);
        Ok(())
    }

    fn fast_path(&self, cmd: &Authorize) -> Option<Vec<pb::GrantResult>> {
        let s = self.shared.settings();
        let now = now_ms();
        let margin = s.raw.ttl.margin.0.as_millis() as u64;
        let tag = cmd.qname.as_deref().map(name_tag);
        let map = self.shared.committed.read().ok()?;
        cmd.items
            .iter()
            .map(|it| {
                let ip = *it.ip.as_ref().ok()?;
                let k = set_key(ip, cmd.client)?;
                let want = now + it.ttl.as_millis() as u64 + margin;
                let held = map.get(&k)?;
                if tag.is_some_and(|t| t != held.name()) {
                    return None;
                }
                let have = held.expiry();
                covers(have, now, want, margin).then(|| pb::GrantResult {
                    ip: it.raw.clone(),
                    outcome: pb::Outcome::Unchanged as i32,
                    expires_unix_ms: have,
                    effective_ttl_s: it.ttl.as_secs() as u32,
                    error: String::new(),
                })
            })
            .collect()
    }

    /// Sends a job carrying a reply channel to the committer and waits for its answer.
    async fn call<T>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, EngineError>>) -> Job,
    ) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(job(reply)).map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Manually allows a network.
    pub async fn allow(
        &self,
        net: IpNet,
        ttl: Option<Duration>,
        comment: String,
        caller: Caller,
    ) -> Result<Allowed, EngineError> {
        self.call(|reply| Job::Allow {
            net,
            ttl,
            comment,
            caller,
            reply,
        })
        .await
    }

    /// Revokes every grant and allowance inside `net`.
    pub async fn revoke(
        &self,
        net: IpNet,
        comment: String,
        caller: Caller,
    ) -> Result<u64, EngineError> {
        self.call(|reply| Job::Revoke {
            net,
            comment,
            caller,
            reply,
        })
        .await
    }

    /// Applies a new, validated configuration: refreshes the ruleset (static allowances, policy,
    /// upstreams) in one nft transaction and swaps the settings. Keys that need a restart are refused.
    pub async fn reload(&self, settings: Arc<Settings>) -> Result<(), EngineError> {
        if let Some(key) = restart_only_change(&self.settings(), &settings) {
            return Err(EngineError::Invalid(format!(
                "changing `{key}` needs a restart of fwd"
            )));
        }
        self.call(|reply| Job::Reload { settings, reply }).await
    }

    /// Finishes queued work, records the commit mark and ends the committer thread. Blocking:
    /// call after the server stopped. Later calls to the engine fail with `Stopped`.
    pub fn stop(&self) {
        let _ = self.tx.send(Job::Stop);
        let handle = self.shared.committer.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Subscribes to committed revocations.
    pub fn revocations(&self) -> tokio::sync::broadcast::Receiver<IpNet> {
        self.shared.revocations.subscribe()
    }

    /// Appends audit events (denied callers, refused calls) without waiting.
    pub fn audit(&self, events: Vec<AuditEvent>) {
        let _ = self.tx.send(Job::Audit(events));
    }

    /// Installs (or removes) the gate that holds the committer before each kernel commit.
    #[cfg(test)]
    fn set_commit_gate(&self, gate: Option<Arc<TestGate>>) {
        if let Ok(mut g) = self.shared.commit_gate.lock() {
            *g = gate;
        }
    }
}

struct Committer {
    shared: Arc<Shared>,
    store: Store,
    nl: Netlink,
    table: String,
    /// Group clock: never goes backwards, so a grant's `last_ms` orders it against the mark.
    last_now: u64,
    /// Every grant written at or before this is in the kernel.
    committed_upto: u64,
    /// The mark as last persisted.
    persisted_upto: u64,
    /// A failure could not be compensated in the store: stop advancing the mark, so the next
    /// start re-adds everything written since.
    mark_frozen: bool,
    /// Stop was requested: finish this batch of jobs, persist the mark, end.
    stopping: bool,
    /// Extend a kernel timeout by re-adding the element (see [`readd_extends`]).
    readd_extends: bool,
}

/// One requested address of a waiting call: (request index, raw bytes, clamped TTL, key or refusal).
type Slot = (usize, Vec<u8>, Duration, Result<SetKey, Refusal>);

/// One address's state while a group is being committed.
struct Pending {
    expiry: u64,
    had: Option<u64>,
    failed: Option<String>,
    /// Index (in `waiting`) of the first call that asked for this key: its name goes in the audit.
    first: usize,
    /// Tag of the front name the store had for the grant before this group (0: not known).
    had_name: u32,
    /// Tag of the front name after this group's upserts, if one of them carried a name.
    front: Option<u32>,
}

impl Committer {
    /// The committer thread: drains queued jobs into groups, sweeps and prunes, each under the
    /// state's lock (an inline commit may hold it meanwhile).
    fn run(shared: &Shared, core: &Mutex<Option<Committer>>, rx: &mpsc::Receiver<Job>) {
        let sweep = shared.settings().raw.expiry.sweep_interval.0;
        let mut next_sweep = Instant::now() + sweep;
        let mut last_prune = Instant::now();
        loop {
            let wait = next_sweep.saturating_duration_since(Instant::now());
            let got = rx.recv_timeout(wait);
            // Poisoned: a group panicked on a caller's thread. End as if it had panicked here
            // (the watchdog stops being fed, queued and later calls fail with `Stopped`).
            let Ok(mut guard) = core.lock() else { return };
            let Some(c) = guard.as_mut() else { return };
            match got {
                Ok(job) => {
                    let mut jobs = vec![job];
                    while jobs.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(j) => jobs.push(j),
                            Err(_) => break,
                        }
                    }
                    let n = jobs
                        .iter()
                        .filter(|j| matches!(j, Job::Authorize { .. }))
                        .count();
                    c.process(jobs);
                    if n > 0 {
                        shared.answered(n);
                    }
                    if c.stopping {
                        c.persist_mark();
                        // Close the store and the netlink socket now, not with the last handle.
                        *guard = None;
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    c.persist_mark();
                    *guard = None;
                    return;
                }
            }
            shared.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
            if Instant::now() >= next_sweep {
                c.sweep();
                next_sweep = Instant::now() + sweep;
            }
            if last_prune.elapsed() > Duration::from_secs(3600) {
                c.prune();
                last_prune = Instant::now();
            }
        }
    }

    fn prune(&mut self) {
        let keep = self.shared.settings().raw.limits.audit_retention.0;
        if keep.is_zero() {
            return;
        }
        let before = now_ms().saturating_sub(keep.as_millis() as u64);
        match self.store.prune_audit(before) {
            Ok(n) if n > 0 => tracing::info!(pruned = n, "audit retention"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "audit prune failed"),
        }
    }

    /// Now, for stamping a group: wall clock, but never behind the previous group.
    fn tick(&mut self) -> u64 {
        self.last_now = self.last_now.max(now_ms());
        self.last_now
    }

    /// Between groups nothing is in flight, so every grant stamped before the next stamp is in
    /// the kernel: move the mark there and write it (cheap; per sweep and at stop, not per group).
    fn persist_mark(&mut self) {
        if !self.mark_frozen {
            // Everything stamped so far is committed. Later groups stamp at or after the new
            // mark, so "written at or after the mark" is exactly what may be uncommitted.
            let mark = self.tick() + 1;
            self.last_now = mark;
            self.committed_upto = mark;
        }
        if self.committed_upto > self.persisted_upto {
            match self
                .store
                .set_meta(COMMITTED_META, &self.committed_upto.to_string())
            {
                Ok(()) => self.persisted_upto = self.committed_upto,
                Err(e) => tracing::warn!(error = %e, "could not record the commit mark"),
            }
        }
    }

    /// Runs jobs in arrival order; consecutive Authorize/Audit jobs are group-committed together.
    fn process(&mut self, jobs: Vec<Job>) {
        let mut group: Vec<Job> = Vec::new();
        for job in jobs {
            match job {
                Job::Authorize { .. } | Job::Audit(_) => group.push(job),
                Job::Allow {
                    net,
                    ttl,
                    comment,
                    caller,
                    reply,
                } => {
                    self.authorize_group(std::mem::take(&mut group));
                    let _ = reply.send(self.allow(net, ttl, comment, caller));
                }
                Job::Revoke {
                    net,
                    comment,
                    caller,
                    reply,
                } => {
                    self.authorize_group(std::mem::take(&mut group));
                    let _ = reply.send(self.revoke(net, comment, caller));
                }
                Job::Reload { settings, reply } => {
                    self.authorize_group(std::mem::take(&mut group));
                    let _ = reply.send(self.reload(settings));
                }
                Job::Stop => {
                    self.authorize_group(std::mem::take(&mut group));
                    self.stopping = true;
                }
            }
        }
        self.authorize_group(group);
    }

    fn authorize_group(&mut self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        #[cfg(test)]
        self.shared.groups.fetch_add(1, Ordering::Relaxed);
        let s = self.shared.settings();
        let now = self.tick();
        let margin = s.raw.ttl.margin.0.as_millis() as u64;
        let max_grants = s.raw.limits.max_grants;
        let mut changes: Vec<Change> = Vec::new();
        let mut events: Vec<AuditEvent> = Vec::new();
        let mut pending: HashMap<SetKey, Pending> = HashMap::new();
        let mut order: Vec<SetKey> = Vec::new();
        let mut waiting = Vec::new();
        {
            let map = match self.shared.committed.read() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            let mut live = map.len();
            for job in jobs {
                let (cmd, caller, reply) = match job {
                    Job::Audit(ev) => {
                        events.extend(ev);
                        continue;
                    }
                    Job::Authorize { cmd, caller, reply } => (cmd, caller, reply),
                    _ => continue,
                };
                // Per item: Ok(key) to be answered after commit, or a final result now.
                let mut slots: Vec<Slot> = Vec::new();
                for it in &cmd.items {
                    let res = it
                        .ip
                        .clone()
                        .and_then(|ip| set_key(ip, cmd.client).ok_or(Refusal::FamilyMismatch));
                    let res = res.and_then(|k| {
                        let want = now + it.ttl.as_millis() as u64 + margin;
                        if let Some(p) = pending.get_mut(&k) {
                            // Named again in this group: the same rule as below, so that a
                            // grant the group keeps as committed is not extended just because
                            // several answers (aliases) name it.
                            if !covers(p.expiry, now, want, margin) {
                                p.expiry = p.expiry.max(want);
                            }
                            return Ok(k);
                        }
                        let held = map.get(&k).copied();
                        let had = held.map(|h| h.expiry());
                        let had_name = held.map_or(0, |h| h.name());
                        if let Some(h) = had.filter(|&h| covers(h, now, want, margin)) {
                            // Covered by what is committed: no kernel work, but the caller still waits
                            // for this group so it is never answered ahead of an in-flight commit.
                            pending.insert(
                                k,
                                Pending {
                                    expiry: h,
                                    had: Some(h),
                                    failed: None,
                                    first: waiting.len(),
                                    had_name,
                                    front: None,
                                },
                            );
                            order.push(k);
                            return Ok(k);
                        }
                        if had.is_none() {
                            if live >= max_grants {
                                return Err(Refusal::Full);
                            }
                            live += 1;
                        }
                        // Never shorten: the new expiry is at least the committed one.
                        let expiry = want.max(had.unwrap_or(0));
                        pending.insert(
                            k,
                            Pending {
                                expiry,
                                had,
                                failed: None,
                                first: waiting.len(),
                                had_name,
                                front: None,
                            },
                        );
                        order.push(k);
                        Ok(k)
                    });
                    match &res {
                        Ok(k) => changes.push(Change::Upsert {
                            key: grant_key(k),
                            name: cmd.qname.clone(),
                            at_ms: now,
                            expires_ms: None, // filled below, once the final expiry is known
                            source: Source::Dns,
                            comment: String::new(),
                        }),
                        Err(r) => {
                            let mut ev = event(
                                EventKind::Rejected,
                                Some(command::raw_text(&it.raw)),
                                caller,
                                r.to_string(),
                            );
                            ev.client = cmd.client;
                            ev.name = cmd.qname.clone();
                            events.push(ev);
                        }
                    }
                    slots.push((it.index, it.raw.clone(), it.ttl, res));
                }
                waiting.push((
                    cmd.qname.clone(),
                    cmd.client,
                    cmd.reason.clone(),
                    caller,
                    slots,
                    reply,
                ));
            }
        }
        // Final expiries into the upserts; drop upserts of unchanged grants (nothing to record).
        let mut named: Vec<AuditEvent> = Vec::new();
        changes.retain_mut(|c| {
            if let Change::Upsert {
                key,
                expires_ms,
                name,
                ..
            } = c
            {
                let tag = name.as_deref().map(name_tag);
                match set_key(key.net.addr(), key.client).and_then(|k| pending.get_mut(&k)) {
                    Some(p) if p.had != Some(p.expiry) => {
                        *expires_ms = Some(p.expiry);
                        p.front = tag.or(p.front);
                        true
                    }
                    // Unchanged in the kernel, but named by this answer with another name than
                    // the one the grant has at the front: record the name.
                    Some(p)
                        if tag.is_some_and(|t| t != p.front.unwrap_or(p.had_name))
                            && expires_ms.is_none() =>
                    {
                        *expires_ms = Some(p.expiry);
                        p.front = tag;
                        let mut ev = event(
                            EventKind::Named,
                            Some(key.net.addr().to_string()),
                            Caller::default(),
                            "answer",
                        );
                        ev.client = key.client;
                        ev.name = name.clone();
                        ev.expires_ms = Some(p.expiry);
                        named.push(ev);
                        true
                    }
                    _ => false,
                }
            } else {
                true
            }
        });
        events.extend(named);
        // One event per changed key, with the first name and caller that asked for it.
        let mut ops: Vec<ElemOp> = Vec::new();
        let mut op_key: Vec<SetKey> = Vec::new();
        for k in &order {
            let p = &pending[k];
            if p.had == Some(p.expiry) {
                continue;
            }
            let alive = p.had.is_some_and(|h| h + EXPIRY_GRACE_MS > now);
            for op in timeout_ops(*k, p.expiry - now, p.had.is_some(), self.readd_extends) {
                ops.push(op);
                op_key.push(*k);
            }
            let (qname, client, reason, caller) = waiting
                .get(p.first)
                .map(|w| (w.0.clone(), w.1, w.2.clone(), w.3))
                .unwrap_or_default();
            let (ip, _) = key_parts(k);
            let mut ev = event(
                if alive {
                    EventKind::Extended
                } else {
                    EventKind::Granted
                },
                Some(ip.to_string()),
                caller,
                reason,
            );
            ev.client = client;
            ev.name = qname;
            ev.expires_ms = Some(p.expiry);
            events.push(ev);
        }
        // Intent first: if we crash after this, restart re-adds it (only addresses DNS named).
        // Everything stamped before `now` was committed by earlier groups, so the mark may move
        // to `now` in the same transaction (this group's grants, stamped `now`, stay after it).
        let mark = (!self.mark_frozen && now >= self.persisted_upto + MARK_EVERY_MS)
            .then(|| now.to_string());
        let t_apply = Instant::now();
        let applied = self.store.apply_with_meta(
            &changes,
            &events,
            mark.as_deref().map(|m| (COMMITTED_META, m)),
        );
        tracing::debug!(
            store_us = t_apply.elapsed().as_micros() as u64,
            "group intent written"
        );
        if let Err(e) = applied {
            tracing::error!(error = %e, "state store write failed; failing the group closed");
            for w in waiting {
                let _ = w.5.send(Err(EngineError::Store(e.to_string())));
            }
            return;
        }
        if mark.is_some() {
            self.persisted_upto = now;
        }
        let t_store = Instant::now();
        let mut kernel_error: Option<String> = None;
        if !ops.is_empty() {
            #[cfg(test)]
            self.test_gate();
            match commit_tolerant(&mut self.nl, &self.table, &ops, &groups_of(&ops)) {
                Ok(failed) => {
                    for (i, why) in failed {
                        if let Some(p) = pending.get_mut(&op_key[i]) {
                            p.failed = Some(why);
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "netlink commit failed; reopening");
                    if let Ok(nl) = Netlink::open() {
                        self.nl = nl;
                    }
                    match commit_tolerant(&mut self.nl, &self.table, &ops, &groups_of(&ops)) {
                        Ok(failed) => {
                            for (i, why) in failed {
                                if let Some(p) = pending.get_mut(&op_key[i]) {
                                    p.failed = Some(why);
                                }
                            }
                        }
                        Err(e) => kernel_error = Some(e),
                    }
                }
            }
        }
        tracing::debug!(
            ops = ops.len(),
            changes = changes.len(),
            kernel_us = t_store.elapsed().as_micros() as u64,
            "group committed"
        );
        // Compensate the intent of whatever did not reach the kernel.
        let mut undo_changes = Vec::new();
        let mut undo_events = Vec::new();
        for (k, p) in pending.iter_mut() {
            if p.had == Some(p.expiry) {
                continue;
            }
            if let Some(e) = &kernel_error {
                p.failed.get_or_insert_with(|| e.clone());
            }
            if let Some(why) = &p.failed {
                let key = grant_key(k);
                undo_changes.push(match p.had {
                    Some(h) if h > now => Change::Upsert {
                        key,
                        name: None,
                        at_ms: now,
                        expires_ms: Some(h),
                        source: Source::Dns,
                        comment: String::new(),
                    },
                    _ => Change::Remove { key },
                });
                let mut ev = event(
                    EventKind::Rejected,
                    Some(key.net.addr().to_string()),
                    Caller::default(),
                    format!("kernel refused: {why}"),
                );
                ev.client = key.client;
                undo_events.push(ev);
            }
        }
        if !undo_changes.is_empty()
            && let Err(e) = self.store.apply(&undo_changes, &undo_events)
        {
            tracing::error!(error = %e, "could not record kernel failure in the store");
            self.mark_frozen = true;
        }
        if !self.mark_frozen {
            self.committed_upto = now;
        }
        {
            let mut map = match self.shared.committed.write() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            for (k, p) in &pending {
                if p.failed.is_none() {
                    map.insert(*k, Held::new(p.expiry, p.front.unwrap_or(p.had_name)));
                }
            }
        }
        for (_, _, _, _, slots, reply) in waiting {
            let results = slots
                .into_iter()
                .map(|(_, raw, ttl, res)| {
                    let res = res.and_then(|k| {
                        let p = &pending[&k];
                        match &p.failed {
                            Some(why) => Err(Refusal::Kernel(why.clone())),
                            None => Ok((k, p)),
                        }
                    });
                    match res {
                        Ok((_, p)) => pb::GrantResult {
                            ip: raw,
                            outcome: if p.had == Some(p.expiry) {
                                pb::Outcome::Unchanged
                            } else if p.had.is_some_and(|h| h + EXPIRY_GRACE_MS > now) {
                                pb::Outcome::Extended
                            } else {
                                pb::Outcome::Granted
                            } as i32,
                            expires_unix_ms: p.expiry,
                            effective_ttl_s: ttl.as_secs() as u32,
                            error: String::new(),
                        },
                        Err(r) => pb::GrantResult {
                            ip: raw,
                            outcome: pb::Outcome::Rejected as i32,
                            expires_unix_ms: 0,
                            effective_ttl_s: 0,
                            error: r.to_string(),
                        },
                    }
                })
                .collect();
            let _ = reply.send(Ok(results));
        }
    }

    /// Waits at the test gate, if one is installed.
    #[cfg(test)]
    fn test_gate(&self) {
        let gate = self.shared.commit_gate.lock().ok().and_then(|g| g.clone());
        if let Some(g) = gate {
            if let Ok(mut by) = g.by.lock() {
                *by = std::thread::current().name().map(str::to_owned);
            }
            let _ = g.reached.send(());
            if let Ok(rx) = g.release.lock() {
                let _ = rx.recv();
            }
        }
    }

    fn reload(&mut self, settings: Arc<Settings>) -> Result<(), EngineError> {
        let now = now_ms();
        let manual: Vec<ManualElem> = match self.shared.manual.read() {
            Ok(m) => m
                .iter()
                .filter(|(_, e)| e.is_none_or(|e| e > now))
                .map(|(net, e)| ManualElem {
                    net: *net,
                    remaining: e.map(|e| Duration::from_millis(e - now)),
                })
                .collect(),
            Err(_) => return Err(EngineError::Stopped),
        };
        let chains = self
            .nl
            .chains(&self.table)
            .map_err(|e| EngineError::Kernel(e.to_string()))?;
        nft::setup(&settings, &manual, &chains)
            .map_err(|e| EngineError::Kernel(nft::error_text(&e)))?;
        if let Err(e) = self
            .store
            .set_meta(RULESET_META, &nft::fingerprint(&settings))
        {
            tracing::warn!(error = %e, "could not record the ruleset fingerprint; the next start runs nft setup");
        }
        if let Ok(mut s) = self.shared.settings.write() {
            *s = settings;
        }
        let _ = self.store.apply(
            &[],
            &[event(
                EventKind::Started,
                None,
                Caller::default(),
                "configuration reloaded (SIGHUP)",
            )],
        );
        Ok(())
    }

    fn allow(
        &mut self,
        net: IpNet,
        ttl: Option<Duration>,
        comment: String,
        caller: Caller,
    ) -> Result<Allowed, EngineError> {
        let s = self.shared.settings();
        let net = command::check_net(net, &s.never).map_err(EngineError::Invalid)?;
        let now = now_ms();
        let expires_ms = ttl.map(|t| now + t.as_millis() as u64);
        let prev = {
            let m = self
                .shared
                .manual
                .read()
                .map_err(|_| EngineError::Stopped)?;
            if let Some(other) = m
                .keys()
                .find(|o| **o != net && (o.contains(&net) || net.contains(*o)))
            {
                return Err(EngineError::Conflict(format!(
                    "{net} overlaps manual allowance {other}; revoke it first"
                )));
            }
            m.get(&net).copied()
        };
        let key = GrantKey { net, client: None };
        let mut ev = event(
            EventKind::ManualAllow,
            Some(net.to_string()),
            caller,
            comment.clone(),
        );
        ev.expires_ms = expires_ms;
        self.store
            .apply(
                &[Change::Upsert {
                    key,
                    name: None,
                    at_ms: now,
                    expires_ms,
                    source: Source::Manual,
                    comment,
                }],
                &[ev],
            )
            .map_err(|e| EngineError::Store(e.to_string()))?;
        // Replacing an allowance (new timeout) is one transaction: no gap.
        let mut ops = Vec::new();
        if prev.is_some() {
            ops.push(ElemOp::DeleteRange {
                set: manual_set(&net).into(),
                net,
            });
        }
        ops.push(ElemOp::AddRange {
            set: manual_set(&net).into(),
            net,
            timeout: ttl,
        });
        if let Err(e) = self.nl.commit(&self.table, &ops) {
            let undo = match prev {
                Some(p) => Change::Upsert {
                    key,
                    name: None,
                    at_ms: now,
                    expires_ms: p,
                    source: Source::Manual,
                    comment: String::new(),
                },
                None => Change::Remove { key },
            };
            let why = match &e {
                SysError::Rejected { failures } if failures.iter().any(|f| f.1 == libc::EEXIST) => {
                    format!("{net} overlaps an allowance already in the kernel")
                }
                other => other.to_string(),
            };
            let _ = self.store.apply(
                &[undo],
                &[event(
                    EventKind::Rejected,
                    Some(net.to_string()),
                    caller,
                    format!("kernel refused manual allow: {why}"),
                )],
            );
            return Err(EngineError::Kernel(why));
        }
        if let Ok(mut m) = self.shared.manual.write() {
            m.insert(net, expires_ms);
        }
        Ok(Allowed { expires_ms })
    }

    fn revoke(&mut self, net: IpNet, comment: String, caller: Caller) -> Result<u64, EngineError> {
        let manual: Vec<(IpNet, Option<u64>)> = {
            let m = self
                .shared
                .manual
                .read()
                .map_err(|_| EngineError::Stopped)?;
            if let Some(outer) = m.keys().find(|o| **o != net && o.contains(&net)) {
                return Err(EngineError::Conflict(format!(
                    "{net} lies inside manual allowance {outer}; revoke {outer} instead"
                )));
            }
            m.iter()
                .filter(|(o, _)| net.contains(*o))
                .map(|(o, e)| (*o, *e))
                .collect()
        };
        // Remove from the committed view first: from now on nobody is told "granted" for these.
        let removed: Vec<(SetKey, u64)> = {
            let mut map = self
                .shared
                .committed
                .write()
                .map_err(|_| EngineError::Stopped)?;
            let keys: Vec<SetKey> = map
                .keys()
                .filter(|k| net.contains(&key_parts(k).0))
                .copied()
                .collect();
            keys.into_iter()
                .filter_map(|k| map.remove(&k).map(|e| (k, e.expiry())))
                .collect()
        };
        let mut changes = Vec::new();
        let mut events = Vec::new();
        let mut ops: Vec<ElemOp> = Vec::new();
        let now = now_ms();
        for (k, until) in &removed {
            let gk = grant_key(k);
            changes.push(Change::Remove { key: gk });
            // If fwd dies before the kernel delete below, restart deletes it.
            changes.push(Change::Tombstone {
                key: gk,
                until_ms: until + EXPIRY_GRACE_MS,
            });
            let mut ev = event(
                EventKind::Revoked,
                Some(key_parts(k).0.to_string()),
                caller,
                comment.clone(),
            );
            ev.client = gk.client;
            events.push(ev);
            ops.push(del_op(*k));
        }
        for (n, until) in &manual {
            let gk = GrantKey {
                net: *n,
                client: None,
            };
            changes.push(Change::Remove { key: gk });
            changes.push(Change::Tombstone {
                key: gk,
                until_ms: until.unwrap_or(u64::MAX / 2).max(now) + EXPIRY_GRACE_MS,
            });
            events.push(event(
                EventKind::Revoked,
                Some(n.to_string()),
                caller,
                comment.clone(),
            ));
            ops.push(ElemOp::DeleteRange {
                set: manual_set(n).into(),
                net: *n,
            });
        }
        if changes.is_empty() {
            return Ok(0);
        }
        self.store
            .apply(&changes, &events)
            .map_err(|e| EngineError::Store(e.to_string()))?;
        // Grants and allowances go in one transaction.
        let failed = commit_tolerant(&mut self.nl, &self.table, &ops, &groups_of(&ops))
            .map_err(EngineError::Kernel)?;
        if let Some((i, why)) = failed.first() {
            return Err(EngineError::Kernel(format!("{:?}: {why}", ops[*i])));
        }
        if let Ok(mut m) = self.shared.manual.write() {
            for (n, _) in &manual {
                m.remove(n);
            }
        }
        // Only now is it gone from the kernel: tell subscribers (no receivers is fine).
        let _ = self.shared.revocations.send(net);
        Ok((removed.len() + manual.len()) as u64)
    }

    /// Records kernel expiries, and renews grants that still carry live flows if configured.
    fn sweep(&mut self) {
        self.persist_mark();
        let s = self.shared.settings();
        let now = self.tick();
        let mut changes = Vec::new();
        let mut events = Vec::new();
        if s.raw.expiry.renew_live_flows {
            self.renew(now);
        }
        let gone: Vec<(SetKey, u64)> = {
            let mut map = match self.shared.committed.write() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            let gone: Vec<(SetKey, u64)> = map
                .iter()
                .filter(|(_, e)| e.expiry() + EXPIRY_GRACE_MS <= now)
                .map(|(k, e)| (*k, e.expiry()))
                .collect();
            for (k, _) in &gone {
                map.remove(k);
            }
            gone
        };
        for (k, e) in &gone {
            let gk = grant_key(k);
            changes.push(Change::Remove { key: gk });
            let mut ev = event(
                EventKind::Expired,
                Some(key_parts(k).0.to_string()),
                Caller::default(),
                "kernel timeout",
            );
            ev.client = gk.client;
            ev.expires_ms = Some(*e);
            events.push(ev);
        }
        let mgone: Vec<(IpNet, u64)> = {
            let mut m = match self.shared.manual.write() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            let g: Vec<(IpNet, u64)> = m
                .iter()
                .filter_map(|(n, e)| e.filter(|e| e + EXPIRY_GRACE_MS <= now).map(|e| (*n, e)))
                .collect();
            for (n, _) in &g {
                m.remove(n);
            }
            g
        };
        for (n, e) in &mgone {
            changes.push(Change::Remove {
                key: GrantKey {
                    net: *n,
                    client: None,
                },
            });
            let mut ev = event(
                EventKind::Expired,
                Some(n.to_string()),
                Caller::default(),
                "manual allowance timeout",
            );
            ev.expires_ms = Some(*e);
            events.push(ev);
        }
        if !changes.is_empty() {
            if let Err(e) = self.store.apply(&changes, &events) {
                tracing::error!(error = %e, "could not record expiries");
            } else {
                tracing::debug!(expired = changes.len(), "sweep");
            }
        }
    }

    /// Extends grants about to expire whose destination still has conntrack flows. The work is
    /// bounded by `renew_max_flows` entries read per sweep.
    fn renew(&mut self, now: u64) {
        let s = self.shared.settings();
        let horizon = now + 2 * s.raw.expiry.sweep_interval.0.as_millis() as u64 + EXPIRY_GRACE_MS;
        let due: Vec<(SetKey, u64)> = match self.shared.committed.read() {
            Ok(m) => m
                .iter()
                .filter(|(_, e)| e.expiry() > now && e.expiry() <= horizon)
                .map(|(k, e)| (*k, e.expiry()))
                .collect(),
            Err(_) => return,
        };
        if due.is_empty() {
            return;
        }
        let flows = match crate::sys::conntrack_flows(s.raw.expiry.renew_max_flows) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "conntrack dump failed; not renewing");
                return;
            }
        };
        let dsts: HashSet<IpAddr> = flows.iter().map(|(_, d)| *d).collect();
        let pairs: HashSet<(IpAddr, IpAddr)> = flows.into_iter().collect();
        let renew_ms = s.raw.expiry.renew_ttl.0.as_millis() as u64;
        let mut ops = Vec::new();
        let mut renewed = Vec::new();
        for (k, e) in due {
            let (dst, client) = key_parts(&k);
            let live = match client {
                Some(c) => pairs.contains(&(c, dst)),
                None => dsts.contains(&dst),
            };
            let new = now + renew_ms;
            if live && new > e {
                ops.extend(timeout_ops(k, renew_ms, true, self.readd_extends));
                renewed.push((k, new));
            }
        }
        if renewed.is_empty() {
            return;
        }
        let changes: Vec<Change> = renewed
            .iter()
            .map(|(k, e)| Change::Upsert {
                key: grant_key(k),
                name: None,
                at_ms: now,
                expires_ms: Some(*e),
                source: Source::Dns,
                comment: String::new(),
            })
            .collect();
        let events: Vec<AuditEvent> = renewed
            .iter()
            .map(|(k, e)| {
                let mut ev = event(
                    EventKind::Renewed,
                    Some(key_parts(k).0.to_string()),
                    Caller::default(),
                    "live conntrack flows",
                );
                ev.client = key_parts(k).1;
                ev.expires_ms = Some(*e);
                ev
            })
            .collect();
        if self.store.apply(&changes, &events).is_err() {
            return;
        }
        let failed: HashSet<SetKey> =
            match commit_tolerant(&mut self.nl, &self.table, &ops, &groups_of(&ops)) {
                Ok(failed) => failed
                    .iter()
                    .filter_map(|(i, _)| match &ops[*i] {
                        ElemOp::Add { key, .. } | ElemOp::Delete { key, .. } => Some(*key),
                        _ => None,
                    })
                    .collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "renewal commit failed");
                    renewed.iter().map(|(k, _)| *k).collect()
                }
            };
        if !failed.is_empty() {
            // The store recorded renewals the kernel does not have: the next start must re-add
            // what was written since the mark rather than trust it.
            tracing::warn!(
                failed = failed.len(),
                "some renewals were refused by the kernel"
            );
            self.mark_frozen = true;
        }
        if let Ok(mut m) = self.shared.committed.write() {
            for (k, e) in renewed.into_iter().filter(|(k, _)| !failed.contains(k)) {
                // A renewal records no name: the grant keeps its front name.
                let name = m.get(&k).map_or(0, |h| h.name());
                m.insert(k, Held::new(e, name));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Engine tests against the real kernel (a private network namespace per test) and real SQLite.
    use super::*;
    use crate::config::Config;
    use crate::store::{HistoryFilter, Reader};
    use std::path::Path;
    use std::process::Command;

    /// Runs `f` on a thread inside a fresh network namespace (the namespace dies with the thread).
    fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "engine tests need root: they create network namespaces and nftables tables"
        );
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET)");
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    fn settings(dir: &Path, extra: &str) -> Arc<Settings> {
        let text = format!(
            "socket = \"{0}/fwd.sock\"\ndatabase = \"{0}/fwd.db\"\n{extra}\n[access]\nauthorizer_uids = [0]\n",
            dir.display()
        );
        Arc::new(
            Config::parse(Path::new("t"), &text)
                .unwrap()
                .validate(Path::new("t"))
                .unwrap(),
        )
    }

    fn start(s: &Arc<Settings>) -> (Engine, ReconcileReport) {
        let store = Store::open(&s.raw.database).unwrap();
        Engine::start(s.clone(), store).unwrap()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cmd(ips: &[&str], ttl_s: u64, s: &Settings) -> Authorize {
        let req = pb::AuthorizeRequest {
            grants: ips
                .iter()
                .map(|a| pb::Grant {
                    ip: guard_proto::ip_to_bytes(ip(a)),
                    ttl_s: ttl_s as u32,
                })
                .collect(),
            qname: "test.example".into(),
            ..Default::default()
        };
        Authorize::parse(&req, s).unwrap()
    }

    fn root() -> Caller {
        Caller {
            uid: Some(0),
            gid: Some(0),
            pid: Some(1),
        }
    }

    /// Seconds left on `ip`'s element of AUTH4, as `nft` lists it (`None`: absent or no
    /// timeout).
    fn kernel_left(ip: &str) -> Option<u64> {
        kernel(AUTH4)
            .into_iter()
            .find_map(|(a, left)| (a == ip).then_some(left))
            .flatten()
    }

    /// Elements of an auth set as the kernel reports them through `nft -j` (independent of sys).
    fn kernel(set: &str) -> Vec<(String, Option<u64>)> {
        let out = Command::new("nft")
            .args(["-j", "list", "set", "inet", "guard", set])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut res = Vec::new();
        for o in v["nftables"].as_array().unwrap() {
            if let Some(elems) = o["set"]["elem"].as_array() {
                for e in elems {
                    if let Some(s) = e.as_str() {
                        res.push((s.to_string(), None));
                    } else {
                        let val = e["elem"]["val"].as_str().unwrap_or_default().to_string();
                        res.push((val, e["elem"]["expires"].as_u64()));
                    }
                }
            }
        }
        res
    }

    fn outcome(r: &pb::GrantResult) -> pb::Outcome {
        pb::Outcome::try_from(r.outcome).unwrap()
    }

    /// Whether this kernel's re-add of an element sets its timeout, seen through `nft` (not
    /// fwd's netlink) on a scratch element of AUTH4, removed again.
    fn kernel_readd_sets_timeout() -> bool {
        const SCRATCH: &str = "198.51.100.254";
        let nft = |args: &[&str]| {
            let st = Command::new("nft").args(args).status().unwrap();
            assert!(st.success(), "nft {args:?}");
        };
        let add = |timeout: &str| {
            let elem = format!("{{ {SCRATCH} timeout {timeout} }}");
            nft(&["add", "element", "inet", "guard", AUTH4, &elem]);
        };
        add("10s");
        add("100s");
        let left = kernel_left(SCRATCH);
        nft(&[
            "delete",
            "element",
            "inet",
            "guard",
            AUTH4,
            &format!("{{ {SCRATCH} }}"),
        ]);
        left.unwrap() > 60
    }

    #[test]
    fn extends_longer_requests_and_never_shortens() {
        extends_longer_and_never_shortens(None);
    }

    /// The same with extensions sent as a delete and an add, as on kernels whose re-add keeps
    /// the old timeout.
    #[test]
    fn extends_by_delete_and_add_where_readd_does_not() {
        extends_longer_and_never_shortens(Some(false));
    }

    /// `readd`: force the extension mode (`None`: what the probe found, checked against the
    /// kernel).
    fn extends_longer_and_never_shortens(readd: Option<bool>) {
        in_netns(move || {
            let dir = tempfile::tempdir().unwrap();
            let s = settings(dir.path(), "[ttl]\nmin = \"1s\"\nmargin = \"1s\"");
            let (e, report) = start(&s);
            match readd {
                None => assert_eq!(
                    report.extend_mode,
                    if kernel_readd_sets_timeout() {
                        "re-add"
                    } else {
                        "delete+add"
                    },
                    "the probe must find what this kernel does"
                ),
                Some(on) => {
                    if let Some(c) = e.core.lock().unwrap().as_mut() {
                        c.readd_extends = on;
                    }
                }
            }
            let rt = rt();
            let r = rt
                .block_on(e.authorize(cmd(&["192.0.2.1"], 60, &s), root()))
                .unwrap();
            assert_eq!(outcome(&r[0]), pb::Outcome::Granted);
            let first = r[0].expires_unix_ms;
            let k = kernel(AUTH4);
            assert_eq!(k.len(), 1, "{k:?}");
            assert!(k[0].1.unwrap() <= 61, "{k:?}");

            let r = rt
                .block_on(e.authorize(cmd(&["192.0.2.1"], 600, &s), root()))
                .unwrap();
            assert_eq!(outcome(&r[0]), pb::Outcome::Extended);
            assert!(r[0].expires_unix_ms > first + 500_000);
            let k = kernel(AUTH4);
            assert_eq!(k.len(), 1, "{k:?}");
            assert!(
                k[0].1.unwrap() > 500,
                "kernel timeout was not extended: {k:?}"
            );

            let longer = r[0].expires_unix_ms;
            let r = rt
                .block_on(e.authorize(cmd(&["192.0.2.1"], 60, &s), root()))
                .unwrap();
            assert_eq!(outcome(&r[0]), pb::Outcome::Unchanged);
            assert_eq!(
                r[0].expires_unix_ms, longer,
                "a shorter request must not shorten the grant"
            );
            assert!(kernel(AUTH4)[0].1.unwrap() > 500);

            // The same TTL again, once time has run: the kernel's countdown restarts too (a
            // re-add carrying an unchanged timeout alone once left the old expiry).
            let left = |ip: &str| kernel_left(ip).unwrap();
            let ip = "192.0.2.2";
            rt.block_on(e.authorize(cmd(&[ip], 4, &s), root())).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while left(ip) > 2 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the timeout does not run"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            let r = rt.block_on(e.authorize(cmd(&[ip], 4, &s), root())).unwrap();
            assert_eq!(outcome(&r[0]), pb::Outcome::Extended);
            assert!(left(ip) >= 4, "the same TTL again left {}s", left(ip));
        });
    }

    /// nettrust registered an IP as granted before the nft add, so a concurrent answer for the
    /// same IP was released before the rule existed. Every caller must find the element in the kernel.
    #[test]
    fn nettrust_race_concurrent_same_ip_waits_for_commit() {
        in_netns(|| {
            let dir = tempfile::tempdir().unwrap();
            let s = settings(dir.path(), "");
            let (e, _) = start(&s);
            // The check below dumps the set, and a set dump can miss elements while the kernel
            // resizes the set's hash table (it grows as elements arrive). 1,000 filler grants
            // (198.18.0.0/15, the benchmarking range) size the table so that the 200 addresses
            // of the race never trigger a resize: a missing element is then a real one.
            {
                let fill = rt();
                for chunk in 0..5u32 {
                    let ips: Vec<String> = (0..200u32)
                        .map(|i| {
                            std::net::Ipv4Addr::from(0xC612_0000 + chunk * 256 + i).to_string()
                        })
                        .collect();
                    let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
                    fill.block_on(e.authorize(cmd(&refs, 300, &s), root()))
                        .unwrap();
                }
            }
            // Worker threads are spawned from this thread, so they share its network namespace.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut tasks = tokio::task::JoinSet::new();
                for t in 0..32u32 {
                    let e = e.clone();
                    let s = s.clone();
                    tasks.spawn(async move {
                        let mut nl = Netlink::open().unwrap();
                        // Callers walk the same addresses at different speeds, so some arrive while
                        // another caller's commit of that address is in flight.
                        for r in 0..200u32 {
                            let addr = std::net::Ipv4Addr::new(198, 51, 100, (r % 250) as u8 + 1);
                            if (r + t) % 7 == 0 {
                                tokio::task::yield_now().await;
                            }
                            // Nameless, so the lock-free fast path (answers without the committer)
                            // is in play: that is where an early "granted" would come from.
                            let mut c = cmd(&[&addr.to_string()], 300, &s);
                            c.qname = None;
                            let res = e.authorize(c, root()).await.unwrap();
                            assert_ne!(outcome(&res[0]), pb::Outcome::Rejected);
                            // A dump the kernel could not make consistent (concurrent commits)
                            // observed nothing: dump again. Absence from a consistent dump fails.
                            let listed = (0..20)
                                .find_map(|_| nl.list("guard", AUTH4, KeyType::V4).ok())
                                .expect("no consistent dump of auth4 in 20 tries");
                            let present = listed.iter().any(|(k, _)| *k == SetKey::V4(addr));
                            assert!(
                                present,
                                "{addr} was answered {:?} before it was in the kernel",
                                outcome(&res[0])
                            );
                        }
                    });
                }
                while let Some(r) = tasks.join_next().await {
                    r.unwrap();
                }
            });
        });
    }

    /// A commit held by the gate: `addr`'s intent is in SQLite (read over a separate
    /// connection) and not yet in the kernel.
    fn assert_held_between_intent_and_kernel(s: &Settings, addr: &str) {
        let stored = Reader::open(&s.raw.database)
            .unwrap()
            .list(&Default::default())
            .unwrap()
            .0;
        assert!(
            stored.iter().any(|g| g.key.net.addr() == ip(addr)),
            "intent not written before the kernel commit: {stored:?}"
        );
        assert!(kernel(AUTH4).iter().all(|(a, _)| a != addr));
    }

    /// Polls `fut` once with a waker that does nothing: whether it can answer right now.
    fn poll_once<F: std::future::Future + Unpin>(fut: &mut F) -> std::task::Poll<F::Output> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        std::pin::Pin::new(fut).poll(&mut cx)
    }

    /// Installs a gate on `e` and returns (reached, release) for the test's side. The inline
    /// path is turned off: these tests poll the held call from their own thread, so the held
    /// commit must run on the committer thread (`inline_commit_*` tests cover the other case).
    fn gate(e: &Engine) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        e.shared.inline_off.store(true, Ordering::Relaxed);
        gate_any(e).1
    }

    /// Installs a gate on `e` (inline path left as it is); returns the gate, (reached, release).
    #[allow(clippy::type_complexity)]
    fn gate_any(e: &Engine) -> (Arc<TestGate>, (mpsc::Receiver<()>, mpsc::Sender<()>)) {
        let (reached_tx, reached) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let g = Arc::new(TestGate {
            reached: reached_tx,
            release: std::sync::Mutex::new(release_rx),
            by: std::sync::Mutex::new(None),
        });
        e.set_commit_gate(Some(g.clone()));
        (g, (reached, release))
    }

    /// A lone call on an idle engine commits on the caller's thread. Held between its SQLite
    /// intent and its kernel commit, it is still the only writer: calls for the same address
    /// made meanwhile (nameless ones would take the lock-free fast path) wait for its kernel
    /// commit and queue for the committer thread, and the held call answers only after the
    /// kernel has the element.
    #[test]
    fn inline_commit_held_call_and_calls_during_it_wait_for_the_kernel() {
        in_netns(|| {
            let dir = tempfile::tempdir().unwrap();
            let s = settings(dir.path(), "");
            let (e, _) = start(&s);
            let addr = "192.0.2.45";
            let (g, (reached, release)) = gate_any(&e);
            let first = {
                let (e, c) = (e.clone(), cmd(&[addr], 300, &s));
                // Spawned from the namespace's thread, so it shares the network namespace.
                std::thread::Builder::new()
                    .name("caller".into())
                    .spawn(move || rt().block_on(e.authorize(c, root())))
                    .unwrap()
            };
            reached.recv().unwrap();
            assert_eq!(
                g.by.lock().unwrap().as_deref(),
                Some("caller"),
                "a lone call on an idle engine must commit on its own thread"
            );
            assert_held_between_intent_and_kernel(&s, addr);
            let mut nameless = cmd(&[addr], 300, &s);
            nameless.qname = None;
            let mut calls = vec![
                Box::pin(e.authorize(nameless, root())),
                Box::pin(e.authorize(cmd(&[addr], 60, &s), root())),
                Box::pin(e.authorize(cmd(&["192.0.2.46"], 60, &s), root())),
            ];
            for (i, c) in calls.iter_mut().enumerate() {
                if let std::task::Poll::Ready(r) = poll_once(c) {
                    panic!("call {i} answered {r:?} while an inline kernel commit was held");
                }
            }
            e.set_commit_gate(None);
            release.send(()).unwrap();
            let r = first.join().unwrap().unwrap();
            assert_eq!(outcome(&r[0]), pb::Outcome::Granted);
            assert!(kernel(AUTH4).iter().any(|(a, _)| a == addr));
            let rt = rt();
            let outs: Vec<_> = calls
                .into_iter()
                .map(|c| outcome(&rt.block_on(c).unwrap()[0]))
                .collect();
            assert_eq!(
                outs,
                [
                    pb::Outcome::Unchanged,
                    pb::Outcome::Unchanged,
                    pb::Outcome::Granted
                ]
            );
        });
    }

    /// Stop ends the committer thread and closes the store with it (the last connection's
    /// close checkpoints and removes the WAL), even while other handles are alive; a later
    /// call, which would otherwise find the state free for an inline commit, fails `Stopped`.
    #[test]
    fn stop_closes_the_store_although_handles_remain() {
        in_netns(|| {
            let dir = tempfile::tempdir().unwrap();
            let s = settings(dir.path(), "");
            let (e, _) = start(&s);
            let rt = rt();
            rt.block_on(e.authorize(cmd(&["192.0.2.60"], 300, &s), root()))
                .unwrap();
            let wal = s.raw.database.with_extension("db-wal");
            assert!(wal.exists(), "{}", wal.display());
            let other = e.clone();
            e.stop();
            assert!(!wal.exists(), "store still open after stop");
            let r = rt.block_on(other.authorize(cmd(&["192.0.2.61"], 300, &s), root()));
            assert!(matches!(r, Err(EngineError::Stopped)), "{r:?}");
        });
    }

    /// The requests of one AuthorizeMany are one group commit, inline or not (committing them
    /// one by one inline would cost a transaction and a netlink batch each).
    #[test]
    fn inline_commit_authorize_many_is_one_group() {
        in_netns(|| {
            let dir = tempfile::tempdir().unwrap();
            let s = settings(dir.path(), "");
            let (e, _) = start(&s);
            let rt = rt();
            let cmds: Vec<Authorize> = (1..=16)
                .map(|i| cmd(&[&format!("192.0.2.{i}")], 300, &s))
                .collect();
            let before = e.shared.groups.load(Ordering::Relaxed);
            let r = rt.block_on(e.authorize_many(cmds, root())).unwrap();
            assert_eq!(e.shared.groups.load(Ordering::Relaxed) - before, 1);
            assert_eq!(r.len(), 16);
            for (i, one) in r.iter().enumerate() {
                assert_eq!(one.len(), 1);
                assert_eq!(one[0].ip, vec![192, 0, 2, i as u8 + 1]);
                assert_eq!(outcome(&one[0]), pb::Outcome::Granted);
            }
            assert_eq!(kernel(AUTH4).len(), 16);
            assert_eq!(e.shared.inflight.load(Ordering::Relaxed), 0);
        });
    }

    /// The nettrust race made deterministic: the committer is held between the SQLite intent of
    /// an address and its kernel commit, and calls for the same address made in that window
    /// (nameless ones take the lock-free fast path) must not be answered until the kernel has
    /// it. Inserting into the committed view before the kernel commit fails this test in debug
    /// and release builds alike.
    #[test]
    fn nettrust_race_call_during_held_commit_waits_for_the_kernel() {
        in_netns(|| {
            let dir = tempfile::tempdir().unwrap();
            let s = settings(dir.path(), "");
            let (e, _) = start(&s);
            let addr = "192.0.2.44";
            let (reached, release) = gate(&e);
            let mut first = Box::pin(e.authorize(cmd(&[addr], 300, &s), root()));
            assert!(poll_once(&mut first).is_pending(), "answered before commit");
            reached.recv().unwrap();
            // Held: the intent is in SQLite (a separate connection reads it), not in the kernel.
            assert_held_between_intent_and_kernel(&s, addr);
            let mut nameless = cmd(&[addr], 300, &s);
            nameless.qname = None;
            let mut calls = vec![
                Box::pin(e.authorize(nameless, root())),
                Box::pin(e.authorize(cmd(&[addr], 60, &s), root())),
            ];
            for (i, c) in calls.iter_mut().enumerate() {
                if let std::task::Poll::Ready(r) = poll_once(c) {
                    panic!("call {i} for {addr} answered {r:?} while its kernel commit was held");
                }
            }
            e.set_commit_gate(None);
            release.send(()).unwrap();
            let rt = rt();
            let r = rt.block_on(first).unwrap();
            assert_eq!(outcome(&r[0]), pb::Outcome::Granted);
            for c in calls {
                let r = rt.block_on(c).unwrap();
                assert_eq!(outcome(&r[0]), pb::Outcome::Unchanged);
            }
            assert!(kernel(AUTH4).iter().any(|(a, _)| a == addr));
        });
    }

    fn named(ips: &[&str], name: &str, s: &Settings) -> Authorize {
        let mut c = cmd(ips, 300, s);
        c.qname = Some(name.into());
        c
    }

    /// A repeated answer by the name the grant already has is answered on the fast path (no
    /// store write); an alias is recorded before its reply, and then is the fast name. The
    /// committer is held on another address's commit meanwhile, so "answered at once" can only
    /// be the fast path.
    #[test]
    fn known_name_takes_the_fast_path_and_an_alias_is_recorded_first() {
        in_netns(|| {
            let dir = tempfile::tempdir().unwrap();
            let s = settings(dir.path(), "");
            let (e, _) = start(&s);
            let rt = rt();
            let x = "192.0.2.50";
            rt.block_on(e.authorize(named(&[x], "A.example.", &s), root()))
                .unwrap();
            // Holds the committer on the commit of `new`, a not yet granted address.
            let hold = |e: &Engine, new: &str| {
                let (reached, release) = gate(e);
                let e = e.clone();
                let c = cmd(&[new], 300, &s);
                let mut other = Box::pin(async move { e.authorize(c, root()).await });
                assert!(poll_once(&mut other).is_pending());
                reached.recv().unwrap();
                (other, release)
            };
            let (other, release) = hold(&e, "192.0.2.98");
            let mut same = Box::pin(e.authorize(named(&[x], "a.example", &s), root()));
            let std::task::Poll::Ready(r) = poll_once(&mut same) else {
                panic!("a repeated name must not wait for the committer");
            };
            assert_eq!(outcome(&r.unwrap()[0]), pb::Outcome::Unchanged);
            let mut alias = Box::pin(e.authorize(named(&[x], "b.example", &s), root()));
            assert!(
                poll_once(&mut alias).is_pending(),
                "an alias must be recorded before the reply"
            );
            e.set_commit_gate(None);
            release.send(()).unwrap();
            rt.block_on(other).unwrap();
            assert_eq!(
                outcome(&rt.block_on(alias).unwrap()[0]),
                pb::Outcome::Unchanged
            );
            let r = Reader::open(&s.raw.database).unwrap();
            let hist = |name: &str| {
                r.history(&HistoryFilter {
                    name: Some(name.into()),
                    ..Default::default()
                })
                .unwrap()
                .iter()
                .map(|h| h.kind)
                .collect::<Vec<_>>()
            };
            assert_eq!(hist("a.example"), [EventKind::Granted]);
            assert_eq!(hist("b.example"), [EventKind::Named]);
            // The alias is now the front name: the fast one; the first name is recorded again.
            let (other, release) = hold(&e, "192.0.2.99");
            let mut b = Box::pin(e.authorize(named(&[x], "b.example", &s), root()));
            assert!(poll_once(&mut b).is_ready());
            let mut a = Box::pin(e.authorize(named(&[x], "a.example", &s), root()));
            assert!(poll_once(&mut a).is_pending());
            e.set_commit_gate(None);
            release.send(()).unwrap();
            rt.block_on(other).unwrap();
            rt.block_on(a).unwrap();
            assert_eq!(hist("a.example"), [EventKind::Named, EventKind::Granted]);
        });
    }

    /// Several aliases of a committed grant in one group are recorded without extending it
    /// (the first of them used to be judged "covered" and the next ones extended the grant, a
    /// kernel delete+add per alias).
    #[test]
    fn aliases_in_one_group_do_not_extend_a_covered_grant() {
        in_netns(|| {
            let dir = tempfile::tempdir().unwrap();
            let s = settings(dir.path(), "");
            let (e, _) = start(&s);
            let rt = rt();
            let x = "192.0.2.51";
            let first = rt
                .block_on(e.authorize(named(&[x], "a.example", &s), root()))
                .unwrap();
            let granted_until = first[0].expires_unix_ms;
            // Hold the committer on another address, so that both aliases land in one group.
            let (reached, release) = gate(&e);
            let e2 = e.clone();
            let c = cmd(&["192.0.2.97"], 300, &s);
            let mut other = Box::pin(async move { e2.authorize(c, root()).await });
            assert!(poll_once(&mut other).is_pending());
            reached.recv().unwrap();
            // The clock moves on, so that "now + TTL + margin" is later than the grant's
            // expiry (still well inside margin/2: covered).
            std::thread::sleep(Duration::from_millis(20));
            let mut b = Box::pin(e.authorize(named(&[x], "b.example", &s), root()));
            let mut c = Box::pin(e.authorize(named(&[x], "c.example", &s), root()));
            assert!(poll_once(&mut b).is_pending() && poll_once(&mut c).is_pending());
            e.set_commit_gate(None);
            release.send(()).unwrap();
            rt.block_on(other).unwrap();
            for r in [rt.block_on(b).unwrap(), rt.block_on(c).unwrap()] {
                assert_eq!(outcome(&r[0]), pb::Outcome::Unchanged, "{r:?}");
                assert_eq!(r[0].expires_unix_ms, granted_until, "{r:?}");
            }
        });
    }

    /// The intent of a grant is on disk before its kernel commit: the database files as a
    /// kill -9 leaves them at that moment (copied while the committer is held) restart into a
    /// kernel that has the grant, also on the no-dump path that trusts the commit mark.
    #[test]
    fn intent_on_disk_before_kernel_commit_survives_a_crash() {
        in_netns(|| {
            let dir = tempfile::tempdir().unwrap();
            let s = settings(dir.path(), "");
            let (e, _) = start(&s);
            let rt = rt();
            rt.block_on(e.authorize(cmd(&["192.0.2.1"], 600, &s), root()))
                .unwrap();
            let (reached, release) = gate(&e);
            let mut held = Box::pin(e.authorize(cmd(&["192.0.2.2"], 600, &s), root()));
            assert!(poll_once(&mut held).is_pending());
            reached.recv().unwrap();
            let crashed = tempfile::tempdir().unwrap();
            for f in ["fwd.db", "fwd.db-wal"] {
                std::fs::copy(dir.path().join(f), crashed.path().join(f)).unwrap();
            }
            e.set_commit_gate(None);
            release.send(()).unwrap();
            rt.block_on(held).unwrap();
            // The copy restarts in a namespace whose kernel has the ruleset and the first grant
            // (what the kernel held at the crash) but not the held one.
            let s2 = settings(crashed.path(), "");
            let v4 = in_netns(move || {
                TEST_DUMP_LIMIT.with(|c| c.set(Some(0)));
                let nft = |script: &str| {
                    assert!(Command::new("nft").arg(script).status().unwrap().success());
                };
                let other = tempfile::tempdir().unwrap();
                drop(start(&settings(other.path(), "")));
                nft("flush set inet guard auth4");
                nft("add element inet guard auth4 { 192.0.2.1 timeout 10m }");
                let (_e, r) = start(&s2);
                assert!(r.setup_skipped, "{r:?}");
                let mut v4: Vec<String> = kernel(AUTH4).into_iter().map(|(a, _)| a).collect();
                v4.sort();
                (v4, r.added)
            });
            assert_eq!(v4.0, ["192.0.2.1", "192.0.2.2"], "added {}", v4.1);
        });
    }

    #[test]
    fn restart_reconciles_kernel_with_store() {
        in_netns(|| {
            let dir = tempfile::tempdir().unwrap();
            let s = settings(dir.path(), "[ttl]\nmin = \"1s\"\nmargin = \"1s\"");
            let rt = rt();
            {
                let (e, _) = start(&s);
                rt.block_on(e.authorize(
                    cmd(&["192.0.2.1", "192.0.2.2", "2001:db8::1"], 3600, &s),
                    root(),
                ))
                .unwrap();
                rt.block_on(e.authorize(cmd(&["192.0.2.9"], 1, &s), root()))
                    .unwrap();
            }
            // Tamper with the kernel as a crash or an operator might: lose one, add a stranger.
            let nft = |script: &str| {
                let st = Command::new("nft").arg(script).status().unwrap();
                assert!(st.success(), "{script}");
            };
            nft("delete element inet guard auth4 { 192.0.2.2 }");
            nft("add element inet guard auth4 { 203.0.113.66 timeout 1h }");
            // Let the short grant lapse while "fwd is down" (the behaviour under test is expiry).
            let deadline = Instant::now() + Duration::from_secs(20);
            while kernel(AUTH4).iter().any(|(a, _)| a == "192.0.2.9") {
                assert!(Instant::now() < deadline, "kernel never expired 192.0.2.9");
                std::thread::sleep(Duration::from_millis(100));
            }
            while now_ms()
                < 2_000
                    + Reader::open(&s.raw.database)
                        .unwrap()
                        .list(&Default::default())
                        .unwrap()
                        .0
                        .iter()
                        .filter_map(|g| g.expires_ms)
                        .min()
                        .unwrap_or(0)
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            let (_e, report) = start(&s);
            assert_eq!(report.loaded, 3, "{report:?}");
            assert_eq!(report.kept, 2, "{report:?}");
            assert_eq!(report.added, 1, "{report:?}");
            assert_eq!(report.removed_stale, 1, "{report:?}");
            assert_eq!(report.expired, 1, "{report:?}");
            let mut v4: Vec<String> = kernel(AUTH4).into_iter().map(|(a, _)| a).collect();
            v4.sort();
            assert_eq!(v4, ["192.0.2.1", "192.0.2.2"]);
            assert_eq!(kernel(AUTH6).len(), 1);
            let hist = Reader::open(&s.raw.database)
                .unwrap()
                .history(&HistoryFilter {
                    limit: 100,
                    ..Default::default()
                })
                .unwrap();
            assert!(
                hist.iter().any(|h| h.kind == EventKind::Expired
                    && h.target.as_deref() == Some("192.0.2.9/32")
                    && h.reason.contains("while fwd was down")),
                "{hist:#?}"
            );
            assert!(hist.iter().any(|h| h.kind == EventKind::Started));
        });
    }

    #[test]
    fn revoke_removes_and_rejections_are_audited() {
        in_netns(|| {
            let dir = tempfile::tempdir().unwrap();
            let s = settings(dir.path(), "");
            let (e, _) = start(&s);
            let rt = rt();
            let r = rt
                .block_on(e.authorize(
                    cmd(
                        &[
                            "192.0.2.1",
                            "0.0.0.0",
                            "224.0.0.1",
                            "169.254.169.254",
                            "192.0.2.2",
                        ],
                        300,
                        &s,
                    ),
                    root(),
                ))
                .unwrap();
            let got: Vec<_> = r.iter().map(outcome).collect();
            assert_eq!(
                got,
                [
                    pb::Outcome::Granted,
                    pb::Outcome::Rejected,
                    pb::Outcome::Rejected,
                    pb::Outcome::Rejected,
                    pb::Outcome::Granted
                ]
            );
            assert!(r[3].error.contains("never-authorize"), "{:?}", r[3]);
            assert_eq!(kernel(AUTH4).len(), 2);
            let n = rt
                .block_on(e.revoke("192.0.2.0/24".parse().unwrap(), "test".into(), root()))
                .unwrap();
            assert_eq!(n, 2);
            assert!(kernel(AUTH4).is_empty());
            // Revoking is not blocking: the next DNS answer grants again.
            let r = rt
                .block_on(e.authorize(cmd(&["192.0.2.1"], 300, &s), root()))
                .unwrap();
            assert_eq!(outcome(&r[0]), pb::Outcome::Granted);
            // Audit reached the store before the reply.
            let hist = Reader::open(&s.raw.database)
                .unwrap()
                .history(&HistoryFilter {
                    limit: 100,
                    ..Default::default()
                })
                .unwrap();
            let rejected: Vec<_> = hist
                .iter()
                .filter(|h| h.kind == EventKind::Rejected)
                .collect();
            assert_eq!(rejected.len(), 3, "{hist:#?}");
            assert_eq!(
                hist.iter().filter(|h| h.kind == EventKind::Revoked).count(),
                2
            );
        });
    }

    #[test]
    fn manual_allow_conflicts_are_explained() {
        in_netns(|| {
            let dir = tempfile::tempdir().unwrap();
            let s = settings(dir.path(), "");
            let (e, _) = start(&s);
            let rt = rt();
            rt.block_on(e.allow(
                "203.0.113.0/24".parse().unwrap(),
                Some(Duration::from_secs(60)),
                "x".into(),
                root(),
            ))
            .unwrap();
            let err = rt
                .block_on(e.allow(
                    "203.0.113.0/25".parse().unwrap(),
                    None,
                    String::new(),
                    root(),
                ))
                .unwrap_err();
            assert!(err.to_string().contains("overlaps"), "{err}");
            let err = rt
                .block_on(e.revoke("203.0.113.0/26".parse().unwrap(), String::new(), root()))
                .unwrap_err();
            assert!(err.to_string().contains("inside manual allowance"), "{err}");
            let err = rt
                .block_on(e.allow(
                    "169.254.0.0/24".parse().unwrap(),
                    None,
                    String::new(),
                    root(),
                ))
                .unwrap_err();
            assert!(matches!(err, EngineError::Invalid(_)), "{err}");
            // Re-allowing the same network replaces its timeout.
            rt.block_on(e.allow(
                "203.0.113.0/24".parse().unwrap(),
                None,
                String::new(),
                root(),
            ))
            .unwrap();
            let out = Command::new("nft")
                .args(["list", "set", "inet", "guard", nft::MANUAL4])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("203.0.113.0/24") && !text.contains("expires"),
                "{text}"
            );
            assert_eq!(
                rt.block_on(e.revoke("203.0.113.0/24".parse().unwrap(), String::new(), root()))
                    .unwrap(),
                1
            );
        });
    }

    #[test]
    fn restart_skips_nft_when_ruleset_unchanged_and_reinstalls_on_change() {
        in_netns(|| {
            let dir = tempfile::tempdir().unwrap();
            let s = settings(dir.path(), "");
            let (_, r) = start(&s);
            assert!(!r.setup_skipped, "first start must install the ruleset");
            let (_, r) = start(&s);
            assert!(r.setup_skipped, "unchanged config must not run nft: {r:?}");
            let changed = settings(dir.path(), "[allow]\ncidrs = [\"203.0.113.0/24\"]");
            let (_, r) = start(&changed);
            assert!(!r.setup_skipped, "a changed config must reinstall: {r:?}");
            let out = Command::new("nft")
                .args(["list", "set", "inet", "guard", "allow4"])
                .output()
                .unwrap();
            assert!(String::from_utf8_lossy(&out.stdout).contains("203.0.113.0/24"));
            // The table deleted behind fwd's back is rebuilt whatever the fingerprint says.
            assert!(
                Command::new("nft")
                    .args(["delete", "table", "inet", "guard"])
                    .status()
                    .unwrap()
                    .success()
            );
            let (_, r) = start(&changed);
            assert!(!r.setup_skipped, "a missing table must be rebuilt: {r:?}");
        });
    }

    /// A crash between the revoke's store write and its kernel delete must not leave the
    /// revoked grant live: the tombstone makes restart delete it, also without a set dump.
    #[test]
    fn revoked_grant_is_removed_at_restart_after_crash_window() {
        for dump in [true, false] {
            in_netns(move || {
                TEST_DUMP_LIMIT.with(|c| c.set(Some(if dump { 100_000 } else { 0 })));
                let dir = tempfile::tempdir().unwrap();
                let s = settings(dir.path(), "");
                {
                    let (e, _) = start(&s);
                    rt().block_on(e.authorize(cmd(&["192.0.2.7", "192.0.2.8"], 600, &s), root()))
                        .unwrap();
                }
                // Simulate the crash window: the store says revoked, the kernel still has it.
                let mut st = Store::open(&s.raw.database).unwrap();
                let key = GrantKey::host(ip("192.0.2.7"), None);
                st.apply(
                    &[
                        Change::Remove { key },
                        Change::Tombstone {
                            key,
                            until_ms: now_ms() + 600_000,
                        },
                    ],
                    &[],
                )
                .unwrap();
                drop(st);
                assert!(kernel(AUTH4).iter().any(|(a, _)| a == "192.0.2.7"));
                let (_e, r) = start(&s);
                let v4: Vec<String> = kernel(AUTH4).into_iter().map(|(a, _)| a).collect();
                assert_eq!(v4, ["192.0.2.8"], "dump={dump}: {r:?}");
                if !dump {
                    assert_eq!(r.tombstoned, 1, "{r:?}");
                }
            });
        }
    }

    /// Above the dump limit, restart reads no set back: with the ruleset in place it re-adds
    /// only grants written after the commit mark (a crash may have cut their commit); with the
    /// table gone it re-adds everything.
    #[test]
    fn large_restart_readds_after_the_commit_mark_without_dump() {
        in_netns(|| {
            TEST_DUMP_LIMIT.with(|c| c.set(Some(0)));
            let dir = tempfile::tempdir().unwrap();
            let s = settings(dir.path(), "");
            {
                let (e, _) = start(&s);
                rt().block_on(e.authorize(cmd(&["192.0.2.1", "2001:db8::1"], 600, &s), root()))
                    .unwrap();
                e.stop();
            }
            // A grant whose intent reached SQLite after the mark, but not the kernel (crash).
            let mut st = Store::open(&s.raw.database).unwrap();
            let late = GrantKey::host(ip("192.0.2.99"), None);
            let at = now_ms() + 1_000;
            st.apply(
                &[Change::Upsert {
                    key: late,
                    name: None,
                    at_ms: at,
                    expires_ms: Some(at + 600_000),
                    source: Source::Dns,
                    comment: String::new(),
                }],
                &[],
            )
            .unwrap();
            drop(st);
            let (_e, r) = start(&s);
            assert!(r.setup_skipped, "{r:?}");
            assert_eq!(
                (r.added, r.kept),
                (1, 2),
                "only the late grant is re-added: {r:?}"
            );
            let mut v4: Vec<String> = kernel(AUTH4).into_iter().map(|(a, _)| a).collect();
            v4.sort();
            assert_eq!(v4, ["192.0.2.1", "192.0.2.99"]);
            assert!(kernel(AUTH4).iter().all(|(_, t)| t.unwrap() > 500));
            drop(_e);
            // Table gone (a reboot, or an operator): everything is re-added.
            assert!(
                Command::new("nft")
                    .args(["delete", "table", "inet", "guard"])
                    .status()
                    .unwrap()
                    .success()
            );
            let (_e, r) = start(&s);
            assert!(!r.setup_skipped, "{r:?}");
            assert_eq!(r.added, 3, "{r:?}");
            assert_eq!(kernel(AUTH4).len(), 2);
            assert_eq!(kernel(AUTH6).len(), 1);
        });
    }

    #[test]
    fn revoke_writes_a_tombstone_with_the_removal() {
        in_netns(|| {
            let dir = tempfile::tempdir().unwrap();
            let s = settings(dir.path(), "");
            let (e, _) = start(&s);
            let rt = rt();
            rt.block_on(e.authorize(cmd(&["192.0.2.5"], 600, &s), root()))
                .unwrap();
            rt.block_on(e.revoke("192.0.2.5/32".parse().unwrap(), String::new(), root()))
                .unwrap();
            let mut st = Store::open(&s.raw.database).unwrap();
            let t = st.live_tombstones(now_ms()).unwrap();
            assert_eq!(t, [GrantKey::host(ip("192.0.2.5"), None)]);
            // A new DNS answer for it clears the tombstone (restart must not delete a live grant).
            rt.block_on(e.authorize(cmd(&["192.0.2.5"], 600, &s), root()))
                .unwrap();
            assert!(st.live_tombstones(now_ms()).unwrap().is_empty());
        });
    }

    #[test]
    fn manual_sets_are_reconciled_at_restart() {
        in_netns(|| {
            let dir = tempfile::tempdir().unwrap();
            let s = settings(dir.path(), "");
            {
                let (e, _) = start(&s);
                rt().block_on(e.allow(
                    "203.0.113.0/24".parse().unwrap(),
                    None,
                    String::new(),
                    root(),
                ))
                .unwrap();
            }
            let nft = |script: &str| {
                assert!(
                    Command::new("nft").arg(script).status().unwrap().success(),
                    "{script}"
                )
            };
            nft("delete element inet guard manual4 { 203.0.113.0/24 }");
            nft("add element inet guard manual4 { 198.51.100.0/25 }");
            let (_e, r) = start(&s);
            assert!(r.setup_skipped, "{r:?}");
            assert_eq!(r.manual_fixed, 2, "{r:?}");
            let out = Command::new("nft")
                .args(["list", "set", "inet", "guard", "manual4"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("203.0.113.0/24") && !text.contains("198.51.100.0/25"),
                "{text}"
            );
        });
    }
}
