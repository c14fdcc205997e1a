//! The Admin API end to end: a real tonic server on 127.0.0.1:0 over the embedded store in a
//! temporary directory, driven through the generated `AdminClient`.

// Test helpers panic on setup failures: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine as _;
use prost_types::FieldMask;
use tempfile::TempDir;
use tokenfleet_broker::admin::admin_server;
use tokenfleet_broker::records::{self, Records};
use tokenfleet_broker::state::BrokerState;
use tokenfleet_broker::{api_keys, audit};
use tokenfleet_domain::{Role, SystemClock};
use tokenfleet_proto::v1 as pb;
use tokenfleet_seal::{Keyring, SealError};
use tokenfleet_store::embedded::EmbeddedStore;
use tokenfleet_store::{Precondition, RecordKey, Scope, Store};
use tonic::service::Routes;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::support::{Admin as Client, admin_client, serve_plaintext};

const SECRET: &str = "client-secret-8f3k2-do-not-leak";
const SA_PRIVATE_KEY: &str =
    "-----BEGIN PRIVATE KEY-----\nMIIsa-private-key-material-xyz\n-----END PRIVATE KEY-----\n";
const INGRESS_PASSWORD: &str = "printer-pass-q9w8e7";
/// The client secret a rotation test replaces [`SECRET`] with.
const ROTATED_SECRET: &str = "rotated-secret-value-77";

fn key_b64(byte: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

fn keyring(current: &str, ids: &[&str]) -> Keyring {
    let keys: Vec<(String, String)> = ids
        .iter()
        .map(|id| ((*id).to_owned(), key_b64(id.as_bytes()[1])))
        .collect();
    Keyring::from_base64(current, keys.iter().map(|(a, b)| (a.as_str(), b.as_str()))).unwrap()
}

/// A broker serving only the Admin API; stopped on drop.
struct Broker {
    state: BrokerState,
    addr: SocketAddr,
    channel: Channel,
    admin_key: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.server.abort();
    }
}

impl Broker {
    async fn start() -> Self {
        tokenfleet_testkit::logs::capture();
        for secret in [SECRET, SA_PRIVATE_KEY, INGRESS_PASSWORD, ROTATED_SECRET] {
            tokenfleet_testkit::logs::secret(secret);
        }
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path().join("store.redb"))
            .await
            .unwrap();
        let state = BrokerState {
            store: Arc::new(store),
            keyring: Arc::new(keyring("k1", &["k1"])),
            clock: Arc::new(SystemClock),
        };
        let (addr, tx, server) = serve_plaintext(Routes::new(admin_server(state.clone()))).await;
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let (_, key) = api_keys::create(&state, Role::FleetAdmin, None, "test bootstrap")
            .await
            .unwrap();
        tokenfleet_testkit::logs::secret(key.expose());
        Self {
            state,
            addr,
            channel,
            admin_key: key.expose().to_owned(),
            shutdown: Some(tx),
            server,
            _dir: dir,
        }
    }

    fn client(&self, key: Option<&str>) -> Client {
        admin_client(self.channel.clone(), key)
    }

    fn admin(&self) -> Client {
        self.client(Some(&self.admin_key))
    }

    async fn key(&self, role: Role, tenant: Option<&str>) -> (String, String) {
        let (record, key) = api_keys::create(&self.state, role, tenant, "test")
            .await
            .unwrap();
        tokenfleet_testkit::logs::secret(key.expose());
        (record.id, key.expose().to_owned())
    }
}

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    })
}

fn err<T: std::fmt::Debug>(result: Result<tonic::Response<T>, Status>) -> Status {
    match result {
        Ok(r) => panic!("expected an error, got {:?}", r.into_inner()),
        Err(s) => s,
    }
}

#[track_caller]
fn assert_status(status: &Status, code: Code, needle: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "`{needle}` not in `{}`",
        status.message()
    );
}

fn tenant(name: &str) -> pb::Tenant {
    pb::Tenant {
        name: name.into(),
        display_name: format!("Tenant {name}"),
        ..Default::default()
    }
}

fn microsoft(tenant: &str, name: &str) -> pb::Provider {
    pb::Provider {
        tenant: tenant.into(),
        name: name.into(),
        kind: pb::ProviderKind::Microsoft as i32,
        client_id: "11111111-2222-3333-4444-555555555555".into(),
        client_secret: SECRET.into(),
        ..Default::default()
    }
}

fn google(tenant: &str, name: &str) -> pb::Provider {
    pb::Provider {
        tenant: tenant.into(),
        name: name.into(),
        kind: pb::ProviderKind::Google as i32,
        client_id: "1234.apps.googleusercontent.com".into(),
        service_account_key: serde_json::json!({
            "type": "service_account",
            "client_email": "relay@proj.iam.gserviceaccount.com",
            "private_key": SA_PRIVATE_KEY,
        })
        .to_string(),
        ..Default::default()
    }
}

fn mailbox(tenant: &str, name: &str, provider: &str) -> pb::Mailbox {
    pb::Mailbox {
        tenant: tenant.into(),
        name: name.into(),
        address: format!("{name}@{tenant}.example"),
        provider: provider.into(),
        grant_type: pb::GrantType::DelegatedDeviceCode as i32,
        kind: pb::MailboxKind::Admin as i32,
        purposes: vec![pb::MailPurpose::Send as i32],
        ..Default::default()
    }
}

