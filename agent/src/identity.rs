//! The agent's identity: enrollment with a one-time code, the client certificate and its renewal.
//!
//! The key pair is generated here (ECDSA P-256) and never leaves the agent: the broker receives a
//! certificate signing request, signed with the key to prove possession, and answers with a
//! client certificate of its agent CA that names the agent
//! (`spiffe://tokenfleet/tenants/<tenant>/agents/<agent>`). Everything lives in the state
//! directory (mode 0700):
//!
//! | file | content |
//! |---|---|
//! | `agent.key` | the private key (PKCS#8 PEM, mode 0600) |
//! | `agent.pem` | the client certificate |
//! | `agent-ca.pem` | the chain the broker returned (its agent CA) |
//! | `broker-ca.pem` | the CA the broker's server certificate is checked against (from `--ca-file`; absent = system roots) |
//! | `identity.json` | broker URL, tenant and agent name |
//!
//! Certificates are short-lived; the agent renews at two thirds of the lifetime ([`renewal_time`])
//! with a new key, over a connection authenticated by the current certificate ([`renew`],
//! [`keep_renewed`]).

use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokenfleet_proto::v1::token_broker_client::TokenBrokerClient;
use tokenfleet_proto::v1::{EnrollRequest, RenewRequest};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

/// Private key file in the state directory.
pub const KEY_FILE: &str = "agent.key";
/// Client certificate file in the state directory.
pub const CERT_FILE: &str = "agent.pem";
/// Issuing CA chain file in the state directory.
pub const CHAIN_FILE: &str = "agent-ca.pem";
/// The CA that verifies the broker's server certificate (copied from `--ca-file`).
pub const BROKER_CA_FILE: &str = "broker-ca.pem";
/// Broker URL, tenant and agent name.
pub const IDENTITY_FILE: &str = "identity.json";

/// Timeout of one enrollment or renewal call (connect included).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of enrollment and renewal. Never contain the code or key material.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    File {
        /// The file.
        path: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
    /// The state directory holds no usable identity.
    #[error("{0}")]
    Missing(String),
    /// Bad input (names the flag or field).
    #[error("{0}")]
    Invalid(String),
    /// Key or CSR generation failed.
    #[error("generating the key or CSR: {0}")]
    Crypto(String),
    /// The broker could not be reached.
    #[error("connecting to the broker at {url}: {cause}")]
    Connect {
        /// Broker URL.
        url: String,
        /// Why.
        cause: String,
    },
    /// The broker refused the call.
    #[error("the broker refused: {code:?}: {message}")]
    Refused {
        /// gRPC code.
        code: tonic::Code,
        /// The broker's message.
        message: String,
    },
    /// The broker's answer is not usable.
    #[error("the broker's answer is unusable: {0}")]
    BadResponse(String),
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |error| IdentityError::File {
        path: path.to_path_buf(),
        error,
    }
}

/// A one-time enrollment code. `Debug` and `Display` do not show it.
#[derive(Clone)]
pub struct EnrollmentCode(Zeroizing<String>);

impl EnrollmentCode {
    /// Wraps a code as typed (white space around it is dropped).
    pub fn new(code: &str) -> Self {
        Self(Zeroizing::new(code.trim().to_owned()))
    }

    /// The code, to send to the broker.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for EnrollmentCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EnrollmentCode([redacted])")
    }
}

/// When a certificate valid from `not_before` to `not_after` is renewed: at two thirds of its
/// lifetime.
pub fn renewal_time(not_before: OffsetDateTime, not_after: OffsetDateTime) -> OffsetDateTime {
    let lifetime = not_after - not_before;
    not_before + lifetime * 2 / 3
}

