//! dnsd's TOML configuration: typed sections with documented defaults, and validation that reports every problem with its key path.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::upstream::UpstreamConfig;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (syntax, type, or unknown key).
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error, which names the key and line.
        source: Box<toml::de::Error>,
    },
    /// The file parsed but some values are invalid; every problem is listed.
    #[error("{path}: {} invalid setting(s):\n  {}", .errors.len(), .errors.join("\n  "))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// One line per problem, each starting with its key path.
        errors: Vec<String>,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Log query names (and client addresses with them). Off by default: DNS names are
    /// personal data, and the grants fwd records already give the audit trail.
    #[serde(default)]
    pub log_queries: bool,
    /// Runtime worker threads: 0 (the default) is one per CPU; 1 runs everything on one
    /// thread with tokio's current-thread scheduler, which spends less CPU per query than a
    /// one-worker multi-thread runtime (no cross-thread wake-ups or work-stealing queues):
    /// ~5 % fewer µs per cache miss here. Read at start only.
    #[serde(default)]
    pub threads: usize,
    /// Listening sockets and front-end limits.
    #[serde(default)]
    pub listen: ListenConfig,
    /// Upstream resolvers (see the upstream module).
    pub upstream: UpstreamConfig,
    /// Client access control and rate limiting.
    #[serde(default)]
    pub acl: AclConfig,
    /// Optional domain allow or deny list.
    #[serde(default)]
    pub domains: DomainPolicyConfig,
    /// The answer cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// How answers are authorized through fwd.
    #[serde(default)]
    pub authorize: AuthorizeConfig,
    /// The `guard.v1.Resolver` control socket.
    #[serde(default)]
    pub control: ControlConfig,
    /// The optional Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

// === [listen] ===

/// `[listen]`: where dnsd accepts queries, and front-end limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// UDP addresses to bind. Ignored when systemd passes sockets (LISTEN_FDS), so that dnsd
    /// never needs CAP_NET_BIND_SERVICE.
    #[serde(default = "default_listen_addrs")]
    pub udp: Vec<SocketAddr>,
    /// TCP addresses to bind (RFC 7766). Ignored under socket activation, like `udp`.
    #[serde(default = "default_listen_addrs")]
    pub tcp: Vec<SocketAddr>,
    /// Optional DNS-over-TLS listener (RFC 7858).
    #[serde(default)]
    pub tls: Option<TlsListenConfig>,
    /// Most TCP and TLS connections open at once; further connections are closed at once.
    #[serde(default = "default_tcp_max_connections")]
    pub tcp_max_connections: usize,
    /// Close a TCP/TLS connection that has carried no query for this long (RFC 7766 §6.2.3).
    #[serde(default = "default_tcp_idle_timeout", with = "duration_str")]
    pub tcp_idle_timeout: Duration,
    /// Slowloris guard: once the first byte of a message arrives, the whole message must
    /// arrive within this time, and each answer must be written within it.
    #[serde(default = "default_tcp_read_timeout", with = "duration_str")]
    pub tcp_read_timeout: Duration,
    /// Most queries of one TCP/TLS connection processed at once (they are answered out of
    /// order, RFC 7766 §6.2.1.1); the connection is not read further until one completes.
    #[serde(default = "default_tcp_max_pipelined")]
    pub tcp_max_pipelined: usize,
    /// The EDNS UDP payload size dnsd advertises and the most it sends over UDP. 1232 avoids
    /// IP fragmentation on every common path (DNS Flag Day 2020).
    #[serde(default = "default_udp_payload")]
    pub udp_payload: u16,
    /// Most client queries being processed at once (across all listeners, cache hits
    /// included). Beyond it UDP queries are dropped and stream queries get SERVFAIL.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

