//! [`QuietUdp`]: a UDP socket registered with epoll for reading only.
//!
//! tokio registers a `UdpSocket` for reading and writing. A UDP socket signals write space
//! each time a datagram it sent is freed, that is whenever the peer has read it, so dnsd was
//! woken once more per datagram: after the client read its answer (listener socket) and after
//! the upstream read the query (upstream socket). strace at 1,000 queries per second counted
//! about one such `EPOLLOUT`-only wake-up for every four queries, each a trip out of idle.
//!
//! `QuietUdp` asks only for read readiness (and errors, so that an ICMP error on a connected
//! socket reaches the reader), and sends straight away. While sends would block (a full send
//! buffer), a duplicate of the descriptor is registered for write readiness, shared by every
//! send that waits, and given up when the last of them is through.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use guard_proto::register_with_interest;
use parking_lot::Mutex;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// What a reader waits for: data, or an error (an ICMP error on a connected socket is
/// reported as `EPOLLERR` alone, which tokio files under write readiness).
const READ: Interest = Interest::READABLE.add(Interest::ERROR);

/// A socket registered for reading only (see the module documentation).
#[derive(Debug)]
pub(crate) struct Quiet<S: AsRawFd> {
    io: AsyncFd<S>,
    /// The write registration (of a duplicate descriptor) while sends wait for room.
    waiting: Mutex<Option<Arc<AsyncFd<S>>>>,
}

/// A UDP socket registered for reading only.
pub(crate) type QuietUdp = Quiet<UdpSocket>;

/// A socket that can be duplicated (a second descriptor for the same socket).
pub(crate) trait Dup: AsRawFd + Sized {
    fn dup(&self) -> io::Result<Self>;
}

impl Dup for UdpSocket {
    fn dup(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

impl<S: Dup> Quiet<S> {
    /// Takes over `sock`, which must be non-blocking.
    fn register(sock: S) -> io::Result<Self> {
        Ok(Quiet {
            io: register_with_interest(sock, READ)?,
            waiting: Mutex::new(None),
        })
    }

    pub(crate) fn as_raw_fd(&self) -> RawFd {
        self.io.get_ref().as_raw_fd()
    }

    /// Waits until the socket is readable (or has an error to report) and runs `read`, a
    /// non-blocking read, until it does not report `WouldBlock`.
    pub(crate) async fn read_with<R>(
        &self,
        mut read: impl FnMut(&S) -> io::Result<R>,
    ) -> io::Result<R> {
        loop {
            let mut ready = self.io.ready(READ).await?;
            match ready.try_io(|s| read(s.get_ref())) {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(result) => return result,
                // Not readable after all: the readiness was cleared; wait again.
                Err(_would_block) => {}
            }
        }
    }

    /// Runs `write`, a non-blocking write, until it does not report `WouldBlock`. Write
    /// readiness is asked for only after a write would block, through the shared write
    /// registration; registering reports room that appeared since the write failed, so no
    /// wake-up is lost.
    async fn write_with<R>(&self, mut write: impl FnMut(&S) -> io::Result<R>) -> io::Result<R> {
        loop {
            match write(self.io.get_ref()) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                other => return other,
            }
        }
        let waiting = Waiting::join(self)?;
        loop {
            let mut ready = waiting.fd.writable().await?;
            match ready.try_io(|s| write(s.get_ref())) {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(result) => return result,
                Err(_would_block) => {}
            }
        }
    }
}

/// One send's share of the write registration; the last one to go (done or cancelled) gives
/// the registration up.
struct Waiting<'a, S: AsRawFd> {
    quiet: &'a Quiet<S>,
    fd: Arc<AsyncFd<S>>,
}

impl<'a, S: Dup> Waiting<'a, S> {
    fn join(quiet: &'a Quiet<S>) -> io::Result<Self> {
        let mut slot = quiet.waiting.lock();
        let fd = match &*slot {
            Some(fd) => fd.clone(),
            None => {
                let fd = Arc::new(register_with_interest(
                    quiet.io.get_ref().dup()?,
                    Interest::WRITABLE,
                )?);
                *slot = Some(fd.clone());
                fd
            }
        };
        Ok(Waiting { quiet, fd })
    }
}

impl<S: AsRawFd> Drop for Waiting<'_, S> {
    fn drop(&mut self) {
        let mut slot = self.quiet.waiting.lock();
        // Two references left: the slot's and this one.
        if slot
            .as_ref()
            .is_some_and(|fd| Arc::ptr_eq(fd, &self.fd) && Arc::strong_count(fd) == 2)
        {
            *slot = None;
        }
    }
}

