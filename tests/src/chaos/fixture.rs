//! What the broker scenarios of the chaos suite set up through the Admin API of a running
//! replica: tenant `acme`, a Microsoft provider on the fake identity provider, delegated
//! (device-code) mailboxes whose consents a person approves at the fake, and the counters the
//! scenarios report — calls that failed by gRPC code, refresh tokens the fake saw presented again
//! after it had already answered them, grants by status.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokenfleet_proto::v1 as pb;

use crate::broker::TestAdminClient;
use crate::fake_idp::{ClientSpec, Endpoint, FakeIdp};

/// Tenant of the scenarios.
pub const TENANT: &str = "acme";
/// Provider name.
pub const PROVIDER: &str = "m365";
/// Entra tenant segment at the fake.
pub const ENTRA: &str = "contoso-chaos";
/// App registration at the fake.
pub const CLIENT_ID: &str = "chaos-app";
/// Its secret.
pub const CLIENT_SECRET: &str = "chaos-client-secret-7";
/// The person who consents.
pub const USER: &str = "scanner@contoso.example";
/// `grant_type` of refreshes.
pub const REFRESH_GRANT: &str = "refresh_token";

/// The fake identity provider with the scenarios' app and user (device codes polled every second).
pub async fn fake_idp() -> Result<FakeIdp> {
    let fake = FakeIdp::start().await?;
    fake.add_user(USER);
    fake.register_client(ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET));
    crate::logs::secret(CLIENT_SECRET);
    fake.set_device_interval(1);
    Ok(fake)
}

/// Creates the tenant and the provider.
pub async fn tenant_and_provider(admin: &mut TestAdminClient, fake: &FakeIdp) -> Result<()> {
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: Some(pb::Tenant {
                name: TENANT.into(),
                display_name: "Acme".into(),
                ..Default::default()
            }),
        })
        .await
        .context("create tenant")?;
    crate::agent_site::microsoft_provider(
        admin,
        fake,
        TENANT,
        PROVIDER,
        ENTRA,
        CLIENT_ID,
        CLIENT_SECRET,
    )
    .await
    .context("create provider")?;
    Ok(())
}

/// A mailbox of `grant_type` (a plain store write: the scenarios' write load).
pub fn mailbox(name: &str, grant_type: pb::GrantType) -> pb::CreateMailboxRequest {
    pb::CreateMailboxRequest {
        mailbox: Some(pb::Mailbox {
            tenant: TENANT.into(),
            name: name.into(),
            address: USER.into(),
            provider: PROVIDER.into(),
            grant_type: grant_type as i32,
            kind: pb::MailboxKind::Bulk as i32,
            purposes: vec![pb::MailPurpose::Send as i32],
            ..Default::default()
        }),
    }
}

/// Starts device-code consents for `names` (created first), without approving them.
pub async fn start_consents(admin: &mut TestAdminClient, names: &[String]) -> Result<Vec<String>> {
    let mut codes = Vec::with_capacity(names.len());
    for name in names {
        admin
            .create_mailbox(mailbox(name, pb::GrantType::DelegatedDeviceCode))
            .await
            .with_context(|| format!("create mailbox {name}"))?;
        let started = admin
            .start_consent(pb::StartConsentRequest {
                tenant: TENANT.into(),
                mailbox: name.clone(),
                redirect_uri: String::new(),
            })
            .await
            .with_context(|| format!("start consent {name}"))?
            .into_inner();
        let Some(pb::start_consent_response::Challenge::DeviceCode(challenge)) = started.challenge
        else {
            bail!("no device code for {name}");
        };
        codes.push(challenge.user_code);
    }
    Ok(codes)
}

/// Approves every code at the fake, as the person.
pub fn approve(fake: &FakeIdp, codes: &[String]) -> Result<()> {
    for code in codes {
        fake.approve_device_code(code, USER)?;
    }
    Ok(())
}

