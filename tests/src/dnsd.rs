//! The real dnsd under test: its config, a process guard with sd_notify readiness, `dig`/`kdig` clients, and a scripted upstream for answers no real resolver gives.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};
use hickory_proto::rr::{Name, RData, Record};
use nix::sys::signal::Signal;

use crate::cmd::{self, Out};
use crate::error::{Context, Error, Result};
use crate::netns::Netns;

/// How long dnsd may take to say READY=1 (or to exit after SIGTERM).
pub const READY_DEADLINE: Duration = Duration::from_secs(60);
/// How long `dig`/`kdig` wait for an answer. dnsd answers SERVFAIL within its upstream
/// timeout (4 s by default), so this only bounds the broken case.
pub const DIG_TIMEOUT_S: u32 = 10;

/// A dnsd configuration as a TOML table, starting from test defaults and changed key by key.
#[derive(Debug, Clone)]
pub struct DnsdConfig {
    table: toml::Table,
}

impl DnsdConfig {
    /// Test defaults: UDP and TCP on 127.0.0.1:53, `servers` as upstreams, fwd's socket for
    /// `authorize.socket`, queries logged (the log is printed when a test fails). The control
    /// socket is placed in dnsd's temporary directory by [`Dnsd::start`] unless set here.
    pub fn new(fwd_socket: &Path, servers: &[String]) -> Self {
        Self {
            table: toml::Table::new(),
        }
        .set("log_queries", true)
        .set("listen.udp", vec!["127.0.0.1:53"])
        .set("listen.tcp", vec!["127.0.0.1:53"])
        .set("upstream.servers", servers.to_vec())
        .set("authorize.socket", fwd_socket.to_string_lossy().as_ref())
    }

    /// Sets `path` (dotted: `"upstream.ca_file"`, `"acl.allow"`) to `value`, creating tables
    /// on the way.
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
            match entry {
                toml::Value::Table(inner) => t = inner,
                _ => return self,
            }
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

    fn path(&self, key: &str) -> PathBuf {
        PathBuf::from(self.get(key).and_then(toml::Value::as_str).unwrap_or(""))
    }
}

/// A running dnsd inside a namespace. Its files (config, control socket, log, notify socket)
/// live in its own temporary directory. Drop kills it by PID and, when the test is failing,
/// prints its log.
#[derive(Debug)]
pub struct Dnsd {
    ns: String,
    bin: PathBuf,
    dir: tempfile::TempDir,
    config: PathBuf,
    control: PathBuf,
    fwd_socket: PathBuf,
    log: PathBuf,
    notify: UnixDatagram,
    notify_path: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Dnsd {
    /// Starts the workspace's `dnsd` in `ns` with `cfg` and waits for READY=1.
    pub fn start(ns: &Netns, cfg: DnsdConfig) -> Result<Self> {
        let dir = crate::fwd::test_dir()?;
        let cfg = if cfg.get("control.socket").is_none() {
            let sock = dir.path().join("dnsd.sock");
            cfg.set("control.socket", sock.to_string_lossy().as_ref())
        } else {
            cfg
        };
        let config = dir.path().join("dnsd.toml");
        std::fs::write(&config, cfg.render()).context(format!("writing {}", config.display()))?;
        let notify_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path)
            .context(format!("binding {}", notify_path.display()))?;
        let mut d = Self {
            ns: ns.name().to_owned(),
            bin: cmd::bin("dnsd")?,
            log: dir.path().join("dnsd.log"),
            control: cfg.path("control.socket"),
            fwd_socket: cfg.path("authorize.socket"),
            dir,
            config,
            notify,
            notify_path,
            child: None,
            starts: 0,
        };
        d.spawn_and_wait()?;
        Ok(d)
    }

