//! `api-key create|list|revoke`: admin API keys through the broker's Admin API (works while the
//! broker runs, with either store). `create` prints the key once; nothing else ever shows it.

use tokenfleet_proto::v1 as pb;

use super::Ctx;
use crate::cli::ApiKeyCommand;
use crate::error::CtlError;
use crate::view::{ApiKeyView, CreatedApiKeyView};

pub(super) async fn run(cmd: ApiKeyCommand, ctx: &Ctx) -> Result<(), CtlError> {
    match cmd {
        ApiKeyCommand::Create {
            role,
            tenant,
            description,
        } => {
            let req = pb::CreateApiKeyRequest {
                role: role.as_str().to_owned(),
                tenant: tenant.unwrap_or_default(),
                description,
            };
            let created = ctx
                .call(|mut c| async move { c.create_api_key(req).await })
                .await?;
            let api_key = created
                .api_key
                .as_ref()
                .map(ApiKeyView::from)
                .ok_or_else(|| {
                    CtlError::Output("the broker's answer has no key record".to_owned())
                })?;
            eprintln!(
                "The API key is shown this once; store it now (the broker keeps only its hash)."
            );
            ctx.printer.object(&CreatedApiKeyView {
                key: created.key,
                api_key,
            })
        }
        ApiKeyCommand::List { tenant } => {
            let req = pb::ListApiKeysRequest {
                tenant: tenant.unwrap_or_default(),
            };
            let keys = ctx
                .call(|mut c| async move { c.list_api_keys(req).await })
                .await?;
            ctx.printer.list(
                &keys
                    .api_keys
                    .iter()
                    .map(ApiKeyView::from)
                    .collect::<Vec<_>>(),
            )
        }
        ApiKeyCommand::Revoke { id } => {
            let req = pb::RevokeApiKeyRequest { id: id.clone() };
            ctx.call(|mut c| async move { c.revoke_api_key(req).await })
                .await?;
            ctx.printer.deleted(&crate::view::DeletedView {
                deleted: true,
                kind: "api-key",
                tenant: None,
                name: id,
            })
        }
    }
}
