//! The `[upstream]` configuration section: server URLs, strategy, timeouts and TLS trust settings.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use rustls::pki_types::ServerName;
use serde::Deserialize;

/// Length of a SHA-256 digest, the only pin hash we accept.
const PIN_LEN: usize = 32;

/// Largest pool we allow per upstream; more connections to one resolver only cost handshakes.
const MAX_CONNECTIONS: usize = 64;

/// The `[upstream]` section of dnsd's TOML configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Upstream resolvers as URLs: `udp://IP[:PORT]`, `tcp://IP[:PORT]` or
    /// `tls://IP[:PORT][#server-name]` (DNS over TLS, RFC 7858). Default ports are 53 and 853.
    /// Addresses must be IP literals (IPv6 in brackets): dnsd cannot resolve its own upstreams.
    /// Without `#server-name`, a tls:// certificate is verified against the IP address.
    pub servers: Vec<String>,
    /// How to pick an upstream for each query: "failover", "round_robin" or "fastest".
    #[serde(default)]
    pub strategy: Strategy,
    /// Overall deadline for one client query, across all upstreams tried.
    #[serde(default = "default_timeout", with = "duration_str")]
    pub timeout: Duration,
    /// Deadline for one attempt on one upstream before the next upstream is tried (the last
    /// candidate gets whatever remains of `timeout`).
    #[serde(default = "default_attempt_timeout", with = "duration_str")]
    pub attempt_timeout: Duration,
    /// PEM file with the CA certificates that tls:// upstreams must chain to. Without it the
    /// system trust roots are used.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// SPKI pins for tls:// upstreams: base64 of the SHA-256 of the leaf certificate's
    /// SubjectPublicKeyInfo (the `pin-sha256` of RFC 7469). A connection is accepted if the leaf
    /// matches ANY pin, so list the next key before rotating. Pins are checked in addition to
    /// normal certificate verification, never instead of it. Empty: no pinning.
    #[serde(default)]
    pub spki_pins: Vec<String>,
    /// Maximum pooled connections per tcp:// or tls:// upstream (also used for the TCP retry
    /// of truncated UDP answers). Each connection pipelines many queries.
    #[serde(default = "default_tls_connections")]
    pub tls_connections: usize,
    /// Close a pooled connection after it has carried no query for this long.
    #[serde(default = "default_idle_timeout", with = "duration_str")]
    pub idle_timeout: Duration,
    /// Maximum queries waiting on upstreams at once; beyond it a query fails at once (the
    /// caller answers SERVFAIL) instead of queueing.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Pad queries to tls:// upstreams to a multiple of 128 octets (EDNS(0) padding, RFC 7830
    /// with the RFC 8467 block-length policy), so that query sizes do not reveal names.
    #[serde(default = "default_padding")]
    pub padding: bool,
    /// Consecutive failures after which an upstream is marked down.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// First back-off of a down upstream; it doubles on every further failure.
    #[serde(default = "default_backoff_initial", with = "duration_str")]
    pub backoff_initial: Duration,
    /// Longest back-off of a down upstream.
    #[serde(default = "default_backoff_max", with = "duration_str")]
    pub backoff_max: Duration,
    /// When a down upstream's back-off ends, probe it with a `. IN NS` query instead of
    /// risking a client query on it.
    #[serde(default = "default_health_check")]
    pub health_check: bool,
}

fn default_timeout() -> Duration {
    Duration::from_secs(4)
}

fn default_attempt_timeout() -> Duration {
    Duration::from_millis(1500)
}

fn default_tls_connections() -> usize {
    2
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(25)
}

fn default_max_in_flight() -> usize {
    1024
}

fn default_padding() -> bool {
    true
}

fn default_max_failures() -> u32 {
    3
}

fn default_backoff_initial() -> Duration {
    Duration::from_secs(1)
}

fn default_backoff_max() -> Duration {
    Duration::from_secs(60)
}

fn default_health_check() -> bool {
    true
}

