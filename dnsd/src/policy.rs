//! Who may ask and what may be asked: the client ACL, per-client token-bucket rate limits, and the optional domain allow/deny list.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::rr::Name;
use ipnet::IpNet;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::{AclAction, AclConfig, DomainAction, DomainMode, DomainPolicyConfig};

// === impl Acl ===

/// What to do with a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it.
    Allow,
    /// Answer REFUSED.
    Refuse,
    /// Send nothing.
    Drop,
}

/// The client allow list.
#[derive(Debug, Clone)]
pub struct Acl {
    allow: Vec<IpNet>,
    action: AclAction,
}

impl Acl {
    /// Builds the ACL from validated config.
    pub fn new(cfg: &AclConfig) -> Self {
        Acl {
            allow: cfg.allow.clone(),
            action: cfg.action,
        }
    }

    /// Checks a client address. IPv4-mapped IPv6 sources (dual-stack sockets) are checked as
    /// the IPv4 address they carry, so `127.0.0.0/8` also admits `::ffff:127.0.0.1`.
    pub fn check(&self, client: IpAddr) -> Verdict {
        let canonical = client.to_canonical();
        if self
            .allow
            .iter()
            .any(|n| n.contains(&canonical) || n.contains(&client))
        {
            return Verdict::Allow;
        }
        match self.action {
            AclAction::Refused => Verdict::Refuse,
            AclAction::Drop => Verdict::Drop,
        }
    }
}

// === impl RateLimiter ===

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Per-client token buckets in a bounded table.
///
/// IPv6 clients are bucketed per /64, since one host can use a whole /64. When the table is
/// full, buckets that have refilled completely (idle clients: forgetting them changes nothing)
/// are purged; if that frees nothing the table is cleared, so spoofed sources can never lock
/// new clients out, at worst they reset everyone's budget.
#[derive(Debug)]
pub struct RateLimiter {
    qps: f64,
    burst: f64,
    max_clients: usize,
    table: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    /// A limiter allowing `qps` queries per second with bursts of `burst`; `qps == 0` disables it.
    pub fn new(qps: u32, burst: u32, max_clients: usize) -> Self {
        RateLimiter {
            qps: f64::from(qps),
            burst: f64::from(burst.max(1)),
            max_clients: max_clients.max(1),
            table: Mutex::new(HashMap::new()),
        }
    }

    fn bucket_key(client: IpAddr) -> IpAddr {
        match client.to_canonical() {
            IpAddr::V4(v4) => IpAddr::V4(v4),
            IpAddr::V6(v6) => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::from(o)
            }
        }
    }

    /// Takes one token for `client`; false when the client is over its rate.
    pub fn allow(&self, client: IpAddr) -> bool {
        if self.qps <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let key = Self::bucket_key(client);
        let mut table = self.table.lock();
        if !table.contains_key(&key) && table.len() >= self.max_clients {
            let full_after = Duration::from_secs_f64(self.burst / self.qps);
            table.retain(|_, b| now.saturating_duration_since(b.last) < full_after);
            if table.len() >= self.max_clients {
                table.clear();
            }
        }
        let b = table.entry(key).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.qps).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How many clients have a bucket.
    pub fn clients(&self) -> usize {
        self.table.lock().len()
    }
}

// === impl DomainPolicy ===

/// The optional domain allow or deny list.
///
/// `example.com` matches that name only; `*.example.com` matches every name strictly below
/// it (not `example.com` itself). Matching is case-insensitive and ignores the trailing dot.
#[derive(Debug, Clone)]
pub struct DomainPolicy {
    mode: DomainMode,
    action: DomainAction,
    exact: HashSet<String>,
    suffixes: HashSet<String>,
}

/// Normalizes a configured pattern or a query name: lowercase, no trailing dot.
fn normalize(s: &str) -> String {
    s.trim_end_matches('.').to_ascii_lowercase()
}

