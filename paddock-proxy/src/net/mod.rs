//! Network defences: the proxy's own DNS resolution, the denied-CIDR set, vetting of
//! destinations (including the transparent-mode DNS-rebinding check) and dialling.

pub mod cidr;

pub use cidr::{CidrConfig, CidrConfigError, CidrPolicy, DeniedCidr, Embedding, RangeKind};
pub mod resolve;
pub mod vet;
#[cfg(test)]
pub(crate) mod test_dns;

pub use resolve::{DnsResolver, ResolveError, ResolverInitError, ResolverSettings};
pub use vet::{VetError, Vetted, Vetter};
