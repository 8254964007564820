//! [`UnixChannel`]: a gRPC client transport to one daemon's Unix socket.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

use crate::gather::{Gather, Prompt};
use crate::unix_io::UnixIo;

/// A lazily connected HTTP/2 connection to a Unix socket, for tonic's generated clients.
///
/// Unlike tonic's `Channel`, a call is handed straight to the connection's task: the `Channel`
/// routes every call through a buffer task first, one more task hand-off each way (about 10 µs
/// of each Authorize round trip on a 2-core machine, `bench/fwd.sh`).
///
/// The connection is made by the first call, and again by the first call after it failed.
/// Every transport failure (cannot connect, connection closed) reaches the caller as
/// `Unavailable`, so the caller can retry an idempotent call once on a fresh connection.
/// Clones share the connection.
#[derive(Clone)]
pub struct UnixChannel {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    connect_timeout: Duration,
    /// The connection, with a number that tells it from the ones before it.
    conn: Mutex<Option<(u64, Sender)>>,
    /// Held while connecting, so that calls arriving meanwhile wait for that connection
    /// instead of making their own; it counts the connections made, which numbers them.
    connecting: tokio::sync::Mutex<u64>,
}

type Sender = SendRequest<Prompt<tonic::body::Body>>;

impl fmt::Debug for UnixChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnixChannel")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl UnixChannel {
    /// A channel to the socket at `path`; nothing is connected until the first call, which
    /// gives up connecting after `connect_timeout`.
    pub fn lazy(path: &Path, connect_timeout: Duration) -> Self {
        UnixChannel {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                connect_timeout,
                conn: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(0),
            }),
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

impl Inner {
    fn slot(&self) -> MutexGuard<'_, Option<(u64, Sender)>> {
        // The slot is replaced whole; a panic elsewhere cannot leave it half-written.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets connection `id` if it is still the current one, so the next call reconnects.
    fn forget(&self, id: u64) {
        let mut slot = self.slot();
        if slot.as_ref().is_some_and(|(n, _)| *n == id) {
            *slot = None;
        }
    }

    fn current(&self) -> Option<(u64, Sender)> {
        self.slot()
            .as_ref()
            .filter(|(_, s)| !s.is_closed())
            .cloned()
    }

    /// The current connection, or a new one.
    async fn sender(&self) -> Result<(u64, Sender), tonic::Status> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let mut made = self.connecting.lock().await;
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let unavailable = |what: String| {
            tonic::Status::unavailable(format!("cannot connect to {}: {what}", self.path.display()))
        };
        let connect = async {
            let io = UnixStream::connect(&self.path)
                .await
                .and_then(UnixIo::new)
                .map_err(|e| unavailable(e.to_string()))?;
            handshake(io).await.map_err(|e| unavailable(e.to_string()))
        };
        let send = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| unavailable(format!("timed out after {:?}", self.connect_timeout)))??;
        *made += 1;
        let id = *made;
        *self.slot() = Some((id, send.clone()));
        Ok((id, send))
    }
}

/// An HTTP/2 connection over `io` (a [`UnixIo`]: registered for reading only), whose writes
/// are gathered (with the request bodies made [`Prompt`], one write per unary call instead
/// of three); its task is spawned.
async fn handshake<T>(io: T) -> Result<Sender, hyper::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) =
        http2::handshake(TokioExecutor::new(), TokioIo::new(Gather::new(io))).await?;
    tokio::spawn(async move {
        // Its end (peer closed, reset) shows up on the sender as is_closed() and errors.
        let _ = conn.await;
    });
    Ok(send)
}

type Response = http::Response<hyper::body::Incoming>;

impl tower::Service<http::Request<tonic::body::Body>> for UnixChannel {
    type Response = Response;
    type Error = tonic::Status;
    type Future = Pin<Box<dyn Future<Output = Result<Response, tonic::Status>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is awaited per call, on the connection the call ends up using.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            // hyper's HTTP/2 client needs an absolute URI; tonic sends only the path.
            let path = req
                .uri()
                .path_and_query()
                .map_or("/", http::uri::PathAndQuery::as_str);
            let uri = http::Uri::builder()
                .scheme("http")
                .authority("guard.invalid")
                .path_and_query(path)
                .build()
                .map_err(|e| tonic::Status::internal(format!("request URI: {e}")))?;
            *req.uri_mut() = uri;
            let (id, mut send) = inner.sender().await?;
            let lost = |e: hyper::Error| {
                inner.forget(id);
                tonic::Status::unavailable(format!(
                    "connection to {} failed: {e}",
                    inner.path.display()
                ))
            };
            send.ready().await.map_err(&lost)?;
            send.send_request(req.map(Prompt::new)).await.map_err(lost)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio_stream::StreamExt;
    use tokio_stream::wrappers::UnixListenerStream;
    use tokio_util::sync::CancellationToken;
    use tonic::{Code, Request, Response, Status};

    use super::*;
    use crate::v1::resolver_client::ResolverClient;
    use crate::v1::resolver_server::{Resolver, ResolverServer};
    use crate::v1::*;

    /// A Resolver whose Stats reply carries `tag`, so a test can tell two servers apart.
    struct Tagged(u64);

