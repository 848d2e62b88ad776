use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use http::{Method, StatusCode, Uri, Version};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::*;
use crate::metrics::ProxyMetrics;
use crate::policy::Mode;

fn event(kind: AuditKind) -> AuditEvent {
    AuditEvent::new(kind, "run-7", Mode::Transparent, 443)
        .with_dst("127.0.0.1:443".parse().expect("addr"))
        .with_sni("api.example.com")
}

#[test]
fn jsonl_file_reopen_follows_a_rotation_and_keeps_the_old_file_when_it_cannot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let rotated = dir.path().join("audit.jsonl.1");
    let sink = JsonlFileSink::open(&path).expect("open");
    sink.record(&event(AuditKind::Allow)).expect("record");
    std::fs::rename(&path, &rotated).expect("rotate");
    // Until told, records follow the open file (logrotate's window before its SIGHUP).
    sink.record(&event(AuditKind::Deny)).expect("record");
    sink.reopen().expect("reopen");
    sink.record(&event(AuditKind::Allow).with_rule("after"))
        .expect("record");
    let old = std::fs::read_to_string(&rotated).expect("read rotated");
    let new = std::fs::read_to_string(&path).expect("read new");
    assert_eq!(old.lines().count(), 2, "{old}");
    assert_eq!(new.lines().count(), 1, "{new}");
    assert!(new.contains("\"after\""), "{new}");
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // A path that now names a symlink is refused; the sink keeps writing where it was.
    let second = dir.path().join("audit.jsonl.2");
    std::fs::rename(&path, &second).expect("rotate again");
    std::os::unix::fs::symlink(&rotated, &path).expect("symlink");
    let err = sink.reopen().expect_err("symlink refused");
    assert!(matches!(err, AuditError::Open { .. }), "{err}");
    sink.record(&event(AuditKind::Deny))
        .expect("record after failed reopen");
    let kept = std::fs::read_to_string(&second).expect("read");
    assert_eq!(kept.lines().count(), 2, "{kept}");
    let through_link = std::fs::read_to_string(&rotated).expect("read rotated");
    assert_eq!(
        through_link.lines().count(),
        2,
        "nothing written via the link"
    );
}

/// A disk of `room` bytes: writes fill it and then fail with ENOSPC part way; the end
/// can be cut off again (unless `stuck`).
#[derive(Debug, Default)]
struct SmallDisk {
    bytes: Vec<u8>,
    room: usize,
    stuck: bool,
}

impl Write for SmallDisk {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.room - self.bytes.len());
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.bytes.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AppendTarget for SmallDisk {
    fn cut_end(&mut self, bytes: u64) -> io::Result<()> {
        if self.stuck {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let keep = self.bytes.len() - usize::try_from(bytes).expect("small");
        self.bytes.truncate(keep);
        Ok(())
    }
}

fn lines_of(disk: &SmallDisk) -> Vec<String> {
    String::from_utf8(disk.bytes.clone())
        .expect("utf-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_record_that_does_not_fit_is_cut_off_whole_and_the_next_one_starts_clean() {
    let line = |rule: &str| {
        event(AuditKind::Allow)
            .with_rule(rule)
            .to_line()
            .expect("line")
    };
    let first = line("first");
    let mut out = Appender::new(SmallDisk {
        room: first.len() + 40,
        ..SmallDisk::default()
    });
    out.append(&first).expect("fits");
    let err = out.append(&line("second")).expect_err("the disk is full");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(
        String::from_utf8_lossy(&out.file.bytes),
        String::from_utf8_lossy(&first),
        "the torn record was cut off"
    );
    // Space again: the next record is whole, on its own line.
    out.file.room = 4096;
    out.append(&line("third")).expect("fits");
    let lines = lines_of(&out.file);
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        serde_json::from_str::<serde_json::Value>(l).expect("a whole record");
    }
    assert!(lines[1].contains("\"third\""));

    // When the torn part cannot be cut off, the next record still starts a line of its own.
    let mut out = Appender::new(SmallDisk {
        room: first.len() + 40,
        stuck: true,
        ..SmallDisk::default()
    });
    out.append(&first).expect("fits");
    out.append(&line("second")).expect_err("the disk is full");
    out.file.room = 4096;
    out.file.stuck = false;
    out.append(&line("third")).expect("fits");
    let lines = lines_of(&out.file);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(serde_json::from_str::<serde_json::Value>(&lines[0]).is_ok());
    assert!(
        serde_json::from_str::<serde_json::Value>(&lines[1]).is_err(),
        "the torn one"
    );
    let third: serde_json::Value = serde_json::from_str(&lines[2]).expect("whole");
    assert_eq!(third["rule"], "third");
}

#[test]
fn jsonl_file_appends_flushed_lines_with_0600() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let sink = JsonlFileSink::open(&path).expect("open");
    sink.record(&event(AuditKind::Allow).with_rule("github"))
        .expect("record");
    // Visible to a reader before the sink is dropped: written through, not buffered.
    let text = std::fs::read_to_string(&path).expect("read");
    assert_eq!(text.lines().count(), 1);
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Reopening appends.
    drop(sink);
    let sink = JsonlFileSink::open(&path).expect("reopen");
    sink.record(&event(AuditKind::Deny).with_reason("no egress rule allows api.example.com:443"))
        .expect("record");
    let text = std::fs::read_to_string(&path).expect("read");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["kind"], "allow");
    assert_eq!(lines[0]["rule"], "github");
    assert_eq!(lines[0]["reason"], serde_json::Value::Null);
    assert_eq!(lines[1]["kind"], "deny");
    assert_eq!(lines[1]["run"], "run-7");
    assert_eq!(lines[1]["dst"], "127.0.0.1:443");
    assert_eq!(lines[1]["port"], 443);
    assert_eq!(lines[1]["sni"], "api.example.com");
    assert_eq!(lines[1]["mode"], "transparent");
    assert_eq!(
        lines[1]["reason"],
        "no egress rule allows api.example.com:443"
    );
    let ts = lines[1]["ts"].as_str().expect("ts string");
    assert!(OffsetDateTime::parse(ts, &Rfc3339).is_ok(), "ts {ts}");
}

