//! The HTTP side: a reqwest client (rustls with ring, no redirects, timeouts, optional proxy,
//! extra trusted CAs) and the adapter that lets the `oauth2` crate use it while keeping what the
//! crate drops: the HTTP status, `Date` (clock skew) and `Retry-After` (429/503).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use oauth2::http;
use oauth2::{HttpRequest, HttpResponse};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;
use tokenfleet_domain::ValidationError;

use crate::error::{ErrorClass, ProviderError};
use crate::settings::ProviderSettings;

/// Largest provider answer we read; token responses are a few KiB.
const MAX_BODY: usize = 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What we keep of the last answer besides its body.
#[derive(Debug, Clone, Default)]
pub(crate) struct ResponseMeta {
    pub status: Option<u16>,
    pub server_date: Option<OffsetDateTime>,
    pub retry_after: Option<Duration>,
}

/// A request that did not get an HTTP answer. Names the host and the cause; never the URL's
/// query or the body.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{summary}")]
pub struct TransportError {
    /// `host:port` that was contacted.
    pub host: String,
    /// Plain-words summary, naming the host and the cause.
    pub summary: String,
    /// Whether the request timed out.
    pub timeout: bool,
    /// Whether certificate verification failed.
    pub tls: bool,
}

impl TransportError {
    pub(crate) fn into_provider_error(self, proxy: bool) -> ProviderError {
        let fix = if self.tls {
            "if a TLS-inspecting proxy is in the path, add its CA certificate to the provider's extra_ca_pem; \
             otherwise check the system's trusted CAs"
        } else if proxy {
            "check that the configured HTTP proxy is reachable and allows this host; tokenfleet retries with backoff"
        } else {
            "check DNS, the firewall and whether an HTTP proxy is required (provider http_proxy); tokenfleet retries with backoff"
        };
        ProviderError::new(
            ErrorClass::Transient,
            if self.timeout { "timeout" } else { "network" },
            self.summary,
            fix,
        )
    }
}

fn host_of(url: &str) -> String {
    oauth2::url::Url::parse(url)
        .ok()
        .and_then(|u| {
            u.host_str().map(|h| match u.port_or_known_default() {
                Some(p) => format!("{h}:{p}"),
                None => h.to_owned(),
            })
        })
        .unwrap_or_else(|| "the provider".to_owned())
}

fn transport_error(host: String, err: &reqwest::Error, timeout: Duration) -> TransportError {
    // Walk the cause chain; reqwest's own message is generic and would carry the URL.
    let mut causes: Vec<String> = Vec::new();
    let mut source = std::error::Error::source(err);
    let mut refused = false;
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            refused = true;
        }
        let text = e.to_string();
        if !text.is_empty() && !causes.iter().any(|c| c.contains(&text)) {
            causes.push(text);
        }
        source = e.source();
    }
    let chain = causes.join(": ");
    let tls = chain.contains("certificate") || chain.contains("UnknownIssuer");
    let timeout_hit = err.is_timeout();
    let summary = if timeout_hit {
        format!("could not reach {host}: no answer within {timeout:?}")
    } else if refused {
        format!("could not reach {host}: connection refused")
    } else if tls {
        format!("could not reach {host}: TLS certificate verification failed ({chain})")
    } else if chain.is_empty() {
        format!("could not reach {host}: request failed")
    } else {
        format!("could not reach {host}: {chain}")
    };
    TransportError {
        host,
        summary,
        timeout: timeout_hit,
        tls,
    }
}

fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let result = rustls_native_certs::load_native_certs();
        if !result.errors.is_empty() {
            tracing::warn!(
                errors = result.errors.len(),
                "some system CA certificates could not be loaded"
            );
        }
        result.certs
    })
}

