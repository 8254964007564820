//! TCP and UDP echo servers bound inside a namespace: the "services" that probes reach.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

use crate::error::{Context, Result};
use crate::netns::Netns;

/// The port every echo server listens on (TCP and UDP).
pub const ECHO_PORT: u16 = 7;

/// Echo servers on a set of addresses. Bound when [`EchoServer::start`] returns, so they are
/// ready; stopped (sockets closed) on Drop.
#[derive(Debug)]
pub struct EchoServer {
    rt: Option<Runtime>,
    addrs: Vec<SocketAddr>,
}

impl EchoServer {
    /// Binds TCP and UDP echo on every `ip`:`port` inside `ns`. Each address is bound
    /// explicitly (not a wildcard) so that UDP replies leave from the address the probe
    /// targeted.
    pub fn start(ns: &Netns, ips: &[IpAddr], port: u16) -> Result<Self> {
        let addrs: Vec<SocketAddr> = ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
        let sockets = ns.run(|| -> std::io::Result<_> {
            let mut v = Vec::new();
            for a in &addrs {
                let tcp = std::net::TcpListener::bind(a)?;
                tcp.set_nonblocking(true)?;
                let udp = std::net::UdpSocket::bind(a)?;
                udp.set_nonblocking(true)?;
                v.push((tcp, udp));
            }
            Ok(v)
        })?;
        let sockets = sockets.context(format!("binding echo servers in netns {}", ns.name()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("echo")
            .enable_all()
            .build()?;
        {
            let _guard = rt.enter();
            for (tcp, udp) in sockets {
                let tcp = tokio::net::TcpListener::from_std(tcp)?;
                let udp = tokio::net::UdpSocket::from_std(udp)?;
                rt.spawn(serve_tcp(tcp));
                rt.spawn(serve_udp(udp));
            }
        }
        Ok(Self {
            rt: Some(rt),
            addrs,
        })
    }

    /// Starts echo on every service address of `net` at [`ECHO_PORT`].
    pub fn services(net: &Netns) -> Result<Self> {
        Self::start(net, &crate::topology::all_services(), ECHO_PORT)
    }

    /// The addresses served.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        // shutdown_background: legal inside another runtime, and drops every socket.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn serve_tcp(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let Some(data) = buf.get(..n) else { return };
                        if conn.write_all(data).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

async fn serve_udp(sock: tokio::net::UdpSocket) {
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((n, peer)) = sock.recv_from(&mut buf).await
            && let Some(data) = buf.get(..n)
        {
            let _ = sock.send_to(data, peer).await;
        }
    }
}
