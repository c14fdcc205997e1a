//! Agent enrollment RPCs of the admin API: `CreateEnrollmentCode` (creates the agent record when
//! missing and a one-time code, returned once, stored hashed; the agent's one live code, bound to
//! the agent record; a re-enroll code only on request when the agent holds a current
//! certificate, see [`crate::identity::codes`]) and `RevokeAgent` (every later call
//! of the agent is refused; see [`crate::identity::peer`]). Both are audited; the code never
//! appears in the audit log or the broker log.

use std::time::Duration;

use tokenfleet_domain::{Agent, Stamps};
use tokenfleet_proto::v1 as pb;
use tokenfleet_store::{Precondition, StoreError};

use crate::authz::{Access, Principal, Target, authorize};
use crate::convert;
use crate::identity::codes::{self, DEFAULT_TTL, MAX_TTL, MIN_TTL};
use crate::ops::Error;
use crate::ops::change::{Change, audited};
use crate::ops::names::{object_path, shown, span_object};
use crate::ops::stored::{commit, must_get, records, require_tenant, still_contended};
use crate::records::{CAS_ATTEMPTS, Versioned, agent_key};
use crate::state::BrokerState;

fn what(tenant: &str, name: &str) -> String {
    format!("agent `{}` in tenant `{}`", shown(name), shown(tenant))
}

fn change(action: &'static str, tenant: &str, name: &str) -> Change {
    Change {
        action,
        target: object_path(tenant, "agents", name),
        tenant: tenant.to_owned(),
    }
}

/// Validates `ttl_seconds` (0 = default).
fn code_ttl(ttl_seconds: i32) -> Result<Duration, Error> {
    if ttl_seconds == 0 {
        return Ok(DEFAULT_TTL);
    }
    let ttl = u64::try_from(ttl_seconds)
        .map(Duration::from_secs)
        .map_err(|_| ttl_error(ttl_seconds))?;
    if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
        return Err(ttl_error(ttl_seconds));
    }
    Ok(ttl)
}

fn ttl_error(got: i32) -> Error {
    Error::InvalidArgument(format!(
        "ttl_seconds: must be {}-{} (0 = {}), got {got}",
        MIN_TTL.as_secs(),
        MAX_TTL.as_secs(),
        DEFAULT_TTL.as_secs()
    ))
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The agent record, created (with `display_name`) when missing.
async fn agent_for_enrollment(
    state: &BrokerState,
    tenant: &str,
    name: &str,
    display_name: &str,
) -> Result<(Versioned<Agent>, bool), Error> {
    let key = agent_key(tenant, name);
    for _ in 0..CAS_ATTEMPTS {
        if let Some(existing) = records(state).get::<Agent>(&key).await? {
            return Ok((existing, false));
        }
        let input = pb::Agent {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            display_name: display_name.to_owned(),
            ..Default::default()
        };
        let agent = convert::agent_from_proto(&input, Stamps::new(state.clock.now()))?;
        match records(state).put(&agent, Precondition::Absent).await {
            Ok(version) => {
                return Ok((
                    Versioned {
                        version,
                        value: agent,
                    },
                    true,
                ));
            }
            // Created concurrently: use that one.
            Err(StoreError::AlreadyExists(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(still_contended(&what(tenant, name)))
}

pub(super) async fn create_code(
    state: &BrokerState,
    principal: &Principal,
    req: pb::CreateEnrollmentCodeRequest,
) -> Result<pb::CreateEnrollmentCodeResponse, Error> {
    span_object(&req.tenant, &req.agent);
    audited(
        state,
        principal,
        change("agent.enrollment_code.create", &req.tenant, &req.agent),
        async {
            authorize(principal, Target::Tenant(&req.tenant), Access::Write)?;
            tokenfleet_domain::name("tenant", &req.tenant)?;
            tokenfleet_domain::name("agent", &req.agent)?;
            tokenfleet_domain::text(
                "display_name",
                &req.display_name,
                tokenfleet_domain::MAX_TEXT_LEN,
            )
            ?;
            let ttl = code_ttl(req.ttl_seconds)?;
            require_tenant(state, &req.tenant).await?;
            let (agent, created) =
                agent_for_enrollment(state, &req.tenant, &req.agent, &req.display_name).await?;
            if agent.value.revoked {
                return Err(Error::FailedPrecondition(format!(
                    "{} has been revoked; revocation is final, so enroll the site as a new agent (another name)",
                    what(&req.tenant, &req.agent)
                )));
            }
            let held = codes::current_certificate(state, &agent.value, state.clock.now()).await?;
            if let (Some(expires), false) = (held, req.re_enroll) {
                return Err(Error::precondition(
                    "re_enroll",
                    format!(
                        "{} holds a current certificate (valid until {}); enrolling again replaces it and cuts off the agent running with it. If that is intended (the site was rebuilt, the key lost), create a re-enroll code: `tokenfleetctl agent enroll-code {} --tenant {} --re-enroll`",
                        what(&req.tenant, &req.agent),
                        rfc3339(expires),
                        shown(&req.agent),
                        shown(&req.tenant)
                    ),
                ));
            }
            let (code, record) =
                codes::create(state, &agent.value, ttl, req.re_enroll, &principal.actor())
                    .await?;
            let detail = format!(
                "{}{}code expires {}; earlier codes of the agent no longer work",
                if created { "agent created; " } else { "" },
                if req.re_enroll { "re-enroll " } else { "" },
                rfc3339(record.expires)
            );
            Ok((
                pb::CreateEnrollmentCodeResponse {
                    code: code.expose().to_owned(),
                    expire_time: Some(convert::timestamp(record.expires)),
                    agent: Some(convert::agent_to_proto(&agent.value, agent.version)),
                },
                detail,
            ))
        },
    )
    .await
}

pub(super) async fn revoke(
    state: &BrokerState,
    principal: &Principal,
    req: pb::RevokeAgentRequest,
) -> Result<pb::Agent, Error> {
    span_object(&req.tenant, &req.name);
    audited(
        state,
        principal,
        change("agent.revoke", &req.tenant, &req.name),
        async {
            authorize(principal, Target::Tenant(&req.tenant), Access::Write)?;
            tokenfleet_domain::name("tenant", &req.tenant)?;
            tokenfleet_domain::name("name", &req.name)?;
            let what = what(&req.tenant, &req.name);
            let key = agent_key(&req.tenant, &req.name);
            for attempt in 0..CAS_ATTEMPTS {
                let stored = must_get::<Agent>(state, &key, &what).await?;
                if stored.value.revoked {
                    return Ok((
                        convert::agent_to_proto(&stored.value, stored.version),
                        "already revoked".to_owned(),
                    ));
                }
                let mut next = stored.value.clone();
                next.revoked = true;
                next.stamps.updated = state.clock.now();
                if let Some(v) = commit(state, &what, &next, stored.version, 0, attempt).await? {
                    return Ok((convert::agent_to_proto(&next, v), String::new()));
                }
            }
            Err(still_contended(&what))
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_ttls() {
        assert_eq!(code_ttl(0).unwrap(), DEFAULT_TTL);
        assert_eq!(code_ttl(60).unwrap(), Duration::from_secs(60));
        assert_eq!(code_ttl(86_400).unwrap(), MAX_TTL);
        for bad in [-1, 59, 86_401] {
            let err = code_ttl(bad).unwrap_err();
            assert!(err.to_string().starts_with("ttl_seconds:"), "{err}");
        }
    }
}
