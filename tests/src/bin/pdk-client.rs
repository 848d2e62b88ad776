//! Test client run inside agent cgroups and namespaces. Prints one JSON object on stdout.
//!
//! ```text
//! pdk-client tcp TARGET [--bind ADDR] [--mark N] [--dualstack]
//! pdk-client tcp-many COUNT           (10.77.x.y targets, distinct ports)
//! pdk-client tcp-hold COUNT [--offset K] [--plain] [--sources N]
//! pdk-client udp TARGET [--reply]
//! pdk-client sockets
//! pdk-client bench-connect TARGET COUNT
//! pdk-client dns SERVER NAME TYPE     (one query; TYPE: A, AAAA, TXT, ...)
//! pdk-client dns-flood SERVER COUNT SUFFIX   (COUNT queries for distinct names under SUFFIX)
//! pdk-client listen tcp|udp ADDR|none [--family 4|6] [--dualstack] [--send-to ADDR]
//!                   [--count N] [--wait-ms MS]
//! ```
//! Every network wait is bounded (5 s; `listen` waits at most `--wait-ms`, default 10 s).
//!
//! `tcp-hold` opens COUNT connections and holds them all, then prints `{"connected":N,...}`
//! and waits for a line on stdin; then it reads one line from each (`--plain`: sends a GET
//! for `app.test` to 10.77.0.1:80 on each and reads the status line) and prints the tally:
//! each connection (without `--plain` to its own destination, 10.100+.x.y) is `ok` (its own
//! destination recovered, or a 200), `unrecovered` (the stand-in could not recover it),
//! `wrong` (another destination), `reset` (reset or closed without an answer), or `other`.
//! `--sources N` spreads the connections over source addresses 127.0.0.1..N; `--offset K`
//! numbers them from K (several clients, one set of distinct destinations).
//!
//! `listen` prints two lines: first `{"ok":true,"local":ADDR,...}` once the socket is bound
//! (`none`: not bound, so `listen()` or `--send-to` autobinds it) and listening, or
//! `{"ok":false,"stage":...,"errno":N}`; then what arrived: TCP connections (each sends one
//! line and gets `echo:LINE` back) until `--count` of them, UDP datagrams until one reads
//! `end`, or the wait is over.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use hickory_proto::op::{Message, MessageType, OpCode, Query as DnsQuery, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use serde_json::{Value, json};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const WAIT: Duration = Duration::from_secs(5);

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn err_json(e: &std::io::Error) -> Value {
    json!({"ok": false, "error": e.to_string(), "errno": errno(e)})
}

fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn parse<T: std::str::FromStr>(s: &str, what: &str) -> T {
    s.parse().unwrap_or_else(|_| {
        eprintln!("pdk-client: bad {what}: {s}");
        std::process::exit(2)
    })
}

/// Connect (optionally bound, marked, or through a dual-stack IPv6 socket) and read one line.
fn tcp(target: SocketAddr, bind: Option<SocketAddr>, mark: Option<u32>, dualstack: bool) -> Value {
    let (domain, addr) = if dualstack {
        let v6 = match target {
            SocketAddr::V4(v4) => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            v6 @ SocketAddr::V6(_) => v6,
        };
        (Domain::IPV6, v6)
    } else {
        (Domain::for_address(target), target)
    };
    let result = (|| -> std::io::Result<Value> {
        let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        if dualstack {
            s.set_only_v6(false)?;
        }
        if let Some(m) = mark {
            s.set_mark(m)?;
        }
        if let Some(b) = bind {
            s.set_reuse_address(true)?;
            s.bind(&b.into())?;
        }
        s.connect_timeout(&SockAddr::from(addr), WAIT)?;
        let peer = s.peer_addr()?.as_socket().map(|a| a.to_string());
        let stream: TcpStream = s.into();
        stream.set_read_timeout(Some(WAIT))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        Ok(json!({"ok": true, "peer": peer, "line": line.trim_end()}))
    })();
    result.unwrap_or_else(|e| err_json(&e))
}

