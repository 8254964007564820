//! Reading many datagrams per system call (`recvmmsg`), and sending the answers a read
//! produced at once (`sendmmsg`), for the UDP listeners. (The shared upstream sockets were
//! measured with `recvmmsg` too and gained nothing, so they read one datagram at a time.)
//!
//! Under load a UDP socket seldom drains between two reads, so one call returns what is
//! queued (up to the batch size) and the per-call cost (the system call, the socket lookup,
//! tokio's readiness bookkeeping) is paid once for the lot. An idle socket costs what a
//! `recv_from` costs: the call returns the one datagram there is. Likewise the answers that
//! one read's queries got at once (cache hits, refusals) leave in one `sendmmsg`; a lone
//! answer leaves by `send_to`. The answers that query tasks finish later (cache misses) wait
//! in the listener's [`Outbox`] and leave with the next batch the listener sends.

use std::cell::RefCell;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::quiet::QuietUdp;

/// Buffers for reading up to `count` datagrams of up to `size` octets at once.
pub(crate) struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    /// Length and sender of each datagram the last read returned.
    got: Vec<(usize, Option<SocketAddr>)>,
    /// Whether the socket is IPv6 (learnt at the first read).
    v6: Option<bool>,
}

/// Headers for `recvmmsg` with room for so many datagrams.
type Headers = (usize, Option<MultiHeaders<SockaddrStorage>>);

thread_local! {
    /// The `recvmmsg` headers, one set for IPv4 sockets and one for IPv6 sockets. They
    /// hold raw pointers, so they cannot live in a `RecvBatch` held across an await by a
    /// task that may move between threads; they are filled and read within one call, on
    /// one thread. One set per family, because the kernel leaves each header's address
    /// length at what it wrote last (16 octets for IPv4, 28 for IPv6) and nix does not
    /// reset it: an IPv6 read through headers an IPv4 read shrank would cut the address.
    static HEADERS: RefCell<[Headers; 2]> = const { RefCell::new([(0, None), (0, None)]) };
    /// The `sendmmsg` headers (every address is written for each call, so one set serves
    /// both families).
    static SEND_HEADERS: RefCell<Headers> = const { RefCell::new((0, None)) };
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("count", &self.bufs.len())
            .field("got", &self.got.len())
            .finish()
    }
}

impl RecvBatch {
    /// Room for `count` datagrams (at least one) of `size` octets each. A datagram longer
    /// than `size` is cut (as `recv_from` cuts it); callers that must see oversized junk
    /// whole pass the largest datagram size.
    pub(crate) fn new(count: usize, size: usize) -> Self {
        let count = count.max(1);
        RecvBatch {
            bufs: (0..count).map(|_| vec![0u8; size]).collect(),
            got: Vec::with_capacity(count),
            v6: None,
        }
    }

    /// Waits until `sock` is readable and reads every queued datagram, up to the batch
    /// size; returns how many (at least one). Read them with [`RecvBatch::get`].
    pub(crate) async fn recv(&mut self, sock: &QuietUdp) -> io::Result<usize> {
        let v6 = match self.v6 {
            Some(v6) => v6,
            None => *self.v6.insert(sock.local_addr()?.is_ipv6()),
        };
        sock.read_with(|s| self.read(s.as_raw_fd(), v6)).await
    }

    /// Datagram `i` of the last read, and its sender (`None` for a sender that is neither
    /// IPv4 nor IPv6, which a UDP socket does not produce).
    pub(crate) fn get(&self, i: usize) -> Option<(&[u8], Option<SocketAddr>)> {
        let &(len, from) = self.got.get(i)?;
        Some((self.bufs.get(i)?.get(..len)?, from))
    }

    fn read(&mut self, fd: std::os::fd::RawFd, v6: bool) -> io::Result<usize> {
        let count = self.bufs.len();
        let bufs = &mut self.bufs;
        let got = &mut self.got;
        got.clear();
        HEADERS.with_borrow_mut(|sets| {
            let Some((room, headers)) = sets.get_mut(usize::from(v6)) else {
                return Err(io::Error::other("no recvmmsg headers"));
            };
            if *room < count || headers.is_none() {
                *headers = Some(MultiHeaders::preallocate(count, None));
                *room = count;
            }
            let Some(headers) = headers.as_mut() else {
                return Err(io::Error::other("no recvmmsg headers"));
            };
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
                bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
            let results = recvmmsg(fd, headers, iovs.iter_mut(), MsgFlags::empty(), None)
                .map_err(io::Error::from)?;
            got.extend(results.map(|r| (r.bytes, r.address.and_then(|a| std_addr(&a)))));
            Ok(())
        })?;
        if got.is_empty() {
            // recvmmsg reports an empty queue as EAGAIN; never claim a read that returned
            // nothing.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(got.len())
    }
}

/// Answers waiting to leave one UDP socket together.
#[derive(Debug, Default)]
pub(crate) struct SendBatch {
    out: Vec<(Vec<u8>, SocketAddr)>,
}

impl SendBatch {
    /// Room for `count` answers before the vector grows.
    pub(crate) fn new(count: usize) -> Self {
        SendBatch {
            out: Vec::with_capacity(count),
        }
    }

