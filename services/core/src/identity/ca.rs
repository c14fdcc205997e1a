//! The agent CA: loaded from files or from the store (created there, key sealed, on first use),
//! signs agent certificates from CSRs, and verifies presented agent certificates.

use std::time::Duration;

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateSigningRequestDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokenfleet_seal::{Keyring, Sealed, Secret};
use tokenfleet_store::{Precondition, RecordKey, StoreError};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::pki::{self, random_serial, whole_seconds};
use super::{AgentId, IdentityError};
use crate::kept::Kept;
use crate::state::BrokerState;

/// Collection of the CA record (global scope).
pub const CA_COLLECTION: &str = "agent_ca";
/// Id of the CA record.
pub const CA_ID: &str = "current";
/// Validity of a generated agent CA (ten years).
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 366 * 24 * 3600);
/// Largest accepted CSR.
pub const MAX_CSR_LEN: usize = 16 * 1024;
/// How far before "now" an issued certificate starts, at most (clock skew between broker and
/// agent); a tenth of the lifetime for short lifetimes.
pub const MAX_BACKDATE: Duration = Duration::from_secs(60);

/// Store key of the CA record.
pub fn ca_key() -> RecordKey {
    RecordKey::global(CA_COLLECTION, CA_ID)
}

/// Associated data of the sealed CA key.
pub fn ca_key_aad() -> String {
    format!("global/{CA_COLLECTION}/{CA_ID}#key")
}

/// The CA as stored: certificate and sealed private key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaRecord {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA private key (PKCS#8 PEM), sealed.
    pub key: Sealed,
    /// When the CA was generated.
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
}

/// An issued agent certificate.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// What a verified agent certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCert {
    /// The agent.
    pub id: AgentId,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// Why a presented certificate is not an agent certificate of this broker. Messages are safe to
/// return to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateProblem {
    /// Not parseable X.509.
    #[error("the client certificate is not valid X.509")]
    Malformed,
    /// Not signed by the agent CA.
    #[error("the client certificate was not issued by this broker's agent CA")]
    UnknownIssuer,
    /// Outside its validity period.
    #[error("the client certificate is expired or not yet valid; enroll the agent again")]
    Expired,
    /// No agent identity URI.
    #[error("the client certificate carries no tokenfleet agent identity")]
    NoIdentity,
}

/// The CA that issues and verifies agent certificates.
pub struct AgentCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: Vec<u8>,
    /// The CA certificate's subject (DER), which every certificate it issued names as issuer.
    subject_der: Vec<u8>,
    not_after: OffsetDateTime,
    /// What [`AgentCa::identify_handshake_verified`] read from the certificates it was given,
    /// by certificate (DER, compared whole: a kept reading serves only the very same certificate).
    leaves: Kept<Vec<u8>, Leaf>,
}

/// What one handshake-verified certificate says, kept so a connection's calls parse its
/// certificate once (parsing was 4–5% of the broker's CPU under issuance load). Only what the
/// DER bytes alone decide is kept; the validity by the clock is checked on every call.
#[derive(Debug, Clone)]
struct Leaf {
    cert: VerifiedCert,
    not_before: i64,
    not_after: i64,
}

/// Most certificates [`AgentCa::identify_handshake_verified`] keeps readings of (agents'
/// certificates are ~600 bytes: at most ~3 MiB).
const LEAF_CACHE_MAX: usize = 4096;

impl std::fmt::Debug for AgentCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCa")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn ca_error(what: &str, e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Ca(format!("{what}: {e}"))
}

/// DER of the first certificate in `pem`.
pub fn first_cert_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()
        .map(|der| der.to_vec())
}

