//! The operator's enrollment operations: [`create_code`] (the Admin API's
//! `CreateEnrollmentCode`, the console's "Create one-time code") creates the agent record when
//! missing and a one-time code, returned once and stored hashed — the agent's one live code,
//! bound to the agent record; a re-enroll code only on request when the agent holds a current
//! certificate (see [`super::codes`]); [`revoke_agent`] (`RevokeAgent`) makes every later call
//! of the agent fail (see [`super::peer`]). Both need write access to the agent's tenant and are
//! audited on the agent; the code never appears in the audit log or the broker log.

use std::time::Duration;

use time::OffsetDateTime;
use tokenfleet_domain::{Agent, Stamps};
use tokenfleet_seal::Secret;
use tokenfleet_store::{Precondition, StoreError};

use super::codes::{self, DEFAULT_TTL, MAX_TTL, MIN_TTL};
use crate::authz::{Access, Principal, Target, authorize};
use crate::ops::Error;
use crate::ops::change::{Change, audited};
use crate::ops::names::{shown, span_object};
use crate::ops::stored::{commit, must_get, records, require_tenant, still_contended};
use crate::records::{CAS_ATTEMPTS, Versioned, agent_key};
use crate::resources::agents;
use crate::state::BrokerState;

/// What an operator asks for when creating an enrollment code.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodeRequest {
    /// The agent's tenant.
    pub tenant: String,
    /// The agent's name (the record is created when missing).
    pub agent: String,
    /// Display name of a newly created agent record (the site).
    pub display_name: String,
    /// Lifetime of the code in seconds; 0 is [`DEFAULT_TTL`], else between [`MIN_TTL`] and
    /// [`MAX_TTL`] (checked inside the audited change, so a refused lifetime is audited).
    pub ttl_seconds: i64,
    /// Replace the agent's current certificate (needed when it holds one).
    pub re_enroll: bool,
}

/// A created code: shown once, never stored or logged.
#[derive(Debug)]
pub struct IssuedCode {
    /// The code to run `tokenfleet-agent enroll` with.
    pub code: Secret,
    /// When it stops working.
    pub expires: OffsetDateTime,
    /// The agent record it is bound to.
    pub agent: Versioned<Agent>,
}

fn what(tenant: &str, name: &str) -> String {
    format!("agent `{}` in tenant `{}`", shown(name), shown(tenant))
}

/// Validates `ttl_seconds` (0 = default).
fn code_ttl(ttl_seconds: i64) -> Result<Duration, Error> {
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

fn ttl_error(got: i64) -> Error {
    Error::InvalidArgument(format!(
        "ttl_seconds: must be {}-{} (0 = {}), got {got}",
        MIN_TTL.as_secs(),
        MAX_TTL.as_secs(),
        DEFAULT_TTL.as_secs()
    ))
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The agent record, created (with `display_name`) when missing; whether it was created.
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
        let input = Agent {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            display_name: display_name.to_owned(),
            revoked: false,
            certificate_expires: None,
            last_seen: None,
            software_version: String::new(),
            stamps: Stamps::new(OffsetDateTime::UNIX_EPOCH),
        };
        let agent = agents::from_input(&input, Stamps::new(state.clock.now()))?;
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

/// `principal` creates a one-time enrollment code for the agent `req` names (see the module
/// documentation).
pub async fn create_code(
    state: &BrokerState,
    principal: &Principal,
    req: &CodeRequest,
) -> Result<IssuedCode, Error> {
    span_object(&req.tenant, &req.agent);
    audited(
        state,
        principal,
        Change::of_object("agent.enrollment_code.create", &req.tenant, "agents", &req.agent),
        async {
            authorize(principal, Target::Tenant(&req.tenant), Access::Write)?;
            tokenfleet_domain::name("tenant", &req.tenant)?;
            tokenfleet_domain::name("agent", &req.agent)?;
            tokenfleet_domain::text(
                "display_name",
                &req.display_name,
                tokenfleet_domain::MAX_TEXT_LEN,
            )?;
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
                IssuedCode {
                    code,
                    expires: record.expires,
                    agent,
                },
                detail,
            ))
        },
    )
    .await
}

/// `principal` revokes agent `name` of `tenant`: final, every later call of the agent is refused.
/// Revoking a revoked agent changes nothing.
pub async fn revoke_agent(
    state: &BrokerState,
    principal: &Principal,
    tenant: &str,
    name: &str,
) -> Result<Versioned<Agent>, Error> {
    span_object(tenant, name);
    audited(
        state,
        principal,
        Change::of_object("agent.revoke", tenant, "agents", name),
        async {
            authorize(principal, Target::Tenant(tenant), Access::Write)?;
            tokenfleet_domain::name("tenant", tenant)?;
            tokenfleet_domain::name("name", name)?;
            let what = what(tenant, name);
            let key = agent_key(tenant, name);
            for attempt in 0..CAS_ATTEMPTS {
                let stored = must_get::<Agent>(state, &key, &what).await?;
                if stored.value.revoked {
                    return Ok((stored, "already revoked".to_owned()));
                }
                let mut next = stored.value.clone();
                next.revoked = true;
                next.stamps.updated = state.clock.now();
                if let Some(version) =
                    commit(state, &what, &next, stored.version, 0, attempt).await?
                {
                    let revoked = Versioned {
                        version,
                        value: next,
                    };
                    return Ok((revoked, String::new()));
                }
            }
            Err(still_contended(&what))
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use tokenfleet_domain::Role;

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

    use crate::testing::principal as p;

    /// Enrollment and revocation need write access to the agent's tenant; a revoked agent gets
    /// no new code.
    #[tokio::test]
    async fn enrollment_needs_write_access_and_revocation_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::testing::state(dir.path()).await;
        crate::testing::put_tenant(&state, "acme").await;
        let req = CodeRequest {
            tenant: "acme".into(),
            agent: "site-a".into(),
            display_name: "Site A".into(),
            ..CodeRequest::default()
        };
        for who in [
            p(Role::Viewer, Some("acme")),
            p(Role::TenantAdmin, Some("beta")),
        ] {
            let err = create_code(&state, &who, &req).await.unwrap_err();
            assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
            let err = revoke_agent(&state, &who, "acme", "site-a")
                .await
                .unwrap_err();
            assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        }
        let admin = p(Role::TenantAdmin, Some("acme"));
        let issued = create_code(&state, &admin, &req).await.unwrap();
        assert!(codes::well_formed(issued.code.expose()));
        assert_eq!(issued.agent.value.display_name, "Site A");
        assert!(issued.expires > state.clock.now());

        let revoked = revoke_agent(&state, &admin, "acme", "site-a")
            .await
            .unwrap();
        assert!(revoked.value.revoked);
        assert_eq!(revoked.version, issued.agent.version + 1);
        let again = revoke_agent(&state, &admin, "acme", "site-a")
            .await
            .unwrap();
        assert_eq!(again.version, revoked.version);
        let err = create_code(&state, &admin, &req).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    }
}
