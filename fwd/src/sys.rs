//! Hot-path netlink: nf_tables set-element batches (keys and CIDR ranges), set, counter, chain
//! and table reads through libnftnl/libmnl, and conntrack dumps.
//!
//! Exec'ing `nft` costs milliseconds per call; one netlink batch costs microseconds. Everything
//! the kernel sends back is untrusted input: it is walked with libmnl's bounds checks
//! (`mnl_nlmsg_ok`, `mnl_attr_ok`) and turned into Rust slices before anything is read from it.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ptr::NonNull;
use std::time::Duration;

use ipnet::IpNet;
use libc::{c_int, c_void, nlattr, nlmsghdr};
use mnl_sys as mnl;
use nftnl_sys as nftnl;

// === kernel ABI (include/uapi/linux/netfilter/{nfnetlink,nf_tables,nfnetlink_conntrack}.h) ===

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
/// Delete-if-present, Linux 6.3+.
const NFT_MSG_DESTROYSETELEM: u16 = 30;
const NFT_MSG_NEWOBJ: u16 = 18;
const NFT_MSG_GETOBJ: u16 = 19;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NFPROTO_INET: u16 = 1;
const NFNETLINK_V0: u8 = 0;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
const NFT_SET_ELEM_CATCHALL: u32 = 0x2;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;

/// Element user data as nft writes it for a range reaching the top of the address space
/// (libnftnl udata TLV: NFTNL_UDATA_SET_ELEM_FLAGS = 1, length 4, host-endian
/// NFTNL_SET_ELEM_F_INTERVAL_OPEN = 1). Only nft's listing reads it; the kernel stores it.
const UDATA_INTERVAL_OPEN: [u8; 6] = {
    let f = 1u32.to_ne_bytes();
    [1, 4, f[0], f[1], f[2], f[3]]
};

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
const IPS_ASSURED: u32 = 1 << 2;
const IPPROTO_TCP: u8 = 6;
const TCP_CONNTRACK_ESTABLISHED: u8 = 3;
const CTA_TUPLE_IP: u16 = 1;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_HDRLEN: usize = 4;
/// nftables object names are at most 255 bytes plus the NUL (NFT_NAME_MAXLEN).
const NAME_MAX: usize = 255;
/// `nla_len` is a u16, so a nested attribute (the element list) cannot exceed this.
const NEST_MAX: usize = u16::MAX as usize;
/// Upper bound of one encoded element (list-element nest, key nest of at most
/// NFT_DATA_VALUE_MAXLEN bytes, timeout, flags, user data); checked before every element is
/// written so that no C call can run past the buffer even if the size plan were wrong.
const ELEM_MAX_BYTES: usize = 128;
/// Batch begin/end messages: nlmsghdr + nfgenmsg.
const BATCH_MSG_LEN: usize = NLMSG_HDRLEN + NFGENMSG_LEN;
/// Refuse batches beyond this (about 4 million pair elements); the socket send buffer must
/// hold the whole batch, since nfnetlink only treats one skb as a transaction.
const MAX_BATCH_BYTES: usize = 256 << 20;
/// Receive buffer. Dump skbs are capped at 32 KiB by the kernel; acks are small because of
/// NETLINK_CAP_ACK, and even without it an echoed 64 KiB message fits.
const RX_BYTES: usize = 128 << 10;
/// Acks are queued while the batch is processed, before we read any of them; budget the
/// receive buffer by skb truesize per ack.
const ACK_TRUESIZE: usize = 1024;
/// Safety net only: nfnetlink processes a batch synchronously inside sendmsg, so all answers
/// are queued by the time we read.
const RECV_TIMEOUT: Duration = Duration::from_secs(30);
/// A dump flagged NLM_F_DUMP_INTR, or one that repeated elements, is retried this many times
/// before giving up.
const DUMP_RETRIES: usize = 3;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn nl_const(v: c_int) -> u16 {
    // The libc netlink flag and type constants are small positive ints.
    u16::try_from(v).unwrap_or(0)
}

// === pub types ===

/// A set element key. Pair keys are for concatenated `ipv4_addr . ipv4_addr` /
/// `ipv6_addr . ipv6_addr` sets (client . destination), each field padded to 4-byte registers
/// as nftables does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetKey {
    /// A key of an `ipv4_addr` set.
    V4(Ipv4Addr),
    /// A key of an `ipv6_addr` set.
    V6(Ipv6Addr),
    /// A key of an `ipv4_addr . ipv4_addr` set.
    V4Pair {
        /// First field: the LAN client.
        client: Ipv4Addr,
        /// Second field: the destination.
        dst: Ipv4Addr,
    },
    /// A key of an `ipv6_addr . ipv6_addr` set.
    V6Pair {
        /// First field: the LAN client.
        client: Ipv6Addr,
        /// Second field: the destination.
        dst: Ipv6Addr,
    },
}

impl SetKey {
    /// The layout of the set this key belongs in.
    pub fn key_type(&self) -> KeyType {
        match self {
            SetKey::V4(_) => KeyType::V4,
            SetKey::V6(_) => KeyType::V6,
            SetKey::V4Pair { .. } => KeyType::V4Pair,
            SetKey::V6Pair { .. } => KeyType::V6Pair,
        }
    }

    /// The key as nftables registers hold it: network byte order, fields back to back (every
    /// field is already a multiple of 4 bytes, so there is no padding to add).
    fn encode(&self) -> ([u8; 32], usize) {
        let mut out = [0u8; 32];
        let len = self.key_type().key_len();
        match self {
            SetKey::V4(a) => out[..4].copy_from_slice(&a.octets()),
            SetKey::V6(a) => out[..16].copy_from_slice(&a.octets()),
            SetKey::V4Pair { client, dst } => {
                out[..4].copy_from_slice(&client.octets());
                out[4..8].copy_from_slice(&dst.octets());
            }
            SetKey::V6Pair { client, dst } => {
                out[..16].copy_from_slice(&client.octets());
                out[16..32].copy_from_slice(&dst.octets());
            }
        }
        (out, len)
    }
}

/// The key layout of a set, needed to decode a dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    /// `type ipv4_addr`.
    V4,
    /// `type ipv6_addr`.
    V6,
    /// `type ipv4_addr . ipv4_addr`.
    V4Pair,
    /// `type ipv6_addr . ipv6_addr`.
    V6Pair,
}

impl KeyType {
    /// Bytes of key data on the wire.
    pub fn key_len(self) -> usize {
        match self {
            KeyType::V4 => 4,
            KeyType::V6 => 16,
            KeyType::V4Pair => 8,
            KeyType::V6Pair => 32,
        }
    }

    fn decode(self, b: &[u8]) -> Option<SetKey> {
        fn v4(b: &[u8]) -> Option<Ipv4Addr> {
            <[u8; 4]>::try_from(b).ok().map(Ipv4Addr::from)
        }
        fn v6(b: &[u8]) -> Option<Ipv6Addr> {
            <[u8; 16]>::try_from(b).ok().map(Ipv6Addr::from)
        }
        if b.len() != self.key_len() {
            return None;
        }
        Some(match self {
            KeyType::V4 => SetKey::V4(v4(b)?),
            KeyType::V6 => SetKey::V6(v6(b)?),
            KeyType::V4Pair => SetKey::V4Pair {
                client: v4(b.get(..4)?)?,
                dst: v4(b.get(4..)?)?,
            },
            KeyType::V6Pair => SetKey::V6Pair {
                client: v6(b.get(..16)?)?,
                dst: v6(b.get(16..)?)?,
            },
        })
    }
}

/// One operation in an atomic batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ElemOp {
    /// Add `key` to `set` (no error if it already exists: NLM_F_CREATE without NLM_F_EXCL).
    Add {
        /// Set name inside the table given to [`Netlink::commit`].
        set: String,
        /// The element.
        key: SetKey,
        /// Time to live; rounded up to whole milliseconds and at least 1 ms (a zero timeout
        /// would mean "never expires" to the kernel). `None` uses the set's default timeout,
        /// or none at all.
        timeout: Option<Duration>,
    },
    /// Delete `key` from `set`; the kernel rejects the batch with ENOENT if it is absent.
    Delete {
        /// Set name inside the table given to [`Netlink::commit`].
        set: String,
        /// The element.
        key: SetKey,
    },
    /// Add the CIDR `net` to a `flags interval` set of `ipv4_addr` / `ipv6_addr` (the rbtree
    /// backend), encoded as nft 1.0.6 does: a start element holding the network address (and
    /// the timeout), then an end element flagged NFT_SET_ELEM_INTERVAL_END holding the address
    /// after the last one. A range reaching the top of the address space has no end element;
    /// its start carries nft's "interval open" user data instead. Host bits of `net` are
    /// ignored. Re-adding an identical range is not an error (like [`ElemOp::Add`]); one that
    /// overlaps another range fails with EEXIST (checked against a dump of the set first, see
    /// [`Netlink::commit`]). Each range op travels in its own message, so
    /// [`SysError::Rejected`] names exactly the failing range op.
    AddRange {
        /// Set name inside the table given to [`Netlink::commit`].
        set: String,
        /// The range.
        net: IpNet,
        /// Time to live, as for [`ElemOp::Add`].
        timeout: Option<Duration>,
    },
    /// Delete the CIDR `net` (start and end element) from an interval set. The range must be
    /// present exactly as given (checked against a dump of the set first, see
    /// [`Netlink::commit`]); if it is not, the op fails with ENOENT under
    /// [`DeleteMode::Strict`] and is skipped under [`DeleteMode::IfPresent`].
    DeleteRange {
        /// Set name inside the table given to [`Netlink::commit`].
        set: String,
        /// The range, exactly as added.
        net: IpNet,
    },
}

/// What an op acts on.
#[derive(Clone, Copy, Debug)]
enum Target<'a> {
    Key(&'a SetKey),
    Range(&'a IpNet),
}

impl ElemOp {
    fn parts(&self) -> (&str, Kind, Target<'_>, Option<Duration>) {
        match self {
            ElemOp::Add { set, key, timeout } => (set, Kind::Add, Target::Key(key), *timeout),
            ElemOp::Delete { set, key } => (set, Kind::Delete, Target::Key(key), None),
            ElemOp::AddRange { set, net, timeout } => {
                (set, Kind::Add, Target::Range(net), *timeout)
            }
            ElemOp::DeleteRange { set, net } => (set, Kind::Delete, Target::Range(net), None),
        }
    }

    /// The kernel elements this op consists of (one for a key, one or two for a range).
    fn kernel_elems(&self) -> [Option<KernelElem>; 2] {
        let (_, _, target, timeout) = self.parts();
        match target {
            Target::Key(k) => {
                let (key, len) = k.encode();
                [
                    Some(KernelElem {
                        key,
                        len,
                        flags: 0,
                        timeout,
                        expiration: true,
                        open: false,
                    }),
                    None,
                ]
            }
            Target::Range(net) => range_elems(net, timeout),
        }
    }
}

/// One set element as sent to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KernelElem {
    /// Key bytes (network order), `len` of them used.
    key: [u8; 32],
    len: usize,
    /// NFTA_SET_ELEM_FLAGS (NFT_SET_ELEM_INTERVAL_END), sent only when non-zero.
    flags: u32,
    timeout: Option<Duration>,
    /// With a timeout, also send NFTA_SET_ELEM_EXPIRATION equal to it. A kernel that updates
    /// an element on re-add (6.x) restarts its countdown only when the re-add carries an
    /// expiration or a timeout different from the element's: re-adding with the same timeout
    /// alone (a renewal of `renew_ttl`, or the same TTL authorized again) left the old expiry,
    /// and the grant ended while fwd counted it extended. Set on single keys; range elements
    /// keep nft's encoding (a range is replaced by delete and add, never re-added).
    expiration: bool,
    /// Attach [`UDATA_INTERVAL_OPEN`].
    open: bool,
}

impl KernelElem {
    /// Bytes this element adds to the element list: NFTA_LIST_ELEM nest, optional
    /// NFTA_SET_ELEM_FLAGS (u32), optional NFTA_SET_ELEM_TIMEOUT and NFTA_SET_ELEM_EXPIRATION
    /// (u64 each), NFTA_SET_ELEM_KEY nest holding NFTA_DATA_VALUE, optional
    /// NFTA_SET_ELEM_USERDATA.
    fn wire_len(&self) -> usize {
        let flags = if self.flags != 0 { NLA_HDRLEN + 4 } else { 0 };
        let timeout = match (self.timeout, self.expiration) {
            (None, _) => 0,
            (Some(_), false) => NLA_HDRLEN + 8,
            (Some(_), true) => 2 * (NLA_HDRLEN + 8),
        };
        let udata = if self.open {
            NLA_HDRLEN + align4(UDATA_INTERVAL_OPEN.len())
        } else {
            0
        };
        NLA_HDRLEN + flags + timeout + NLA_HDRLEN + NLA_HDRLEN + align4(self.len) + udata
    }
}

/// nft 1.0.6's encoding of one CIDR in an interval set: start element (network address, with
/// the timeout), end element (last address + 1, flagged INTERVAL_END, no timeout); when the
/// last address is the top of the address space there is no end element and the start carries
/// the "interval open" user data. (For a set that is empty, nft additionally sends an end
/// element at address 0 first, a leftover the kernel does not need; it is not sent here.)
fn range_elems(net: &IpNet, timeout: Option<Duration>) -> [Option<KernelElem>; 2] {
    let mut start = [0u8; 32];
    let mut end = [0u8; 32];
    let (len, next) = match net.trunc() {
        IpNet::V4(n) => {
            start[..4].copy_from_slice(&n.network().octets());
            let next = u32::from(n.broadcast()).checked_add(1);
            if let Some(e) = next {
                end[..4].copy_from_slice(&e.to_be_bytes());
            }
            (4, next.is_some())
        }
        IpNet::V6(n) => {
            start[..16].copy_from_slice(&n.network().octets());
            let next = u128::from(n.broadcast()).checked_add(1);
            if let Some(e) = next {
                end[..16].copy_from_slice(&e.to_be_bytes());
            }
            (16, next.is_some())
        }
    };
    [
        Some(KernelElem {
            key: start,
            len,
            flags: 0,
            timeout,
            expiration: false,
            open: !next,
        }),
        next.then_some(KernelElem {
            key: end,
            len,
            flags: NFT_SET_ELEM_INTERVAL_END,
            timeout: None,
            expiration: false,
            open: false,
        }),
    ]
}

/// A named counter object and its values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counter {
    /// Object name (`counter <name> { }` in the table).
    pub name: String,
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted.
    pub bytes: u64,
}

/// How [`Netlink::commit`] sends [`ElemOp::Delete`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeleteMode {
    /// DELSETELEM: deleting an absent (or expired, not yet collected) element rejects the whole
    /// batch with ENOENT.
    #[default]
    Strict,
    /// DESTROYSETELEM (Linux 6.3+): an absent or expired element is skipped without error, so a
    /// batch never fails because a grant expired between deciding and committing. Several
    /// deletes share one message, and under `Strict` one missing element fails (and names) all
    /// of them; this mode avoids having to tell them apart. Older kernels reject the message
    /// with EINVAL or EOPNOTSUPP.
    IfPresent,
}

/// Errors of this module. Unless a variant says otherwise, a failed [`Netlink::commit`]
/// applied nothing.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// Opening or configuring a netlink socket failed.
    #[error("opening netlink socket for {what}: {source}")]
    Open {
        /// What the socket was for.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A table or set name cannot be sent to the kernel.
    #[error("invalid nftables name {name:?}: {reason}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// The batch does not fit the limits of one netlink send.
    #[error(
        "batch of {ops} ops for table inet {table} needs {bytes} bytes, over the {max}-byte limit"
    )]
    TooLarge {
        /// Table of the batch.
        table: String,
        /// Number of ops.
        ops: usize,
        /// Encoded size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// Building the netlink messages failed (libnftnl refused a value, or a size invariant was
    /// broken). Nothing was sent.
    #[error("encoding {what}: {reason}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// What went wrong.
        reason: &'static str,
    },
    /// sendmsg failed; nothing reached the kernel.
    #[error("sending {what} to the kernel: {source}")]
    Send {
        /// What was being sent.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading the kernel's answer failed. For a commit the outcome is UNKNOWN: the batch may
    /// or may not have been applied; re-read the set to find out.
    #[error("receiving the kernel's answer to {what}: {source}")]
    Recv {
        /// What the answer was for.
        what: String,
        /// The OS error (EAGAIN/TimedOut after the safety timeout, ENOBUFS if answers were
        /// dropped).
        #[source]
        source: io::Error,
    },
    /// The kernel refused the transaction, or the range check before it failed; NOTHING was
    /// applied. Each entry is (index into ops, errno) for every op the kernel (or the range
    /// check) complained about (e.g. ENOENT for deleting a missing element, EEXIST for an
    /// overlapping range). When a message carrying several elements fails, every op of that
    /// message is listed with the message's errno. Sorted by op index.
    #[error(
        "kernel rejected the nf_tables batch, nothing applied: {}",
        FailureList(failures)
    )]
    Rejected {
        /// (op index, errno) pairs.
        failures: Vec<(usize, i32)>,
    },
    /// The kernel refused the batch as a whole (e.g. EPERM without CAP_NET_ADMIN, ENOMEM, or a
    /// failed commit) rather than a particular message; nothing was applied.
    #[error("kernel aborted the nf_tables batch for table inet {table}, nothing applied: {source}")]
    Aborted {
        /// Table of the batch.
        table: String,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The kernel refused a dump (ENOENT: no such table or set).
    #[error("kernel refused {what}: {source}")]
    Dump {
        /// What was being dumped.
        what: String,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A set dump kept being interrupted by concurrent changes (NLM_F_DUMP_INTR).
    #[error("{what} was interrupted by concurrent changes {attempts} times")]
    Inconsistent {
        /// What was being dumped.
        what: String,
        /// Attempts made.
        attempts: usize,
    },
    /// A kernel message could not be decoded.
    #[error("decoding {what}: {reason}")]
    Decode {
        /// What was being decoded.
        what: String,
        /// What was wrong with it.
        reason: String,
    },
}

/// Display helper for [`SysError::Rejected`].
struct FailureList<'a>(&'a [(usize, i32)]);