impl QuietUdp {
    /// Takes over `sock` (made non-blocking).
    pub(crate) fn new(sock: UdpSocket) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        Self::register(sock)
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    /// Receives one datagram (a connected socket).
    pub(crate) async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_with(|s| s.recv(buf)).await
    }

    /// Sends one datagram on a connected socket, waiting for room if the buffer is full.
    pub(crate) async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.write_with(|s| s.send(buf)).await
    }

    /// Sends one datagram to `peer` now, or fails with `WouldBlock` when the buffer is full.
    pub(crate) fn try_send_to(&self, buf: &[u8], peer: SocketAddr) -> io::Result<usize> {
        self.io.get_ref().send_to(buf, peer)
    }

    /// Sends one datagram to `peer`, waiting for room if the buffer is full.
    pub(crate) async fn send_to(&self, buf: &[u8], peer: SocketAddr) -> io::Result<usize> {
        self.write_with(|s| s.send_to(buf, peer)).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::future::Future;
    use std::time::Duration;

    use guard_proto::test_util::{EPOLLOUT, assert_reads_only, registrations};

    use super::*;

    fn bound(addr: &str) -> QuietUdp {
        QuietUdp::new(UdpSocket::bind(addr).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn reads_and_writes_with_a_reading_only_registration() {
        let a = bound("127.0.0.1:0");
        let b = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        assert_reads_only(a.as_raw_fd());
        // The control: tokio's own socket is registered for both.
        assert!(
            registrations(b.as_raw_fd())
                .iter()
                .any(|e| e & EPOLLOUT != 0),
            "{:x?}",
            registrations(b.as_raw_fd())
        );
        let to_b = b.local_addr().unwrap();
        assert_eq!(a.try_send_to(b"now", to_b).unwrap(), 3);
        assert_eq!(a.send_to(b"later", to_b).await.unwrap(), 5);
        let mut buf = [0u8; 16];
        let (n, from) = b.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], from), (&b"now"[..], a.local_addr().unwrap()));
        let (n, _) = b.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"later");
        b.send_to(b"back", a.local_addr().unwrap()).await.unwrap();
        let (n, from) = a.read_with(|s| s.recv_from(&mut buf)).await.unwrap();
        assert_eq!((&buf[..n], from), (&b"back"[..], to_b));
        assert_reads_only(a.as_raw_fd());
    }

    impl Dup for std::os::unix::net::UnixDatagram {
        fn dup(&self) -> io::Result<Self> {
            self.try_clone()
        }
    }

    #[tokio::test]
    async fn a_write_that_would_block_waits_for_room_and_loses_nothing() {
        // Over loopback a UDP send never blocks (the datagram is handed to the receiver and
        // the sender's buffer released within the call), so the waiting path is driven with
        // a Unix datagram pair, whose sender blocks while the receiver's queue is full.
        let (tx, rx) = std::os::unix::net::UnixDatagram::pair().unwrap();
        tx.set_nonblocking(true).unwrap();
        let tx = Quiet::register(tx).unwrap();
        let rx = tokio::net::UnixDatagram::from_std({
            rx.set_nonblocking(true).unwrap();
            rx
        })
        .unwrap();
        let count = 500u32;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while got.len() < 2 * count as usize {
                let n = rx.recv(&mut buf).await.unwrap();
                got.push(u32::from_be_bytes(buf[..n].try_into().unwrap()));
            }
            got
        });
        let blocked = &std::cell::Cell::new(0);
        let tx = &tx;
        let send = move |i: u32| {
            tx.write_with(move |s| {
                let r = s.send(&i.to_be_bytes());
                if matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                    blocked.set(blocked.get() + 1);
                }
                r
            })
        };
        // One sender, then two at once (sharing one write registration).
        for i in 0..count {
            assert_eq!(send(i).await.unwrap(), 4);
        }
        let half = |from: u32| async move {
            for i in from..from + count / 2 {
                assert_eq!(send(i).await.unwrap(), 4);
            }
        };
        tokio::join!(half(count), half(count + count / 2));
        assert!(
            blocked.get() > 0,
            "the receiver's queue never filled: the test proves nothing"
        );
        assert!(
            tx.waiting.lock().is_none(),
            "the write registration was given up"
        );
        assert_reads_only(tx.as_raw_fd());
        let got = reader.await.unwrap();
        assert_eq!(
            got[..count as usize],
            (0..count).collect::<Vec<_>>(),
            "in order"
        );
        let mut rest = got[count as usize..].to_vec();
        rest.sort_unstable();
        assert_eq!(rest, (count..2 * count).collect::<Vec<_>>(), "all of them");
    }

    #[tokio::test]
    async fn an_icmp_error_reaches_a_waiting_reader() {
        // A port nobody listens on: the kernel answers with ICMP port unreachable, which a
        // connected socket reports on its next receive.
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dead = closed.local_addr().unwrap();
        drop(closed);
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(dead).unwrap();
        let sock = QuietUdp::new(sock).unwrap();
        let mut buf = [0u8; 64];
        let reading = sock.recv(&mut buf);
        tokio::pin!(reading);
        // The reader waits first (polled once: nothing there), then the query goes out and
        // bounces.
        std::future::poll_fn(|cx| match reading.as_mut().poll(cx) {
            std::task::Poll::Pending => std::task::Poll::Ready(()),
            std::task::Poll::Ready(r) => panic!("read before anything was sent: {r:?}"),
        })
        .await;
        sock.send(b"query").await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(5), reading)
            .await
            .expect("the ICMP error woke the reader")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    }
}
