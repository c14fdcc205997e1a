//! The YAML documents of `apply -f` and `export`: one object per document,
//!
//! ```yaml
//! kind: mailbox          # tenant | provider | mailbox | device
//! tenant: acme           # not for tenants
//! name: scan
//! spec:                  # the object's settable fields, named as in tokenfleet.v1
//!   address: scan@acme.example
//!   provider: m365
//!   grant_type: delegated_device_code
//!   kind: bulk
//!   purposes: [send, pop]
//! ```
//!
//! Secrets are never written: a secret field (`client_secret`, `service_account_key`,
//! `ingress.password`) is a reference — `{file: PATH}` or `{env: VARIABLE}` supplies a value,
//! `{stored: true}` keeps what the broker holds (what `export` writes), absent leaves it alone.
//! Parsing is pure: it reads secret files and variables but contacts no broker, so a bad document
//! stops `apply` before anything is sent. Errors name the document (1-based index, kind and name)
//! and the field path (`spec.smtp.port`).

use std::path::PathBuf;

use clap::ValueEnum;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenfleet_proto::v1 as pb;

use super::resource::Name;
use crate::enums::{
    FetchProtocol, GrantType, MailPurpose, MailboxKind, ProviderKind, SendMethod, SenderMode,
    TlsMode, TlsVersion, fetch_protocol_name, grant_type_name, mail_purpose_name,
    mailbox_kind_name, provider_kind_name, send_method_name, sender_mode_name, tls_mode_name,
    tls_version_name,
};
use crate::error::CtlError;

/// Kinds in the order `apply` creates them (each may refer to the ones before).
pub const KINDS: [&str; 4] = ["tenant", "provider", "mailbox", "device"];

/// One document as written: kind, place and the spec (read according to the kind).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocument {
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    name: String,
    #[serde(default)]
    spec: serde_norway::Value,
}

/// Where a secret comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretRef {
    /// File holding the value (trailing newline removed).
    pub file: Option<PathBuf>,
    /// Environment variable holding the value.
    pub env: Option<String>,
    /// `true`: keep the value the broker holds (there must be one).
    pub stored: bool,
}

/// Settable fields of a tenant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantSpec {
    pub display_name: String,
}

/// Endpoint overrides of a provider.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointsSpec {
    pub authorize_url: String,
    pub token_url: String,
    pub device_code_url: String,
    pub revoke_url: String,
}

/// TLS settings of a provider.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderTlsSpec {
    pub extra_ca_pem: String,
}

/// Settable fields of a provider.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderSpec {
    /// `microsoft`, `google` or `generic` (cannot change).
    pub kind: String,
    pub authority: String,
    pub client_id: String,
    pub client_secret: Option<SecretRef>,
    pub service_account_key: Option<SecretRef>,
    pub endpoints: Option<EndpointsSpec>,
    /// As the broker shows it (a password in it as `[redacted]`).
    pub http_proxy: String,
    pub tls: Option<ProviderTlsSpec>,
    pub scopes: Vec<String>,
}

/// Settable fields of a mailbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MailboxSpec {
    pub address: String,
    pub provider: String,
    pub grant_type: String,
    pub kind: String,
    pub purposes: Vec<String>,
    pub disabled: bool,
    pub consent_account: String,
}

/// SMTP send profile of a device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpSpec {
    pub server: String,
    pub port: u32,
    pub security: String,
    pub timeout_seconds: u32,
    pub sender_name: String,
    pub sender_address: String,
    pub skip_certificate_verification: bool,
    pub extra_ca_pem: String,
    pub tls_min_version: String,
    pub tls_max_version: String,
    pub method: String,
    pub api_base_url: String,
    pub insecure_allow_cleartext_tokens: bool,
}

/// Fetch profile of a device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchSpec {
    pub protocol: String,
    pub server: String,
    pub port: u32,
    pub security: String,
    pub interval_seconds: u32,
    pub skip_certificate_verification: bool,
    pub extra_ca_pem: String,
    pub tls_min_version: String,
    pub tls_max_version: String,
    pub folder: String,
    pub insecure_allow_cleartext_tokens: bool,
}

