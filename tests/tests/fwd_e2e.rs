//! End-to-end proofs for fwd (issue 2): the real daemon, real nftables, real sockets in network namespaces.
//!
//! Each test builds its own topology, starts its own fwd, and probes with real TCP/UDP
//! connections; kernel state is checked independently with `nft -j`.

use std::net::IpAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::Duration;

use guard_proto::v1::firewall_client::FirewallClient;
use guard_proto::v1::{AuthorizeRequest, AuthorizeResponse, Event, EventKind, Outcome};
use guard_tests::cmd::{self, COMMAND_DEADLINE, Out};
use guard_tests::fwd::{grant, write_file};
use guard_tests::probe::{self, PROBE_TIMEOUT, Verdict};
use guard_tests::topology::{service_v4, service_v6};
use guard_tests::{EchoServer, Fwd, FwdConfig, NOBODY, OrFail, Topology, nft, now_unix_ms};

/// Deadline for behaviour that is time-based by nature (expiry, the sweep recording it).
const EXPIRY_DEADLINE: Duration = Duration::from_secs(60);

/// fwd, the echo services and the network, dropped in that order.
struct Env {
    fwd: Fwd,
    _echo: EchoServer,
    topo: Topology,
}

fn local(cfg: FwdConfig) -> Env {
    let topo = Topology::local().or_fail("local topology");
    let echo = EchoServer::services(&topo.net).or_fail("echo services");
    let fwd = Fwd::start(&topo.fwd, cfg).or_fail("start fwd");
    Env {
        fwd,
        _echo: echo,
        topo,
    }
}

fn gateway(per_client: bool) -> Env {
    let topo = Topology::gateway().or_fail("gateway topology");
    let echo = EchoServer::services(&topo.net).or_fail("echo services");
    let fwd = Fwd::start(&topo.fwd, FwdConfig::gateway(per_client)).or_fail("start fwd");
    Env {
        fwd,
        _echo: echo,
        topo,
    }
}

/// The DNS grant set for `ip`'s family.
fn auth_set(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "auth4" } else { "auth6" }
}

fn in_kernel(env: &Env, ip: IpAddr) -> bool {
    nft::set_contains(
        &env.topo.fwd,
        env.fwd.table(),
        auth_set(ip),
        &ip.to_string(),
    )
    .or_fail("nft list set")
}

fn outcomes(resp: &AuthorizeResponse) -> Vec<Outcome> {
    resp.results
        .iter()
        .map(|r| Outcome::try_from(r.outcome).unwrap_or(Outcome::Unspecified))
        .collect()
}

fn events_of(events: &[Event], kind: EventKind, ip: &str) -> usize {
    events
        .iter()
        .filter(|e| e.kind == kind as i32 && (ip.is_empty() || e.ip == ip))
        .count()
}

fn ctl(fwd: &Fwd, args: &[&str]) -> Out {
    cmd::run(
        &mut fwd.guardctl(args).or_fail("guardctl"),
        COMMAND_DEADLINE,
    )
    .or_fail("guardctl")
}

fn ctl_ok(fwd: &Fwd, args: &[&str]) -> String {
    let out = ctl(fwd, args);
    assert!(out.success(), "{}", out.describe());
    out.stdout
}

// === 1. default deny, fast ===

#[test]
fn ungranted_connections_are_refused_at_once_tcp_and_udp() {
    let env = local(FwdConfig::local());
    for ip in [service_v4(0), service_v6(0)] {
        probe::expect_tcp_refused(&env.topo.fwd, ip).or_fail("tcp");
        probe::expect_udp_refused(&env.topo.fwd, ip).or_fail("udp");
        assert!(!in_kernel(&env, ip));
    }
}

// === 2. grants open ===

#[test]
fn authorize_opens_v4_and_v6_tcp_and_udp() {
    let env = local(FwdConfig::local());
    let mut c = env.fwd.client().or_fail("client");
    let (v4, v6) = (service_v4(0), service_v6(0));
    let before = now_unix_ms();
    let resp = c
        .authorize(&[(v4, 300), (v6, 300)], "svc.example.")
        .or_fail("authorize");
    assert_eq!(outcomes(&resp), vec![Outcome::Granted, Outcome::Granted]);
    for r in &resp.results {
        assert!(r.expires_unix_ms > before, "{r:?}");
        assert!(r.error.is_empty(), "{r:?}");
    }
    // Committed means in the kernel, right now.
    assert!(in_kernel(&env, v4) && in_kernel(&env, v6));
    for ip in [v4, v6] {
        probe::expect_tcp_open(&env.topo.fwd, ip).or_fail("tcp");
        probe::expect_udp_open(&env.topo.fwd, ip).or_fail("udp");
    }
    // Only what was granted.
    probe::expect_tcp_refused(&env.topo.fwd, service_v4(1)).or_fail("neighbour v4");
    probe::expect_tcp_refused(&env.topo.fwd, service_v6(1)).or_fail("neighbour v6");

    let again = c
        .authorize(&[(v4, 300), (v6, 300)], "svc.example.")
        .or_fail("authorize again");
    for o in outcomes(&again) {
        assert!(matches!(o, Outcome::Extended | Outcome::Unchanged), "{o:?}");
    }
    let list = c.list().or_fail("list");
    for ip in [v4, v6] {
        let e = list
            .iter()
            .find(|g| g.ip == ip.to_string())
            .or_fail("grant listed");
        assert!(e.names.iter().any(|n| n.contains("svc.example")), "{e:?}");
    }
    let hist = c.history("").or_fail("history");
    for ip in [v4, v6] {
        assert!(events_of(&hist, EventKind::Granted, &ip.to_string()) >= 1);
    }
}

