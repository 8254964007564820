//! Pooled, pipelined stream connections (RFC 7766) for tcp:// and tls:// upstreams: many
//! queries in flight per connection, IDs rewritten per connection, idle close, and retry of
//! in-flight queries when a connection dies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::message::{HEADER_LEN, IdMap, id_of, set_id, unused_id};
use super::tcp::{self, frame, read_frame};
use super::tls::{self, HandshakeStats};
use super::{UpstreamError, by_deadline};

/// Most queries in flight on one connection. Far below 65536 so that a random free ID is
/// found in a couple of tries.
const MAX_PIPELINE: usize = 4096;

/// Attempts on this pool for one query: the first, plus retries after a lost connection.
const MAX_CONN_ATTEMPTS: usize = 3;

/// Frames queued to a connection's writer.
const WRITE_QUEUE: usize = 256;

/// Coalesce queued frames into one write up to this size.
const WRITE_BATCH: usize = 16 * 1024;

/// A write that takes longer means the upstream stopped reading: drop the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on the TLS close_notify / FIN when closing.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How connections of a pool are opened.
pub(crate) enum Connector {
    /// Plain TCP.
    Tcp,
    /// TLS over TCP, verifying `name`.
    Tls {
        connector: TlsConnector,
        name: ServerName<'static>,
    },
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connector::Tcp => f.write_str("Tcp"),
            Connector::Tls { name, .. } => f.debug_struct("Tls").field("name", name).finish(),
        }
    }
}

/// The connections to one upstream address.
#[derive(Debug)]
pub(crate) struct Pool {
    addr: SocketAddr,
    connector: Connector,
    max_conns: usize,
    idle_timeout: Duration,
    /// Bound on opening a connection in the background.
    connect_timeout: Duration,
    conns: Mutex<Vec<Arc<Conn>>>,
    /// A background task is opening another connection.
    growing: AtomicBool,
    /// Serializes connection attempts so a burst of queries opens one connection, not many.
    connect_lock: tokio::sync::Mutex<()>,
    /// Bumped after every connection attempt.
    connect_gen: AtomicU64,
    /// The error of the last attempt, handed to queries that waited for it.
    last_connect_error: Mutex<Option<UpstreamError>>,
    pub(crate) handshakes: HandshakeStats,
}

