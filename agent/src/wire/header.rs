//! The RFC 5322 header block of a message, sans-IO, one parser for everything in the agent that
//! reads headers: the ingress's sender policy (which reads `From`, and splices a new `From` in
//! while every other byte stays as it was) and the mail APIs (which compare `To`/`Cc`/`Bcc` with
//! the envelope).
//!
//! - [`split_header_block`] and [`fields`]: the block and its fields as byte ranges that cover
//!   every byte of the block — folded lines belong to their field, and a line that is neither a
//!   field nor a continuation is a nameless field of its own — so a rewrite that drops or
//!   replaces fields keeps all the others byte for byte (8-bit values included).
//! - [`Field::addresses`]: the addresses of an address-list field, parsed by stalwart's
//!   `mail-parser` (quoted strings, comments, groups, encoded words, folding).
//!
//! The field splitter is hand-written (40 lines): `mail-parser`'s header parser returns decoded
//! values with offsets only for the fields it recognises as such, and a splice must also account
//! for the malformed lines a printer writes.

use std::borrow::Cow;
use std::ops::Range;

use mail_parser::parsers::MessageStream;
use mail_parser::{Address, HeaderValue};

/// Largest header value handed to the address parser; longer values are cut (no printer sends
/// a `From` or `To` of 64 KiB, and the cap bounds the parser's work).
pub const MAX_ADDRESS_FIELD: usize = 64 * 1024;

/// Splits a message into its header block (including the line end of the last header line)
/// and the rest (the empty line and the body). A message without an empty line is all header.
pub fn split_header_block(message: &[u8]) -> (&[u8], &[u8]) {
    if message.starts_with(b"\r\n") {
        return message.split_at(0);
    }
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => message.split_at(i + 2),
        None => (message, &message[message.len()..]),
    }
}

/// One header field: its name and its raw bytes (first line and continuation lines, each with
/// its CRLF), with their place in the block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<'a> {
    /// The name before the colon, trimmed (empty for a line without a colon).
    pub name: String,
    /// The raw bytes.
    pub raw: &'a [u8],
    /// Where `raw` is in the block.
    pub range: Range<usize>,
}

impl Field<'_> {
    /// Whether the field is named `name` (case-insensitive).
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }

    /// The raw value: the bytes after the colon, folding and final CRLF kept.
    pub fn raw_value(&self) -> &[u8] {
        match self.raw.iter().position(|&b| b == b':') {
            Some(i) => &self.raw[i + 1..],
            None => &self.raw[..0],
        }
    }

    /// The raw value bytes (8-bit kept as is) with folding removed, without the final CRLF.
    pub fn unfolded_bytes(&self) -> Vec<u8> {
        let value = self.raw_value();
        let mut out = Vec::with_capacity(value.len());
        let mut i = 0;
        while i < value.len() {
            if value[i..].starts_with(b"\r\n") {
                i += 2;
                continue;
            }
            out.push(value[i]);
            i += 1;
        }
        out
    }

    /// The value with folding removed (CRLF before whitespace dropped), without the final CRLF,
    /// as text (invalid UTF-8 replaced).
    pub fn unfolded(&self) -> String {
        let text = String::from_utf8_lossy(self.raw);
        let value = text.split_once(':').map(|(_, v)| v).unwrap_or_default();
        value
            .replace("\r\n", "")
            .trim_end_matches(['\r', '\n'])
            .to_owned()
    }

    /// The entries of an address-list value (see [`address_list_raw`]).
    pub fn addresses_raw(&self) -> Vec<String> {
        address_list_raw(self.raw_value())
    }

    /// The addr-specs of an address-list value, lower-cased (see [`address_list`]).
    pub fn addresses(&self) -> Vec<String> {
        address_list(self.raw_value())
    }
}

