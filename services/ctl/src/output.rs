//! Printing results: readable tables (comfy-table), JSON or YAML (the shapes in [`crate::view`]),
//! or only the names. A leaf below the commands: they choose what to print, this module how.
//!
//! `list` prints one row per object with the columns that matter day to day, problems included
//! (token status and its last error, revoked agents); `show`/`create`/`update` print every field of
//! one object as a two-column table. `table` cuts long cells to [`CELL_WIDTH`] characters with an
//! ellipsis so a row fits a terminal, but never those of what is shown only once
//! ([`Printer::shown_once`]); `wide` prints the same tables with every cell whole.

use std::io::{self, Write};

use clap::ValueEnum;
use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;

use crate::error::CtlError;
use crate::view::{
    AgentView, ApiKeyView, AuditEventView, ConsentLinkView, DeletedView, DeviceView, MailboxView,
    ProviderView, TenantView, WhoAmIView,
};

/// How results are printed (`-o`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable tables; long cells are cut with an ellipsis.
    Table,
    /// Tables with every cell whole.
    Wide,
    /// JSON: an array for `list`, an object otherwise (shape documented in the README).
    Json,
    /// YAML: the same shapes as JSON.
    Yaml,
    /// Only the names, one per line (`TENANT/NAME` where a list spans tenants).
    Name,
}

impl OutputFormat {
    /// Whether the output is for programs (JSON or YAML) rather than people.
    pub fn is_structured(self) -> bool {
        matches!(self, OutputFormat::Json | OutputFormat::Yaml)
    }
}

/// Longest cell of a `table` (in characters, the ellipsis included).
pub const CELL_WIDTH: usize = 48;

/// An object that can be printed as a row of a list.
pub trait Listed: Serialize {
    /// Plural for messages, e.g. `mailboxes`.
    const PLURAL: &'static str;
    /// Column headers.
    fn columns() -> &'static [&'static str];
    /// One row, matching [`Listed::columns`].
    fn row(&self) -> Vec<String>;
    /// What `-o name` prints.
    fn name(&self) -> String;
    /// The tenant of the object (empty for fleet-wide ones), for lists that span tenants.
    fn tenant(&self) -> &str {
        ""
    }
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

    /// The chosen format.
    pub fn format(&self) -> OutputFormat {
        self.format
    }

    /// One object (`show`, `create`, `update`, `whoami`).
    pub fn object<T: Serialize>(&self, object: &T) -> Result<(), CtlError> {
        match self.format {
            OutputFormat::Json => emit(&json_text(object)?),
            OutputFormat::Yaml => emit(&yaml_text(object)?),
            OutputFormat::Name => emit(&object_name(&to_value(object)?)),
            OutputFormat::Table | OutputFormat::Wide => {
                emit(&field_table(&to_value(object)?, self.cut()).to_string())
            }
        }
    }

    /// One object holding what is shown this once (a new API key, an enrollment command, a
    /// consent link): as [`Printer::object`], but a table never cuts it, since a cut value is
    /// one nobody can use or get again.
    pub fn shown_once<T: Serialize>(&self, object: &T) -> Result<(), CtlError> {
        match self.format {
            OutputFormat::Table => Printer::new(OutputFormat::Wide).object(object),
            _ => self.object(object),
        }
    }

    /// A list of objects of one tenant (or of tenants themselves).
    pub fn list<T: Listed>(&self, objects: &[T]) -> Result<(), CtlError> {
        self.list_rows(objects, false)
    }

    /// A list that spans tenants: tables get a TENANT column, `-o name` prints `TENANT/NAME`.
    pub fn list_across_tenants<T: Listed>(&self, objects: &[T]) -> Result<(), CtlError> {
        self.list_rows(objects, true)
    }

    fn list_rows<T: Listed>(&self, objects: &[T], tenants: bool) -> Result<(), CtlError> {
        match self.format {
            OutputFormat::Json => emit(&json_text(objects)?),
            OutputFormat::Yaml => emit(&yaml_text(objects)?),
            OutputFormat::Name => {
                let names: Vec<String> = objects
                    .iter()
                    .map(|o| match (tenants, o.tenant()) {
                        (true, t) if !t.is_empty() => format!("{t}/{}", o.name()),
                        _ => o.name(),
                    })
                    .collect();
                emit_lines(&names)
            }
            OutputFormat::Table | OutputFormat::Wide if objects.is_empty() => {
                emit(&format!("no {}", T::PLURAL))
            }
            OutputFormat::Table | OutputFormat::Wide => {
                emit(&list_table(objects, tenants, self.cut()).to_string())
            }
        }
    }

    /// Confirmation of a delete.
    pub fn deleted(&self, deleted: &DeletedView) -> Result<(), CtlError> {
        let what = match &deleted.tenant {
            Some(tenant) => format!("{tenant}/{}", deleted.name),
            None => deleted.name.clone(),
        };
        match self.format {
            OutputFormat::Json => emit(&json_text(deleted)?),
            OutputFormat::Yaml => emit(&yaml_text(deleted)?),
            OutputFormat::Name => emit(&what),
            OutputFormat::Table | OutputFormat::Wide => {
                emit(&format!("deleted {} {what}", deleted.kind))
            }
        }
    }

    /// Raw text (completion scripts, reports).
    pub fn raw(bytes: &[u8]) -> Result<(), CtlError> {
        write_stdout(bytes)
    }

    /// The cell width limit of the format: `table` cuts, `wide` does not.
    fn cut(&self) -> Option<usize> {
        (self.format == OutputFormat::Table).then_some(CELL_WIDTH)
    }
}