impl Pool {
    pub(crate) fn new(
        addr: SocketAddr,
        connector: Connector,
        max_conns: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            addr,
            connector,
            max_conns: max_conns.max(1),
            idle_timeout,
            connect_timeout,
            conns: Mutex::new(Vec::new()),
            growing: AtomicBool::new(false),
            connect_lock: tokio::sync::Mutex::new(()),
            connect_gen: AtomicU64::new(0),
            last_connect_error: Mutex::new(None),
            handshakes: HandshakeStats::default(),
        }
    }

    /// Sends `wire` (any ID) and returns the raw response, whose ID is the one this pool chose.
    /// A query whose connection dies is retried on another connection.
    pub(crate) async fn exchange(
        self: &Arc<Self>,
        wire: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, UpstreamError> {
        let mut last = None;
        for _ in 0..MAX_CONN_ATTEMPTS {
            if Instant::now() >= deadline {
                break;
            }
            let conn = self.get(deadline).await?;
            match conn.exchange(wire, deadline).await {
                Err(e @ UpstreamError::ConnectionLost { .. }) => {
                    tracing::debug!(addr = %self.addr, error = %e, "retrying on another connection");
                    last = Some(e);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or(UpstreamError::Timeout { addr: self.addr }))
    }

    /// Live connections.
    pub(crate) fn open_connections(&self) -> usize {
        self.conns.lock().iter().filter(|c| !c.is_closed()).count()
    }

    /// Closes every connection; their in-flight queries fail. The pool stays usable.
    pub(crate) fn close_all(&self) {
        let conns = std::mem::take(&mut *self.conns.lock());
        for c in conns {
            c.shared.close("shutting down");
        }
    }

    /// A connection to send on: the least loaded one. While every connection is busy and
    /// the pool may grow, another one is opened in the background, so that no query waits
    /// for a handshake when a connection is already up.
    async fn get(self: &Arc<Self>, deadline: Instant) -> Result<Arc<Conn>, UpstreamError> {
        let gen_seen = self.connect_gen.load(Ordering::Acquire);
        match self.pick() {
            Pick::Use(c) => return Ok(c),
            Pick::Grow(c) => {
                self.grow();
                return Ok(c);
            }
            Pick::None => {}
        }
        let Ok(_guard) = timeout_at(deadline, self.connect_lock.lock()).await else {
            return Err(UpstreamError::Timeout { addr: self.addr });
        };
        match self.pick() {
            Pick::Use(c) => return Ok(c),
            Pick::Grow(c) => {
                self.grow();
                return Ok(c);
            }
            Pick::None => {}
        }
        if self.connect_gen.load(Ordering::Acquire) != gen_seen
            && let Some(e) = self.last_connect_error.lock().clone()
        {
            // We waited while that attempt failed: do not hammer a dead upstream again.
            return Err(e);
        }
        self.connect(deadline).await
    }

    /// Opens one more connection in the background, unless one is being opened already.
    fn grow(self: &Arc<Self>) {
        if self.growing.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            {
                let _guard = pool.connect_lock.lock().await;
                if matches!(pool.pick(), Pick::Grow(_)) {
                    let deadline = Instant::now() + pool.connect_timeout;
                    if let Err(e) = pool.connect(deadline).await {
                        tracing::debug!(addr = %pool.addr, error = %e, "cannot grow pool");
                    }
                }
            }
            pool.growing.store(false, Ordering::Release);
        });
    }

    fn pick(&self) -> Pick {
        let mut conns = self.conns.lock();
        conns.retain(|c| !c.is_closed());
        let Some(best) = conns
            .iter()
            .filter(|c| c.load() < MAX_PIPELINE)
            .min_by_key(|c| c.load())
            .cloned()
        else {
            return Pick::None;
        };
        if best.load() == 0 || conns.len() >= self.max_conns {
            Pick::Use(best)
        } else {
            Pick::Grow(best)
        }
    }

    /// Opens a connection and adds it to the pool. The caller holds `connect_lock`.
    async fn connect(&self, deadline: Instant) -> Result<Arc<Conn>, UpstreamError> {
        let result = self.open(deadline).await;
        *self.last_connect_error.lock() = result.as_ref().err().cloned();
        self.connect_gen.fetch_add(1, Ordering::AcqRel);
        let conn = result?;
        self.conns.lock().push(conn.clone());
        Ok(conn)
    }

    async fn open(&self, deadline: Instant) -> Result<Arc<Conn>, UpstreamError> {
        let tcp = tcp::connect(self.addr, deadline).await?;
        match &self.connector {
            Connector::Tcp => Ok(self.spawn(tcp)),
            Connector::Tls { connector, name } => {
                let stream = tls::handshake(
                    connector,
                    name.clone(),
                    tcp,
                    self.addr,
                    deadline,
                    &self.handshakes,
                )
                .await?;
                Ok(self.spawn(stream))
            }
        }
    }

    fn spawn<S>(&self, stream: S) -> Arc<Conn>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let shared = Arc::new(Shared::new(self.addr));
        tokio::spawn(read_loop(rd, shared.clone()));
        tokio::spawn(write_loop(wr, rx, shared.clone(), self.idle_timeout));
        tracing::debug!(addr = %self.addr, "upstream connection opened");
        Arc::new(Conn { shared, tx })
    }
}

enum Pick {
    /// Send on this connection.
    Use(Arc<Conn>),
    /// This connection is busy and the pool may grow.
    Grow(Arc<Conn>),
    /// No usable connection.
    None,
}

// === impl Conn ===

/// The sending side of one connection; its reader and writer run as tasks.
#[derive(Debug)]
struct Conn {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Vec<u8>>,
}

type Reply = Result<Vec<u8>, UpstreamError>;

/// What a connection's tasks and its senders share.
#[derive(Debug)]
struct Shared {
    addr: SocketAddr,
    state: Mutex<ConnState>,
    cancel: CancellationToken,
}

#[derive(Debug)]
struct ConnState {
    /// In-flight queries by the ID used on this connection; the sequence number tells a
    /// query's own entry from a later one that reused its ID.
    pending: IdMap<(u64, oneshot::Sender<Reply>)>,
    next_seq: u64,
    closed: bool,
    last_activity: Instant,
    last_read: Instant,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.shared.state.lock().closed
    }

    fn load(&self) -> usize {
        self.shared.state.lock().pending.len()
    }

    async fn exchange(&self, wire: &[u8], deadline: Instant) -> Reply {
        let addr = self.shared.addr;
        let mut framed = frame(wire)
            .ok_or_else(|| UpstreamError::MalformedQuery("longer than 65535 octets".into()))?;
        let (tx, rx) = oneshot::channel();
        let sent_at = Instant::now();
        let (id, seq) = {
            let mut st = self.shared.state.lock();
            if st.closed {
                return Err(lost(addr, "connection closed"));
            }
            if st.pending.len() >= MAX_PIPELINE {
                return Err(lost(addr, "pipeline full"));
            }
            let id = unused_id(&st.pending);
            let seq = st.next_seq;
            st.next_seq += 1;
            st.pending.insert(id, (seq, tx));
            st.last_activity = sent_at;
            (id, seq)
        };
        // Removes our entry however this future ends, including cancellation.
        let _guard = PendingGuard {
            shared: &self.shared,
            id,
            seq,
        };
        set_id(&mut framed[2..], id);
        by_deadline(deadline, addr, async {
            self.tx
                .send(framed)
                .await
                .map_err(|_| lost(addr, "connection closed"))
        })
        .await?;
        match timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(lost(addr, "connection closed")),
            Err(_) => {
                self.shared.on_timeout(sent_at);
                Err(UpstreamError::Timeout { addr })
            }
        }
    }
}