/// `[listen.tls]`: the DNS-over-TLS listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListenConfig {
    /// Addresses to bind. Under socket activation, sockets named `dot` or `tls`
    /// (FileDescriptorName=) are used instead.
    #[serde(default = "default_tls_addrs")]
    pub addrs: Vec<SocketAddr>,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The TLS handshake must finish within this time.
    #[serde(default = "default_tls_handshake_timeout", with = "duration_str")]
    pub handshake_timeout: Duration,
}

fn default_listen_addrs() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([127, 0, 0, 1], 53))]
}

fn default_tls_addrs() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([127, 0, 0, 1], 853))]
}

fn default_tcp_max_connections() -> usize {
    512
}

fn default_tcp_idle_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_tcp_read_timeout() -> Duration {
    Duration::from_secs(3)
}

fn default_tcp_max_pipelined() -> usize {
    32
}

fn default_udp_payload() -> u16 {
    1232
}

fn default_max_in_flight() -> usize {
    4096
}

fn default_tls_handshake_timeout() -> Duration {
    Duration::from_secs(5)
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            udp: default_listen_addrs(),
            tcp: default_listen_addrs(),
            tls: None,
            tcp_max_connections: default_tcp_max_connections(),
            tcp_idle_timeout: default_tcp_idle_timeout(),
            tcp_read_timeout: default_tcp_read_timeout(),
            tcp_max_pipelined: default_tcp_max_pipelined(),
            udp_payload: default_udp_payload(),
            max_in_flight: default_max_in_flight(),
        }
    }
}

// === [acl] ===

/// What a client outside `acl.allow` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AclAction {
    /// A REFUSED answer.
    #[default]
    Refused,
    /// Nothing: the query is silently dropped.
    Drop,
}

/// `[acl]`: which clients may query, and how fast.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    /// Client networks allowed to query. Default: loopback only, the local-mode setup.
    #[serde(default = "default_acl_allow")]
    pub allow: Vec<IpNet>,
    /// What other clients get: "refused" or "drop".
    #[serde(default)]
    pub action: AclAction,
    /// Per-client sustained queries per second; 0 disables rate limiting. Off by default
    /// because in local mode every query comes from 127.0.0.1.
    #[serde(default)]
    pub rate_limit_qps: u32,
    /// Per-client burst (bucket size), in queries.
    #[serde(default = "default_rate_limit_burst")]
    pub rate_limit_burst: u32,
    /// Most clients tracked by the rate limiter (IPv6 per /64); bounds its memory.
    #[serde(default = "default_rate_limit_clients")]
    pub rate_limit_clients: usize,
}

fn default_acl_allow() -> Vec<IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn default_rate_limit_burst() -> u32 {
    200
}

fn default_rate_limit_clients() -> usize {
    65_536
}

impl Default for AclConfig {
    fn default() -> Self {
        AclConfig {
            allow: default_acl_allow(),
            action: AclAction::default(),
            rate_limit_qps: 0,
            rate_limit_burst: default_rate_limit_burst(),
            rate_limit_clients: default_rate_limit_clients(),
        }
    }
}

// === [domains] ===

/// Whether the domain list is used, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainMode {
    /// No domain policy.
    #[default]
    Off,
    /// Only listed names are resolved.
    Allow,
    /// Listed names are not resolved.
    Deny,
}

/// What a name outside the domain policy gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainAction {
    /// NXDOMAIN: the name does not exist, so applications fail fast.
    #[default]
    Nxdomain,
    /// REFUSED.
    Refused,
}

/// `[domains]`: the optional domain policy. Names outside it are never forwarded upstream.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainPolicyConfig {
    /// "off", "allow" (only `names` resolve) or "deny" (`names` do not resolve).
    #[serde(default)]
    pub mode: DomainMode,
    /// What a name outside the policy gets: "nxdomain" or "refused".
    #[serde(default)]
    pub action: DomainAction,
    /// Names: `example.com` matches exactly that name, `*.example.com` every name strictly
    /// below it. Case-insensitive; a trailing dot is ignored.
    #[serde(default)]
    pub names: Vec<String>,
}