#[test]
fn request_record_shape_keeps_the_path_only() {
    let uri: Uri = "https://api.example.com/v1/messages?key=pdk-user-secret-0123&x=1"
        .parse()
        .expect("uri");
    let ev = event(AuditKind::Request)
        .with_request(&Method::POST, &uri, Version::HTTP_2)
        .with_status(StatusCode::OK)
        .with_outcome(RequestOutcome::Forwarded)
        .with_credential(Some("anthropic".into()), Some("lease-1".into()));
    let line = String::from_utf8(ev.to_line().expect("line")).expect("utf-8");
    assert!(!line.contains("pdk-") && !line.contains("key="), "{line}");
    let v: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert_eq!(v["kind"], "request");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/v1/messages");
    assert_eq!(v["status"], 200);
    assert_eq!(v["protocol"], "HTTP/2");
    assert_eq!(v["outcome"], "forwarded");
    assert_eq!(v["credential"], "anthropic");
    assert_eq!(v["lease_id"], "lease-1");
    assert_eq!(v["reason"], serde_json::Value::Null);
    assert_eq!(v["sni"], "api.example.com");

    // Connection records keep their shape; the request fields are null.
    let v: serde_json::Value = serde_json::from_slice(
        &event(AuditKind::Allow)
            .with_rule("r")
            .to_line()
            .expect("line"),
    )
    .expect("json");
    for field in [
        "method",
        "path",
        "status",
        "protocol",
        "credential",
        "lease_id",
        "outcome",
    ] {
        assert_eq!(v.get(field), Some(&serde_json::Value::Null), "{field}");
    }
}

#[test]
fn placeholders_are_redacted_wherever_the_agent_put_them() {
    const BEARER: &str = "pdk-user-secret-0123456789abcdef0123456789abcdef0123456789abcdef";
    let encoded = BEARER.replace('p', "%70").replace('-', "%2D");
    for (path, want) in [
        (format!("/bot{BEARER}/send"), "/[redacted]/send".to_owned()),
        (format!("/a/{encoded}"), "/a/[redacted]".to_owned()),
        (format!("/x/{BEARER}"), "/x/[redacted]".to_owned()),
        (format!("/x/{BEARER}ff.json"), "/x/[redacted]".to_owned()),
        // Not well-formed placeholders: kept.
        ("/docs/pdk-guide".into(), "/docs/pdk-guide".into()),
        ("/a%20b/".into(), "/a%20b/".into()),
        ("/".into(), "/".into()),
    ] {
        let uri: Uri = format!("https://h{path}?k={BEARER}").parse().expect("uri");
        let ev = event(AuditKind::Request).with_request(&Method::GET, &uri, Version::HTTP_11);
        assert_eq!(ev.path.as_deref(), Some(want.as_str()), "{path}");
    }
    let method = Method::from_bytes(BEARER.as_bytes()).expect("a token is a method");
    let uri: Uri = "https://h/".parse().expect("uri");
    let ev = event(AuditKind::Request).with_request(&method, &uri, Version::HTTP_11);
    assert_eq!(ev.method.as_deref(), Some("[redacted]"), "method");
    let ev = event(AuditKind::Request)
        .with_sni(BEARER)
        .with_reason(format!(
            "misdirected_request: request for x{BEARER}:443 on ..."
        ));
    let line = String::from_utf8(ev.to_line().expect("line")).expect("utf-8");
    assert!(!line.contains(BEARER), "{line}");
    assert_eq!(ev.sni.as_deref(), Some("[redacted]"));
    assert_eq!(
        ev.reason.as_deref(),
        Some("misdirected_request: request for x[redacted]:443 on ...")
    );
}

#[test]
fn existing_loose_file_is_tightened_and_symlinks_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, b"").expect("create");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    JsonlFileSink::open(&path).expect("open");
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let link = dir.path().join("link.jsonl");
    std::os::unix::fs::symlink(&path, &link).expect("symlink");
    assert!(matches!(
        JsonlFileSink::open(&link),
        Err(AuditError::Open { .. })
    ));
}

