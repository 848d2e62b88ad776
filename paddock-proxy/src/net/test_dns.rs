//! A tiny authoritative UDP DNS responder on 127.0.0.1 for tests: fixed zone, counts queries.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::proto::op::{Message, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// How the responder answers one name.
#[derive(Debug, Clone)]
pub enum Answer {
    Addrs {
        addrs: Vec<IpAddr>,
        ttl: u32,
    },
    NxDomain,
    /// SERVFAIL (the resolver could not resolve the name).
    ServFail,
    /// Never answer (to provoke timeouts).
    Silent,
}

#[derive(Debug)]
pub struct TestDns {
    pub addr: SocketAddr,
    zone: Arc<Mutex<HashMap<String, Answer>>>,
    seen: Arc<Mutex<Vec<(String, RecordType)>>>,
    task: JoinHandle<()>,
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestDns {
    /// Starts the responder; every answer is delayed by `delay` so concurrent callers overlap.
    pub async fn start(delay: Duration) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind test DNS socket");
        let addr = sock.local_addr().expect("test DNS local addr");
        let zone: Arc<Mutex<HashMap<String, Answer>>> = Arc::default();
        let seen: Arc<Mutex<Vec<(String, RecordType)>>> = Arc::default();
        let sock = Arc::new(sock);
        let task = {
            let (zone, seen) = (zone.clone(), seen.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                        return;
                    };
                    let Ok(query) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    let Some(q) = query.queries.first().cloned() else {
                        continue;
                    };
                    let name = q
                        .name()
                        .to_ascii()
                        .trim_end_matches('.')
                        .to_ascii_lowercase();
                    seen.lock()
                        .expect("seen lock")
                        .push((name.clone(), q.query_type()));
                    let answer = zone.lock().expect("zone lock").get(&name).cloned();
                    let mut resp = Message::response(query.metadata.id, OpCode::Query);
                    resp.metadata.recursion_desired = query.metadata.recursion_desired;
                    resp.metadata.recursion_available = true;
                    resp.metadata.authoritative = true;
                    resp.add_query(q.clone());
                    match answer {
                        Some(Answer::Silent) => continue,
                        None | Some(Answer::NxDomain) => {
                            resp.metadata.response_code = ResponseCode::NXDomain;
                        }
                        Some(Answer::ServFail) => {
                            resp.metadata.response_code = ResponseCode::ServFail;
                        }
                        Some(Answer::Addrs { addrs, ttl }) => {
                            for ip in addrs {
                                let rdata = match (ip, q.query_type()) {
                                    (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
                                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
                                    _ => continue,
                                };
                                resp.add_answer(Record::from_rdata(q.name().clone(), ttl, rdata));
                            }
                        }
                    }
                    let sock = sock.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        if let Ok(bytes) = resp.to_vec() {
                            let _ = sock.send_to(&bytes, peer).await;
                        }
                    });
                }
            })
        };
        Self {
            addr,
            zone,
            seen,
            task,
        }
    }

    pub fn set(&self, name: &str, answer: Answer) {
        self.zone
            .lock()
            .expect("zone lock")
            .insert(name.to_owned(), answer);
    }

    pub fn addrs(&self, name: &str, addrs: &[&str], ttl: u32) {
        let addrs = addrs
            .iter()
            .map(|a| a.parse().expect("test address"))
            .collect();
        self.set(name, Answer::Addrs { addrs, ttl });
    }

    /// Queries seen for `name` of type `rtype`.
    pub fn count(&self, name: &str, rtype: RecordType) -> usize {
        self.seen
            .lock()
            .expect("seen lock")
            .iter()
            .filter(|(n, t)| n == name && *t == rtype)
            .count()
    }
}
