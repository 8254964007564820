//! The answer cache: TTL-correct positive and negative entries, LRU-bounded, each remembering until when fwd committed its addresses.
//!
//! A cache hit must never hand out an address whose kernel grant is gone (dnsmasq's nftset
//! bug). Every entry therefore carries the wall-clock time until which fwd guaranteed its
//! grants (the minimum `expires_unix_ms` over its addresses), per client scope. The handler
//! re-authorizes before answering when less than the remaining TTL plus a margin is left
//! ([`needs_authorization`]), and never touches fwd otherwise.
//!
//! That knowledge is only as good as fwd's word, and an admin may revoke an address before
//! the grant would have ended. The revocation watch ([`crate::revocations`]) therefore calls
//! [`Cache::revoke`] for every revocation fwd commits, which forgets the grants of every entry
//! naming an address inside the revoked network (the DNS data stays cached). While the watch
//! is down the cache is *untrusted*: hits report no confirmed grant, so every A/AAAA hit goes
//! through fwd again. The recorded grant is still reported as unconfirmed, for the one case
//! where the handler may fall back on it: fwd cannot be reached at all, so nobody can revoke
//! and the kernel element committed earlier is still there (see [`Hit::unconfirmed_grant_until_ms`]).
//! The catch-alls that open every new stream forget all of it. Every invalidation bumps an
//! epoch; a grant learned from an Authorize call that started before the latest invalidation
//! is not recorded, because the revocation may have overtaken that call's reply.

use std::collections::hash_map::RandomState;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use ipnet::IpNet;
use lru::LruCache;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::answer;
use crate::upstream::HEADER_LEN;

/// How many client scopes one entry tracks grants for (per-client gateway mode); beyond that
/// the scope whose grant ends first is forgotten and will simply be re-authorized.
const MAX_GRANT_SCOPES: usize = 64;

/// What identifies a cached answer. Built by [`Key::new`], which hashes it once: the LRU map
/// hashes a key on lookup, on insert and again when it evicts it, and a miss under a full cache
/// does all three (SipHash over the name each time was 3 % of a miss's CPU).
#[derive(Debug, Clone)]
pub struct Key {
    /// The query name (compared and hashed case-insensitively).
    pub name: Name,
    /// The query type.
    pub qtype: RecordType,
    /// The query class.
    pub qclass: DNSClass,
    /// The client's EDNS DO bit: answers with and without DNSSEC records differ.
    pub dnssec_ok: bool,
    /// SipHash of the above under this process's random key (see [`Key::new`]).
    hash: u64,
}

/// The random SipHash key of [`Key`] hashes, drawn once per process: names come from clients,
/// so the hash must not be predictable (hash flooding).
static KEY_HASHER: std::sync::LazyLock<RandomState> = std::sync::LazyLock::new(RandomState::new);

/// A key's content for hashing: the name case-insensitively, as `Name`'s own `Hash` does, laid
/// out as on the wire (length, lowercased label) with the type, class and DO bit after it, and
/// handed to the hasher in one write (SipHash pays per write: a write per label was 6 % of a
/// cache miss's instructions). hickory keeps a name within 255 octets on the wire, so the
/// buffer holds any key; were one longer, its end would be left out of the hash (a collision
/// at worst, never a wrong match: `eq` compares the names).
struct Content<'a>(&'a Key);

impl std::hash::Hash for Content<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let k = self.0;
        let mut buf = [0u8; 272];
        let mut len = 0;
        let mut put = |b: u8| {
            if let Some(slot) = buf.get_mut(len) {
                *slot = b;
                len += 1;
            }
        };
        for label in k.name.iter() {
            put(label.len() as u8);
            for &c in label {
                put(c.to_ascii_lowercase());
            }
        }
        let [t0, t1] = u16::from(k.qtype).to_be_bytes();
        let [c0, c1] = u16::from(k.qclass).to_be_bytes();
        for b in [t0, t1, c0, c1, u8::from(k.dnssec_ok)] {
            put(b);
        }
        state.write(buf.get(..len).unwrap_or_default());
    }
}

/// Equal keys: the same key, or the same hash (which tells almost every other key apart at
/// once), type, class, DO bit and name, letter case aside.
impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        // The LRU map evicts a key by looking up the key it holds: the very same one.
        std::ptr::eq(self, other)
            || self.hash == other.hash
                && self.qtype == other.qtype
                && self.qclass == other.qclass
                && self.dnssec_ok == other.dnssec_ok
                && crate::answer::same_name(&self.name, &other.name)
    }
}

impl Eq for Key {}

impl Key {
    /// The key of a query, hashed once here.
    pub fn new(name: Name, qtype: RecordType, qclass: DNSClass, dnssec_ok: bool) -> Self {
        let mut k = Key {
            name,
            qtype,
            qclass,
            dnssec_ok,
            hash: 0,
        };
        k.hash = std::hash::BuildHasher::hash_one(&*KEY_HASHER, Content(&k));
        k
    }
}

/// Writes the hash [`Key::new`] computed: the LRU map's hasher ([`KeyHash`]) passes it on.
impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The LRU map's hasher: a [`Key`] arrives already hashed with a random key, so its hash is
/// used as is. Anything else written is folded in FNV-style (nothing else is, but a `Hasher`
/// must take any bytes).
#[derive(Debug, Default)]
struct KeyHash(u64);

