//! tcp:// upstreams: connection setup and the two-octet length framing of RFC 7766 (also used
//! under TLS). Pooling and pipelining live in `pool`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{UpstreamError, by_deadline};

/// An upstream TCP connection that acknowledges what it reads at once (`TCP_QUICKACK` after
/// every read). An upstream that writes an answer in two segments without `TCP_NODELAY` (nsd
/// writes the length and the message apart) holds the second behind Nagle's algorithm until
/// the first is acknowledged, and on a connection dnsd is not sending on, Linux delays that
/// acknowledgement by 40 ms: one in 600 DoT answers took 40 ms in the benchmark before this.
#[derive(Debug)]
pub(crate) struct Stream(TcpStream);

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.0).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            // Sends the acknowledgement the kernel may be holding back; not permanent, hence
            // after every read. A failure only costs latency.
            let _ = socket2::SockRef::from(&self.0).set_tcp_quickack(true);
        }
        res
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Opens a TCP connection to `addr`, giving up at `deadline`.
pub(crate) async fn connect(addr: SocketAddr, deadline: Instant) -> Result<Stream, UpstreamError> {
    let stream = by_deadline(deadline, addr, async {
        TcpStream::connect(addr)
            .await
            .map_err(|e| UpstreamError::Connect {
                addr,
                source: Arc::new(e),
            })
    })
    .await?;
    // Queries are small and latency-bound: never wait to coalesce them.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%addr, error = %e, "cannot set TCP_NODELAY");
    }
    Ok(Stream(stream))
}

/// `msg` with its two-octet length prefix, or `None` if it is too long to frame.
pub(crate) fn frame(msg: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(msg.len()).ok()?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    Some(out)
}

/// Reads one length-prefixed message. Not cancellation safe: a cancelled read leaves the
/// stream out of sync, so the caller must drop the connection.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R) -> std::io::Result<Vec<u8>> {
    let len = usize::from(rd.read_u16().await?);
    let mut buf = vec![0; len];
    rd.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// Frames go both ways through the quick-ack stream over a real connection.
    #[tokio::test]
    async fn quickack_stream_carries_frames_both_ways() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let got = read_frame(&mut s).await.unwrap();
            // Length and message in two writes, as nsd does.
            let f = frame(&got).unwrap();
            s.write_all(&f[..2]).await.unwrap();
            s.write_all(&f[2..]).await.unwrap();
        });
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let mut c = connect(addr, deadline).await.unwrap();
        c.write_all(&frame(b"query").unwrap()).await.unwrap();
        assert_eq!(read_frame(&mut c).await.unwrap(), b"query");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn framing_round_trips_and_rejects_huge() {
        let f = frame(b"hello").unwrap();
        assert_eq!(&f[..2], &[0, 5]);
        let mut rd = &f[..];
        assert_eq!(read_frame(&mut rd).await.unwrap(), b"hello");
        assert!(frame(&vec![0; 70_000]).is_none());
        let mut short = &[0u8, 9, 1, 2][..];
        assert!(read_frame(&mut short).await.is_err());
    }

    #[tokio::test]
    async fn connect_to_a_closed_port_fails_fast() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let err = connect(addr, deadline).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Connect { .. }), "{err}");
    }
}
