//! Test harness: dnsd's `run` on ephemeral loopback sockets, a scripted fake upstream on 127.0.0.1, and a fake fwd serving `Firewall` (AuthorizeMany, Authorize and WatchRevocations) on a Unix socket in a tempdir.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dnsd::config::Config;
use dnsd::listener::Sockets;
use guard_proto::v1::firewall_server::{Firewall, FirewallServer};
use guard_proto::v1::*;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket, UnixListener};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

// === fake upstream ===

/// Builds the upstream's answer to a query; `None` sends nothing, `Some(bytes)` sends them.
pub type Responder = Arc<dyn Fn(&Message) -> Option<Vec<u8>> + Send + Sync>;

/// A fake upstream on 127.0.0.1 (UDP).
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub queries: Arc<AtomicUsize>,
}

/// Starts a fake upstream answering with `respond`.
pub async fn fake_upstream(respond: Responder) -> FakeUpstream {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let queries = Arc::new(AtomicUsize::new(0));
    let count = queries.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            if let Some(resp) = respond(&q) {
                let _ = sock.send_to(&resp, peer).await;
            }
        }
    });
    FakeUpstream { addr, queries }
}

/// A response to `q` with `answers` given as zone-file-like strings:
/// "name TTL A 1.2.3.4", "name TTL AAAA ::1", "name TTL CNAME target", "name TTL TXT text".
pub fn reply(q: &Message, answers: &[&str]) -> Vec<u8> {
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};
    use hickory_proto::rr::{RData, Record};
    let mut m = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.recursion_available = true;
    m.add_queries(q.queries.clone());
    if let Some(e) = &q.edns {
        let mut out = Edns::new();
        out.set_max_payload(e.max_payload());
        m.set_edns(out);
    }
    for a in answers {
        let parts: Vec<&str> = a.splitn(4, ' ').collect();
        let name = Name::from_ascii(parts[0]).unwrap();
        let ttl: u32 = parts[1].parse().unwrap();
        let data = match parts[2] {
            "A" => RData::A(A(parts[3].parse().unwrap())),
            "AAAA" => RData::AAAA(AAAA(parts[3].parse().unwrap())),
            "CNAME" => RData::CNAME(CNAME(Name::from_ascii(parts[3]).unwrap())),
            "TXT" => RData::TXT(TXT::new(vec![parts[3].to_owned()])),
            other => panic!("unsupported type {other}"),
        };
        m.add_answer(Record::from_rdata(name, ttl, data));
    }
    m.to_vec().unwrap()
}

// === fake fwd ===

/// How the fake fwd behaves.
#[derive(Debug, Clone)]
pub enum FwdMode {
    /// Grant everything (except `reject`), expiring after TTL + `margin_ms`.
    Grant,
    /// Sleep this long, then grant.
    Delay(Duration),
    /// Refuse the whole call with PERMISSION_DENIED.
    Refuse,
}

/// The fake fwd's state, shared with the test.
pub struct FakeFwd {
    /// Every request, in arrival order (each request of an AuthorizeMany call separately).
    pub calls: Mutex<Vec<AuthorizeRequest>>,
    /// The requests of each AuthorizeMany call, one entry per call.
    pub batches: Mutex<Vec<Vec<AuthorizeRequest>>>,
    pub mode: Mutex<FwdMode>,
    pub reject: Mutex<HashSet<IpAddr>>,
    pub margin_ms: u64,
    /// When set, Authorize blocks until `release` is notified.
    pub hold: Mutex<bool>,
    pub release: Notify,
    pub entered: Notify,
    /// Revocations pushed by the test ([`FakeFwd::revoke`]) to every WatchRevocations stream.
    revocations: tokio::sync::broadcast::Sender<String>,
    /// Bumped by [`FakeFwd::cut_watchers`]: every open stream ends.
    cut: tokio::sync::watch::Sender<u64>,
    /// When set, new WatchRevocations calls are refused with UNAVAILABLE.
    pub refuse_watch: Mutex<bool>,
    /// How many WatchRevocations streams were opened.
    pub watchers: AtomicUsize,
}