impl Default for UpstreamConfig {
    /// All defaults, and no servers (which `validate` reports).
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            strategy: Strategy::default(),
            timeout: default_timeout(),
            attempt_timeout: default_attempt_timeout(),
            ca_file: None,
            spki_pins: Vec::new(),
            tls_connections: default_tls_connections(),
            idle_timeout: default_idle_timeout(),
            max_in_flight: default_max_in_flight(),
            padding: default_padding(),
            max_failures: default_max_failures(),
            backoff_initial: default_backoff_initial(),
            backoff_max: default_backoff_max(),
            health_check: default_health_check(),
        }
    }
}

impl UpstreamConfig {
    /// Every problem in this section, each prefixed with its key path (for example
    /// `upstream.servers[1]: unknown scheme 'https'`). Empty means valid. Reads `ca_file`.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.servers.is_empty() {
            errors.push("upstream.servers: at least one server is required".to_owned());
        }
        let mut seen: Vec<ServerUrl> = Vec::new();
        for (i, s) in self.servers.iter().enumerate() {
            match ServerUrl::parse(s) {
                Ok(url) => {
                    if seen.contains(&url) {
                        errors.push(format!("upstream.servers[{i}]: duplicate server '{s}'"));
                    }
                    seen.push(url);
                }
                Err(e) => errors.push(format!("upstream.servers[{i}]: {e}")),
            }
        }
        if self.timeout.is_zero() {
            errors.push("upstream.timeout: must be greater than zero".to_owned());
        }
        if self.attempt_timeout.is_zero() {
            errors.push("upstream.attempt_timeout: must be greater than zero".to_owned());
        } else if self.attempt_timeout > self.timeout {
            errors.push(format!(
                "upstream.attempt_timeout: {} exceeds upstream.timeout {}",
                humantime::format_duration(self.attempt_timeout),
                humantime::format_duration(self.timeout)
            ));
        }
        if self.idle_timeout.is_zero() {
            errors.push("upstream.idle_timeout: must be greater than zero".to_owned());
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.tls_connections) {
            errors.push(format!(
                "upstream.tls_connections: must be between 1 and {MAX_CONNECTIONS}, got {}",
                self.tls_connections
            ));
        }
        if self.max_in_flight == 0 {
            errors.push("upstream.max_in_flight: must be at least 1".to_owned());
        }
        if self.max_failures == 0 {
            errors.push("upstream.max_failures: must be at least 1".to_owned());
        }
        if self.backoff_initial.is_zero() {
            errors.push("upstream.backoff_initial: must be greater than zero".to_owned());
        }
        if self.backoff_max < self.backoff_initial {
            errors.push("upstream.backoff_max: must not be below upstream.backoff_initial".into());
        }
        for (i, pin) in self.spki_pins.iter().enumerate() {
            if let Err(e) = parse_pin(pin) {
                errors.push(format!("upstream.spki_pins[{i}]: {e}"));
            }
        }
        if let Some(path) = &self.ca_file
            && let Err(e) = load_ca_file(path)
        {
            errors.push(format!("upstream.ca_file: {e}"));
        }
        errors
    }

    /// The parsed server URLs, skipping invalid ones (call `validate` first).
    pub(crate) fn parsed_servers(&self) -> Vec<ServerUrl> {
        self.servers
            .iter()
            .filter_map(|s| ServerUrl::parse(s).ok())
            .collect()
    }
}

/// The upstream socket addresses of a configuration (each once, invalid URLs skipped), for
/// fwd's egress ruleset: dnsd itself must be allowed to reach them.
pub fn server_addrs(cfg: &UpstreamConfig) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for url in cfg.parsed_servers() {
        if !out.contains(&url.addr) {
            out.push(url.addr);
        }
    }
    out
}

// === impl Strategy ===

/// How an upstream is chosen for each query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The first healthy upstream in configuration order.
    #[default]
    Failover,
    /// Healthy upstreams in turn.
    RoundRobin,
    /// The healthy upstream with the lowest smoothed RTT, occasionally exploring the others.
    Fastest,
}

