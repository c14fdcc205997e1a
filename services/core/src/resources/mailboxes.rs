//! Mailboxes as a [`Resource`], in domain types: callers send a [`MailboxInput`] (the fields as
//! given, enum values possibly unset) and get back a [`MailboxView`] (the record, its version and
//! what its grant record adds). A mailbox's provider must exist in its tenant, fit its grant type
//! and hold the credential the grant type needs. The token state is the grant record's: reads
//! show it, an update that changes what the grant belongs to discards it, a delete takes it
//! along. A mailbox that devices use is not deleted. Agents of the tenant learn about every
//! change.

use std::collections::HashMap;

use time::OffsetDateTime;
use tokenfleet_domain::{
    GrantType, MailPurpose, Mailbox, MailboxKind, Provider, ProviderKind, Stamps, TokenState,
    TokenStatus, Valid, ValidationError,
};
use tokenfleet_store::Scope;

use crate::authz::Principal;
use crate::ops::Error;
use crate::ops::choice::Choice;
use crate::ops::mask::{FieldTable, UpdateMask};
use crate::ops::paging::PageRequest;
use crate::ops::resource::{self, Id, Resource, resource_names};
use crate::ops::stored::{Reference, Referrer, must_get, records};
use crate::records::{Versioned, mailbox_key, provider_key};
use crate::state::BrokerState;
use crate::tokens::grant::{GrantRecord, PendingConsent, grant_key};
use crate::tokens::lifecycle::discard_grant;

/// The fields of a mailbox as update masks name them (the Admin API's field names).
pub const FIELDS: FieldTable = FieldTable {
    resource: "mailbox",
    mutable: &[
        "address",
        "provider",
        "grant_type",
        "kind",
        "purposes",
        "disabled",
        "consent_account",
    ],
    immutable: &["tenant", "name"],
    output_only: &["token", "create_time", "update_time", "version"],
};

/// A mailbox as a caller sent it, before validation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailboxInput {
    /// Version the change is conditional on (0: unconditional).
    pub version: u64,
    /// Tenant.
    pub tenant: String,
    /// Name.
    pub name: String,
    /// E-mail address.
    pub address: String,
    /// Provider (app registration) in the same tenant.
    pub provider: String,
    /// How tokens are obtained.
    pub grant_type: Choice<GrantType>,
    /// Admin, bulk or user.
    pub kind: Choice<MailboxKind>,
    /// What the tokens are for (at least one).
    pub purposes: Vec<Choice<MailPurpose>>,
    /// Disabled by an operator.
    pub disabled: bool,
    /// The account that must sign in at consent (delegated grants only; empty: any).
    pub consent_account: String,
}

/// A mailbox as reads show it: the record (its token state the grant record's, DISABLED when the
/// mailbox is), its version, and what the grant record adds.
#[derive(Debug, Clone, PartialEq)]
pub struct MailboxView {
    /// Store version of the mailbox record.
    pub version: u64,
    /// The mailbox.
    pub mailbox: Mailbox,
    /// What the grant record adds; `None` without one.
    pub grant: Option<GrantView>,
}

/// What a mailbox's grant record shows besides its token state (never a token or a code that
/// would let someone finish the consent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantView {
    /// A device-code consent waiting for the person.
    pub pending_device_code: Option<PendingDeviceCode>,
    /// When the refresh token expires, when known.
    pub refresh_token_expires: Option<OffsetDateTime>,
    /// When the next refresh is due.
    pub next_refresh: Option<OffsetDateTime>,
    /// Failed refreshes in a row.
    pub consecutive_failures: u32,
    /// The provider's clock minus the broker's, seconds.
    pub clock_skew_secs: i64,
}

/// A pending device-code consent as shown to operators: what the person enters where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDeviceCode {
    /// The code to enter.
    pub user_code: String,
    /// Where to enter it.
    pub verification_uri: String,
    /// The provider's instruction text.
    pub message: String,
    /// When the code expires.
    pub expires: OffsetDateTime,
    /// The current polling interval, seconds.
    pub interval_secs: u64,
}

/// The mailbox resource.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mailboxes;