/// Local ingress credentials of a device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngressSpec {
    pub username: String,
    pub password: Option<SecretRef>,
    pub allowed_sources: Vec<String>,
    pub user_addresses: Vec<String>,
}

/// Settable fields of a device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceSpec {
    pub display_name: String,
    pub agent: String,
    pub sender_mode: String,
    pub admin_mailbox: String,
    pub bulk_mailbox: String,
    pub allowed_mailboxes: Vec<String>,
    pub user_provider: String,
    pub smtp: Option<SmtpSpec>,
    pub fetch: Option<FetchSpec>,
    pub ingress: Option<IngressSpec>,
}

/// The spec of one object, by kind.
// A few hundred documents at most, each read once: the size of the device spec does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    Tenant(TenantSpec),
    Provider(ProviderSpec),
    Mailbox(MailboxSpec),
    Device(DeviceSpec),
}

/// One object of a file: where it is (1-based document index), its name and spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub index: usize,
    pub name: Name,
    pub spec: Spec,
}

impl Document {
    /// `tenant`, `provider`, `mailbox` or `device`.
    pub fn kind(&self) -> &'static str {
        match self.spec {
            Spec::Tenant(_) => "tenant",
            Spec::Provider(_) => "provider",
            Spec::Mailbox(_) => "mailbox",
            Spec::Device(_) => "device",
        }
    }

    /// `acme/scan`, or `acme` for a tenant.
    pub fn path(&self) -> String {
        if self.name.tenant.is_empty() {
            self.name.name.clone()
        } else {
            format!("{}/{}", self.name.tenant, self.name.name)
        }
    }

    /// Where the document is, for messages: `document 3 (mailbox acme/scan)`.
    pub fn place(&self) -> String {
        format!("document {} ({} {})", self.index, self.kind(), self.path())
    }

    /// The spec as JSON, each top-level key an update-mask path (secrets left out).
    pub fn fields(&self) -> Value {
        let mut value = match &self.spec {
            Spec::Tenant(s) => serde_json::to_value(s),
            Spec::Provider(s) => serde_json::to_value(s),
            Spec::Mailbox(s) => serde_json::to_value(s),
            Spec::Device(s) => serde_json::to_value(s),
        }
        .unwrap_or(Value::Null);
        if let Some(map) = value.as_object_mut() {
            map.remove("client_secret");
            map.remove("service_account_key");
            if let Some(ingress) = map.get_mut("ingress").and_then(Value::as_object_mut) {
                ingress.remove("password");
            }
        }
        prune(value)
    }

    /// The document as YAML-ready data (what `export` writes): fields at their defaults left out.
    fn raw(&self) -> Result<RawDocument, CtlError> {
        let spec = match &self.spec {
            Spec::Tenant(s) => serde_json::to_value(s),
            Spec::Provider(s) => serde_json::to_value(s),
            Spec::Mailbox(s) => serde_json::to_value(s),
            Spec::Device(s) => serde_json::to_value(s),
        }
        .map_err(|e| CtlError::Output(format!("encoding YAML: {e}")))?;
        let spec = serde_norway::to_value(prune(spec))
            .map_err(|e| CtlError::Output(format!("encoding YAML: {e}")))?;
        Ok(RawDocument {
            kind: self.kind().to_owned(),
            tenant: (!self.name.tenant.is_empty()).then(|| self.name.tenant.clone()),
            name: self.name.name.clone(),
            spec,
        })
    }
}

/// Drops empty values (`""`, `0`, `false`, `[]`, `{}`, `null`) at every level, so a field left
/// out and a field at its default compare equal, as they mean the same to the API.
fn prune(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let map: serde_json::Map<String, Value> = map
                .into_iter()
                .map(|(k, v)| (k, prune(v)))
                .filter(|(_, v)| !is_empty(v))
                .collect();
            Value::Object(map)
        }
        other => other,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
    }
}

