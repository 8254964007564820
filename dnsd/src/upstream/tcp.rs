//! tcp:// upstreams: connection setup and the two-octet length framing of RFC 7766 (also used
//! under TLS). Pooling and pipelining live in `pool`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use super::UpstreamError;

/// Opens a TCP connection to `addr`, giving up at `deadline`.
pub(crate) async fn connect(
    addr: SocketAddr,
    deadline: Instant,
) -> Result<TcpStream, UpstreamError> {
    let stream = match timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(UpstreamError::Connect {
                addr,
                source: Arc::new(e),
            });
        }
        Err(_) => return Err(UpstreamError::Timeout { addr }),
    };
    // Queries are small and latency-bound: never wait to coalesce them.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%addr, error = %e, "cannot set TCP_NODELAY");
    }
    Ok(stream)
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
