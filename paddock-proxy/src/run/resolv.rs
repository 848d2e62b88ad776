//! The resolvers the command may use: read from `/etc/resolv.conf`, so its DNS keeps working
//! while every other UDP exit is closed.

use std::net::{IpAddr, SocketAddr};

/// Nameserver addresses in resolv.conf text, in order (port 53). Scoped IPv6 link-local
/// entries (`fe80::1%eth0`) are skipped: the eBPF config has no scope id.
pub fn nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            words.next()?.parse::<IpAddr>().ok()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// At most one resolver per family, as the per-cgroup config allows.
pub fn one_per_family(all: &[SocketAddr]) -> Vec<SocketAddr> {
    let v4 = all.iter().find(|a| a.is_ipv4());
    let v6 = all.iter().find(|a| a.is_ipv6());
    v4.into_iter().chain(v6).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nameservers_and_keeps_one_per_family() {
        let text = "# generated\nsearch example\nnameserver 10.0.2.3\nnameserver 1.1.1.1\nnameserver fd00::53\nnameserver fe80::1%eth0\nnameserver bogus\noptions edns0\n";
        let all = nameservers(text);
        assert_eq!(all.len(), 3);
        let picked = one_per_family(&all);
        assert_eq!(
            picked,
            vec![
                "10.0.2.3:53".parse::<SocketAddr>().expect("addr"),
                "[fd00::53]:53".parse().expect("addr")
            ]
        );
        assert!(nameservers("").is_empty());
    }
}
