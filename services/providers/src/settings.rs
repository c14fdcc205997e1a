//! Resolved provider settings: the endpoints (defaults per kind, overrides win), credentials and
//! HTTP options a [`crate::ProviderClient`] needs.

use std::fmt;
use std::time::Duration;

use oauth2::url::Url;
use tokenfleet_domain::{Provider, ProviderKind, ValidationError};
use tokenfleet_seal::Secret;

/// Microsoft's sign-in host (public cloud). Sovereign clouds use endpoint overrides.
pub const MICROSOFT_LOGIN_HOST: &str = "https://login.microsoftonline.com";
/// Authority used when a Microsoft provider names none.
pub const MICROSOFT_DEFAULT_AUTHORITY: &str = "organizations";
/// Google's authorization endpoint.
pub const GOOGLE_AUTHORIZE_URL: &str = "https://accounts.google.com/o/oauth2/v2/auth";
/// Google's token endpoint; also the required `aud` of service-account assertions.
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// Google's revocation endpoint (RFC 7009).
pub const GOOGLE_REVOKE_URL: &str = "https://oauth2.googleapis.com/revoke";
/// Default timeout of one provider request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The endpoints of one provider, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// Authorization endpoint (browser redirect). `None` when the provider has none.
    pub authorize: Option<Url>,
    /// Token endpoint.
    pub token: Url,
    /// Device authorization endpoint (RFC 8628). `None` when the provider has none (Google).
    pub device_code: Option<Url>,
    /// Revocation endpoint (RFC 7009). `None` when the provider has none (Microsoft).
    pub revoke: Option<Url>,
}

/// Everything a [`crate::ProviderClient`] needs to talk to one app registration.
#[derive(Clone)]
pub struct ProviderSettings {
    /// Microsoft, Google or generic.
    pub kind: ProviderKind,
    /// Microsoft tenant segment (`organizations`, `common`, a tenant id or domain); empty otherwise.
    pub authority: String,
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret (confidential clients). Never sent in the device code flow.
    pub client_secret: Option<Secret>,
    /// Resolved endpoints.
    pub endpoints: Endpoints,
    /// Scopes configured on the provider (used by generic providers).
    pub scopes: Vec<String>,
    /// Proxy for all provider requests (`http://` or `https://` URL); `None` = direct.
    pub http_proxy: Option<Url>,
    /// Extra trusted CA certificates (PEM), added to the system's roots.
    pub extra_ca_pem: Option<String>,
    /// Timeout of one request.
    pub timeout: Duration,
}