impl fmt::Display for FailureList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 4;
        for (n, (op, errno)) in self.0.iter().take(SHOWN).enumerate() {
            if n > 0 {
                f.write_str("; ")?;
            }
            write!(f, "op {op}: {}", io::Error::from_raw_os_error(*errno))?;
        }
        if self.0.len() > SHOWN {
            write!(f, "; and {} more", self.0.len() - SHOWN)?;
        }
        Ok(())
    }
}

// === impl Socket ===

/// An owned, bound libmnl netlink socket.
struct Socket(NonNull<mnl::mnl_socket>);

impl Socket {
    fn open(bus: c_int, what: &'static str) -> Result<Self, SysError> {
        let err = |source| SysError::Open { what, source };
        // SAFETY: mnl_socket_open has no preconditions; it returns NULL (with errno) or a
        // socket we now own.
        let raw = unsafe { mnl::mnl_socket_open(bus) };
        let sock = Socket(NonNull::new(raw).ok_or_else(|| err(io::Error::last_os_error()))?);
        // SAFETY: the socket pointer is valid (owned by `sock`); autobind has no other inputs.
        if unsafe { mnl::mnl_socket_bind(sock.0.as_ptr(), 0, mnl::MNL_SOCKET_AUTOPID) } < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // Errors on batches of 64 KiB messages would otherwise echo each whole message back.
        // Best effort: the receive buffer is big enough for echoes too.
        let one: c_int = 1;
        // SAFETY: valid socket; the option value points to a live c_int of the given size.
        unsafe {
            mnl::mnl_socket_setsockopt(
                sock.0.as_ptr(),
                libc::NETLINK_CAP_ACK,
                (&raw const one).cast_mut().cast::<c_void>(),
                size_of::<c_int>() as libc::socklen_t,
            )
        };
        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        sock.set_opt(libc::SO_RCVTIMEO, &tv).map_err(err)?;
        Ok(sock)
    }

    fn fd(&self) -> c_int {
        // SAFETY: valid socket owned by self.
        unsafe { mnl::mnl_socket_get_fd(self.0.as_ptr()) }
    }

    fn portid(&self) -> u32 {
        // SAFETY: valid socket owned by self.
        unsafe { mnl::mnl_socket_get_portid(self.0.as_ptr()) }
    }

    fn set_opt<T>(&self, opt: c_int, val: &T) -> io::Result<()> {
        // SAFETY: fd is open; `val` is a live value of exactly the size we pass.
        let rc = unsafe {
            libc::setsockopt(
                self.fd(),
                libc::SOL_SOCKET,
                opt,
                (val as *const T).cast::<c_void>(),
                size_of::<T>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn get_int_opt(&self, opt: c_int) -> io::Result<usize> {
        let mut val: c_int = 0;
        let mut len = size_of::<c_int>() as libc::socklen_t;
        // SAFETY: fd is open; val/len are live and len holds val's size.
        let rc = unsafe {
            libc::getsockopt(
                self.fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw mut val).cast::<c_void>(),
                &raw mut len,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(val).unwrap_or(0))
    }

    /// Makes the kernel-side buffer `opt` (SO_SNDBUF/SO_RCVBUF) at least `want` bytes, with
    /// the FORCE variant (CAP_NET_ADMIN) so that net.core.[wr]mem_max does not cap it.
    /// `known` caches the size last read back, so the hot path makes no extra syscalls.
    fn grow_buf(&self, opt: c_int, force: c_int, known: &mut usize, want: usize) -> io::Result<()> {
        if *known >= want {
            return Ok(());
        }
        // The kernel doubles the value for bookkeeping overhead; ask for the full size anyway.
        let val = c_int::try_from(want).unwrap_or(c_int::MAX / 2);
        match self.set_opt(force, &val) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => self.set_opt(opt, &val)?,
            Err(e) => return Err(e),
        }
        *known = self.get_int_opt(opt)?;
        Ok(())
    }

    fn send(&self, buf: &[u8]) -> io::Result<()> {
        // SAFETY: valid socket; buf is a live slice of buf.len() bytes.
        let n = unsafe { mnl::mnl_socket_sendto(self.0.as_ptr(), buf.as_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => Err(io::Error::other(format!(
                "short netlink send: {n} of {} bytes",
                buf.len()
            ))),
            Err(_) => Err(io::Error::last_os_error()),
        }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: valid socket; buf is a live, writable slice of buf.len() bytes.
            let n = unsafe {
                mnl::mnl_socket_recvfrom(self.0.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            };
            if let Ok(n) = usize::try_from(n) {
                return Ok(n);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer from the kernel within {RECV_TIMEOUT:?}"),
                    ));
                }
                _ => return Err(e),
            }
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: we own the socket and nothing uses it after drop. Closing mid-dump is fine:
        // the kernel releases the dump state with the socket.
        unsafe { mnl::mnl_socket_close(self.0.as_ptr()) };
    }
}

// === byte buffers ===

/// A zeroed, 8-byte aligned byte buffer: netlink headers and attributes are 4-aligned
/// relative to the buffer start, and libmnl reads them through typed pointers.
struct AlignedBuf(Vec<u64>);

impl AlignedBuf {
    fn new(bytes: usize) -> Self {
        AlignedBuf(vec![0; bytes.div_ceil(8)])
    }

    fn ensure(&mut self, bytes: usize) {
        let words = bytes.div_ceil(8);
        if self.0.len() < words {
            self.0.resize(words, 0);
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the Vec<u64> owns len*8 initialized bytes; u8 has no alignment or validity
        // requirements; the returned borrow ties the slice to &self.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.0.len() * 8) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and the &mut self borrow makes the slice unique.
        unsafe {
            std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), self.0.len() * 8)
        }
    }
}

// === parsing (untrusted kernel input) ===

/// One netlink message, bounds-checked by `mnl_nlmsg_ok`.
struct Msg<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    portid: u32,
    payload: &'a [u8],
}

impl Msg<'_> {
    /// The `error` field of an NLMSG_ERROR / NLMSG_DONE payload, as a positive errno (0 = ack).
    fn errno(&self) -> Option<i32> {
        let code = i32::from_ne_bytes(self.payload.get(..4)?.try_into().ok()?);
        Some(code.checked_neg().unwrap_or(i32::MAX))
    }

    /// Attributes after the nfgenmsg header.
    fn nfnl_attrs(&self) -> Attrs<'_> {
        Attrs(self.payload.get(NFGENMSG_LEN..).unwrap_or(&[]))
    }

    fn portid_ok(&self, ours: u32) -> bool {
        self.portid == 0 || self.portid == ours
    }
}

/// Iterates the netlink messages of one datagram.
struct Msgs<'a>(&'a [u8]);

impl<'a> Iterator for Msgs<'a> {
    type Item = Msg<'a>;

    fn next(&mut self) -> Option<Msg<'a>> {
        let rest = self.0;
        let p = rest.as_ptr();
        if !p.cast::<nlmsghdr>().is_aligned() {
            return None;
        }
        let len = c_int::try_from(rest.len()).unwrap_or(c_int::MAX);
        // SAFETY: `p` is 4-aligned and valid for `len` bytes; mnl_nlmsg_ok reads the header only
        // after checking that `len` covers it, and then checks nlmsg_len against `len`.
        if !unsafe { mnl::mnl_nlmsg_ok(p.cast(), len) } {
            return None;
        }
        // SAFETY: mnl_nlmsg_ok proved a whole, aligned nlmsghdr lies within `rest`.
        let hdr = unsafe { p.cast::<nlmsghdr>().read() };
        let total = usize::try_from(hdr.nlmsg_len).ok()?;
        let payload = rest.get(NLMSG_HDRLEN..total)?;
        self.0 = rest.get(align4(total)..).unwrap_or(&[]);
        Some(Msg {
            ty: hdr.nlmsg_type,
            flags: hdr.nlmsg_flags,
            seq: hdr.nlmsg_seq,
            portid: hdr.nlmsg_pid,
            payload,
        })
    }
}

/// One attribute: its type (flags masked off) and payload.
#[derive(Clone, Copy)]
struct Attr<'a> {
    ty: u16,
    payload: &'a [u8],
}

impl<'a> Attr<'a> {
    fn nested(self) -> Attrs<'a> {
        Attrs(self.payload)
    }

    fn be32(self) -> Option<u32> {
        Some(u32::from_be_bytes(self.payload.try_into().ok()?))
    }

    fn be64(self) -> Option<u64> {
        Some(u64::from_be_bytes(self.payload.try_into().ok()?))
    }
}

/// Iterates a run of attributes, bounds-checked by `mnl_attr_ok`.
struct Attrs<'a>(&'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = Attr<'a>;

    fn next(&mut self) -> Option<Attr<'a>> {
        let rest = self.0;
        let p = rest.as_ptr().cast::<nlattr>();
        if !p.is_aligned() {
            return None;
        }
        let len = c_int::try_from(rest.len()).unwrap_or(c_int::MAX);
        // SAFETY: `p` is 4-aligned and valid for `len` bytes; mnl_attr_ok reads the 4-byte header
        // only after checking `len` covers it, then checks nla_len against `len`.
        if !unsafe { mnl::mnl_attr_ok(p, len) } {
            return None;
        }
        // SAFETY: mnl_attr_ok proved the header and nla_len bytes lie within `rest`.
        let (ty, plen) = unsafe { (mnl::mnl_attr_get_type(p), mnl::mnl_attr_get_payload_len(p)) };
        let payload = rest.get(NLA_HDRLEN..NLA_HDRLEN + usize::from(plen))?;
        self.0 = rest
            .get(align4(NLA_HDRLEN + usize::from(plen))..)
            .unwrap_or(&[]);
        Some(Attr { ty, payload })
    }
}

/// Decoded set elements: key and remaining time to expiry.
type Elements = Vec<(SetKey, Option<Duration>)>;

/// One element of a set dump, undecoded.
struct RawElem<'a> {
    key: Option<&'a [u8]>,
    flags: u32,
    expires: Option<Duration>,
}

/// Walks the elements of one NEWSETELEM dump message.
fn walk_elems(
    msg: &Msg<'_>,
    mut f: impl FnMut(RawElem<'_>) -> Result<(), String>,
) -> Result<(), String> {
    for list in msg
        .nfnl_attrs()
        .filter(|a| a.ty == NFTA_SET_ELEM_LIST_ELEMENTS)
    {
        for elem in list.nested().filter(|a| a.ty == NFTA_LIST_ELEM) {
            let mut e = RawElem {
                key: None,
                flags: 0,
                expires: None,
            };
            for a in elem.nested() {
                match a.ty {
                    NFTA_SET_ELEM_KEY => {
                        e.key = a
                            .nested()
                            .find(|d| d.ty == NFTA_DATA_VALUE)
                            .map(|d| d.payload);
                    }
                    NFTA_SET_ELEM_FLAGS => {
                        e.flags = a.be32().ok_or("element flags are not 4 bytes")?;
                    }
                    NFTA_SET_ELEM_EXPIRATION => {
                        let ms = a.be64().ok_or("element expiration is not 8 bytes")?;
                        e.expires = Some(Duration::from_millis(ms));
                    }
                    _ => {}
                }
            }
            if e.flags & NFT_SET_ELEM_CATCHALL != 0 {
                continue;
            }
            f(e)?;
        }
    }
    Ok(())
}

/// Decodes the elements of one NEWSETELEM dump message into `out`.
fn decode_elems(msg: &Msg<'_>, key_type: KeyType, out: &mut Elements) -> Result<(), String> {
    walk_elems(msg, |e| {
        let raw = e.key.ok_or("element without a key")?;
        let key = key_type.decode(raw).ok_or_else(|| {
            format!(
                "{}-byte key does not fit key type {key_type:?} ({} bytes)",
                raw.len(),
                key_type.key_len()
            )
        })?;
        out.push((key, e.expires));
        Ok(())
    })
}

/// One element of an interval set: a range start or end (address as an integer, IPv4 in the
/// low 32 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bound {
    addr: u128,
    end: bool,
    expires: Option<Duration>,
}

/// Decodes the elements of one NEWSETELEM dump message of an interval set into `out`.
fn decode_bounds(msg: &Msg<'_>, v6: bool, out: &mut Vec<Bound>) -> Result<(), String> {
    walk_elems(msg, |e| {
        let raw = e.key.ok_or("element without a key")?;
        let addr = if v6 {
            <[u8; 16]>::try_from(raw).map(u128::from_be_bytes).ok()
        } else {
            <[u8; 4]>::try_from(raw)
                .map(|b| u128::from(u32::from_be_bytes(b)))
                .ok()
        }
        .ok_or_else(|| {
            format!(
                "{}-byte key in an {} interval set",
                raw.len(),
                if v6 { "ipv6_addr" } else { "ipv4_addr" }
            )
        })?;
        out.push(Bound {
            addr,
            end: e.flags & NFT_SET_ELEM_INTERVAL_END != 0,
            expires: e.expires,
        });
        Ok(())
    })
}

/// A range of an interval set: first and last address (IPv4 in the low 32 bits) and the
/// remaining time to expiry of its start element.
type Range = (u128, u128, Option<Duration>);

/// Pairs the bounds of an interval set, sorted by (address, end before start), into ranges as
/// the kernel's lookup sees them: an address matches if the nearest element at or below it is
/// a start, so a start runs up to the next element above it (an end at that address, or
/// another start taking over), or to the top of the address space if there is none. Ends
/// without a start below them are skipped.
fn bounds_to_ranges(bounds: &[Bound], v6: bool) -> Vec<Range> {
    let top: u128 = if v6 { u128::MAX } else { u128::from(u32::MAX) };
    let mut out = Vec::new();
    for (i, b) in bounds.iter().enumerate() {
        if b.end {
            continue;
        }
        let hi = match bounds.get(i + 1) {
            Some(next) => next.addr.saturating_sub(1),
            None => top,
        };
        if hi >= b.addr {
            out.push((b.addr, hi, b.expires));
        }
    }
    out
}

/// [`bounds_to_ranges`], each range split into CIDRs.
fn bounds_to_cidrs(bounds: &[Bound], v6: bool) -> Vec<(IpNet, Option<Duration>)> {
    let bits: u32 = if v6 { 128 } else { 32 };
    let mut out = Vec::new();
    for (lo, hi, expires) in bounds_to_ranges(bounds, v6) {
        for (addr, prefix) in split_cidrs(lo, hi, bits) {
            let net = if v6 {
                ipnet::Ipv6Net::new(Ipv6Addr::from(addr), prefix).map(IpNet::V6)
            } else {
                let a = u32::try_from(addr).unwrap_or(u32::MAX);
                ipnet::Ipv4Net::new(Ipv4Addr::from(a), prefix).map(IpNet::V4)
            };
            if let Ok(net) = net {
                out.push((net, expires));
            }
        }
    }
    out
}

/// First and last address of `net` (IPv4 in the low 32 bits).
fn net_span(net: &IpNet) -> (u128, u128) {
    match net {
        IpNet::V4(n) => (
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        ),
        IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
    }
}

/// The fewest CIDRs (address, prefix length) covering exactly `lo..=hi` in a `bits`-bit
/// address space.
fn split_cidrs(lo: u128, hi: u128, bits: u32) -> Vec<(u128, u8)> {
    let mut out = Vec::new();
    let mut cur = lo;
    loop {
        let span = hi - cur;
        // Largest block aligned at `cur` that does not pass `hi`: 2^k addresses.
        let mut k = if cur == 0 {
            bits
        } else {
            cur.trailing_zeros().min(bits)
        };
        while k > 0 && !(k == 128 && span == u128::MAX || k < 128 && (1u128 << k) - 1 <= span) {
            k -= 1;
        }
        out.push((cur, u8::try_from(bits - k).unwrap_or(0)));
        if k == 128 {
            break;
        }
        let last = cur + ((1u128 << k) - 1);
        if last >= hi {
            break;
        }
        cur = last + 1;
    }
    out
}

/// The bytes of a string attribute before its NUL.
fn attr_name(a: Attr<'_>) -> &[u8] {
    a.payload.split(|&b| b == 0).next().unwrap_or(&[])
}