    #[tonic::async_trait]
    impl Resolver for Tagged {
        async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
            Ok(Response::new(StatsResponse {
                queries: self.0,
                ..Default::default()
            }))
        }
        async fn flush_cache(
            &self,
            _: Request<FlushCacheRequest>,
        ) -> Result<Response<FlushCacheResponse>, Status> {
            Err(Status::permission_denied("not here"))
        }
        async fn upstreams(
            &self,
            _: Request<UpstreamsRequest>,
        ) -> Result<Response<UpstreamsResponse>, Status> {
            Err(Status::unimplemented("not here"))
        }
    }

    /// A real tonic server on `path`; returns the count of connections it accepted, and the
    /// token that stops it (the handle ends when it has).
    fn serve(
        path: &Path,
        tag: u64,
    ) -> (
        Arc<AtomicUsize>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let incoming = UnixListenerStream::new(listener).map(move |c| {
            count.fetch_add(1, Ordering::SeqCst);
            c
        });
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(ResolverServer::new(Tagged(tag)))
                .serve_with_incoming_shutdown(incoming, token.cancelled())
                .await
                .unwrap();
        });
        (accepted, stop, task)
    }

    async fn stats(c: &mut ResolverClient<UnixChannel>) -> Result<u64, Status> {
        c.stats(StatsRequest::default())
            .await
            .map(|r| r.into_inner().queries)
    }

    #[tokio::test]
    async fn nothing_listening_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let ch = UnixChannel::lazy(&dir.path().join("none.sock"), Duration::from_secs(1));
        let err = stats(&mut ResolverClient::new(ch)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        assert!(err.message().contains("none.sock"), "{err}");
    }

    #[tokio::test]
    async fn clones_share_one_connection_and_statuses_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sock");
        let (accepted, stop, task) = serve(&path, 7);
        let ch = UnixChannel::lazy(&path, Duration::from_secs(1));
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            0,
            "lazy: no connection yet"
        );
        let calls = (0..32).map(|_| {
            let mut c = ResolverClient::new(ch.clone());
            tokio::spawn(async move { stats(&mut c).await })
        });
        for call in calls.collect::<Vec<_>>() {
            assert_eq!(call.await.unwrap().unwrap(), 7);
        }
        // An error status is the server's, not a transport failure, and keeps the connection.
        let mut c = ResolverClient::new(ch.clone());
        let err = c
            .flush_cache(FlushCacheRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(stats(&mut c).await.unwrap(), 7);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for all clones"
        );
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_restarted_server_is_reached_on_a_new_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sock");
        let (_, stop, task) = serve(&path, 1);
        let mut c = ResolverClient::new(UnixChannel::lazy(&path, Duration::from_secs(1)));
        assert_eq!(stats(&mut c).await.unwrap(), 1);
        stop.cancel();
        task.await.unwrap();
        // The server is gone: Unavailable (whether the old connection fails or the new one
        // cannot connect), never a hang.
        let err = stats(&mut c).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        let (accepted, stop, task) = serve(&path, 2);
        // At most one more failure on a connection that had not noticed the end yet.
        let tag = match stats(&mut c).await {
            Ok(t) => t,
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e}");
                stats(&mut c).await.unwrap()
            }
        };
        assert_eq!(tag, 2);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        stop.cancel();
        task.await.unwrap();
    }

    /// Counts the writes that reach the socket.
    struct Counting(UnixStream, Arc<AtomicUsize>);

    impl AsyncRead for Counting {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let r = Pin::new(&mut self.0).poll_write(cx, data);
            if matches!(r, Poll::Ready(Ok(_))) {
                self.1.fetch_add(1, Ordering::SeqCst);
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn a_unary_call_leaves_in_one_write() {
        // hyper alone writes HEADERS, DATA and an empty END_STREAM DATA frame in three
        // writes (seen with strace on dnsd's authorize path); through Gather they are one.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sock");
        let (_, stop, task) = serve(&path, 5);
        let writes = Arc::new(AtomicUsize::new(0));
        let io = Counting(UnixStream::connect(&path).await.unwrap(), writes.clone());
        let send = handshake(io).await.unwrap();
        let svc = tower::service_fn(move |mut req: http::Request<tonic::body::Body>| {
            let mut send = send.clone();
            async move {
                let path = req.uri().path().to_owned();
                *req.uri_mut() = format!("http://guard.invalid{path}").parse().unwrap();
                send.ready().await?;
                send.send_request(req.map(Prompt::new)).await
            }
        });
        let mut c = ResolverClient::new(svc);
        // The first call also carries the connection preface and settings.
        assert_eq!(
            c.stats(StatsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .queries,
            5
        );
        for _ in 0..3 {
            let before = writes.load(Ordering::SeqCst);
            let r = c.stats(StatsRequest::default()).await.unwrap();
            assert_eq!(r.into_inner().queries, 5);
            assert_eq!(
                writes.load(Ordering::SeqCst) - before,
                1,
                "one write per call"
            );
            // A message over h2's 256-octet copy threshold goes out as a frame of its own
            // (chained, not copied): still one write, END_STREAM on the DATA frame.
            let before = writes.load(Ordering::SeqCst);
            let big = FlushCacheRequest {
                name: "a".repeat(600),
            };
            let err = c.flush_cache(big).await.unwrap_err();
            assert_eq!(err.code(), Code::PermissionDenied);
            assert_eq!(
                writes.load(Ordering::SeqCst) - before,
                1,
                "one write per call"
            );
        }
        stop.cancel();
        task.await.unwrap();
    }
}
