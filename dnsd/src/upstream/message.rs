//! DNS message handling for upstream exchanges: query parsing, response matching, ID restoration
//! and EDNS(0) padding (RFC 7830, RFC 8467).

use std::sync::OnceLock;

use hickory_proto::op::{Edns, Message, MessageType, Query};
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};

use super::UpstreamError;

/// RFC 8467 section 4.1: queries are padded to a multiple of 128 octets.
pub const QUERY_BLOCK_LEN: usize = 128;

/// EDNS payload size advertised when we must add an OPT record for padding (DNS flag day 2020).
const PADDING_EDNS_PAYLOAD: u16 = 1232;

/// Length of the DNS header; anything shorter is not a DNS message.
pub(crate) const HEADER_LEN: usize = 12;

/// A client query, parsed once and reused for every attempt on every upstream.
///
/// The common query (one plain question, at most an OPT record) is checked on the wire
/// without building a `Message`: the parsed form is only needed to pad a query for a TLS
/// upstream and to judge an answer that the wire checks cannot accept as is.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// The client's ID, restored in the answer.
    client_id: u16,
    /// The opcode bits of the header's third octet.
    op_bits: u8,
    /// Where the question (uncompressed name, type, class) lies in `wire`, when the wire
    /// checks apply.
    question: Option<std::ops::Range<usize>>,
    /// The largest UDP response the client accepts (512 without EDNS).
    udp_payload: usize,
    /// The client's bytes; transports overwrite the ID.
    wire: Vec<u8>,
    /// The parsed query, built on first use (or at once when the wire checks do not apply).
    message: OnceLock<Result<Message, UpstreamError>>,
    /// The padded form for TLS upstreams, built on first use, and whether we added EDNS to it.
    padded: OnceLock<Result<(Vec<u8>, bool), UpstreamError>>,
}

impl Prepared {
    /// Parses a client query. It must be a query (QR=0) with exactly one question.
    pub(crate) fn parse(wire: &[u8]) -> Result<Self, UpstreamError> {
        if let Some(p) = Self::parse_wire(wire) {
            return Ok(p);
        }
        let message = Message::from_vec(wire)
            .map_err(|e| UpstreamError::MalformedQuery(format!("cannot parse: {e}")))?;
        if message.metadata.message_type != MessageType::Query {
            return Err(UpstreamError::MalformedQuery(
                "QR bit set: not a query".to_owned(),
            ));
        }
        if message.queries.len() != 1 {
            return Err(UpstreamError::MalformedQuery(format!(
                "{} questions, expected exactly 1",
                message.queries.len()
            )));
        }
        Ok(Self {
            client_id: message.metadata.id,
            op_bits: wire.get(2).map_or(0, |b| b & OPCODE_MASK),
            question: None,
            udp_payload: usize::from(message.max_payload().max(512)),
            wire: wire.to_vec(),
            message: OnceLock::from(Ok(message)),
            padded: OnceLock::new(),
        })
    }

    /// The wire-only form of [`Prepared::parse`]: a query with one uncompressed question and
    /// well-framed records. `None` sends the query through the full parser.
    fn parse_wire(wire: &[u8]) -> Option<Self> {
        let head = wire.get(..HEADER_LEN)?;
        if head[2] & 0x80 != 0 || count(wire, 4)? != 1 {
            return None;
        }
        let qend = plain_name_end(wire, HEADER_LEN)?.checked_add(4)?;
        if qend > wire.len() {
            return None;
        }
        let opt = walk_records(wire, qend)?;
        let udp_payload = match opt {
            Some(o) => usize::from(o.class.max(512)),
            None => 512,
        };
        Some(Self {
            client_id: u16::from_be_bytes([head[0], head[1]]),
            op_bits: head[2] & OPCODE_MASK,
            question: Some(HEADER_LEN..qend),
            udp_payload,
            wire: wire.to_vec(),
            message: OnceLock::new(),
            padded: OnceLock::new(),
        })
    }