/// How long to wait at `now` before renewing (zero when due).
pub fn renewal_delay(
    now: OffsetDateTime,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Duration {
    let wait = renewal_time(not_before, not_after) - now;
    Duration::try_from(wait).unwrap_or(Duration::ZERO)
}

/// How long to wait before retrying a failed renewal at `now`: a tenth of what is left of the
/// certificate, between one second and five minutes, so a short outage is ridden out before
/// expiry.
pub fn retry_delay(now: OffsetDateTime, not_after: OffsetDateTime) -> Duration {
    let left = Duration::try_from(not_after - now).unwrap_or(Duration::ZERO);
    (left / 10).clamp(Duration::from_secs(1), Duration::from_secs(300))
}

/// A freshly generated key pair (ECDSA P-256) and the CSR made with it.
struct NewKey {
    key_pem: Zeroizing<String>,
    public_key: Vec<u8>,
    csr_der: Vec<u8>,
}

fn new_key() -> Result<NewKey, IdentityError> {
    let key = KeyPair::generate().map_err(|e| IdentityError::Crypto(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "tokenfleet agent");
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| IdentityError::Crypto(e.to_string()))?;
    Ok(NewKey {
        key_pem: Zeroizing::new(key.serialize_pem()),
        public_key: key.public_key_raw().to_vec(),
        csr_der: csr.der().to_vec(),
    })
}

/// Broker URL, tenant and agent name, as kept in `identity.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityInfo {
    /// The broker's gRPC URL (`https://…`).
    pub broker_url: String,
    /// Tenant of the agent.
    pub tenant: String,
    /// Name of the agent.
    pub agent: String,
}

/// The agent's identity as stored in its state directory. `Debug` does not show the key.
#[derive(Clone)]
pub struct StoredIdentity {
    /// Broker URL, tenant and agent.
    pub info: IdentityInfo,
    /// The client certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM.
    pub key_pem: Zeroizing<String>,
    /// The agent CA chain, PEM.
    pub chain_pem: String,
    /// The CA for the broker's server certificate, PEM (`None` = system roots).
    pub broker_ca_pem: Option<String>,
    /// Start of the certificate's validity.
    pub not_before: OffsetDateTime,
    /// End of the certificate's validity.
    pub not_after: OffsetDateTime,
}

impl fmt::Debug for StoredIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredIdentity")
            .field("info", &self.info)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl StoredIdentity {
    /// When this certificate should be renewed.
    pub fn renewal_time(&self) -> OffsetDateTime {
        renewal_time(self.not_before, self.not_after)
    }

    /// A channel to the broker that authenticates with this identity (mutual TLS).
    pub fn channel(&self) -> Result<Channel, IdentityError> {
        let tls = tls_config(self.broker_ca_pem.as_deref())
            .identity(Identity::from_pem(&self.cert_pem, self.key_pem.as_bytes()));
        endpoint(&self.info.broker_url, tls).map(|e| e.connect_lazy())
    }
}

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    /// The public key (raw subject public key bits).
    pub public_key: Vec<u8>,
    /// The URI subject alternative names.
    pub uris: Vec<String>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// Reads the first certificate of `pem`.
pub fn certificate_facts(pem: &str) -> Result<CertificateFacts, IdentityError> {
    let bad = |what: &str| IdentityError::BadResponse(format!("certificate: {what}"));
    let (_, parsed) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|_| bad("not PEM"))?;
    let cert = parsed.parse_x509().map_err(|_| bad("not X.509"))?;
    let uris = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(CertificateFacts {
        public_key: cert.public_key().subject_public_key.data.to_vec(),
        uris,
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
    })
}

fn tls_config(broker_ca_pem: Option<&str>) -> ClientTlsConfig {
    match broker_ca_pem {
        Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)),
        None => ClientTlsConfig::new().with_native_roots(),
    }
}

fn endpoint(url: &str, tls: ClientTlsConfig) -> Result<Endpoint, IdentityError> {
    if !url.starts_with("https://") {
        return Err(IdentityError::Invalid(format!(
            "--broker {url}: must be an https:// URL (agents authenticate with TLS client certificates)"
        )));
    }
    let connect = |cause: String| IdentityError::Connect {
        url: url.to_owned(),
        cause,
    };
    Endpoint::from_shared(url.to_owned())
        .map_err(|e| IdentityError::Invalid(format!("--broker {url}: {e}")))?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .tls_config(tls)
        .map_err(|e| connect(e.to_string()))
}

fn refused(status: tonic::Status, url: &str) -> IdentityError {
    // Errors on our side of the wire (TLS, connection) come back as statuses with a source.
    if let Some(source) = std::error::Error::source(&status) {
        let mut cause = source.to_string();
        let mut next = source.source();
        while let Some(e) = next {
            cause = format!("{cause}: {e}");
            next = e.source();
        }
        return IdentityError::Connect {
            url: url.to_owned(),
            cause,
        };
    }
    IdentityError::Refused {
        code: status.code(),
        message: status.message().to_owned(),
    }
}