/// `count` concurrent connections to distinct 10.77.x.y:port destinations; each checks that
/// the stand-in proxy recovered exactly its own destination, by both methods.
fn tcp_many(count: u32) -> Value {
    let targets: Vec<SocketAddr> = (0..count)
        .map(|i| {
            let ip = Ipv4Addr::new(
                10,
                77,
                u8::try_from(1 + i / 250).unwrap_or(255),
                u8::try_from(1 + i % 250).unwrap_or(255),
            );
            SocketAddr::from((ip, u16::try_from(1000 + i).unwrap_or(u16::MAX)))
        })
        .collect();
    // Connect everything first so all connections are open at once.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(targets.len()));
    let handles: Vec<_> = targets
        .into_iter()
        .map(|t| {
            let barrier = std::sync::Arc::clone(&barrier);
            std::thread::spawn(move || -> Result<(), String> {
                let s = TcpStream::connect_timeout(&t, WAIT);
                barrier.wait();
                let s = s.map_err(|e| format!("{t}: connect: {e}"))?;
                s.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
                let mut line = String::new();
                BufReader::new(&s)
                    .read_line(&mut line)
                    .map_err(|e| format!("{t}: read: {e}"))?;
                let want = format!("sockopt={t} map={t}");
                if line.trim_end() == want {
                    Ok(())
                } else {
                    Err(format!("{t}: got {}", line.trim_end()))
                }
            })
        })
        .collect();
    let mut ok = 0;
    let mut failures = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push("thread panicked".into()),
        }
    }
    failures.truncate(5);
    json!({"total": count, "ok": ok, "failures": failures})
}

/// The distinct destination of connection `i` of `tcp-hold` (unique for i < 250,000).
fn hold_target(i: u32) -> SocketAddr {
    let octet = |v: u32| u8::try_from(v).unwrap_or(u8::MAX);
    let ip = Ipv4Addr::new(
        10,
        octet(100 + i / 62_500),
        octet(1 + (i / 250) % 250),
        octet(1 + i % 250),
    );
    SocketAddr::from((ip, u16::try_from(1000 + i % 60_000).unwrap_or(u16::MAX)))
}

/// Opens `count` connections, holds them, waits for the go-ahead on stdin, then classifies
/// what each one gets (see the module docs).
fn tcp_hold(count: u32, offset: u32, plain: bool, sources: u8) -> Value {
    use std::collections::BTreeMap;
    let mut held = Vec::with_capacity(count as usize);
    let mut connect_errors = BTreeMap::<String, u32>::new();
    for i in offset..offset + count {
        let target = if plain {
            SocketAddr::from(([10, 77, 0, 1], 80))
        } else {
            hold_target(i)
        };
        let source = SocketAddr::from((
            [
                127,
                0,
                0,
                1 + u8::try_from(i % u32::from(sources.max(1))).unwrap_or(0),
            ],
            0,
        ));
        let connected =
            Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).and_then(|s| {
                if sources > 1 {
                    s.bind(&SockAddr::from(source))?;
                }
                s.connect_timeout(&SockAddr::from(target), WAIT)?;
                Ok(TcpStream::from(s))
            });
        match connected {
            Ok(s) => held.push((target, s)),
            Err(e) => *connect_errors.entry(e.to_string()).or_default() += 1,
        }
    }
    println!(
        "{}",
        json!({"connected": held.len(), "connect_errors": connect_errors})
    );
    let mut go = String::new();
    let _ = std::io::stdin().read_line(&mut go);
    if plain {
        for (_, s) in &mut held {
            // A write to a connection the proxy reset fails; the read below tells.
            let _ = s.write_all(
                b"GET /hello.txt HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
            );
        }
    }
    let mut tally = BTreeMap::<&str, u32>::new();
    let mut examples = Vec::new();
    let deadline = Instant::now() + Duration::from_mins(1);
    for (target, s) in &held {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let _ = s.set_read_timeout(Some(left.min(WAIT)));
        let mut line = String::new();
        let kind = match BufReader::new(s).read_line(&mut line) {
            Ok(0) => "reset",
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
            Err(_) => "other",
            Ok(_) => {
                let line = line.trim_end();
                if plain {
                    if line.starts_with("HTTP/1.1 200") {
                        "ok"
                    } else {
                        "other"
                    }
                } else {
                    match line.strip_prefix("sockopt=") {
                        Some(got) if got == target.to_string() => "ok",
                        Some(got) if got.starts_with("error") => "unrecovered",
                        Some(_) => "wrong",
                        None => "other",
                    }
                }
            }
        };
        if matches!(kind, "wrong" | "other") && examples.len() < 5 {
            examples.push(format!("{target}: {}", line.trim_end()));
        }
        *tally.entry(kind).or_default() += 1;
    }
    json!({"total": count, "connected": held.len(), "tally": tally, "examples": examples})
}

