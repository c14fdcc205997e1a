//! Secrets at rest: a provider client secret, a Google service-account key, a device's ingress
//! password and the API keys are created through the admin API of a broker on a real
//! redis-server; then every key in Redis is read raw (type by type, no RDB compression in the way)
//! and no secret may appear in it. A control value that is stored in the clear (the client id)
//! must be found, so the scan is known to see the data.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use redis::AsyncCommands as _;
use tokenfleet_proto::v1 as pb;
use tokenfleet_testkit::broker::{TestBroker, TestStore};
use tokenfleet_testkit::redis::RedisServer;

const CLIENT_ID: &str = "0f1e2d3c-control-client-id";
const CLIENT_SECRET: &str = "cs~Very.Secret-Client-Secret-4711";
const SA_PRIVATE_KEY: &str = "MIIEvQ-service-account-private-key-material";
const INGRESS_PASSWORD: &str = "printer-local-password-0815";

/// Every byte Redis holds, key by key.
async fn raw_redis_dump(url: &str) -> Vec<(String, Vec<u8>)> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut out = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut bytes: Vec<u8> = Vec::new();
        match kind.as_str() {
            "string" => bytes = conn.get(&key).await.unwrap(),
            "hash" => {
                let fields: Vec<(Vec<u8>, Vec<u8>)> = conn.hgetall(&key).await.unwrap();
                for (f, v) in fields {
                    bytes.extend(f);
                    bytes.extend(v);
                }
            }
            "zset" => {
                let members: Vec<Vec<u8>> = conn.zrange(&key, 0, -1).await.unwrap();
                members.into_iter().for_each(|m| bytes.extend(m));
            }
            "set" => {
                let members: Vec<Vec<u8>> = conn.smembers(&key).await.unwrap();
                members.into_iter().for_each(|m| bytes.extend(m));
            }
            "list" => {
                let items: Vec<Vec<u8>> = conn.lrange(&key, 0, -1).await.unwrap();
                items.into_iter().for_each(|m| bytes.extend(m));
            }
            "stream" => {
                let value: redis::Value = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                bytes = format!("{value:?}").into_bytes();
                flatten(&value, &mut bytes);
            }
            other => panic!("unexpected Redis type {other} at {key}"),
        }
        out.push((key, bytes));
    }
    out
}

fn flatten(value: &redis::Value, out: &mut Vec<u8>) {
    match value {
        redis::Value::BulkString(b) => out.extend(b),
        redis::Value::Array(items) => items.iter().for_each(|v| flatten(v, out)),
        redis::Value::SimpleString(s) => out.extend(s.as_bytes()),
        _ => {}
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_is_stored_in_plaintext_in_redis() {
    let redis = RedisServer::start().await.unwrap();
    let broker = TestBroker::start(TestStore::Redis(redis.url()))
        .await
        .unwrap();
    let mut admin = broker.admin_client();
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: Some(pb::Tenant {
                name: "acme".into(),
                display_name: "ACME".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    admin
        .create_provider(pb::CreateProviderRequest {
            provider: Some(pb::Provider {
                tenant: "acme".into(),
                name: "m365".into(),
                kind: pb::ProviderKind::Microsoft as i32,
                authority: "organizations".into(),
                client_id: CLIENT_ID.into(),
                client_secret: CLIENT_SECRET.into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let sa_json = format!(
        r#"{{"type":"service_account","client_email":"relay@proj.iam.gserviceaccount.com","private_key":"-----BEGIN PRIVATE KEY-----\n{SA_PRIVATE_KEY}\n-----END PRIVATE KEY-----\n"}}"#
    );
    admin
        .create_provider(pb::CreateProviderRequest {
            provider: Some(pb::Provider {
                tenant: "acme".into(),
                name: "gmail".into(),
                kind: pb::ProviderKind::Google as i32,
                client_id: "google-client".into(),
                service_account_key: sa_json,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    admin
        .create_device(pb::CreateDeviceRequest {
            device: Some(pb::Device {
                tenant: "acme".into(),
                name: "mfp-1".into(),
                sender_mode: pb::SenderMode::LoginUser as i32,
                ingress: Some(pb::IngressCredentials {
                    username: "mfp1".into(),
                    password: INGRESS_PASSWORD.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let viewer_key = broker
        .create_key(tokenfleet_domain::Role::Viewer, Some("acme"))
        .await;

    let dump = raw_redis_dump(&redis.url()).await;
    assert!(
        dump.iter().any(|(_, bytes)| contains(bytes, CLIENT_ID)),
        "control: the raw scan must see the provider record ({} keys scanned)",
        dump.len()
    );
    let secrets = [
        CLIENT_SECRET,
        SA_PRIVATE_KEY,
        INGRESS_PASSWORD,
        broker.admin_key.expose(),
        viewer_key.expose(),
    ];
    for (key, bytes) in &dump {
        for secret in secrets {
            assert!(
                !contains(bytes, secret),
                "plaintext secret found in Redis key {key}"
            );
        }
    }
}