/// Builds the HTTP client for one provider.
pub(crate) fn build_client(
    settings: &ProviderSettings,
) -> Result<reqwest::Client, ValidationError> {
    let mut roots = rustls::RootCertStore::empty();
    let (_added, _ignored) = roots.add_parsable_certificates(system_roots().iter().cloned());
    if let Some(pem) = &settings.extra_ca_pem {
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert
                .map_err(|e| ValidationError::new("extra_ca_pem", format!("not valid PEM: {e}")))?;
            roots.add(cert).map_err(|e| {
                ValidationError::new("extra_ca_pem", format!("not a usable CA certificate: {e}"))
            })?;
            n += 1;
        }
        if n == 0 {
            return Err(ValidationError::new(
                "extra_ca_pem",
                "contains no CERTIFICATE block",
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ValidationError::new("tls", e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        // A token endpoint that redirects is misconfigured or hostile; never follow it with a
        // client secret or a code in the body.
        .redirect(reqwest::redirect::Policy::none())
        .timeout(settings.timeout)
        .connect_timeout(CONNECT_TIMEOUT.min(settings.timeout))
        .user_agent(concat!("tokenfleet/", env!("CARGO_PKG_VERSION")));
    builder =
        match &settings.http_proxy {
            Some(url) => builder.proxy(reqwest::Proxy::all(url.as_str()).map_err(|e| {
                ValidationError::new("http_proxy", format!("unusable proxy URL: {e}"))
            })?),
            // Ignore proxy environment variables: the provider record is the one place to set it.
            None => builder.no_proxy(),
        };
    builder
        .build()
        .map_err(|e| ValidationError::new("http", format!("building the HTTP client failed: {e}")))
}

/// One exchange with the provider. The `oauth2` crate calls [`Exchange::send`] through
/// [`oauth2::AsyncHttpClient`]; the answer's status and headers stay here for error
/// classification and clock-skew checks.
#[derive(Debug)]
pub(crate) struct Exchange<'a> {
    http: &'a reqwest::Client,
    timeout: Duration,
    meta: Mutex<ResponseMeta>,
}

impl<'a> Exchange<'a> {
    pub fn new(http: &'a reqwest::Client, timeout: Duration) -> Self {
        Self {
            http,
            timeout,
            meta: Mutex::new(ResponseMeta::default()),
        }
    }

    pub fn meta(&self) -> ResponseMeta {
        self.meta.lock().map(|m| m.clone()).unwrap_or_default()
    }

    pub async fn send(&self, request: HttpRequest) -> Result<HttpResponse, TransportError> {
        // One client span per provider call: method, host and path (the token endpoint's path
        // names the directory tenant at most), never the query or the body.
        let span = tracing::info_span!(
            "provider_request",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            http.request.method = %request.method(),
            server.address = request.uri().host().unwrap_or_default(),
            url.path = request.uri().path(),
            http.response.status_code = tracing::field::Empty,
        );
        let answer =
            tracing::Instrument::instrument(self.send_untraced(request), span.clone()).await;
        match &answer {
            Ok(response) => {
                span.record("http.response.status_code", response.status().as_u16());
                if !response.status().is_success() {
                    span.record("otel.status_code", "ERROR");
                }
            }
            Err(_) => {
                span.record("otel.status_code", "ERROR");
            }
        }
        answer
    }

    async fn send_untraced(&self, request: HttpRequest) -> Result<HttpResponse, TransportError> {
        let host = host_of(&request.uri().to_string());
        let request = reqwest::Request::try_from(request).map_err(|e| TransportError {
            host: host.clone(),
            summary: format!("could not build the request to {host}: {}", e.without_url()),
            timeout: false,
            tls: false,
        })?;
        let mut response = self
            .http
            .execute(request)
            .await
            .map_err(|e| transport_error(host.clone(), &e, self.timeout))?;
        let status = response.status();
        let headers = response.headers().clone();
        let server_date = headers
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
            .map(OffsetDateTime::from);
        let retry_after = headers
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, server_date));
        if let Ok(mut m) = self.meta.lock() {
            *m = ResponseMeta {
                status: Some(status.as_u16()),
                server_date,
                retry_after,
            };
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| transport_error(host.clone(), &e, self.timeout))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(TransportError {
                    summary: format!("{host} sent an answer larger than {MAX_BODY} bytes"),
                    host,
                    timeout: false,
                    tls: false,
                });
            }
            body.extend_from_slice(&chunk);
        }
        let mut out = http::Response::builder().status(status);
        if let Some(h) = out.headers_mut() {
            *h = headers;
        }
        out.body(body).map_err(|e| TransportError {
            summary: format!("{host} sent an unusable answer: {e}"),
            host,
            timeout: false,
            tls: false,
        })
    }
}

impl<'c> oauth2::AsyncHttpClient<'c> for Exchange<'_> {
    type Error = TransportError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, TransportError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(self.send(request))
    }
}

/// `Retry-After`: delay-seconds or an HTTP date (relative to the server's `Date`, else our clock).
pub(crate) fn parse_retry_after(
    value: &str,
    server_date: Option<OffsetDateTime>,
) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = OffsetDateTime::from(httpdate::parse_http_date(value).ok()?);
    let now = server_date.unwrap_or_else(|| OffsetDateTime::from(SystemTime::now()));
    let secs = (at - now).whole_seconds();
    Some(Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        assert_eq!(
            parse_retry_after("120", None),
            Some(Duration::from_secs(120))
        );
        let date = OffsetDateTime::from(
            httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap(),
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", Some(date)),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", Some(date)),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", None), None);
    }

    #[test]
    fn host_names_the_port() {
        assert_eq!(host_of("http://127.0.0.1:8080/x?y=1"), "127.0.0.1:8080");
        assert_eq!(host_of("https://login.example/t"), "login.example:443");
    }
}
