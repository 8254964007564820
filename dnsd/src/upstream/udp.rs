//! udp:// upstreams: one fresh socket (random source port) and a random ID per query; only a
//! response from the upstream's address, with our ID and the query's question, is accepted.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::time::{Instant, timeout_at};

use super::UpstreamError;
use super::health::Health;
use super::message::{HEADER_LEN, Prepared, id_of, is_truncated, set_id};

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

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

    let mut buf = vec![0; MAX_DATAGRAM];
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