/// The fields of a header block, each with its raw bytes (a line that is neither a field nor a
/// continuation is its own nameless field, kept as is). The ranges cover the block exactly.
pub fn fields(block: &[u8]) -> Vec<Field<'_>> {
    let mut out: Vec<Field<'_>> = Vec::new();
    let mut current: Option<(usize, usize, String)> = None;
    let mut start = 0;
    while start < block.len() {
        let end = block[start..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(block.len(), |i| start + i + 2);
        let line = &block[start..end];
        if matches!(line.first(), Some(b' ' | b'\t')) && current.is_some() {
            if let Some(c) = current.as_mut() {
                c.1 = end;
            }
            start = end;
            continue;
        }
        if let Some((cs, ce, name)) = current.take() {
            out.push(Field {
                name,
                raw: &block[cs..ce],
                range: cs..ce,
            });
        }
        let name = line
            .iter()
            .position(|&b| b == b':')
            .map(|i| String::from_utf8_lossy(&line[..i]).trim().to_owned())
            .unwrap_or_default();
        current = Some((start, end, name));
        start = end;
    }
    if let Some((cs, ce, name)) = current {
        out.push(Field {
            name,
            raw: &block[cs..ce],
            range: cs..ce,
        });
    }
    out
}

/// The entries of an address-list header value (`"A, B" <a@x>, b@y (c), grp: c@z;`), in order,
/// trimmed and lower-cased: the addr-spec of each, whether it is a valid address or not (so a
/// caller can say what is malformed; bare words count as one). Group names, display names and
/// comments are not entries, and an entry that is only a quoted display name (`"Nobody"`) has no
/// address.
pub fn address_list_raw(value: &[u8]) -> Vec<String> {
    let value = &value[..value.len().min(MAX_ADDRESS_FIELD)];
    // The parser reads a value up to the line end that does not continue it.
    let mut input: Cow<'_, [u8]> = Cow::Borrowed(value);
    if !value.ends_with(b"\n") {
        let mut owned = value.to_vec();
        owned.extend_from_slice(b"\r\n");
        input = Cow::Owned(owned);
    }
    let parsed = MessageStream::new(&input).parse_address();
    let raw = String::from_utf8_lossy(value);
    let addrs: Vec<&mail_parser::Addr<'_>> = match &parsed {
        HeaderValue::Address(Address::List(list)) => list.iter().collect(),
        HeaderValue::Address(Address::Group(groups)) => {
            groups.iter().flat_map(|g| g.addresses.iter()).collect()
        }
        _ => Vec::new(),
    };
    addrs
        .into_iter()
        .filter_map(|a| {
            let text = match (&a.address, &a.name) {
                (Some(address), _) => address.as_ref(),
                // Bare words without `@` (`From: Jane Doe`) are the entry, so the caller can
                // say it is malformed; a quoted display name alone (`"Nobody"`) is no entry.
                (None, Some(name)) if !raw.contains(&format!("\"{name}\"")) => name.as_ref(),
                _ => return None,
            };
            let text = text.trim().to_ascii_lowercase();
            (!text.is_empty()).then_some(text)
        })
        .collect()
}

/// The addr-specs of an address-list header value, lower-cased (entries without `@` dropped).
pub fn address_list(value: &[u8]) -> Vec<String> {
    address_list_raw(value)
        .into_iter()
        .filter(|s| s.contains('@'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_lists_are_parsed() {
        assert_eq!(
            address_list(
                br#" "Doe, Jane" <Jane@Example.com>, bob@example.com (Bob, B.), grp: c@x.org, d@y.org; "#
            ),
            vec!["jane@example.com", "bob@example.com", "c@x.org", "d@y.org"]
        );
        assert!(address_list(b"undisclosed-recipients:;").is_empty());
        assert_eq!(address_list(b" \"B\"\r\n <b@x.org>\r\n"), vec!["b@x.org"]);
        assert!(address_list_raw(b" \"Nobody\"").is_empty());
        assert_eq!(address_list_raw(b" Jane Doe"), vec!["jane doe"]);
        assert_eq!(address_list_raw(b" <a@>"), vec!["a@"]);
        assert_eq!(
            address_list_raw(b" a@x.org, b@x.org"),
            vec!["a@x.org", "b@x.org"]
        );
    }

    #[test]
    fn fields_cover_the_block_byte_for_byte() {
        let block = b"From: a@b\r\n folded\r\nnot a field\r\nTo: \xff@x\r\n";
        let f = fields(block);
        assert_eq!(f.len(), 3);
        assert_eq!(f[0].name, "From");
        assert_eq!(f[1].name, "");
        assert_eq!(
            f.iter()
                .flat_map(|f| f.raw.iter().copied())
                .collect::<Vec<u8>>(),
            block.to_vec()
        );
        assert_eq!(f[0].unfolded(), " a@b folded");
    }
}