/// The top-level fields whose values differ between `desired` and `current` (both from
/// [`Document::fields`]), in a stable order.
pub fn changed_fields(desired: &Value, current: &Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let d = desired.as_object().unwrap_or(&empty);
    let c = current.as_object().unwrap_or(&empty);
    let mut keys: Vec<&String> = d.keys().chain(c.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| d.get(*k) != c.get(*k))
        .cloned()
        .collect()
}

/// Reads every document of `text`; any bad one fails the whole file, naming its index and field.
pub fn parse(text: &str) -> Result<Vec<Document>, CtlError> {
    let mut docs = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let raw: Option<RawDocument> =
            serde_path_to_error::deserialize(de).map_err(|e| bad(index, "", &path_message(&e)))?;
        // An empty document (`---` at the end of a file) holds nothing.
        let Some(raw) = raw else { continue };
        docs.push(document(index, raw)?);
    }
    for (i, a) in docs.iter().enumerate() {
        if let Some(b) = docs[..i]
            .iter()
            .find(|b| b.kind() == a.kind() && b.name == a.name)
        {
            return Err(CtlError::usage(format!(
                "document {}: {} {} is already document {}",
                a.index,
                a.kind(),
                a.path(),
                b.index
            )));
        }
    }
    Ok(docs)
}

fn path_message<E: std::fmt::Display>(e: &serde_path_to_error::Error<E>) -> String {
    let path = e.path().to_string();
    if path.is_empty() || path == "." {
        e.inner().to_string()
    } else {
        format!("{path}: {}", e.inner())
    }
}

fn bad(index: usize, place: &str, message: &str) -> CtlError {
    CtlError::usage(format!("document {index}{place}: {message}"))
}

fn document(index: usize, raw: RawDocument) -> Result<Document, CtlError> {
    let place = format!(" ({} {})", raw.kind, raw.name);
    let spec_of = |spec: serde_norway::Value| -> Result<Spec, CtlError> {
        fn read<T: DeserializeOwned>(
            spec: serde_norway::Value,
            index: usize,
            place: &str,
        ) -> Result<T, CtlError> {
            // An absent spec is an empty mapping (a tenant needs none).
            let spec = if spec.is_null() {
                serde_norway::Value::Mapping(Default::default())
            } else {
                spec
            };
            serde_path_to_error::deserialize(spec)
                .map_err(|e| bad(index, place, &format!("spec.{}", path_message(&e))))
        }
        Ok(match raw.kind.as_str() {
            "tenant" => Spec::Tenant(read(spec, index, &place)?),
            "provider" => Spec::Provider(read(spec, index, &place)?),
            "mailbox" => Spec::Mailbox(read(spec, index, &place)?),
            "device" => Spec::Device(read(spec, index, &place)?),
            other => {
                return Err(bad(
                    index,
                    "",
                    &format!("kind: `{other}` is not one of {}", KINDS.join(", ")),
                ));
            }
        })
    };
    let spec = spec_of(raw.spec)?;
    if raw.name.trim().is_empty() {
        return Err(bad(index, &place, "name: is empty"));
    }
    let tenant = match (&spec, raw.tenant) {
        (Spec::Tenant(_), None) => String::new(),
        (Spec::Tenant(_), Some(_)) => {
            return Err(bad(
                index,
                &place,
                "tenant: a tenant document has no tenant",
            ));
        }
        (_, Some(t)) if !t.trim().is_empty() => t,
        (_, _) => return Err(bad(index, &place, "tenant: missing")),
    };
    let doc = Document {
        index,
        name: Name {
            tenant,
            name: raw.name,
        },
        spec,
    };
    // Enum names are checked now, so a typo stops the file before anything is sent.
    to_wire(&doc, &mut |_: &str, _: &SecretRef| Ok(String::new()))?;
    Ok(doc)
}

