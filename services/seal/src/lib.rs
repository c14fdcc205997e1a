//! Secrets at rest and in memory.
//!
//! - [`Secret`]: a string secret whose `Debug`/`Display` print `[redacted]` and whose memory is
//!   zeroed on drop. Every client secret, refresh token, access token and API key travels in one.
//! - [`Keyring`]: sealing keys (32 bytes, base64) with ids. [`Keyring::seal`] encrypts with the
//!   current key (XChaCha20-Poly1305, random 192-bit nonce) and binds the ciphertext to the record
//!   it belongs to through the associated data, so a ciphertext copied onto another record fails to
//!   open. Older keys stay readable, which makes rotation a matter of adding a key, switching the
//!   current id and re-sealing.
//!
//! Dependency direction: depends on no other tokenfleet crate; the domain model and the broker
//! depend on it. No I/O except reading key files.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

/// Errors of key loading and sealing.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The envelope names a key id the keyring does not hold.
    #[error(
        "sealed with key id `{0}`, which is not in the keyring (add the old key to `seal.keys`)"
    )]
    UnknownKey(String),
    /// Authentication failed: wrong key, tampered ciphertext, or the ciphertext belongs to another record.
    #[error("sealed secret failed to open: it was altered or belongs to another record")]
    Open,
    /// A key is not 32 bytes of base64.
    #[error("sealing key `{id}`: {problem}")]
    BadKey { id: String, problem: String },
    /// The keyring configuration is inconsistent.
    #[error("keyring: {0}")]
    Keyring(String),
    /// The envelope's fields are malformed.
    #[error("sealed secret is malformed: {0}")]
    Malformed(&'static str),
    /// Reading a key file failed.
    #[error("reading sealing key file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The operating system's random source failed.
    #[error("random number generator failed")]
    Random,
}

/// A secret string. `Debug` and `Display` print `[redacted]`; memory is zeroed on drop.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret value. Call only where the value is used (a request body, a SASL payload).
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

/// An encrypted secret as stored: key id, nonce and ciphertext (with tag), base64.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// Id of the key that sealed it.
    pub kid: String,
    /// 24-byte nonce, base64.
    pub nonce: String,
    /// Ciphertext and 16-byte tag, base64.
    pub ct: String,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// A 256-bit sealing key.
struct SealKey(Zeroizing<[u8; 32]>);

impl SealKey {
    fn from_base64(id: &str, text: &str) -> Result<Self, SealError> {
        let bytes = Zeroizing::new(B64.decode(text.trim()).map_err(|_| SealError::BadKey {
            id: id.to_owned(),
            problem: "not valid base64".to_owned(),
        })?);
        let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| SealError::BadKey {
            id: id.to_owned(),
            problem: format!("must decode to 32 bytes, got {}", bytes.len()),
        })?;
        Ok(Self(Zeroizing::new(arr)))
    }
}

/// Sealing keys by id, with one current key for new seals.
pub struct Keyring {
    current: String,
    keys: BTreeMap<String, SealKey>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Key ids: 1-32 characters of `[A-Za-z0-9_-]`.
fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Keyring {
    /// Builds a keyring from `(id, base64 key)` pairs; `current` must be one of them.
    pub fn from_base64<'a>(
        current: &str,
        keys: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, SealError> {
        let mut map = BTreeMap::new();
        for (id, text) in keys {
            if !valid_key_id(id) {
                return Err(SealError::BadKey {
                    id: id.to_owned(),
                    problem: "key id must be 1-32 characters of A-Z a-z 0-9 - _".to_owned(),
                });
            }
            if map
                .insert(id.to_owned(), SealKey::from_base64(id, text)?)
                .is_some()
            {
                return Err(SealError::Keyring(format!("key id `{id}` given twice")));
            }
        }
        if !map.contains_key(current) {
            return Err(SealError::Keyring(format!(
                "current key id `{current}` is not among the configured keys"
            )));
        }
        Ok(Self {
            current: current.to_owned(),
            keys: map,
        })
    }

    /// Reads a base64 key from a file (whitespace trimmed).
    pub fn read_key_file(path: &Path) -> Result<String, SealError> {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .map_err(|source| SealError::Io {
                path: path.display().to_string(),
                source,
            })
    }

    /// A fresh random key, base64 (for `--dev` and key generation commands).
    pub fn generate_key_base64() -> Result<String, SealError> {
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::fill(key.as_mut_slice()).map_err(|_| SealError::Random)?;
        Ok(B64.encode(key.as_slice()))
    }

    /// Id of the key new seals use.
    pub fn current_key_id(&self) -> &str {
        &self.current
    }

    /// Encrypts `plaintext` for the record named by `aad` (for example
    /// `tenants/acme/providers/m365#client_secret`).
    pub fn seal(&self, aad: &str, plaintext: &[u8]) -> Result<Sealed, SealError> {
        let key = self
            .keys
            .get(&self.current)
            .ok_or_else(|| SealError::UnknownKey(self.current.clone()))?;
        let cipher = XChaCha20Poly1305::new(key.0.as_slice().into());
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut nonce).map_err(|_| SealError::Random)?;
        let ct = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: envelope_aad(&self.current, aad).as_bytes(),
                },
            )
            .map_err(|_| SealError::Open)?;
        Ok(Sealed {
            kid: self.current.clone(),
            nonce: B64.encode(nonce),
            ct: B64.encode(ct),
        })
    }

    /// Seals a [`Secret`].
    pub fn seal_secret(&self, aad: &str, secret: &Secret) -> Result<Sealed, SealError> {
        self.seal(aad, secret.expose().as_bytes())
    }

    /// Decrypts a sealed value that belongs to the record named by `aad`.
    pub fn open(&self, aad: &str, sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let key = self
            .keys
            .get(&sealed.kid)
            .ok_or_else(|| SealError::UnknownKey(sealed.kid.clone()))?;
        let nonce = B64
            .decode(&sealed.nonce)
            .map_err(|_| SealError::Malformed("nonce is not base64"))?;
        if nonce.len() != 24 {
            return Err(SealError::Malformed("nonce must be 24 bytes"));
        }
        let ct = B64
            .decode(&sealed.ct)
            .map_err(|_| SealError::Malformed("ciphertext is not base64"))?;
        let cipher = XChaCha20Poly1305::new(key.0.as_slice().into());
        cipher
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &ct,
                    aad: envelope_aad(&sealed.kid, aad).as_bytes(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| SealError::Open)
    }

    /// Opens a sealed UTF-8 secret.
    pub fn open_secret(&self, aad: &str, sealed: &Sealed) -> Result<Secret, SealError> {
        let bytes = self.open(aad, sealed)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| SealError::Malformed("not UTF-8"))?;
        Ok(Secret::new(text))
    }

    /// Whether `sealed` was made with a key other than the current one.
    pub fn needs_reseal(&self, sealed: &Sealed) -> bool {
        sealed.kid != self.current
    }
}

