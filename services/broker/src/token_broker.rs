//! The agent-facing `tokenfleet.v1.TokenBroker` service. Until agent enrollment exists there is
//! no caller identity to check, so every call is refused with UNIMPLEMENTED; the enrollment
//! feature replaces this file.

use tokenfleet_proto::v1::token_broker_server::{TokenBroker, TokenBrokerServer};
use tokenfleet_proto::v1::{IssueAccessTokenRequest, IssueAccessTokenResponse};
use tonic::{Request, Response, Status};

use crate::state::BrokerState;

/// What `IssueAccessToken` answers until agent enrollment exists.
pub const NOT_AVAILABLE: &str =
    "token issuance is not available yet: it arrives with agent enrollment";

/// `tokenfleet.v1.TokenBroker` implementation.
#[derive(Debug, Clone)]
pub struct TokenBrokerService {
    #[allow(dead_code)] // used once issuance is implemented
    state: BrokerState,
}

impl TokenBrokerService {
    /// A service over the shared broker state.
    pub fn new(state: BrokerState) -> Self {
        Self { state }
    }
}

/// The tonic server for [`TokenBrokerService`].
pub fn token_broker_server(state: BrokerState) -> TokenBrokerServer<TokenBrokerService> {
    TokenBrokerServer::new(TokenBrokerService::new(state))
}

#[tonic::async_trait]
impl TokenBroker for TokenBrokerService {
    async fn issue_access_token(
        &self,
        _request: Request<IssueAccessTokenRequest>,
    ) -> Result<Response<IssueAccessTokenResponse>, Status> {
        Err(Status::unimplemented(NOT_AVAILABLE))
    }
}