    /// The control socket (`guardctl --dnsd-socket`).
    pub fn control_socket(&self) -> &Path {
        &self.control
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The test's temporary directory (mode 0755, removed on Drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The PID of the running dnsd, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails unless dnsd is still running (it did not crash on what the test sent it).
    pub fn expect_running(&mut self) -> Result<()> {
        match self.child.as_mut().map(Child::try_wait) {
            None => Err(Error::msg("dnsd is not running")),
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(status))) => Err(Error::msg(format!(
                "dnsd exited with {status}\n{}",
                self.log_tail()
            ))),
            Some(Err(e)) => Err(e.into()),
        }
    }

    /// Everything dnsd has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until a line of the log contains every one of `needles` (a log line is a
    /// readiness signal; ANSI colours are ignored).
    pub fn wait_log(&self, needles: &[&str], timeout: Duration) -> Result<()> {
        crate::wait_until(&format!("dnsd to log {needles:?}"), timeout, || {
            Ok(self.log().lines().any(|l| {
                let plain = strip_ansi(l);
                needles.iter().all(|n| plain.contains(n))
            }))
        })
        .map_err(|e| e.context(self.log_tail()))
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines
            .get(lines.len().saturating_sub(40)..)
            .unwrap_or_default();
        format!(
            "--- dnsd log tail ({}) ---\n{}",
            self.log.display(),
            tail.join("\n")
        )
    }

    /// Starts dnsd again (SIGTERM first if it runs) and waits for READY=1.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.stop()?;
        }
        self.spawn_and_wait()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then waits for dnsd to exit and returns how it exited.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| Error::msg("dnsd is not running"))?;
        cmd::terminate(&mut child, READY_DEADLINE)?.ok_or_else(|| {
            Error::msg(format!(
                "dnsd did not exit within {READY_DEADLINE:?} of SIGTERM; killed it\n{}",
                self.log_tail()
            ))
        })
    }

    /// Replaces the config file with `cfg` (the control socket kept), sends SIGHUP, waits for
    /// RELOADING=1 then READY=1, and fails unless dnsd logged that it applied the new config.
    pub fn reload(&mut self, cfg: DnsdConfig) -> Result<()> {
        let cfg = cfg.set("control.socket", self.control.to_string_lossy().as_ref());
        std::fs::write(&self.config, cfg.render())?;
        let applied_before = self.log().matches("configuration reloaded").count();
        let _ = self.notifications();
        let pid = self
            .pid()
            .ok_or_else(|| Error::msg("dnsd is not running"))?;
        cmd::kill_pid(pid, Signal::SIGHUP);
        self.wait_notify("RELOADING=1")?;
        self.wait_notify("READY=1")?;
        if self.log().matches("configuration reloaded").count() > applied_before {
            Ok(())
        } else {
            Err(Error::msg(format!(
                "dnsd did not apply the reloaded config\n{}",
                self.log_tail()
            )))
        }
    }

    /// The sd_notify messages received since the last start.
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

    /// A `guardctl --socket <fwd> --dnsd-socket <this> ARGS...` command, not started.
    pub fn guardctl(&self, args: &[&str]) -> Result<Command> {
        let mut all: Vec<&str> = vec!["--dnsd-socket"];
        let sock = self.control.to_string_lossy().into_owned();
        all.push(&sock);
        all.extend_from_slice(args);
        cmd::guardctl(&self.fwd_socket, &all)
    }

    /// dnsd's part of `guardctl --json status` (queries, cache hits, authorize calls, ...).
    /// Works while fwd is down (guardctl then exits 1 but still prints dnsd's part).
    pub fn stats(&self) -> Result<serde_json::Value> {
        let out = cmd::run(
            &mut self.guardctl(&["--json", "status"])?,
            cmd::COMMAND_DEADLINE,
        )?;
        let v: serde_json::Value =
            serde_json::from_str(&out.stdout).context(format!("parsing {}", out.describe()))?;
        let d = v["dnsd"].clone();
        if d.get("error").is_some() || d.is_null() {
            return Err(Error::msg(format!("dnsd stats: {}", out.describe())));
        }
        Ok(d)
    }

    /// A counter of [`Dnsd::stats`] (`"cache_hits"`, `"authorize_calls"`, ...).
    pub fn stat(&self, name: &str) -> Result<u64> {
        self.stats()?[name]
            .as_u64()
            .ok_or_else(|| Error::msg(format!("dnsd stats have no counter {name:?}")))
    }

    /// `guardctl --json upstreams`: the upstreams' health, in configuration order.
    pub fn upstreams(&self) -> Result<Vec<serde_json::Value>> {
        let out = cmd::run_ok(&mut self.guardctl(&["--json", "upstreams"])?)?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v["upstreams"].as_array().cloned().unwrap_or_default())
    }

    fn wait_notify(&mut self, what: &str) -> Result<()> {
        self.notify
            .set_read_timeout(Some(Duration::from_millis(200)))?;
        let deadline = Instant::now() + READY_DEADLINE;
        let mut buf = [0u8; 4096];
        loop {
            match self.notify.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(buf.get(..n).unwrap_or_default());
                    if msg.lines().any(|l| l.trim() == what) {
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
                    "dnsd exited with {status} before {what}\n{}",
                    self.log_tail()
                )));
            }
            if Instant::now() >= deadline {
                return Err(Error::msg(format!(
                    "dnsd sent no {what} within {READY_DEADLINE:?}\n{}",
                    self.log_tail()
                )));
            }
        }
    }

    fn spawn_and_wait(&mut self) -> Result<()> {
        let _ = self.notifications();
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        writeln!(log, "=== harness: dnsd start #{} ===", self.starts)?;
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
            // Revocations are logged at debug level, once each: tests wait on them.
            cmd.env("RUST_LOG", "info,dnsd::revocations=debug");
        }
        let child = cmd
            .spawn()
            .context(format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        self.wait_notify("READY=1")
    }
}

