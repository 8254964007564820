//! The real fwd under test: its config, a process guard with sd_notify readiness, and a sync gRPC client.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use guard_proto::v1::firewall_client::FirewallClient;
use guard_proto::v1::{
    AllowRequest, AllowResponse, AuthorizeRequest, AuthorizeResponse, Event, Grant, GrantEntry,
    HistoryRequest, ListRequest, RevokeRequest, RevokeResponse, StatusRequest, StatusResponse,
};
use tokio::runtime::Runtime;
use tonic::transport::Channel;

use crate::cmd::{self, Out};
use crate::error::{Context, Error, Result};
use crate::netns::Netns;

/// How long fwd may take to say READY=1 (or to exit after SIGTERM). Generous: 2 busy cores.
pub const READY_DEADLINE: Duration = Duration::from_secs(60);

/// A fwd configuration as a TOML table, starting from test defaults and changed key by key.
#[derive(Debug, Clone)]
pub struct FwdConfig {
    table: toml::Table,
}

impl FwdConfig {
    /// Test defaults: local mode, reject policy, root as authorizer, `ttl.min` = `ttl.margin`
    /// = 1s and a 1s sweep so that expiry tests are quick. `socket` and `database` are filled
    /// in by [`Fwd::start`] unless set here.
    pub fn local() -> Self {
        Self {
            table: toml::Table::new(),
        }
        .set("mode", "local")
        .set("policy", "reject")
        .set("user", "")
        .set("access.authorizer_uids", vec![0i64])
        .set("ttl.min", "1s")
        .set("ttl.margin", "1s")
        .set("expiry.sweep_interval", "1s")
    }

    /// [`FwdConfig::local`] in gateway mode, per-client or not.
    pub fn gateway(per_client: bool) -> Self {
        Self::local()
            .set("mode", "gateway")
            .set("per_client", per_client)
    }

    /// Sets `path` (dotted: `"ttl.max"`, `"access.authorizer_uids"`) to `value`, creating
    /// tables on the way.
    #[must_use]
    pub fn set(mut self, path: &str, value: impl Into<toml::Value>) -> Self {
        let mut keys: Vec<&str> = path.split('.').collect();
        let last = keys.pop().unwrap_or(path);
        let mut t = &mut self.table;
        for k in keys {
            let entry = t
                .entry(k.to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            t = match entry {
                toml::Value::Table(inner) => inner,
                _ => return self,
            };
        }
        t.insert(last.to_owned(), value.into());
        self
    }

    /// The value at a dotted `path`, if set.
    pub fn get(&self, path: &str) -> Option<&toml::Value> {
        let mut keys = path.split('.');
        let mut v = self.table.get(keys.next()?)?;
        for k in keys {
            v = v.as_table()?.get(k)?;
        }
        Some(v)
    }

    /// The TOML text.
    pub fn render(&self) -> String {
        self.table.to_string()
    }

    /// The nftables table name fwd will own.
    pub fn table_name(&self) -> String {
        self.get("table")
            .and_then(toml::Value::as_str)
            .unwrap_or("guard")
            .to_owned()
    }
}

/// A running fwd inside a namespace. Its files (config, socket, database, log, notify socket)
/// live in its own temporary directory. Drop kills it by PID and, when the test is failing,
/// prints its log.
#[derive(Debug)]
pub struct Fwd {
    ns: String,
    bin: PathBuf,
    dir: tempfile::TempDir,
    config: PathBuf,
    socket: PathBuf,
    database: PathBuf,
    table: String,
    log: PathBuf,
    notify: UnixDatagram,
    notify_path: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Fwd {
    /// Starts the workspace's `fwd` in `ns` with `cfg` and waits for READY=1.
    pub fn start(ns: &Netns, cfg: FwdConfig) -> Result<Self> {
        Self::start_bin(&cmd::bin("fwd")?, ns, cfg)
    }

    /// [`Fwd::start`] with another binary (the harness self-tests use a fake daemon).
    pub fn start_bin(bin: &Path, ns: &Netns, cfg: FwdConfig) -> Result<Self> {
        let mut fwd = Self::prepare(bin, ns, cfg)?;
        fwd.spawn_and_wait()?;
        Ok(fwd)
    }

    /// Writes the config and binds the notify socket without starting anything. Use
    /// [`Fwd::restart`] to start it, or [`Fwd::run_once`] for one-shot invocations.
    pub fn prepare(bin: &Path, ns: &Netns, cfg: FwdConfig) -> Result<Self> {
        let dir = test_dir()?;
        let socket = dir.path().join("fwd.sock");
        let database = dir.path().join("fwd.db");
        let mut cfg = cfg;
        if cfg.get("socket").is_none() {
            cfg = cfg.set("socket", socket.to_string_lossy().as_ref());
        }
        if cfg.get("database").is_none() {
            cfg = cfg.set("database", database.to_string_lossy().as_ref());
        }
        let socket = PathBuf::from(
            cfg.get("socket")
                .and_then(toml::Value::as_str)
                .unwrap_or(""),
        );
        let database = PathBuf::from(
            cfg.get("database")
                .and_then(toml::Value::as_str)
                .unwrap_or(""),
        );
        let config = dir.path().join("fwd.toml");
        std::fs::write(&config, cfg.render()).context(format!("writing {}", config.display()))?;
        let notify_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path)
            .context(format!("binding {}", notify_path.display()))?;
        // Like systemd's own notify socket: writable by a daemon that dropped to another uid.
        std::fs::set_permissions(
            &notify_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .context(format!("chmod {}", notify_path.display()))?;
        Ok(Self {
            ns: ns.name().to_owned(),
            bin: bin.to_path_buf(),
            log: dir.path().join("fwd.log"),
            table: cfg.table_name(),
            dir,
            config,
            socket,
            database,
            notify,
            notify_path,
            child: None,
            starts: 0,
        })
    }

    /// The gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The SQLite database.
    pub fn db(&self) -> &Path {
        &self.database
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The test's temporary directory (mode 0755, removed on Drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The namespace fwd runs in.
    pub fn ns_name(&self) -> &str {
        &self.ns
    }

    /// The nftables table fwd owns.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The PID of the running fwd, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where fwd's stdout and stderr go (appended across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything fwd has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (a log line is a readiness signal).
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        crate::wait_until(&format!("fwd to log {needle:?}"), timeout, || {
            Ok(self.log().contains(needle))
        })
        .map_err(|e| e.context(self.log_tail()))
    }

    /// Starts fwd again (after [`Fwd::kill9`] or [`Fwd::stop`]; a running fwd is stopped with
    /// SIGTERM first) and waits for READY=1.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.stop()?;
        }
        self.spawn_and_wait()
    }

