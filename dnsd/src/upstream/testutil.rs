//! Test-only DNS servers (UDP, TCP, TLS) and PKI for the upstream unit tests.
//!
//! Servers answer every A query with [`ANSWER_IP`]. The first label of the query name selects
//! a misbehaviour: `delay-N` (answer after N ms), `silent` (never answer), `wrongq` (answer
//! another question), `wrongid` (answer with another ID), `short` (a 4-octet message) and
//! `garbage` (random octets). Server-wide knobs live in [`Behavior`].
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use hickory_proto::op::Message;
use hickory_proto::rr::{Name, RecordType};
use parking_lot::Mutex;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::message::tests::answer_bytes;
use super::tcp::{frame, read_frame};
use super::{UpstreamConfig, Upstreams};

/// The address every test server answers with.
pub(crate) const ANSWER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// What a test server observed.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Queries received.
    pub(crate) queries: AtomicUsize,
    /// Stream connections accepted (TLS: handshakes completed).
    pub(crate) connections: AtomicUsize,
    /// TLS handshakes that resumed a session.
    pub(crate) resumed: AtomicUsize,
    /// IDs of the queries received.
    pub(crate) ids: Mutex<Vec<u16>>,
    /// Lengths of the queries received.
    pub(crate) lens: Mutex<Vec<usize>>,
    /// UDP source ports seen.
    pub(crate) ports: Mutex<HashSet<u16>>,
}

/// Server-wide misbehaviour knobs.
#[derive(Debug, Default)]
pub(crate) struct Behavior {
    /// Abruptly close the next connection that has received this many queries (once).
    pub(crate) kill_after: AtomicUsize,
    /// UDP: answer with TC=1 and no records.
    pub(crate) truncate_udp: AtomicBool,
    /// UDP: send garbage datagrams before the real answer.
    pub(crate) udp_garbage: AtomicBool,
    /// Never answer anything.
    pub(crate) silent: AtomicBool,
    /// Delay every answer by this many milliseconds.
    pub(crate) delay_ms: AtomicU64,
}

#[derive(Debug, Clone)]
struct Ctx {
    stats: Arc<Stats>,
    behavior: Arc<Behavior>,
}

/// A running test server; its tasks stop when it is dropped.
#[derive(Debug)]
pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) stats: Arc<Stats>,
    pub(crate) behavior: Arc<Behavior>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl TestServer {
    fn new(addr: SocketAddr) -> (Self, Ctx) {
        let ctx = Ctx {
            stats: Arc::default(),
            behavior: Arc::default(),
        };
        let server = Self {
            addr,
            stats: ctx.stats.clone(),
            behavior: ctx.behavior.clone(),
            tasks: Vec::new(),
        };
        (server, ctx)
    }

    pub(crate) fn udp_url(&self) -> String {
        format!("udp://{}", self.addr)
    }

    pub(crate) fn tcp_url(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    pub(crate) fn tls_url(&self, name: &str) -> String {
        format!("tls://{}#{name}", self.addr)
    }

    pub(crate) fn queries(&self) -> usize {
        self.stats.queries.load(Ordering::SeqCst)
    }

    pub(crate) fn connections(&self) -> usize {
        self.stats.connections.load(Ordering::SeqCst)
    }
}

/// A health policy for tests: down after 3 failures, back-off from 1 s to 60 s.
pub(crate) fn policy() -> super::health::Policy {
    super::health::Policy {
        max_failures: 3,
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
    }
}

/// A 127.0.0.1 TCP port nothing listens on (bound for a moment, then released).
pub(crate) fn closed_tcp_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A 127.0.0.1 UDP port nothing listens on (bound for a moment, then released).
pub(crate) fn closed_udp_port() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap()
}

/// A UDP server on 127.0.0.1.
pub(crate) async fn udp_server() -> TestServer {
    udp_server_on("127.0.0.1:0").await.unwrap()
}

/// A UDP server on `addr`, if it can be bound.
pub(crate) async fn udp_server_on(addr: &str) -> Option<TestServer> {
    let sock = UdpSocket::bind(addr).await.ok()?;
    let (mut server, ctx) = TestServer::new(sock.local_addr().unwrap());
    server.tasks.push(tokio::spawn(serve_udp(sock, ctx)));
    Some(server)
}

/// A TCP server on 127.0.0.1.
pub(crate) async fn tcp_server() -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (mut server, ctx) = TestServer::new(listener.local_addr().unwrap());
    server
        .tasks
        .push(tokio::spawn(serve_listener(listener, ctx, None)));
    server
}

