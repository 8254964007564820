//! The real unbound as dnsd's upstream: a test zone served over plain DNS and DNS over TLS, with a certificate from a test CA made by `openssl`.
//!
//! unbound runs in the foreground (`-d`) inside a namespace (normally the topology's "net"),
//! as root with no chroot and no privilege drop, everything in its own temporary directory.
//! It serves one authoritative zone, `test.`, from a zone file ([`UnboundConfig::record`])
//! and never recurses anywhere else. The zone is an `auth-zone`, not `local-data`, because
//! unbound answers a `local-data` CNAME without the records of its target, and the CNAME
//! tests need the whole chain from a real resolver.
//!
//! Readiness is unbound answering: the guard polls a query to every address it serves (dig for
//! plain DNS, kdig over TLS with the test CA) until it answers, with a deadline.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::cmd;
use crate::error::{Context, Error, Result};
use crate::netns::Netns;
use crate::topology::NET_V4;

/// The TLS name unbound's certificate is issued for (`tls://IP#dns.test`).
pub const TLS_NAME: &str = "dns.test";
/// How long unbound may take to answer its first query.
pub const READY_DEADLINE: Duration = Duration::from_secs(60);
/// The name every zone contains, used by the readiness probe.
const PROBE_NAME: &str = "ns.test.";

/// Fails unless `tool` is on PATH, saying which Debian package provides it.
pub fn require_tool(tool: &str, package: &str) -> Result<()> {
    if crate::which(tool).is_some() {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "`{tool}` is not on PATH; install the Debian package `{package}` (make deps)"
        )))
    }
}

// === test PKI ===

/// A certificate and key issued by a [`Pki`].
#[derive(Debug, Clone)]
pub struct Issued {
    /// The PEM certificate (leaf only; clients get the CA separately).
    pub cert: PathBuf,
    /// The PEM private key.
    pub key: PathBuf,
    /// base64(sha256(SubjectPublicKeyInfo)) of the certificate: an `upstream.spki_pins` entry.
    pub spki_pin: String,
}

/// A throwaway certificate authority made with `openssl` in a directory.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    ca_key: PathBuf,
}

impl Pki {
    /// Creates a CA (P-256, valid 2 days) in `dir`.
    pub fn new(dir: &Path) -> Result<Self> {
        require_tool("openssl", "openssl")?;
        let ca = dir.join("ca.pem");
        let ca_key = dir.join("ca.key");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=guard e2e test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            path_str(&ca_key)?,
            "-out",
            path_str(&ca)?,
        ])
        .context("creating the test CA")?;
        Ok(Self {
            dir: dir.to_path_buf(),
            ca,
            ca_key,
        })
    }

    /// The CA certificate (PEM): `upstream.ca_file`, `kdig +tls-ca=`.
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// Issues a server certificate for DNS name `name` (CN and SAN).
    pub fn issue(&self, name: &str) -> Result<Issued> {
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let cert = self.dir.join(format!("{name}.pem"));
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!(
                "subjectAltName=DNS:{name}\nbasicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            ),
        )?;
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            path_str(&key)?,
            "-out",
            path_str(&csr)?,
        ])
        .context(format!("creating the key and CSR for {name}"))?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            path_str(&csr)?,
            "-CA",
            path_str(&self.ca)?,
            "-CAkey",
            path_str(&self.ca_key)?,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            path_str(&ext)?,
            "-out",
            path_str(&cert)?,
        ])
        .context(format!("signing the certificate for {name}"))?;
        let spki_pin = spki_pin(&cert)?;
        Ok(Issued {
            cert,
            key,
            spki_pin,
        })
    }
}

/// The RFC 7469 pin of a PEM certificate, computed by openssl exactly as an operator would:
/// `openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256
/// -binary | base64`.
pub fn spki_pin(cert: &Path) -> Result<String> {
    let script = "openssl x509 -in \"$1\" -pubkey -noout | openssl pkey -pubin -outform der \
                  | openssl dgst -sha256 -binary | base64";
    let out = cmd::run_ok(
        Command::new("bash")
            .args(["-c", &format!("set -euo pipefail; {script}")])
            .arg("bash")
            .arg(cert),
    )
    .context(format!("computing the SPKI pin of {}", cert.display()))?;
    let pin = out.trim().to_owned();
    if pin.len() != 44 {
        return Err(Error::msg(format!("unexpected SPKI pin {pin:?}")));
    }
    Ok(pin)
}

fn openssl(args: &[&str]) -> Result<()> {
    cmd::run_ok(Command::new("openssl").args(args)).map(drop)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::msg(format!("non-UTF-8 path {}", p.display())))
}

// === unbound ===

/// What unbound serves, and where.
#[derive(Debug, Clone)]
pub struct UnboundConfig {
    plain: Vec<SocketAddr>,
    tls: Vec<SocketAddr>,
    records: Vec<String>,
}

