//! Test networks: `local()` (fwd guards its own host) and `gateway()` (fwd guards routed LAN clients).
//!
//! Only documentation ranges are used. The "net" namespace is the fake internet: it owns the
//! service addresses that probes target, all on the link it shares with guarded/gw, so no
//! routing is needed on that side.
//!
//! ```text
//! local:    [guarded] up0 192.0.2.1 ──── down0 192.0.2.2, .10… [net]
//!                     2001:db8:1::1          2001:db8:1::2, ::10…
//!
//! gateway:  [A] lan0 198.51.100.2 ─┐
//!                                  ├ br0 198.51.100.1 [gw] wan0 192.0.2.1 ──── [net] (as above)
//!           [B] lan0 198.51.100.3 ─┘     2001:db8:2::1       2001:db8:1::1
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::netns::{Netns, unique_prefix};

/// guarded's (local) or gw's (gateway) address on the link to net.
pub const UPLINK_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// guarded's (local) or gw's (gateway) IPv6 address on the link to net.
pub const UPLINK_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// net's own address on that link.
pub const NET_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// net's own IPv6 address on that link.
pub const NET_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// How many service addresses net has per family ([`service_v4`], [`service_v6`]).
pub const SERVICES: u8 = 16;
/// gw's LAN address (clients' default route).
pub const GW_LAN_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// gw's LAN IPv6 address (clients' default route).
pub const GW_LAN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
/// Client A's address.
pub const CLIENT_A_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Client A's IPv6 address.
pub const CLIENT_A_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
/// Client B's address.
pub const CLIENT_B_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
/// Client B's IPv6 address.
pub const CLIENT_B_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 3);

/// Service address `i` (0-based, < [`SERVICES`]) on net: 192.0.2.10, .11, …
pub fn service_v4(i: u8) -> IpAddr {
    assert!(i < SERVICES, "service index {i} out of range");
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10 + i))
}

/// IPv6 service address `i` (0-based, < [`SERVICES`]) on net: 2001:db8:1::10, ::11, … (hex).
pub fn service_v6(i: u8) -> IpAddr {
    assert!(i < SERVICES, "service index {i} out of range");
    IpAddr::V6(Ipv6Addr::new(
        0x2001,
        0xdb8,
        1,
        0,
        0,
        0,
        0,
        0x10 + u16::from(i),
    ))
}

/// Every service address on net, v4 then v6.
pub fn all_services() -> Vec<IpAddr> {
    (0..SERVICES)
        .map(service_v4)
        .chain((0..SERVICES).map(service_v6))
        .collect()
}

/// A LAN client namespace of the gateway topology.
#[derive(Debug)]
pub struct Client {
    /// Its namespace.
    pub ns: Netns,
    /// Its IPv4 address.
    pub v4: Ipv4Addr,
    /// Its IPv6 address.
    pub v6: Ipv6Addr,
}

/// A built, ready network (links up, no tentative addresses). Dropping it removes every namespace.
#[derive(Debug)]
pub struct Topology {
    /// Where fwd runs: "guarded" (local) or "gw" (gateway).
    pub fwd: Netns,
    /// The fake internet holding the service addresses.
    pub net: Netns,
    /// Gateway only: client A, then client B. Empty for local.
    pub clients: Vec<Client>,
}

impl Topology {
    /// guarded ⇄ net over one veth. fwd runs in `fwd` ("guarded") in local mode.
    pub fn local() -> Result<Self> {
        let p = unique_prefix();
        let fwd = Netns::new(&format!("{p}-guarded"))?;
        let net = Netns::new(&format!("{p}-net"))?;
        uplink(&fwd, &net)?;
        let topo = Self {
            fwd,
            net,
            clients: Vec::new(),
        };
        topo.wait_ready()?;
        Ok(topo)
    }

