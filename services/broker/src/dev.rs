//! `serve --dev`: a broker to try things out with no setup. It keeps everything in `state_dir`
//! (mode 0700): a generated sealing key `seal.key` (mode 0600, created only if missing) when no
//! key is configured, and — while the store holds no API key at all — a bootstrap fleet-admin
//! API key in `admin.key` (mode 0600), printed once; and, when `[tls]` is not configured, a local
//! CA (`dev-ca.pem`, key `dev-ca.key`, created once) and a server certificate for `localhost`,
//! `127.0.0.1` and `::1` signed by it (`server.pem`, `server.key`, renewed at every start), so
//! the gRPC listener serves TLS and agents can enroll. Clients trust `dev-ca.pem`
//! (`tokenfleetctl` finds it by itself). Dev mode is not for production: key material next to the
//! data protects nothing, and it says so at every start.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokenfleet_domain::Role;
use tokenfleet_seal::{Keyring, Secret};

use crate::config::{RawConfig, SealKeySource};
use crate::server::{ServeError, ensure_private_dir};
use crate::state::BrokerState;

/// Generated sealing key file inside `state_dir`.
pub const SEAL_KEY_FILE: &str = "seal.key";

/// Bootstrap API key file inside `state_dir`.
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// Dev CA certificate inside `state_dir` (what clients trust).
pub const DEV_CA_CERT_FILE: &str = "dev-ca.pem";

/// Dev CA private key inside `state_dir`.
pub const DEV_CA_KEY_FILE: &str = "dev-ca.key";

/// Dev server certificate inside `state_dir`.
pub const SERVER_CERT_FILE: &str = "server.pem";

/// Dev server private key inside `state_dir`.
pub const SERVER_KEY_FILE: &str = "server.key";

/// Names the dev server certificate is valid for.
pub const SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Validity of the dev CA.
const DEV_CA_VALIDITY: std::time::Duration = std::time::Duration::from_secs(10 * 366 * 24 * 3600);

/// Validity of a dev server certificate (it is renewed at every start).
const SERVER_CERT_VALIDITY: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);

/// Id of the generated sealing key.
pub const DEV_KEY_ID: &str = "dev";

/// Printed on stderr at every `--dev` start.
pub const BANNER: &str = "\
################################################################################
#  DEV MODE: tokenfleet-broker is running with --dev.                          #
#  Key files are generated next to the data in the state directory; this       #
#  protects nothing. Use it to try things out, never for real tenants.         #
#  gRPC serves TLS with a generated local CA (dev-ca.pem in the state          #
#  directory): use https://localhost:<port> and trust dev-ca.pem.              #
################################################################################";

/// Errors of preparing dev mode.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// The state directory could not be created.
    #[error(transparent)]
    StateDir(#[from] ServeError),
    /// A key file could not be written or read.
    #[error("dev mode: {path}: {error}")]
    File {
        /// The file.
        path: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
    /// Generating a key failed.
    #[error("dev mode: generating a sealing key: {0}")]
    Seal(tokenfleet_seal::SealError),
    /// Generating the dev CA or server certificate failed.
    #[error("dev mode: generating TLS certificates: {0}")]
    Tls(crate::identity::IdentityError),
    /// Creating the bootstrap API key failed.
    #[error("dev mode: creating the bootstrap API key: {0}")]
    ApiKey(String),
}

/// Applies dev mode to the configuration before validation: creates `state_dir` (0700) and, when
/// no sealing key is configured, generates `<state_dir>/seal.key` (0600) if it is missing and
/// configures it as the only key.
pub fn prepare(raw: &mut RawConfig) -> Result<(), DevError> {
    ensure_private_dir(&raw.state_dir)?;
    if raw.tls.cert_file.is_none() && raw.tls.key_file.is_none() {
        let (cert, key) = ensure_dev_tls(&raw.state_dir)?;
        raw.tls.cert_file = Some(cert);
        raw.tls.key_file = Some(key);
    }
    if !raw.seal.keys.is_empty() {
        return Ok(());
    }
    let path = raw.state_dir.join(SEAL_KEY_FILE);
    if !path.exists() {
        let key = Secret::new(Keyring::generate_key_base64().map_err(DevError::Seal)?);
        write_private_file(&path, &format!("{}\n", key.expose()), false)?;
        tracing::warn!(path = %path.display(), "dev mode: generated a sealing key");
    }
    raw.seal.current_key_id = Some(DEV_KEY_ID.to_owned());
    raw.seal.keys = vec![SealKeySource {
        id: DEV_KEY_ID.to_owned(),
        key_file: Some(path),
        key_env: None,
    }];
    Ok(())
}

/// Makes sure `dir` holds a dev CA (`dev-ca.pem`/`dev-ca.key`, kept once created) and writes a
/// fresh server certificate for [`SERVER_NAMES`] signed by it (`server.pem`/`server.key`); returns
/// the server certificate and key paths. Keys are written with mode 0600.
pub fn ensure_dev_tls(dir: &Path) -> Result<(PathBuf, PathBuf), DevError> {
    use crate::identity::pki;
    let now = time::OffsetDateTime::now_utc();
    let ca_cert_path = dir.join(DEV_CA_CERT_FILE);
    let ca_key_path = dir.join(DEV_CA_KEY_FILE);
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|error| DevError::File {
            path: path.to_path_buf(),
            error,
        })
    };
    let (ca_cert, ca_key) = if ca_cert_path.is_file() && ca_key_path.is_file() {
        (read(&ca_cert_path)?, Secret::new(read(&ca_key_path)?))
    } else {
        let ca =
            pki::generate_ca("tokenfleet dev CA", now, DEV_CA_VALIDITY).map_err(DevError::Tls)?;
        write_private_file(&ca_key_path, ca.key_pem.expose(), true)?;
        write_public_file(&ca_cert_path, &ca.cert_pem)?;
        (ca.cert_pem, ca.key_pem)
    };
    let server =
        pki::generate_server_cert(&ca_cert, &ca_key, &SERVER_NAMES, now, SERVER_CERT_VALIDITY)
            .map_err(DevError::Tls)?;
    let cert_path = dir.join(SERVER_CERT_FILE);
    let key_path = dir.join(SERVER_KEY_FILE);
    write_private_file(&key_path, server.key_pem.expose(), true)?;
    write_public_file(&cert_path, &server.cert_pem)?;
    Ok((cert_path, key_path))
}