impl Default for UnboundConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl UnboundConfig {
    /// Plain DNS on net's address port 53, DNS over TLS on port 853, and a zone `test.`
    /// holding only its SOA, NS and `ns.test.`.
    pub fn new() -> Self {
        let net = IpAddr::V4(NET_V4);
        Self {
            plain: vec![SocketAddr::new(net, 53)],
            tls: vec![SocketAddr::new(net, 853)],
            records: Vec::new(),
        }
    }

    /// Plain DNS (UDP and TCP) on exactly these addresses (empty: none).
    #[must_use]
    pub fn plain(mut self, addrs: &[SocketAddr]) -> Self {
        self.plain = addrs.to_vec();
        self
    }

    /// DNS over TLS on exactly these addresses (empty: none). They must share one port.
    #[must_use]
    pub fn tls(mut self, addrs: &[SocketAddr]) -> Self {
        self.tls = addrs.to_vec();
        self
    }

    /// Adds one zone-file line with an absolute owner name, e.g. `"a.test. 300 IN A 192.0.2.10"`.
    #[must_use]
    pub fn record(mut self, line: impl Into<String>) -> Self {
        self.records.push(line.into());
        self
    }

    /// Adds `A`/`AAAA` records `name. TTL IN A|AAAA ip` for each pair.
    #[must_use]
    pub fn addresses(mut self, ttl: u32, names: &[(&str, IpAddr)]) -> Self {
        for (name, ip) in names {
            let t = if ip.is_ipv4() { "A" } else { "AAAA" };
            self.records.push(format!("{name} {ttl} IN {t} {ip}"));
        }
        self
    }

    fn zone(&self) -> String {
        let mut z = String::from(
            "$ORIGIN test.\n$TTL 300\n\
             @ 300 IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60\n\
             @ 300 IN NS ns.test.\n",
        );
        let _ = writeln!(z, "ns 300 IN A {NET_V4}");
        for r in &self.records {
            z.push_str(r);
            z.push('\n');
        }
        z
    }

    fn render(&self, dir: &Path, cert: &Issued) -> Result<String> {
        let d = path_str(dir)?;
        let mut c = String::new();
        let _ = writeln!(c, "server:");
        for line in [
            "verbosity: 1".to_owned(),
            "username: \"\"".to_owned(),
            "chroot: \"\"".to_owned(),
            format!("directory: \"{d}\""),
            format!("pidfile: \"{d}/unbound.pid\""),
            "do-daemonize: no".to_owned(),
            "use-syslog: no".to_owned(),
            "logfile: \"\"".to_owned(),
            "num-threads: 1".to_owned(),
            "so-reuseport: no".to_owned(),
            "interface-automatic: no".to_owned(),
            "incoming-num-tcp: 64".to_owned(),
            "access-control: 0.0.0.0/0 allow".to_owned(),
            "access-control: ::/0 allow".to_owned(),
            // No validator, no trust anchors: nothing to fetch.
            "module-config: \"iterator\"".to_owned(),
            // unbound blocks test. by default (RFC 6761); serve our zone instead.
            "local-zone: \"test.\" nodefault".to_owned(),
            format!("tls-service-key: \"{}\"", path_str(&cert.key)?),
            format!("tls-service-pem: \"{}\"", path_str(&cert.cert)?),
        ] {
            let _ = writeln!(c, "  {line}");
        }
        let tls_port = match self.tls.first() {
            Some(a) => a.port(),
            None => 853,
        };
        if self.tls.iter().any(|a| a.port() != tls_port) {
            return Err(Error::msg("unbound: every TLS address must use one port"));
        }
        if self.plain.iter().any(|a| a.port() == tls_port) {
            return Err(Error::msg(format!(
                "unbound: plain DNS cannot use the TLS port {tls_port}"
            )));
        }
        let _ = writeln!(c, "  tls-port: {tls_port}");
        for a in self.plain.iter().chain(&self.tls) {
            let _ = writeln!(c, "  interface: {}@{}", a.ip(), a.port());
        }
        let _ = writeln!(c, "auth-zone:");
        let _ = writeln!(c, "  name: \"test.\"");
        let _ = writeln!(c, "  zonefile: \"{d}/test.zone\"");
        let _ = writeln!(c, "  for-downstream: yes");
        let _ = writeln!(c, "  for-upstream: yes");
        let _ = writeln!(c, "  fallback-enabled: no");
        let _ = writeln!(c, "remote-control:");
        let _ = writeln!(c, "  control-enable: no");
        Ok(c)
    }
}

/// A running unbound. Drop kills it by PID and, when the test is failing, prints its log.
#[derive(Debug)]
pub struct Unbound {
    ns: String,
    dir: tempfile::TempDir,
    pki: Pki,
    cert: Issued,
    cfg: UnboundConfig,
    log: PathBuf,
    child: Option<Child>,
}

