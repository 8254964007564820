//! End-to-end proofs for dnsd (issue 3): real dnsd and fwd in the guarded namespace, real unbound over DNS-over-TLS in "net", real nftables, `dig`/`kdig` as clients and real TCP/UDP connects to the answered addresses.
//!
//! Each test builds its own topology, zone, unbound, fwd and dnsd. Kernel state is checked
//! independently with `nft -j`; dnsd's own view through `guardctl --json`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use guard_proto::v1::EventKind;
use guard_tests::dnsd::{self, DnsReply, Script};
use guard_tests::probe::{self, PROBE_TIMEOUT, Verdict};
use guard_tests::topology::{NET_V4, UPLINK_V4, service_v4, service_v6};
use guard_tests::{
    Dnsd, DnsdConfig, ECHO_PORT, EchoServer, Fwd, FwdConfig, Netns, OrFail, ScriptedUpstream,
    Topology, Unbound, UnboundConfig, nft,
};

/// dnsd's address in the guarded namespace (local mode).
const DNS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 53);
/// Deadline for behaviour that is time-based by nature (a grant expiring).
const EXPIRY_DEADLINE: Duration = Duration::from_secs(60);
/// A syntactically valid pin that matches no key (sha256 of nothing we serve).
const WRONG_PIN: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

/// dnsd, fwd, unbound, the echo services and the network, dropped in that order.
struct Env {
    dnsd: Dnsd,
    fwd: Fwd,
    unbound: Unbound,
    _echo: EchoServer,
    topo: Topology,
}

/// The local topology, unbound serving `zone` in net, fwd (local mode) allowing `upstreams`
/// plus unbound's DoT address, and dnsd configured by `dnsd_cfg` from the defaults
/// ([`default_dnsd`]: unbound over TLS with the test CA).
fn env_with(
    zone: UnboundConfig,
    fwd_cfg: FwdConfig,
    upstreams: &[SocketAddr],
    dnsd_cfg: impl FnOnce(DnsdConfig, &Unbound) -> DnsdConfig,
) -> Env {
    let topo = Topology::local().or_fail("local topology");
    let echo = EchoServer::services(&topo.net).or_fail("echo services");
    let unbound = Unbound::start(&topo.net, zone).or_fail("unbound");
    let mut allowed: Vec<String> = upstreams.iter().map(ToString::to_string).collect();
    allowed.push(unbound.tls_addr().or_fail("tls addr").to_string());
    let fwd = Fwd::start(&topo.fwd, fwd_cfg.set("allow.upstreams", allowed)).or_fail("fwd");
    let cfg = dnsd_cfg(default_dnsd(&fwd, &unbound), &unbound);
    let dnsd = Dnsd::start(&topo.fwd, cfg).or_fail("dnsd");
    Env {
        dnsd,
        fwd,
        unbound,
        _echo: echo,
        topo,
    }
}

/// The default environment runs dnsd with `threads = 1` (tokio's current-thread scheduler, as
/// the benchmark does); tests built with `env_with` run the multi-thread runtime.
fn env(zone: UnboundConfig) -> Env {
    env_with(zone, FwdConfig::local(), &[], |c, _| c.set("threads", 1))
}

/// dnsd forwarding to unbound over TLS, verified against the test CA as `dns.test`.
fn default_dnsd(fwd: &Fwd, unbound: &Unbound) -> DnsdConfig {
    DnsdConfig::new(fwd.socket(), &[unbound.tls_url().or_fail("tls url")])
        .set("upstream.ca_file", unbound.ca().to_string_lossy().as_ref())
}

impl Env {
    fn ns(&self) -> &Netns {
        &self.topo.fwd
    }

    /// `dig @127.0.0.1 NAME TYPE` from the guarded namespace.
    fn dig(&self, name: &str, qtype: &str) -> DnsReply {
        dnsd::dig(self.ns(), DNS, name, qtype, &[]).or_fail(&format!("dig {name} {qtype}"))
    }

    /// Resolves `name`, expecting NOERROR with exactly `want` as its addresses.
    fn resolve(&self, name: &str, qtype: &str, want: &[IpAddr]) -> DnsReply {
        let r = self.dig(name, qtype);
        r.expect_status("NOERROR").or_fail(name);
        assert_eq!(r.addrs(), want, "{name} {qtype}:\n{}", r.output);
        r
    }

    fn granted(&self, ip: IpAddr) -> bool {
        nft::set_contains(self.ns(), self.fwd.table(), auth_set(ip), &ip.to_string())
            .or_fail("nft list set")
    }

    fn granted_keys(&self, set: &str) -> Vec<String> {
        nft::set_keys(self.ns(), self.fwd.table(), set).or_fail("nft list set")
    }
}

fn auth_set(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "auth4" } else { "auth6" }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

// === 1. resolve, then connect at once ===

