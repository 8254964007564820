//! The front end: binding or inheriting (systemd socket activation) the UDP, TCP and DoT sockets, and serving DNS on them.
//!
//! TCP follows RFC 7766: many queries per connection, answered out of order as they
//! complete, an idle timeout between messages, a cap on connections, and a per-message read
//! deadline that starts with a message's first byte (so a slowloris client that dribbles a
//! byte at a time is cut off). DoT (RFC 7858) is the same framing inside TLS.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, getsockopt, listen,
    setsockopt, socket, sockopt,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batch::{Outbox, RecvBatch, SendBatch};
use crate::config::{Config, ListenConfig, TlsListenConfig};
use crate::handler::{Early, Handler, Transport};
use crate::metrics::Metrics;
use crate::quiet::QuietUdp;

/// Why sockets could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// Binding an address failed.
    #[error("binding {proto} {addr}: {source}")]
    Bind {
        /// "udp", "tcp", "tls" or "metrics".
        proto: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// A socket passed by systemd is unusable.
    #[error("inherited socket {index} (LISTEN_FDS): {reason}")]
    Inherited {
        /// Its index among the passed descriptors.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The control socket could not be created.
    #[error("control socket {path}: {reason}")]
    Control {
        /// Its path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The TLS certificate or key could not be loaded.
    #[error("{what} {path}: {reason}")]
    Tls {
        /// "certificate" or "key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// There is nothing to listen on.
    #[error("no DNS listening sockets (configure listen.udp/listen.tcp or use socket activation)")]
    NoSockets,
}

/// Every socket dnsd serves on, bound before the runtime starts (or inherited), so that
/// `run` needs no privileges and tests can pass sockets on ephemeral ports.
#[derive(Debug, Default)]
pub struct Sockets {
    /// UDP DNS sockets.
    pub udp: Vec<std::net::UdpSocket>,
    /// TCP DNS listeners.
    pub tcp: Vec<std::net::TcpListener>,
    /// DNS-over-TLS listeners.
    pub tls: Vec<std::net::TcpListener>,
    /// The control socket, if enabled.
    pub control: Option<std::os::unix::net::UnixListener>,
    /// The Prometheus endpoint, if enabled.
    pub metrics: Option<std::net::TcpListener>,
    /// The control socket's path (removed on shutdown).
    pub control_path: Option<PathBuf>,
}

impl Sockets {
    /// Inherits sockets from systemd if it passed any, otherwise binds the configured
    /// addresses; also binds the control socket and metrics endpoint.
    ///
    /// Call it before starting any thread: socket activation consumes (unsets) the
    /// LISTEN_* environment variables.
    pub fn open(cfg: &Config) -> Result<Sockets, ListenerError> {
        let mut s = match inherit()? {
            Some(s) => {
                tracing::info!(
                    udp = s.udp.len(),
                    tcp = s.tcp.len(),
                    tls = s.tls.len(),
                    "using sockets passed by systemd; listen.udp and listen.tcp are ignored"
                );
                s
            }
            None => Sockets::bind_dns(&cfg.listen)?,
        };
        if s.tls.is_empty()
            && let Some(tls) = &cfg.listen.tls
        {
            for addr in &tls.addrs {
                s.tls.push(bind_tcp(*addr, "tls")?);
            }
        }
        if s.udp.is_empty() && s.tcp.is_empty() && s.tls.is_empty() {
            return Err(ListenerError::NoSockets);
        }
        if cfg.control.enabled {
            s.control = Some(bind_control(&cfg.control.socket)?);
            s.control_path = Some(cfg.control.socket.clone());
        }
        if let Some(addr) = cfg.metrics.listen {
            s.metrics = Some(bind_tcp(addr, "metrics")?);
        }
        Ok(s)
    }

    /// Binds the configured UDP and TCP addresses.
    pub fn bind_dns(cfg: &ListenConfig) -> Result<Sockets, ListenerError> {
        let mut s = Sockets::default();
        for addr in &cfg.udp {
            s.udp.push(bind_udp(*addr)?);
        }
        for addr in &cfg.tcp {
            s.tcp.push(bind_tcp(*addr, "tcp")?);
        }
        Ok(s)
    }
}

fn family(addr: &SocketAddr) -> AddressFamily {
    match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// Creates, configures and binds a socket. IPv6 sockets are V6ONLY, so that `[::]:53` and
/// `0.0.0.0:53` can both be configured.
fn bind_fd(addr: SocketAddr, ty: SockType, proto: &'static str) -> Result<OwnedFd, ListenerError> {
    use std::os::fd::AsRawFd;
    let err = |e: nix::Error| ListenerError::Bind {
        proto,
        addr,
        source: io::Error::from(e),
    };
    let fd = socket(family(&addr), ty, SockFlag::SOCK_CLOEXEC, None).map_err(err)?;
    if ty == SockType::Stream {
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(err)?;
    }
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(err)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(err)?;
    Ok(fd)
}

/// Binds a UDP socket.
pub fn bind_udp(addr: SocketAddr) -> Result<std::net::UdpSocket, ListenerError> {
    let fd = bind_fd(addr, SockType::Datagram, "udp")?;
    Ok(std::net::UdpSocket::from(fd))
}

/// Binds and listens on a TCP socket.
pub fn bind_tcp(
    addr: SocketAddr,
    proto: &'static str,
) -> Result<std::net::TcpListener, ListenerError> {
    let fd = bind_fd(addr, SockType::Stream, proto)?;
    let backlog = Backlog::new(1024).unwrap_or(Backlog::MAXCONN);
    listen(&fd, backlog).map_err(|e| ListenerError::Bind {
        proto,
        addr,
        source: io::Error::from(e),
    })?;
    Ok(std::net::TcpListener::from(fd))
}

/// Takes the sockets systemd passed (LISTEN_FDS/LISTEN_PID), if any, sorting them by
/// SO_TYPE: datagram sockets serve UDP, stream sockets TCP, or DoT when their
/// FileDescriptorName= is `dot` or `tls`.
fn inherit() -> Result<Option<Sockets>, ListenerError> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(None);
    }
    let mut s = Sockets::default();
    for index in 0..fds.len() {
        let bad = |reason: String| ListenerError::Inherited { index, reason };
        // listenfd converts the raw descriptor after checking it is an inet socket of the
        // given type; try stream, then datagram. SO_TYPE decides below.
        let fd: OwnedFd = match fds.take_custom::<OwnedFd>(
            index,
            nix::libc::AF_INET,
            nix::libc::SOCK_STREAM,
            "inet stream socket",
        ) {
            Ok(Some(fd)) => fd,
            Ok(None) => continue,
            Err(_) => match fds.take_custom::<OwnedFd>(
                index,
                nix::libc::AF_INET,
                nix::libc::SOCK_DGRAM,
                "inet datagram socket",
            ) {
                Ok(Some(fd)) => fd,
                Ok(None) => continue,
                Err(e) => return Err(bad(format!("not an IPv4/IPv6 TCP or UDP socket: {e}"))),
            },
        };
        match getsockopt(&fd, sockopt::SockType).map_err(|e| bad(e.to_string()))? {
            SockType::Datagram => s.udp.push(std::net::UdpSocket::from(fd)),
            SockType::Stream => {
                if !getsockopt(&fd, sockopt::AcceptConn).map_err(|e| bad(e.to_string()))? {
                    return Err(bad("stream socket is not listening".into()));
                }
                let l = std::net::TcpListener::from(fd);
                match names.get(index).map(String::as_str) {
                    Some("dot" | "tls") => s.tls.push(l),
                    _ => s.tcp.push(l),
                }
            }
            other => return Err(bad(format!("unsupported socket type {other:?}"))),
        }
    }
    Ok(Some(s))
}

/// Binds the control socket with mode 0660, replacing a stale socket file but never a live
/// one (another dnsd) or a non-socket file.
pub fn bind_control(path: &Path) -> Result<std::os::unix::net::UnixListener, ListenerError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = |reason: String| ListenerError::Control {
        path: path.to_path_buf(),
        reason,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err("exists and is not a socket".into()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err("another process is serving it".into()));
        }
        std::fs::remove_file(path).map_err(|e| err(format!("removing stale socket: {e}")))?;
    }
    let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| err(format!("chmod 0660: {e}")))?;
    Ok(l)
}