impl Drop for Dnsd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- dnsd log (netns {}, {}) ---\n{}--- end of dnsd log ---",
                self.ns,
                self.log.display(),
                self.log()
            );
        }
    }
}

/// `line` without ANSI escape sequences (dnsd colours its text log).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (a letter).
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// === dig and kdig ===

/// One resource record of an answer section, as dig prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rr {
    /// Owner name, with the trailing dot.
    pub name: String,
    /// TTL in seconds.
    pub ttl: u32,
    /// Type mnemonic (`A`, `CNAME`, ...).
    pub rtype: String,
    /// The data as printed.
    pub data: String,
}

/// What `dig` or `kdig` got back.
#[derive(Debug, Clone)]
pub struct DnsReply {
    /// The rcode mnemonic: `NOERROR`, `NXDOMAIN`, `SERVFAIL`, `REFUSED`, ...
    pub status: String,
    /// The answer section.
    pub answers: Vec<Rr>,
    /// The full output, for messages.
    pub output: String,
}

impl DnsReply {
    /// The A/AAAA addresses of the answer section, in order.
    pub fn addrs(&self) -> Vec<IpAddr> {
        self.answers
            .iter()
            .filter(|r| r.rtype == "A" || r.rtype == "AAAA")
            .filter_map(|r| r.data.parse().ok())
            .collect()
    }

    /// Fails unless the rcode is `status`.
    pub fn expect_status(&self, status: &str) -> Result<&Self> {
        if self.status == status {
            Ok(self)
        } else {
            Err(Error::msg(format!(
                "expected {status}, got {}:\n{}",
                self.status, self.output
            )))
        }
    }

    /// Parses dig's or kdig's default output: the rcode from the header line, the records
    /// after `;; ANSWER SECTION:` up to the next blank line.
    pub fn parse(output: &str) -> Result<Self> {
        let status = output
            .split("status: ")
            .nth(1)
            .map(|s| {
                s.chars()
                    .take_while(char::is_ascii_alphanumeric)
                    .collect::<String>()
            })
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::msg(format!("no answer (no status line):\n{output}")))?;
        let mut answers = Vec::new();
        let mut in_answer = false;
        for line in output.lines() {
            if line.starts_with(";; ANSWER SECTION:") {
                in_answer = true;
                continue;
            }
            if !in_answer {
                continue;
            }
            if line.trim().is_empty() || line.starts_with(";;") {
                in_answer = false;
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let [name, ttl, _class, rtype, data @ ..] = f.as_slice() else {
                return Err(Error::msg(format!("unparsable answer line {line:?}")));
            };
            answers.push(Rr {
                name: (*name).to_owned(),
                ttl: ttl
                    .parse()
                    .map_err(|_| Error::msg(format!("bad TTL in {line:?}")))?,
                rtype: (*rtype).to_owned(),
                data: data.join(" "),
            });
        }
        Ok(Self {
            status,
            answers,
            output: output.to_owned(),
        })
    }
}