/// The regression of nettrust, ipdestinationguard and Cilium: an answer released before the
/// kernel rule exists makes the first connection fail. 200 fresh names, each with its own
/// address; every connection is made right after the answer, once, with no retry.
#[test]
fn answer_races_the_rule_200_fresh_names_connect_at_once() {
    const N: u8 = 200;
    let addrs: Vec<IpAddr> = (1..=N).map(|i| v4(203, 0, 113, i)).collect();
    let mut zone = UnboundConfig::new();
    for (i, ip) in addrs.iter().enumerate() {
        zone = zone.record(format!("n{i}.test. 300 IN A {ip}"));
    }
    let env = env(zone);
    // 203.0.113.1-200 live on net's loopback; guarded routes them over the veth.
    let batch = env.unbound.dir().join("addrs.batch");
    let lines: String = addrs
        .iter()
        .map(|ip| format!("addr add {ip}/32 dev lo\n"))
        .collect();
    std::fs::write(&batch, lines).or_fail("batch file");
    env.topo
        .net
        .ip(&["-batch", &batch.to_string_lossy()])
        .or_fail("net addresses");
    env.ns()
        .ip(&["route", "add", "203.0.113.0/24", "via", &NET_V4.to_string()])
        .or_fail("route");
    let _echo = EchoServer::start(&env.topo.net, &addrs, ECHO_PORT).or_fail("echo 203.0.113.x");

    probe::expect_tcp_refused(env.ns(), addrs[0]).or_fail("nothing answered yet");
    let mut failures = Vec::new();
    for (i, ip) in addrs.iter().enumerate() {
        let name = format!("n{i}.test");
        let r = env.dig(&name, "A");
        if r.status != "NOERROR" || r.addrs() != [*ip] {
            failures.push(format!("{name}: answer {} {:?}", r.status, r.addrs()));
            continue;
        }
        // At once, exactly one attempt.
        let v = Verdict::of(&probe::tcp_echo(env.ns(), *ip, PROBE_TIMEOUT));
        if !v.is_open() {
            failures.push(format!("{name} -> {ip}: {v:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {N} resolve-then-connect failed: {failures:#?}",
        failures.len()
    );
    assert_eq!(env.granted_keys("auth4").len(), usize::from(N));
}

#[test]
fn aaaa_resolve_then_connect_v6() {
    let (a, b) = (service_v6(0), service_v6(1));
    let env = env(UnboundConfig::new()
        .addresses(300, &[("v6.test.", a), ("other6.test.", b)])
        .addresses(
            300,
            &[("dual.test.", service_v4(5)), ("dual.test.", service_v6(5))],
        ));
    probe::expect_tcp_refused(env.ns(), a).or_fail("before");
    env.resolve("v6.test", "AAAA", &[a]);
    probe::expect_tcp_open(env.ns(), a).or_fail("v6 right after the answer");
    probe::expect_udp_open(env.ns(), a).or_fail("v6 udp");
    probe::expect_tcp_refused(env.ns(), b).or_fail("never answered v6");
    assert!(env.granted(a) && !env.granted(b));

    // A and AAAA of one name are separate answers: each opens only its own family.
    env.resolve("dual.test", "AAAA", &[service_v6(5)]);
    probe::expect_tcp_open(env.ns(), service_v6(5)).or_fail("dual v6");
    probe::expect_tcp_refused(env.ns(), service_v4(5)).or_fail("dual v4 not asked yet");
    env.resolve("dual.test", "A", &[service_v4(5)]);
    probe::expect_tcp_open(env.ns(), service_v4(5)).or_fail("dual v4");
}

// === 2. never answered, never reachable ===

#[test]
fn unanswered_address_stays_refused_while_others_are_granted() {
    let (x, y) = (service_v4(0), service_v4(1));
    let env = env(UnboundConfig::new()
        .addresses(300, &[("svc.test.", x), ("other.test.", y)])
        .record(format!("txt.test. 300 IN TXT \"{y}\""))
        .record("mx.test. 300 IN MX 10 other.test."));
    env.resolve("svc.test", "A", &[x]);
    probe::expect_tcp_open(env.ns(), x).or_fail("answered");

    // Answers that name y without being an A/AAAA answer for it open nothing.
    env.dig("txt.test", "TXT")
        .expect_status("NOERROR")
        .or_fail("TXT");
    env.dig("mx.test", "MX")
        .expect_status("NOERROR")
        .or_fail("MX");
    let any = env.dig("other.test", "ANY");
    assert!(
        any.output.contains(&y.to_string()),
        "ANY names y: {}",
        any.output
    );
    let _ = env.dig("11.2.0.192.in-addr.arpa", "PTR");

    for _ in 0..3 {
        probe::expect_tcp_refused(env.ns(), y).or_fail("never answered (tcp)");
        probe::expect_udp_refused(env.ns(), y).or_fail("never answered (udp)");
        probe::expect_tcp_open(env.ns(), x).or_fail("granted meanwhile");
    }
    assert_eq!(env.granted_keys("auth4"), vec![x.to_string()]);
}

// === 3. CNAME chains ===

#[test]
fn cname_chain_from_unbound_authorizes_only_the_chain() {
    let (x, y) = (service_v4(2), service_v4(3));
    // The CNAME's TTL (60) is the shortest on the chain: it bounds the grant and every
    // served TTL.
    let env = env(UnboundConfig::new()
        .record("a.test. 60 IN CNAME b.test.")
        .addresses(300, &[("b.test.", x), ("c.test.", y)]));
    let r = env.resolve("a.test", "A", &[x]);
    assert!(r.answers.iter().all(|rr| rr.ttl <= 60), "{}", r.output);
    let elem = nft::set_elements(env.ns(), env.fwd.table(), "auth4")
        .or_fail("auth4")
        .into_iter()
        .find(|e| e.key == x.to_string())
        .or_fail("granted element");
    // fwd: clamp(60, ttl.min = 1s, ttl.max) + ttl.margin (1s).
    assert_eq!(
        elem.timeout_s,
        Some(61),
        "grant from the chain's minimum TTL"
    );
    assert!(
        r.answers
            .iter()
            .any(|rr| rr.rtype == "CNAME" && rr.data == "b.test."),
        "{}",
        r.output
    );
    probe::expect_tcp_open(env.ns(), x).or_fail("on the chain");
    probe::expect_tcp_refused(env.ns(), y).or_fail("off the chain");
    assert_eq!(env.granted_keys("auth4"), vec![x.to_string()]);
    let hist = env
        .fwd
        .client()
        .or_fail("client")
        .history(&x.to_string())
        .or_fail("history");
    assert!(
        hist.iter()
            .any(|e| e.kind == EventKind::Granted as i32 && e.name.contains("a.test")),
        "granted for the query name: {hist:?}"
    );
}

/// Every name whose answer an address was released under is on record: `guardctl list
/// --name` finds the grant and the history names it. Here a CNAME alias is resolved right
/// after its target, so the alias's Authorize asks for an address fwd already covers.
///
/// Regression (fixed): fwd's Authorize fast path ("everything already committed long enough and
/// nothing to audit") answered UNCHANGED without recording the new query name, so
/// `guardctl list --name shop.test` found nothing and no event named shop.test.
#[test]
fn alias_answer_under_an_existing_grant_is_recorded_under_its_name() {
    let x = service_v4(3);
    let env = env(UnboundConfig::new()
        .addresses(300, &[("www.test.", x)])
        .record("shop.test. 300 IN CNAME www.test."));
    env.resolve("www.test", "A", &[x]);
    env.resolve("shop.test", "A", &[x]);
    // shop.test may have been released from dnsd's memory of fwd's confirmation for www.test;
    // its name then reaches fwd as an alias record, after the answer.
    let hist = wait_history(&env, x, "shop.test");
    assert!(
        hist.iter().any(|e| e.name.contains("shop.test")),
        "no event names shop.test: {hist:?}"
    );
    let listed = guard_tests::cmd::run_ok(
        &mut env
            .fwd
            .guardctl(&["--json", "list", "--name", "shop.test"])
            .or_fail("guardctl"),
    )
    .or_fail("guardctl list --name");
    assert!(
        listed.contains(&x.to_string()),
        "the grant {x} released under shop.test is not listed under that name: {listed}"
    );
}

/// fwd's history of `ip` once an event names `name` (within 30 s; the caller asserts).
fn wait_history(env: &Env, ip: IpAddr, name: &str) -> Vec<guard_proto::v1::Event> {
    let mut hist = Vec::new();
    let _ = guard_tests::wait_until(
        &format!("fwd's history of {ip} to name {name}"),
        Duration::from_secs(30),
        || {
            hist = env.fwd.client()?.history(&ip.to_string())?;
            Ok(hist.iter().any(|e| e.name.contains(name)))
        },
    );
    hist
}

/// fwd frozen (SIGSTOP) while this lives: its socket accepts, nothing answers, and its
/// revocation stream stays open. Continued (SIGCONT) on drop, whatever happens.
struct Frozen(u32);

impl Frozen {
    fn stop(fwd: &Fwd) -> Frozen {
        let pid = fwd.pid().or_fail("fwd running");
        guard_tests::cmd::kill_pid(pid, nix::sys::signal::Signal::SIGSTOP);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        guard_tests::cmd::kill_pid(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// dnsd remembers fwd's confirmations: a second name for an address fwd committed long enough
/// is released without waiting for fwd (frozen here), and the connection works at once; the
/// name still reaches fwd's audit (an alias record). A revocation makes dnsd forget: the next
/// name for that address waits for fwd again, and with fwd frozen it fails closed.
#[test]
fn second_name_for_a_granted_address_is_released_from_memory_and_audited() {
    let x = service_v4(12);
    let env = env_with(
        UnboundConfig::new().addresses(
            300,
            &[("www.test.", x), ("mirror.test.", x), ("third.test.", x)],
        ),
        // dnsd releases from memory only a grant that outlives the answer's TTL by a second;
        // fwd's margin (1 s in the test default) decides how long after a grant that holds.
        FwdConfig::local().set("ttl.margin", "60s"),
        &[],
        // Long enough for the alias record, sent while fwd is frozen, to outlive the freeze.
        |c, _| c.set("authorize.timeout", "5s"),
    );
    env.dnsd
        .wait_log(&["cached grants trusted"], Duration::from_secs(30))
        .or_fail("revocation watch up");
    env.resolve("www.test", "A", &[x]);
    {
        let _frozen = Frozen::stop(&env.fwd);
        env.resolve("mirror.test", "A", &[x]);
        probe::expect_tcp_open(env.ns(), x).or_fail("released from memory, reachable");
    }
    let hist = wait_history(&env, x, "mirror.test");
    assert!(
        hist.iter().any(|e| e.name.contains("mirror.test")),
        "the name released from memory is not in fwd's audit: {hist:?}"
    );

    let out = guard_tests::cmd::run_ok(
        &mut env
            .fwd
            .guardctl(&["revoke", &x.to_string()])
            .or_fail("guardctl"),
    )
    .or_fail("revoke");
    assert!(out.contains("revoked"), "{out}");
    env.dnsd
        .wait_log(
            &["cached grants forgotten", &format!("cidr={x}/32")],
            Duration::from_secs(30),
        )
        .or_fail("dnsd applies the revocation");
    probe::expect_tcp_refused(env.ns(), x).or_fail("revoked");
    {
        let _frozen = Frozen::stop(&env.fwd);
        env.dig("third.test", "A")
            .expect_status("SERVFAIL")
            .or_fail("revoked: waits for fwd, which does not answer");
    }
    // (fwd may still commit that abandoned request once it runs again; either way the next
    // answer is released only after fwd's confirmation.)
    env.resolve("third.test", "A", &[x]);
    probe::expect_tcp_open(env.ns(), x).or_fail("re-granted by fwd");
}

/// An upstream that puts off-chain A records in the answer and additional sections: only
/// the chain's address is granted and served.
#[test]
fn off_chain_records_in_the_answer_are_stripped_and_never_granted() {
    let (x, y, z) = (service_v4(4), service_v4(5), service_v4(6));
    let up = SocketAddr::new(IpAddr::V4(NET_V4), 5300);
    let topo_env = env_with(UnboundConfig::new(), FwdConfig::local(), &[up], |c, _| {
        c.set("upstream.servers", vec![format!("udp://{up}")])
    });
    let script = HashMap::from([
        (
            ("a.test.".to_owned(), "A".to_owned()),
            Script {
                answer: vec![
                    "a.test. 300 CNAME b.test.".into(),
                    format!("evil.test. 300 A {y}"),
                    format!("b.test. 300 A {x}"),
                    format!("a.test.evil. 300 A {y}"),
                ],
                additional: vec![format!("c.test. 300 A {z}")],
            },
        ),
        (
            ("loop.test.".to_owned(), "A".to_owned()),
            Script {
                answer: vec![
                    "loop.test. 300 CNAME loop2.test.".into(),
                    "loop2.test. 300 CNAME loop.test.".into(),
                    format!("loop2.test. 300 A {z}"),
                ],
                additional: vec![],
            },
        ),
    ]);
    let scripted = ScriptedUpstream::start(&topo_env.topo.net, up, script).or_fail("scripted");
    let env = topo_env;

    let r = env.resolve("a.test", "A", &[x]);
    for bad in [y, z] {
        assert!(
            !r.output.contains(&bad.to_string()),
            "{bad} must not be served:\n{}",
            r.output
        );
    }
    probe::expect_tcp_open(env.ns(), x).or_fail("on the chain");
    probe::expect_tcp_refused(env.ns(), y).or_fail("off-chain answer record");
    probe::expect_tcp_refused(env.ns(), z).or_fail("additional record");

    env.dig("loop.test", "A")
        .expect_status("SERVFAIL")
        .or_fail("CNAME loop");
    probe::expect_tcp_refused(env.ns(), z).or_fail("nothing from a loop");
    assert_eq!(env.granted_keys("auth4"), vec![x.to_string()]);
    assert!(scripted.asked().contains(&"a.test. A".to_owned()));
}

// === 4. pins: no downgrade ===

/// Counts what leaves the guarded namespace before fwd's filter sees it: DNS on port 53
/// (plaintext) and everything else that is not DoT.
const COUNTERS: &str = "table inet e2e_count {
    counter plain_dns {}
    counter dot {}
    counter other {}
    chain out {
        type filter hook output priority -10; policy accept;
        oifname \"lo\" return
        meta l4proto { tcp, udp } th dport 53 counter name \"plain_dns\" return
        tcp dport 853 counter name \"dot\" return
        meta l4proto { tcp, udp } counter name \"other\"
    }
}";

fn counter(ns: &Netns, name: &str) -> u64 {
    let out = ns
        .exec_ok(&["nft", "-j", "list", "counter", "inet", "e2e_count", name])
        .or_fail("nft list counter");
    let v: serde_json::Value = serde_json::from_str(&out).or_fail("counter json");
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|o| o["counter"]["packets"].as_u64())
        .or_fail("counter packets")
}

#[test]
fn spki_pin_mismatch_gives_servfail_and_sends_no_plaintext() {
    let (x, y) = (service_v4(0), service_v4(1));
    let zone = UnboundConfig::new().addresses(300, &[("good.test.", x), ("pinned.test.", y)]);
    let mut env = env_with(zone, FwdConfig::local(), &[], |c, u| {
        c.set("upstream.spki_pins", vec![u.spki_pin().to_owned()])
    });
    let file = env.dnsd.dir().join("count.nft");
    std::fs::write(&file, COUNTERS).or_fail("write counters");
    env.ns()
        .exec_ok(&["nft", "-f", &file.to_string_lossy()])
        .or_fail("load counters");

    // Positive control: the right pin (computed with openssl) resolves over TLS.
    env.resolve("good.test", "A", &[x]);
    probe::expect_tcp_open(env.ns(), x).or_fail("good pin");
    let dot_before = counter(env.ns(), "dot");
    assert!(dot_before > 0, "the good answer came over DoT");
    // The probes above went out to the echo port; from here on only dnsd sends.
    let other_before = counter(env.ns(), "other");

    // The same setup with a pin that matches nothing.
    env.dnsd.stop().or_fail("stop dnsd");
    let cfg = default_dnsd(&env.fwd, &env.unbound).set("upstream.spki_pins", vec![WRONG_PIN]);
    env.dnsd = Dnsd::start(&env.topo.fwd, cfg).or_fail("dnsd with a wrong pin");
    for qtype in ["A", "TXT", "AAAA"] {
        env.dig("pinned.test", qtype)
            .expect_status("SERVFAIL")
            .or_fail("wrong pin");
    }
    assert!(counter(env.ns(), "dot") > dot_before, "dnsd did try DoT");
    assert_eq!(counter(env.ns(), "plain_dns"), 0, "plaintext DNS left");
    assert_eq!(
        counter(env.ns(), "other"),
        other_before,
        "non-DoT traffic left"
    );
    probe::expect_tcp_refused(env.ns(), y).or_fail("nothing granted");
    assert!(!env.granted(y));
    let ups = env.dnsd.upstreams().or_fail("upstreams");
    assert!(
        ups[0]["errors"].as_u64().unwrap_or(0) >= 1,
        "pin failure counted: {ups:?}"
    );
}

// === 5. fwd down: fail closed ===

#[test]
fn fwd_killed_fails_closed_and_recovers_after_restart() {
    let (k1, k2, k3) = (service_v4(0), service_v4(1), service_v6(1));
    let mut env = env(UnboundConfig::new()
        .addresses(300, &[("k1.test.", k1), ("k2.test.", k2), ("k3.test.", k3)])
        .record("t.test. 300 IN TXT \"text\""));
    env.resolve("k1.test", "A", &[k1]);
    probe::expect_tcp_open(env.ns(), k1).or_fail("before the crash");

    env.fwd.kill9().or_fail("kill -9 fwd");
    env.dig("k2.test", "A")
        .expect_status("SERVFAIL")
        .or_fail("A without fwd");
    env.dig("k3.test", "AAAA")
        .expect_status("SERVFAIL")
        .or_fail("AAAA without fwd");
    for ip in [k2, k3] {
        probe::expect_tcp_refused(env.ns(), ip).or_fail("nothing new reachable");
        probe::expect_udp_refused(env.ns(), ip).or_fail("nothing new reachable (udp)");
        assert!(!env.granted(ip));
    }
    // Answers that authorize nothing still work, and so do grants already in the kernel
    // (the cached k1 answer is covered by its committed grant).
    env.dig("t.test", "TXT")
        .expect_status("NOERROR")
        .or_fail("TXT without fwd");
    // The cached k1 answer may be served under its still-valid grant, or refused with SERVFAIL
    // (fail closed) if dnsd cannot yet tell that fwd is dead rather than slow: both are safe,
    // and which one happens depends on timing. Never any other answer.
    let cached = env.dig("k1.test", "A");
    match cached.status.as_str() {
        "NOERROR" => assert_eq!(cached.addrs(), [k1], "{}", cached.output),
        "SERVFAIL" => {}
        other => panic!("k1.test while fwd is dead: {other}\n{}", cached.output),
    }
    probe::expect_tcp_open(env.ns(), k1).or_fail("old grant while fwd is dead");
    env.dnsd.expect_running().or_fail("dnsd survives");

    env.fwd.restart().or_fail("restart fwd");
    env.resolve("k2.test", "A", &[k2]);
    probe::expect_tcp_open(env.ns(), k2).or_fail("after restart");
    env.resolve("k3.test", "AAAA", &[k3]);
    probe::expect_tcp_open(env.ns(), k3).or_fail("after restart (v6)");
}

// === 6. failover ===

#[test]
fn dead_first_upstream_fails_over_to_the_second() {
    let x = service_v4(7);
    // Nothing listens on 8853: connections are refused at once.
    let dead = SocketAddr::new(IpAddr::V4(NET_V4), 8853);
    let env = env_with(
        UnboundConfig::new().addresses(300, &[("f.test.", x), ("g.test.", service_v4(8))]),
        FwdConfig::local(),
        &[dead],
        |c, u| {
            c.set(
                "upstream.servers",
                vec![
                    format!("tls://{dead}#{}", guard_tests::unbound::TLS_NAME),
                    u.tls_url().or_fail("url"),
                ],
            )
        },
    );
    env.resolve("f.test", "A", &[x]);
    probe::expect_tcp_open(env.ns(), x).or_fail("answer from the second upstream");
    env.resolve("g.test", "A", &[service_v4(8)]);
    let ups = env.dnsd.upstreams().or_fail("upstreams");
    assert_eq!(ups.len(), 2, "{ups:?}");
    assert!(
        ups[0]["errors"].as_u64().unwrap_or(0) >= 1,
        "dead one: {ups:?}"
    );
    assert!(
        ups[1]["queries"].as_u64().unwrap_or(0) >= 2,
        "live one: {ups:?}"
    );
}

// === 7. grants that end ===

/// dnsd caps the TTL it serves to the grant fwd committed, and once the grant has expired
/// the next answer for the name grants the address again.
#[test]
fn answer_after_grant_expiry_grants_again_and_connects() {
    let x = service_v4(9);
    // Zone TTL 300; fwd clamps grants to 3s (+1s margin).
    let env = env_with(
        UnboundConfig::new().addresses(300, &[("e.test.", x)]),
        FwdConfig::local().set("ttl.max", "3s"),
        &[],
        |c, _| c.set("authorize.refresh_margin", "500ms"),
    );
    let r = env.resolve("e.test", "A", &[x]);
    let elem = nft::set_elements(env.ns(), env.fwd.table(), "auth4")
        .or_fail("auth4")
        .into_iter()
        .find(|e| e.key == x.to_string())
        .or_fail("granted element");
    let kernel_timeout = elem.timeout_s.or_fail("element timeout");
    for rr in &r.answers {
        assert!(
            u64::from(rr.ttl) < kernel_timeout,
            "served TTL {} must be below the kernel grant of {kernel_timeout}s:\n{}",
            rr.ttl,
            r.output
        );
    }
    probe::expect_tcp_open(env.ns(), x).or_fail("first answer");

    guard_tests::wait_until("the grant to expire", EXPIRY_DEADLINE, || {
        Ok(!env.granted(x))
    })
    .or_fail("expiry");
    probe::expect_tcp_refused(env.ns(), x).or_fail("expired");

    env.resolve("e.test", "A", &[x]);
    assert!(env.granted(x), "granted again");
    probe::expect_tcp_open(env.ns(), x).or_fail("after the second answer");
}

/// A cached answer released without a grant (fwd down, `on_fwd_error = "answer"`) is
/// re-authorized on its next cache hit, and the connection then works.
#[test]
fn cache_hit_without_a_live_grant_reauthorizes() {
    let x = service_v4(10);
    let mut env = env_with(
        UnboundConfig::new().addresses(300, &[("h.test.", x)]),
        FwdConfig::local(),
        &[],
        |c, _| c.set("authorize.on_fwd_error", "answer"),
    );
    env.fwd.kill9().or_fail("kill -9 fwd");
    env.resolve("h.test", "A", &[x]);
    probe::expect_tcp_refused(env.ns(), x).or_fail("released unauthorized: not reachable");

    env.fwd.restart().or_fail("restart fwd");
    let hits = env.dnsd.stat("cache_hits").or_fail("stats");
    env.resolve("h.test", "A", &[x]);
    assert_eq!(
        env.dnsd.stat("cache_hits").or_fail("stats"),
        hits + 1,
        "served from the cache"
    );
    assert!(env.granted(x), "re-authorized on the hit");
    probe::expect_tcp_open(env.ns(), x).or_fail("after the cache hit");
    let hist = env
        .fwd
        .client()
        .or_fail("client")
        .history(&x.to_string())
        .or_fail("history");
    assert!(
        hist.iter()
            .any(|e| e.kind == EventKind::Granted as i32 && e.reason.contains("cache-refresh")),
        "{hist:?}"
    );
}

/// Regression: a cache hit after `guardctl revoke` handed out the revoked address without
/// asking fwd, so the client got an address the kernel refuses for the rest of the TTL (the
/// dnsmasq nftset bug). dnsd now follows fwd's revocations: once it has applied one, the
/// next hit re-authorizes and the connection works again.
#[test]
fn cache_hit_after_revoke_handed_out_a_refused_address() {
    let x = service_v4(11);
    let env = env(UnboundConfig::new().addresses(300, &[("r.test.", x)]));
    env.resolve("r.test", "A", &[x]);
    probe::expect_tcp_open(env.ns(), x).or_fail("answered");
    let out = guard_tests::cmd::run_ok(
        &mut env
            .fwd
            .guardctl(&["revoke", &x.to_string()])
            .or_fail("guardctl"),
    )
    .or_fail("revoke");
    assert!(out.contains("revoked"), "{out}");
    probe::expect_tcp_refused(env.ns(), x).or_fail("revoked");
    // The revocation reaches dnsd asynchronously, over fwd's WatchRevocations stream.
    env.dnsd
        .wait_log(
            &["cached grants forgotten", &format!("cidr={x}/32")],
            Duration::from_secs(30),
        )
        .or_fail("dnsd applies the revocation");

    let hits = env.dnsd.stat("cache_hits").or_fail("stats");
    env.resolve("r.test", "A", &[x]);
    assert_eq!(env.dnsd.stat("cache_hits").or_fail("stats"), hits + 1);
    assert!(env.granted(x), "re-authorized on the hit");
    probe::expect_tcp_open(env.ns(), x).or_fail("the answer's address is reachable again");
}

// === 8. malformed input ===

/// A deterministic byte stream (xorshift64*), so failures replay.
struct Noise(u64);

impl Noise {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }
}

/// A well-formed query for `name` A with `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(u8::try_from(label.len()).or_fail("label"));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn udp_socket(ns: &Netns) -> UdpSocket {
    let s = ns
        .run(|| UdpSocket::bind("127.0.0.1:0"))
        .or_fail("netns")
        .or_fail("bind");
    s.connect(DNS).or_fail("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .or_fail("timeout");
    s
}

/// Sends `payload` over UDP and returns the rcode of the reply, which must echo `id`.
fn udp_rcode(ns: &Netns, payload: &[u8], id: u16) -> u8 {
    let s = udp_socket(ns);
    s.send(payload).or_fail("send");
    let mut buf = [0u8; 4096];
    let n = s.recv(&mut buf).or_fail("a reply to a parseable header");
    assert!(n >= 12, "short reply {n}");
    assert_eq!(u16::from_be_bytes([buf[0], buf[1]]), id, "reply ID");
    assert_ne!(buf[2] & 0x80, 0, "QR set");
    buf[3] & 0x0f
}

fn tcp_conn(ns: &Netns) -> TcpStream {
    let s = probe::tcp_connect(ns, DNS, PROBE_TIMEOUT).or_fail("tcp connect");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .or_fail("timeout");
    s
}

/// Whether the server closes `s` (EOF or reset) before the read timeout, discarding what
/// it sends meanwhile.
fn closed_by_server(mut s: TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return !probe::is_timeout(&e),
        }
    }
}

/// Fails unless dnsd still runs and answers a normal query over UDP and TCP.
fn still_serving(env: &mut Env, x: IpAddr, after: &str) {
    env.dnsd.expect_running().or_fail(after);
    for extra in [&[][..], &["+tcp"][..]] {
        let r = dnsd::dig(env.ns(), DNS, "ok.test", "A", extra).or_fail(after);
        r.expect_status("NOERROR").or_fail(after);
        assert_eq!(r.addrs(), vec![x], "{after}");
    }
}

const FORMERR: u8 = 1;
const NOTIMP: u8 = 4;

#[test]
fn malformed_udp_and_tcp_input_leaves_dnsd_serving() {
    let x = service_v4(12);
    let mut env = env_with(
        UnboundConfig::new().addresses(300, &[("ok.test.", x)]),
        FwdConfig::local(),
        &[],
        |c, _| {
            c.set("listen.tcp_read_timeout", "1s")
                .set("listen.tcp_idle_timeout", "2s")
        },
    );
    still_serving(&mut env, x, "baseline");
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let good = query(0x4242, "ok.test");

    // UDP, parseable header, bad body: FORMERR (or NOTIMP) echoing the ID.
    let mut header_only = good[..12].to_vec();
    header_only[5] = 1;
    assert_eq!(
        udp_rcode(env.ns(), &header_only, 0x4242),
        FORMERR,
        "header only"
    );
    still_serving(&mut env, x, "header only");
    for cut in [13, 16, good.len() - 2] {
        assert_eq!(
            udp_rcode(env.ns(), &good[..cut], 0x4242),
            FORMERR,
            "cut at {cut}"
        );
    }
    still_serving(&mut env, x, "truncated questions");
    let mut lying = good.clone();
    lying[6] = 0xff;
    lying[7] = 0xff;
    lying[10] = 0xff;
    lying[11] = 0xff;
    assert_eq!(udp_rcode(env.ns(), &lying, 0x4242), FORMERR, "lying counts");
    still_serving(&mut env, x, "lying counts");
    let mut self_loop = good[..12].to_vec();
    self_loop.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    assert_eq!(
        udp_rcode(env.ns(), &self_loop, 0x4242),
        FORMERR,
        "pointer to itself"
    );
    let mut two_loop = good[..12].to_vec();
    // "a" then a pointer to offset 14, which points back to offset 12.
    two_loop.extend_from_slice(&[0x01, b'a', 0xc0, 0x0e, 0xc0, 0x0c, 0, 1, 0, 1]);
    assert_eq!(
        udp_rcode(env.ns(), &two_loop, 0x4242),
        FORMERR,
        "pointer loop"
    );
    still_serving(&mut env, x, "compression loops");
    let mut notify = good.clone();
    notify[2] = (4 << 3) | 0x01;
    assert_eq!(udp_rcode(env.ns(), &notify, 0x4242), NOTIMP, "NOTIFY");

    // UDP, no usable header, responses, 64 KiB of garbage: dropped without an answer.
    let s = udp_socket(env.ns());
    let mut response = good.clone();
    response[2] |= 0x80;
    for junk in [
        vec![0x12],
        vec![0; 11],
        response,
        noise.bytes(65_507),
        [good.clone(), noise.bytes(60_000)].concat(),
    ] {
        s.send(&junk).or_fail("send junk");
    }
    still_serving(&mut env, x, "UDP junk");

    // TCP: lying lengths, 64 KiB of garbage, early closes.
    for (what, bytes) in [
        ("one byte", vec![0x00]),
        ("length only", vec![0xff, 0xff]),
        (
            "length 500, 20 bytes",
            [vec![0x01, 0xf4], noise.bytes(20)].concat(),
        ),
        (
            "64 KiB garbage",
            [vec![0xff, 0xff], noise.bytes(65_535)].concat(),
        ),
        ("zero length", vec![0, 0, 0, 0]),
    ] {
        let mut c = tcp_conn(env.ns());
        let _ = c.write_all(&bytes);
        drop(c);
        still_serving(&mut env, x, what);
    }
    // A garbage frame followed by a good one on the same connection.
    let mut c = tcp_conn(env.ns());
    let junk = noise.bytes(300);
    let mut frames = u16::try_from(junk.len())
        .or_fail("len")
        .to_be_bytes()
        .to_vec();
    frames.extend_from_slice(&junk);
    frames.extend_from_slice(&u16::try_from(good.len()).or_fail("len").to_be_bytes());
    frames.extend_from_slice(&good);
    let _ = c.write_all(&frames);
    drop(c);
    still_serving(&mut env, x, "garbage then a query on one connection");

    // A message that promises more than it sends: cut off by the read timeout.
    let mut c = tcp_conn(env.ns());
    c.write_all(&[0x01, 0xf4, 0x12, 0x34]).or_fail("partial");
    still_serving(&mut env, x, "while a partial message is pending");
    assert!(
        closed_by_server(c),
        "partial message: dnsd kept the connection open"
    );

    // Slow writers trickling a valid query byte by byte, several at once: dnsd keeps
    // answering others, and cuts the trickles off.
    let mut framed = u16::try_from(good.len())
        .or_fail("len")
        .to_be_bytes()
        .to_vec();
    framed.extend_from_slice(&good);
    let writers: Vec<TcpStream> = (0..8).map(|_| tcp_conn(env.ns())).collect();
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for mut w in writers {
            let framed = &framed;
            handles.push(s.spawn(move || {
                // The pace of the attack, not a readiness wait.
                for b in framed {
                    if w.write_all(&[*b]).is_err() {
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(400));
                }
                let mut buf = [0u8; 512];
                // A trickle slower than tcp_read_timeout must not get an answer.
                !matches!(w.read(&mut buf), Ok(n) if n > 0)
            }));
        }
        for _ in 0..3 {
            still_serving(&mut env, x, "while slow writers trickle");
        }
        for h in handles {
            assert!(
                h.join().unwrap_or(false),
                "a slow writer was served or kept"
            );
        }
    });
    still_serving(&mut env, x, "after the slow writers");
}