/// The key id is bound too, so an envelope's `kid` cannot be swapped.
fn envelope_aad(kid: &str, record: &str) -> String {
    format!("tokenfleet-seal-v1\0{kid}\0{record}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(current: &str) -> Keyring {
        let k1 = B64.encode([1u8; 32]);
        let k2 = B64.encode([2u8; 32]);
        Keyring::from_base64(current, [("k1", k1.as_str()), ("k2", k2.as_str())]).unwrap()
    }

    #[test]
    fn seal_round_trips_and_hides_plaintext() {
        let ring = ring("k1");
        let sealed = ring
            .seal("tenants/a/providers/p#client_secret", b"s3cret-value")
            .unwrap();
        assert_eq!(sealed.kid, "k1");
        let json = serde_json::to_string(&sealed).unwrap();
        assert!(!json.contains("s3cret-value"));
        let opened = ring
            .open("tenants/a/providers/p#client_secret", &sealed)
            .unwrap();
        assert_eq!(opened.as_slice(), b"s3cret-value");
    }

    #[test]
    fn ciphertext_moved_to_another_record_fails_to_open() {
        let ring = ring("k1");
        let sealed = ring
            .seal("tenants/a/providers/p#client_secret", b"x")
            .unwrap();
        let err = ring
            .open("tenants/b/providers/p#client_secret", &sealed)
            .unwrap_err();
        assert!(matches!(err, SealError::Open), "{err}");
    }

    #[test]
    fn swapped_key_id_fails_to_open() {
        let ring = ring("k1");
        let mut sealed = ring.seal("r", b"x").unwrap();
        sealed.kid = "k2".into();
        assert!(matches!(ring.open("r", &sealed), Err(SealError::Open)));
    }

    #[test]
    fn rotation_keeps_old_keys_readable() {
        let old = ring("k1").seal("r", b"v").unwrap();
        let rotated = ring("k2");
        assert!(rotated.needs_reseal(&old));
        assert_eq!(rotated.open("r", &old).unwrap().as_slice(), b"v");
        let resealed = rotated.seal("r", b"v").unwrap();
        assert_eq!(resealed.kid, "k2");
        assert!(!rotated.needs_reseal(&resealed));
    }

    #[test]
    fn unknown_key_id_is_named() {
        let k = B64.encode([3u8; 32]);
        let other = Keyring::from_base64("k9", [("k9", k.as_str())]).unwrap();
        let sealed = other.seal("r", b"v").unwrap();
        let err = ring("k1").open("r", &sealed).unwrap_err();
        assert!(err.to_string().contains("k9"), "{err}");
    }

    #[test]
    fn bad_keys_are_rejected_with_the_reason() {
        let err = Keyring::from_base64("a", [("a", "not base64!")]).unwrap_err();
        assert!(err.to_string().contains("base64"), "{err}");
        let short = B64.encode([0u8; 16]);
        let err = Keyring::from_base64("a", [("a", short.as_str())]).unwrap_err();
        assert!(err.to_string().contains("32 bytes"), "{err}");
        let k = B64.encode([0u8; 32]);
        let err = Keyring::from_base64("b", [("a", k.as_str())]).unwrap_err();
        assert!(err.to_string().contains("current key id"), "{err}");
    }

    #[test]
    fn secret_is_redacted_in_debug_and_display() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        let sealed = ring("k1").seal("r", b"hunter2").unwrap();
        assert!(!format!("{sealed:?}").contains(&sealed.ct));
    }

    #[test]
    fn generated_keys_are_usable_and_distinct() {
        let a = Keyring::generate_key_base64().unwrap();
        let b = Keyring::generate_key_base64().unwrap();
        assert_ne!(a, b);
        Keyring::from_base64("x", [("x", a.as_str())]).unwrap();
    }
}