fn udp(target: SocketAddr, want_reply: bool) -> Value {
    let bind: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let result = (|| -> std::io::Result<Value> {
        let s = UdpSocket::bind(bind)?;
        s.send_to(b"ping", target)?;
        if !want_reply {
            return Ok(json!({"ok": true}));
        }
        s.set_read_timeout(Some(WAIT))?;
        let mut buf = [0u8; 64];
        let (n, from) = s.recv_from(&mut buf)?;
        Ok(
            json!({"ok": true, "from": from.to_string(), "reply": String::from_utf8_lossy(&buf[..n])}),
        )
    })();
    result.unwrap_or_else(|e| err_json(&e))
}

fn udp_for(server: SocketAddr) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    UdpSocket::bind(bind)
}

fn dns_query(id: u16, name: &str, qtype: RecordType) -> Result<Vec<u8>, String> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    let name = Name::from_ascii(name).map_err(|e| format!("name {name}: {e}"))?;
    m.add_query(DnsQuery::query(name, qtype));
    m.to_vec().map_err(|e| e.to_string())
}

/// The response code's mnemonic (`NOERROR`, `NXDOMAIN`, `REFUSED`, ...).
fn rcode_name(code: ResponseCode) -> String {
    match code.low() {
        0 => "NOERROR".to_owned(),
        1 => "FORMERR".to_owned(),
        2 => "SERVFAIL".to_owned(),
        3 => "NXDOMAIN".to_owned(),
        4 => "NOTIMP".to_owned(),
        5 => "REFUSED".to_owned(),
        n => format!("RCODE{n}"),
    }
}

/// One DNS query, the way a stub resolver sends it (an unconnected UDP socket).
fn dns(server: SocketAddr, name: &str, qtype: &str) -> Value {
    let qtype: RecordType = parse(qtype, "record type");
    let result = (|| -> Result<Value, String> {
        let s = udp_for(server).map_err(|e| e.to_string())?;
        let id = u16::try_from(std::process::id() % 65_536).unwrap_or(7);
        s.send_to(&dns_query(id, name, qtype)?, server)
            .map_err(|e| format!("send: {e}"))?;
        s.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4096];
        let (n, from) = s.recv_from(&mut buf).map_err(|e| format!("recv: {e}"))?;
        let m = Message::from_vec(&buf[..n]).map_err(|e| format!("answer: {e}"))?;
        let answers: Vec<String> = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0.to_string()),
                RData::AAAA(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect();
        let ttls: Vec<u32> = m.answers.iter().map(|r| r.ttl).collect();
        Ok(json!({
            "ok": true,
            "from": from.to_string(),
            "id_matches": m.metadata.id == id,
            "rcode": rcode_name(m.metadata.response_code),
            "answers": answers,
            "ttls": ttls,
            "truncated": m.metadata.truncation,
        }))
    })();
    result.unwrap_or_else(|e| json!({"ok": false, "error": e}))
}

/// COUNT queries for `<i>.<pid>.SUFFIX`, sent back to back from one socket, then the answers
/// collected until none came for a second (at most 5 s): how many of each response code came
/// back. Datagrams the server's socket had no room for are simply never answered.
fn dns_flood(server: SocketAddr, count: u16, suffix: &str) -> Value {
    let result = (|| -> Result<Value, String> {
        let s = udp_for(server).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let pid = std::process::id();
        for i in 0..count {
            let q = dns_query(i, &format!("{i:04x}.{pid:x}.{suffix}"), RecordType::A)?;
            s.send_to(&q, server).map_err(|e| format!("send: {e}"))?;
        }
        let sent_in = started.elapsed();
        let mut codes = std::collections::BTreeMap::<String, u64>::new();
        let mut received = 0u16;
        let mut buf = [0u8; 4096];
        while received < count {
            let left = WAIT
                .saturating_sub(started.elapsed())
                .min(Duration::from_secs(1));
            if left.is_zero() {
                break;
            }
            s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            let Ok((n, _)) = s.recv_from(&mut buf) else {
                break;
            };
            received += 1;
            let code = Message::from_vec(&buf[..n]).map_or_else(
                |_| "unparsable".to_owned(),
                |m| rcode_name(m.metadata.response_code),
            );
            *codes.entry(code).or_default() += 1;
        }
        Ok(json!({
            "ok": true,
            "sent": count,
            "received": received,
            "send_ms": sent_in.as_millis(),
            "elapsed_ms": started.elapsed().as_millis(),
            "rcodes": codes,
            "names": format!("<i>.{pid:x}.{suffix}"),
        }))
    })();
    result.unwrap_or_else(|e| json!({"ok": false, "error": e}))
}