/// UDP and TCP servers on the same 127.0.0.1 port (for TC=1 fallback).
pub(crate) async fn udp_tcp_server() -> TestServer {
    for _ in 0..50 {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let Ok(listener) = TcpListener::bind(addr).await else {
            continue;
        };
        let (mut server, ctx) = TestServer::new(addr);
        server
            .tasks
            .push(tokio::spawn(serve_udp(sock, ctx.clone())));
        server
            .tasks
            .push(tokio::spawn(serve_listener(listener, ctx, None)));
        return server;
    }
    panic!("no port free for both UDP and TCP");
}

/// A DNS-over-TLS server on 127.0.0.1 presenting `pki`'s server certificate.
pub(crate) async fn tls_server(pki: &Pki) -> TestServer {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(pki.server_chain.clone(), pki.server_key.clone_key())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (mut server, ctx) = TestServer::new(listener.local_addr().unwrap());
    server
        .tasks
        .push(tokio::spawn(serve_listener(listener, ctx, Some(acceptor))));
    server
}

async fn serve_udp(sock: UdpSocket, ctx: Ctx) {
    let sock = Arc::new(sock);
    let mut buf = vec![0; 65_535];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let query = buf[..n].to_vec();
        ctx.stats.ports.lock().insert(from.port());
        let (sock, ctx) = (sock.clone(), ctx.clone());
        tokio::spawn(async move {
            let Some(q) = ctx.record(&query) else { return };
            if ctx.behavior.udp_garbage.load(Ordering::SeqCst) {
                for g in udp_garbage(&q) {
                    let _ = sock.send_to(&g, from).await;
                }
            }
            for reply in ctx.replies(&q, false).await {
                let _ = sock.send_to(&reply, from).await;
            }
        });
    }
}

async fn serve_listener(listener: TcpListener, ctx: Ctx, tls: Option<tokio_rustls::TlsAcceptor>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let ctx = ctx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => {
                    ctx.stats.connections.fetch_add(1, Ordering::SeqCst);
                    serve_stream(tcp, ctx).await;
                }
                Some(acceptor) => {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    ctx.stats.connections.fetch_add(1, Ordering::SeqCst);
                    if stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                        ctx.stats.resumed.fetch_add(1, Ordering::SeqCst);
                    }
                    serve_stream(stream, ctx).await;
                }
            }
        });
    }
}

/// Serves one connection; answers are written in whatever order they become ready.
async fn serve_stream<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S, ctx: Ctx) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if wr.write_all(&f).await.is_err() {
                return;
            }
            let _ = wr.flush().await;
        }
        let _ = wr.shutdown().await;
    });
    let mut received = 0;
    while let Ok(query) = read_frame(&mut rd).await {
        received += 1;
        let kill = ctx.behavior.kill_after.load(Ordering::SeqCst);
        if kill > 0
            && received >= kill
            && ctx
                .behavior
                .kill_after
                .compare_exchange(kill, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            // Drop both halves without answering: a connection reset mid-flight.
            writer.abort();
            return;
        }
        let (tx, ctx) = (tx.clone(), ctx.clone());
        tokio::spawn(async move {
            let Some(q) = ctx.record(&query) else { return };
            for reply in ctx.replies(&q, true).await {
                let _ = tx.send(frame(&reply).unwrap());
            }
        });
    }
}

impl Ctx {
    fn record(&self, query: &[u8]) -> Option<Message> {
        self.stats.queries.fetch_add(1, Ordering::SeqCst);
        self.stats.lens.lock().push(query.len());
        if query.len() >= 2 {
            self.stats
                .ids
                .lock()
                .push(u16::from_be_bytes([query[0], query[1]]));
        }
        Message::from_vec(query).ok()
    }

