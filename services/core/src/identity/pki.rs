//! Generating CA and server certificates (ECDSA P-256): the agent CA, and the local CA and server
//! certificate of `--dev` mode and of tests. Private keys come back as [`Secret`] PEM text.

use std::net::IpAddr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;
use tokenfleet_seal::Secret;

use super::IdentityError;

/// A generated certificate and its private key.
#[derive(Debug, Clone)]
pub struct GeneratedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key (PKCS#8 PEM).
    pub key_pem: Secret,
}

fn certificate_error(e: rcgen::Error) -> IdentityError {
    IdentityError::Certificate(e.to_string())
}

/// A random, positive 16-byte serial number.
pub fn random_serial() -> Result<SerialNumber, IdentityError> {
    let mut bytes = [0_u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| IdentityError::Random(e.to_string()))?;
    // Positive (top bit clear) and non-zero leading byte, so the DER integer is 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// `t` without its fractional second (certificates carry whole seconds).
pub fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// A self-signed CA certificate named `common_name`, valid from an hour before `now` for
/// `validity`, allowed to sign end-entity certificates only (path length 0).
pub fn generate_ca(
    common_name: &str,
    now: OffsetDateTime,
    validity: Duration,
) -> Result<GeneratedCert, IdentityError> {
    let key = KeyPair::generate().map_err(certificate_error)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tokenfleet");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let start = whole_seconds(now);
    params.not_before = start - time::Duration::hours(1);
    params.not_after = start + validity;
    params.serial_number = Some(random_serial()?);
    let cert = params.self_signed(&key).map_err(certificate_error)?;
    Ok(GeneratedCert {
        cert_pem: cert.pem(),
        key_pem: Secret::new(key.serialize_pem()),
    })
}

/// A TLS server certificate for `names` (DNS names or IP addresses), signed by the CA
/// `ca_cert_pem`/`ca_key_pem`, valid from an hour before `now` for `validity`.
pub fn generate_server_cert(
    ca_cert_pem: &str,
    ca_key_pem: &Secret,
    names: &[&str],
    now: OffsetDateTime,
    validity: Duration,
) -> Result<GeneratedCert, IdentityError> {
    let ca_key = KeyPair::from_pem(ca_key_pem.expose()).map_err(certificate_error)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).map_err(certificate_error)?;
    let key = KeyPair::generate().map_err(certificate_error)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tokenfleet");
    dn.push(
        DnType::CommonName,
        names.first().copied().unwrap_or("tokenfleet"),
    );
    params.distinguished_name = dn;
    params.subject_alt_names = names
        .iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => rcgen::string::Ia5String::try_from(*name)
                .map(SanType::DnsName)
                .map_err(|e| IdentityError::Certificate(format!("server name `{name}`: {e}"))),
        })
        .collect::<Result<_, _>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let start = whole_seconds(now);
    params.not_before = start - time::Duration::hours(1);
    params.not_after = start + validity;
    params.serial_number = Some(random_serial()?);
    let cert = params.signed_by(&key, &issuer).map_err(certificate_error)?;
    Ok(GeneratedCert {
        cert_pem: cert.pem(),
        key_pem: Secret::new(key.serialize_pem()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_certificates_chain_to_their_ca() {
        let now = OffsetDateTime::now_utc();
        let ca = generate_ca("test CA", now, Duration::from_secs(3600)).unwrap();
        let server = generate_server_cert(
            &ca.cert_pem,
            &ca.key_pem,
            &["localhost", "127.0.0.1"],
            now,
            Duration::from_secs(600),
        )
        .unwrap();
        let ca_der = pem_der(&ca.cert_pem);
        let server_der = pem_der(&server.cert_pem);
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&server_der).unwrap();
        assert!(ca_cert.is_ca());
        leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
        let sans = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(sans.value.general_names.len(), 2);
        assert!(format!("{:?}", server.key_pem).contains("redacted"));
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }
}
