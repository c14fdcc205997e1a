//! Extraction of a layered configuration (defaults → TOML file → environment, with figment) that
//! reports every problem at once: unknown keys, values of the wrong type, each naming its dotted
//! key and where the value came from (the file, or the environment variable it was read from).
//!
//! figment stops at the first error of a struct (`deny_unknown_fields`, a type mismatch), so an
//! operator fixing a file would meet its problems one run at a time. [`extract_reporting_all`]
//! takes each failing key out of the merged value and extracts again until nothing fails. No crate
//! does this for figment; it is small and shared by the broker and the agent.
//!
//! Dependency direction: depends on figment and serde only; the broker and the agent depend on it.

use figment::value::Value;
use figment::{Figment, Metadata, Source};
use serde::de::DeserializeOwned;

/// Most problems collected before the rest is left unreported.
const MAX_PROBLEMS: usize = 50;

/// How environment variables map to keys: `prefix` + the key upper-cased with `.` as `separator`
/// (`TOKENFLEET_` + `GRPC__LISTEN` for `grpc.listen`).
#[derive(Debug, Clone, Copy)]
pub struct EnvNaming<'a> {
    /// Prefix of every variable.
    pub prefix: &'a str,
    /// What stands for a `.` between keys.
    pub separator: &'a str,
}

/// What [`extract_reporting_all`] found wrong.
#[derive(Debug)]
pub struct Problems<T> {
    /// One line per problem: the key, what is wrong, where the value came from.
    pub lines: Vec<String>,
    /// The configuration without the failing keys (their defaults instead), when it extracts:
    /// the caller can check its values too, so that one run reports everything.
    pub repaired: Option<T>,
}

/// Extracts `T` from `figment`, or every problem found.
pub fn extract_reporting_all<T: DeserializeOwned>(
    figment: &Figment,
    env: EnvNaming<'_>,
) -> Result<T, Problems<T>> {
    let mut error = match figment.extract::<T>() {
        Ok(value) => return Ok(value),
        Err(error) => error,
    };
    // The merged sources as one value, to take failing keys out of.
    let Ok(mut data) = figment.extract::<Value>() else {
        return Err(Problems {
            lines: error
                .into_iter()
                .map(|e| describe(&e, &failing_path(&e), figment, env))
                .collect(),
            repaired: None,
        });
    };
    let mut lines = Vec::new();
    let mut removed: Vec<Vec<String>> = Vec::new();
    loop {
        let mut removed_any = false;
        for e in error {
            let path = failing_path(&e);
            // A key taken out in an earlier round without a default is not a new problem.
            if matches!(e.kind, figment::error::Kind::MissingField(_)) && removed.contains(&path) {
                continue;
            }
            lines.push(describe(&e, &path, figment, env));
            if remove_key(&mut data, &path) {
                removed_any = true;
                removed.push(path);
            }
        }
        if !removed_any || lines.len() >= MAX_PROBLEMS {
            return Err(Problems {
                lines,
                repaired: None,
            });
        }
        match Figment::from(figment::providers::Serialized::defaults(&data)).extract::<T>() {
            Ok(repaired) => {
                return Err(Problems {
                    lines,
                    repaired: Some(repaired),
                });
            }
            Err(next) => error = next,
        }
    }
}

/// The key an error is about: figment's path, plus the field of an unknown-field error when the
/// path does not end with it already.
fn failing_path(e: &figment::Error) -> Vec<String> {
    let mut path = e.path.clone();
    if let figment::error::Kind::UnknownField(field, _) = &e.kind
        && path.last() != Some(field)
    {
        path.push(field.clone());
    }
    path
}

/// Removes `path` from `data`; whether it was there.
fn remove_key(data: &mut Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = data;
    for key in parents {
        match node {
            Value::Dict(_, dict) => match dict.get_mut(key) {
                Some(child) => node = child,
                None => return false,
            },
            _ => return false,
        }
    }
    match node {
        Value::Dict(_, dict) => dict.remove(last).is_some(),
        _ => false,
    }
}

/// One problem: the key, what is wrong, and where the value came from.
fn describe(e: &figment::Error, key: &[String], figment: &Figment, env: EnvNaming<'_>) -> String {
    let path = key.join(".");
    let mut line = match &e.kind {
        figment::error::Kind::UnknownField(_, expected) => format!(
            "unknown key `{path}` (expected one of: {})",
            expected.join(", ")
        ),
        figment::error::Kind::UnknownVariant(value, expected) => format!(
            "`{path}`: unknown value `{value}` (expected one of: {})",
            expected.join(", ")
        ),
        // The value itself is not repeated when it is text: a secret in the wrong place (a key
        // where a list belongs, a password in a number) must not reach a terminal or a log.
        figment::error::Kind::InvalidType(actual, expected) => {
            format!(
                "`{path}`: invalid type: found {}, expected {expected}",
                shown(actual)
            )
        }
        figment::error::Kind::InvalidValue(actual, expected) => {
            format!(
                "`{path}`: invalid value: found {}, expected {expected}",
                shown(actual)
            )
        }
        kind if path.is_empty() => kind.to_string(),
        kind => format!("`{path}`: {kind}"),
    };
    // The original sources know where a key came from; a later round's error only knows the
    // re-serialized value it was extracted from.
    let metadata = figment.find_metadata(&path).or(e.metadata.as_ref());
    if let Some(source) = metadata.and_then(|md| source_of(md, &path, env)) {
        line.push_str(&format!(" ({source})"));
    }
    line
}

/// A found value for an error message: numbers and booleans as they are, text and bytes by their
/// length only.
fn shown(actual: &figment::error::Actual) -> String {
    use figment::error::Actual;
    match actual {
        Actual::Str(text) | Actual::Other(text) => {
            format!("a string ({} characters)", text.chars().count())
        }
        Actual::Bytes(bytes) => format!("bytes ({} of them)", bytes.len()),
        Actual::Char(_) => "a character".to_owned(),
        other => other.to_string(),
    }
}

/// Where the value of `key` (dotted) came from: `in <file>` or `from environment variable <VAR>`;
/// `None` for a built-in default. For problems found after extraction (invalid values).
pub fn source(figment: &Figment, key: &str, env: EnvNaming<'_>) -> Option<String> {
    figment
        .find_metadata(key)
        .and_then(|md| source_of(md, key, env))
}

fn source_of(md: &Metadata, path: &str, env: EnvNaming<'_>) -> Option<String> {
    if md.name.contains("environment") {
        let var = format!(
            "{}{}",
            env.prefix,
            path.to_ascii_uppercase().replace('.', env.separator)
        );
        return Some(format!("from environment variable {var}"));
    }
    match &md.source {
        Some(Source::File(file)) => Some(format!("in {}", file.display())),
        // Built-in defaults (code) and anything else name no place an operator can fix.
        _ => None,
    }
}
