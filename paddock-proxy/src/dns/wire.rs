//! DNS messages on the wire: the raw header of anything received, and answers that fit the
//! client's UDP size.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record};

/// Size of a DNS header.
const HEADER_LEN: usize = 12;
/// What a client without EDNS can take (RFC 1035).
const CLASSIC_UDP: usize = 512;
/// The most this server sends in one datagram, and advertises in its EDNS record: the size
/// that avoids IP fragmentation (DNS flag day 2020).
pub(crate) const MAX_UDP: u16 = 1232;

/// The fixed header of a received datagram, read without parsing the rest.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawHeader {
    id: u16,
    /// The second header byte without QR: opcode and RD (echoed in bare replies).
    opcode_rd: u8,
    pub(crate) is_response: bool,
    pub(crate) questions: u16,
}

impl RawHeader {
    /// `None` for a datagram too short to be DNS.
    pub(crate) fn parse(packet: &[u8]) -> Option<Self> {
        let h = packet.get(..HEADER_LEN)?;
        Some(Self {
            id: u16::from_be_bytes([h[0], h[1]]),
            opcode_rd: h[2] & 0x79,
            is_response: h[2] & 0x80 != 0,
            questions: u16::from_be_bytes([h[4], h[5]]),
        })
    }

    /// A header-only response with `code` (for datagrams that did not parse).
    pub(crate) fn bare_reply(self, code: ResponseCode) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.push(0x80 | self.opcode_rd);
        // RA, and the low four bits of the response code.
        out.push(0x80 | (code.low() & 0x0f));
        out.extend_from_slice(&[0; 8]);
        out
    }
}

/// One address record of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) addr: IpAddr,
    pub(crate) ttl: u32,
}

/// The response to `request` with `code` and `answers` (owned by the question's name, exactly
/// as the client spelled it), holding as many answers as fit the client's UDP size. `None`
/// only if the message cannot be encoded at all.
pub(crate) fn encode(request: &Message, code: ResponseCode, answers: &[Answer]) -> Option<Vec<u8>> {
    let mut resp = Message::response(request.metadata.id, request.metadata.op_code);
    resp.metadata.recursion_desired = request.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.checking_disabled = request.metadata.checking_disabled;
    resp.metadata.response_code = code;
    resp.queries.clone_from(&request.queries);
    let limit = match &request.edns {
        Some(edns) => {
            let mut ours = Edns::new();
            ours.set_max_payload(MAX_UDP);
            ours.set_version(0);
            resp.edns = Some(ours);
            usize::from(edns.max_payload().min(MAX_UDP)).max(CLASSIC_UDP)
        }
        None => CLASSIC_UDP,
    };
    if let Some(query) = request.queries.first() {
        // An A record takes at least 16 bytes (compressed name, fixed fields, address): more
        // than `limit / 16` can never fit. Without this cap an upstream answer of thousands
        // of records (a TCP answer under an allowed name) would be re-encoded once per
        // record dropped below: quadratic work for one query.
        for a in answers.iter().take(limit / 16) {
            let rdata = match a.addr {
                IpAddr::V4(v4) => RData::A(A(v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
            };
            resp.answers
                .push(Record::from_rdata(query.name().clone(), a.ttl, rdata));
        }
    }
    loop {
        let bytes = resp.to_vec().ok()?;
        // Never the TC bit: TCP is not served (see the module docs), so a shorter answer that
        // fits is better than a truncated one nobody can complete.
        if bytes.len() <= limit || resp.answers.pop().is_none() {
            return Some(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::{Name, RecordType};

    /// Thousands of upstream records (a TCP answer) give the same answer as the first
    /// hundred: only what fits the client's size is encoded, and the cap drops nothing that
    /// would fit.
    #[test]
    fn a_huge_answer_is_cut_to_what_fits() {
        let mut request = Message::query();
        request.metadata.id = 7;
        request.add_query(Query::query(
            Name::from_ascii("many.test.").expect("name"),
            RecordType::A,
        ));
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        request.edns = Some(edns);
        let answers: Vec<Answer> = (0..4000u32)
            .map(|i| Answer {
                addr: IpAddr::from(std::net::Ipv4Addr::from(0xC000_0200 + i)),
                ttl: 30,
            })
            .collect();
        let huge = encode(&request, ResponseCode::NoError, &answers).expect("encodes");
        let first = encode(&request, ResponseCode::NoError, &answers[..100]).expect("encodes");
        assert_eq!(huge, first);
        assert!(huge.len() <= usize::from(MAX_UDP), "{}", huge.len());
        let m = Message::from_vec(&huge).expect("parses");
        assert!(
            m.answers.len() > 60 && m.answers.len() < 100,
            "{}",
            m.answers.len()
        );
    }
}