impl Strategy {
    /// The name used in the configuration and in `guard.v1.UpstreamsResponse.strategy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Failover => "failover",
            Strategy::RoundRobin => "round_robin",
            Strategy::Fastest => "fastest",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl ServerUrl ===

/// The transport of an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Plain DNS over UDP (retried over TCP when truncated).
    Udp,
    /// Plain DNS over TCP, pooled and pipelined.
    Tcp,
    /// DNS over TLS (RFC 7858), pooled and pipelined.
    Tls,
}

impl Protocol {
    /// The URL scheme.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Udp => "udp",
            Protocol::Tcp => "tcp",
            Protocol::Tls => "tls",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One parsed entry of `upstream.servers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerUrl {
    pub(crate) protocol: Protocol,
    pub(crate) addr: SocketAddr,
    /// TLS only: the name for SNI and certificate verification (the IP when absent).
    pub(crate) tls_name: Option<String>,
}

impl ServerUrl {
    /// Parses `scheme://ip[:port][#name]`. The error text has no key path; the caller adds it.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(format!(
                "'{s}' is not a URL (expected udp://, tcp:// or tls://)"
            ));
        };
        let protocol = match scheme.to_ascii_lowercase().as_str() {
            "udp" => Protocol::Udp,
            "tcp" => Protocol::Tcp,
            "tls" => Protocol::Tls,
            other => {
                return Err(format!(
                    "unknown scheme '{other}' (expected udp, tcp or tls)"
                ));
            }
        };
        let (hostport, fragment) = match rest.split_once('#') {
            Some((h, f)) => (h, Some(f)),
            None => (rest, None),
        };
        let default_port = if protocol == Protocol::Tls { 853 } else { 53 };
        let addr = parse_hostport(hostport, default_port)?;
        let tls_name = match (protocol, fragment) {
            (_, None) => None,
            (Protocol::Tls, Some(name)) => {
                if name.is_empty() {
                    return Err("empty server name after '#'".to_owned());
                }
                if ServerName::try_from(name.to_owned()).is_err() {
                    return Err(format!("invalid TLS server name '{name}'"));
                }
                Some(name.to_owned())
            }
            (_, Some(_)) => {
                return Err(format!(
                    "a '#server-name' is only meaningful for tls://, not {scheme}://"
                ));
            }
        };
        Ok(Self {
            protocol,
            addr,
            tls_name,
        })
    }

    /// The name the TLS certificate must match.
    pub(crate) fn server_name(&self) -> ServerName<'static> {
        self.tls_name
            .as_ref()
            .and_then(|n| ServerName::try_from(n.clone()).ok())
            .unwrap_or_else(|| ServerName::IpAddress(self.addr.ip().into()))
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.protocol, self.addr)?;
        if let Some(name) = &self.tls_name {
            write!(f, "#{name}")?;
        }
        Ok(())
    }
}

fn parse_hostport(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    if s.is_empty() {
        return Err("missing address".to_owned());
    }
    if s.contains('/') || s.contains('?') || s.contains('@') {
        return Err(format!(
            "'{s}': expected only IP[:PORT] (no path, query or user)"
        ));
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return check_port(addr);
    }
    let bare = s
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(s);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    Err(format!(
        "'{s}' is not an IP address with an optional port (host names are not allowed: dnsd \
         cannot resolve its own upstreams; write IPv6 as [addr]:port)"
    ))
}

fn check_port(addr: SocketAddr) -> Result<SocketAddr, String> {
    if addr.port() == 0 {
        return Err("port 0 is not a valid upstream port".to_owned());
    }
    Ok(addr)
}

/// Decodes one SPKI pin (standard base64 of a SHA-256 digest).
pub(crate) fn parse_pin(pin: &str) -> Result<[u8; PIN_LEN], String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(pin.trim())
        .map_err(|e| format!("'{pin}' is not base64: {e}"))?;
    <[u8; PIN_LEN]>::try_from(bytes.as_slice()).map_err(|_| {
        format!(
            "'{pin}' decodes to {} bytes, a SHA-256 pin has {PIN_LEN}",
            bytes.len()
        )
    })
}