// === [cache] ===

/// `[cache]`: the answer cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Most answers kept (least recently used evicted first); 0 disables the cache.
    #[serde(default = "default_cache_size")]
    pub size: usize,
    /// Lowest TTL a positive answer is served and cached with. 0 keeps upstream TTLs; raising
    /// it reduces upstream traffic for TTL=0/1 names (fwd applies its own minimum to grants).
    #[serde(default = "default_cache_min_ttl", with = "duration_str")]
    pub min_ttl: Duration,
    /// Highest TTL any record is served and cached with.
    #[serde(default = "default_cache_max_ttl", with = "duration_str")]
    pub max_ttl: Duration,
    /// Highest lifetime of a negative (NXDOMAIN/NODATA) answer, whose TTL otherwise comes
    /// from the SOA (RFC 2308).
    #[serde(default = "default_negative_max_ttl", with = "duration_str")]
    pub negative_max_ttl: Duration,
}

fn default_cache_size() -> usize {
    10_000
}

fn default_cache_min_ttl() -> Duration {
    Duration::ZERO
}

fn default_cache_max_ttl() -> Duration {
    Duration::from_secs(86_400)
}

fn default_negative_max_ttl() -> Duration {
    Duration::from_secs(900)
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            size: default_cache_size(),
            min_ttl: default_cache_min_ttl(),
            max_ttl: default_cache_max_ttl(),
            negative_max_ttl: default_negative_max_ttl(),
        }
    }
}

// === [authorize] ===

/// What happens to an answer when fwd cannot confirm its grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFwdError {
    /// SERVFAIL: fail closed, the only mode in which "answered" implies "reachable".
    #[default]
    Servfail,
    /// Release the answer anyway (rollout or audit setups). Logged at warn level.
    Answer,
}

/// `[authorize]`: the Authorize client of fwd.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeConfig {
    /// fwd's Unix socket.
    #[serde(default = "default_fwd_socket")]
    pub socket: PathBuf,
    /// Deadline of one Authorize call, connecting included. Past it the answer fails.
    #[serde(default = "default_authorize_timeout", with = "duration_str")]
    pub timeout: Duration,
    /// "servfail" (default) or "answer".
    #[serde(default)]
    pub on_fwd_error: OnFwdError,
    /// Networks never sent to fwd (besides 0.0.0.0 and ::, which never are). Answers
    /// naming them are still released; only the authorization is skipped.
    #[serde(default = "default_never_authorize")]
    pub never_authorize: Vec<IpNet>,
    /// A cached answer is re-authorized when its grant ends less than its remaining TTL plus
    /// this margin from now. Keep it below fwd's own grant margin, or every hit re-authorizes.
    #[serde(default = "default_refresh_margin", with = "duration_str")]
    pub refresh_margin: Duration,
    /// Set when fwd runs in per-client gateway mode: grants are then tracked per client,
    /// and a cache hit for a new client is authorized for that client.
    #[serde(default)]
    pub per_client: bool,
    /// Most requests, and most addresses in total, sent to fwd in one `AuthorizeMany` call
    /// (the answers of concurrent queries are coalesced). Must be ≤ fwd's
    /// `limits.max_batch`, or fwd refuses the larger calls whole. Also the most addresses one
    /// answer may name: addresses beyond it are removed from the answer.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// At most this many answers released from dnsd's memory of committed grants are sent to
    /// fwd as alias audit records per address and grant period (a new grant or extension
    /// starts a new period); the rest are counted, not recorded. Bounds the audit growth a
    /// flood of random names under one wildcard would cause. 0 records none.
    #[serde(default = "default_alias_records")]
    pub alias_records_per_grant: u32,
}

/// The largest `authorize.max_batch` accepted (fwd's own bound is usually far lower).
const MAX_BATCH_LIMIT: usize = 4096;

