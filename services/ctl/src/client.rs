//! Connection to the broker's Admin API: the API key (from a file, the environment or the
//! context, sent as `authorization: Bearer <key>`, never printed), the channel (plain or TLS, with
//! the dev CA of a local `--dev` broker found on its own), and the mapping of call failures to
//! [`CtlError`].

use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokenfleet_proto::v1::admin_client::AdminClient;
use tokenfleet_seal::Secret;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Response, Status};

use crate::config::Settings;
use crate::error::{CtlError, one_line, transport_cause};

/// Environment variable holding the API key itself.
pub const ENV_API_KEY: &str = "TOKENFLEET_API_KEY";
/// Environment variable naming a file that holds the API key.
pub const ENV_API_KEY_FILE: &str = "TOKENFLEET_API_KEY_FILE";

const CERT_PEM_TAG: &str = "-----BEGIN CERTIFICATE-----";

/// The Admin client with the API key attached to every call.
pub type Admin = AdminClient<InterceptedService<Channel, BearerAuth>>;

/// File name of the dev CA a `tokenfleet-broker serve --dev` writes into its state directory.
pub const DEV_CA_FILE: &str = "dev-ca.pem";

/// The broker's default state directory (relative to where it was started).
pub const DEFAULT_STATE_DIR: &str = "./tokenfleet-data";

/// Finds the API key: `--api-key-file`, else `TOKENFLEET_API_KEY`, else `TOKENFLEET_API_KEY_FILE`,
/// else the context's key file. `env` reads an environment variable (injected for tests).
pub fn resolve_api_key(
    flag_file: Option<&Path>,
    context_file: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Secret, CtlError> {
    let from_file = |path: &Path, origin: &str| -> Result<Secret, CtlError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CtlError::usage(format!(
                "cannot read API key file {} ({origin}): {}",
                path.display(),
                crate::input::io_problem(&e)
            ))
        })?;
        let key = Secret::new(text.trim());
        if key.is_empty() {
            return Err(CtlError::usage(format!(
                "API key file {} ({origin}) is empty",
                path.display()
            )));
        }
        Ok(key)
    };
    if let Some(path) = flag_file {
        return from_file(path, "--api-key-file");
    }
    if let Some(value) = env(ENV_API_KEY).filter(|v| !v.trim().is_empty()) {
        return Ok(Secret::new(value.trim()));
    }
    if let Some(path) = env(ENV_API_KEY_FILE).filter(|v| !v.trim().is_empty()) {
        return from_file(Path::new(path.trim()), ENV_API_KEY_FILE);
    }
    if let Some(path) = context_file {
        return from_file(path, "the context's key-file");
    }
    Err(CtlError::usage(format!(
        "no API key: set {ENV_API_KEY}, --api-key-file or a context's key file"
    )))
}

/// Adds `authorization: Bearer <key>` to every call. The header value is marked sensitive, and
/// `Debug` does not show it.
#[derive(Clone)]
pub struct BearerAuth {
    header: AsciiMetadataValue,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerAuth([redacted])")
    }
}

impl BearerAuth {
    /// Builds the header for `key`.
    pub fn new(key: &Secret) -> Result<Self, CtlError> {
        let mut header: AsciiMetadataValue = MetadataValue::try_from(format!(
            "Bearer {}",
            key.expose()
        ))
        .map_err(|_| {
            CtlError::usage(
                "the API key contains characters that cannot be sent (expected printable ASCII)",
            )
        })?;
        header.set_sensitive(true);
        Ok(Self { header })
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.header.clone());
        Ok(request)
    }
}

/// A connected broker.
#[derive(Debug, Clone)]
pub struct Broker {
    admin: Admin,
    url: String,
    timeout_secs: u64,
}

