//! Every JSON body of the broker API: the requests the broker decodes and the answers the
//! proxy decodes. Whatever decodes must re-encode to an equal value (no lossy field).
#![no_main]

use libfuzzer_sys::fuzz_target;
use paddock_wire::api::{
    ErrorBody, GrantEvent, GrantPollRequest, GrantPollResponse, GrantTerms, InvalidationScope,
    IssueRequest, IssueResponse, LeasesQuery, LeasesResponse, PingResponse, RenewRequest,
    RenewResponse, RevokeRequest, RevokeResponse, RunUpsertRequest, SubstituteAuthRequest,
    SubstituteAuthResponse, ValidateEgressRequest, ValidateEgressResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn round_trip<T>(data: &[u8])
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let Ok(value) = serde_json::from_slice::<T>(data) else {
        return;
    };
    let encoded = serde_json::to_vec(&value).expect("a decoded value encodes");
    let again: T = serde_json::from_slice(&encoded).expect("its own encoding decodes");
    assert_eq!(again, value, "JSON round trip changed the value");
}

fuzz_target!(|data: &[u8]| {
    round_trip::<IssueRequest>(data);
    round_trip::<RenewRequest>(data);
    round_trip::<RevokeRequest>(data);
    round_trip::<ValidateEgressRequest>(data);
    round_trip::<SubstituteAuthRequest>(data);
    round_trip::<RunUpsertRequest>(data);
    round_trip::<LeasesQuery>(data);
    round_trip::<IssueResponse>(data);
    round_trip::<RenewResponse>(data);
    round_trip::<RevokeResponse>(data);
    round_trip::<ValidateEgressResponse>(data);
    round_trip::<SubstituteAuthResponse>(data);
    round_trip::<LeasesResponse>(data);
    round_trip::<ErrorBody>(data);
    round_trip::<GrantPollRequest>(data);
    round_trip::<GrantPollResponse>(data);
    round_trip::<GrantEvent>(data);
    round_trip::<InvalidationScope>(data);
    round_trip::<GrantTerms>(data);
    round_trip::<PingResponse>(data);
});