    /// Queues `resp` for `peer`.
    pub(crate) fn push(&mut self, resp: Vec<u8>, peer: SocketAddr) {
        self.out.push((resp, peer));
    }

    /// Sends every queued answer now, in order, and empties the batch. An answer that fails
    /// for another reason than a full buffer is handed to `failed` and dropped (as a lost
    /// datagram would be); the answers that do not fit in the socket buffer are handed to
    /// `blocked`, in order, for the caller to send once there is room.
    pub(crate) fn flush(
        &mut self,
        sock: &QuietUdp,
        mut failed: impl FnMut(io::Error),
        mut blocked: impl FnMut(Vec<u8>, SocketAddr),
    ) {
        let mut start = 0;
        while start < self.out.len() {
            let rest = self.out.get(start..).unwrap_or_default();
            let sent = match rest {
                [(resp, peer)] => sock.try_send_to(resp, *peer).map(|_| 1),
                _ => send_many(sock.as_raw_fd(), rest),
            };
            match sent {
                Ok(n) => start += n.max(1),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // The first answer of the call failed: drop it, go on with the next.
                    failed(e);
                    start += 1;
                }
            }
        }
        // The first `start` answers left or failed; the rest wait for room.
        for (resp, peer) in self.out.drain(..).skip(start) {
            blocked(resp, peer);
        }
    }
}

/// Answers that query tasks finished (cache misses), waiting for their listener to send them
/// together with whatever else is ready: under load many answers come back between two turns
/// of the listener, and one `sendmmsg` carries them all instead of a `send_to` each.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    state: Mutex<OutboxState>,
    /// Wakes the listener when the first answer joins an empty outbox.
    ready: Notify,
}

#[derive(Debug, Default)]
struct OutboxState {
    queued: Vec<(Vec<u8>, SocketAddr)>,
    /// The listener has stopped: nobody would send what is queued.
    closed: bool,
}