impl Broker {
    /// Connects to the broker the settings name, with `key`.
    pub async fn connect(global: &Settings, key: &Secret) -> Result<Self, CtlError> {
        let auth = BearerAuth::new(key)?;
        let timeout = Duration::from_secs(global.timeout);
        let mut endpoint = Endpoint::from_shared(global.broker.clone())
            .map_err(|e| CtlError::usage(format!("--broker {}: {e}", global.broker)))?
            .connect_timeout(timeout)
            .timeout(timeout);
        if global.broker.starts_with("https://") {
            // A private CA (--ca-file) replaces the system roots: a self-hosted broker's
            // certificate should not also be accepted from any public CA, and a minimal host may
            // have no system roots at all.
            let mut tls = ClientTlsConfig::new();
            // A local `--dev` broker's generated CA is found without --ca-file.
            let ca_file = global
                .ca_file
                .clone()
                .or_else(|| dev_ca_file(&global.broker, |k| std::env::var_os(k)));
            if ca_file.is_none() {
                tls = tls.with_native_roots();
            }
            if let Some(path) = &ca_file {
                let pem = std::fs::read(path).map_err(|e| {
                    CtlError::usage(format!(
                        "cannot read --ca-file {}: {}",
                        path.display(),
                        crate::input::io_problem(&e)
                    ))
                })?;
                if !pem
                    .windows(CERT_PEM_TAG.len())
                    .any(|w| w == CERT_PEM_TAG.as_bytes())
                {
                    return Err(CtlError::usage(format!(
                        "--ca-file {}: no PEM certificate (\"{CERT_PEM_TAG}\") in the file",
                        path.display()
                    )));
                }
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| {
                CtlError::usage(format!(
                    "TLS settings for {}: {}",
                    global.broker,
                    transport_cause(&e)
                ))
            })?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| CtlError::Unreachable {
                url: global.broker.clone(),
                cause: transport_cause(&e),
            })?;
        Ok(Self {
            admin: AdminClient::with_interceptor(channel, auth),
            url: global.broker.clone(),
            timeout_secs: global.timeout,
        })
    }

    /// Runs one call and turns its failure into a readable error.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, CtlError>
    where
        F: FnOnce(Admin) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        f(self.admin.clone())
            .await
            .map(Response::into_inner)
            .map_err(|status| self.failure(&status))
    }

    /// Maps a failed call: client-side timeouts and transport failures get their own messages;
    /// everything the broker answered keeps its code and message.
    pub fn failure(&self, status: &Status) -> CtlError {
        map_status(status, &self.url, self.timeout_secs)
    }
}

