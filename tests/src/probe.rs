//! Client probes run from inside a namespace: they tell "refused at once" (a reject rule) from
//! "timed out" (dropped, or nothing there) from "open".

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use crate::echo::ECHO_PORT;
use crate::error::{Error, Result};
use crate::netns::Netns;

/// How long a probe waits before calling it a timeout. A rejected probe fails in
/// milliseconds; this only bounds the broken case, so it is generous for a busy machine.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a probe found.
#[derive(Debug)]
pub enum Verdict {
    /// Connected and the echo came back.
    Open,
    /// Refused at once: TCP reset, or an ICMP error (port unreachable, admin prohibited), or
    /// the local stack refusing to send (EPERM from an output-hook drop).
    Refused(io::Error),
    /// Nothing came back before the deadline (a drop, or a dead path).
    TimedOut,
    /// Anything else.
    Failed(io::Error),
}

impl Verdict {
    /// Classifies the result of a probe.
    pub fn of<T>(r: &io::Result<T>) -> Self {
        match r {
            Ok(_) => Self::Open,
            Err(e) if is_timeout(e) => Self::TimedOut,
            Err(e) if is_refusal(e) => Self::Refused(io::Error::new(e.kind(), e.to_string())),
            Err(e) => Self::Failed(io::Error::new(e.kind(), e.to_string())),
        }
    }

    /// Whether it is [`Verdict::Open`].
    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open)
    }

    /// Whether it is [`Verdict::Refused`].
    pub fn is_refused(&self) -> bool {
        matches!(self, Self::Refused(_))
    }
}

/// Whether `e` is what a reject rule produces (as opposed to a timeout).
pub fn is_refusal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::ECONNRESET
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EACCES
                | libc::EPERM
        )
    )
}

/// Whether `e` means the deadline passed.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

/// The echo server's address for `ip`.
pub fn echo_addr(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, ECHO_PORT)
}

/// Opens a TCP connection from inside `ns`. The stream stays in `ns` and may be used from any
/// thread.
pub fn tcp_connect(ns: &Netns, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    ns.run(|| TcpStream::connect_timeout(&addr, timeout))
        .map_err(|e| io::Error::other(e.to_string()))?
}

/// Sends `payload` on `stream` and reads it back, with `timeout` for each read.
pub fn roundtrip(stream: &mut TcpStream, payload: &[u8], timeout: Duration) -> io::Result<()> {
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(payload)?;
    let mut back = vec![0; payload.len()];
    stream.read_exact(&mut back)?;
    if back == payload {
        Ok(())
    } else {
        Err(io::Error::other("echo returned different bytes"))
    }
}

/// Connects over TCP from `ns` to the echo server at `ip` and checks one round trip.
pub fn tcp_echo(ns: &Netns, ip: IpAddr, timeout: Duration) -> io::Result<TcpStream> {
    let mut s = tcp_connect(ns, echo_addr(ip), timeout)?;
    roundtrip(&mut s, b"guard-probe", timeout)?;
    Ok(s)
}

/// Sends one datagram from `ns` to the UDP echo at `addr` on a connected socket and waits for
/// it to come back. A reject's ICMP error surfaces as the recv error (ECONNREFUSED,
/// EHOSTUNREACH, EACCES); silence as a timeout.
pub fn udp_echo(ns: &Netns, addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let sock = ns
        .run(|| {
            let any: IpAddr = match addr {
                SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
                SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
            };
            UdpSocket::bind(SocketAddr::new(any, 0))
        })
        .map_err(|e| io::Error::other(e.to_string()))??;
    sock.connect(addr)?;
    sock.set_read_timeout(Some(timeout))?;
    let payload = b"guard-udp-probe";
    sock.send(payload)?;
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf)?;
    if buf.get(..n) == Some(&payload[..]) {
        Ok(())
    } else {
        Err(io::Error::other("UDP echo returned different bytes"))
    }
}

/// TCP verdict for the echo at `ip` from `ns`.
pub fn tcp_verdict(ns: &Netns, ip: IpAddr) -> Verdict {
    Verdict::of(&tcp_echo(ns, ip, PROBE_TIMEOUT))
}

/// UDP verdict for the echo at `ip` from `ns`.
pub fn udp_verdict(ns: &Netns, ip: IpAddr) -> Verdict {
    Verdict::of(&udp_echo(ns, echo_addr(ip), PROBE_TIMEOUT))
}

/// Fails unless a TCP echo from `ns` to `ip` works.
pub fn expect_tcp_open(ns: &Netns, ip: IpAddr) -> Result<()> {
    expect(ns, ip, "TCP", tcp_verdict(ns, ip), true)
}

/// Fails unless a TCP connection from `ns` to `ip` is refused at once (not a timeout).
pub fn expect_tcp_refused(ns: &Netns, ip: IpAddr) -> Result<()> {
    expect(ns, ip, "TCP", tcp_verdict(ns, ip), false)
}

/// Fails unless a UDP echo from `ns` to `ip` works.
pub fn expect_udp_open(ns: &Netns, ip: IpAddr) -> Result<()> {
    expect(ns, ip, "UDP", udp_verdict(ns, ip), true)
}

/// Fails unless a UDP datagram from `ns` to `ip` is refused at once (an ICMP error, not a
/// timeout).
pub fn expect_udp_refused(ns: &Netns, ip: IpAddr) -> Result<()> {
    expect(ns, ip, "UDP", udp_verdict(ns, ip), false)
}

fn expect(ns: &Netns, ip: IpAddr, proto: &str, v: Verdict, open: bool) -> Result<()> {
    let ok = if open { v.is_open() } else { v.is_refused() };
    if ok {
        Ok(())
    } else {
        let want = if open {
            "open"
        } else {
            "refused at once (reject), not a timeout"
        };
        Err(Error::msg(format!(
            "{proto} probe from netns {} to {}: expected {want}, got {v:?}",
            ns.name(),
            echo_addr(ip)
        )))
    }
}