/// Whether an update keeps the grant (decided per attempt, used for the answer).
#[derive(Debug, Default)]
pub struct SameGrant(bool);

/// A validated mailbox record from what a caller sent; the token state starts as NOT_RETRIEVED.
pub fn from_input(m: &MailboxInput, stamps: Stamps) -> Valid<Mailbox> {
    tokenfleet_domain::name("mailbox.tenant", &m.tenant)?;
    tokenfleet_domain::name("mailbox.name", &m.name)?;
    tokenfleet_domain::email("mailbox.address", &m.address)?;
    tokenfleet_domain::name("mailbox.provider", &m.provider)?;
    let grant_type = m.grant_type.required("mailbox.grant_type")?;
    let kind = m.kind.required("mailbox.kind")?;
    if m.purposes.is_empty() {
        return Err(ValidationError::new(
            "mailbox.purposes",
            "must name at least one purpose",
        ));
    }
    let mut purposes = Vec::new();
    for (i, raw) in m.purposes.iter().enumerate() {
        let purpose = raw.required(&format!("mailbox.purposes[{i}]"))?;
        if !purposes.contains(&purpose) {
            purposes.push(purpose);
        }
    }
    Ok(Mailbox {
        tenant: m.tenant.clone(),
        name: m.name.clone(),
        address: m.address.clone(),
        provider: m.provider.clone(),
        grant_type,
        kind,
        purposes,
        disabled: m.disabled,
        token: TokenState::default(),
        stamps,
        consent_account: consent_account(&m.consent_account, grant_type)?,
    })
}

/// `mailbox.consent_account`: empty, or an e-mail address (compared case-insensitively), and
/// only for grant types where a person signs in.
fn consent_account(raw: &str, grant_type: GrantType) -> Valid<String> {
    let account = raw.trim();
    if account.is_empty() {
        return Ok(String::new());
    }
    tokenfleet_domain::email("mailbox.consent_account", account)?;
    if !matches!(
        grant_type,
        GrantType::DelegatedDeviceCode | GrantType::DelegatedAuthCode
    ) {
        return Err(ValidationError::new(
            "mailbox.consent_account",
            "only delegated mailboxes (delegated_device_code, delegated_auth_code) have a person signing in; leave it empty for app_only and service_account",
        ));
    }
    Ok(account.to_owned())
}

/// Whether a provider of `kind` can obtain tokens with `grant`. The error names
/// `mailbox.grant_type` and says what to use instead.
pub fn check_grant_fits(kind: ProviderKind, grant: GrantType) -> Valid {
    use {GrantType as G, ProviderKind as K};
    let problem = match (grant, kind) {
        (G::DelegatedDeviceCode, K::Google) => {
            "Google does not allow the device authorization flow for Gmail scopes; use delegated_auth_code (browser consent) or service_account (Workspace domain-wide delegation)"
        }
        (G::AppOnly, K::Google | K::Generic) => {
            "app_only (client credentials for SMTP.SendAsApp / POP.AccessAsApp) exists only for microsoft providers; for google use service_account"
        }
        (G::ServiceAccount, K::Microsoft | K::Generic) => {
            "service_account (JWT bearer with domain-wide delegation) exists only for google providers; for microsoft use app_only"
        }
        _ => return Ok(()),
    };
    Err(ValidationError::new(
        "mailbox.grant_type",
        format!("{problem} (provider kind is {kind}, grant type {grant})"),
    ))
}

/// The provider exists in the mailbox's tenant, fits the grant type, and holds the credential the
/// grant type needs.
async fn check_provider(state: &BrokerState, m: &Mailbox) -> Result<(), Error> {
    let provider = records(state)
        .get::<Provider>(&provider_key(&m.tenant, &m.provider))
        .await?
        .ok_or_else(|| {
            Error::precondition(
                "mailbox.provider",
                format!(
                    "no provider `{}` in tenant `{}`; create it first",
                    m.provider, m.tenant
                ),
            )
        })?
        .value;
    check_grant_fits(provider.kind, m.grant_type)?;
    match m.grant_type {
        GrantType::AppOnly if provider.client_secret.is_none() => Err(Error::precondition(
            "mailbox.grant_type",
            format!(
                "app_only needs a client secret, and provider `{}` has none; set provider.client_secret first",
                m.provider
            ),
        )),
        GrantType::ServiceAccount if provider.service_account_key.is_none() => {
            Err(Error::precondition(
                "mailbox.grant_type",
                format!(
                    "service_account needs a service-account key, and provider `{}` has none; set provider.service_account_key first",
                    m.provider
                ),
            ))
        }
        _ => Ok(()),
    }
}

