//! Where providers may point: the sign-in hosts any caller with write access may use, and the
//! broker's `[admin] provider_hosts` allowlist for the rest (fleet admins may use any host).

/// Sign-in hosts of Microsoft (public and sovereign clouds) and Google that any caller with write
/// access may point a provider at.
pub const WELL_KNOWN_PROVIDER_HOSTS: &[&str] = &[
    "login.microsoftonline.com",
    "login.microsoftonline.us",
    "login.partner.microsoftonline.cn",
    "login.chinacloudapi.cn",
    "accounts.google.com",
    "oauth2.googleapis.com",
    "www.googleapis.com",
];

/// Who may point providers where (the `[admin]` section of the broker configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderPolicy {
    /// Hosts (lower case, optionally `host:port`) that tenant admins may use in endpoint overrides
    /// and as HTTP proxy, besides [`WELL_KNOWN_PROVIDER_HOSTS`]. Fleet admins may use any host.
    pub allowed_hosts: Vec<String>,
}

impl ProviderPolicy {
    /// Whether a non-fleet-admin caller may send a provider's requests to `host[:port]`.
    pub fn allows(&self, host: &str, port: Option<u16>) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let with_port = port.map(|p| format!("{host}:{p}"));
        WELL_KNOWN_PROVIDER_HOSTS.contains(&host.as_str())
            || self.allowed_hosts.iter().any(|allowed| {
                let allowed = allowed.trim().to_ascii_lowercase();
                allowed == host || Some(&allowed) == with_port.as_ref()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_allows_well_known_and_listed_hosts() {
        let policy = ProviderPolicy {
            allowed_hosts: vec!["idp.example".into(), "127.0.0.1:9000".into()],
        };
        assert!(policy.allows("login.microsoftonline.com", None));
        assert!(policy.allows("LOGIN.microsoftonline.com.", None));
        assert!(policy.allows("idp.example", Some(443)));
        assert!(policy.allows("127.0.0.1", Some(9000)));
        assert!(!policy.allows("127.0.0.1", Some(9001)));
        assert!(!policy.allows("evil.example", None));
        assert!(!ProviderPolicy::default().allows("127.0.0.1", None));
    }
}
