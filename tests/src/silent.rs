//! Clients that connect and send nothing (or start a call and never finish its request), for the
//! tests of listeners that make room (a full listener closes the connection that has waited
//! longest unserved for a new one).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpSocket, TcpStream};

/// `n` TCP connections to `addr` that send nothing (yet), opened one after another.
pub async fn connect_silent(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut silent = Vec::new();
    for _ in 0..n {
        silent.push(TcpStream::connect(addr).await.unwrap_or_else(|e| {
            panic!("connecting to {addr}: {e}");
        }));
    }
    silent
}

/// A TCP connection to `target` from the local address `source` (a loopback address such as
/// 127.0.0.2: a host of its own for listeners that count connections per source).
pub async fn connect_from(source: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if source.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(target).await
}

/// `n` silent connections to `addr` from the loopback address `source` (see [`connect_from`]).
pub async fn connect_silent_from(source: IpAddr, addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut silent = Vec::new();
    for _ in 0..n {
        silent.push(
            connect_from(source, addr)
                .await
                .unwrap_or_else(|e| panic!("connecting to {addr} from {source}: {e}")),
        );
    }
    silent
}

/// Whether the server closed `stream` within `wait` (end of stream or a reset; anything it sent
/// first is read and dropped); `false` when it is still open then.
pub async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let closed = async { while let Ok(1..) = stream.read(&mut buf).await {} };
    tokio::time::timeout(wait, closed).await.is_ok()
}

/// A half-open `TokenBroker/Enroll` call on `channel`: its headers are sent, its request message
/// never is. Ends when the broker ends the call or its connection (with the call's error).
pub async fn half_open_enroll(
    channel: tonic::transport::Channel,
) -> Result<tokenfleet_proto::v1::AgentCertificate, tonic::Status> {
    use tokenfleet_proto::v1::{AgentCertificate, EnrollRequest};
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/tokenfleet.v1.TokenBroker/Enroll");
    let codec =
        tokenfleet_proto::codec::SmallBufferCodec::<EnrollRequest, AgentCertificate>::default();
    let never = futures::stream::pending::<EnrollRequest>();
    grpc.client_streaming(tonic::Request::new(never), path, codec)
        .await
        .map(tonic::Response::into_inner)
}