// === 9. ACL ===

#[test]
fn acl_refuses_other_clients() {
    let x = service_v4(13);
    let outside = SocketAddr::new(IpAddr::V4(UPLINK_V4), 53);
    let listen = vec!["127.0.0.1:53".to_owned(), outside.to_string()];
    let mut env = env_with(
        UnboundConfig::new().addresses(300, &[("acl.test.", x)]),
        FwdConfig::local(),
        &[],
        |c, _| {
            c.set("listen.udp", listen.clone())
                .set("listen.tcp", listen.clone())
                .set("acl.allow", vec!["127.0.0.1/32"])
        },
    );
    for extra in [&[][..], &["+tcp"][..]] {
        let r = dnsd::dig(&env.topo.net, outside, "acl.test", "A", extra).or_fail("from net");
        r.expect_status("REFUSED").or_fail("outside client");
        assert!(r.addrs().is_empty(), "{}", r.output);
        // 192.0.2.1 as the source, from guarded itself: not 127.0.0.1 either.
        let r = dnsd::dig(env.ns(), outside, "acl.test", "A", extra).or_fail("from 192.0.2.1");
        r.expect_status("REFUSED").or_fail("non-loopback source");
    }
    assert!(!env.granted(x), "a refused query authorizes nothing");
    env.resolve("acl.test", "A", &[x]);
    probe::expect_tcp_open(env.ns(), x).or_fail("the allowed client");

    // action = "drop": no answer at all over UDP, TCP connections closed at accept.
    let cfg = default_dnsd(&env.fwd, &env.unbound)
        .set("listen.udp", listen.clone())
        .set("listen.tcp", listen.clone())
        .set("acl.allow", vec!["127.0.0.1/32"])
        .set("acl.action", "drop");
    env.dnsd.reload(cfg).or_fail("reload with action = drop");
    for extra in [&["+time=2"][..], &["+tcp", "+time=2"][..]] {
        let at = format!("@{}", outside.ip());
        let mut argv = vec!["dig", &at, "+tries=1", "acl.test", "A"];
        argv.extend_from_slice(extra);
        let out = env.topo.net.exec(&argv).or_fail("dig");
        assert!(
            !out.stdout.contains("status:"),
            "dropped, not answered: {}",
            out.describe()
        );
    }
    env.resolve("acl.test", "A", &[x]);
}

