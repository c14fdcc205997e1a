//! `api-key create|list|revoke`: admin API keys through the broker's Admin API (works while the
//! broker runs, with either store). `create` prints the key once; nothing else ever shows it.

use clap::Subcommand;
use tokenfleet_proto::v1 as pb;

use super::Ctx;
use crate::args::ConfirmArg;
use crate::enums::ApiKeyRole;
use crate::error::CtlError;
use crate::view::{ApiKeyView, CreatedApiKeyView};

/// `api-key …`
#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create an API key and print it once (the broker keeps only its hash).
    Create {
        /// Role of the key.
        #[arg(long, value_enum)]
        role: ApiKeyRole,
        /// Tenant the key is limited to (required for tenant-admin; optional for viewer).
        #[arg(long, value_name = "TENANT")]
        tenant: Option<String>,
        /// What the key is for.
        #[arg(long, default_value = "", value_name = "TEXT")]
        description: String,
    },
    /// List API keys (ids, roles, tenants; never the keys themselves).
    List {
        /// Only keys bound to this tenant.
        #[arg(long, env = "TOKENFLEET_TENANT", value_name = "TENANT")]
        tenant: Option<String>,
    },
    /// Revoke an API key: it stops working on its next call.
    Revoke {
        /// The key's id (`tfk_<id>_…`, as `api-key list` shows it).
        #[arg(long, value_name = "ID")]
        id: String,
        #[command(flatten)]
        confirm: ConfirmArg,
    },
}

/// Runs `api-key …`.
pub async fn run(cmd: ApiKeyCommand, ctx: &Ctx) -> Result<(), CtlError> {
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
            ctx.printer.shown_once(&CreatedApiKeyView {
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
        ApiKeyCommand::Revoke { id, confirm } => {
            ctx.confirm(&format!("revoke API key {id}"), confirm.yes)?;
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
