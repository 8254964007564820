//! `run`: wires the handler, listeners, control service and metrics onto already-bound sockets, speaks sd_notify, reloads on SIGHUP, and shuts down through one CancellationToken.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError};
use crate::control::{self, Control, Roles};
use crate::forward::{Forward, UpstreamForwarder};
use crate::handler::{Handler, Live};
use crate::listener::{self, ListenerError, Sockets, StreamSettings};
use crate::metrics::{self, Metrics};
use crate::revocations;
use crate::upstream::UpstreamError;

/// How long in-flight queries and connections get to finish after shutdown starts.
pub const GRACE: Duration = Duration::from_secs(5);

/// Runtime failures of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The upstreams could not be built.
    #[error("upstreams: {0}")]
    Upstreams(#[from] UpstreamError),
    /// A socket could not be handed to tokio, or a signal handler installed.
    #[error("{what}: {source}")]
    Socket {
        /// Which socket.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The DoT certificate or key.
    #[error(transparent)]
    Listener(#[from] ListenerError),
    /// The control service failed.
    #[error("control service: {0}")]
    Control(#[from] tonic::transport::Error),
}

fn socket_err(what: &'static str) -> impl Fn(std::io::Error) -> ServerError {
    move |source| ServerError::Socket { what, source }
}

/// Builds the reloadable state of a config: its upstreams, ACL, rate limits and domain policy.
pub fn build_live(cfg: &Config) -> Result<Live, UpstreamError> {
    let fwd: Arc<dyn Forward> = Arc::new(UpstreamForwarder::new(&cfg.upstream)?);
    Ok(Live::new(cfg, fwd))
}

/// Applies SIGHUP reloads: parse and validate the whole file, swap the reloadable parts in
/// atomically, or keep the old ones and log why.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    current: Config,
    tx: watch::Sender<Arc<Live>>,
}

impl Reloader {
    /// A reloader for the config at `path`, currently running `current`.
    pub fn new(path: PathBuf, current: Config, tx: watch::Sender<Arc<Live>>) -> Self {
        Reloader { path, current, tx }
    }

    /// Reads the file again and applies it; returns whether the new config is now live.
    pub async fn reload(&mut self) -> bool {
        self.apply(Config::load(&self.path)).await
    }

    /// Applies an already loaded config (or its load error).
    pub async fn apply(&mut self, loaded: Result<Config, ConfigError>) -> bool {
        let new = match loaded {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "reload failed; keeping the old configuration");
                return false;
            }
        };
        let live = match build_live(&new) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "reload failed; keeping the old configuration");
                return false;
            }
        };
        let old = self.tx.send_replace(Arc::new(live));
        // Close the old upstreams' pools; queries still using them retry on new connections.
        old.upstreams.close().await;
        for (section, changed) in [
            (
                "listen",
                format!("{:?}", self.current.listen) != format!("{:?}", new.listen),
            ),
            (
                "cache",
                format!("{:?}", self.current.cache) != format!("{:?}", new.cache),
            ),
            (
                "authorize",
                format!("{:?}", self.current.authorize) != format!("{:?}", new.authorize),
            ),
            (
                "control",
                format!("{:?}", self.current.control) != format!("{:?}", new.control),
            ),
            (
                "metrics",
                format!("{:?}", self.current.metrics) != format!("{:?}", new.metrics),
            ),
            ("log_queries", self.current.log_queries != new.log_queries),
            ("threads", self.current.threads != new.threads),
        ] {
            if changed {
                tracing::warn!(section, "changed, but only takes effect after a restart");
            }
        }
        self.current = new;
        tracing::info!("configuration reloaded (upstream, acl, domains)");
        true
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT. The handlers are installed before this returns,
/// so that a signal right after READY=1 is a clean shutdown rather than the default kill.
pub fn cancel_on_signals(shutdown: &CancellationToken) -> Result<(), ServerError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(socket_err("SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(socket_err("SIGINT handler"))?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        stop.cancel();
    });
    Ok(())
}

