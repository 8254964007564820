//! The miss path's wire lane: an upstream answer that dnsd releases unchanged but for its
//! header, its TTLs, its EDNS and the glue it strips is checked and shaped on the wire, without
//! decoding it into a hickory `Message` and encoding it again (that pair was a fifth of dnsd's
//! own CPU on a cache miss).
//!
//! [`scan`] takes only the commonest shape: a NOERROR answer to an A or AAAA question whose
//! answer section is exactly the CNAME chain from the query name plus the addresses of the
//! query type at its end, an authority section of NS and SOA records only, and an additional
//! section of A/AAAA glue and the OPT record only. The names the chain is followed by (answer
//! owners and CNAME targets) are read with hickory's decoder, which refuses compression
//! pointers that do not point backwards; every other name (authority owners, NS and SOA data,
//! additional owners) is only checked and skipped, by [`checked_name_end`] under the same
//! rules. The additional section, which dnsd strips (glue is never authorized, and the client
//! gets dnsd's own OPT), is then a tail of the message that nothing kept can point into, so it
//! is cut off. Anything else returns
//! `None` and takes the `Message` path, which handles every answer; a test feeds both paths
//! the same answers and compares what the client gets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::{Name, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use crate::answer::{Chain, ChainAddr, MAX_CHAIN, same_name};
use crate::cache::WireAnswer;
use crate::upstream::HEADER_LEN;

/// Record types, as on the wire.
const TYPE_A: u16 = 1;
const TYPE_NS: u16 = 2;
const TYPE_CNAME: u16 = 5;
const TYPE_SOA: u16 = 6;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
/// Class IN.
const CLASS_IN: u16 = 1;
/// Answer records beyond this many take the `Message` path (the chain walk is quadratic).
const MAX_ANSWERS: usize = 64;

/// A compression pointer to offset 12, the name right after the header: the question's.
const QUESTION_POINTER: [u8; 2] = [0xc0, 0x0c];

/// An upstream answer [`scan`] accepted.
#[derive(Debug)]
pub struct Scanned {
    /// The CNAME chain and its addresses, as [`crate::answer::follow_chain`] finds them.
    pub chain: Chain,
    /// The smallest TTL in the answer section (what the cache lifetime starts from).
    pub answer_min_ttl: u32,
    /// The upstream's AD bit.
    pub authentic_data: bool,
    /// Where every kept record's TTL lies, and its value.
    ttls: Vec<(usize, u32)>,
    /// Where the kept part (header, question, answer and authority sections) ends.
    end: usize,
    /// The question's length after the header.
    question_len: usize,
}

/// One answer-section record.
struct Rec {
    /// The owner; `None` for a pointer to the question's name, which is `qname`.
    name: Option<Name>,
    ttl: u32,
    data: Data,
}

impl Rec {
    /// Whether `name` owns this record; `qname` is the question's name (a chain starts at
    /// it, so most records are owned by it, and then no name is compared).
    fn owned_by(&self, name: &Name, qname: &Name) -> bool {
        match &self.name {
            None => std::ptr::eq(name, qname) || same_name(qname, name),
            Some(owner) => same_name(owner, name),
        }
    }
}

enum Data {
    Cname(Name),
    Addr(IpAddr),
}

/// A 16-bit big-endian number at `at`.
fn u16_at(wire: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*wire.get(at)?, *wire.get(at + 1)?]))
}

/// A name read with hickory's decoder starting at `at`; returns it and where it ends.
fn name_at(wire: &[u8], at: usize) -> Option<(Name, usize)> {
    let mut d = decoder_at(wire, at)?;
    let name = Name::read(&mut d).ok()?;
    Some((name, d.index()))
}

