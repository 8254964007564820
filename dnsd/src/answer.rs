//! Answer analysis: the CNAME chain from the query name, the addresses on it, TTLs, and the edits dnsd makes before releasing an answer.
//!
//! Only addresses on the chain that starts at the query name are ever authorized: an upstream (or
//! an on-path attacker) can put any record in a message, and authorizing off-chain records would
//! let one lookup open arbitrary destinations (ipdestinationguard's bug). PTR and every other
//! qtype never authorize anything (nettrust's `dig -x` bug).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use ipnet::IpNet;

/// The longest CNAME chain dnsd follows; longer chains are treated as broken (SERVFAIL).
///
/// Resolvers give up near this depth as well (unbound: 11 restarts); it bounds the work an
/// answer can cause.
pub const MAX_CHAIN: usize = 16;

/// Whether two names are the same name, letter case aside: what `Name`'s `==` says (both
/// fully qualified or both not, the same labels up to ASCII case), in one pass from the first
/// label, without ordering them.
pub fn same_name(a: &Name, b: &Name) -> bool {
    if a.is_fqdn() != b.is_fqdn() {
        return false;
    }
    let (mut x, mut y) = (a.iter(), b.iter());
    loop {
        match (x.next(), y.next()) {
            (None, None) => return true,
            (Some(l), Some(r)) if l.eq_ignore_ascii_case(r) => {}
            _ => return false,
        }
    }
}

/// Why an answer's chain could not be followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The CNAME chain revisits a name.
    #[error("CNAME loop in answer")]
    Loop,
    /// The CNAME chain is longer than [`MAX_CHAIN`].
    #[error("CNAME chain longer than {MAX_CHAIN}")]
    TooLong,
}

/// One address record on the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainAddr {
    /// The address.
    pub ip: IpAddr,
    /// The record's own TTL.
    pub ttl: u32,
}

/// What the answer section says about the query name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The name at the end of the chain (the query name when there is no CNAME).
    pub target: Name,
    /// How many CNAMEs were followed.
    pub cnames: usize,
    /// Address records of the query type owned by `target`, deduplicated, in answer order.
    /// Always empty unless the query type is A or AAAA.
    pub addrs: Vec<ChainAddr>,
    /// The minimum TTL over every record on the chain (CNAMEs and address records included);
    /// `None` when the chain holds no record at all.
    pub min_ttl: Option<u32>,
    /// Whether the chain ends in at least one record of the query type.
    pub has_data: bool,
}

/// Follows the CNAME chain from `qname` through the answer section of `msg`.
///
/// Names compare case-insensitively (hickory's `Name` equality), so `WWW.Example.com` matches
/// `www.example.com`. When one owner has several CNAMEs (a broken or hostile message) only the
/// first is followed; the others are off-chain.
pub fn follow_chain(msg: &Message, qname: &Name, qtype: RecordType) -> Result<Chain, ChainError> {
    let mut current = qname.clone();
    let mut seen: Vec<Name> = vec![qname.clone()];
    let mut min_ttl: Option<u32> = None;
    let mut cnames = 0usize;
    let follow_cnames = qtype != RecordType::CNAME;
    if follow_cnames {
        loop {
            let next = msg.answers.iter().find_map(|r| match &r.data {
                RData::CNAME(target) if r.name == current => Some((target.0.clone(), r.ttl)),
                _ => None,
            });
            let Some((target, ttl)) = next else { break };
            cnames += 1;
            if cnames > MAX_CHAIN {
                return Err(ChainError::TooLong);
            }
            min_ttl = Some(min_ttl.map_or(ttl, |m| m.min(ttl)));
            if seen.contains(&target) {
                return Err(ChainError::Loop);
            }
            seen.push(target.clone());
            current = target;
        }
    }
    let mut addrs: Vec<ChainAddr> = Vec::new();
    let mut has_data = false;
    for r in &msg.answers {
        let of_type = qtype == RecordType::ANY || r.record_type() == qtype;
        if r.name != current || !of_type {
            continue;
        }
        has_data = true;
        min_ttl = Some(min_ttl.map_or(r.ttl, |m| m.min(r.ttl)));
        let ip = match (&r.data, qtype) {
            (RData::A(a), RecordType::A) => IpAddr::V4(a.0),
            (RData::AAAA(a), RecordType::AAAA) => IpAddr::V6(a.0),
            _ => continue,
        };
        if !addrs.iter().any(|a| a.ip == ip) {
            addrs.push(ChainAddr { ip, ttl: r.ttl });
        }
    }
    Ok(Chain {
        target: current,
        cnames,
        addrs,
        min_ttl,
        has_data,
    })
}

