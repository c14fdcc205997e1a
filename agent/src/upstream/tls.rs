//! TLS for every upstream connection of the agent (SMTP, POP3, IMAP, connection tests): rustls
//! with the ring provider, the system roots plus an optional extra CA, verification on by default,
//! and the profile's minimum/maximum protocol versions.
//!
//! [`TlsSettings::check_token_transport`] is the agent's own check (the broker validates the
//! same when a profile is saved) that no bearer token leaves this machine in clear text: every
//! upstream (SMTP, POP3, IMAP, the mail APIs, connection tests) calls it before it connects, and
//! refuses a connection without TLS, or with certificate verification off, to a host that is not
//! loopback — unless the profile says `insecure_allow_cleartext_tokens`.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A TLS protocol version a profile may allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// TLS 1.2.
    Tls12,
    /// TLS 1.3.
    Tls13,
}

impl TlsVersion {
    /// `TLSv1.2` / `TLSv1.3`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls12 => "TLSv1.2",
            Self::Tls13 => "TLSv1.3",
        }
    }
}

/// How an upstream connection's TLS is set up (from a device's send or fetch profile).
#[derive(Clone, Default)]
pub struct TlsSettings {
    /// Skip certificate verification (lab servers only; the profile says so explicitly).
    pub skip_verification: bool,
    /// Extra trusted CA certificate(s), PEM.
    pub extra_ca_pem: Option<String>,
    /// Lowest version offered (default TLS 1.2).
    pub min_version: Option<TlsVersion>,
    /// Highest version offered (default TLS 1.3).
    pub max_version: Option<TlsVersion>,
    /// Use only the extra CA, not the system roots (tests; a private mail server).
    pub no_system_roots: bool,
    /// The profile's `insecure_allow_cleartext_tokens`: tokens may go to a non-loopback host
    /// without TLS or with verification off (see [`TlsSettings::check_token_transport`]).
    pub allow_cleartext_tokens: bool,
}

/// Whether `host` is this machine: `localhost` or a loopback address (127.0.0.0/8, `::1`). A
/// token sent there in clear text does not cross a network.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim().trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("skip_verification", &self.skip_verification)
            .field("extra_ca", &self.extra_ca_pem.is_some())
            .field("min_version", &self.min_version)
            .field("max_version", &self.max_version)
            .field("allow_cleartext_tokens", &self.allow_cleartext_tokens)
            .finish()
    }
}

/// Why TLS could not be set up or established.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The settings themselves are wrong (bad CA PEM, min above max).
    #[error("tls settings: {0}")]
    Settings(String),
    /// The host is not a valid DNS name or IP address.
    #[error("tls: invalid server name {0:?}")]
    ServerName(String),
    /// The handshake failed; the rustls error says why (certificate, version, alert).
    #[error("tls handshake with {host} failed: {source}")]
    Handshake {
        host: String,
        #[source]
        source: std::io::Error,
    },
    /// No answer within the timeout.
    #[error("tls handshake with {host} timed out after {after:?}")]
    Timeout { host: String, after: Duration },
}

impl TlsError {
    /// The rustls error behind a handshake failure, for classifying it (name mismatch,
    /// unknown issuer, protocol version).
    pub fn rustls_error(&self) -> Option<&rustls::Error> {
        match self {
            Self::Handshake { source, .. } => source
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
            _ => None,
        }
    }
}

/// The process-wide crypto provider (ring, as everywhere in tokenfleet).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: std::sync::OnceLock<Vec<CertificateDer<'static>>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let loaded = rustls_native_certs::load_native_certs();
        for e in &loaded.errors {
            tracing::debug!(error = %e, "skipping an unreadable system CA certificate");
        }
        loaded.certs
    })
}

impl TlsSettings {
    /// Refuses to carry a bearer token to `host:port` without TLS (`encrypted` false) or with
    /// certificate verification off, unless `host` is loopback or the profile allows it
    /// (`allow_cleartext_tokens`). `section` is the profile (`smtp`, `fetch`) the error names.
    pub fn check_token_transport(
        &self,
        section: &str,
        host: &str,
        port: u16,
        encrypted: bool,
    ) -> Result<(), String> {
        if self.allow_cleartext_tokens || is_loopback_host(host) {
            return Ok(());
        }
        if !encrypted {
            return Err(format!(
                "refusing to send the access token in clear text to {host}:{port} \
                 ({section}.security none or an http:// URL): use starttls or implicit_tls \
                 (https), or set {section}.insecure_allow_cleartext_tokens for a trusted relay"
            ));
        }
        if self.skip_verification {
            return Err(format!(
                "refusing to send the access token to {host}:{port} with certificate \
                 verification off ({section}.skip_certificate_verification): trust the server's \
                 CA with {section}.extra_ca_pem instead, or set \
                 {section}.insecure_allow_cleartext_tokens"
            ));
        }
        Ok(())
    }

