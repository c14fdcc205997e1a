//! Update masks: which fields of a resource an update changes, checked against the resource's
//! table of mutable, immutable and output-only paths. The edge hands over the paths as the caller
//! sent them (gRPC `FieldMask`, a form's field list); JSON-style `lowerCamelCase` paths are
//! accepted. Input-only secrets change by what the mask names ([`secret_change`]).

use std::collections::BTreeSet;

use tokenfleet_domain::{Valid, ValidationError};
use tokenfleet_seal::Secret;

/// The field paths of one resource, by how an update may treat them.
#[derive(Debug)]
pub struct FieldTable {
    /// Resource name as used in error messages (`provider`).
    pub resource: &'static str,
    /// Paths an update may change.
    pub mutable: &'static [&'static str],
    /// Paths that identify the object or can never change.
    pub immutable: &'static [&'static str],
    /// Paths the broker sets.
    pub output_only: &'static [&'static str],
}

/// Which fields an update changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateMask {
    /// Empty mask: every mutable field.
    All,
    /// The named mutable paths.
    Paths(BTreeSet<&'static str>),
}

/// `displayName` → `display_name` (JSON clients send lowerCamelCase paths).
fn snake_case(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 4);
    for c in path.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

impl UpdateMask {
    /// Checks the paths of `mask` against `table`.
    pub fn parse(table: &FieldTable, paths: &[String]) -> Valid<Self> {
        if paths.is_empty() {
            return Ok(Self::All);
        }
        let mut named = BTreeSet::new();
        for raw in paths {
            let path = snake_case(raw.trim());
            let field = "update_mask";
            if let Some(known) = table.mutable.iter().find(|p| **p == path) {
                named.insert(*known);
            } else if table.immutable.contains(&path.as_str()) {
                return Err(ValidationError::new(
                    field,
                    format!(
                        "`{path}` is immutable; it identifies the {} or cannot change",
                        table.resource
                    ),
                ));
            } else if table.output_only.contains(&path.as_str()) {
                return Err(ValidationError::new(
                    field,
                    format!("`{path}` is output only and cannot be updated"),
                ));
            } else if let Some((head, _)) = path.split_once('.')
                && table.mutable.contains(&head)
            {
                return Err(ValidationError::new(
                    field,
                    format!("`{path}`: name the whole field `{head}` to replace it"),
                ));
            } else {
                let shown: String = path.chars().take(80).flat_map(char::escape_debug).collect();
                return Err(ValidationError::new(
                    field,
                    format!(
                        "unknown {} field `{shown}` (updatable: {})",
                        table.resource,
                        table.mutable.join(", ")
                    ),
                ));
            }
        }
        Ok(Self::Paths(named))
    }

    /// Whether `path` is changed (named, or every field).
    pub fn includes(&self, path: &str) -> bool {
        match self {
            Self::All => true,
            Self::Paths(p) => p.contains(path),
        }
    }

    /// Whether `path` is named explicitly.
    pub fn names(&self, path: &str) -> bool {
        matches!(self, Self::Paths(p) if p.contains(path))
    }

    /// Human-readable list for the audit log.
    pub fn describe(&self) -> String {
        match self {
            Self::All => "all fields".to_owned(),
            Self::Paths(p) => p.iter().copied().collect::<Vec<_>>().join(", "),
        }
    }
}

/// What an update does to an input-only secret.
#[derive(Debug, Default)]
pub enum SecretChange {
    /// Keep the stored value.
    #[default]
    Keep,
    /// Remove the stored value.
    Clear,
    /// Replace it.
    Set(Secret),
}

/// An input-only secret changes when the mask names it (empty value = clear), or with an empty
/// mask when a non-empty value is given.
pub fn secret_change(mask: &UpdateMask, path: &str, value: &str) -> SecretChange {
    if mask.names(path) {
        if value.is_empty() {
            SecretChange::Clear
        } else {
            SecretChange::Set(Secret::new(value))
        }
    } else if mask.includes(path) && !value.is_empty() {
        SecretChange::Set(Secret::new(value))
    } else {
        SecretChange::Keep
    }
}