impl Outbox {
    /// Queues `resp` for `peer` and wakes the listener if it has nothing else queued. Gives
    /// the answer back once the listener has stopped (shutdown): the caller sends it itself.
    pub(crate) fn push(&self, resp: Vec<u8>, peer: SocketAddr) -> Result<(), Vec<u8>> {
        let mut st = self.state.lock();
        if st.closed {
            return Err(resp);
        }
        let first = st.queued.is_empty();
        st.queued.push((resp, peer));
        drop(st);
        if first {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Moves every queued answer, in order, to the end of `out`.
    pub(crate) fn take_into(&self, out: &mut SendBatch) {
        let mut st = self.state.lock();
        out.out.append(&mut st.queued);
    }

    /// Refuses further answers (they are given back to their tasks) and moves those queued
    /// to `out`, for the listener's last flush.
    pub(crate) fn close_into(&self, out: &mut SendBatch) {
        let mut st = self.state.lock();
        st.closed = true;
        out.out.append(&mut st.queued);
    }

    /// Completes once an answer joined the empty outbox since the last call's future
    /// completed (or was created, for the first).
    pub(crate) fn ready(&self) -> tokio::sync::futures::Notified<'_> {
        self.ready.notified()
    }
}

/// Answers per `sendmmsg` at most: an outbox can hold as many answers as queries are in
/// flight, and the headers stay as large as the largest call on every thread.
const SEND_MAX: usize = 64;

/// One `sendmmsg` of (the first [`SEND_MAX`] of) `out`; how many answers left (at least
/// one), or the first one's error.
fn send_many(fd: std::os::fd::RawFd, out: &[(Vec<u8>, SocketAddr)]) -> io::Result<usize> {
    let out = out.get(..SEND_MAX).unwrap_or(out);
    SEND_HEADERS.with_borrow_mut(|(room, headers)| {
        if *room < out.len() || headers.is_none() {
            *headers = Some(MultiHeaders::preallocate(out.len(), None));
            *room = out.len();
        }
        let Some(headers) = headers.as_mut() else {
            return Err(io::Error::other("no sendmmsg headers"));
        };
        let iovs: Vec<[IoSlice<'_>; 1]> = out.iter().map(|(b, _)| [IoSlice::new(b)]).collect();
        let addrs: Vec<Option<SockaddrStorage>> = out
            .iter()
            .map(|(_, a)| Some(SockaddrStorage::from(*a)))
            .collect();
        // nix reports how many left only through its result iterator, which builds a
        // `RecvMsg` per message and in doing so reads the headers' address slots, never
        // written on this send path (harmless copies of uninitialised bytes; nix's own test
        // does the same). dnsd denies `unsafe`, so it does not call `libc::sendmmsg` itself.
        let sent = sendmmsg(fd, headers, &iovs, &addrs, [], MsgFlags::empty())
            .map_err(io::Error::from)?
            .count();
        if sent == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(sent)
    })
}

fn std_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use tokio::net::UdpSocket;

    use super::*;

    fn quiet(addr: &str) -> QuietUdp {
        QuietUdp::new(std::net::UdpSocket::bind(addr).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn reads_what_is_queued_in_one_call_with_each_sender() {
        let rx = quiet("127.0.0.1:0");
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        a.send_to(b"one", to).await.unwrap();
        b.send_to(b"two", to).await.unwrap();
        a.send_to(&[7u8; 3000], to).await.unwrap();
        let mut batch = RecvBatch::new(8, 2048);
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let n = batch.recv(&rx).await.unwrap();
            for i in 0..n {
                let (data, from) = batch.get(i).unwrap();
                seen.push((data.to_vec(), from.unwrap()));
            }
        }
        assert_eq!(seen[0], (b"one".to_vec(), a.local_addr().unwrap()));
        assert_eq!(seen[1], (b"two".to_vec(), b.local_addr().unwrap()));
        // Longer than a slot: cut to the slot, as recv_from cuts to its buffer.
        assert_eq!(seen[2].0.len(), 2048);
        assert!(batch.get(batch.got.len()).is_none());
    }

    #[tokio::test]
    async fn ipv4_and_ipv6_reads_on_one_thread_keep_whole_addresses() {
        let rx4 = quiet("127.0.0.1:0");
        let rx6 = quiet("[::1]:0");
        let tx4 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tx6 = UdpSocket::bind("[::1]:0").await.unwrap();
        let mut b4 = RecvBatch::new(2, 64);
        let mut b6 = RecvBatch::new(2, 64);
        for round in 0..3u8 {
            tx4.send_to(&[round], rx4.local_addr().unwrap())
                .await
                .unwrap();
            assert_eq!(b4.recv(&rx4).await.unwrap(), 1);
            assert_eq!(
                b4.get(0).unwrap(),
                (&[round][..], Some(tx4.local_addr().unwrap()))
            );
            tx6.send_to(&[round], rx6.local_addr().unwrap())
                .await
                .unwrap();
            assert_eq!(b6.recv(&rx6).await.unwrap(), 1);
            assert_eq!(
                b6.get(0).unwrap(),
                (&[round][..], Some(tx6.local_addr().unwrap()))
            );
        }
    }

    #[tokio::test]
    async fn more_than_a_batch_is_read_over_several_calls_in_order() {
        let rx = quiet("[::1]:0");
        let tx = UdpSocket::bind("[::1]:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        for i in 0..10u8 {
            tx.send_to(&[i], to).await.unwrap();
        }
        let mut batch = RecvBatch::new(4, 16);
        let mut got = Vec::new();
        while got.len() < 10 {
            let n = batch.recv(&rx).await.unwrap();
            assert!((1..=4).contains(&n), "{n}");
            for i in 0..n {
                let (data, from) = batch.get(i).unwrap();
                assert_eq!(from, Some(tx.local_addr().unwrap()));
                got.push(data[0]);
            }
        }
        assert_eq!(got, (0..10).collect::<Vec<u8>>());
    }

    async fn recv_one(sock: &UdpSocket) -> Vec<u8> {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), sock.recv(&mut buf))
            .await
            .expect("a datagram within 5 s")
            .unwrap();
        buf[..n].to_vec()
    }

    /// Flushes `out` on `tx`, which must take every answer (over loopback a send never
    /// waits for room); returns how many answers failed.
    fn flush_all(out: &mut SendBatch, tx: &QuietUdp) -> usize {
        let mut failures = 0;
        out.flush(
            tx,
            |_| failures += 1,
            |_, _| panic!("loopback never blocks"),
        );
        assert!(out.out.is_empty());
        failures
    }

