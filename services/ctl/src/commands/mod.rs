//! The commands: each module defines its subcommand's flags and turns them into requests (pure
//! functions, unit-tested), sends them and prints the result. Local problems (unreadable files,
//! nothing to update) are found before the broker is contacted. `crate::cli` dispatches to them;
//! nothing here knows the command line as a whole.
//!
//! This module holds what every command uses: [`Ctx`] (settings, printer, broker connected on
//! first use), [`Changes`] (update masks) and [`collect_pages`].

pub mod agent;
pub mod api_key;
pub mod apply;
pub mod audit;
pub mod completion;
pub mod config;
pub mod consent;
pub mod consent_link;
pub mod crud;
pub mod device;
pub mod fleet;
pub mod mailbox;
pub mod manifest;
pub mod provider;
mod resource;
pub mod tenant;

use std::future::Future;

use prost_types::FieldMask;
use tokio::sync::OnceCell;
use tonic::{Response, Status};

use crate::args::ListArgs;
use crate::client::{Admin, Broker, resolve_api_key};
use crate::config::Settings;
use crate::error::CtlError;
use crate::output::Printer;

/// What a command needs: the resolved settings, the printer, and the broker (connected on first
/// use).
#[derive(Debug)]
pub struct Ctx {
    pub settings: Settings,
    pub printer: Printer,
    broker: OnceCell<Broker>,
}

impl Ctx {
    /// A context for one run.
    pub fn new(settings: Settings, printer: Printer) -> Self {
        Self {
            settings,
            printer,
            broker: OnceCell::new(),
        }
    }

    /// The broker, connecting on first use.
    async fn broker(&self) -> Result<&Broker, CtlError> {
        self.broker
            .get_or_try_init(|| self.connect(&self.settings))
            .await
    }

    /// A new connection with `settings` (e.g. a longer timeout).
    async fn connect(&self, settings: &Settings) -> Result<Broker, CtlError> {
        let key = resolve_api_key(
            settings.api_key_file.as_deref(),
            settings.context_key_file.as_deref(),
            |name| std::env::var(name).ok(),
        )?;
        Broker::connect(settings, &key).await
    }

    /// One call to the Admin API.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, CtlError>
    where
        F: FnOnce(Admin) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.broker().await?.call(f).await
    }

    /// The tenant of a scoped command: the one given (`--tenant`, `TOKENFLEET_TENANT`), else the
    /// context's default.
    pub fn tenant(&self, given: String) -> Result<String, CtlError> {
        if !given.is_empty() {
            return Ok(given);
        }
        self.settings.tenant.clone().ok_or_else(|| {
            CtlError::usage(
                "no tenant: give --tenant, set TOKENFLEET_TENANT, or set a default tenant in the context (`tokenfleetctl config set-context NAME --tenant TENANT`)",
            )
        })
    }

    /// Asks before an irreversible `action` (see [`crate::confirm`]).
    pub fn confirm(&self, action: &str, yes: bool) -> Result<(), CtlError> {
        crate::confirm::confirm(action, yes)
    }
}

/// Collects the fields an `update` changes, as `update_mask` paths (proto field names, dotted for
/// nested messages: `smtp.port`).
#[derive(Debug, Default)]
pub struct Changes {
    paths: Vec<&'static str>,
}

impl Changes {
    /// Sets `slot` and records `path` when the flag was given.
    pub fn set<T>(&mut self, path: &'static str, value: Option<T>, slot: &mut T) {
        if let Some(value) = value {
            *slot = value;
            self.paths.push(path);
        }
    }

    /// Replaces a repeated field when values were given or `clear` asks to empty it.
    pub fn set_list<T>(
        &mut self,
        path: &'static str,
        values: Vec<T>,
        clear: bool,
        slot: &mut Vec<T>,
    ) {
        if !values.is_empty() || clear {
            *slot = values;
            self.paths.push(path);
        }
    }

