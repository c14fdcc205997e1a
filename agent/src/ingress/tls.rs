//! The ingress's STARTTLS certificate: PEM files, or a self-signed certificate generated at
//! start (`tls = "self-signed"`, for LAN devices that encrypt but do not verify).

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A TLS server configuration for `STARTTLS` on the ingress.
#[derive(Clone)]
pub struct IngressTls {
    config: Arc<ServerConfig>,
    certificate_pem: String,
}

impl std::fmt::Debug for IngressTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngressTls").finish_non_exhaustive()
    }
}

/// Why the ingress TLS configuration could not be built (names the file or the problem).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ingress tls: {0}")]
pub struct IngressTlsError(pub String);

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, IngressTlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| IngressTlsError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| IngressTlsError(format!("certificate and key do not fit together: {e}")))?;
    Ok(Arc::new(config))
}

impl IngressTls {
    /// Loads a certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 or SEC1) from
    /// PEM files.
    pub fn from_pem_files(cert_file: &Path, key_file: &Path) -> Result<Self, IngressTlsError> {
        let cert_pem = std::fs::read_to_string(cert_file)
            .map_err(|e| IngressTlsError(format!("reading {}: {e}", cert_file.display())))?;
        let key_pem = zeroize::Zeroizing::new(
            std::fs::read(key_file)
                .map_err(|e| IngressTlsError(format!("reading {}: {e}", key_file.display())))?,
        );
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IngressTlsError(format!("{}: not valid PEM: {e}", cert_file.display())))?;
        if chain.is_empty() {
            return Err(IngressTlsError(format!(
                "{}: no CERTIFICATE block",
                cert_file.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            IngressTlsError(format!(
                "{}: no usable private key: {e}",
                key_file.display()
            ))
        })?;
        Ok(Self {
            config: server_config(chain, key)?,
            certificate_pem: cert_pem,
        })
    }

    /// Generates a self-signed certificate for `names` (host names or IP addresses; the first is
    /// the common name). Clients must trust [`IngressTls::certificate_pem`] or not verify.
    pub fn self_signed(names: &[String]) -> Result<Self, IngressTlsError> {
        if names.is_empty() {
            return Err(IngressTlsError(
                "a self-signed certificate needs at least one name".to_owned(),
            ));
        }
        let certified = rcgen::generate_simple_self_signed(names.to_vec())
            .map_err(|e| IngressTlsError(format!("generating a self-signed certificate: {e}")))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        Ok(Self {
            config: server_config(vec![certified.cert.der().clone()], key)?,
            certificate_pem: certified.cert.pem(),
        })
    }

    /// The certificate (chain) served, PEM.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// The rustls server configuration, shared with the local POP3 server's `STLS`.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.config)
    }

    pub(super) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config))
    }
}