/// Loads the DoT certificate and key into an acceptor (ALPN "dot", RFC 7858).
pub fn tls_acceptor(cfg: &TlsListenConfig) -> Result<TlsAcceptor, ListenerError> {
    let cert_err = |reason: String| ListenerError::Tls {
        what: "certificate",
        path: cfg.cert.clone(),
        reason,
    };
    let key_err = |reason: String| ListenerError::Tls {
        what: "key",
        path: cfg.key.clone(),
        reason,
    };
    let pem = std::fs::read(&cfg.cert).map_err(|e| cert_err(e.to_string()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no PEM certificate in file".into()));
    }
    let pem = std::fs::read(&cfg.key).map_err(|e| key_err(e.to_string()))?;
    let key = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| key_err(e.to_string()))?
        .ok_or_else(|| key_err("no PEM private key in file".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| cert_err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            key_err(format!(
                "does not match the certificate or is unusable: {e}"
            ))
        })?;
    config.alpn_protocols = vec![b"dot".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

// === serving ===

/// Limits of stream (TCP and DoT) connections.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Close a connection idle for this long.
    pub idle_timeout: Duration,
    /// Per-message read (and write) deadline.
    pub read_timeout: Duration,
    /// Queries of one connection processed at once.
    pub max_pipelined: usize,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
}

impl StreamSettings {
    /// From the `[listen]` section.
    pub fn new(cfg: &ListenConfig) -> Self {
        StreamSettings {
            idle_timeout: cfg.tcp_idle_timeout,
            read_timeout: cfg.tcp_read_timeout,
            max_pipelined: cfg.tcp_max_pipelined,
            handshake_timeout: cfg
                .tls
                .as_ref()
                .map_or(Duration::from_secs(5), |t| t.handshake_timeout),
        }
    }
}

/// Datagrams read per system call on a UDP listener (see [`crate::batch`]).
const UDP_BATCH: usize = 32;

/// Serves UDP queries on `sock` until `shutdown`; query tasks are tracked by `tasks`.
pub(crate) async fn serve_udp(
    sock: QuietUdp,
    handler: Arc<Handler>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let sock = Arc::new(sock);
    // Room for the largest datagram, so that oversized junk is read whole and rejected
    // rather than silently cut to a parseable prefix.
    let mut batch = RecvBatch::new(UDP_BATCH, 65_536);
    let mut out = SendBatch::new(UDP_BATCH);
    let outbox = Arc::new(Outbox::default());
    // However the loop ends (shutdown, or a panic), query tasks still running then send their
    // own answers, and what is queued gets one last try.
    let _closing = CloseOnDrop {
        outbox: &outbox,
        sock: &sock,
        metrics: handler.metrics(),
    };
    let ready = outbox.ready();
    tokio::pin!(ready);
    // Answers the socket buffer had no room for wait in tasks of their own, at most
    // `BLOCKED_MAX` at once; past that they are dropped, as the kernel drops datagrams.
    let waiting = Arc::new(AtomicUsize::new(0));
    let blocked = |resp: Vec<u8>, peer: SocketAddr| {
        let Some(slot) = BlockedSlot::take(&waiting) else {
            handler.metrics().dropped("send_buffer_full");
            return;
        };
        let sock = sock.clone();
        tasks.spawn(async move {
            answer_when_writable(&sock, &resp, peer).await;
            drop(slot);
        });
    };
    loop {
        // `biased`: queries first. Answers waiting in the outbox leave at every turn anyway,
        // and tokio's cooperative budget makes a flooded socket pend now and then. The outbox's
        // wake-up spends that budget too (`cooperative`): misses finishing on other workers
        // must not keep this task from yielding, nor from reading.
        let received = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = batch.recv(&sock) => Some(r),
            () = tokio::task::coop::cooperative(&mut ready) => {
                ready.set(outbox.ready());
                None
            }
        };
        match received {
            Some(Ok(count)) => {
                for i in 0..count {
                    let Some((data, Some(peer))) = batch.get(i) else {
                        continue;
                    };
                    serve_datagram(&sock, &handler, &tasks, &outbox, data, peer, &mut out);
                }
            }
            Some(Err(e)) => {
                // ICMP errors from earlier sends surface here on Linux; keep serving.
                tracing::debug!(error = %e, "udp recv error");
            }
            None => {}
        }
        // The answers this read's queries got at once, and those query tasks finished since
        // the last turn, leave together.
        outbox.take_into(&mut out);
        out.flush(&sock, send_failed, blocked);
    }
    // Query tasks still running send their own answers from now on.
    outbox.close_into(&mut out);
    out.flush(&sock, send_failed, blocked);
}

