//! fwd's serving loop: the gRPC server on an already-bound Unix socket, sd_notify, watchdog, shutdown.

use std::os::unix::net::UnixListener as StdUnixListener;
use std::time::Duration;

use guard_proto::v1::firewall_server::FirewallServer;
use sd_notify::NotifyState;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::rpc::FirewallService;
use crate::store::Reader;

/// Failures of the serving loop.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The listener could not be handed to tokio.
    #[error("socket: {0}")]
    Socket(std::io::Error),
    /// tonic failed.
    #[error("grpc server: {0}")]
    Serve(tonic::transport::Error),
}

/// Serves until `shutdown` is cancelled. Announces READY once serving, pings the systemd watchdog
/// while the committer thread is alive, and says STOPPING on the way out.
pub async fn run(
    engine: Engine,
    reader: Reader,
    listener: StdUnixListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    listener.set_nonblocking(true).map_err(RunError::Socket)?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(RunError::Socket)?;
    let svc = FirewallService::new(engine.clone(), reader, shutdown.clone());
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) {
        let engine = engine.clone();
        let token = shutdown.clone();
        let period = Duration::from_micros(usec / 2);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tick.tick() => {
                        // Only vouch for fwd while the committer keeps looping.
                        let age = crate::model::now_ms().saturating_sub(engine.heartbeat_ms());
                        if age < (usec / 1000).max(1) {
                            let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
                        }
                    }
                }
            }
        });
    }
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
    tracing::info!("fwd ready");
    let result = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(1024)
        .timeout(Duration::from_secs(30))
        .add_service(FirewallServer::new(svc))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown.cancelled())
        .await
        .map_err(RunError::Serve);
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
    result
}