impl std::hash::Hasher for KeyHash {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The grant state of one entry for one client scope (`None` unless fwd runs per client).
/// The first scope is held inline: without per-client grants there is only ever one, and a
/// cache miss then allocates nothing for it.
#[derive(Debug, Clone, Default)]
struct Grants {
    first: Option<(Option<IpAddr>, u64)>,
    /// Further scopes (per-client grants); only ever filled while `first` is set.
    more: Vec<(Option<IpAddr>, u64)>,
}

impl Grants {
    fn iter(&self) -> impl Iterator<Item = &(Option<IpAddr>, u64)> {
        self.first.iter().chain(&self.more)
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn get(&self, scope: Option<IpAddr>) -> Option<u64> {
        self.iter()
            .find(|(s, _)| *s == scope)
            .map(|(_, until)| *until)
    }

    fn set(&mut self, scope: Option<IpAddr>, until_ms: u64) {
        let Some(first) = &mut self.first else {
            self.first = Some((scope, until_ms));
            return;
        };
        if let Some(slot) = std::iter::once(first)
            .chain(&mut self.more)
            .find(|(s, _)| *s == scope)
        {
            slot.1 = until_ms;
            return;
        }
        if self.len() >= MAX_GRANT_SCOPES {
            // Forget the earliest-ending scope: the first one is replaced in place.
            let earliest = self
                .more
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, until))| *until)
                .map(|(i, (_, until))| (i, *until));
            match (earliest, self.first) {
                (Some((i, until)), Some((_, first_until))) if until < first_until => {
                    self.more.swap_remove(i);
                }
                _ => {
                    self.first = Some((scope, until_ms));
                    return;
                }
            }
        }
        self.more.push((scope, until_ms));
    }

    fn clear(&mut self) {
        self.first = None;
        self.more.clear();
    }
}

/// One cached answer.
#[derive(Debug, Clone)]
struct Entry {
    /// The answer as a message (`None` for one stored straight from the wire).
    msg: Option<Arc<Message>>,
    /// The answer encoded once: stored from the wire, or built from `msg` on the first hit
    /// (`Some(None)`: it cannot be served from the wire).
    wire: Option<Option<Arc<WireAnswer>>>,
    inserted: Instant,
    ttl: u32,
    negative: bool,
    /// Whether serving this entry needs a live grant (it names grantable addresses).
    needs_grant: bool,
    grants: Grants,
    /// The A/AAAA addresses of the answer section, matched against revocations.
    addrs: Vec<IpAddr>,
}

impl Entry {
    /// Whether the answer names an address inside `net` (IPv4-mapped IPv6 addresses are also
    /// checked as the IPv4 address they carry).
    fn names_any_in(&self, net: &IpNet) -> bool {
        self.addrs
            .iter()
            .any(|ip| net.contains(ip) || net.contains(&ip.to_canonical()))
    }
}

/// The A/AAAA addresses in the answer section of `msg`.
fn answer_addrs(msg: &Message) -> Vec<IpAddr> {
    msg.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// A cache hit.
#[derive(Debug, Clone)]
pub struct Hit {
    /// The answer as stored (TTLs not decremented: see [`Hit::msg`]); `None` when it was
    /// stored in wire form only.
    pub stored: Option<Arc<Message>>,
    /// Whole seconds spent in cache.
    pub elapsed: u32,
    /// The stored answer in wire form, when it can be served that way.
    pub wire: Option<Arc<WireAnswer>>,
    /// Seconds of TTL left.
    pub remaining: u32,
    /// Whether the answer names addresses that need a live grant.
    pub needs_grant: bool,
    /// Until when (wall-clock Unix ms) fwd committed this entry's addresses for the scope asked;
    /// always `None` while the cache is untrusted (the revocation watch is down).
    pub grant_until_ms: Option<u64>,
    /// Whether this is a negative (NXDOMAIN/NODATA) entry.
    pub negative: bool,
    /// The grant recorded for the scope asked, even while the cache is untrusted. Only for
    /// serving while fwd is unreachable *and* the revocation watch is down: a dead fwd revokes
    /// nothing, and the kernel element it committed lives until its own timeout.
    pub unconfirmed_grant_until_ms: Option<u64>,
    /// Identifies this entry's generation for [`Cache::record_grant`].
    pub inserted: Instant,
    /// The invalidation epoch at the time of the hit, for [`Cache::record_grant`].
    pub epoch: u64,
}

impl Hit {
    /// The answer to serve, TTLs decremented by the time spent in cache (header ID and flags
    /// are the handler's business). `None` only if a wire-form answer fails to decode, which
    /// the checks it passed before it was stored rule out.
    pub fn msg(&self) -> Option<Message> {
        let mut msg = match (&self.stored, &self.wire) {
            (Some(m), _) => (**m).clone(),
            (None, Some(w)) => w.decode()?,
            (None, None) => return None,
        };
        answer::age_ttls(&mut msg, self.elapsed);
        Some(msg)
    }

    /// The response code of the stored answer.
    pub fn response_code(&self) -> ResponseCode {
        match (&self.stored, &self.wire) {
            (Some(m), _) => m.metadata.response_code,
            (None, Some(w)) => ResponseCode::from(0, w.rcode),
            (None, None) => ResponseCode::ServFail,
        }
    }
}

/// A cached answer encoded once, so that a hit is served by patching bytes rather than by
/// cloning and re-encoding a `Message`: the ID, the flags the client chose, the question in
/// the client's letter case, every record's TTL (at offsets recorded here), and an OPT
/// record of dnsd's own for a client that sent EDNS. The stored form never carries an OPT
/// record, so nothing of the upstream's EDNS (padding included) reaches the client.
#[derive(Debug)]
pub struct WireAnswer {
    /// Header (ID 0, flags to be set), question, records.
    bytes: Vec<u8>,
    /// Length of the question (name, type, class) after the header.
    question_len: usize,
    /// Where each record's TTL starts.
    ttl_offsets: Vec<usize>,
    /// The response code (only those that fit the header's four bits are stored this way).
    rcode: u8,
    /// The upstream's AD bit.
    authentic_data: bool,
}

/// How a client asked, for [`WireAnswer::render`].
#[derive(Debug, Clone, Copy)]
pub struct Asked<'a> {
    /// The client's ID.
    pub id: u16,
    /// RD as the client set it.
    pub rd: bool,
    /// CD as the client set it.
    pub cd: bool,
    /// The client's question (uncompressed name, type, class) as it is on the wire.
    pub question: &'a [u8],
    /// `Some((payload size dnsd advertises, DO))` when the client sent EDNS.
    pub edns: Option<(u16, bool)>,
}

