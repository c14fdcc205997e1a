//! Connection tests (`Admin.TestConnection`): queue a connection test for the device's agent, wait for its answer
//! until the deadline. The test waits (a few seconds at most) until the agent runs the current
//! configuration, so it tests the device as it is now, not as it was. An agent that is not
//! connected, or does not answer in time, gives the verdict AGENT_UNREACHABLE (not an error: the
//! operator learns why). Needs write access to the device's tenant (a viewer may not make agents
//! connect and use tokens). Audited as `device.test`.

use std::time::Duration;

use time::OffsetDateTime;
use tokenfleet_domain::{Device, ValidationError};
use tokenfleet_store::{Precondition, StoreError};

use super::model::{
    AgentCommand, Command, ConnectionTarget, ConnectionTestCommand, ConnectionTestResult,
    ConnectionVerdict,
};
use super::reload::queue_reload;
use super::settings::format_age;
use super::store::{
    AgentPresence, CommandAnswer, QueuedCommand, command_key, command_result_key, new_command_id,
    presence_key,
};
use crate::authz::{Access, Principal, Target, authorize};
use crate::ops::Error;
use crate::ops::change::{Change, audited};
use crate::ops::names::{shown, span_object};
use crate::ops::stored::{must_get, records};
use crate::records::device_key;
use crate::state::BrokerState;

/// Test deadline when the request gives none.
pub const DEFAULT_TIMEOUT_SECONDS: u32 = 30;
/// Longest test deadline.
pub const MAX_TIMEOUT_SECONDS: u32 = 120;
/// Longest wait for the agent to apply the current configuration before a test.
const CONFIG_WAIT: Duration = Duration::from_secs(5);
/// How often the waiting replica looks for the answer.
const ANSWER_POLL: Duration = Duration::from_millis(100);

/// What a connection test asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRequest {
    /// Tenant of the device.
    pub tenant: String,
    /// Device to test.
    pub device: String,
    /// Which connection (UNSPECIFIED: the send profile). An error when the caller named a
    /// target this broker does not know: reported after authorization, like every other
    /// problem of the request.
    pub target: Result<ConnectionTarget, ValidationError>,
    /// Deadline (0: [`DEFAULT_TIMEOUT_SECONDS`], at most [`MAX_TIMEOUT_SECONDS`]).
    pub timeout_seconds: u32,
}

/// Runs a connection test of a device through its agent; audited as `device.test`.
pub async fn test_connection(
    state: &BrokerState,
    principal: &Principal,
    req: TestRequest,
) -> Result<ConnectionTestResult, Error> {
    let change = Change::of_object("device.test", &req.tenant, "devices", &req.device);
    audited(state, principal, change, async {
        // A test makes the agent open connections and use the device's tokens: write access
        // (viewers only read).
        authorize(principal, Target::Tenant(&req.tenant), Access::Write)?;
        let result = test(state, &req).await?;
        let detail = format!(
            "{}: {}",
            result.verdict.wire_name(),
            result.summary.chars().take(200).collect::<String>()
        );
        Ok((result, detail))
    })
    .await
}

