//! Who may do what in the admin API.
//!
//! - `fleet-admin`: everything.
//! - `tenant-admin` (always bound to one tenant): reads and changes the providers, mailboxes,
//!   devices, agents and audit log of its tenant, and reads its own tenant record. It cannot
//!   create, change or delete tenant records, and sees only its own tenant in `ListTenants`.
//! - `viewer`: reads only (`Get*`, `List*`, `ListAuditEvents`, `WhoAmI`, `GetFleetStatus`);
//!   fleet-wide when not bound to a tenant, else only its tenant. The global audit log is for
//!   fleet admins only. `TestConnection` needs write access (the agent connects upstream with the
//!   device's tokens), and API keys are managed by admins only (see [`crate::api_keys::may_manage`]).
//!
//! A request for another tenant's objects is answered PERMISSION_DENIED, before anything is read,
//! whether or not the tenant or object exists, so the answer reveals nothing about the other
//! tenant.

use tokenfleet_domain::Role;

use crate::ops::Error;

/// The authenticated caller of an admin RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// API key id.
    pub key_id: String,
    /// The key's role.
    pub role: Role,
    /// Tenant the key is bound to; `None` for fleet-wide keys.
    pub tenant: Option<String>,
}

impl Principal {
    /// The audit actor string, `apikey:<id>`.
    pub fn actor(&self) -> String {
        format!("apikey:{}", self.key_id)
    }

    /// Whether the principal may perform `access` on objects of `tenant`.
    pub fn may_access_tenant(&self, tenant: &str, access: Access) -> bool {
        match (self.role, access, self.tenant.as_deref()) {
            (Role::FleetAdmin, _, _) => true,
            (Role::TenantAdmin, _, Some(own)) => own == tenant,
            (Role::TenantAdmin, _, None) => false,
            (Role::Viewer, Access::Write, _) => false,
            (Role::Viewer, Access::Read, None) => true,
            (Role::Viewer, Access::Read, Some(own)) => own == tenant,
        }
    }

    fn describe(&self) -> String {
        match &self.tenant {
            Some(t) => format!("API key `{}` ({} of tenant `{t}`)", self.key_id, self.role),
            None => format!("API key `{}` ({})", self.key_id, self.role),
        }
    }
}

/// Kind of access an RPC needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Get, List, WhoAmI, ListAuditEvents.
    Read,
    /// Create, Update, Delete.
    Write,
}

/// What an RPC acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// Broker-wide objects: creating, changing and deleting tenant records, listing all tenants.
    Fleet,
    /// The global audit log.
    GlobalAudit,
    /// Objects inside one tenant (and reading that tenant's own record).
    Tenant(&'a str),
}

/// Checks that `principal` may perform `access` on `target`; PERMISSION_DENIED otherwise.
pub fn authorize(principal: &Principal, target: Target<'_>, access: Access) -> Result<(), Error> {
    let allowed = match target {
        Target::Fleet => match principal.role {
            Role::FleetAdmin => true,
            Role::Viewer => access == Access::Read && principal.tenant.is_none(),
            Role::TenantAdmin => false,
        },
        Target::GlobalAudit => principal.role == Role::FleetAdmin,
        Target::Tenant(t) => principal.may_access_tenant(t, access),
    };
    if allowed {
        return Ok(());
    }
    let who = principal.describe();
    let message = match (target, access) {
        (_, Access::Write) if principal.role == Role::Viewer => {
            format!("{who} is read-only and may not change anything")
        }
        (Target::Fleet, Access::Write) => {
            format!("{who} may not create, change or delete tenants (fleet-admin only)")
        }
        (Target::Fleet, Access::Read) => format!("{who} may not list all tenants"),
        (Target::GlobalAudit, _) => {
            format!("{who} may not read the global audit log (fleet-admin only); name a tenant")
        }
        (Target::Tenant(t), _) => format!("{who} may not access tenant `{t}`"),
    };
    Err(Error::PermissionDenied(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(role: Role, tenant: Option<&str>) -> Principal {
        Principal {
            key_id: "abc".into(),
            role,
            tenant: tenant.map(str::to_owned),
        }
    }

    #[test]
    fn fleet_admin_may_do_everything() {
        let admin = p(Role::FleetAdmin, None);
        for target in [Target::Fleet, Target::GlobalAudit, Target::Tenant("x")] {
            for access in [Access::Read, Access::Write] {
                assert!(authorize(&admin, target, access).is_ok());
            }
        }
    }

    #[test]
    fn tenant_admin_is_confined_to_its_tenant() {
        let ta = p(Role::TenantAdmin, Some("a"));
        assert!(authorize(&ta, Target::Tenant("a"), Access::Write).is_ok());
        assert!(authorize(&ta, Target::Tenant("a"), Access::Read).is_ok());
        let err = authorize(&ta, Target::Tenant("b"), Access::Read).unwrap_err();
        assert!(
            matches!(&err, Error::PermissionDenied(m) if m.contains("tenant `b`")),
            "{err}"
        );
        assert!(authorize(&ta, Target::Fleet, Access::Write).is_err());
        assert!(authorize(&ta, Target::Fleet, Access::Read).is_err());
        assert!(authorize(&ta, Target::GlobalAudit, Access::Read).is_err());
        // A tenant-admin key without a tenant (never created by `api_keys::create`) has no rights.
        assert!(
            authorize(
                &p(Role::TenantAdmin, None),
                Target::Tenant("a"),
                Access::Read
            )
            .is_err()
        );
    }

    #[test]
    fn viewers_only_read() {
        let fleet = p(Role::Viewer, None);
        assert!(authorize(&fleet, Target::Tenant("x"), Access::Read).is_ok());
        assert!(authorize(&fleet, Target::Fleet, Access::Read).is_ok());
        assert!(authorize(&fleet, Target::GlobalAudit, Access::Read).is_err());
        let err = authorize(&fleet, Target::Tenant("x"), Access::Write).unwrap_err();
        assert!(err.to_string().contains("read-only"), "{err}");
        let bound = p(Role::Viewer, Some("a"));
        assert!(authorize(&bound, Target::Tenant("a"), Access::Read).is_ok());
        assert!(authorize(&bound, Target::Tenant("b"), Access::Read).is_err());
        assert!(authorize(&bound, Target::Fleet, Access::Read).is_err());
    }
}