/// Where the name starting at `at` ends, under exactly the rules of hickory's name decoder
/// (`Name::read`), without building the name. Unlike `upstream::message::name_end`, which only
/// frames a name (where it ends in the message, its pointer not followed), this one follows
/// pointers and refuses what hickory refuses. For the names the lane only checks and skips
/// (authority records, NS and SOA data, the additional section), building each was a tenth of
/// dnsd's instructions on a cache miss. A test holds it to `name_at` on every offset of mutated
/// answers. The rules: a length octet 0 ends the name; `0b11` starts a two-octet compression
/// pointer that must point before the start of the run of labels it ends (so pointers only go
/// backwards and chains end); `0b01` and `0b10` are refused; a label run reached through a pointer
/// must not reach the start of the run that pointed to it; and the name, as encoded without
/// compression, is at most 255 octets.
fn checked_name_end(wire: &[u8], at: usize) -> Option<usize> {
    // hickory's decoder addresses a message with 16-bit offsets (as `name_at` does).
    if at > usize::from(u16::MAX) {
        return None;
    }
    let mut pos = at;
    // Where the current run of labels started, and the bound a run reached through a
    // pointer must stay below.
    let mut run_start = at;
    let mut limit: Option<usize> = None;
    // Where the name ends in `wire`: after the first pointer, or after the root octet.
    let mut end: Option<usize> = None;
    // The name's length without compression: one octet per label length, the labels, and
    // the root octet.
    let mut encoded = 1usize;
    loop {
        if limit.is_some_and(|l| pos >= l) {
            return None;
        }
        let len = *wire.get(pos)?;
        match len & 0b1100_0000 {
            0 if len == 0 => return Some(end.unwrap_or(pos + 1)),
            0 => {
                let label = usize::from(len);
                wire.get(pos + 1..pos + 1 + label)?;
                encoded += label + 1;
                if encoded > 255 {
                    return None;
                }
                pos += 1 + label;
            }
            0b1100_0000 => {
                let ptr = usize::from(u16_at(wire, pos)? & 0x3fff);
                if ptr >= run_start {
                    return None;
                }
                end.get_or_insert(pos + 2);
                limit = Some(run_start);
                run_start = ptr;
                pos = ptr;
            }
            _ => return None,
        }
    }
}

/// hickory's decoder over `wire`, positioned at `at`.
fn decoder_at(wire: &[u8], at: usize) -> Option<BinDecoder<'_>> {
    Some(BinDecoder::new(wire).clone(u16::try_from(at).ok()?))
}

/// A record's fields after its owner name.
struct Fields {
    rtype: u16,
    class: u16,
    ttl: u32,
    /// Where the TTL lies.
    ttl_at: usize,
    /// Where the RDATA starts and where the record ends.
    rdata: usize,
    end: usize,
}

/// The fields of the record whose owner name ends at `at`.
fn fixed(wire: &[u8], at: usize) -> Option<Fields> {
    let f = wire.get(at..at + 10)?;
    let rdata = at + 10;
    let end = rdata + usize::from(u16::from_be_bytes([f[8], f[9]]));
    (end <= wire.len()).then_some(Fields {
        rtype: u16::from_be_bytes([f[0], f[1]]),
        class: u16::from_be_bytes([f[2], f[3]]),
        ttl: u32::from_be_bytes([f[4], f[5], f[6], f[7]]),
        ttl_at: at + 4,
        rdata,
        end,
    })
}

/// A record the lane keeps, starting at `pos`: its owner name (read with hickory's decoder)
/// and fields; class IN only.
fn kept_record(wire: &[u8], pos: usize) -> Option<(Name, Fields)> {
    let (name, at) = name_at(wire, pos)?;
    Some((name, kept_fields(wire, at)?))
}

/// The fields of a record the lane keeps without looking at its owner name; class IN only.
fn kept_record_fields(wire: &[u8], pos: usize) -> Option<Fields> {
    kept_fields(wire, checked_name_end(wire, pos)?)
}

/// The fields of a kept record whose owner name ends at `at`; class IN only.
fn kept_fields(wire: &[u8], at: usize) -> Option<Fields> {
    fixed(wire, at).filter(|f| f.class == CLASS_IN)
}