/// Try to create every kind of socket that would bypass the connect/sendmsg hooks.
fn sockets() -> Value {
    let kinds: [(&str, Domain, Type, Option<Protocol>); 7] = [
        ("raw_icmp4", Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)),
        ("raw_icmp6", Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)),
        ("ping4", Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4)),
        ("packet", Domain::PACKET, Type::RAW, None),
        (
            "sctp",
            Domain::IPV4,
            Type::STREAM,
            Some(Protocol::from(132)),
        ),
        ("tcp", Domain::IPV4, Type::STREAM, Some(Protocol::TCP)),
        ("udp6", Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)),
    ];
    let mut out = serde_json::Map::new();
    for (name, d, t, p) in kinds {
        let v = match Socket::new(d, t, p) {
            Ok(_) => json!({"ok": true}),
            Err(e) => err_json(&e),
        };
        out.insert(name.into(), v);
    }
    Value::Object(out)
}

/// Sequential connect + 1-byte read, latency per connection.
fn bench_connect(target: SocketAddr, count: u32) -> Value {
    let mut lat = Vec::with_capacity(count as usize);
    let mut errors = 0u32;
    let started = Instant::now();
    for _ in 0..count {
        let t0 = Instant::now();
        match TcpStream::connect_timeout(&target, WAIT) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(WAIT));
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).is_ok() {
                    lat.push(t0.elapsed());
                } else {
                    errors += 1;
                }
            }
            Err(_) => errors += 1,
        }
    }
    let total = started.elapsed();
    lat.sort();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "index into a short vector"
        )]
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i].as_secs_f64() * 1e6
    };
    #[expect(clippy::cast_precision_loss, reason = "rates are approximate")]
    let rate = lat.len() as f64 / total.as_secs_f64();
    json!({"count": lat.len(), "errors": errors, "p50_us": pct(0.5), "p99_us": pct(0.99), "per_sec": rate})
}

struct ListenArgs {
    udp: bool,
    addr: Option<SocketAddr>,
    v6: bool,
    dualstack: bool,
    send_to: Option<SocketAddr>,
    count: usize,
    wait: Duration,
}

fn stage_err(stage: &str, e: &std::io::Error) -> Value {
    json!({"ok": false, "stage": stage, "error": e.to_string(), "errno": errno(e)})
}

fn listen(a: &ListenArgs) -> Value {
    let domain = match a.addr {
        Some(addr) => Domain::for_address(addr),
        None if a.v6 => Domain::IPV6,
        None => Domain::IPV4,
    };
    let (ty, proto) = if a.udp {
        (Type::DGRAM, Protocol::UDP)
    } else {
        (Type::STREAM, Protocol::TCP)
    };
    let s = match Socket::new(domain, ty, Some(proto)) {
        Ok(s) => s,
        Err(e) => return stage_err("socket", &e),
    };
    if a.dualstack
        && let Err(e) = s.set_only_v6(false)
    {
        return stage_err("dualstack", &e);
    }
    if let Some(addr) = a.addr
        && let Err(e) = s.bind(&addr.into())
    {
        return stage_err("bind", &e);
    }
    let mut send = Value::Null;
    if a.udp {
        if let Some(to) = a.send_to {
            send = match s.send_to(b"query", &to.into()) {
                Ok(_) => json!({"ok": true}),
                Err(e) => err_json(&e),
            };
        }
    } else if let Err(e) = s.listen(16) {
        return stage_err("listen", &e);
    }
    let local = s
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.to_string());
    println!("{}", json!({"ok": true, "local": local, "send": send}));
    let deadline = Instant::now() + a.wait;
    let remaining = || deadline.saturating_duration_since(Instant::now());
    let mut got = Vec::new();
    if a.udp {
        let sock: UdpSocket = s.into();
        let mut buf = [0u8; 512];
        while !remaining().is_zero() {
            if sock.set_read_timeout(Some(remaining())).is_err() {
                break;
            }
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                break;
            };
            let data = String::from_utf8_lossy(&buf[..n]).into_owned();
            let end = data == "end";
            got.push(json!({"from": from.to_string(), "data": data}));
            if end {
                break;
            }
        }
        return json!({"received": got});
    }
    while got.len() < a.count && !remaining().is_zero() {
        if s.set_read_timeout(Some(remaining())).is_err() {
            break;
        }
        let Ok((conn, peer)) = s.accept() else {
            break;
        };
        let stream: TcpStream = conn.into();
        let _ = stream.set_read_timeout(Some(WAIT));
        let mut line = String::new();
        let _ = BufReader::new(&stream).read_line(&mut line);
        let line = line.trim_end().to_owned();
        let _ = (&stream).write_all(format!("echo:{line}\n").as_bytes());
        got.push(json!({"peer": peer.as_socket().map(|p| p.to_string()), "got": line}));
    }
    json!({"accepted": got})
}