/// Whether `url` names this machine (`localhost`, `127.x.y.z`, `[::1]`).
fn is_loopback_url(url: &str) -> bool {
    let Ok(uri) = url.parse::<tonic::transport::Uri>() else {
        return false;
    };
    let Some(host) = uri.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The CA of a local `--dev` broker, for an `https://` URL on this machine when no `--ca-file`
/// was given: `$TOKENFLEET_STATE_DIR/dev-ca.pem`, else `./tokenfleet-data/dev-ca.pem`, whichever
/// exists first. `env` reads an environment variable (injected for tests).
pub fn dev_ca_file(broker_url: &str, env: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    if !broker_url.starts_with("https://") || !is_loopback_url(broker_url) {
        return None;
    }
    let from_env = env("TOKENFLEET_STATE_DIR")
        .filter(|dir| !dir.is_empty())
        .map(|dir| PathBuf::from(dir).join(DEV_CA_FILE));
    from_env
        .into_iter()
        .chain(std::iter::once(
            PathBuf::from(DEFAULT_STATE_DIR).join(DEV_CA_FILE),
        ))
        .find(|path| path.is_file())
}

/// See [`Broker::failure`].
pub fn map_status(status: &Status, url: &str, timeout_secs: u64) -> CtlError {
    if let Some(source) = std::error::Error::source(status) {
        let mut current = Some(source);
        while let Some(e) = current {
            if e.is::<tonic::TimeoutExpired>() {
                return CtlError::Timeout {
                    seconds: timeout_secs,
                };
            }
            current = e.source();
        }
        // A failure on our side of the wire (connection lost or refused): the broker went away.
        if matches!(status.code(), Code::Unavailable | Code::Unknown) {
            return CtlError::Unreachable {
                url: url.to_owned(),
                cause: transport_cause(source),
            };
        }
    }
    CtlError::Api {
        code: status.code(),
        message: one_line(status.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn api_key_precedence_is_flag_then_key_then_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("flag");
        let envfile = dir.path().join("envfile");
        std::fs::write(&flag, "from-flag\n").unwrap();
        std::fs::write(&envfile, "from-env-file\n").unwrap();
        let env = env_of(&[
            (ENV_API_KEY, "from-env"),
            (ENV_API_KEY_FILE, envfile.to_str().unwrap()),
        ]);
        let key = resolve_api_key(Some(&flag), None, &env).unwrap();
        assert_eq!(key.expose(), "from-flag");
        let key = resolve_api_key(None, None, &env).unwrap();
        assert_eq!(key.expose(), "from-env");
        let env = env_of(&[(ENV_API_KEY_FILE, envfile.to_str().unwrap())]);
        let key = resolve_api_key(None, None, &env).unwrap();
        assert_eq!(key.expose(), "from-env-file");
    }

    #[test]
    fn missing_api_key_says_how_to_set_one() {
        let err = resolve_api_key(None, None, env_of(&[])).err().unwrap();
        assert_eq!(
            err.to_string(),
            "no API key: set TOKENFLEET_API_KEY, --api-key-file or a context's key file"
        );
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn unreadable_key_file_names_the_file_but_not_a_key() {
        let err = resolve_api_key(Some(Path::new("/nonexistent/key")), None, env_of(&[]))
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(text.contains("/nonexistent/key"), "{text}");
        assert!(text.contains("--api-key-file"), "{text}");
    }

    #[test]
    fn bearer_header_is_sensitive_and_not_in_debug() {
        let auth = BearerAuth::new(&Secret::new("tfk_abc.secretpart")).unwrap();
        assert!(auth.header.is_sensitive());
        assert!(!format!("{auth:?}").contains("secretpart"));
        let mut auth = auth;
        let req = auth.call(Request::new(())).unwrap();
        assert_eq!(
            req.metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer tfk_abc.secretpart")
        );
        assert!(BearerAuth::new(&Secret::new("bad\nkey")).is_err());
    }

    #[test]
    fn server_statuses_keep_code_and_message() {
        let status = Status::permission_denied("viewer keys are read-only\nsecond line");
        let err = map_status(&status, "http://127.0.0.1:1", 30);
        assert_eq!(
            err.to_string(),
            "permission denied: viewer keys are read-only second line"
        );
        assert_eq!(err.exit_code(), 1);
    }

    #[test]
    fn the_dev_ca_is_found_only_for_local_https_brokers() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join(DEV_CA_FILE);
        std::fs::write(&ca, "pem").unwrap();
        let env =
            |k: &str| (k == "TOKENFLEET_STATE_DIR").then(|| dir.path().as_os_str().to_owned());
        for url in [
            "https://localhost:50051",
            "https://127.0.0.1:50051",
            "https://[::1]:50051",
        ] {
            assert_eq!(dev_ca_file(url, env), Some(ca.clone()), "{url}");
        }
        for url in ["http://localhost:50051", "https://broker.example.com:50051"] {
            assert_eq!(dev_ca_file(url, env), None, "{url}");
        }
        let empty = tempfile::tempdir().unwrap();
        let env =
            |k: &str| (k == "TOKENFLEET_STATE_DIR").then(|| empty.path().as_os_str().to_owned());
        assert!(
            dev_ca_file("https://localhost:1", env)
                .is_none_or(|p| p == PathBuf::from(DEFAULT_STATE_DIR).join(DEV_CA_FILE))
        );
    }
}
