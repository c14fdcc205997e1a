//! Devices as a [`Resource`]. A device's agent, mailboxes and user provider must exist in its
//! tenant, and its ingress user name must be unique on its agent. The ingress password is stored
//! only as an Argon2id hash (PHC string), kept by updates that do not name it. Agents of the
//! tenant learn about every change.

use tokenfleet_domain::{Agent, Device, Mailbox, Provider, Stamps, ValidationError};
use tokenfleet_proto::v1 as pb;
use tokenfleet_seal::Secret;
use tokenfleet_store::{RecordKey, Scope};

use crate::authz::Principal;
use crate::convert::{self, SecretChange, UpdateMask};
use crate::ops::Error;
use crate::ops::names::shown;
use crate::ops::resource::{Resource, resource_basics};
use crate::ops::stored::records;
use crate::records::{agent_key, device_key, mailbox_key, provider_key};
use crate::state::BrokerState;

/// The device resource.
pub(crate) struct Devices;

/// An update's ingress password: what changes, and its hash once computed (reused by retries).
#[derive(Debug, Default)]
pub(crate) struct PasswordPlan {
    change: SecretChange,
    hash: Option<String>,
}

/// Argon2id hash (PHC string) of an ingress password, computed off the async runtime.
async fn hash_password(password: Secret) -> Result<String, Error> {
    let hashed = tokio::task::spawn_blocking(move || {
        use argon2::password_hash::PasswordHasher as _;
        argon2::Argon2::default()
            .hash_password(password.expose().as_bytes())
            .map(|h| h.to_string())
    })
    .await;
    let failure = |e: &dyn std::fmt::Display| {
        Error::internal(
            "internal error while hashing the password",
            format_args!("hashing an ingress password failed: {e}"),
        )
    };
    match hashed {
        Ok(Ok(phc)) => Ok(phc),
        Ok(Err(e)) => Err(failure(&e)),
        Err(e) => Err(failure(&e)),
    }
}

/// Whether the record `key` exists; FAILED_PRECONDITION on `field` otherwise.
async fn require<T: crate::records::StoredRecord>(
    state: &BrokerState,
    (tenant, key): (&str, RecordKey),
    field: &str,
    what: &str,
) -> Result<(), Error> {
    if records(state).get::<T>(&key).await?.is_none() {
        return Err(Error::precondition(
            field,
            format!("no {what} in tenant `{tenant}`; create it first"),
        ));
    }
    Ok(())
}

/// The agent, every mailbox and the user provider the device names exist in its tenant.
async fn check_references(state: &BrokerState, d: &Device) -> Result<(), Error> {
    let t = d.tenant.as_str();
    if !d.agent.is_empty() {
        let what = format!("agent `{}`", d.agent);
        require::<Agent>(state, (t, agent_key(t, &d.agent)), "device.agent", &what).await?;
    }
    if !d.user_provider.is_empty() {
        let what = format!("provider `{}`", d.user_provider);
        let key = (t, provider_key(t, &d.user_provider));
        require::<Provider>(state, key, "device.user_provider", &what).await?;
    }
    let named = [
        ("device.admin_mailbox".to_owned(), d.admin_mailbox.as_str()),
        ("device.bulk_mailbox".to_owned(), d.bulk_mailbox.as_str()),
    ]
    .into_iter()
    .chain(
        d.allowed_mailboxes
            .iter()
            .enumerate()
            .map(|(i, m)| (format!("device.allowed_mailboxes[{i}]"), m.as_str())),
    );
    for (field, mailbox) in named.filter(|(_, m)| !m.is_empty()) {
        let what = format!("mailbox `{mailbox}`");
        require::<Mailbox>(state, (t, mailbox_key(t, mailbox)), &field, &what).await?;
    }
    Ok(())
}

/// The device's ingress user name is not the login of another device on the same agent (the
/// agent could not tell which device logged in; it refuses such a configuration too). Compared
/// without regard to case. Two concurrent writes can still both pass; the agent then refuses
/// the login of both devices until one is changed.
async fn check_unique_login(state: &BrokerState, d: &Device) -> Result<(), Error> {
    if d.agent.is_empty() || d.ingress.username.is_empty() {
        return Ok(());
    }
    let devices = records(state)
        .list_all::<Device>(&Scope::Tenant(d.tenant.clone()))
        .await?;
    if let Some(other) = devices.iter().map(|v| &v.value).find(|o| {
        o.name != d.name
            && o.agent == d.agent
            && o.ingress.username.eq_ignore_ascii_case(&d.ingress.username)
    }) {
        return Err(Error::precondition(
            "device.ingress.username",
            format!(
                "`{}` is already the ingress login of device `{}` on agent `{}`; each device of an agent needs its own user name",
                shown(&d.ingress.username),
                other.name,
                d.agent
            ),
        ));
    }
    Ok(())
}

