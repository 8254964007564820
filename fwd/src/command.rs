//! Untrusted RPC input turned into typed, validated commands: addresses checked, TTLs clamped, batch bounded.

use std::net::IpAddr;
use std::time::Duration;

use guard_proto::v1 as pb;
use ipnet::IpNet;

use crate::config::Settings;

/// Why one address in a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not 4 or 16 bytes.
    #[error("address must be 4 or 16 bytes, got {0}")]
    BadLength(usize),
    /// 0.0.0.0 or ::.
    #[error("unspecified address")]
    Unspecified,
    /// Multicast.
    #[error("multicast address")]
    Multicast,
    /// 255.255.255.255.
    #[error("broadcast address")]
    Broadcast,
    /// A reserved or otherwise special range that DNS must never open.
    #[error("special-purpose address ({0})")]
    Special(&'static str),
    /// Inside a configured never-authorize CIDR.
    #[error("inside never-authorize range {0}")]
    Never(IpNet),
    /// Family does not match the client's in per-client mode.
    #[error("address family differs from the client's")]
    FamilyMismatch,
    /// The live grant table is full.
    #[error("grant table full (limits.max_grants)")]
    Full,
    /// The kernel refused the element.
    #[error("kernel refused: {0}")]
    Kernel(String),
}

/// Checks that `ip` may ever be authorized: unicast, not special, not in `never`.
pub fn check_ip(ip: IpAddr, never: &[IpNet]) -> Result<IpAddr, Refusal> {
    // Treat v4-mapped v6 as the v4 address it carries, so ::ffff:224.0.0.1 cannot sneak past.
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    if ip.is_unspecified() {
        return Err(Refusal::Unspecified);
    }
    if ip.is_multicast() {
        return Err(Refusal::Multicast);
    }
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_broadcast() {
                return Err(Refusal::Broadcast);
            }
            let o = v4.octets();
            if o[0] == 0 {
                return Err(Refusal::Special("0.0.0.0/8 this-network"));
            }
            if o[0] >= 240 {
                return Err(Refusal::Special("240.0.0.0/4 reserved"));
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_loopback() {
                return Err(Refusal::Special("::1 loopback"));
            }
            if s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0 {
                return Err(Refusal::Special("::/96 v4-compatible"));
            }
        }
    }
    if let Some(n) = never.iter().find(|n| n.contains(&ip)) {
        return Err(Refusal::Never(*n));
    }
    Ok(ip)
}

/// Checks a manual CIDR: no /0, no overlap with special or never ranges.
pub fn check_net(net: IpNet, never: &[IpNet]) -> Result<IpNet, String> {
    if net.prefix_len() == 0 {
        return Err(format!(
            "{net} would allow everything; use policy = \"audit\""
        ));
    }
    check_ip(net.network(), never).map_err(|e| format!("{net}: {e}"))?;
    check_ip(net.broadcast(), never).map_err(|e| format!("{net}: {e}"))?;
    if let Some(n) = never.iter().find(|n| n.contains(&net) || net.contains(*n)) {
        return Err(format!("{net} overlaps never-authorize range {n}"));
    }
    Ok(net)
}

/// One address of an Authorize call after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Request position (replies keep request order).
    pub index: usize,
    /// The address as the caller sent it (for the reply).
    pub raw: Vec<u8>,
    /// Validated address, or why it was refused.
    pub ip: Result<IpAddr, Refusal>,
    /// TTL after clamping.
    pub ttl: Duration,
}

/// A validated Authorize call.
#[derive(Debug, Clone)]
pub struct Authorize {
    /// Addresses in request order.
    pub items: Vec<Item>,
    /// Query name, sanitized for storage.
    pub qname: Option<String>,
    /// Client scope (per-client mode only).
    pub client: Option<IpAddr>,
    /// Free-text reason, sanitized.
    pub reason: String,
}

/// Whole-call refusals (INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Too many grants in one call.
    #[error("batch of {got} grants exceeds limits.max_batch = {max}")]
    BatchTooLarge {
        /// Requested.
        got: usize,
        /// Allowed.
        max: usize,
    },
    /// No grants at all.
    #[error("empty batch")]
    Empty,
    /// per-client mode needs a valid client address.
    #[error("per-client mode requires a 4- or 16-byte client address")]
    ClientRequired,
}