    /// SIGKILL and reap: fwd gets no chance to clean up.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then waits for fwd to exit and returns how it exited.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| Error::msg("fwd is not running"))?;
        cmd::terminate(&mut child, READY_DEADLINE)?.ok_or_else(|| {
            Error::msg(format!(
                "fwd did not exit within {READY_DEADLINE:?} of SIGTERM; killed it\n{}",
                self.log_tail()
            ))
        })
    }

    /// The sd_notify messages received since the last start, e.g. to look for STOPPING=1.
    pub fn notifications(&self) -> Vec<String> {
        let mut out = Vec::new();
        let _ = self.notify.set_nonblocking(true);
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.notify.recv(&mut buf) {
            out.push(String::from_utf8_lossy(buf.get(..n).unwrap_or_default()).into_owned());
        }
        let _ = self.notify.set_nonblocking(false);
        out
    }

    /// A one-shot `fwd --config <this config> ARGS...` in `ns` (e.g. `--validate`,
    /// `--remove-table`), run to completion.
    pub fn run_once(&self, ns: &Netns, args: &[&str]) -> Result<Out> {
        cmd::run(
            ns.cmd(&self.bin)
                .arg("--config")
                .arg(&self.config)
                .args(args)
                .env_remove("NOTIFY_SOCKET"),
            READY_DEADLINE,
        )
    }

    /// A connected sync gRPC client.
    pub fn client(&self) -> Result<FwdClient> {
        FwdClient::connect(&self.socket)
    }

    /// A `guardctl --socket <this socket> ARGS...` command, not started.
    pub fn guardctl(&self, args: &[&str]) -> Result<Command> {
        cmd::guardctl(&self.socket, args)
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines
            .get(lines.len().saturating_sub(40)..)
            .unwrap_or_default();
        format!(
            "--- fwd log tail ({}) ---\n{}",
            self.log.display(),
            tail.join("\n")
        )
    }

    fn spawn_and_wait(&mut self) -> Result<()> {
        // Drop anything a previous instance said (STOPPING=1, a stale READY=1).
        let _ = self.notifications();
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        writeln!(log, "=== harness: fwd start #{} ===", self.starts)?;
        let log_err = log.try_clone()?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .env("NOTIFY_SOCKET", &self.notify_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd
            .spawn()
            .context(format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        self.notify
            .set_read_timeout(Some(Duration::from_millis(200)))?;
        let deadline = Instant::now() + READY_DEADLINE;
        let mut buf = [0u8; 4096];
        loop {
            match self.notify.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(buf.get(..n).unwrap_or_default());
                    if msg.lines().any(|l| l.trim() == "READY=1") {
                        return Ok(());
                    }
                }
                Err(e) if crate::probe::is_timeout(&e) => {}
                Err(e) => return Err(Error::msg(format!("reading sd_notify socket: {e}"))),
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                return Err(Error::msg(format!(
                    "fwd exited with {status} before READY=1\n{}",
                    self.log_tail()
                )));
            }
            if Instant::now() >= deadline {
                return Err(Error::msg(format!(
                    "fwd sent no READY=1 within {READY_DEADLINE:?}\n{}",
                    self.log_tail()
                )));
            }
        }
    }
}

