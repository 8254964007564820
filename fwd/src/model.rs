//! Typed, validated domain values shared by fwd's engine, store and RPC layers.

use std::net::IpAddr;

use ipnet::IpNet;

/// Where a grant came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// Named by a DNS answer through `Authorize`.
    Dns,
    /// Added by an admin through `Allow`.
    Manual,
}

impl Source {
    /// Stable text form used in SQLite and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Dns => "dns",
            Source::Manual => "manual",
        }
    }

    /// Parses the text form written by [`Source::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "dns" => Some(Source::Dns),
            "manual" => Some(Source::Manual),
            _ => None,
        }
    }
}

/// The identity of one grant: a destination (host address for DNS grants, any CIDR for
/// manual ones) and, in per-client gateway mode, the LAN client it is opened for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantKey {
    /// Destination network; a /32 or /128 for DNS grants.
    pub net: IpNet,
    /// The client the grant is scoped to (per-client gateway mode only).
    pub client: Option<IpAddr>,
}

impl GrantKey {
    /// A host grant, optionally scoped to a client.
    pub fn host(ip: IpAddr, client: Option<IpAddr>) -> Self {
        GrantKey {
            net: IpNet::from(ip),
            client,
        }
    }
}

/// One row of the current-grants table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantRow {
    /// Identity of the grant.
    pub key: GrantKey,
    /// Names whose answers granted it, most recent first, bounded by the store.
    pub names: Vec<String>,
    /// Wall-clock Unix ms of the first grant.
    pub first_ms: u64,
    /// Wall-clock Unix ms of the latest grant or extension.
    pub last_ms: u64,
    /// Wall-clock Unix ms of expiry; `None` never expires (manual only).
    pub expires_ms: Option<u64>,
    /// Who created it.
    pub source: Source,
    /// Admin comment (manual) or empty.
    pub comment: String,
}

/// Kinds of audit events; the store keeps them append-only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A new kernel element was committed.
    Granted,
    /// An existing grant's expiry was pushed later.
    Extended,
    /// Removed by an admin.
    Revoked,
    /// The kernel timed it out (recorded by the sweeper or at start-up).
    Expired,
    /// An admin allowed an address or CIDR.
    ManualAllow,
    /// A request (or one address in it) was refused by validation.
    Rejected,
    /// A caller lacked the role for an RPC.
    Denied,
    /// Renewed because conntrack still showed live flows.
    Renewed,
    /// fwd started and reconciled (reason carries the summary).
    Started,
    /// An existing grant was named by another answer; nothing changed in the kernel.
    Named,
}

impl EventKind {
    /// Stable text form used in SQLite.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Granted => "granted",
            EventKind::Extended => "extended",
            EventKind::Revoked => "revoked",
            EventKind::Expired => "expired",
            EventKind::ManualAllow => "manual_allow",
            EventKind::Rejected => "rejected",
            EventKind::Denied => "denied",
            EventKind::Renewed => "renewed",
            EventKind::Started => "started",
            EventKind::Named => "named",
        }
    }

    /// Parses the text form written by [`EventKind::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "granted" => EventKind::Granted,
            "extended" => EventKind::Extended,
            "revoked" => EventKind::Revoked,
            "expired" => EventKind::Expired,
            "manual_allow" => EventKind::ManualAllow,
            "rejected" => EventKind::Rejected,
            "denied" => EventKind::Denied,
            "renewed" => EventKind::Renewed,
            "started" => EventKind::Started,
            "named" => EventKind::Named,
            _ => return None,
        })
    }
}

/// The caller of an RPC, from SO_PEERCRED.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Caller {
    /// Peer uid; `None` for events fwd raises itself.
    pub uid: Option<u32>,
    /// Peer gid.
    pub gid: Option<u32>,
    /// Peer pid.
    pub pid: Option<i32>,
}

/// One append-only audit record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    /// Row id assigned by the store (0 before insertion).
    pub id: u64,
    /// Wall-clock Unix ms.
    pub at_ms: u64,
    /// What happened.
    pub kind: EventKind,
    /// Destination concerned, if any; the exact text the caller sent for rejected input.
    pub target: Option<String>,
    /// Client scope, if any.
    pub client: Option<IpAddr>,
    /// Query name, if any.
    pub name: Option<String>,
    /// Who asked.
    pub caller: Caller,
    /// Free text: the rejection reason, admin comment, or RPC name.
    pub reason: String,
    /// Expiry after the event, if it has one.
    pub expires_ms: Option<u64>,
}

/// One change to the current-grants table, applied in a transaction with its audit events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Insert or update a grant. On update: `first_ms` and `source` are kept, `last_ms` and
    /// `expires_ms` are replaced, `name` (if any) is pushed to the front of the name list.
    Upsert {
        /// Identity.
        key: GrantKey,
        /// The name that caused this grant, if any.
        name: Option<String>,
        /// Wall-clock Unix ms of this grant.
        at_ms: u64,
        /// New expiry; `None` never expires.
        expires_ms: Option<u64>,
        /// Source, used only when inserting.
        source: Source,
        /// Comment; replaces the stored one when non-empty.
        comment: String,
    },
    /// Delete a grant (revoked or expired).
    Remove {
        /// Identity.
        key: GrantKey,
    },
    /// Remember that `key` was revoked and must be absent from the kernel until `until_ms` (the
    /// revoked grant's own expiry). Written with the Remove, before the kernel delete, so that a
    /// crash in between cannot leave a revoked grant live: restart deletes tombstoned keys.
    /// A later Upsert of the same key clears it.
    Tombstone {
        /// Identity.
        key: GrantKey,
        /// When the kernel element would have expired anyway.
        until_ms: u64,
    },
}

/// Wall-clock now in Unix ms.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
