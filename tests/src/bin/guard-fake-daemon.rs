//! A stand-in daemon for the harness's self-tests: speaks fwd's process contract (config file, socket, sd_notify, SIGTERM) and nothing else.
//!
//! `guard-fake-daemon --config FILE`: reads `socket` from FILE, binds it, sends READY=1 to
//! NOTIFY_SOCKET and logs "fake ready"; on SIGTERM sends STOPPING=1 and exits 0. With
//! `fake_exit_code = N` in FILE it logs "fake failing" and exits N before READY.
#![forbid(unsafe_code)]

use std::os::unix::net::UnixDatagram;
use std::process::ExitCode;

fn notify(msg: &str) {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET")
        && let Ok(sock) = UnixDatagram::unbound()
    {
        let _ = sock.send_to(msg.as_bytes(), path);
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(config) = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
    else {
        eprintln!("fake: --config is required");
        return ExitCode::from(64);
    };
    let table: toml::Table = match std::fs::read_to_string(config)
        .map_err(|e| e.to_string())
        .and_then(|s| s.parse().map_err(|e: toml::de::Error| e.to_string()))
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("fake: {config}: {e}");
            return ExitCode::from(64);
        }
    };
    if let Some(code) = table
        .get("fake_exit_code")
        .and_then(toml::Value::as_integer)
    {
        eprintln!("fake failing");
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let socket = table
        .get("socket")
        .and_then(toml::Value::as_str)
        .unwrap_or_default();
    let _ = std::fs::remove_file(socket);
    let _listener = match tokio::net::UnixListener::bind(socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake: binding {socket}: {e}");
            return ExitCode::from(1);
        }
    };
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fake: SIGTERM handler: {e}");
            return ExitCode::from(1);
        }
    };
    eprintln!("fake ready");
    notify("READY=1");
    term.recv().await;
    notify("STOPPING=1");
    eprintln!("fake stopping");
    ExitCode::SUCCESS
}
