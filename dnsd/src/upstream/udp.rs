//! udp:// upstreams: a few long-lived connected sockets per upstream (as dnsdist keeps), each
//! carrying many queries at once under random IDs. Only a response from the upstream's
//! address (the socket is connected) with a pending ID and that query's question is handed to
//! the query; everything else is counted as a bad response and ignored, so a spoofer cannot
//! cut a query short. A socket is replaced after [`RETIRE_AFTER`] queries, so that the source
//! port keeps changing (RFC 5452) without paying a socket per query.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::health::Health;
use super::message::{
    HEADER_LEN, IdMap, Prepared, id_of, is_truncated, records_framed, response_matches, set_id,
    unused_id,
};
use super::{UpstreamError, by_deadline};
use crate::quiet::QuietUdp;

/// Receive room beyond the client's advertised payload size, so that an oversized answer is
/// seen whole (and fails to match) rather than cut.
const RECV_SLACK: usize = 512;

/// Sockets per upstream: queries are spread over them round robin.
const SOCKETS: usize = 4;

/// Queries one socket carries before it is replaced by one on a new random port.
const RETIRE_AFTER: u64 = 2048;

/// Queries in flight on one socket; beyond that a query gets a socket of its own. Far below
/// 65536 so that a random free ID is found in a couple of tries.
const MAX_PENDING: usize = 4096;

/// The largest datagram.
const MAX_DATAGRAM: usize = 65_535;

/// What came back over UDP.
#[derive(Debug)]
pub(crate) enum UdpReply {
    /// The client's answer (ID restored).
    Answer(Vec<u8>),
    /// TC=1: ask again over TCP.
    Truncated,
}

type Reply = Result<Vec<u8>, UpstreamError>;

/// The long-lived sockets to one udp:// upstream.
#[derive(Debug)]
pub(crate) struct UdpPool {
    addr: SocketAddr,
    health: Arc<Health>,
    slots: Vec<Mutex<Option<Arc<Channel>>>>,
    next: AtomicUsize,
}

/// One connected socket, its pending queries and its receive task.
#[derive(Debug)]
struct Channel {
    /// Registered for reading only: write space after every query would wake dnsd.
    sock: QuietUdp,
    state: Mutex<ChannelState>,
    /// Wakes the receive task to end it once the channel is retired and idle.
    done: Notify,
}

#[derive(Debug, Default)]
struct ChannelState {
    /// In-flight queries by ID; the sequence number tells a query's own entry from a later
    /// one that reused its ID.
    pending: IdMap<Waiter>,
    next_seq: u64,
    /// Queries sent so far.
    sent: u64,
    /// No new queries: the channel ends when the last pending one is done.
    retired: bool,
}

#[derive(Debug)]
struct Waiter {
    seq: u64,
    /// The question the response must echo (any letter case).
    question: Box<[u8]>,
    op_bits: u8,
    tx: oneshot::Sender<Reply>,
}

