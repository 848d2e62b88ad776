//! Shared by the HTTP benchmarks: reading `wrk --latency` output, taking medians and naming
//! the machine, so every benchmark reports the same way.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// One `wrk` run: requests per second and latency percentiles.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

fn parse_duration_ms(text: &str) -> Option<f64> {
    let (num, unit) = text
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| text.split_at(i))?;
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

/// Parse `wrk --latency` output; any non-2xx/3xx response or socket error fails the sample,
/// so a benchmark never reports the speed of error pages.
pub fn parse(out: &str) -> Result<Sample> {
    if out.contains("Non-2xx or 3xx responses") || out.contains("Socket errors") {
        bail!("wrk saw failed requests:\n{out}");
    }
    let per_sec = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{out}"))?;
    let pct = |p: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .and_then(|v| parse_duration_ms(v.trim()))
            .with_context(|| format!("no {p} latency in wrk output:\n{out}"))
    };
    Ok(Sample {
        per_sec,
        p50_ms: pct("50%")?,
        p99_ms: pct("99%")?,
    })
}

/// The sample with the median request rate (rounds of one mode).
///
/// # Panics
/// If `xs` is empty.
#[must_use]
pub fn median(mut xs: Vec<Sample>) -> Sample {
    xs.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
    xs[xs.len() / 2]
}

/// `uname -r`, for the benchmark's description.
#[must_use]
pub fn kernel() -> String {
    Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Usable CPUs, for the benchmark's description.
#[must_use]
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "Running 5s test @ https://api.paddock.test/
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.50us  300.10us   9.81ms   90.00%
    Req/Sec     9.80k   500.00    10.50k    70.00%
  Latency Distribution
     50%  750.00us
     75%  900.00us
     90%    1.10ms
     99%    2.05ms
  48790 requests in 5.00s, 10.50MB read
Requests/sec:   9757.83
Transfer/sec:      2.10MB
";

    #[test]
    fn parses_rate_and_percentiles() {
        let s = parse(OUT).expect("parse");
        assert!((s.per_sec - 9757.83).abs() < 1e-6);
        assert!((s.p50_ms - 0.75).abs() < 1e-9);
        assert!((s.p99_ms - 2.05).abs() < 1e-9);
    }

    #[test]
    fn failed_requests_and_garbage_are_errors() {
        let bad = OUT.replace(
            "Requests/sec",
            "  Non-2xx or 3xx responses: 12\nRequests/sec",
        );
        assert!(parse(&bad).is_err());
        let errs = OUT.replace(
            "Requests/sec",
            "  Socket errors: connect 0, read 3, write 0, timeout 0\nRequests/sec",
        );
        assert!(parse(&errs).is_err());
        assert!(parse("wrk: command not found").is_err());
        assert!(parse(&OUT.replace("99%    2.05ms", "99%    2.05xs")).is_err());
    }

    #[test]
    fn median_picks_the_middle_rate() {
        let s = |r| Sample {
            per_sec: r,
            p50_ms: r,
            p99_ms: r,
        };
        let m = median(vec![s(3.0), s(1.0), s(2.0)]);
        assert!((m.per_sec - 2.0).abs() < f64::EPSILON);
    }
}
