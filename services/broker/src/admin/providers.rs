//! Providers on the wire: the Admin API's provider calls convert the `Provider` message to the
//! core's [`ProviderInput`] and its [`ProviderView`] back (secrets only as `*_set` flags), and
//! call the core's domain-typed provider resource ([`tokenfleet_core::resources::Providers`]:
//! authorization including where a provider may point, validation, sealing of secrets,
//! re-pointing and its grants, versions, references, audit).

use tokenfleet_core::resources::providers::{ProviderInput, ProviderView};
use tokenfleet_proto::v1 as pb;

pub(crate) use tokenfleet_core::resources::Providers;

use crate::convert;

/// The core's form of a provider a caller sent (validated by the core, after authorization).
pub(crate) fn provider_in(wire: Option<pb::Provider>) -> ProviderInput {
    convert::provider_in(&wire.unwrap_or_default())
}

/// The wire form of a provider as reads show it.
pub(crate) fn provider_out(view: ProviderView) -> pb::Provider {
    convert::provider_view_to_proto(&view)
}