impl UdpPool {
    /// Sockets to `addr`, opened on first use; bad responses are counted on `health`.
    pub(crate) fn new(addr: SocketAddr, health: Arc<Health>) -> Self {
        Self {
            addr,
            health,
            slots: (0..SOCKETS).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Sends the query and waits until `deadline` for a matching response.
    pub(crate) async fn exchange(
        &self,
        prepared: &Prepared,
        deadline: Instant,
    ) -> Result<UdpReply, UpstreamError> {
        let Some(question) = prepared.question_wire() else {
            return exchange_alone(self.addr, prepared, deadline, &self.health).await;
        };
        let chan = self.channel()?;
        let (tx, rx) = oneshot::channel();
        let Some((id, seq)) = chan.register(question, prepared.wire(), tx) else {
            // This socket is saturated (or retired): a socket of its own for this query.
            return exchange_alone(self.addr, prepared, deadline, &self.health).await;
        };
        let _pending = Registration {
            chan: &chan,
            id,
            seq,
        };
        let mut wire = prepared.wire().to_vec();
        set_id(&mut wire, id);
        // One timer for the send (which waits only when the socket buffer is full) and the
        // answer: the only bound on this exchange.
        let sent_and_answered = async {
            if let Err(e) = chan.sock.send(&wire).await {
                let err = refused_or(self.addr)(e);
                // The send took the socket's pending ICMP error, which the receive task
                // would otherwise have reported to every query on this socket.
                if matches!(err, UpstreamError::Connect { .. }) {
                    chan.fail_all(&err);
                }
                return Err(err);
            }
            rx.await.unwrap_or_else(|_| {
                Err(UpstreamError::Io {
                    addr: self.addr,
                    source: Arc::new(std::io::Error::other("upstream socket closed")),
                })
            })
        };
        let resp = by_deadline(deadline, self.addr, sent_and_answered).await?;
        // A forged TC can only make us ask again over TCP, so it needs no further checks.
        if is_truncated(&resp) {
            return Ok(UdpReply::Truncated);
        }
        prepared
            .accept(&resp, false)
            .map(UdpReply::Answer)
            .map_err(|reason| {
                self.health
                    .on_bad_response(&format!("bad response from {}: {reason}", self.addr));
                UpstreamError::BadResponse {
                    addr: self.addr,
                    reason,
                }
            })
    }

    /// Retires every socket (shutdown or reload): queries in flight still get their answers,
    /// and later queries open new sockets.
    pub(crate) fn close_all(&self) {
        for slot in &self.slots {
            if let Some(chan) = slot.lock().take() {
                chan.retire();
            }
        }
    }

    /// The next socket round robin, opened (or replaced, once retired) as needed.
    fn channel(&self) -> Result<Arc<Channel>, UpstreamError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % SOCKETS;
        let Some(slot) = self.slots.get(i) else {
            return Err(UpstreamError::Io {
                addr: self.addr,
                source: Arc::new(std::io::Error::other("no socket slot")),
            });
        };
        let mut slot = slot.lock();
        if let Some(chan) = slot.as_ref()
            && !chan.state.lock().retired
        {
            return Ok(chan.clone());
        }
        let chan = Arc::new(Channel::new(self.addr)?);
        tokio::spawn(receive(chan.clone(), self.addr, self.health.clone()));
        *slot = Some(chan.clone());
        Ok(chan)
    }
}

impl Channel {
    /// A channel on a new socket connected to `addr`, with nothing pending (its receive task
    /// is the caller's to spawn).
    fn new(addr: SocketAddr) -> Result<Self, UpstreamError> {
        Ok(Channel {
            sock: connected_socket(addr)?,
            state: Mutex::new(ChannelState::default()),
            done: Notify::new(),
        })
    }
}

/// A new UDP socket on a random ephemeral port (RFC 5452), connected to `addr`: the kernel
/// drops datagrams from other sources and reports ICMP errors.
fn connected_socket(addr: SocketAddr) -> Result<QuietUdp, UpstreamError> {
    let io = |source| UpstreamError::Io {
        addr,
        source: Arc::new(source),
    };
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = std::net::UdpSocket::bind(local).map_err(io)?;
    sock.connect(addr).map_err(io)?;
    QuietUdp::new(sock).map_err(io)
}

impl Channel {
    /// Registers a query under a random free ID; `None` when the socket is saturated or
    /// retired.
    fn register(
        &self,
        question: &[u8],
        wire: &[u8],
        tx: oneshot::Sender<Reply>,
    ) -> Option<(u16, u64)> {
        let mut st = self.state.lock();
        // A retired channel takes no new query: its receive task may already have ended (after
        // an error, or once the last pending query was done), and nobody would read the answer.
        if st.retired || st.pending.len() >= MAX_PENDING {
            return None;
        }
        let id = unused_id(&st.pending);
        let seq = st.next_seq;
        st.next_seq += 1;
        st.sent += 1;
        if st.sent >= RETIRE_AFTER {
            st.retired = true;
        }
        st.pending.insert(
            id,
            Waiter {
                seq,
                question: question.into(),
                op_bits: wire.get(2).map_or(0, |b| b & 0x78),
                tx,
            },
        );
        Some((id, seq))
    }

    /// Hands a datagram to the query it answers. Returns a description of what is wrong
    /// with it when it answers none.
    fn deliver(&self, resp: &[u8]) -> Result<(), String> {
        let Some(id) = id_of(resp).filter(|_| resp.len() >= HEADER_LEN) else {
            return Err(format!(
                "{} octets is shorter than a DNS header",
                resp.len()
            ));
        };
        let mut st = self.state.lock();
        let Some(w) = st.pending.get(&id) else {
            return Err("wrong ID".to_owned());
        };
        // A truncated answer may come without its question section.
        let tc_only = is_truncated(resp) && resp[2] & 0x80 != 0;
        let answers_it = tc_only
            || (response_matches(resp, w.op_bits, &w.question)
                && records_framed(resp, w.question.len()));
        if !answers_it {
            return Err("not a response to the pending query with this ID".to_owned());
        }
        if let Some(w) = st.pending.remove(&id) {
            let _ = w.tx.send(Ok(resp.to_vec()));
        }
        self.end_if_idle(&st);
        Ok(())
    }