/// Writes a certificate (not secret) with mode 0644, replacing the file.
fn write_public_file(path: &Path, content: &str) -> Result<(), DevError> {
    let io = |error| DevError::File {
        path: path.to_path_buf(),
        error,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)
        .map_err(io)?;
    file.write_all(content.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

/// When the store holds no API key at all, creates a fleet-admin key, writes it to
/// `<state_dir>/admin.key` (0600) and returns it so the caller prints it once. `None` when API
/// keys exist already.
pub async fn bootstrap_admin_key(
    state: &BrokerState,
    state_dir: &Path,
) -> Result<Option<Secret>, DevError> {
    let existing = crate::api_keys::count(state)
        .await
        .map_err(|e| DevError::ApiKey(e.to_string()))?;
    if existing > 0 {
        return Ok(None);
    }
    let (_, key) = crate::api_keys::create(
        state,
        Role::FleetAdmin,
        None,
        "dev mode bootstrap key".to_owned(),
    )
    .await
    .map_err(|e| DevError::ApiKey(e.to_string()))?;
    let path = state_dir.join(ADMIN_KEY_FILE);
    write_private_file(&path, &format!("{}\n", key.expose()), true)?;
    Ok(Some(key))
}

/// Writes `content` to `path` with mode 0600. Without `replace` the file must not exist yet.
fn write_private_file(path: &Path, content: &str, replace: bool) -> Result<(), DevError> {
    let io = |error| DevError::File {
        path: path.to_path_buf(),
        error,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if replace {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(io)?;
    // An existing file keeps its old mode on open; make sure it is private.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    file.write_all(content.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_generates_a_private_key_once_and_configures_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut raw = RawConfig {
            state_dir: dir.path().join("state"),
            ..RawConfig::default()
        };
        prepare(&mut raw).unwrap();
        let key_path = dir.path().join("state").join(SEAL_KEY_FILE);
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(dir.path().join("state"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let first = std::fs::read_to_string(&key_path).unwrap();

        let mut again = RawConfig {
            state_dir: dir.path().join("state"),
            ..RawConfig::default()
        };
        prepare(&mut again).unwrap();
        assert_eq!(std::fs::read_to_string(&key_path).unwrap(), first);
        let config = again.validate().unwrap();
        assert_eq!(
            config.require_keyring().unwrap().current_key_id(),
            DEV_KEY_ID
        );
    }

    #[test]
    fn prepare_generates_a_dev_ca_once_and_a_fresh_server_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let mut raw = RawConfig {
            state_dir: state_dir.clone(),
            ..RawConfig::default()
        };
        prepare(&mut raw).unwrap();
        assert_eq!(raw.tls.cert_file, Some(state_dir.join(SERVER_CERT_FILE)));
        assert_eq!(raw.tls.key_file, Some(state_dir.join(SERVER_KEY_FILE)));
        for key in [DEV_CA_KEY_FILE, SERVER_KEY_FILE] {
            let mode = std::fs::metadata(state_dir.join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let ca = std::fs::read_to_string(state_dir.join(DEV_CA_CERT_FILE)).unwrap();
        let server = std::fs::read_to_string(state_dir.join(SERVER_CERT_FILE)).unwrap();
        assert!(raw.validate().unwrap().tls.is_some());

        let mut again = RawConfig {
            state_dir: state_dir.clone(),
            ..RawConfig::default()
        };
        prepare(&mut again).unwrap();
        assert_eq!(
            std::fs::read_to_string(state_dir.join(DEV_CA_CERT_FILE)).unwrap(),
            ca
        );
        assert_ne!(
            std::fs::read_to_string(state_dir.join(SERVER_CERT_FILE)).unwrap(),
            server
        );
        assert!(again.validate().unwrap().tls.is_some());
    }

    #[test]
    fn prepare_keeps_configured_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut raw = RawConfig {
            state_dir: dir.path().to_path_buf(),
            ..RawConfig::default()
        };
        raw.seal.keys = vec![SealKeySource {
            id: "prod".into(),
            key_file: Some("/nonexistent".into()),
            key_env: None,
        }];
        prepare(&mut raw).unwrap();
        assert_eq!(raw.seal.keys[0].id, "prod");
        assert!(!dir.path().join(SEAL_KEY_FILE).exists());
    }
}
