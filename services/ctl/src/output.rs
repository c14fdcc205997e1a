//! Printing results: JSON (the shapes in [`crate::view`]) or readable tables (comfy-table).
//!
//! `list` prints one row per object with the columns that matter day to day, problems included
//! (token status and its last error, revoked agents); `show`/`create`/`update` print every field of
//! one object as a two-column table.

use std::io::{self, Write};

use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;

use crate::cli::OutputFormat;
use crate::error::CtlError;
use crate::view::{
    AgentView, ApiKeyView, AuditEventView, DeletedView, DeviceView, MailboxView, ProviderView,
    TenantView, WhoAmIView,
};

/// An object that can be printed as a row of a list.
pub trait Listed: Serialize {
    /// Plural for messages, e.g. `mailboxes`.
    const PLURAL: &'static str;
    /// Column headers.
    fn columns() -> &'static [&'static str];
    /// One row, matching [`Listed::columns`].
    fn row(&self) -> Vec<String>;
}

/// Prints results in the chosen format.
#[derive(Debug, Clone, Copy)]
pub struct Printer {
    format: OutputFormat,
}

impl Printer {
    /// A printer for `format`.
    pub fn new(format: OutputFormat) -> Self {
        Self { format }
    }

    /// One object (`show`, `create`, `update`, `whoami`).
    pub fn object<T: Serialize>(&self, object: &T) -> Result<(), CtlError> {
        match self.format {
            OutputFormat::Json => emit(&json_text(object)?),
            OutputFormat::Table => emit(&field_table(&to_value(object)?).to_string()),
        }
    }

    /// A list of objects.
    pub fn list<T: Listed>(&self, objects: &[T]) -> Result<(), CtlError> {
        match self.format {
            OutputFormat::Json => emit(&json_text(objects)?),
            OutputFormat::Table if objects.is_empty() => emit(&format!("no {}", T::PLURAL)),
            OutputFormat::Table => emit(&list_table(objects).to_string()),
        }
    }

    /// Confirmation of a delete.
    pub fn deleted(&self, deleted: &DeletedView) -> Result<(), CtlError> {
        match self.format {
            OutputFormat::Json => emit(&json_text(deleted)?),
            OutputFormat::Table => {
                let what = match &deleted.tenant {
                    Some(tenant) => format!("{tenant}/{}", deleted.name),
                    None => deleted.name.clone(),
                };
                emit(&format!("deleted {} {what}", deleted.kind))
            }
        }
    }

    /// Raw text (completion scripts).
    pub fn raw(bytes: &[u8]) -> Result<(), CtlError> {
        write_stdout(bytes)
    }
}

fn to_value<T: Serialize + ?Sized>(object: &T) -> Result<Value, CtlError> {
    serde_json::to_value(object).map_err(|e| CtlError::Output(format!("encoding JSON: {e}")))
}

/// JSON text straight from the view structs, so keys keep their documented order.
fn json_text<T: Serialize + ?Sized>(object: &T) -> Result<String, CtlError> {
    serde_json::to_string_pretty(object)
        .map_err(|e| CtlError::Output(format!("encoding JSON: {e}")))
}

fn emit(text: &str) -> Result<(), CtlError> {
    let mut bytes = text.as_bytes().to_vec();
    bytes.push(b'\n');
    write_stdout(&bytes)
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> Result<(), CtlError> {
    let mut out = io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CtlError::Output(format!("writing output: {e}"))),
    }
}

fn new_table() -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic);
    table
}

fn list_table<T: Listed>(objects: &[T]) -> Table {
    let mut table = new_table();
    table.set_header(T::columns().iter().copied());
    for object in objects {
        table.add_row(object.row());
    }
    table
}

/// Every field of one object, nested fields as dotted names (`smtp.port`).
fn field_table(value: &Value) -> Table {
    let mut rows = Vec::new();
    flatten("", value, &mut rows);
    // Identity first, bookkeeping last, the rest by name.
    rows.sort_by_key(|(field, _)| field_rank(field));
    let mut table = new_table();
    table.set_header(["FIELD", "VALUE"]);
    for (field, text) in rows {
        table.add_row([field, text]);
    }
    table
}