async fn grant_of(state: &BrokerState, m: &Mailbox) -> Result<Option<GrantRecord>, Error> {
    let grant = records(state)
        .get::<GrantRecord>(&grant_key(&m.tenant, &m.name))
        .await?;
    Ok(grant.map(|g| g.value))
}

/// A mailbox as reads show it, with the token state of its grant record (when there is one): a
/// disabled mailbox shows DISABLED; a pending device-code consent shows its user code.
pub fn view_of(mailbox: &Mailbox, version: u64, grant: Option<&GrantRecord>) -> MailboxView {
    let mut mailbox = mailbox.clone();
    if let Some(g) = grant {
        mailbox.token = g.state.clone();
    }
    if mailbox.disabled {
        mailbox.token.status = TokenStatus::Disabled;
    }
    let grant = grant.map(|g| GrantView {
        pending_device_code: match &g.pending {
            Some(PendingConsent::DeviceCode {
                user_code,
                verification_uri,
                message,
                expires,
                interval_secs,
                ..
            }) => Some(PendingDeviceCode {
                user_code: user_code.clone(),
                verification_uri: verification_uri.clone(),
                message: message.clone(),
                expires: *expires,
                interval_secs: *interval_secs,
            }),
            _ => None,
        },
        refresh_token_expires: g.refresh_token_expires,
        next_refresh: g.next_refresh,
        consecutive_failures: g.consecutive_failures,
        clock_skew_secs: g.clock_skew_secs,
    });
    MailboxView {
        version,
        mailbox,
        grant,
    }
}

/// Mailbox `name` of `tenant` as reads show it, for operations that have already authorized
/// the caller (token and consent operations answer with it).
pub async fn read(state: &BrokerState, tenant: &str, name: &str) -> Result<MailboxView, Error> {
    let id = Id::scoped(tenant, name);
    let what = resource::what::<Mailboxes>(&id);
    let stored = must_get::<Mailbox>(state, &Mailboxes::key(&id), &what).await?;
    Mailboxes.view(state, stored).await
}

/// Validates the tenant and mailbox names of a token or consent request.
pub fn check_names(tenant: &str, mailbox: &str) -> Result<(), Error> {
    tokenfleet_domain::name("tenant", tenant)?;
    tokenfleet_domain::name("mailbox", mailbox)?;
    Ok(())
}

impl Resource for Mailboxes {
    type Output = MailboxView;
    type Extra = ();
    type Plan = SameGrant;
    resource_names!(scoped "mailbox" in "mailboxes": Mailbox, input MailboxInput, key mailbox_key);
    fn to_input(m: &Mailbox, version: u64) -> MailboxInput {
        MailboxInput {
            version,
            tenant: m.tenant.clone(),
            name: m.name.clone(),
            address: m.address.clone(),
            provider: m.provider.clone(),
            grant_type: m.grant_type.into(),
            kind: m.kind.into(),
            purposes: m.purposes.iter().map(|p| Choice::Is(*p)).collect(),
            disabled: m.disabled,
            consent_account: m.consent_account.clone(),
        }
    }
    fn output(record: &Mailbox, version: u64) -> MailboxView {
        view_of(record, version, None)
    }
    fn from_input(input: &MailboxInput, stamps: Stamps) -> Valid<(Mailbox, ())> {
        Ok((from_input(input, stamps)?, ()))
    }
    fn merge(dst: &mut MailboxInput, src: &MailboxInput, mask: &UpdateMask) {
        for path in FIELDS.mutable.iter().filter(|p| mask.includes(p)) {
            match *path {
                "address" => dst.address.clone_from(&src.address),
                "provider" => dst.provider.clone_from(&src.provider),
                "grant_type" => dst.grant_type = src.grant_type,
                "kind" => dst.kind = src.kind,
                "purposes" => dst.purposes.clone_from(&src.purposes),
                "disabled" => dst.disabled = src.disabled,
                "consent_account" => dst.consent_account.clone_from(&src.consent_account),
                _ => {}
            }
        }
    }