    /// The parsed query.
    fn message(&self) -> Result<&Message, UpstreamError> {
        self.message
            .get_or_init(|| {
                Message::from_vec(&self.wire)
                    .map_err(|e| UpstreamError::MalformedQuery(format!("cannot parse: {e}")))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The question, parsed.
    #[cfg(test)]
    pub(crate) fn queries(&self) -> Vec<Query> {
        self.message()
            .map(|m| m.queries.clone())
            .unwrap_or_default()
    }

    /// The largest UDP response the client advertised it accepts.
    pub(crate) fn udp_payload(&self) -> usize {
        self.udp_payload
    }

    /// The client's query bytes (any ID).
    pub(crate) fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// The question's bytes (name as the client wrote it, type, class), when the query has a
    /// single uncompressed question: what a matching response echoes, up to letter case.
    pub(crate) fn question_wire(&self) -> Option<&[u8]> {
        self.question.clone().and_then(|r| self.wire.get(r))
    }

    /// The query padded to a multiple of [`QUERY_BLOCK_LEN`] (any ID).
    pub(crate) fn padded_wire(&self) -> Result<&[u8], UpstreamError> {
        let padded = self.padded.get_or_init(|| {
            if let Some(q) = &self.question
                && let Some(p) = pad_wire(&self.wire, q.end)
            {
                return Ok(p);
            }
            pad(self.message()?)
        });
        match padded {
            Ok((wire, _)) => Ok(wire),
            Err(e) => Err(e.clone()),
        }
    }

    /// Whether we added an OPT record when padding (the client sent none).
    fn added_edns(&self) -> bool {
        matches!(self.padded.get(), Some(Ok((_, true))))
    }

    /// Checks that `resp` answers this query and turns it into the client's answer: the client's
    /// ID restored, EDNS padding removed, and an OPT record we added ourselves removed again.
    /// The response ID is the transport's business and is not checked here.
    pub(crate) fn accept(&self, resp: &[u8], was_padded: bool) -> Result<Vec<u8>, String> {
        if let Some(mut out) = self.accept_on_the_wire(resp, was_padded) {
            set_id(&mut out, self.client_id);
            return Ok(out);
        }
        if resp.len() < HEADER_LEN {
            return Err(format!("{} bytes is shorter than a DNS header", resp.len()));
        }
        let mut msg = Message::from_vec(resp).map_err(|e| format!("cannot parse: {e}"))?;
        if msg.metadata.message_type != MessageType::Response {
            return Err("QR bit clear: not a response".to_owned());
        }
        let query = self.message().map_err(|e| e.to_string())?;
        if msg.metadata.op_code != query.metadata.op_code {
            return Err(format!(
                "opcode {:?} does not match the query's {:?}",
                msg.metadata.op_code, query.metadata.op_code
            ));
        }
        if !same_questions(&msg.queries, &query.queries) {
            return Err(format!(
                "question {:?} does not match the query's {:?}",
                msg.queries.first().map(ToString::to_string),
                query.queries.first().map(ToString::to_string)
            ));
        }
        let drop_edns = was_padded && self.added_edns() && msg.edns.is_some();
        if drop_edns || strip_padding_message(&mut msg) {
            if drop_edns {
                msg.edns = None;
            }
            msg.metadata.id = self.client_id;
            return msg.to_vec().map_err(|e| format!("cannot re-encode: {e}"));
        }
        let mut out = resp.to_vec();
        set_id(&mut out, self.client_id);
        Ok(out)
    }

    /// The client's answer made on the wire alone (ID still to be restored), when `resp`
    /// is a response to this query (QR, opcode, the same single question up to letter case,
    /// records well framed) whose OPT record, if it must be edited, is its last record.
    /// `None` means "look closer", not "reject".
    fn accept_on_the_wire(&self, resp: &[u8], was_padded: bool) -> Option<Vec<u8>> {
        let question = self.question_wire()?;
        if !response_matches(resp, self.op_bits, question) {
            return None;
        }
        let opt = walk_records(resp, HEADER_LEN + question.len())?;
        let drop_edns = was_padded && self.added_edns();
        match opt {
            None => Some(resp.to_vec()),
            Some(o) if !drop_edns && !o.has_padding => Some(resp.to_vec()),
            Some(o) if !o.last => None,
            Some(o) if drop_edns => {
                let mut out = resp.get(..o.start)?.to_vec();
                add_arcount(&mut out, -1)?;
                Some(out)
            }
            Some(o) => {
                let options = options_without_padding(resp.get(o.rdata.clone())?);
                with_opt_options(resp, &o, &options)
            }
        }
    }
}

/// The opcode bits of the header's third octet.
const OPCODE_MASK: u8 = 0x78;

/// The EDNS option code of padding (RFC 7830).
const PADDING_OPTION: u16 = 12;

/// A 16-bit count of the header at `at`.
fn count(wire: &[u8], at: usize) -> Option<usize> {
    Some(usize::from(u16::from_be_bytes([
        *wire.get(at)?,
        *wire.get(at + 1)?,
    ])))
}

/// Whether `resp` is a response with `op_bits` whose only question is `question` (compared
/// ignoring ASCII case, as names are; length octets are below 64 and so never letters).
pub(crate) fn response_matches(resp: &[u8], op_bits: u8, question: &[u8]) -> bool {
    resp.len() >= HEADER_LEN + question.len()
        && resp[2] & 0x80 != 0
        && resp[2] & OPCODE_MASK == op_bits
        && count(resp, 4) == Some(1)
        && resp[HEADER_LEN..HEADER_LEN + question.len()].eq_ignore_ascii_case(question)
}

/// Whether the records after `resp`'s question of `question_len` octets are well framed:
/// what a datagram needs, beyond [`response_matches`], to be worth handing to its query.
pub(crate) fn records_framed(resp: &[u8], question_len: usize) -> bool {
    walk_records(resp, HEADER_LEN + question_len).is_some()
}

/// The end of an uncompressed name starting at `pos` (`None` for a compression pointer, a
/// reserved label type, a name over 255 octets, or one running past the end).
fn plain_name_end(wire: &[u8], mut pos: usize) -> Option<usize> {
    let start = pos;
    loop {
        let len = usize::from(*wire.get(pos)?);
        if len == 0 {
            return Some(pos + 1);
        }
        if len > 63 {
            return None;
        }
        pos += 1 + len;
        if pos - start > 255 {
            return None;
        }
    }
}

/// The end of a possibly compressed name starting at `pos` (a pointer ends it; its target is
/// not followed, so no loop is possible).
pub(crate) fn name_end(wire: &[u8], mut pos: usize) -> Option<usize> {
    let start = pos;
    loop {
        let len = *wire.get(pos)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(pos + 1),
            0x00 => pos += 1 + usize::from(len),
            0xc0 => {
                wire.get(pos + 1)?;
                return Some(pos + 2);
            }
            _ => return None,
        }
        if pos - start > 255 {
            return None;
        }
    }
}

/// For a message with one uncompressed question: the question's length and where every
/// record's TTL lies (OPT records excluded: their TTL field holds flags). `None` when the
/// message is not framed that way.
pub fn ttl_offsets(wire: &[u8]) -> Option<(usize, Vec<usize>)> {
    if count(wire, 4)? != 1 {
        return None;
    }
    let qend = plain_name_end(wire, HEADER_LEN)?.checked_add(4)?;
    let records = count(wire, 6)? + count(wire, 8)? + count(wire, 10)?;
    let mut offsets = Vec::with_capacity(records);
    let mut pos = qend;
    for _ in 0..records {
        pos = name_end(wire, pos)?;
        let fixed = wire.get(pos..pos + 10)?;
        if u16::from_be_bytes([fixed[0], fixed[1]]) != 41 {
            offsets.push(pos + 4);
        }
        pos += 10 + usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
    }
    (pos == wire.len()).then_some((qend - HEADER_LEN, offsets))
}

/// The length of `wire`'s question (uncompressed name, type, class) when it is a message
/// with exactly one question written that way.
pub fn plain_question_len(wire: &[u8]) -> Option<usize> {
    if count(wire, 4)? != 1 {
        return None;
    }
    let qend = plain_name_end(wire, HEADER_LEN)?.checked_add(4)?;
    (qend <= wire.len()).then_some(qend - HEADER_LEN)
}

/// What [`walk_records`] learned about the OPT record.
#[derive(Debug, Clone)]
struct OptInfo {
    /// Its CLASS: the advertised UDP payload size.
    class: u16,
    /// Whether its RDATA holds a padding option.
    has_padding: bool,
    /// Where the record starts.
    start: usize,
    /// Where its RDATA lies.
    rdata: std::ops::Range<usize>,
    /// Whether it is the message's last record (so that it can be edited or removed
    /// without moving anything a compression pointer could point at).
    last: bool,
}

/// Walks the answer, authority and additional records that start at `pos`, checking their
/// framing (names, fixed fields and RDATA inside the message, nothing after the last one).
/// Returns the OPT record's details if there is one, and `None` when the framing is broken
/// or there is more than one OPT.
fn walk_records(wire: &[u8], mut pos: usize) -> Option<Option<OptInfo>> {
    let records = count(wire, 6)? + count(wire, 8)? + count(wire, 10)?;
    let mut opt = None;
    for i in 0..records {
        let start = pos;
        pos = name_end(wire, pos)?;
        let fixed = wire.get(pos..pos + 10)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let class = u16::from_be_bytes([fixed[2], fixed[3]]);
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        pos += 10;
        let rdata = wire.get(pos..pos + rdlen)?;
        pos += rdlen;
        if rtype == 41 {
            if opt.is_some() {
                return None;
            }
            opt = Some(OptInfo {
                class,
                has_padding: options_have(rdata, PADDING_OPTION)?,
                start,
                rdata: pos - rdlen..pos,
                last: i + 1 == records,
            });
        }
    }
    (pos == wire.len()).then_some(opt)
}

/// The EDNS options of `rdata` other than padding.
fn options_without_padding(rdata: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rdata.len());
    let mut pos = 0;
    while let Some(head) = rdata.get(pos..pos + 4) {
        let end = pos + 4 + usize::from(u16::from_be_bytes([head[2], head[3]]));
        if u16::from_be_bytes([head[0], head[1]]) != PADDING_OPTION {
            out.extend_from_slice(rdata.get(pos..end).unwrap_or_default());
        }
        pos = end;
    }
    out
}

/// Replaces the RDATA of the OPT record `opt` (the last record of `wire`) by `options`.
fn with_opt_options(wire: &[u8], opt: &OptInfo, options: &[u8]) -> Option<Vec<u8>> {
    let rdlen = u16::try_from(options.len()).ok()?;
    let mut out = Vec::with_capacity(opt.rdata.start + options.len());
    out.extend_from_slice(wire.get(..opt.rdata.start)?);
    let at = opt.rdata.start.checked_sub(2)?;
    out.get_mut(at..at + 2)?
        .copy_from_slice(&rdlen.to_be_bytes());
    out.extend_from_slice(options);
    Some(out)
}

/// Adds `delta` to ARCOUNT.
fn add_arcount(wire: &mut [u8], delta: i32) -> Option<()> {
    let n = u16::try_from(i32::from(u16::try_from(count(wire, 10)?).ok()?) + delta).ok()?;
    wire.get_mut(10..12)?.copy_from_slice(&n.to_be_bytes());
    Some(())
}

/// The padding option (RFC 7830) that brings a message of `len` octets (the option not
/// counted) to a multiple of [`QUERY_BLOCK_LEN`].
fn padding_option(len: usize) -> Vec<u8> {
    let fill = (QUERY_BLOCK_LEN - (len + 4) % QUERY_BLOCK_LEN) % QUERY_BLOCK_LEN;
    let mut opt = Vec::with_capacity(4 + fill);
    opt.extend_from_slice(&PADDING_OPTION.to_be_bytes());
    opt.extend_from_slice(&u16::try_from(fill).unwrap_or(0).to_be_bytes());
    opt.resize(4 + fill, 0);
    opt
}

/// [`pad`] on the wire, for a query whose OPT record, if any, is its last record. Returns the
/// padded bytes and whether an OPT record was added.
fn pad_wire(wire: &[u8], qend: usize) -> Option<(Vec<u8>, bool)> {
    match walk_records(wire, qend)? {
        None => {
            let mut out = Vec::with_capacity(wire.len() + 15 + QUERY_BLOCK_LEN);
            out.extend_from_slice(wire);
            add_arcount(&mut out, 1)?;
            let [p0, p1] = PADDING_EDNS_PAYLOAD.to_be_bytes();
            let option = padding_option(out.len() + 11);
            let rdlen = u16::try_from(option.len()).ok()?.to_be_bytes();
            out.extend_from_slice(&[0, 0, 41, p0, p1, 0, 0, 0, 0, rdlen[0], rdlen[1]]);
            out.extend_from_slice(&option);
            Some((out, true))
        }
        Some(opt) if opt.last => {
            let rdata = wire.get(opt.rdata.clone())?;
            let mut options = options_without_padding(rdata);
            let len = opt.rdata.start + options.len();
            options.extend_from_slice(&padding_option(len));
            Some((with_opt_options(wire, &opt, &options)?, false))
        }
        Some(_) => None,
    }
}

/// Whether the EDNS options in `rdata` include `code` (`None` when they are badly framed).
fn options_have(rdata: &[u8], code: u16) -> Option<bool> {
    let mut pos = 0;
    let mut found = false;
    while pos < rdata.len() {
        let head = rdata.get(pos..pos + 4)?;
        found |= u16::from_be_bytes([head[0], head[1]]) == code;
        pos += 4 + usize::from(u16::from_be_bytes([head[2], head[3]]));
    }
    (pos == rdata.len()).then_some(found)
}

/// Question sections match when names (case-insensitively), types and classes match.
fn same_questions(a: &[Query], b: &[Query]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name && x.query_type == y.query_type && x.query_class == y.query_class
        })
}