impl WireAnswer {
    /// A NOERROR answer shaped on the wire ([`crate::wire`]): `bytes` holds the header (ID 0,
    /// flags to be set), the question of `question_len` octets and the records, whose TTLs
    /// lie at `ttl_offsets`; no OPT record.
    pub(crate) fn from_parts(
        bytes: Vec<u8>,
        question_len: usize,
        ttl_offsets: Vec<usize>,
        authentic_data: bool,
    ) -> WireAnswer {
        WireAnswer {
            bytes,
            question_len,
            ttl_offsets,
            rcode: 0,
            authentic_data,
        }
    }

    /// The response code.
    pub fn response_code(&self) -> ResponseCode {
        ResponseCode::from(0, self.rcode)
    }

    /// The stored answer as a message, for the paths that edit it.
    pub(crate) fn decode(&self) -> Option<Message> {
        let mut msg = Message::from_vec(&self.bytes).ok()?;
        msg.metadata.authentic_data = self.authentic_data;
        Some(msg)
    }

    /// Encodes `msg` as the handler's `finalize` would for a client without EDNS, and
    /// records where its TTLs are. `None` when the answer cannot be served from the wire.
    fn build(msg: &Message) -> Option<WireAnswer> {
        let rcode = u16::from(msg.metadata.response_code);
        if rcode > 0x0f || msg.queries.len() != 1 {
            return None;
        }
        let mut m = msg.clone();
        m.metadata.id = 0;
        m.metadata.message_type = MessageType::Response;
        m.metadata.op_code = OpCode::Query;
        m.metadata.authoritative = false;
        m.metadata.truncation = false;
        m.metadata.recursion_desired = false;
        m.metadata.recursion_available = false;
        m.metadata.checking_disabled = false;
        m.metadata.authentic_data = false;
        m.edns = None;
        m.signature = None;
        let bytes = m.to_vec().ok()?;
        let (question_len, ttl_offsets) = crate::upstream::ttl_offsets(&bytes)?;
        Some(WireAnswer {
            bytes,
            question_len,
            ttl_offsets,
            rcode: u8::try_from(rcode).ok()?,
            authentic_data: msg.metadata.authentic_data,
        })
    }

    /// The answer for one client, TTLs decremented by `elapsed`; `None` when the client's
    /// question is not this answer's (it always is for a cache key's entry, but the bytes
    /// are checked rather than trusted) or the result would exceed `limit` (the caller then
    /// truncates the long way).
    pub fn render(&self, asked: &Asked<'_>, elapsed: u32, limit: usize) -> Option<Vec<u8>> {
        let qend = HEADER_LEN + self.question_len;
        let stored_q = self.bytes.get(HEADER_LEN..qend)?;
        if !stored_q.eq_ignore_ascii_case(asked.question) {
            return None;
        }
        let opt_len = if asked.edns.is_some() { OPT_LEN } else { 0 };
        if self.bytes.len() + opt_len > limit {
            return None;
        }
        let mut out = Vec::with_capacity(self.bytes.len() + opt_len);
        out.extend_from_slice(&self.bytes);
        out[0..2].copy_from_slice(&asked.id.to_be_bytes());
        // QR, opcode QUERY, RD as asked; RA, AD only for a DO client, CD as asked.
        out[2] = 0x80 | u8::from(asked.rd);
        let dnssec_ok = asked.edns.is_some_and(|(_, d)| d);
        out[3] =
            0x80 | if self.authentic_data && dnssec_ok {
                0x20
            } else {
                0
            } | if asked.cd { 0x10 } else { 0 }
                | self.rcode;
        out[HEADER_LEN..qend].copy_from_slice(asked.question);
        for &at in &self.ttl_offsets {
            let field = out.get_mut(at..at + 4)?;
            let ttl = u32::from_be_bytes([field[0], field[1], field[2], field[3]]);
            field.copy_from_slice(&ttl.saturating_sub(elapsed).to_be_bytes());
        }
        if let Some((payload, dnssec_ok)) = asked.edns {
            let arcount = u16::from_be_bytes([out[10], out[11]]).checked_add(1)?;
            out[10..12].copy_from_slice(&arcount.to_be_bytes());
            let [p0, p1] = payload.to_be_bytes();
            // Root name, type OPT, class = payload size, extended RCODE 0, version 0, DO, no
            // options.
            out.extend_from_slice(&[
                0,
                0,
                41,
                p0,
                p1,
                0,
                0,
                if dnssec_ok { 0x80 } else { 0 },
                0,
                0,
                0,
            ]);
        }
        Some(out)
    }
}

/// An OPT record without options.
pub(crate) const OPT_LEN: usize = 11;

