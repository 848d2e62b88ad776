//! Entry points for the `cargo fuzz` targets in `fuzz/` (not an API; hidden from docs).

use crate::wire::SubstituteAuthRequest;

/// The placeholder the broker finds in a substitute-auth request (`Err`: it refuses the
/// request, for instance for two distinct placeholders), and the number of places it sits.
pub fn find_placeholder(req: &SubstituteAuthRequest) -> Result<(Option<String>, usize), String> {
    crate::broker::find_placeholders(req)
        .map(|(token, placements, _)| (token, placements.len()))
        .map_err(|e| e.to_string())
}
