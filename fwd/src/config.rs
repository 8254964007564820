//! fwd's TOML configuration: parsing, defaults, and validation that reports every problem at once.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// Everything that can be wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax or type errors, unknown keys.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What serde/toml said, with the key path.
        message: String,
    },
    /// Semantically invalid values; every problem is listed.
    #[error("invalid config {path}:\n  {}", problems.join("\n  "))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// One line per problem, each starting with its key path.
        problems: Vec<String>,
    },
}

/// Which netfilter hook guard filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Filter this host's own new outbound connections (output hook).
    #[default]
    Local,
    /// Filter traffic routed for LAN clients (forward hook).
    Gateway,
}

impl Mode {
    /// Text form.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Local => "local",
            Mode::Gateway => "gateway",
        }
    }
}

/// What happens to a new connection nothing allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// TCP reset / ICMP admin-prohibited: clients fail fast.
    #[default]
    Reject,
    /// Silently dropped.
    Drop,
    /// Logged and accepted: for rollout only.
    Audit,
}

impl Policy {
    /// Text form.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Reject => "reject",
            Policy::Drop => "drop",
            Policy::Audit => "audit",
        }
    }
}

/// A humantime duration in the TOML file ("90s", "5m", "1d").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
    }
}

/// The whole fwd configuration. See `fwd.example.toml` for a commented copy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// local (output hook) or gateway (forward hook).
    #[serde(default)]
    pub mode: Mode,
    /// reject, drop or audit for traffic nothing allows.
    #[serde(default)]
    pub policy: Policy,
    /// Gateway only: grants are scoped to the resolving client.
    #[serde(default)]
    pub per_client: bool,
    /// nftables table (family inet) that fwd owns.
    #[serde(default = "default_table")]
    pub table: String,
    /// Unix socket of the Firewall gRPC service.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Group owning the socket; empty keeps the process group.
    #[serde(default)]
    pub socket_group: String,
    /// Octal permission bits of the socket.
    #[serde(default = "default_socket_mode")]
    pub socket_mode: String,
    /// SQLite database of grants and audit history.
    #[serde(default = "default_database")]
    pub database: PathBuf,
    /// User to drop to when started as root; empty stays root with only CAP_NET_ADMIN.
    #[serde(default)]
    pub user: String,
    /// TTL clamps and margin.
    #[serde(default)]
    pub ttl: TtlConfig,
    /// Size limits.
    #[serde(default)]
    pub limits: Limits,
    /// Who may call what.
    #[serde(default)]
    pub access: Access,
    /// Static allowances.
    #[serde(default)]
    pub allow: Allow,
    /// Addresses that are never authorized.
    #[serde(default)]
    pub never: Never,
    /// Expiry bookkeeping and renewal.
    #[serde(default)]
    pub expiry: Expiry,
}

fn default_table() -> String {
    "guard".into()
}
fn default_socket() -> PathBuf {
    "/run/guard/fwd.sock".into()
}
fn default_socket_mode() -> String {
    "0660".into()
}
fn default_database() -> PathBuf {
    "/var/lib/guard/fwd.db".into()
}

/// TTL clamps: a grant lasts clamp(ttl, min, max) + margin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtlConfig {
    /// Lower clamp; protects apps that reuse addresses after the TTL, and TTL=1 answers.
    #[serde(default = "default_min_ttl")]
    pub min: Dur,
    /// Upper clamp; bounds how long one answer keeps an address open.
    #[serde(default = "default_max_ttl")]
    pub max: Dur,
    /// Added to the clamped TTL so the grant outlives the answer.
    #[serde(default = "default_margin")]
    pub margin: Dur,
}

fn default_min_ttl() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_max_ttl() -> Dur {
    Dur(Duration::from_secs(86_400))
}
fn default_margin() -> Dur {
    Dur(Duration::from_secs(30))
}

impl Default for TtlConfig {
    fn default() -> Self {
        TtlConfig {
            min: default_min_ttl(),
            max: default_max_ttl(),
            margin: default_margin(),
        }
    }
}