#[test]
fn guardctl_allow_opens_an_address_and_a_cidr() {
    let env = local(FwdConfig::local());
    let ns = &env.topo.fwd;
    probe::expect_tcp_refused(ns, service_v4(2)).or_fail("before");
    ctl_ok(&env.fwd, &["allow", "192.0.2.12"]);
    probe::expect_tcp_open(ns, service_v4(2)).or_fail("allowed address");
    probe::expect_udp_open(ns, service_v4(2)).or_fail("allowed address udp");

    // 192.0.2.16/30 is .16-.19 (service 6..=9).
    ctl_ok(&env.fwd, &["allow", "192.0.2.16/30", "--comment", "lab"]);
    for i in 6..=9 {
        probe::expect_tcp_open(ns, service_v4(i)).or_fail("inside v4 cidr");
    }
    probe::expect_tcp_refused(ns, service_v4(5)).or_fail("below v4 cidr");
    probe::expect_tcp_refused(ns, service_v4(10)).or_fail("above v4 cidr");

    // 2001:db8:1::18/126 is ::18-::1b (service 8..=11).
    ctl_ok(&env.fwd, &["allow", "2001:db8:1::18/126", "--ttl", "10m"]);
    for i in 8..=11 {
        probe::expect_tcp_open(ns, service_v6(i)).or_fail("inside v6 cidr");
    }
    probe::expect_tcp_refused(ns, service_v6(7)).or_fail("below v6 cidr");
    probe::expect_tcp_refused(ns, service_v6(12)).or_fail("above v6 cidr");

    let manual4 = nft::set_keys(ns, env.fwd.table(), "manual4").or_fail("manual4");
    assert!(manual4.iter().any(|k| k == "192.0.2.16/30"), "{manual4:?}");
    let listed = ctl_ok(&env.fwd, &["--json", "list"]);
    for cidr in ["192.0.2.12", "192.0.2.16/30", "2001:db8:1::18/126"] {
        assert!(listed.contains(cidr), "{cidr} not in {listed}");
    }
    let mut c = env.fwd.client().or_fail("client");
    let list = c.list().or_fail("list");
    let v6 = list
        .iter()
        .find(|g| g.ip == "2001:db8:1::18/126")
        .or_fail("v6 allowance listed");
    assert!(
        v6.expires_unix_ms > now_unix_ms(),
        "--ttl gives an expiry: {v6:?}"
    );
    let v4 = list
        .iter()
        .find(|g| g.ip == "192.0.2.16/30")
        .or_fail("v4 allowance listed");
    assert_eq!(v4.expires_unix_ms, 0, "no --ttl: no expiry");
    assert_eq!(v4.comment, "lab");
}

// === 3. expiry ===

#[test]
fn expired_grant_refuses_new_connections_but_keeps_established_flows() {
    let env = local(FwdConfig::local());
    let ns = &env.topo.fwd;
    let mut c = env.fwd.client().or_fail("client");
    let (v4, v6) = (service_v4(3), service_v6(3));
    // DNS TTL 1 with min = margin = 1s: the element lives about 2s.
    let short = c
        .authorize(&[(v4, 1), (v6, 1)], "short.example.")
        .or_fail("authorize");
    assert_eq!(outcomes(&short), vec![Outcome::Granted, Outcome::Granted]);
    for r in &short.results {
        assert_eq!(r.effective_ttl_s, 1, "{r:?}");
        assert!(r.expires_unix_ms <= now_unix_ms() + 2_000, "{r:?}");
    }
    // Two flows opened on a slightly longer grant (TTL 3: about 4s), so that opening them
    // cannot race the expiry on a busy machine; they must outlive it.
    let (f4, f6) = (service_v4(4), service_v6(4));
    c.authorize(&[(f4, 3), (f6, 3)], "flow.example.")
        .or_fail("authorize flows");
    let mut flow4 = probe::tcp_echo(ns, f4, PROBE_TIMEOUT).or_fail("flow v4");
    let mut flow6 = probe::tcp_echo(ns, f6, PROBE_TIMEOUT).or_fail("flow v6");

    for ip in [v4, v6, f4, f6] {
        guard_tests::wait_until(
            &format!("new connections to {ip} refused after expiry"),
            EXPIRY_DEADLINE,
            || {
                let v = probe::tcp_verdict(ns, ip);
                assert!(
                    !matches!(v, Verdict::TimedOut),
                    "{ip}: timed out, not rejected"
                );
                Ok(v.is_refused())
            },
        )
        .or_fail("expiry");
        assert!(!in_kernel(&env, ip), "{ip} still in the kernel set");
    }
    probe::roundtrip(&mut flow4, b"still here", PROBE_TIMEOUT).or_fail("established v4 flow");
    probe::roundtrip(&mut flow6, b"still here", PROBE_TIMEOUT).or_fail("established v6 flow");

    guard_tests::wait_until("EXPIRED events in history", EXPIRY_DEADLINE, || {
        let hist = c.history("")?;
        Ok([v4, v6, f4, f6]
            .iter()
            .all(|ip| events_of(&hist, EventKind::Expired, &ip.to_string()) >= 1))
    })
    .or_fail("history");
    guard_tests::wait_until("expired grants gone from List", EXPIRY_DEADLINE, || {
        let list = c.list()?;
        Ok(!list.iter().any(|g| g.ip == v4.to_string()))
    })
    .or_fail("list");
}

// === 4. revoke ===

