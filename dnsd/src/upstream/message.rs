//! DNS message handling for upstream exchanges: query parsing, response matching, ID restoration
//! and EDNS(0) padding (RFC 7830, RFC 8467).

use std::sync::OnceLock;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};

use super::UpstreamError;

/// RFC 8467 section 4.1: queries are padded to a multiple of 128 octets.
pub const QUERY_BLOCK_LEN: usize = 128;

/// EDNS payload size advertised when we must add an OPT record for padding (DNS flag day 2020).
const PADDING_EDNS_PAYLOAD: u16 = 1232;

/// Length of the DNS header; anything shorter is not a DNS message.
pub(crate) const HEADER_LEN: usize = 12;

/// A client query, parsed once and reused for every attempt on every upstream.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// The client's ID, restored in the answer.
    client_id: u16,
    op_code: OpCode,
    /// The question every response must echo.
    queries: Vec<Query>,
    /// The largest UDP response the client accepts (512 without EDNS).
    udp_payload: usize,
    /// The client's bytes; transports overwrite the ID.
    wire: Vec<u8>,
    /// The parsed query, kept to build the padded form.
    message: Message,
    /// The padded form for TLS upstreams, built on first use, and whether we added EDNS to it.
    padded: OnceLock<Result<(Vec<u8>, bool), UpstreamError>>,
}

impl Prepared {
    /// Parses a client query. It must be a query (QR=0) with exactly one question.
    pub(crate) fn parse(wire: &[u8]) -> Result<Self, UpstreamError> {
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
            op_code: message.metadata.op_code,
            queries: message.queries.clone(),
            udp_payload: usize::from(message.max_payload().max(512)),
            wire: wire.to_vec(),
            message,
            padded: OnceLock::new(),
        })
    }

    /// The largest UDP response the client advertised it accepts.
    pub(crate) fn udp_payload(&self) -> usize {
        self.udp_payload
    }

    /// The client's query bytes (any ID).
    pub(crate) fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// The query padded to a multiple of [`QUERY_BLOCK_LEN`] (any ID).
    pub(crate) fn padded_wire(&self) -> Result<&[u8], UpstreamError> {
        match self.padded.get_or_init(|| pad(&self.message)) {
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
        if resp.len() < HEADER_LEN {
            return Err(format!("{} bytes is shorter than a DNS header", resp.len()));
        }
        let mut msg = Message::from_vec(resp).map_err(|e| format!("cannot parse: {e}"))?;
        if msg.metadata.message_type != MessageType::Response {
            return Err("QR bit clear: not a response".to_owned());
        }
        if msg.metadata.op_code != self.op_code {
            return Err(format!(
                "opcode {:?} does not match the query's {:?}",
                msg.metadata.op_code, self.op_code
            ));
        }
        if !same_questions(&msg.queries, &self.queries) {
            return Err(format!(
                "question {:?} does not match the query's {:?}",
                msg.queries.first().map(ToString::to_string),
                self.queries.first().map(ToString::to_string)
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
            assert_eq!(back.queries, p.queries);
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
