//! The two text formats `/metrics` speaks, chosen by the scraper's `Accept` header: OpenMetrics
//! 1.0 when it asks for `application/openmetrics-text` (Prometheus does), the Prometheus text
//! format 0.0.4 otherwise (older scrapers, `curl`, other tools).
//!
//! Hand-written because prometheus-client encodes OpenMetrics only; the 0.0.4 text is derived
//! from it line by line. The differences that matter for what the agent exports: no `# EOF` and
//! no `# UNIT` lines; a counter family is named after its `_total` sample; `info` and other
//! types 0.0.4 does not know become `gauge` (named after their `_info` sample) or `untyped`;
//! `HELP` text escapes only `\` and newlines; no exemplars. Label values are escaped alike in both.

/// A text format of `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text.
    OpenMetrics,
    /// Prometheus text format 0.0.4.
    Prometheus,
}

impl Format {
    /// The format an `Accept` header (all of its values, joined with `,`) asks for: OpenMetrics
    /// when it lists `application/openmetrics-text` without `q=0`, else the 0.0.4 text.
    pub fn from_accept(accept: &str) -> Self {
        let wants_openmetrics = accept.split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default();
            media.eq_ignore_ascii_case("application/openmetrics-text")
                && !parts.any(|p| {
                    p.split_once('=').is_some_and(|(k, v)| {
                        k.trim().eq_ignore_ascii_case("q")
                            && v.trim().parse::<f64>().is_ok_and(|q| q <= 0.0)
                    })
                })
        });
        if wants_openmetrics {
            Self::OpenMetrics
        } else {
            Self::Prometheus
        }
    }

    /// The `Content-Type` of the format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The Prometheus 0.0.4 text of an OpenMetrics text (see the module documentation).
pub fn prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // prometheus-client writes HELP before TYPE: HELP waits until the type gives the name.
    let mut help: Option<(&str, String)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, unescape_quotes(text)));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => (format!("{family}_total"), "counter"),
                "info" => (format!("{family}_info"), "gauge"),
                "gauge" | "histogram" | "summary" => (family.to_owned(), kind),
                _ => (family.to_owned(), "untyped"),
            };
            if let Some((_, text)) = help.take().filter(|(helped, _)| *helped == family) {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with('#') {
            // `# UNIT`, `# EOF`: not in 0.0.4.
        } else if !line.is_empty() {
            out.push_str(strip_exemplar(line));
            out.push('\n');
        }
    }
    out
}

/// OpenMetrics escapes `"` in HELP text; 0.0.4 does not.
fn unescape_quotes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('"') => out.push('"'),
                Some(other) => {
                    out.push('\\');
                    out.push(other);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A sample line without its exemplar (` # {…} value`), which 0.0.4 has no place for. The
/// marker is looked for after the label set, where no label value can hide it.
fn strip_exemplar(line: &str) -> &str {
    let after_labels = match line.find('{') {
        Some(open) => closing_brace(line, open).unwrap_or(line.len()),
        None => 0,
    };
    match line[after_labels..].find(" # ") {
        Some(at) => &line[..after_labels + at],
        None => line,
    }
}

/// The index just after the `}` closing the label set that opens at `open`.
fn closing_brace(line: &str, open: usize) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line[open..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(open + i + 1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers_choose_the_format() {
        for (accept, format) in [
            (
                // Prometheus 2.x/3.x
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                Format::OpenMetrics,
            ),
            ("Application/OpenMetrics-Text", Format::OpenMetrics),
            ("text/plain;version=0.0.4", Format::Prometheus),
            ("*/*", Format::Prometheus),
            ("", Format::Prometheus),
            (
                "application/openmetrics-text;q=0, text/plain",
                Format::Prometheus,
            ),
        ] {
            assert_eq!(Format::from_accept(accept), format, "{accept}");
        }
    }

    #[test]
    fn openmetrics_becomes_the_0_0_4_text() {
        let om = "# HELP a_build Version of the running agent.\n\
                  # TYPE a_build info\n\
                  a_build_info{version=\"1.2.3\"} 1\n\
                  # HELP a_sent Messages \\\"sent\\\" \\\\ ok.\n\
                  # TYPE a_sent counter\n\
                  a_sent_total{kind=\"x # {y}\"} 2 # {trace=\"t\"} 1.0\n\
                  # HELP a_age_seconds Age.\n\
                  # TYPE a_age_seconds gauge\n\
                  # UNIT a_age_seconds seconds\n\
                  a_age_seconds 1.5\n\
                  # EOF\n";
        assert_eq!(
            prometheus_text(om),
            "# HELP a_build_info Version of the running agent.\n\
             # TYPE a_build_info gauge\n\
             a_build_info{version=\"1.2.3\"} 1\n\
             # HELP a_sent_total Messages \"sent\" \\\\ ok.\n\
             # TYPE a_sent_total counter\n\
             a_sent_total{kind=\"x # {y}\"} 2\n\
             # HELP a_age_seconds Age.\n\
             # TYPE a_age_seconds gauge\n\
             a_age_seconds 1.5\n"
        );
    }
}
