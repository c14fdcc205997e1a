//! What a person pastes after the browser step of the authorization code flow: either the bare
//! code or the whole redirect URL (or just its query string).

use oauth2::url::{Url, form_urlencoded};
use tokenfleet_seal::Secret;

use crate::error::{ErrorClass, OAuthErrorBody, Operation, ProviderError, classify};

const MAX_CODE_LEN: usize = 8192;

fn refused(code: &str, reason: impl Into<String>, fix: &str) -> ProviderError {
    ProviderError::new(ErrorClass::InvalidRequest, code, reason, fix)
}

/// Extracts the authorization code from what a person pasted.
///
/// A redirect URL (or query string) must carry `state` equal to `expected_state`; an `error` in it
/// (`access_denied`, …) is surfaced with its description. A bare code cannot carry a state and is
/// accepted as is (percent-decoded if it was copied from an address bar).
pub fn parse_pasted_code(input: &str, expected_state: &str) -> Result<Secret, ProviderError> {
    let input = input.trim();
    if input.is_empty() {
        return Err(refused(
            "empty_input",
            "nothing was pasted",
            "paste the code or the whole address the browser was sent to",
        ));
    }
    let query = if input.contains("://") {
        let url = Url::parse(input).map_err(|e| {
            refused(
                "malformed_url",
                format!("the pasted address is not a valid URL ({e})"),
                "paste the whole address from the browser's address bar",
            )
        })?;
        // response_mode=fragment puts the parameters after `#`.
        match (url.query(), url.fragment()) {
            (Some(q), _) if q.contains("code=") || q.contains("error=") => Some(q.to_owned()),
            (_, Some(f)) if f.contains("code=") || f.contains("error=") => Some(f.to_owned()),
            _ => {
                return Err(refused(
                    "no_code_in_url",
                    "the pasted address has neither a code nor an error parameter",
                    "paste the address the browser was sent to after signing in (it contains code=…)",
                ));
            }
        }
    } else if input.starts_with('?') || input.contains("code=") || input.contains("error=") {
        Some(input.trim_start_matches(['?', '#']).to_owned())
    } else {
        None
    };

    let Some(query) = query else {
        return bare_code(input);
    };
    let mut code = None;
    let mut state = None;
    let mut error = None;
    let mut description = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "code" => code = Some(v.into_owned()),
            "state" => state = Some(v.into_owned()),
            "error" => error = Some(v.into_owned()),
            "error_description" => description = Some(v.into_owned()),
            _ => {}
        }
    }
    if let Some(error) = error {
        let mut e = classify(
            Operation::PastedCode,
            None,
            &OAuthErrorBody {
                error,
                error_description: description,
                ..Default::default()
            },
        );
        if e.class == ErrorClass::Expired {
            e.class = ErrorClass::InvalidRequest;
        }
        return Err(e);
    }
    match state {
        None => {
            return Err(refused(
                "state_missing",
                "the pasted address has no state parameter, so it cannot be matched to this consent attempt",
                "paste the whole address from the browser's address bar, unchanged",
            ));
        }
        Some(s) if s != expected_state => {
            return Err(refused(
                "state_mismatch",
                "the pasted address belongs to another consent attempt (its state does not match)",
                "start the consent again with `tokenfleetctl mailbox consent <mailbox>` and paste the address of that attempt",
            ));
        }
        Some(_) => {}
    }
    match code {
        Some(c) if !c.is_empty() => check_code(c),
        _ => Err(refused(
            "no_code_in_url",
            "the pasted address has no code",
            "paste the address the browser was sent to after signing in",
        )),
    }
}

fn bare_code(input: &str) -> Result<Secret, ProviderError> {
    let decoded = if input.contains('%') {
        form_urlencoded::parse(format!("c={input}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_else(|| input.to_owned())
    } else {
        input.to_owned()
    };
    check_code(decoded)
}

fn check_code(code: String) -> Result<Secret, ProviderError> {
    if code.len() > MAX_CODE_LEN {
        return Err(refused(
            "malformed_code",
            format!("the code is longer than {MAX_CODE_LEN} characters"),
            "paste only the code",
        ));
    }
    if !code.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(refused(
            "malformed_code",
            "the code contains spaces or characters that no authorization code has",
            "paste only the code, or the whole redirect address",
        ));
    }
    Ok(Secret::new(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_codes_are_accepted() {
        assert_eq!(
            parse_pasted_code("  0.AXoA-abc_def.ghi \n", "s")
                .unwrap()
                .expose(),
            "0.AXoA-abc_def.ghi"
        );
        assert_eq!(
            parse_pasted_code("4/0AX4XfWh-xyz", "s").unwrap().expose(),
            "4/0AX4XfWh-xyz"
        );
        // Copied out of an address bar.
        assert_eq!(
            parse_pasted_code("4%2F0AX4XfWh", "s").unwrap().expose(),
            "4/0AX4XfWh"
        );
    }

    #[test]
    fn redirect_urls_are_checked_against_the_state() {
        let url = "http://localhost:8400/callback?code=4%2F0Abc&scope=https%3A%2F%2Fmail.google.com%2F&state=st-1";
        assert_eq!(parse_pasted_code(url, "st-1").unwrap().expose(), "4/0Abc");
        let e = parse_pasted_code(url, "st-2").unwrap_err();
        assert_eq!(e.code, "state_mismatch");
        let e = parse_pasted_code("https://broker.example/cb?code=abc", "st").unwrap_err();
        assert_eq!(e.code, "state_missing");
        assert_eq!(
            parse_pasted_code("?code=abc&state=st", "st")
                .unwrap()
                .expose(),
            "abc"
        );
        assert_eq!(
            parse_pasted_code("code=abc&state=st", "st")
                .unwrap()
                .expose(),
            "abc"
        );
        assert_eq!(
            parse_pasted_code("https://b.example/cb#code=abc&state=st", "st")
                .unwrap()
                .expose(),
            "abc"
        );
    }

    #[test]
    fn errors_in_the_url_are_surfaced() {
        let e = parse_pasted_code(
            "https://b.example/cb?error=access_denied&error_description=AADSTS65004%3A+User+declined+to+consent&state=st",
            "st",
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::Declined);
        assert_eq!(
            e.provider_message(),
            Some("AADSTS65004: User declined to consent")
        );
        let e = parse_pasted_code("https://b.example/cb?error=invalid_scope&state=st", "st")
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::InvalidRequest);
    }

    #[test]
    fn junk_is_refused_with_a_reason() {
        assert_eq!(parse_pasted_code("", "s").unwrap_err().code, "empty_input");
        assert_eq!(
            parse_pasted_code("two words", "s").unwrap_err().code,
            "malformed_code"
        );
        assert_eq!(
            parse_pasted_code("https://b.example/cb?x=1", "s")
                .unwrap_err()
                .code,
            "no_code_in_url"
        );
        assert_eq!(
            parse_pasted_code("https://b.example/cb?code=&state=s", "s")
                .unwrap_err()
                .code,
            "no_code_in_url"
        );
    }
}