impl fmt::Debug for ProviderSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderSettings")
            .field("kind", &self.kind)
            .field("authority", &self.authority)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .field("endpoints", &self.endpoints)
            .field("scopes", &self.scopes)
            // A proxy URL may carry credentials.
            .field(
                "http_proxy",
                &self
                    .http_proxy
                    .as_ref()
                    .map(|u| u.host_str().unwrap_or("").to_owned()),
            )
            .field("extra_ca_pem", &self.extra_ca_pem.as_ref().map(|p| p.len()))
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn parse_url(field: &str, value: &str) -> Result<Url, ValidationError> {
    let url = Url::parse(value.trim())
        .map_err(|e| ValidationError::new(field, format!("not a valid URL: {e}")))?;
    match url.scheme() {
        "https" => Ok(url),
        // Plain HTTP would expose client secrets and tokens; allowed only on this machine (test
        // doubles, local proxies).
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(ValidationError::new(
            field,
            "must use https (http is allowed for loopback addresses only)",
        )),
        other => Err(ValidationError::new(
            field,
            format!("scheme must be https, not `{other}`"),
        )),
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(oauth2::url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(oauth2::url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(oauth2::url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

fn override_or(
    field: &str,
    value: &str,
    default: Option<String>,
) -> Result<Option<Url>, ValidationError> {
    if !value.trim().is_empty() {
        return parse_url(field, value).map(Some);
    }
    default.map(|d| parse_url(field, &d)).transpose()
}

impl ProviderSettings {
    /// Builds settings from a provider record and its opened client secret (the caller opens the
    /// sealed secret with the keyring).
    pub fn from_provider(
        provider: &Provider,
        client_secret: Option<Secret>,
    ) -> Result<Self, ValidationError> {
        if provider.client_id.trim().is_empty() {
            return Err(ValidationError::new("client_id", "is required"));
        }
        let authority = match provider.kind {
            ProviderKind::Microsoft if provider.authority.trim().is_empty() => {
                MICROSOFT_DEFAULT_AUTHORITY.to_owned()
            }
            _ => provider.authority.trim().to_owned(),
        };
        if provider.kind == ProviderKind::Microsoft
            && !authority
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return Err(ValidationError::new(
                "authority",
                "must be a tenant segment: organizations, common, consumers, a tenant id or a domain",
            ));
        }
        let o = &provider.endpoints;
        let endpoints = match provider.kind {
            ProviderKind::Microsoft => {
                let base = format!("{MICROSOFT_LOGIN_HOST}/{authority}/oauth2/v2.0");
                Endpoints {
                    authorize: override_or(
                        "endpoints.authorize_url",
                        &o.authorize_url,
                        Some(format!("{base}/authorize")),
                    )?,
                    token: required(
                        override_or(
                            "endpoints.token_url",
                            &o.token_url,
                            Some(format!("{base}/token")),
                        )?,
                        "endpoints.token_url",
                    )?,
                    device_code: override_or(
                        "endpoints.device_code_url",
                        &o.device_code_url,
                        Some(format!("{base}/devicecode")),
                    )?,
                    revoke: override_or("endpoints.revoke_url", &o.revoke_url, None)?,
                }
            }
            ProviderKind::Google => Endpoints {
                authorize: override_or(
                    "endpoints.authorize_url",
                    &o.authorize_url,
                    Some(GOOGLE_AUTHORIZE_URL.to_owned()),
                )?,
                token: required(
                    override_or(
                        "endpoints.token_url",
                        &o.token_url,
                        Some(GOOGLE_TOKEN_URL.to_owned()),
                    )?,
                    "endpoints.token_url",
                )?,
                // Google has a device endpoint, but not for Gmail scopes; see `scopes_for`.
                device_code: override_or("endpoints.device_code_url", &o.device_code_url, None)?,
                revoke: override_or(
                    "endpoints.revoke_url",
                    &o.revoke_url,
                    Some(GOOGLE_REVOKE_URL.to_owned()),
                )?,
            },
            ProviderKind::Generic => Endpoints {
                authorize: Some(required(
                    override_or("endpoints.authorize_url", &o.authorize_url, None)?,
                    "endpoints.authorize_url",
                )?),
                token: required(
                    override_or("endpoints.token_url", &o.token_url, None)?,
                    "endpoints.token_url",
                )?,
                device_code: override_or("endpoints.device_code_url", &o.device_code_url, None)?,
                revoke: override_or("endpoints.revoke_url", &o.revoke_url, None)?,
            },
        };
        // A proxy is commonly reached over plain http (CONNECT tunnels the TLS), so it is not
        // held to the https rule.
        let http_proxy = if provider.http_proxy.trim().is_empty() {
            None
        } else {
            let url = Url::parse(provider.http_proxy.trim())
                .map_err(|e| ValidationError::new("http_proxy", format!("not a valid URL: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(ValidationError::new(
                    "http_proxy",
                    "scheme must be http or https",
                ));
            }
            Some(url)
        };
        let extra_ca_pem =
            (!provider.extra_ca_pem.trim().is_empty()).then(|| provider.extra_ca_pem.clone());
        if provider.kind == ProviderKind::Generic && provider.scopes.is_empty() {
            return Err(ValidationError::new(
                "scopes",
                "a generic provider needs its scopes listed",
            ));
        }
        Ok(Self {
            kind: provider.kind,
            authority: if provider.kind == ProviderKind::Microsoft {
                authority
            } else {
                String::new()
            },
            client_id: provider.client_id.trim().to_owned(),
            client_secret: client_secret.filter(|s| !s.is_empty()),
            endpoints,
            scopes: provider.scopes.clone(),
            http_proxy,
            extra_ca_pem,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Puts the proxy's password (kept sealed apart from the URL) back into the proxy URL.
    #[must_use]
    pub fn with_proxy_password(mut self, password: Option<Secret>) -> Self {
        if let (Some(url), Some(password)) = (self.http_proxy.as_mut(), password)
            && url.set_password(Some(password.expose())).is_err()
        {
            tracing::warn!("the provider's proxy URL cannot carry a password; connecting without");
        }
        self
    }

    /// Sets the request timeout.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

fn required(url: Option<Url>, field: &str) -> Result<Url, ValidationError> {
    url.ok_or_else(|| ValidationError::new(field, "is required for this provider kind"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;
    use tokenfleet_domain::{ProviderEndpoints, Stamps};

    fn provider(kind: ProviderKind) -> Provider {
        Provider {
            tenant: "acme".into(),
            name: "p".into(),
            kind,
            authority: String::new(),
            client_id: "cid".into(),
            client_secret: None,
            endpoints: ProviderEndpoints::default(),
            http_proxy: String::new(),
            http_proxy_password: None,
            extra_ca_pem: String::new(),
            scopes: vec![],
            service_account_key: None,
            stamps: Stamps::new(OffsetDateTime::UNIX_EPOCH),
        }
    }

    #[test]
    fn microsoft_defaults_use_the_authority() {
        let mut p = provider(ProviderKind::Microsoft);
        p.authority = "contoso.onmicrosoft.com".into();
        let s = ProviderSettings::from_provider(&p, Some(Secret::new("x"))).unwrap();
        assert_eq!(
            s.endpoints.token.as_str(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(
            s.endpoints.device_code.unwrap().as_str(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/devicecode"
        );
        assert!(s.endpoints.revoke.is_none());
        let s = ProviderSettings::from_provider(&provider(ProviderKind::Microsoft), None).unwrap();
        assert!(
            s.endpoints
                .authorize
                .unwrap()
                .as_str()
                .contains("/organizations/oauth2/v2.0/authorize")
        );
    }

    #[test]
    fn overrides_win() {
        let mut p = provider(ProviderKind::Microsoft);
        p.endpoints.token_url = "http://127.0.0.1:9/t/oauth2/v2.0/token".into();
        let s = ProviderSettings::from_provider(&p, None).unwrap();
        assert_eq!(
            s.endpoints.token.as_str(),
            "http://127.0.0.1:9/t/oauth2/v2.0/token"
        );
        let mut p = provider(ProviderKind::Google);
        p.endpoints.revoke_url = "http://127.0.0.1:9/revoke".into();
        let s = ProviderSettings::from_provider(&p, None).unwrap();
        assert_eq!(
            s.endpoints.revoke.unwrap().as_str(),
            "http://127.0.0.1:9/revoke"
        );
        assert_eq!(s.endpoints.token.as_str(), GOOGLE_TOKEN_URL);
        assert!(s.endpoints.device_code.is_none());
    }

    #[test]
    fn generic_needs_authorize_token_and_scopes() {
        let mut p = provider(ProviderKind::Generic);
        let e = ProviderSettings::from_provider(&p, None).unwrap_err();
        assert_eq!(e.field, "endpoints.authorize_url");
        p.endpoints.authorize_url = "https://idp.example/auth".into();
        let e = ProviderSettings::from_provider(&p, None).unwrap_err();
        assert_eq!(e.field, "endpoints.token_url");
        p.endpoints.token_url = "ftp://idp.example/token".into();
        let e = ProviderSettings::from_provider(&p, None).unwrap_err();
        assert_eq!(e.field, "endpoints.token_url");
        p.endpoints.token_url = "http://idp.example/token".into();
        let e = ProviderSettings::from_provider(&p, None).unwrap_err();
        assert_eq!(e.field, "endpoints.token_url");
        assert!(e.problem.contains("loopback"), "{e:?}");
        p.endpoints.token_url = "http://localhost:8080/token".into();
        let e = ProviderSettings::from_provider(&p, None).unwrap_err();
        assert_eq!(e.field, "scopes");
        p.endpoints.token_url = "https://idp.example/token".into();
        p.scopes = vec!["mail".into()];
        ProviderSettings::from_provider(&p, None).unwrap();
    }

    #[test]
    fn debug_hides_the_secret_and_proxy_credentials() {
        let mut p = provider(ProviderKind::Microsoft);
        p.http_proxy = "http://user:pw@proxy.example:3128".into();
        let s = ProviderSettings::from_provider(&p, Some(Secret::new("s3cr3t"))).unwrap();
        let d = format!("{s:?}");
        assert!(!d.contains("s3cr3t") && !d.contains("pw@"), "{d}");
    }
}