impl FakeFwd {
    pub fn new() -> Arc<FakeFwd> {
        Arc::new(FakeFwd {
            calls: Mutex::new(Vec::new()),
            batches: Mutex::new(Vec::new()),
            mode: Mutex::new(FwdMode::Grant),
            reject: Mutex::new(HashSet::new()),
            margin_ms: 5_000,
            hold: Mutex::new(false),
            release: Notify::new(),
            entered: Notify::new(),
            revocations: tokio::sync::broadcast::channel(64).0,
            cut: tokio::sync::watch::channel(0).0,
            refuse_watch: Mutex::new(false),
            watchers: AtomicUsize::new(0),
        })
    }

    /// Sends a revocation of `cidr` to every open WatchRevocations stream, as fwd does once a
    /// revocation is committed.
    pub fn revoke(&self, cidr: &str) {
        let _ = self.revocations.send(cidr.to_owned());
    }

    /// Ends every open WatchRevocations stream (fwd keeps serving).
    pub fn cut_watchers(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    pub fn calls(&self) -> Vec<AuthorizeRequest> {
        self.calls.lock().clone()
    }

    /// The calls answering queries (alias records, sent after an answer released from
    /// memory, left out).
    pub fn answer_calls(&self) -> Vec<AuthorizeRequest> {
        self.calls
            .lock()
            .iter()
            .filter(|c| c.reason != "alias")
            .cloned()
            .collect()
    }

    /// How many requests each AuthorizeMany call carried.
    pub fn batch_sizes(&self) -> Vec<usize> {
        self.batches.lock().iter().map(Vec::len).collect()
    }
}

#[derive(Clone)]
struct FwdService(Arc<FakeFwd>, CancellationToken);

type RevocationStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Revocation, Status>> + Send>>;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

impl FwdService {
    /// fwd's answer to one request, by the fake's mode.
    async fn answer(&self, req: &AuthorizeRequest) -> Result<Vec<GrantResult>, Status> {
        let st = &self.0;
        let mode = st.mode.lock().clone();
        match mode {
            FwdMode::Refuse => return Err(Status::permission_denied("not an authorizer")),
            FwdMode::Delay(d) => tokio::time::sleep(d).await,
            FwdMode::Grant => {}
        }
        if req.grants.is_empty() {
            return Err(Status::invalid_argument("empty request"));
        }
        let reject = st.reject.lock().clone();
        Ok(req
            .grants
            .iter()
            .map(|g| {
                let ip = guard_proto::ip_from_bytes(&g.ip).unwrap();
                if reject.contains(&ip) {
                    GrantResult {
                        ip: g.ip.clone(),
                        outcome: Outcome::Rejected as i32,
                        expires_unix_ms: 0,
                        effective_ttl_s: 0,
                        error: "never-authorize".into(),
                    }
                } else {
                    GrantResult {
                        ip: g.ip.clone(),
                        outcome: Outcome::Granted as i32,
                        expires_unix_ms: now_ms() + u64::from(g.ttl_s) * 1000 + st.margin_ms,
                        effective_ttl_s: g.ttl_s,
                        error: String::new(),
                    }
                }
            })
            .collect())
    }
}

#[tonic::async_trait]
impl Firewall for FwdService {
    type WatchRevocationsStream = RevocationStream;