/// The ID of a message (the caller checked the length).
pub(crate) fn id_of(msg: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.first()?, *msg.get(1)?]))
}

/// Queries in flight on one connection or socket, by the ID dnsd gave them. The IDs are
/// dnsd's own random choice, never a peer's, so the map needs no collision-proof hash:
/// foldhash costs a fraction of the default SipHash, and the miss path hashes an ID about
/// five times.
pub(crate) type IdMap<V> = std::collections::HashMap<u16, V, foldhash::fast::RandomState>;

/// A random query ID not in `pending` (the IDs in flight on one socket or connection).
/// Callers bound `pending` well below 65,536 entries, so this ends quickly.
pub(crate) fn unused_id<V>(pending: &IdMap<V>) -> u16 {
    loop {
        let id = rand::random::<u16>();
        if !pending.contains_key(&id) {
            return id;
        }
    }
}

/// Overwrites the ID of a message; no-op on anything shorter than an ID.
pub(crate) fn set_id(msg: &mut [u8], id: u16) {
    if let Some(head) = msg.get_mut(..2) {
        head.copy_from_slice(&id.to_be_bytes());
    }
}

/// Whether the TC bit is set.
pub(crate) fn is_truncated(msg: &[u8]) -> bool {
    msg.get(2).is_some_and(|b| b & 0x02 != 0)
}

