//! In-process fake fwd (`Firewall`) and dnsd (`Resolver`) on Unix sockets in a tempdir, with
//! canned answers and a log of the requests, so the real guardctl binary can be driven against them.

use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use guard_proto::v1::firewall_server::{Firewall, FirewallServer};
use guard_proto::v1::resolver_server::{Resolver, ResolverServer};
use guard_proto::v1::*;
use tokio::sync::oneshot;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

/// The message the fake fwd sends when it denies a caller.
pub const DENIED: &str = "uid 1000 lacks the admin role";

/// How the fake fwd behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fwd {
    /// Not started: its socket does not exist.
    Down,
    /// Answers every request with canned data.
    Up,
    /// Answers every request with PERMISSION_DENIED.
    DenyAll,
}

/// Requests the fakes received, for asserting on what guardctl sent.
#[derive(Debug, Default)]
pub struct Log {
    /// `Firewall.List` requests.
    pub list: Vec<ListRequest>,
    /// `Firewall.Allow` requests.
    pub allow: Vec<AllowRequest>,
    /// `Firewall.Revoke` requests.
    pub revoke: Vec<RevokeRequest>,
    /// `Firewall.History` requests.
    pub history: Vec<HistoryRequest>,
    /// `Resolver.FlushCache` requests.
    pub flush: Vec<FlushCacheRequest>,
    /// Every call to either fake, denied ones included.
    pub calls: usize,
}

/// Wall-clock now in Unix ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Both fakes, served from one background thread until dropped.
pub struct Daemons {
    /// Holds both sockets; removed on drop.
    pub dir: tempfile::TempDir,
    /// fwd's socket (absent when started with `Fwd::Down`).
    pub fwd_socket: PathBuf,
    /// dnsd's socket (absent when started without dnsd).
    pub dnsd_socket: PathBuf,
    log: Arc<Mutex<Log>>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Daemons {
    /// Starts the fakes. The sockets are bound before this returns, so the binary can connect
    /// at once: no readiness wait needed.
    pub fn start(fwd: Fwd, dnsd: bool) -> Daemons {
        let dir = tempfile::tempdir().unwrap();
        let fwd_socket = dir.path().join("fwd.sock");
        let dnsd_socket = dir.path().join("dnsd.sock");
        let bind = |path: &Path| {
            let l = StdUnixListener::bind(path).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        };
        let fwd_listener = (fwd != Fwd::Down).then(|| bind(&fwd_socket));
        let dnsd_listener = dnsd.then(|| bind(&dnsd_socket));
        let log = Arc::new(Mutex::new(Log::default()));
        let (tx, rx) = oneshot::channel();
        let fake_fwd = FakeFwd {
            deny: fwd == Fwd::DenyAll,
            log: log.clone(),
        };
        let fake_dnsd = FakeDnsd { log: log.clone() };
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Some(l) = fwd_listener {
                    let l = tokio::net::UnixListener::from_std(l).unwrap();
                    tokio::spawn(
                        tonic::transport::Server::builder()
                            .add_service(FirewallServer::new(fake_fwd))
                            .serve_with_incoming(UnixListenerStream::new(l)),
                    );
                }
                if let Some(l) = dnsd_listener {
                    let l = tokio::net::UnixListener::from_std(l).unwrap();
                    tokio::spawn(
                        tonic::transport::Server::builder()
                            .add_service(ResolverServer::new(fake_dnsd))
                            .serve_with_incoming(UnixListenerStream::new(l)),
                    );
                }
                let _ = rx.await;
            });
        });
        Daemons {
            dir,
            fwd_socket,
            dnsd_socket,
            log,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// What the fakes received so far.
    pub fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap()
    }

    /// Runs the real guardctl binary against these sockets.
    pub fn run(&self, args: &[&str]) -> Run {
        let mut cmd = guardctl();
        cmd.arg("--socket")
            .arg(&self.fwd_socket)
            .arg("--dnsd-socket")
            .arg(&self.dnsd_socket)
            .args(args);
        Run::from(cmd.output().unwrap())
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The binary with a clean, deterministic environment (UTC for the TIME column).
pub fn guardctl() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_guardctl"));
    cmd.env_remove("GUARD_FWD_SOCKET")
        .env_remove("GUARD_DNSD_SOCKET")
        .env("TZ", "UTC");
    cmd
}

/// A finished guardctl run.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Everything printed on stdout.
    pub stdout: String,
    /// Everything printed on stderr.
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8(o.stdout).unwrap(),
            stderr: String::from_utf8(o.stderr).unwrap(),
        }
    }
}

impl Run {
    /// Asserts exit 0 and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "guardctl failed: {self:#?}");
        &self.stdout
    }

    /// Asserts exit 0 and parses stdout as exactly one JSON document.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("{e}: {self:#?}"))
    }
}

// === fake fwd ===

#[derive(Clone)]
struct FakeFwd {
    deny: bool,
    log: Arc<Mutex<Log>>,
}

impl FakeFwd {
    fn enter(&self) -> Result<MutexGuard<'_, Log>, Status> {
        let mut log = self.log.lock().unwrap();
        log.calls += 1;
        if self.deny {
            return Err(Status::permission_denied(DENIED));
        }
        Ok(log)
    }
}

