//! `[tls]` (the gRPC listener's server certificate) and `[agents]` (agent CA, certificate
//! lifetime): raw sections and their validation. Certificate and key files are read and checked
//! (parseable, key matching the certificate) when the configuration is validated, so a bad file
//! stops the broker at start with the field named.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokenfleet_seal::Secret;

use super::error::ConfigError;
use crate::identity::{
    AgentCa, DEFAULT_CERTIFICATE_LIFETIME, MAX_CERTIFICATE_LIFETIME, MIN_CERTIFICATE_LIFETIME,
};
use crate::rate_limit::Rate;

/// `[tls]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// Server certificate chain (PEM, leaf first). Together with `key_file` it turns TLS on for
    /// the gRPC listener (TLS 1.2 and 1.3); without both the listener is plaintext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Private key of the server certificate (PEM: PKCS#8, SEC1 or PKCS#1); keep it mode 0600.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// `[agents]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsSection {
    /// Lifetime of agent client certificates in seconds (5 to 31622400; default 604800 = 7 days).
    /// Agents renew at about two thirds of it.
    pub certificate_lifetime_seconds: u64,
    /// CA certificate (PEM) that issues agent certificates. With `ca_key_file` it replaces the CA
    /// the broker otherwise generates on first start and keeps in the store, key sealed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_cert_file: Option<PathBuf>,
    /// Private key (PEM, PKCS#8) of `ca_cert_file`; keep it mode 0600.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_key_file: Option<PathBuf>,
    /// `IssueAccessToken` calls each agent may make per minute, sustained (0 = unlimited). The
    /// limit is kept in each replica's memory: N replicas allow up to N times this.
    pub issue_rate_per_minute: u32,
    /// Calls an agent may make at once after a quiet period (at least 1).
    pub issue_burst: u32,
    /// Seconds between an agent's status reports (1 to 3600; default 30). A device whose last
    /// report is older than three heartbeats shows as UNKNOWN in the fleet status.
    pub heartbeat_seconds: u32,
}

impl Default for AgentsSection {
    fn default() -> Self {
        Self {
            certificate_lifetime_seconds: DEFAULT_CERTIFICATE_LIFETIME.as_secs(),
            ca_cert_file: None,
            ca_key_file: None,
            issue_rate_per_minute: 600,
            issue_burst: 60,
            heartbeat_seconds: crate::fleet::DEFAULT_HEARTBEAT_SECONDS,
        }
    }
}

/// Validated TLS settings: the server certificate chain and its key, read from their files and
/// checked to belong together. `Debug` does not show the key (rustls shows its algorithm only).
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Where the certificate came from.
    pub cert_file: PathBuf,
    /// The certificate chain with its signing key, as the gRPC listener serves them.
    pub certified: Arc<rustls::sign::CertifiedKey>,
}

/// Validated agent identity settings.
#[derive(Debug, Clone)]
pub struct AgentsConfig {
    /// Lifetime of issued agent certificates.
    pub certificate_lifetime: Duration,
    /// The agent CA from `ca_cert_file`/`ca_key_file`; `None` = the CA kept in the store.
    pub ca: Option<Arc<AgentCa>>,
    /// Per-agent `IssueAccessToken` rate (per replica).
    pub issue_rate: Rate,
    /// Seconds between an agent's status reports.
    pub heartbeat_seconds: u32,
}

fn read(field: &str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::invalid(field, format!("reading {}: {e}", path.display())))
}

/// Both paths or none; the error names the missing one.
fn pair<'a>(
    section: &str,
    (cert_name, cert): (&str, Option<&'a PathBuf>),
    (key_name, key): (&str, Option<&'a PathBuf>),
) -> Result<Option<(&'a PathBuf, &'a PathBuf)>, ConfigError> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (Some(_), None) => Err(ConfigError::invalid(
            format!("{section}.{key_name}"),
            format!("missing: `{section}.{cert_name}` needs its private key"),
        )),
        (None, Some(_)) => Err(ConfigError::invalid(
            format!("{section}.{cert_name}"),
            format!("missing: `{section}.{key_name}` needs its certificate"),
        )),
    }
}

impl TlsSection {
    /// Reads and checks the certificate and key; `None` when TLS is not configured.
    pub fn load(&self) -> Result<Option<TlsConfig>, ConfigError> {
        let Some((cert_file, key_file)) = pair(
            "tls",
            ("cert_file", self.cert_file.as_ref()),
            ("key_file", self.key_file.as_ref()),
        )?
        else {
            return Ok(None);
        };
        let cert_pem = read("tls.cert_file", cert_file)?;
        let key_pem = Secret::new(read("tls.key_file", key_file)?);
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| {
                    ConfigError::invalid(
                        "tls.cert_file",
                        format!("{}: not PEM certificates: {e}", cert_file.display()),
                    )
                })?;
        if chain.is_empty() {
            return Err(ConfigError::invalid(
                "tls.cert_file",
                format!("{} holds no PEM certificate", cert_file.display()),
            ));
        }
        // The parse error of a key file could quote it; say only what is wrong.
        let key = PrivateKeyDer::from_pem_slice(key_pem.expose().as_bytes()).map_err(|_| {
            ConfigError::invalid(
                "tls.key_file",
                format!(
                    "{} holds no PEM private key (PKCS#8, SEC1 or PKCS#1)",
                    key_file.display()
                ),
            )
        })?;
        let certified = rustls::sign::CertifiedKey::from_der(
            chain,
            key,
            &rustls::crypto::ring::default_provider(),
        )
        .map_err(|e| {
            ConfigError::invalid(
                "tls.key_file",
                format!(
                    "{} does not fit the certificate in {}: {e}",
                    key_file.display(),
                    cert_file.display()
                ),
            )
        })?;
        Ok(Some(TlsConfig {
            cert_file: cert_file.clone(),
            certified: Arc::new(certified),
        }))
    }
}