/// Checks `resp` (an upstream's answer to `question`, the client's question bytes after the
/// header) for the shape described in the module documentation, and follows its chain from
/// `qname`. `None` means "take the `Message` path".
pub fn scan(resp: &[u8], question: &[u8], qname: &Name, qtype: RecordType) -> Option<Scanned> {
    let want = match qtype {
        RecordType::A => TYPE_A,
        RecordType::AAAA => TYPE_AAAA,
        _ => return None,
    };
    let flags = u16_at(resp, 2)?;
    // QR, opcode QUERY, not truncated, NOERROR.
    if flags & 0x8000 == 0 || flags & 0x7800 != 0 || flags & 0x0200 != 0 || flags & 0x000f != 0 {
        return None;
    }
    if u16_at(resp, 4)? != 1 {
        return None;
    }
    let qend = HEADER_LEN + question.len();
    if !resp.get(HEADER_LEN..qend)?.eq_ignore_ascii_case(question) {
        return None;
    }
    let ancount = usize::from(u16_at(resp, 6)?);
    let nscount = usize::from(u16_at(resp, 8)?);
    let arcount = usize::from(u16_at(resp, 10)?);
    if ancount == 0 || ancount > MAX_ANSWERS {
        return None;
    }
    let mut ttls = Vec::with_capacity(ancount + nscount);
    let mut recs: Vec<Rec> = Vec::with_capacity(ancount);
    let mut pos = qend;
    for _ in 0..ancount {
        // An owner name that is a pointer to the question's name (an answer to the question
        // itself, the commonest record) is `qname`, which the client's query already gave
        // decoded: the response's question equals the client's but for case, which names
        // compare without. Any other owner is read with hickory's decoder.
        let (name, f) = if resp.get(pos..pos + 2) == Some(&QUESTION_POINTER[..]) {
            (None, kept_fields(resp, pos + 2)?)
        } else {
            let (name, f) = kept_record(resp, pos)?;
            (Some(name), f)
        };
        let data = match f.rtype {
            TYPE_CNAME => {
                let (target, name_end) = name_at(resp, f.rdata)?;
                if name_end != f.end {
                    return None;
                }
                Data::Cname(target)
            }
            TYPE_A if want == TYPE_A => {
                let b: [u8; 4] = resp.get(f.rdata..f.end)?.try_into().ok()?;
                Data::Addr(IpAddr::V4(Ipv4Addr::from(b)))
            }
            TYPE_AAAA if want == TYPE_AAAA => {
                let b: [u8; 16] = resp.get(f.rdata..f.end)?.try_into().ok()?;
                Data::Addr(IpAddr::V6(Ipv6Addr::from(b)))
            }
            _ => return None,
        };
        ttls.push((f.ttl_at, f.ttl));
        recs.push(Rec {
            name,
            ttl: f.ttl,
            data,
        });
        pos = f.end;
    }
    for _ in 0..nscount {
        let f = kept_record_fields(resp, pos)?;
        let data_end = match f.rtype {
            TYPE_NS => checked_name_end(resp, f.rdata)?,
            TYPE_SOA => checked_name_end(resp, checked_name_end(resp, f.rdata)?)? + 20,
            _ => return None,
        };
        if data_end != f.end {
            return None;
        }
        ttls.push((f.ttl_at, f.ttl));
        pos = f.end;
    }
    let end = pos;
    // The additional section is cut off whole: glue and one OPT record, nothing else. It is
    // still checked as the `Message` path's decoder checks it (owner names with backward
    // pointers only, OPT options framed), so that an answer that path refuses as unparsable
    // is refused here too, and authorizes nothing.
    let mut opts = 0;
    for _ in 0..arcount {
        let at = checked_name_end(resp, pos)?;
        let f = fixed(resp, at)?;
        match f.rtype {
            TYPE_A if f.end - f.rdata == 4 => {}
            TYPE_AAAA if f.end - f.rdata == 16 => {}
            // An extended RCODE lives in the OPT record's TTL field: only plain NOERROR here.
            TYPE_OPT if f.ttl >> 24 == 0 && at == pos + 1 => {
                if f.end > f.rdata {
                    // Options: hickory's own reading decides, as it does on the other path.
                    Record::read(&mut decoder_at(resp, pos)?).ok()?;
                }
                opts += 1;
            }
            _ => return None,
        }
        pos = f.end;
    }
    if opts > 1 || pos != resp.len() {
        return None;
    }
    let chain = follow(&recs, qname)?;
    let answer_min_ttl = recs.iter().map(|r| r.ttl).min()?;
    Some(Scanned {
        chain,
        answer_min_ttl,
        authentic_data: flags & 0x0020 != 0,
        ttls,
        end,
        question_len: question.len(),
    })
}