    /// Builds the rustls client configuration these settings describe.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let min = self.min_version.unwrap_or(TlsVersion::Tls12);
        let max = self.max_version.unwrap_or(TlsVersion::Tls13);
        if min > max {
            return Err(TlsError::Settings(format!(
                "tls_min_version {} is above tls_max_version {}",
                min.as_str(),
                max.as_str()
            )));
        }
        let mut versions: Vec<&'static SupportedProtocolVersion> = Vec::new();
        if min <= TlsVersion::Tls12 && max >= TlsVersion::Tls12 {
            versions.push(&rustls::version::TLS12);
        }
        if max >= TlsVersion::Tls13 {
            versions.push(&rustls::version::TLS13);
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&versions)
            .map_err(|e| TlsError::Settings(e.to_string()))?;
        let config = if self.skip_verification {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
                .with_no_client_auth()
        } else {
            let mut roots = RootCertStore::empty();
            if !self.no_system_roots {
                let (_added, _ignored) = roots.add_parsable_certificates(system_roots().to_vec());
            }
            if let Some(pem) = &self.extra_ca_pem {
                let mut any = false;
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    let cert = cert.map_err(|e| {
                        TlsError::Settings(format!("extra_ca_pem is not valid PEM: {e}"))
                    })?;
                    roots.add(cert).map_err(|e| {
                        TlsError::Settings(format!(
                            "extra_ca_pem holds an unusable certificate: {e}"
                        ))
                    })?;
                    any = true;
                }
                if !any {
                    return Err(TlsError::Settings(
                        "extra_ca_pem holds no CERTIFICATE block".to_owned(),
                    ));
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        Ok(Arc::new(config))
    }

    /// Runs the TLS handshake over `io` (a fresh TCP stream, or one after STARTTLS/STLS) for
    /// `host`, within `timeout`.
    pub async fn connect<IO>(
        &self,
        host: &str,
        io: IO,
        timeout: Duration,
    ) -> Result<TlsStream<IO>, TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let config = self.client_config()?;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| TlsError::ServerName(host.to_owned()))?;
        let connector = TlsConnector::from(config);
        match tokio::time::timeout(timeout, connector.connect(name, io)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(source)) => Err(TlsError::Handshake {
                host: host.to_owned(),
                source,
            }),
            Err(_) => Err(TlsError::Timeout {
                host: host.to_owned(),
                after: timeout,
            }),
        }
    }
}

/// Accepts any server certificate (still checking handshake signatures): only for profiles that
/// explicitly set `skip_certificate_verification`.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_go_in_clear_only_to_loopback_or_when_the_profile_says_so() {
        let strict = TlsSettings::default();
        for host in [
            "127.0.0.1",
            "127.8.9.10",
            "::1",
            "[::1]",
            "localhost",
            "LocalHost",
        ] {
            assert!(is_loopback_host(host), "{host}");
            strict
                .check_token_transport("smtp", host, 25, false)
                .unwrap();
        }
        for host in ["mail.lan", "10.0.0.5", "0.0.0.0", "localhost.example", "::"] {
            assert!(!is_loopback_host(host), "{host}");
            let e = strict
                .check_token_transport("smtp", host, 25, false)
                .unwrap_err();
            assert!(e.contains("smtp.security none"), "{e}");
            assert!(e.contains("smtp.insecure_allow_cleartext_tokens"), "{e}");
            strict
                .check_token_transport("fetch", host, 995, true)
                .unwrap();
        }
        let unverified = TlsSettings {
            skip_verification: true,
            ..TlsSettings::default()
        };
        let e = unverified
            .check_token_transport("fetch", "pop.lan", 995, true)
            .unwrap_err();
        assert!(e.contains("fetch.skip_certificate_verification"), "{e}");
        unverified
            .check_token_transport("fetch", "127.0.0.1", 995, true)
            .unwrap();
        let allowed = TlsSettings {
            skip_verification: true,
            allow_cleartext_tokens: true,
            ..TlsSettings::default()
        };
        allowed
            .check_token_transport("smtp", "mail.lan", 25, false)
            .unwrap();
        allowed
            .check_token_transport("smtp", "mail.lan", 465, true)
            .unwrap();
    }

    #[test]
    fn min_above_max_is_refused_by_name() {
        let settings = TlsSettings {
            min_version: Some(TlsVersion::Tls13),
            max_version: Some(TlsVersion::Tls12),
            ..TlsSettings::default()
        };
        let err = settings.client_config().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("tls settings: tls_min_version TLSv1.3 is above tls_max_version TLSv1.2")
        );
    }

    #[test]
    fn bad_extra_ca_is_named() {
        let settings = TlsSettings {
            extra_ca_pem: Some("not a certificate".to_owned()),
            ..TlsSettings::default()
        };
        let err = settings.client_config().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("tls settings: extra_ca_pem holds no CERTIFICATE block")
        );
    }

    #[test]
    fn tls12_only_and_tls13_only_build() {
        for (min, max) in [
            (TlsVersion::Tls12, TlsVersion::Tls12),
            (TlsVersion::Tls13, TlsVersion::Tls13),
        ] {
            let settings = TlsSettings {
                min_version: Some(min),
                max_version: Some(max),
                ..TlsSettings::default()
            };
            assert!(settings.client_config().is_ok(), "{min:?}..{max:?}");
        }
    }
}
