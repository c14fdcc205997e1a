//! The five verbs every resource has — `create`, `list`, `show`, `update`, `delete` — declared
//! and run once, for every resource, by what varies: how an object is named (`Id`), which objects
//! a list shows (`Scope`), what only `create` takes (`New`), the settable fields (`Fields`) and the
//! flags that empty them (`Clear`). A resource module describes itself with [`CrudResource`]
//! (turning its flags into requests) and adds its own verbs beside [`Crud`]; the per-resource help
//! texts and required flags are set where the resource is mounted (`crate::cli`).

use clap::{Args, Subcommand};

use super::Ctx;
use super::resource::{self, CtlResource, Name};
use crate::args::{
    ConfirmArg, ListArgs, ScopedName, TenantName, TenantScope, TenantsScope, VersionArg,
};
use crate::error::CtlError;

/// The verbs every resource has.
#[derive(Debug, Subcommand)]
pub enum Crud<Id: Args, Scope: Args, New: Args, Fields: Args, Clear: Args> {
    /// Create one.
    Create {
        #[command(flatten)]
        id: Id,
        #[command(flatten)]
        new: New,
        #[command(flatten)]
        fields: Fields,
    },
    /// List them.
    List {
        #[command(flatten)]
        scope: Scope,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Show one.
    Show {
        #[command(flatten)]
        id: Id,
    },
    /// Change the given fields of one (only those; see --help of each flag).
    Update {
        #[command(flatten)]
        id: Id,
        #[command(flatten)]
        fields: Fields,
        #[command(flatten)]
        clear: Clear,
        #[command(flatten)]
        version: VersionArg,
    },
    /// Delete one (asks first; --yes skips the question).
    Delete {
        #[command(flatten)]
        id: Id,
        #[command(flatten)]
        version: VersionArg,
        #[command(flatten)]
        confirm: ConfirmArg,
    },
}

/// No flags (for a resource without create-only or clearing flags, or a list of everything).
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct Nothing {}

/// How a command line names one object.
pub trait ObjectId: Args {
    /// The object, with the context's default tenant where none was given.
    fn resolve(self, ctx: &Ctx) -> Result<Name, CtlError>;
}

impl ObjectId for ScopedName {
    fn resolve(self, ctx: &Ctx) -> Result<Name, CtlError> {
        Name::scoped(ctx, self)
    }
}

impl ObjectId for TenantName {
    fn resolve(self, _ctx: &Ctx) -> Result<Name, CtlError> {
        Ok(Name::global(self.name))
    }
}

/// Which objects a plain `list` shows: the tenant whose objects (empty for tenants themselves).
pub trait ListScope: Args {
    fn tenant(self, ctx: &Ctx) -> Result<String, CtlError>;
}

impl ListScope for TenantScope {
    fn tenant(self, ctx: &Ctx) -> Result<String, CtlError> {
        ctx.tenant(self.tenant)
    }
}

impl ListScope for Nothing {
    fn tenant(self, _ctx: &Ctx) -> Result<String, CtlError> {
        Ok(String::new())
    }
}

/// What a resource's verbs need beyond its Admin calls: its flags and how they become requests.
pub trait CrudResource: CtlResource {
    type Id: ObjectId;
    type Scope: Args;
    type New: Args;
    type Fields: Args;
    type Clear: Args;

    /// The create request for `id` (local input, such as secret files, read here).
    async fn from_create_flags(
        ctx: &Ctx,
        id: Name,
        new: Self::New,
        fields: Self::Fields,
    ) -> Result<Self::Create, CtlError>;

    /// The update request for `id`; may read the object first to merge nested messages.
    async fn from_update_flags(
        ctx: &Ctx,
        id: Name,
        fields: Self::Fields,
        clear: Self::Clear,
        version: VersionArg,
    ) -> Result<Self::Update, CtlError>;

    /// `list`: every page of the scope's objects, printed.
    async fn list_command(ctx: &Ctx, scope: Self::Scope, list: ListArgs) -> Result<(), CtlError>;
}

/// The [`Crud`] of resource `R`.
pub type CrudOf<R> = Crud<
    <R as CrudResource>::Id,
    <R as CrudResource>::Scope,
    <R as CrudResource>::New,
    <R as CrudResource>::Fields,
    <R as CrudResource>::Clear,
>;

/// Runs one of the five verbs of resource `R`.
pub(super) async fn run<R: CrudResource>(cmd: CrudOf<R>, ctx: &Ctx) -> Result<(), CtlError> {
    match cmd {
        Crud::Create { id, new, fields } => {
            let req = R::from_create_flags(ctx, id.resolve(ctx)?, new, fields).await?;
            resource::create::<R>(ctx, req).await
        }
        Crud::List { scope, list } => R::list_command(ctx, scope, list).await,
        Crud::Show { id } => resource::show::<R>(ctx, id.resolve(ctx)?).await,
        Crud::Update {
            id,
            fields,
            clear,
            version,
        } => {
            let req = R::from_update_flags(ctx, id.resolve(ctx)?, fields, clear, version).await?;
            resource::update::<R>(ctx, req).await
        }
        Crud::Delete {
            id,
            version,
            confirm,
        } => resource::delete::<R>(ctx, id.resolve(ctx)?, version.version, confirm.yes).await,
    }
}

/// The `list` of a resource inside tenants: one tenant's, or `--all-tenants`.
pub(super) async fn list_scoped<R: CtlResource>(
    ctx: &Ctx,
    scope: TenantsScope,
    list: ListArgs,
) -> Result<(), CtlError> {
    let found = resource::fetch_scoped::<R>(ctx, scope, list, None).await?;
    resource::print_scoped::<R>(ctx, found)
}

/// The plain `list` of a resource whose scope is a tenant (or nothing).
pub(super) async fn list_in<R: CtlResource>(
    ctx: &Ctx,
    scope: impl ListScope,
    list: ListArgs,
) -> Result<(), CtlError> {
    resource::list::<R>(ctx, scope.tenant(ctx)?, list).await
}