fn field_rank(field: &str) -> u8 {
    match field {
        "tenant" | "key_id" => 0,
        "name" => 1,
        "create_time" => 3,
        "update_time" => 4,
        "version" => 5,
        _ => 2,
    }
}

fn flatten(prefix: &str, value: &Value, rows: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&name, inner, rows);
            }
        }
        Value::String(s) if prefix.ends_with("time") => {
            rows.push((prefix.to_owned(), when(&Some(s.clone()))));
        }
        other => rows.push((prefix.to_owned(), scalar_text(other))),
    }
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => multi_line_summary(s),
        Value::Array(items) if items.is_empty() => "-".to_owned(),
        Value::Array(items) => items.iter().map(scalar_text).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// PEM blocks and other multi-line text would swamp a table: show the first line and a count.
fn multi_line_summary(text: &str) -> String {
    let lines: Vec<&str> = text.trim().lines().collect();
    match lines.as_slice() {
        [] => "-".to_owned(),
        [one] => (*one).to_owned(),
        [first, ..] => format!("{first} … ({} lines)", lines.len()),
    }
}

/// Text of an optional cell: `-` when empty.
fn cell(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

/// A timestamp for a table: RFC 3339 to the second.
fn when(rfc3339: &Option<String>) -> String {
    rfc3339
        .as_deref()
        .and_then(|t| time::OffsetDateTime::parse(t, &Rfc3339).ok())
        .and_then(|t| t.replace_nanosecond(0).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "-".to_owned())
}

impl Listed for TenantView {
    const PLURAL: &'static str = "tenants";
    fn columns() -> &'static [&'static str] {
        &["NAME", "DISPLAY NAME", "CREATED", "VERSION"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            cell(&self.display_name),
            when(&self.create_time),
            self.version.to_string(),
        ]
    }
}

impl Listed for ProviderView {
    const PLURAL: &'static str = "providers";
    fn columns() -> &'static [&'static str] {
        &[
            "NAME",
            "KIND",
            "AUTHORITY",
            "CLIENT ID",
            "CREDENTIAL",
            "VERSION",
        ]
    }
    fn row(&self) -> Vec<String> {
        let credential = match (self.client_secret_set, self.service_account_key_set) {
            (true, true) => "secret + key",
            (true, false) => "client secret",
            (false, true) => "service-account key",
            (false, false) => "none",
        };
        vec![
            self.name.clone(),
            self.kind.clone(),
            cell(&self.authority),
            cell(&self.client_id),
            credential.to_owned(),
            self.version.to_string(),
        ]
    }
}

impl Listed for MailboxView {
    const PLURAL: &'static str = "mailboxes";
    fn columns() -> &'static [&'static str] {
        &[
            "NAME", "ADDRESS", "PROVIDER", "GRANT", "KIND", "PURPOSES", "TOKEN", "PROBLEM",
        ]
    }
    fn row(&self) -> Vec<String> {
        // Token states are upper case on every surface (DESIGN.md), so problems stand out.
        let status = self.token.status.to_ascii_uppercase();
        let problem = match &self.token.last_error {
            Some(e) => {
                let mut text = if e.code.is_empty() {
                    e.reason.clone()
                } else {
                    format!("{}: {}", e.code, e.reason)
                };
                if !e.fix.is_empty() {
                    text.push_str(" — fix: ");
                    text.push_str(&e.fix);
                }
                text
            }
            None if self.disabled => "disabled by an operator".to_owned(),
            None => match &self.token.pending_device_code {
                Some(c) => format!(
                    "waiting for sign-in: enter {} at {}",
                    c.user_code, c.verification_uri
                ),
                None => "-".to_owned(),
            },
        };
        let problem = match (
            self.token.consecutive_failures,
            self.token.clock_skew_seconds,
        ) {
            (0, skew) if skew.abs() <= 60 => problem,
            (failures, skew) => {
                let mut notes = Vec::new();
                if failures > 0 {
                    notes.push(format!("{failures} failed refreshes"));
                }
                if skew.abs() > 60 {
                    notes.push(format!("clock skew {skew}s"));
                }
                if problem == "-" {
                    notes.join("; ")
                } else {
                    format!("{problem} ({})", notes.join("; "))
                }
            }
        };
        vec![
            self.name.clone(),
            self.address.clone(),
            self.provider.clone(),
            self.grant_type.clone(),
            self.kind.clone(),
            self.purposes.join(","),
            status,
            problem,
        ]
    }
}

