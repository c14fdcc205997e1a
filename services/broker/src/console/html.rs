//! HTML building for the console. No template engine is available to this build offline, so
//! pages are assembled from strings, and **every** piece of data goes through [`esc`] (element
//! text and quoted attribute values alike); markup constants never contain data. The pages load
//! one stylesheet and one script file and contain no inline script or style attributes, so the
//! Content-Security-Policy can forbid both.

use std::fmt::Write as _;

use time::OffsetDateTime;
use tokenfleet_domain::TokenStatus;

/// Escapes text for HTML element content and double- or single-quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a path segment (names are slugs, but a segment never breaks a URL anyway).
pub fn seg(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// Who is signed in, for the page header.
#[derive(Debug, Clone)]
pub struct Chrome<'a> {
    /// `apikey id (role)`.
    pub who: String,
    /// The session's CSRF token (sign-out form).
    pub csrf: &'a str,
    /// Which nav entry is current.
    pub active: &'a str,
}

/// A whole console page. `body` is already-escaped markup.
pub fn page(title: &str, chrome: Option<&Chrome<'_>>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 2048);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{} · tokenfleet</title>\
<link rel=\"stylesheet\" href=\"/console/static/console.css\">\
<script src=\"/console/static/console.js\" defer></script></head>\n<body>\
<a class=\"skip\" href=\"#main\">Skip to content</a>\n<header class=\"top\">",
        esc(title)
    );
    // The name links home only for a signed-in operator: a mailbox owner's consent page
    // leads nowhere else (the Ingress does not route the console to owners).
    out.push_str(match chrome {
        Some(_) => "<a class=\"brand\" href=\"/console/\">tokenfleet</a>",
        None => "<span class=\"brand\">tokenfleet</span>",
    });
    if let Some(c) = chrome {
        out.push_str("<nav aria-label=\"Console\"><ul>");
        for (href, key, label) in [
            ("/console/", "overview", "Overview"),
            ("/console/agents", "agents", "Agents"),
            ("/console/audit", "audit", "Audit"),
        ] {
            let current = if key == c.active {
                " aria-current=\"page\""
            } else {
                ""
            };
            let _ = write!(out, "<li><a href=\"{href}\"{current}>{label}</a></li>");
        }
        let _ = write!(
            out,
            "</ul></nav><div class=\"who\"><span>{}</span><form method=\"post\" action=\"/console/sign-out\">{}<button class=\"btn subtle\" type=\"submit\">Sign out</button></form></div>",
            esc(&c.who),
            csrf_field(c.csrf)
        );
    }
    let _ = write!(
        out,
        "</header>\n<main id=\"main\" tabindex=\"-1\">\n<h1>{}</h1>\n{body}\n</main>\n</body></html>\n",
        esc(title)
    );
    out
}

/// The hidden CSRF field of a form.
pub fn csrf_field(token: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(token)
    )
}

/// A POST form with one button (and the CSRF field). `confirm`: the script asks first.
pub fn action_button(
    action: &str,
    csrf: &str,
    label: &str,
    class: &str,
    confirm: Option<&str>,
) -> String {
    let confirm = confirm
        .map(|c| format!(" data-confirm=\"{}\"", esc(c)))
        .unwrap_or_default();
    format!(
        "<form class=\"inline\" method=\"post\" action=\"{}\"{confirm}>{}<button class=\"btn {}\" type=\"submit\">{}</button></form>",
        esc(action),
        csrf_field(csrf),
        esc(class),
        esc(label)
    )
}

/// The token status as words and a CSS class.
pub fn status_words(status: TokenStatus) -> (&'static str, &'static str) {
    match status {
        TokenStatus::NotRetrieved => ("NOT_RETRIEVED", "warn"),
        TokenStatus::ConsentPending => ("CONSENT_PENDING", "warn"),
        TokenStatus::Active => ("ACTIVE", "ok"),
        TokenStatus::RefreshFailing => ("REFRESH_FAILING", "bad"),
        TokenStatus::ReauthRequired => ("REAUTH_REQUIRED", "bad"),
        TokenStatus::Disabled => ("DISABLED", "muted"),
    }
}

/// A status badge.
pub fn badge(text: &str, class: &str) -> String {
    format!(
        "<span class=\"badge {}\" data-status=\"{}\">{}</span>",
        esc(class),
        esc(text),
        esc(text)
    )
}

/// A protobuf timestamp as a time.
pub fn to_time(ts: Option<&prost_types::Timestamp>) -> Option<OffsetDateTime> {
    let ts = ts?;
    if ts.seconds == 0 && ts.nanos == 0 {
        return None;
    }
    OffsetDateTime::from_unix_timestamp(ts.seconds).ok()
}

/// `2026-12-06 08:00 UTC (in 3 h)`, or `—`.
pub fn when(ts: Option<&prost_types::Timestamp>, now: OffsetDateTime) -> String {
    when_at(to_time(ts), now)
}

/// [`when`] of a domain time.
pub fn when_at(t: Option<OffsetDateTime>, now: OffsetDateTime) -> String {
    let Some(t) = t else {
        return "—".to_owned();
    };
    let fmt = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC");
    let text = t.format(&fmt).unwrap_or_default();
    format!(
        "<time datetime=\"{}\">{}</time> <span class=\"rel\">({})</span>",
        t.unix_timestamp(),
        esc(&text),
        esc(&relative(t, now))
    )
}

/// `in 3 h`, `5 min ago`.
pub fn relative(t: OffsetDateTime, now: OffsetDateTime) -> String {
    let secs = (t - now).whole_seconds();
    let abs = secs.unsigned_abs();
    let span = if abs < 90 {
        format!("{abs} s")
    } else if abs < 90 * 60 {
        format!("{} min", abs / 60)
    } else if abs < 36 * 3600 {
        format!("{} h", abs / 3600)
    } else {
        format!("{} days", abs / 86400)
    };
    if secs >= 0 {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// A notice box (`ok`, `warn`, `bad`) with escaped text.
pub fn notice(class: &str, text: &str) -> String {
    format!(
        "<div class=\"notice {}\" role=\"status\">{}</div>",
        esc(class),
        esc(text)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_text_and_attributes() {
        assert_eq!(
            esc("<script>\"a\" & 'b'</script>"),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;"
        );
        let p = page("<x>", None, "");
        assert!(p.contains("<h1>&lt;x&gt;</h1>"));
        assert!(!p.contains("<script>"), "no inline script: {p}");
    }

    #[test]
    fn relative_times() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(100);
        assert_eq!(relative(now + time::Duration::seconds(30), now), "in 30 s");
        assert_eq!(relative(now - time::Duration::hours(3), now), "3 h ago");
    }
}
