//! The troubleshooting guide (`docs/troubleshooting.md`, compiled in) served as a page, so the
//! console's error messages can link to its stable anchors (`<a id="…">` in the guide) on the
//! broker itself. Only what the guide uses is rendered: headings, paragraphs, tables (one row
//! per error text, carrying the anchor) and inline code; everything else is escaped text.

use std::fmt::Write as _;

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

use super::html::{esc, page};

const GUIDE: &str = include_str!("../../../../docs/troubleshooting.md");

/// The anchors the guide defines.
fn anchors() -> impl Iterator<Item = &'static str> {
    GUIDE
        .split("<a id=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
}

/// The guide's anchor for an error code (e.g. `aadsts700082`, `invalid_grant`,
/// `account_mismatch`, a verdict like `smtp_auth_disabled`), else the anchor of the status word
/// (`REAUTH_REQUIRED` → `reauth-required`).
pub fn anchor_for(code: &str, status: &str) -> String {
    let norm = |s: &str| s.trim().to_lowercase().replace(['_', ' ', '.'], "-");
    let code = norm(code);
    let digits: String = code.chars().filter(char::is_ascii_digit).collect();
    for candidate in [
        code.clone(),
        format!("aadsts{digits}"),
        match code.as_str() {
            "smtp-auth-disabled" => "smtp-535-5-7-139".to_owned(),
            "token-rejected" => "smtp-535-5-7-3".to_owned(),
            "mechanism-not-offered" => "smtp-mechanism-not-offered".to_owned(),
            "access-denied" | "authorization-declined" => "expired-token".to_owned(),
            _ => String::new(),
        },
        norm(status),
    ] {
        if !candidate.is_empty() && candidate != "aadsts" && anchors().any(|a| a == candidate) {
            return candidate;
        }
    }
    "tokenfleet-states".to_owned()
}

/// Inline markdown of one cell or line: `code` and [text](link) (links to other guides are shown
/// as text, since only this guide is served), everything escaped.
fn inline(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    // Anchors become ids of the row; drop them from the text.
    while let Some(start) = rest.find("<a id=\"") {
        out.push_str(&code_spans(&rest[..start]));
        rest = rest[start..].split_once("</a>").map_or("", |(_, r)| r);
    }
    out.push_str(&code_spans(rest));
    out
}

fn code_spans(text: &str) -> String {
    let mut out = String::new();
    for (i, part) in text.split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "<code>{}</code>", esc(part));
        } else {
            out.push_str(&esc(part));
        }
    }
    out
}

fn render() -> String {
    let mut out = String::new();
    let mut in_table = false;
    for line in GUIDE.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('|') {
            let cells: Vec<&str> = trimmed.trim_matches('|').split(" | ").collect();
            if cells.iter().all(|c| {
                c.trim()
                    .chars()
                    .all(|ch| ch == '-' || ch == ':' || ch == ' ')
            }) {
                continue;
            }
            if !in_table {
                out.push_str("<div class=\"table-wrap\"><table class=\"guide\"><tbody>");
                in_table = true;
            }
            let id = trimmed
                .split("<a id=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .map(|id| format!(" id=\"{}\"", esc(id)))
                .unwrap_or_default();
            let _ = write!(out, "<tr{id}>");
            for c in cells {
                let _ = write!(out, "<td>{}</td>", inline(c.trim()));
            }
            out.push_str("</tr>");
            continue;
        }
        if in_table {
            out.push_str("</tbody></table></div>");
            in_table = false;
        }
        if let Some(h) = trimmed.strip_prefix("### ") {
            let _ = write!(out, "<h3>{}</h3>", inline(h));
        } else if let Some(h) = trimmed.strip_prefix("## ") {
            let id = if h == "tokenfleet states" {
                " id=\"tokenfleet-states\""
            } else {
                ""
            };
            let _ = write!(out, "<h2{id}>{}</h2>", inline(h));
        } else if trimmed.starts_with("# ") || trimmed.is_empty() {
        } else {
            let _ = write!(out, "<p>{}</p>", inline(trimmed));
        }
    }
    if in_table {
        out.push_str("</tbody></table></div>");
    }
    out
}

pub(super) async fn troubleshooting() -> Response {
    (
        StatusCode::OK,
        Html(page("Troubleshooting", None, &render())),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_find_their_anchor() {
        assert_eq!(
            anchor_for("aadsts700082", "REAUTH_REQUIRED"),
            "aadsts700082"
        );
        assert_eq!(anchor_for("AADSTS70043", ""), "aadsts70043");
        assert_eq!(anchor_for("account_mismatch", ""), "account-mismatch");
        assert_eq!(anchor_for("invalid_grant", ""), "invalid-grant");
        assert_eq!(anchor_for("", "REAUTH_REQUIRED"), "reauth-required");
        assert_eq!(anchor_for("smtp_auth_disabled", ""), "smtp-535-5-7-139");
        assert_eq!(anchor_for("nonsense", "nonsense"), "tokenfleet-states");
    }

    #[test]
    fn the_guide_renders_with_its_anchors_and_no_raw_markup() {
        let html = render();
        assert!(html.contains("<tr id=\"aadsts700082\">"));
        assert!(html.contains("<tr id=\"reauth-required\">"));
        assert!(!html.contains("<a id="), "anchors become row ids");
    }
}