#[test]
fn guardctl_revoke_refuses_the_next_connection_at_once() {
    let env = local(FwdConfig::local());
    let ns = &env.topo.fwd;
    let mut c = env.fwd.client().or_fail("client");
    let (v4, v6) = (service_v4(0), service_v6(0));
    c.authorize(&[(v4, 600), (v6, 600)], "revoke.example.")
        .or_fail("authorize");
    let mut flow = probe::tcp_echo(ns, v4, PROBE_TIMEOUT).or_fail("flow before revoke");
    probe::expect_tcp_open(ns, v6).or_fail("v6 before revoke");

    ctl_ok(&env.fwd, &["revoke", "192.0.2.10", "--comment", "e2e"]);
    // No waiting: the very next connection is refused.
    probe::expect_tcp_refused(ns, v4).or_fail("v4 right after revoke");
    assert!(!in_kernel(&env, v4));
    probe::roundtrip(&mut flow, b"not cut", PROBE_TIMEOUT).or_fail("established flow kept");

    ctl_ok(&env.fwd, &["revoke", "2001:db8:1::/64"]);
    probe::expect_tcp_refused(ns, v6).or_fail("v6 right after cidr revoke");

    // Manual allowances too.
    ctl_ok(&env.fwd, &["allow", "192.0.2.20/30"]);
    probe::expect_tcp_open(ns, service_v4(10)).or_fail("manual allow");
    ctl_ok(&env.fwd, &["revoke", "192.0.2.20/30"]);
    probe::expect_tcp_refused(ns, service_v4(10)).or_fail("manual allow revoked");

    let hist = c.history("").or_fail("history");
    assert!(events_of(&hist, EventKind::Revoked, "") >= 2, "{hist:?}");
    assert!(c.list().or_fail("list").is_empty());
}

// === 5. crash safety ===

#[test]
fn kill9_and_restart_keep_grants_history_and_filtering() {
    let mut env = local(FwdConfig::local());
    let (granted4, granted6, other) = (service_v4(0), service_v6(0), service_v4(1));
    {
        let mut c = env.fwd.client().or_fail("client");
        c.authorize(&[(granted4, 600), (granted6, 600)], "keep.example.")
            .or_fail("authorize");
    }
    probe::expect_tcp_open(&env.topo.fwd, granted4).or_fail("granted before");

    // A prober hammers the granted address for the whole crash/restart.
    let stop = AtomicBool::new(false);
    let probes = AtomicU64::new(0);
    let failures = Mutex::new(Vec::new());
    let ns = &env.topo.fwd;
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let v = probe::tcp_verdict(ns, granted4);
                probes.fetch_add(1, Ordering::Relaxed);
                if !v.is_open()
                    && let Ok(mut f) = failures.lock()
                {
                    f.push(format!("{v:?}"));
                }
            }
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            env.fwd.kill9().or_fail("kill -9");
            for ip in [granted4, granted6] {
                probe::expect_tcp_open(ns, ip).or_fail("granted while fwd is dead");
            }
            probe::expect_tcp_refused(ns, other).or_fail("ungranted while fwd is dead");
            probe::expect_udp_refused(ns, other).or_fail("ungranted udp while fwd is dead");
            env.fwd.restart().or_fail("restart");
            for ip in [granted4, granted6] {
                probe::expect_tcp_open(ns, ip).or_fail("granted right after restart");
            }
            probe::expect_tcp_refused(ns, other).or_fail("ungranted right after restart");
        }));
        stop.store(true, Ordering::Relaxed);
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    });
    let failures = failures.into_inner().unwrap_or_default();
    assert!(
        failures.is_empty(),
        "granted address unreachable {} times out of {}: {failures:?}",
        failures.len(),
        probes.load(Ordering::Relaxed)
    );
    assert!(probes.load(Ordering::Relaxed) > 0);

    let mut c = env.fwd.client().or_fail("client after restart");
    let list = c.list().or_fail("list");
    for ip in [granted4, granted6] {
        assert!(
            list.iter().any(|g| g.ip == ip.to_string()),
            "{ip} lost: {list:?}"
        );
        assert!(in_kernel(&env, ip));
    }
    let hist = c.history("").or_fail("history");
    for ip in [granted4, granted6] {
        assert!(
            events_of(&hist, EventKind::Granted, &ip.to_string()) >= 1,
            "{hist:?}"
        );
    }
    // fwd knows the grant it committed before the crash.
    let again = c
        .authorize(&[(granted4, 600)], "keep.example.")
        .or_fail("authorize after restart");
    assert!(
        matches!(
            outcomes(&again)[..],
            [Outcome::Extended | Outcome::Unchanged]
        ),
        "{again:?}"
    );
    assert!(!in_kernel(&env, other));
}

// === 6. caller identity ===

fn test_client(fwd: &Fwd, uid: u32, args: &[&str]) -> (Out, serde_json::Value) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_guard-test-client"));
    cmd.arg("--socket").arg(fwd.socket()).args(args);
    cmd::as_user(&mut cmd, uid, uid);
    let out = cmd::run(&mut cmd, COMMAND_DEADLINE).or_fail("guard-test-client");
    let json = serde_json::from_str(out.stdout.trim()).unwrap_or(serde_json::Value::Null);
    (out, json)
}