/// The `authorize.never_authorize` networks, as masks to compare addresses with: every
/// address of every answer is checked against them, and `IpNet::contains` works out each
/// network's mask and ends again per check.
#[derive(Debug, Clone, Default)]
pub struct Never {
    /// (network, mask) of each IPv4 network.
    v4: Vec<(u32, u32)>,
    /// (network, mask) of each IPv6 network.
    v6: Vec<(u128, u128)>,
}

impl Never {
    pub fn new(nets: &[IpNet]) -> Self {
        let mut never = Never::default();
        for net in nets {
            match net {
                IpNet::V4(n) => never
                    .v4
                    .push((n.network().to_bits(), n.netmask().to_bits())),
                IpNet::V6(n) => never
                    .v6
                    .push((n.network().to_bits(), n.netmask().to_bits())),
            }
        }
        never
    }

    fn has_v4(&self, ip: Ipv4Addr) -> bool {
        let a = ip.to_bits();
        self.v4.iter().any(|&(net, mask)| a & mask == net)
    }

    fn has_v6(&self, ip: Ipv6Addr) -> bool {
        let a = ip.to_bits();
        self.v6.iter().any(|&(net, mask)| a & mask == net)
    }
}

/// Whether dnsd may ever ask fwd to open `ip`.
///
/// The unspecified addresses (`0.0.0.0`, `::`, and `::ffff:0.0.0.0`) are blocklist sinkholes,
/// never destinations; `never` holds the configured `authorize.never_authorize` networks.
/// IPv4-mapped IPv6 addresses are checked as the IPv4 address they carry, and as themselves
/// (an IPv6 network such as `::ffff:0:0/96` covers them too).
pub fn grantable(ip: IpAddr, never: &Never) -> bool {
    match ip {
        IpAddr::V4(a) => !a.is_unspecified() && !never.has_v4(a),
        IpAddr::V6(a) => {
            if a.is_unspecified() || never.has_v6(a) {
                return false;
            }
            match a.to_ipv4_mapped() {
                Some(v4) => !v4.is_unspecified() && !never.has_v4(v4),
                None => true,
            }
        }
    }
}

/// Whether a query type can ever lead to an authorization.
pub fn is_address_query(qtype: RecordType) -> bool {
    matches!(qtype, RecordType::A | RecordType::AAAA)
}

/// Removes A/AAAA records that are not on the chain from the answer and additional sections.
///
/// Those addresses are never authorized, so a client could not reach them anyway; leaving them
/// in would only invite a stub resolver to cache and try them. Only called for A/AAAA queries.
pub fn strip_off_chain(msg: &mut Message, chain: &Chain) {
    let on_chain = |r: &Record| -> bool {
        match &r.data {
            RData::A(a) => {
                r.name == chain.target && chain.addrs.iter().any(|c| c.ip == IpAddr::V4(a.0))
            }
            RData::AAAA(a) => {
                r.name == chain.target && chain.addrs.iter().any(|c| c.ip == IpAddr::V6(a.0))
            }
            _ => true,
        }
    };
    msg.answers.retain(on_chain);
    msg.additionals
        .retain(|r| !matches!(r.record_type(), RecordType::A | RecordType::AAAA));
}

/// Removes every A/AAAA record whose address is in `drop` from the answer section.
///
/// Used when fwd rejects some addresses of an answer (for example because they lie in its
/// never-authorize ranges): they would not be reachable, so the client must not be told them.
pub fn remove_addresses(msg: &mut Message, drop: &HashSet<IpAddr>) {
    if drop.is_empty() {
        return;
    }
    msg.answers.retain(|r| match &r.data {
        RData::A(a) => !drop.contains(&IpAddr::V4(a.0)),
        RData::AAAA(a) => !drop.contains(&IpAddr::V6(a.0)),
        _ => true,
    });
}