/// Writes documents as one YAML stream (`---` between documents).
pub fn to_yaml(docs: &[Document]) -> Result<String, CtlError> {
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        let text = serde_norway::to_string(&doc.raw()?)
            .map_err(|e| CtlError::Output(format!("encoding YAML: {e}")))?;
        out.push_str(&text);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Documents ↔ wire objects

/// A wire object built from a document.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Wire {
    Tenant(pb::Tenant),
    Provider(pb::Provider),
    Mailbox(pb::Mailbox),
    Device(pb::Device),
}

/// The value of an enum field: its lower-case name (`""` or `unspecified` for unset).
fn enum_value<E: ValueEnum>(
    text: &str,
    to_proto: fn(&E) -> i32,
    field: &str,
) -> Result<i32, String> {
    if text.is_empty() || text == "unspecified" {
        return Ok(0);
    }
    E::value_variants()
        .iter()
        .find(|v| {
            v.to_possible_value()
                .is_some_and(|p| p.matches(text, false))
        })
        .map(to_proto)
        .ok_or_else(|| {
            let names: Vec<String> = E::value_variants()
                .iter()
                .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_owned()))
                .collect();
            format!("{field}: `{text}` is not one of {}", names.join(", "))
        })
}

/// An enum name for a document: `""` for unset.
fn enum_name(name: String) -> String {
    if name == "unspecified" {
        String::new()
    } else {
        name
    }
}

