//! SQLite state and the append-only audit history (WAL, versioned schema, one writer).
//!
//! One [`Store`] (the writer) lives on fwd's writer thread and turns each group-committed batch
//! into one transaction; RPC handlers read through [`Reader`]s, which WAL lets run concurrently
//! with the writer.
//!
//! Addresses are stored as 16-byte blobs in IPv6 form (IPv4 as v4-mapped) with separate family
//! and prefix columns. Within one family the blob order is the numeric order, so "network inside
//! CIDR" is a range scan on an index: `addr BETWEEN network AND broadcast AND prefix >= len`.
//! (With `prefix >= len`, any address of the grant inside the range puts its whole network
//! inside it, so keys whose address carries host bits still filter correctly.)

use std::fs::OpenOptions;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use parking_lot::{Mutex, MutexGuard};
use rusqlite::types::{Value, ValueRef};
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior, params,
};

use crate::model::{AuditEvent, Caller, Change, EventKind, GrantKey, GrantRow, Source};

/// Schema version this build writes; `PRAGMA user_version` after all migrations ran.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// `PRAGMA application_id` of guard's database ("gRD1"), so a foreign SQLite file is refused
/// instead of being migrated.
pub const APPLICATION_ID: i32 = 0x6752_4431;

/// Names kept per grant, most recent first.
pub const MAX_NAMES_PER_GRANT: usize = 8;

/// Bytes kept of a name (the DNS limit in presentation form).
pub const MAX_NAME_BYTES: usize = 255;

/// Bytes kept of an audit target; it may be arbitrary caller text.
pub const MAX_TARGET_BYTES: usize = 255;

/// Bytes kept of an audit reason.
pub const MAX_REASON_BYTES: usize = 4096;

/// Rows returned when a filter's limit is 0.
pub const DEFAULT_LIMIT: u32 = 1000;

/// Largest number of rows one list or history call returns.
pub const MAX_LIMIT: u32 = 100_000;

/// How long a connection waits on a lock before failing. Only the WAL checkpoint and
/// recovery paths ever make readers wait on the writer.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Audit rows deleted per transaction by [`Store::prune_audit`], so the WAL stays small and
/// checkpoints can progress during a large prune.
const PRUNE_CHUNK: i64 = 50_000;

/// Least time between two background checkpoints; commits in between are folded into the next.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// WAL size at which the writer checkpoints itself (200 MB; set in pages of the database's own
/// size). Only a backstop: the checkpointer thread keeps the WAL far below it, so the Authorize
/// path does not pay a whole checkpoint's fsyncs.
const WRITER_AUTOCHECKPOINT_BYTES: i64 = 50_000 * 4096;

/// WAL size over which the checkpointer follows its checkpoint with a short catch-up checkpoint
/// under the writer's gate, so that the next commit restarts the WAL from its first frame.
///
/// Under a steady stream of commits a passive checkpoint never copies the frames appended
/// while it ran, and SQLite restarts the WAL only when every frame has been copied: the WAL
/// grew without bound (93 MB in 5,000 back-to-back Authorize calls), every commit wrote to
/// fresh file pages (page cache allocation and ext4 block reservation: about 20 % of fwd's CPU
/// per call), and only the writer's own 200 MB autocheckpoint ever reset it.
const RESTART_WAL_BYTES: i64 = 4 << 20;

/// Least time between two catch-up checkpoints. Each one holds commits back while it copies
/// what was appended during the checkpoint before it, with two fsyncs: 2–25 ms here (3–6 ms
/// under back-to-back single calls; up to 25 ms under 32 callers, when an fsync waits for an
/// ext4 journal commit). At 250 ms the WAL stays near 28 MB in back-to-back single-grant
/// calls and is rewritten in place: fwd's CPU per call fell from 182 to 160 µs, against 176
/// µs with 1 s between restarts (a WAL over the 64 MB `journal_size_limit` of then, truncated
/// at every restart, and its tail on fresh pages again) and 164 µs with 100 ms (more stalls, p99 up).
const RESTART_EVERY: Duration = Duration::from_millis(250);

/// A checkpoint slower than this means a disk slow to sync: the catch-up checkpoint, which
/// would hold commits back about as long, waits for a later round (and one that held them
/// longer is logged as a warning), unless the WAL has grown past [`FORCE_FACTOR`] times
/// [`RESTART_WAL_BYTES`].
const SLOW_PASS: Duration = Duration::from_millis(100);

/// A WAL this many times over [`RESTART_WAL_BYTES`] (16 MB) gets its catch-up checkpoint even
/// when the disk is slow to sync. Holding commits back for one slow sync every
/// [`RESTART_EVERY`] beats the alternative: a WAL that grows until the writer's own
/// autocheckpoint ([`WRITER_AUTOCHECKPOINT_BYTES`]) copies all of it inside a commit: on a
/// disk where every passive checkpoint takes over [`SLOW_PASS`] (a tail of 90 ms was seen
/// here copying 40 MB), there would be no restart at all before that.
const FORCE_FACTOR: i64 = 4;

/// `journal_size_limit`: never truncate the WAL file; it keeps the size of its largest use
/// (bounded by the writer's autocheckpoint, [`WRITER_AUTOCHECKPOINT_BYTES`]). SQLite truncates
/// it in the commit that follows a restart; after a burst of writes that `ftruncate` took
/// 246 ms here (ext4, pages under writeback), inside an Authorize call.
const JOURNAL_SIZE_LIMIT: i64 = -1;

/// Page size of a newly created database, instead of SQLite's 4096. A single-grant Authorize
/// transaction dirties about 7 pages (one per b-tree it touches), each a whole WAL frame, so
/// smaller pages write less (store bench, CPU per single-grant transaction: 71 µs at 4096,
/// 56 at 2048, 52 at 1024). Below 2048 the gain is lost end to end: pages split and the
/// database grows more often (more frames per commit, 21 writes per Authorize instead of 16
/// at 1024), 256-grant transactions cost 2 µs more per grant, and the page cache's per-page
/// overhead adds several MB at 1M grants.
const NEW_PAGE_SIZE: i64 = 2048;

/// Ordered migrations: entry `i` moves the schema from version `i` to `i + 1`. Never edit a
/// released entry; append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: grants, their names, the audit history.
    r#"
    -- Current grants. `client` is X'' when the grant is not client-scoped: a NULL would make
    -- every non-client grant distinct under the unique key.
    CREATE TABLE grants (
        id         INTEGER PRIMARY KEY,
        family     INTEGER NOT NULL CHECK (family IN (4, 6)),
        addr       BLOB    NOT NULL CHECK (length(addr) = 16),
        prefix     INTEGER NOT NULL CHECK (prefix BETWEEN 0 AND 128),
        client     BLOB    NOT NULL CHECK (length(client) IN (0, 4, 16)),
        first_ms   INTEGER NOT NULL,
        last_ms    INTEGER NOT NULL,
        expires_ms INTEGER,
        source     TEXT    NOT NULL,
        comment    TEXT    NOT NULL DEFAULT '',
        -- JSON array of at most 8 normalized names, most recent first. Kept inline so an
        -- extension by the same name rewrites only this row.
        names      TEXT    NOT NULL DEFAULT '[]'
    );
    CREATE UNIQUE INDEX grants_key ON grants (family, addr, prefix, client);

    -- Name -> grant index, mirroring grants.names; written only when a grant's name set
    -- changes. No foreign key: a cascade would need a second index on grant_id, and the
    -- writer deletes the rows it knows from grants.names instead.
    CREATE TABLE grant_names (
        name     TEXT    NOT NULL,
        grant_id INTEGER NOT NULL,
        PRIMARY KEY (name, grant_id)
    ) WITHOUT ROWID;

    -- Append-only history. `target` is the exact (bounded) text; target_* hold its parsed
    -- address when it is an IP or CIDR, for range filtering.
    CREATE TABLE audit (
        id            INTEGER PRIMARY KEY,
        at_ms         INTEGER NOT NULL,
        kind          TEXT    NOT NULL,
        target        TEXT,
        target_family INTEGER,
        target_addr   BLOB,
        target_prefix INTEGER,
        client        BLOB,
        name          TEXT,
        uid           INTEGER,
        gid           INTEGER,
        pid           INTEGER,
        reason        TEXT    NOT NULL,
        expires_ms    INTEGER
    );
    CREATE INDEX audit_at ON audit (at_ms);
    CREATE INDEX audit_target ON audit (target_family, target_addr) WHERE target_addr IS NOT NULL;
    CREATE INDEX audit_name ON audit (name, at_ms) WHERE name IS NOT NULL;
    CREATE TRIGGER audit_append_only BEFORE UPDATE ON audit
    BEGIN
        SELECT RAISE(ABORT, 'audit rows are append-only');
    END;
    "#,
    // 2: key/value metadata (the fingerprint of the installed ruleset) and revocation tombstones.
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE tombstones (
        family   INTEGER NOT NULL,
        addr     BLOB NOT NULL,
        prefix   INTEGER NOT NULL,
        client   BLOB NOT NULL,
        until_ms INTEGER NOT NULL,
        PRIMARY KEY (family, addr, prefix, client)
    ) WITHOUT ROWID;
    "#,
];

/// Errors of the store; each names the operation and the database it failed on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory that should hold the database does not exist.
    #[error("cannot open database {}: directory {} does not exist", path.display(), dir.display())]
    MissingDir {
        /// Database path.
        path: PathBuf,
        /// Its missing parent.
        dir: PathBuf,
    },
    /// Creating the database file (mode 0600) failed.
    #[error("cannot create database file {}", path.display())]
    Create {
        /// Database path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// SQLite could not open the file.
    #[error("cannot open database {}", path.display())]
    Open {
        /// Database path.
        path: PathBuf,
        /// Cause.
        source: rusqlite::Error,
    },
    /// Another process holds the database (see [`connect`]): most likely a second fwd.
    #[error(
        "database {} is in use by another process (another fwd running on it?); fwd holds its database exclusively",
        path.display()
    )]
    InUse {
        /// Database path.
        path: PathBuf,
    },
    /// The file exists but is not an SQLite database.
    #[error("{} is not an SQLite database (refusing to overwrite it)", path.display())]
    NotADatabase {
        /// Database path.
        path: PathBuf,
    },
    /// The file is an SQLite database of another application.
    #[error("{} is an SQLite database of another application (application_id {found:#x})", path.display())]
    ForeignDatabase {
        /// Database path.
        path: PathBuf,
        /// Its application id.
        found: i32,
    },
    /// The schema was written by a newer guard.
    #[error(
        "database {} has schema version {found}, newer than version {supported} that this fwd supports; refusing to use it",
        path.display()
    )]
    SchemaTooNew {
        /// Database path.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Newest version this build knows.
        supported: u32,
    },
    /// A reader found a schema that the writer has not migrated yet.
    #[error(
        "database {} has schema version {found}, older than version {supported}; open it with the writer first",
        path.display()
    )]
    SchemaTooOld {
        /// Database path.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this build needs.
        supported: u32,
    },
    /// Setting a connection pragma failed.
    #[error("cannot configure database {} ({pragma})", path.display())]
    Configure {
        /// Database path.
        path: PathBuf,
        /// The pragma that failed.
        pragma: &'static str,
        /// Cause.
        source: rusqlite::Error,
    },
    /// The file system refused WAL mode (readers would block the writer).
    #[error("database {} cannot use WAL journaling (got journal_mode={mode})", path.display())]
    NoWal {
        /// Database path.
        path: PathBuf,
        /// The mode SQLite kept.
        mode: String,
    },
    /// A migration failed; the transaction was rolled back.
    #[error("cannot migrate database {} to schema version {version}", path.display())]
    Migrate {
        /// Database path.
        path: PathBuf,
        /// Version being migrated to.
        version: u32,
        /// Cause.
        source: rusqlite::Error,
    },
    /// A write failed; the whole transaction was rolled back.
    #[error("cannot write database {} ({op})", path.display())]
    Write {
        /// Database path.
        path: PathBuf,
        /// The failed step.
        op: &'static str,
        /// Cause.
        source: rusqlite::Error,
    },
    /// A query failed.
    #[error("cannot read database {} ({op})", path.display())]
    Read {
        /// Database path.
        path: PathBuf,
        /// The failed query.
        op: &'static str,
        /// Cause.
        source: rusqlite::Error,
    },
    /// A stored row does not decode into the model.
    #[error("corrupt row in the database: {what}")]
    Corrupt {
        /// What was wrong, with the row id.
        what: String,
    },
    /// Reading the size of a database file failed.
    #[error("cannot stat database file {}", path.display())]
    Stat {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}

/// What [`Reader::list`] returns.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only grants whose network lies inside this CIDR (same address family).
    pub within: Option<IpNet>,
    /// Only grants that carry this name (exact, case-insensitive, trailing dot ignored).
    pub name: Option<String>,
    /// Rows to return; 0 means [`DEFAULT_LIMIT`], capped at [`MAX_LIMIT`].
    pub limit: u32,
}

/// What [`Reader::history`] returns.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    /// Only events whose target is an address or network inside this CIDR (same family).
    pub within: Option<IpNet>,
    /// Only events about this name (exact, case-insensitive, trailing dot ignored).
    pub name: Option<String>,
    /// Only events at or after this wall-clock Unix ms.
    pub since_ms: Option<u64>,
    /// Rows to return; 0 means [`DEFAULT_LIMIT`], capped at [`MAX_LIMIT`].
    pub limit: u32,
}