#[test]
fn caller_rule_drops_on_deny_and_counts_on_allow() {
    // /dev/full accepts the open and fails every write with ENOSPC.
    let sink = JsonlFileSink::open(Path::new("/dev/full")).expect("open /dev/full");
    let metrics = ProxyMetrics::new();
    assert!(matches!(
        sink.record(&event(AuditKind::Allow)),
        Err(AuditError::Write { .. })
    ));
    let table = [
        (AuditKind::Allow, AuditOutcome::Proceed),
        (AuditKind::Discovery, AuditOutcome::Proceed),
        (AuditKind::Deny, AuditOutcome::DropConnection),
        (AuditKind::ConnectReason, AuditOutcome::DropConnection),
    ];
    for (kind, want) in table {
        assert_eq!(
            audit_decision(&sink, &metrics, &event(kind)),
            want,
            "{kind}"
        );
        assert_eq!(metrics.audit_write_failures(kind), 1, "{kind}");
    }
    // Requests: a forwarded one proceeds; one the proxy answered itself (or one without
    // an outcome) does not.
    let request = |outcome: Option<RequestOutcome>| {
        let ev = event(AuditKind::Request);
        match outcome {
            Some(o) => ev.with_outcome(o),
            None => ev,
        }
    };
    let table = [
        (Some(RequestOutcome::Forwarded), AuditOutcome::Proceed),
        (Some(RequestOutcome::Abandoned), AuditOutcome::Proceed),
        (Some(RequestOutcome::Denied), AuditOutcome::DropConnection),
        (Some(RequestOutcome::Failed), AuditOutcome::DropConnection),
        (None, AuditOutcome::DropConnection),
    ];
    for (i, (outcome, want)) in table.into_iter().enumerate() {
        assert_eq!(
            audit_decision(&sink, &metrics, &request(outcome)),
            want,
            "{outcome:?}"
        );
        assert_eq!(
            metrics.audit_write_failures(AuditKind::Request),
            u64::try_from(i + 1).expect("small"),
            "{outcome:?}"
        );
    }
    // A working sink proceeds on every path and counts nothing.
    let dir = tempfile::tempdir().expect("tempdir");
    let ok = JsonlFileSink::open(&dir.path().join("a.jsonl")).expect("open");
    let fresh = ProxyMetrics::new();
    for kind in AuditKind::ALL {
        assert_eq!(
            audit_decision(&ok, &fresh, &event(*kind)),
            AuditOutcome::Proceed
        );
        assert_eq!(fresh.audit_write_failures(*kind), 0);
    }
}

#[test]
fn audit_target_parsing() {
    let ok = [
        ("none", AuditTarget::None),
        ("stdout", AuditTarget::Stdout),
        ("-", AuditTarget::Stdout),
        (
            "/var/log/paddock/audit.jsonl",
            AuditTarget::File("/var/log/paddock/audit.jsonl".into()),
        ),
        (
            "file:/tmp/a.jsonl",
            AuditTarget::File("/tmp/a.jsonl".into()),
        ),
    ];
    for (input, want) in ok {
        assert_eq!(input.parse::<AuditTarget>().ok(), Some(want), "{input}");
    }
    for bad in [
        "",
        "None",
        "nnone",
        "audit.jsonl",
        "file:",
        "file:rel.jsonl",
        "/",
    ] {
        assert!(
            matches!(bad.parse::<AuditTarget>(), Err(AuditError::BadTarget(_))),
            "{bad:?} accepted"
        );
    }
    let none = AuditTarget::None.open().expect("none");
    assert!(none.is_disabled());
    assert!(none.record(&event(AuditKind::Deny)).is_ok());
    assert!(!AuditTarget::Stdout.open().expect("stdout").is_disabled());
}

#[test]
fn file_health_reports_a_deleted_file_a_failed_write_and_a_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let sink = JsonlFileSink::open(&path).expect("open");
    let ok = sink.health().expect("a fresh file is healthy");
    assert!(ok.contains("appending to"), "{ok}");

    std::fs::rename(&path, dir.path().join("audit.jsonl.1")).expect("rotate");
    let rotated = sink.health().expect("a renamed file still takes records");
    assert!(rotated.contains("SIGHUP"), "{rotated}");

    sink.reopen().expect("reopen");
    std::fs::remove_file(&path).expect("delete");
    let deleted = sink.health().expect_err("records would be lost");
    assert!(deleted.contains("deleted"), "{deleted}");
    sink.reopen().expect("reopen creates it again");
    sink.health().expect("healthy after the reopen");

    // A device that is always full: the write fails, and readiness says so until one succeeds.
    let full = JsonlFileSink::open(Path::new("/dev/full")).expect("open /dev/full");
    full.health().expect("nothing failed yet");
    full.record(&event(AuditKind::Allow))
        .expect_err("/dev/full refuses writes");
    let failed = full.health().expect_err("the last write failed");
    assert!(failed.contains("last write"), "{failed}");
}

#[test]
fn sinks_without_a_file_are_healthy() {
    assert!(StdoutSink.health().is_ok());
    assert!(NoAudit::explicitly_disabled().health().is_ok());
}