/// What to store.
#[derive(Debug, Clone)]
pub struct Insert {
    /// The answer with clamped TTLs.
    pub msg: Message,
    /// Lifetime in seconds; 0 is not stored.
    pub ttl: u32,
    /// NXDOMAIN or NODATA.
    pub negative: bool,
    /// Whether serving it needs a live grant.
    pub needs_grant: bool,
    /// The grant fwd committed with the answer: (client scope, until Unix ms).
    pub grant: Option<(Option<IpAddr>, u64)>,
    /// [`Cache::epoch`] read before the Authorize call that returned `grant`; the grant is
    /// dropped (the answer still stored) when an invalidation happened since.
    pub epoch: u64,
}

/// What to store for an answer shaped on the wire (see [`Insert`] for the fields they share).
#[derive(Debug)]
pub struct InsertWire {
    /// The answer, TTLs clamped and capped.
    pub answer: WireAnswer,
    /// The A/AAAA addresses of its answer section.
    pub addrs: Vec<IpAddr>,
    /// Lifetime in seconds; 0 is not stored.
    pub ttl: u32,
    /// Whether serving it needs a live grant.
    pub needs_grant: bool,
    /// The grant fwd committed with the answer: (client scope, until Unix ms).
    pub grant: Option<(Option<IpAddr>, u64)>,
    /// As [`Insert::epoch`].
    pub epoch: u64,
}

struct Inner {
    /// Entries in recency order (`lru`'s list: O(1) lookups, promotions and evictions).
    map: LruCache<Key, Entry, std::hash::BuildHasherDefault<KeyHash>>,
    /// Bumped by every invalidation of grant knowledge.
    epoch: u64,
    /// Whether recorded grants may be believed: false until the revocation watch has
    /// delivered fwd's catch-all revocations, and again whenever it is down.
    trusted: bool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("len", &self.map.len())
            .field("epoch", &self.epoch)
            .field("trusted", &self.trusted)
            .finish()
    }
}

/// The bounded answer cache.
#[derive(Debug)]
pub struct Cache {
    inner: Mutex<Inner>,
    capacity: usize,
}

/// Whether a cached answer must be re-authorized before it is served.
///
/// True when no grant is known for this scope, or when the grant ends before the answer's
/// remaining TTL plus `margin`: the client may use the address for as long as the TTL it is
/// told, so the grant must outlive it.
pub fn needs_authorization(
    grant_until_ms: Option<u64>,
    now_ms: u64,
    remaining_s: u32,
    margin: Duration,
) -> bool {
    match grant_until_ms {
        None => true,
        Some(until) => {
            let needed = now_ms
                .saturating_add(u64::from(remaining_s) * 1000)
                .saturating_add(u64::try_from(margin.as_millis()).unwrap_or(u64::MAX));
            until < needed
        }
    }
}

impl Cache {
    /// A cache holding at most `capacity` answers (0 disables caching).
    pub fn new(capacity: usize) -> Self {
        Cache {
            // Unbounded: `put` evicts down to `capacity` itself. Keys carry their own SipHash
            // under a random key (`Key::new`: the names are the clients' choice), passed on.
            inner: Mutex::new(Inner {
                map: LruCache::unbounded_with_hasher(std::hash::BuildHasherDefault::default()),
                epoch: 0,
                trusted: false,
            }),
            capacity,
        }
    }

    /// Looks up `key`; expired entries are removed and count as misses.
    pub fn get(&self, key: &Key, scope: Option<IpAddr>) -> Option<Hit> {
        let now = Instant::now();
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        // Marks the entry as used.
        let entry = inner.map.get_mut(key)?;
        let age = now.saturating_duration_since(entry.inserted);
        if age >= Duration::from_secs(u64::from(entry.ttl)) {
            inner.map.pop(key);
            return None;
        }
        let elapsed = u32::try_from(age.as_secs()).unwrap_or(u32::MAX);
        // Encoded on the first hit, not at insertion: most misses are never asked again.
        let msg = entry.msg.as_deref();
        let wire = entry
            .wire
            .get_or_insert_with(|| msg.and_then(WireAnswer::build).map(Arc::new))
            .clone();
        let hit = Hit {
            stored: entry.msg.clone(),
            elapsed,
            wire,
            remaining: entry.ttl.saturating_sub(elapsed),
            needs_grant: entry.needs_grant,
            grant_until_ms: if inner.trusted {
                entry.grants.get(scope)
            } else {
                None
            },
            negative: entry.negative,
            unconfirmed_grant_until_ms: entry.grants.get(scope),
            inserted: entry.inserted,
            epoch: inner.epoch,
        };
        Some(hit)
    }

    /// Stores an answer, evicting the least recently used entry when full.
    pub fn insert(&self, key: Key, item: Insert) {
        if self.capacity == 0 || item.ttl == 0 {
            return;
        }
        let entry = Entry {
            addrs: answer_addrs(&item.msg),
            msg: Some(Arc::new(item.msg)),
            wire: None,
            inserted: Instant::now(),
            ttl: item.ttl,
            negative: item.negative,
            needs_grant: item.needs_grant,
            grants: Grants::default(),
        };
        self.put(key, entry, item.grant, item.epoch);
    }

    /// Stores a positive answer shaped on the wire ([`crate::wire`]), whose answer section
    /// names `addrs`; `item` as for [`Cache::insert`].
    pub fn insert_wire(&self, key: Key, item: InsertWire) {
        if self.capacity == 0 || item.ttl == 0 {
            return;
        }
        let entry = Entry {
            msg: None,
            wire: Some(Some(Arc::new(item.answer))),
            inserted: Instant::now(),
            ttl: item.ttl,
            negative: false,
            needs_grant: item.needs_grant,
            grants: Grants::default(),
            addrs: item.addrs,
        };
        self.put(key, entry, item.grant, item.epoch);
    }