    /// Fails every pending query (the socket reported an error, e.g. ICMP port unreachable).
    fn fail_all(&self, err: &UpstreamError) {
        let mut st = self.state.lock();
        for (_, w) in st.pending.drain() {
            let _ = w.tx.send(Err(err.clone()));
        }
        st.retired = true;
        self.end_if_idle(&st);
    }

    fn retire(&self) {
        let mut st = self.state.lock();
        st.retired = true;
        self.end_if_idle(&st);
    }

    fn end_if_idle(&self, st: &ChannelState) {
        if st.retired && st.pending.is_empty() {
            self.done.notify_one();
        }
    }
}

/// Removes a query's pending entry when it ends in any way (answer, timeout, cancellation).
struct Registration<'a> {
    chan: &'a Channel,
    id: u16,
    seq: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut st = self.chan.state.lock();
        if st.pending.get(&self.id).is_some_and(|w| w.seq == self.seq) {
            st.pending.remove(&self.id);
        }
        self.chan.end_if_idle(&st);
    }
}

/// The receive task of one socket: runs until the channel is retired and idle.
async fn receive(chan: Arc<Channel>, addr: SocketAddr, health: Arc<Health>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // One `Notified` for the task's life, polled only when no datagram is waiting: a new one
    // per datagram would join and leave the `Notify`'s waiter list (a lock each way) for
    // every answer. `notify_one` leaves a permit if it comes while the task is not waiting.
    // `biased`: the socket first. Datagrams arriving without a pause (a flood spoofing the
    // upstream) still cannot keep a retired channel alive: tokio's cooperative budget makes
    // the socket's readiness pend after a task's 128th operation in a row, and `done` is
    // polled then.
    let done = chan.done.notified();
    tokio::pin!(done);
    loop {
        let received = tokio::select! {
            biased;
            r = chan.sock.recv(&mut buf) => r,
            () = &mut done => break,
        };
        match received {
            Ok(len) => {
                let resp = buf.get(..len).unwrap_or_default();
                if let Err(reason) = chan.deliver(resp) {
                    tracing::debug!(%addr, reason, "ignoring bad UDP response");
                    health.on_bad_response(&format!("bad response from {addr}: {reason}"));
                }
            }
            Err(e) => {
                // ICMP errors surface here: every query on this socket went the same way.
                let err = refused_or(addr)(e);
                tracing::debug!(%addr, error = %err, "upstream socket error");
                chan.fail_all(&err);
                break;
            }
        }
    }
    tracing::trace!(%addr, "upstream socket closed");
}

/// One query on a socket of its own (a question the wire checks cannot match, or every
/// shared socket saturated).
async fn exchange_alone(
    addr: SocketAddr,
    prepared: &Prepared,
    deadline: Instant,
    health: &Health,
) -> Result<UdpReply, UpstreamError> {
    let sock = connected_socket(addr)?;
    let id = rand::random::<u16>();
    let mut wire = prepared.wire().to_vec();
    set_id(&mut wire, id);
    by_deadline(deadline, addr, async {
        sock.send(&wire).await.map_err(refused_or(addr))
    })
    .await?;

    // Sized by the client's EDNS payload size, which we forward: a server must not send more.
    let mut buf = vec![0; prepared.udp_payload() + RECV_SLACK];
    loop {
        let len = by_deadline(deadline, addr, async {
            sock.recv(&mut buf).await.map_err(refused_or(addr))
        })
        .await?;
        let resp = buf.get(..len).unwrap_or_default();
        let bad = |reason: String| {
            tracing::debug!(%addr, reason, "ignoring bad UDP response");
            health.on_bad_response(&format!("bad response from {addr}: {reason}"));
        };
        if len < HEADER_LEN {
            bad(format!("{len} octets is shorter than a DNS header"));
            continue;
        }
        if id_of(resp) != Some(id) {
            bad("wrong ID".to_owned());
            continue;
        }
        if is_truncated(resp) {
            return Ok(UdpReply::Truncated);
        }
        match prepared.accept(resp, false) {
            Ok(answer) => return Ok(UdpReply::Answer(answer)),
            Err(reason) => bad(reason),
        }
    }
}