fn default_fwd_socket() -> PathBuf {
    PathBuf::from("/run/guard/fwd.sock")
}

fn default_authorize_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_never_authorize() -> Vec<IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn default_refresh_margin() -> Duration {
    Duration::from_secs(2)
}

fn default_max_batch() -> usize {
    crate::authorize::DEFAULT_MAX_BATCH
}

fn default_alias_records() -> u32 {
    crate::authorize::DEFAULT_ALIAS_RECORDS
}

impl Default for AuthorizeConfig {
    fn default() -> Self {
        AuthorizeConfig {
            socket: default_fwd_socket(),
            timeout: default_authorize_timeout(),
            on_fwd_error: OnFwdError::default(),
            never_authorize: default_never_authorize(),
            refresh_margin: default_refresh_margin(),
            per_client: false,
            max_batch: default_max_batch(),
            alias_records_per_grant: default_alias_records(),
        }
    }
}

// === [control] ===

/// `[control]`: the `guard.v1.Resolver` gRPC service on a Unix socket (mode 0660).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Serve the control socket at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Its path. A stale socket left by a previous run is replaced.
    #[serde(default = "default_control_socket")]
    pub socket: PathBuf,
    /// Peer uids with the admin role (FlushCache, and everything a reader may do).
    #[serde(default = "default_admin_uids")]
    pub admin_uids: Vec<u32>,
    /// Peer primary gids with the admin role.
    #[serde(default)]
    pub admin_gids: Vec<u32>,
    /// Peer primary gids with the reader role (Stats, Upstreams), in addition to dnsd's own
    /// uid and the socket's group.
    #[serde(default)]
    pub reader_gids: Vec<u32>,
}

fn default_true() -> bool {
    true
}

fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/guard/dnsd.sock")
}

fn default_admin_uids() -> Vec<u32> {
    vec![0]
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            enabled: true,
            socket: default_control_socket(),
            admin_uids: default_admin_uids(),
            admin_gids: Vec::new(),
            reader_gids: Vec::new(),
        }
    }
}

// === [metrics] ===

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint serving `/metrics`; absent disables it. Keep it on
    /// loopback: the metrics reveal query volumes.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

