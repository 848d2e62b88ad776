//! Bounds and timeouts for the request loop.

use std::time::Duration;

use http::HeaderValue;

/// hyper refuses (panics on) an HTTP/1 read buffer below this size.
pub(crate) const MIN_H1_BUF: usize = 8192;

/// Size caps and timeouts applied to both legs of a proxied connection.
///
/// The connection-level idle timeout is the caller's job (it owns the socket); these are
/// the per-request bounds the request loop enforces itself.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Largest request head accepted from the agent, in bytes: HTTP/1 read buffer size
    /// (at least 8 KiB) and HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE`. Larger heads get 431.
    pub max_header_bytes: usize,
    /// Most header fields in one HTTP/1 request head.
    pub max_headers: usize,
    /// Time the agent has to send a complete HTTP/1 request head.
    pub header_read_timeout: Duration,
    /// An HTTP/1.1 agent connection quiet for this long between requests is parked: its HTTP
    /// server (about 20 KiB of buffers) is dropped until its next bytes arrive. `None`
    /// keeps every server for the connection's life.
    pub park_after: Option<Duration>,
    /// Dial plus handshake of a new upstream connection; exceeded -> 504.
    pub upstream_connect_timeout: Duration,
    /// From sending a request upstream to receiving its response head; exceeded -> 504.
    /// Generous by default: model APIs may think for minutes before answering.
    pub upstream_response_timeout: Duration,
    /// How long an idle pooled upstream connection is kept.
    pub pool_idle_timeout: Duration,
    /// Idle pooled upstream connections kept per destination.
    pub pool_max_idle_per_host: usize,
    /// Concurrent HTTP/2 streams the agent may open on one connection.
    pub h2_max_concurrent_streams: u32,
    /// When set, this value is appended as a `Via` entry (for example `1.1 paddock`) on
    /// forwarded requests and responses. Off by default: it reveals the proxy.
    pub via: Option<HeaderValue>,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(30),
            park_after: Some(Duration::from_millis(250)),
            upstream_connect_timeout: Duration::from_secs(30),
            upstream_response_timeout: Duration::from_mins(10),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 32,
            h2_max_concurrent_streams: 256,
            via: None,
        }
    }
}

/// hyper's HTTP/1 header count limit when none is set (`proto::h1::role::DEFAULT_MAX_HEADERS`).
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

impl HttpLimits {
    /// The HTTP/1 read buffer size, raised to hyper's minimum.
    pub(crate) fn h1_buf_size(&self) -> usize {
        self.max_header_bytes.max(MIN_H1_BUF)
    }

    /// The header count to hand hyper's HTTP/1 builders: `None` when it is hyper's own
    /// default (100), which hyper enforces with a fixed array; a count given explicitly,
    /// even the same one, makes it fill a 100-entry vector twice for every message parsed
    /// (about 1 % of a keep-alive request's CPU, on each leg).
    pub(crate) fn h1_max_headers(&self) -> Option<usize> {
        (self.max_headers != HYPER_DEFAULT_MAX_HEADERS).then_some(self.max_headers)
    }

    /// The HTTP/2 header list cap, saturated into the protocol's 32-bit setting.
    pub(crate) fn h2_header_list_size(&self) -> u32 {
        u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX)
    }
}