// === 10. domain policy ===

#[test]
fn domain_policy_answers_per_config_and_never_forwards() {
    let (x, y, z) = (service_v4(14), service_v4(15), service_v4(1));
    let up = SocketAddr::new(IpAddr::V4(NET_V4), 5300);
    let deny = |c: DnsdConfig| {
        c.set("upstream.servers", vec![format!("udp://{up}")])
            .set("domains.mode", "deny")
            .set("domains.names", vec!["*.blocked.test"])
    };
    let mut env = env_with(UnboundConfig::new(), FwdConfig::local(), &[up], |c, _| {
        deny(c).set("domains.action", "nxdomain")
    });
    let script: HashMap<(String, String), Script> = [
        ("ok.test.", x),
        ("x.blocked.test.", y),
        ("deep.x.blocked.test.", y),
        ("y.blocked.test.", y),
        ("blocked.test.", z),
    ]
    .into_iter()
    .map(|(n, ip)| {
        (
            (n.to_owned(), "A".to_owned()),
            Script {
                answer: vec![format!("{n} 300 A {ip}")],
                additional: vec![],
            },
        )
    })
    .collect();
    let scripted = ScriptedUpstream::start(&env.topo.net, up, script).or_fail("scripted");

    for name in ["x.blocked.test", "deep.x.blocked.test", "X.Blocked.TEST"] {
        let r = env.dig(name, "A");
        r.expect_status("NXDOMAIN").or_fail(name);
        assert!(r.addrs().is_empty());
    }
    env.dig("x.blocked.test", "AAAA")
        .expect_status("NXDOMAIN")
        .or_fail("AAAA");
    // `*.blocked.test` is strictly below: the name itself resolves.
    env.resolve("blocked.test", "A", &[z]);
    env.resolve("ok.test", "A", &[x]);

    let cfg = deny(default_dnsd(&env.fwd, &env.unbound)).set("domains.action", "refused");
    env.dnsd.reload(cfg).or_fail("reload with action = refused");
    env.dig("y.blocked.test", "A")
        .expect_status("REFUSED")
        .or_fail("refused");
    env.resolve("ok.test", "A", &[x]);

    let asked = scripted.asked();
    assert!(
        !asked.iter().any(|q| q.contains(".blocked.test.")),
        "denied names were forwarded: {asked:?}"
    );
    assert!(asked.contains(&"blocked.test. A".to_owned()), "{asked:?}");
    probe::expect_tcp_refused(env.ns(), y).or_fail("denied name's address");
    assert!(!env.granted(y));

    // Allow mode: only the listed names resolve; every other name gets the action and is
    // never forwarded.
    let cfg = default_dnsd(&env.fwd, &env.unbound)
        .set("upstream.servers", vec![format!("udp://{up}")])
        .set("domains.mode", "allow")
        .set("domains.names", vec!["ok.test", "*.blocked.test"])
        .set("domains.action", "nxdomain");
    env.dnsd.reload(cfg).or_fail("reload with mode = allow");
    let before = scripted.asked().len();
    env.resolve("OK.test", "A", &[x]);
    env.resolve("deep.x.blocked.test", "A", &[y]);
    for name in ["blocked.test", "other.test", "sub.ok.test"] {
        let r = env.dig(name, "A");
        r.expect_status("NXDOMAIN").or_fail(name);
        assert!(r.addrs().is_empty(), "{name}");
    }
    let asked = scripted.asked();
    let forwarded = &asked[before..];
    assert!(
        forwarded
            .iter()
            .all(|q| q == "ok.test. A" || q == "deep.x.blocked.test. A"),
        "names outside the allow list were forwarded: {forwarded:?}"
    );
}

// === DoT listener ===

#[test]
fn dot_listener_resolves_and_grants() {
    let x = service_v4(2);
    let tls = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 853);
    let env = env_with(
        UnboundConfig::new().addresses(300, &[("dot.test.", x)]),
        FwdConfig::local(),
        &[],
        |c, u| {
            let issued = u.pki().issue("dnsd.test").or_fail("dnsd certificate");
            c.set("listen.tls.addrs", vec![tls.to_string()])
                .set("listen.tls.cert", issued.cert.to_string_lossy().as_ref())
                .set("listen.tls.key", issued.key.to_string_lossy().as_ref())
        },
    );
    let r = dnsd::kdig_tls(
        env.ns(),
        tls,
        env.unbound.ca(),
        "dnsd.test",
        "dot.test",
        "A",
    )
    .or_fail("kdig over TLS");
    r.expect_status("NOERROR").or_fail("DoT");
    assert_eq!(r.addrs(), vec![x], "{}", r.output);
    probe::expect_tcp_open(env.ns(), x).or_fail("granted through the DoT listener");
}
