//! API key RPCs on the wire: `CreateApiKey` (the key is in the response once), `ListApiKeys`
//! (never a secret), `RevokeApiKey` (the key fails its next call). Who may manage which key,
//! the audit and the storage are the core's operations ([`crate::api_keys::create_by`],
//! [`crate::api_keys::list_visible`], [`crate::api_keys::revoke_by`]); this file only converts.

use crate::api_keys;
use crate::authz::Principal;
use crate::convert::timestamp;
use crate::ops::Error;
use crate::state::BrokerState;
use tokenfleet_domain::ApiKey;
use tokenfleet_proto::v1 as pb;

/// The public fields of a key (never its hash).
fn to_proto(key: &ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: key.id.clone(),
        role: key.role.as_str().to_owned(),
        tenant: key.tenant.clone().unwrap_or_default(),
        description: key.description.clone(),
        create_time: Some(timestamp(key.created)),
    }
}

pub(super) async fn create(
    state: &BrokerState,
    principal: &Principal,
    req: pb::CreateApiKeyRequest,
) -> Result<pb::CreateApiKeyResponse, Error> {
    let (record, key) =
        api_keys::create_by(state, principal, &req.role, &req.tenant, &req.description).await?;
    Ok(pb::CreateApiKeyResponse {
        api_key: Some(to_proto(&record)),
        key: key.expose().to_owned(),
    })
}

pub(super) async fn list(
    state: &BrokerState,
    principal: &Principal,
    req: pb::ListApiKeysRequest,
) -> Result<pb::ListApiKeysResponse, Error> {
    let keys = api_keys::list_visible(state, principal, &req.tenant).await?;
    Ok(pb::ListApiKeysResponse {
        api_keys: keys.iter().map(to_proto).collect(),
    })
}

pub(super) async fn revoke(
    state: &BrokerState,
    principal: &Principal,
    req: pb::RevokeApiKeyRequest,
) -> Result<pb::RevokeApiKeyResponse, Error> {
    api_keys::revoke_by(state, principal, &req.id).await?;
    Ok(pb::RevokeApiKeyResponse {})
}