    /// Like fwd: the catch-alls first, then every pushed revocation; ends on `cut_watchers`
    /// or when the server stops.
    async fn watch_revocations(
        &self,
        _: Request<WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        let st = &self.0;
        if *st.refuse_watch.lock() {
            return Err(Status::unavailable("fake: watch refused"));
        }
        let mut rx = st.revocations.subscribe();
        let mut cut = st.cut.subscribe();
        let stop = self.1.clone();
        st.watchers.fetch_add(1, Ordering::SeqCst);
        let (tx, out) = tokio::sync::mpsc::channel::<Result<Revocation, Status>>(64);
        let everything = || ["0.0.0.0/0", "::/0"].map(|c| c.to_owned());
        tokio::spawn(async move {
            let mut pending: Vec<String> = everything().into();
            loop {
                for cidr in pending.drain(..) {
                    if tx.send(Ok(Revocation { cidr })).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    _ = cut.changed() => return,
                    _ = stop.cancelled() => return,
                    r = rx.recv() => match r {
                        Ok(cidr) => pending.push(cidr),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            pending.extend(everything())
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    /// Like fwd: each request handled as if sent alone, all answered together. The call is
    /// recorded in `batches` and each request in `calls`; `hold` holds the whole call.
    async fn authorize_many(
        &self,
        req: Request<guard_proto::v1::AuthorizeManyRequest>,
    ) -> Result<Response<guard_proto::v1::AuthorizeManyResponse>, Status> {
        let requests = req.into_inner().requests;
        let st = &self.0;
        st.batches.lock().push(requests.clone());
        st.calls.lock().extend(requests.iter().cloned());
        st.entered.notify_one();
        if *st.hold.lock() {
            st.release.notified().await;
        }
        let mut responses = Vec::new();
        for r in requests {
            let slot = match self.answer(&r).await {
                Ok(results) => guard_proto::v1::AuthorizeOne {
                    results,
                    error: String::new(),
                },
                // A request refused alone is refused in its slot by AuthorizeMany.
                Err(status) if status.code() == tonic::Code::InvalidArgument => {
                    guard_proto::v1::AuthorizeOne {
                        results: Vec::new(),
                        error: status.message().to_owned(),
                    }
                }
                Err(status) => return Err(status),
            };
            responses.push(slot);
        }
        Ok(Response::new(guard_proto::v1::AuthorizeManyResponse {
            responses,
        }))
    }

    async fn authorize(
        &self,
        req: Request<AuthorizeRequest>,
    ) -> Result<Response<AuthorizeResponse>, Status> {
        let req = req.into_inner();
        let st = &self.0;
        st.calls.lock().push(req.clone());
        st.entered.notify_one();
        if *st.hold.lock() {
            st.release.notified().await;
        }
        let results = self.answer(&req).await?;
        Ok(Response::new(AuthorizeResponse { results }))
    }
    async fn allow(&self, _: Request<AllowRequest>) -> Result<Response<AllowResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn revoke(&self, _: Request<RevokeRequest>) -> Result<Response<RevokeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn history(
        &self,
        _: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Serves the fake fwd on `path`.
pub fn serve_fake_fwd(path: PathBuf, state: Arc<FakeFwd>) {
    serve_fake_fwd_until(path, state, CancellationToken::new());
}

/// Serves the fake fwd on `path` until `stop` (then the socket file is removed, as a
/// stopping fwd would).
pub fn serve_fake_fwd_until(
    path: PathBuf,
    state: Arc<FakeFwd>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        tonic::transport::Server::builder()
            .add_service(FirewallServer::new(FwdService(state, stop.clone())))
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
            .unwrap();
        let _ = std::fs::remove_file(&path);
    })
}

// === dnsd ===

/// A running dnsd.
pub struct Dnsd {
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    /// The Prometheus endpoint.
    pub metrics: SocketAddr,
    pub control: PathBuf,
    pub fwd_socket: PathBuf,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), dnsd::server::ServerError>>,
    pub dir: tempfile::TempDir,
}

/// Config text for a dnsd forwarding to `upstream`; `extra` is appended inside sections
/// via `edit`.
pub fn base_config(upstream: SocketAddr, dir: &std::path::Path) -> Config {
    let text = format!(
        r#"
        [upstream]
        servers = ["udp://{upstream}"]
        timeout = "1s"
        attempt_timeout = "1s"
        [authorize]
        socket = "{fwd}"
        timeout = "500ms"
        [control]
        socket = "{ctl}"
        "#,
        fwd = dir.join("fwd.sock").display(),
        ctl = dir.join("dnsd.sock").display(),
    );
    Config::parse(&text).unwrap()
}

/// Starts dnsd with `cfg` (already pointing at the tempdir) on ephemeral loopback sockets.
pub fn start_dnsd(cfg: Config, dir: tempfile::TempDir) -> Dnsd {
    let errors = cfg.validate();
    assert!(errors.is_empty(), "{errors:#?}");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_addr = metrics.local_addr().unwrap();
    let control = cfg.control.socket.clone();
    let sockets = Sockets {
        udp: vec![udp.try_clone().unwrap()],
        tcp: vec![tcp.try_clone().unwrap()],
        metrics: Some(metrics),
        control: Some(dnsd::listener::bind_control(&control).unwrap()),
        control_path: Some(control.clone()),
        ..Sockets::default()
    };
    let shutdown = CancellationToken::new();
    let fwd_socket = cfg.authorize.socket.clone();
    let task = tokio::spawn(dnsd::run(cfg, sockets, shutdown.clone(), None));
    Dnsd {
        udp: udp.local_addr().unwrap(),
        tcp: tcp.local_addr().unwrap(),
        metrics: metrics_addr,
        control,
        fwd_socket,
        shutdown,
        task,
        dir,
    }
}

/// A query message.
pub fn query(name: &str, qtype: RecordType, edns: bool) -> Message {
    let mut m = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m
}

fn rand_id() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(100);
    NEXT.fetch_add(1, Ordering::SeqCst) as u16
}

/// Sends a query over UDP from `from` and waits up to `wait` for the answer.
pub async fn udp_query_from(
    server: SocketAddr,
    from: &str,
    msg: &Message,
    wait: Duration,
) -> Option<Message> {
    let sock = UdpSocket::bind(format!("{from}:0")).await.unwrap();
    sock.send_to(&msg.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let (n, _) = tokio::time::timeout(wait, sock.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    let resp = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(resp.metadata.id, msg.metadata.id);
    Some(resp)
}

/// Sends a query over UDP from 127.0.0.1 and expects an answer within 3 s.
pub async fn udp_query(server: SocketAddr, msg: &Message) -> Message {
    // Generous: only a failing test waits this long (a loaded 2-core CI box is slow).
    udp_query_from(server, "127.0.0.1", msg, Duration::from_secs(10))
        .await
        .expect("no answer")
}

/// Sends a query over TCP and reads the answer.
pub async fn tcp_query(server: SocketAddr, msg: &Message) -> Message {
    let mut s = TcpStream::connect(server).await.unwrap();
    let wire = msg.to_vec().unwrap();
    let mut frame = (wire.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(&wire);
    s.write_all(&frame).await.unwrap();
    read_frame(&mut s).await.expect("no answer over TCP")
}

/// Reads one length-prefixed message.
pub async fn read_frame(s: &mut TcpStream) -> Option<Message> {
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut len))
        .await
        .ok()?
        .ok()?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).await.ok()?;
    Some(Message::from_vec(&buf).unwrap())
}

/// The addresses of an answer's A/AAAA records.
pub fn addrs(m: &Message) -> Vec<IpAddr> {
    use hickory_proto::rr::RData;
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// The addresses of an Authorize request.
pub fn grant_ips(req: &AuthorizeRequest) -> Vec<IpAddr> {
    req.grants
        .iter()
        .map(|g| guard_proto::ip_from_bytes(&g.ip).unwrap())
        .collect()
}

/// The value of an unlabelled metric (`dnsd_revocations_total`, ...), scraped from `GET /metrics`.
pub async fn metric(endpoint: SocketAddr, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect(endpoint).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf);
    text.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Waits (up to 10 s) until metric `name` satisfies `ok`; panics otherwise.
pub async fn wait_metric(endpoint: SocketAddr, name: &str, ok: impl Fn(f64) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric(endpoint, name).await;
        if v.is_some_and(&ok) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never reached the expected value (last {v:?})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