impl Listed for DeviceView {
    const PLURAL: &'static str = "devices";
    fn columns() -> &'static [&'static str] {
        &[
            "NAME",
            "AGENT",
            "SENDER MODE",
            "MAILBOX",
            "SMTP",
            "FETCH",
            "INGRESS USER",
        ]
    }
    fn row(&self) -> Vec<String> {
        let mailbox = match self.sender_mode.as_str() {
            "fixed_admin" => cell(&self.admin_mailbox),
            "bulk" => cell(&self.bulk_mailbox),
            _ if self.allowed_mailboxes.is_empty() => "(per user)".to_owned(),
            _ => format!("(per user) + {}", self.allowed_mailboxes.join(",")),
        };
        let mut smtp = match &self.smtp {
            Some(s) if !s.server.is_empty() => format!("{}:{} {}", s.server, s.port, s.security),
            _ => "-".to_owned(),
        };
        if self
            .smtp
            .as_ref()
            .is_some_and(|s| s.insecure_allow_cleartext_tokens)
        {
            smtp.push_str(" INSECURE-CLEARTEXT-TOKENS");
        }
        let fetch = match &self.fetch {
            Some(f) if !f.server.is_empty() && f.interval_seconds > 0 => format!(
                "{} {}:{} every {}s",
                f.protocol, f.server, f.port, f.interval_seconds
            ),
            Some(f) if !f.server.is_empty() => {
                format!("{} {}:{} (off)", f.protocol, f.server, f.port)
            }
            _ => "-".to_owned(),
        };
        let ingress = self
            .ingress
            .as_ref()
            .map(|i| cell(&i.username))
            .unwrap_or_else(|| "-".to_owned());
        vec![
            self.name.clone(),
            if self.agent.is_empty() {
                "(unassigned)".to_owned()
            } else {
                self.agent.clone()
            },
            self.sender_mode.clone(),
            mailbox,
            smtp,
            fetch,
            ingress,
        ]
    }
}

impl Listed for AgentView {
    const PLURAL: &'static str = "agents";
    fn columns() -> &'static [&'static str] {
        &[
            "NAME",
            "DISPLAY NAME",
            "STATE",
            "LAST SEEN",
            "SOFTWARE",
            "CERT EXPIRES",
        ]
    }
    fn row(&self) -> Vec<String> {
        let state = if self.revoked {
            "REVOKED"
        } else if self.certificate_expire_time.is_none() {
            "not enrolled"
        } else if self.last_seen_time.is_none() {
            "never seen"
        } else {
            "enrolled"
        };
        vec![
            self.name.clone(),
            cell(&self.display_name),
            state.to_owned(),
            when(&self.last_seen_time),
            cell(&self.software_version),
            when(&self.certificate_expire_time),
        ]
    }
}

impl Listed for AuditEventView {
    const PLURAL: &'static str = "audit events";
    fn columns() -> &'static [&'static str] {
        &["TIME", "ACTOR", "ACTION", "TARGET", "RESULT", "DETAIL"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            when(&self.time),
            self.actor.clone(),
            self.action.clone(),
            cell(&self.target),
            self.result.clone(),
            cell(&self.detail),
        ]
    }
}

impl Listed for ApiKeyView {
    const PLURAL: &'static str = "API keys";
    fn columns() -> &'static [&'static str] {
        &["ID", "ROLE", "TENANT", "DESCRIPTION", "CREATED"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.role.clone(),
            if self.tenant.is_empty() {
                "(all tenants)".to_owned()
            } else {
                self.tenant.clone()
            },
            cell(&self.description),
            when(&self.create_time),
        ]
    }
}