/// Decodes one NEWOBJ message: `Some` if it is a counter of `table`.
fn decode_counter(msg: &Msg<'_>, table: &[u8]) -> Result<Option<Counter>, String> {
    let (mut in_table, mut is_counter) = (false, false);
    let mut name = None;
    let (mut packets, mut bytes) = (None, None);
    for a in msg.nfnl_attrs() {
        match a.ty {
            NFTA_OBJ_TABLE => in_table = attr_name(a) == table,
            NFTA_OBJ_NAME => name = Some(String::from_utf8_lossy(attr_name(a)).into_owned()),
            NFTA_OBJ_TYPE => {
                is_counter = a.be32().ok_or("object type is not 4 bytes")? == NFT_OBJECT_COUNTER;
            }
            NFTA_OBJ_DATA => {
                for d in a.nested() {
                    match d.ty {
                        NFTA_COUNTER_PACKETS => {
                            packets = Some(d.be64().ok_or("counter packets are not 8 bytes")?);
                        }
                        NFTA_COUNTER_BYTES => {
                            bytes = Some(d.be64().ok_or("counter bytes are not 8 bytes")?);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if !in_table || !is_counter {
        return Ok(None);
    }
    Ok(Some(Counter {
        name: name.ok_or("counter without a name")?,
        packets: packets.ok_or("counter without packets")?,
        bytes: bytes.ok_or("counter without bytes")?,
    }))
}

/// Decodes one NEWCHAIN/NEWSET message: its name (attribute `name_attr`) if its table
/// (attribute `table_attr`) is `table`.
fn decode_named(
    msg: &Msg<'_>,
    table_attr: u16,
    name_attr: u16,
    table: &str,
) -> Result<Option<String>, String> {
    let (mut in_table, mut name) = (false, None);
    for a in msg.nfnl_attrs() {
        if a.ty == table_attr {
            in_table = attr_name(a) == table.as_bytes();
        } else if a.ty == name_attr {
            name = Some(String::from_utf8_lossy(attr_name(a)).into_owned());
        }
    }
    if !in_table {
        return Ok(None);
    }
    name.map(Some)
        .ok_or_else(|| "object without a name".to_owned())
}

/// Extracts the ORIGINAL-direction (source, destination) of one ctnetlink message.
fn decode_flow(msg: &Msg<'_>) -> Option<(IpAddr, IpAddr)> {
    // Only live flows count: the entry must be ASSURED (traffic seen both ways), and a TCP one
    // must still be ESTABLISHED. Refused, half-open and closing (TIME_WAIT) entries linger in
    // conntrack for minutes and must not keep a grant alive.
    let status = msg.nfnl_attrs().find(|a| a.ty == CTA_STATUS)?.be32()?;
    if status & IPS_ASSURED == 0 {
        return None;
    }
    let orig = msg.nfnl_attrs().find(|a| a.ty == CTA_TUPLE_ORIG)?;
    let proto = orig
        .nested()
        .find(|a| a.ty == CTA_TUPLE_PROTO)
        .and_then(|p| p.nested().find(|a| a.ty == CTA_PROTO_NUM))
        .and_then(|a| a.payload.first().copied());
    if proto == Some(IPPROTO_TCP) {
        let state = msg
            .nfnl_attrs()
            .find(|a| a.ty == CTA_PROTOINFO)
            .and_then(|p| p.nested().find(|a| a.ty == CTA_PROTOINFO_TCP))
            .and_then(|t| t.nested().find(|a| a.ty == CTA_PROTOINFO_TCP_STATE))
            .and_then(|a| a.payload.first().copied());
        if state != Some(TCP_CONNTRACK_ESTABLISHED) {
            return None;
        }
    }
    let ip = orig.nested().find(|a| a.ty == CTA_TUPLE_IP)?;
    let (mut src, mut dst) = (None, None);
    for a in ip.nested() {
        let v4 = || {
            <[u8; 4]>::try_from(a.payload)
                .ok()
                .map(|b| IpAddr::from(Ipv4Addr::from(b)))
        };
        let v6 = || {
            <[u8; 16]>::try_from(a.payload)
                .ok()
                .map(|b| IpAddr::from(Ipv6Addr::from(b)))
        };
        match a.ty {
            CTA_IP_V4_SRC => src = v4(),
            CTA_IP_V4_DST => dst = v4(),
            CTA_IP_V6_SRC => src = v6(),
            CTA_IP_V6_DST => dst = v6(),
            _ => {}
        }
    }
    Some((src?, dst?))
}

// === encoding ===

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Add,
    Delete,
}

/// One NEWSETELEM/DELSETELEM message of a batch and the ops it carries.
#[derive(Debug)]
struct Group<'a> {
    set: &'a str,
    kind: Kind,
    ops: Vec<usize>,
    /// Length of the NFTA_SET_ELEM_LIST_ELEMENTS attribute, header included.
    nest_len: usize,
}

/// Bytes an op's elements add to the element list.
fn op_len(op: &ElemOp) -> usize {
    op.kernel_elems()
        .iter()
        .flatten()
        .map(KernelElem::wire_len)
        .sum()
}

fn str_attr_len(s: &str) -> usize {
    NLA_HDRLEN + align4(s.len() + 1)
}

/// Bytes of one message except its elements.
fn msg_overhead(table: &str, set: &str) -> usize {
    NLMSG_HDRLEN + NFGENMSG_LEN + str_attr_len(table) + str_attr_len(set)
}

/// Splits ops into messages: each key op joins the newest message of the same set and kind
/// unless a later message touches the same element or any range of that set (that would reorder
/// two ops on one element) or the message is full. Ops on distinct elements commute, so the
/// result is equivalent to applying the ops one by one, except that a set `size` limit could be
/// hit in a different place. Each range op gets a message of its own (so a rejection names
/// exactly that op) placed after every earlier op on its set, since overlap between ranges
/// depends on order.
fn plan(ops: &[ElemOp]) -> Vec<Group<'_>> {
    let mut groups: Vec<Group<'_>> = Vec::new();
    // Newest key-op message per (set, kind).
    let mut newest: HashMap<(&str, Kind), usize> = HashMap::new();
    let mut last_touch: HashMap<(&str, SetKey), usize> = HashMap::new();
    // Message of the last range op per set. A range op's own message is always the newest,
    // hence after every earlier op.
    let mut last_range: HashMap<&str, usize> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        let (set, kind, target, _) = op.parts();
        let len = op_len(op);
        let g = match target {
            Target::Key(key) => {
                let touched = last_touch.get(&(set, *key)).copied();
                let range = last_range.get(set).copied();
                let joinable = newest.get(&(set, kind)).copied().filter(|&g| {
                    touched.is_none_or(|t| t <= g)
                        && range.is_none_or(|r| r <= g)
                        && groups
                            .get(g)
                            .is_some_and(|grp| grp.nest_len + len <= NEST_MAX)
                });
                let g = joinable.unwrap_or_else(|| {
                    groups.push(Group {
                        set,
                        kind,
                        ops: Vec::new(),
                        nest_len: NLA_HDRLEN,
                    });
                    newest.insert((set, kind), groups.len() - 1);
                    groups.len() - 1
                });
                last_touch.insert((set, *key), g);
                g
            }
            Target::Range(_) => {
                groups.push(Group {
                    set,
                    kind,
                    ops: Vec::new(),
                    nest_len: NLA_HDRLEN,
                });
                let g = groups.len() - 1;
                last_range.insert(set, g);
                g
            }
        };
        if let Some(grp) = groups.get_mut(g) {
            grp.ops.push(i);
            grp.nest_len += len;
        }
    }
    groups
}

fn check_name(name: &str) -> Result<CString, SysError> {
    let bad = |reason| SysError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > NAME_MAX {
        return Err(bad("longer than 255 bytes"));
    }
    CString::new(name).map_err(|_| bad("contains a NUL byte"))
}

/// Milliseconds for NFTA_SET_ELEM_TIMEOUT: rounded up, at least 1 (0 means "never expires").
fn timeout_ms(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000).max(1);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// A reusable libnftnl element: set the key and timeout, then serialize.
struct NftnlElem(NonNull<nftnl::nftnl_set_elem>);

impl NftnlElem {
    fn new() -> Option<Self> {
        // SAFETY: no preconditions; returns NULL on allocation failure or an element we own.
        NonNull::new(unsafe { nftnl::nftnl_set_elem_alloc() }).map(NftnlElem)
    }

    fn set(&mut self, e: &KernelElem) -> Result<(), &'static str> {
        let key = e
            .key
            .get(..e.len)
            .ok_or("element key longer than 32 bytes")?;
        let p = self.0.as_ptr();
        // SAFETY: `p` is our live element; libnftnl copies `key.len()` (<= 32) bytes out of
        // `key` into the element's key storage (NFT_DATA_VALUE_MAXLEN = 64 bytes).
        let rc = unsafe {
            nftnl::nftnl_set_elem_set(
                p,
                nftnl::NFTNL_SET_ELEM_KEY as u16,
                key.as_ptr().cast(),
                key.len() as u32,
            )
        };
        if rc < 0 {
            return Err("libnftnl refused the element key");
        }
        let timeout = e.timeout.map(timeout_ms);
        let expiration = timeout.filter(|_| e.expiration);
        for (attr, value) in [
            (nftnl::NFTNL_SET_ELEM_TIMEOUT, timeout),
            (nftnl::NFTNL_SET_ELEM_EXPIRATION, expiration),
        ] {
            match value {
                // SAFETY: `p` is our live element; the value is a plain u64.
                Some(ms) => unsafe { nftnl::nftnl_set_elem_set_u64(p, attr as u16, ms) },
                // SAFETY: `p` is our live element; unsetting an absent attribute is a no-op.
                None => unsafe { nftnl::nftnl_set_elem_unset(p, attr as u16) },
            }
        }
        if e.flags != 0 {
            // SAFETY: `p` is our live element; the flags are a plain u32 value.
            unsafe {
                nftnl::nftnl_set_elem_set_u32(p, nftnl::NFTNL_SET_ELEM_FLAGS as u16, e.flags)
            };
        } else {
            // SAFETY: `p` is our live element; unsetting an absent attribute is a no-op.
            unsafe { nftnl::nftnl_set_elem_unset(p, nftnl::NFTNL_SET_ELEM_FLAGS as u16) };
        }
        if e.open {
            // SAFETY: `p` is our live element; libnftnl copies the 6 bytes of the constant
            // into memory it allocates and owns.
            let rc = unsafe {
                nftnl::nftnl_set_elem_set(
                    p,
                    nftnl::NFTNL_SET_ELEM_USERDATA as u16,
                    UDATA_INTERVAL_OPEN.as_ptr().cast(),
                    UDATA_INTERVAL_OPEN.len() as u32,
                )
            };
            if rc < 0 {
                return Err("libnftnl refused the element user data");
            }
        } else {
            // SAFETY: `p` is our live element; unsetting frees libnftnl's copy, if any.
            unsafe { nftnl::nftnl_set_elem_unset(p, nftnl::NFTNL_SET_ELEM_USERDATA as u16) };
        }
        Ok(())
    }
}

impl Drop for NftnlElem {
    fn drop(&mut self) {
        // SAFETY: we own the element; it was never added to a set, so nothing else frees it.
        unsafe { nftnl::nftnl_set_elem_free(self.0.as_ptr()) };
    }
}

/// Writes netlink messages back to back into an aligned buffer, checking room before every
/// call into libnftnl/libmnl (those write without bounds checks).
struct Writer<'b> {
    buf: &'b mut [u8],
    off: usize,
    /// Scratch element that libnftnl serializes each op from.
    elem: &'b mut NftnlElem,
}

impl Writer<'_> {
    fn room(&self, at: usize, need: usize) -> Result<(), &'static str> {
        match self.buf.len().checked_sub(at) {
            Some(left) if left >= need => Ok(()),
            _ => Err("batch buffer too small (size plan broken)"),
        }
    }

    /// Pointer to the message being built at `self.off`.
    fn here(&mut self) -> *mut libc::c_char {
        // `off` never exceeds buf.len() (checked by `room` before every write).
        self.buf.as_mut_ptr().wrapping_add(self.off).cast()
    }

    fn msg_len(nlh: *const nlmsghdr) -> usize {
        // SAFETY: callers pass a header libnftnl/libmnl just wrote inside our aligned buffer.
        unsafe { (*nlh).nlmsg_len as usize }
    }

    /// Appends BATCH_BEGIN (`begin == true`) or BATCH_END.
    fn batch_marker(&mut self, begin: bool, seq: u32) -> Result<(), &'static str> {
        self.room(self.off, BATCH_MSG_LEN)?;
        let at = self.here();
        // SAFETY: `at` is 4-aligned with BATCH_MSG_LEN bytes of room (checked above), which is
        // exactly what nftnl_batch_begin/end write (nlmsghdr + nfgenmsg).
        let nlh = unsafe {
            if begin {
                nftnl::nftnl_batch_begin(at, seq)
            } else {
                nftnl::nftnl_batch_end(at, seq)
            }
        };
        self.off += align4(Self::msg_len(nlh));
        Ok(())
    }

    /// Appends one NEWSETELEM/DELSETELEM message carrying `group`'s ops.
    fn set_elem_msg(
        &mut self,
        seq: u32,
        table: &CStr,
        set: &CStr,
        group: &Group<'_>,
        ops: &[ElemOp],
        delete: DeleteMode,
    ) -> Result<(), &'static str> {
        // An element-less DELSETELEM would flush the whole set: never emit one.
        if group.ops.is_empty() {
            return Err("empty element message");
        }
        let (ty, flags) = match (group.kind, delete) {
            (Kind::Add, _) => (NFT_MSG_NEWSETELEM, libc::NLM_F_CREATE | libc::NLM_F_ACK),
            (Kind::Delete, DeleteMode::Strict) => (NFT_MSG_DELSETELEM, libc::NLM_F_ACK),
            (Kind::Delete, DeleteMode::IfPresent) => (NFT_MSG_DESTROYSETELEM, libc::NLM_F_ACK),
        };
        let start = self.off;
        let head = NLMSG_HDRLEN
            + NFGENMSG_LEN
            + NLA_HDRLEN
            + align4(table.count_bytes() + 1)
            + NLA_HDRLEN
            + align4(set.count_bytes() + 1)
            + NLA_HDRLEN;
        self.room(start, head)?;
        let at = self.here();
        // SAFETY: `at` is 4-aligned with room for the header, both name attributes and the nest
        // header (checked above); the names are NUL-terminated CStrs that libmnl copies.
        let (nlh, nest) = unsafe {
            let nlh = nftnl::nftnl_nlmsg_build_hdr(at, ty, NFPROTO_INET, nl_const(flags), seq);
            mnl::mnl_attr_put_strz(nlh, NFTA_SET_ELEM_LIST_TABLE, table.as_ptr());
            mnl::mnl_attr_put_strz(nlh, NFTA_SET_ELEM_LIST_SET, set.as_ptr());
            let nest = mnl::mnl_attr_nest_start(nlh, NFTA_SET_ELEM_LIST_ELEMENTS);
            (nlh, nest)
        };
        for &i in &group.ops {
            let Some(op) = ops.get(i) else {
                return Err("op index out of range");
            };
            for e in op.kernel_elems().iter().flatten() {
                self.elem.set(e)?;
                self.room(start + Self::msg_len(nlh), ELEM_MAX_BYTES)?;
                // SAFETY: at least ELEM_MAX_BYTES are left after the message tail (checked
                // above), more than one element with a <= 32-byte key, flags, a timeout and
                // 6 bytes of user data can take; `nlh` is the message being built and `elem` a
                // live element.
                unsafe {
                    let inner = mnl::mnl_attr_nest_start(nlh, NFTA_LIST_ELEM);
                    nftnl::nftnl_set_elem_nlmsg_build_payload(nlh, self.elem.0.as_ptr());
                    mnl::mnl_attr_nest_end(nlh, inner);
                }
            }
        }
        let nest_off = start + (nest as usize).wrapping_sub(at as usize);
        if start + Self::msg_len(nlh) - nest_off > NEST_MAX {
            return Err("element list exceeds 64 KiB");
        }
        // SAFETY: `nest` was returned by mnl_attr_nest_start on this message; its length was
        // checked to fit nla_len.
        unsafe { mnl::mnl_attr_nest_end(nlh, nest) };
        self.off = start + align4(Self::msg_len(nlh));
        Ok(())
    }
}

/// One attribute of a request.
enum ReqAttr<'a> {
    /// A NUL-terminated string.
    Str(u16, &'a CStr),
    /// A u32, sent big-endian.
    U32(u16, u32),
}

impl ReqAttr<'_> {
    fn wire_len(&self) -> usize {
        match self {
            ReqAttr::Str(_, s) => NLA_HDRLEN + align4(s.count_bytes() + 1),
            ReqAttr::U32(..) => NLA_HDRLEN + 4,
        }
    }
}

/// How the kernel ends its answers to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// NLMSG_DONE (NLM_F_DUMP requests).
    Dump,
    /// An NLMSG_ERROR ack (NLM_F_ACK requests).
    Ack,
}

// === impl Netlink ===

/// A netlink socket to nf_tables in the network namespace of the thread that opened it.
pub struct Netlink {
    sock: Socket,
    seq: u32,
    /// SO_SNDBUF / SO_RCVBUF as last read back from the kernel.
    sndbuf: usize,
    rcvbuf: usize,
    tx: AlignedBuf,
    rx: AlignedBuf,
    elem: NftnlElem,
    delete_mode: DeleteMode,
}

// SAFETY: the raw pointers are owned exclusively by this value: the mnl socket is a heap struct
// holding an fd and its address, the libnftnl element is plain heap data; neither has thread
// affinity. `&mut self` on every method rules out concurrent use, so Send (not Sync) is sound.
unsafe impl Send for Netlink {}