fn lost(addr: SocketAddr, reason: &str) -> UpstreamError {
    UpstreamError::ConnectionLost {
        addr,
        reason: reason.to_owned(),
    }
}

struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u16,
    seq: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock();
        if st
            .pending
            .get(&self.id)
            .is_some_and(|(s, _)| *s == self.seq)
        {
            st.pending.remove(&self.id);
        }
    }
}

impl Shared {
    fn new(addr: SocketAddr) -> Self {
        let now = Instant::now();
        Self {
            addr,
            state: Mutex::new(ConnState {
                pending: IdMap::default(),
                next_seq: 0,
                closed: false,
                last_activity: now,
                last_read: now,
            }),
            cancel: CancellationToken::new(),
        }
    }

    /// Routes a response to the query that used its ID. Unknown IDs are answers to queries
    /// that gave up already (or noise) and are dropped.
    fn deliver(&self, frame: Vec<u8>) {
        let Some(id) = id_of(&frame) else { return };
        let waiter = {
            let mut st = self.state.lock();
            let now = Instant::now();
            st.last_read = now;
            st.last_activity = now;
            st.pending.remove(&id)
        };
        match waiter {
            Some((_, tx)) => {
                let _ = tx.send(Ok(frame));
            }
            None => tracing::debug!(addr = %self.addr, id, "response with unknown ID dropped"),
        }
    }

    /// A query timed out. If nothing at all was read since it was sent, the connection is
    /// presumed dead (black-holed), and closing it moves its other queries elsewhere.
    fn on_timeout(&self, sent_at: Instant) {
        let silent = self.state.lock().last_read < sent_at;
        if silent {
            self.close("no response within the timeout");
        }
    }

    /// Marks the connection closed and fails its in-flight queries (they are retried).
    fn close(&self, reason: &str) {
        let pending = {
            let mut st = self.state.lock();
            if st.closed {
                return;
            }
            st.closed = true;
            std::mem::take(&mut st.pending)
        };
        tracing::debug!(addr = %self.addr, reason, in_flight = pending.len(), "upstream connection closed");
        for (_, (_, tx)) in pending {
            let _ = tx.send(Err(lost(self.addr, reason)));
        }
        self.cancel.cancel();
    }

    /// When the connection becomes idle if nothing happens before.
    fn idle_deadline(&self, idle: Duration) -> Instant {
        let st = self.state.lock();
        if st.pending.is_empty() {
            st.last_activity + idle
        } else {
            Instant::now() + idle
        }
    }

    fn is_idle(&self, idle: Duration) -> bool {
        let st = self.state.lock();
        st.pending.is_empty() && st.last_activity.elapsed() >= idle
    }
}