impl Drop for Fwd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- fwd log (netns {}, {}) ---\n{}--- end of fwd log ---",
                self.ns,
                self.log.display(),
                self.log()
            );
        }
    }
}

/// A temporary directory that other users may traverse (0755): a test may run a client as
/// `nobody` against a socket inside it.
pub fn test_dir() -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("guard-test-").tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// Writes `bytes` to `path` (a helper for corrupt-file tests).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    File::create(path)?.write_all(bytes)?;
    Ok(())
}

/// A grant of `ip` with DNS TTL `ttl_s`.
pub fn grant(ip: IpAddr, ttl_s: u32) -> Grant {
    Grant {
        ip: guard_proto::ip_to_bytes(ip),
        ttl_s,
    }
}

/// A blocking client of fwd's Firewall service. Owns a small runtime, so it works from plain
/// `#[test]` functions; [`FwdClient::block_on`] and [`FwdClient::raw`] give async access.
#[derive(Debug)]
pub struct FwdClient {
    rt: Option<Runtime>,
    inner: FirewallClient<Channel>,
}

impl FwdClient {
    /// Connects to the Unix socket at `socket`.
    pub fn connect(socket: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fwd-client")
            .enable_all()
            .build()?;
        let channel = rt
            .block_on(guard_proto::connect_unix(socket))
            .context(format!("connecting to {}", socket.display()))?;
        Ok(Self {
            rt: Some(rt),
            inner: FirewallClient::new(channel),
        })
    }

    /// Runs `fut` on the client's runtime.
    pub fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        match &self.rt {
            Some(rt) => rt.block_on(fut),
            None => unreachable!("the runtime lives until Drop"),
        }
    }

    /// A clone of the async client (cheap; shares the connection). Use it inside
    /// [`FwdClient::block_on`].
    pub fn raw(&self) -> FirewallClient<Channel> {
        self.inner.clone()
    }

    /// Authorize: `grants` as (address, DNS TTL), for `qname`, in local mode (no client).
    pub fn authorize(
        &mut self,
        grants: &[(IpAddr, u32)],
        qname: &str,
    ) -> Result<AuthorizeResponse, tonic::Status> {
        self.authorize_req(AuthorizeRequest {
            grants: grants.iter().map(|&(ip, ttl)| grant(ip, ttl)).collect(),
            qname: qname.to_owned(),
            client: Vec::new(),
            reason: "e2e".to_owned(),
        })
    }

    /// Authorize with a full request.
    pub fn authorize_req(
        &mut self,
        req: AuthorizeRequest,
    ) -> Result<AuthorizeResponse, tonic::Status> {
        let mut c = self.inner.clone();
        self.block_on(async move { c.authorize(req).await.map(tonic::Response::into_inner) })
    }

    /// Allow `cidr` for `ttl_s` seconds (0: forever).
    pub fn allow(
        &mut self,
        cidr: &str,
        ttl_s: u64,
        comment: &str,
    ) -> Result<AllowResponse, tonic::Status> {
        let mut c = self.inner.clone();
        let req = AllowRequest {
            cidr: cidr.to_owned(),
            ttl_s,
            comment: comment.to_owned(),
        };
        self.block_on(async move { c.allow(req).await.map(tonic::Response::into_inner) })
    }

    /// Revoke everything inside `cidr`.
    pub fn revoke(&mut self, cidr: &str) -> Result<RevokeResponse, tonic::Status> {
        let mut c = self.inner.clone();
        let req = RevokeRequest {
            cidr: cidr.to_owned(),
            comment: "e2e".to_owned(),
        };
        self.block_on(async move { c.revoke(req).await.map(tonic::Response::into_inner) })
    }

    /// Every grant (fwd's default limit).
    pub fn list(&mut self) -> Result<Vec<GrantEntry>, tonic::Status> {
        let mut c = self.inner.clone();
        self.block_on(async move {
            c.list(ListRequest::default())
                .await
                .map(|r| r.into_inner().grants)
        })
    }

    /// History events about `ip` (empty: all), newest first.
    pub fn history(&mut self, ip: &str) -> Result<Vec<Event>, tonic::Status> {
        let mut c = self.inner.clone();
        let req = HistoryRequest {
            ip: ip.to_owned(),
            limit: 10_000,
            ..HistoryRequest::default()
        };
        self.block_on(async move { c.history(req).await.map(|r| r.into_inner().events) })
    }

    /// Status.
    pub fn status(&mut self) -> Result<StatusResponse, tonic::Status> {
        let mut c = self.inner.clone();
        self.block_on(async move {
            c.status(StatusRequest {})
                .await
                .map(tonic::Response::into_inner)
        })
    }
}

impl Drop for FwdClient {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