/// Size limits on untrusted input and state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Maximum grants per Authorize call.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Maximum live DNS grants.
    #[serde(default = "default_max_grants")]
    pub max_grants: usize,
    /// Audit retention; zero keeps events forever.
    #[serde(default = "default_retention")]
    pub audit_retention: Dur,
}

fn default_max_batch() -> usize {
    256
}
fn default_max_grants() -> usize {
    2_000_000
}
fn default_retention() -> Dur {
    Dur(Duration::from_secs(90 * 86_400))
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_batch: default_max_batch(),
            max_grants: default_max_grants(),
            audit_retention: default_retention(),
        }
    }
}

/// Role assignment from SO_PEERCRED.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// uids allowed to Authorize (dnsd).
    #[serde(default)]
    pub authorizer_uids: Vec<u32>,
    /// User names allowed to Authorize, resolved at start-up.
    #[serde(default)]
    pub authorizer_users: Vec<String>,
    /// Members may Allow/Revoke; root always may.
    #[serde(default)]
    pub admin_group: String,
    /// Members may List/History/Status; empty lets anyone who can open the socket read.
    #[serde(default)]
    pub reader_group: String,
}

/// Static allowances, set up with the ruleset.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allow {
    /// Destinations always allowed.
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// dnsd's upstream resolvers as IP:PORT (TCP and UDP).
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// DHCPv4/DHCPv6 client traffic.
    #[serde(default = "yes")]
    pub dhcp: bool,
    /// ICMPv6 neighbour and router discovery (and MLD reports they need).
    #[serde(default = "yes")]
    pub ndp: bool,
    /// ICMP/ICMPv6 error messages.
    #[serde(default = "yes")]
    pub icmp_errors: bool,
}

fn yes() -> bool {
    true
}

impl Default for Allow {
    fn default() -> Self {
        Allow {
            cidrs: Vec::new(),
            upstreams: Vec::new(),
            dhcp: true,
            ndp: true,
            icmp_errors: true,
        }
    }
}

/// Never-authorize ranges, on top of the built-in special ranges.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Never {
    /// CIDRs no DNS answer or manual allow may open.
    #[serde(default = "default_never")]
    pub cidrs: Vec<String>,
}

fn default_never() -> Vec<String> {
    vec!["169.254.0.0/16".into(), "fe80::/10".into()]
}

impl Default for Never {
    fn default() -> Self {
        Never {
            cidrs: default_never(),
        }
    }
}

/// Expiry bookkeeping.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expiry {
    /// How often kernel expiries are recorded.
    #[serde(default = "default_sweep")]
    pub sweep_interval: Dur,
    /// Renew grants that still carry live conntrack flows.
    #[serde(default)]
    pub renew_live_flows: bool,
    /// Length of such a renewal.
    #[serde(default = "default_renew_ttl")]
    pub renew_ttl: Dur,
    /// Conntrack entries read per sweep at most.
    #[serde(default = "default_renew_max")]
    pub renew_max_flows: usize,
}

fn default_sweep() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_renew_ttl() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_renew_max() -> usize {
    100_000
}

impl Default for Expiry {
    fn default() -> Self {
        Expiry {
            sweep_interval: default_sweep(),
            renew_live_flows: false,
            renew_ttl: default_renew_ttl(),
            renew_max_flows: default_renew_max(),
        }
    }
}

/// The validated, typed form that the daemon runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The raw config (for paths, names and flags).
    pub raw: Config,
    /// Parsed static allow CIDRs.
    pub allow: Vec<IpNet>,
    /// Parsed upstream resolver addresses.
    pub upstreams: Vec<SocketAddr>,
    /// Parsed never-authorize CIDRs (configured, not the built-in ones).
    pub never: Vec<IpNet>,
    /// Socket permission bits.
    pub socket_mode: u32,
    /// Resolved authorizer uids.
    pub authorizers: BTreeSet<u32>,
    /// Resolved admin gid.
    pub admin_gid: Option<u32>,
    /// Resolved reader gid.
    pub reader_gid: Option<u32>,
    /// Resolved socket gid.
    pub socket_gid: Option<u32>,
}

/// Largest TTL the kernel timeout arithmetic comfortably holds (about 49 days of ms in u32 jiffies
/// on some kernels); we refuse configs above it rather than let nft clamp silently.
const MAX_TTL_CAP: Duration = Duration::from_secs(30 * 86_400);