/// The canned grants; expiries relative to now so EXPIRES-IN is predictable.
pub fn grants(now: u64) -> Vec<GrantEntry> {
    vec![
        GrantEntry {
            ip: "192.0.2.7".into(),
            client: String::new(),
            names: vec!["example.com".into(), "www.example.com".into()],
            first_granted_unix_ms: now - 60_000,
            last_granted_unix_ms: now - 1_000,
            expires_unix_ms: now + 300_000 + 30_000,
            source: Source::Dns as i32,
            comment: String::new(),
        },
        GrantEntry {
            ip: "198.51.100.0/24".into(),
            client: "10.0.0.5".into(),
            names: vec![],
            first_granted_unix_ms: now - 3_600_000,
            last_granted_unix_ms: now - 3_600_000,
            expires_unix_ms: 0,
            source: Source::Manual as i32,
            comment: "backup target".into(),
        },
    ]
}

#[tonic::async_trait]
impl Firewall for FakeFwd {
    type WatchRevocationsStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<Revocation, Status>> + Send + 'static>,
    >;

    async fn watch_revocations(
        &self,
        _: Request<WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn authorize(
        &self,
        _: Request<AuthorizeRequest>,
    ) -> Result<Response<AuthorizeResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn authorize_many(
        &self,
        _: Request<guard_proto::v1::AuthorizeManyRequest>,
    ) -> Result<Response<guard_proto::v1::AuthorizeManyResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn allow(&self, req: Request<AllowRequest>) -> Result<Response<AllowResponse>, Status> {
        let req = req.into_inner();
        self.enter()?.allow.push(req.clone());
        if req.cidr == "0.0.0.0/0" {
            return Err(Status::invalid_argument(
                "refusing to allow 0.0.0.0/0: it covers every address",
            ));
        }
        let expires_unix_ms = if req.ttl_s == 0 {
            0
        } else {
            now_ms() + req.ttl_s * 1000
        };
        Ok(Response::new(AllowResponse {
            cidr: req.cidr,
            expires_unix_ms,
        }))
    }

    async fn revoke(
        &self,
        req: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let req = req.into_inner();
        self.enter()?.revoke.push(req.clone());
        let revoked = if req.cidr.starts_with("192.0.2.") {
            2
        } else {
            0
        };
        Ok(Response::new(RevokeResponse { revoked }))
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let req = req.into_inner();
        self.enter()?.list.push(req.clone());
        let mut grants = grants(now_ms());
        if req.limit > 0 {
            grants.truncate(req.limit as usize);
        }
        Ok(Response::new(ListResponse { grants, total: 7 }))
    }

    async fn history(
        &self,
        req: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        self.enter()?.history.push(req.into_inner());
        Ok(Response::new(HistoryResponse {
            events: vec![
                Event {
                    id: 42,
                    at_unix_ms: 1_700_000_000_000,
                    kind: EventKind::Granted as i32,
                    ip: "192.0.2.7".into(),
                    client: String::new(),
                    name: "example.com".into(),
                    uid: 998,
                    pid: 1234,
                    reason: "answer".into(),
                    expires_unix_ms: 0,
                },
                Event {
                    id: 1,
                    at_unix_ms: 1_699_999_000_000,
                    kind: EventKind::Started as i32,
                    ip: String::new(),
                    client: String::new(),
                    name: String::new(),
                    uid: -1,
                    pid: -1,
                    reason: "reconciled".into(),
                    expires_unix_ms: 0,
                },
            ],
        }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        drop(self.enter()?);
        Ok(Response::new(StatusResponse {
            api_version: "guard.v1".into(),
            daemon_version: "0.1.0".into(),
            mode: "local".into(),
            per_client: false,
            policy: "reject".into(),
            grants_v4: 12,
            grants_v6: 3,
            manual: 1,
            counters: vec![Counter {
                name: "rejected".into(),
                packets: 5,
                bytes: 300,
            }],
            db_bytes: 3 * 1024 * 1024,
            uptime_s: 7200,
            audit_events: 4521,
        }))
    }
}

// === fake dnsd ===

#[derive(Clone)]
struct FakeDnsd {
    log: Arc<Mutex<Log>>,
}

#[tonic::async_trait]
impl Resolver for FakeDnsd {
    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        self.log.lock().unwrap().calls += 1;
        Ok(Response::new(StatsResponse {
            api_version: "guard.v1".into(),
            daemon_version: "0.1.0".into(),
            uptime_s: 59,
            queries: 1000,
            cache_hits: 800,
            cache_misses: 200,
            cache_entries: 512,
            servfail: 3,
            refused: 0,
            authorize_calls: 200,
            authorize_failures: 1,
            in_flight: 2,
        }))
    }

    async fn flush_cache(
        &self,
        req: Request<FlushCacheRequest>,
    ) -> Result<Response<FlushCacheResponse>, Status> {
        let req = req.into_inner();
        let flushed = if req.name.is_empty() { 12 } else { 1 };
        let mut log = self.log.lock().unwrap();
        log.calls += 1;
        log.flush.push(req);
        Ok(Response::new(FlushCacheResponse { flushed }))
    }

    async fn upstreams(
        &self,
        _: Request<UpstreamsRequest>,
    ) -> Result<Response<UpstreamsResponse>, Status> {
        self.log.lock().unwrap().calls += 1;
        Ok(Response::new(UpstreamsResponse {
            strategy: "failover".into(),
            upstreams: vec![UpstreamHealth {
                url: "tls://192.0.2.53:853#dns.example".into(),
                healthy: true,
                srtt_us: 12_345,
                queries: 900,
                errors: 2,
                open_connections: 1,
                last_error: String::new(),
            }],
        }))
    }
}