/// The chain from `qname` as [`crate::answer::follow_chain`] follows it, or `None` unless
/// every record is on it and it ends in data of the query type (anything else needs edits
/// or negative caching: the `Message` path).
fn follow(recs: &[Rec], qname: &Name) -> Option<Chain> {
    // Which records the chain used, a bit each (`scan` admits at most 64).
    let mut used = 0u64;
    let bit = |i: usize| {
        1u64.checked_shl(u32::try_from(i).unwrap_or(u32::MAX))
            .unwrap_or(0)
    };
    let mut current = qname;
    let mut min_ttl: Option<u32> = None;
    let mut cnames = 0usize;
    loop {
        let next = recs.iter().enumerate().find_map(|(i, r)| match &r.data {
            Data::Cname(target) if r.owned_by(current, qname) => Some((i, target, r.ttl)),
            _ => None,
        });
        let Some((i, target, ttl)) = next else { break };
        cnames += 1;
        // A CNAME followed a second time is a loop: every name on the chain but the last
        // was left through the first CNAME it owns, so a target naming any of them leads
        // back to a record already used. Either way a broken chain: the `Message` path
        // answers it (SERVFAIL).
        if cnames > MAX_CHAIN || used & bit(i) != 0 {
            return None;
        }
        used |= bit(i);
        min_ttl = Some(min_ttl.map_or(ttl, |m| m.min(ttl)));
        current = target;
    }
    let mut addrs: Vec<ChainAddr> = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        let Data::Addr(ip) = r.data else { continue };
        // The scan only admits addresses of the query type.
        if !r.owned_by(current, qname) {
            continue;
        }
        used |= bit(i);
        min_ttl = Some(min_ttl.map_or(r.ttl, |m| m.min(r.ttl)));
        if !addrs.iter().any(|a| a.ip == ip) {
            addrs.push(ChainAddr { ip, ttl: r.ttl });
        }
    }
    let all = if recs.len() >= 64 {
        u64::MAX
    } else {
        bit(recs.len()) - 1
    };
    if addrs.is_empty() || used != all {
        return None;
    }
    Some(Chain {
        target: current.clone(),
        cnames,
        addrs,
        min_ttl,
        has_data: true,
    })
}

impl Scanned {
    /// The length of the answer as stored (before dnsd's OPT record is added for a client
    /// that sent EDNS).
    pub fn stored_len(&self) -> usize {
        self.end
    }