impl Config {
    /// Reads and parses `path`. Unknown keys are errors.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses TOML text (path only for messages).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Checks every value and resolves names; lists every problem at once.
    pub fn validate(self, path: &Path) -> Result<Settings, ConfigError> {
        let mut p = Vec::new();
        if self.table.is_empty()
            || self.table.len() > 64
            || !self
                .table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            p.push(format!(
                "table: {:?} must be 1-64 characters of [A-Za-z0-9_-]",
                self.table
            ));
        }
        if self.per_client && self.mode != Mode::Gateway {
            p.push("per_client: only meaningful with mode = \"gateway\"".into());
        }
        if self.socket.as_os_str().is_empty() {
            p.push("socket: must not be empty".into());
        }
        if self.database.as_os_str().is_empty() {
            p.push("database: must not be empty".into());
        }
        let socket_mode = match u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8) {
            Ok(m) if m <= 0o777 => m,
            _ => {
                p.push(format!(
                    "socket_mode: {:?} is not an octal mode like \"0660\"",
                    self.socket_mode
                ));
                0o660
            }
        };
        let (min, max, margin) = (self.ttl.min.0, self.ttl.max.0, self.ttl.margin.0);
        if min.is_zero() {
            p.push("ttl.min: must be at least 1s".into());
        }
        if min > max {
            p.push(format!(
                "ttl.min ({}) exceeds ttl.max ({})",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ));
        }
        if max > MAX_TTL_CAP {
            p.push(format!(
                "ttl.max: {} exceeds the 30d cap",
                humantime::format_duration(max)
            ));
        }
        if margin > MAX_TTL_CAP {
            p.push("ttl.margin: exceeds the 30d cap".into());
        }
        if self.limits.max_batch == 0 || self.limits.max_batch > 65_536 {
            p.push(format!(
                "limits.max_batch: {} must be in 1..=65536",
                self.limits.max_batch
            ));
        }
        if self.limits.max_grants == 0 {
            p.push("limits.max_grants: must be positive".into());
        }
        if self.expiry.sweep_interval.0 < Duration::from_millis(100)
            || self.expiry.sweep_interval.0 > Duration::from_secs(3600)
        {
            p.push("expiry.sweep_interval: must be between 100ms and 1h".into());
        }
        if self.expiry.renew_ttl.0.is_zero() || self.expiry.renew_ttl.0 > MAX_TTL_CAP {
            p.push("expiry.renew_ttl: must be between 1s and 30d".into());
        }
        let allow = parse_cidrs("allow.cidrs", &self.allow.cidrs, &mut p);
        for (i, n) in &allow {
            if n.prefix_len() == 0 {
                p.push(format!(
                    "allow.cidrs[{i}]: {n} allows everything; use policy = \"audit\" instead"
                ));
            }
        }
        let never = parse_cidrs("never.cidrs", &self.never.cidrs, &mut p);
        let mut upstreams = Vec::new();
        for (i, u) in self.allow.upstreams.iter().enumerate() {
            match u.parse::<SocketAddr>() {
                Ok(sa) if sa.port() != 0 => upstreams.push(sa),
                _ => p.push(format!(
                    "allow.upstreams[{i}]: {u:?} is not IP:PORT (e.g. \"192.0.2.53:853\" or \"[2001:db8::53]:853\")"
                )),
            }
        }
        let mut authorizers: BTreeSet<u32> = self.access.authorizer_uids.iter().copied().collect();
        for (i, name) in self.access.authorizer_users.iter().enumerate() {
            match nix::unistd::User::from_name(name) {
                Ok(Some(u)) => {
                    authorizers.insert(u.uid.as_raw());
                }
                _ => p.push(format!(
                    "access.authorizer_users[{i}]: no such user {name:?}"
                )),
            }
        }
        let admin_gid = resolve_group("access.admin_group", &self.access.admin_group, &mut p);
        let reader_gid = resolve_group("access.reader_group", &self.access.reader_group, &mut p);
        let socket_gid = resolve_group("socket_group", &self.socket_group, &mut p);
        if !self.user.is_empty() && !matches!(nix::unistd::User::from_name(&self.user), Ok(Some(_)))
        {
            p.push(format!("user: no such user {:?}", self.user));
        }
        if !p.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems: p,
            });
        }
        Ok(Settings {
            raw: self,
            allow: allow.into_iter().map(|(_, n)| n).collect(),
            upstreams,
            never: never.into_iter().map(|(_, n)| n).collect(),
            socket_mode,
            authorizers,
            admin_gid,
            reader_gid,
            socket_gid,
        })
    }
}