/// Sizes reported by [`Reader::stats`].
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    /// Bytes of the main file plus the WAL.
    pub db_bytes: u64,
    /// Rows in the audit history.
    pub audit_events: u64,
    /// Current grants.
    pub grants: u64,
}

/// The writer connection; exactly one per process, owned by the writer thread.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// Whether the tombstone table may hold rows. When it cannot, an upsert skips the lookup that
    /// clears its key's tombstone (one index probe per grant on the hot path).
    tombstones: bool,
    /// Checkpoints the WAL off the writer thread; `None` if its thread could not start.
    checkpointer: Option<Checkpointer>,
    /// Held for each write transaction of [`Store::apply_with_meta`] and by the checkpointer's
    /// catch-up checkpoint (see [`RESTART_WAL_BYTES`]). Uncontended otherwise.
    gate: Arc<Mutex<()>>,
}

/// The background checkpointer: its own connection on its own thread, nudged after each commit.
///
/// The writer's commits only append to the WAL (`synchronous=NORMAL`: no fsync); moving the WAL
/// into the main file, with its two fsyncs, happens here, off the Authorize path. A passive
/// checkpoint never blocks the writer or readers; only the short catch-up checkpoint that lets
/// the WAL restart (see [`RESTART_WAL_BYTES`]) holds commits back, for a few milliseconds.
#[derive(Debug)]
struct Checkpointer {
    nudge: Option<mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// When the checkpointer makes the WAL restart: see [`RESTART_WAL_BYTES`].
#[derive(Debug, Clone, Copy)]
struct Restart {
    /// WAL frames over which it does under load.
    frames: i64,
    /// Least time between two catch-up checkpoints.
    every: Duration,
    /// A passive checkpoint slower than this skips the catch-up (below `FORCE_FACTOR` times
    /// `frames`).
    slow: Duration,
}

/// A read-only (`query_only`) connection for RPC handlers; several may exist.
#[derive(Debug)]
pub struct Reader {
    conn: Connection,
    path: PathBuf,
}

// === impl Store ===

impl Store {
    /// Opens or creates the database (file mode 0600 when created) and migrates it to
    /// [`SCHEMA_VERSION`].
    ///
    /// Runs with `journal_mode=WAL` so readers never block the writer, and
    /// `synchronous=NORMAL`: a commit has been written (`write(2)`) to the WAL when
    /// [`Store::apply`] returns, so it is durable against a crash of fwd (kill -9 loses nothing,
    /// the WAL is in the page cache), and only a power loss or kernel crash can lose the commits
    /// since the last checkpoint. The nftables sets are kernel memory and do not survive that
    /// either, so the grants such a loss can drop are grants the kernel has dropped too; skipping
    /// the fsync per batch keeps the Authorize hot path off the disk's flush latency. The
    /// database itself stays consistent (WAL frames are checksummed; a torn tail is discarded).
    ///
    /// Checkpoints (the only fsyncs) run on a background thread, see [`Checkpointer`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, RESTART_WAL_BYTES, RESTART_EVERY, SLOW_PASS)
    }

    /// [`Store::open`] with the checkpointer's WAL restart threshold, spacing and slow-disk
    /// line given.
    fn open_with(
        path: &Path,
        restart_bytes: i64,
        restart_every: Duration,
        slow_pass: Duration,
    ) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.is_dir()
        {
            return Err(StoreError::MissingDir {
                path: path.to_owned(),
                dir: dir.to_owned(),
            });
        }
        // Create the file ourselves so it gets 0600 regardless of umask; SQLite gives the WAL
        // and shm files the mode of the main file.
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(StoreError::Create {
                    path: path.to_owned(),
                    source,
                });
            }
        }
        let mut conn = connect(path)?;
        check_header(&conn, path, false)?;
        // A new database gets smaller pages: an Authorize's transaction dirties one page per
        // b-tree it touches (about 7), and each is a whole WAL frame. The page size is fixed
        // when the first page is written (here by the switch to WAL), so an existing database
        // keeps its own.
        let pages: i64 = conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .map_err(|e| configure_error(path, "page_count", e))?;
        if pages == 0 {
            conn.pragma_update(None, "page_size", NEW_PAGE_SIZE)
                .map_err(|e| configure_error(path, "page_size", e))?;
        }

        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| configure_error(path, "journal_mode=WAL", e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal {
                path: path.to_owned(),
                mode,
            });
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| configure_error(path, "synchronous=NORMAL", e))?;
        // Keep the index pages the hot path touches in memory (negative = KiB).
        conn.pragma_update(None, "cache_size", -16_384)
            .map_err(|e| configure_error(path, "cache_size", e))?;
        let page_size: i64 = conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .map_err(|e| configure_error(path, "page_size", e))?;
        conn.pragma_update(
            None,
            "wal_autocheckpoint",
            WRITER_AUTOCHECKPOINT_BYTES / page_size.max(512),
        )
        .map_err(|e| configure_error(path, "wal_autocheckpoint", e))?;
        conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
            .map_err(|e| configure_error(path, "journal_size_limit", e))?;
        migrate(&mut conn, path)?;
        let tombstones = conn
            .query_row("SELECT EXISTS (SELECT 1 FROM tombstones)", [], |r| {
                r.get::<_, bool>(0)
            })
            .map_err(|source| StoreError::Read {
                path: path.to_owned(),
                op: "scan tombstones",
                source,
            })?;
        let gate = Arc::new(Mutex::new(()));
        let checkpointer = match Checkpointer::start(
            path,
            Arc::clone(&gate),
            Restart {
                frames: restart_bytes / page_size.max(512),
                every: restart_every,
                slow: slow_pass,
            },
        ) {
            Ok(c) => Some(c),
            Err(e) => {
                // The writer's own autocheckpoint still bounds the WAL.
                tracing::warn!(error = %e, "no background checkpointer; the writer checkpoints");
                None
            }
        };
        Ok(Store {
            conn,
            path: path.to_owned(),
            tombstones,
            checkpointer,
            gate,
        })
    }

    /// The database path, for opening [`Reader`]s.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies grant changes and appends audit events in ONE transaction; on error nothing
    /// is applied. Upsert semantics are documented on [`Change`]. Names are normalized with
    /// [`normalize_name`] and each grant keeps the [`MAX_NAMES_PER_GRANT`] most recent
    /// distinct ones. Event ids are assigned by the store (the `id` field is ignored).
    pub fn apply(&mut self, changes: &[Change], events: &[AuditEvent]) -> Result<(), StoreError> {
        self.apply_with_meta(changes, events, None)
    }

    /// [`Store::apply`], also storing `meta` (key, value) in the metadata table in the same
    /// transaction (the engine's commit mark rides along with a group's intent this way).
    pub fn apply_with_meta(
        &mut self,
        changes: &[Change],
        events: &[AuditEvent],
        meta: Option<(&str, &str)>,
    ) -> Result<(), StoreError> {
        if changes.is_empty() && events.is_empty() && meta.is_none() {
            return Ok(());
        }
        let path = &self.path;
        let tombstones = &mut self.tombstones;
        let werr = |op: &'static str| {
            move |source| StoreError::Write {
                path: path.clone(),
                op,
                source,
            }
        };
        let gate = self.gate.lock();
        let tx = Immediate::begin(&self.conn).map_err(werr("begin"))?;
        for change in changes {
            match change {
                Change::Upsert {
                    key,
                    name,
                    at_ms,
                    expires_ms,
                    source,
                    comment,
                } => {
                    let name = name
                        .as_deref()
                        .map(normalize_name)
                        .filter(|n| !n.is_empty());
                    upsert_grant(&tx, key, name, *at_ms, *expires_ms, *source, comment)
                        .map_err(|(op, e)| werr(op)(e))?;
                    if *tombstones {
                        let k = KeyCols::new(key);
                        tx.prepare_cached(
                            "DELETE FROM tombstones \
                             WHERE family = ?1 AND addr = ?2 AND prefix = ?3 AND client = ?4",
                        )
                        .and_then(|mut st| {
                            st.execute(params![k.family, &k.addr[..], k.prefix, k.client()])
                        })
                        .map_err(werr("clear tombstone"))?;
                    }
                }
                Change::Tombstone { key, until_ms } => {
                    // Set before the write: if the transaction rolls back, the flag only costs
                    // lookups, while a missed flag would leave a tombstone uncleared.
                    *tombstones = true;
                    let k = KeyCols::new(key);
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO tombstones (family, addr, prefix, client, until_ms) \
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    .and_then(|mut st| {
                        st.execute(params![k.family, &k.addr[..], k.prefix, k.client(), *until_ms as i64])
                    })
                    .map_err(werr("write tombstone"))?;
                }
                Change::Remove { key } => {
                    remove_grant(&tx, key).map_err(|(op, e)| werr(op)(e))?;
                }
            }
        }
        if !events.is_empty() {
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO audit (at_ms, kind, target, target_family, target_addr, \
                       target_prefix, client, name, uid, gid, pid, reason, expires_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                )
                .map_err(werr("append audit event"))?;
            for ev in events {
                let target = ev.target.as_deref().map(|t| bound(t, MAX_TARGET_BYTES));
                let parsed = target.and_then(parse_target);
                let client = ev.client.map(client_bytes);
                ins.execute(params![
                    to_sql_ms(ev.at_ms),
                    ev.kind.as_str(),
                    target,
                    parsed.map(|p| p.0),
                    parsed.as_ref().map(|p| &p.1[..]),
                    parsed.map(|p| p.2),
                    client.as_deref(),
                    ev.name.as_deref().map(normalize_name),
                    ev.caller.uid,
                    ev.caller.gid,
                    ev.caller.pid,
                    bound(&ev.reason, MAX_REASON_BYTES),
                    ev.expires_ms.map(to_sql_ms),
                ])
                .map_err(werr("append audit event"))?;
            }
        }
        if let Some((key, value)) = meta {
            tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")
                .and_then(|mut s| s.execute([key, value]))
                .map_err(werr("write meta"))?;
        }
        tx.commit().map_err(werr("commit"))?;
        // Fair: a waiting catch-up checkpoint gets the gate before this thread's next commit
        // (a plain unlock lets a writer committing back to back starve it).
        MutexGuard::unlock_fair(gate);
        self.nudge_checkpointer();
        Ok(())
    }

    fn nudge_checkpointer(&self) {
        if let Some(tx) = self.checkpointer.as_ref().and_then(|c| c.nudge.as_ref()) {
            // Full means a nudge is already pending: this commit is folded into it.
            let _ = tx.try_send(());
        }
    }

    /// Streams every current grant (key, expiry, source), without names, for the start-up
    /// reconcile. Stops at the first row that does not decode.
    pub fn for_each_grant(
        &self,
        mut f: impl FnMut(GrantKey, Option<u64>, Source),
    ) -> Result<(), StoreError> {
        self.for_each_grant_since(|k, e, s, _| f(k, e, s))
    }

    /// Like [`Store::for_each_grant`], also passing each grant's `last_ms` (its latest write).
    pub fn for_each_grant_since(
        &self,
        mut f: impl FnMut(GrantKey, Option<u64>, Source, u64),
    ) -> Result<(), StoreError> {
        let rerr = |source| StoreError::Read {
            path: self.path.clone(),
            op: "scan grants",
            source,
        };
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, family, addr, prefix, client, expires_ms, source, last_ms FROM grants",
            )
            .map_err(rerr)?;
        let mut rows = stmt.query([]).map_err(rerr)?;
        while let Some(row) = rows.next().map_err(rerr)? {
            let id = row.get_ref(0).map_err(rerr)?.as_i64().unwrap_or(0);
            let key = key_from_row(row, id, 1).map_err(|e| e.into_store(rerr))?;
            let expires = opt_ms(row, 5, id, "expires_ms").map_err(|e| e.into_store(rerr))?;
            let source = match row.get_ref(6).map_err(rerr)? {
                ValueRef::Text(b"dns") => Source::Dns,
                ValueRef::Text(b"manual") => Source::Manual,
                other => {
                    return Err(corrupt(id, format!("unknown source {other:?}")));
                }
            };
            let last = row.get_ref(7).map_err(rerr)?.as_i64().unwrap_or(0).max(0) as u64;
            f(key, expires, source, last);
        }
        Ok(())
    }

    /// How many grants the table holds (to size in-memory maps before loading them).
    pub fn grant_count(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT count(*) FROM grants", [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(|source| StoreError::Read {
                path: self.path.clone(),
                op: "count grants",
                source,
            })
    }

    /// The value stored under `key` in the metadata table.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|source| StoreError::Read {
                path: self.path.clone(),
                op: "read meta",
                source,
            })
    }

    /// Stores `value` under `key` in the metadata table.
    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute([key, value]))
            .map(|_| self.nudge_checkpointer())
            .map_err(|source| StoreError::Write {
                path: self.path.clone(),
                op: "write meta",
                source,
            })
    }

    /// Returns the keys still tombstoned at `now_ms` and forgets the ones whose time has passed.
    pub fn live_tombstones(&mut self, now_ms: u64) -> Result<Vec<GrantKey>, StoreError> {
        let path = self.path.clone();
        let rerr = |source| StoreError::Read {
            path: path.clone(),
            op: "scan tombstones",
            source,
        };
        self.conn
            .execute(
                "DELETE FROM tombstones WHERE until_ms <= ?1",
                [now_ms as i64],
            )
            .map_err(|source| StoreError::Write {
                path: path.clone(),
                op: "expire tombstones",
                source,
            })?;
        let mut out = Vec::new();
        {
            let mut stmt = self
                .conn
                .prepare("SELECT 0, family, addr, prefix, client FROM tombstones")
                .map_err(rerr)?;
            let mut rows = stmt.query([]).map_err(rerr)?;
            while let Some(row) = rows.next().map_err(rerr)? {
                out.push(key_from_row(row, 0, 1).map_err(|e| e.into_store(rerr))?);
            }
        }
        self.tombstones = !out.is_empty();
        Ok(out)
    }

    /// Deletes audit events older than `before_ms` (retention) and returns how many. Deletes
    /// in chunks of bounded transactions so a large prune does not grow the WAL unboundedly.
    pub fn prune_audit(&mut self, before_ms: u64) -> Result<u64, StoreError> {
        let werr = |source| StoreError::Write {
            path: self.path.clone(),
            op: "prune audit",
            source,
        };
        let mut total = 0u64;
        loop {
            let n = self
                .conn
                .prepare_cached(
                    "DELETE FROM audit WHERE id IN \
                       (SELECT id FROM audit WHERE at_ms < ?1 LIMIT ?2)",
                )
                .and_then(|mut s| s.execute(params![to_sql_ms(before_ms), PRUNE_CHUNK]))
                .map_err(werr)?;
            total += n as u64;
            if (n as i64) < PRUNE_CHUNK {
                return Ok(total);
            }
        }
    }
}

