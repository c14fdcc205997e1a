//! Agent enrollment RPCs on the wire: `CreateEnrollmentCode` (the code is in the response once)
//! and `RevokeAgent`. The operations (authorization, the agent record, the code, audit) are the
//! core's [`crate::identity::enrollment`]; this file only converts.

use tokenfleet_proto::v1 as pb;

use crate::authz::Principal;
use crate::convert;
use crate::identity::enrollment::{self, CodeRequest};
use crate::ops::Error;
use crate::state::BrokerState;

pub(super) async fn create_code(
    state: &BrokerState,
    principal: &Principal,
    req: pb::CreateEnrollmentCodeRequest,
) -> Result<pb::CreateEnrollmentCodeResponse, Error> {
    let req = CodeRequest {
        tenant: req.tenant,
        agent: req.agent,
        display_name: req.display_name,
        ttl_seconds: req.ttl_seconds.into(),
        re_enroll: req.re_enroll,
    };
    let issued = enrollment::create_code(state, principal, &req).await?;
    Ok(pb::CreateEnrollmentCodeResponse {
        code: issued.code.expose().to_owned(),
        expire_time: Some(convert::timestamp(issued.expires)),
        agent: Some(convert::agent_to_proto(
            &issued.agent.value,
            issued.agent.version,
        )),
    })
}

pub(super) async fn revoke(
    state: &BrokerState,
    principal: &Principal,
    req: pb::RevokeAgentRequest,
) -> Result<pb::Agent, Error> {
    let agent = enrollment::revoke_agent(state, principal, &req.tenant, &req.name).await?;
    Ok(convert::agent_to_proto(&agent.value, agent.version))
}