/// The checks every written device passes, after its password hash is in place (a placeholder
/// until it is computed).
async fn check_device(state: &BrokerState, d: &Device) -> Result<(), Error> {
    convert::check_device_ingress(d)?;
    check_references(state, d).await?;
    check_unique_login(state, d).await
}

impl Resource for Devices {
    type Extra = Option<Secret>;
    type Plan = PasswordPlan;
    resource_basics!(scoped "device" in "devices": Device as pb::Device, key device_key, to_wire convert::device_to_proto, merge convert::merge_device);

    fn from_wire(
        wire: &pb::Device,
        stamps: Stamps,
    ) -> Result<(Device, Option<Secret>), ValidationError> {
        convert::device_from_proto(wire, stamps)
    }

    fn check_new(
        &self,
        _: &Principal,
        device: &mut Device,
        password: &Option<Secret>,
    ) -> Result<(), Error> {
        if password.is_some() {
            // Placeholder so the user-name check sees a password; replaced by the hash below.
            device.ingress.password_hash = Some(String::new());
        }
        Ok(convert::check_device_ingress(device)?)
    }

    /// Insecure token transport allowed by the profile is written into the audit entry.
    async fn prepare_new(
        &self,
        state: &BrokerState,
        device: &mut Device,
        password: Option<Secret>,
    ) -> Result<String, Error> {
        check_references(state, device).await?;
        check_unique_login(state, device).await?;
        if let Some(password) = password {
            device.ingress.password_hash = Some(hash_password(password).await?);
        }
        Ok(convert::cleartext_token_warnings(device).join("; "))
    }

    /// `ingress.password` named alone sets or (empty) clears only the password; a whole
    /// `ingress` with a password replaces it.
    fn plan_update(
        &self,
        _: &BrokerState,
        input: &pb::Device,
        mask: &UpdateMask,
    ) -> Result<PasswordPlan, Error> {
        let password = input
            .ingress
            .as_ref()
            .map(|i| i.password.as_str())
            .unwrap_or_default();
        let change = if mask.names("ingress.password") {
            convert::secret_change(mask, "ingress.password", password)
        } else if mask.includes("ingress") && !password.is_empty() {
            SecretChange::Set(Secret::new(password))
        } else {
            SecretChange::Keep
        };
        Ok(PasswordPlan { change, hash: None })
    }

    async fn prepare_update(
        &self,
        state: &BrokerState,
        _: &Principal,
        plan: &mut PasswordPlan,
        old: &Device,
        next: &mut Device,
        _: Option<Secret>,
    ) -> Result<(), Error> {
        next.ingress.password_hash = match &plan.change {
            SecretChange::Keep => old.ingress.password_hash.clone(),
            SecretChange::Clear => None,
            SecretChange::Set(_) => Some(String::new()),
        };
        check_device(state, next).await?;
        if let SecretChange::Set(p) = &plan.change {
            // Hashed once, after validation, and reused if the write must be retried.
            if plan.hash.is_none() {
                plan.hash = Some(hash_password(p.clone()).await?);
            }
            next.ingress.password_hash.clone_from(&plan.hash);
        }
        Ok(())
    }

    async fn updated(
        &self,
        _: &BrokerState,
        plan: PasswordPlan,
        next: &Device,
        version: u64,
        mask: &UpdateMask,
    ) -> Result<(pb::Device, String), Error> {
        let mut detail = format!("fields: {}", mask.describe());
        match plan.change {
            SecretChange::Keep => {}
            SecretChange::Clear => detail.push_str("; ingress password cleared"),
            SecretChange::Set(_) => detail.push_str("; ingress password replaced"),
        }
        for warning in convert::cleartext_token_warnings(next) {
            detail.push_str("; ");
            detail.push_str(&warning);
        }
        Ok((Self::to_wire(next, version), detail))
    }

    async fn changed(&self, state: &BrokerState, tenant: &str) {
        crate::fleet::config_changed(state, tenant).await;
    }
}