    const REFERENCES: &'static [Reference] = &[Reference::new(
        Referrer::DeviceMailbox,
        "is still used by devices",
        "change or delete them first",
    )];

    async fn prepare_new(
        &self,
        state: &BrokerState,
        record: &mut Mailbox,
        _: (),
    ) -> Result<String, Error> {
        check_provider(state, record).await?;
        Ok(String::new())
    }

    /// A grant belongs to one address, app registration, flow and signed-in account: changing
    /// any of them means a new consent, so the token state starts over.
    async fn prepare_update(
        &self,
        state: &BrokerState,
        _: &Principal,
        same: &mut SameGrant,
        old: &Mailbox,
        next: &mut Mailbox,
        _: (),
    ) -> Result<(), Error> {
        same.0 = next.address == old.address
            && next.provider == old.provider
            && next.grant_type == old.grant_type
            && next
                .consent_account
                .eq_ignore_ascii_case(&old.consent_account);
        next.token = if same.0 {
            old.token.clone()
        } else {
            TokenState::default()
        };
        check_provider(state, next).await
    }

    async fn updated(
        &self,
        state: &BrokerState,
        same: SameGrant,
        next: &Mailbox,
        version: u64,
        mask: &UpdateMask,
    ) -> Result<(MailboxView, String), Error> {
        let grant = if same.0 {
            grant_of(state, next).await?
        } else {
            // The grant belongs to the old address, app, flow or account.
            discard_grant(state, &next.tenant, &next.name).await?;
            None
        };
        Ok((
            view_of(next, version, grant.as_ref()),
            format!("fields: {}", mask.describe()),
        ))
    }

    /// Its tokens must not outlive it.
    async fn deleted(&self, state: &BrokerState, id: &Id) -> Result<(), Error> {
        discard_grant(state, &id.tenant, &id.name).await?;
        Ok(())
    }

    async fn view(&self, state: &BrokerState, m: Versioned<Mailbox>) -> Result<MailboxView, Error> {
        let grant = grant_of(state, &m.value).await?;
        Ok(view_of(&m.value, m.version, grant.as_ref()))
    }

    /// The grant records of a page of mailboxes. Grants share their mailbox's id, so one listing
    /// from the same cursor finds them; mailboxes beyond a full listing (possible only with
    /// orphaned grants) are read one by one.
    async fn view_page(
        &self,
        state: &BrokerState,
        scope: &Scope,
        page: &PageRequest,
        items: &[Versioned<Mailbox>],
    ) -> Result<Vec<MailboxView>, Error> {
        let limit = page.size + 1;
        let listed = records(state)
            .list::<GrantRecord>(scope, page.cursor.as_deref(), limit)
            .await?;
        let complete_up_to = (listed.len() >= limit)
            .then(|| listed.last().map(|g| g.value.mailbox.clone()))
            .flatten();
        let mut grants: HashMap<String, GrantRecord> = listed
            .into_iter()
            .map(|g| (g.value.mailbox.clone(), g.value))
            .collect();
        if let Some(last) = complete_up_to {
            for m in items.iter().filter(|m| m.value.name > last) {
                if let Some(g) = grant_of(state, &m.value).await? {
                    grants.insert(m.value.name.clone(), g);
                }
            }
        }
        Ok(items
            .iter()
            .map(|m| view_of(&m.value, m.version, grants.get(&m.value.name)))
            .collect())
    }

    async fn changed(&self, state: &BrokerState, tenant: &str) {
        crate::fleet::config_changed(state, tenant).await;
    }
}

#[cfg(test)]
mod tests {
    use tokenfleet_domain::{ProviderEndpoints, Role};
    use tokenfleet_store::Precondition;

    use super::*;
    use crate::records::Records;
    use crate::testing::{principal, put_tenant, state};

