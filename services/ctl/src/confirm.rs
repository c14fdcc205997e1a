//! Confirmation before irreversible verbs (`delete`, `agent revoke`, `mailbox delete-token`,
//! `api-key revoke`): `--yes` skips it; otherwise a person at a terminal is asked, and a script
//! (standard input not a terminal) is refused with an error that names `--yes`, so nothing is
//! destroyed by a command that nobody confirmed.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use crate::error::CtlError;

/// Asks whether to `action` (e.g. `delete mailbox acme/scan`) unless `yes`.
pub fn confirm(action: &str, yes: bool) -> Result<(), CtlError> {
    if yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(CtlError::usage(format!(
            "refusing to {action} without confirmation: standard input is not a terminal, so give --yes (-y) to confirm"
        )));
    }
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "{action}? This cannot be undone. [y/N] ");
    let _ = err.flush();
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .map_err(|e| CtlError::usage(format!("reading the answer: {e}")))?;
    if accepted(&answer) {
        Ok(())
    } else {
        Err(CtlError::usage(format!("not confirmed: did not {action}")))
    }
}

/// `y` or `yes`, in any case.
fn accepted(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_yes_confirms() {
        for yes in ["y", "Y", "yes\n", " YES "] {
            assert!(accepted(yes), "{yes:?}");
        }
        for no in ["", "\n", "n", "no", "yess", "ok"] {
            assert!(!accepted(no), "{no:?}");
        }
    }

    #[test]
    fn yes_skips_the_question() {
        assert!(confirm("delete tenant acme", true).is_ok());
    }
}