impl AgentCa {
    /// The CA from its certificate and private key (PEM). Checks that the certificate is a CA
    /// certificate and that the key belongs to it.
    pub fn from_pem(cert_pem: &str, key_pem: &Secret) -> Result<Self, IdentityError> {
        let cert_der = first_cert_der(cert_pem).ok_or_else(|| {
            IdentityError::Ca("the certificate file holds no PEM certificate".into())
        })?;
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| ca_error("reading the certificate", e))?;
        if !cert.is_ca() {
            return Err(IdentityError::Ca(
                "the certificate is not a CA certificate (basicConstraints CA:TRUE)".into(),
            ));
        }
        let key = KeyPair::from_pem(key_pem.expose())
            .map_err(|_| IdentityError::Ca("the private key is not a usable PEM key".into()))?;
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(IdentityError::Ca(
                "the private key does not belong to the CA certificate".into(),
            ));
        }
        let not_after = cert.validity().not_after.to_datetime();
        let subject_der = cert.subject().as_raw().to_vec();
        let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key)
            .map_err(|e| ca_error("using the certificate as issuer", e))?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            cert_der,
            subject_der,
            not_after,
            leaves: Kept::new(LEAF_CACHE_MAX),
        })
    }

    /// The CA kept in the store, generated (and its key sealed) when there is none yet. Replicas
    /// starting at once agree on one CA: creation is conditional on the record being absent.
    pub async fn load_or_create(state: &BrokerState) -> Result<Self, IdentityError> {
        let key = ca_key();
        for _ in 0..3 {
            if let Some(record) = state.store.get(&key).await? {
                let stored: CaRecord =
                    serde_json::from_slice(&record.data).map_err(|e| StoreError::Corrupt {
                        key: key.to_string(),
                        problem: format!("not a valid agent CA record: {e}"),
                    })?;
                let key_pem = state.keyring.open_secret(&ca_key_aad(), &stored.key)?;
                return Self::from_pem(&stored.cert_pem, &key_pem);
            }
            let now = state.clock.now();
            let generated = pki::generate_ca("tokenfleet agent CA", now, CA_VALIDITY)?;
            let record = CaRecord {
                cert_pem: generated.cert_pem.clone(),
                key: seal_ca_key(&state.keyring, &generated.key_pem)?,
                created: now,
            };
            let data = serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt {
                key: key.to_string(),
                problem: format!("cannot encode the agent CA record: {e}"),
            })?;
            match state.store.put(&key, data, Precondition::Absent).await {
                Ok(_) => {
                    tracing::info!("generated the agent CA and stored it (key sealed)");
                    return Self::from_pem(&generated.cert_pem, &generated.key_pem);
                }
                // Another replica was first: use its CA.
                Err(StoreError::AlreadyExists(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IdentityError::Ca(
            "the agent CA record kept changing while it was being created".into(),
        ))
    }

    /// The CA certificate, PEM (what agents present as their chain, and the trust root for client
    /// certificates).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// End of the CA's validity; issued certificates never outlive it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Issues a client certificate for `id` to the key of the CSR `csr_der`, valid from `now`
    /// (backdated a little for clock skew) for `lifetime`. The CSR must be well-formed, signed by
    /// its key (proof of possession) and use an ECDSA P-256/P-384 or Ed25519 key; its subject and
    /// requested extensions are ignored.
    pub fn issue(
        &self,
        csr_der: &[u8],
        id: &AgentId,
        now: OffsetDateTime,
        lifetime: Duration,
    ) -> Result<IssuedCertificate, IdentityError> {
        let public_key = check_csr(csr_der)?;
        let now = whole_seconds(now);
        // Whole seconds, so the certificate spans exactly its lifetime plus the backdating.
        let backdate = Duration::from_secs((lifetime / 10).as_secs()).min(MAX_BACKDATE);
        let not_before = whole_seconds(now - backdate);
        let not_after = whole_seconds((now + lifetime).min(self.not_after));
        if not_after <= now {
            return Err(IdentityError::Ca(
                "the agent CA has expired; replace it".into(),
            ));
        }
        let serial = random_serial()?;
        let serial_hex = hex(&serial.to_bytes());
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "tokenfleet agent");
        dn.push(DnType::CommonName, id.to_string());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            rcgen::string::Ia5String::try_from(id.uri())
                .map_err(|e| IdentityError::Certificate(e.to_string()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(serial);
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            serial: serial_hex,
            not_before,
            not_after,
        })
    }

    /// Checks that `leaf_der` is a certificate this CA issued to an agent and that it is valid at
    /// `now`; returns the identity it carries.
    pub fn verify(
        &self,
        leaf_der: &[u8],
        now: OffsetDateTime,
    ) -> Result<VerifiedCert, CertificateProblem> {
        let (_, ca) = x509_parser::parse_x509_certificate(&self.cert_der)
            .map_err(|_| CertificateProblem::UnknownIssuer)?;
        let (rest, leaf) = x509_parser::parse_x509_certificate(leaf_der)
            .map_err(|_| CertificateProblem::Malformed)?;
        if !rest.is_empty() {
            return Err(CertificateProblem::Malformed);
        }
        if leaf.issuer() != ca.subject() || leaf.verify_signature(Some(ca.public_key())).is_err() {
            return Err(CertificateProblem::UnknownIssuer);
        }
        let validity = leaf.validity();
        let now_ts = now.unix_timestamp();
        if now_ts < validity.not_before.timestamp() || now_ts > validity.not_after.timestamp() {
            return Err(CertificateProblem::Expired);
        }
        let id = identity_of(&leaf).ok_or(CertificateProblem::NoIdentity)?;
        Ok(VerifiedCert {
            id,
            serial: hex(leaf.raw_serial()),
            not_after: validity.not_after.to_datetime(),
        })
    }
}