/// `dig @server NAME TYPE [extra...]` from inside `ns`: one try, [`DIG_TIMEOUT_S`].
pub fn dig(
    ns: &Netns,
    server: SocketAddr,
    name: &str,
    qtype: &str,
    extra: &[&str],
) -> Result<DnsReply> {
    let at = format!("@{}", server.ip());
    let port = server.port().to_string();
    let time = format!("+time={DIG_TIMEOUT_S}");
    let mut argv = vec![
        "dig",
        &at,
        "-p",
        &port,
        "+tries=1",
        &time,
        "+nocookie",
        name,
        qtype,
    ];
    argv.extend_from_slice(extra);
    reply_of(ns.exec(&argv)?)
}

/// `kdig` over TLS to `server`, verifying its certificate against `ca` for `hostname`.
pub fn kdig_tls(
    ns: &Netns,
    server: SocketAddr,
    ca: &Path,
    hostname: &str,
    name: &str,
    qtype: &str,
) -> Result<DnsReply> {
    let at = format!("@{}", server.ip());
    let port = server.port().to_string();
    let ca = format!("+tls-ca={}", ca.display());
    let host = format!("+tls-hostname={hostname}");
    let time = format!("+time={DIG_TIMEOUT_S}");
    let argv = [
        "kdig", &at, "-p", &port, &ca, &host, "+retry=0", &time, name, qtype,
    ];
    reply_of(ns.exec(&argv)?)
}

fn reply_of(out: Out) -> Result<DnsReply> {
    if !out.success() {
        return Err(Error::msg(out.describe()));
    }
    DnsReply::parse(&out.stdout).context(out.cmd)
}

// === a scripted upstream ===

/// Builds the records of an answer from zone-file-like text: `"name TTL A 192.0.2.1"`,
/// `"name TTL AAAA 2001:db8::1"`, `"name TTL CNAME target."`, `"name TTL TXT text"`.
pub fn record(text: &str) -> Result<Record> {
    let parts: Vec<&str> = text.splitn(4, ' ').collect();
    let [name, ttl, rtype, data] = parts.as_slice() else {
        return Err(Error::msg(format!("bad record {text:?}")));
    };
    let bad = |what: &str| Error::msg(format!("bad {what} in record {text:?}"));
    let name = Name::from_ascii(name).map_err(|_| bad("name"))?;
    let ttl: u32 = ttl.parse().map_err(|_| bad("TTL"))?;
    let data = match *rtype {
        "A" => RData::A(A(data.parse().map_err(|_| bad("address"))?)),
        "AAAA" => RData::AAAA(AAAA(data.parse().map_err(|_| bad("address"))?)),
        "CNAME" => RData::CNAME(CNAME(Name::from_ascii(data).map_err(|_| bad("target"))?)),
        "TXT" => RData::TXT(TXT::new(vec![(*data).to_owned()])),
        _ => return Err(bad("type")),
    };
    Ok(Record::from_rdata(name, ttl, data))
}

/// The records a [`ScriptedUpstream`] answers one question with.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Answer section, as [`record`] text.
    pub answer: Vec<String>,
    /// Additional section, as [`record`] text.
    pub additional: Vec<String>,
}