#[test]
fn wrong_uid_is_denied_and_audited() {
    const AUTHORIZER: u32 = 65532;
    let env = local(
        FwdConfig::local()
            .set("socket_mode", "0666")
            .set("access.authorizer_uids", vec![0i64, i64::from(AUTHORIZER)]),
    );
    let target = service_v4(0);
    let ip = target.to_string();

    // Not an authorizer: Authorize is refused.
    let (out, json) = test_client(&env.fwd, NOBODY, &["--ip", &ip]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert_eq!(
        json["error"]["code"],
        "PermissionDenied",
        "{}",
        out.describe()
    );
    // Not an admin: Allow and Revoke are refused.
    for args in [["allow", ip.as_str()], ["revoke", ip.as_str()]] {
        let mut cmd = env.fwd.guardctl(&args).or_fail("guardctl");
        cmd::as_user(&mut cmd, NOBODY, NOBODY);
        let out = cmd::run(&mut cmd, COMMAND_DEADLINE).or_fail("guardctl as nobody");
        assert_eq!(out.code(), Some(1), "{}", out.describe());
        assert!(
            out.stderr.to_lowercase().contains("permission"),
            "says why: {}",
            out.describe()
        );
    }
    // An authorizer may Authorize but is no admin.
    let other = service_v4(1).to_string();
    let (out, json) = test_client(&env.fwd, AUTHORIZER, &["--ip", &other, "--ttl", "60"]);
    assert!(out.success(), "{}", out.describe());
    assert_eq!(json["results"][0]["outcome"], "OUTCOME_GRANTED", "{json}");
    let mut cmd = env.fwd.guardctl(&["allow", &ip]).or_fail("guardctl");
    cmd::as_user(&mut cmd, AUTHORIZER, AUTHORIZER);
    let out = cmd::run(&mut cmd, COMMAND_DEADLINE).or_fail("guardctl as authorizer");
    assert_eq!(out.code(), Some(1), "{}", out.describe());

    // Nothing was opened for the denied callers.
    probe::expect_tcp_refused(&env.topo.fwd, target).or_fail("denied target stays closed");
    assert!(!in_kernel(&env, target));
    let manual = nft::set_keys(&env.topo.fwd, env.fwd.table(), "manual4").or_fail("manual4");
    assert!(manual.is_empty(), "{manual:?}");
    probe::expect_tcp_open(&env.topo.fwd, service_v4(1)).or_fail("authorizer's grant");

    // Every denial is audited with the caller's uid.
    let hist = env
        .fwd
        .client()
        .or_fail("client")
        .history("")
        .or_fail("history");
    let denied = |uid: u32| {
        hist.iter()
            .filter(|e| e.kind == EventKind::Denied as i32 && e.uid == i64::from(uid))
            .count()
    };
    assert!(
        denied(NOBODY) >= 3,
        "authorize, allow, revoke by nobody: {hist:?}"
    );
    assert!(denied(AUTHORIZER) >= 1, "allow by the authorizer: {hist:?}");
}

// === 7. gateway ===

#[test]
fn gateway_per_client_grant_opens_only_to_that_client() {
    let env = gateway(true);
    let a = env.topo.client_a().or_fail("A");
    let b = env.topo.client_b().or_fail("B");
    let (v4, v6) = (service_v4(0), service_v6(0));
    let mut c = env.fwd.client().or_fail("client");
    for (ip, client) in [(v4, IpAddr::V4(a.v4)), (v6, IpAddr::V6(a.v6))] {
        let resp = c
            .authorize_req(AuthorizeRequest {
                grants: vec![grant(ip, 300)],
                qname: "a-only.example.".into(),
                client: guard_proto::ip_to_bytes(client),
                reason: "e2e".into(),
            })
            .or_fail("authorize for A");
        assert_eq!(outcomes(&resp), vec![Outcome::Granted], "{resp:?}");
    }
    for ip in [v4, v6] {
        probe::expect_tcp_open(&a.ns, ip).or_fail("A reaches its grant");
        probe::expect_udp_open(&a.ns, ip).or_fail("A reaches its grant (udp)");
        probe::expect_tcp_refused(&b.ns, ip).or_fail("B does not");
        probe::expect_udp_refused(&b.ns, ip).or_fail("B does not (udp)");
    }
    let table = env.fwd.table();
    let ns = &env.topo.fwd;
    assert!(nft::set_contains(ns, table, "auth4c", &format!("{} . {v4}", a.v4)).or_fail("auth4c"));
    assert!(nft::set_contains(ns, table, "auth6c", &format!("{} . {v6}", a.v6)).or_fail("auth6c"));
    assert!(
        nft::set_keys(ns, table, "auth4")
            .or_fail("auth4")
            .is_empty()
    );

    // Without the client, a per-client grant cannot be scoped: refused, nothing opened.
    let other = service_v4(1);
    match c.authorize(&[(other, 300)], "noclient.example.") {
        Err(s) => assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s}"),
        Ok(r) => assert_eq!(outcomes(&r), vec![Outcome::Rejected], "{r:?}"),
    }
    probe::expect_tcp_refused(&a.ns, other).or_fail("A: nothing opened");
    probe::expect_tcp_refused(&b.ns, other).or_fail("B: nothing opened");
}

#[test]
fn gateway_shared_grant_opens_to_every_client() {
    let env = gateway(false);
    let (v4, v6) = (service_v4(0), service_v6(0));
    let mut c = env.fwd.client().or_fail("client");
    let resp = c
        .authorize(&[(v4, 300), (v6, 300)], "shared.example.")
        .or_fail("authorize");
    assert_eq!(outcomes(&resp), vec![Outcome::Granted, Outcome::Granted]);
    for client in &env.topo.clients {
        for ip in [v4, v6] {
            probe::expect_tcp_open(&client.ns, ip).or_fail("granted for everyone");
        }
        probe::expect_tcp_refused(&client.ns, service_v4(1)).or_fail("ungranted v4");
        probe::expect_tcp_refused(&client.ns, service_v6(1)).or_fail("ungranted v6");
    }
}

// === 8. invalid input ===

