//! The control socket (bound before privileges drop) and the shutdown signals.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;

/// Failures binding the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another fwd answers on the socket.
    #[error("another fwd is already serving on {0}")]
    InUse(String),
    /// An I/O step failed.
    #[error("socket {path}: {what}: {source}")]
    Io {
        /// The socket path.
        path: String,
        /// The step.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> ListenError + 'a {
    move |source| ListenError::Io {
        path: path.display().to_string(),
        what,
        source,
    }
}

/// Binds the socket, replacing a stale one, with the configured mode and group.
pub fn bind(s: &Settings) -> Result<UnixListener, ListenError> {
    let path = s.raw.socket.as_path();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(path, "create parent directory"))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ListenError::InUse(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(io(path, "remove stale socket"))?;
    }
    let l = UnixListener::bind(path).map_err(io(path, "bind"))?;
    if let Some(gid) = s.socket_gid {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(|e| {
            ListenError::Io {
                path: path.display().to_string(),
                what: "chown",
                source: e.into(),
            }
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(s.socket_mode))
        .map_err(io(path, "chmod"))?;
    Ok(l)
}

/// SIGTERM/SIGINT/SIGHUP streams, installed before READY so an early signal is never fatal.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; call inside the runtime, before announcing readiness.
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Cancels `token` on SIGTERM or SIGINT. On SIGHUP, loads the configuration again with
    /// `load` and hands it to the engine; an invalid file or a restart-only change keeps the old one.
    pub async fn serve<E: std::fmt::Display>(
        mut self,
        token: CancellationToken,
        engine: crate::engine::Engine,
        load: impl Fn() -> Result<Settings, E>,
    ) {
        loop {
            tokio::select! {
                _ = self.term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
                _ = self.int.recv() => { tracing::info!("SIGINT: stopping"); break; }
                _ = self.hup.recv() => {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
                    match load() {
                        Err(e) => tracing::error!("reload refused, keeping the running configuration: {e}"),
                        Ok(s) => match engine.reload(std::sync::Arc::new(s)).await {
                            Ok(()) => tracing::info!("configuration reloaded"),
                            Err(e) => tracing::error!("reload refused, keeping the running configuration: {e}"),
                        },
                    }
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                }
            }
        }
        token.cancel();
    }
}
