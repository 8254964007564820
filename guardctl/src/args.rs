//! Client-side validation of command-line values (addresses, CIDRs, durations, names).
//!
//! fwd and dnsd are the authority and re-validate everything; checking here only turns a typo
//! into a clear usage error (exit 2) instead of a round trip.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// An address or CIDR as given on the command line, validated and put in canonical text form
/// (a bare address stays bare, so fwd sees what the user meant).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    text: String,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        const EXAMPLES: &str = "expected an address or CIDR such as 192.0.2.7, \
                                192.0.2.0/24 or 2001:db8::/48";
        let Some((addr, prefix)) = s.split_once('/') else {
            let ip: IpAddr = s
                .parse()
                .map_err(|_| format!("'{s}' is not an IP address ({EXAMPLES})"))?;
            return Ok(Target {
                text: ip.to_string(),
            });
        };
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| format!("'{addr}' in '{s}' is not an IP address ({EXAMPLES})"))?;
        let max = match ip {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let len: u8 = prefix
            .parse()
            .map_err(|_| format!("prefix length '/{prefix}' in '{s}' is not a number"))?;
        let net = IpNet::new(ip, len).map_err(|_| {
            let family = if max == 32 { "IPv4" } else { "IPv6" };
            format!("prefix length /{len} is too long for an {family} address (at most /{max})")
        })?;
        if net.network() != ip {
            return Err(format!(
                "'{s}' has host bits set; the network is {}",
                net.trunc()
            ));
        }
        Ok(Target {
            text: net.to_string(),
        })
    }
}

/// Parses a duration such as `30s`, `5m`, `1h` or `2d` into whole seconds (at least one).
pub fn seconds(s: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration ({e}; expected e.g. 30s, 5m, 1h, 2d)"))?;
    if d.subsec_nanos() != 0 {
        return Err(format!("'{s}' is not a whole number of seconds"));
    }
    if d.as_secs() == 0 {
        return Err("the duration must be at least 1s".to_owned());
    }
    Ok(d.as_secs())
}

/// Accepts a DNS name for filters and cache flushes: non-empty, at most 253 characters of
/// printable text. Case is left alone; the daemons compare case-insensitively.
pub fn name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the name must not be empty".to_owned());
    }
    if s.len() > 254 {
        return Err(format!("'{s}' is longer than a DNS name can be"));
    }
    if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "'{}' contains whitespace or control characters",
            s.escape_debug()
        ));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn target(s: &str) -> Result<String, String> {
        s.parse::<Target>().map(|t| t.to_string())
    }

    #[test]
    fn targets_accept_addresses_and_networks() {
        assert_eq!(target("192.0.2.7").unwrap(), "192.0.2.7");
        assert_eq!(target("192.0.2.0/24").unwrap(), "192.0.2.0/24");
        assert_eq!(target("192.0.2.7/32").unwrap(), "192.0.2.7/32");
        assert_eq!(target("0.0.0.0/0").unwrap(), "0.0.0.0/0");
        assert_eq!(target("2001:DB8::1").unwrap(), "2001:db8::1");
        assert_eq!(target("2001:db8::/48").unwrap(), "2001:db8::/48");
    }

    #[test]
    fn bad_cidrs_get_clear_errors() {
        let e = target("example.com").unwrap_err();
        assert!(e.contains("'example.com' is not an IP address"), "{e}");
        let e = target("300.1.2.3").unwrap_err();
        assert!(e.contains("is not an IP address"), "{e}");
        let e = target("192.0.2.0/33").unwrap_err();
        assert!(
            e.contains("too long for an IPv4 address (at most /32)"),
            "{e}"
        );
        let e = target("2001:db8::/129").unwrap_err();
        assert!(e.contains("at most /128"), "{e}");
        let e = target("192.0.2.0/x").unwrap_err();
        assert!(e.contains("is not a number"), "{e}");
        let e = target("192.0.2.1/24").unwrap_err();
        assert_eq!(
            e,
            "'192.0.2.1/24' has host bits set; the network is 192.0.2.0/24"
        );
        assert!(target("").is_err());
        assert!(target("/24").is_err());
        assert!(target("fe80::1%eth0").is_err());
        assert!(target("192.0.2.0/-1").is_err());
    }

    #[test]
    fn durations_are_whole_positive_seconds() {
        assert_eq!(seconds("30s"), Ok(30));
        assert_eq!(seconds("5m"), Ok(300));
        assert_eq!(seconds("1h"), Ok(3600));
        assert_eq!(seconds("2d"), Ok(172_800));
        assert_eq!(seconds("1h 30m"), Ok(5400));
        let e = seconds("30").unwrap_err();
        assert!(e.contains("is not a duration"), "{e}");
        assert!(seconds("5x").unwrap_err().contains("expected e.g. 30s"));
        assert!(
            seconds("1500ms")
                .unwrap_err()
                .contains("whole number of seconds")
        );
        assert!(seconds("0s").unwrap_err().contains("at least 1s"));
        assert!(seconds("-5m").is_err());
        assert!(seconds("").is_err());
    }

    #[test]
    fn names() {
        assert_eq!(name("Example.COM"), Ok("Example.COM".to_owned()));
        assert!(name("").is_err());
        assert!(name("a b").is_err());
        assert!(name("a\u{1b}b").is_err());
        assert!(name(&"a".repeat(300)).is_err());
    }
}
