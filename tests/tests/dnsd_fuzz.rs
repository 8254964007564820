//! Fuzzing dnsd through the network, the way an attacker reaches it: a hostile upstream that
//! answers with mutated messages (bit flips, truncations, lying counts, compression loops,
//! wrong IDs, random bytes, silence) and a client that mixes mutated queries with good ones.
//!
//! The real dnsd and fwd run in a network namespace. What must hold, whatever the bytes:
//! - dnsd never dies and answers every well-formed query with a well-formed reply carrying the
//!   query's ID (NOERROR, NXDOMAIN, SERVFAIL, ... — never silence, never garbage);
//! - nothing is authorized in the kernel that the upstream did not put on the CNAME chain of the
//!   question, as the upstream's bytes decode (an address off the chain, in the additional
//!   section, or in a message that does not decode is never granted);
//! - afterwards a good upstream answer still resolves and connects.
//!
//! The run is reproducible: the seed is printed, and `GUARD_FUZZ_SEED=N` replays it
//! (`GUARD_FUZZ_ROUNDS` changes the number of queries).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use guard_tests::topology::NET_V4;
use guard_tests::{
    Dnsd, DnsdConfig, EchoServer, Fwd, FwdConfig, Netns, OrFail, Topology, nft, now_unix_ms,
};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DNS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 53);
/// dnsd answers SERVFAIL after its upstream deadline (set to 300 ms below); this is the
/// bound for *any* reply, far above it.
const REPLY_DEADLINE: Duration = Duration::from_secs(5);
/// The name whose answer is never mutated: the final proof that dnsd still works.
const GOOD: &str = "good.fuzz.test.";

/// On-chain answers use these; off-chain and additional records use other ranges, so that a
/// grant of one of those would show at a glance in a failure.
fn on_chain_v4(rng: &mut StdRng) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, rng.random_range(1..=254)))
}
fn on_chain_v6(rng: &mut StdRng) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        0x2001,
        0xdb8,
        0xf,
        0,
        0,
        0,
        0,
        rng.random_range(1..=0xfff),
    ))
}
fn off_chain(rng: &mut StdRng) -> IpAddr {
    if rng.random_bool(0.5) {
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, rng.random_range(1..=254)))
    } else {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0xbad,
            0,
            0,
            0,
            0,
            rng.random_range(1..=0xfff),
        ))
    }
}

fn addr_record(name: &Name, ip: IpAddr) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name.clone(), 300, data)
}

/// A plausible answer to `q`: maybe a CNAME chain, addresses of the asked type at its end,
/// sometimes off-chain records in the answer and additional sections.
fn answer(q: &Message, rng: &mut StdRng) -> Option<Message> {
    let question = q.queries.first()?;
    let mut m = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_query(question.clone());
    let mut owner = question.name().clone();
    for hop in 0..rng.random_range(0..3u8) {
        let target = Name::from_ascii(format!("c{hop}-{}.fuzz.test.", rng.random::<u16>())).ok()?;
        m.add_answer(Record::from_rdata(
            owner,
            300,
            RData::CNAME(CNAME(target.clone())),
        ));
        owner = target;
    }
    let v6 = question.query_type() == RecordType::AAAA;
    for _ in 0..rng.random_range(1..4u8) {
        let ip = if v6 {
            on_chain_v6(rng)
        } else {
            on_chain_v4(rng)
        };
        m.add_answer(addr_record(&owner, ip));
    }
    if rng.random_bool(0.3) {
        let evil = Name::from_ascii("evil.fuzz.test.").ok()?;
        m.add_answer(addr_record(&evil, off_chain(rng)));
    }
    if rng.random_bool(0.3) {
        m.add_additional(addr_record(&owner, off_chain(rng)));
    }
    if rng.random_bool(0.1) {
        m.add_answer(Record::from_rdata(
            owner,
            300,
            RData::TXT(TXT::new(vec!["noise".into()])),
        ));
    }
    Some(m)
}