/// Reads the PEM CA certificates of `ca_file`; at least one is required.
pub(crate) fn load_ca_file(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let data = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut rd = data.as_slice();
    let certs = rustls_pemfile::certs(&mut rd)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("parsing {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} contains no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// Durations as humantime strings ("2s", "1500ms").
mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration '{s}': {e}")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[derive(Debug, Deserialize)]
    struct Wrapper {
        upstream: UpstreamConfig,
    }

    fn parse(toml_text: &str) -> Result<UpstreamConfig, String> {
        toml::from_str::<Wrapper>(toml_text)
            .map(|w| w.upstream)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_durations() {
        let cfg = parse(
            r#"
            [upstream]
            servers = ["tls://192.0.2.53#dns.example", "udp://[2001:db8::1]"]
            timeout = "2s"
            idle_timeout = "500ms"
            strategy = "fastest"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.timeout, Duration::from_secs(2));
        assert_eq!(cfg.idle_timeout, Duration::from_millis(500));
        assert_eq!(cfg.strategy, Strategy::Fastest);
        assert_eq!(cfg.tls_connections, 2);
        assert!(cfg.padding);
        assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
        let urls = cfg.parsed_servers();
        assert_eq!(urls[0].to_string(), "tls://192.0.2.53:853#dns.example");
        assert_eq!(urls[1].to_string(), "udp://[2001:db8::1]:53");
        assert_eq!(
            server_addrs(&cfg),
            vec![
                "192.0.2.53:853".parse().unwrap(),
                "[2001:db8::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_rejected() {
        let err = parse("[upstream]\nservers = []\nbogus = 1\n").unwrap_err();
        assert!(err.contains("bogus"), "{err}");
        let err = parse("[upstream]\nservers = []\ntimeout = \"soon\"\n").unwrap_err();
        assert!(err.contains("invalid duration"), "{err}");
        let err = parse("[upstream]\nservers = []\nstrategy = \"random\"\n").unwrap_err();
        assert!(err.contains("random"), "{err}");
    }

    #[test]
    fn validate_reports_every_problem_with_its_path() {
        let cfg = UpstreamConfig {
            servers: vec![
                "udp://127.0.0.1".into(),
                "https://1.1.1.1/dns-query".into(),
                "tls://dns.google".into(),
                "udp://127.0.0.1:53".into(),
                "tcp://10.0.0.1:53#name".into(),
                "udp://10.0.0.1:0".into(),
            ],
            attempt_timeout: Duration::from_secs(10),
            tls_connections: 0,
            max_in_flight: 0,
            spki_pins: vec!["not base64!".into(), "AAAA".into()],
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..UpstreamConfig::default()
        };
        let errors = cfg.validate();
        let expect = [
            "upstream.servers[1]: unknown scheme 'https'",
            "upstream.servers[2]: 'dns.google' is not an IP address",
            "upstream.servers[3]: duplicate server",
            "upstream.servers[4]: a '#server-name' is only meaningful for tls://",
            "upstream.servers[5]: port 0",
            "upstream.attempt_timeout: 10s exceeds upstream.timeout 4s",
            "upstream.tls_connections: must be between 1 and 64",
            "upstream.max_in_flight",
            "upstream.spki_pins[0]: 'not base64!' is not base64",
            "upstream.spki_pins[1]: 'AAAA' decodes to 3 bytes",
            "upstream.ca_file: reading /nonexistent/ca.pem",
        ];
        for e in expect {
            assert!(
                errors.iter().any(|got| got.starts_with(e)),
                "missing {e:?} in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expect.len(), "{errors:#?}");
        assert!(UpstreamConfig::default().validate()[0].starts_with("upstream.servers"));
    }

    #[test]
    fn tls_name_defaults_to_ip() {
        let url = ServerUrl::parse("tls://127.0.0.1:8853").unwrap();
        assert_eq!(
            url.server_name(),
            ServerName::IpAddress("127.0.0.1".parse::<IpAddr>().unwrap().into())
        );
        let url = ServerUrl::parse("TLS://[::1]#dns.example").unwrap();
        assert_eq!(url.addr, "[::1]:853".parse().unwrap());
        assert_eq!(
            url.server_name(),
            ServerName::try_from("dns.example").unwrap()
        );
    }
}
