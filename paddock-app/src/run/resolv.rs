//! The resolv.conf the command sees inside its network namespace: it names only the run's own
//! DNS sockets there, which the proxy's policy-aware DNS server serves (`paddock_proxy::dns`).

/// The command's resolv.conf: the run's DNS sockets inside its namespace (`127.0.0.1`, and
/// `::1` when it has IPv6), keeping the host's `search`, `domain` and `options` lines.
pub fn sandbox_resolv_conf(host: &str, ipv6: bool) -> String {
    let mut out = String::from("# paddock-proxy run: the run's own DNS inside the sandbox\n");
    out.push_str("nameserver 127.0.0.1\n");
    if ipv6 {
        out.push_str("nameserver ::1\n");
    }
    for line in host.lines() {
        let first = line.split_whitespace().next();
        if matches!(first, Some("search" | "domain" | "options")) && !line.contains('\0') {
            out.push_str(line.trim());
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, SocketAddr};

    /// Nameserver addresses in resolv.conf text, in order (port 53).
    fn nameservers(text: &str) -> Vec<SocketAddr> {
        text.lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                (words.next()? == "nameserver").then_some(())?;
                words.next()?.parse::<IpAddr>().ok()
            })
            .map(|ip| SocketAddr::new(ip, 53))
            .collect()
    }

    #[test]
    fn the_sandbox_resolv_conf_names_only_loopback_and_keeps_search_and_options() {
        let host = "nameserver 10.0.0.2\nsearch corp.example\noptions edns0 trust-ad\n# c\nnameserver ::5\n";
        let r = sandbox_resolv_conf(host, true);
        assert_eq!(
            nameservers(&r),
            vec![
                "127.0.0.1:53".parse::<SocketAddr>().expect("addr"),
                "[::1]:53".parse().expect("addr")
            ]
        );
        assert!(r.contains("search corp.example\n") && r.contains("options edns0 trust-ad\n"));
        assert!(!r.contains("10.0.0.2"));
        let v4 = sandbox_resolv_conf(host, false);
        assert_eq!(nameservers(&v4).len(), 1);
    }
}
