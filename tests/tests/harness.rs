//! Self-tests of the end-to-end harness: namespaces are removed, topologies route, probes classify reject vs drop, the Fwd guard handles a daemon's life cycle.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use guard_tests::probe::{self, Verdict};
use guard_tests::topology::{self, service_v4, service_v6};
use guard_tests::{EchoServer, Fwd, FwdConfig, Netns, OrFail, Topology, nft};

fn netns_path(name: &str) -> std::path::PathBuf {
    Path::new("/run/netns").join(name)
}

#[test]
fn netns_is_removed_on_drop() {
    let name = format!("{}-solo", guard_tests::netns::unique_prefix());
    {
        let ns = Netns::new(&name).or_fail("create netns");
        assert!(netns_path(ns.name()).exists());
        let lo = ns.ip(&["-j", "link", "show", "lo"]).or_fail("ip link");
        assert!(lo.contains("\"UP\""), "lo is up: {lo}");
    }
    assert!(!netns_path(&name).exists(), "netns {name} left behind");
}

#[test]
fn netns_is_removed_when_the_test_panics() {
    let name = format!("{}-panic", guard_tests::netns::unique_prefix());
    let n = name.clone();
    let r = std::panic::catch_unwind(move || {
        let _ns = Netns::new(&n).or_fail("create netns");
        std::panic::resume_unwind(Box::new("deliberate"));
    });
    assert!(r.is_err());
    assert!(!netns_path(&name).exists(), "netns {name} left behind");
}

#[test]
fn topology_is_removed_on_drop() {
    let names: Vec<String> = {
        let topo = Topology::gateway().or_fail("gateway topology");
        topo.namespaces()
            .iter()
            .map(|n| n.name().to_owned())
            .collect()
    };
    assert_eq!(names.len(), 4);
    for n in names {
        assert!(!netns_path(&n).exists(), "netns {n} left behind");
    }
}

#[test]
fn local_topology_reaches_every_service_tcp_and_udp() {
    let topo = Topology::local().or_fail("local topology");
    let _echo = EchoServer::services(&topo.net).or_fail("echo");
    for ip in topology::all_services() {
        probe::expect_tcp_open(&topo.fwd, ip).or_fail("tcp");
        probe::expect_udp_open(&topo.fwd, ip).or_fail("udp");
    }
}

#[test]
fn gateway_topology_routes_both_clients_v4_and_v6() {
    let topo = Topology::gateway().or_fail("gateway topology");
    let _echo = EchoServer::services(&topo.net).or_fail("echo");
    for c in &topo.clients {
        for ip in [service_v4(0), service_v6(0), service_v4(5), service_v6(5)] {
            probe::expect_tcp_open(&c.ns, ip).or_fail("tcp");
            probe::expect_udp_open(&c.ns, ip).or_fail("udp");
        }
    }
    // The far side sees the client's own address: no NAT, so per-client rules can match it.
    let a = topo.client_a().or_fail("A");
    let s = probe::tcp_echo(&a.ns, service_v4(1), probe::PROBE_TIMEOUT).or_fail("connect");
    assert_eq!(s.local_addr().or_fail("local addr").ip(), IpAddr::V4(a.v4));
}

#[test]
fn probes_tell_reject_from_drop() {
    let topo = Topology::local().or_fail("local topology");
    let _echo = EchoServer::services(&topo.net).or_fail("echo");
    // Our own table inside the test namespace (never the host's ruleset).
    let rules = "table inet probe {
        chain out {
            type filter hook output priority 0;
            ip daddr 192.0.2.10 reject with icmpx admin-prohibited
            ip6 daddr 2001:db8:1::10 reject with icmpx admin-prohibited
            ip daddr 192.0.2.11 reject with tcp reset
            ip daddr 192.0.2.12 reject
            ip6 daddr 2001:db8:1::12 reject
            ip daddr 192.0.2.13 drop
        }
        chain in {
            type filter hook input priority 0;
            ip saddr 192.0.2.14 drop
        }
    }";
    let file = tempfile::NamedTempFile::new().or_fail("tempfile");
    std::fs::write(file.path(), rules).or_fail("write rules");
    let path = file.path().to_string_lossy().into_owned();
    topo.fwd
        .exec_ok(&["nft", "-f", &path])
        .or_fail("load probe rules");

    for ip in [
        service_v4(0),
        service_v6(0),
        service_v4(1),
        service_v4(2),
        service_v6(2),
    ] {
        probe::expect_tcp_refused(&topo.fwd, ip).or_fail("tcp refused");
    }
    for ip in [service_v4(0), service_v6(0), service_v4(2), service_v6(2)] {
        probe::expect_udp_refused(&topo.fwd, ip).or_fail("udp refused");
    }
    // Dropped SYNs (leaving) and dropped SYN-ACKs (coming back) time out: never "refused".
    let short = Duration::from_secs(1);
    for ip in [service_v4(3), service_v4(4)] {
        let v = Verdict::of(&probe::tcp_echo(&topo.fwd, ip, short));
        assert!(matches!(v, Verdict::TimedOut), "{ip}: {v:?}");
    }
    let v = Verdict::of(&probe::udp_echo(
        &topo.fwd,
        probe::echo_addr(service_v4(4)),
        short,
    ));
    assert!(matches!(v, Verdict::TimedOut), "udp: {v:?}");
    probe::expect_tcp_open(&topo.fwd, service_v4(5)).or_fail("unrelated address");
}