impl AgentCa {
    /// Reads the identity of a client certificate that the TLS handshake already verified
    /// against this CA (the gRPC listener trusts exactly this CA for client certificates:
    /// `client_ca_root(ca.cert_pem())` in the broker's server setup, so rustls checked the
    /// chain, the signature and the validity when the connection was made). What the handshake
    /// cannot know is checked here: the validity by the broker's clock now (the connection may
    /// be older than the certificate's expiry) and the identity URI. The ECDSA signature is not
    /// verified again: that verification was 29% of the broker's CPU under issuance load.
    ///
    /// Only for certificates from a connection this CA's verifier accepted; anything else goes
    /// through [`AgentCa::verify`].
    pub fn identify_handshake_verified(
        &self,
        leaf_der: &[u8],
        now: OffsetDateTime,
    ) -> Result<VerifiedCert, CertificateProblem> {
        let leaf = match self.leaves.find(leaf_der, |leaf| Some(leaf.clone())) {
            Some(leaf) => leaf,
            None => {
                let leaf = self.read_leaf(leaf_der)?;
                self.leaves.put(leaf_der.to_vec(), leaf.clone());
                leaf
            }
        };
        let now_ts = now.unix_timestamp();
        if now_ts < leaf.not_before || now_ts > leaf.not_after {
            return Err(CertificateProblem::Expired);
        }
        Ok(leaf.cert)
    }

    /// What the DER of a handshake-verified certificate says: issued by this CA, its identity,
    /// serial and validity period.
    fn read_leaf(&self, leaf_der: &[u8]) -> Result<Leaf, CertificateProblem> {
        let (rest, leaf) = x509_parser::parse_x509_certificate(leaf_der)
            .map_err(|_| CertificateProblem::Malformed)?;
        if !rest.is_empty() {
            return Err(CertificateProblem::Malformed);
        }
        if leaf.issuer().as_raw() != self.subject_der.as_slice() {
            return Err(CertificateProblem::UnknownIssuer);
        }
        let validity = leaf.validity();
        let id = identity_of(&leaf).ok_or(CertificateProblem::NoIdentity)?;
        Ok(Leaf {
            cert: VerifiedCert {
                id,
                serial: hex(leaf.raw_serial()),
                not_after: validity.not_after.to_datetime(),
            },
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        })
    }
}

/// Re-seals the stored CA key with the keyring's current key if another key sealed it (after a
/// key rotation); returns (sealed values examined, re-sealed). Written with compare-and-set.
pub async fn reseal(state: &BrokerState) -> Result<(u64, u64), crate::records::ResealError> {
    use crate::records::ResealError;
    let key = ca_key();
    for _ in 0..crate::records::CAS_ATTEMPTS {
        let Some(record) = state.store.get(&key).await? else {
            return Ok((0, 0));
        };
        let mut stored: CaRecord =
            serde_json::from_slice(&record.data).map_err(|e| StoreError::Corrupt {
                key: key.to_string(),
                problem: format!("not a valid agent CA record: {e}"),
            })?;
        if !state.keyring.needs_reseal(&stored.key) {
            return Ok((1, 0));
        }
        let seal_error = |source| ResealError::Seal {
            record: ca_key_aad(),
            source,
        };
        let key_pem = state
            .keyring
            .open_secret(&ca_key_aad(), &stored.key)
            .map_err(seal_error)?;
        stored.key = state
            .keyring
            .seal_secret(&ca_key_aad(), &key_pem)
            .map_err(seal_error)?;
        let data = serde_json::to_vec(&stored).map_err(|e| StoreError::Corrupt {
            key: key.to_string(),
            problem: format!("cannot encode the agent CA record: {e}"),
        })?;
        match state
            .store
            .put(&key, data, Precondition::Version(record.version))
            .await
        {
            Ok(_) => return Ok((1, 1)),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ResealError::Contended(key.to_string()))
}

/// Seals the CA private key for the store.
pub fn seal_ca_key(keyring: &Keyring, key_pem: &Secret) -> Result<Sealed, IdentityError> {
    Ok(keyring.seal_secret(&ca_key_aad(), key_pem)?)
}

/// The agent identity in a certificate's URI subject alternative names (exactly one allowed).
pub fn identity_of(cert: &X509Certificate<'_>) -> Option<AgentId> {
    let sans = cert.subject_alternative_name().ok()??;
    let mut ids = sans
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => AgentId::from_uri(uri),
            _ => None,
        });
    let id = ids.next()?;
    if ids.next().is_some() {
        return None;
    }
    Some(id)
}