/// Clamps a DNS TTL to [min, max]. Kept separate so the arithmetic is tested on its own.
pub fn clamp_ttl(ttl_s: u32, min: Duration, max: Duration) -> Duration {
    Duration::from_secs(u64::from(ttl_s)).clamp(min, max)
}

/// Bounds text from the caller before it reaches logs and the database.
pub fn sanitize(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// Normalizes a query name: lowercase, no trailing dot, bounded.
pub fn normalize_name(s: &str) -> Option<String> {
    let s = sanitize(s.trim_end_matches('.'), 253).to_ascii_lowercase();
    (!s.is_empty()).then_some(s)
}

impl Authorize {
    /// Validates an AuthorizeRequest against the settings.
    pub fn parse(req: &pb::AuthorizeRequest, s: &Settings) -> Result<Self, CallError> {
        let max = s.raw.limits.max_batch;
        if req.grants.len() > max {
            return Err(CallError::BatchTooLarge {
                got: req.grants.len(),
                max,
            });
        }
        if req.grants.is_empty() {
            return Err(CallError::Empty);
        }
        let client = if s.raw.per_client {
            Some(guard_proto::ip_from_bytes(&req.client).ok_or(CallError::ClientRequired)?)
        } else {
            None
        };
        let (min, maxttl) = (s.raw.ttl.min.0, s.raw.ttl.max.0);
        let items = req
            .grants
            .iter()
            .enumerate()
            .map(|(index, g)| {
                let ip = guard_proto::ip_from_bytes(&g.ip)
                    .ok_or(Refusal::BadLength(g.ip.len()))
                    .and_then(|ip| check_ip(ip, &s.never))
                    .and_then(|ip| match client {
                        Some(c) if c.is_ipv4() != ip.is_ipv4() => Err(Refusal::FamilyMismatch),
                        _ => Ok(ip),
                    });
                Item {
                    index,
                    raw: g.ip.clone(),
                    ip,
                    ttl: clamp_ttl(g.ttl_s, min, maxttl),
                }
            })
            .collect();
        Ok(Authorize {
            items,
            qname: normalize_name(&req.qname),
            client,
            reason: sanitize(&req.reason, 128),
        })
    }
}

/// Renders raw request bytes for the audit when they are not a valid address.
pub fn raw_text(raw: &[u8]) -> String {
    match guard_proto::ip_from_bytes(raw) {
        Some(ip) => ip.to_string(),
        None => format!(
            "0x{}",
            raw.iter()
                .take(32)
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn settings(extra: &str) -> Settings {
        Config::parse(Path::new("t"), extra)
            .unwrap()
            .validate(Path::new("t"))
            .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn special_addresses_are_refused() {
        let never: Vec<IpNet> = vec!["169.254.0.0/16".parse().unwrap()];
        for (a, want) in [
            ("0.0.0.0", Refusal::Unspecified),
            ("::", Refusal::Unspecified),
            ("224.0.0.1", Refusal::Multicast),
            ("ff02::1", Refusal::Multicast),
            ("255.255.255.255", Refusal::Broadcast),
            ("::ffff:224.0.0.1", Refusal::Multicast),
            ("::ffff:0.0.0.0", Refusal::Unspecified),
        ] {
            assert_eq!(check_ip(ip(a), &never), Err(want), "{a}");
        }
        assert!(matches!(
            check_ip(ip("240.1.2.3"), &never),
            Err(Refusal::Special(_))
        ));
        assert!(matches!(
            check_ip(ip("0.1.2.3"), &never),
            Err(Refusal::Special(_))
        ));
        assert!(matches!(
            check_ip(ip("::1"), &never),
            Err(Refusal::Special(_))
        ));
        assert!(matches!(
            check_ip(ip("169.254.169.254"), &never),
            Err(Refusal::Never(_))
        ));
        assert_eq!(check_ip(ip("192.0.2.1"), &never), Ok(ip("192.0.2.1")));
        assert_eq!(check_ip(ip("2001:db8::1"), &never), Ok(ip("2001:db8::1")));
        // v4-mapped unicast is normalized to plain v4.
        assert_eq!(
            check_ip(ip("::ffff:192.0.2.1"), &never),
            Ok(ip("192.0.2.1"))
        );
    }

    #[test]
    fn ttl_is_clamped_not_doubled() {
        let (min, max) = (Duration::from_secs(60), Duration::from_secs(3600));
        assert_eq!(clamp_ttl(0, min, max), min);
        assert_eq!(clamp_ttl(1, min, max), min);
        assert_eq!(clamp_ttl(300, min, max), Duration::from_secs(300));
        assert_eq!(clamp_ttl(u32::MAX, min, max), max);
    }

    #[test]
    fn oversized_and_empty_batches_are_refused_whole() {
        let s = settings("[limits]\nmax_batch = 2\n");
        let g = |b: &[u8]| pb::Grant {
            ip: b.to_vec(),
            ttl_s: 60,
        };
        let req = pb::AuthorizeRequest {
            grants: vec![g(&[192, 0, 2, 1]), g(&[192, 0, 2, 2]), g(&[192, 0, 2, 3])],
            ..Default::default()
        };
        assert_eq!(
            Authorize::parse(&req, &s).unwrap_err(),
            CallError::BatchTooLarge { got: 3, max: 2 }
        );
        let empty = pb::AuthorizeRequest::default();
        assert_eq!(Authorize::parse(&empty, &s).unwrap_err(), CallError::Empty);
    }

    #[test]
    fn items_keep_order_and_explain_refusals() {
        let s = settings("");
        let req = pb::AuthorizeRequest {
            grants: vec![
                pb::Grant {
                    ip: vec![192, 0, 2, 1],
                    ttl_s: 5,
                },
                pb::Grant {
                    ip: vec![1, 2, 3],
                    ttl_s: 5,
                },
                pb::Grant {
                    ip: vec![0; 16],
                    ttl_s: 999_999_999,
                },
            ],
            qname: "WWW.Example.COM.".into(),
            ..Default::default()
        };
        let a = Authorize::parse(&req, &s).unwrap();
        assert_eq!(a.qname.as_deref(), Some("www.example.com"));
        assert_eq!(a.items[0].ip, Ok(ip("192.0.2.1")));
        assert_eq!(a.items[0].ttl, Duration::from_secs(60));
        assert_eq!(a.items[1].ip, Err(Refusal::BadLength(3)));
        assert_eq!(a.items[2].ip, Err(Refusal::Unspecified));
        assert_eq!(a.items[2].ttl, Duration::from_secs(86_400));
    }

    #[test]
    fn per_client_needs_client_of_same_family() {
        let s = settings("mode = \"gateway\"\nper_client = true\n");
        let mut req = pb::AuthorizeRequest {
            grants: vec![pb::Grant {
                ip: ip_bytes("2001:db8::1"),
                ttl_s: 60,
            }],
            ..Default::default()
        };
        assert_eq!(
            Authorize::parse(&req, &s).unwrap_err(),
            CallError::ClientRequired
        );
        req.client = vec![198, 51, 100, 2];
        let a = Authorize::parse(&req, &s).unwrap();
        assert_eq!(a.items[0].ip, Err(Refusal::FamilyMismatch));
    }

    fn ip_bytes(s: &str) -> Vec<u8> {
        guard_proto::ip_to_bytes(ip(s))
    }

    #[test]
    fn manual_nets_are_checked() {
        let never: Vec<IpNet> = vec!["169.254.0.0/16".parse().unwrap()];
        assert!(check_net("0.0.0.0/0".parse().unwrap(), &never).is_err());
        assert!(check_net("169.0.0.0/8".parse().unwrap(), &never).is_err());
        assert!(check_net("224.0.0.0/4".parse().unwrap(), &never).is_err());
        assert!(check_net("192.0.2.0/24".parse().unwrap(), &never).is_ok());
    }

    #[test]
    fn sanitize_bounds_and_strips_controls() {
        assert_eq!(sanitize("a\nb", 10), "a?b");
        assert_eq!(sanitize("ééé", 3), "é");
        assert_eq!(raw_text(&[1, 2, 3]), "0x010203");
    }
}