fn notify(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(false, &[state]) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Runs dnsd on `sockets` until `shutdown` is cancelled (or a fatal error). With
/// `reload_from`, SIGHUP reloads that file.
pub async fn run(
    config: Config,
    sockets: Sockets,
    shutdown: CancellationToken,
    reload_from: Option<PathBuf>,
) -> Result<(), ServerError> {
    let metrics = Arc::new(Metrics::new());
    let live = build_live(&config)?;
    let (live_tx, live_rx) = watch::channel(Arc::new(live));
    let handler = Arc::new(Handler::new(&config, live_rx, metrics.clone()));
    let tasks = TaskTracker::new();
    let mut services: JoinSet<Result<(), ServerError>> = JoinSet::new();
    let settings = StreamSettings::new(&config.listen);
    let connections = Arc::new(Semaphore::new(config.listen.tcp_max_connections));
    let mut addrs: Vec<String> = Vec::new();

    {
        // Cached grants are only trusted while this follows fwd's revocations. Its first
        // attempt settles before the listeners start (at once when fwd is down, within
        // `authorize.timeout` at worst), so that a fresh dnsd trusts grants from its first
        // answer on instead of re-authorizing its first cache hits.
        let (h, s) = (handler.clone(), shutdown.clone());
        let (path, timeout) = (config.authorize.socket.clone(), config.authorize.timeout);
        let (settled_tx, settled) = tokio::sync::oneshot::channel();
        services.spawn(async move {
            revocations::watch(path, timeout, h, s, settled_tx).await;
            Ok(())
        });
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::timeout(timeout, settled) => {}
        }
    }

    for sock in sockets.udp {
        // Registered with epoll for reading only: write space after every answer would
        // otherwise wake dnsd once more per query.
        let sock = crate::quiet::QuietUdp::new(sock).map_err(socket_err("udp socket"))?;
        if let Ok(a) = sock.local_addr() {
            addrs.push(format!("udp://{a}"));
        }
        let (h, s, t) = (handler.clone(), shutdown.clone(), tasks.clone());
        services.spawn(async move {
            listener::serve_udp(sock, h, s, t).await;
            Ok(())
        });
    }
    let tls = match (&config.listen.tls, sockets.tls.is_empty()) {
        (Some(cfg), false) => Some(listener::tls_acceptor(cfg)?),
        _ => None,
    };
    let stream_listeners = sockets
        .tcp
        .into_iter()
        .map(|l| (l, None, "tcp"))
        .chain(sockets.tls.into_iter().map(|l| (l, tls.clone(), "tls")));
    for (l, acceptor, scheme) in stream_listeners {
        if scheme == "tls" && acceptor.is_none() {
            tracing::warn!(
                "a DoT socket was passed but [listen.tls] is not configured; ignoring it"
            );
            continue;
        }
        l.set_nonblocking(true)
            .map_err(socket_err("tcp listener"))?;
        let l = tokio::net::TcpListener::from_std(l).map_err(socket_err("tcp listener"))?;
        if let Ok(a) = l.local_addr() {
            addrs.push(format!("{scheme}://{a}"));
        }
        let (h, s, t) = (handler.clone(), shutdown.clone(), tasks.clone());
        let (st, c) = (settings.clone(), connections.clone());
        services.spawn(async move {
            listener::serve_tcp(l, acceptor, h, st, c, s, t).await;
            Ok(())
        });
    }
    if let Some(l) = sockets.control {
        use std::os::unix::fs::MetadataExt;
        l.set_nonblocking(true)
            .map_err(socket_err("control socket"))?;
        let socket_gid = sockets
            .control_path
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.gid());
        let l = tokio::net::UnixListener::from_std(l).map_err(socket_err("control socket"))?;
        let svc = Control::new(handler.clone(), Roles::new(&config.control, socket_gid));
        let s = shutdown.clone();
        services.spawn(async move { control::serve(l, svc, s).await.map_err(ServerError::from) });
    }
    if let Some(l) = sockets.metrics {
        l.set_nonblocking(true)
            .map_err(socket_err("metrics listener"))?;
        let l = tokio::net::TcpListener::from_std(l).map_err(socket_err("metrics listener"))?;
        if let Ok(a) = l.local_addr() {
            addrs.push(format!("http://{a}/metrics"));
        }
        let (m, s) = (metrics.clone(), shutdown.clone());
        services.spawn(async move {
            metrics::serve(l, m, s).await;
            Ok(())
        });
    }
    if let Some(path) = reload_from {
        let mut reloader = Reloader::new(path, config.clone(), live_tx);
        let s = shutdown.clone();
        // Installed before READY=1: SIGHUP's default action would kill the process.
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(socket_err("SIGHUP handler"))?;
        services.spawn(async move {
            loop {
                tokio::select! {
                    _ = s.cancelled() => return Ok(()),
                    r = hup.recv() => if r.is_none() { return Ok(()) },
                }
                notify(sd_notify::NotifyState::Reloading);
                reloader.reload().await;
                notify(sd_notify::NotifyState::Ready);
            }
        });
    }
    let mut watchdog_usec = 0;
    if sd_notify::watchdog_enabled(false, &mut watchdog_usec) && watchdog_usec > 0 {
        let period = Duration::from_micros(watchdog_usec / 2);
        let s = shutdown.clone();
        services.spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = s.cancelled() => return Ok(()),
                    _ = tick.tick() => notify(sd_notify::NotifyState::Watchdog),
                }
            }
        });
    }

    notify(sd_notify::NotifyState::Ready);
    tracing::info!(listen = ?addrs, fwd = %config.authorize.socket.display(), "dnsd ready");

    // Serve until asked to stop or a service fails.
    let mut failure = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            done = services.join_next() => match done {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    tracing::error!(error = %e, "service failed; shutting down");
                    failure = Some(e);
                    break;
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "service task panicked; shutting down");
                    break;
                }
            },
        }
    }
    notify(sd_notify::NotifyState::Stopping);
    tracing::info!("dnsd stopping");
    shutdown.cancel();
    tasks.close();
    let drained = tokio::time::timeout(GRACE, async {
        while services.join_next().await.is_some() {}
        tasks.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("grace period over; abandoning unfinished queries");
        services.abort_all();
    }
    handler.live().upstreams.close().await;
    if let Some(p) = &sockets.control_path {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!("dnsd stopped");
    failure.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn config(allow: &str) -> Config {
        Config::parse(&format!(
            "[upstream]\nservers = [\"udp://127.0.0.1:5300\"]\n[acl]\nallow = [\"{allow}\"]\n"
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn reload_swaps_valid_config_and_keeps_old_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dnsd.toml");
        let first = config("127.0.0.0/8");
        let (tx, rx) = watch::channel(Arc::new(build_live(&first).unwrap()));
        let mut r = Reloader::new(path.clone(), first, tx);
        let client: std::net::IpAddr = "192.0.2.9".parse().unwrap();
        let verdict = |rx: &watch::Receiver<Arc<Live>>| rx.borrow().acl.check(client);
        assert_eq!(verdict(&rx), crate::policy::Verdict::Refuse);

        // Unreadable, unparsable and invalid files are all rejected; the old state stays.
        let before = rx.borrow().clone();
        assert!(!r.reload().await);
        std::fs::write(&path, "[acl\n").unwrap();
        assert!(!r.reload().await);
        std::fs::write(&path, "[upstream]\nservers = []\n").unwrap();
        assert!(!r.reload().await);
        assert!(Arc::ptr_eq(&before, &rx.borrow()));

        // A valid file swaps ACL (and upstreams, domains) in one step.
        std::fs::write(
            &path,
            "[upstream]\nservers = [\"udp://127.0.0.1:5301\"]\n[acl]\nallow = [\"192.0.2.0/24\"]\n",
        )
        .unwrap();
        assert!(r.reload().await);
        assert_eq!(verdict(&rx), crate::policy::Verdict::Allow);
        assert_eq!(
            rx.borrow().upstreams.health()[0].url,
            "udp://127.0.0.1:5301"
        );
    }
}