/// Answers of one UDP listener that may wait for room in its socket buffer at once.
const BLOCKED_MAX: usize = 1024;

/// One of a listener's [`BLOCKED_MAX`] places for an answer waiting for room; given back on
/// drop.
struct BlockedSlot(Arc<AtomicUsize>);

impl BlockedSlot {
    fn take(waiting: &Arc<AtomicUsize>) -> Option<Self> {
        waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < BLOCKED_MAX).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(waiting.clone()))
    }
}

impl Drop for BlockedSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Closes a listener's outbox when the listener ends, and sends what is still queued (an
/// answer with no room in the socket buffer is dropped, as a lost datagram would be).
struct CloseOnDrop<'a> {
    outbox: &'a Outbox,
    sock: &'a QuietUdp,
    metrics: &'a Metrics,
}

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        let mut out = SendBatch::default();
        self.outbox.close_into(&mut out);
        out.flush(self.sock, send_failed, |_, _| {
            tracing::debug!("udp answer dropped at shutdown: no room in the socket buffer");
            self.metrics.dropped("send_buffer_full");
        });
    }
}

/// Answers one datagram, at once when it can (most cache hits: the answer joins `out`),
/// else in a task of its own, whose answer joins the listener's `outbox`.
fn serve_datagram(
    sock: &Arc<QuietUdp>,
    handler: &Arc<Handler>,
    tasks: &TaskTracker,
    outbox: &Arc<Outbox>,
    data: &[u8],
    peer: SocketAddr,
    out: &mut SendBatch,
) {
    let later = match handler.begin(data, peer, Transport::Udp) {
        Early::Answered(None) => return,
        Early::Answered(Some(resp)) => {
            // Answered without waiting (most cache hits): no task, and no await unless
            // the socket buffer is full.
            out.push(resp, peer);
            return;
        }
        Early::Later(later) => later,
    };
    let Some(admission) = handler.admit() else {
        handler.metrics().dropped("overload");
        return;
    };
    let data = data.to_vec();
    let handler = handler.clone();
    let sock = sock.clone();
    let outbox = outbox.clone();
    let fut = async move {
        // The query's own state is boxed: the task itself stays small, and a spawn copies
        // a task's future several times.
        let Some(resp) = Box::pin(handler.finish(admission, later, &data, Transport::Udp)).await
        else {
            return;
        };
        // The listener sends it with its next batch; after shutdown, this task does.
        if let Err(resp) = outbox.push(resp, peer)
            && let Some(resp) = try_answer(&sock, resp, peer)
        {
            answer_when_writable(&sock, &resp, peer).await;
        }
    };
    tasks.spawn(fut);
}