/// What `-o name` prints for one object: its name (or key id), `TENANT/NAME` when it has a
/// tenant.
fn object_name(value: &Value) -> String {
    let text = |key: &str| value.get(key).and_then(Value::as_str).unwrap_or_default();
    let name = ["name", "key_id", "id", "device", "agent"]
        .iter()
        .map(|k| text(k))
        .find(|n| !n.is_empty())
        .unwrap_or_default();
    match text("tenant") {
        "" => name.to_owned(),
        tenant => format!("{tenant}/{name}"),
    }
}

/// Cuts `text` to `width` characters, the last one an ellipsis.
pub fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

fn to_value<T: Serialize + ?Sized>(object: &T) -> Result<Value, CtlError> {
    serde_json::to_value(object).map_err(|e| CtlError::Output(format!("encoding JSON: {e}")))
}

/// JSON text straight from the view structs, so keys keep their documented order.
fn json_text<T: Serialize + ?Sized>(object: &T) -> Result<String, CtlError> {
    serde_json::to_string_pretty(object)
        .map_err(|e| CtlError::Output(format!("encoding JSON: {e}")))
}

/// YAML text of the same shapes as JSON.
pub fn yaml_text<T: Serialize + ?Sized>(object: &T) -> Result<String, CtlError> {
    let text = serde_norway::to_string(object)
        .map_err(|e| CtlError::Output(format!("encoding YAML: {e}")))?;
    Ok(text.trim_end().to_owned())
}

fn emit_lines(lines: &[String]) -> Result<(), CtlError> {
    let mut bytes = Vec::new();
    for line in lines {
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
    }
    write_stdout(&bytes)
}

/// Writes `text` and a newline to standard output.
pub fn emit(text: &str) -> Result<(), CtlError> {
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

fn list_table<T: Listed>(objects: &[T], tenants: bool, cut: Option<usize>) -> Table {
    let mut table = new_table();
    let mut header: Vec<&str> = T::columns().to_vec();
    if tenants {
        header.insert(0, "TENANT");
    }
    table.set_header(header);
    for object in objects {
        let mut row = object.row();
        if tenants {
            row.insert(0, object.tenant().to_owned());
        }
        table.add_row(row.iter().map(|c| match cut {
            Some(width) => truncate(c, width),
            None => c.clone(),
        }));
    }
    table
}

/// Every field of one object, nested fields as dotted names (`smtp.port`).
fn field_table(value: &Value, cut: Option<usize>) -> Table {
    let mut rows = Vec::new();
    flatten("", value, &mut rows);
    // Identity first, bookkeeping last, the rest by name.
    rows.sort_by_key(|(field, _)| field_rank(field));
    let mut table = new_table();
    table.set_header(["FIELD", "VALUE"]);
    for (field, text) in rows {
        let text = match cut {
            Some(width) => truncate(&text, width),
            None => text,
        };
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
    fn name(&self) -> String {
        self.name.clone()
    }
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
    fn name(&self) -> String {
        self.name.clone()
    }
    fn tenant(&self) -> &str {
        &self.tenant
    }
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
    fn name(&self) -> String {
        self.name.clone()
    }
    fn tenant(&self) -> &str {
        &self.tenant
    }
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
    fn name(&self) -> String {
        self.name.clone()
    }
    fn tenant(&self) -> &str {
        &self.tenant
    }
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
    fn name(&self) -> String {
        self.name.clone()
    }
    fn tenant(&self) -> &str {
        &self.tenant
    }
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
    fn name(&self) -> String {
        self.id.clone()
    }
    fn tenant(&self) -> &str {
        &self.tenant
    }
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
    fn name(&self) -> String {
        self.id.clone()
    }
    fn tenant(&self) -> &str {
        &self.tenant
    }
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

impl Listed for ConsentLinkView {
    fn name(&self) -> String {
        self.id.clone()
    }
    fn tenant(&self) -> &str {
        &self.tenant
    }
    const PLURAL: &'static str = "consent links";
    fn columns() -> &'static [&'static str] {
        &["ID", "MAILBOX", "STATE", "EXPIRES", "CREATED BY"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.mailbox.clone(),
            self.state.clone(),
            when(&self.expire_time),
            cell(&self.created_by),
        ]
    }
}

impl Listed for WhoAmIView {
    fn name(&self) -> String {
        self.key_id.clone()
    }
    fn tenant(&self) -> &str {
        &self.tenant
    }
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
        let text = field_table(&value, None).to_string();
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