// === impl Config ===

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg = Config::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        let errors = cfg.validate();
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                errors,
            })
        }
    }

    /// Parses TOML text without validating it.
    pub fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// Every problem in the configuration, one line each, starting with its key path.
    /// Reads the TLS certificate and key (and upstream CA file) to check them too.
    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        self.validate_listen(&mut e);
        self.validate_acl(&mut e);
        self.validate_domains(&mut e);
        self.validate_cache(&mut e);
        self.validate_authorize(&mut e);
        if self.threads > 1024 {
            e.push(format!("threads: {} is over 1024", self.threads));
        }
        if self.control.enabled && !self.control.socket.is_absolute() {
            e.push(format!(
                "control.socket: {:?} must be an absolute path",
                self.control.socket
            ));
        }
        for msg in self.upstream.validate() {
            if msg.starts_with("upstream") {
                e.push(msg);
            } else {
                e.push(format!("upstream: {msg}"));
            }
        }
        e
    }

    fn validate_listen(&self, e: &mut Vec<String>) {
        let l = &self.listen;
        dup_addrs("listen.udp", &l.udp, e);
        dup_addrs("listen.tcp", &l.tcp, e);
        positive("listen.tcp_idle_timeout", l.tcp_idle_timeout, e);
        positive("listen.tcp_read_timeout", l.tcp_read_timeout, e);
        if l.tcp_max_connections == 0 {
            e.push("listen.tcp_max_connections: must be at least 1".into());
        }
        if l.tcp_max_pipelined == 0 {
            e.push("listen.tcp_max_pipelined: must be at least 1".into());
        }
        if l.max_in_flight == 0 {
            e.push("listen.max_in_flight: must be at least 1".into());
        }
        if !(512..=4096).contains(&l.udp_payload) {
            e.push(format!(
                "listen.udp_payload: {} is outside 512..=4096",
                l.udp_payload
            ));
        }
        if let Some(tls) = &l.tls {
            dup_addrs("listen.tls.addrs", &tls.addrs, e);
            for (i, a) in tls.addrs.iter().enumerate() {
                if l.tcp.contains(a) {
                    e.push(format!("listen.tls.addrs[{i}]: {a} is also in listen.tcp"));
                }
            }
            positive("listen.tls.handshake_timeout", tls.handshake_timeout, e);
            if let Err(err) = crate::listener::tls_acceptor(tls) {
                e.push(format!("listen.tls: {err}"));
            }
        }
    }

    fn validate_acl(&self, e: &mut Vec<String>) {
        let a = &self.acl;
        if a.allow.is_empty() {
            e.push("acl.allow: empty, so every client would be refused".into());
        }
        if a.rate_limit_qps > 0 {
            if a.rate_limit_burst == 0 {
                e.push("acl.rate_limit_burst: must be at least 1".into());
            }
            if a.rate_limit_clients == 0 {
                e.push("acl.rate_limit_clients: must be at least 1".into());
            }
        }
    }

    fn validate_domains(&self, e: &mut Vec<String>) {
        let d = &self.domains;
        for (i, n) in d.names.iter().enumerate() {
            if let Err(err) = crate::policy::check_pattern(n) {
                e.push(format!("domains.names[{i}]: {err}"));
            }
        }
        if d.mode == DomainMode::Allow && d.names.is_empty() {
            e.push("domains.names: empty in allow mode, so every name would be refused".into());
        }
    }

    fn validate_cache(&self, e: &mut Vec<String>) {
        let c = &self.cache;
        let day_max = Duration::from_secs(u64::from(u32::MAX / 2));
        if c.min_ttl > c.max_ttl {
            e.push(format!(
                "cache.min_ttl: {} exceeds cache.max_ttl {}",
                humantime::format_duration(c.min_ttl),
                humantime::format_duration(c.max_ttl)
            ));
        }
        for (key, d) in [
            ("cache.min_ttl", c.min_ttl),
            ("cache.max_ttl", c.max_ttl),
            ("cache.negative_max_ttl", c.negative_max_ttl),
        ] {
            if d > day_max {
                e.push(format!("{key}: longer than 2^31 seconds (RFC 2181 §8)"));
            }
        }
    }

    fn validate_authorize(&self, e: &mut Vec<String>) {
        let a = &self.authorize;
        if !a.socket.is_absolute() {
            e.push(format!(
                "authorize.socket: {:?} must be an absolute path",
                a.socket
            ));
        }
        positive("authorize.timeout", a.timeout, e);
        if a.timeout > Duration::from_secs(30) {
            e.push("authorize.timeout: longer than 30s; clients give up well before".into());
        }
        if !(1..=MAX_BATCH_LIMIT).contains(&a.max_batch) {
            e.push(format!(
                "authorize.max_batch: {} is outside 1..={MAX_BATCH_LIMIT} (and must be at most fwd's limits.max_batch)",
                a.max_batch
            ));
        }
        if a.refresh_margin > Duration::from_secs(3600) {
            e.push("authorize.refresh_margin: longer than 1h".into());
        }
    }
}

fn positive(key: &str, d: Duration, e: &mut Vec<String>) {
    if d.is_zero() {
        e.push(format!("{key}: must be greater than zero"));
    }
}

fn dup_addrs(key: &str, addrs: &[SocketAddr], e: &mut Vec<String>) {
    for (i, a) in addrs.iter().enumerate() {
        if addrs[..i].contains(a) {
            e.push(format!("{key}[{i}]: duplicate address {a}"));
        }
    }
}

impl fmt::Display for OnFwdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnFwdError::Servfail => "servfail",
            OnFwdError::Answer => "answer",
        })
    }
}