/// Builds the wire object of `doc`; `secret(field, reference)` supplies secret values (empty for
/// "keep the stored one").
pub fn to_wire(
    doc: &Document,
    secret: &mut dyn FnMut(&str, &SecretRef) -> Result<String, CtlError>,
) -> Result<Wire, CtlError> {
    let err = |m: String| CtlError::usage(format!("{}: spec.{m}", doc.place()));
    let tenant = doc.name.tenant.clone();
    let name = doc.name.name.clone();
    Ok(match &doc.spec {
        Spec::Tenant(s) => Wire::Tenant(pb::Tenant {
            name,
            display_name: s.display_name.clone(),
            ..Default::default()
        }),
        Spec::Provider(s) => {
            let kind = enum_value(&s.kind, |k: &ProviderKind| k.to_proto(), "kind").map_err(err)?;
            if kind == 0 {
                return Err(err(
                    "kind: missing (microsoft, google or generic)".to_owned()
                ));
            }
            let mut secret_of = |field: &str, r: &Option<SecretRef>| match r {
                Some(r) => secret(field, r),
                None => Ok(String::new()),
            };
            Wire::Provider(pb::Provider {
                tenant,
                name,
                kind,
                authority: s.authority.clone(),
                client_id: s.client_id.clone(),
                client_secret: secret_of("client_secret", &s.client_secret)?,
                service_account_key: secret_of("service_account_key", &s.service_account_key)?,
                endpoints: s.endpoints.as_ref().map(|e| pb::ProviderEndpoints {
                    authorize_url: e.authorize_url.clone(),
                    token_url: e.token_url.clone(),
                    device_code_url: e.device_code_url.clone(),
                    revoke_url: e.revoke_url.clone(),
                }),
                http_proxy: s.http_proxy.clone(),
                tls: s.tls.as_ref().map(|t| pb::ProviderTls {
                    extra_ca_pem: t.extra_ca_pem.clone(),
                }),
                scopes: s.scopes.clone(),
                ..Default::default()
            })
        }
        Spec::Mailbox(s) => Wire::Mailbox(pb::Mailbox {
            tenant,
            name,
            address: s.address.clone(),
            provider: s.provider.clone(),
            grant_type: enum_value(&s.grant_type, |g: &GrantType| g.to_proto(), "grant_type")
                .map_err(err)?,
            kind: enum_value(&s.kind, |k: &MailboxKind| k.to_proto(), "kind").map_err(err)?,
            purposes: s
                .purposes
                .iter()
                .map(|p| enum_value(p, |p: &MailPurpose| p.to_proto(), "purposes"))
                .collect::<Result<_, _>>()
                .map_err(err)?,
            disabled: s.disabled,
            consent_account: s.consent_account.clone(),
            ..Default::default()
        }),
        Spec::Device(s) => {
            let tls =
                |t: &str, f: &str| enum_value(t, |v: &TlsVersion| v.to_proto(), f).map_err(err);
            let mode = |t: &str, f: &str| enum_value(t, |v: &TlsMode| v.to_proto(), f).map_err(err);
            let smtp = match &s.smtp {
                None => None,
                Some(x) => Some(pb::SmtpProfile {
                    server: x.server.clone(),
                    port: x.port,
                    security: mode(&x.security, "smtp.security")?,
                    timeout_seconds: x.timeout_seconds,
                    sender_name: x.sender_name.clone(),
                    sender_address: x.sender_address.clone(),
                    skip_certificate_verification: x.skip_certificate_verification,
                    extra_ca_pem: x.extra_ca_pem.clone(),
                    tls_min_version: tls(&x.tls_min_version, "smtp.tls_min_version")?,
                    tls_max_version: tls(&x.tls_max_version, "smtp.tls_max_version")?,
                    method: enum_value(&x.method, |v: &SendMethod| v.to_proto(), "smtp.method")
                        .map_err(err)?,
                    api_base_url: x.api_base_url.clone(),
                    insecure_allow_cleartext_tokens: x.insecure_allow_cleartext_tokens,
                }),
            };
            let fetch = match &s.fetch {
                None => None,
                Some(x) => Some(pb::FetchProfile {
                    protocol: enum_value(
                        &x.protocol,
                        |v: &FetchProtocol| v.to_proto(),
                        "fetch.protocol",
                    )
                    .map_err(err)?,
                    server: x.server.clone(),
                    port: x.port,
                    security: mode(&x.security, "fetch.security")?,
                    interval_seconds: x.interval_seconds,
                    skip_certificate_verification: x.skip_certificate_verification,
                    extra_ca_pem: x.extra_ca_pem.clone(),
                    tls_min_version: tls(&x.tls_min_version, "fetch.tls_min_version")?,
                    tls_max_version: tls(&x.tls_max_version, "fetch.tls_max_version")?,
                    folder: x.folder.clone(),
                    insecure_allow_cleartext_tokens: x.insecure_allow_cleartext_tokens,
                }),
            };
            let ingress = match &s.ingress {
                None => None,
                Some(x) => Some(pb::IngressCredentials {
                    username: x.username.clone(),
                    password: match &x.password {
                        Some(r) => secret("ingress.password", r)?,
                        None => String::new(),
                    },
                    allowed_sources: x.allowed_sources.clone(),
                    user_addresses: x.user_addresses.clone(),
                    ..Default::default()
                }),
            };
            Wire::Device(pb::Device {
                tenant,
                name,
                display_name: s.display_name.clone(),
                agent: s.agent.clone(),
                sender_mode: enum_value(
                    &s.sender_mode,
                    |v: &SenderMode| v.to_proto(),
                    "sender_mode",
                )
                .map_err(err)?,
                admin_mailbox: s.admin_mailbox.clone(),
                bulk_mailbox: s.bulk_mailbox.clone(),
                allowed_mailboxes: s.allowed_mailboxes.clone(),
                user_provider: s.user_provider.clone(),
                smtp,
                fetch,
                ingress,
                ..Default::default()
            })
        }
    })
}

/// `{stored: true}` where the broker holds a secret, nothing otherwise.
fn stored(set: bool) -> Option<SecretRef> {
    set.then(|| SecretRef {
        stored: true,
        ..Default::default()
    })
}

/// The document of a tenant as the broker holds it.
pub fn tenant_document(t: &pb::Tenant) -> Document {
    Document {
        index: 0,
        name: Name::global(t.name.clone()),
        spec: Spec::Tenant(TenantSpec {
            display_name: t.display_name.clone(),
        }),
    }
}