    fn input(name: &str, grant_type: Choice<GrantType>) -> MailboxInput {
        MailboxInput {
            version: 0,
            tenant: "acme".into(),
            name: name.into(),
            address: format!("{name}@acme.example"),
            provider: "m365".into(),
            grant_type,
            kind: Choice::Is(MailboxKind::Admin),
            purposes: vec![Choice::Is(MailPurpose::Send), Choice::Is(MailPurpose::Send)],
            disabled: false,
            consent_account: String::new(),
        }
    }

    async fn put_provider(state: &BrokerState, kind: ProviderKind) {
        let provider = Provider {
            tenant: "acme".into(),
            name: "m365".into(),
            kind,
            authority: "organizations".into(),
            client_id: "c".into(),
            client_secret: None,
            endpoints: ProviderEndpoints::default(),
            http_proxy: String::new(),
            http_proxy_password: None,
            extra_ca_pem: String::new(),
            scopes: Vec::new(),
            service_account_key: None,
            stamps: Stamps::new(OffsetDateTime::UNIX_EPOCH),
        };
        Records::new(state.store.as_ref())
            .put(&provider, Precondition::Absent)
            .await
            .unwrap();
    }

    /// Validation of unset and unknown enum values happens in the core, only for the fields an
    /// update names; the provider must fit the grant type and hold its credential.
    #[tokio::test]
    async fn mailboxes_are_checked_against_their_provider_in_domain_types() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        put_tenant(&state, "acme").await;
        put_provider(&state, ProviderKind::Microsoft).await;
        let admin = principal(Role::TenantAdmin, Some("acme"));

        let created = resource::create(
            &Mailboxes,
            &state,
            &admin,
            input("scan", GrantType::DelegatedDeviceCode.into()),
        )
        .await
        .unwrap();
        assert_eq!(created.version, 1);
        assert_eq!(created.mailbox.purposes, vec![MailPurpose::Send]);
        assert_eq!(created.mailbox.token.status, TokenStatus::NotRetrieved);
        assert_eq!(created.grant, None);

        let err = resource::create(&Mailboxes, &state, &admin, input("x", Choice::Unset))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "mailbox.grant_type: must be set (UNSPECIFIED is not a value)"
        );
        let err = resource::create(&Mailboxes, &state, &admin, input("x", Choice::Unknown(9)))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "mailbox.grant_type: unknown value 9");
        let err = resource::create(
            &Mailboxes,
            &state,
            &admin,
            input("x", GrantType::AppOnly.into()),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
        assert!(err.to_string().contains("needs a client secret"), "{err}");
        let err = resource::create(
            &Mailboxes,
            &state,
            &admin,
            input("x", GrantType::ServiceAccount.into()),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("exists only for google"), "{err}");

        // An update that names only `disabled` ignores the unset grant type it carries, and a
        // disabled mailbox shows DISABLED.
        let mask = UpdateMask::parse(&FIELDS, &["disabled".to_owned()]);
        let mut disable = input("scan", Choice::Unset);
        disable.disabled = true;
        let updated = resource::update(&Mailboxes, &state, &admin, disable, mask)
            .await
            .unwrap();
        assert_eq!(updated.mailbox.grant_type, GrantType::DelegatedDeviceCode);
        assert_eq!(updated.mailbox.token.status, TokenStatus::Disabled);
        let shown = read(&state, "acme", "scan").await.unwrap();
        assert_eq!(shown, updated);

        // A viewer may read but not write; another tenant's key may do neither.
        let viewer = principal(Role::Viewer, Some("acme"));
        let (listed, _) = resource::list(&Mailboxes, &state, &viewer, "acme", 10, "")
            .await
            .unwrap();
        assert_eq!(listed, vec![updated]);
        let err = resource::delete(&Mailboxes, &state, &viewer, Id::scoped("acme", "scan"), 0)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        let other = principal(Role::TenantAdmin, Some("beta"));
        let err = resource::list(&Mailboxes, &state, &other, "acme", 10, "")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        resource::delete(&Mailboxes, &state, &admin, Id::scoped("acme", "scan"), 0)
            .await
            .unwrap();
    }
}