/// ECONNREFUSED (an ICMP port unreachable) means nobody listens: a connect failure.
fn refused_or(addr: SocketAddr) -> impl Fn(std::io::Error) -> UpstreamError {
    move |e| {
        let source = Arc::new(e);
        if source.kind() == std::io::ErrorKind::ConnectionRefused {
            UpstreamError::Connect { addr, source }
        } else {
            UpstreamError::Io { addr, source }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::super::testutil::{
        assert_answers, closed_udp_port, config, policy, query, udp_server, udp_server_on,
        udp_tcp_server,
    };
    use super::super::{Protocol, UpstreamConfig, Upstreams};
    use super::*;

    #[tokio::test]
    async fn answers_with_the_client_id_from_random_ports() {
        let server = udp_server().await;
        let ups = Upstreams::new(&config(vec![server.udp_url()])).unwrap();
        for i in 0..10u16 {
            let name = format!("n{i}.example.");
            let a = ups.query(&query(&name, 0xABCD)).await.unwrap();
            assert_answers(&a.response, &name, 0xABCD);
            assert_eq!(a.protocol, Protocol::Udp);
            assert_eq!((a.upstream, a.attempts), (0, 1));
            assert!(a.latency <= a.elapsed);
        }
        assert!(server.stats.ports.lock().len() >= 2, "source ports vary");
        let h = &ups.health()[0];
        assert_eq!((h.queries, h.errors), (10, 0));
        assert!(h.srtt_us > 0);
        assert!(h.healthy);
        assert_eq!(h.url, server.udp_url());
    }

    #[tokio::test]
    async fn ipv6_upstream() {
        let Some(server) = udp_server_on("[::1]:0").await else {
            eprintln!("no IPv6 loopback here; skipping");
            return;
        };
        let url = server.udp_url();
        assert!(url.starts_with("udp://[::1]:"), "{url}");
        let ups = Upstreams::new(&config(vec![url])).unwrap();
        let a = ups.query(&query("v6.example.", 6)).await.unwrap();
        assert_answers(&a.response, "v6.example.", 6);
    }

    #[tokio::test]
    async fn garbage_before_the_answer_is_ignored_and_counted() {
        let server = udp_server().await;
        server.behavior.udp_garbage.store(true, Ordering::SeqCst);
        let ups = Upstreams::new(&config(vec![server.udp_url()])).unwrap();
        let a = ups.query(&query("spoofed.example.", 77)).await.unwrap();
        assert_answers(&a.response, "spoofed.example.", 77);
        let h = &ups.health()[0];
        assert!(h.errors >= 4, "{h:?}");
        assert!(h.healthy);
    }

    #[tokio::test]
    async fn only_garbage_times_out_without_panicking() {
        let server = udp_server().await;
        server.behavior.udp_garbage.store(true, Ordering::SeqCst);
        let cfg = UpstreamConfig {
            timeout: Duration::from_millis(300),
            attempt_timeout: Duration::from_millis(300),
            ..config(vec![server.udp_url()])
        };
        let ups = Upstreams::new(&cfg).unwrap();
        for name in [
            "silent.example.",
            "wrongid.x.",
            "short.x.",
            "garbage.x.",
            "wrongq.x.",
        ] {
            let err = ups.query(&query(name, 1)).await.unwrap_err();
            assert!(
                matches!(err, UpstreamError::Timeout { .. }),
                "{name}: {err}"
            );
        }
        let h = &ups.health()[0];
        assert!(h.errors >= 5 * 5, "{h:?}");
    }

    #[tokio::test]
    async fn truncated_answer_is_retried_over_tcp() {
        let server = udp_tcp_server().await;
        server.behavior.truncate_udp.store(true, Ordering::SeqCst);
        let ups = Upstreams::new(&config(vec![server.udp_url()])).unwrap();
        let a = ups.query(&query("big.example.", 4242)).await.unwrap();
        assert_answers(&a.response, "big.example.", 4242);
        assert_eq!(a.protocol, Protocol::Tcp);
        assert_eq!(server.queries(), 2, "once over UDP, once over TCP");
        assert_eq!(server.connections(), 1);
        assert_eq!(ups.health()[0].open_connections, 1);
    }

    #[tokio::test]
    async fn closed_port_is_a_fast_connect_error() {
        let addr = closed_udp_port();
        let ups = Upstreams::new(&config(vec![format!("udp://{addr}")])).unwrap();
        let started = Instant::now();
        let err = ups.query(&query("a.example.", 1)).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Connect { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_millis(900));
    }

    #[tokio::test]
    async fn queries_in_flight_to_a_closed_port_all_fail_fast() {
        // Sent together, most of them are registered before the ICMP error comes back: the
        // receive task (or the send that takes the error) fails them all at once instead of
        // leaving them to their 1-second attempt timeout.
        let addr = closed_udp_port();
        let ups = Upstreams::new(&config(vec![format!("udp://{addr}")])).unwrap();
        let started = Instant::now();
        let queries: Vec<_> = (0..32u16)
            .map(|i| {
                let ups = ups.clone();
                tokio::spawn(async move { ups.query(&query(&format!("q{i}.example."), i)).await })
            })
            .collect();
        for q in queries {
            let err = q.await.unwrap().unwrap_err();
            assert!(matches!(err, UpstreamError::Connect { .. }), "{err}");
        }
        assert!(started.elapsed() < Duration::from_millis(900));
    }

    #[tokio::test]
    async fn a_retired_channel_takes_no_new_query() {
        let server = udp_server().await;
        let chan = Channel::new(server.addr).unwrap();
        let wire = [0u8; HEADER_LEN];
        let (tx, _rx) = oneshot::channel();
        assert!(chan.register(b"q", &wire, tx).is_some());
        chan.retire();
        let (tx, _rx) = oneshot::channel();
        assert!(
            chan.register(b"q", &wire, tx).is_none(),
            "its receive task may be gone: nobody would read the answer"
        );
    }

    /// A retired, idle channel's receive task ends: woken when it waits on its socket, and
    /// while datagrams keep arriving without a pause (a flood spoofing the upstream), when
    /// tokio's cooperative budget makes its socket branch pend.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_receive_task_of_a_retired_idle_channel_ends() {
        for flood in [false, true] {
            let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let chan = Arc::new(Channel::new(peer.local_addr().unwrap()).unwrap());
            let mine = chan.sock.local_addr().unwrap();
            let health = Arc::new(Health::new(policy()));
            let task = tokio::spawn(receive(chan.clone(), mine, health.clone()));
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            // Junk the task reads and ignores (no query is pending), sent nonstop by three
            // threads.
            let peer = Arc::new(peer);
            let senders: Vec<_> = (0..if flood { 3 } else { 0 })
                .map(|_| {
                    let (stop, peer) = (stop.clone(), peer.clone());
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            let _ = peer.send_to(&[0u8; 4], mine);
                        }
                    })
                })
                .collect();
            // The task is reading (a flood), or has likely begun to wait on its socket (none;
            // were it not polled yet, `notify_one` would leave it a permit).
            if flood {
                while health.snapshot(String::new(), 0).errors == 0 {
                    tokio::task::yield_now().await;
                }
            } else {
                tokio::task::yield_now().await;
            }
            chan.retire();
            let ended = tokio::time::timeout(Duration::from_secs(10), task).await;
            stop.store(true, Ordering::Relaxed);
            for sender in senders {
                sender.join().unwrap();
            }
            ended
                .unwrap_or_else(|_| panic!("the receive task ends (flood: {flood})"))
                .unwrap();
        }
    }

    #[tokio::test]
    async fn queries_share_a_few_sockets_whose_ports_rotate() {
        let server = udp_server().await;
        let ups = Upstreams::new(&config(vec![server.udp_url()])).unwrap();
        let total = 3 * SOCKETS * usize::try_from(RETIRE_AFTER).unwrap();
        for batch in 0..total / 64 {
            let mut set = tokio::task::JoinSet::new();
            for j in 0..64u16 {
                let ups = ups.clone();
                let id = u16::try_from(batch % 512).unwrap() * 64 + j;
                set.spawn(async move {
                    let name = format!("q{id}.example.");
                    let a = ups.query(&query(&name, id)).await.unwrap();
                    assert_answers(&a.response, &name, id);
                });
            }
            while let Some(r) = set.join_next().await {
                r.unwrap();
            }
        }
        let ports = server.stats.ports.lock().len();
        // Each socket carries RETIRE_AFTER queries, then a new one (a new port) takes over.
        assert!(ports > SOCKETS, "ports rotate: {ports}");
        assert!(
            ports <= 4 * SOCKETS,
            "sockets are shared: {ports} for {total} queries"
        );
        assert_eq!(ups.health()[0].errors, 0);
    }
}