impl Unbound {
    /// Writes the certificates, zone and config, checks the config with
    /// `unbound-checkconf`, starts `unbound -d` in `ns` and waits until every address answers.
    pub fn start(ns: &Netns, cfg: UnboundConfig) -> Result<Self> {
        require_tool("unbound", "unbound")?;
        require_tool("unbound-checkconf", "unbound")?;
        require_tool("dig", "dnsutils")?;
        require_tool("kdig", "knot-dnsutils")?;
        let dir = crate::fwd::test_dir()?;
        let pki = Pki::new(dir.path())?;
        let cert = pki.issue(TLS_NAME)?;
        std::fs::write(dir.path().join("test.zone"), cfg.zone())?;
        let conf = dir.path().join("unbound.conf");
        std::fs::write(&conf, cfg.render(dir.path(), &cert)?)?;
        cmd::run_ok(Command::new("unbound-checkconf").arg(&conf))
            .context("unbound-checkconf rejected the generated config")?;
        let log = dir.path().join("unbound.log");
        let out = OpenOptions::new().create(true).append(true).open(&log)?;
        let err = out.try_clone()?;
        let child = ns
            .cmd("unbound")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("starting unbound")?;
        let mut u = Self {
            ns: ns.name().to_owned(),
            dir,
            pki,
            cert,
            cfg,
            log,
            child: Some(child),
        };
        u.wait_ready(ns)?;
        Ok(u)
    }

    /// The test CA that signed unbound's certificate (`upstream.ca_file`).
    pub fn ca(&self) -> &Path {
        self.pki.ca()
    }

    /// The test PKI, to issue more certificates (dnsd's own DoT listener).
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The SPKI pin of unbound's certificate.
    pub fn spki_pin(&self) -> &str {
        &self.cert.spki_pin
    }

    /// The first plain-DNS address.
    pub fn plain_addr(&self) -> Result<SocketAddr> {
        self.cfg
            .plain
            .first()
            .copied()
            .ok_or_else(|| Error::msg("unbound serves no plain DNS"))
    }

    /// The first DNS-over-TLS address.
    pub fn tls_addr(&self) -> Result<SocketAddr> {
        self.cfg
            .tls
            .first()
            .copied()
            .ok_or_else(|| Error::msg("unbound serves no DNS over TLS"))
    }

    /// dnsd's URL for the first TLS address: `tls://IP:PORT#dns.test`.
    pub fn tls_url(&self) -> Result<String> {
        Ok(format!("tls://{}#{TLS_NAME}", self.tls_addr()?))
    }

    /// dnsd's URL for the first plain address: `udp://IP:PORT`.
    pub fn udp_url(&self) -> Result<String> {
        Ok(format!("udp://{}", self.plain_addr()?))
    }

    /// The PID of unbound.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything unbound logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self, ns: &Netns) -> Result<()> {
        let mut probes: Vec<Vec<String>> = Vec::new();
        for a in &self.cfg.plain {
            probes.push(
                [
                    "dig",
                    &format!("@{}", a.ip()),
                    "-p",
                    &a.port().to_string(),
                    "+tries=1",
                    "+time=1",
                    PROBE_NAME,
                    "A",
                ]
                .map(str::to_owned)
                .to_vec(),
            );
            probes.push(
                [
                    "dig",
                    "+tcp",
                    &format!("@{}", a.ip()),
                    "-p",
                    &a.port().to_string(),
                    "+tries=1",
                    "+time=1",
                    PROBE_NAME,
                    "A",
                ]
                .map(str::to_owned)
                .to_vec(),
            );
        }
        for a in &self.cfg.tls {
            probes.push(
                [
                    "kdig",
                    &format!("@{}", a.ip()),
                    "-p",
                    &a.port().to_string(),
                    &format!("+tls-ca={}", path_str(self.pki.ca())?),
                    &format!("+tls-hostname={TLS_NAME}"),
                    "+retry=0",
                    "+time=1",
                    PROBE_NAME,
                    "A",
                ]
                .map(str::to_owned)
                .to_vec(),
            );
        }
        for argv in probes {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            crate::wait_until(
                &format!("unbound to answer `{}`", argv.join(" ")),
                READY_DEADLINE,
                || {
                    if let Some(child) = self.child.as_mut()
                        && let Some(status) = child.try_wait()?
                    {
                        return Err(Error::msg(format!("unbound exited with {status}")));
                    }
                    let out = ns.exec(&argv)?;
                    Ok(out.success() && out.stdout.contains("NOERROR"))
                },
            )
            .map_err(|e| e.context(format!("--- unbound log ---\n{}", self.log())))?;
        }
        Ok(())
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- unbound log (netns {}, {}) ---\n{}--- end of unbound log ---",
                self.ns,
                self.log.display(),
                self.log()
            );
        }
    }
}