/// How an upstream answer may be cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cacheability {
    /// A positive answer; the TTL is the minimum over the answer section.
    Positive(u32),
    /// NXDOMAIN or NODATA with a SOA; the TTL is min(SOA TTL, SOA MINIMUM) (RFC 2308 §5).
    Negative(u32),
    /// Not cacheable (errors, truncated answers, negative answers without SOA).
    No,
}

/// Decides whether and for how long an answer may be cached, before clamping.
pub fn cacheability(msg: &Message, chain: &Chain) -> Cacheability {
    if msg.metadata.truncation {
        return Cacheability::No;
    }
    let rcode = msg.metadata.response_code;
    let negative = match rcode {
        ResponseCode::NXDomain => true,
        ResponseCode::NoError => !chain.has_data,
        _ => return Cacheability::No,
    };
    if negative {
        let soa_ttl = msg.authorities.iter().find_map(|r| match &r.data {
            RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
            _ => None,
        });
        match soa_ttl {
            // RFC 2308 §5: the CNAMEs leading to the negative answer bound its lifetime too.
            Some(t) => Cacheability::Negative(chain.min_ttl.map_or(t, |c| c.min(t))),
            None => Cacheability::No,
        }
    } else {
        match msg.answers.iter().map(|r| r.ttl).min() {
            Some(t) => Cacheability::Positive(t),
            None => Cacheability::No,
        }
    }
}

/// Clamps every record TTL of every section into `[min, max]`.
pub fn clamp_ttls(msg: &mut Message, min: u32, max: u32) {
    let max = max.max(min);
    for r in msg
        .answers
        .iter_mut()
        .chain(msg.authorities.iter_mut())
        .chain(msg.additionals.iter_mut())
    {
        r.ttl = r.ttl.clamp(min, max);
    }
}

/// Lowers every record TTL of every section to at most `cap`.
///
/// Used to keep the TTL a client is told within the grant fwd committed, so that a client
/// that caches the answer for its whole TTL still finds the address open.
pub fn cap_ttls(msg: &mut Message, cap: u32) {
    for r in msg
        .answers
        .iter_mut()
        .chain(msg.authorities.iter_mut())
        .chain(msg.additionals.iter_mut())
    {
        r.ttl = r.ttl.min(cap);
    }
}