/// Token status of every mailbox in `names` (`None`: the call failed).
pub async fn statuses(
    admin: &mut TestAdminClient,
    names: &[String],
) -> BTreeMap<String, Option<pb::TokenStatus>> {
    let mut out = BTreeMap::new();
    for name in names {
        let status = admin
            .get_mailbox(pb::GetMailboxRequest {
                tenant: TENANT.into(),
                name: name.clone(),
            })
            .await
            .ok()
            .and_then(|m| m.into_inner().token)
            .map(|t| t.status());
        out.insert(name.clone(), status);
    }
    out
}

/// Mailboxes in `names` that are usable now: ACTIVE with an access token that has not expired.
pub async fn usable(admin: &mut TestAdminClient, names: &[String]) -> usize {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut count = 0;
    for name in names {
        let token = admin
            .get_mailbox(pb::GetMailboxRequest {
                tenant: TENANT.into(),
                name: name.clone(),
            })
            .await
            .ok()
            .and_then(|m| m.into_inner().token);
        if let Some(token) = token
            && token.status() == pb::TokenStatus::Active
            && token
                .access_token_expire_time
                .is_some_and(|t| u64::try_from(t.seconds).is_ok_and(|s| s > now))
        {
            count += 1;
        }
    }
    count
}

/// Waits until every mailbox in `names` is ACTIVE; returns how long it took. Fails after `limit`
/// with the statuses seen last.
pub async fn wait_all_active(
    admin: &mut TestAdminClient,
    names: &[String],
    limit: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let seen = statuses(admin, names).await;
        if seen.values().all(|s| *s == Some(pb::TokenStatus::Active)) {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= limit {
            let summary = count_statuses(&seen);
            bail!("not every grant ACTIVE within {limit:?}: {summary}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// "ACTIVE 10, REFRESH_FAILING 2" for a status map.
pub fn count_statuses(seen: &BTreeMap<String, Option<pb::TokenStatus>>) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for status in seen.values() {
        let name = status.map_or("unknown (call failed)".to_owned(), |s| {
            s.as_str_name()
                .trim_start_matches("TOKEN_STATUS_")
                .to_owned()
        });
        *counts.entry(name).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Refresh tokens the fake saw presented again after it had already answered a refresh with
/// that token successfully (the broker used a token whose rotation it had lost).
pub fn refresh_tokens_presented_twice(fake: &FakeIdp) -> usize {
    let mut answered: HashMap<String, usize> = HashMap::new();
    let mut again = 0;
    for request in fake.requests_to(Endpoint::MicrosoftToken) {
        if request.grant_type.as_deref() != Some(REFRESH_GRANT) {
            continue;
        }
        let Some(token) = request.param("refresh_token") else {
            continue;
        };
        if answered.get(token).copied().unwrap_or(0) > 0 {
            again += 1;
        }
        if request.status == 200 {
            *answered.entry(token.to_owned()).or_default() += 1;
        }
    }
    again
}

/// Calls by outcome: `OK` or the gRPC code's name.
#[derive(Debug, Default, Clone)]
pub struct Outcomes(pub BTreeMap<String, usize>);

impl Outcomes {
    /// Counts one outcome.
    pub fn add<T>(&mut self, result: &Result<T, tonic::Status>) {
        let key = match result {
            Ok(_) => "OK".to_owned(),
            Err(status) => code_name(status.code()),
        };
        *self.0.entry(key).or_default() += 1;
    }

    /// Merges another count in.
    pub fn merge(&mut self, other: &Outcomes) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }

    /// Calls that failed.
    pub fn failed(&self) -> usize {
        self.0
            .iter()
            .filter(|(k, _)| k.as_str() != "OK")
            .map(|(_, v)| v)
            .sum()
    }

    /// Failed calls with a code other than UNAVAILABLE (and DEADLINE_EXCEEDED of a client
    /// timeout): the ones that did not tell the caller to retry.
    pub fn failed_otherwise(&self) -> usize {
        self.0
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "OK" | "UNAVAILABLE"))
            .map(|(_, v)| v)
            .sum()
    }
}

impl std::fmt::Display for Outcomes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        f.write_str(&parts.join("/"))
    }
}

/// `UNAVAILABLE`, `INTERNAL`, …
pub fn code_name(code: tonic::Code) -> String {
    let debug = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}