/// Sends an answer now, or gives it back when the socket buffer is full (for
/// [`answer_when_writable`]). Other errors are logged and the answer dropped, as a lost
/// datagram would be.
fn try_answer(sock: &QuietUdp, resp: Vec<u8>, peer: SocketAddr) -> Option<Vec<u8>> {
    match sock.try_send_to(&resp, peer) {
        Ok(_) => None,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(resp),
        Err(e) => {
            send_failed(e);
            None
        }
    }
}

/// Sends an answer once the socket has room. Boxed: rarely needed, and its state would
/// otherwise enlarge every query's task.
async fn answer_when_writable(sock: &QuietUdp, resp: &[u8], peer: SocketAddr) {
    if let Err(e) = Box::pin(sock.send_to(resp, peer)).await {
        send_failed(e);
    }
}

/// Logs an answer that could not be sent (and is dropped, as a lost datagram would be).
fn send_failed(e: io::Error) {
    tracing::debug!(error = %e, "udp send failed");
}

/// Accepts TCP (or, with `tls`, DoT) connections until `shutdown`.
pub async fn serve_tcp(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Arc<Handler>,
    settings: StreamSettings,
    connections: Arc<Semaphore>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors or similar: back off instead of spinning.
                tracing::warn!(error = %e, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Clients whose queries would be dropped do not get to hold a connection either.
        if handler.live().acl.check(peer.ip()) == crate::policy::Verdict::Drop {
            handler.metrics().dropped("acl");
            continue;
        }
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            handler.metrics().dropped("tcp_max_connections");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let settings = settings.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tasks.spawn(async move {
            let _permit = permit;
            match tls {
                None => {
                    serve_stream(stream, peer, Transport::Tcp, handler, settings, shutdown).await
                }
                Some(acceptor) => {
                    let hs =
                        tokio::time::timeout(settings.handshake_timeout, acceptor.accept(stream));
                    match hs.await {
                        Ok(Ok(tls_stream)) => {
                            serve_stream(
                                tls_stream,
                                peer,
                                Transport::Tls,
                                handler,
                                settings,
                                shutdown,
                            )
                            .await
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "DoT handshake failed"),
                        Err(_) => tracing::debug!("DoT handshake timed out"),
                    }
                }
            }
        });
    }
}