/// The addresses a decoded message puts on the chain of its own question: what dnsd may grant.
fn on_chain(m: &Message) -> Vec<IpAddr> {
    let Some(q) = m.queries.first() else {
        return Vec::new();
    };
    let mut names: HashSet<Name> = HashSet::from([q.name().to_lowercase()]);
    // Follow CNAMEs to a fixed point (order-independent, loops terminate).
    loop {
        let before = names.len();
        for r in &m.answers {
            if let RData::CNAME(c) = &r.data
                && names.contains(&r.name.to_lowercase())
            {
                names.insert(c.0.to_lowercase());
            }
        }
        if names.len() == before {
            break;
        }
    }
    m.answers
        .iter()
        .filter(|r| names.contains(&r.name.to_lowercase()))
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// What the hostile upstream does to one answer.
fn mutate(wire: &mut Vec<u8>, rng: &mut StdRng) -> &'static str {
    match rng.random_range(0..100u8) {
        0..35 => "intact",
        35..50 => {
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..wire.len());
                wire[i] ^= 1 << rng.random_range(0..8);
            }
            "bit flips"
        }
        50..58 => {
            wire.truncate(rng.random_range(0..wire.len()));
            "truncated"
        }
        58..66 => {
            // Lying section counts (bytes 4..12 of the header).
            let i = 4 + 2 * rng.random_range(0..4usize);
            let v: u16 = if rng.random_bool(0.5) {
                0xffff
            } else {
                rng.random_range(0..40)
            };
            wire[i..i + 2].copy_from_slice(&v.to_be_bytes());
            "lying counts"
        }
        66..72 => {
            // The question name becomes a pointer to itself: a compression loop.
            if wire.len() > 14 {
                wire[12] = 0xc0;
                wire[13] = 12;
            }
            "compression loop"
        }
        72..78 => {
            let n = rng.random_range(0..2048);
            *wire = (0..n).map(|_| rng.random()).collect();
            "random bytes"
        }
        78..83 => {
            wire[0] ^= 0x5a;
            "wrong id"
        }
        83..88 => {
            wire[2] |= 0x02;
            "tc set"
        }
        88..93 => {
            let n = rng.random_range(1..600);
            wire.extend((0..n).map(|_| rng.random::<u8>()));
            "trailing garbage"
        }
        93..96 => {
            // Rcode and opcode noise.
            wire[2] ^= rng.random_range(0..=0x78u8);
            wire[3] = rng.random();
            "header noise"
        }
        _ => {
            wire.clear();
            "silence"
        }
    }
}

/// A UDP "upstream" that answers every question with a mutated message, and remembers every
/// address it ever put on a question's chain (as its own bytes decode).
struct Hostile {
    named: Arc<Mutex<HashSet<IpAddr>>>,
    mutations: Arc<Mutex<HashMap<&'static str, usize>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Hostile {
    fn start(ns: &Netns, addr: SocketAddr, seed: u64) -> Self {
        let sock = ns
            .run(|| UdpSocket::bind(addr))
            .or_fail("netns")
            .or_fail("bind the hostile upstream");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .or_fail("timeout");
        let named = Arc::new(Mutex::new(HashSet::new()));
        let mutations = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, m, s) = (named.clone(), mutations.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::Relaxed) {
                let Ok((len, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&buf[..len]) else {
                    continue;
                };
                let good = q
                    .queries
                    .first()
                    .is_some_and(|q| q.name().to_lowercase().to_ascii() == GOOD);
                let Some(a) = answer(&q, &mut rng) else {
                    continue;
                };
                let Ok(mut wire) = a.to_vec() else {
                    continue;
                };
                let what = if good {
                    "intact"
                } else {
                    mutate(&mut wire, &mut rng)
                };
                // Whatever dnsd may legitimately grant from these bytes, decoded as dnsd would.
                if let Ok(sent) = Message::from_vec(&wire)
                    && sent.metadata.message_type == MessageType::Response
                {
                    n.lock().or_fail("lock").extend(on_chain(&sent));
                }
                *m.lock().or_fail("lock").entry(what).or_insert(0) += 1;
                if !wire.is_empty() {
                    let _ = sock.send_to(&wire, peer);
                }
            }
        });
        Self {
            named,
            mutations,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn query(name: &str, qtype: RecordType, id: u16) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(hickory_proto::op::Query::query(
        Name::from_ascii(name).or_fail("name"),
        qtype,
    ));
    m.to_vec().or_fail("encode query")
}