/// Checks that an issued certificate certifies `public_key`, names the agent and is in force.
fn check_issued(
    cert_pem: &str,
    public_key: &[u8],
) -> Result<(CertificateFacts, String), IdentityError> {
    let facts = certificate_facts(cert_pem)?;
    if facts.public_key != public_key {
        return Err(IdentityError::BadResponse(
            "the certificate is not for the key this agent generated".into(),
        ));
    }
    let [uri] = facts.uris.as_slice() else {
        return Err(IdentityError::BadResponse(
            "the certificate carries no single agent identity URI".into(),
        ));
    };
    let uri = uri.clone();
    Ok((facts, uri))
}

/// Enrolls this agent: generates a key pair, sends a CSR and `code` to the broker at
/// `broker_url` (its server certificate checked against `broker_ca_pem`, or the system roots),
/// and stores key, certificate and chain in `state_dir`. The private key is never sent.
pub async fn enroll(
    broker_url: &str,
    code: &EnrollmentCode,
    broker_ca_pem: Option<String>,
    state_dir: &Path,
    software_version: &str,
) -> Result<StoredIdentity, IdentityError> {
    if code.expose().is_empty() {
        return Err(IdentityError::Invalid("--code: must not be empty".into()));
    }
    let channel = endpoint(broker_url, tls_config(broker_ca_pem.as_deref()))?.connect_lazy();
    let key = new_key()?;
    let response = TokenBrokerClient::new(channel)
        .enroll(EnrollRequest {
            code: code.expose().to_owned(),
            csr_der: key.csr_der.clone(),
            software_version: software_version.to_owned(),
        })
        .await
        .map_err(|s| refused(s, broker_url))?
        .into_inner();
    let (facts, _uri) = check_issued(&response.certificate_pem, &key.public_key)?;
    let identity = StoredIdentity {
        info: IdentityInfo {
            broker_url: broker_url.to_owned(),
            tenant: response.tenant,
            agent: response.agent,
        },
        cert_pem: response.certificate_pem,
        key_pem: key.key_pem,
        chain_pem: response.ca_chain_pem,
        broker_ca_pem,
        not_before: facts.not_before,
        not_after: facts.not_after,
    };
    save(state_dir, &identity)?;
    Ok(identity)
}

/// Renews the certificate in `state_dir` now, with a new key pair, authenticating with the
/// current certificate; stores and returns the new identity.
pub async fn renew(
    state_dir: &Path,
    software_version: &str,
) -> Result<StoredIdentity, IdentityError> {
    let current = load(state_dir)?;
    let key = new_key()?;
    let response = TokenBrokerClient::new(current.channel()?)
        .renew(RenewRequest {
            csr_der: key.csr_der.clone(),
            software_version: software_version.to_owned(),
        })
        .await
        .map_err(|s| refused(s, &current.info.broker_url))?
        .into_inner();
    let (facts, _uri) = check_issued(&response.certificate_pem, &key.public_key)?;
    let renewed = StoredIdentity {
        info: current.info.clone(),
        cert_pem: response.certificate_pem,
        key_pem: key.key_pem,
        chain_pem: response.ca_chain_pem,
        broker_ca_pem: current.broker_ca_pem.clone(),
        not_before: facts.not_before,
        not_after: facts.not_after,
    };
    save(state_dir, &renewed)?;
    Ok(renewed)
}