async fn test(state: &BrokerState, req: &TestRequest) -> Result<ConnectionTestResult, Error> {
    tokenfleet_domain::name("tenant", &req.tenant)?;
    tokenfleet_domain::name("device", &req.device)?;
    span_object(&req.tenant, &req.device);
    let timeout = match req.timeout_seconds {
        0 => DEFAULT_TIMEOUT_SECONDS,
        t if t <= MAX_TIMEOUT_SECONDS => t,
        t => {
            return Err(Error::InvalidArgument(format!(
                "timeout_seconds: must be 0-{MAX_TIMEOUT_SECONDS} (0 = {DEFAULT_TIMEOUT_SECONDS}), got {t}"
            )));
        }
    };
    let target = match &req.target {
        Ok(ConnectionTarget::Unspecified) => ConnectionTarget::Send,
        Ok(t) => *t,
        Err(e) => return Err(e.clone().into()),
    };
    let device = must_get::<Device>(
        state,
        &device_key(&req.tenant, &req.device),
        &format!(
            "device `{}` in tenant `{}`",
            shown(&req.device),
            shown(&req.tenant)
        ),
    )
    .await?
    .value;
    if device.agent.is_empty() {
        return Err(Error::precondition(
            "device.agent",
            format!(
                "device `{}` has no agent assigned, so nothing can test its connections; set its agent",
                device.name
            ),
        ));
    }
    if target == ConnectionTarget::Fetch && device.fetch.server.is_empty() {
        return Err(Error::precondition(
            "target",
            format!("device `{}` has no fetch profile to test", device.name),
        ));
    }
    let now = state.clock.now();
    let unreachable = |summary: String, fix: &str| ConnectionTestResult {
        device: device.name.clone(),
        target,
        verdict: ConnectionVerdict::AgentUnreachable,
        summary,
        fix: fix.to_owned(),
        time: Some(now),
        ..Default::default()
    };
    let presence = records(state)
        .get::<AgentPresence>(&presence_key(&device.tenant, &device.agent))
        .await?
        .map(|p| p.value)
        .filter(|p| p.live(now));
    if presence.is_none() {
        return Ok(unreachable(
            format!(
                "agent \"{}\" is not connected to the broker{}",
                device.agent,
                last_seen(state, &device, now).await
            ),
            "check that the agent runs and can reach the broker (its log names the problem)",
        ));
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(timeout));
    await_current_config(state, &device, Duration::from_secs(u64::from(timeout))).await?;

    let id = new_command_id(now);
    let command = AgentCommand {
        id: id.clone(),
        command: Some(Command::TestConnection(ConnectionTestCommand {
            device: device.name.clone(),
            target,
            timeout_seconds: timeout,
        })),
    };
    let queued = QueuedCommand::new(
        &device.tenant,
        &device.agent,
        command,
        now + time::Duration::seconds(i64::from(timeout)),
    );
    records(state).put(&queued, Precondition::Absent).await?;
    super::wake::wake(state, &device.tenant, &device.agent).await;
    tracing::info!(command = %id, agent = %device.agent, "connection test queued");

    let answer_key = command_result_key(&device.tenant, &id);
    loop {
        if let Some(answer) = records(state).get::<CommandAnswer>(&answer_key).await? {
            let _ = records(state)
                .delete(&answer_key, Precondition::Version(answer.version))
                .await;
            return Ok(answer_result(
                &answer.value,
                &device,
                target,
                state.clock.now(),
            ));
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(ANSWER_POLL).await;
    }

    // Nobody answered: take the command back if it was never sent.
    let never_sent = match records(state)
        .delete(
            &command_key(&device.tenant, &device.agent, &id),
            Precondition::Exists,
        )
        .await
    {
        Ok(removed) => removed,
        Err(StoreError::NotFound(_)) => false,
        Err(e) => return Err(e.into()),
    };
    let connected = records(state)
        .get::<AgentPresence>(&presence_key(&device.tenant, &device.agent))
        .await?
        .is_some_and(|p| p.value.live(state.clock.now()));
    let summary = match (never_sent, connected) {
        (_, false) => format!(
            "agent \"{}\" disconnected before answering within {timeout} s",
            device.agent
        ),
        (true, true) => format!(
            "agent \"{}\" is connected but the test was not delivered within {timeout} s",
            device.agent
        ),
        (false, true) => format!(
            "agent \"{}\" is connected but did not answer within {timeout} s",
            device.agent
        ),
    };
    Ok(unreachable(
        summary,
        "retry with a longer timeout_seconds; if it persists, check the agent's log and version",
    ))
}

/// Waits (at most [`CONFIG_WAIT`], and a quarter of the test's `timeout`) until the device's
/// agent reports that it runs the current configuration (or answered the `ReloadConfig` for it), so a test right after a change of the device tests
/// the changed device (the change itself queued a `ReloadConfig`; one is queued here too in case
/// that was lost). When the agent still runs another configuration the test goes ahead: the agent
/// tests what it runs, or answers DEVICE_NOT_LOADED when it does not run the device at all.
async fn await_current_config(
    state: &BrokerState,
    device: &Device,
    timeout: Duration,
) -> Result<(), Error> {
    let wait = CONFIG_WAIT.min(timeout / 4);
    let deadline = tokio::time::Instant::now() + wait;
    let key = presence_key(&device.tenant, &device.agent);
    let mut nudged = false;
    loop {
        let Some(presence) = records(state)
            .get::<AgentPresence>(&key)
            .await?
            .map(|p| p.value)
        else {
            return Ok(());
        };
        // The revision covers the heartbeat the stream sends, which the presence marker keeps.
        let current = super::config::build(
            state,
            &device.tenant,
            &device.agent,
            presence.heartbeat_seconds,
        )
        .await?
        .revision;
        // Applied, or at least acted on (an agent that could not apply it tests what it runs).
        if presence.config_revision == current || presence.reloaded_revision == current {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::info!(
                agent = %device.agent,
                "the agent has not applied the current configuration yet; testing anyway"
            );
            return Ok(());
        }
        if !nudged {
            queue_reload(state, &device.tenant, &device.agent).await;
            nudged = true;
        }
        tokio::time::sleep(ANSWER_POLL).await;
    }
}

/// ` (last seen 4m 10s ago)`, ` (never seen)` for the device's agent.
async fn last_seen(state: &BrokerState, device: &Device, now: OffsetDateTime) -> String {
    let agent = records(state)
        .get::<tokenfleet_domain::Agent>(&crate::records::agent_key(&device.tenant, &device.agent))
        .await
        .ok()
        .flatten();
    match agent.and_then(|a| a.value.last_seen) {
        Some(seen) => format!(" (last seen {} ago)", format_age(now - seen)),
        None => " (never seen)".to_owned(),
    }
}

fn answer_result(
    answer: &CommandAnswer,
    device: &Device,
    target: ConnectionTarget,
    now: OffsetDateTime,
) -> ConnectionTestResult {
    let result = match answer.decode_result() {
        Ok(result) => result,
        Err(error) => {
            tracing::error!(%error, "stored command result is damaged");
            super::model::CommandResult::default()
        }
    };
    let mut test = result
        .connection_test
        .unwrap_or_else(|| ConnectionTestResult {
            // The agent answered without a structured result (an old agent, or it failed early).
            verdict: if result.ok {
                ConnectionVerdict::Ok
            } else {
                ConnectionVerdict::Unspecified
            },
            summary: if result.detail.is_empty() {
                "the agent answered without a test result".to_owned()
            } else {
                result.detail.clone()
            },
            ..Default::default()
        });
    if test.device.is_empty() {
        test.device.clone_from(&device.name);
    }
    if test.target == ConnectionTarget::Unspecified {
        test.target = target;
    }
    if test.time.is_none() {
        test.time = Some(now);
    }
    test
}
