//! Provider base URLs (a GitHub Enterprise API, a token endpoint): what a policy may name.
//!
//! A leaf, so the policy checks (which refuse a bad URL when the policy loads) and the
//! providers (which refuse it again before calling it) share one rule without depending on
//! each other.

use std::net::IpAddr;

/// `localhost` or a loopback address literal (bracketed IPv6 too).
pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Checks a provider base URL: `https`, or `http` to a loopback host.
pub fn validate_base_url(raw: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(raw).map_err(|e| format!("invalid URL {raw:?}: {e}"))?;
    let host = u
        .host_str()
        .ok_or_else(|| format!("URL {raw:?} has no host"))?;
    match u.scheme() {
        "https" => {}
        "http" if is_loopback(host) => {}
        _ => {
            return Err(format!(
                "URL {raw:?} must use https (http only for loopback hosts)"
            ));
        }
    }
    if !u.username().is_empty()
        || u.password().is_some()
        || u.query().is_some()
        || u.fragment().is_some()
    {
        return Err(format!(
            "URL {raw:?} must not carry credentials, a query or a fragment"
        ));
    }
    Ok(u)
}