    /// Records `path` for a value set by the caller.
    pub fn touch(&mut self, path: &'static str) {
        self.paths.push(path);
    }

    /// The update mask; refuses an empty one, which the API would read as "replace everything".
    pub fn into_mask(self, resource: &str) -> Result<FieldMask, CtlError> {
        if self.paths.is_empty() {
            return Err(CtlError::usage(format!(
                "nothing to update: give at least one field flag (see `tokenfleetctl {resource} update --help`)"
            )));
        }
        Ok(FieldMask {
            paths: self.paths.into_iter().map(str::to_owned).collect(),
        })
    }
}

/// Fetches every page of a list (or until `--limit`), `--page-size` results per request.
/// `fetch(page_size, page_token)` returns one page and the next page token.
pub async fn collect_pages<T, F, Fut>(args: ListArgs, mut fetch: F) -> Result<Vec<T>, CtlError>
where
    F: FnMut(i32, String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), CtlError>>,
{
    let limit = args.limit.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
    // With a small --limit there is no point fetching a full default page.
    let page_size = match (args.page_size, limit) {
        (Some(size), _) => size,
        (None, Some(limit)) => i32::try_from(limit.min(1000)).unwrap_or(1000),
        (None, None) => 0,
    };
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let (mut page, next) = fetch(page_size, token.clone()).await?;
        items.append(&mut page);
        if let Some(limit) = limit
            && items.len() >= limit
        {
            items.truncate(limit);
            break;
        }
        // A broker that hands back the same token would loop forever; stop instead.
        if next.is_empty() || next == token {
            break;
        }
        token = next;
    }
    Ok(items)
}

/// Sets a leaf of a nested message when its flag was given; says whether it did.
fn leaf<T>(value: Option<T>, slot: &mut T) -> bool {
    match value {
        Some(value) => {
            *slot = value;
            true
        }
        None => false,
    }
}

/// `Some(version)` for a conditional write, 0 otherwise.
fn version_of(version: Option<u64>) -> u64 {
    version.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn pages(
        total: usize,
        per_page: usize,
        calls: &RefCell<Vec<(i32, String)>>,
        args: ListArgs,
    ) -> Result<Vec<usize>, CtlError> {
        let fut = collect_pages(args, |size, token| {
            calls.borrow_mut().push((size, token.clone()));
            let start: usize = token.parse().unwrap_or(0);
            let end = (start + per_page).min(total);
            let next = if end < total {
                end.to_string()
            } else {
                String::new()
            };
            async move { Ok(((start..end).collect(), next)) }
        });
        tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| CtlError::Output(e.to_string()))?
            .block_on(fut)
    }

    #[test]
    fn list_follows_every_page() {
        let calls = RefCell::new(Vec::new());
        let items = pages(
            25,
            10,
            &calls,
            ListArgs {
                page_size: None,
                limit: None,
            },
        )
        .unwrap();
        assert_eq!(items, (0..25).collect::<Vec<_>>());
        assert_eq!(
            *calls.borrow(),
            vec![(0, String::new()), (0, "10".into()), (0, "20".into())]
        );
    }

    #[test]
    fn list_stops_at_the_limit_and_passes_page_size() {
        let calls = RefCell::new(Vec::new());
        let items = pages(
            25,
            10,
            &calls,
            ListArgs {
                page_size: Some(10),
                limit: Some(12),
            },
        )
        .unwrap();
        assert_eq!(items, (0..12).collect::<Vec<_>>());
        assert_eq!(calls.borrow().len(), 2);
        assert!(calls.borrow().iter().all(|(size, _)| *size == 10));

        let calls = RefCell::new(Vec::new());
        let items = pages(
            25,
            3,
            &calls,
            ListArgs {
                page_size: None,
                limit: Some(3),
            },
        )
        .unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(*calls.borrow(), vec![(3, String::new())]);
    }

    #[test]
    fn empty_update_is_refused() {
        let err = Changes::default().into_mask("mailbox").unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().starts_with("nothing to update"));
    }
}