impl AgentsSection {
    /// Checks the lifetime and reads the CA files if given.
    pub fn load(&self) -> Result<AgentsConfig, ConfigError> {
        let lifetime = Duration::from_secs(self.certificate_lifetime_seconds);
        if !(MIN_CERTIFICATE_LIFETIME..=MAX_CERTIFICATE_LIFETIME).contains(&lifetime) {
            return Err(ConfigError::invalid(
                "agents.certificate_lifetime_seconds",
                format!(
                    "must be {}-{}, got {}",
                    MIN_CERTIFICATE_LIFETIME.as_secs(),
                    MAX_CERTIFICATE_LIFETIME.as_secs(),
                    self.certificate_lifetime_seconds
                ),
            ));
        }
        let ca = match pair(
            "agents",
            ("ca_cert_file", self.ca_cert_file.as_ref()),
            ("ca_key_file", self.ca_key_file.as_ref()),
        )? {
            None => None,
            Some((cert_file, key_file)) => {
                let cert_pem = read("agents.ca_cert_file", cert_file)?;
                let key_pem = Secret::new(read("agents.ca_key_file", key_file)?);
                let ca = AgentCa::from_pem(&cert_pem, &key_pem).map_err(|e| {
                    ConfigError::invalid(
                        "agents.ca_cert_file",
                        format!("{} / {}: {e}", cert_file.display(), key_file.display()),
                    )
                })?;
                Some(Arc::new(ca))
            }
        };
        if self.issue_burst == 0 {
            return Err(ConfigError::invalid(
                "agents.issue_burst",
                "must be at least 1".to_owned(),
            ));
        }
        if !(1..=crate::fleet::MAX_HEARTBEAT_SECONDS).contains(&self.heartbeat_seconds) {
            return Err(ConfigError::invalid(
                "agents.heartbeat_seconds",
                format!(
                    "must be 1-{}, got {}",
                    crate::fleet::MAX_HEARTBEAT_SECONDS,
                    self.heartbeat_seconds
                ),
            ));
        }
        Ok(AgentsConfig {
            certificate_lifetime: lifetime,
            ca,
            issue_rate: Rate {
                per_minute: self.issue_rate_per_minute,
                burst: self.issue_burst,
            },
            heartbeat_seconds: self.heartbeat_seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::pki;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn tls_files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let ca = pki::generate_ca("t", now, Duration::from_secs(3600)).unwrap();
        let server = pki::generate_server_cert(
            &ca.cert_pem,
            &ca.key_pem,
            &["localhost"],
            now,
            Duration::from_secs(3600),
        )
        .unwrap();
        let cert = write(dir.path(), "server.pem", &server.cert_pem);
        let key = write(dir.path(), "server.key", server.key_pem.expose());
        let other_key = write(dir.path(), "other.key", ca.key_pem.expose());
        let junk = write(dir.path(), "junk", "hello");

        assert!(TlsSection::default().load().unwrap().is_none());
        let ok = TlsSection {
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
        }
        .load()
        .unwrap()
        .unwrap();
        assert!(!format!("{ok:?}").contains("PRIVATE KEY"));
        assert_eq!(
            ok.certified.end_entity_cert().unwrap().as_ref(),
            crate::identity::ca::first_cert_der(&server.cert_pem)
                .unwrap()
                .as_slice(),
            "the chain served is the certificate file's"
        );

        let cases = [
            (Some(cert.clone()), None, "tls.key_file"),
            (None, Some(key.clone()), "tls.cert_file"),
            (Some(junk.clone()), Some(key.clone()), "tls.cert_file"),
            (Some(cert.clone()), Some(junk.clone()), "tls.key_file"),
            (Some(cert.clone()), Some(other_key), "tls.key_file"),
            (Some(dir.path().join("missing")), Some(key), "tls.cert_file"),
        ];
        for (cert_file, key_file, field) in cases {
            let err = TlsSection {
                cert_file,
                key_file,
            }
            .load()
            .unwrap_err();
            assert!(
                err.to_string().contains(&format!("`{field}`")),
                "{field}: {err}"
            );
            assert!(!err.to_string().contains("PRIVATE KEY"), "{err}");
        }
    }

    #[test]
    fn agent_settings_are_checked() {
        let loaded = AgentsSection::default().load().unwrap();
        assert_eq!(loaded.certificate_lifetime, DEFAULT_CERTIFICATE_LIFETIME);
        assert!(loaded.ca.is_none());
        for bad in [0, 4, 400 * 24 * 3600] {
            let err = AgentsSection {
                certificate_lifetime_seconds: bad,
                ..AgentsSection::default()
            }
            .load()
            .unwrap_err();
            assert!(
                err.to_string()
                    .contains("agents.certificate_lifetime_seconds")
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let ca = pki::generate_ca(
            "t",
            time::OffsetDateTime::now_utc(),
            Duration::from_secs(3600),
        )
        .unwrap();
        let cert = write(dir.path(), "ca.pem", &ca.cert_pem);
        let key = write(dir.path(), "ca.key", ca.key_pem.expose());
        let loaded = AgentsSection {
            ca_cert_file: Some(cert.clone()),
            ca_key_file: Some(key),
            ..AgentsSection::default()
        }
        .load()
        .unwrap();
        assert!(loaded.ca.is_some());
        let err = AgentsSection {
            ca_cert_file: Some(cert),
            ..AgentsSection::default()
        }
        .load()
        .unwrap_err();
        assert!(err.to_string().contains("agents.ca_key_file"), "{err}");
    }
}
