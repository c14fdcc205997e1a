//! Re-sealing after a key rotation: [`reseal_all`] re-seals every sealed value in the store
//! (provider secrets and keys, grant tokens and pending consent secrets, the agent CA key) with
//! the keyring's current key, so old keys can be retired.
//!
//! Dependency direction: above [`crate::records`], the grant records and the agent CA; nothing
//! below them imports it.

use tokenfleet_domain::{Provider, Tenant};
use tokenfleet_seal::{Keyring, Sealed, Secret};
use tokenfleet_store::{Precondition, Scope, StoreError};

use crate::records::{CAS_ATTEMPTS, Records, ResealError, StoredRecord as _, Versioned};
use crate::state::BrokerState;
use crate::tokens::grant::{GrantField, GrantRecord, PendingConsent, grant_aad};

/// Outcome of [`reseal_all`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResealReport {
    /// Sealed values looked at.
    pub examined: u64,
    /// Sealed values re-sealed with the current key (the others already used it).
    pub resealed: u64,
}

impl std::fmt::Display for ResealReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "examined {} sealed values, re-sealed {}",
            self.examined, self.resealed
        )
    }
}

/// Re-seals every sealed value in the store (provider secrets and keys, grant tokens and pending
/// consent secrets) with the keyring's current key, so old keys can be retired after a rotation. Each record is rewritten with compare-and-set on the version it was
/// read at; a record changed concurrently is re-read and retried.
pub async fn reseal_all(state: &BrokerState) -> Result<ResealReport, ResealError> {
    let records = Records::new(state.store.as_ref());
    let mut report = ResealReport::default();
    for tenant in records.list_all::<Tenant>(&Scope::Global).await? {
        let scope = Scope::Tenant(tenant.value.name.clone());
        for provider in records.list_all::<Provider>(&scope).await? {
            let (examined, resealed) = reseal_provider(&records, &state.keyring, provider).await?;
            report.examined += examined;
            report.resealed += resealed;
        }
        for grant in records.list_all::<GrantRecord>(&scope).await? {
            let (examined, resealed) = reseal_grant(&records, &state.keyring, grant).await?;
            report.examined += examined;
            report.resealed += resealed;
        }
    }
    let (examined, resealed) = crate::identity::ca::reseal(state).await?;
    report.examined += examined;
    report.resealed += resealed;
    tracing::info!(
        examined = report.examined,
        resealed = report.resealed,
        key_id = state.keyring.current_key_id(),
        "re-seal finished"
    );
    Ok(report)
}

/// Re-seals one sealed field if needed; returns whether it changed.
fn reseal_field(
    keyring: &Keyring,
    aad: &str,
    field: &mut Option<Sealed>,
) -> Result<bool, ResealError> {
    let Some(sealed) = field.as_ref() else {
        return Ok(false);
    };
    if !keyring.needs_reseal(sealed) {
        return Ok(false);
    }
    let seal_err = |source| ResealError::Seal {
        record: aad.to_owned(),
        source,
    };
    let plain = keyring.open(aad, sealed).map_err(seal_err)?;
    *field = Some(keyring.seal(aad, &plain).map_err(seal_err)?);
    Ok(true)
}

/// Re-seals the sealed fields of a mailbox's grant (refresh and access token, a pending device
/// code or PKCE verifier).
async fn reseal_grant(
    records: &Records<'_>,
    keyring: &Keyring,
    mut current: Versioned<GrantRecord>,
) -> Result<(u64, u64), ResealError> {
    let key = current.value.key();
    for _ in 0..CAS_ATTEMPTS {
        let mut grant = current.value.clone();
        let (tenant, mailbox) = (grant.tenant.clone(), grant.mailbox.clone());
        let aad = |field| grant_aad(&tenant, &mailbox, field);
        let mut examined = 0;
        let mut resealed = 0;
        let mut count = |field: &mut Option<Sealed>, f: GrantField| -> Result<(), ResealError> {
            examined += u64::from(field.is_some());
            if reseal_field(keyring, &aad(f), field)? {
                resealed += 1;
            }
            Ok(())
        };
        count(&mut grant.refresh_token, GrantField::RefreshToken)?;
        count(&mut grant.access_token, GrantField::AccessToken)?;
        match &mut grant.pending {
            Some(PendingConsent::DeviceCode { device_code, .. }) => {
                let mut field = Some(device_code.clone());
                count(&mut field, GrantField::DeviceCode)?;
                if let Some(v) = field {
                    *device_code = v;
                }
            }
            Some(PendingConsent::AuthCode { pkce_verifier, .. }) => {
                let mut field = Some(pkce_verifier.clone());
                count(&mut field, GrantField::PkceVerifier)?;
                if let Some(v) = field {
                    *pkce_verifier = v;
                }
            }
            None => {}
        }
        if resealed == 0 {
            return Ok((examined, 0));
        }
        match records
            .put(&grant, Precondition::Version(current.version))
            .await
        {
            Ok(_) => return Ok((examined, resealed)),
            Err(StoreError::Conflict { .. }) => match records.get::<GrantRecord>(&key).await? {
                Some(fresh) => current = fresh,
                None => return Ok((0, 0)),
            },
            Err(StoreError::NotFound(_)) => return Ok((0, 0)),
            Err(e) => return Err(e.into()),
        }
    }
    Err(ResealError::Contended(key.to_string()))
}

async fn reseal_provider(
    records: &Records<'_>,
    keyring: &Keyring,
    mut current: Versioned<Provider>,
) -> Result<(u64, u64), ResealError> {
    let key = current.value.key();
    for _ in 0..CAS_ATTEMPTS {
        let mut provider = current.value.clone();
        let (tenant, name) = (provider.tenant.clone(), provider.name.clone());
        let mut examined = u64::from(provider.client_secret.is_some())
            + u64::from(provider.service_account_key.is_some())
            + u64::from(provider.http_proxy_password.is_some());
        let mut resealed = 0;
        // Records from before proxy passwords were sealed keep the password in the URL: move it
        // out and seal it.
        if let (url, Some(password)) = tokenfleet_domain::split_url_password(&provider.http_proxy)
            && provider.http_proxy_password.is_none()
        {
            let aad = Provider::http_proxy_password_aad(&tenant, &name);
            let sealed = keyring
                .seal_secret(&aad, &Secret::new(password))
                .map_err(|source| ResealError::Seal {
                    record: aad.clone(),
                    source,
                })?;
            provider.http_proxy = url;
            provider.http_proxy_password = Some(sealed);
            examined += 1;
            resealed += 1;
        }
        if reseal_field(
            keyring,
            &Provider::client_secret_aad(&tenant, &name),
            &mut provider.client_secret,
        )? {
            resealed += 1;
        }
        if reseal_field(
            keyring,
            &Provider::service_account_key_aad(&tenant, &name),
            &mut provider.service_account_key,
        )? {
            resealed += 1;
        }
        if reseal_field(
            keyring,
            &Provider::http_proxy_password_aad(&tenant, &name),
            &mut provider.http_proxy_password,
        )? {
            resealed += 1;
        }
        if resealed == 0 {
            return Ok((examined, 0));
        }
        match records
            .put(&provider, Precondition::Version(current.version))
            .await
        {
            Ok(_) => return Ok((examined, resealed)),
            Err(StoreError::Conflict { .. }) => match records.get::<Provider>(&key).await? {
                Some(fresh) => current = fresh,
                None => return Ok((0, 0)),
            },
            Err(StoreError::NotFound(_)) => return Ok((0, 0)),
            Err(e) => return Err(e.into()),
        }
    }
    Err(ResealError::Contended(key.to_string()))
}