/// Why reading the next message ended the connection.
#[derive(Debug, PartialEq, Eq)]
enum ReadEnd {
    /// Clean close between messages, idle timeout, or shutdown.
    Closed,
    /// A message did not arrive in time, or the stream broke inside one.
    Broken,
}

/// Reads one length-prefixed message: waits up to `idle` for its first byte, then gives the
/// rest `deadline` (the slowloris guard).
async fn read_message<R: AsyncRead + Unpin>(
    rd: &mut R,
    idle: Duration,
    deadline: Duration,
) -> Result<Vec<u8>, ReadEnd> {
    let mut len = [0u8; 2];
    match tokio::time::timeout(idle, rd.read(&mut len[..1])).await {
        Err(_) | Ok(Ok(0)) => return Err(ReadEnd::Closed),
        Ok(Err(_)) => return Err(ReadEnd::Broken),
        Ok(Ok(_)) => {}
    }
    let until = tokio::time::Instant::now() + deadline;
    let rest = async {
        rd.read_exact(&mut len[1..]).await?;
        let n = usize::from(u16::from_be_bytes(len));
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "zero-length message",
            ));
        }
        let mut buf = vec![0u8; n];
        rd.read_exact(&mut buf).await?;
        Ok::<_, io::Error>(buf)
    };
    match tokio::time::timeout_at(until, rest).await {
        Ok(Ok(buf)) => Ok(buf),
        Ok(Err(_)) | Err(_) => Err(ReadEnd::Broken),
    }
}