#[test]
fn nft_reads_sets_as_the_kernel_lists_them() {
    let ns = Netns::new(&format!("{}-nft", guard_tests::netns::unique_prefix())).or_fail("netns");
    let rules = "table inet t {
        set plain { type ipv4_addr; flags timeout; }
        set pairs { type ipv4_addr . ipv4_addr; flags timeout; }
        set nets { type ipv6_addr; flags interval; }
    }";
    let file = tempfile::NamedTempFile::new().or_fail("tempfile");
    std::fs::write(file.path(), rules).or_fail("write rules");
    let path = file.path().to_string_lossy().into_owned();
    ns.exec_ok(&["nft", "-f", &path]).or_fail("load");
    ns.exec_ok(&["nft", "add element inet t plain { 192.0.2.10 timeout 90s }"])
        .or_fail("add");
    ns.exec_ok(&[
        "nft",
        "add element inet t pairs { 198.51.100.2 . 192.0.2.10 timeout 90s }",
    ])
    .or_fail("add");
    ns.exec_ok(&["nft", "add element inet t nets { 2001:db8:1::/64 }"])
        .or_fail("add");

    assert!(nft::table_exists(&ns, "t").or_fail("tables"));
    assert!(!nft::table_exists(&ns, "guard").or_fail("tables"));
    let plain = nft::set_elements(&ns, "t", "plain").or_fail("plain");
    assert_eq!(plain.len(), 1);
    assert_eq!(plain[0].key, "192.0.2.10");
    assert_eq!(plain[0].timeout_s, Some(90));
    assert!(plain[0].expires_s.is_some_and(|e| e <= 90));
    assert!(nft::set_contains(&ns, "t", "pairs", "198.51.100.2 . 192.0.2.10").or_fail("pairs"));
    assert_eq!(
        nft::set_keys(&ns, "t", "nets").or_fail("nets"),
        vec!["2001:db8:1::/64".to_owned()]
    );
    assert!(nft::set_elements(&ns, "t", "missing").is_err());
}

#[test]
fn fwd_guard_runs_a_daemon_through_its_life_cycle() {
    let fake = Path::new(env!("CARGO_BIN_EXE_guard-fake-daemon"));
    let topo = Topology::local().or_fail("topology");
    let mut fwd = Fwd::start_bin(fake, &topo.fwd, FwdConfig::local()).or_fail("start");
    let first = fwd.pid().or_fail("pid");
    assert!(fwd.socket().exists(), "socket bound before READY");
    fwd.wait_log("fake ready", Duration::from_secs(5))
        .or_fail("log line");

    // The daemon really runs in the namespace.
    let pids = std::process::Command::new("ip")
        .args(["netns", "pids", topo.fwd.name()])
        .output()
        .or_fail("ip netns pids");
    assert!(String::from_utf8_lossy(&pids.stdout).contains(&first.to_string()));

    let status = fwd.stop().or_fail("stop");
    assert!(status.success(), "SIGTERM exit: {status}");
    assert!(fwd.notifications().iter().any(|m| m.contains("STOPPING=1")));
    assert!(!Path::new("/proc").join(first.to_string()).exists());

    fwd.restart().or_fail("restart");
    let second = fwd.pid().or_fail("pid");
    assert_ne!(first, second);
    fwd.kill9().or_fail("kill9");
    assert!(!Path::new("/proc").join(second.to_string()).exists());
    fwd.restart().or_fail("restart after kill");
    let third = fwd.pid().or_fail("pid");
    guard_tests::wait_until("three starts logged", Duration::from_secs(10), || {
        Ok(fwd.log().matches("fake ready").count() >= 3)
    })
    .or_fail("log");
    drop(fwd);
    assert!(
        !Path::new("/proc").join(third.to_string()).exists(),
        "Drop kills the daemon"
    );
}

#[test]
fn fwd_guard_reports_a_daemon_that_exits_before_ready() {
    let fake = Path::new(env!("CARGO_BIN_EXE_guard-fake-daemon"));
    let topo = Topology::local().or_fail("topology");
    let err = Fwd::start_bin(fake, &topo.fwd, FwdConfig::local().set("fake_exit_code", 3))
        .err()
        .or_fail("start must fail");
    let msg = err.to_string();
    assert!(msg.contains("before READY=1"), "{msg}");
    assert!(msg.contains("fake failing"), "log included: {msg}");
}

#[test]
fn missing_binary_says_how_to_build_it() {
    let err = guard_tests::bin("no-such-guard-binary")
        .err()
        .or_fail("must fail");
    assert!(
        err.to_string()
            .contains("run `cargo build --workspace --bins` first"),
        "{err}"
    );
}

#[test]
fn config_renders_nested_keys() {
    let cfg = FwdConfig::gateway(true)
        .set("ttl.max", "1h")
        .set("limits.max_batch", 4)
        .set("never.cidrs", vec!["169.254.0.0/16"]);
    let text = cfg.render();
    let parsed: toml::Table = text.parse().or_fail("renders valid TOML");
    assert_eq!(parsed["mode"].as_str(), Some("gateway"));
    assert_eq!(parsed["per_client"].as_bool(), Some(true));
    assert_eq!(parsed["ttl"]["max"].as_str(), Some("1h"));
    assert_eq!(parsed["ttl"]["min"].as_str(), Some("1s"));
    assert_eq!(parsed["limits"]["max_batch"].as_integer(), Some(4));
    assert_eq!(parsed["access"]["authorizer_uids"][0].as_integer(), Some(0));
}