    #[tokio::test]
    async fn a_flush_sends_every_answer_to_its_peer_in_order() {
        for (local, peer_addr) in [("127.0.0.1:0", "127.0.0.1:0"), ("[::1]:0", "[::1]:0")] {
            let tx = quiet(local);
            let a = UdpSocket::bind(peer_addr).await.unwrap();
            let b = UdpSocket::bind(peer_addr).await.unwrap();
            let (pa, pb) = (a.local_addr().unwrap(), b.local_addr().unwrap());
            let mut out = SendBatch::new(2);
            // A lone answer (send_to), then more answers than the thread's sendmmsg headers
            // had room for (they grow), then a few again (the grown headers reused).
            for round in [1u8, 7, 3] {
                for i in 0..round {
                    out.push(vec![round, i], if i % 3 == 1 { pb } else { pa });
                }
                assert_eq!(flush_all(&mut out, &tx), 0);
                for i in 0..round {
                    let at = if i % 3 == 1 { &b } else { &a };
                    assert_eq!(recv_one(at).await, vec![round, i], "{local} round {round}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_flush_of_more_answers_than_one_call_takes_sends_them_all_in_order() {
        let tx = quiet("127.0.0.1:0");
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let pa = a.local_addr().unwrap();
        let mut out = SendBatch::new(4);
        let n = 2 * SEND_MAX + 3;
        for i in 0..n {
            out.push(u16::try_from(i).unwrap().to_be_bytes().to_vec(), pa);
        }
        assert_eq!(flush_all(&mut out, &tx), 0, "no answer fails");
        let room = SEND_HEADERS.with_borrow(|(room, _)| *room);
        assert_eq!(
            room, SEND_MAX,
            "one call's headers took more than SEND_MAX answers"
        );
        for i in 0..n {
            assert_eq!(
                recv_one(&a).await,
                u16::try_from(i).unwrap().to_be_bytes().to_vec()
            );
        }
    }

    #[tokio::test]
    async fn an_answer_that_cannot_be_sent_is_dropped_and_the_rest_still_leave() {
        let tx = quiet("127.0.0.1:0");
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let pa = a.local_addr().unwrap();
        // An IPv6 destination on an IPv4 socket fails at once, wherever it sits in the batch.
        let bad: SocketAddr = "[2001:db8::1]:53".parse().unwrap();
        let mut out = SendBatch::new(4);
        for (i, to) in [pa, bad, pa, bad, bad, pa].into_iter().enumerate() {
            out.push(vec![u8::try_from(i).unwrap()], to);
        }
        assert_eq!(flush_all(&mut out, &tx), 3);
        for want in [0u8, 2, 5] {
            assert_eq!(recv_one(&a).await, vec![want]);
        }
        // The first answer failing is the same case.
        out.push(vec![9], bad);
        out.push(vec![10], pa);
        assert_eq!(flush_all(&mut out, &tx), 1);
        assert_eq!(recv_one(&a).await, vec![10]);
    }

    /// Polls `f` once: whether it is still pending.
    fn pending<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        f.poll(&mut cx).is_pending()
    }

    #[tokio::test]
    async fn the_outbox_hands_its_answers_over_in_order_and_wakes_the_listener_once() {
        let outbox = Outbox::default();
        let a: SocketAddr = "127.0.0.1:5301".parse().unwrap();
        let b: SocketAddr = "[::1]:5302".parse().unwrap();
        let ready = outbox.ready();
        tokio::pin!(ready);
        assert!(pending(ready.as_mut()), "nothing queued yet");
        for (i, to) in [a, b, a].into_iter().enumerate() {
            outbox.push(vec![u8::try_from(i).unwrap()], to).unwrap();
        }
        assert!(!pending(ready.as_mut()), "the first answer wakes");
        let mut out = SendBatch::new(2);
        out.push(vec![9], b);
        outbox.take_into(&mut out);
        let got: Vec<(Vec<u8>, SocketAddr)> = out.out.drain(..).collect();
        assert_eq!(
            got,
            vec![(vec![9], b), (vec![0], a), (vec![1], b), (vec![2], a)],
            "after what the batch had, in the order they came"
        );
        // Only the answers queued after a wake-up and a drain wake the listener again.
        ready.set(outbox.ready());
        assert!(pending(ready.as_mut()));
        outbox.push(vec![3], b).unwrap();
        outbox.push(vec![4], b).unwrap();
        assert!(!pending(ready.as_mut()));
        ready.set(outbox.ready());
        assert!(pending(ready.as_mut()), "one wake-up for both");
        // Closing hands over what is queued and refuses the rest, which go back to their tasks.
        outbox.close_into(&mut out);
        assert_eq!(out.out.len(), 2);
        assert_eq!(outbox.push(vec![5], a), Err(vec![5]));
        outbox.take_into(&mut out);
        assert_eq!(out.out.len(), 2, "nothing was queued after closing");
    }
}