    /// Clients A and B on a bridge in gw, which routes (v4 and v6, no NAT) to net. fwd runs in
    /// `fwd` ("gw") in gateway mode.
    pub fn gateway() -> Result<Self> {
        let p = unique_prefix();
        let fwd = Netns::new(&format!("{p}-gw"))?;
        let net = Netns::new(&format!("{p}-net"))?;
        let a = Netns::new(&format!("{p}-a"))?;
        let b = Netns::new(&format!("{p}-b"))?;
        uplink(&fwd, &net)?;
        fwd.sysctl("net.ipv4.ip_forward", "1")?;
        fwd.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        // STP off and no forward delay: ports forward as soon as they are up. Snooping off:
        // no querier here, and NDP must flood.
        fwd.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        fwd.ip(&["link", "set", "br0", "up"])?;
        let mut clients = Vec::new();
        for (ns, port, v4, v6) in [
            (a, "a0", CLIENT_A_V4, CLIENT_A_V6),
            (b, "b0", CLIENT_B_V4, CLIENT_B_V6),
        ] {
            fwd.ip(&[
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "lan0",
                "netns",
                ns.name(),
            ])?;
            fwd.ip(&["link", "set", port, "master", "br0"])?;
            fwd.ip(&["link", "set", port, "up"])?;
            ns.ip(&["link", "set", "lan0", "up"])?;
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "lan0"])?;
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "lan0", "nodad"])?;
            ns.ip(&["route", "add", "default", "via", &GW_LAN_V4.to_string()])?;
            ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &GW_LAN_V6.to_string(),
            ])?;
            clients.push(Client { ns, v4, v6 });
        }
        fwd.ip(&["addr", "add", &format!("{GW_LAN_V4}/24"), "dev", "br0"])?;
        fwd.ip(&[
            "addr",
            "add",
            &format!("{GW_LAN_V6}/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        net.ip(&[
            "route",
            "add",
            "198.51.100.0/24",
            "via",
            &UPLINK_V4.to_string(),
        ])?;
        net.ip(&[
            "-6",
            "route",
            "add",
            "2001:db8:2::/64",
            "via",
            &UPLINK_V6.to_string(),
        ])?;
        let topo = Self { fwd, net, clients };
        topo.wait_ready()?;
        Ok(topo)
    }

    /// Gateway client A.
    pub fn client_a(&self) -> Result<&Client> {
        self.clients
            .first()
            .ok_or_else(|| Error::msg("client A exists only in the gateway topology"))
    }

    /// Gateway client B.
    pub fn client_b(&self) -> Result<&Client> {
        self.clients
            .get(1)
            .ok_or_else(|| Error::msg("client B exists only in the gateway topology"))
    }

    /// Every namespace of the topology.
    pub fn namespaces(&self) -> Vec<&Netns> {
        let mut v = vec![&self.fwd, &self.net];
        v.extend(self.clients.iter().map(|c| &c.ns));
        v
    }

    /// Waits until every link is up, every bridge port forwards and no address is tentative:
    /// the kernel's own readiness, polled with a deadline (it settles asynchronously through
    /// linkwatch).
    fn wait_ready(&self) -> Result<()> {
        crate::wait_until(
            "links up and addresses usable",
            Duration::from_secs(30),
            || {
                for ns in self.namespaces() {
                    if !ns_settled(ns)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )
    }
}

/// The veth between `inner` (up0: the uplink addresses) and `net` (down0: net's and the
/// service addresses). Created from inside the namespaces, never in the host's.
fn uplink(inner: &Netns, net: &Netns) -> Result<()> {
    inner.ip(&[
        "link",
        "add",
        "up0",
        "type",
        "veth",
        "peer",
        "name",
        "down0",
        "netns",
        net.name(),
    ])?;
    inner.ip(&["link", "set", "up0", "up"])?;
    net.ip(&["link", "set", "down0", "up"])?;
    inner.ip(&["addr", "add", &format!("{UPLINK_V4}/24"), "dev", "up0"])?;
    inner.ip(&[
        "addr",
        "add",
        &format!("{UPLINK_V6}/64"),
        "dev",
        "up0",
        "nodad",
    ])?;
    net.ip(&["addr", "add", &format!("{NET_V4}/24"), "dev", "down0"])?;
    net.ip(&[
        "addr",
        "add",
        &format!("{NET_V6}/64"),
        "dev",
        "down0",
        "nodad",
    ])?;
    for ip in all_services() {
        let (plen, extra): (&str, &[&str]) = match ip {
            IpAddr::V4(_) => ("24", &[]),
            IpAddr::V6(_) => ("64", &["nodad"]),
        };
        let mut args = vec!["addr", "add"];
        let cidr = format!("{ip}/{plen}");
        args.push(&cidr);
        args.extend(["dev", "down0"]);
        args.extend(extra);
        net.ip(&args)?;
    }
    Ok(())
}

/// Whether every non-loopback link of `ns` is up (bridge ports forwarding) and no address is
/// tentative.
fn ns_settled(ns: &Netns) -> Result<bool> {
    let links: serde_json::Value = serde_json::from_str(&ns.ip(&["-j", "-d", "link", "show"])?)?;
    for link in links.as_array().into_iter().flatten() {
        let name = link["ifname"].as_str().unwrap_or_default();
        if name == "lo" {
            continue;
        }
        if link["operstate"].as_str() != Some("UP") {
            return Ok(false);
        }
        let slave = &link["linkinfo"]["info_slave_data"];
        if slave["state"].is_string() && slave["state"].as_str() != Some("forwarding") {
            return Ok(false);
        }
    }
    let addrs: serde_json::Value = serde_json::from_str(&ns.ip(&["-j", "addr", "show"])?)?;
    for link in addrs.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if a["tentative"].as_bool() == Some(true) || a["dadfailed"].as_bool() == Some(true) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}