/// Encodes `query` with an EDNS padding option so its length is a multiple of
/// [`QUERY_BLOCK_LEN`]. Returns the bytes and whether an OPT record had to be added.
fn pad(query: &Message) -> Result<(Vec<u8>, bool), UpstreamError> {
    let mut msg = query.clone();
    let added = msg.edns.is_none();
    let mut edns = msg.edns.take().unwrap_or_else(|| {
        let mut e = Edns::new();
        e.set_max_payload(PADDING_EDNS_PAYLOAD);
        e
    });
    edns.options_mut().remove(EdnsCode::Padding);
    edns.options_mut()
        .insert(EdnsOption::Unknown(EdnsCode::Padding.into(), Vec::new()));
    msg.edns = Some(edns);
    let encode = |m: &Message| {
        m.to_vec()
            .map_err(|e| UpstreamError::MalformedQuery(format!("cannot encode padded query: {e}")))
    };
    // The option header is already counted, so the payload adds exactly its own length.
    let unpadded = encode(&msg)?.len();
    let fill = (QUERY_BLOCK_LEN - unpadded % QUERY_BLOCK_LEN) % QUERY_BLOCK_LEN;
    if let Some(edns) = msg.edns.as_mut() {
        edns.options_mut().remove(EdnsCode::Padding);
        edns.options_mut()
            .insert(EdnsOption::Unknown(EdnsCode::Padding.into(), vec![0; fill]));
    }
    Ok((encode(&msg)?, added))
}