// === impl Checkpointer ===

impl Checkpointer {
    fn start(path: &Path, gate: Arc<Mutex<()>>, restart: Restart) -> Result<Self, StoreError> {
        let conn = connect(path)?;
        let (nudge, rx) = mpsc::sync_channel::<()>(1);
        let path = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("checkpointer".into())
            .spawn(move || Self::run(&conn, &path, &rx, &gate, restart))
            .map_err(|source| StoreError::Create {
                path: PathBuf::from("(checkpointer thread)"),
                source,
            })?;
        Ok(Checkpointer {
            nudge: Some(nudge),
            thread: Some(thread),
        })
    }

    /// One passive checkpoint per nudge, at most one per [`CHECKPOINT_EVERY`]; ends when the
    /// store is dropped.
    ///
    /// The pause between checkpoints parks the thread instead of waiting on the channel: a
    /// commit during the pause leaves its nudge in the channel (capacity 1; later ones are
    /// folded into it) without waking this thread, so the commit path never pays a context
    /// switch for it. Drop unparks the thread to end the pause early.
    ///
    /// When the WAL has grown past `restart.frames` (commits kept appending while the
    /// checkpoints ran), at most once per `restart.every` a second checkpoint runs under
    /// `gate`: no commit can append meanwhile, so it copies the last few frames, and the next
    /// commit restarts the WAL from the start of the file.
    fn run(
        conn: &Connection,
        path: &Path,
        rx: &mpsc::Receiver<()>,
        gate: &Mutex<()>,
        restart: Restart,
    ) {
        // One PASSIVE checkpoint: copies what no reader still needs, never waits for a lock.
        // Returns (frames in the WAL, frames copied) and the time taken.
        let checkpoint = || {
            let t = Instant::now();
            let res = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            });
            let frames = res.map_err(|e| {
                tracing::warn!(path = %path.display(), error = %e, "WAL checkpoint failed");
            });
            (frames, t.elapsed())
        };
        // The WAL has frames and the checkpoint copied every one: the next write restarts it.
        let all_copied =
            |frames: Result<(i64, i64), ()>| frames.is_ok_and(|(n, done)| n > 0 && done == n);
        let mut pending = false;
        let mut last_restart: Option<Instant> = None;
        let mut restarts: u64 = 0;
        while pending || rx.recv().is_ok() {
            let (frames, took) = checkpoint();
            let spaced = last_restart.is_none_or(|t| t.elapsed() >= restart.every);
            // Under load: the WAL has grown past the threshold (commits kept appending while
            // the checkpoints ran). Idle: this checkpoint copied every frame, so the next
            // commit would restart the WAL, and pay for it (below).
            let grown = frames.is_ok_and(|(n, _)| n >= restart.frames);
            let far = frames.is_ok_and(|(n, _)| n >= restart.frames * FORCE_FACTOR);
            let copied = all_copied(frames);
            // The gated pass copies what commits appended meanwhile, but its time is mostly
            // its fsyncs: 2-25 ms here (an fsync that has to wait for an ext4 journal commit
            // takes about 20 ms), whatever the frames. A disk slower than that would hold
            // commits back as long: no restart this round, unless the WAL is far over.
            if spaced && (grown || copied) && (took <= restart.slow || far) {
                let gated = Instant::now();
                let _gate = gate.lock();
                if all_copied(checkpoint().0) {
                    // Everything is copied and no commit can start: restart the WAL here.
                    // SQLite restarts it in the first write transaction that finds it copied,
                    // and that transaction fsyncs the new WAL header before its frames: done
                    // by a commit, that fsync (1-20 ms, 200-500 ms after a burst of writes
                    // here) landed in an Authorize call. A one-row write does it instead.
                    restarts += 1;
                    if let Err(e) = conn
                        .prepare_cached(
                            "INSERT INTO meta (key, value) VALUES ('wal_restarts', ?1) \
                             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        )
                        .and_then(|mut st| st.execute([restarts.to_string()]))
                    {
                        tracing::warn!(path = %path.display(), error = %e, "WAL restart write failed");
                    }
                }
                let held = gated.elapsed();
                if held > restart.slow {
                    tracing::warn!(
                        held_ms = held.as_millis() as u64,
                        "a WAL catch-up checkpoint held commits back: the disk is slow to sync"
                    );
                } else {
                    tracing::debug!(
                        held_us = held.as_micros() as u64,
                        "catch-up checkpoint and WAL restart"
                    );
                }
                last_restart = Some(Instant::now());
            }
            pending = false;
            let until = Instant::now() + CHECKPOINT_EVERY;
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::park_timeout(left);
                match rx.try_recv() {
                    // Commits during the pause: one more checkpoint right after it.
                    Ok(()) => pending = true,
                    Err(mpsc::TryRecvError::Empty) => {}
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.nudge.take();
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

// === impl Reader ===

impl Reader {
    /// Opens a `query_only` connection to a database the writer has already created and
    /// migrated.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = connect(path)?;
        check_header(&conn, path, true)?;
        conn.pragma_update(None, "query_only", true)
            .map_err(|e| configure_error(path, "query_only", e))?;
        Ok(Reader {
            conn,
            path: path.to_owned(),
        })
    }

    /// Current grants matching `filter`, ordered by address, and how many match in total.
    pub fn list(&self, filter: &ListFilter) -> Result<(Vec<GrantRow>, u64), StoreError> {
        let rerr = |source| StoreError::Read {
            path: self.path.clone(),
            op: "list grants",
            source,
        };
        let mut clauses: Vec<&str> = Vec::new();
        let mut args: Vec<Value> = Vec::new();
        if let Some(net) = &filter.within {
            clauses.push("g.family = ? AND g.addr BETWEEN ? AND ? AND g.prefix >= ?");
            push_within(&mut args, net);
        }
        if let Some(name) = &filter.name {
            clauses.push("g.id IN (SELECT grant_id FROM grant_names WHERE name = ?)");
            args.push(Value::Text(normalize_name(name)));
        }
        let where_sql = where_clause(&clauses);

        // One read transaction, so `total` and the rows come from the same WAL snapshot.
        // Dropping it at the end only ends the read.
        let snapshot = self.conn.unchecked_transaction().map_err(rerr)?;
        let total: i64 = snapshot
            .prepare_cached(&format!("SELECT count(*) FROM grants g{where_sql}"))
            .and_then(|mut s| s.query_row(rusqlite::params_from_iter(args.iter()), |r| r.get(0)))
            .map_err(rerr)?;

        args.push(Value::Integer(i64::from(effective_limit(filter.limit))));
        let mut stmt = snapshot
            .prepare_cached(&format!(
                "SELECT g.id, g.family, g.addr, g.prefix, g.client, g.first_ms, g.last_ms, \
                   g.expires_ms, g.source, g.comment, g.names \
                 FROM grants g{where_sql} \
                 ORDER BY g.family, g.addr, g.prefix, g.client LIMIT ?"
            ))
            .map_err(rerr)?;
        let mut out = Vec::new();
        let mut rows = stmt
            .query(rusqlite::params_from_iter(args.iter()))
            .map_err(rerr)?;
        while let Some(row) = rows.next().map_err(rerr)? {
            let id: i64 = row.get(0).map_err(rerr)?;
            let key = key_from_row(row, id, 1).map_err(|e| e.into_store(rerr))?;
            let first_ms = req_ms(row, 5, id, "first_ms").map_err(|e| e.into_store(rerr))?;
            let last_ms = req_ms(row, 6, id, "last_ms").map_err(|e| e.into_store(rerr))?;
            let expires_ms = opt_ms(row, 7, id, "expires_ms").map_err(|e| e.into_store(rerr))?;
            let source: String = row.get(8).map_err(rerr)?;
            let source = Source::parse(&source)
                .ok_or_else(|| corrupt(id, format!("unknown source {source:?}")))?;
            let comment: String = row.get(9).map_err(rerr)?;
            let names: String = row.get(10).map_err(rerr)?;
            let names: Vec<String> = serde_json::from_str(&names)
                .map_err(|e| corrupt(id, format!("bad name list: {e}")))?;
            out.push(GrantRow {
                key,
                names,
                first_ms,
                last_ms,
                expires_ms,
                source,
                comment,
            });
        }
        Ok((out, u64::try_from(total).unwrap_or(0)))
    }

    /// Audit events matching `filter`, newest first.
    pub fn history(&self, filter: &HistoryFilter) -> Result<Vec<AuditEvent>, StoreError> {
        let rerr = |source| StoreError::Read {
            path: self.path.clone(),
            op: "read history",
            source,
        };
        let mut clauses: Vec<&str> = Vec::new();
        let mut args: Vec<Value> = Vec::new();
        if let Some(net) = &filter.within {
            clauses
                .push("target_family = ? AND target_addr BETWEEN ? AND ? AND target_prefix >= ?");
            push_within(&mut args, net);
        }
        if let Some(name) = &filter.name {
            clauses.push("name = ?");
            args.push(Value::Text(normalize_name(name)));
        }
        if let Some(since) = filter.since_ms {
            clauses.push("at_ms >= ?");
            args.push(Value::Integer(to_sql_ms(since)));
        }
        args.push(Value::Integer(i64::from(effective_limit(filter.limit))));
        // (at_ms, id) is exactly the audit_at index order, so this needs no sort when
        // filtering by time only.
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT id, at_ms, kind, target, client, name, uid, gid, pid, reason, expires_ms \
                 FROM audit{} ORDER BY at_ms DESC, id DESC LIMIT ?",
                where_clause(&clauses)
            ))
            .map_err(rerr)?;
        let mut rows = stmt
            .query(rusqlite::params_from_iter(args.iter()))
            .map_err(rerr)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(rerr)? {
            out.push(event_from_row(row).map_err(|e| e.into_store(rerr))?);
        }
        Ok(out)
    }

    /// File sizes and row counts.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let rerr = |source| StoreError::Read {
            path: self.path.clone(),
            op: "stats",
            source,
        };
        let count = |sql: &str| -> Result<u64, StoreError> {
            let n: i64 = self
                .conn
                .prepare_cached(sql)
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(rerr)?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        let grants = count("SELECT count(*) FROM grants")?;
        let audit_events = count("SELECT count(*) FROM audit")?;
        let mut db_bytes = file_len(&self.path)?;
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        db_bytes += file_len(Path::new(&wal))?;
        Ok(StoreStats {
            db_bytes,
            audit_events,
            grants,
        })
    }
}

// === helpers ===

/// Normalizes a DNS name for storage and lookup: lowercased, one trailing dot stripped
/// (the root "." stays), bounded to [`MAX_NAME_BYTES`] on a character boundary.
pub fn normalize_name(name: &str) -> String {
    let name = match name.strip_suffix('.') {
        Some(stripped) if !stripped.is_empty() => stripped,
        _ => name,
    };
    bound(&name.to_lowercase(), MAX_NAME_BYTES).to_owned()
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn bound(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn effective_limit(limit: u32) -> u32 {
    match limit {
        0 => DEFAULT_LIMIT,
        n => n.min(MAX_LIMIT),
    }
}

fn where_clause(clauses: &[&str]) -> String {
    if clauses.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", clauses.join(" AND "))
    }
}

/// Binds `family, low, high, prefix` for a "network inside `net`" range clause.
fn push_within(args: &mut Vec<Value>, net: &IpNet) {
    args.push(Value::Integer(family(net.addr())));
    args.push(Value::Blob(addr_bytes(net.network()).to_vec()));
    args.push(Value::Blob(addr_bytes(net.broadcast()).to_vec()));
    args.push(Value::Integer(i64::from(net.prefix_len())));
}

fn family(ip: IpAddr) -> i64 {
    match ip {
        IpAddr::V4(_) => 4,
        IpAddr::V6(_) => 6,
    }
}

/// IPv6 form: IPv4 as v4-mapped, so both families share one ordered column.
fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn addr_from_bytes(family: i64, b: &[u8]) -> Option<IpAddr> {
    let b: [u8; 16] = b.try_into().ok()?;
    let v6 = Ipv6Addr::from(b);
    match family {
        4 => v6.to_ipv4_mapped().map(IpAddr::V4),
        6 => Some(IpAddr::V6(v6)),
        _ => None,
    }
}

/// Client encoding: raw 4 or 16 bytes, so the family survives; the empty blob means "none".
fn client_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn client_from_bytes(b: &[u8]) -> Option<Option<IpAddr>> {
    match b.len() {
        0 => Some(None),
        4 => <[u8; 4]>::try_from(b)
            .ok()
            .map(|a| Some(IpAddr::V4(Ipv4Addr::from(a)))),
        16 => <[u8; 16]>::try_from(b)
            .ok()
            .map(|a| Some(IpAddr::V6(Ipv6Addr::from(a)))),
        _ => None,
    }
}

/// The unique-key columns of a grant.
/// A write transaction (`BEGIN IMMEDIATE`) run through cached statements: rusqlite's
/// `Transaction` parses `BEGIN IMMEDIATE` and `COMMIT` anew for every transaction, a few µs of
/// each Authorize. Rolled back when dropped uncommitted, like rusqlite's.
struct Immediate<'c> {
    conn: &'c Connection,
}

