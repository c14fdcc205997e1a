//! Page requests of `List*` operations: the page size and the opaque page token (the base64 of
//! the last id of the previous page).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;

use super::Error;

/// Default page size of `List*` operations.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page size of `List*` operations.
pub const MAX_PAGE_SIZE: usize = 1000;

/// One page request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// Entries per page.
    pub size: usize,
    /// Decoded page token: list entries after (records) or before (audit) this id.
    pub cursor: Option<String>,
}

fn malformed() -> Error {
    Error::InvalidArgument("page_token: malformed (pass `next_page_token` back unchanged)".into())
}

/// Validates `page_size` and decodes `page_token`.
pub fn page_request(page_size: i32, page_token: &str) -> Result<PageRequest, Error> {
    let size = match usize::try_from(page_size) {
        Ok(0) => DEFAULT_PAGE_SIZE,
        Ok(n) if n <= MAX_PAGE_SIZE => n,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "page_size: must be 0-{MAX_PAGE_SIZE} (0 = {DEFAULT_PAGE_SIZE}), got {page_size}"
            )));
        }
    };
    let cursor = if page_token.is_empty() {
        None
    } else {
        let bytes = B64URL.decode(page_token).map_err(|_| malformed())?;
        let text = String::from_utf8(bytes).map_err(|_| malformed())?;
        if text.is_empty() || text.len() > 128 || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(malformed());
        }
        tokenfleet_domain::name("page_token", &text).map_err(|_| malformed())?;
        Some(text)
    };
    Ok(PageRequest { size, cursor })
}

/// The opaque page token for a cursor id.
pub fn page_token(id: &str) -> String {
    B64URL.encode(id.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_requests() {
        assert_eq!(page_request(0, "").unwrap().size, DEFAULT_PAGE_SIZE);
        assert_eq!(page_request(1000, "").unwrap().size, 1000);
        for bad in [-1, 1001] {
            let err = page_request(bad, "").unwrap_err();
            assert!(matches!(&err, Error::InvalidArgument(m) if m.starts_with("page_size:")));
        }
        let token = page_token("acme-2");
        assert_eq!(
            page_request(5, &token).unwrap().cursor.as_deref(),
            Some("acme-2")
        );
        for bad in [
            "!!!",
            "%%",
            &B64URL.encode([0xff, 0xfe]),
            &B64URL.encode("a b"),
        ] {
            let err = page_request(5, bad).unwrap_err();
            assert!(err.to_string().starts_with("page_token:"), "{err}");
        }
    }
}
