//! [`UnixIo`]: a Unix stream that asks epoll for write readiness only while a write waits.
//!
//! tokio registers a `UnixStream` for reading and writing at once. A Unix socket reports
//! write space every time the peer reads, so each request that fwd reads from dnsd's
//! authorize connection woke dnsd for nothing (an `EPOLLOUT`-only event: about one per
//! call in strace). dnsd and fwd often share a core, and such a wake-up can preempt fwd in
//! the middle of the call that dnsd waits for.
//!
//! `UnixIo` registers the socket for reading only and writes straight to it. Only a write
//! that would block registers a duplicate of the descriptor for write readiness, until a
//! write goes through; control messages are small, so that is rare.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// A connected Unix stream registered for reading only (see the module documentation).
#[derive(Debug)]
pub(crate) struct UnixIo {
    read: AsyncFd<UnixStream>,
    /// A duplicate of the descriptor registered for writing, while a write waits for room.
    write: Option<AsyncFd<UnixStream>>,
}

/// Registers `io` with tokio for `interest` alone (dnsd's UDP sockets use it too).
///
/// tokio 1.54 deprecated this safe constructor because an `AsyncFd` over a type that closes
/// or replaces its descriptor while registered would break I/O safety, and its replacement
/// is `unsafe` (this crate forbids `unsafe`). Callers pass sockets that own their
/// descriptor (`UnixStream`, `UdpSocket`); the `AsyncFd` owns the socket until it is
/// dropped, deregistering first.
#[allow(deprecated)]
pub fn register_with_interest<T: std::os::fd::AsRawFd>(
    io: T,
    interest: Interest,
) -> io::Result<AsyncFd<T>> {
    AsyncFd::with_interest(io, interest)
}

impl UnixIo {
    /// Takes over a connected tokio stream.
    pub(crate) fn new(stream: tokio::net::UnixStream) -> io::Result<Self> {
        // into_std leaves the socket non-blocking.
        let std = stream.into_std()?;
        Ok(UnixIo {
            read: register_with_interest(std, Interest::READABLE)?,
            write: None,
        })
    }
}

impl AsyncRead for UnixIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            let mut guard = ready!(me.read.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|s| s.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Not readable after all: readiness was cleared, wait again.
                Err(_) => {}
            }
        }
    }
}

impl AsyncWrite for UnixIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        loop {
            let Some(waiting) = &me.write else {
                match me.read.get_ref().write(data) {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Registering reports readiness that arrived since the write
                        // failed, so no wake-up is lost.
                        let dup = me.read.get_ref().try_clone()?;
                        me.write = Some(register_with_interest(dup, Interest::WRITABLE)?);
                        continue;
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
            };
            let mut guard = ready!(waiting.poll_write_ready(cx))?;
            match guard.try_io(|s| s.get_ref().write(data)) {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(result) => {
                    // Room again: back to reading-only registration.
                    me.write = None;
                    return Poll::Ready(result);
                }
                Err(_) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the socket.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.read.get_ref().shutdown(Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::test_util::{EPOLLOUT, assert_reads_only, registrations};

    async fn pair() -> (UnixIo, tokio::net::UnixStream) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        (UnixIo::new(a).unwrap(), b)
    }

    #[tokio::test]
    async fn registered_for_reading_only_and_both_ways_work() {
        let (mut io, mut peer) = pair().await;
        let fd = io.read.get_ref().as_raw_fd();
        assert_reads_only(fd);
        // The control: tokio's own stream is registered for both.
        let regs = registrations(peer.as_raw_fd());
        assert!(regs.iter().any(|e| e & EPOLLOUT != 0), "{regs:x?}");

        io.write_all(b"request").await.unwrap();
        let mut got = [0u8; 7];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"request");
        peer.write_all(b"reply").await.unwrap();
        let mut got = [0u8; 5];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"reply");
        io.shutdown().await.unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the peer sees the end");
        drop(peer);
        let mut buf = [0u8; 4];
        assert_eq!(io.read(&mut buf).await.unwrap(), 0, "end of stream");
    }

    #[tokio::test]
    async fn a_write_that_blocks_waits_for_room_and_loses_nothing() {
        let (mut io, mut peer) = pair().await;
        let fd = io.read.get_ref().as_raw_fd();
        // Far more than a Unix socket buffers: the writer blocks until the peer reads.
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
        let expect = data.clone();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got
        });
        io.write_all(&data).await.unwrap();
        // Once the writes are through, only the reading registration is left.
        assert_reads_only(fd);
        io.shutdown().await.unwrap();
        let got = reader.await.unwrap();
        assert_eq!(got.len(), expect.len());
        assert!(got == expect, "every octet, in order");
    }

    #[tokio::test]
    async fn a_write_to_a_closed_peer_fails() {
        let (mut io, peer) = pair().await;
        drop(peer);
        let err = io.write_all(b"x").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
    }
}
