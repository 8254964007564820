//! Drives the real guardctl binary against in-process fake fwd and dnsd servers: output in
//! both forms, what reaches the daemons, error messages and exit codes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod fake;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;

use fake::{DENIED, Daemons, Fwd, guardctl};
use serde_json::{Value, json};

fn both_up() -> Daemons {
    Daemons::start(Fwd::Up, true)
}

fn cells(line: &str) -> Vec<&str> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

// === list ===

#[test]
fn list_prints_a_table_with_footer() {
    let d = both_up();
    let out = d.run(&["list"]);
    let lines: Vec<&str> = out.ok().lines().collect();
    assert_eq!(lines.len(), 4, "{out:#?}");
    assert_eq!(
        cells(lines[0]),
        ["IP", "NAMES", "CLIENT", "EXPIRES-IN", "SOURCE", "COMMENT"]
    );
    let row = cells(lines[1]);
    assert_eq!(row[..3], ["192.0.2.7", "example.com,www.example.com", "-"]);
    assert!(row[3].starts_with("5m "), "{row:?}");
    assert_eq!(row[4], "dns");
    assert_eq!(
        cells(lines[2]),
        [
            "198.51.100.0/24",
            "-",
            "10.0.0.5",
            "never",
            "manual",
            "backup target"
        ]
    );
    assert_eq!(lines[3], "2 of 7 grants");
    assert_eq!(out.stderr, "");
}

#[test]
fn list_json_has_stable_fields_and_both_time_forms() {
    let d = both_up();
    let v = d.run(&["list", "--json"]).json();
    assert_eq!(v["returned"], 2);
    assert_eq!(v["total"], 7);
    let g = &v["grants"][0];
    let keys: Vec<&str> = g.as_object().unwrap().keys().map(String::as_str).collect();
    let mut expected = vec![
        "ip",
        "names",
        "client",
        "source",
        "comment",
        "first_granted_unix_ms",
        "first_granted_rfc3339",
        "last_granted_unix_ms",
        "last_granted_rfc3339",
        "expires_unix_ms",
        "expires_rfc3339",
    ];
    expected.sort_unstable();
    assert_eq!(keys, expected);
    assert_eq!(g["ip"], "192.0.2.7");
    assert_eq!(g["client"], Value::Null);
    assert!(g["expires_unix_ms"].as_u64().unwrap() > fake::now_ms());
    assert!(g["expires_rfc3339"].as_str().unwrap().ends_with('Z'));
    assert_eq!(v["grants"][1]["expires_unix_ms"], Value::Null);
    assert_eq!(v["grants"][1]["client"], "10.0.0.5");
}

#[test]
fn list_sends_filters_and_limit() {
    let d = both_up();
    let out = d.run(&[
        "list",
        "--cidr",
        "192.0.2.0/24",
        "--name",
        "example.com",
        "--limit",
        "1",
    ]);
    assert!(out.ok().ends_with("1 of 7 grants\n"), "{out:#?}");
    let log = d.log();
    assert_eq!(log.list.len(), 1);
    assert_eq!(log.list[0].cidr, "192.0.2.0/24");
    assert_eq!(log.list[0].name, "example.com");
    assert_eq!(log.list[0].limit, 1);
}

// === allow / revoke ===

#[test]
fn allow_sends_ttl_and_comment() {
    let d = both_up();
    let out = d.run(&[
        "allow",
        "192.0.2.7",
        "--ttl",
        "1h",
        "--comment",
        "vendor update",
    ]);
    let text = out.ok();
    assert!(text.starts_with("allowed 192.0.2.7 until "), "{text}");
    assert!(
        text.ends_with("(in 1h)\n") || text.ends_with("(in 59m 59s)\n"),
        "{text}"
    );
    let log = d.log();
    assert_eq!(log.allow[0].cidr, "192.0.2.7");
    assert_eq!(log.allow[0].ttl_s, 3600);
    assert_eq!(log.allow[0].comment, "vendor update");
}

#[test]
fn allow_json_without_ttl_never_expires() {
    let d = both_up();
    let v = d.run(&["allow", "2001:db8::/48", "--json"]).json();
    assert_eq!(
        v,
        json!({"cidr": "2001:db8::/48", "expires_unix_ms": null, "expires_rfc3339": null})
    );
    assert_eq!(d.log().allow[0].ttl_s, 0);
    let v = d
        .run(&["--json", "allow", "192.0.2.8", "--ttl", "30s"])
        .json();
    assert!(v["expires_unix_ms"].as_u64().unwrap() > fake::now_ms());
    assert!(v["expires_rfc3339"].is_string());
}