    /// The answer in its stored form: the kept part of `resp` with the header reset, the
    /// additional section gone, and every TTL clamped into `[min, max]` and then capped at
    /// `cap` (what the `Message` path's `clamp_ttls` and `cap_ttls` do).
    pub fn into_answer(self, resp: &[u8], min: u32, max: u32, cap: u32) -> Option<WireAnswer> {
        let mut bytes = resp.get(..self.end)?.to_vec();
        // ID 0, QR, NOERROR; every other flag is the client's and is set when served.
        bytes.get_mut(..4)?.copy_from_slice(&[0, 0, 0x80, 0]);
        bytes.get_mut(10..12)?.copy_from_slice(&[0, 0]);
        let max = max.max(min);
        let mut offsets = Vec::with_capacity(self.ttls.len());
        for (at, ttl) in self.ttls {
            let ttl = ttl.clamp(min, max).min(cap);
            bytes
                .get_mut(at..at + 4)?
                .copy_from_slice(&ttl.to_be_bytes());
            offsets.push(at);
        }
        Some(WireAnswer::from_parts(
            bytes,
            self.question_len,
            offsets,
            self.authentic_data,
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::str::FromStr;

    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::{A, CNAME, NS, TXT};
    use hickory_proto::rr::{RData, Record};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn n(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    /// What nsd sends for a name under a wildcard: the answer, the zone's NS in the
    /// authority section, its glue and an OPT record in the additional section.
    fn nsd_like(qname: &str) -> Vec<u8> {
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.metadata.authoritative = true;
        m.add_query(Query::query(n(qname), RecordType::A));
        m.add_answer(Record::from_rdata(
            n(qname),
            300,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        m.add_authority(Record::from_rdata(
            n("bench.test."),
            300,
            RData::NS(NS(n("ns.bench.test."))),
        ));
        m.add_additional(Record::from_rdata(
            n("ns.bench.test."),
            300,
            RData::A(A::new(127, 0, 0, 1)),
        ));
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
        m.to_vec().unwrap()
    }

    fn question(wire: &[u8]) -> &[u8] {
        let len = crate::upstream::plain_question_len(wire).unwrap();
        &wire[HEADER_LEN..HEADER_LEN + len]
    }

    #[test]
    fn glue_and_opt_are_cut_and_the_rest_kept() {
        let resp = nsd_like("u1.w.bench.test.");
        let s = scan(
            &resp,
            question(&resp),
            &n("U1.W.bench.TEST."),
            RecordType::A,
        )
        .unwrap();
        assert_eq!(s.chain.addrs.len(), 1);
        assert_eq!(s.chain.min_ttl, Some(300));
        let stored = s.into_answer(&resp, 30, 3600, 120).unwrap();
        let m = stored.decode().unwrap();
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.authorities.len(), 1);
        assert!(m.additionals.is_empty());
        assert!(m.edns.is_none());
        assert!(m.answers.iter().chain(&m.authorities).all(|r| r.ttl == 120));
    }

    #[test]
    fn shapes_that_need_edits_are_left_to_the_message_path() {
        let q = n("a.test.");
        let base = |edit: &dyn Fn(&mut Message)| {
            let mut m = Message::new(7, MessageType::Response, OpCode::Query);
            m.add_query(Query::query(q.clone(), RecordType::A));
            m.add_answer(Record::from_rdata(
                q.clone(),
                300,
                RData::A(A::new(192, 0, 2, 1)),
            ));
            edit(&mut m);
            m.to_vec().unwrap()
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "off-chain address",
                base(&|m| {
                    m.add_answer(Record::from_rdata(
                        n("b.test."),
                        300,
                        RData::A(A::new(192, 0, 2, 9)),
                    ));
                }),
            ),
            (
                "CNAME to nowhere",
                base(&|m| {
                    m.answers.clear();
                    m.add_answer(Record::from_rdata(
                        q.clone(),
                        300,
                        RData::CNAME(CNAME(n("c.test."))),
                    ));
                }),
            ),
            (
                "TXT in the answer",
                base(&|m| {
                    m.add_answer(Record::from_rdata(
                        q.clone(),
                        300,
                        RData::TXT(TXT::new(vec!["x".into()])),
                    ));
                }),
            ),
            (
                "TXT in the additional section",
                base(&|m| {
                    m.add_additional(Record::from_rdata(
                        n("b.test."),
                        300,
                        RData::TXT(TXT::new(vec!["x".into()])),
                    ));
                }),
            ),
            (
                "NXDOMAIN",
                base(&|m| m.metadata.response_code = hickory_proto::op::ResponseCode::NXDomain),
            ),
            ("truncated", base(&|m| m.metadata.truncation = true)),
            (
                "CNAME loop",
                base(&|m| {
                    m.answers.insert(
                        0,
                        Record::from_rdata(q.clone(), 300, RData::CNAME(CNAME(n("B.test.")))),
                    );
                    m.answers.insert(
                        1,
                        Record::from_rdata(n("b.TEST."), 300, RData::CNAME(CNAME(n("A.test.")))),
                    );
                }),
            ),
            (
                "CNAME to itself",
                base(&|m| {
                    m.answers.insert(
                        0,
                        Record::from_rdata(q.clone(), 300, RData::CNAME(CNAME(n("a.TEST.")))),
                    );
                }),
            ),
        ];
        for (what, resp) in cases {
            assert!(
                scan(&resp, question(&resp), &q, RecordType::A).is_none(),
                "{what}"
            );
        }
        let resp = base(&|_| {});
        assert!(scan(&resp, question(&resp), &q, RecordType::A).is_some());
        // A chain whose names differ in letter case only is followed.
        let resp = base(&|m| {
            m.answers.clear();
            m.add_answer(Record::from_rdata(
                q.clone(),
                60,
                RData::CNAME(CNAME(n("C.Test."))),
            ));
            m.add_answer(Record::from_rdata(
                n("c.tEST."),
                300,
                RData::A(A::new(192, 0, 2, 3)),
            ));
        });
        let s = scan(&resp, question(&resp), &q, RecordType::A).unwrap();
        assert_eq!(s.chain.cnames, 1);
        assert_eq!(s.chain.min_ttl, Some(60));
        assert_eq!(s.chain.addrs.len(), 1);
        assert!(
            scan(&resp, question(&resp), &q, RecordType::TXT).is_none(),
            "not an address query"
        );
    }

    /// `checked_name_end` agrees with hickory's decoder (`name_at`) at every offset: on what it
    /// refuses and on where an accepted name ends.
    fn assert_name_end_agrees(wire: &[u8]) {
        for at in 0..=wire.len() {
            assert_eq!(
                checked_name_end(wire, at),
                name_at(wire, at).map(|(_, end)| end),
                "at {at} in {wire:02x?}"
            );
        }
    }

    #[test]
    fn name_end_follows_hickorys_rules() {
        // A name of labels of `len` octets each, encoded in `total` octets with its root.
        let long = |len: usize, total: usize| {
            let mut w = Vec::new();
            while w.len() + len + 2 <= total {
                w.push(len as u8);
                w.extend(std::iter::repeat_n(b'a', len));
            }
            let rest = total - w.len() - 1;
            if rest > 0 {
                w.push((rest - 1) as u8);
                w.extend(std::iter::repeat_n(b'b', rest - 1));
            }
            w.push(0);
            assert_eq!(w.len(), total);
            w
        };
        let cases: Vec<(&str, Vec<u8>, usize, Option<usize>)> = vec![
            ("root", vec![0], 0, Some(1)),
            ("one label", b"\x03abc\x00".to_vec(), 0, Some(5)),
            ("no root octet", b"\x03abc".to_vec(), 0, None),
            ("label past the end", b"\x05abc".to_vec(), 0, None),
            (
                "backward pointer",
                b"\x01a\x00\xc0\x00".to_vec(),
                3,
                Some(5),
            ),
            (
                "pointer after a label",
                b"\x01a\x00\x01b\xc0\x00".to_vec(),
                3,
                Some(7),
            ),
            ("pointer to itself", b"\xc0\x00".to_vec(), 0, None),
            ("forward pointer", b"\xc0\x02\x00".to_vec(), 0, None),
            ("half a pointer", b"\x00\xc0".to_vec(), 1, None),
            (
                "chain of pointers",
                b"\x01a\x00\xc0\x00\xc0\x03".to_vec(),
                5,
                Some(7),
            ),
            // The run reached through the pointer at 2 starts at 0 and must stay below 2,
            // where the pointer itself is.
            (
                "run reaching the pointing run",
                b"\x01a\xc0\x00".to_vec(),
                2,
                None,
            ),
            // Only the overlap rule refuses this one: the pointer at 2 goes back to 0, whose
            // label runs over the pointer's own octets to the root octet at 4.
            (
                "label over the pointer's octets",
                b"\x03x\xc0\x00\x00".to_vec(),
                2,
                None,
            ),
            (
                "label that is a pointer's octets",
                b"\x00\x01\xc0\x00\xc0\x01".to_vec(),
                4,
                Some(6),
            ),
            ("label type 01", b"\x41a\x00".to_vec(), 0, None),
            ("label type 10", b"\x81a\x00".to_vec(), 0, None),
            ("255 octets", long(63, 255), 0, Some(255)),
            ("256 octets", long(63, 256), 0, None),
        ];
        for (what, wire, at, want) in cases {
            assert_eq!(checked_name_end(&wire, at), want, "{what}");
            assert_name_end_agrees(&wire);
        }
        // 255 and 256 octets reached through a pointer: the limit counts the name, not the
        // wire.
        for (labels, want) in [(55, true), (56, false)] {
            let mut w = long(63, 200);
            let at = w.len();
            w.extend_from_slice(&long(30, labels + 1)[..labels]);
            w.extend_from_slice(&[0xc0, 0x00]);
            assert_eq!(
                checked_name_end(&w, at),
                want.then_some(at + labels + 2),
                "{labels}"
            );
            assert_name_end_agrees(&w);
        }
    }

    #[test]
    fn name_end_agrees_with_hickory_on_mutated_answers() {
        let bases = [nsd_like("u1.w.bench.test."), {
            let mut m = Message::new(7, MessageType::Response, OpCode::Query);
            m.add_query(Query::query(n("a.example."), RecordType::A));
            m.add_answer(Record::from_rdata(
                n("a.example."),
                60,
                RData::CNAME(CNAME(n("b.cdn.example."))),
            ));
            m.add_answer(Record::from_rdata(
                n("b.cdn.example."),
                60,
                RData::A(A::new(192, 0, 2, 9)),
            ));
            m.to_vec().unwrap()
        }];
        let mut r = StdRng::seed_from_u64(2);
        for base in &bases {
            assert_name_end_agrees(base);
            for _ in 0..3_000 {
                let mut w = base.clone();
                for _ in 0..r.random_range(1..4) {
                    let i = r.random_range(0..w.len());
                    match r.random_range(0..4) {
                        0 => w[i] = r.random(),
                        // A pointer somewhere in the message.
                        1 => w[i] = 0xc0 | r.random_range(0..0x40u8),
                        2 => w[i] = r.random_range(0..w.len()) as u8,
                        _ => w.insert(i, r.random_range(0..8u8)),
                    }
                }
                assert_name_end_agrees(&w);
            }
        }
    }

    /// Mutated answers never panic, and whatever is accepted is an answer hickory decodes
    /// whole (an answer that cannot be parsed authorizes nothing, on either path) and can be
    /// stored and decoded.
    #[test]
    fn mutated_answers_never_panic() {
        let base = nsd_like("u1.w.bench.test.");
        let qname = n("u1.w.bench.test.");
        let mut r = StdRng::seed_from_u64(1);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut resp = base.clone();
            for _ in 0..r.random_range(1..4) {
                if resp.is_empty() {
                    break;
                }
                match r.random_range(0..3) {
                    0 => {
                        let i = r.random_range(0..resp.len());
                        resp[i] = r.random();
                    }
                    1 => resp.truncate(r.random_range(0..resp.len())),
                    _ => {
                        let i = r.random_range(0..resp.len());
                        resp.insert(i, r.random());
                    }
                }
            }
            let q = question(&base);
            if let Some(s) = scan(&resp, q, &qname, RecordType::A) {
                accepted += 1;
                assert!(
                    hickory_proto::op::Message::from_vec(&resp).is_ok(),
                    "accepted an answer hickory refuses: {resp:02x?}"
                );
                let stored = s.into_answer(&resp, 0, u32::MAX, u32::MAX).unwrap();
                assert!(
                    stored.decode().is_some(),
                    "accepted but undecodable: {resp:?}"
                );
            }
        }
        assert!(accepted > 0);
    }
}