async fn read_loop<R: AsyncRead + Unpin>(mut rd: R, shared: Arc<Shared>) {
    let reason = loop {
        tokio::select! {
            () = shared.cancel.cancelled() => return,
            res = read_frame(&mut rd) => match res {
                Ok(frame) if frame.len() < HEADER_LEN => {
                    break format!("{}-octet frame is not a DNS message", frame.len());
                }
                Ok(frame) => shared.deliver(frame),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    break "closed by upstream".to_owned();
                }
                Err(e) => break format!("read failed: {e}"),
            },
        }
    };
    shared.close(&reason);
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
    idle: Duration,
) {
    let reason = loop {
        let idle_at = shared.idle_deadline(idle);
        tokio::select! {
            () = shared.cancel.cancelled() => break None,
            msg = rx.recv() => {
                let Some(mut buf) = msg else { break Some("pool dropped".to_owned()) };
                while buf.len() < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(more) => buf.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                let write = async {
                    wr.write_all(&buf).await?;
                    wr.flush().await
                };
                match timeout(WRITE_TIMEOUT, write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Some(format!("write failed: {e}")),
                    Err(_) => break Some("write timed out".to_owned()),
                }
            }
            () = sleep_until(idle_at) => {
                if shared.is_idle(idle) {
                    break Some("idle".to_owned());
                }
            }
        }
    };
    if let Some(reason) = reason {
        shared.close(&reason);
    }
    let _ = timeout(CLOSE_TIMEOUT, wr.shutdown()).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::HashSet;
    use std::sync::atomic::Ordering;

    use tokio::task::JoinSet;

    use super::super::testutil::{assert_answers, config, query, tcp_server, udp_server};
    use super::super::{Protocol, UpstreamConfig, Upstreams};
    use super::*;

    #[tokio::test]
    async fn tcp_pipelines_with_rewritten_ids() {
        let server = tcp_server().await;
        let cfg = UpstreamConfig {
            tls_connections: 1,
            ..config(vec![server.tcp_url()])
        };
        let ups = Upstreams::new(&cfg).unwrap();
        let mut set = JoinSet::new();
        for i in 0..100u32 {
            let ups = ups.clone();
            let name = format!("delay-{}.t{i}.test.", (i * 37) % 50);
            set.spawn(async move { (ups.query(&query(&name, 0xFFFF)).await, name) });
        }
        while let Some(r) = set.join_next().await {
            let (a, name) = r.unwrap();
            let a = a.unwrap();
            assert_answers(&a.response, &name, 0xFFFF);
            assert_eq!(a.protocol, Protocol::Tcp);
        }
        assert_eq!(server.connections(), 1);
        let ids: HashSet<u16> = server.stats.ids.lock().iter().copied().collect();
        assert_eq!(ids.len(), 100);
        // Plain TCP is not padded.
        let lens = server.stats.lens.lock().clone();
        assert!(lens.iter().any(|l| l % 128 != 0), "{lens:?}");
    }

    #[tokio::test]
    async fn tcp_pool_grows_up_to_its_limit() {
        let server = tcp_server().await;
        let cfg = UpstreamConfig {
            tls_connections: 3,
            ..config(vec![server.tcp_url()])
        };
        let ups = Upstreams::new(&cfg).unwrap();
        let mut set = JoinSet::new();
        for i in 0..200 {
            let ups = ups.clone();
            set.spawn(async move { ups.query(&query(&format!("delay-20.g{i}.test."), 1)).await });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
        }
        assert!(
            (2..=3).contains(&server.connections()),
            "{}",
            server.connections()
        );
        assert!(ups.health()[0].open_connections <= 3);
    }

    #[tokio::test]
    async fn tcp_connection_killed_mid_flight_is_retried() {
        let server = tcp_server().await;
        server.behavior.kill_after.store(5, Ordering::SeqCst);
        let cfg = UpstreamConfig {
            tls_connections: 1,
            ..config(vec![server.tcp_url()])
        };
        let ups = Upstreams::new(&cfg).unwrap();
        let mut set = JoinSet::new();
        for i in 0..30 {
            let ups = ups.clone();
            let name = format!("delay-50.r{i}.test.");
            set.spawn(async move { (ups.query(&query(&name, 5)).await, name) });
        }
        while let Some(r) = set.join_next().await {
            let (a, name) = r.unwrap();
            assert_answers(&a.unwrap().response, &name, 5);
        }
        assert!(server.connections() >= 2);
        assert_eq!(ups.health()[0].errors, 0);
    }

    #[tokio::test]
    async fn silent_connection_is_dropped_after_a_timeout() {
        let server = tcp_server().await;
        let cfg = UpstreamConfig {
            timeout: Duration::from_millis(300),
            attempt_timeout: Duration::from_millis(300),
            ..config(vec![server.tcp_url()])
        };
        let ups = Upstreams::new(&cfg).unwrap();
        let err = ups.query(&query("silent.test.", 1)).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Timeout { .. }), "{err}");
        // Nothing was read on the connection since the query was sent: presumed dead.
        assert_eq!(ups.health()[0].open_connections, 0);
        ups.query(&query("ok.test.", 1)).await.unwrap();
        assert_eq!(server.connections(), 2);
    }

    #[tokio::test]
    async fn waiters_share_a_failed_connect() {
        // A UDP-only port: TCP connects are refused.
        let server = udp_server().await;
        let pool = Arc::new(Pool::new(
            server.addr,
            Connector::Tcp,
            2,
            Duration::from_secs(5),
            Duration::from_secs(1),
        ));
        let deadline = Instant::now() + Duration::from_secs(2);
        let wire = query("a.test.", 1);
        let results = tokio::join!(
            pool.exchange(&wire, deadline),
            pool.exchange(&wire, deadline),
            pool.exchange(&wire, deadline)
        );
        for r in [results.0, results.1, results.2] {
            assert!(matches!(r, Err(UpstreamError::Connect { .. })), "{r:?}");
        }
        assert_eq!(pool.open_connections(), 0);
    }
}
