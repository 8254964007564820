//! The dnsd binary: exit codes, `--validate`, sd_notify readiness and shutdown, and systemd socket activation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

const DNSD: &str = env!("CARGO_BIN_EXE_dnsd");

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn validate_lists_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "bad.toml",
        r#"
        [listen]
        tcp_read_timeout = "0s"
        [acl]
        allow = []
        [domains]
        names = ["a..b"]
        [upstream]
        servers = ["https://192.0.2.1"]
        "#,
    );
    let out = Command::new(DNSD)
        .args(["--validate", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "listen.tcp_read_timeout",
        "acl.allow",
        "domains.names[0]",
        "upstream.servers[0]",
    ] {
        assert!(err.contains(key), "missing {key} in:\n{err}");
    }
}

#[test]
fn unknown_key_and_bad_args_exit_64_and_valid_config_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = write(
        dir.path(),
        "unknown.toml",
        "[upstream]\nservers = [\"udp://127.0.0.1\"]\nbogus = 1\n",
    );
    let out = Command::new(DNSD)
        .args(["--validate", "--config"])
        .arg(&unknown)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));

    for args in [&["--bogus"][..], &[][..], &["--config"][..]] {
        let out = Command::new(DNSD).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
    }
    let missing = Command::new(DNSD)
        .args(["--config", "/nonexistent/dnsd.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(64));

    let good = write(
        dir.path(),
        "good.toml",
        "[upstream]\nservers = [\"udp://127.0.0.1\"]\n",
    );
    let out = Command::new(DNSD)
        .args(["--validate", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = Command::new(DNSD).arg("--help").output().unwrap();
    assert_eq!(help.status.code(), Some(0));
}

fn zone() -> Responder {
    Arc::new(|q| Some(reply(q, &["example.com. 300 A 192.0.2.1"])))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config_text(upstream: std::net::SocketAddr, dir: &Path, port: u16) -> String {
    format!(
        r#"
        [listen]
        udp = ["127.0.0.1:{port}"]
        tcp = ["127.0.0.1:{port}"]
        [upstream]
        servers = ["udp://{upstream}"]
        [authorize]
        socket = "{fwd}"
        [control]
        socket = "{ctl}"
        "#,
        fwd = dir.join("fwd.sock").display(),
        ctl = dir.join("dnsd.sock").display(),
    )
}

fn wait_notify(sock: &UnixDatagram, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]);
            if msg.lines().any(|l| l == want) {
                return;
            }
        }
    }
    panic!("no {want} from dnsd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_notifies_ready_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = fake_upstream(zone()).await;
    let fwd = FakeFwd::new();
    serve_fake_fwd(dir.path().join("fwd.sock"), fwd.clone());
    let port = free_port();
    let cfg = write(
        dir.path(),
        "dnsd.toml",
        &config_text(upstream.addr, dir.path(), port),
    );
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut child = Command::new(DNSD)
        .arg("--config")
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let n = tokio::task::spawn_blocking(move || {
        wait_notify(&notify, "READY=1");
        notify
    })
    .await
    .unwrap();
    let server: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let resp = udp_query(server, &query("example.com.", RecordType::A, false)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    let resp = tcp_query(server, &query("example.com.", RecordType::A, false)).await;
    assert_eq!(
        addrs(&resp),
        vec!["192.0.2.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(fwd.calls().len(), 1);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    tokio::task::spawn_blocking(move || wait_notify(&n, "STOPPING=1"))
        .await
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("dnsd ready"), "{err}");
    assert!(
        !err.contains("example.com"),
        "query name logged without log_queries:\n{err}"
    );
    assert!(!dir.path().join("dnsd.sock").exists());
}

#[test]
fn port_in_use_is_a_runtime_failure() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let cfg = write(
        dir.path(),
        "dnsd.toml",
        &config_text("127.0.0.1:53".parse().unwrap(), dir.path(), port),
    );
    let out = Command::new(DNSD)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// systemd socket activation through `systemd-socket-activate`, which binds the socket,
/// spawns dnsd on the first packet or connection, and passes the socket as fd 3.
async fn activated(datagram: bool) {
    if !Path::new("/usr/bin/systemd-socket-activate").exists() {
        eprintln!("systemd-socket-activate not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let upstream = fake_upstream(zone()).await;
    let fwd = FakeFwd::new();
    serve_fake_fwd(dir.path().join("fwd.sock"), fwd.clone());
    let port = free_port();
    // The configured addresses must be ignored: they point at a port dnsd could not bind
    // twice (the activator holds it).
    let cfg = write(
        dir.path(),
        "dnsd.toml",
        &config_text(upstream.addr, dir.path(), port),
    );
    let mut cmd = Command::new("/usr/bin/systemd-socket-activate");
    cmd.arg("-l").arg(format!("127.0.0.1:{port}"));
    if datagram {
        cmd.arg("--datagram");
    }
    let mut child = cmd
        .arg(DNSD)
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let server: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut answered = None;
    while Instant::now() < deadline && answered.is_none() {
        let q = query("example.com.", RecordType::A, false);
        answered = if datagram {
            udp_query_from(server, "127.0.0.1", &q, Duration::from_millis(500)).await
        } else {
            match tokio::net::TcpStream::connect(server).await {
                Ok(mut s) => {
                    use tokio::io::AsyncWriteExt;
                    let wire = q.to_vec().unwrap();
                    let mut frame = (wire.len() as u16).to_be_bytes().to_vec();
                    frame.extend_from_slice(&wire);
                    s.write_all(&frame).await.unwrap();
                    read_frame(&mut s).await
                }
                Err(_) => None,
            }
        };
        if answered.is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let resp = answered.unwrap_or_else(|| panic!("no answer from activated dnsd:\n{err}"));
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError, "{err}");
    assert!(err.contains("using sockets passed by systemd"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_udp() {
    activated(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_tcp() {
    activated(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_acl_and_keeps_old_config_when_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = fake_upstream(zone()).await;
    serve_fake_fwd(dir.path().join("fwd.sock"), FakeFwd::new());
    let port = free_port();
    let base = config_text(upstream.addr, dir.path(), port);
    let cfg = write(dir.path(), "dnsd.toml", &base);
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut child = Command::new(DNSD)
        .arg("--config")
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let notify = tokio::task::spawn_blocking(move || {
        wait_notify(&notify, "READY=1");
        notify
    })
    .await
    .unwrap();
    let server: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let rcode = |m: hickory_proto::op::Message| m.metadata.response_code;
    assert_eq!(
        rcode(udp_query(server, &query("example.com.", RecordType::TXT, false)).await),
        ResponseCode::NoError
    );

    // A valid change: 127.0.0.1 is no longer allowed.
    write(
        dir.path(),
        "dnsd.toml",
        &format!("{base}\n[acl]\nallow = [\"192.0.2.0/24\"]\n"),
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let notify = tokio::task::spawn_blocking(move || {
        wait_notify(&notify, "READY=1");
        notify
    })
    .await
    .unwrap();
    assert_eq!(
        rcode(udp_query(server, &query("example.com.", RecordType::TXT, false)).await),
        ResponseCode::Refused
    );

    // An invalid file is refused whole; the previous (refusing) ACL stays.
    write(
        dir.path(),
        "dnsd.toml",
        &format!("{base}\n[acl]\nallow = []\n"),
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    tokio::task::spawn_blocking(move || wait_notify(&notify, "READY=1"))
        .await
        .unwrap();
    assert_eq!(
        rcode(udp_query(server, &query("example.com.", RecordType::TXT, false)).await),
        ResponseCode::Refused
    );

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("configuration reloaded"), "{err}");
    assert!(err.contains("keeping the old configuration"), "{err}");
    assert!(err.contains("acl.allow"), "{err}");
}