    fn put(&self, key: Key, mut entry: Entry, grant: Option<(Option<IpAddr>, u64)>, epoch: u64) {
        let mut inner = self.inner.lock();
        if let Some((scope, until)) = grant
            && epoch == inner.epoch
        {
            entry.grants.set(scope, until);
        }
        if inner.map.put(key, entry).is_none() {
            while inner.map.len() > self.capacity {
                if inner.map.pop_lru().is_none() {
                    break;
                }
            }
        }
    }

    /// Records a grant fwd committed for a cached entry, if that entry is still the one hit
    /// and no invalidation happened since `epoch` (read before the Authorize call).
    pub fn record_grant(
        &self,
        key: &Key,
        inserted: Instant,
        epoch: u64,
        scope: Option<IpAddr>,
        until_ms: u64,
    ) {
        let mut inner = self.inner.lock();
        if inner.epoch != epoch {
            return;
        }
        if let Some(entry) = inner.map.peek_mut(key)
            && entry.inserted == inserted
        {
            entry.grants.set(scope, until_ms);
        }
    }

    /// The current invalidation epoch. Read it before calling Authorize and hand it back with
    /// the grant ([`Insert::epoch`], [`Cache::record_grant`]).
    pub fn epoch(&self) -> u64 {
        self.inner.lock().epoch
    }

    /// fwd revoked `net`: forgets the grants (for every client scope) of every entry naming an
    /// address inside it, so that their next hit re-authorizes. The answers stay cached.
    /// Returns how many entries lost their grants.
    pub fn revoke(&self, net: &IpNet) -> usize {
        let mut inner = self.inner.lock();
        inner.epoch += 1;
        let mut touched = 0;
        for (_, entry) in inner.map.iter_mut() {
            if !entry.grants.is_empty() && entry.names_any_in(net) {
                entry.grants.clear();
                touched += 1;
            }
        }
        touched
    }

    /// Sets whether recorded grants may be believed: only while the revocation watch is up
    /// and has applied its catch-alls (which forget every grant recorded before).
    pub fn set_trusted(&self, trusted: bool) {
        self.inner.lock().trusted = trusted;
    }

    /// Whether recorded grants are believed (the revocation watch is up).
    pub fn is_trusted(&self) -> bool {
        self.inner.lock().trusted
    }

    /// Removes one entry.
    pub fn remove(&self, key: &Key) {
        self.inner.lock().map.pop(key);
    }

    /// Removes every entry (`name` = `None`) or those for `name` and every name below it.
    /// Returns how many were removed.
    pub fn flush(&self, name: Option<&Name>) -> u64 {
        let mut inner = self.inner.lock();
        let before = inner.map.len();
        match name {
            None => inner.map.clear(),
            Some(zone) => {
                let doomed: Vec<Key> = inner
                    .map
                    .iter()
                    .map(|(k, _)| k)
                    .filter(|k| zone.zone_of(&k.name))
                    .cloned()
                    .collect();
                for k in &doomed {
                    inner.map.pop(k);
                }
            }
        }
        (before - inner.map.len()) as u64
    }