fn device(tenant: &str, name: &str, admin_mailbox: &str, agent: &str) -> pb::Device {
    pb::Device {
        tenant: tenant.into(),
        name: name.into(),
        display_name: "MFP 2nd floor".into(),
        agent: agent.into(),
        sender_mode: pb::SenderMode::FixedAdmin as i32,
        admin_mailbox: admin_mailbox.into(),
        smtp: Some(pb::SmtpProfile {
            server: "smtp.office365.com".into(),
            port: 587,
            security: pb::TlsMode::Starttls as i32,
            ..Default::default()
        }),
        ingress: Some(pb::IngressCredentials {
            username: "scanner".into(),
            password: INGRESS_PASSWORD.into(),
            allowed_sources: vec!["192.168.1.0/24".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn agent(tenant: &str, name: &str) -> pb::Agent {
    pb::Agent {
        tenant: tenant.into(),
        name: name.into(),
        display_name: "Site A".into(),
        ..Default::default()
    }
}

/// Creates tenant `t` with provider `p`, mailbox `m`, agent `a` and device `d`.
async fn populate(c: &mut Client, t: &str) {
    c.create_tenant(pb::CreateTenantRequest {
        tenant: Some(tenant(t)),
    })
    .await
    .unwrap();
    c.create_provider(pb::CreateProviderRequest {
        provider: Some(microsoft(t, "p")),
    })
    .await
    .unwrap();
    c.create_mailbox(pb::CreateMailboxRequest {
        mailbox: Some(mailbox(t, "m", "p")),
    })
    .await
    .unwrap();
    c.create_agent(pb::CreateAgentRequest {
        agent: Some(agent(t, "a")),
    })
    .await
    .unwrap();
    c.create_device(pb::CreateDeviceRequest {
        device: Some(device(t, "d", "m", "a")),
    })
    .await
    .unwrap();
}

/// Every record and audit entry in the store, as raw bytes, read through the `Store` trait.
async fn all_store_bytes(store: &dyn Store) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut scopes = vec![Scope::Global];
    for (id, _) in store
        .list(&Scope::Global, records::TENANTS, None, 10_000)
        .await
        .unwrap()
    {
        scopes.push(Scope::Tenant(id));
    }
    let collections = [
        records::TENANTS,
        records::API_KEYS,
        records::PROVIDERS,
        records::MAILBOXES,
        records::DEVICES,
        records::AGENTS,
    ];
    for scope in &scopes {
        for collection in collections {
            for (id, record) in store.list(scope, collection, None, 10_000).await.unwrap() {
                out.push((format!("{scope}/{collection}/{id}"), record.data));
            }
        }
        for kind in audit::AuditKind::ALL {
            for entry in store
                .read_back(scope, kind.stream(), None, 10_000)
                .await
                .unwrap()
            {
                out.push((
                    format!("{scope}/{}/{}", kind.stream(), entry.id),
                    entry.data,
                ));
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn tenant_crud_paging_and_versions() {
    let broker = Broker::start().await;
    let mut c = broker.admin();
    for i in 0..5 {
        let t = c
            .create_tenant(pb::CreateTenantRequest {
                tenant: Some(tenant(&format!("t{i}"))),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(t.version, 1);
        assert!(t.create_time.is_some());
    }
    let dup = err(c
        .create_tenant(pb::CreateTenantRequest {
            tenant: Some(tenant("t0")),
        })
        .await);
    assert_status(&dup, Code::AlreadyExists, "tenant `t0`");

    // Paging: 5 tenants in pages of 2.
    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_tenants(pb::ListTenantsRequest {
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.tenants.len() <= 2);
        names.extend(page.tenants.into_iter().map(|t| t.name));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(names, ["t0", "t1", "t2", "t3", "t4"]);
    assert_eq!(pages, 3);
    let bad = err(c
        .list_tenants(pb::ListTenantsRequest {
            page_size: 0,
            page_token: "%%%".into(),
        })
        .await);
    assert_status(&bad, Code::InvalidArgument, "page_token");
    let bad = err(c
        .list_tenants(pb::ListTenantsRequest {
            page_size: 1001,
            page_token: String::new(),
        })
        .await);
    assert_status(&bad, Code::InvalidArgument, "page_size");

    // Update with a mask, then with a stale version.
    let mut t = c
        .get_tenant(pb::GetTenantRequest { name: "t1".into() })
        .await
        .unwrap()
        .into_inner();
    t.display_name = "Renamed".into();
    let updated = c
        .update_tenant(pb::UpdateTenantRequest {
            tenant: Some(t.clone()),
            update_mask: mask(&["display_name"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.display_name, "Renamed");
    assert_eq!(updated.version, 2);
    assert_eq!(updated.create_time, t.create_time);
    let stale = err(c
        .update_tenant(pb::UpdateTenantRequest {
            tenant: Some(t.clone()),
            update_mask: None,
        })
        .await);
    assert_status(&stale, Code::Aborted, "changed concurrently");
    let immutable = err(c
        .update_tenant(pb::UpdateTenantRequest {
            tenant: Some(updated.clone()),
            update_mask: mask(&["name"]),
        })
        .await);
    assert_status(
        &immutable,
        Code::InvalidArgument,
        "update_mask: `name` is immutable",
    );
    // Without a version the update is unconditional (read-modify-write).
    let mut unversioned = updated.clone();
    unversioned.version = 0;
    unversioned.display_name = "Again".into();
    let again = c
        .update_tenant(pb::UpdateTenantRequest {
            tenant: Some(unversioned),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.display_name.as_str(), again.version), ("Again", 3));

    // Delete: stale version refused, then deleted.
    let stale = err(c
        .delete_tenant(pb::DeleteTenantRequest {
            name: "t1".into(),
            version: 2,
        })
        .await);
    assert_status(&stale, Code::Aborted, "changed concurrently");
    c.delete_tenant(pb::DeleteTenantRequest {
        name: "t1".into(),
        version: 3,
    })
    .await
    .unwrap();
    let gone = err(c
        .get_tenant(pb::GetTenantRequest { name: "t1".into() })
        .await);
    assert_status(&gone, Code::NotFound, "tenant `t1`");
    let gone = err(c
        .delete_tenant(pb::DeleteTenantRequest {
            name: "t1".into(),
            version: 0,
        })
        .await);
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test]
async fn resources_crud_references_and_paging() {
    let broker = Broker::start().await;
    let mut c = broker.admin();
    populate(&mut c, "acme").await;

    // Provider: get, update, list pages.
    let p = c
        .get_provider(pb::GetProviderRequest {
            tenant: "acme".into(),
            name: "p".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.authority, "organizations");
    assert!(p.client_secret_set);
    let mut change = p.clone();
    change.authority = "contoso.onmicrosoft.com".into();
    change.client_secret.clear();
    let p2 = c
        .update_provider(pb::UpdateProviderRequest {
            provider: Some(change),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.authority, "contoso.onmicrosoft.com");
    assert!(
        p2.client_secret_set,
        "an empty secret with an empty mask keeps the stored one"
    );
    let mut kind = p2.clone();
    kind.kind = pb::ProviderKind::Google as i32;
    let e = err(c
        .update_provider(pb::UpdateProviderRequest {
            provider: Some(kind),
            update_mask: None,
        })
        .await);
    assert_status(&e, Code::InvalidArgument, "provider.kind");
    for i in 0..4 {
        let mut extra = microsoft("acme", &format!("x{i}"));
        extra.client_secret.clear();
        c.create_provider(pb::CreateProviderRequest {
            provider: Some(extra),
        })
        .await
        .unwrap();
    }
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_providers(pb::ListProvidersRequest {
                tenant: "acme".into(),
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        names.extend(page.providers.into_iter().map(|p| p.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(names, ["p", "x0", "x1", "x2", "x3"]);

    // Mailbox: update purposes with a mask; the token state is reported.
    let m = c
        .get_mailbox(pb::GetMailboxRequest {
            tenant: "acme".into(),
            name: "m".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        m.token.as_ref().unwrap().status,
        pb::TokenStatus::NotRetrieved as i32
    );
    let mut change = m.clone();
    change.purposes = vec![pb::MailPurpose::Send as i32, pb::MailPurpose::Imap as i32];
    change.disabled = true;
    let m2 = c
        .update_mailbox(pb::UpdateMailboxRequest {
            mailbox: Some(change),
            update_mask: mask(&["purposes"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m2.purposes.len(), 2);
    assert!(!m2.disabled, "fields outside the mask are unchanged");
    let list = c
        .list_mailboxes(pb::ListMailboxesRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.mailboxs.len(), 1);

    // Device: password only as a flag; update the SMTP profile.
    let d = c
        .get_device(pb::GetDeviceRequest {
            tenant: "acme".into(),
            name: "d".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let ingress = d.ingress.clone().unwrap();
    assert!(ingress.password_set);
    assert!(ingress.password.is_empty());
    let mut change = d.clone();
    change.smtp.as_mut().unwrap().port = 465;
    change.smtp.as_mut().unwrap().security = pb::TlsMode::ImplicitTls as i32;
    let d2 = c
        .update_device(pb::UpdateDeviceRequest {
            device: Some(change),
            update_mask: mask(&["smtp"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d2.smtp.as_ref().unwrap().port, 465);
    assert!(
        d2.ingress.as_ref().unwrap().password_set,
        "the password survives other updates"
    );
    // Clearing just the password.
    let cleared = c
        .update_device(pb::UpdateDeviceRequest {
            device: Some(pb::Device {
                tenant: "acme".into(),
                name: "d".into(),
                ..Default::default()
            }),
            update_mask: mask(&["ingress.password"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!cleared.ingress.as_ref().unwrap().password_set);
    assert_eq!(cleared.ingress.as_ref().unwrap().username, "scanner");
    // A reference to a missing mailbox is refused, naming the field.
    let mut change = cleared.clone();
    change.allowed_mailboxes = vec!["m".into(), "nope".into()];
    let e = err(c
        .update_device(pb::UpdateDeviceRequest {
            device: Some(change),
            update_mask: mask(&["allowed_mailboxes"]),
        })
        .await);
    assert_status(
        &e,
        Code::FailedPrecondition,
        "device.allowed_mailboxes[1]: no mailbox `nope`",
    );
    let list = c
        .list_devices(pb::ListDevicesRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.devices.len(), 1);

    // Agent: update display name, output-only fields untouched.
    let a = c
        .get_agent(pb::GetAgentRequest {
            tenant: "acme".into(),
            name: "a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut change = a.clone();
    change.display_name = "Site A (basement)".into();
    change.revoked = true;
    let a2 = c
        .update_agent(pb::UpdateAgentRequest {
            agent: Some(change),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a2.display_name, "Site A (basement)");
    assert!(!a2.revoked, "output-only input is ignored");
    let e = err(c
        .update_agent(pb::UpdateAgentRequest {
            agent: Some(a2.clone()),
            update_mask: mask(&["revoked"]),
        })
        .await);
    assert_status(&e, Code::InvalidArgument, "output only");
    assert_eq!(
        c.list_agents(pb::ListAgentsRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .agents
        .len(),
        1
    );

    // Referenced objects cannot be deleted.
    let e = err(c
        .delete_tenant(pb::DeleteTenantRequest {
            name: "acme".into(),
            version: 0,
        })
        .await);
    assert_status(
        &e,
        Code::FailedPrecondition,
        "still holds 5 providers, 1 mailbox, 1 device, 1 agent",
    );
    let e = err(c
        .delete_provider(pb::DeleteProviderRequest {
            tenant: "acme".into(),
            name: "p".into(),
            version: 0,
        })
        .await);
    assert_status(&e, Code::FailedPrecondition, "used by mailboxes `m`");
    let e = err(c
        .delete_mailbox(pb::DeleteMailboxRequest {
            tenant: "acme".into(),
            name: "m".into(),
            version: 0,
        })
        .await);
    assert_status(&e, Code::FailedPrecondition, "used by devices `d`");
    let e = err(c
        .delete_agent(pb::DeleteAgentRequest {
            tenant: "acme".into(),
            name: "a".into(),
            version: 0,
        })
        .await);
    assert_status(&e, Code::FailedPrecondition, "hosts devices `d`");

    // In dependency order everything goes.
    let e = err(c
        .delete_device(pb::DeleteDeviceRequest {
            tenant: "acme".into(),
            name: "d".into(),
            version: 1,
        })
        .await);
    assert_status(&e, Code::Aborted, "changed concurrently");
    c.delete_device(pb::DeleteDeviceRequest {
        tenant: "acme".into(),
        name: "d".into(),
        version: 0,
    })
    .await
    .unwrap();
    c.delete_agent(pb::DeleteAgentRequest {
        tenant: "acme".into(),
        name: "a".into(),
        version: 0,
    })
    .await
    .unwrap();
    c.delete_mailbox(pb::DeleteMailboxRequest {
        tenant: "acme".into(),
        name: "m".into(),
        version: 0,
    })
    .await
    .unwrap();
    for name in ["p", "x0", "x1", "x2", "x3"] {
        c.delete_provider(pb::DeleteProviderRequest {
            tenant: "acme".into(),
            name: name.into(),
            version: 0,
        })
        .await
        .unwrap();
    }
    c.delete_tenant(pb::DeleteTenantRequest {
        name: "acme".into(),
        version: 0,
    })
    .await
    .unwrap();
    let e = err(c
        .get_device(pb::GetDeviceRequest {
            tenant: "acme".into(),
            name: "d".into(),
        })
        .await);
    assert_status(&e, Code::NotFound, "device `d` in tenant `acme`");
}

#[tokio::test]
async fn validation_errors_name_the_field_and_write_nothing() {
    let broker = Broker::start().await;
    let mut c = broker.admin();
    c.create_tenant(pb::CreateTenantRequest {
        tenant: Some(tenant("acme")),
    })
    .await
    .unwrap();
    c.create_provider(pb::CreateProviderRequest {
        provider: Some(microsoft("acme", "ms")),
    })
    .await
    .unwrap();
    let mut no_secret = google("acme", "gmail");
    no_secret.service_account_key.clear();
    c.create_provider(pb::CreateProviderRequest {
        provider: Some(no_secret),
    })
    .await
    .unwrap();

    let mut t = tenant("");
    let e = err(c
        .create_tenant(pb::CreateTenantRequest {
            tenant: Some(t.clone()),
        })
        .await);
    assert_status(&e, Code::InvalidArgument, "tenant.name: must not be empty");
    t.name = "big".into();
    t.display_name = "x".repeat(201);
    let e = err(c
        .create_tenant(pb::CreateTenantRequest { tenant: Some(t) })
        .await);
    assert_status(
        &e,
        Code::InvalidArgument,
        "tenant.display_name: must be at most 200 characters",
    );

    let mut p = microsoft("acme", "p2");
    p.client_id.clear();
    let e = err(c
        .create_provider(pb::CreateProviderRequest { provider: Some(p) })
        .await);
    assert_status(
        &e,
        Code::InvalidArgument,
        "provider.client_id: must not be empty",
    );
    let mut p = microsoft("acme", "p2");
    p.kind = 0;
    let e = err(c
        .create_provider(pb::CreateProviderRequest { provider: Some(p) })
        .await);
    assert_status(&e, Code::InvalidArgument, "provider.kind: must be set");
    let mut p = microsoft("nowhere", "p2");
    p.client_secret.clear();
    let e = err(c
        .create_provider(pb::CreateProviderRequest { provider: Some(p) })
        .await);
    assert_status(&e, Code::NotFound, "tenant `nowhere`");

    let mut m = mailbox("acme", "scan", "ms");
    m.address = "scan at acme".into();
    let e = err(c
        .create_mailbox(pb::CreateMailboxRequest { mailbox: Some(m) })
        .await);
    assert_status(&e, Code::InvalidArgument, "mailbox.address:");
    let mut m = mailbox("acme", "scan", "ms");
    m.grant_type = 42;
    let e = err(c
        .create_mailbox(pb::CreateMailboxRequest { mailbox: Some(m) })
        .await);
    assert_status(
        &e,
        Code::InvalidArgument,
        "mailbox.grant_type: unknown value 42",
    );
    let m = mailbox("acme", "scan", "missing");
    let e = err(c
        .create_mailbox(pb::CreateMailboxRequest { mailbox: Some(m) })
        .await);
    assert_status(
        &e,
        Code::FailedPrecondition,
        "mailbox.provider: no provider `missing`",
    );
    let m = mailbox("acme", "scan", "gmail");
    let e = err(c
        .create_mailbox(pb::CreateMailboxRequest { mailbox: Some(m) })
        .await);
    assert_status(
        &e,
        Code::InvalidArgument,
        "Google does not allow the device authorization flow",
    );
    let mut m = mailbox("acme", "scan", "gmail");
    m.grant_type = pb::GrantType::ServiceAccount as i32;
    let e = err(c
        .create_mailbox(pb::CreateMailboxRequest { mailbox: Some(m) })
        .await);
    assert_status(&e, Code::FailedPrecondition, "needs a service-account key");
    let mut m = mailbox("acme", "scan", "ms");
    m.grant_type = pb::GrantType::ServiceAccount as i32;
    let e = err(c
        .create_mailbox(pb::CreateMailboxRequest { mailbox: Some(m) })
        .await);
    assert_status(
        &e,
        Code::InvalidArgument,
        "mailbox.grant_type: service_account",
    );

    let mut d = device("acme", "mfp", "", "");
    let e = err(c
        .create_device(pb::CreateDeviceRequest {
            device: Some(d.clone()),
        })
        .await);
    assert_status(
        &e,
        Code::InvalidArgument,
        "device.admin_mailbox: must be set when sender_mode is fixed_admin",
    );
    d.sender_mode = pb::SenderMode::Bulk as i32;
    let e = err(c
        .create_device(pb::CreateDeviceRequest {
            device: Some(d.clone()),
        })
        .await);
    assert_status(&e, Code::InvalidArgument, "device.bulk_mailbox");
    let mut d = device("acme", "mfp", "nope", "");
    d.smtp.as_mut().unwrap().port = 70_000;
    let e = err(c
        .create_device(pb::CreateDeviceRequest {
            device: Some(d.clone()),
        })
        .await);
    assert_status(&e, Code::InvalidArgument, "device.smtp.port");
    d.smtp.as_mut().unwrap().port = 587;
    let e = err(c
        .create_device(pb::CreateDeviceRequest {
            device: Some(d.clone()),
        })
        .await);
    assert_status(
        &e,
        Code::FailedPrecondition,
        "device.admin_mailbox: no mailbox `nope`",
    );
    d.admin_mailbox.clear();
    d.sender_mode = pb::SenderMode::LoginUser as i32;
    d.agent = "ghost".into();
    let e = err(c
        .create_device(pb::CreateDeviceRequest { device: Some(d) })
        .await);
    assert_status(
        &e,
        Code::FailedPrecondition,
        "device.agent: no agent `ghost`",
    );
    let e = err(c
        .create_agent(pb::CreateAgentRequest {
            agent: Some(agent("acme", "Bad_Name")),
        })
        .await);
    assert_status(&e, Code::InvalidArgument, "agent.name");

    // Nothing of the refused creations was written.
    let acme = || "acme".to_owned();
    let mailboxes = c.list_mailboxes(pb::ListMailboxesRequest {
        tenant: acme(),
        ..Default::default()
    });
    assert!(mailboxes.await.unwrap().into_inner().mailboxs.is_empty());
    let devices = c.list_devices(pb::ListDevicesRequest {
        tenant: acme(),
        ..Default::default()
    });
    assert!(devices.await.unwrap().into_inner().devices.is_empty());
    let agents = c.list_agents(pb::ListAgentsRequest {
        tenant: acme(),
        ..Default::default()
    });
    assert!(agents.await.unwrap().into_inner().agents.is_empty());
    let tenants = c
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tenants;
    assert_eq!(tenants.len(), 1);
}

#[tokio::test]
async fn viewer_cannot_change_anything() {
    let broker = Broker::start().await;
    let mut admin = broker.admin();
    populate(&mut admin, "acme").await;
    let (_, key) = broker.key(Role::Viewer, None).await;
    let mut v = broker.client(Some(&key));

    // Reads work, fleet-wide.
    assert_eq!(
        v.list_tenants(pb::ListTenantsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tenants
            .len(),
        1
    );
    v.get_provider(pb::GetProviderRequest {
        tenant: "acme".into(),
        name: "p".into(),
    })
    .await
    .unwrap();
    v.list_audit_events(pb::ListAuditEventsRequest {
        tenant: "acme".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let me = v.who_am_i(pb::WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!((me.role.as_str(), me.tenant.as_str()), ("viewer", ""));

    let t = "acme".to_owned();
    let n = |s: &str| s.to_owned();
    let denied: Vec<Status> = vec![
        err(v
            .create_tenant(pb::CreateTenantRequest {
                tenant: Some(tenant("new")),
            })
            .await),
        err(v
            .update_tenant(pb::UpdateTenantRequest {
                tenant: Some(tenant("acme")),
                update_mask: None,
            })
            .await),
        err(v
            .delete_tenant(pb::DeleteTenantRequest {
                name: t.clone(),
                version: 0,
            })
            .await),
        err(v
            .create_provider(pb::CreateProviderRequest {
                provider: Some(microsoft(&t, "q")),
            })
            .await),
        err(v
            .update_provider(pb::UpdateProviderRequest {
                provider: Some(microsoft(&t, "p")),
                update_mask: None,
            })
            .await),
        err(v
            .delete_provider(pb::DeleteProviderRequest {
                tenant: t.clone(),
                name: n("p"),
                version: 0,
            })
            .await),
        err(v
            .create_mailbox(pb::CreateMailboxRequest {
                mailbox: Some(mailbox(&t, "q", "p")),
            })
            .await),
        err(v
            .update_mailbox(pb::UpdateMailboxRequest {
                mailbox: Some(mailbox(&t, "m", "p")),
                update_mask: None,
            })
            .await),
        err(v
            .delete_mailbox(pb::DeleteMailboxRequest {
                tenant: t.clone(),
                name: n("m"),
                version: 0,
            })
            .await),
        err(v
            .create_device(pb::CreateDeviceRequest {
                device: Some(device(&t, "q", "m", "a")),
            })
            .await),
        err(v
            .update_device(pb::UpdateDeviceRequest {
                device: Some(device(&t, "d", "m", "a")),
                update_mask: None,
            })
            .await),
        err(v
            .delete_device(pb::DeleteDeviceRequest {
                tenant: t.clone(),
                name: n("d"),
                version: 0,
            })
            .await),
        err(v
            .create_agent(pb::CreateAgentRequest {
                agent: Some(agent(&t, "q")),
            })
            .await),
        err(v
            .update_agent(pb::UpdateAgentRequest {
                agent: Some(agent(&t, "a")),
                update_mask: None,
            })
            .await),
        err(v
            .delete_agent(pb::DeleteAgentRequest {
                tenant: t.clone(),
                name: n("a"),
                version: 0,
            })
            .await),
    ];
    assert_eq!(denied.len(), 15);
    for status in &denied {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    assert!(
        denied[3].message().contains("read-only"),
        "{}",
        denied[3].message()
    );

    // Everything is as it was: versions unchanged, nothing new.
    let p = admin
        .get_provider(pb::GetProviderRequest {
            tenant: t.clone(),
            name: n("p"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.version, 1);
    let d = admin
        .get_device(pb::GetDeviceRequest {
            tenant: t.clone(),
            name: n("d"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.version, 1);
    let e = err(admin
        .get_agent(pb::GetAgentRequest {
            tenant: t.clone(),
            name: n("q"),
        })
        .await);
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(
        admin
            .list_tenants(pb::ListTenantsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tenants
            .len(),
        1
    );

    // A viewer bound to a tenant reads only that tenant.
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: Some(tenant("other")),
        })
        .await
        .unwrap();
    let (_, key) = broker.key(Role::Viewer, Some("acme")).await;
    let mut bound = broker.client(Some(&key));
    let listed = bound
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tenants;
    assert_eq!(
        listed.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["acme"]
    );
    let e = err(bound
        .get_tenant(pb::GetTenantRequest { name: n("other") })
        .await);
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn tenant_admin_cannot_see_or_change_another_tenant() {
    let broker = Broker::start().await;
    let mut admin = broker.admin();
    populate(&mut admin, "alpha").await;
    populate(&mut admin, "bravo").await;
    let (id, key) = broker.key(Role::TenantAdmin, Some("alpha")).await;
    let mut ta = broker.client(Some(&key));
    let me = ta
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (me.key_id.as_str(), me.role.as_str(), me.tenant.as_str()),
        (id.as_str(), "tenant-admin", "alpha")
    );

    // Own tenant: full access to its objects, read of its tenant record.
    ta.get_tenant(pb::GetTenantRequest {
        name: "alpha".into(),
    })
    .await
    .unwrap();
    ta.create_agent(pb::CreateAgentRequest {
        agent: Some(agent("alpha", "b2")),
    })
    .await
    .unwrap();
    let mut m = ta
        .get_mailbox(pb::GetMailboxRequest {
            tenant: "alpha".into(),
            name: "m".into(),
        })
        .await
        .unwrap()
        .into_inner();
    m.disabled = true;
    let m = ta
        .update_mailbox(pb::UpdateMailboxRequest {
            mailbox: Some(m),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.token.unwrap().status, pb::TokenStatus::Disabled as i32);
    let listed = ta
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tenants;
    assert_eq!(
        listed.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["alpha"]
    );

    // Tenant records are fleet-admin business.
    for e in [
        err(ta
            .create_tenant(pb::CreateTenantRequest {
                tenant: Some(tenant("charlie")),
            })
            .await),
        err(ta
            .update_tenant(pb::UpdateTenantRequest {
                tenant: Some(tenant("alpha")),
                update_mask: None,
            })
            .await),
        err(ta
            .delete_tenant(pb::DeleteTenantRequest {
                name: "bravo".into(),
                version: 0,
            })
            .await),
    ] {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }

    // Bravo: denied for every read and change, existing object or not, with nothing about bravo.
    let b = "bravo".to_owned();
    let n = |s: &str| s.to_owned();
    let denied = vec![
        err(ta
            .get_tenant(pb::GetTenantRequest { name: b.clone() })
            .await),
        err(ta
            .get_provider(pb::GetProviderRequest {
                tenant: b.clone(),
                name: n("p"),
            })
            .await),
        err(ta
            .get_provider(pb::GetProviderRequest {
                tenant: b.clone(),
                name: n("no-such"),
            })
            .await),
        err(ta
            .list_providers(pb::ListProvidersRequest {
                tenant: b.clone(),
                ..Default::default()
            })
            .await),
        err(ta
            .list_mailboxes(pb::ListMailboxesRequest {
                tenant: b.clone(),
                ..Default::default()
            })
            .await),
        err(ta
            .list_devices(pb::ListDevicesRequest {
                tenant: b.clone(),
                ..Default::default()
            })
            .await),
        err(ta
            .list_agents(pb::ListAgentsRequest {
                tenant: b.clone(),
                ..Default::default()
            })
            .await),
        err(ta
            .get_mailbox(pb::GetMailboxRequest {
                tenant: b.clone(),
                name: n("m"),
            })
            .await),
        err(ta
            .get_device(pb::GetDeviceRequest {
                tenant: b.clone(),
                name: n("d"),
            })
            .await),
        err(ta
            .get_agent(pb::GetAgentRequest {
                tenant: b.clone(),
                name: n("a"),
            })
            .await),
        err(ta
            .list_audit_events(pb::ListAuditEventsRequest {
                tenant: b.clone(),
                ..Default::default()
            })
            .await),
        err(ta
            .list_audit_events(pb::ListAuditEventsRequest::default())
            .await),
        err(ta
            .create_provider(pb::CreateProviderRequest {
                provider: Some(microsoft(&b, "evil")),
            })
            .await),
        err(ta
            .update_provider(pb::UpdateProviderRequest {
                provider: Some(microsoft(&b, "p")),
                update_mask: None,
            })
            .await),
        err(ta
            .delete_provider(pb::DeleteProviderRequest {
                tenant: b.clone(),
                name: n("p"),
                version: 0,
            })
            .await),
        err(ta
            .create_mailbox(pb::CreateMailboxRequest {
                mailbox: Some(mailbox(&b, "evil", "p")),
            })
            .await),
        err(ta
            .update_mailbox(pb::UpdateMailboxRequest {
                mailbox: Some(mailbox(&b, "m", "p")),
                update_mask: None,
            })
            .await),
        err(ta
            .delete_mailbox(pb::DeleteMailboxRequest {
                tenant: b.clone(),
                name: n("m"),
                version: 0,
            })
            .await),
        err(ta
            .create_device(pb::CreateDeviceRequest {
                device: Some(device(&b, "evil", "m", "a")),
            })
            .await),
        err(ta
            .update_device(pb::UpdateDeviceRequest {
                device: Some(device(&b, "d", "m", "a")),
                update_mask: None,
            })
            .await),
        err(ta
            .delete_device(pb::DeleteDeviceRequest {
                tenant: b.clone(),
                name: n("d"),
                version: 0,
            })
            .await),
        err(ta
            .create_agent(pb::CreateAgentRequest {
                agent: Some(agent(&b, "evil")),
            })
            .await),
        err(ta
            .update_agent(pb::UpdateAgentRequest {
                agent: Some(agent(&b, "a")),
                update_mask: None,
            })
            .await),
        err(ta
            .delete_agent(pb::DeleteAgentRequest {
                tenant: b.clone(),
                name: n("a"),
                version: 0,
            })
            .await),
    ];
    for e in &denied {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(!e.message().contains("not found"), "{}", e.message());
    }
    // The same answer for an existing and a missing object: nothing is revealed.
    assert_eq!(denied[1].message(), denied[2].message());

    // Bravo is untouched: versions unchanged, no "evil" objects, device still there.
    let p = admin
        .get_provider(pb::GetProviderRequest {
            tenant: b.clone(),
            name: n("p"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.version, 1);
    let m = admin
        .get_mailbox(pb::GetMailboxRequest {
            tenant: b.clone(),
            name: n("m"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.version, 1);
    admin
        .get_device(pb::GetDeviceRequest {
            tenant: b.clone(),
            name: n("d"),
        })
        .await
        .unwrap();
    let e = err(admin
        .get_agent(pb::GetAgentRequest {
            tenant: b.clone(),
            name: n("evil"),
        })
        .await);
    assert_eq!(e.code(), Code::NotFound);

    // Bravo's audit log holds nothing written by alpha's admin; the refusals went to the global log.
    let bravo_log = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            tenant: b.clone(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(bravo_log.iter().all(|e| e.actor != format!("apikey:{id}")));
    let global = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(global.iter().any(|e| e.actor == format!("apikey:{id}")
        && e.action == "provider.create"
        && e.target == "tenants/bravo/providers/evil"
        && e.result == "permission_denied"));
}

#[tokio::test]
async fn unauthenticated_calls_are_rejected_without_echoing_the_key() {
    let broker = Broker::start().await;
    let (id, real) = broker.key(Role::FleetAdmin, None).await;
    let forged = format!("tfk_{id}_{}", "A".repeat(43));
    for key in [
        None,
        Some("garbage-key-value"),
        Some("tfk_abcdefghijkl_notarealsecret"),
        Some(forged.as_str()),
    ] {
        let mut c = broker.client(key);
        let e = err(c.who_am_i(pb::WhoAmIRequest {}).await);
        assert_eq!(e.code(), Code::Unauthenticated, "{key:?}: {e:?}");
        if let Some(k) = key {
            assert!(!e.message().contains(k), "{}", e.message());
        }
        let e = err(c
            .create_tenant(pb::CreateTenantRequest {
                tenant: Some(tenant("x")),
            })
            .await);
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let mut ok = broker.client(Some(&real));
    assert_eq!(
        ok.who_am_i(pb::WhoAmIRequest {})
            .await
            .unwrap()
            .into_inner()
            .key_id,
        id
    );
    // A raw request with a non-Bearer scheme.
    let mut raw = broker.client(None);
    let mut request = Request::new(pb::WhoAmIRequest {});
    request
        .metadata_mut()
        .insert("authorization", format!("Basic {real}").parse().unwrap());
    let e = err(raw.who_am_i(request).await);
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(!e.message().contains(&real));
    // Nothing was created by the rejected calls.
    let tenants = broker
        .admin()
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tenants;
    assert!(tenants.is_empty());
}

#[tokio::test]
async fn tenant_bound_key_dies_with_its_tenant() {
    let broker = Broker::start().await;
    let mut admin = broker.admin();
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: Some(tenant("gone")),
        })
        .await
        .unwrap();
    let (_, key) = broker.key(Role::TenantAdmin, Some("gone")).await;
    broker
        .client(Some(&key))
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap();
    admin
        .delete_tenant(pb::DeleteTenantRequest {
            name: "gone".into(),
            version: 0,
        })
        .await
        .unwrap();
    let e = err(broker
        .client(Some(&key))
        .who_am_i(pb::WhoAmIRequest {})
        .await);
    assert_eq!(e.code(), Code::Unauthenticated);
    // A new tenant of the same name does not revive the old key.
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: Some(tenant("gone")),
        })
        .await
        .unwrap();
    let e = err(broker
        .client(Some(&key))
        .who_am_i(pb::WhoAmIRequest {})
        .await);
    assert_eq!(e.code(), Code::Unauthenticated);
    // Keys need a sensible role/tenant combination and an existing tenant.
    assert!(
        api_keys::create(&broker.state, Role::TenantAdmin, None, "x")
            .await
            .is_err()
    );
    assert!(
        api_keys::create(&broker.state, Role::FleetAdmin, Some("gone"), "x")
            .await
            .is_err()
    );
    assert!(matches!(
        api_keys::create(&broker.state, Role::Viewer, Some("nope"), "x").await,
        Err(api_keys::ApiKeyError::TenantNotFound(_))
    ));
}

#[tokio::test]
async fn changes_are_audited_with_actor_and_outcome() {
    let broker = Broker::start().await;
    let mut admin = broker.admin();
    let admin_id = admin
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner()
        .key_id;
    let actor = format!("apikey:{admin_id}");
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: Some(tenant("acme")),
        })
        .await
        .unwrap();
    admin
        .create_provider(pb::CreateProviderRequest {
            provider: Some(microsoft("acme", "p")),
        })
        .await
        .unwrap();
    let mut p = microsoft("acme", "p");
    p.client_secret = ROTATED_SECRET.into();
    admin
        .update_provider(pb::UpdateProviderRequest {
            provider: Some(p),
            update_mask: mask(&["client_secret"]),
        })
        .await
        .unwrap();
    let mut bad = microsoft("acme", "p2");
    bad.client_id.clear();
    err(admin
        .create_provider(pb::CreateProviderRequest {
            provider: Some(bad),
        })
        .await);
    let (viewer_id, viewer_key) = broker.key(Role::Viewer, Some("acme")).await;
    err(broker
        .client(Some(&viewer_key))
        .delete_provider(pb::DeleteProviderRequest {
            tenant: "acme".into(),
            name: "p".into(),
            version: 0,
        })
        .await);
    admin
        .delete_provider(pb::DeleteProviderRequest {
            tenant: "acme".into(),
            name: "p".into(),
            version: 0,
        })
        .await
        .unwrap();

    let events = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let summary: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|e| (e.actor.as_str(), e.action.as_str(), e.result.as_str()))
        .collect();
    let viewer = format!("apikey:{viewer_id}");
    assert_eq!(
        summary,
        [
            (actor.as_str(), "provider.delete", "ok"),
            (viewer.as_str(), "provider.delete", "permission_denied"),
            (actor.as_str(), "provider.create", "invalid_argument"),
            (actor.as_str(), "provider.update", "ok"),
            (actor.as_str(), "provider.create", "ok"),
        ],
        "newest first"
    );
    assert!(
        events
            .iter()
            .all(|e| e.tenant == "acme" && e.time.is_some() && !e.id.is_empty())
    );
    assert_eq!(events[0].target, "tenants/acme/providers/p");
    assert!(
        events[2].detail.contains("provider.client_id"),
        "{}",
        events[2].detail
    );
    assert!(
        events[3].detail.contains("client_secret replaced"),
        "{}",
        events[3].detail
    );
    assert!(
        events
            .iter()
            .all(|e| !e.detail.contains("rotated-secret-value-77"))
    );

    // Paging through the audit log, newest first.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_audit_events(pb::ListAuditEventsRequest {
                tenant: "acme".into(),
                page_size: 2,
                page_token: token,
                kind: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.events.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        seen,
        events.iter().map(|e| e.id.clone()).collect::<Vec<_>>()
    );

    // Tenant and API key changes are in the global log.
    let global = admin
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        global
            .iter()
            .any(|e| e.action == "tenant.create" && e.target == "tenants/acme" && e.actor == actor)
    );
    assert!(
        global
            .iter()
            .any(|e| e.action == "apikey.create" && e.target == format!("apikeys/{viewer_id}"))
    );
}

#[tokio::test]
async fn secrets_are_never_returned_and_never_stored_in_plaintext() {
    let broker = Broker::start().await;
    let mut c = broker.admin();
    populate(&mut c, "acme").await;
    let created = c
        .create_provider(pb::CreateProviderRequest {
            provider: Some(google("acme", "gmail")),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.service_account_key.is_empty() && created.service_account_key_set);
    assert!(created.client_secret.is_empty() && !created.client_secret_set);

    let listed = c
        .list_providers(pb::ListProvidersRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .providers;
    for p in &listed {
        assert!(p.client_secret.is_empty() && p.service_account_key.is_empty());
    }
    let p = listed.iter().find(|p| p.name == "p").unwrap();
    assert!(p.client_secret_set);

    // The stored record holds sealed values that open to the secrets with the right keyring.
    let records = Records::new(broker.state.store.as_ref());
    let stored = records
        .get::<tokenfleet_domain::Provider>(&records::provider_key("acme", "p"))
        .await
        .unwrap()
        .unwrap()
        .value;
    let opened = records::open_client_secret(&broker.state.keyring, &stored)
        .unwrap()
        .unwrap();
    assert_eq!(opened.expose(), SECRET);
    let gmail = records
        .get::<tokenfleet_domain::Provider>(&records::provider_key("acme", "gmail"))
        .await
        .unwrap()
        .unwrap()
        .value;
    let sa = records::open_service_account_key(&broker.state.keyring, &gmail)
        .unwrap()
        .unwrap();
    assert!(sa.expose().contains("relay@proj.iam.gserviceaccount.com"));
    let device = records
        .get::<tokenfleet_domain::Device>(&records::device_key("acme", "d"))
        .await
        .unwrap()
        .unwrap()
        .value;
    assert!(
        device
            .ingress
            .password_hash
            .as_deref()
            .unwrap()
            .starts_with("$argon2id$")
    );

    // No plaintext anywhere in the store: records and audit entries, through the Store trait...
    let everything = all_store_bytes(broker.state.store.as_ref()).await;
    assert!(
        everything.len() > 8,
        "scan found {} entries",
        everything.len()
    );
    for (key, bytes) in &everything {
        for secret in [
            SECRET,
            "MIIsa-private-key-material",
            INGRESS_PASSWORD,
            broker.admin_key.as_str(),
        ] {
            assert!(!contains(bytes, secret), "plaintext secret in {key}");
        }
    }
    // ... and in the database file itself.
    let file = std::fs::read(broker._dir.path().join("store.redb")).unwrap();
    // Control: the file does hold plain record data, so the scan below can see a leak.
    assert!(contains(&file, "11111111-2222-3333-4444-555555555555"));
    for secret in [
        SECRET,
        "MIIsa-private-key-material",
        INGRESS_PASSWORD,
        broker.admin_key.as_str(),
    ] {
        assert!(
            !contains(&file, secret),
            "plaintext secret in the store file"
        );
    }

    // Clearing a secret needs the mask to name it.
    let cleared = c
        .update_provider(pb::UpdateProviderRequest {
            provider: Some(pb::Provider {
                tenant: "acme".into(),
                name: "p".into(),
                ..Default::default()
            }),
            update_mask: mask(&["client_secret"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!cleared.client_secret_set);
    assert_eq!(
        cleared.client_id, p.client_id,
        "fields outside the mask are unchanged"
    );
}

#[tokio::test]
async fn a_sealed_secret_copied_to_another_provider_does_not_open() {
    let broker = Broker::start().await;
    let mut c = broker.admin();
    c.create_tenant(pb::CreateTenantRequest {
        tenant: Some(tenant("acme")),
    })
    .await
    .unwrap();
    c.create_provider(pb::CreateProviderRequest {
        provider: Some(microsoft("acme", "victim")),
    })
    .await
    .unwrap();
    let mut other = microsoft("acme", "other");
    other.client_secret.clear();
    c.create_provider(pb::CreateProviderRequest {
        provider: Some(other),
    })
    .await
    .unwrap();

    // Someone with write access to the store moves the ciphertext onto another record.
    let store = broker.state.store.as_ref();
    let records = Records::new(store);
    let victim = records
        .get::<tokenfleet_domain::Provider>(&records::provider_key("acme", "victim"))
        .await
        .unwrap()
        .unwrap();
    let target = records
        .get::<tokenfleet_domain::Provider>(&records::provider_key("acme", "other"))
        .await
        .unwrap()
        .unwrap();
    let mut forged = target.value.clone();
    forged.client_secret = victim.value.client_secret.clone();
    records
        .put(&forged, Precondition::Version(target.version))
        .await
        .unwrap();

    let read = records
        .get::<tokenfleet_domain::Provider>(&records::provider_key("acme", "other"))
        .await
        .unwrap()
        .unwrap()
        .value;
    let e = records::open_client_secret(&broker.state.keyring, &read).unwrap_err();
    assert!(matches!(e, SealError::Open), "{e}");
    // The genuine one still opens.
    assert_eq!(
        records::open_client_secret(&broker.state.keyring, &victim.value)
            .unwrap()
            .unwrap()
            .expose(),
        SECRET
    );

    // A whole record copied under another id is refused as corrupt, and reads answer INTERNAL
    // without details.
    let raw = store
        .get(&records::provider_key("acme", "victim"))
        .await
        .unwrap()
        .unwrap();
    store
        .put(
            &RecordKey::tenant("acme", records::PROVIDERS, "copy"),
            raw.data,
            Precondition::Absent,
        )
        .await
        .unwrap();
    let e = err(c
        .get_provider(pb::GetProviderRequest {
            tenant: "acme".into(),
            name: "copy".into(),
        })
        .await);
    assert_eq!(e.code(), Code::Internal);
    assert!(!e.message().contains("victim"), "{}", e.message());
}

/// A provider stored before proxy passwords were sealed (password inside the URL) is shown
/// redacted, and `reseal` moves the password out of the URL into a sealed field.
#[tokio::test]
async fn reseal_seals_proxy_passwords_of_older_records() {
    const LEGACY: &str = "legacy-proxy-pa55";
    tokenfleet_testkit::logs::secret(LEGACY);
    let broker = Broker::start().await;
    let mut c = broker.admin();
    populate(&mut c, "acme").await;
    let records = Records::new(broker.state.store.as_ref());
    let key = records::provider_key("acme", "p");
    let mut p = records
        .get::<tokenfleet_domain::Provider>(&key)
        .await
        .unwrap()
        .unwrap()
        .value;
    p.http_proxy = format!("http://proxy-user:{LEGACY}@127.0.0.1:3128");
    records
        .put(&p, tokenfleet_store::Precondition::Any)
        .await
        .unwrap();
    let shown = c
        .get_provider(pb::GetProviderRequest {
            tenant: "acme".into(),
            name: "p".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        shown.http_proxy,
        "http://proxy-user:[redacted]@127.0.0.1:3128"
    );
    tokenfleet_broker::reseal::reseal_all(&broker.state)
        .await
        .unwrap();
    let p = records
        .get::<tokenfleet_domain::Provider>(&key)
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(p.http_proxy, "http://proxy-user@127.0.0.1:3128");
    let opened = records::open_http_proxy_password(&broker.state.keyring, &p)
        .unwrap()
        .unwrap();
    assert_eq!(opened.expose(), LEGACY);
    let raw = broker.state.store.get(&key).await.unwrap().unwrap().data;
    assert!(!contains(&raw, LEGACY));
}

#[tokio::test]
async fn reseal_all_moves_every_secret_to_the_new_key() {
    let broker = Broker::start().await;
    let mut c = broker.admin();
    populate(&mut c, "acme").await;
    populate(&mut c, "bravo").await;
    c.create_provider(pb::CreateProviderRequest {
        provider: Some(google("bravo", "gmail")),
    })
    .await
    .unwrap();

    // Rotate: k2 becomes current, k1 stays readable.
    let rotated = BrokerState {
        keyring: Arc::new(keyring("k2", &["k1", "k2"])),
        ..broker.state.clone()
    };
    let report = tokenfleet_broker::reseal::reseal_all(&rotated)
        .await
        .unwrap();
    assert_eq!((report.examined, report.resealed), (3, 3));
    let again = tokenfleet_broker::reseal::reseal_all(&rotated)
        .await
        .unwrap();
    assert_eq!((again.examined, again.resealed), (3, 0));

    // With only the new key, every secret still opens.
    let only_new = keyring("k2", &["k2"]);
    let records = Records::new(broker.state.store.as_ref());
    for (tenant, name) in [("acme", "p"), ("bravo", "p")] {
        let p = records
            .get::<tokenfleet_domain::Provider>(&records::provider_key(tenant, name))
            .await
            .unwrap()
            .unwrap()
            .value;
        assert_eq!(p.client_secret.as_ref().unwrap().kid, "k2");
        assert_eq!(
            records::open_client_secret(&only_new, &p)
                .unwrap()
                .unwrap()
                .expose(),
            SECRET
        );
    }
    let gmail = records
        .get::<tokenfleet_domain::Provider>(&records::provider_key("bravo", "gmail"))
        .await
        .unwrap()
        .unwrap()
        .value;
    let sa = records::open_service_account_key(&only_new, &gmail)
        .unwrap()
        .unwrap();
    assert!(
        sa.expose()
            .contains(SA_PRIVATE_KEY.trim_end().lines().nth(1).unwrap())
    );

    // The old keyring alone can no longer open them: k1 is retired.
    let only_old = keyring("k1", &["k1"]);
    assert!(matches!(
        records::open_service_account_key(&only_old, &gmail),
        Err(SealError::UnknownKey(_))
    ));

    // The server (still on the old keyring object) keeps serving reads.
    let p = c
        .get_provider(pb::GetProviderRequest {
            tenant: "acme".into(),
            name: "p".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(p.client_secret_set);
    let _ = broker.addr;
}

/// `ListAuditEvents.kind` lists changes, refusals and issuances apart (or merged), pages over
/// the merge without losing or repeating events, and names the field for a bad kind or token.
#[tokio::test]
async fn audit_kinds_are_listed_apart_and_merged() {
    let broker = Broker::start().await;
    let mut c = broker.admin();
    populate(&mut c, "acme").await;
    let (_, viewer) = api_keys::create(&broker.state, Role::Viewer, Some("acme"), "v")
        .await
        .unwrap();
    tokenfleet_testkit::logs::secret(viewer.expose());
    let mut v = broker.client(Some(viewer.expose()));
    for i in 0..5 {
        let e = v
            .delete_device(pb::DeleteDeviceRequest {
                tenant: "acme".into(),
                name: format!("d{i}"),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
    }
    let list = |kind: &str, page_size: i32, page_token: String| pb::ListAuditEventsRequest {
        tenant: "acme".into(),
        page_size,
        page_token,
        kind: kind.into(),
    };
    let changes = c
        .list_audit_events(list("changes", 1000, String::new()))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(!changes.is_empty());
    assert!(changes.iter().all(|e| e.result == "ok"), "{changes:?}");
    let refused = c
        .list_audit_events(list("refused", 1000, String::new()))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(refused.len(), 5);
    assert!(refused.iter().all(|e| e.result == "permission_denied"));
    // Merged, two at a time.
    let mut merged = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_audit_events(list("", 2, token))
            .await
            .unwrap()
            .into_inner();
        assert!(page.events.len() <= 2);
        merged.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(merged.len(), changes.len() + refused.len());
    for e in changes.iter().chain(&refused) {
        assert_eq!(merged.iter().filter(|m| *m == e).count(), 1, "{e:?}");
    }
    let e = c
        .list_audit_events(list("everything", 0, String::new()))
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, "kind:");
    let first = c
        .list_audit_events(list("refused", 2, String::new()))
        .await
        .unwrap()
        .into_inner();
    let e = c
        .list_audit_events(list("changes", 2, first.next_page_token))
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, "page_token:");
}