impl Listed for WhoAmIView {
    const PLURAL: &'static str = "identities";
    fn columns() -> &'static [&'static str] {
        &["KEY ID", "ROLE", "TENANT"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.key_id.clone(),
            self.role.clone(),
            if self.tenant.is_empty() {
                "(all tenants)".to_owned()
            } else {
                self.tenant.clone()
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{TokenErrorView, TokenStateView};

    fn mailbox(status: &str, error: Option<TokenErrorView>) -> MailboxView {
        MailboxView {
            tenant: "acme".into(),
            name: "scan".into(),
            address: "scan@acme.example".into(),
            provider: "m365".into(),
            grant_type: "delegated_device_code".into(),
            kind: "bulk".into(),
            purposes: vec!["send".into(), "pop".into()],
            disabled: false,
            token: TokenStateView {
                status: status.into(),
                last_refresh_time: None,
                access_token_expire_time: None,
                last_error: error,
                pending_device_code: None,
                refresh_token_expire_time: None,
                next_refresh_time: None,
                consecutive_failures: 0,
                clock_skew_seconds: 0,
            },
            create_time: Some("2024-05-06T07:08:09.123456Z".into()),
            update_time: None,
            version: 1,
            consent_account: String::new(),
        }
    }

    #[test]
    fn mailbox_rows_show_token_problems() {
        let row = mailbox(
            "reauth_required",
            Some(TokenErrorView {
                code: "AADSTS700082".into(),
                reason: "refresh token expired after inactivity".into(),
                fix: "run the consent again".into(),
                time: None,
            }),
        )
        .row();
        assert_eq!(row[6], "REAUTH_REQUIRED");
        assert_eq!(
            row[7],
            "AADSTS700082: refresh token expired after inactivity — fix: run the consent again"
        );
        assert_eq!(row.len(), MailboxView::columns().len());
    }

    #[test]
    fn mailbox_rows_show_pending_consent_and_failures() {
        let mut m = mailbox("consent_pending", None);
        m.token.pending_device_code = Some(crate::view::DeviceCodeChallengeView {
            user_code: "ABCD-EFGH".into(),
            verification_uri: "https://login.example/device".into(),
            expire_time: None,
            message: String::new(),
            interval_seconds: 5,
        });
        assert_eq!(
            m.row()[7],
            "waiting for sign-in: enter ABCD-EFGH at https://login.example/device"
        );
        let mut m = mailbox(
            "refresh_failing",
            Some(TokenErrorView {
                code: "temporarily_unavailable".into(),
                reason: "provider answered 503".into(),
                fix: String::new(),
                time: None,
            }),
        );
        m.token.consecutive_failures = 3;
        m.token.clock_skew_seconds = -120;
        assert_eq!(
            m.row()[7],
            "temporarily_unavailable: provider answered 503 (3 failed refreshes; clock skew -120s)"
        );
    }

    #[test]
    fn field_table_flattens_nested_objects() {
        let value = serde_json::json!({
            "name": "mfp-1",
            "smtp": {"server": "smtp.office365.com", "port": 587},
            "fetch": null,
            "allowed_sources": ["10.0.0.1/32", "10.0.0.2/32"],
            "extra_ca_pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "display_name": ""
        });
        let mut rows = Vec::new();
        flatten("", &value, &mut rows);
        let find = |key: &str| {
            rows.iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        assert_eq!(find("smtp.port"), "587");
        assert_eq!(find("smtp.server"), "smtp.office365.com");
        assert_eq!(find("fetch"), "-");
        assert_eq!(find("allowed_sources"), "10.0.0.1/32, 10.0.0.2/32");
        assert_eq!(
            find("extra_ca_pem"),
            "-----BEGIN CERTIFICATE----- … (3 lines)"
        );
        assert_eq!(find("display_name"), "-");
    }

    #[test]
    fn field_table_puts_identity_first_and_bookkeeping_last() {
        let value = serde_json::json!({
            "version": 2,
            "address": "a@b.c",
            "update_time": "2024-05-06T07:08:09.5Z",
            "name": "scan",
            "tenant": "acme",
            "create_time": null
        });
        let text = field_table(&value).to_string();
        let order: Vec<usize> = [
            "tenant",
            "name",
            "address",
            "create_time",
            "update_time",
            "version",
        ]
        .iter()
        .map(|f| text.find(&format!(" {f} ")).unwrap_or(usize::MAX))
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
        assert!(text.contains("2024-05-06T07:08:09Z"), "{text}");
    }

    #[test]
    fn table_times_are_cut_to_the_second() {
        assert_eq!(
            when(&Some("2024-05-06T07:08:09.123456Z".into())),
            "2024-05-06T07:08:09Z"
        );
        assert_eq!(when(&None), "-");
    }
}