    /// How many entries are stored (expired ones included until they are touched or evicted).
    pub fn len(&self) -> usize {
        self.inner.lock().map.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::net::Ipv4Addr;

    use hickory_proto::op::{MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record};

    use super::*;

    fn key(name: &str) -> Key {
        Key::new(
            Name::from_ascii(name).unwrap(),
            RecordType::A,
            DNSClass::IN,
            false,
        )
    }

    fn answer(name: &str, ttl: u32) -> Message {
        let mut m = Message::new(0, MessageType::Response, OpCode::Query);
        let n = Name::from_ascii(name).unwrap();
        m.add_query(Query::query(n.clone(), RecordType::A));
        m.add_answer(Record::from_rdata(
            n,
            ttl,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
        m
    }

    #[tokio::test]
    async fn keys_match_whatever_the_letter_case() {
        use std::hash::BuildHasher;
        let c = Cache::new(10);
        c.insert(
            key("www.example.test."),
            item("www.example.test.", 300, None),
        );
        assert!(c.get(&key("WWW.Example.TEST."), None).is_some());
        assert!(c.get(&key("www.example.tes."), None).is_none());
        let s = std::collections::hash_map::RandomState::new();
        assert_eq!(s.hash_one(key("a.B.c.")), s.hash_one(key("A.b.C.")));
        assert_ne!(s.hash_one(key("ab.c.")), s.hash_one(key("a.bc.")));
        // Type, class and DO are in the key and its hash.
        let n = || Name::from_ascii("a.b.c.").unwrap();
        let a = Key::new(n(), RecordType::A, DNSClass::IN, false);
        for other in [
            Key::new(n(), RecordType::AAAA, DNSClass::IN, false),
            Key::new(n(), RecordType::A, DNSClass::CH, false),
            Key::new(n(), RecordType::A, DNSClass::IN, true),
        ] {
            assert_ne!(a, other);
            assert_ne!(s.hash_one(&a), s.hash_one(&other), "{other:?}");
        }
    }

    fn item(name: &str, ttl: u32, grant: Option<u64>) -> Insert {
        Insert {
            msg: answer(name, ttl),
            ttl,
            negative: false,
            needs_grant: true,
            grant: grant.map(|g| (None, g)),
            epoch: 0,
        }
    }

    /// A cache whose revocation watch is up.
    fn trusted(capacity: usize) -> Cache {
        let c = Cache::new(capacity);
        c.set_trusted(true);
        c
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_decrements_on_hits_and_expires() {
        let c = trusted(10);
        c.insert(key("example.com."), item("example.com.", 300, Some(1)));
        let h = c.get(&key("EXAMPLE.com."), None).unwrap();
        assert_eq!(h.remaining, 300);
        assert_eq!(h.msg().unwrap().answers[0].ttl, 300);
        tokio::time::advance(Duration::from_secs(100)).await;
        let h = c.get(&key("example.com."), None).unwrap();
        assert_eq!(h.remaining, 200);
        assert_eq!(h.msg().unwrap().answers[0].ttl, 200);
        tokio::time::advance(Duration::from_millis(199_500)).await;
        let h = c.get(&key("example.com."), None).unwrap();
        assert_eq!(h.remaining, 1);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(c.get(&key("example.com."), None).is_none());
        assert!(c.is_empty(), "expired entry is removed on touch");
    }

    #[tokio::test(start_paused = true)]
    async fn negative_entries_are_cached_and_expire() {
        let c = Cache::new(10);
        let mut m = Message::new(0, MessageType::Response, OpCode::Query);
        m.metadata.response_code = hickory_proto::op::ResponseCode::NXDomain;
        c.insert(
            key("nx.example."),
            Insert {
                msg: m,
                ttl: 60,
                negative: true,
                needs_grant: false,
                grant: None,
                epoch: 0,
            },
        );
        let h = c.get(&key("nx.example."), None).unwrap();
        assert!(h.negative);
        assert!(!h.needs_grant);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(c.get(&key("nx.example."), None).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_lru() {
        let c = Cache::new(2);
        c.insert(key("a."), item("a.", 300, None));
        c.insert(key("b."), item("b.", 300, None));
        // Touch a, so b is the least recently used.
        assert!(c.get(&key("a."), None).is_some());
        c.insert(key("c."), item("c.", 300, None));
        assert_eq!(c.len(), 2);
        assert!(c.get(&key("b."), None).is_none());
        assert!(c.get(&key("a."), None).is_some());
        assert!(c.get(&key("c."), None).is_some());
        // Re-inserting an existing key does not evict.
        c.insert(key("c."), item("c.", 300, None));
        assert_eq!(c.len(), 2);
        // Capacity 0 disables the cache; TTL 0 is never stored.
        let off = Cache::new(0);
        off.insert(key("a."), item("a.", 300, None));
        assert!(off.is_empty());
        c.insert(key("z."), item("z.", 0, None));
        assert!(c.get(&key("z."), None).is_none());
    }

    #[test]
    fn grant_expiry_decision() {
        let margin = Duration::from_secs(2);
        let now = 1_000_000;
        // No grant known: authorize.
        assert!(needs_authorization(None, now, 10, margin));
        // Grant covers remaining TTL plus margin: serve without fwd.
        assert!(!needs_authorization(Some(now + 12_000), now, 10, margin));
        assert!(!needs_authorization(Some(now + 60_000), now, 10, margin));
        // Grant ends inside the margin or before the TTL: re-authorize.
        assert!(needs_authorization(Some(now + 11_999), now, 10, margin));
        assert!(needs_authorization(Some(now + 5_000), now, 10, margin));
        // Grant already over.
        assert!(needs_authorization(Some(now - 1), now, 0, Duration::ZERO));
        // No overflow near the end of time.
        assert!(!needs_authorization(
            Some(u64::MAX),
            u64::MAX - 1,
            u32::MAX,
            Duration::MAX
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn grants_are_recorded_per_scope_and_generation() {
        let c = trusted(10);
        let epoch = c.epoch();
        let k = key("example.com.");
        c.insert(
            k.clone(),
            Insert {
                epoch,
                ..item("example.com.", 300, Some(5_000))
            },
        );
        let h = c.get(&k, None).unwrap();
        assert_eq!(h.grant_until_ms, Some(5_000));
        let client: IpAddr = "192.0.2.9".parse().unwrap();
        assert_eq!(c.get(&k, Some(client)).unwrap().grant_until_ms, None);
        c.record_grant(&k, h.inserted, h.epoch, Some(client), 9_000);
        assert_eq!(c.get(&k, Some(client)).unwrap().grant_until_ms, Some(9_000));
        c.record_grant(&k, h.inserted, h.epoch, None, 7_000);
        assert_eq!(c.get(&k, None).unwrap().grant_until_ms, Some(7_000));
        // A grant for an entry that has since been replaced is dropped.
        tokio::time::advance(Duration::from_secs(1)).await;
        c.insert(k.clone(), item("example.com.", 300, None));
        c.record_grant(&k, h.inserted, h.epoch, None, 99_000);
        assert_eq!(c.get(&k, None).unwrap().grant_until_ms, None);
    }

    fn a_and_aaaa(name: &str, v4: [u8; 4], v6: &str) -> Insert {
        let mut m = answer(name, 300);
        m.answers[0].data = RData::A(A(Ipv4Addr::from(v4)));
        m.add_answer(Record::from_rdata(
            Name::from_ascii(name).unwrap(),
            300,
            RData::AAAA(hickory_proto::rr::rdata::AAAA(v6.parse().unwrap())),
        ));
        Insert {
            msg: m,
            ..item(name, 300, Some(u64::MAX))
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn revocation_forgets_grants_of_entries_naming_the_network() {
        let c = trusted(10);
        let client: IpAddr = "192.0.2.200".parse().unwrap();
        c.insert(key("a."), a_and_aaaa("a.", [192, 0, 2, 1], "2001:db8::1"));
        c.insert(
            key("b."),
            a_and_aaaa("b.", [198, 51, 100, 1], "2001:db8:1::1"),
        );
        let h = c.get(&key("a."), None).unwrap();
        c.record_grant(&key("a."), h.inserted, h.epoch, Some(client), u64::MAX);
        let granted = |name: &str, scope: Option<IpAddr>| {
            c.get(&key(name), scope).unwrap().grant_until_ms.is_some()
        };

        // An unrelated network changes nothing (but does move the epoch).
        let before = c.epoch();
        assert_eq!(c.revoke(&net("203.0.113.0/24")), 0);
        assert!(c.epoch() > before);
        assert!(granted("a.", None) && granted("a.", Some(client)) && granted("b.", None));

        // A network covering one address of `a.` forgets its grants for every client, and
        // keeps the answer.
        assert_eq!(c.revoke(&net("192.0.2.0/28")), 1);
        assert!(!granted("a.", None));
        assert!(!granted("a.", Some(client)));
        assert!(granted("b.", None));
        assert_eq!(
            c.get(&key("a."), None)
                .unwrap()
                .msg()
                .unwrap()
                .answers
                .len(),
            2
        );

        // IPv6 and the catch-alls.
        assert_eq!(c.revoke(&net("2001:db8:1::/48")), 1);
        assert!(!granted("b.", None));
        let h = c.get(&key("b."), None).unwrap();
        c.record_grant(&key("b."), h.inserted, h.epoch, None, u64::MAX);
        assert!(granted("b.", None));
        assert_eq!(c.revoke(&net("0.0.0.0/0")), 1);
        assert!(!granted("b.", None));
    }

    #[tokio::test(start_paused = true)]
    async fn revocation_matches_ipv4_mapped_addresses() {
        let c = trusted(10);
        c.insert(
            key("m."),
            a_and_aaaa("m.", [10, 0, 0, 1], "::ffff:192.0.2.7"),
        );
        assert_eq!(c.revoke(&net("192.0.2.7/32")), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn grants_learned_across_an_invalidation_are_not_recorded() {
        // The revocation may have overtaken the Authorize reply: whatever that reply said, the
        // grant may be gone.
        let c = trusted(10);
        let before = c.epoch();
        c.revoke(&net("198.51.100.0/24"));
        c.insert(
            key("a."),
            Insert {
                epoch: before,
                ..a_and_aaaa("a.", [192, 0, 2, 1], "2001:db8::1")
            },
        );
        let h = c.get(&key("a."), None).unwrap();
        assert_eq!(h.grant_until_ms, None, "stale grant recorded at insert");
        assert_eq!(c.len(), 1, "the answer itself is cached");
        c.record_grant(&key("a."), h.inserted, before, None, u64::MAX);
        assert_eq!(c.get(&key("a."), None).unwrap().grant_until_ms, None);
        c.record_grant(&key("a."), h.inserted, h.epoch, None, u64::MAX);
        assert!(c.get(&key("a."), None).unwrap().grant_until_ms.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn untrusted_cache_reports_no_grants() {
        let c = Cache::new(10);
        assert!(
            !c.is_trusted(),
            "a new cache waits for the revocation watch"
        );
        c.insert(key("a."), item("a.", 300, Some(u64::MAX)));
        assert_eq!(c.get(&key("a."), None).unwrap().grant_until_ms, None);
        c.set_trusted(true);
        assert_eq!(
            c.get(&key("a."), None).unwrap().grant_until_ms,
            Some(u64::MAX)
        );
        // Losing the watch hides every grant (it stays known as unconfirmed), and so are
        // grants learned meanwhile, until the catch-alls of the next stream forget them.
        c.set_trusted(false);
        let h = c.get(&key("a."), None).unwrap();
        assert_eq!(h.grant_until_ms, None);
        assert_eq!(h.unconfirmed_grant_until_ms, Some(u64::MAX));
        c.record_grant(&key("a."), h.inserted, h.epoch, None, 7_000);
        let h = c.get(&key("a."), None).unwrap();
        assert_eq!(h.grant_until_ms, None);
        assert_eq!(h.unconfirmed_grant_until_ms, Some(7_000));
        c.revoke(&"0.0.0.0/0".parse().unwrap());
        c.revoke(&"::/0".parse().unwrap());
        c.set_trusted(true);
        let h = c.get(&key("a."), None).unwrap();
        assert_eq!(h.grant_until_ms, None);
        assert_eq!(h.unconfirmed_grant_until_ms, None);
    }

    #[test]
    fn grant_scopes_are_bounded() {
        let mut g = Grants::default();
        for i in 0..(MAX_GRANT_SCOPES as u64 + 10) {
            g.set(Some(IpAddr::from([10, 0, 0, i as u8])), 1000 + i);
        }
        assert_eq!(g.len(), MAX_GRANT_SCOPES);
        // The earliest-ending scopes were forgotten, the inline first one among them.
        for i in 0..10u8 {
            assert_eq!(g.get(Some(IpAddr::from([10, 0, 0, i]))), None, "{i}");
        }
        for i in 10..(MAX_GRANT_SCOPES as u8 + 10) {
            let until = g.get(Some(IpAddr::from([10, 0, 0, i])));
            assert_eq!(until, Some(1000 + u64::from(i)), "{i}");
        }
        // Setting a kept scope again updates it in place, wherever it is held.
        g.set(Some(IpAddr::from([10, 0, 0, 10])), 5);
        g.set(Some(IpAddr::from([10, 0, 0, 73])), 6);
        assert_eq!(g.len(), MAX_GRANT_SCOPES);
        assert_eq!(g.get(Some(IpAddr::from([10, 0, 0, 10]))), Some(5));
        assert_eq!(g.get(Some(IpAddr::from([10, 0, 0, 73]))), Some(6));
    }

    /// `Grants` decides as a plain list of scopes bounded by evicting the earliest-ending one.
    #[test]
    fn grants_match_a_bounded_list() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..200 {
            let mut g = Grants::default();
            let mut list: Vec<(Option<IpAddr>, u64)> = Vec::new();
            for _ in 0..300 {
                let scope = match rng.random_range(0..100u8) {
                    0 => None,
                    n => Some(IpAddr::from([10, 0, 0, n])),
                };
                if rng.random_bool(0.02) {
                    g.clear();
                    list.clear();
                    continue;
                }
                // Distinct expiries, so that "the earliest" is one scope.
                let until = rng.random::<u64>() >> 1;
                g.set(scope, until);
                if let Some(slot) = list.iter_mut().find(|(s, _)| *s == scope) {
                    slot.1 = until;
                } else {
                    if list.len() >= MAX_GRANT_SCOPES {
                        let pos = (0..list.len()).min_by_key(|&i| list[i].1).unwrap();
                        list.swap_remove(pos);
                    }
                    list.push((scope, until));
                }
                assert_eq!(g.len(), list.len());
                assert_eq!(g.is_empty(), list.is_empty());
                for (s, u) in &list {
                    assert_eq!(g.get(*s), Some(*u));
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn flush_name_and_below() {
        let c = Cache::new(10);
        for n in [
            "example.com.",
            "www.example.com.",
            "example.org.",
            "notexample.com.",
        ] {
            c.insert(key(n), item(n, 300, None));
        }
        assert_eq!(c.flush(Some(&Name::from_ascii("Example.COM.").unwrap())), 2);
        assert_eq!(c.len(), 2);
        assert_eq!(c.flush(None), 2);
        assert!(c.is_empty());
    }

    /// The client's question on the wire: header-less, uncompressed name, type A, class IN.
    fn question_wire(name: &str) -> Vec<u8> {
        let mut m = Message::new(1, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()[HEADER_LEN..].to_vec()
    }

    #[tokio::test(start_paused = true)]
    async fn hits_are_served_from_the_wire_with_the_clients_id_case_ttl_and_edns() {
        use hickory_proto::op::Edns;
        use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
        let c = trusted(10);
        let mut msg = answer("Example.COM.", 300);
        msg.metadata.authentic_data = true;
        // The upstream's EDNS, padding included, must never reach a client.
        let mut e = Edns::new();
        e.options_mut()
            .insert(EdnsOption::Unknown(EdnsCode::Padding.into(), vec![0; 40]));
        msg.set_edns(e);
        c.insert(
            key("example.com."),
            Insert {
                msg,
                ..item("example.com.", 300, Some(u64::MAX))
            },
        );
        tokio::time::advance(Duration::from_secs(100)).await;
        let h = c.get(&key("example.com."), None).unwrap();
        let w = h.wire.clone().expect("served from the wire");
        let question = question_wire("eXaMple.com.");
        for (edns, dnssec_ok) in [(None, false), (Some(1232), false), (Some(1232), true)] {
            let asked = Asked {
                id: 0xBEEF,
                rd: true,
                cd: dnssec_ok,
                question: &question,
                edns: edns.map(|p| (p, dnssec_ok)),
            };
            let out = Message::from_vec(&w.render(&asked, h.elapsed, 512).unwrap()).unwrap();
            assert_eq!(out.metadata.id, 0xBEEF);
            assert_eq!(out.metadata.message_type, MessageType::Response);
            assert!(out.metadata.recursion_desired && out.metadata.recursion_available);
            assert!(!out.metadata.authoritative && !out.metadata.truncation);
            assert_eq!(out.metadata.checking_disabled, dnssec_ok);
            assert_eq!(
                out.metadata.authentic_data, dnssec_ok,
                "AD only for DO clients"
            );
            assert_eq!(out.queries[0].name().to_ascii(), "eXaMple.com.");
            assert_eq!(out.answers.len(), 1);
            assert_eq!(out.answers[0].ttl, 200);
            match (&out.edns, edns) {
                (None, None) => {}
                (Some(e), Some(p)) => {
                    assert_eq!(e.max_payload(), p);
                    assert_eq!(e.flags().dnssec_ok, dnssec_ok);
                    assert!(e.option(EdnsCode::Padding).is_none());
                }
                other => panic!("EDNS {other:?}"),
            }
            // The long way gives the same TTLs.
            assert_eq!(h.msg().unwrap().answers[0].ttl, 200);
        }
        // Too big for the client: the caller truncates the long way.
        let asked = Asked {
            id: 1,
            rd: false,
            cd: false,
            question: &question,
            edns: None,
        };
        let len = w.render(&asked, 0, 512).unwrap().len();
        assert!(w.render(&asked, 0, len - 1).is_none());
        // Another question is never answered from these bytes.
        let other = question_wire("example.net.");
        let asked = Asked {
            question: &other,
            ..asked
        };
        assert!(w.render(&asked, 0, 512).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_hot_entry_survives_eviction_without_being_bumped_on_every_hit() {
        let c = Cache::new(8);
        c.insert(key("hot."), item("hot.", 300, None));
        for i in 0..20 {
            assert!(c.get(&key("hot."), None).is_some(), "round {i}");
            let name = format!("cold{i}.");
            c.insert(key(&name), item(&name, 300, None));
        }
        assert_eq!(c.len(), 8);
        assert!(
            c.get(&key("hot."), None).is_some(),
            "the hot entry was evicted"
        );
        assert!(
            c.get(&key("cold0."), None).is_none(),
            "the oldest cold one was not"
        );
    }
}