/// Parses and checks a CSR (well-formed, signed by its own key, a supported key type); returns the
/// public key to certify.
pub fn check_csr(csr_der: &[u8]) -> Result<rcgen::PublicKey, IdentityError> {
    if csr_der.is_empty() {
        return Err(IdentityError::Csr("must not be empty".into()));
    }
    if csr_der.len() > MAX_CSR_LEN {
        return Err(IdentityError::Csr(format!(
            "must be at most {MAX_CSR_LEN} bytes, got {}",
            csr_der.len()
        )));
    }
    let csr =
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(|e| match e {
                rcgen::Error::InvalidCertificationRequestSignature => IdentityError::Csr(
                    "the signature does not verify with the request's own key".into(),
                ),
                rcgen::Error::UnsupportedSignatureAlgorithm => IdentityError::Csr(
                    "unsupported key type (use ECDSA P-256, ECDSA P-384 or Ed25519)".into(),
                ),
                other => IdentityError::Csr(format!("not a valid PKCS#10 request (DER): {other}")),
            })?;
    let alg = csr.public_key.algorithm();
    let supported = [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_ED25519,
    ];
    if !supported.contains(&alg) {
        return Err(IdentityError::Csr(
            "unsupported key type (use ECDSA P-256, ECDSA P-384 or Ed25519)".into(),
        ));
    }
    Ok(csr.public_key)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> AgentCa {
        let generated =
            pki::generate_ca("test agent CA", OffsetDateTime::now_utc(), CA_VALIDITY).unwrap();
        AgentCa::from_pem(&generated.cert_pem, &generated.key_pem).unwrap()
    }

    fn csr(key: &KeyPair) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://tokenfleet/tenants/other/agents/evil")
                .unwrap(),
        )];
        params.serialize_request(key).unwrap().der().to_vec()
    }

    fn id() -> AgentId {
        AgentId::new("acme", "site-a").unwrap()
    }

    #[test]
    fn identity_uris_round_trip_and_reject_anything_else() {
        let id = id();
        assert_eq!(id.uri(), "spiffe://tokenfleet/tenants/acme/agents/site-a");
        assert_eq!(AgentId::from_uri(&id.uri()), Some(id));
        for bad in [
            "spiffe://tokenfleet/tenants/acme/agents/",
            "spiffe://tokenfleet/tenants/acme/agents/a/b",
            "spiffe://tokenfleet/tenants/ACME/agents/a",
            "spiffe://other/tenants/acme/agents/a",
            "urn:x",
        ] {
            assert_eq!(AgentId::from_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn issued_certificates_carry_the_brokers_identity_not_the_requested_one() {
        let ca = ca();
        let key = KeyPair::generate().unwrap();
        let now = OffsetDateTime::now_utc();
        let issued = ca
            .issue(&csr(&key), &id(), now, Duration::from_secs(600))
            .unwrap();
        let der = first_cert_der(&issued.cert_pem).unwrap();
        let verified = ca.verify(&der, now).unwrap();
        assert_eq!(verified.id, id());
        assert_eq!(verified.serial, issued.serial);
        assert_eq!(verified.not_after, issued.not_after);
        assert_eq!((issued.not_after - whole_seconds(now)).whole_seconds(), 600);
        let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            leaf.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        assert_eq!(
            ca.verify(&der, now + time::Duration::seconds(601)),
            Err(CertificateProblem::Expired)
        );
        assert_eq!(
            ca.verify(&der, now - time::Duration::seconds(120)),
            Err(CertificateProblem::Expired)
        );
    }

    /// The handshake path reads a certificate once and keeps what it says, but checks the
    /// validity by the clock on every call, and a certificate naming another issuer is never taken for
    /// one it has seen.
    #[test]
    fn handshake_verified_certificates_are_read_once_and_checked_by_the_clock_each_call() {
        // The handshake verified the signature; this path compares the issuer's name only, so
        // the other CA has another name.
        let ours = ca();
        let generated =
            pki::generate_ca("another agent CA", OffsetDateTime::now_utc(), CA_VALIDITY).unwrap();
        let theirs = AgentCa::from_pem(&generated.cert_pem, &generated.key_pem).unwrap();
        let key = KeyPair::generate().unwrap();
        let now = OffsetDateTime::now_utc();
        let issued = ours
            .issue(&csr(&key), &id(), now, Duration::from_secs(600))
            .unwrap();
        let der = first_cert_der(&issued.cert_pem).unwrap();
        let first = ours.identify_handshake_verified(&der, now).unwrap();
        assert_eq!(first, ours.verify(&der, now).unwrap());
        assert_eq!(ours.leaves.len(), 1);
        // The next call answers from the kept reading, not from parsing again: mark the kept
        // entry and see the mark come back.
        ours.leaves
            .change(der.as_slice(), |leaf| leaf.cert.serial = "kept".into());
        let second = ours.identify_handshake_verified(&der, now).unwrap();
        assert_eq!(
            second.serial, "kept",
            "the second call used the kept reading"
        );
        assert_eq!(second.id, first.id);
        assert_eq!(ours.leaves.len(), 1);
        for late_or_early in [
            now + time::Duration::seconds(601),
            now - time::Duration::seconds(120),
        ] {
            assert_eq!(
                ours.identify_handshake_verified(&der, late_or_early),
                Err(CertificateProblem::Expired)
            );
        }
        let other = theirs
            .issue(&csr(&key), &id(), now, Duration::from_secs(600))
            .unwrap();
        let other_der = first_cert_der(&other.cert_pem).unwrap();
        assert_eq!(
            ours.identify_handshake_verified(&other_der, now),
            Err(CertificateProblem::UnknownIssuer)
        );
        assert_eq!(ours.leaves.len(), 1, "refusals are not kept");
    }

    #[test]
    fn certificates_of_another_ca_are_refused() {
        let (ours, theirs) = (ca(), ca());
        let key = KeyPair::generate().unwrap();
        let now = OffsetDateTime::now_utc();
        let issued = theirs
            .issue(&csr(&key), &id(), now, Duration::from_secs(600))
            .unwrap();
        let der = first_cert_der(&issued.cert_pem).unwrap();
        assert_eq!(
            ours.verify(&der, now),
            Err(CertificateProblem::UnknownIssuer)
        );
        assert_eq!(
            ours.verify(b"junk", now),
            Err(CertificateProblem::Malformed)
        );
    }

    #[test]
    fn bad_csrs_are_refused_with_the_field_named() {
        let ca = ca();
        let now = OffsetDateTime::now_utc();
        let key = KeyPair::generate().unwrap();
        let mut tampered = csr(&key);
        let last = tampered.len() - 1;
        tampered[last] ^= 0x01;
        for bad in [
            Vec::new(),
            b"not a csr".to_vec(),
            tampered,
            vec![0; MAX_CSR_LEN + 1],
        ] {
            let err = ca
                .issue(&bad, &id(), now, Duration::from_secs(60))
                .unwrap_err();
            assert!(err.to_string().starts_with("csr_der: "), "{err}");
        }
    }

    #[test]
    fn a_key_that_does_not_match_the_ca_certificate_is_refused() {
        let now = OffsetDateTime::now_utc();
        let a = pki::generate_ca("a", now, CA_VALIDITY).unwrap();
        let b = pki::generate_ca("b", now, CA_VALIDITY).unwrap();
        let err = AgentCa::from_pem(&a.cert_pem, &b.key_pem).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
        let err = AgentCa::from_pem("nothing", &a.key_pem).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }
}
