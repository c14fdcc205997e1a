//! Malformed gRPC requests answer `INVALID_ARGUMENT`, not `INTERNAL`: raw bytes that are not the
//! method's protobuf message, and a unary call without any message, sent with a pass-through
//! codec to Admin and TokenBroker methods of a running broker (unary calls and the bidirectional
//! `StatusStream` of an enrolled agent), while well-formed calls keep working and `/metrics`
//! counts the rewritten code.

// Helpers outside #[test] functions panic on failure too, which is what a test wants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use prost::bytes::{Buf as _, BufMut as _};
use tokenfleet_agent::identity::{self, EnrollmentCode};
use tokenfleet_proto::v1 as pb;
use tokenfleet_testkit::broker::TestOptions;
use tokenfleet_testkit::broker::{TestBroker, TestStore};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Sends and receives message bytes as they are.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Bytes that are no protobuf message: a field with wire type 7 (there is none), and a
/// length-delimited field claiming more bytes than follow.
const GARBAGE: [&[u8]; 2] = [b"\x0f\x01", b"\x0a\xff\x01garbage"];

/// One unary call of `path` with `body`, the API key as bearer token when given.
async fn unary(
    channel: Channel,
    key: Option<&str>,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(body);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    grpc.unary(
        request,
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// A unary method called with a request stream that carries no message at all.
async fn unary_without_message(
    channel: Channel,
    key: &str,
    path: &'static str,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(tokio_stream::empty::<Vec<u8>>());
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    grpc.client_streaming(
        request,
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

fn assert_invalid(result: Result<Vec<u8>, Status>, what: &str) -> Status {
    let status = result.expect_err(what);
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "{what}: {} {:?}",
        status.code(),
        status.message()
    );
    status
}

#[tokio::test]
async fn undecodable_requests_answer_invalid_argument_on_admin_and_token_broker() {
    let broker = TestBroker::start(TestStore::Embedded).await.unwrap();
    let key = broker.admin_key.expose().to_owned();
    for path in [
        "/tokenfleet.v1.Admin/GetTenant",
        "/tokenfleet.v1.Admin/CreateMailbox",
        "/tokenfleet.v1.Admin/RefreshNow",
        "/tokenfleet.v1.TokenBroker/IssueAccessToken",
        "/tokenfleet.v1.TokenBroker/Enroll",
        "/tokenfleet.v1.TokenBroker/GetAgentConfig",
    ] {
        for garbage in GARBAGE {
            let what = format!("{path} with {garbage:?}");
            let status = assert_invalid(
                unary(broker.channel(), Some(&key), path, garbage.to_vec()).await,
                &what,
            );
            assert!(
                status
                    .message()
                    .starts_with("failed to decode Protobuf message"),
                "{what}: {:?}",
                status.message()
            );
        }
        let status = assert_invalid(
            unary_without_message(broker.channel(), &key, path).await,
            path,
        );
        assert_eq!(status.message(), "Missing request message.", "{path}");
    }

    // Well-formed bytes still reach the handlers: an empty message is a valid ListTenants.
    unary(
        broker.channel(),
        Some(&key),
        "/tokenfleet.v1.Admin/ListTenants",
        Vec::new(),
    )
    .await
    .unwrap();
    let status = unary(
        broker.channel(),
        None,
        "/tokenfleet.v1.Admin/ListTenants",
        Vec::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // The metrics count what the client was told.
    let metrics = http_get(broker.http_addr, "/metrics").await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("tokenfleet_grpc_requests_total")
                && l.contains("/tokenfleet.v1.Admin/GetTenant")
                && l.contains("INVALID_ARGUMENT")
        })
        .unwrap_or_else(|| panic!("no INVALID_ARGUMENT count for GetTenant:\n{metrics}"));
    assert!(line.ends_with(" 3"), "{line}");
    assert!(
        !metrics
            .lines()
            .any(|l| l.contains("tokenfleet_grpc_requests_total") && l.contains("INTERNAL")),
        "{metrics}"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn an_undecodable_report_ends_the_status_stream_with_invalid_argument() {
    let broker = TestBroker::start_with(
        TestStore::Embedded,
        TestOptions {
            tls: true,
            ..TestOptions::default()
        },
    )
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
    let code = tokenfleet_testkit::broker::enrollment_code(&mut admin, "acme", "site1").await;
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("agent");
    let enrolled = identity::enroll(
        &broker.grpc_url(),
        &EnrollmentCode::new(&code),
        broker.tls_ca_pem(),
        &state_dir,
        "1.0.0",
    )
    .await
    .unwrap();
    if let Ok(pem) = std::fs::read_to_string(state_dir.join(identity::KEY_FILE)) {
        tokenfleet_testkit::logs::secret(&pem);
    }
    let channel = enrolled.channel().unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let reports = tokio_stream::iter([GARBAGE[0].to_vec()]);
    // Keep the request stream open after the garbage, as an agent would.
    let reports = tokio_stream::StreamExt::chain(reports, tokio_stream::pending());
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let mut commands = grpc
            .streaming(
                tonic::Request::new(reports),
                tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/tokenfleet.v1.TokenBroker/StatusStream",
                ),
                RawCodec,
            )
            .await?
            .into_inner();
        loop {
            if commands.message().await?.is_none() {
                return Ok::<(), Status>(());
            }
        }
    })
    .await
    .expect("the broker ends the stream");
    let status = answer.expect_err("a stream with an undecodable report fails");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("failed to decode Protobuf message"),
        "{status:?}"
    );
    broker.shutdown().await;
}

/// `GET path` over plain HTTP/1.1; returns the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}
