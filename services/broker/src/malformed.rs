//! Malformed gRPC requests answer `INVALID_ARGUMENT`, not `INTERNAL`.
//!
//! tonic decodes request messages with `tonic-prost`, which maps every protobuf decode error to
//! `INTERNAL` (it follows the gRPC status-code table for *responses*, where a message that does
//! not decode is the peer's bug), and a unary call whose body holds no message or a cut-off one
//! to `INTERNAL` too. On a server those are the client's bad input. The codec is shared by the
//! generated clients and servers and cannot tell the two directions apart, so the fix sits at the
//! edge instead: [`MalformedRequestLayer`] wraps every gRPC service and rewrites exactly those
//! statuses — in trailers-only responses (unary and server-streaming calls fail before the
//! handler runs) and in trailers (a streaming handler that passes its request stream's error on)
//! — to `INVALID_ARGUMENT`, keeping the message, which names what did not decode.
//!
//! The compressed-flag-without-encoding case stays `INTERNAL`: the gRPC compression spec
//! requires that status for it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use ::http::HeaderMap;
use ::http::header::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

/// `grpc-message` prefixes (percent-encoded, as tonic writes them) of the statuses tonic makes
/// while decoding a request message: a protobuf decode error, a unary body without a message, a
/// body cut inside a message.
const REQUEST_DECODE_MESSAGES: [&str; 3] = [
    "failed%20to%20decode%20Protobuf%20message",
    "Missing%20request%20message.",
    "Unexpected%20EOF%20decoding%20stream.",
];

/// Code of `INTERNAL` and `INVALID_ARGUMENT` in `grpc-status`.
const INTERNAL: &str = "13";
const INVALID_ARGUMENT: &str = "3";

/// Turns a request-decoding `INTERNAL` in `headers` (response headers or trailers) into
/// `INVALID_ARGUMENT`; returns whether it did.
fn rewrite(headers: &mut HeaderMap) -> bool {
    if headers.get("grpc-status").map(HeaderValue::as_bytes) != Some(INTERNAL.as_bytes()) {
        return false;
    }
    let malformed = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .is_some_and(|m| REQUEST_DECODE_MESSAGES.iter().any(|p| m.starts_with(p)));
    if malformed {
        headers.insert("grpc-status", HeaderValue::from_static(INVALID_ARGUMENT));
    }
    malformed
}

/// For a handler that reads a request stream: the status to answer when the stream failed because
/// a message did not decode (`INVALID_ARGUMENT` with tonic's message), `None` for any other error.
pub fn request_decode_failure(status: &tonic::Status) -> Option<tonic::Status> {
    let mut headers = HeaderMap::new();
    status.add_header(&mut headers).ok()?;
    rewrite(&mut headers).then(|| tonic::Status::invalid_argument(status.message()))
}

/// The layer; see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct MalformedRequestLayer;

impl<S> Layer<S> for MalformedRequestLayer {
    type Service = MalformedRequestService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MalformedRequestService { inner }
    }
}

/// The service [`MalformedRequestLayer`] wraps around the gRPC routes.
#[derive(Debug, Clone)]
pub struct MalformedRequestService<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<::http::Request<ReqBody>> for MalformedRequestService<S>
where
    S: Service<::http::Request<ReqBody>, Response = ::http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = ::http::Response<MalformedRequestBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: ::http::Request<ReqBody>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            if rewrite(response.headers_mut()) {
                tracing::debug!(%method, "request message did not decode: INVALID_ARGUMENT");
            }
            Ok(response.map(|inner| MalformedRequestBody { inner }))
        })
    }
}

/// Response body whose trailers get the same rewrite.
#[derive(Debug)]
pub struct MalformedRequestBody<B> {
    inner: B,
}

impl<B> Body for MalformedRequestBody<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &mut poll
            && let Some(trailers) = frame.trailers_mut()
        {
            rewrite(trailers);
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The headers tonic writes for `status`.
    fn headers_of(status: &tonic::Status) -> HeaderMap {
        let mut headers = HeaderMap::new();
        status.add_header(&mut headers).unwrap();
        headers
    }

    #[test]
    fn only_request_decoding_failures_become_invalid_argument() {
        use prost::Message as _;
        // A real decode error: a field with wire type 7, which does not exist.
        let decode = tokenfleet_proto::v1::Tenant::decode(&b"\x0f\x01"[..]).unwrap_err();
        for message in [
            decode.to_string(),
            "Missing request message.".to_owned(),
            "Unexpected EOF decoding stream.".to_owned(),
        ] {
            let mut headers = headers_of(&tonic::Status::internal(message.clone()));
            assert!(rewrite(&mut headers), "{message}");
            let status = tonic::Status::from_header_map(&headers).unwrap();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{message}");
            assert_eq!(status.message(), message);
        }
        for status in [
            tonic::Status::internal("store data corrupt"),
            tonic::Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was \
                 specified",
            ),
            tonic::Status::unavailable("failed to decode Protobuf message"),
        ] {
            let mut headers = headers_of(&status);
            assert!(!rewrite(&mut headers), "{status:?}");
            let after = tonic::Status::from_header_map(&headers).unwrap();
            assert_eq!(after.code(), status.code());
        }
    }
}