/// Removes every EDNS padding option from `msg`; returns whether there was one.
pub fn strip_padding_message(msg: &mut Message) -> bool {
    let Some(edns) = msg.edns.as_mut() else {
        return false;
    };
    if edns.option(EdnsCode::Padding).is_none() {
        return false;
    }
    edns.options_mut().remove(EdnsCode::Padding);
    true
}

/// Removes EDNS padding (RFC 7830) from a DNS message, for answers that go to plaintext
/// clients. Messages without padding are returned unchanged, byte for byte.
/// [`Upstreams::query`](super::Upstreams::query) already does this to its answers.
pub fn strip_padding(msg: &[u8]) -> Result<Vec<u8>, UpstreamError> {
    let mut parsed = Message::from_vec(msg)
        .map_err(|e| UpstreamError::MalformedQuery(format!("cannot parse: {e}")))?;
    if !strip_padding_message(&mut parsed) {
        return Ok(msg.to_vec());
    }
    parsed
        .to_vec()
        .map_err(|e| UpstreamError::MalformedQuery(format!("cannot re-encode: {e}")))
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::net::Ipv4Addr;

    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    use super::*;

    /// A recursive A query for `name` with `id`, optionally with EDNS.
    pub(crate) fn query_bytes(name: &str, id: u16, edns: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    /// An answer to `query` carrying one A record, padded when `pad_to` is set.
    pub(crate) fn answer_bytes(query: &Message, ip: Ipv4Addr, pad_to: Option<usize>) -> Vec<u8> {
        let mut r = Message::response(query.metadata.id, query.metadata.op_code);
        r.metadata.recursion_desired = query.metadata.recursion_desired;
        r.metadata.recursion_available = true;
        r.add_queries(query.queries.clone());
        if let Some(q) = query.queries.first() {
            r.add_answer(Record::from_rdata(q.name.clone(), 60, RData::A(A(ip))));
        }
        if let Some(edns) = &query.edns {
            let mut e = Edns::new();
            e.set_max_payload(edns.max_payload());
            if let Some(block) = pad_to {
                e.options_mut().insert(EdnsOption::Unknown(
                    EdnsCode::Padding.into(),
                    vec![0; block],
                ));
            }
            r.set_edns(e);
        }
        r.to_vec().unwrap()
    }

    fn has_padding(bytes: &[u8]) -> bool {
        let m = Message::from_vec(bytes).unwrap();
        m.edns
            .as_ref()
            .is_some_and(|e| e.option(EdnsCode::Padding).is_some())
    }

    #[test]
    fn padding_makes_multiples_of_128_and_strip_removes_it() {
        for (name, edns) in [
            ("a.", false),
            ("example.com.", true),
            ("a-rather-long-label-to-cross-one-block.example.org.", false),
            (
                "x.y.z.very-long-label-number-one-for-padding-tests.another-long-label-here.example.",
                true,
            ),
        ] {
            let p = Prepared::parse(&query_bytes(name, 7, edns)).unwrap();
            let padded = p.padded_wire().unwrap().to_vec();
            assert_eq!(
                padded.len() % QUERY_BLOCK_LEN,
                0,
                "{name}: {}",
                padded.len()
            );
            assert!(has_padding(&padded));
            let back = Message::from_vec(&padded).unwrap();
            assert_eq!(back.queries, p.queries());
            let stripped = strip_padding(&padded).unwrap();
            assert!(!has_padding(&stripped));
            assert!(stripped.len() < padded.len());
        }
        // Without padding, strip_padding is the identity.
        let plain = query_bytes("example.com.", 1, true);
        assert_eq!(strip_padding(&plain).unwrap(), plain);
        assert!(strip_padding(b"\x00\x01garbage").is_err());
    }

    #[test]
    fn accept_restores_id_and_strips_padding_and_added_edns() {
        let q = query_bytes("example.com.", 0xBEEF, false);
        let p = Prepared::parse(&q).unwrap();
        let padded = p.padded_wire().unwrap().to_vec();
        let mut upstream_q = Message::from_vec(&padded).unwrap();
        upstream_q.metadata.id = 42;
        let resp = answer_bytes(&upstream_q, Ipv4Addr::new(192, 0, 2, 1), Some(400));
        assert!(has_padding(&resp));
        let out = p.accept(&resp, true).unwrap();
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.id, 0xBEEF);
        assert!(m.edns.is_none(), "the client sent no EDNS");
        assert_eq!(m.answers.len(), 1);

        // Client with EDNS keeps its OPT record, minus padding.
        let q = query_bytes("example.com.", 9, true);
        let p = Prepared::parse(&q).unwrap();
        let _ = p.padded_wire().unwrap();
        let mut upstream_q = Message::from_vec(&q).unwrap();
        upstream_q.metadata.id = 1000;
        let out = p
            .accept(
                &answer_bytes(&upstream_q, Ipv4Addr::LOCALHOST, Some(100)),
                true,
            )
            .unwrap();
        assert!(!has_padding(&out));
        let m = Message::from_vec(&out).unwrap();
        assert!(m.edns.is_some());
        assert_eq!(m.metadata.id, 9);

        // Unpadded answers are passed through byte for byte, apart from the ID.
        let resp = answer_bytes(&upstream_q, Ipv4Addr::LOCALHOST, None);
        let out = p.accept(&resp, false).unwrap();
        assert_eq!(out[2..], resp[2..]);
        assert_eq!(id_of(&out), Some(9));
    }

    #[test]
    fn accept_rejects_mismatches_and_garbage() {
        let q = query_bytes("example.com.", 5, false);
        let p = Prepared::parse(&q).unwrap();
        let other = Message::from_vec(&query_bytes("example.net.", 5, false)).unwrap();
        assert!(
            p.accept(&answer_bytes(&other, Ipv4Addr::LOCALHOST, None), false)
                .unwrap_err()
                .contains("question")
        );
        // A query echoed back is not a response.
        assert!(p.accept(&q, false).unwrap_err().contains("QR"));
        assert!(p.accept(&q[..5], false).is_err());
        assert!(p.accept(&q[..q.len() - 1], false).is_err());
        let mut rng_bytes = [0u8; 300];
        for _ in 0..200 {
            rand::fill(&mut rng_bytes[..]);
            let len = rand::random_range(0..rng_bytes.len());
            let _ = p.accept(&rng_bytes[..len], false);
            let _ = Prepared::parse(&rng_bytes[..len]);
            let _ = strip_padding(&rng_bytes[..len]);
        }
        // Case differences in the echoed name are fine (0x20 randomisation).
        let upper = Message::from_vec(&query_bytes("EXAMPLE.com.", 5, false)).unwrap();
        assert!(
            p.accept(&answer_bytes(&upper, Ipv4Addr::LOCALHOST, None), false)
                .is_ok()
        );
    }

    #[test]
    fn parse_rejects_non_queries() {
        let q = Message::from_vec(&query_bytes("example.com.", 5, false)).unwrap();
        let resp = answer_bytes(&q, Ipv4Addr::LOCALHOST, None);
        assert!(matches!(
            Prepared::parse(&resp),
            Err(UpstreamError::MalformedQuery(_))
        ));
        let mut none = Message::query();
        none.metadata.id = 3;
        assert!(Prepared::parse(&none.to_vec().unwrap()).is_err());
        assert!(Prepared::parse(b"").is_err());
    }
}