/// Keeps the certificate in `state_dir` renewed until `stop` completes: sleeps until two thirds
/// of the lifetime, renews, and retries failures with [`retry_delay`]. `on_renewed` sees every
/// new identity (to rebuild channels). Returns an error when renewing cannot succeed any more: the
/// broker refused the agent (revoked, replaced) or the certificate expired meanwhile (then the
/// agent must be enrolled again).
pub async fn keep_renewed(
    state_dir: &Path,
    software_version: &str,
    mut on_renewed: impl FnMut(&StoredIdentity) + Send,
    stop: impl Future<Output = ()> + Send,
) -> Result<(), IdentityError> {
    let mut current = load(state_dir)?;
    let run = async {
        loop {
            let now = OffsetDateTime::now_utc();
            tokio::time::sleep(renewal_delay(now, current.not_before, current.not_after)).await;
            match renew(state_dir, software_version).await {
                Ok(renewed) => {
                    tracing::info!(
                        tenant = %renewed.info.tenant,
                        agent = %renewed.info.agent,
                        expires = %renewed.not_after,
                        renew_at = %renewed.renewal_time(),
                        "agent certificate renewed"
                    );
                    on_renewed(&renewed);
                    current = renewed;
                }
                Err(
                    error @ IdentityError::Refused {
                        code: tonic::Code::PermissionDenied | tonic::Code::Unauthenticated,
                        ..
                    },
                ) => return Err(error),
                Err(error) => {
                    let now = OffsetDateTime::now_utc();
                    if now >= current.not_after {
                        return Err(IdentityError::Missing(format!(
                            "the agent certificate expired at {} before it could be renewed \
                             ({error}); enroll the agent again",
                            current.not_after
                        )));
                    }
                    let wait = retry_delay(now, current.not_after);
                    tracing::warn!(
                        %error,
                        retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        "renewing the agent certificate failed"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    };
    tokio::select! {
        () = stop => Ok(()),
        result = run => result,
    }
}

/// Reads the identity in `state_dir` and checks that key and certificate belong together.
pub fn load(state_dir: &Path) -> Result<StoredIdentity, IdentityError> {
    let read = |name: &str| -> Result<String, IdentityError> {
        let path = state_dir.join(name);
        std::fs::read_to_string(&path).map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                IdentityError::Missing(format!(
                    "{} is missing: this agent is not enrolled (run `tokenfleet-agent enroll`)",
                    path.display()
                ))
            } else {
                IdentityError::File { path, error }
            }
        })
    };
    let info: IdentityInfo = serde_json::from_str(&read(IDENTITY_FILE)?).map_err(|e| {
        IdentityError::Missing(format!(
            "{}: not a valid identity file: {e}",
            state_dir.join(IDENTITY_FILE).display()
        ))
    })?;
    let cert_pem = read(CERT_FILE)?;
    let key_pem = Zeroizing::new(read(KEY_FILE)?);
    let chain_pem = read(CHAIN_FILE)?;
    let broker_ca_path = state_dir.join(BROKER_CA_FILE);
    let broker_ca_pem = if broker_ca_path.exists() {
        Some(read(BROKER_CA_FILE)?)
    } else {
        None
    };
    let facts = certificate_facts(&cert_pem).map_err(|e| {
        IdentityError::Missing(format!("{}: {e}", state_dir.join(CERT_FILE).display()))
    })?;
    let key = KeyPair::from_pem(&key_pem).map_err(|_| {
        IdentityError::Missing(format!(
            "{}: not a usable private key",
            state_dir.join(KEY_FILE).display()
        ))
    })?;
    if key.public_key_raw() != facts.public_key.as_slice() {
        return Err(IdentityError::Missing(format!(
            "{} and {} do not belong together; enroll again",
            state_dir.join(KEY_FILE).display(),
            state_dir.join(CERT_FILE).display()
        )));
    }
    Ok(StoredIdentity {
        info,
        cert_pem,
        key_pem,
        chain_pem,
        broker_ca_pem,
        not_before: facts.not_before,
        not_after: facts.not_after,
    })
}

/// Creates `dir` with mode 0700 (or tightens an existing one).
pub fn ensure_private_dir(dir: &Path) -> Result<(), IdentityError> {
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(file_error(dir))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(file_error(dir))
}

/// Writes `content` to `dir/name` atomically (temporary file, fsync, rename) with `mode`.
fn write_atomic(dir: &Path, name: &str, content: &[u8], mode: u32) -> Result<(), IdentityError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(file_error(&tmp))?;
    file.write_all(content).map_err(file_error(&tmp))?;
    file.sync_all().map_err(file_error(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(file_error(&path))
}

/// Stores `identity` in `state_dir` (created 0700; the key 0600).
pub fn save(state_dir: &Path, identity: &StoredIdentity) -> Result<(), IdentityError> {
    ensure_private_dir(state_dir)?;
    let info = serde_json::to_vec_pretty(&identity.info)
        .map_err(|e| IdentityError::Invalid(format!("identity: {e}")))?;
    write_atomic(state_dir, KEY_FILE, identity.key_pem.as_bytes(), 0o600)?;
    write_atomic(state_dir, CERT_FILE, identity.cert_pem.as_bytes(), 0o644)?;
    write_atomic(state_dir, CHAIN_FILE, identity.chain_pem.as_bytes(), 0o644)?;
    if let Some(ca) = &identity.broker_ca_pem {
        write_atomic(state_dir, BROKER_CA_FILE, ca.as_bytes(), 0o644)?;
    }
    write_atomic(state_dir, IDENTITY_FILE, &info, 0o644)?;
    if let Ok(dir) = std::fs::File::open(state_dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(seconds)
    }

    #[test]
    fn renewal_comes_at_two_thirds_of_the_lifetime() {
        let week = 7 * 24 * 3600;
        assert_eq!(renewal_time(at(0), at(week)), at(week * 2 / 3));
        assert_eq!(renewal_time(at(100), at(160)), at(140));
        assert_eq!(
            renewal_delay(at(100), at(100), at(160)),
            Duration::from_secs(40)
        );
        assert_eq!(renewal_delay(at(150), at(100), at(160)), Duration::ZERO);
        assert_eq!(renewal_delay(at(500), at(100), at(160)), Duration::ZERO);
    }

    #[test]
    fn retries_come_sooner_as_expiry_nears() {
        assert_eq!(retry_delay(at(0), at(6000)), Duration::from_secs(300));
        assert_eq!(retry_delay(at(0), at(100)), Duration::from_secs(10));
        assert_eq!(retry_delay(at(0), at(5)), Duration::from_secs(1));
        assert_eq!(retry_delay(at(10), at(5)), Duration::from_secs(1));
    }

    #[test]
    fn codes_and_identities_do_not_show_secrets() {
        let code = EnrollmentCode::new(" tfe_secret \n");
        assert_eq!(code.expose(), "tfe_secret");
        assert!(!format!("{code:?}").contains("secret"));
        let key = new_key().unwrap();
        assert!(key.key_pem.contains("PRIVATE KEY"));
        let identity = StoredIdentity {
            info: IdentityInfo {
                broker_url: "https://localhost:1".into(),
                tenant: "t".into(),
                agent: "a".into(),
            },
            cert_pem: String::new(),
            key_pem: key.key_pem,
            chain_pem: String::new(),
            broker_ca_pem: None,
            not_before: at(0),
            not_after: at(1),
        };
        assert!(!format!("{identity:?}").contains("PRIVATE"));
    }

    #[test]
    fn csrs_are_signed_by_the_new_key_and_hold_no_private_key() {
        let key = new_key().unwrap();
        let (_, csr) = <x509_parser::certification_request::X509CertificationRequest as x509_parser::prelude::FromDer<_>>::from_der(&key.csr_der).unwrap();
        csr.verify_signature().unwrap();
        assert_eq!(
            csr.certification_request_info
                .subject_pki
                .subject_public_key
                .data
                .as_ref(),
            key.public_key.as_slice()
        );
        // PKCS#8 of an EC key holds the public key too; the secret is the 32-byte scalar, the
        // first OCTET STRING of length 32 (04 20 ...).
        let pkcs8 = KeyPair::from_pem(&key.key_pem).unwrap().serialize_der();
        let at = pkcs8.windows(2).position(|w| w == [0x04, 0x20]).unwrap() + 2;
        let scalar = &pkcs8[at..at + 32];
        assert!(!key.csr_der.windows(32).any(|w| w == scalar));
        assert!(!key.public_key.windows(32).any(|w| w == scalar));
    }

    #[test]
    fn saved_identities_are_private_and_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("agent");
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://tokenfleet/tenants/t/agents/a".try_into().unwrap(),
        )];
        params.not_before = at(1_000_000);
        params.not_after = at(1_000_600);
        let cert = params.self_signed(&key).unwrap();
        let identity = StoredIdentity {
            info: IdentityInfo {
                broker_url: "https://localhost:1".into(),
                tenant: "t".into(),
                agent: "a".into(),
            },
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
            chain_pem: cert.pem(),
            broker_ca_pem: Some(cert.pem()),
            not_before: at(1_000_000),
            not_after: at(1_000_600),
        };
        save(&state, &identity).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(KEY_FILE)), 0o600);
        let loaded = load(&state).unwrap();
        assert_eq!(loaded.info, identity.info);
        assert_eq!(loaded.not_after, at(1_000_600));
        assert_eq!(loaded.renewal_time(), at(1_000_400));
        assert_eq!(loaded.broker_ca_pem, identity.broker_ca_pem);

        // A key that does not fit the certificate is refused.
        std::fs::write(
            state.join(KEY_FILE),
            KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        assert!(
            load(&state)
                .unwrap_err()
                .to_string()
                .contains("do not belong together")
        );
        let empty = dir.path().join("empty");
        assert!(
            load(&empty)
                .unwrap_err()
                .to_string()
                .contains("not enrolled")
        );
    }
}