/// Subtracts `elapsed` seconds from every record TTL (saturating), for answers served from cache.
pub fn age_ttls(msg: &mut Message, elapsed: u32) {
    for r in msg
        .answers
        .iter_mut()
        .chain(msg.authorities.iter_mut())
        .chain(msg.additionals.iter_mut())
    {
        r.ttl = r.ttl.saturating_sub(elapsed);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::str::FromStr;

    use hickory_proto::op::{MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA};

    use super::*;

    fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn a(name: &str, ttl: u32, ip: &str) -> Record {
        Record::from_rdata(n(name), ttl, RData::A(A(Ipv4Addr::from_str(ip).unwrap())))
    }

    fn aaaa(name: &str, ttl: u32, ip: &str) -> Record {
        Record::from_rdata(
            n(name),
            ttl,
            RData::AAAA(AAAA(Ipv6Addr::from_str(ip).unwrap())),
        )
    }

    fn cname(name: &str, ttl: u32, target: &str) -> Record {
        Record::from_rdata(n(name), ttl, RData::CNAME(CNAME(n(target))))
    }

    fn msg(qname: &str, qtype: RecordType, answers: Vec<Record>) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(n(qname), qtype));
        m.add_answers(answers);
        m
    }

    fn ips(c: &Chain) -> Vec<String> {
        c.addrs.iter().map(|a| a.ip.to_string()).collect()
    }

    #[test]
    fn direct_answer() {
        let m = msg(
            "example.com.",
            RecordType::A,
            vec![
                a("example.com.", 300, "192.0.2.1"),
                a("example.com.", 200, "192.0.2.2"),
            ],
        );
        let c = follow_chain(&m, &n("example.com."), RecordType::A).unwrap();
        assert_eq!(ips(&c), ["192.0.2.1", "192.0.2.2"]);
        assert_eq!(c.min_ttl, Some(200));
        assert_eq!(c.cnames, 0);
        assert!(c.has_data);
    }

    #[test]
    fn chain_case_insensitive_min_ttl_includes_cnames() {
        let m = msg(
            "WWW.Example.COM.",
            RecordType::A,
            vec![
                cname("www.example.com.", 60, "Edge.CDN.net."),
                cname("edge.cdn.net.", 3600, "node1.cdn.net."),
                a("NODE1.cdn.net.", 300, "198.51.100.7"),
            ],
        );
        let c = follow_chain(&m, &n("WWW.Example.COM."), RecordType::A).unwrap();
        assert_eq!(ips(&c), ["198.51.100.7"]);
        assert_eq!(c.min_ttl, Some(60));
        assert_eq!(c.cnames, 2);
    }

    #[test]
    fn off_chain_records_ignored_and_stripped() {
        let mut m = msg(
            "www.example.com.",
            RecordType::A,
            vec![
                cname("www.example.com.", 300, "edge.cdn.net."),
                a("edge.cdn.net.", 300, "198.51.100.7"),
                // Off-chain: a record for the query name's alias target's sibling, and one
                // for an unrelated name.
                a("evil.example.net.", 300, "203.0.113.66"),
                a("other.cdn.net.", 300, "203.0.113.67"),
            ],
        );
        m.add_additional(a("ns.example.com.", 300, "203.0.113.68"));
        let c = follow_chain(&m, &n("www.example.com."), RecordType::A).unwrap();
        assert_eq!(ips(&c), ["198.51.100.7"]);
        strip_off_chain(&mut m, &c);
        let left: Vec<_> = m.answers.iter().map(|r| r.name.to_ascii()).collect();
        assert_eq!(left, ["www.example.com.", "edge.cdn.net."]);
        assert!(m.additionals.is_empty());
    }

    #[test]
    fn address_at_query_name_is_off_chain_when_a_cname_exists() {
        // A CNAME owner cannot own other data; an A for the alias is off-chain.
        let m = msg(
            "www.example.com.",
            RecordType::A,
            vec![
                a("www.example.com.", 300, "203.0.113.1"),
                cname("www.example.com.", 300, "edge.cdn.net."),
                a("edge.cdn.net.", 300, "198.51.100.7"),
            ],
        );
        let c = follow_chain(&m, &n("www.example.com."), RecordType::A).unwrap();
        assert_eq!(ips(&c), ["198.51.100.7"]);
    }

    #[test]
    fn same_name_says_what_names_equality_says() {
        let names = [
            "a.example.",
            "A.EXAMPLE.",
            "a.example",
            "a.exampl.",
            "ab.example.",
            "a.b.example.",
            "b.a.example.",
            ".",
            "*.example.",
            "example.",
            "a\\.b.example.",
            "a.b\\.example.",
        ];
        for x in names {
            for y in names {
                let (a, b) = (Name::from_str(x).unwrap(), Name::from_str(y).unwrap());
                assert_eq!(same_name(&a, &b), a == b, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn cname_loop_is_an_error() {
        let m = msg(
            "a.example.",
            RecordType::A,
            vec![
                cname("a.example.", 300, "b.example."),
                cname("B.example.", 300, "A.example."),
                a("a.example.", 300, "192.0.2.1"),
            ],
        );
        assert_eq!(
            follow_chain(&m, &n("a.example."), RecordType::A),
            Err(ChainError::Loop)
        );
        let self_loop = msg(
            "a.example.",
            RecordType::A,
            vec![cname("a.example.", 300, "a.example.")],
        );
        assert_eq!(
            follow_chain(&self_loop, &n("a.example."), RecordType::A),
            Err(ChainError::Loop)
        );
    }

    #[test]
    fn overlong_chain_is_an_error() {
        let mut records = Vec::new();
        for i in 0..=MAX_CHAIN {
            records.push(cname(
                &format!("n{i}.example."),
                300,
                &format!("n{}.example.", i + 1),
            ));
        }
        let m = msg("n0.example.", RecordType::A, records);
        assert_eq!(
            follow_chain(&m, &n("n0.example."), RecordType::A),
            Err(ChainError::TooLong)
        );
    }

    #[test]
    fn wrong_type_records_are_not_extracted() {
        // AAAA records in an A answer, and A records in an AAAA answer, are not on the chain.
        let m = msg(
            "example.com.",
            RecordType::A,
            vec![
                aaaa("example.com.", 300, "2001:db8::1"),
                a("example.com.", 300, "192.0.2.1"),
            ],
        );
        let c = follow_chain(&m, &n("example.com."), RecordType::A).unwrap();
        assert_eq!(ips(&c), ["192.0.2.1"]);
        let c6 = follow_chain(&m, &n("example.com."), RecordType::AAAA).unwrap();
        assert_eq!(ips(&c6), ["2001:db8::1"]);
    }

    #[test]
    fn ptr_and_other_qtypes_never_extract() {
        let m = msg(
            "7.2.0.192.in-addr.arpa.",
            RecordType::PTR,
            vec![
                Record::from_rdata(
                    n("7.2.0.192.in-addr.arpa."),
                    300,
                    RData::PTR(PTR(n("host.example."))),
                ),
                a("7.2.0.192.in-addr.arpa.", 300, "192.0.2.7"),
            ],
        );
        let c = follow_chain(&m, &n("7.2.0.192.in-addr.arpa."), RecordType::PTR).unwrap();
        assert!(c.addrs.is_empty());
        assert!(!is_address_query(RecordType::PTR));
        assert!(!is_address_query(RecordType::MX));
        assert!(!is_address_query(RecordType::ANY));
        assert!(is_address_query(RecordType::A));
        assert!(is_address_query(RecordType::AAAA));
    }

    #[test]
    fn duplicates_collapse() {
        let m = msg(
            "example.com.",
            RecordType::A,
            vec![
                a("example.com.", 300, "192.0.2.1"),
                a("example.com.", 30, "192.0.2.1"),
            ],
        );
        let c = follow_chain(&m, &n("example.com."), RecordType::A).unwrap();
        assert_eq!(ips(&c), ["192.0.2.1"]);
        assert_eq!(c.min_ttl, Some(30));
    }

    #[test]
    fn unspecified_and_never_cidrs_are_not_grantable() {
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        let never = Never::new(&nets);
        for bad in [
            "0.0.0.0",
            "::",
            "::ffff:0.0.0.0",
            "10.1.2.3",
            "::ffff:10.1.2.3",
            "fd12::1",
        ] {
            assert!(!grantable(bad.parse().unwrap(), &never), "{bad}");
        }
        for good in ["192.0.2.1", "2001:db8::1", "11.0.0.1", "::ffff:11.0.0.1"] {
            assert!(grantable(good.parse().unwrap(), &never), "{good}");
        }
        // An IPv6 network covers the IPv4-mapped addresses in it.
        let mapped = Never::new(&["::ffff:0:0/96".parse().unwrap()]);
        assert!(!grantable("::ffff:192.0.2.1".parse().unwrap(), &mapped));
        assert!(grantable("192.0.2.1".parse().unwrap(), &mapped));
    }

    /// The masks decide as `IpNet::contains` does, on the canonical address and on the
    /// address itself, for networks of every prefix length around the addresses tried.
    #[test]
    fn never_masks_agree_with_ipnet() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let reference = |ip: IpAddr, nets: &[IpNet]| {
            let canonical = ip.to_canonical();
            // The check `grantable` made before it had masks.
            let sinkhole = canonical.is_unspecified() || ip.is_unspecified();
            !sinkhole
                && !nets
                    .iter()
                    .any(|n| n.contains(&canonical) || n.contains(&ip))
        };
        for _ in 0..20_000 {
            let v4 = Ipv4Addr::from_bits(rng.random());
            let v6 = Ipv6Addr::from_bits(rng.random());
            let ips = [
                IpAddr::V4(v4),
                IpAddr::V6(v6),
                IpAddr::V6(v4.to_ipv6_mapped()),
                IpAddr::V6(v4.to_ipv6_compatible()),
            ];
            // Networks around the addresses (so that some contain them), and random ones.
            let nets: Vec<IpNet> = [
                IpNet::new(ips[rng.random_range(0..4)], 0).unwrap(),
                IpNet::V4(ipnet::Ipv4Net::new(v4, rng.random_range(0..=32)).unwrap()),
                IpNet::V6(ipnet::Ipv6Net::new(v6, rng.random_range(0..=128)).unwrap()),
                IpNet::V6(
                    ipnet::Ipv6Net::new(v4.to_ipv6_mapped(), rng.random_range(80..=128)).unwrap(),
                ),
                IpNet::V4(
                    ipnet::Ipv4Net::new(
                        Ipv4Addr::from_bits(rng.random()),
                        rng.random_range(0..=32),
                    )
                    .unwrap(),
                ),
            ]
            .into_iter()
            .filter(|_| rng.random_bool(0.5))
            .collect();
            let never = Never::new(&nets);
            for ip in ips {
                assert_eq!(grantable(ip, &never), reference(ip, &nets), "{ip} {nets:?}");
            }
        }
    }

    #[test]
    fn remove_rejected_addresses() {
        let mut m = msg(
            "example.com.",
            RecordType::A,
            vec![
                a("example.com.", 300, "192.0.2.1"),
                a("example.com.", 300, "192.0.2.2"),
            ],
        );
        let drop: HashSet<IpAddr> = ["192.0.2.2".parse().unwrap()].into_iter().collect();
        remove_addresses(&mut m, &drop);
        assert_eq!(m.answers.len(), 1);
    }

    fn soa(ttl: u32, minimum: u32) -> Record {
        Record::from_rdata(
            n("example.com."),
            ttl,
            RData::SOA(SOA::new(
                n("ns.example.com."),
                n("h.example.com."),
                1,
                2,
                3,
                4,
                minimum,
            )),
        )
    }

    #[test]
    fn negative_ttl_from_soa() {
        let mut m = msg("nx.example.com.", RecordType::A, vec![]);
        m.metadata.response_code = ResponseCode::NXDomain;
        m.add_authority(soa(3600, 300));
        let c = follow_chain(&m, &n("nx.example.com."), RecordType::A).unwrap();
        assert_eq!(cacheability(&m, &c), Cacheability::Negative(300));
        // SOA TTL lower than MINIMUM wins.
        let mut m2 = msg("nx.example.com.", RecordType::A, vec![]);
        m2.add_authority(soa(60, 300));
        let c2 = follow_chain(&m2, &n("nx.example.com."), RecordType::A).unwrap();
        assert_eq!(cacheability(&m2, &c2), Cacheability::Negative(60));
        // No SOA: not cached.
        let m3 = msg("nx.example.com.", RecordType::A, vec![]);
        let c3 = follow_chain(&m3, &n("nx.example.com."), RecordType::A).unwrap();
        assert_eq!(cacheability(&m3, &c3), Cacheability::No);
    }

    #[test]
    fn nodata_behind_cname_bounded_by_cname_ttl() {
        let mut m = msg(
            "www.example.com.",
            RecordType::AAAA,
            vec![cname("www.example.com.", 20, "v4only.example.net.")],
        );
        m.add_authority(soa(3600, 600));
        let c = follow_chain(&m, &n("www.example.com."), RecordType::AAAA).unwrap();
        assert!(!c.has_data);
        assert_eq!(cacheability(&m, &c), Cacheability::Negative(20));
    }

    #[test]
    fn positive_ttl_is_min_and_servfail_uncacheable() {
        let m = msg(
            "example.com.",
            RecordType::A,
            vec![
                cname("example.com.", 50, "x.example."),
                a("x.example.", 300, "192.0.2.1"),
            ],
        );
        let c = follow_chain(&m, &n("example.com."), RecordType::A).unwrap();
        assert_eq!(cacheability(&m, &c), Cacheability::Positive(50));
        let mut sf = m.clone();
        sf.metadata.response_code = ResponseCode::ServFail;
        assert_eq!(cacheability(&sf, &c), Cacheability::No);
        let mut tc = m.clone();
        tc.metadata.truncation = true;
        assert_eq!(cacheability(&tc, &c), Cacheability::No);
    }

    #[test]
    fn ttl_arithmetic() {
        let mut m = msg(
            "example.com.",
            RecordType::A,
            vec![
                a("example.com.", 1, "192.0.2.1"),
                a("example.com.", 100_000, "192.0.2.2"),
            ],
        );
        clamp_ttls(&mut m, 30, 86_400);
        assert_eq!(m.answers[0].ttl, 30);
        assert_eq!(m.answers[1].ttl, 86_400);
        cap_ttls(&mut m, 600);
        assert_eq!(m.answers[1].ttl, 600);
        age_ttls(&mut m, 40);
        assert_eq!(m.answers[0].ttl, 0);
        assert_eq!(m.answers[1].ttl, 560);
    }
}