/// The document of a provider as the broker holds it (secrets as `{stored: true}`).
pub fn provider_document(p: &pb::Provider) -> Document {
    Document {
        index: 0,
        name: Name {
            tenant: p.tenant.clone(),
            name: p.name.clone(),
        },
        spec: Spec::Provider(ProviderSpec {
            kind: enum_name(provider_kind_name(p.kind)),
            authority: p.authority.clone(),
            client_id: p.client_id.clone(),
            client_secret: stored(p.client_secret_set),
            service_account_key: stored(p.service_account_key_set),
            endpoints: p
                .endpoints
                .as_ref()
                .map(|e| EndpointsSpec {
                    authorize_url: e.authorize_url.clone(),
                    token_url: e.token_url.clone(),
                    device_code_url: e.device_code_url.clone(),
                    revoke_url: e.revoke_url.clone(),
                })
                .filter(|e| *e != EndpointsSpec::default()),
            http_proxy: p.http_proxy.clone(),
            tls: p
                .tls
                .as_ref()
                .filter(|t| !t.extra_ca_pem.is_empty())
                .map(|t| ProviderTlsSpec {
                    extra_ca_pem: t.extra_ca_pem.clone(),
                }),
            scopes: p.scopes.clone(),
        }),
    }
}

/// The document of a mailbox as the broker holds it (no token state).
pub fn mailbox_document(m: &pb::Mailbox) -> Document {
    Document {
        index: 0,
        name: Name {
            tenant: m.tenant.clone(),
            name: m.name.clone(),
        },
        spec: Spec::Mailbox(MailboxSpec {
            address: m.address.clone(),
            provider: m.provider.clone(),
            grant_type: enum_name(grant_type_name(m.grant_type)),
            kind: enum_name(mailbox_kind_name(m.kind)),
            purposes: m.purposes.iter().map(|p| mail_purpose_name(*p)).collect(),
            disabled: m.disabled,
            consent_account: m.consent_account.clone(),
        }),
    }
}