/// A tiny authoritative DNS server over UDP, in a namespace, answering from a fixed script
/// keyed by `(name, type)` (lowercase, trailing dot: `("a.test.", "A")`); other questions get
/// NXDOMAIN. It stands in for an upstream that sends what unbound never would (off-chain
/// records in the answer section), and it records every question it is asked.
#[derive(Debug)]
pub struct ScriptedUpstream {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ScriptedUpstream {
    /// Binds UDP `addr` inside `ns` and serves `script` until dropped.
    pub fn start(
        ns: &Netns,
        addr: SocketAddr,
        script: HashMap<(String, String), Script>,
    ) -> Result<Self> {
        // Parse every record now, so that a typo fails the test here.
        let mut parsed = HashMap::new();
        for (k, s) in script {
            let answer: Result<Vec<Record>> = s.answer.iter().map(|t| record(t)).collect();
            let additional: Result<Vec<Record>> = s.additional.iter().map(|t| record(t)).collect();
            parsed.insert(k, (answer?, additional?));
        }
        let sock = ns
            .run(|| UdpSocket::bind(addr))?
            .context(format!("binding the scripted upstream on {addr}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (asked.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("scripted-upstream".into())
            .spawn(move || serve_script(&sock, &parsed, &a, &s))?;
        Ok(Self {
            addr,
            asked,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// dnsd's URL for it: `udp://IP:PORT`.
    pub fn url(&self) -> String {
        format!("udp://{}", self.addr)
    }

    /// Every question asked so far, as `"name. TYPE"` (lowercase name).
    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Parsed = HashMap<(String, String), (Vec<Record>, Vec<Record>)>;

fn serve_script(sock: &UdpSocket, script: &Parsed, asked: &Mutex<Vec<String>>, stop: &AtomicBool) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let Ok(q) = Message::from_vec(buf.get(..n).unwrap_or_default()) else {
            continue;
        };
        let Some(question) = q.queries.first() else {
            continue;
        };
        let key = (
            question.name().to_lowercase().to_ascii(),
            question.query_type().to_string(),
        );
        if let Ok(mut a) = asked.lock() {
            a.push(format!("{} {}", key.0, key.1));
        }
        let mut m = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
        m.metadata.recursion_desired = q.metadata.recursion_desired;
        m.metadata.recursion_available = true;
        m.metadata.authoritative = true;
        m.add_queries(q.queries.clone());
        match script.get(&key) {
            Some((answer, additional)) => {
                m.add_answers(answer.iter().cloned());
                m.add_additionals(additional.iter().cloned());
            }
            None => m.metadata.response_code = ResponseCode::NXDomain,
        }
        if let Ok(wire) = m.to_vec() {
            let _ = sock.send_to(&wire, peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIG: &str = ";; Got answer:
;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 9544
;; flags: qr aa rd ra; QUERY: 1, ANSWER: 2, AUTHORITY: 0, ADDITIONAL: 1

;; QUESTION SECTION:
;a.test.\t\t\t\tIN\tA

;; ANSWER SECTION:
a.test.\t\t\t300\tIN\tCNAME\tb.test.
b.test.\t\t\t300\tIN\tA\t192.0.2.10

;; Query time: 0 msec
";

    const KDIG: &str =
        ";; TLS session (TLS1.3)-(ECDHE-SECP256R1)-(ECDSA-SECP256R1-SHA256)-(AES-256-GCM)
;; ->>HEADER<<- opcode: QUERY; status: NXDOMAIN; id: 58004
;; Flags: qr aa rd ra; QUERY: 1; ANSWER: 0; AUTHORITY: 1; ADDITIONAL: 1

;; EDNS PSEUDOSECTION:
;; Version: 0; flags: ; UDP size: 1232 B; ext-rcode: NOERROR

;; AUTHORITY SECTION:
test.               \t60\tIN\tSOA\tns.test. hostmaster.test. 1 3600 600 86400 60
";

    #[test]
    fn parses_dig_and_kdig_output() {
        let r = DnsReply::parse(DIG).map_err(|e| e.to_string());
        let r = r
            .as_ref()
            .map(|r| (r.status.as_str(), r.answers.len(), r.addrs()));
        assert_eq!(
            r,
            Ok((
                "NOERROR",
                2,
                vec!["192.0.2.10".parse().unwrap_or(IpAddr::from([0; 4]))]
            ))
        );
        let k = DnsReply::parse(KDIG).map_err(|e| e.to_string());
        let k = k.as_ref().map(|r| (r.status.as_str(), r.answers.len()));
        assert_eq!(k, Ok(("NXDOMAIN", 0)));
        assert!(DnsReply::parse(";; connection timed out; no servers could be reached").is_err());
    }

    #[test]
    fn strips_ansi_colours() {
        assert_eq!(
            strip_ansi("\u{1b}[2mcidr\u{1b}[0m\u{1b}[2m=\u{1b}[0m192.0.2.21/32"),
            "cidr=192.0.2.21/32"
        );
    }
}