fn listen_args(args: &[String]) -> ListenArgs {
    let udp = match args.get(1).map(String::as_str) {
        Some("tcp") => false,
        Some("udp") => true,
        other => {
            eprintln!("pdk-client listen: tcp or udp, not {other:?}");
            std::process::exit(2)
        }
    };
    let addr = match args.get(2).map(String::as_str) {
        Some("none") => None,
        Some(a) => Some(parse(a, "address")),
        None => {
            eprintln!("pdk-client listen: missing address (or none)");
            std::process::exit(2)
        }
    };
    ListenArgs {
        udp,
        addr,
        v6: flag_value(args, "--family") == Some("6"),
        dualstack: args.iter().any(|a| a == "--dualstack"),
        send_to: flag_value(args, "--send-to").map(|t| parse(t, "send-to")),
        count: flag_value(args, "--count").map_or(1, |c| parse(c, "count")),
        wait: Duration::from_millis(
            flag_value(args, "--wait-ms").map_or(10_000, |w| parse(w, "wait-ms")),
        ),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!(
            "usage: pdk-client tcp|tcp-many|udp|sockets|bench-connect|dns|dns-flood|listen ..."
        );
        std::process::exit(2);
    };
    let arg = |i: usize| -> &str {
        args.get(i).map_or_else(
            || {
                eprintln!("pdk-client {cmd}: missing argument {i}");
                std::process::exit(2)
            },
            String::as_str,
        )
    };
    let out = match cmd.as_str() {
        "tcp" => tcp(
            parse(arg(1), "target"),
            flag_value(&args, "--bind").map(|b| parse(b, "bind")),
            flag_value(&args, "--mark").map(|m| parse(m, "mark")),
            args.iter().any(|a| a == "--dualstack"),
        ),
        "tcp-many" => {
            use nix::sys::resource::{Resource, getrlimit, setrlimit};
            if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
                let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
            }
            tcp_many(parse(arg(1), "count"))
        }
        "tcp-hold" => {
            use nix::sys::resource::{Resource, getrlimit, setrlimit};
            // One descriptor per connection: the hard limit (20,000 on the project's
            // machines, which do not grant CAP_SYS_RESOURCE) bounds one client; run several.
            if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
                let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
            }
            tcp_hold(
                parse(arg(1), "count"),
                flag_value(&args, "--offset").map_or(0, |n| parse(n, "offset")),
                args.iter().any(|a| a == "--plain"),
                flag_value(&args, "--sources").map_or(1, |n| parse(n, "sources")),
            )
        }
        "udp" => udp(parse(arg(1), "target"), args.iter().any(|a| a == "--reply")),
        "sockets" => sockets(),
        "bench-connect" => bench_connect(parse(arg(1), "target"), parse(arg(2), "count")),
        "dns" => dns(parse(arg(1), "server"), arg(2), arg(3)),
        "dns-flood" => dns_flood(parse(arg(1), "server"), parse(arg(2), "count"), arg(3)),
        "listen" => listen(&listen_args(&args)),
        other => {
            eprintln!("pdk-client: unknown command {other}");
            std::process::exit(2)
        }
    };
    println!("{out}");
}
