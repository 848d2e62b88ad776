//! Network defences: the proxy's own DNS resolution, the denied-CIDR set, vetting of
//! destinations (including the transparent-mode DNS-rebinding check) and dialling.

pub mod cidr;
pub mod dial;

pub mod prefixed;

pub use cidr::{CidrConfig, CidrConfigError, CidrPolicy, DeniedCidr, Embedding, RangeKind};
pub mod resolve;
pub mod splice;
#[cfg(any(test, feature = "test-support"))]
#[doc(hidden)]
pub mod test_dns;
pub mod vet;

pub use dial::{AttemptError, DialError, DialSettings, Dialed, dial};
pub use resolve::{DnsResolver, ResolveError, ResolverInitError, ResolverSettings};
pub use vet::{VetError, Vetted, Vetter};