fn parse_cidrs(key: &str, items: &[String], p: &mut Vec<String>) -> Vec<(usize, IpNet)> {
    let mut out = Vec::new();
    for (i, s) in items.iter().enumerate() {
        match parse_net(s) {
            Some(n) => out.push((i, n)),
            None => p.push(format!("{key}[{i}]: {s:?} is not an address or CIDR")),
        }
    }
    out
}

/// Parses "192.0.2.0/24", "2001:db8::/32" or a bare address (a host route). Host bits set
/// in a CIDR are refused: "192.0.2.1/24" is almost always a typo.
pub fn parse_net(s: &str) -> Option<IpNet> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(IpNet::from(ip));
    }
    let n: IpNet = s.parse().ok()?;
    (n.trunc() == n).then_some(n)
}

fn resolve_group(key: &str, name: &str, p: &mut Vec<String>) -> Option<u32> {
    if name.is_empty() {
        return None;
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Some(g.gid.as_raw()),
        _ => {
            p.push(format!("{key}: no such group {name:?}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Settings, ConfigError> {
        let path = Path::new("test.toml");
        Config::parse(path, text)?.validate(path)
    }

    #[test]
    fn empty_config_gets_defaults() {
        let s = load("").unwrap();
        assert_eq!(s.raw.mode, Mode::Local);
        assert_eq!(s.raw.policy, Policy::Reject);
        assert_eq!(s.raw.table, "guard");
        assert_eq!(s.socket_mode, 0o660);
        assert_eq!(s.raw.ttl.min.0, Duration::from_secs(60));
        assert_eq!(s.never.len(), 2);
    }

    #[test]
    fn example_file_is_valid() {
        let text = include_str!("../fwd.example.toml");
        load(text).unwrap();
    }

    #[test]
    fn unknown_key_is_an_error_with_its_name() {
        let e = load("[ttl]\nminimum = \"1s\"\n").unwrap_err().to_string();
        assert!(e.contains("minimum"), "{e}");
    }

    #[test]
    fn every_problem_is_listed() {
        let e = load(
            r#"
            table = "bad name"
            per_client = true
            socket_mode = "999"
            [ttl]
            min = "2h"
            max = "1h"
            [allow]
            cidrs = ["192.0.2.1/24", "nonsense", "0.0.0.0/0"]
            upstreams = ["192.0.2.53"]
            [access]
            admin_group = "no-such-group-xyz"
            "#,
        )
        .unwrap_err();
        let ConfigError::Invalid { problems, .. } = e else {
            panic!("expected Invalid, got {e}");
        };
        let all = problems.join("\n");
        for key in [
            "table:",
            "per_client:",
            "socket_mode:",
            "ttl.min",
            "allow.cidrs[0]",
            "allow.cidrs[1]",
            "allow.cidrs[2]",
            "allow.upstreams[0]",
            "access.admin_group",
        ] {
            assert!(all.contains(key), "missing {key} in:\n{all}");
        }
    }

    #[test]
    fn bad_duration_is_reported() {
        let e = load("[ttl]\nmax = \"forever\"\n").unwrap_err().to_string();
        assert!(e.contains("forever"), "{e}");
    }

    #[test]
    fn parse_net_refuses_host_bits() {
        assert!(parse_net("192.0.2.0/24").is_some());
        assert!(parse_net("192.0.2.1/24").is_none());
        assert_eq!(parse_net("192.0.2.1").unwrap().prefix_len(), 32);
        assert_eq!(parse_net("2001:db8::1").unwrap().prefix_len(), 128);
        assert!(parse_net("").is_none());
    }
}
