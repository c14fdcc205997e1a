//! How names from requests appear in messages, log fields and audit targets: shortened and
//! escaped, so a hostile name cannot forge a log line or flood a message.

/// A name from the request, shortened and escaped for log fields, audit targets and messages.
pub fn shown(value: &str) -> String {
    // Most names are short printable ASCII with nothing to escape: those are shown as they are.
    let plain = |b: &u8| (0x20..0x7f).contains(b) && !matches!(b, b'\\' | b'\'' | b'"');
    if value.len() <= 64 && value.as_bytes().iter().all(plain) {
        return value.to_owned();
    }
    let mut s: String = value
        .chars()
        .take(64)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().count() > 64 {
        s.push('…');
    }
    s
}

/// Resource path of an object inside a tenant, for audit targets.
pub fn object_path(tenant: &str, collection: &str, name: &str) -> String {
    format!("tenants/{}/{collection}/{}", shown(tenant), shown(name))
}

/// Names of the first few referrers, quoted, for FAILED_PRECONDITION messages.
pub fn name_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = names.into_iter().map(|n| format!("`{n}`")).collect();
    list(quoted.iter().map(String::as_str))
}

/// The first ten items joined with `, `, and how many more there are.
pub fn list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<&str> = items.into_iter().collect();
    let mut listed: Vec<String> = names.iter().take(10).map(|n| (*n).to_owned()).collect();
    if names.len() > 10 {
        listed.push(format!("and {} more", names.len() - 10));
    }
    listed.join(", ")
}

/// Records which tenant and object the current call concerns in its tracing span.
pub fn span_object(tenant: &str, name: &str) {
    let span = tracing::Span::current();
    span.record("tenant", shown(tenant).as_str());
    span.record("object", shown(name).as_str());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_shortened_and_escaped() {
        assert_eq!(shown("a\nb"), "a\\nb");
        assert_eq!(shown(&"x".repeat(70)).chars().count(), 65);
        assert_eq!(object_path("t", "devices", "d"), "tenants/t/devices/d");
        let many: Vec<String> = (0..12).map(|i| i.to_string()).collect();
        assert!(name_list(many.iter().map(String::as_str)).ends_with("and 2 more"));
    }

    #[test]
    fn plain_names_are_shown_as_escaping_them_would() {
        let escaped = |v: &str| {
            let mut s: String = v.chars().take(64).flat_map(char::escape_debug).collect();
            if v.chars().count() > 64 {
                s.push('…');
            }
            s
        };
        let mut samples: Vec<String> = (0u8..=0x7f).map(|b| format!("a{}b", b as char)).collect();
        samples.extend(
            ["", "printer-1", "x y", "é", "\u{200b}", "tab\t"]
                .iter()
                .map(|s| (*s).to_owned()),
        );
        samples.extend([63, 64, 65].map(|n| "n".repeat(n)));
        for v in &samples {
            assert_eq!(shown(v), escaped(v), "{v:?}");
        }
    }
}