impl<'c> Immediate<'c> {
    fn begin(conn: &'c Connection) -> rusqlite::Result<Self> {
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        Ok(Immediate { conn })
    }

    /// Commits; on failure, dropping `self` rolls back whatever SQLite left open.
    fn commit(self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("COMMIT")?.execute([]).map(drop)
    }
}

impl Drop for Immediate<'_> {
    fn drop(&mut self) {
        if !self.conn.is_autocommit() {
            let _ = self
                .conn
                .prepare_cached("ROLLBACK")
                .and_then(|mut s| s.execute([]));
        }
    }
}

impl std::ops::Deref for Immediate<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

struct KeyCols {
    family: i64,
    addr: [u8; 16],
    prefix: i64,
    client: [u8; 16],
    client_len: usize,
}

impl KeyCols {
    fn new(key: &GrantKey) -> Self {
        let mut client = [0u8; 16];
        let client_len = match key.client {
            None => 0,
            Some(IpAddr::V4(v4)) => {
                client[..4].copy_from_slice(&v4.octets());
                4
            }
            Some(IpAddr::V6(v6)) => {
                client.copy_from_slice(&v6.octets());
                16
            }
        };
        KeyCols {
            family: family(key.net.addr()),
            addr: addr_bytes(key.net.addr()),
            prefix: i64::from(key.net.prefix_len()),
            client,
            client_len,
        }
    }

    fn client(&self) -> &[u8] {
        &self.client[..self.client_len]
    }
}

/// A failed write step: which one, and SQLite's error.
type StepError = (&'static str, rusqlite::Error);

/// Insert or update one grant (semantics on [`Change::Upsert`]); `name` is normalized.
///
/// The two hot cases take one statement each: an extension that keeps the front name is one
/// `UPDATE` (the name index is untouched), a new grant one `INSERT ... ON CONFLICT DO NOTHING`
/// (then its name is indexed). Only when the front name changes is the name list read,
/// reordered and rewritten with the index kept in step. (`RETURNING` would fold the two into one
/// statement, but SQLite buffers its rows in an ephemeral table, which measured slower.)
fn upsert_grant(
    tx: &Connection,
    key: &GrantKey,
    name: Option<String>,
    at_ms: u64,
    expires_ms: Option<u64>,
    source: Source,
    comment: &str,
) -> Result<(), StepError> {
    let k = KeyCols::new(key);
    let at = to_sql_ms(at_ms);
    let expires = expires_ms.map(to_sql_ms);
    let names = names_json(name.as_slice());
    // The name is at the front when the stored list (always written by `names_json`) is this
    // one-name list or starts with its first element: a text comparison, no JSON parse.
    let front = name
        .as_ref()
        .map(|_| format!("{},", &names[..names.len() - 1]));
    let extended = tx
        .prepare_cached(
            "UPDATE grants SET last_ms = ?5, expires_ms = ?6, \
               comment = CASE WHEN ?7 <> '' THEN ?7 ELSE comment END \
             WHERE family = ?1 AND addr = ?2 AND prefix = ?3 AND client = ?4 \
               AND (?9 IS NULL OR names = ?8 OR substr(names, 1, length(?9)) = ?9)",
        )
        .and_then(|mut s| {
            s.execute(params![
                k.family,
                &k.addr[..],
                k.prefix,
                k.client(),
                at,
                expires,
                comment,
                names,
                front,
            ])
        })
        .map_err(|e| ("extend grant", e))?;
    if extended > 0 {
        return Ok(());
    }
    let inserted = tx
        .prepare_cached(
            "INSERT INTO grants (family, addr, prefix, client, first_ms, last_ms, expires_ms, \
               source, comment, names) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7, ?8, ?9) \
             ON CONFLICT (family, addr, prefix, client) DO NOTHING",
        )
        .and_then(|mut s| {
            s.execute(params![
                k.family,
                &k.addr[..],
                k.prefix,
                k.client(),
                at,
                expires,
                source.as_str(),
                comment,
                names,
            ])
        })
        .map_err(|e| ("insert grant", e))?;
    if inserted > 0 {
        if let Some(name) = &name {
            index_name(tx, name, tx.last_insert_rowid())?;
        }
        return Ok(());
    }
    let (id, stored): (i64, String) = tx
        .prepare_cached(
            "SELECT id, names FROM grants \
             WHERE family = ?1 AND addr = ?2 AND prefix = ?3 AND client = ?4",
        )
        .and_then(|mut s| {
            s.query_row(params![k.family, &k.addr[..], k.prefix, k.client()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
        })
        .map_err(|e| ("look up grant", e))?;

    // Only when the front name changes is the list rewritten and the index touched.
    let mut new_names = None;
    if let Some(name) = name {
        let mut names: Vec<String> = match serde_json::from_str(&stored) {
            Ok(names) => names,
            Err(e) => {
                // Only an outside edit gets here; rebuild rather than fail every Authorize
                // that touches this grant.
                tracing::warn!(grant = id, error = %e, "unreadable name list, resetting it");
                tx.prepare_cached("DELETE FROM grant_names WHERE grant_id = ?1")
                    .and_then(|mut s| s.execute([id]))
                    .map_err(|e| ("reset grant names", e))?;
                Vec::new()
            }
        };
        if names.first() != Some(&name) {
            match names.iter().position(|n| *n == name) {
                Some(at) => {
                    names.remove(at);
                }
                None => index_name(tx, &name, id)?,
            }
            names.insert(0, name);
            for dropped in names.split_off(names.len().min(MAX_NAMES_PER_GRANT)) {
                unindex_name(tx, &dropped, id)?;
            }
            new_names = Some(names_json(&names));
        }
    }
    tx.prepare_cached(
        "UPDATE grants SET last_ms = ?2, expires_ms = ?3, \
           comment = CASE WHEN ?4 <> '' THEN ?4 ELSE comment END, \
           names = coalesce(?5, names) \
         WHERE id = ?1",
    )
    .and_then(|mut s| {
        s.execute(params![
            id,
            to_sql_ms(at_ms),
            expires_ms.map(to_sql_ms),
            comment,
            new_names,
        ])
    })
    .map_err(|e| ("update grant", e))?;
    Ok(())
}

/// Delete one grant and its name-index rows; a missing grant is not an error.
fn remove_grant(tx: &Connection, key: &GrantKey) -> Result<(), StepError> {
    let k = KeyCols::new(key);
    let removed: Option<(i64, String)> = tx
        .prepare_cached(
            "DELETE FROM grants \
             WHERE family = ?1 AND addr = ?2 AND prefix = ?3 AND client = ?4 \
             RETURNING id, names",
        )
        .and_then(|mut s| {
            s.query_row(params![k.family, &k.addr[..], k.prefix, k.client()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
        })
        .map_err(|e| ("remove grant", e))?;
    let Some((id, names)) = removed else {
        return Ok(());
    };
    match serde_json::from_str::<Vec<String>>(&names) {
        Ok(names) => {
            for name in &names {
                unindex_name(tx, name, id)?;
            }
            Ok(())
        }
        Err(_) => tx
            .prepare_cached("DELETE FROM grant_names WHERE grant_id = ?1")
            .and_then(|mut s| s.execute([id]))
            .map(drop)
            .map_err(|e| ("remove grant names", e)),
    }
}

fn index_name(tx: &Connection, name: &str, id: i64) -> Result<(), StepError> {
    tx.prepare_cached("INSERT OR IGNORE INTO grant_names (name, grant_id) VALUES (?1, ?2)")
        .and_then(|mut s| s.execute(params![name, id]))
        .map(drop)
        .map_err(|e| ("index grant name", e))
}

fn unindex_name(tx: &Connection, name: &str, id: i64) -> Result<(), StepError> {
    tx.prepare_cached("DELETE FROM grant_names WHERE name = ?1 AND grant_id = ?2")
        .and_then(|mut s| s.execute(params![name, id]))
        .map(drop)
        .map_err(|e| ("unindex grant name", e))
}

fn names_json<S: AsRef<str> + serde::Serialize>(names: &[S]) -> String {
    // Serializing strings cannot fail.
    serde_json::to_string(names).unwrap_or_else(|_| "[]".to_owned())
}

/// Splits an audit target into (family, address, prefix) when it is an IP or CIDR.
fn parse_target(t: &str) -> Option<(i64, [u8; 16], i64)> {
    let net = match t.parse::<IpAddr>() {
        Ok(ip) => IpNet::from(ip),
        Err(_) => t.parse::<IpNet>().ok()?,
    };
    Some((
        family(net.addr()),
        addr_bytes(net.addr()),
        i64::from(net.prefix_len()),
    ))
}

/// Unix ms into SQLite's signed integer; saturates far beyond any real time.
fn to_sql_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// A decode failure: either SQLite's or a value that does not fit the model.
enum DecodeError {
    Sql(rusqlite::Error),
    Corrupt(StoreError),
}

impl DecodeError {
    fn into_store(self, rerr: impl Fn(rusqlite::Error) -> StoreError) -> StoreError {
        match self {
            DecodeError::Sql(e) => rerr(e),
            DecodeError::Corrupt(e) => e,
        }
    }
}

impl From<rusqlite::Error> for DecodeError {
    fn from(e: rusqlite::Error) -> Self {
        DecodeError::Sql(e)
    }
}

fn corrupt(id: i64, what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what: format!("row {id}: {what}"),
    }
}

/// Decodes `family, addr, prefix, client` starting at column `at`.
fn key_from_row(row: &Row<'_>, id: i64, at: usize) -> Result<GrantKey, DecodeError> {
    let fam = row.get_ref(at)?.as_i64().map_err(rusqlite::Error::from)?;
    let addr = row
        .get_ref(at + 1)?
        .as_blob()
        .map_err(rusqlite::Error::from)?;
    let prefix = row
        .get_ref(at + 2)?
        .as_i64()
        .map_err(rusqlite::Error::from)?;
    let client = row
        .get_ref(at + 3)?
        .as_blob()
        .map_err(rusqlite::Error::from)?;
    let bad = |what: &str| DecodeError::Corrupt(corrupt(id, what));
    let ip = addr_from_bytes(fam, addr).ok_or_else(|| bad("bad grant address"))?;
    let prefix = u8::try_from(prefix).map_err(|_| bad("bad grant prefix"))?;
    let net = IpNet::new(ip, prefix).map_err(|_| bad("bad grant prefix"))?;
    let client = client_from_bytes(client).ok_or_else(|| bad("bad grant client"))?;
    Ok(GrantKey { net, client })
}

fn opt_ms(row: &Row<'_>, col: usize, id: i64, what: &str) -> Result<Option<u64>, DecodeError> {
    match row.get::<_, Option<i64>>(col)? {
        None => Ok(None),
        Some(v) => u64::try_from(v)
            .map(Some)
            .map_err(|_| DecodeError::Corrupt(corrupt(id, format!("negative {what}")))),
    }
}

fn req_ms(row: &Row<'_>, col: usize, id: i64, what: &str) -> Result<u64, DecodeError> {
    let v: i64 = row.get(col)?;
    u64::try_from(v).map_err(|_| DecodeError::Corrupt(corrupt(id, format!("negative {what}"))))
}

fn event_from_row(row: &Row<'_>) -> Result<AuditEvent, DecodeError> {
    let id: i64 = row.get(0)?;
    let bad = |what: String| DecodeError::Corrupt(corrupt(id, what));
    let kind: String = row.get(2)?;
    let kind =
        EventKind::parse(&kind).ok_or_else(|| bad(format!("unknown event kind {kind:?}")))?;
    let client = match row.get_ref(4)? {
        ValueRef::Null => None,
        ValueRef::Blob(b) if !b.is_empty() => {
            client_from_bytes(b).ok_or_else(|| bad("bad event client".into()))?
        }
        _ => return Err(bad("bad event client".into())),
    };
    let id_u = |v: Option<i64>, what: &str| -> Result<Option<u32>, DecodeError> {
        v.map(|v| u32::try_from(v).map_err(|_| bad(format!("bad {what}"))))
            .transpose()
    };
    let pid = row
        .get::<_, Option<i64>>(8)?
        .map(|v| i32::try_from(v).map_err(|_| bad("bad pid".into())))
        .transpose()?;
    Ok(AuditEvent {
        id: u64::try_from(id).map_err(|_| bad("negative id".into()))?,
        at_ms: req_ms(row, 1, id, "at_ms")?,
        kind,
        target: row.get(3)?,
        client,
        name: row.get(5)?,
        caller: Caller {
            uid: id_u(row.get(6)?, "uid")?,
            gid: id_u(row.get(7)?, "gid")?,
            pid,
        },
        reason: row.get(9)?,
        expires_ms: opt_ms(row, 10, id, "expires_ms")?,
    })
}

fn file_len(path: &Path) -> Result<u64, StoreError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(source) => Err(StoreError::Stat {
            path: path.to_owned(),
            source,
        }),
    }
}

fn is_not_a_database(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::NotADatabase)
}

fn configure_error(path: &Path, pragma: &'static str, source: rusqlite::Error) -> StoreError {
    if is_not_a_database(&source) {
        StoreError::NotADatabase {
            path: path.to_owned(),
        }
    } else if source.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) {
        StoreError::InUse {
            path: path.to_owned(),
        }
    } else {
        StoreError::Configure {
            path: path.to_owned(),
            pragma,
            source,
        }
    }
}