/// The document of a device as the broker holds it (the ingress password as `{stored: true}`).
pub fn device_document(d: &pb::Device) -> Document {
    let smtp = d.smtp.as_ref().map(|s| SmtpSpec {
        server: s.server.clone(),
        port: s.port,
        security: enum_name(tls_mode_name(s.security)),
        timeout_seconds: s.timeout_seconds,
        sender_name: s.sender_name.clone(),
        sender_address: s.sender_address.clone(),
        skip_certificate_verification: s.skip_certificate_verification,
        extra_ca_pem: s.extra_ca_pem.clone(),
        tls_min_version: enum_name(tls_version_name(s.tls_min_version)),
        tls_max_version: enum_name(tls_version_name(s.tls_max_version)),
        method: enum_name(send_method_name(s.method)),
        api_base_url: s.api_base_url.clone(),
        insecure_allow_cleartext_tokens: s.insecure_allow_cleartext_tokens,
    });
    let fetch = d.fetch.as_ref().map(|f| FetchSpec {
        protocol: enum_name(fetch_protocol_name(f.protocol)),
        server: f.server.clone(),
        port: f.port,
        security: enum_name(tls_mode_name(f.security)),
        interval_seconds: f.interval_seconds,
        skip_certificate_verification: f.skip_certificate_verification,
        extra_ca_pem: f.extra_ca_pem.clone(),
        tls_min_version: enum_name(tls_version_name(f.tls_min_version)),
        tls_max_version: enum_name(tls_version_name(f.tls_max_version)),
        folder: f.folder.clone(),
        insecure_allow_cleartext_tokens: f.insecure_allow_cleartext_tokens,
    });
    let ingress = d.ingress.as_ref().map(|i| IngressSpec {
        username: i.username.clone(),
        password: stored(i.password_set),
        allowed_sources: i.allowed_sources.clone(),
        user_addresses: i.user_addresses.clone(),
    });
    Document {
        index: 0,
        name: Name {
            tenant: d.tenant.clone(),
            name: d.name.clone(),
        },
        spec: Spec::Device(DeviceSpec {
            display_name: d.display_name.clone(),
            agent: d.agent.clone(),
            sender_mode: enum_name(sender_mode_name(d.sender_mode)),
            admin_mailbox: d.admin_mailbox.clone(),
            bulk_mailbox: d.bulk_mailbox.clone(),
            allowed_mailboxes: d.allowed_mailboxes.clone(),
            user_provider: d.user_provider.clone(),
            smtp: smtp.filter(|s| *s != SmtpSpec::default()),
            fetch: fetch.filter(|f| *f != FetchSpec::default()),
            ingress: ingress.filter(|i| *i != IngressSpec::default()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
kind: tenant
name: acme
spec: {display_name: Acme Corp}
---
kind: mailbox
tenant: acme
name: scan
spec:
  address: scan@acme.example
  provider: m365
  grant_type: delegated_device_code
  kind: bulk
  purposes: [send, pop]
---
kind: device
tenant: acme
name: mfp-1
spec:
  sender_mode: bulk
  bulk_mailbox: scan
  smtp: {server: smtp.office365.com, port: 587, security: starttls, tls_min_version: "1.2"}
  ingress: {username: mfp1, password: {stored: true}}
"#;

    #[test]
    fn documents_parse_and_round_trip_through_the_wire() {
        let docs = parse(FILE).unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[2].place(), "document 3 (device acme/mfp-1)");
        let Wire::Device(d) = to_wire(&docs[2], &mut |_, _| Ok(String::new())).unwrap() else {
            panic!("a device");
        };
        assert_eq!(
            d.smtp.as_ref().map(|s| s.tls_min_version),
            Some(pb::TlsVersion::TlsVersion12 as i32)
        );
        let mut stored = d.clone();
        if let Some(i) = stored.ingress.as_mut() {
            i.password_set = true;
        }
        let back = device_document(&stored);
        assert_eq!(back.fields(), docs[2].fields());
        let yaml = to_yaml(&docs).unwrap();
        let again = parse(&yaml).unwrap();
        assert_eq!(
            again.iter().map(Document::fields).collect::<Vec<_>>(),
            docs.iter().map(Document::fields).collect::<Vec<_>>()
        );
    }

    #[test]
    fn bad_documents_name_index_and_field() {
        let bad = FILE.replace("port: 587", "port: many");
        let err = parse(&bad).unwrap_err().to_string();
        assert!(
            err.starts_with("document 3 (device mfp-1): spec.smtp.port"),
            "{err}"
        );
        let bad = FILE.replace("kind: bulk", "kind: bulky");
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("document 2"), "{err}");
        assert!(
            err.contains("`bulky` is not one of admin, bulk, user"),
            "{err}"
        );
        let bad = FILE.replace("address:", "adress:");
        let err = parse(&bad).unwrap_err().to_string();
        assert!(
            err.contains("document 2") && err.contains("adress"),
            "{err}"
        );
        let bad = format!("{FILE}---\nkind: tenant\nname: acme\n");
        assert!(
            parse(&bad)
                .unwrap_err()
                .to_string()
                .contains("already document 1")
        );
        let bad = "kind: printer\nname: x\n";
        assert!(
            parse(bad)
                .unwrap_err()
                .to_string()
                .contains("kind: `printer`")
        );
    }

    #[test]
    fn changed_fields_ignore_defaults() {
        let a = serde_json::json!({"address": "a@b.c", "disabled": false});
        let b = serde_json::json!({"address": "a@b.c"});
        assert!(changed_fields(&prune(a), &prune(b.clone())).is_empty());
        let c = serde_json::json!({"address": "x@b.c", "purposes": ["send"]});
        assert_eq!(changed_fields(&c, &b), vec!["address", "purposes"]);
    }
}