/// Checks one configured pattern; returns why it is bad.
pub fn check_pattern(p: &str) -> Result<(), String> {
    let body = p.strip_prefix("*.").unwrap_or(p);
    let body = body.strip_suffix('.').unwrap_or(body);
    if body.is_empty() {
        return Err(format!("{p:?}: empty name"));
    }
    if body.len() > 253 {
        return Err(format!("{p:?}: longer than 253 characters"));
    }
    for label in body.split('.') {
        if label.is_empty() {
            return Err(format!("{p:?}: empty label"));
        }
        if label.len() > 63 {
            return Err(format!("{p:?}: label longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "{p:?}: only letters, digits, '-' and '_' are allowed (write IDNs in punycode; '*' only as a leading \"*.\")"
            ));
        }
    }
    Ok(())
}

impl DomainPolicy {
    /// Builds the policy from validated config.
    pub fn new(cfg: &DomainPolicyConfig) -> Self {
        let mut exact = HashSet::new();
        let mut suffixes = HashSet::new();
        for p in &cfg.names {
            match p.strip_prefix("*.") {
                Some(s) => suffixes.insert(normalize(s)),
                None => exact.insert(normalize(p)),
            };
        }
        DomainPolicy {
            mode: cfg.mode,
            action: cfg.action,
            exact,
            suffixes,
        }
    }

    fn matches(&self, name: &str) -> bool {
        if self.exact.contains(name) {
            return true;
        }
        let mut rest = name;
        while let Some((_, parent)) = rest.split_once('.') {
            if self.suffixes.contains(parent) {
                return true;
            }
            rest = parent;
        }
        false
    }

    /// Whether a query for `name` may be forwarded.
    pub fn permits(&self, name: &Name) -> bool {
        match self.mode {
            DomainMode::Off => true,
            DomainMode::Allow => self.matches(&normalize(&name.to_ascii())),
            DomainMode::Deny => !self.matches(&normalize(&name.to_ascii())),
        }
    }

    /// What a name outside the policy gets.
    pub fn action(&self) -> DomainAction {
        self.action
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn policy(mode: DomainMode, names: &[&str]) -> DomainPolicy {
        DomainPolicy::new(&DomainPolicyConfig {
            mode,
            action: DomainAction::Nxdomain,
            names: names.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    #[test]
    fn suffix_and_exact_matching() {
        let p = policy(DomainMode::Allow, &["example.com", "*.Example.ORG."]);
        assert!(p.permits(&name("example.com.")));
        assert!(p.permits(&name("EXAMPLE.com")));
        assert!(
            !p.permits(&name("www.example.com.")),
            "exact does not cover subdomains"
        );
        assert!(p.permits(&name("www.example.org.")));
        assert!(p.permits(&name("a.b.c.example.org.")));
        assert!(
            !p.permits(&name("example.org.")),
            "*. matches strictly below"
        );
        assert!(
            !p.permits(&name("badexample.org.")),
            "label boundary respected"
        );
        assert!(!p.permits(&name("example.org.evil.")));
        assert!(!p.permits(&name(".")));
    }

    #[test]
    fn deny_mode_and_off() {
        let p = policy(DomainMode::Deny, &["*.ads.example"]);
        assert!(!p.permits(&name("x.ads.example.")));
        assert!(p.permits(&name("ads.example.")));
        assert!(p.permits(&name("news.example.")));
        let off = policy(DomainMode::Off, &["*.example"]);
        assert!(off.permits(&name("x.example.")));
    }

    #[test]
    fn pattern_validation() {
        for ok in [
            "example.com",
            "*.example.com",
            "example.com.",
            "_dmarc.x-y.example",
        ] {
            assert!(check_pattern(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "*.",
            "a..b",
            "exa mple.com",
            "*x.example",
            "a.*.example",
            "*",
        ] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
        assert!(check_pattern(&"a".repeat(64)).is_err());
    }

    #[test]
    fn acl() {
        let acl = Acl::new(&AclConfig {
            allow: vec![
                "127.0.0.0/8".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            action: AclAction::Refused,
            ..AclConfig::default()
        });
        assert_eq!(acl.check("127.0.0.1".parse().unwrap()), Verdict::Allow);
        assert_eq!(
            acl.check("::ffff:127.0.0.1".parse().unwrap()),
            Verdict::Allow
        );
        assert_eq!(acl.check("2001:db8::5".parse().unwrap()), Verdict::Allow);
        assert_eq!(acl.check("192.0.2.1".parse().unwrap()), Verdict::Refuse);
        let drop = Acl::new(&AclConfig {
            allow: vec![],
            action: AclAction::Drop,
            ..AclConfig::default()
        });
        assert_eq!(drop.check("127.0.0.1".parse().unwrap()), Verdict::Drop);
    }

    #[tokio::test(start_paused = true)]
    async fn token_bucket() {
        let rl = RateLimiter::new(10, 5, 100);
        let c: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..5 {
            assert!(rl.allow(c));
        }
        assert!(!rl.allow(c), "burst exhausted");
        // Another client has its own bucket.
        assert!(rl.allow("192.0.2.2".parse().unwrap()));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(rl.allow(c), "one token refilled after 1/qps");
        assert!(!rl.allow(c));
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..5 {
            assert!(rl.allow(c));
        }
        assert!(!rl.allow(c), "refill capped at burst");
        // Disabled limiter always allows.
        let off = RateLimiter::new(0, 0, 1);
        for _ in 0..1000 {
            assert!(off.allow(c));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_clients_share_a_64() {
        let rl = RateLimiter::new(1, 1, 100);
        assert!(rl.allow("2001:db8:1:2::1".parse().unwrap()));
        assert!(!rl.allow("2001:db8:1:2::ffff".parse().unwrap()));
        assert!(rl.allow("2001:db8:1:3::1".parse().unwrap()));
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_table_is_bounded() {
        let rl = RateLimiter::new(1, 1, 4);
        for i in 0..100u8 {
            rl.allow(IpAddr::from([10, 0, 0, i]));
            assert!(rl.clients() <= 4);
        }
        // Idle (refilled) buckets are purged first, without clearing active ones.
        tokio::time::advance(Duration::from_secs(5)).await;
        let busy: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(rl.allow(busy));
        for i in 0..3u8 {
            rl.allow(IpAddr::from([10, 1, 0, i]));
        }
        assert!(!rl.allow(busy), "active bucket survived the purge");
    }
}