#[test]
fn invalid_addresses_are_rejected_explained_audited_and_never_opened() {
    let env = local(FwdConfig::local());
    let mut c = env.fwd.client().or_fail("client");
    let bad: Vec<IpAddr> = [
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "255.255.255.255",
        "169.254.169.254",
    ]
    .iter()
    .map(|s| s.parse().or_fail("ip"))
    .collect();
    let good = service_v4(0);
    let mut grants: Vec<_> = bad.iter().map(|&ip| grant(ip, 60)).collect();
    grants.push(guard_proto::v1::Grant {
        ip: vec![192, 0, 2],
        ttl_s: 60,
    });
    grants.push(grant(good, 60));
    let resp = c
        .authorize_req(AuthorizeRequest {
            grants,
            qname: "evil.example.".into(),
            client: Vec::new(),
            reason: "e2e".into(),
        })
        .or_fail("authorize");
    assert_eq!(resp.results.len(), bad.len() + 2, "{resp:?}");
    let (last, rejected) = resp.results.split_last().or_fail("results");
    for r in rejected {
        assert_eq!(r.outcome, Outcome::Rejected as i32, "{r:?}");
        assert!(!r.error.is_empty(), "rejection explained: {r:?}");
        assert_eq!(r.expires_unix_ms, 0, "{r:?}");
    }
    assert_eq!(
        last.outcome,
        Outcome::Granted as i32,
        "the valid one: {last:?}"
    );

    let table = env.fwd.table();
    assert_eq!(
        nft::set_keys(&env.topo.fwd, table, "auth4").or_fail("auth4"),
        vec![good.to_string()]
    );
    assert!(
        nft::set_keys(&env.topo.fwd, table, "auth6")
            .or_fail("auth6")
            .is_empty()
    );
    let hist = c.history("").or_fail("history");
    for ip in &bad {
        assert!(
            events_of(&hist, EventKind::Rejected, &ip.to_string()) >= 1,
            "no REJECTED event for {ip}: {hist:?}"
        );
    }
    assert!(
        events_of(&hist, EventKind::Rejected, "") > bad.len(),
        "3-byte ip audited too"
    );
    assert_eq!(c.list().or_fail("list").len(), 1);
}

#[test]
fn huge_ttl_is_clamped_to_max() {
    let env = local(FwdConfig::local().set("ttl.max", "1h"));
    let mut c = env.fwd.client().or_fail("client");
    let ip = service_v4(0);
    let before = now_unix_ms();
    let resp = c
        .authorize(&[(ip, u32::MAX)], "long.example.")
        .or_fail("authorize");
    let after = now_unix_ms();
    let r = resp.results.first().or_fail("result");
    assert_eq!(r.outcome, Outcome::Granted as i32, "{r:?}");
    assert_eq!(r.effective_ttl_s, 3600, "{r:?}");
    // max + margin, with a second of slack for clock rounding.
    assert!(r.expires_unix_ms <= after + (3600 + 1 + 1) * 1000, "{r:?}");
    assert!(r.expires_unix_ms >= before + 3600 * 1000, "{r:?}");
    let elems = nft::set_elements(&env.topo.fwd, env.fwd.table(), "auth4").or_fail("auth4");
    let e = elems
        .iter()
        .find(|e| e.key == ip.to_string())
        .or_fail("in kernel");
    assert!(e.timeout_s.is_some_and(|t| t <= 3602), "{e:?}");
}

#[test]
fn oversized_batch_is_refused_whole() {
    let env = local(FwdConfig::local().set("limits.max_batch", 4));
    let mut c = env.fwd.client().or_fail("client");
    let five: Vec<(IpAddr, u32)> = (0..5).map(|i| (service_v4(i), 60)).collect();
    let err = c
        .authorize(&five, "big.example.")
        .err()
        .or_fail("a batch of 5 over max_batch 4 must fail");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(!err.message().is_empty());
    assert!(
        nft::set_keys(&env.topo.fwd, env.fwd.table(), "auth4")
            .or_fail("auth4")
            .is_empty()
    );
    assert!(c.list().or_fail("list").is_empty());
    probe::expect_tcp_refused(&env.topo.fwd, service_v4(0)).or_fail("nothing opened");
    // The limit itself is fine.
    let four = c.authorize(&five[..4], "ok.example.").or_fail("batch of 4");
    assert_eq!(outcomes(&four), vec![Outcome::Granted; 4]);
}

#[test]
fn validate_names_every_bad_key_and_exits_64() {
    let topo = Topology::local().or_fail("topology");
    let fwd_bin = guard_tests::bin("fwd").or_fail("fwd binary");
    let good = Fwd::prepare(&fwd_bin, &topo.fwd, FwdConfig::local()).or_fail("prepare");
    let out = good
        .run_once(&topo.fwd, &["--validate"])
        .or_fail("validate");
    assert_eq!(out.code(), Some(0), "{}", out.describe());

    let bad = FwdConfig::local()
        .set("table", "no spaces allowed")
        .set("socket_mode", "999")
        .set("limits.max_batch", 0)
        .set("never.cidrs", vec!["not-a-cidr"])
        .set("allow.upstreams", vec!["192.0.2.53"]);
    let bad = Fwd::prepare(&fwd_bin, &topo.fwd, bad).or_fail("prepare");
    let out = bad.run_once(&topo.fwd, &["--validate"]).or_fail("validate");
    assert_eq!(out.code(), Some(64), "{}", out.describe());
    for key in [
        "table",
        "socket_mode",
        "limits.max_batch",
        "never.cidrs",
        "allow.upstreams",
    ] {
        assert!(
            out.stderr.contains(key),
            "{key} not named:\n{}",
            out.describe()
        );
    }
    assert!(!nft::table_exists(&topo.fwd, "guard").or_fail("tables"));
}

#[test]
fn unknown_config_key_is_a_usage_error() {
    let topo = Topology::local().or_fail("topology");
    let fwd_bin = guard_tests::bin("fwd").or_fail("fwd binary");
    let cfg = FwdConfig::local().set("ttl.bogus_key", "1s");
    let fwd = Fwd::prepare(&fwd_bin, &topo.fwd, cfg).or_fail("prepare");
    for args in [&["--validate"][..], &[][..]] {
        let out = fwd.run_once(&topo.fwd, args).or_fail("run");
        assert_eq!(out.code(), Some(64), "{}", out.describe());
        assert!(out.stderr.contains("bogus_key"), "{}", out.describe());
    }
    assert!(!nft::table_exists(&topo.fwd, "guard").or_fail("tables"));
}