    /// The messages to send back for `q`.
    async fn replies(&self, q: &Message, stream: bool) -> Vec<Vec<u8>> {
        let label = first_label(q);
        let mut delay = self.behavior.delay_ms.load(Ordering::SeqCst);
        if let Some(ms) = label.strip_prefix("delay-").and_then(|v| v.parse().ok()) {
            delay = ms;
        }
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.behavior.silent.load(Ordering::SeqCst) || label == "silent" {
            return Vec::new();
        }
        // Pad answers to padded queries, as RFC 8467 servers do.
        let padded = q.edns.as_ref().is_some_and(|e| {
            e.option(hickory_proto::rr::rdata::opt::EdnsCode::Padding)
                .is_some()
        });
        let answer = answer_bytes(q, ANSWER_IP, padded.then_some(100));
        match label.as_str() {
            "wrongq" => {
                let mut other = q.clone();
                other.queries[0].name = Name::from_ascii("other.test.").unwrap();
                vec![answer_bytes(&other, ANSWER_IP, None)]
            }
            "wrongid" => {
                let mut a = answer;
                a[0] ^= 0xFF;
                vec![a]
            }
            "short" => vec![answer[..4].to_vec()],
            "garbage" => {
                let mut g = vec![0u8; 40];
                rand::fill(&mut g[..]);
                vec![g]
            }
            _ if !stream && self.behavior.truncate_udp.load(Ordering::SeqCst) => {
                let mut tc = Message::from_vec(&answer).unwrap();
                tc.answers.clear();
                tc.metadata.truncation = true;
                vec![tc.to_vec().unwrap()]
            }
            _ => vec![answer],
        }
    }
}

/// Datagrams a confused or hostile server might send before the real answer.
fn udp_garbage(q: &Message) -> Vec<Vec<u8>> {
    let good = answer_bytes(q, ANSWER_IP, None);
    let mut random = vec![0u8; 60];
    rand::fill(&mut random[..]);
    let mut wrong_id = good.clone();
    wrong_id[1] ^= 0x5A;
    let mut other = q.clone();
    other.queries[0].name = Name::from_ascii("other.test.").unwrap();
    let wrong_q = answer_bytes(&other, ANSWER_IP, None);
    let truncated = good[..good.len() - 3].to_vec();
    vec![random, wrong_id, good[..5].to_vec(), wrong_q, truncated]
}

fn first_label(q: &Message) -> String {
    q.queries
        .first()
        .map(|q| q.name.to_ascii().to_ascii_lowercase())
        .and_then(|n| n.split('.').next().map(str::to_owned))
        .unwrap_or_default()
}

/// An A query for `name` with `id`.
pub(crate) fn query(name: &str, id: u16) -> Vec<u8> {
    super::message::tests::query_bytes(name, id, false)
}

/// Checks that `answer` carries `id`, the question `name` A, and [`ANSWER_IP`].
pub(crate) fn assert_answers(answer: &[u8], name: &str, id: u16) {
    let m = Message::from_vec(answer).unwrap();
    assert_eq!(m.metadata.id, id, "ID restored");
    assert_eq!(m.queries.len(), 1);
    assert_eq!(m.queries[0].name, Name::from_ascii(name).unwrap());
    assert_eq!(m.queries[0].query_type, RecordType::A);
    assert_eq!(m.answers.len(), 1, "{m:?}");
}

/// A configuration with short timeouts for tests.
pub(crate) fn config(servers: Vec<String>) -> UpstreamConfig {
    UpstreamConfig {
        servers,
        timeout: Duration::from_secs(3),
        attempt_timeout: Duration::from_secs(1),
        ..UpstreamConfig::default()
    }
}

/// Waits (polling, bounded) until `cond` holds on the upstreams' health.
pub(crate) async fn wait_for(ups: &Upstreams, what: &str, cond: impl Fn(&Upstreams) -> bool) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond(ups) {
        assert!(
            tokio::time::Instant::now() < give_up,
            "timed out waiting for {what}: {:#?}",
            ups.health()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// === impl Pki ===

/// A test CA and a server certificate it signed.
#[derive(Debug)]
pub(crate) struct Pki {
    pub(crate) ca_pem: String,
    pub(crate) server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
    /// The server key's SPKI pin, computed independently of the code under test.
    pub(crate) pin: String,
}

impl Pki {
    /// A CA and a server certificate for `names` (DNS names or IP addresses).
    pub(crate) fn new(names: &[&str]) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "guard test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "dns test server");
        let cert = params.signed_by(&key, &issuer).unwrap();
        let pin = base64::engine::general_purpose::STANDARD
            .encode(Sha256::digest(key.subject_public_key_info()));
        Self {
            ca_pem: ca_cert.pem(),
            server_chain: vec![cert.der().clone()],
            server_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            pin,
        }
    }

    /// The CA certificate in a temporary PEM file.
    pub(crate) fn ca_file(&self) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(self.ca_pem.as_bytes()).unwrap();
        f.flush().unwrap();
        f
    }
}