/// Sends `wire` and returns the reply with the same ID, if any arrives within `deadline`
/// (stray replies to earlier mutated queries are skipped).
fn exchange(sock: &UdpSocket, wire: &[u8], deadline: Duration) -> Option<Vec<u8>> {
    sock.send_to(wire, DNS).or_fail("send");
    let until = std::time::Instant::now() + deadline;
    let mut buf = [0u8; 65535];
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left)).or_fail("timeout");
        match sock.recv(&mut buf) {
            Ok(n) if n >= 2 && wire.len() >= 2 && buf[..2] == wire[..2] => {
                return Some(buf[..n].to_vec());
            }
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

#[test]
fn hostile_upstream_and_clients_neither_crash_dnsd_nor_open_unnamed_addresses() {
    let seed = std::env::var("GUARD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(now_unix_ms);
    let rounds: usize = std::env::var("GUARD_FUZZ_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    eprintln!("GUARD_FUZZ_SEED={seed} GUARD_FUZZ_ROUNDS={rounds}");

    let topo = Topology::local().or_fail("local topology");
    let _echo = EchoServer::services(&topo.net).or_fail("echo services");
    let up = SocketAddr::new(IpAddr::V4(NET_V4), 5300);
    let hostile = Hostile::start(&topo.net, up, seed);
    let fwd = Fwd::start(
        &topo.fwd,
        FwdConfig::local().set("allow.upstreams", vec![up.to_string()]),
    )
    .or_fail("fwd");
    let mut dnsd = Dnsd::start(
        &topo.fwd,
        DnsdConfig::new(fwd.socket(), &[format!("udp://{up}")])
            .set("log_queries", false)
            .set("upstream.timeout", "300ms")
            .set("upstream.attempt_timeout", "150ms"),
    )
    .or_fail("dnsd");

    let client = topo
        .fwd
        .run(|| UdpSocket::bind("127.0.0.1:0"))
        .or_fail("netns")
        .or_fail("client socket");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rcodes: HashMap<String, usize> = HashMap::new();
    for i in 0..rounds {
        let qtype = if rng.random_bool(0.5) {
            RecordType::A
        } else {
            RecordType::AAAA
        };
        let id: u16 = rng.random();
        let wire = query(&format!("n{i}.fuzz.test."), qtype, id);
        if rng.random_bool(0.15) {
            // A mutated query: whatever comes back (if anything) is not checked, only that
            // dnsd lives through it (the next well-formed query proves it).
            let mut bad = wire.clone();
            let _ = mutate(&mut bad, &mut rng);
            if !bad.is_empty() {
                client.send_to(&bad, DNS).or_fail("send");
            }
            continue;
        }
        let reply = exchange(&client, &wire, REPLY_DEADLINE).unwrap_or_else(|| {
            panic!(
                "seed {seed}, round {i}: no reply to a well-formed query within \
                 {REPLY_DEADLINE:?}\n{}",
                dnsd.log_tail()
            )
        });
        let m = Message::from_vec(&reply).unwrap_or_else(|e| {
            panic!("seed {seed}, round {i}: dnsd sent a reply that does not decode: {e}")
        });
        assert_eq!(m.metadata.id, id, "seed {seed}, round {i}");
        assert_eq!(m.metadata.message_type, MessageType::Response);
        *rcodes
            .entry(format!("{:?}", m.metadata.response_code))
            .or_insert(0) += 1;
    }
    dnsd.expect_running().or_fail("dnsd survived the barrage");

    // Every kernel grant was on the chain of some decoded upstream answer. The upstream records
    // what it names before it sends, so the names are read after the kernel's sets. The last
    // round may be a mutated query, whose reply the test does not wait for: dnsd can forward
    // it, and the answer be named and granted after the loop. Read before the sets, it once
    // looked like an unnamed grant (seed 1795382006476, n599).
    let mut granted = Vec::new();
    for set in ["auth4", "auth6"] {
        granted.extend(nft::set_keys(&topo.fwd, fwd.table(), set).or_fail("nft list set"));
    }
    let named = hostile.named.lock().or_fail("lock").clone();
    for key in &granted {
        let ip: IpAddr = key.parse().or_fail("set key");
        assert!(
            named.contains(&ip),
            "seed {seed}: {ip} is granted but no upstream answer put it on a question's chain"
        );
    }
    let mutations = hostile.mutations.lock().or_fail("lock").clone();
    eprintln!(
        "{rounds} rounds: rcodes {rcodes:?}; upstream mutations {mutations:?}; {} addresses \
         granted of {} named on chains",
        granted.len(),
        named.len()
    );
    // The barrage was a barrage: dnsd saw broken answers and still answered good ones.
    assert!(
        rcodes.get("ServFail").copied().unwrap_or(0) > 0,
        "{rcodes:?}"
    );
    assert!(
        rcodes.get("NoError").copied().unwrap_or(0) > 0,
        "{rcodes:?}"
    );
    assert!(mutations.len() >= 8, "{mutations:?}");

    // And it still resolves and connects, through the same upstream.
    let q = query(GOOD, RecordType::A, 4242);
    let reply = exchange(&client, &q, REPLY_DEADLINE).or_fail("the good name answers");
    let m = Message::from_vec(&reply).or_fail("decodes");
    assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{m:?}");
    let ips = on_chain(&m);
    assert!(!ips.is_empty(), "{m:?}");
    for ip in ips {
        assert!(
            nft::set_contains(&topo.fwd, fwd.table(), "auth4", &ip.to_string())
                .or_fail("nft list set"),
            "{ip} answered for {GOOD} is granted"
        );
    }
}