#[test]
fn unusable_database_fails_with_a_clear_message() {
    let topo = Topology::local().or_fail("topology");
    let fwd_bin = guard_tests::bin("fwd").or_fail("fwd binary");
    let dir = guard_tests::fwd::test_dir().or_fail("tempdir");
    let garbage = dir.path().join("garbage.db");
    write_file(&garbage, &[0x5a; 8192]).or_fail("write garbage");
    let missing = dir.path().join("no/such/dir/fwd.db");
    for db in [&garbage, &missing] {
        let cfg = FwdConfig::local().set("database", db.to_string_lossy().as_ref());
        let fwd = Fwd::prepare(&fwd_bin, &topo.fwd, cfg).or_fail("prepare");
        let out = fwd.run_once(&topo.fwd, &[]).or_fail("fwd must exit");
        assert!(!out.success(), "{}", out.describe());
        assert_ne!(
            out.code(),
            Some(64),
            "a runtime failure, not usage: {}",
            out.describe()
        );
        assert!(
            out.stderr.contains(&db.to_string_lossy().into_owned()),
            "names the database: {}",
            out.describe()
        );
        // Nothing is left serving.
        assert!(std::os::unix::net::UnixStream::connect(fwd.socket()).is_err());
    }
}

// === 9. fail closed ===

#[test]
fn sigterm_keeps_the_table_and_remove_table_drops_it() {
    let mut env = local(FwdConfig::local());
    let ns = &env.topo.fwd;
    let status = env.fwd.stop().or_fail("SIGTERM");
    assert!(status.success(), "SIGTERM exits 0: {status}");
    assert!(
        env.fwd
            .notifications()
            .iter()
            .any(|m| m.contains("STOPPING=1")),
        "STOPPING=1 sent"
    );
    assert!(
        nft::table_exists(ns, env.fwd.table()).or_fail("tables"),
        "table kept"
    );
    probe::expect_tcp_refused(ns, service_v4(0)).or_fail("fail closed while stopped");
    probe::expect_udp_refused(ns, service_v6(0)).or_fail("fail closed while stopped");

    let out = env
        .fwd
        .run_once(ns, &["--remove-table"])
        .or_fail("--remove-table");
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        !nft::table_exists(ns, env.fwd.table()).or_fail("tables"),
        "table removed"
    );
    probe::expect_tcp_open(ns, service_v4(0)).or_fail("unfiltered after removal");
}

/// tonic's graceful shutdown waits for open streams; dnsd keeps a WatchRevocations stream
/// open for as long as it runs, so fwd must end those streams itself or SIGTERM would hang
/// until systemd's stop timeout. The subscriber sees its stream end.
#[test]
fn sigterm_exits_while_a_revocation_watcher_is_connected() {
    let mut env = local(FwdConfig::local());
    let c = env.fwd.client().or_fail("client");
    let mut stream = c
        .block_on(
            c.raw()
                .watch_revocations(guard_proto::v1::WatchRevocationsRequest {}),
        )
        .or_fail("watch")
        .into_inner();
    // Subscribed: the catch-all first message has arrived.
    let first = c.block_on(stream.message()).or_fail("first message");
    assert_eq!(first.or_fail("a first message").cidr, "0.0.0.0/0");
    // stop() gives up (and kills fwd) after READY_DEADLINE: a hang fails here.
    let status = env.fwd.stop().or_fail("SIGTERM with a watcher connected");
    assert!(status.success(), "SIGTERM exits 0: {status}");
    // The watcher is told: its stream ends (cleanly or with an error), it does not hang.
    while let Ok(Some(r)) = c.block_on(stream.message()) {
        assert!(r.cidr == "::/0", "only the catch-alls were sent: {r:?}");
    }
}

// === 10. concurrency ===

/// AuthorizeMany: each request is judged as if sent alone (a request refused whole does not
/// sink the others), every accepted grant is in the kernel when the call returns, and a call
/// over limits.max_batch is refused whole and audited.
#[test]
fn authorize_many_commits_each_request_and_bounds_the_call() {
    use guard_proto::v1::AuthorizeManyRequest;
    let env = local(FwdConfig::local().set("limits.max_batch", 4));
    let ns = &env.topo.fwd;
    let c = env.fwd.client().or_fail("client");
    let (a, b) = (service_v4(2), service_v6(2));
    let req = |grants: Vec<IpAddr>, qname: &str| AuthorizeRequest {
        grants: grants.into_iter().map(|ip| grant(ip, 300)).collect(),
        qname: qname.to_owned(),
        client: Vec::new(),
        reason: "answer".to_owned(),
    };
    let resp = c
        .block_on(c.raw().authorize_many(AuthorizeManyRequest {
            requests: vec![
                req(vec![a], "a.example."),
                req(vec![], "empty.example."),
                req(vec![b, "224.0.0.1".parse().or_fail("ip")], "b.example."),
            ],
        }))
        .or_fail("authorize_many")
        .into_inner();
    assert_eq!(resp.responses.len(), 3, "{resp:?}");
    let one = &resp.responses[0];
    assert!(one.error.is_empty(), "{one:?}");
    assert_eq!(one.results.len(), 1);
    assert_eq!(one.results[0].outcome, Outcome::Granted as i32, "{one:?}");
    let empty = &resp.responses[1];
    assert!(
        empty.results.is_empty() && !empty.error.is_empty(),
        "{empty:?}"
    );
    let two = &resp.responses[2];
    assert!(two.error.is_empty(), "{two:?}");
    assert_eq!(two.results[0].outcome, Outcome::Granted as i32, "{two:?}");
    assert_eq!(two.results[1].outcome, Outcome::Rejected as i32, "{two:?}");
    // Committed when the call returned.
    for ip in [a, b] {
        assert!(in_kernel(&env, ip), "{ip} in the kernel set");
        probe::expect_tcp_open(ns, ip).or_fail("granted through AuthorizeMany");
    }
    // More grants in total than limits.max_batch: refused whole, nothing committed, audited.
    let c3 = service_v4(3);
    let err = c
        .block_on(c.raw().authorize_many(AuthorizeManyRequest {
            requests: vec![
                req(vec![c3, service_v6(3)], "x."),
                req(vec![a, b, c3], "y."),
            ],
        }))
        .expect_err("over max_batch");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("max_batch"), "{err:?}");
    assert!(!in_kernel(&env, c3));
    probe::expect_tcp_refused(ns, c3).or_fail("nothing from a refused call");
    let mut c2 = env.fwd.client().or_fail("client");
    let history = c2.history("").or_fail("history");
    assert!(
        history
            .iter()
            .any(|e| e.kind == EventKind::Rejected as i32 && e.reason.contains("AuthorizeMany")),
        "audited: {history:?}"
    );
}

