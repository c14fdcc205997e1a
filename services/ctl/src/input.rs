//! Reading values from files (or `-` for standard input): secrets and certificates are never
//! taken as flag values, so they stay out of shell history and process listings.

use std::io::Read;
use std::path::Path;

use crate::error::CtlError;

/// Reads the files named by flags; standard input can be used by at most one of them.
#[derive(Debug, Default)]
pub struct FileInput {
    stdin_used_by: Option<&'static str>,
}

impl FileInput {
    /// A reader that has not used standard input yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A secret (client secret, password, key): the file's contents without the trailing line
    /// break. Refuses an empty value. The error names the flag and file, never the content.
    pub fn secret(&mut self, flag: &'static str, path: &Path) -> Result<String, CtlError> {
        let text = self.read(flag, path)?;
        let value = text.trim_end_matches(['\r', '\n']).to_owned();
        if value.trim().is_empty() {
            return Err(CtlError::usage(format!(
                "{flag} {}: the file is empty",
                shown(path)
            )));
        }
        Ok(value)
    }

    /// A text document (PEM certificate, JSON key) as it is in the file.
    pub fn document(&mut self, flag: &'static str, path: &Path) -> Result<String, CtlError> {
        let text = self.read(flag, path)?;
        if text.trim().is_empty() {
            return Err(CtlError::usage(format!(
                "{flag} {}: the file is empty",
                shown(path)
            )));
        }
        Ok(text)
    }

    fn read(&mut self, flag: &'static str, path: &Path) -> Result<String, CtlError> {
        if path == Path::new("-") {
            if let Some(other) = self.stdin_used_by {
                return Err(CtlError::usage(format!(
                    "{flag} -: standard input is already read for {other}; use a file for one of them"
                )));
            }
            self.stdin_used_by = Some(flag);
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).map_err(|e| {
                CtlError::usage(format!(
                    "{flag} -: reading standard input: {}",
                    io_problem(&e)
                ))
            })?;
            return Ok(text);
        }
        std::fs::read_to_string(path)
            .map_err(|e| CtlError::usage(format!("{flag} {}: {}", shown(path), io_problem(&e))))
    }
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// A short description of an I/O problem with a file.
pub fn io_problem(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound => "no such file".to_owned(),
        ErrorKind::PermissionDenied => "permission denied".to_owned(),
        ErrorKind::InvalidData => "not UTF-8 text".to_owned(),
        ErrorKind::IsADirectory => "is a directory".to_owned(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_lose_the_trailing_newline_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "  s3cret value \r\n").unwrap();
        let value = FileInput::new()
            .secret("--client-secret-file", &path)
            .unwrap();
        assert_eq!(value, "  s3cret value ");
    }

    #[test]
    fn problems_name_the_flag_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let err = FileInput::new()
            .secret("--client-secret-file", &empty)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--client-secret-file "), "{err}");
        assert!(err.ends_with("the file is empty"), "{err}");
        let err = FileInput::new()
            .secret("--ingress-password-file", &dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--ingress-password-file"), "{err}");
        assert!(err.ends_with("no such file"), "{err}");
    }

    #[test]
    fn stdin_is_read_at_most_once() {
        let mut input = FileInput::new();
        input.stdin_used_by = Some("--client-secret-file");
        let err = input
            .secret("--service-account-key-file", Path::new("-"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("already read for --client-secret-file"),
            "{err}"
        );
    }
}
