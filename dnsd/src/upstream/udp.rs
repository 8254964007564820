//! udp:// upstreams: one fresh socket (random source port) and a random ID per query; only a
//! response from the upstream's address, with our ID and the query's question, is accepted.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::time::{Instant, timeout_at};

use super::UpstreamError;
use super::health::Health;
use super::message::{HEADER_LEN, Prepared, id_of, is_truncated, set_id};

/// Receive room beyond the client's advertised payload size, so that an oversized answer is
/// seen whole (and fails to match) rather than cut.
const RECV_SLACK: usize = 512;

/// What came back over UDP.
#[derive(Debug)]
pub(crate) enum UdpReply {
    /// The client's answer (ID restored).
    Answer(Vec<u8>),
    /// TC=1: ask again over TCP.
    Truncated,
}

/// Sends the query and waits until `deadline` for a matching response. Mismatched or
/// malformed datagrams are counted on `health` and ignored, so a spoofer cannot cut a query
/// short.
pub(crate) async fn exchange(
    addr: SocketAddr,
    prepared: &Prepared,
    deadline: Instant,
    health: &Health,
) -> Result<UdpReply, UpstreamError> {
    let io = |source| UpstreamError::Io {
        addr,
        source: Arc::new(source),
    };
    // A new socket per query: the kernel picks a random ephemeral port (RFC 5452).
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await.map_err(io)?;
    // Connected: the kernel drops datagrams from other sources and reports ICMP errors.
    sock.connect(addr).await.map_err(io)?;
    let id = rand::random::<u16>();
    let mut wire = prepared.wire().to_vec();
    set_id(&mut wire, id);
    sock.send(&wire).await.map_err(refused_or(addr))?;

    // Sized by the client's EDNS payload size, which we forward: a server must not send more.
    let mut buf = vec![0; prepared.udp_payload() + RECV_SLACK];
    loop {
        let (len, from) = match timeout_at(deadline, sock.recv_from(&mut buf)).await {
            Ok(r) => r.map_err(refused_or(addr))?,
            Err(_) => return Err(UpstreamError::Timeout { addr }),
        };
        let resp = buf.get(..len).unwrap_or_default();
        let bad = |reason: String| {
            tracing::debug!(%addr, %from, reason, "ignoring bad UDP response");
            health.on_bad_response(&format!("bad response from {addr}: {reason}"));
        };
        if from != addr {
            bad(format!("from unexpected source {from}"));
            continue;
        }
        if len < HEADER_LEN {
            bad(format!("{len} octets is shorter than a DNS header"));
            continue;
        }
        if id_of(resp) != Some(id) {
            bad("wrong ID".to_owned());
            continue;
        }
        // A forged TC can only make us ask again over TCP, so it needs no further checks.
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
        assert_answers, config, query, udp_server, udp_server_on, udp_tcp_server,
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
        let addr = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let ups = Upstreams::new(&config(vec![format!("udp://{addr}")])).unwrap();
        let started = Instant::now();
        let err = ups.query(&query("a.example.", 1)).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Connect { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_millis(900));
    }
}