/// nettrust answered the DNS client before the kernel set held the address, so the client's
/// first connection raced the firewall and was refused. fwd must reply only after commit:
/// every one of 32 concurrent callers finds the address open right after its own reply.
#[test]
fn nettrust_race_reply_before_kernel_commit() {
    const CALLERS: usize = 32;
    let env = local(FwdConfig::local());
    let ns = &env.topo.fwd;
    // Several rounds, each a fresh address, to give a reply-before-commit bug many chances.
    for ip in [service_v4(5), service_v6(5), service_v4(6), service_v6(6)] {
        let barrier = Barrier::new(CALLERS);
        let results: Vec<Result<(Outcome, Verdict), String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..CALLERS)
                .map(|i| {
                    let barrier = &barrier;
                    let socket = env.fwd.socket();
                    s.spawn(move || -> Result<(Outcome, Verdict), String> {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .map_err(|e| e.to_string());
                        let channel = rt.as_ref().map_err(Clone::clone).and_then(|rt| {
                            rt.block_on(guard_proto::connect_unix(socket))
                                .map_err(|e| e.to_string())
                        });
                        // Everyone waits here, ready or not, so the barrier always opens.
                        barrier.wait();
                        let (rt, channel) = (rt?, channel?);
                        let mut client = FirewallClient::new(channel);
                        let resp = rt
                            .block_on(client.authorize(AuthorizeRequest {
                                grants: vec![grant(ip, 300)],
                                qname: format!("race{i}.example."),
                                client: Vec::new(),
                                reason: "race".into(),
                            }))
                            .map_err(|e| e.to_string())?
                            .into_inner();
                        // Right after this caller's reply, before anything else.
                        let verdict = probe::tcp_verdict(ns, ip);
                        let outcome = resp
                            .results
                            .first()
                            .and_then(|r| Outcome::try_from(r.outcome).ok())
                            .unwrap_or(Outcome::Unspecified);
                        Ok((outcome, verdict))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("caller panicked".into())))
                .collect()
        });
        let mut granted = 0;
        for (i, r) in results.iter().enumerate() {
            let (outcome, verdict) = r.as_ref().or_fail(&format!("caller {i}"));
            assert!(
                matches!(
                    outcome,
                    Outcome::Granted | Outcome::Extended | Outcome::Unchanged
                ),
                "caller {i}: {outcome:?}"
            );
            assert!(
                verdict.is_open(),
                "caller {i} ({outcome:?}) found {ip} not open right after its reply: {verdict:?}"
            );
            granted += usize::from(*outcome == Outcome::Granted);
        }
        assert!(granted >= 1, "someone granted {ip}");
        assert!(in_kernel(&env, ip));
    }
}

/// SIGHUP applies a new valid configuration (static allowances) without a restart, keeps grants,
/// and refuses an invalid file or a restart-only change while fwd keeps running on the old one.
#[test]
fn sighup_reloads_allowances_and_keeps_old_config_when_invalid() {
    let env = local(FwdConfig::local());
    let granted = service_v4(0);
    let static_ip = service_v4(1);
    let mut c = env.fwd.client().or_fail("client");
    c.authorize(&[(granted, 300)], "reload.test")
        .or_fail("authorize");
    probe::expect_tcp_refused(&env.topo.fwd, static_ip).or_fail("static address before reload");

    let hup = |fwd: &Fwd| {
        let pid = fwd.pid().or_fail("fwd pid");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .or_fail("send SIGHUP");
    };
    let config = std::fs::read_to_string(env.fwd.config_path()).or_fail("read config");
    // Valid change: a static allowance for the second service.
    let with_allow = format!("{config}\n[allow]\ncidrs = [\"{static_ip}/32\"]\n");
    write_file(env.fwd.config_path(), with_allow.as_bytes()).or_fail("write config");
    hup(&env.fwd);
    env.fwd
        .wait_log("configuration reloaded", Duration::from_secs(30))
        .or_fail("reload logged");
    probe::expect_tcp_open(&env.topo.fwd, static_ip).or_fail("static address after reload");
    probe::expect_tcp_open(&env.topo.fwd, granted).or_fail("grant survives reload");

    // Invalid file: refused, the running ruleset stays.
    write_file(env.fwd.config_path(), b"[ttl]\nmin = \"forever\"\n").or_fail("write bad config");
    hup(&env.fwd);
    env.fwd
        .wait_log("forever", Duration::from_secs(30))
        .or_fail("bad reload logged");
    probe::expect_tcp_open(&env.topo.fwd, static_ip).or_fail("old config kept after a bad reload");

    // Restart-only key: refused with the key named.
    let gw = format!("{with_allow}\n").replace("mode = \"local\"", "mode = \"gateway\"");
    write_file(env.fwd.config_path(), gw.as_bytes()).or_fail("write mode change");
    hup(&env.fwd);
    env.fwd
        .wait_log("changing `mode` needs a restart", Duration::from_secs(30))
        .or_fail("mode change refused");
    probe::expect_tcp_open(&env.topo.fwd, static_ip).or_fail("still local mode");
    let st = c.status().or_fail("status");
    assert_eq!(st.mode, "local");
}