/// Durations as humantime strings ("2s", "1500ms", "1h 30m").
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

    const MINIMAL: &str = r#"
        [upstream]
        servers = ["udp://127.0.0.1:5300"]
    "#;

    #[test]
    fn minimal_config_has_documented_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert!(!c.log_queries);
        assert_eq!(c.threads, 0, "one worker per CPU");
        assert_eq!(c.listen.udp, vec!["127.0.0.1:53".parse().unwrap()]);
        assert_eq!(c.listen.tcp_idle_timeout, Duration::from_secs(10));
        assert_eq!(c.acl.allow.len(), 2);
        assert_eq!(c.acl.allow[0].to_string(), "127.0.0.0/8");
        assert_eq!(c.authorize.on_fwd_error, OnFwdError::Servfail);
        assert_eq!(c.authorize.socket, PathBuf::from("/run/guard/fwd.sock"));
        assert_eq!(c.authorize.max_batch, 256, "fwd's default limits.max_batch");
        assert_eq!(c.cache.size, 10_000);
        assert!(c.metrics.listen.is_none());
        assert!(c.control.enabled);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::parse(&format!("{MINIMAL}\n[cache]\nsise = 3\n")).unwrap_err();
        assert!(err.to_string().contains("sise"), "{err}");
        let err = Config::parse(&format!("bogus = 1\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn validation_lists_every_problem_with_its_path() {
        let text = r#"
            threads = 5000
            [listen]
            udp = ["127.0.0.1:53", "127.0.0.1:53"]
            tcp_idle_timeout = "0s"
            tcp_max_connections = 0
            udp_payload = 100
            [listen.tls]
            cert = "/nonexistent/cert.pem"
            key = "/nonexistent/key.pem"
            addrs = ["127.0.0.1:53"]
            [acl]
            allow = []
            [domains]
            mode = "allow"
            names = ["ok.example", "bad..example", "*x.example"]
            [cache]
            min_ttl = "2h"
            max_ttl = "1h"
            [authorize]
            socket = "relative.sock"
            timeout = "0s"
            max_batch = 0
            [control]
            socket = "dnsd.sock"
            [upstream]
            servers = []
        "#;
        let c = Config::parse(text).unwrap();
        let errors = c.validate();
        let expect = [
            "threads: 5000 is over 1024",
            "listen.udp[1]: duplicate address",
            "listen.tcp_idle_timeout: must be greater than zero",
            "listen.tcp_max_connections",
            "listen.udp_payload",
            "listen.tls.addrs[0]: 127.0.0.1:53 is also in listen.tcp",
            "listen.tls: ",
            "acl.allow",
            "domains.names[1]",
            "domains.names[2]",
            "cache.min_ttl",
            "authorize.socket",
            "authorize.timeout",
            "authorize.max_batch",
            "control.socket",
            "upstream.servers",
        ];
        for want in expect {
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "missing {want:?} in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expect.len(), "{errors:#?}");
    }

    #[test]
    fn load_reports_read_parse_and_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        assert!(matches!(
            Config::load(&missing),
            Err(ConfigError::Read { .. })
        ));
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[listen\n").unwrap();
        assert!(matches!(Config::load(&bad), Err(ConfigError::Parse { .. })));
        let invalid = dir.path().join("invalid.toml");
        std::fs::write(&invalid, "[upstream]\nservers = []\n[acl]\nallow = []\n").unwrap();
        match Config::load(&invalid) {
            Err(ConfigError::Invalid { errors, .. }) => assert_eq!(errors.len(), 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../dnsd.example.toml");
        let c = Config::parse(text).unwrap();
        let errors: Vec<String> = c
            .validate()
            .into_iter()
            .filter(|e| !e.starts_with("listen.tls:"))
            .collect();
        assert!(errors.is_empty(), "{errors:#?}");
    }
}