impl fmt::Debug for Netlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netlink")
            .field("fd", &self.sock.fd())
            .field("portid", &self.sock.portid())
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Netlink {
    /// Opens and binds a NETLINK_NETFILTER socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, SysError> {
        let sock = Socket::open(libc::NETLINK_NETFILTER, "nf_tables")?;
        let elem = NftnlElem::new().ok_or_else(|| SysError::Open {
            what: "nf_tables",
            source: io::Error::from(io::ErrorKind::OutOfMemory),
        })?;
        // Any start works; a clock-derived one (as nft does) keeps a reused portid from
        // matching another process's stale answers.
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        let bufsize = |opt| {
            sock.get_int_opt(opt).map_err(|source| SysError::Open {
                what: "nf_tables",
                source,
            })
        };
        Ok(Netlink {
            sndbuf: bufsize(libc::SO_SNDBUF)?,
            rcvbuf: bufsize(libc::SO_RCVBUF)?,
            sock,
            seq,
            tx: AlignedBuf::new(4096),
            rx: AlignedBuf::new(RX_BYTES),
            elem,
            delete_mode: DeleteMode::Strict,
        })
    }

    /// Chooses how later commits send [`ElemOp::Delete`]; see [`DeleteMode`].
    pub fn set_delete_mode(&mut self, mode: DeleteMode) {
        self.delete_mode = mode;
    }

    /// Reserves `n` consecutive sequence numbers and returns the first.
    fn take_seqs(&mut self, n: u32) -> u32 {
        let first = self.seq.wrapping_add(1);
        self.seq = self.seq.wrapping_add(n);
        first
    }

    /// Applies all ops as ONE nf_tables transaction (one NFNL batch: BATCH_BEGIN,
    /// NEWSETELEM/DELSETELEM messages, BATCH_END) in table `inet <table>`, in order, and returns
    /// once the kernel acknowledged every message, i.e. the elements are live. Ops on the same
    /// set and kind are packed into as few messages as possible (see `plan`); ops on the same
    /// element keep their order, so Delete+Add of one key re-arms its timeout atomically.
    /// An empty op list is a no-op.
    ///
    /// Batches with range ops ([`ElemOp::AddRange`], [`ElemOp::DeleteRange`]) first dump the
    /// interval sets they touch and check them in userspace, as nft does against its cache,
    /// because the kernel's own overlap detection misses cases (a range reaching the top of
    /// the address space has no end element to collide; a range sharing its end element with
    /// a range it contains is taken for a re-add) and deleting start and end elements that
    /// belong to different ranges would leave a start open to the top. The ops are replayed on
    /// the dumped ranges in order: an `AddRange` overlapping a range other than an identical
    /// one fails with EEXIST, a `DeleteRange` of a range that is not present exactly fails
    /// with ENOENT (`Strict`) or is left out of the batch (`IfPresent`). Failures are reported
    /// as [`SysError::Rejected`] and nothing is sent. Changes by others between the dump and the
    /// commit are not seen; key ops ([`ElemOp::Add`], [`ElemOp::Delete`]) on interval sets are
    /// not replayed. A range op on a missing set fails that dump ([`SysError::Dump`], ENOENT).
    pub fn commit(&mut self, table: &str, ops: &[ElemOp]) -> Result<(), SysError> {
        let has_ranges = ops
            .iter()
            .any(|op| matches!(op, ElemOp::AddRange { .. } | ElemOp::DeleteRange { .. }));
        if !has_ranges {
            return self.commit_checked(table, ops);
        }
        let skip = self.check_ranges(table, ops)?;
        if !skip.contains(&true) {
            return self.commit_checked(table, ops);
        }
        let sent: Vec<usize> = (0..ops.len())
            .filter(|&i| !skip.get(i).copied().unwrap_or(false))
            .collect();
        let filtered: Vec<ElemOp> = sent.iter().filter_map(|&i| ops.get(i).cloned()).collect();
        match self.commit_checked(table, &filtered) {
            Err(SysError::Rejected { failures }) => Err(SysError::Rejected {
                failures: failures
                    .into_iter()
                    .map(|(i, errno)| (sent.get(i).copied().unwrap_or(i), errno))
                    .collect(),
            }),
            other => other,
        }
    }

    /// Replays the range ops of `ops` on dumps of their sets (see [`Netlink::commit`]) and
    /// returns which ops to leave out (absent ranges under `IfPresent`).
    fn check_ranges(&mut self, table: &str, ops: &[ElemOp]) -> Result<Vec<bool>, SysError> {
        let mut models: HashMap<&str, Vec<(u128, u128)>> = HashMap::new();
        let mut skip = vec![false; ops.len()];
        let mut failures = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let (set, net, add) = match op {
                ElemOp::AddRange { set, net, .. } => (set.as_str(), net, true),
                ElemOp::DeleteRange { set, net } => (set.as_str(), net, false),
                ElemOp::Add { .. } | ElemOp::Delete { .. } => continue,
            };
            if !models.contains_key(set) {
                let v6 = matches!(net, IpNet::V6(_));
                let bounds = self.dump_bounds(table, set, v6)?;
                let ranges = bounds_to_ranges(&bounds, v6)
                    .into_iter()
                    .map(|(lo, hi, _)| (lo, hi))
                    .collect();
                models.insert(set, ranges);
            }
            let Some(model) = models.get_mut(set) else {
                continue;
            };
            let span = net_span(net);
            let present = model.iter().position(|&r| r == span);
            if add {
                if present.is_some() {
                    continue;
                }
                if model.iter().any(|&(lo, hi)| lo <= span.1 && span.0 <= hi) {
                    failures.push((i, libc::EEXIST));
                    continue;
                }
                model.push(span);
            } else {
                match present {
                    Some(p) => {
                        model.swap_remove(p);
                    }
                    None if self.delete_mode == DeleteMode::IfPresent => {
                        if let Some(s) = skip.get_mut(i) {
                            *s = true;
                        }
                    }
                    None => failures.push((i, libc::ENOENT)),
                }
            }
        }
        if failures.is_empty() {
            Ok(skip)
        } else {
            Err(SysError::Rejected { failures })
        }
    }

    /// [`Netlink::commit`] after the range check.
    fn commit_checked(&mut self, table: &str, ops: &[ElemOp]) -> Result<(), SysError> {
        if ops.is_empty() {
            return Ok(());
        }
        let what = || format!("nf_tables batch for table inet {table}");
        let table_c = check_name(table)?;
        let mut names: HashMap<&str, CString> = HashMap::new();
        for op in ops {
            let (set, ..) = op.parts();
            if !names.contains_key(set) {
                names.insert(set, check_name(set)?);
            }
        }

        let groups = plan(ops);
        let bytes = 2 * BATCH_MSG_LEN
            + groups
                .iter()
                .map(|g| msg_overhead(table, g.set) + g.nest_len)
                .sum::<usize>();
        let n_msgs = u32::try_from(groups.len()).unwrap_or(u32::MAX);
        if bytes > MAX_BATCH_BYTES || n_msgs > u32::MAX - 2 {
            return Err(SysError::TooLarge {
                table: table.to_owned(),
                ops: ops.len(),
                bytes,
                max: MAX_BATCH_BYTES,
            });
        }

        let begin_seq = self.take_seqs(n_msgs + 2);
        let first_seq = begin_seq.wrapping_add(1);
        let end_seq = first_seq.wrapping_add(n_msgs);
        self.tx.ensure(bytes + ELEM_MAX_BYTES * 2);
        let delete_mode = self.delete_mode;
        let mut w = Writer {
            buf: self.tx.bytes_mut(),
            off: 0,
            elem: &mut self.elem,
        };
        let encoded = (|| {
            w.batch_marker(true, begin_seq)?;
            for (n, g) in groups.iter().enumerate() {
                let set = names.get(g.set).ok_or("set name missing")?;
                let seq = first_seq.wrapping_add(n as u32);
                w.set_elem_msg(seq, &table_c, set, g, ops, delete_mode)?;
            }
            w.batch_marker(false, end_seq)?;
            Ok(w.off)
        })();
        let len = encoded.map_err(|reason| SysError::Encode {
            what: what(),
            reason,
        })?;
        if len != bytes {
            return Err(SysError::Encode {
                what: what(),
                reason: "encoded size differs from the size plan",
            });
        }

        let send_err = |source| SysError::Send {
            what: what(),
            source,
        };
        // The whole batch is one skb, bounded by the send buffer; every ack is queued before we
        // read the first one, bounded by the receive buffer.
        self.sock
            .grow_buf(
                libc::SO_SNDBUF,
                libc::SO_SNDBUFFORCE,
                &mut self.sndbuf,
                len + (64 << 10),
            )
            .map_err(send_err)?;
        self.sock
            .grow_buf(
                libc::SO_RCVBUF,
                libc::SO_RCVBUFFORCE,
                &mut self.rcvbuf,
                groups.len() * ACK_TRUESIZE + (256 << 10),
            )
            .map_err(send_err)?;
        let tx = self.tx.bytes().get(..len).ok_or_else(|| SysError::Encode {
            what: what(),
            reason: "encoded length beyond buffer",
        })?;
        self.sock.send(tx).map_err(send_err)?;

        self.collect_acks(table, &groups, begin_seq, first_seq, end_seq)
    }

    /// Reads one answer per element message (NLM_F_ACK on each). Answers to other sequence
    /// numbers are leftovers of an earlier, aborted exchange and are skipped.
    fn collect_acks(
        &mut self,
        table: &str,
        groups: &[Group<'_>],
        begin_seq: u32,
        first_seq: u32,
        end_seq: u32,
    ) -> Result<(), SysError> {
        let portid = self.sock.portid();
        let mut answered = vec![false; groups.len()];
        let mut pending = groups.len();
        let mut failures = Vec::new();
        while pending > 0 {
            let n = self
                .sock
                .recv(self.rx.bytes_mut())
                .map_err(|source| SysError::Recv {
                    what: format!("nf_tables batch for table inet {table}"),
                    source,
                })?;
            for msg in Msgs(self.rx.bytes().get(..n).unwrap_or(&[])) {
                if msg.ty != nl_const(libc::NLMSG_ERROR) || !msg.portid_ok(portid) {
                    continue;
                }
                let Some(errno) = msg.errno() else { continue };
                if msg.seq == begin_seq || msg.seq == end_seq {
                    // Whole-batch failure (EPERM, ENOMEM, failed commit): the kernel may still
                    // queue per-message acks after it; they carry this batch's sequence numbers
                    // and are skipped by the next exchange.
                    if errno != 0 {
                        return Err(SysError::Aborted {
                            table: table.to_owned(),
                            source: io::Error::from_raw_os_error(errno),
                        });
                    }
                    continue;
                }
                let idx = msg.seq.wrapping_sub(first_seq) as usize;
                let Some(slot) = answered.get_mut(idx) else {
                    continue;
                };
                if *slot {
                    continue;
                }
                *slot = true;
                pending -= 1;
                if errno != 0
                    && let Some(g) = groups.get(idx)
                {
                    failures.extend(g.ops.iter().map(|&op| (op, errno)));
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            failures.sort_unstable();
            Err(SysError::Rejected { failures })
        }
    }

    /// Dumps every element of set `inet <table> <set>` with its remaining time to expiry
    /// (NFTA_SET_ELEM_EXPIRATION; `None` if the element has no timeout), sorted by key.
    /// Decoding streams over the dump; memory beyond the returned Vec is one receive buffer.
    ///
    /// The kernel resumes a multi-part set dump by element *position*, so a hash table resize
    /// while the dump runs (typically right after a large batch) makes it repeat some elements
    /// and skip as many others. Repeats are detected (adjacent equal keys after the sort) and
    /// the dump is redone, up to `DUMP_RETRIES` times, then [`SysError::Inconsistent`]. An
    /// element removed (deleted or garbage-collected) during the dump can still make it skip one
    /// element without any repeat; callers reconciling state should tolerate that.
    pub fn list(
        &mut self,
        table: &str,
        set: &str,
        key: KeyType,
    ) -> Result<Vec<(SetKey, Option<Duration>)>, SysError> {
        let what = || format!("dump of set inet {table} {set}");
        let table_c = check_name(table)?;
        let set_c = check_name(set)?;
        let attrs = [
            ReqAttr::Str(NFTA_SET_ELEM_LIST_TABLE, &table_c),
            ReqAttr::Str(NFTA_SET_ELEM_LIST_SET, &set_c),
        ];
        for _ in 0..=DUMP_RETRIES {
            let seq = self.send_request(NFT_MSG_GETSETELEM, libc::NLM_F_DUMP, &attrs, &what)?;
            let mut out: Elements = Vec::new();
            let interrupted =
                self.read_answers(seq, NFT_MSG_NEWSETELEM, Answer::Dump, &what, &mut |msg| {
                    decode_elems(msg, key, &mut out)
                })?;
            out.sort_unstable_by_key(|e| e.0);
            let repeated = out.windows(2).any(|w| w[0].0 == w[1].0);
            if interrupted || repeated {
                tracing::debug!(
                    interrupted,
                    repeated,
                    "{} inconsistent, dumping again",
                    what()
                );
                continue;
            }
            return Ok(out);
        }
        Err(SysError::Inconsistent {
            what: what(),
            attempts: DUMP_RETRIES + 1,
        })
    }

    /// Dumps the ranges of the `flags interval` set `inet <table> <set>` (of `ipv6_addr` if
    /// `v6`, else `ipv4_addr`) with the remaining time to expiry of each, sorted by address.
    /// Start and end elements are paired as the kernel's lookup does (a start covers up to the
    /// next element; with none above it, to the top of the address space) and each range is
    /// returned as the fewest CIDRs covering it exactly, each with its range's expiry. Ranges
    /// added as one CIDR (as [`ElemOp::AddRange`] does) come back as that CIDR. End elements
    /// without a live start (the start expired or nft's leading end-at-0 element) are skipped.
    /// A dump that repeated elements is redone as in [`Netlink::list`].
    pub fn list_ranges(
        &mut self,
        table: &str,
        set: &str,
        v6: bool,
    ) -> Result<Vec<(IpNet, Option<Duration>)>, SysError> {
        let bounds = self.dump_bounds(table, set, v6)?;
        Ok(bounds_to_cidrs(&bounds, v6))
    }

    /// Dumps the elements of an interval set as bounds sorted by (address, end before start),
    /// redoing a dump that repeated elements as in [`Netlink::list`].
    fn dump_bounds(&mut self, table: &str, set: &str, v6: bool) -> Result<Vec<Bound>, SysError> {
        let what = || format!("dump of interval set inet {table} {set}");
        let table_c = check_name(table)?;
        let set_c = check_name(set)?;
        let attrs = [
            ReqAttr::Str(NFTA_SET_ELEM_LIST_TABLE, &table_c),
            ReqAttr::Str(NFTA_SET_ELEM_LIST_SET, &set_c),
        ];
        for _ in 0..=DUMP_RETRIES {
            let seq = self.send_request(NFT_MSG_GETSETELEM, libc::NLM_F_DUMP, &attrs, &what)?;
            let mut out = Vec::new();
            let interrupted =
                self.read_answers(seq, NFT_MSG_NEWSETELEM, Answer::Dump, &what, &mut |msg| {
                    decode_bounds(msg, v6, &mut out)
                })?;
            out.sort_unstable_by_key(|b| (b.addr, !b.end));
            let repeated = out
                .windows(2)
                .any(|w| (w[0].addr, w[0].end) == (w[1].addr, w[1].end));
            if interrupted || repeated {
                tracing::debug!(
                    interrupted,
                    repeated,
                    "{} inconsistent, dumping again",
                    what()
                );
                continue;
            }
            return Ok(out);
        }
        Err(SysError::Inconsistent {
            what: what(),
            attempts: DUMP_RETRIES + 1,
        })
    }

    /// Reads every named counter of table `inet <table>` (NFT_MSG_GETOBJ dump filtered by table
    /// and type counter), sorted by name. Costs O(objects), whatever the size of the sets. A
    /// missing table yields an empty list.
    pub fn counters(&mut self, table: &str) -> Result<Vec<Counter>, SysError> {
        let what = || format!("dump of counters of table inet {table}");
        let table_c = check_name(table)?;
        let attrs = [
            ReqAttr::Str(NFTA_OBJ_TABLE, &table_c),
            ReqAttr::U32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER),
        ];
        let mut out =
            self.dump_all(NFT_MSG_GETOBJ, NFT_MSG_NEWOBJ, &attrs, &what, |msg, out| {
                if let Some(c) = decode_counter(msg, table.as_bytes())? {
                    out.push(c);
                }
                Ok(())
            })?;
        out.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Whether table `inet <table>` exists (NFT_MSG_GETTABLE of that one table).
    pub fn table_exists(&mut self, table: &str) -> Result<bool, SysError> {
        let what = || format!("lookup of table inet {table}");
        let table_c = check_name(table)?;
        let attrs = [ReqAttr::Str(NFTA_TABLE_NAME, &table_c)];
        let seq = self.send_request(NFT_MSG_GETTABLE, libc::NLM_F_ACK, &attrs, &what)?;
        match self.read_answers(seq, NFT_MSG_NEWTABLE, Answer::Ack, &what, &mut |_| Ok(())) {
            Ok(_) => Ok(true),
            Err(SysError::Dump { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Names of every chain (base or regular) of table `inet <table>`, sorted. The kernel's
    /// chain dump covers all inet tables (it has no table filter), so this costs O(chains of
    /// the family). A missing table yields an empty list.
    pub fn chains(&mut self, table: &str) -> Result<Vec<String>, SysError> {
        let what = || format!("dump of chains of table inet {table}");
        let table_c = check_name(table)?;
        let attrs = [ReqAttr::Str(NFTA_CHAIN_TABLE, &table_c)];
        let mut out = self.dump_all(
            NFT_MSG_GETCHAIN,
            NFT_MSG_NEWCHAIN,
            &attrs,
            &what,
            |msg, out| {
                if let Some(name) = decode_named(msg, NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, table)? {
                    out.push(name);
                }
                Ok(())
            },
        )?;
        out.sort_unstable();
        Ok(out)
    }

    /// Names of every set of table `inet <table>` (NFT_MSG_GETSET dump filtered by table; set
    /// descriptions only, no elements), sorted. A missing table is [`SysError::Dump`] with
    /// ENOENT.
    pub fn sets(&mut self, table: &str) -> Result<Vec<String>, SysError> {
        let what = || format!("dump of sets of table inet {table}");
        let table_c = check_name(table)?;
        let attrs = [ReqAttr::Str(NFTA_SET_TABLE, &table_c)];
        let mut out =
            self.dump_all(NFT_MSG_GETSET, NFT_MSG_NEWSET, &attrs, &what, |msg, out| {
                if let Some(name) = decode_named(msg, NFTA_SET_TABLE, NFTA_SET_NAME, table)? {
                    out.push(name);
                }
                Ok(())
            })?;
        out.sort_unstable();
        Ok(out)
    }

    /// Whether the kernel accepts [`DeleteMode::IfPresent`] deletes (NFT_MSG_DESTROYSETELEM,
    /// Linux 6.3+): sends one such delete of `probe` from `inet <table> <set>` and reports
    /// whether it was acknowledged. `probe` must be a key that is never in the set (it would
    /// be deleted). False on any error, including a missing table or set; the reason is logged
    /// at debug level. The delete mode is left as it was.
    pub fn supports_delete_if_present(&mut self, table: &str, set: &str, probe: SetKey) -> bool {
        let prev = self.delete_mode;
        self.delete_mode = DeleteMode::IfPresent;
        let res = self.commit(
            table,
            &[ElemOp::Delete {
                set: set.to_owned(),
                key: probe,
            }],
        );
        self.delete_mode = prev;
        match res {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("delete-if-present probe on inet {table} {set} failed: {e}");
                false
            }
        }
    }

    /// Sends one nf_tables request (family inet, NLM_F_REQUEST plus `flags`) carrying `attrs`
    /// and returns its sequence number.
    fn send_request(
        &mut self,
        ty: u16,
        flags: c_int,
        attrs: &[ReqAttr<'_>],
        what: &dyn Fn() -> String,
    ) -> Result<u32, SysError> {
        let seq = self.take_seqs(1);
        let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.iter().map(ReqAttr::wire_len).sum::<usize>();
        self.tx.ensure(len);
        let buf = self.tx.bytes_mut();
        if buf.len() < len {
            return Err(SysError::Encode {
                what: what(),
                reason: "request buffer too small",
            });
        }
        // SAFETY: the buffer is 8-aligned and holds `len` bytes (checked above): the header,
        // the nfgenmsg, and every attribute at its `wire_len`, exactly what is written here.
        // String attributes are NUL-terminated CStrs that libmnl copies.
        let sent_len = unsafe {
            let nlh = nftnl::nftnl_nlmsg_build_hdr(
                buf.as_mut_ptr().cast(),
                ty,
                NFPROTO_INET,
                nl_const(flags),
                seq,
            );
            for a in attrs {
                match a {
                    ReqAttr::Str(t, s) => mnl::mnl_attr_put_strz(nlh, *t, s.as_ptr()),
                    ReqAttr::U32(t, v) => mnl::mnl_attr_put_u32(nlh, *t, v.to_be()),
                }
            }
            (*nlh).nlmsg_len as usize
        };
        let req = self.tx.bytes().get(..sent_len).unwrap_or(&[]);
        self.sock.send(req).map_err(|source| SysError::Send {
            what: what(),
            source,
        })?;
        Ok(seq)
    }

    /// Dumps with request `ty` and collects what `decode` makes of each `reply` message,
    /// redoing the dump if the kernel flags it NLM_F_DUMP_INTR.
    fn dump_all<T>(
        &mut self,
        ty: u16,
        reply: u16,
        attrs: &[ReqAttr<'_>],
        what: &dyn Fn() -> String,
        decode: impl Fn(&Msg<'_>, &mut Vec<T>) -> Result<(), String>,
    ) -> Result<Vec<T>, SysError> {
        for _ in 0..=DUMP_RETRIES {
            let seq = self.send_request(ty, libc::NLM_F_DUMP, attrs, what)?;
            let mut out = Vec::new();
            let interrupted = self.read_answers(seq, reply, Answer::Dump, what, &mut |msg| {
                decode(msg, &mut out)
            })?;
            if !interrupted {
                return Ok(out);
            }
            tracing::debug!("{} interrupted, dumping again", what());
        }
        Err(SysError::Inconsistent {
            what: what(),
            attempts: DUMP_RETRIES + 1,
        })
    }

    /// Reads the answers to request `seq` to their end (NLMSG_DONE of a dump, or the ack of a
    /// single request), passing every nf_tables message of type `reply` to `on_msg` until one
    /// fails to decode. Returns whether the kernel flagged the dump NLM_F_DUMP_INTR. A bad
    /// message does not stop the read: the answers are drained to their end so that the socket
    /// is clean for the next exchange.
    fn read_answers(
        &mut self,
        seq: u32,
        reply: u16,
        end: Answer,
        what: &dyn Fn() -> String,
        on_msg: &mut dyn FnMut(&Msg<'_>) -> Result<(), String>,
    ) -> Result<bool, SysError> {
        let portid = self.sock.portid();
        let reply_type = (NFNL_SUBSYS_NFTABLES << 8) | reply;
        let mut interrupted = false;
        let mut first_err: Option<SysError> = None;
        loop {
            let n = self
                .sock
                .recv(self.rx.bytes_mut())
                .map_err(|source| SysError::Recv {
                    what: what(),
                    source,
                })?;
            for msg in Msgs(self.rx.bytes().get(..n).unwrap_or(&[])) {
                if msg.seq != seq || !msg.portid_ok(portid) {
                    continue;
                }
                if msg.flags & nl_const(libc::NLM_F_DUMP_INTR) != 0 {
                    interrupted = true;
                }
                match msg.ty {
                    t if t == reply_type && first_err.is_none() => {
                        if let Err(reason) = on_msg(&msg) {
                            first_err = Some(SysError::Decode {
                                what: what(),
                                reason,
                            });
                        }
                    }
                    t if t == nl_const(libc::NLMSG_ERROR) => match msg.errno() {
                        Some(0) if end == Answer::Ack => {
                            return first_err.map_or(Ok(interrupted), Err);
                        }
                        Some(0) => {}
                        Some(errno) => {
                            return Err(first_err.unwrap_or(SysError::Dump {
                                what: what(),
                                source: io::Error::from_raw_os_error(errno),
                            }));
                        }
                        None => {
                            return Err(SysError::Decode {
                                what: what(),
                                reason: "truncated NLMSG_ERROR".into(),
                            });
                        }
                    },
                    t if t == nl_const(libc::NLMSG_DONE) => {
                        if let Some(e) = first_err {
                            return Err(e);
                        }
                        if let Some(errno) = msg.errno().filter(|&e| e != 0) {
                            return Err(SysError::Dump {
                                what: what(),
                                source: io::Error::from_raw_os_error(errno),
                            });
                        }
                        return Ok(interrupted);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Dumps the conntrack table (ctnetlink, IPCTNL_MSG_CT_GET with NLM_F_DUMP) of the calling
/// thread's network namespace and returns, for at most `max` entries, the ORIGINAL-direction
/// (source, destination) addresses, IPv4 and IPv6. Used to renew grants that still carry live
/// flows. Reading stops after `max` entries; the socket is closed, which ends the dump.
pub fn conntrack_flows(max: usize) -> Result<Vec<(IpAddr, IpAddr)>, SysError> {
    const WHAT: &str = "conntrack dump";
    if max == 0 {
        return Ok(Vec::new());
    }
    let sock = Socket::open(libc::NETLINK_NETFILTER, "ctnetlink")?;
    let seq = 1;
    let mut tx = AlignedBuf::new(NLMSG_HDRLEN + NFGENMSG_LEN);
    let req_len = {
        let buf = tx.bytes_mut();
        // SAFETY: the buffer is 8-aligned and at least nlmsghdr + nfgenmsg long, exactly what
        // is written: mnl zeroes and fills the header, then reserves the 4-byte nfgenmsg, which
        // we fill through the returned pointer (AF_UNSPEC dumps every family).
        unsafe {
            let nlh = mnl::mnl_nlmsg_put_header(buf.as_mut_ptr().cast());
            (*nlh).nlmsg_type = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET;
            (*nlh).nlmsg_flags = nl_const(libc::NLM_F_REQUEST | libc::NLM_F_DUMP);
            (*nlh).nlmsg_seq = seq;
            let nfg = mnl::mnl_nlmsg_put_extra_header(nlh, NFGENMSG_LEN).cast::<[u8; 4]>();
            nfg.write([libc::AF_UNSPEC as u8, NFNETLINK_V0, 0, 0]);
            (*nlh).nlmsg_len as usize
        }
    };
    let req = tx.bytes().get(..req_len).unwrap_or(&[]);
    sock.send(req).map_err(|source| SysError::Send {
        what: WHAT.into(),
        source,
    })?;

    let portid = sock.portid();
    let mut rx = AlignedBuf::new(RX_BYTES);
    let mut out = Vec::new();
    loop {
        let n = sock.recv(rx.bytes_mut()).map_err(|source| SysError::Recv {
            what: WHAT.into(),
            source,
        })?;
        for msg in Msgs(rx.bytes().get(..n).unwrap_or(&[])) {
            if msg.seq != seq || !msg.portid_ok(portid) {
                continue;
            }
            match msg.ty {
                t if t == nl_const(libc::NLMSG_DONE) => return Ok(out),
                t if t == nl_const(libc::NLMSG_ERROR) => match msg.errno() {
                    Some(0) => {}
                    errno => {
                        return Err(SysError::Dump {
                            what: WHAT.into(),
                            source: io::Error::from_raw_os_error(errno.unwrap_or(libc::EPROTO)),
                        });
                    }
                },
                t if t >> 8 == NFNL_SUBSYS_CTNETLINK => {
                    if let Some(flow) = decode_flow(&msg) {
                        out.push(flow);
                        if out.len() >= max {
                            return Ok(out);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// Returns freed heap memory to the kernel. Start-up reconcile allocates transiently in
/// proportion to the grants (maps growing, op lists); without this, glibc keeps that memory and
/// the resident size stays at the peak for the life of the process.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own heap metadata and returns unused pages with
    // madvise; it takes no pointers from us and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
// Tests fail loudly: unwrap/expect/panic carry the diagnosis.
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    use std::collections::HashSet;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::process::{Command, Stdio};
    use std::time::Instant;

    use nix::sched::{CloneFlags, unshare};

    const RULESET: &str = "table inet t {
        set a4 { type ipv4_addr; flags timeout; }
        set a6 { type ipv6_addr; flags timeout; }
        set c4 { type ipv4_addr . ipv4_addr; flags timeout; }
        set c6 { type ipv6_addr . ipv6_addr; flags timeout; }
        set m4 { type ipv4_addr; flags interval,timeout; }
        set m6 { type ipv6_addr; flags interval,timeout; }
        counter hits { }
        counter misses { }
    }";

    /// Runs `f` on a fresh thread inside its own network namespace holding `RULESET`; the
    /// namespace dies with the thread, so the host ruleset is never touched.
    fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        assert!(
            nix::unistd::geteuid().is_root(),
            "fwd sys tests need root (CAP_SYS_ADMIN for unshare(CLONE_NEWNET), CAP_NET_ADMIN for \
             nf_tables); run them as root"
        );
        std::thread::spawn(move || {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
            nft_script(RULESET);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    fn nft_script(script: &str) {
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nft");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft -f failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `nft -j list set inet t <set>`: the set's `elem` array (empty if none).
    fn nft_elems(set: &str) -> Vec<serde_json::Value> {
        let out = Command::new("nft")
            .args(["-j", "list", "set", "inet", "t", set])
            .output()
            .expect("run nft");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|o| o.get("set"))
            .and_then(|s| s.get("elem"))
            .and_then(|e| e.as_array())
            .cloned()
            .unwrap_or_default()
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn add(set: &str, key: SetKey, secs: Option<u64>) -> ElemOp {
        ElemOp::Add {
            set: set.into(),
            key,
            timeout: secs.map(Duration::from_secs),
        }
    }

    fn del(set: &str, key: SetKey) -> ElemOp {
        ElemOp::Delete {
            set: set.into(),
            key,
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn add_range(set: &str, n: &str, secs: Option<u64>) -> ElemOp {
        ElemOp::AddRange {
            set: set.into(),
            net: net(n),
            timeout: secs.map(Duration::from_secs),
        }
    }

    fn del_range(set: &str, n: &str) -> ElemOp {
        ElemOp::DeleteRange {
            set: set.into(),
            net: net(n),
        }
    }

    /// `nft -j <args>`, parsed; the `nftables` array.
    fn nft_json(args: &[&str]) -> Vec<serde_json::Value> {
        let out = Command::new("nft")
            .arg("-j")
            .args(args)
            .output()
            .expect("run nft");
        assert!(
            out.status.success(),
            "nft -j {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["nftables"].as_array().cloned().unwrap_or_default()
    }

    /// The elements of interval set `set` as nft lists them: ("addr/len" or "a-b" or "addr",
    /// timeout in seconds).
    fn nft_ranges(set: &str) -> Vec<(String, Option<u64>)> {
        fn one(v: &serde_json::Value) -> String {
            if let Some(p) = v.get("prefix") {
                format!("{}/{}", p["addr"].as_str().unwrap(), p["len"])
            } else if let Some(r) = v.get("range") {
                format!("{}-{}", r[0].as_str().unwrap(), r[1].as_str().unwrap())
            } else {
                v.as_str().unwrap_or_else(|| panic!("{v}")).to_owned()
            }
        }
        let mut out: Vec<_> = nft_elems(set)
            .iter()
            .map(|e| match e.get("elem") {
                Some(x) => (one(&x["val"]), x["timeout"].as_u64()),
                None => (one(e), None),
            })
            .collect();
        out.sort();
        out
    }

    /// Our listing in nft's notation (a host route as a bare address), with the timeout the
    /// range must have been added with (`plausible` remaining time), sorted.
    fn our_ranges(
        nl: &mut Netlink,
        set: &str,
        want_timeouts: &[(&str, u64)],
    ) -> Vec<(String, Option<u64>)> {
        let v6 = set.ends_with('6');
        let mut out: Vec<_> = nl
            .list_ranges("t", set, v6)
            .unwrap()
            .into_iter()
            .map(|(n, exp)| {
                let s = if n.prefix_len() == n.max_prefix_len() {
                    n.addr().to_string()
                } else {
                    n.to_string()
                };
                let t = want_timeouts.iter().find(|(w, _)| *w == s).map(|&(_, t)| t);
                match (exp, t) {
                    (Some(left), Some(t)) => assert!(plausible(left, t), "{s}: {left:?} of {t}s"),
                    (None, None) => {}
                    (e, t) => panic!("{s}: expiry {e:?}, wanted a timeout of {t:?}s"),
                }
                (s, t)
            })
            .collect();
        out.sort();
        out
    }

    fn listed(nl: &mut Netlink, set: &str, kt: KeyType) -> HashMap<SetKey, Option<Duration>> {
        nl.list("t", set, kt).unwrap().into_iter().collect()
    }

    /// Remaining time of `key`, asserting it has one.
    fn remaining(nl: &mut Netlink, set: &str, key: SetKey) -> Duration {
        let m = listed(nl, set, key.key_type());
        m.get(&key)
            .copied()
            .unwrap_or_else(|| panic!("{key:?} not in {set}: {m:?}"))
            .unwrap_or_else(|| panic!("{key:?} has no timeout"))
    }

    fn plausible(d: Duration, max_secs: u64) -> bool {
        d <= Duration::from_secs(max_secs) && d > Duration::from_secs(max_secs.saturating_sub(5))
    }

    // === kernel-free ===

    #[test]
    fn keys_round_trip() {
        let keys = [
            SetKey::V4(v4("10.1.2.3")),
            SetKey::V6(v6("2001:db8::7")),
            SetKey::V4Pair {
                client: v4("192.168.1.9"),
                dst: v4("203.0.113.5"),
            },
            SetKey::V6Pair {
                client: v6("fd00::9"),
                dst: v6("2001:db8::5"),
            },
        ];
        for k in keys {
            let (b, len) = k.encode();
            assert_eq!(len, k.key_type().key_len());
            assert_eq!(k.key_type().decode(&b[..len]), Some(k));
            assert_eq!(k.key_type().decode(&b[..len - 1]), None);
        }
        let (b, _) = keys[2].encode();
        assert_eq!(
            &b[..8],
            &[192, 168, 1, 9, 203, 0, 113, 5],
            "client first, then dst"
        );
    }

    #[test]
    fn plan_packs_interleaved_delete_add_into_two_messages() {
        let mut ops = Vec::new();
        for i in 0..100u8 {
            let k = SetKey::V4(Ipv4Addr::new(10, 0, 0, i));
            ops.push(del("a4", k));
            ops.push(add("a4", k, Some(60)));
        }
        let g = plan(&ops);
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].kind, g[0].ops.len()), (Kind::Delete, 100));
        assert_eq!((g[1].kind, g[1].ops.len()), (Kind::Add, 100));
    }

    #[test]
    fn plan_keeps_order_of_ops_on_one_element() {
        let k = SetKey::V4(v4("10.0.0.1"));
        let other = SetKey::V4(v4("10.0.0.2"));
        let ops = [
            add("a4", k, None),
            del("a4", k),
            add("a4", k, Some(1)),
            add("a4", other, None),
            add("a6", SetKey::V6(v6("::1")), None),
        ];
        let g = plan(&ops);
        let shape: Vec<_> = g.iter().map(|g| (g.set, g.kind, g.ops.clone())).collect();
        assert_eq!(
            shape,
            vec![
                ("a4", Kind::Add, vec![0]),
                ("a4", Kind::Delete, vec![1]),
                ("a4", Kind::Add, vec![2, 3]),
                ("a6", Kind::Add, vec![4]),
            ]
        );
    }

    #[test]
    fn plan_splits_element_lists_at_64k() {
        let ops: Vec<_> = (0..10_000u32)
            .map(|i| {
                let dst = Ipv6Addr::from(u128::from(i));
                add("c6", SetKey::V6Pair { client: dst, dst }, Some(60))
            })
            .collect();
        let g = plan(&ops);
        assert!(g.len() > 1);
        assert!(g.iter().all(|g| g.nest_len <= NEST_MAX));
        assert_eq!(g.iter().map(|g| g.ops.len()).sum::<usize>(), ops.len());
    }

    #[test]
    fn names_and_timeouts_are_checked() {
        assert!(check_name("guard").is_ok());
        assert!(matches!(check_name(""), Err(SysError::InvalidName { .. })));
        assert!(matches!(
            check_name("a\0b"),
            Err(SysError::InvalidName { .. })
        ));
        assert!(matches!(
            check_name(&"x".repeat(256)),
            Err(SysError::InvalidName { .. })
        ));
        assert_eq!(timeout_ms(Duration::ZERO), 1);
        assert_eq!(timeout_ms(Duration::from_micros(1500)), 2);
        assert_eq!(timeout_ms(Duration::from_secs(60)), 60_000);
        assert_eq!(timeout_ms(Duration::MAX), u64::MAX);
    }

    #[test]
    fn rejected_names_ops_and_errno() {
        let e = SysError::Rejected {
            failures: vec![(1, libc::ENOENT)],
        };
        let s = e.to_string();
        assert!(s.contains("op 1") && s.contains("No such file"), "{s}");
    }

    #[test]
    fn parsers_survive_garbage() {
        let mut buf = AlignedBuf::new(4096);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..2000 {
            for b in buf.bytes_mut().iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let len = (x as usize) % 4096;
            let bytes = buf.bytes_mut();
            if round % 2 == 0 {
                // Plausible header lengths reach the attribute walkers more often.
                bytes[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
            }
            let mut out = Vec::new();
            for msg in Msgs(&buf.bytes()[..len]) {
                let _ = decode_elems(&msg, KeyType::V6Pair, &mut out);
                let _ = decode_flow(&msg);
                let _ = msg.errno();
            }
        }
    }

    #[test]
    fn range_elems_put_timeout_on_start_and_omit_end_at_the_top() {
        let t = Some(Duration::from_secs(60));
        let [s, e] = range_elems(&net("203.0.113.0/24"), t);
        let (s, e) = (s.unwrap(), e.unwrap());
        assert_eq!(
            (&s.key[..4], s.len, s.flags, s.timeout, s.open),
            (&[203, 0, 113, 0][..], 4, 0, t, false)
        );
        assert_eq!(
            (&e.key[..4], e.flags, e.timeout, e.open),
            (
                &[203, 0, 114, 0][..],
                NFT_SET_ELEM_INTERVAL_END,
                None,
                false
            )
        );
        // Host bits are ignored; a /32 is one address wide.
        let [s, e] = range_elems(&net("10.0.0.1/32"), None);
        assert_eq!(&s.unwrap().key[..4], &[10, 0, 0, 1]);
        assert_eq!(&e.unwrap().key[..4], &[10, 0, 0, 2]);
        let [s, _] = range_elems(&net("10.9.9.9/8"), None);
        assert_eq!(&s.unwrap().key[..4], &[10, 0, 0, 0]);
        for top in ["255.255.255.0/24", "0.0.0.0/0", "ffff::/16", "::/0"] {
            let [s, e] = range_elems(&net(top), t);
            let s = s.unwrap();
            assert!(e.is_none(), "{top}: no end element past the top");
            assert!(s.open && s.timeout == t, "{top}");
        }
        let [s, e] = range_elems(&net("2001:db8::/32"), None);
        assert_eq!(s.unwrap().len, 16);
        assert_eq!(
            Ipv6Addr::from(<[u8; 16]>::try_from(&e.unwrap().key[..16]).unwrap()),
            v6("2001:db9::")
        );
    }

    /// Elements of an element list, each NFTA_LIST_ELEM's payload (nft numbers the nests
    /// 1, 2, ... where we use NFTA_LIST_ELEM throughout; the kernel ignores the number).
    fn list_elems(nest: &[u8]) -> Vec<Vec<u8>> {
        let mut buf = AlignedBuf::new(nest.len());
        buf.bytes_mut()[..nest.len()].copy_from_slice(nest);
        Attrs(&buf.bytes()[..nest.len()])
            .map(|a| a.payload.to_vec())
            .collect()
    }

    #[test]
    fn range_encoding_matches_nft_1_0_6() {
        // Element lists of `nft add element inet t m4 { ... }` etc., from strace of nft 1.0.6
        // against a set that already held elements.
        let cases: [(ElemOp, &[u8]); 4] = [
            (
                add_range("m4", "198.51.100.0/24", None),
                b"\x10\x00\x01\x80\x0c\x00\x01\x80\x08\x00\x01\x00\xc6\x33\x64\x00\x18\x00\x02\x80\x08\x00\x03\x00\x00\x00\x00\x01\x0c\x00\x01\x80\x08\x00\x01\x00\xc6\x33\x65\x00",
            ),
            (
                add_range("m4", "203.0.113.0/24", Some(60)),
                b"\x1c\x00\x02\x80\x0c\x00\x04\x00\x00\x00\x00\x00\x00\x00\xea\x60\x0c\x00\x01\x80\x08\x00\x01\x00\xcb\x00\x71\x00\x18\x00\x03\x80\x08\x00\x03\x00\x00\x00\x00\x01\x0c\x00\x01\x80\x08\x00\x01\x00\xcb\x00\x72\x00",
            ),
            (
                add_range("m4", "255.255.255.0/24", Some(60)),
                b"\x28\x00\x01\x80\x0c\x00\x04\x00\x00\x00\x00\x00\x00\x00\xea\x60\x0c\x00\x01\x80\x08\x00\x01\x00\xff\xff\xff\x00\x0a\x00\x06\x00\x01\x04\x01\x00\x00\x00\x00\x00",
            ),
            (
                add_range("m6", "ffff::/16", Some(30)),
                b"\x34\x00\x02\x80\x0c\x00\x04\x00\x00\x00\x00\x00\x00\x00\x75\x30\x18\x00\x01\x80\x14\x00\x01\x00\xff\xff\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x0a\x00\x06\x00\x01\x04\x01\x00\x00\x00\x00\x00",
            ),
        ];
        let table = check_name("t").unwrap();
        for (op, nft) in cases {
            let ops = [op];
            let groups = plan(&ops);
            assert_eq!(groups.len(), 1);
            let set = check_name(groups[0].set).unwrap();
            let mut elem = NftnlElem::new().unwrap();
            let mut buf = AlignedBuf::new(4096);
            let mut w = Writer {
                buf: buf.bytes_mut(),
                off: 0,
                elem: &mut elem,
            };
            w.set_elem_msg(1, &table, &set, &groups[0], &ops, DeleteMode::Strict)
                .unwrap();
            let len = w.off;
            assert_eq!(
                len,
                msg_overhead("t", groups[0].set) + groups[0].nest_len,
                "size plan"
            );
            let msg = Msgs(&buf.bytes()[..len]).next().unwrap();
            let nest = msg
                .nfnl_attrs()
                .find(|a| a.ty == NFTA_SET_ELEM_LIST_ELEMENTS)
                .unwrap();
            assert_eq!(list_elems(nest.payload), list_elems(nft), "{:?}", ops[0]);
        }
    }

    #[test]
    fn split_cidrs_covers_ranges_exactly() {
        assert_eq!(split_cidrs(0, u128::MAX, 128), vec![(0, 0)]);
        assert_eq!(split_cidrs(0, u128::from(u32::MAX), 32), vec![(0, 0)]);
        assert_eq!(split_cidrs(5, 5, 32), vec![(5, 32)]);
        // 10.0.0.1-10.0.0.6
        assert_eq!(
            split_cidrs(0x0a00_0001, 0x0a00_0006, 32),
            vec![
                (0x0a00_0001, 32),
                (0x0a00_0002, 31),
                (0x0a00_0004, 31),
                (0x0a00_0006, 32)
            ]
        );
        let top = u128::MAX - 0xffff;
        assert_eq!(split_cidrs(top, u128::MAX, 128), vec![(top, 112)]);
        assert_eq!(split_cidrs(1, u128::MAX, 128).len(), 128);
    }

    #[test]
    fn bounds_pair_like_the_kernel_lookup() {
        let b = |addr: u128, end: bool| Bound {
            addr,
            end,
            expires: None,
        };
        let got = bounds_to_cidrs(
            &[
                b(0, true),            // nft's leading end element
                b(0x0a00_0000, false), // 10.0.0.0/24
                b(0x0a00_0100, true),
                b(0x0a00_0100, false), // adjacent 10.0.1.0/24
                b(0x0a00_0200, true),
                b(0x0b00_0000, true),  // stray end (its start expired)
                b(0xffff_ff00, false), // open top range
            ],
            false,
        );
        let got: Vec<String> = got.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(got, ["10.0.0.0/24", "10.0.1.0/24", "255.255.255.0/24"]);
    }

    #[test]
    fn plan_gives_each_range_op_its_own_ordered_message() {
        let k = SetKey::V4(v4("10.0.0.1"));
        let ops = [
            add("m4", k, None),
            del_range("m4", "10.0.0.0/24"),
            add_range("m4", "10.0.0.0/16", Some(60)),
            add("m4", SetKey::V4(v4("10.1.0.1")), None),
            add("a4", k, None),
            add_range("m6", "2001:db8::/32", None),
            add("a4", SetKey::V4(v4("10.0.0.2")), None),
        ];
        let g = plan(&ops);
        let shape: Vec<_> = g.iter().map(|g| (g.set, g.kind, g.ops.clone())).collect();
        assert_eq!(
            shape,
            vec![
                ("m4", Kind::Add, vec![0]),
                ("m4", Kind::Delete, vec![1]),
                ("m4", Kind::Add, vec![2]),
                // Not packed into message 0: that would move it before the range ops.
                ("m4", Kind::Add, vec![3]),
                ("a4", Kind::Add, vec![4, 6]),
                ("m6", Kind::Add, vec![5]),
            ]
        );
        for (grp, op) in g.iter().zip([&ops[0], &ops[1], &ops[2]]) {
            assert_eq!(grp.nest_len, NLA_HDRLEN + op_len(op));
        }
    }

    // === real kernel, throwaway netns ===

    #[test]
    fn add_and_list_every_key_type() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            nl.commit("t", &[]).unwrap();
            let k4 = SetKey::V4(v4("10.0.0.1"));
            let k4_forever = SetKey::V4(v4("10.0.0.2"));
            let k6 = SetKey::V6(v6("2001:db8::1"));
            let p4 = SetKey::V4Pair {
                client: v4("192.168.1.10"),
                dst: v4("198.51.100.7"),
            };
            let p6 = SetKey::V6Pair {
                client: v6("fd00::10"),
                dst: v6("2001:db8::7"),
            };
            nl.commit(
                "t",
                &[
                    add("a4", k4, Some(60)),
                    add("a4", k4_forever, None),
                    add("a6", k6, Some(120)),
                    add("c4", p4, Some(60)),
                    add("c6", p6, Some(3600)),
                ],
            )
            .unwrap();

            let a4 = listed(&mut nl, "a4", KeyType::V4);
            assert_eq!(a4.len(), 2, "{a4:?}");
            assert!(plausible(a4[&k4].unwrap(), 60), "{a4:?}");
            assert_eq!(a4[&k4_forever], None, "element without timeout");
            assert!(plausible(remaining(&mut nl, "a6", k6), 120));
            assert!(plausible(remaining(&mut nl, "c4", p4), 60));
            assert!(plausible(remaining(&mut nl, "c6", p6), 3600));
            assert_eq!(nl.list("t", "c6", KeyType::V6Pair).unwrap().len(), 1);

            // Independent check through nft's own JSON.
            let elems = nft_elems("a4");
            let timed = elems
                .iter()
                .find(|e| e["elem"]["val"] == "10.0.0.1")
                .unwrap_or_else(|| panic!("10.0.0.1 missing from nft: {elems:?}"));
            assert_eq!(timed["elem"]["timeout"], 60);
            assert!(timed["elem"]["expires"].as_u64().unwrap() <= 60);
            assert!(elems.iter().any(|e| e == "10.0.0.2"), "{elems:?}");
            let c4 = serde_json::Value::Array(nft_elems("c4")).to_string();
            assert!(c4.contains(r#"["192.168.1.10","198.51.100.7"]"#), "{c4}");
            let c6 = serde_json::Value::Array(nft_elems("c6")).to_string();
            assert!(c6.contains(r#"["fd00::10","2001:db8::7"]"#), "{c6}");

            // Decoding with the wrong layout is an error, not garbage.
            let err = nl.list("t", "a4", KeyType::V6).unwrap_err();
            assert!(matches!(err, SysError::Decode { .. }), "{err}");
            assert!(err.to_string().contains("inet t a4"), "{err}");
            // And the socket is still in step afterwards.
            assert_eq!(nl.list("t", "a4", KeyType::V4).unwrap().len(), 2);
        });
    }

    #[test]
    fn delete_removes_and_delete_add_extends() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            let k = SetKey::V4(v4("10.0.0.1"));
            nl.commit("t", &[add("a4", k, Some(10))]).unwrap();
            assert!(remaining(&mut nl, "a4", k) <= Duration::from_secs(10));

            nl.commit("t", &[del("a4", k), add("a4", k, Some(100))])
                .unwrap();
            assert!(plausible(remaining(&mut nl, "a4", k), 100));

            nl.commit("t", &[del("a4", k)]).unwrap();
            assert!(nl.list("t", "a4", KeyType::V4).unwrap().is_empty());
            assert!(nft_elems("a4").is_empty());
        });
    }

    /// Adds `k` to a4 with a 10 s timeout, re-adds it with 100 s (no EXCL), and returns the
    /// time it has left: about 100 s where the kernel updates elements on re-add, at most 10 s
    /// where it keeps them.
    fn readd_10s_then_100s(nl: &mut Netlink, k: SetKey) -> Duration {
        nl.commit("t", &[add("a4", k, Some(10))]).unwrap();
        nl.commit("t", &[add("a4", k, Some(100))]).unwrap();
        remaining(nl, "a4", k)
    }

    #[test]
    fn readd_without_excl_is_accepted() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            let k = SetKey::V4(v4("10.0.0.1"));
            let left = readd_10s_then_100s(&mut nl, k);
            // Kernels with element timeout update (6.10+?) re-arm; older ones keep 10 s.
            println!("re-add 10s -> 100s without EXCL: remaining {left:?}");
            assert!(left <= Duration::from_secs(100));
            // Shortening is reported too, for the caller's benefit.
            nl.commit("t", &[add("a4", k, Some(5))]).unwrap();
            println!(
                "re-add 100s -> 5s without EXCL: remaining {:?}",
                remaining(&mut nl, "a4", k)
            );
        });
    }

    /// On a kernel whose re-add updates an element's timeout, a re-add with the same timeout
    /// restarts the countdown too: fwd sends the expiration with the timeout. (With the timeout
    /// alone, the kernel updates only a timeout that differs: a renewal by the same
    /// `renew_ttl` left the old expiry, and the grant ended while fwd counted it renewed.)
    #[test]
    fn readd_with_the_same_timeout_restarts_the_countdown() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            if readd_10s_then_100s(&mut nl, SetKey::V4(v4("10.0.0.9"))) <= Duration::from_secs(10) {
                println!("this kernel keeps the timeout on re-add: fwd extends by delete+add");
                return;
            }
            let k = SetKey::V4(v4("10.0.0.1"));
            nl.commit("t", &[add("a4", k, Some(4))]).unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while remaining(&mut nl, "a4", k) > Duration::from_millis(2500) {
                assert!(
                    Instant::now() < deadline,
                    "the element's timeout does not run"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            nl.commit("t", &[add("a4", k, Some(4))]).unwrap();
            let left = remaining(&mut nl, "a4", k);
            assert!(
                left > Duration::from_secs(3),
                "re-add with the same 4 s timeout left {left:?}"
            );
        });
    }

    #[test]
    fn rejected_batch_applies_nothing() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            let x = SetKey::V4(v4("10.0.0.1"));
            let y = SetKey::V4(v4("10.0.0.2"));
            let err = nl
                .commit("t", &[add("a4", x, Some(60)), del("a4", y)])
                .unwrap_err();
            match &err {
                SysError::Rejected { failures } => {
                    assert_eq!(failures, &[(1, libc::ENOENT)], "{err}")
                }
                _ => panic!("expected Rejected, got {err}"),
            }
            assert!(nl.list("t", "a4", KeyType::V4).unwrap().is_empty());

            // A multi-element message reports every op it carried.
            let z = SetKey::V4(v4("10.0.0.3"));
            nl.commit("t", &[add("a4", z, None)]).unwrap();
            let err = nl
                .commit("t", &[add("a4", x, Some(60)), del("a4", z), del("a4", y)])
                .unwrap_err();
            match &err {
                SysError::Rejected { failures } => {
                    assert_eq!(failures, &[(1, libc::ENOENT), (2, libc::ENOENT)], "{err}")
                }
                _ => panic!("expected Rejected, got {err}"),
            }
            let left = listed(&mut nl, "a4", KeyType::V4);
            assert_eq!(left.keys().collect::<Vec<_>>(), vec![&z], "nothing applied");

            // The socket stays usable after a rejection.
            nl.commit("t", &[add("a4", x, Some(60))]).unwrap();
            assert_eq!(nl.list("t", "a4", KeyType::V4).unwrap().len(), 2);
        });
    }

    #[test]
    fn delete_if_present_skips_missing_elements() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            nl.set_delete_mode(DeleteMode::IfPresent);
            let x = SetKey::V4(v4("10.0.0.1"));
            let y = SetKey::V4(v4("10.0.0.2"));
            let z = SetKey::V4(v4("10.0.0.3"));
            nl.commit("t", &[add("a4", z, None)]).unwrap();
            // z present, y missing: both deletes share one message; z goes, y is skipped.
            nl.commit("t", &[add("a4", x, Some(60)), del("a4", z), del("a4", y)])
                .unwrap();
            let left = listed(&mut nl, "a4", KeyType::V4);
            assert_eq!(left.keys().collect::<Vec<_>>(), vec![&x]);
            // Delete+Add still re-arms, and works for a missing key too.
            nl.commit(
                "t",
                &[
                    del("a4", x),
                    add("a4", x, Some(100)),
                    del("a4", y),
                    add("a4", y, Some(100)),
                ],
            )
            .unwrap();
            assert!(plausible(remaining(&mut nl, "a4", x), 100));
            assert!(plausible(remaining(&mut nl, "a4", y), 100));
            // Other errors still reject the batch.
            let err = nl.commit("t", &[del("a4", x), del("nope", x)]).unwrap_err();
            assert!(
                matches!(err, SysError::Rejected { ref failures } if failures == &[(1, libc::ENOENT)]),
                "{err}"
            );
            assert!(
                listed(&mut nl, "a4", KeyType::V4).contains_key(&x),
                "nothing applied"
            );
        });
    }

    #[test]
    fn missing_set_and_table_carry_context() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            let k = SetKey::V4(v4("10.0.0.1"));
            let err = nl
                .commit("t", &[add("nope", k, None), add("a4", k, None)])
                .unwrap_err();
            match &err {
                SysError::Rejected { failures } => {
                    assert_eq!(failures, &[(0, libc::ENOENT)], "{err}")
                }
                _ => panic!("expected Rejected, got {err}"),
            }
            let err = nl.list("t", "nope", KeyType::V4).unwrap_err();
            assert!(matches!(err, SysError::Dump { .. }), "{err}");
            assert!(err.to_string().contains("inet t nope"), "{err}");
            let err = nl.list("missing", "a4", KeyType::V4).unwrap_err();
            assert!(err.to_string().contains("inet missing a4"), "{err}");
            assert!(nl.list("t", "a4", KeyType::V4).unwrap().is_empty());
        });
    }

    #[test]
    fn hundred_thousand_element_batch() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            let n = 100_000u32;
            let mut ops = Vec::with_capacity(2 * n as usize);
            for i in 0..n {
                ops.push(add(
                    "a4",
                    SetKey::V4(Ipv4Addr::from(0x0a00_0000 + i)),
                    Some(600),
                ));
            }
            for i in 0..n {
                let a = Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(i));
                let b = Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i));
                ops.push(add("c6", SetKey::V6Pair { client: a, dst: b }, Some(600)));
            }
            let t = Instant::now();
            let committed = t;
            nl.commit("t", &ops).unwrap();
            println!("commit of {} ops: {:?}", ops.len(), t.elapsed());

            let t = Instant::now();
            let a4 = nl.list("t", "a4", KeyType::V4).unwrap();
            let c6 = nl.list("t", "c6", KeyType::V6Pair).unwrap();
            println!("list of 2 x {n}: {:?}", t.elapsed());
            let want: HashSet<SetKey> = ops
                .iter()
                .filter_map(|op| match op {
                    ElemOp::Add { key, .. } => Some(*key),
                    _ => None,
                })
                .collect();
            let got: HashSet<SetKey> = a4.iter().chain(&c6).map(|(k, _)| *k).collect();
            assert_eq!(a4.len(), n as usize);
            assert_eq!(c6.len(), n as usize);
            assert!(got == want, "listed keys differ from committed ones");
            // Timeouts run from the commit; on a loaded machine committing and listing 200k
            // elements in a debug build can take longer than `plausible`'s 5 s slack.
            let slack = committed.elapsed() + Duration::from_secs(1);
            assert!(
                a4.iter().chain(&c6).all(|(_, t)| t.is_some_and(
                    |t| t <= Duration::from_secs(600) && t + slack >= Duration::from_secs(600)
                )),
                "a timeout outside (600 s - {slack:?}, 600 s]"
            );
        });
    }

    #[test]
    fn timeouts_expire() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            let k = SetKey::V4(v4("10.0.0.1"));
            let keep = SetKey::V4(v4("10.0.0.2"));
            nl.commit("t", &[add("a4", k, Some(1)), add("a4", keep, Some(60))])
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let now = listed(&mut nl, "a4", KeyType::V4);
                assert!(now.contains_key(&keep));
                if !now.contains_key(&k) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "1 s element still listed after 10 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    }

    #[test]
    fn delete_of_expired_element() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            let k = SetKey::V4(v4("10.0.0.1"));
            nl.commit("t", &[add("a4", k, Some(1))]).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while listed(&mut nl, "a4", KeyType::V4).contains_key(&k) {
                assert!(Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(20));
            }
            // Expired (no longer dumped) but most likely not yet garbage-collected.
            let res = nl.commit("t", &[del("a4", k)]);
            println!("delete of expired, uncollected element: {res:?}");
            match res {
                Ok(()) => {}
                Err(SysError::Rejected { failures }) => {
                    assert_eq!(failures, vec![(0, libc::ENOENT)])
                }
                Err(e) => panic!("{e}"),
            }
            nl.set_delete_mode(DeleteMode::IfPresent);
            nl.commit("t", &[del("a4", k)]).unwrap();
            nl.set_delete_mode(DeleteMode::Strict);
            // Re-adding an expired key must work either way.
            nl.commit("t", &[add("a4", k, Some(60))]).unwrap();
            assert!(plausible(remaining(&mut nl, "a4", k), 60));
        });
    }

    #[test]
    fn conntrack_flows_sees_loopback_connections() {
        in_netns(|| {
            let st = Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .unwrap();
            assert!(st.success());
            nft_script(
                "table inet conntrack {\n chain o {\n type filter hook output priority 0; ct state new accept;\n }\n}",
            );
            let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
            let l6 = TcpListener::bind("[::1]:0").unwrap();
            let mut conns = Vec::new();
            for _ in 0..3 {
                conns.push(TcpStream::connect(l4.local_addr().unwrap()).unwrap());
                conns.push(l4.accept().unwrap().0);
            }
            conns.push(TcpStream::connect(l6.local_addr().unwrap()).unwrap());
            conns.push(l6.accept().unwrap().0);

            let lo4 = IpAddr::from(Ipv4Addr::LOCALHOST);
            let lo6 = IpAddr::from(Ipv6Addr::LOCALHOST);
            let flows = conntrack_flows(1000).unwrap();
            assert!(flows.contains(&(lo4, lo4)), "{flows:?}");
            assert!(flows.contains(&(lo6, lo6)), "{flows:?}");
            assert!(flows.len() >= 4, "{flows:?}");
            assert_eq!(conntrack_flows(2).unwrap().len(), 2);
            assert!(conntrack_flows(0).unwrap().is_empty());
        });
    }

    #[test]
    fn counters_read_names_and_values() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            let zero = |name: &str| Counter {
                name: name.into(),
                packets: 0,
                bytes: 0,
            };
            assert_eq!(
                nl.counters("t").unwrap(),
                vec![zero("hits"), zero("misses")]
            );
            assert!(nl.counters("nope").unwrap().is_empty());

            let st = Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .unwrap();
            assert!(st.success());
            nft_script(
                "table inet t {\n chain o {\n type filter hook output priority 0;\n \
                 ip daddr 127.0.0.1 udp dport 9 counter name hits\n }\n}\n\
                 table inet other {\n counter hits { }\n}",
            );
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.send_to(b"ping", "127.0.0.1:9").unwrap();
            let c = nl.counters("t").unwrap();
            assert_eq!(c.len(), 2, "{c:?}");
            assert_eq!((c[0].name.as_str(), c[0].packets), ("hits", 1), "{c:?}");
            assert_eq!(
                c[0].bytes,
                20 + 8 + 4,
                "IPv4 + UDP headers + payload: {c:?}"
            );
            assert_eq!(c[1], zero("misses"));

            // Cross-check with nft.
            let listed = nft_json(&["list", "counters", "table", "inet", "t"]);
            let nft: Vec<Counter> = listed
                .iter()
                .filter_map(|o| o.get("counter"))
                .map(|c| Counter {
                    name: c["name"].as_str().unwrap().into(),
                    packets: c["packets"].as_u64().unwrap(),
                    bytes: c["bytes"].as_u64().unwrap(),
                })
                .collect();
            assert_eq!(nft, c);
        });
    }

    #[test]
    fn table_exists_chains_and_sets() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            assert!(nl.table_exists("t").unwrap());
            assert!(!nl.table_exists("nope").unwrap());
            assert!(nl.chains("t").unwrap().is_empty());
            let sets = ["a4", "a6", "c4", "c6", "m4", "m6"];
            assert_eq!(nl.sets("t").unwrap(), sets);

            nft_script(
                "table inet t {\n chain input { type filter hook input priority 0; }\n \
                 chain forward { type filter hook forward priority 0; }\n chain helper { }\n}\n\
                 table inet u {\n chain other { }\n set s { type ipv4_addr; }\n}\n\
                 table ip t {\n chain ipchain { }\n set ipset { type ipv4_addr; }\n}",
            );
            assert_eq!(nl.chains("t").unwrap(), ["forward", "helper", "input"]);
            assert_eq!(nl.chains("u").unwrap(), ["other"]);
            assert_eq!(nl.sets("t").unwrap(), sets, "other tables' sets excluded");
            assert_eq!(nl.sets("u").unwrap(), ["s"]);
            assert!(nl.chains("nope").unwrap().is_empty());
            let err = nl.sets("nope").unwrap_err();
            assert!(
                matches!(&err, SysError::Dump { source, .. } if source.raw_os_error() == Some(libc::ENOENT)),
                "{err}"
            );
            assert!(nl.table_exists("u").unwrap());

            // Cross-check with nft.
            let mut nft_chains: Vec<String> = nft_json(&["list", "chains", "inet"])
                .iter()
                .filter_map(|o| o.get("chain"))
                .filter(|c| c["table"] == "t")
                .map(|c| c["name"].as_str().unwrap().to_owned())
                .collect();
            nft_chains.sort();
            assert_eq!(nl.chains("t").unwrap(), nft_chains);
            let inet_tables: Vec<String> = nft_json(&["list", "tables", "inet"])
                .iter()
                .filter_map(|o| o.get("table"))
                .map(|t| t["name"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(inet_tables, ["t", "u"]);

            nft_script("delete table inet t");
            assert!(!nl.table_exists("t").unwrap());
            assert!(nl.chains("t").unwrap().is_empty());
            assert!(nl.counters("t").unwrap().is_empty());
        });
    }

    fn owned(v: &[(&str, Option<u64>)]) -> Vec<(String, Option<u64>)> {
        let mut v: Vec<_> = v.iter().map(|(s, t)| (s.to_string(), *t)).collect();
        v.sort();
        v
    }

    #[test]
    fn ranges_v4_add_list_delete() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            // Into an empty set (nft would add a leading end-at-0 element here).
            nl.commit(
                "t",
                &[
                    add_range("m4", "203.0.113.0/24", Some(60)),
                    add_range("m4", "198.51.100.0/24", None),
                    add_range("m4", "10.0.0.1/32", Some(120)),
                    add_range("m4", "255.255.255.0/24", Some(60)),
                    add_range("m4", "10.0.1.0/24", None),
                    add_range("m4", "10.0.2.0/24", None),
                ],
            )
            .unwrap();
            let timeouts = [
                ("203.0.113.0/24", 60),
                ("10.0.0.1", 120),
                ("255.255.255.0/24", 60),
            ];
            let want = owned(&[
                ("203.0.113.0/24", Some(60)),
                ("198.51.100.0/24", None),
                ("10.0.0.1", Some(120)),
                ("255.255.255.0/24", Some(60)),
                ("10.0.1.0/24", None),
                ("10.0.2.0/24", None),
            ]);
            assert_eq!(our_ranges(&mut nl, "m4", &timeouts), want);
            // nft merges nothing (no auto-merge), so it lists the same CIDRs.
            assert_eq!(nft_ranges("m4"), want);

            // Re-adding an identical range is accepted, like Add.
            nl.commit("t", &[add_range("m4", "198.51.100.0/24", None)])
                .unwrap();

            nl.commit(
                "t",
                &[
                    del_range("m4", "203.0.113.0/24"),
                    del_range("m4", "255.255.255.0/24"),
                    del_range("m4", "10.0.1.0/24"),
                ],
            )
            .unwrap();
            let want = owned(&[
                ("198.51.100.0/24", None),
                ("10.0.0.1", Some(120)),
                ("10.0.2.0/24", None),
            ]);
            assert_eq!(our_ranges(&mut nl, "m4", &timeouts), want);
            assert_eq!(nft_ranges("m4"), want);

            // The top range can come back, and the whole space is one range too.
            nl.commit("t", &[add_range("m4", "255.255.255.0/24", None)])
                .unwrap();
            assert_eq!(nft_ranges("m4").len(), 4);
            nl.commit(
                "t",
                &[
                    del_range("m4", "198.51.100.0/24"),
                    del_range("m4", "10.0.0.1/32"),
                    del_range("m4", "10.0.2.0/24"),
                    del_range("m4", "255.255.255.0/24"),
                ],
            )
            .unwrap();
            assert!(nl.list_ranges("t", "m4", false).unwrap().is_empty());
            assert!(nft_ranges("m4").is_empty());
            nl.commit("t", &[add_range("m4", "0.0.0.0/0", Some(60))])
                .unwrap();
            let want = owned(&[("0.0.0.0/0", Some(60))]);
            assert_eq!(our_ranges(&mut nl, "m4", &[("0.0.0.0/0", 60)]), want);
            assert_eq!(nft_ranges("m4"), want);
            nl.commit("t", &[del_range("m4", "0.0.0.0/0")]).unwrap();
            assert!(nl.list_ranges("t", "m4", false).unwrap().is_empty());
        });
    }

    #[test]
    fn ranges_v6_add_list_delete() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            nl.commit(
                "t",
                &[
                    add_range("m6", "ffff::/16", Some(30)),
                    add_range("m6", "2001:db8::/32", None),
                    add_range("m6", "fd00::1/128", Some(90)),
                    add_range("m6", "fe80::/10", Some(600)),
                ],
            )
            .unwrap();
            let timeouts = [("ffff::/16", 30), ("fd00::1", 90), ("fe80::/10", 600)];
            let want = owned(&[
                ("ffff::/16", Some(30)),
                ("2001:db8::/32", None),
                ("fd00::1", Some(90)),
                ("fe80::/10", Some(600)),
            ]);
            assert_eq!(our_ranges(&mut nl, "m6", &timeouts), want);
            assert_eq!(nft_ranges("m6"), want);
            assert!(
                nl.list_ranges("t", "m4", false).unwrap().is_empty(),
                "other set untouched"
            );

            nl.commit(
                "t",
                &[del_range("m6", "ffff::/16"), del_range("m6", "fd00::1/128")],
            )
            .unwrap();
            let want = owned(&[("2001:db8::/32", None), ("fe80::/10", Some(600))]);
            assert_eq!(our_ranges(&mut nl, "m6", &timeouts), want);
            assert_eq!(nft_ranges("m6"), want);

            nl.commit(
                "t",
                &[
                    del_range("m6", "2001:db8::/32"),
                    del_range("m6", "fe80::/10"),
                ],
            )
            .unwrap();
            nl.commit("t", &[add_range("m6", "::/0", None)]).unwrap();
            let want = owned(&[("::/0", None)]);
            assert_eq!(our_ranges(&mut nl, "m6", &[]), want);
            assert_eq!(nft_ranges("m6"), want);
        });
    }

    #[test]
    fn overlapping_range_is_rejected_by_op_index() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            nl.commit("t", &[add_range("m4", "10.0.0.0/16", None)])
                .unwrap();
            let k = SetKey::V4(v4("192.0.2.1"));
            let k6 = SetKey::V6(v6("2001:db8::1"));
            let ops = [
                add("a4", k, Some(60)),
                add_range("m4", "192.0.2.0/24", Some(60)),
                add_range("m4", "10.0.1.0/24", Some(60)),
                add_range("m6", "2001:db8::/32", None),
                add("a6", k6, Some(60)),
            ];
            let err = nl.commit("t", &ops).unwrap_err();
            match &err {
                SysError::Rejected { failures } => {
                    assert_eq!(failures, &[(2, libc::EEXIST)], "{err}")
                }
                _ => panic!("expected Rejected, got {err}"),
            }
            // Nothing applied.
            assert!(nl.list("t", "a4", KeyType::V4).unwrap().is_empty());
            assert!(nl.list("t", "a6", KeyType::V6).unwrap().is_empty());
            assert!(nl.list_ranges("t", "m6", true).unwrap().is_empty());
            assert_eq!(
                our_ranges(&mut nl, "m4", &[]),
                owned(&[("10.0.0.0/16", None)])
            );

            // A range containing an existing one overlaps too, as does a /0 (the kernel alone
            // would accept a start element without end below an existing range).
            for over in ["10.0.0.0/8", "0.0.0.0/0", "10.0.255.255/32", "10.0.0.0/24"] {
                let err = nl
                    .commit("t", &[add("a4", k, None), add_range("m4", over, None)])
                    .unwrap_err();
                assert!(
                    matches!(&err, SysError::Rejected { failures } if failures == &[(1, libc::EEXIST)]),
                    "{over}: {err}"
                );
            }

            // Deleting an absent range (strict) names that op.
            let err = nl
                .commit("t", &[add("a4", k, None), del_range("m4", "10.0.0.0/24")])
                .unwrap_err();
            assert!(
                matches!(&err, SysError::Rejected { failures } if failures == &[(1, libc::ENOENT)]),
                "{err}"
            );
            // ... and is skipped under IfPresent, in a batch with the rest.
            nl.set_delete_mode(DeleteMode::IfPresent);
            nl.commit(
                "t",
                &[
                    add("a4", k, None),
                    del_range("m4", "172.16.0.0/12"),
                    del_range("m4", "10.0.0.0/16"),
                    add_range("m4", "10.0.0.0/24", Some(60)),
                ],
            )
            .unwrap();
            assert_eq!(
                our_ranges(&mut nl, "m4", &[("10.0.0.0/24", 60)]),
                owned(&[("10.0.0.0/24", Some(60))])
            );
            assert_eq!(nl.list("t", "a4", KeyType::V4).unwrap().len(), 1);
        });
    }

    #[test]
    fn range_check_catches_what_the_kernel_misses() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            let rejected = |r: Result<(), SysError>| match r {
                Err(SysError::Rejected { failures }) => failures,
                other => panic!("expected Rejected, got {other:?}"),
            };
            // Sharing the end element with a contained range: the kernel takes the end for a
            // re-add and would accept the batch.
            nl.commit("t", &[add_range("m4", "10.0.1.0/24", None)])
                .unwrap();
            let f = rejected(nl.commit("t", &[add_range("m4", "10.0.0.0/23", None)]));
            assert_eq!(f, [(0, libc::EEXIST)]);
            // A top range has no end element to collide with what lies above its start.
            nl.commit("t", &[add_range("m6", "ffff:ffff::/32", None)])
                .unwrap();
            let f = rejected(nl.commit("t", &[add_range("m6", "ff00::/8", Some(5))]));
            assert_eq!(f, [(0, libc::EEXIST)]);

            // Deleting start and end elements of two different ranges: the kernel would accept
            // it and leave 10.0.1.0 open to the top.
            nl.commit("t", &[add_range("m4", "10.0.0.0/24", None)])
                .unwrap();
            let f = rejected(nl.commit("t", &[del_range("m4", "10.0.0.0/23")]));
            assert_eq!(f, [(0, libc::ENOENT)]);
            let both = owned(&[("10.0.0.0/24", None), ("10.0.1.0/24", None)]);
            assert_eq!(our_ranges(&mut nl, "m4", &[]), both);

            // Under IfPresent such a delete is left out, and indices still name the right ops,
            // for check failures ...
            nl.set_delete_mode(DeleteMode::IfPresent);
            let k = SetKey::V4(v4("192.0.2.1"));
            let f = rejected(nl.commit(
                "t",
                &[
                    del_range("m4", "10.0.0.0/23"),
                    add("a4", k, None),
                    add_range("m4", "192.0.2.0/24", None),
                    del_range("m4", "172.16.0.0/12"),
                    add_range("m4", "10.0.0.0/25", None),
                ],
            ));
            assert_eq!(f, [(4, libc::EEXIST)]);
            // ... and for kernel rejections of the reduced batch.
            let f = rejected(nl.commit(
                "t",
                &[
                    del_range("m4", "10.0.0.0/23"),
                    add_range("m4", "192.0.2.0/24", None),
                    add("nope", k, None),
                ],
            ));
            assert_eq!(f, [(2, libc::ENOENT)]);
            assert_eq!(our_ranges(&mut nl, "m4", &[]), both, "nothing applied");
            nl.commit("t", &[del_range("m4", "10.0.0.0/23")]).unwrap();
            assert_eq!(our_ranges(&mut nl, "m4", &[]), both);

            // The replay follows the batch order: merging two ranges into one works.
            nl.set_delete_mode(DeleteMode::Strict);
            nl.commit(
                "t",
                &[
                    del_range("m4", "10.0.0.0/24"),
                    del_range("m4", "10.0.1.0/24"),
                    add_range("m4", "10.0.0.0/23", Some(60)),
                ],
            )
            .unwrap();
            let want = owned(&[("10.0.0.0/23", Some(60))]);
            assert_eq!(our_ranges(&mut nl, "m4", &[("10.0.0.0/23", 60)]), want);
            assert_eq!(nft_ranges("m4"), want);
        });
    }

    #[test]
    fn range_replace_in_one_batch() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            nl.commit("t", &[add_range("m4", "10.0.0.0/24", Some(30))])
                .unwrap();
            // Widening: the delete must reach the kernel before the overlapping add.
            nl.commit(
                "t",
                &[
                    del_range("m4", "10.0.0.0/24"),
                    add_range("m4", "10.0.0.0/16", Some(300)),
                ],
            )
            .unwrap();
            assert_eq!(
                our_ranges(&mut nl, "m4", &[("10.0.0.0/16", 300)]),
                owned(&[("10.0.0.0/16", Some(300))])
            );
            // Re-arming the same range.
            nl.commit(
                "t",
                &[
                    del_range("m4", "10.0.0.0/16"),
                    add_range("m4", "10.0.0.0/16", Some(900)),
                ],
            )
            .unwrap();
            assert_eq!(
                our_ranges(&mut nl, "m4", &[("10.0.0.0/16", 900)]),
                owned(&[("10.0.0.0/16", Some(900))])
            );
            assert_eq!(nft_ranges("m4"), owned(&[("10.0.0.0/16", Some(900))]));
        });
    }

    #[test]
    fn range_timeouts_expire() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            nl.commit(
                "t",
                &[
                    add_range("m4", "192.0.2.0/24", Some(1)),
                    add_range("m4", "198.51.100.0/24", Some(60)),
                    add_range("m6", "2001:db8::/32", Some(1)),
                    add_range("m6", "ffff::/16", Some(1)),
                ],
            )
            .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let m4 = nl.list_ranges("t", "m4", false).unwrap();
                let m6 = nl.list_ranges("t", "m6", true).unwrap();
                assert!(m4.iter().any(|(n, _)| *n == net("198.51.100.0/24")));
                if m4.len() == 1 && m6.is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "1 s ranges still listed after 10 s: {m4:?} {m6:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            assert_eq!(nft_ranges("m4"), owned(&[("198.51.100.0/24", Some(60))]));
            assert!(nft_ranges("m6").is_empty());
            // Expired ranges can be added again (their end elements may linger until GC).
            nl.commit(
                "t",
                &[
                    add_range("m4", "192.0.2.0/24", Some(60)),
                    add_range("m6", "2001:db8::/32", None),
                    add_range("m6", "ffff::/16", None),
                ],
            )
            .unwrap();
            assert_eq!(nl.list_ranges("t", "m4", false).unwrap().len(), 2);
            assert_eq!(
                our_ranges(&mut nl, "m6", &[]),
                owned(&[("2001:db8::/32", None), ("ffff::/16", None)])
            );
        });
    }

    #[test]
    fn list_ranges_splits_ranges_added_by_nft() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            nft_script(
                "add element inet t m4 { 10.0.0.1-10.0.0.6, 192.0.2.0/24 timeout 1h, 203.0.113.7 }\n\
                 add element inet t m6 { 2001:db8::1-2001:db8::2, ffff::/16 }",
            );
            let got: Vec<(String, bool)> = nl
                .list_ranges("t", "m4", false)
                .unwrap()
                .into_iter()
                .map(|(n, t)| (n.to_string(), t.is_some()))
                .collect();
            let want = [
                ("10.0.0.1/32", false),
                ("10.0.0.2/31", false),
                ("10.0.0.4/31", false),
                ("10.0.0.6/32", false),
                ("192.0.2.0/24", true),
                ("203.0.113.7/32", false),
            ];
            assert_eq!(got, want.map(|(s, t)| (s.to_owned(), t)));
            let got: Vec<String> = nl
                .list_ranges("t", "m6", true)
                .unwrap()
                .into_iter()
                .map(|(n, _)| n.to_string())
                .collect();
            assert_eq!(got, ["2001:db8::1/128", "2001:db8::2/128", "ffff::/16"]);
            // Ranges nft added can be deleted through netlink.
            nl.commit(
                "t",
                &[
                    del_range("m4", "192.0.2.0/24"),
                    del_range("m6", "ffff::/16"),
                ],
            )
            .unwrap();
            assert!(!nft_ranges("m4").iter().any(|(s, _)| s == "192.0.2.0/24"));
            assert_eq!(
                nft_ranges("m6"),
                owned(&[("2001:db8::1-2001:db8::2", None)])
            );
            // A key type mismatch is a decode error.
            let err = nl.list_ranges("t", "m4", true).unwrap_err();
            assert!(matches!(err, SysError::Decode { .. }), "{err}");
        });
    }

    #[test]
    fn delete_if_present_is_supported_here() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            let probe = SetKey::V4(v4("0.0.0.0"));
            assert!(nl.supports_delete_if_present("t", "a4", probe));
            assert!(!nl.supports_delete_if_present("t", "nope", probe));
            // The delete mode was restored: a strict delete of a missing key still fails.
            let err = nl.commit("t", &[del("a4", probe)]).unwrap_err();
            assert!(matches!(err, SysError::Rejected { .. }), "{err}");
            nl.set_delete_mode(DeleteMode::IfPresent);
            assert!(nl.supports_delete_if_present("t", "a4", probe));
            nl.commit("t", &[del("a4", probe)]).unwrap();
        });
    }

    #[test]
    fn metadata_reads_do_not_scale_with_set_size() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            let n = 100_000u32;
            let ops: Vec<_> = (0..n)
                .flat_map(|i| {
                    let a = Ipv4Addr::from(0x0a00_0000 + i);
                    [
                        add("a4", SetKey::V4(a), Some(600)),
                        add(
                            "c4",
                            SetKey::V4Pair {
                                client: v4("192.168.1.10"),
                                dst: a,
                            },
                            Some(600),
                        ),
                    ]
                })
                .collect();
            nl.commit("t", &ops).unwrap();
            let time = |what: &str, f: &mut dyn FnMut()| {
                f();
                let t = Instant::now();
                for _ in 0..10 {
                    f();
                }
                println!(
                    "{what} with 2 x {n} elements: {:?} per call",
                    t.elapsed() / 10
                );
            };
            time("counters()", &mut || {
                assert_eq!(nl.counters("t").unwrap().len(), 2)
            });
            time("table_exists()", &mut || {
                assert!(nl.table_exists("t").unwrap())
            });
            time("chains()", &mut || {
                assert!(nl.chains("t").unwrap().is_empty())
            });
            time("sets()", &mut || assert_eq!(nl.sets("t").unwrap().len(), 6));
            time("list_ranges()", &mut || {
                assert!(nl.list_ranges("t", "m4", false).unwrap().is_empty())
            });
            let t = Instant::now();
            let st = Command::new("nft")
                .args(["list", "tables"])
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success());
            println!("for comparison, `nft list tables`: {:?}", t.elapsed());
        });
    }

    fn percentile(sorted: &[Duration], p: f64) -> Duration {
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i]
    }

    #[test]
    #[ignore = "benchmark; run with --ignored --nocapture bench"]
    fn bench_commit_latency() {
        in_netns(|| {
            let mut nl = Netlink::open().unwrap();
            // 10,000 commits of ops_of(i), one per call: their latency percentiles.
            let mut measure = |what: &str, ops_of: &dyn Fn(SetKey) -> Vec<ElemOp>| {
                let mut lat = Vec::with_capacity(10_000);
                for i in 0..10_000u32 {
                    let ops = ops_of(SetKey::V4(Ipv4Addr::from(0x0a00_0000 + i)));
                    let t = Instant::now();
                    nl.commit("t", &ops).unwrap();
                    lat.push(t.elapsed());
                }
                lat.sort();
                println!(
                    "netlink {what}, 1 element/call, 10000 calls: p50 {:.1} us, p99 {:.1} us, max {:.1} us",
                    percentile(&lat, 0.50).as_secs_f64() * 1e6,
                    percentile(&lat, 0.99).as_secs_f64() * 1e6,
                    lat.last().unwrap().as_secs_f64() * 1e6,
                );
            };
            measure("commit, 1 new element", &|k| vec![add("a4", k, Some(60))]);
            // Extending those elements: a delete and an add in one batch, or a re-add (kernels
            // whose re-add sets the timeout).
            measure("extend by delete+add", &|k| {
                vec![del("a4", k), add("a4", k, Some(120))]
            });
            measure("extend by re-add", &|k| vec![add("a4", k, Some(120))]);
            let t = Instant::now();
            for i in 0..200u32 {
                let ip = Ipv4Addr::from(0x0b00_0000 + i);
                let st = Command::new("nft")
                    .args(["add", "element", "inet", "t", "a4"])
                    .arg(format!("{{ {ip} timeout 60s }}"))
                    .status()
                    .unwrap();
                assert!(st.success());
            }
            println!(
                "nft exec, 1 element/call, 200 calls: {:.2} ms per call",
                t.elapsed().as_secs_f64() * 1e3 / 200.0
            );
        });
    }

    /// (user, system) CPU time of the calling thread.
    fn thread_cpu() -> (Duration, Duration) {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage fills the rusage we own; RUSAGE_THREAD needs nothing else.
        let ru = unsafe {
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, ru.as_mut_ptr()), 0);
            ru.assume_init()
        };
        let d = |tv: libc::timeval| {
            Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64)
        };
        (d(ru.ru_utime), d(ru.ru_stime))
    }

    #[test]
    #[ignore = "benchmark; run with --ignored --nocapture bench"]
    fn bench_list_sizes() {
        // Sizes via GUARD_BENCH_LIST (comma separated); the kernel's set dump is quadratic, so
        // the default stays modest.
        let sizes: Vec<u32> = std::env::var("GUARD_BENCH_LIST")
            .unwrap_or_else(|_| "100000".into())
            .split(',')
            .map(|s| s.trim().parse().unwrap())
            .collect();
        for n in sizes {
            in_netns(move || {
                let mut nl = Netlink::open().unwrap();
                let mut done = 0u32;
                while done < n {
                    let ops: Vec<_> = (done..n.min(done + 100_000))
                        .map(|i| {
                            add(
                                "a4",
                                SetKey::V4(Ipv4Addr::from(0x0a00_0000 + i)),
                                Some(3600),
                            )
                        })
                        .collect();
                    nl.commit("t", &ops).unwrap();
                    done += ops.len() as u32;
                }
                for pass in ["right after insert", "steady state"] {
                    let (u0, s0) = thread_cpu();
                    let t = Instant::now();
                    let all = nl.list("t", "a4", KeyType::V4).unwrap();
                    let wall = t.elapsed();
                    let (u1, s1) = thread_cpu();
                    assert_eq!(all.len(), n as usize);
                    println!(
                        "list of {n} elements ({pass}): wall {wall:.2?}, user CPU {:.2?}, kernel CPU {:.2?}",
                        u1 - u0,
                        s1 - s0
                    );
                }
            });
        }
    }
}