/// Apps that keep reusing an address after its TTL (connection pools, JVM caches) must not be cut
/// off while their flows live: with `renew_live_flows`, a grant that still carries a conntrack
/// flow is renewed, again and again; one without flows expires as usual.
///
/// Each renewal re-adds the element with the same timeout (`renew_ttl`), and the kernel must
/// restart the countdown every time: it once did not (a re-add with an unchanged timeout kept
/// the old expiry), and the grant ended one renewal after the first while fwd recorded it
/// renewed. With a 10 s `renew_ttl`, renewals come about 6 s apart (a grant is renewed once it
/// is within two sweeps and the grace of its expiry), so after the second the kernel's expiry
/// must be about 10 s away, not the 4 s the first one left.
#[test]
fn grants_with_live_flows_are_renewed_and_idle_ones_expire() {
    let env = local(
        FwdConfig::local()
            .set("expiry.renew_live_flows", true)
            .set("expiry.renew_ttl", "10s"),
    );
    let ns = &env.topo.fwd;
    let mut c = env.fwd.client().or_fail("client");
    let (busy, idle) = (service_v4(5), service_v4(6));
    let r = c
        .authorize(&[(busy, 3), (idle, 3)], "pool.example.")
        .or_fail("authorize");
    let first_expiry = r.results[0].expires_unix_ms;
    let mut flow = probe::tcp_echo(ns, busy, PROBE_TIMEOUT).or_fail("flow to the busy address");

    // The expiries the busy grant's renewals set, latest last.
    let renewals = |c: &mut guard_tests::fwd::FwdClient| -> Vec<u64> {
        let mut r: Vec<u64> = c
            .history(&busy.to_string())
            .or_fail("history")
            .iter()
            .filter(|e| e.kind == EventKind::Renewed as i32)
            .map(|e| e.expires_unix_ms)
            .collect();
        r.sort_unstable();
        r
    };
    let mut renewed = Vec::new();
    guard_tests::wait_until("two renewals", EXPIRY_DEADLINE, || {
        renewed = renewals(&mut c);
        Ok(renewed.len() >= 2)
    })
    .or_fail("renewals");
    let elem = nft::set_elements(&env.topo.fwd, env.fwd.table(), auth_set(busy))
        .or_fail("nft list set")
        .into_iter()
        .find(|e| e.key == busy.to_string());
    let latest = renewed.last().copied().unwrap_or_default();
    let kernel_expiry = elem
        .as_ref()
        .and_then(|e| e.expires_s)
        .map(|s| now_unix_ms() + s * 1_000);
    assert!(
        kernel_expiry.is_some_and(|k| k + 2_000 >= latest),
        "after renewals to {renewed:?} the kernel has {elem:?}, expiring at {kernel_expiry:?}"
    );
    assert!(
        now_unix_ms() > first_expiry,
        "renewed twice before the first expiry"
    );
    probe::expect_tcp_open(ns, busy).or_fail("a new connection to the renewed address");
    probe::roundtrip(&mut flow, b"pooled", PROBE_TIMEOUT).or_fail("the live flow");

    // The idle grant had no flow: it expired (the sweep records that once the grace is over).
    probe::expect_tcp_refused(ns, idle).or_fail("the idle address");
    let idle_s = idle.to_string();
    guard_tests::wait_until("the idle grant's expiry recorded", EXPIRY_DEADLINE, || {
        let hist = c
            .history(&idle_s)
            .map_err(|e| guard_tests::Error::msg(e.to_string()))?;
        Ok(events_of(&hist, EventKind::Expired, &idle_s) >= 1)
    })
    .or_fail("idle expiry");
    let hist = c.history(&idle_s).or_fail("history");
    assert_eq!(
        events_of(&hist, EventKind::Renewed, &idle_s),
        0,
        "{hist:#?}"
    );
}

/// Started as root with `user` set, fwd keeps only CAP_NET_ADMIN (also ambient, for the nft it
/// execs) under the unprivileged uid, with no_new_privs, and still commits grants.
#[test]
fn root_start_drops_to_user_with_only_cap_net_admin() {
    let topo = Topology::local().or_fail("local topology");
    let _echo = EchoServer::services(&topo.net).or_fail("echo services");
    let state = guard_tests::fwd::test_dir().or_fail("state dir");
    nix::unistd::chown(
        state.path(),
        Some(nix::unistd::Uid::from_raw(NOBODY)),
        Some(nix::unistd::Gid::from_raw(NOBODY)),
    )
    .or_fail("chown state dir");
    let db = state.path().join("fwd.db");
    let fwd = Fwd::start(
        &topo.fwd,
        FwdConfig::local()
            .set("user", "nobody")
            .set("database", db.display().to_string()),
    )
    .or_fail("start fwd as nobody");
    let pid = fwd.pid().or_fail("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).or_fail("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert_eq!(
        field("Uid:"),
        format!("{NOBODY} {NOBODY} {NOBODY} {NOBODY}"),
        "{status}"
    );
    for caps in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(caps), "0000000000001000", "{caps} in {status}");
    }
    assert_eq!(field("NoNewPrivs:"), "1");
    let mut c = fwd.client().or_fail("client");
    c.authorize(&[(service_v4(7), 60)], "drop.example.")
        .or_fail("authorize as nobody");
    probe::expect_tcp_open(&topo.fwd, service_v4(7)).or_fail("granted address");
    c.status().or_fail("status as nobody (netlink counters)");
}
