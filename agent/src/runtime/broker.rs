//! The agent's link to the broker: an mTLS channel built from the enrolled identity (rebuilt when
//! the certificate is renewed), `GetAgentConfig` with a cached copy in the state directory, and
//! `IssueAccessToken` as the [`TokenSource`] of the token cache.

use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use tokenfleet_proto::v1 as pb;
use tokenfleet_proto::v1::token_broker_client::TokenBrokerClient;
use tonic::transport::Channel;

use super::tokens::{IssuedToken, TokenAnswer, TokenFailure, TokenKey, TokenSource};
use crate::identity::{IdentityError, StoredIdentity};
use crate::sasl::AccessToken;

/// File (in the state directory) holding the last configuration the broker sent. It holds no
/// secret except the devices' argon2 password hashes; written 0600.
pub const CACHED_CONFIG_FILE: &str = "agent-config.pb";

/// The broker connection.
#[derive(Debug)]
pub struct BrokerLink {
    url_override: Option<String>,
    channel: RwLock<Channel>,
    state_dir: PathBuf,
}

fn with_url(identity: &StoredIdentity, url: Option<&str>) -> StoredIdentity {
    let mut identity = identity.clone();
    if let Some(url) = url {
        identity.info.broker_url = url.to_owned();
    }
    identity
}

impl BrokerLink {
    /// A link authenticating with `identity` (to `url_override` if given, else the stored URL).
    pub fn new(
        identity: &StoredIdentity,
        url_override: Option<String>,
        state_dir: &Path,
    ) -> Result<Self, IdentityError> {
        let channel = with_url(identity, url_override.as_deref()).channel()?;
        Ok(Self {
            url_override,
            channel: RwLock::new(channel),
            state_dir: state_dir.to_path_buf(),
        })
    }

    /// Switches to a renewed certificate.
    pub fn set_identity(&self, identity: &StoredIdentity) {
        match with_url(identity, self.url_override.as_deref()).channel() {
            Ok(channel) => {
                *self
                    .channel
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = channel;
            }
            Err(error) => {
                tracing::error!(%error, "building a broker channel with the renewed certificate failed")
            }
        }
    }

    /// A client on the current channel.
    pub fn client(&self) -> TokenBrokerClient<Channel> {
        TokenBrokerClient::new(
            self.channel
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }

    /// `GetAgentConfig`; a successful answer is also cached in the state directory.
    pub async fn fetch_config(&self) -> Result<pb::AgentConfig, tonic::Status> {
        let config = self
            .client()
            .get_agent_config(pb::GetAgentConfigRequest {})
            .await?
            .into_inner();
        if let Err(error) = save_cached_config(&self.state_dir, &config) {
            tracing::warn!(%error, "caching the agent configuration failed");
        }
        Ok(config)
    }
}

/// Writes `config` to the state directory (0600, atomically).
pub fn save_cached_config(state_dir: &Path, config: &pb::AgentConfig) -> std::io::Result<()> {
    use std::io::Write as _;
    let path = state_dir.join(CACHED_CONFIG_FILE);
    let tmp = state_dir.join(format!(".{CACHED_CONFIG_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&config.encode_to_vec())?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// The cached configuration, if there is a readable one.
pub fn load_cached_config(state_dir: &Path) -> Option<pb::AgentConfig> {
    let bytes = std::fs::read(state_dir.join(CACHED_CONFIG_FILE)).ok()?;
    pb::AgentConfig::decode(bytes.as_slice()).ok()
}

/// The full cause chain of a status (transport errors hide behind `source`).
pub fn status_text(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut next = std::error::Error::source(status);
    while let Some(e) = next {
        let part = e.to_string();
        // Transport errors repeat their cause in their own text.
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        next = e.source();
    }
    text
}

fn grant_status(message: &str) -> pb::TokenStatus {
    if message.contains("is disabled") {
        pb::TokenStatus::Disabled
    } else if message.contains("no token has been obtained") {
        pb::TokenStatus::NotRetrieved
    } else if message.contains("waiting for a person") {
        pb::TokenStatus::ConsentPending
    } else {
        pb::TokenStatus::ReauthRequired
    }
}

/// A trace attribute for a failed token request (never the message, which may name a mailbox).
fn failure_kind(failure: &TokenFailure) -> &'static str {
    match failure {
        TokenFailure::Unreachable(_) => "unreachable",
        TokenFailure::RefreshFailing(_) => "refresh_failing",
        TokenFailure::NoGrant { .. } => "no_grant",
        TokenFailure::Denied(_) => "denied",
        TokenFailure::RateLimited { .. } => "rate_limited",
    }
}

/// Maps an `IssueAccessToken` error to what the token cache does with it.
pub fn token_failure(status: &tonic::Status) -> TokenFailure {
    use tonic::Code;
    match status.code() {
        Code::FailedPrecondition => TokenFailure::NoGrant {
            status: grant_status(status.message()),
            message: status.message().to_owned(),
        },
        Code::PermissionDenied | Code::NotFound | Code::InvalidArgument => {
            TokenFailure::Denied(status.message().to_owned())
        }
        Code::ResourceExhausted => {
            let retry_after = status
                .metadata()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(Duration::from_secs(5), Duration::from_secs);
            TokenFailure::RateLimited {
                retry_after,
                message: status.message().to_owned(),
            }
        }
        Code::Unavailable if std::error::Error::source(status).is_none() => {
            TokenFailure::RefreshFailing(status.message().to_owned())
        }
        _ => TokenFailure::Unreachable(status_text(status)),
    }
}

#[async_trait::async_trait]
impl TokenSource for BrokerLink {
    async fn issue(&self, key: &TokenKey) -> Result<TokenAnswer, TokenFailure> {
        // Device and purpose only: mailbox names and user addresses stay out of traces.
        let span = tracing::info_span!(
            "token_request",
            otel.kind = "client",
            device = %key.device,
            purpose = key.purpose.as_str_name(),
            result = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let answer = tracing::Instrument::instrument(self.issue_traced(key), span.clone()).await;
        let result = match &answer {
            Ok(TokenAnswer::Token(_)) => "issued",
            Ok(TokenAnswer::ConsentRequired(_)) => "consent_required",
            Err(failure) => {
                span.record("otel.status_code", "ERROR");
                failure_kind(failure)
            }
        };
        span.record("result", result);
        answer
    }
}

impl BrokerLink {
    /// `IssueAccessToken`, carrying the current span as `traceparent`.
    async fn issue_traced(&self, key: &TokenKey) -> Result<TokenAnswer, TokenFailure> {
        let answer = self
            .client()
            .issue_access_token(tokenfleet_telemetry::traced_request(
                pb::IssueAccessTokenRequest {
                    device: key.device.clone(),
                    mailbox: key.mailbox.clone(),
                    purpose: key.purpose as i32,
                    user_address: key.user_address.clone(),
                },
            ))
            .await
            .map_err(|s| token_failure(&s))?
            .into_inner();
        if let Some(consent) = answer.consent_required {
            return Ok(TokenAnswer::ConsentRequired(consent));
        }
        let expires = answer
            .expire_time
            .map(|t| {
                UNIX_EPOCH
                    + Duration::new(
                        u64::try_from(t.seconds).unwrap_or(0),
                        u32::try_from(t.nanos).unwrap_or(0),
                    )
            })
            .unwrap_or_else(SystemTime::now);
        Ok(TokenAnswer::Token(IssuedToken {
            token: AccessToken::new(answer.access_token),
            expires,
            sasl_username: answer.sasl_username,
            mailbox: answer.mailbox,
        }))
    }
}