/// Opens an existing file (never creates one) and sets the per-connection pragmas.
///
/// Through SQLite's `unix-excl` VFS: the first connection takes an exclusive lock on the file
/// and holds it, so the WAL index lives in fwd's memory instead of a shared `-shm` mapping, and
/// taking and releasing the WAL locks (six per transaction) costs no `fcntl` calls (about 4 %
/// of fwd's CPU per Authorize). fwd's own connections (writer, checkpointer, readers) share
/// that lock; another process cannot open the database while fwd runs, which also keeps a
/// second fwd off a database in use.
fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags_and_vfs(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        c"unix-excl",
    )
    .map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| configure_error(path, "busy_timeout", e))?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(|e| configure_error(path, "foreign_keys", e))?;
    // Sorts for list/history stay off the disk; they are bounded by MAX_LIMIT rows.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(|e| configure_error(path, "temp_store", e))?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// Reads `application_id` and `user_version` (the first read of the file, so garbage shows
/// up here) and refuses foreign or too-new databases; a reader also refuses unmigrated ones.
fn check_header(conn: &Connection, path: &Path, reader: bool) -> Result<u32, StoreError> {
    let app: i32 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(|e| configure_error(path, "application_id", e))?;
    if app != 0 && app != APPLICATION_ID {
        return Err(StoreError::ForeignDatabase {
            path: path.to_owned(),
            found: app,
        });
    }
    let found = user_version(conn).map_err(|e| configure_error(path, "user_version", e))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: path.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if reader && found < SCHEMA_VERSION {
        return Err(StoreError::SchemaTooOld {
            path: path.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(found)
}

fn user_version(conn: &Connection) -> rusqlite::Result<u32> {
    let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    // user_version is a signed 32-bit field; a negative one is "newer than anything".
    Ok(u32::try_from(v).unwrap_or(u32::MAX))
}

/// Runs the missing migrations, each in its own immediate transaction with its version bump.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let version = i as u32 + 1;
        let merr = |source| StoreError::Migrate {
            path: path.to_owned(),
            version,
            source,
        };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(merr)?;
        // Re-read under the write lock: another opener may have migrated meanwhile.
        let found = user_version(&tx).map_err(merr)?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                path: path.to_owned(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found >= version {
            continue;
        }
        tx.execute_batch(sql).map_err(merr)?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(merr)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(merr)?;
        tx.commit().map_err(merr)?;
        tracing::info!(path = %path.display(), version, "migrated database schema");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    use super::*;

    fn temp_db() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guard.db");
        (dir, path)
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn key(n: &str, client: Option<&str>) -> GrantKey {
        GrantKey {
            net: net(n),
            client: client.map(ip),
        }
    }

    fn upsert(key: GrantKey, name: Option<&str>, at_ms: u64, expires_ms: Option<u64>) -> Change {
        Change::Upsert {
            key,
            name: name.map(str::to_owned),
            at_ms,
            expires_ms,
            source: Source::Dns,
            comment: String::new(),
        }
    }

    fn event(kind: EventKind, target: Option<&str>, name: Option<&str>, at_ms: u64) -> AuditEvent {
        AuditEvent {
            id: 0,
            at_ms,
            kind,
            target: target.map(str::to_owned),
            client: None,
            name: name.map(str::to_owned),
            caller: Caller {
                uid: Some(1000),
                gid: Some(1000),
                pid: Some(42),
            },
            reason: "test".into(),
            expires_ms: None,
        }
    }

    fn list_all(r: &Reader) -> Vec<GrantRow> {
        r.list(&ListFilter::default()).unwrap().0
    }

    fn raw(path: &Path) -> Connection {
        Connection::open(path).unwrap()
    }

    /// The name index must mirror the inline name lists exactly.
    fn assert_name_index_consistent(path: &Path) {
        let c = raw(path);
        let inline = "SELECT j.value, g.id FROM grants g, json_each(g.names) j";
        let index = "SELECT name, grant_id FROM grant_names";
        for sql in [
            format!("SELECT count(*) FROM ({inline} EXCEPT {index})"),
            format!("SELECT count(*) FROM ({index} EXCEPT {inline})"),
        ] {
            let n: i64 = c.query_row(&sql, [], |r| r.get(0)).unwrap();
            assert_eq!(n, 0, "{sql}");
        }
        let over: i64 = c
            .query_row(
                "SELECT count(*) FROM grants WHERE json_array_length(names) > ?1",
                [MAX_NAMES_PER_GRANT as i64],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(over, 0);
    }

    #[test]
    fn create_and_reopen_keeps_data() {
        let (_dir, path) = temp_db();
        {
            let mut s = Store::open(&path).unwrap();
            s.apply(
                &[upsert(
                    key("192.0.2.1/32", None),
                    Some("a.example."),
                    10,
                    Some(100),
                )],
                &[event(
                    EventKind::Granted,
                    Some("192.0.2.1"),
                    Some("a.example"),
                    10,
                )],
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let mut seen = Vec::new();
        s.for_each_grant(|k, e, src| seen.push((k, e, src)))
            .unwrap();
        assert_eq!(
            seen,
            vec![(key("192.0.2.1/32", None), Some(100), Source::Dns)]
        );
        let r = Reader::open(&path).unwrap();
        assert_eq!(list_all(&r)[0].names, vec!["a.example".to_owned()]);
        assert_eq!(r.history(&HistoryFilter::default()).unwrap().len(), 1);
    }

    /// Waits (bounded) until the main database file (not the WAL) holds `marker`: only a
    /// checkpoint copies a commit there. (fwd holds the database with `unix-excl`, so the WAL
    /// index is in its memory; there is no `-shm` file to read progress from.)
    fn wait_in_main_file(path: &Path, marker: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let db = std::fs::read(path).unwrap();
            if db.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{marker} never reached the main database file"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn grant_named(s: &mut Store, ip: &str, name: &str) {
        s.apply(
            &[upsert(
                key(&format!("{ip}/32"), None),
                Some(name),
                10,
                Some(100),
            )],
            &[event(EventKind::Granted, Some(ip), Some(name), 10)],
        )
        .unwrap();
    }

    /// The background checkpointer copies the WAL into the database after a commit, and a
    /// commit made while it pauses between checkpoints is copied right after the pause (its
    /// nudge is not lost, and no later commit is needed to trigger it).
    #[test]
    fn background_checkpointer_copies_commits_made_during_its_pause() {
        let (_dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        grant_named(&mut s, "192.0.2.1", "first.example");
        wait_in_main_file(&path, "first.example");
        // Right after a checkpoint the checkpointer pauses for CHECKPOINT_EVERY: this commit
        // lands in the pause. No further commit: only the nudge left during the pause can get
        // it copied.
        grant_named(&mut s, "192.0.2.2", "second.example");
        wait_in_main_file(&path, "second.example");
        // Dropping the store ends the checkpointer (joined in Drop).
        drop(s);
    }

    /// Commits single grants back to back, with the checkpointer's restart threshold at 64
    /// KiB, no spacing, `slow` as its slow-disk line, and the writer's own autocheckpoint off,
    /// until SQLite has restarted the WAL five times (its checkpoint sequence, in the WAL
    /// header, counts restarts). Panics if the WAL file outgrows the writer's backstop
    /// ([`WRITER_AUTOCHECKPOINT_BYTES`]) or 30 s pass first.
    ///
    /// About 20,000 commits and a WAL of about 90 MB here (the test writes far faster than
    /// fwd's RPCs can: ~190 MB/s). Without the catch-up, passive checkpoints alone restart it
    /// rarely or never: 200-860 MB before five restarts, or none in 30 s on a "slow" disk.
    fn commit_until_five_wal_restarts(slow: Duration) {
        let (_dir, path) = temp_db();
        let mut s = Store::open_with(&path, 64 << 10, Duration::ZERO, slow).unwrap();
        s.conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        let wal = PathBuf::from(format!("{}-wal", path.display()));
        let sequence = || {
            let mut header = [0u8; 16];
            std::fs::File::open(&wal)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut header))
                .map_or(0, |()| {
                    u32::from_be_bytes([header[12], header[13], header[14], header[15]])
                })
        };
        grant_named(&mut s, "192.0.2.1", "stream.example");
        let first = sequence();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut commits = 1u32;
        loop {
            let restarts = sequence().wrapping_sub(first);
            if restarts >= 5 {
                return;
            }
            let len = std::fs::metadata(&wal).map_or(0, |m| m.len());
            assert!(
                len < WRITER_AUTOCHECKPOINT_BYTES as u64 && Instant::now() < deadline,
                "the WAL restarted {restarts} times in {commits} back-to-back commits and grew \
                 to {len} bytes"
            );
            for _ in 0..100 {
                let ip = Ipv4Addr::from(0xC000_0200 + commits % 60_000).to_string();
                grant_named(&mut s, &ip, "stream.example");
                commits += 1;
            }
        }
    }

    /// Under back-to-back commits a passive checkpoint rarely copies every frame (commits
    /// append while it runs), so SQLite seldom restarts the WAL on its own: 5,000 single-grant
    /// commits wrote 50-85 MB to a WAL that grew by as much, never restarted. The checkpointer's
    /// catch-up under the writer's gate copies the last frames and restarts it.
    #[test]
    fn wal_restarts_under_back_to_back_commits() {
        commit_until_five_wal_restarts(SLOW_PASS);
    }

    /// On a disk slow to sync every passive checkpoint is over the slow line (here all are:
    /// the line is zero), so the catch-up waits, but only until the WAL is FORCE_FACTOR times
    /// over the threshold: it still restarts under back-to-back commits.
    #[test]
    fn wal_restarts_on_a_disk_slow_to_sync() {
        commit_until_five_wal_restarts(Duration::ZERO);
    }

    /// The checkpointer restarts a fully copied WAL itself, with a one-row write, so that the
    /// restart's header fsync is not paid by a commit: the commit after it appends to the WAL
    /// the checkpointer started (same salts in the WAL header) instead of restarting it.
    #[test]
    fn checkpointer_restarts_the_wal_not_the_next_commit() {
        let (_dir, path) = temp_db();
        let mut s = Store::open_with(&path, 64 << 10, Duration::ZERO, SLOW_PASS).unwrap();
        let salts = || {
            let wal = std::fs::read(format!("{}-wal", path.display())).unwrap();
            wal[12..24].to_vec() // checkpoint sequence and the two salts
        };
        grant_named(&mut s, "192.0.2.1", "one.example");
        let deadline = Instant::now() + Duration::from_secs(20);
        while s.meta("wal_restarts").unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "the checkpointer never restarted the WAL"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let restarted = salts();
        // The checkpointer pauses after its round: this commit finds its frame not copied yet.
        grant_named(&mut s, "192.0.2.2", "two.example");
        assert_eq!(salts(), restarted, "the commit restarted the WAL again");
    }

    /// A new database gets NEW_PAGE_SIZE; one created with SQLite's default 4096 (every
    /// database before it) keeps its page size, opens, and takes writes.
    #[test]
    fn new_databases_get_small_pages_and_existing_ones_keep_theirs() {
        let page_size = |path: &Path| -> i64 {
            raw(path)
                .pragma_query_value(None, "page_size", |r| r.get(0))
                .unwrap()
        };
        let autocheckpoint = |s: &Store| -> i64 {
            s.conn
                .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
                .unwrap()
        };
        let (_dir, path) = temp_db();
        let s = Store::open(&path).unwrap();
        assert_eq!(page_size(&path), NEW_PAGE_SIZE);
        assert_eq!(
            autocheckpoint(&s),
            WRITER_AUTOCHECKPOINT_BYTES / NEW_PAGE_SIZE
        );
        drop(s);

        let (_dir, old) = temp_db();
        {
            // What Store::open did before: WAL mode, then schema, on 4096-byte pages.
            let mut c = raw(&old);
            let _: String = c
                .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
                .unwrap();
            migrate(&mut c, &old).unwrap();
        }
        assert_eq!(page_size(&old), 4096);
        let mut s = Store::open(&old).unwrap();
        assert_eq!(autocheckpoint(&s), WRITER_AUTOCHECKPOINT_BYTES / 4096);
        let k = key("192.0.2.7/32", None);
        s.apply(
            &[upsert(k, Some("old.example"), 1, Some(u64::MAX >> 2))],
            &[],
        )
        .unwrap();
        drop(s);
        assert_eq!(page_size(&old), 4096);
        let rows = list_all(&Reader::open(&old).unwrap());
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].key, k);
    }

    #[test]
    fn migrations_set_user_version_app_id_wal_and_mode_0600() {
        let (_dir, path) = temp_db();
        let _s = Store::open(&path).unwrap();
        let c = raw(&path);
        let v: u32 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        const { assert!(SCHEMA_VERSION >= 1) };
        let app: i32 = c
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .unwrap();
        assert_eq!(app, APPLICATION_ID);
        let mode: String = c
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let perm = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(perm & 0o777, 0o600);
    }

    #[test]
    fn newer_user_version_is_refused() {
        let (_dir, path) = temp_db();
        drop(Store::open(&path).unwrap());
        raw(&path)
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        match Store::open(&path) {
            Err(StoreError::SchemaTooNew {
                found, supported, ..
            }) => {
                assert_eq!(found, SCHEMA_VERSION + 1);
                assert_eq!(supported, SCHEMA_VERSION);
            }
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
        assert!(matches!(
            Reader::open(&path),
            Err(StoreError::SchemaTooNew { .. })
        ));
        // The refused open did not touch the version.
        let v: u32 = raw(&path)
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION + 1);
    }

    #[test]
    fn reader_refuses_unmigrated_database() {
        let (_dir, path) = temp_db();
        raw(&path).execute_batch("CREATE TABLE t (x)").unwrap();
        assert!(matches!(
            Reader::open(&path),
            Err(StoreError::SchemaTooOld { found: 0, .. })
        ));
    }

    #[test]
    fn garbage_file_is_not_a_database() {
        let (_dir, path) = temp_db();
        let garbage: Vec<u8> = (0..8192u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(&path, &garbage).unwrap();
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::NotADatabase { .. }), "{err:?}");
        assert!(err.to_string().contains("not an SQLite database"));
        assert!(matches!(
            Reader::open(&path),
            Err(StoreError::NotADatabase { .. })
        ));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            garbage,
            "file must be left alone"
        );

        std::fs::write(&path, b"hello, I am a text file\n").unwrap();
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::NotADatabase { .. }), "{err:?}");
    }

    #[test]
    fn foreign_sqlite_database_is_refused() {
        let (_dir, path) = temp_db();
        let c = raw(&path);
        c.pragma_update(None, "application_id", 1234).unwrap();
        c.execute_batch("CREATE TABLE grants (x)").unwrap();
        drop(c);
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::ForeignDatabase { found: 1234, .. })
        ));
    }

    #[test]
    fn missing_parent_dir_is_an_error() {
        let (dir, _) = temp_db();
        let path = dir.path().join("no/such/dir/guard.db");
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::MissingDir { .. }), "{err:?}");
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(matches!(Reader::open(&path), Err(StoreError::Open { .. })));
    }

    #[test]
    fn reader_of_missing_file_does_not_create_it() {
        let (_dir, path) = temp_db();
        assert!(matches!(Reader::open(&path), Err(StoreError::Open { .. })));
        assert!(!path.exists());
    }

    #[test]
    fn upsert_keeps_first_ms_and_source_and_updates_expiry() {
        let (_dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        let k = key("198.51.100.7/32", None);
        s.apply(
            &[Change::Upsert {
                key: k,
                name: Some("x.test".into()),
                at_ms: 1_000,
                expires_ms: Some(5_000),
                source: Source::Manual,
                comment: "first".into(),
            }],
            &[],
        )
        .unwrap();
        s.apply(
            &[Change::Upsert {
                key: k,
                name: None,
                at_ms: 2_000,
                expires_ms: Some(9_000),
                source: Source::Dns,
                comment: String::new(),
            }],
            &[],
        )
        .unwrap();
        let r = Reader::open(&path).unwrap();
        let rows = list_all(&r);
        assert_eq!(rows.len(), 1);
        let g = &rows[0];
        assert_eq!(g.first_ms, 1_000);
        assert_eq!(g.last_ms, 2_000);
        assert_eq!(g.expires_ms, Some(9_000));
        assert_eq!(g.source, Source::Manual);
        assert_eq!(g.comment, "first", "empty comment keeps the stored one");
        assert_eq!(g.names, vec!["x.test".to_owned()]);

        s.apply(
            &[Change::Upsert {
                key: k,
                name: None,
                at_ms: 3_000,
                expires_ms: None,
                source: Source::Dns,
                comment: "second".into(),
            }],
            &[],
        )
        .unwrap();
        let g = &list_all(&r)[0];
        assert_eq!(g.expires_ms, None);
        assert_eq!(g.comment, "second");
    }

    /// The one-statement upsert: a new grant indexes its name; an extension by the front name
    /// rewrites the row alone; another name takes the front; a name-less extension keeps the
    /// list; an update in the millisecond of the insert keeps the index exact.
    #[test]
    fn one_statement_upsert_keeps_rows_and_name_index_exact() {
        let (_dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        let r = Reader::open(&path).unwrap();
        let k = key("203.0.113.9/32", None);
        let names_of = |r: &Reader| list_all(r)[0].names.clone();
        let step = |s: &mut Store, name: Option<&str>, at: u64, exp: u64| {
            s.apply(&[upsert(k, name, at, Some(exp))], &[]).unwrap();
            assert_name_index_consistent(&path);
        };
        step(&mut s, Some("A.example."), 100, 1_000);
        assert_eq!(names_of(&r), ["a.example"]);
        step(&mut s, Some("a.example"), 100, 1_500); // same millisecond as the insert
        step(&mut s, Some("a.example"), 200, 2_000);
        let g = &list_all(&r)[0];
        assert_eq!(
            (g.first_ms, g.last_ms, g.expires_ms),
            (100, 200, Some(2_000))
        );
        assert_eq!(g.names, ["a.example"]);
        step(&mut s, Some("b.example"), 300, 3_000);
        assert_eq!(names_of(&r), ["b.example", "a.example"]);
        step(&mut s, None, 400, 4_000);
        step(&mut s, Some("a.example"), 400, 4_000);
        let g = &list_all(&r)[0];
        assert_eq!(
            (g.first_ms, g.last_ms, g.expires_ms),
            (100, 400, Some(4_000))
        );
        assert_eq!(g.names, ["a.example", "b.example"]);
        for n in ["a.example", "b.example"] {
            let f = ListFilter {
                name: Some(n.into()),
                ..Default::default()
            };
            assert_eq!(r.list(&f).unwrap().1, 1, "{n}");
        }
    }

    /// Upserts skip the tombstone lookup only while no tombstone can exist; one written
    /// (also before a reopen) is still cleared by the next upsert of its key.
    #[test]
    fn upsert_clears_tombstones_across_reopen_and_expiry() {
        let (_dir, path) = temp_db();
        let k = key("192.0.2.66/32", None);
        let other = key("192.0.2.67/32", None);
        {
            let mut s = Store::open(&path).unwrap();
            s.apply(&[upsert(other, None, 1, Some(10))], &[]).unwrap();
            s.apply(
                &[Change::Tombstone {
                    key: k,
                    until_ms: 1_000,
                }],
                &[],
            )
            .unwrap();
        }
        let mut s = Store::open(&path).unwrap();
        assert_eq!(s.live_tombstones(500).unwrap(), [k]);
        s.apply(&[upsert(k, None, 600, Some(2_000))], &[]).unwrap();
        assert!(s.live_tombstones(600).unwrap().is_empty());
        // Expired tombstones are forgotten; a new one after that is still honoured.
        s.apply(
            &[Change::Tombstone {
                key: k,
                until_ms: 700,
            }],
            &[],
        )
        .unwrap();
        assert!(s.live_tombstones(800).unwrap().is_empty());
        s.apply(
            &[Change::Tombstone {
                key: k,
                until_ms: 5_000,
            }],
            &[],
        )
        .unwrap();
        s.apply(&[upsert(k, None, 900, Some(3_000))], &[]).unwrap();
        assert!(s.live_tombstones(900).unwrap().is_empty());
    }

    /// This test binary, run again for the store test `test` alone, with `var` set to the
    /// database path (the test's child branch then runs) and its stdout discarded.
    fn this_test_in_a_child(test: &str, var: &str, path: &Path) -> std::process::Command {
        let mut c = std::process::Command::new(std::env::current_exe().unwrap());
        c.args([
            "--exact",
            &format!("store::tests::{test}"),
            "--test-threads=1",
        ])
        .env(var, path)
        .stdout(std::process::Stdio::null());
        c
    }

    /// fwd holds its database exclusively: another process (a second fwd) gets a clear
    /// "in use" error, not a failure to read a pragma, and can open it once fwd has closed it.
    #[test]
    fn a_second_process_cannot_open_a_database_in_use() {
        const CHILD: &str = "GUARD_STORE_SECOND_OPENER";
        if let Some(p) = std::env::var_os(CHILD) {
            let code = match Store::open(Path::new(&p)) {
                Ok(_) => 0,
                Err(StoreError::InUse { .. }) => 3,
                Err(e) => {
                    eprintln!("{e}");
                    4
                }
            };
            std::process::exit(code);
        }
        let (_dir, path) = temp_db();
        let second = || {
            this_test_in_a_child(
                "a_second_process_cannot_open_a_database_in_use",
                CHILD,
                &path,
            )
            .status()
            .unwrap()
            .code()
        };
        let mut s = Store::open(&path).unwrap();
        grant_named(&mut s, "192.0.2.1", "held.example");
        assert_eq!(
            second(),
            Some(3),
            "a database in use must be refused as in use"
        );
        drop(s);
        assert_eq!(second(), Some(0), "a closed database opens");
    }

    /// `synchronous=NORMAL` keeps commits across a crash of the process: a child that commits
    /// and then aborts (no destructors, no checkpoint, WAL left behind) loses nothing.
    #[test]
    fn commits_survive_an_aborted_writer_process() {
        const CHILD: &str = "GUARD_STORE_CRASH_CHILD";
        if let Some(p) = std::env::var_os(CHILD) {
            let mut s = Store::open(Path::new(&p)).unwrap();
            for i in 0..50u32 {
                let ip = Ipv4Addr::from(0xc000_0200 + i);
                s.apply(
                    &[upsert(
                        key(&format!("{ip}/32"), None),
                        Some("c.example"),
                        1,
                        Some(9),
                    )],
                    &[event(
                        EventKind::Granted,
                        Some(&ip.to_string()),
                        Some("c.example"),
                        1,
                    )],
                )
                .unwrap();
            }
            std::process::abort();
        }
        let (_dir, path) = temp_db();
        let status =
            this_test_in_a_child("commits_survive_an_aborted_writer_process", CHILD, &path)
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
        assert!(!status.success(), "the child must die by abort");
        let mut wal = path.clone().into_os_string();
        wal.push("-wal");
        assert!(
            std::fs::metadata(&wal).unwrap().len() > 0,
            "the commits must be in the WAL the crash left behind"
        );
        let s = Store::open(&path).unwrap();
        let mut n = 0;
        s.for_each_grant(|_, _, _| n += 1).unwrap();
        assert_eq!(n, 50);
        let r = Reader::open(&path).unwrap();
        assert_eq!(r.stats().unwrap().audit_events, 50);
    }

    #[test]
    fn names_are_bounded_most_recent_first_and_deduplicated() {
        let (_dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        let k = key("2001:db8::1/128", None);
        for i in 0..12 {
            s.apply(
                &[upsert(k, Some(&format!("N{i}.Example.")), i, Some(100))],
                &[],
            )
            .unwrap();
        }
        // Re-seeing an old, still kept name moves it to the front without duplicating it.
        s.apply(&[upsert(k, Some("n6.example"), 20, Some(100))], &[])
            .unwrap();
        // In one batch too.
        s.apply(
            &[
                upsert(k, Some("n9.example"), 21, Some(100)),
                upsert(k, Some("N9.EXAMPLE."), 22, Some(100)),
            ],
            &[],
        )
        .unwrap();
        let r = Reader::open(&path).unwrap();
        let names = list_all(&r).remove(0).names;
        let want: Vec<String> = [9, 6, 11, 10, 8, 7, 5, 4]
            .iter()
            .map(|i| format!("n{i}.example"))
            .collect();
        assert_eq!(names, want);
        let count: i64 = raw(&path)
            .query_row("SELECT count(*) FROM grant_names", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, MAX_NAMES_PER_GRANT as i64);
        assert_name_index_consistent(&path);
    }

    #[test]
    fn name_lists_match_a_model_under_random_upserts_and_removes() {
        let (_dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        let keys: Vec<GrantKey> = (0..6)
            .map(|i| {
                key(
                    &format!("192.0.2.{i}/32"),
                    (i % 2 == 0).then_some("10.0.0.1"),
                )
            })
            .collect();
        let mut model: std::collections::HashMap<GrantKey, Vec<String>> = Default::default();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..200 {
            let mut batch = Vec::new();
            for _ in 0..rnd(5) + 1 {
                let k = keys[rnd(keys.len() as u64) as usize];
                if rnd(10) == 0 {
                    model.remove(&k);
                    batch.push(Change::Remove { key: k });
                    continue;
                }
                let name = (rnd(4) != 0).then(|| format!("n{}.test", rnd(12)));
                let names = model.entry(k).or_default();
                if let Some(n) = &name {
                    names.retain(|x| x != n);
                    names.insert(0, n.clone());
                    names.truncate(MAX_NAMES_PER_GRANT);
                }
                batch.push(upsert(k, name.as_deref(), round, Some(1_000)));
            }
            s.apply(&batch, &[]).unwrap();
        }
        let r = Reader::open(&path).unwrap();
        let got: std::collections::HashMap<GrantKey, Vec<String>> =
            list_all(&r).into_iter().map(|g| (g.key, g.names)).collect();
        assert_eq!(got, model);
        assert_name_index_consistent(&path);
        for i in 0..12 {
            let name = format!("n{i}.test");
            let mut want: Vec<GrantKey> = model
                .iter()
                .filter(|(_, v)| v.contains(&name))
                .map(|(k, _)| *k)
                .collect();
            want.sort();
            let (rows, total) = r
                .list(&ListFilter {
                    name: Some(name),
                    ..Default::default()
                })
                .unwrap();
            let mut have: Vec<GrantKey> = rows.iter().map(|g| g.key).collect();
            have.sort();
            assert_eq!(have, want);
            assert_eq!(total, want.len() as u64);
        }
    }

    #[test]
    fn dropped_and_removed_names_are_no_longer_found() {
        let (_dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        let k = key("192.0.2.1/32", None);
        let changes: Vec<Change> = (0..9)
            .map(|i| upsert(k, Some(&format!("n{i}.test")), i, Some(9)))
            .collect();
        s.apply(&changes, &[]).unwrap();
        let r = Reader::open(&path).unwrap();
        let by = |n: &str| {
            r.list(&ListFilter {
                name: Some(n.into()),
                ..Default::default()
            })
            .unwrap()
            .1
        };
        assert_eq!(by("n0.test"), 0, "pushed out by the 9th name");
        assert_eq!(by("n8.test"), 1);
        s.apply(&[Change::Remove { key: k }], &[]).unwrap();
        assert_eq!(by("n8.test"), 0);
        assert_name_index_consistent(&path);
    }

    #[test]
    fn tampered_name_list_is_rebuilt_not_fatal() {
        let (_dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        let k = key("192.0.2.1/32", None);
        s.apply(&[upsert(k, Some("old.test"), 1, Some(9))], &[])
            .unwrap();
        raw(&path)
            .execute("UPDATE grants SET names = 'not json'", [])
            .unwrap();
        let r = Reader::open(&path).unwrap();
        assert!(matches!(
            r.list(&ListFilter::default()),
            Err(StoreError::Corrupt { .. })
        ));
        s.apply(&[upsert(k, Some("new.test"), 2, Some(9))], &[])
            .unwrap();
        assert_eq!(list_all(&r)[0].names, ["new.test"]);
        assert_name_index_consistent(&path);
    }

    #[test]
    fn names_are_normalized_and_bounded() {
        assert_eq!(normalize_name("WWW.Example.COM."), "www.example.com");
        assert_eq!(normalize_name("."), ".");
        assert_eq!(normalize_name(""), "");
        let long = "é".repeat(200); // 400 bytes
        let n = normalize_name(&long);
        assert!(n.len() <= MAX_NAME_BYTES && n.len() >= MAX_NAME_BYTES - 1);
        assert!(n.chars().all(|c| c == 'é'));

        let (_dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        let long = format!("{}.example", "a".repeat(400));
        s.apply(
            &[upsert(key("192.0.2.9/32", None), Some(&long), 1, None)],
            &[],
        )
        .unwrap();
        let r = Reader::open(&path).unwrap();
        assert_eq!(list_all(&r)[0].names[0].len(), MAX_NAME_BYTES);
    }

    #[test]
    fn client_scoped_and_unscoped_grants_coexist() {
        let (_dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        let keys = [
            key("203.0.113.5/32", None),
            key("203.0.113.5/32", Some("10.0.0.2")),
            key("203.0.113.5/32", Some("10.0.0.3")),
            key("203.0.113.5/32", Some("fd00::2")),
            key("203.0.113.0/24", None),
            // Same 16 bytes as the v4 host, but another family.
            key("::ffff:203.0.113.5/128", None),
        ];
        let changes: Vec<Change> = keys.iter().map(|k| upsert(*k, None, 1, Some(9))).collect();
        s.apply(&changes, &[]).unwrap();
        // Upserting again (NULL-client ones included) must not duplicate.
        s.apply(&changes, &[]).unwrap();
        let mut seen = Vec::new();
        s.for_each_grant(|k, _, _| seen.push(k)).unwrap();
        seen.sort();
        let mut want = keys.to_vec();
        want.sort();
        assert_eq!(seen, want);
    }

    #[test]
    fn remove_deletes_grant_and_its_names() {
        let (_dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        let a = key("192.0.2.1/32", None);
        let b = key("192.0.2.1/32", Some("10.0.0.1"));
        s.apply(
            &[
                upsert(a, Some("a.test"), 1, Some(9)),
                upsert(b, Some("b.test"), 1, Some(9)),
            ],
            &[],
        )
        .unwrap();
        s.apply(
            &[
                Change::Remove { key: a },
                Change::Remove {
                    key: key("192.0.2.99/32", None),
                },
            ],
            &[event(EventKind::Revoked, Some("192.0.2.1"), None, 2)],
        )
        .unwrap();
        let r = Reader::open(&path).unwrap();
        let rows = list_all(&r);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].key, b);
        let names: i64 = raw(&path)
            .query_row("SELECT count(*) FROM grant_names", [], |r| r.get(0))
            .unwrap();
        assert_eq!(names, 1, "index rows go with their grant");
        assert_name_index_consistent(&path);
    }

    fn seeded_list_store() -> (tempfile::TempDir, PathBuf) {
        let (dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        let mut changes = vec![
            upsert(key("10.1.2.3/32", None), Some("a.example"), 1, Some(9)),
            upsert(key("10.1.2.4/32", None), Some("b.example"), 1, Some(9)),
            upsert(key("10.1.9.0/24", None), None, 1, None),
            upsert(key("10.0.0.0/8", None), None, 1, None),
            upsert(
                key("10.1.2.3/32", Some("192.168.1.2")),
                Some("a.example"),
                1,
                Some(9),
            ),
            upsert(key("172.16.0.1/32", None), Some("A.Example."), 1, Some(9)),
            upsert(
                key("2001:db8:1::1/128", None),
                Some("a.example"),
                1,
                Some(9),
            ),
            upsert(
                key("2001:db8:2::1/128", None),
                Some("c.example"),
                1,
                Some(9),
            ),
            upsert(key("::ffff:10.1.2.3/128", None), None, 1, Some(9)),
        ];
        for i in 0..50u8 {
            changes.push(upsert(
                key(&format!("100.64.0.{i}/32"), None),
                Some("many.example"),
                1,
                Some(9),
            ));
        }
        s.apply(&changes, &[]).unwrap();
        assert_name_index_consistent(&path);
        (dir, path)
    }

    fn list_nets(r: &Reader, f: ListFilter) -> (Vec<String>, u64) {
        let (rows, total) = r.list(&f).unwrap();
        (rows.iter().map(|g| g.key.net.to_string()).collect(), total)
    }

    #[test]
    fn list_filters_within_v4_and_v6() {
        let (_dir, path) = seeded_list_store();
        let r = Reader::open(&path).unwrap();
        let within = |cidr: &str| ListFilter {
            within: Some(net(cidr)),
            ..Default::default()
        };
        let (nets, total) = list_nets(&r, within("10.1.0.0/16"));
        // The /8 is not inside the /16; the v4-mapped v6 grant is another family.
        assert_eq!(
            nets,
            ["10.1.2.3/32", "10.1.2.3/32", "10.1.2.4/32", "10.1.9.0/24"]
        );
        assert_eq!(total, 4);
        let (nets, _) = list_nets(&r, within("10.0.0.0/8"));
        assert_eq!(nets.len(), 5);
        assert_eq!(nets[0], "10.0.0.0/8");
        let (nets, _) = list_nets(&r, within("10.1.2.3/32"));
        assert_eq!(nets, ["10.1.2.3/32", "10.1.2.3/32"]);
        let (nets, _) = list_nets(&r, within("2001:db8:1::/48"));
        assert_eq!(nets, ["2001:db8:1::1/128"]);
        let (nets, _) = list_nets(&r, within("::/0"));
        assert_eq!(
            nets,
            [
                "::ffff:10.1.2.3/128",
                "2001:db8:1::1/128",
                "2001:db8:2::1/128"
            ]
        );
        let (nets, total) = list_nets(&r, within("0.0.0.0/0"));
        assert_eq!((nets.len(), total), (56, 56));
    }

    #[test]
    fn list_filters_by_name_limit_and_total() {
        let (_dir, path) = seeded_list_store();
        let r = Reader::open(&path).unwrap();
        let by_name = |n: &str| ListFilter {
            name: Some(n.into()),
            ..Default::default()
        };
        let (nets, total) = list_nets(&r, by_name("A.EXAMPLE."));
        assert_eq!(
            nets,
            [
                "10.1.2.3/32",
                "10.1.2.3/32",
                "172.16.0.1/32",
                "2001:db8:1::1/128"
            ]
        );
        assert_eq!(total, 4);
        let (nets, _) = list_nets(&r, by_name("example"));
        assert!(nets.is_empty(), "exact match only");
        let (nets, total) = list_nets(
            &r,
            ListFilter {
                within: Some(net("10.0.0.0/8")),
                name: Some("a.example".into()),
                limit: 0,
            },
        );
        assert_eq!((nets.len(), total), (2, 2));
        let (nets, total) = list_nets(
            &r,
            ListFilter {
                name: Some("many.example".into()),
                limit: 7,
                ..Default::default()
            },
        );
        assert_eq!((nets.len(), total), (7, 50));
        assert_eq!(nets[0], "100.64.0.0/32");
        let (rows, total) = r.list(&ListFilter::default()).unwrap();
        assert_eq!((rows.len(), total), (59, 59));
        let client = rows.iter().find(|g| g.key.client.is_some()).unwrap();
        assert_eq!(client.key.client, Some(ip("192.168.1.2")));
        assert_eq!(client.names, ["a.example"]);
    }

    #[test]
    fn limits_default_and_cap() {
        assert_eq!(effective_limit(0), DEFAULT_LIMIT);
        assert_eq!(effective_limit(5), 5);
        assert_eq!(effective_limit(u32::MAX), MAX_LIMIT);
    }

    #[test]
    fn name_and_range_filters_use_indexes() {
        let (_dir, path) = seeded_list_store();
        let c = raw(&path);
        let plan = |sql: &str| -> String {
            let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            st.query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
                .join("\n")
        };
        let p = plan(
            "SELECT id FROM grants g WHERE g.id IN (SELECT grant_id FROM grant_names WHERE name = 'x')",
        );
        assert!(
            p.contains("SEARCH grant_names USING PRIMARY KEY (name=?)"),
            "{p}"
        );
        let p = plan(
            "SELECT id FROM grants g WHERE g.family = 4 AND g.addr BETWEEN x'00' AND x'ff' AND g.prefix >= 8",
        );
        assert!(p.contains("grants_key"), "{p}");
        let p = plan("SELECT id FROM audit WHERE name = 'x' ORDER BY at_ms DESC, id DESC");
        assert!(
            p.contains("audit_name") && !p.contains("TEMP B-TREE"),
            "{p}"
        );
        let p = plan(
            "SELECT id FROM audit WHERE target_family = 4 AND target_addr BETWEEN x'00' AND x'ff' AND target_prefix >= 8",
        );
        assert!(p.contains("audit_target"), "{p}");
        let p = plan("SELECT id FROM audit WHERE at_ms >= 5 ORDER BY at_ms DESC, id DESC");
        assert!(p.contains("audit_at") && !p.contains("TEMP B-TREE"), "{p}");
    }

    fn seeded_history_store() -> (tempfile::TempDir, PathBuf) {
        let (dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        let mut e = vec![
            event(EventKind::Granted, Some("10.1.2.3"), Some("a.example"), 100),
            event(
                EventKind::Extended,
                Some("10.1.2.3"),
                Some("A.example."),
                200,
            ),
            event(
                EventKind::Granted,
                Some("2001:db8::5"),
                Some("b.example"),
                300,
            ),
            event(EventKind::ManualAllow, Some("10.1.0.0/16"), None, 400),
            event(
                EventKind::Rejected,
                Some("0.0.0.0"),
                Some("evil.example"),
                500,
            ),
            event(
                EventKind::Rejected,
                Some("not an ip; DROP TABLE audit"),
                None,
                600,
            ),
            event(EventKind::Denied, None, None, 700),
            event(EventKind::Started, None, None, 700),
        ];
        e[0].client = Some(ip("192.168.1.9"));
        e[2].client = Some(ip("fd00::9"));
        e[3].expires_ms = Some(1_000);
        e[6].caller = Caller::default();
        s.apply(&[], &e).unwrap();
        (dir, path)
    }

    fn kinds_at(r: &Reader, f: HistoryFilter) -> Vec<(EventKind, u64)> {
        r.history(&f)
            .unwrap()
            .iter()
            .map(|e| (e.kind, e.at_ms))
            .collect()
    }

    #[test]
    fn history_is_newest_first_and_round_trips() {
        let (_dir, path) = seeded_history_store();
        let r = Reader::open(&path).unwrap();
        let all = r.history(&HistoryFilter::default()).unwrap();
        assert_eq!(all.len(), 8);
        let at: Vec<u64> = all.iter().map(|e| e.at_ms).collect();
        assert_eq!(at, [700, 700, 600, 500, 400, 300, 200, 100]);
        // Same at_ms: later insertion first.
        assert_eq!(all[0].kind, EventKind::Started);
        assert!(all[0].id > all[1].id);
        let first = all.last().unwrap();
        assert_eq!(
            *first,
            AuditEvent {
                id: first.id,
                at_ms: 100,
                kind: EventKind::Granted,
                target: Some("10.1.2.3".into()),
                client: Some(ip("192.168.1.9")),
                name: Some("a.example".into()),
                caller: Caller {
                    uid: Some(1000),
                    gid: Some(1000),
                    pid: Some(42)
                },
                reason: "test".into(),
                expires_ms: None,
            }
        );
        assert_eq!(all[5].client, Some(ip("fd00::9")));
        assert_eq!(all[4].expires_ms, Some(1_000));
        assert_eq!(all[1].caller, Caller::default());
    }

    #[test]
    fn history_filters_within_name_since_limit() {
        let (_dir, path) = seeded_history_store();
        let r = Reader::open(&path).unwrap();
        let f =
            |within: Option<&str>, name: Option<&str>, since: Option<u64>, limit| HistoryFilter {
                within: within.map(net),
                name: name.map(str::to_owned),
                since_ms: since,
                limit,
            };
        use EventKind::*;
        assert_eq!(
            kinds_at(&r, f(Some("10.1.0.0/16"), None, None, 0)),
            [(ManualAllow, 400), (Extended, 200), (Granted, 100)]
        );
        assert_eq!(
            kinds_at(&r, f(Some("10.0.0.0/8"), None, None, 0)),
            [(ManualAllow, 400), (Extended, 200), (Granted, 100)]
        );
        // The /16 target is not inside a /24.
        assert_eq!(
            kinds_at(&r, f(Some("10.1.2.0/24"), None, None, 0)),
            [(Extended, 200), (Granted, 100)]
        );
        assert_eq!(
            kinds_at(&r, f(Some("2001:db8::/32"), None, None, 0)),
            [(Granted, 300)]
        );
        assert_eq!(
            kinds_at(&r, f(Some("0.0.0.0/32"), None, None, 0)),
            [(Rejected, 500)]
        );
        assert_eq!(
            kinds_at(&r, f(None, Some("A.EXAMPLE"), None, 0)),
            [(Extended, 200), (Granted, 100)]
        );
        assert_eq!(
            kinds_at(&r, f(None, None, Some(500), 0)),
            [
                (Started, 700),
                (Denied, 700),
                (Rejected, 600),
                (Rejected, 500)
            ]
        );
        assert_eq!(
            kinds_at(&r, f(None, None, Some(500), 2)),
            [(Started, 700), (Denied, 700)]
        );
        assert_eq!(
            kinds_at(&r, f(Some("10.0.0.0/8"), Some("a.example"), Some(150), 0)),
            [(Extended, 200)]
        );
    }

    #[test]
    fn events_keep_arbitrary_text_targets() {
        let (_dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        let weird = [
            "",
            "0.0.0.0",
            "999.1.1.1",
            "fe80::1%eth0",
            "'; DROP TABLE grants; --",
            "\u{0}\u{7f}ü",
        ];
        let events: Vec<AuditEvent> = weird
            .iter()
            .enumerate()
            .map(|(i, t)| event(EventKind::Rejected, Some(t), None, i as u64))
            .collect();
        let long = "x".repeat(10_000);
        s.apply(&[], &events).unwrap();
        s.apply(&[], &[event(EventKind::Rejected, Some(&long), None, 99)])
            .unwrap();
        let r = Reader::open(&path).unwrap();
        let got = r.history(&HistoryFilter::default()).unwrap();
        assert_eq!(got[0].target.as_deref().unwrap().len(), MAX_TARGET_BYTES);
        let mut texts: Vec<String> = got[1..].iter().map(|e| e.target.clone().unwrap()).collect();
        texts.reverse();
        assert_eq!(texts, weird);
        let n: i64 = raw(&path)
            .query_row(
                "SELECT count(*) FROM audit WHERE target_addr IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1, "only 0.0.0.0 parses as an address");
    }

    #[test]
    fn audit_rows_cannot_be_updated() {
        let (_dir, path) = seeded_history_store();
        let err = raw(&path)
            .execute("UPDATE audit SET reason = 'forged'", [])
            .unwrap_err();
        assert!(err.to_string().contains("append-only"), "{err}");
    }

    #[test]
    fn prune_audit_deletes_only_older_events() {
        let (_dir, path) = seeded_history_store();
        let mut s = Store::open(&path).unwrap();
        assert_eq!(s.prune_audit(300).unwrap(), 2);
        assert_eq!(s.prune_audit(300).unwrap(), 0);
        let r = Reader::open(&path).unwrap();
        let at: Vec<u64> = r
            .history(&HistoryFilter::default())
            .unwrap()
            .iter()
            .map(|e| e.at_ms)
            .collect();
        assert_eq!(at, [700, 700, 600, 500, 400, 300]);
        assert_eq!(s.prune_audit(u64::MAX).unwrap(), 6);
        assert_eq!(r.stats().unwrap().audit_events, 0);
    }

    #[test]
    fn prune_audit_works_in_chunks() {
        let (_dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        let n = PRUNE_CHUNK as u64 * 2 + 17;
        let events: Vec<AuditEvent> = (0..n)
            .map(|i| event(EventKind::Granted, None, None, i))
            .collect();
        s.apply(&[], &events).unwrap();
        assert_eq!(s.prune_audit(n - 1).unwrap(), n - 1);
        assert_eq!(
            Reader::open(&path).unwrap().stats().unwrap().audit_events,
            1
        );
    }

    #[test]
    fn reader_sees_writer_commits_and_stats() {
        let (_dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        let r = Reader::open(&path).unwrap();
        assert_eq!(r.stats().unwrap().grants, 0);
        s.apply(
            &[upsert(key("192.0.2.1/32", None), None, 1, Some(5))],
            &[event(EventKind::Granted, Some("192.0.2.1"), None, 1)],
        )
        .unwrap();
        let st = r.stats().unwrap();
        assert_eq!((st.grants, st.audit_events), (1, 1));
        assert!(st.db_bytes > 0);
        assert_eq!(list_all(&r).len(), 1);
    }

    #[test]
    fn reader_is_query_only() {
        let (_dir, path) = temp_db();
        drop(Store::open(&path).unwrap());
        let r = Reader::open(&path).unwrap();
        assert!(r.conn.execute("DELETE FROM grants", []).is_err());
    }

    #[test]
    fn reader_reads_while_writer_holds_a_transaction() {
        let (_dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        s.apply(&[upsert(key("192.0.2.1/32", None), None, 1, Some(5))], &[])
            .unwrap();
        let r = Reader::open(&path).unwrap();
        let tx = s
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        tx.execute(
            "INSERT INTO grants (family, addr, prefix, client, first_ms, last_ms, source) \
             VALUES (4, ?1, 32, x'', 1, 1, 'dns')",
            [&addr_bytes(ip("192.0.2.2"))[..]],
        )
        .unwrap();
        // A reader on another thread is neither blocked nor sees the uncommitted row.
        let started = Instant::now();
        let p = path.clone();
        let n = std::thread::spawn(move || list_all(&Reader::open(&p).unwrap()).len())
            .join()
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(list_all(&r).len(), 1);
        assert!(
            started.elapsed() < BUSY_TIMEOUT / 2,
            "reader waited on the writer"
        );
        tx.commit().unwrap();
        assert_eq!(list_all(&r).len(), 2);
    }

    #[test]
    fn apply_is_all_or_nothing() {
        let (_dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        // Make the audit insert fail after the grant upsert ran in the same transaction.
        s.conn
            .execute_batch(
                "CREATE TRIGGER fail_audit BEFORE INSERT ON audit \
                 BEGIN SELECT RAISE(ABORT, 'boom'); END;",
            )
            .unwrap();
        let err = s
            .apply(
                &[upsert(
                    key("192.0.2.1/32", None),
                    Some("a.test"),
                    1,
                    Some(5),
                )],
                &[event(EventKind::Granted, None, None, 1)],
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Write {
                    op: "append audit event",
                    ..
                }
            ),
            "{err:?}"
        );
        let mut n = 0;
        s.for_each_grant(|_, _, _| n += 1).unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn corrupt_rows_are_reported_not_panicked() {
        let (_dir, path) = temp_db();
        let s = Store::open(&path).unwrap();
        s.conn
            .execute(
                "INSERT INTO grants (family, addr, prefix, client, first_ms, last_ms, source) \
                 VALUES (4, zeroblob(16), 32, x'', 1, 1, 'dns')",
                [],
            )
            .unwrap();
        let err = s.for_each_grant(|_, _, _| {}).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    }

    /// On-CPU time of this thread in ns (user + kernel), so the numbers mean something on a
    /// loaded machine; 0 where schedstat is unavailable.
    fn thread_cpu_ns() -> u64 {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    struct Timer(Instant, u64);

    impl Timer {
        fn start() -> Self {
            Timer(Instant::now(), thread_cpu_ns())
        }

        /// (wall µs, cpu µs) per item.
        fn per(&self, items: u64) -> (f64, f64) {
            let n = items as f64;
            (
                self.0.elapsed().as_secs_f64() * 1e6 / n,
                thread_cpu_ns().saturating_sub(self.1) as f64 / 1e3 / n,
            )
        }
    }

    /// `cargo test -p fwd --release --lib store:: -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark; run in release"]
    fn bench_store() {
        let (_dir, path) = temp_db();
        let mut s = Store::open(&path).unwrap();
        let host = |i: u32| GrantKey::host(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), None);
        // One Granted upsert and one audit event per grant, like an Authorize batch.
        let batch = |from: u32, n: u32, at: u64, events: bool| {
            let changes: Vec<Change> = (from..from + n)
                .map(|i| {
                    let name = format!("h{}.example.com", i % 5000);
                    upsert(host(i), Some(&name), at, Some(at + 300_000))
                })
                .collect();
            let events: Vec<AuditEvent> = (from..from + n)
                .filter(|_| events)
                .map(|i| {
                    let mut e = event(EventKind::Granted, None, None, at);
                    e.target = Some(Ipv4Addr::from(0x0a00_0000 + i).to_string());
                    e.name = Some(format!("h{}.example.com", i % 5000));
                    e.expires_ms = Some(at + 300_000);
                    e
                })
                .collect();
            (changes, events)
        };
        let mut run = |label: &str, from: u32, size: u32, batches: u32| {
            let work: Vec<_> = (0..batches)
                .map(|b| batch(from + b * size, size, u64::from(b), true))
                .collect();
            let t = Timer::start();
            for (c, e) in &work {
                s.apply(c, e).unwrap();
            }
            let (wall, cpu) = t.per(u64::from(size * batches));
            println!(
                "apply {label:<24} batch {size:>3}: {wall:7.1} µs/grant wall, {cpu:6.1} µs/grant cpu \
                 ({batches} batches)"
            );
        };
        run("new grant + event", 0, 1, 3_000);
        run("extension + event", 0, 1, 3_000);
        run("new grant + event", 100_000, 256, 100);
        run("extension + event", 100_000, 256, 100);

        // Fill to 1,000,000 grants in large batches without events.
        let t = Timer::start();
        let mut count = 0u64;
        s.for_each_grant(|_, _, _| count += 1).unwrap();
        let mut next = 200_000u32;
        let filled = 1_000_000 - count;
        while count < 1_000_000 {
            let n = (1_000_000 - count).min(20_000) as u32;
            let (c, _) = batch(next, n, 1, false);
            s.apply(&c, &[]).unwrap();
            next += n;
            count += u64::from(n);
        }
        let (wall, cpu) = t.per(filled);
        println!("fill to 1,000,000 grants (20k/batch): {wall:.1} µs/grant wall, {cpu:.1} cpu");
        drop(s);

        let s = Store::open(&path).unwrap();
        let t = Timer::start();
        let mut n = 0u64;
        s.for_each_grant(|k, e, src| {
            n += 1;
            std::hint::black_box((k, e, src));
        })
        .unwrap();
        let (wall, cpu) = t.per(1);
        println!(
            "for_each_grant: {n} rows in {:.3} s wall, {:.3} s cpu",
            wall / 1e6,
            cpu / 1e6
        );
        assert_eq!(n, 1_000_000);

        let r = Reader::open(&path).unwrap();
        let st = r.stats().unwrap();
        println!(
            "db {:.1} MiB (with WAL), {} grants, {} events",
            st.db_bytes as f64 / 1_048_576.0,
            st.grants,
            st.audit_events
        );
        let t = Timer::start();
        let (rows, total) = r
            .list(&ListFilter {
                name: Some("H42.example.com.".into()),
                ..Default::default()
            })
            .unwrap();
        println!(
            "list by name: {} of {total} rows in {:.2} ms",
            rows.len(),
            t.per(1).0 / 1e3
        );
        let t = Timer::start();
        let (rows, total) = r
            .list(&ListFilter {
                within: Some(net("10.1.0.0/16")),
                limit: 100,
                ..Default::default()
            })
            .unwrap();
        println!(
            "list within /16: {} of {total} rows in {:.2} ms",
            rows.len(),
            t.per(1).0 / 1e3
        );
        let t = Timer::start();
        let ev = r
            .history(&HistoryFilter {
                within: Some(net("10.1.134.0/24")),
                ..Default::default()
            })
            .unwrap();
        println!(
            "history within /24: {} rows in {:.2} ms",
            ev.len(),
            t.per(1).0 / 1e3
        );
    }
}
