//! `[admin]` (who may point providers where) and `[audit]` (how long each kind of audit record is
//! kept): the raw sections and their validation into [`ProviderPolicy`] and [`AuditRetention`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::audit::{AuditRetention, Retention};
use crate::ops::provider_policy::ProviderPolicy;

/// `[admin]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Hosts (`host` or `host:port`) that tenant admins may use in provider endpoint overrides
    /// and as provider HTTP proxy, besides the well-known Microsoft and Google sign-in hosts.
    /// Fleet admins may point providers anywhere; extra trusted CAs are fleet-admin only.
    pub provider_hosts: Vec<String>,
}

impl AdminSection {
    /// The validated policy (the error names the `admin.*` entry at fault).
    pub fn to_policy(&self) -> Result<ProviderPolicy, ConfigError> {
        let mut allowed_hosts = Vec::with_capacity(self.provider_hosts.len());
        for (i, host) in self.provider_hosts.iter().enumerate() {
            let h = host.trim().to_ascii_lowercase();
            let (name, port) = match h.rsplit_once(':') {
                Some((name, port)) if !name.contains(':') => (name, Some(port)),
                _ => (h.as_str(), None),
            };
            let name_ok = !name.is_empty()
                && name.len() <= 253
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
            let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0));
            if !name_ok || !port_ok {
                return Err(ConfigError::invalid(
                    format!("admin.provider_hosts[{i}]"),
                    format!(
                        "`{}` is not a host name or `host:port` (no scheme, no path; IPv4 \
                         addresses are host names here)",
                        host.escape_debug()
                    ),
                ));
            }
            allowed_hosts.push(h);
        }
        Ok(ProviderPolicy { allowed_hosts })
    }
}

/// `[audit]`: retention per kind of audit record. Counts are per scope (each tenant, and the
/// global log); ages in days, 0 = no age bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// Changes that took effect: newest entries kept.
    pub changes_max_entries: usize,
    /// Changes: days kept (0 = no age bound).
    pub changes_max_age_days: u64,
    /// Refused or failed attempts: newest entries kept.
    pub refused_max_entries: usize,
    /// Refused attempts: days kept (0 = no age bound).
    pub refused_max_age_days: u64,
    /// Access tokens issued to agents: newest entries kept.
    pub issuance_max_entries: usize,
    /// Issuances: days kept (0 = no age bound).
    pub issuance_max_age_days: u64,
}

impl Default for AuditSection {
    fn default() -> Self {
        let d = AuditRetention::DEFAULT;
        let days = |r: Retention| r.max_age.map_or(0, |a| a.as_secs() / 86_400);
        Self {
            changes_max_entries: d.changes.max_entries,
            changes_max_age_days: days(d.changes),
            refused_max_entries: d.refused.max_entries,
            refused_max_age_days: days(d.refused),
            issuance_max_entries: d.issuance.max_entries,
            issuance_max_age_days: days(d.issuance),
        }
    }
}

/// Largest count bound (per scope and kind).
const MAX_ENTRIES: usize = 10_000_000;
/// Largest age bound in days (100 years).
const MAX_DAYS: u64 = 36_500;

impl AuditSection {
    /// The validated retention (the error names the `audit.*` field at fault).
    pub fn to_retention(&self) -> Result<AuditRetention, ConfigError> {
        let one = |kind: &str, entries: usize, days: u64| -> Result<Retention, ConfigError> {
            if !(1..=MAX_ENTRIES).contains(&entries) {
                return Err(ConfigError::invalid(
                    format!("audit.{kind}_max_entries"),
                    format!("must be 1-{MAX_ENTRIES}, got {entries}"),
                ));
            }
            if days > MAX_DAYS {
                return Err(ConfigError::invalid(
                    format!("audit.{kind}_max_age_days"),
                    format!("must be 0 (no age bound) to {MAX_DAYS}, got {days}"),
                ));
            }
            Ok(Retention {
                max_entries: entries,
                max_age: (days > 0).then(|| Duration::from_secs(days * 86_400)),
            })
        };
        Ok(AuditRetention {
            changes: one(
                "changes",
                self.changes_max_entries,
                self.changes_max_age_days,
            )?,
            refused: one(
                "refused",
                self.refused_max_entries,
                self.refused_max_age_days,
            )?,
            issuance: one(
                "issuance",
                self.issuance_max_entries,
                self.issuance_max_age_days,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_to_the_documented_retention() {
        assert_eq!(
            AuditSection::default().to_retention().unwrap(),
            AuditRetention::DEFAULT
        );
        assert_eq!(
            AdminSection::default().to_policy().unwrap(),
            ProviderPolicy::default()
        );
    }

    #[test]
    fn bad_values_name_the_field() {
        let bad = AuditSection {
            refused_max_entries: 0,
            ..AuditSection::default()
        };
        let err = bad.to_retention().unwrap_err().to_string();
        assert!(err.contains("audit.refused_max_entries"), "{err}");
        let bad = AdminSection {
            provider_hosts: vec!["idp.example".into(), "https://x.example/".into()],
        };
        let err = bad.to_policy().unwrap_err().to_string();
        assert!(err.contains("admin.provider_hosts[1]"), "{err}");
        let ok = AdminSection {
            provider_hosts: vec!["127.0.0.1".into(), "Idp.Example:8443".into()],
        };
        assert_eq!(
            ok.to_policy().unwrap().allowed_hosts,
            ["127.0.0.1", "idp.example:8443"]
        );
    }
}