/// Serves one stream connection: reads messages, processes up to `max_pipelined` of them
/// concurrently, and writes answers as they complete (out of order, RFC 7766 §6.2.1.1).
pub async fn serve_stream<S>(
    stream: S,
    peer: SocketAddr,
    transport: Transport,
    handler: Arc<Handler>,
    settings: StreamSettings,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let conn = shutdown.child_token();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(settings.max_pipelined);
    let write_timeout = settings.read_timeout;
    let writer_conn = conn.clone();
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let Ok(len) = u16::try_from(msg.len()) else {
                continue;
            };
            let mut frame = Vec::with_capacity(msg.len() + 2);
            frame.extend_from_slice(&len.to_be_bytes());
            frame.extend_from_slice(&msg);
            let write = async {
                wr.write_all(&frame).await?;
                wr.flush().await
            };
            match tokio::time::timeout(write_timeout, write).await {
                Ok(Ok(())) => {}
                // A client that does not read its answers is cut off.
                Ok(Err(_)) | Err(_) => {
                    writer_conn.cancel();
                    break;
                }
            }
        }
        let _ = wr.shutdown().await;
    });
    let pipeline = Arc::new(Semaphore::new(settings.max_pipelined));
    let mut queries = JoinSet::new();
    loop {
        let msg = tokio::select! {
            _ = conn.cancelled() => break,
            r = read_message(&mut rd, settings.idle_timeout, settings.read_timeout) => r,
        };
        let Ok(msg) = msg else { break };
        let permit = tokio::select! {
            _ = conn.cancelled() => break,
            p = pipeline.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        while queries.try_join_next().is_some() {}
        let Some(admission) = handler.admit() else {
            handler.metrics().dropped("overload");
            if let Some(resp) = crate::handler::servfail_for(&msg) {
                let _ = tx.send(resp).await;
            }
            continue;
        };
        let handler = handler.clone();
        let tx = tx.clone();
        queries.spawn(async move {
            let _permit = permit;
            if let Some(resp) = handler.handle(admission, &msg, peer, transport).await {
                let _ = tx.send(resp).await;
            }
        });
    }
    drop(tx);
    // Answer what was already asked (a client may half-close after its last query), unless
    // the connection or the daemon is shutting down.
    tokio::select! {
        _ = conn.cancelled() => queries.abort_all(),
        _ = async { while queries.join_next().await.is_some() {} } => {}
    }
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn at_most_blocked_max_answers_wait_for_room_and_a_sent_one_frees_its_place() {
        let waiting = Arc::new(AtomicUsize::new(0));
        let mut held: Vec<BlockedSlot> = (0..BLOCKED_MAX)
            .map(|i| BlockedSlot::take(&waiting).unwrap_or_else(|| panic!("place {i} refused")))
            .collect();
        assert!(
            BlockedSlot::take(&waiting).is_none(),
            "one answer too many waits"
        );
        held.pop();
        let again = BlockedSlot::take(&waiting).expect("a freed place is taken again");
        drop((again, held));
        assert_eq!(waiting.load(Ordering::Acquire), 0);
    }

    /// An upstream that holds every query until `release`, then answers it with one A record,
    /// 192.0.2.7.
    #[derive(Debug, Default)]
    struct Held {
        entered: tokio::sync::Notify,
        release: tokio::sync::Notify,
    }

    impl crate::forward::Forward for Held {
        fn forward<'a>(&'a self, query: &'a [u8]) -> crate::forward::ForwardFuture<'a> {
            use hickory_proto::op::Message;
            use hickory_proto::rr::rdata::A;
            use hickory_proto::rr::{RData, Record};
            Box::pin(async move {
                self.entered.notify_one();
                self.release.notified().await;
                let q = Message::from_vec(query).unwrap();
                let mut r = Message::response(q.metadata.id, q.metadata.op_code);
                r.metadata.recursion_desired = q.metadata.recursion_desired;
                r.metadata.recursion_available = true;
                r.add_queries(q.queries.clone());
                r.add_answer(Record::from_rdata(
                    q.queries[0].name().clone(),
                    300,
                    RData::A(A::new(192, 0, 2, 7)),
                ));
                Ok(crate::forward::Forwarded {
                    wire: r.to_vec().unwrap(),
                    upstream: Arc::from("held"),
                    latency: Duration::ZERO,
                })
            })
        }
        fn health(&self) -> Vec<guard_proto::v1::UpstreamHealth> {
            Vec::new()
        }
        fn strategy(&self) -> String {
            "held".to_owned()
        }
    }

    /// The listener's task ends without its shutdown path (here: aborted; a panic unwinds the
    /// same way) while a miss waits for its upstream: the miss still answers its client.
    #[tokio::test]
    async fn a_miss_in_flight_when_its_listener_ends_abruptly_still_answers() {
        use hickory_proto::op::{Message, Query};
        use hickory_proto::rr::{Name, RecordType};
        let upstream = Arc::new(Held::default());
        let handler = Arc::new(crate::handler::tests::handler_with(upstream.clone()));
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let tasks = TaskTracker::new();
        let listener = tokio::spawn(serve_udp(
            QuietUdp::new(sock).unwrap(),
            handler,
            CancellationToken::new(),
            tasks.clone(),
        ));

        let mut q = Message::query();
        q.metadata.id = 0x4242;
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(
            Name::from_ascii("held.example.").unwrap(),
            RecordType::A,
        ));
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(&q.to_vec().unwrap(), addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), upstream.entered.notified())
            .await
            .expect("the query never reached the upstream");
        listener.abort();
        assert!(listener.await.unwrap_err().is_cancelled());
        upstream.release.notify_one();

        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
            .await
            .expect("the miss in flight when its listener ended got no answer")
            .unwrap();
        let resp = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(resp.metadata.id, 0x4242);
        assert_eq!(resp.answers.len(), 1, "{resp:?}");
        tasks.close();
        tokio::time::timeout(Duration::from_secs(5), tasks.wait())
            .await
            .expect("the miss's task did not end");
    }

    #[tokio::test]
    async fn a_stopped_listener_sends_what_its_outbox_holds_and_refuses_the_rest() {
        let rx = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        let tx = QuietUdp::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let outbox = Outbox::default();
        outbox.push(vec![1], to).unwrap();
        outbox.push(vec![2], to).unwrap();
        drop(CloseOnDrop {
            outbox: &outbox,
            sock: &tx,
            metrics: &Metrics::new(),
        });
        let mut buf = [0u8; 16];
        for want in [1u8, 2] {
            let n = tokio::time::timeout(Duration::from_secs(5), rx.recv(&mut buf))
                .await
                .expect("a queued answer was not sent when the listener stopped")
                .unwrap();
            assert_eq!(&buf[..n], &[want]);
        }
        assert_eq!(outbox.push(vec![3], to), Err(vec![3]), "its task sends it");
    }

    #[tokio::test]
    async fn framing_reads_pipelined_messages() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&[0, 3, 1, 2, 3, 0, 1, 9]).await.unwrap();
        let d = Duration::from_secs(1);
        assert_eq!(
            read_message(&mut server, d, d).await.unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(read_message(&mut server, d, d).await.unwrap(), vec![9]);
        drop(client);
        assert_eq!(read_message(&mut server, d, d).await, Err(ReadEnd::Closed));
    }

    #[tokio::test]
    async fn framing_rejects_zero_length_and_short_bodies() {
        let d = Duration::from_secs(1);
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&[0, 0]).await.unwrap();
        assert_eq!(read_message(&mut server, d, d).await, Err(ReadEnd::Broken));
        // A length that lies about the body, then EOF.
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
        drop(client);
        assert_eq!(read_message(&mut server, d, d).await, Err(ReadEnd::Broken));
        // Half a length prefix, then EOF.
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&[0x00]).await.unwrap();
        drop(client);
        assert_eq!(read_message(&mut server, d, d).await, Err(ReadEnd::Broken));
    }

    #[tokio::test(start_paused = true)]
    async fn slowloris_is_cut_off_and_idle_closes() {
        let idle = Duration::from_secs(10);
        let deadline = Duration::from_secs(2);
        let (mut client, mut server) = tokio::io::duplex(1024);
        let reader = tokio::spawn(async move { read_message(&mut server, idle, deadline).await });
        // One byte of length, then one body byte a second: the deadline hits.
        client.write_all(&[0, 10]).await.unwrap();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(900)).await;
            if client.write_all(&[1]).await.is_err() {
                break;
            }
        }
        assert_eq!(reader.await.unwrap(), Err(ReadEnd::Broken));
        // Idle connection: closed after the idle timeout, not earlier.
        let (_client, mut server) = tokio::io::duplex(1024);
        let start = tokio::time::Instant::now();
        assert_eq!(
            read_message(&mut server, idle, deadline).await,
            Err(ReadEnd::Closed)
        );
        assert!(start.elapsed() >= idle);
    }
}