#[test]
fn allow_rejected_by_fwd_exits_1_with_its_message() {
    let d = both_up();
    let out = d.run(&["allow", "0.0.0.0/0"]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert_eq!(out.stdout, "");
    assert_eq!(
        out.stderr,
        "guardctl: fwd rejected the request: refusing to allow 0.0.0.0/0: it covers every address\n"
    );
}

#[test]
fn revoke_human_and_json() {
    let d = both_up();
    let out = d.run(&["revoke", "192.0.2.0/24", "--comment", "incident 7"]);
    assert_eq!(
        out.ok(),
        "revoked 2 grants inside 192.0.2.0/24 (established connections are not cut)\n"
    );
    assert_eq!(d.log().revoke[0].comment, "incident 7");
    let out = d.run(&["revoke", "203.0.113.9"]);
    assert_eq!(out.ok(), "nothing to revoke inside 203.0.113.9\n");
    let v = d.run(&["revoke", "192.0.2.7", "--json"]).json();
    assert_eq!(v, json!({"cidr": "192.0.2.7", "revoked": 2}));
}

// === history ===

#[test]
fn history_human_table_in_local_time() {
    let d = both_up();
    let out = d.run(&[
        "history",
        "--ip",
        "192.0.2.0/24",
        "--since",
        "2h",
        "--limit",
        "50",
    ]);
    let lines: Vec<&str> = out.ok().lines().collect();
    assert_eq!(lines.len(), 3, "{out:#?}");
    assert_eq!(
        cells(lines[0]),
        [
            "TIME", "EVENT", "IP", "CLIENT", "NAME", "UID", "PID", "REASON", "EXPIRES"
        ]
    );
    // TZ=UTC in the child.
    assert_eq!(
        cells(lines[1]),
        [
            "2023-11-14T22:13:20+00:00",
            "granted",
            "192.0.2.7",
            "-",
            "example.com",
            "998",
            "1234",
            "answer",
            "-"
        ]
    );
    assert_eq!(
        cells(lines[2]),
        [
            "2023-11-14T21:56:40+00:00",
            "started",
            "-",
            "-",
            "-",
            "-",
            "-",
            "reconciled",
            "-"
        ]
    );
    let log = d.log();
    assert_eq!(log.history[0].ip, "192.0.2.0/24");
    assert_eq!(log.history[0].since_s, 7200);
    assert_eq!(log.history[0].limit, 50);
    assert_eq!(log.history[0].name, "");
}

#[test]
fn history_json() {
    let d = both_up();
    let v = d
        .run(&["history", "--name", "example.com", "--json"])
        .json();
    assert_eq!(
        v["events"][0],
        json!({
            "id": 42,
            "at_unix_ms": 1_700_000_000_000_u64,
            "at_rfc3339": "2023-11-14T22:13:20.000Z",
            "event": "granted",
            "ip": "192.0.2.7",
            "client": null,
            "name": "example.com",
            "uid": 998,
            "pid": 1234,
            "reason": "answer",
            "expires_unix_ms": null,
            "expires_rfc3339": null,
        })
    );
    assert_eq!(v["events"][1]["uid"], Value::Null);
    assert_eq!(d.log().history[0].name, "example.com");
    assert_eq!(d.log().history[0].since_s, 0);
}

// === status ===

#[test]
fn status_human_both_up() {
    let d = both_up();
    let out = d.run(&["status"]);
    let text = out.ok();
    assert!(
        text.starts_with("fwd: up 2h (version 0.1.0, api guard.v1)\n"),
        "{text}"
    );
    assert!(text.contains("  mode          local\n"), "{text}");
    assert!(
        text.contains("  grants        12 IPv4, 3 IPv6, 1 manual\n"),
        "{text}"
    );
    assert!(text.contains("  database      3.0 MiB\n"), "{text}");
    assert!(text.contains("  rejected        5  300 B\n"), "{text}");
    assert!(
        text.contains("\ndnsd: up 59s (version 0.1.0, api guard.v1)\n"),
        "{text}"
    );
    assert!(
        text.contains("  cache      800 hits, 200 misses, 512 entries\n"),
        "{text}"
    );
    assert!(
        text.contains("  authorize  200 calls, 1 failures\n"),
        "{text}"
    );
}

#[test]
fn status_json_both_up() {
    let d = both_up();
    let v = d.run(&["status", "--json"]).json();
    assert_eq!(v["fwd"]["mode"], "local");
    assert_eq!(v["fwd"]["per_client"], false);
    assert_eq!(v["fwd"]["grants_v4"], 12);
    assert_eq!(
        v["fwd"]["counters"],
        json!([{"name": "rejected", "packets": 5, "bytes": 300}])
    );
    assert_eq!(v["fwd"]["db_bytes"], 3 * 1024 * 1024);
    assert_eq!(v["dnsd"]["queries"], 1000);
    assert_eq!(v["dnsd"]["in_flight"], 2);
    assert!(v["fwd"].get("error").is_none());
}

#[test]
fn status_with_dnsd_down_still_exits_0() {
    let d = Daemons::start(Fwd::Up, false);
    let out = d.run(&["status"]);
    let text = out.ok();
    assert!(text.starts_with("fwd: up 2h"), "{text}");
    let expected = format!(
        "\ndnsd: not reachable (cannot reach dnsd at {}: No such file or directory (os error 2) \
         (is guard-dnsd running?))\n",
        d.dnsd_socket.display()
    );
    assert!(text.ends_with(&expected), "{text}");

    let v = d.run(&["status", "--json"]).json();
    assert_eq!(v["fwd"]["mode"], "local");
    let err = v["dnsd"]["error"].as_str().unwrap();
    assert!(err.starts_with("cannot reach dnsd at "), "{err}");
    assert_eq!(v["dnsd"].as_object().unwrap().len(), 1);
}

#[test]
fn status_with_fwd_down_exits_1() {
    let d = Daemons::start(Fwd::Down, true);
    let out = d.run(&["status"]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(
        out.stdout
            .starts_with("fwd: not reachable (cannot reach fwd at "),
        "{out:#?}"
    );
    assert!(out.stdout.contains("dnsd: up 59s"), "{out:#?}");

    let out = d.run(&["status", "--json"]);
    assert_eq!(out.code, 1, "{out:#?}");
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(
        v["fwd"]["error"]
            .as_str()
            .unwrap()
            .contains("(is guard-fwd running?)")
    );
    assert_eq!(v["dnsd"]["queries"], 1000);
}

// === errors ===

#[test]
fn permission_denied_by_fwd_is_mapped() {
    let d = Daemons::start(Fwd::DenyAll, true);
    for args in [
        &["allow", "192.0.2.7"][..],
        &["list"],
        &["history"],
        &["revoke", "192.0.2.7"],
    ] {
        let out = d.run(args);
        assert_eq!(out.code, 1, "{args:?}: {out:#?}");
        assert_eq!(out.stdout, "");
        assert_eq!(
            out.stderr,
            format!("guardctl: permission denied by fwd: {DENIED}\n")
        );
    }
    let v: Value = serde_json::from_str(&d.run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(
        v["fwd"]["error"],
        format!("permission denied by fwd: {DENIED}")
    );
}

#[test]
fn fwd_down_says_so_and_exits_1() {
    let d = Daemons::start(Fwd::Down, true);
    for args in [&["list"][..], &["allow", "192.0.2.7"], &["list", "--json"]] {
        let out = d.run(args);
        assert_eq!(out.code, 1, "{out:#?}");
        assert_eq!(out.stdout, "");
        assert_eq!(
            out.stderr,
            format!(
                "guardctl: cannot reach fwd at {}: No such file or directory (os error 2) \
                 (is guard-fwd running?)\n",
                d.fwd_socket.display()
            )
        );
    }
}

#[test]
fn stale_socket_counts_as_daemon_down() {
    let d = Daemons::start(Fwd::Down, false);
    // Bound, then closed: the file stays, nobody listens (a crashed daemon).
    drop(std::os::unix::net::UnixListener::bind(&d.fwd_socket).unwrap());
    let out = d.run(&["list"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("Connection refused"), "{out:#?}");
    assert!(
        out.stderr.ends_with("(is guard-fwd running?)\n"),
        "{out:#?}"
    );
}

#[test]
fn socket_permissions_name_the_group() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: needs root to run guardctl as another user");
        return;
    }
    let d = Daemons::start(Fwd::Up, false);
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d.fwd_socket, std::fs::Permissions::from_mode(0o660)).unwrap();
    let mut cmd = guardctl();
    cmd.arg("--socket").arg(&d.fwd_socket).arg("list");
    cmd.uid(65534).gid(65534);
    let out = match cmd.output() {
        Ok(o) => fake::Run::from(o),
        Err(e) => {
            eprintln!("skipped: cannot run guardctl as nobody: {e}");
            return;
        }
    };
    assert_eq!(out.code, 1, "{out:#?}");
    let expected = format!(
        "guardctl: permission denied connecting to fwd at {0}: Permission denied (os error 13); \
         the caller needs to be in the socket's group 'root' (socket {0} is mode 0660, owner root:root)",
        d.fwd_socket.display()
    );
    assert!(out.stderr.starts_with(&expected), "{out:#?}");
    assert!(out.stderr.contains("usermod -aG root USER"), "{out:#?}");
    assert_eq!(d.log().calls, 0);
}

#[test]
fn hung_daemon_times_out() {
    let d = Daemons::start(Fwd::Down, false);
    // Accepts connections into the backlog but never speaks HTTP/2.
    let _listener = std::os::unix::net::UnixListener::bind(&d.fwd_socket).unwrap();
    let out = d.run(&["--timeout", "300ms", "list"]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(out.stderr.contains("within 300ms"), "{out:#?}");
}

#[test]
fn usage_errors_exit_2_before_contacting_fwd() {
    let d = both_up();
    for (args, msg) in [
        (
            &["allow", "192.0.2.1/24"][..],
            "has host bits set; the network is 192.0.2.0/24",
        ),
        (&["allow", "example.com"], "is not an IP address"),
        (
            &["allow", "192.0.2.1", "--ttl", "soon"],
            "is not a duration",
        ),
        (&["revoke", "10.0.0.0/33"], "too long for an IPv4 address"),
        (&["list", "--limit", "0"], "0 is not in 1.."),
        (&["history", "--since", "0s"], "at least 1s"),
        (&["frobnicate"], "unrecognized subcommand"),
    ] {
        let out = d.run(args);
        assert_eq!(out.code, 2, "{args:?}: {out:#?}");
        assert!(out.stderr.contains(msg), "{args:?}: {out:#?}");
    }
    assert_eq!(d.log().calls, 0);
}

#[test]
fn env_vars_select_the_sockets() {
    let d = both_up();
    let out = guardctl()
        .env("GUARD_FWD_SOCKET", &d.fwd_socket)
        .env("GUARD_DNSD_SOCKET", &d.dnsd_socket)
        .args(["status", "--json"])
        .output()
        .unwrap();
    let out = fake::Run::from(out);
    let v = out.json();
    assert_eq!(v["fwd"]["mode"], "local");
    assert_eq!(v["dnsd"]["queries"], 1000);
}

// === dnsd ===

#[test]
fn cache_flush_all_and_one_name() {
    let d = both_up();
    assert_eq!(
        d.run(&["cache", "flush"]).ok(),
        "flushed 12 cache entries\n"
    );
    assert_eq!(
        d.run(&["cache", "flush", "example.com"]).ok(),
        "flushed 1 cache entry at or below example.com\n"
    );
    let v = d.run(&["cache", "flush", "--json"]).json();
    assert_eq!(v, json!({"name": null, "flushed": 12}));
    let log = d.log();
    assert_eq!(log.flush[0].name, "");
    assert_eq!(log.flush[1].name, "example.com");
}

#[test]
fn upstreams_table_and_json() {
    let d = both_up();
    let text = d.run(&["upstreams"]).ok().to_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "strategy: failover");
    assert_eq!(
        cells(lines[1]),
        [
            "URL",
            "HEALTHY",
            "SRTT",
            "QUERIES",
            "ERRORS",
            "CONNS",
            "LAST ERROR"
        ]
    );
    assert_eq!(
        cells(lines[2]),
        [
            "tls://192.0.2.53:853#dns.example",
            "yes",
            "12.3ms",
            "900",
            "2",
            "1",
            "-"
        ]
    );
    let v = d.run(&["upstreams", "--json"]).json();
    assert_eq!(v["upstreams"][0]["srtt_us"], 12_345);
    assert_eq!(v["upstreams"][0]["last_error"], Value::Null);
}

#[test]
fn dnsd_down_fails_dnsd_commands() {
    let d = Daemons::start(Fwd::Up, false);
    let out = d.run(&["cache", "flush"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.starts_with("guardctl: cannot reach dnsd at "),
        "{out:#?}"
    );
    assert!(
        out.stderr.ends_with("(is guard-dnsd running?)\n"),
        "{out:#?}"
    );
}

// === packaging ===

#[test]
fn completions_and_man_page() {
    let bash = fake::Run::from(guardctl().args(["completions", "bash"]).output().unwrap());
    assert!(bash.ok().contains("guardctl"), "{bash:#?}");
    assert!(bash.stdout.contains("upstreams"));
    let zsh = fake::Run::from(guardctl().args(["completions", "zsh"]).output().unwrap());
    assert!(zsh.ok().starts_with("#compdef guardctl"), "{zsh:#?}");
    let man = fake::Run::from(guardctl().arg("man").output().unwrap());
    assert!(man.ok().contains(".TH guardctl 1"), "{man:#?}");
}
