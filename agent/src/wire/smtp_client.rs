//! The SMTP client's side of the grammar, sans-IO: reply lines ([`parse_reply_line`]), whole
//! replies from bytes ([`ReplyReceiver`], bounded in line length and line count, so a hostile
//! server cannot exhaust memory), the EHLO keywords ([`Capabilities`]) and the `DATA` payload
//! ([`dot_stuff`], the serializer whose parser is [`crate::wire::smtp_server::DataReceiver`]).
//! The connection in [`crate::upstream::smtp`] owns the socket, the timeouts and the SASL
//! exchange, and feeds this module the bytes it reads.
//!
//! Why not stalwart's `smtp-proto` response and EHLO parsers (it is a dependency: the fuzz
//! targets check the EHLO parser against it, [`crate::fuzz`]): its `EhloResponse` keeps SASL
//! mechanisms as a bit set of the ones it knows, while the agent reports the server's own
//! mechanism list in its findings (`offers: PLAIN LOGIN`), unknown names included; and its
//! `ResponseReceiver` joins a multi-line reply into one string capped at 4 KiB, where the agent
//! keeps every line (the EHLO keywords, each line of a refusal) up to [`MAX_LINE`] octets and
//! [`MAX_REPLY_LINES`] lines.

/// Longest reply line accepted from a server, CRLF included.
pub const MAX_LINE: usize = 8192;
/// Most lines accepted in one (multi-line) reply.
pub const MAX_REPLY_LINES: usize = 256;
/// Longest reply text kept in an error or receipt.
pub const MAX_REPORTED: usize = 1024;

use std::fmt;

use crate::sasl::Mechanism;

/// One SMTP reply: the code and the text of each line (without the `250-`/`250 ` prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code.
    pub code: u16,
    /// The text of each line, control characters replaced by `?`.
    pub lines: Vec<String>,
}

impl Reply {
    /// 2xx or 3xx.
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// 4xx.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// The enhanced status code (RFC 3463) at the start of the first line, e.g. `5.7.139`.
    pub fn enhanced_code(&self) -> Option<&str> {
        let first = self.lines.first()?.split_whitespace().next()?;
        let mut parts = first.split('.');
        let class = parts.next()?;
        let subject = parts.next()?;
        let detail = parts.next()?;
        let ok = parts.next().is_none()
            && matches!(class, "2" | "4" | "5")
            && [subject, detail]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
        ok.then_some(first)
    }
}

impl fmt::Display for Reply {
    /// `535 5.7.3 Authentication unsuccessful` (lines joined with ` / `, length bounded).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = format!("{}", self.code);
        let joined = self.lines.join(" / ");
        if !joined.is_empty() {
            text.push(' ');
            text.push_str(&joined);
        }
        f.write_str(&truncate(text))
    }
}

pub fn truncate(mut text: String) -> String {
    if text.len() > MAX_REPORTED {
        let mut end = MAX_REPORTED;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Parses one reply line (CRLF already removed): `(code, is_last, text)`.
///
/// Accepts `NNN`, `NNN text`, `NNN-text`; the code's first digit must be 2–5.
pub fn parse_reply_line(line: &[u8]) -> Result<(u16, bool, String), String> {
    let shown = || truncate(printable(line));
    if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
        return Err(format!("not an SMTP reply line: {:?}", shown()));
    }
    if !(b'2'..=b'5').contains(&line[0]) {
        return Err(format!("reply code out of range: {:?}", shown()));
    }
    let code = u16::from(line[0] - b'0') * 100
        + u16::from(line[1] - b'0') * 10
        + u16::from(line[2] - b'0');
    match line.get(3) {
        None => Ok((code, true, String::new())),
        Some(b' ') => Ok((code, true, printable(&line[4..]))),
        Some(b'-') => Ok((code, false, printable(&line[4..]))),
        Some(_) => Err(format!("malformed reply line: {:?}", shown())),
    }
}

/// The bytes as text with control characters (and invalid UTF-8) made harmless.
pub fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// What the server announced in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The EHLO keyword lines, as sent (e.g. `SIZE 35882577`, `AUTH XOAUTH2 OAUTHBEARER`).
    pub lines: Vec<String>,
    /// SASL mechanisms from `AUTH`/`AUTH=` lines, upper case.
    pub auth: Vec<String>,
    /// `STARTTLS` offered.
    pub starttls: bool,
    /// `SIZE` offered, with its limit in octets (`Some(0)`: offered without a limit).
    pub size: Option<u64>,
    /// `8BITMIME` offered.
    pub eight_bit_mime: bool,
}

impl Capabilities {
    /// `PIPELINING` offered (RFC 2920): commands may be sent in groups.
    pub fn pipelining(&self) -> bool {
        self.lines.iter().any(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case("PIPELINING"))
        })
    }

    /// Parses the lines of a 250 EHLO reply (the first line is the server's name).
    pub fn parse(reply: &Reply) -> Self {
        let mut caps = Self::default();
        for line in reply.lines.iter().skip(1) {
            caps.lines.push(line.clone());
            let mut words = line.split_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            if keyword == "AUTH" || keyword.starts_with("AUTH=") {
                let first = keyword.strip_prefix("AUTH=").filter(|m| !m.is_empty());
                for m in first
                    .map(str::to_owned)
                    .into_iter()
                    .chain(words.map(str::to_ascii_uppercase))
                {
                    if !caps.auth.contains(&m) {
                        caps.auth.push(m);
                    }
                }
            } else if keyword == "STARTTLS" {
                caps.starttls = true;
            } else if keyword == "SIZE" {
                caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0));
            } else if keyword == "8BITMIME" {
                caps.eight_bit_mime = true;
            }
        }
        caps
    }

    /// Whether `mechanism` is offered.
    pub fn offers(&self, mechanism: Mechanism) -> bool {
        self.auth.iter().any(|m| m == mechanism.as_str())
    }

    /// The offered mechanisms for messages: `PLAIN LOGIN`, or `none`.
    pub fn auth_list(&self) -> String {
        if self.auth.is_empty() {
            "none".to_owned()
        } else {
            self.auth.join(" ")
        }
    }
}

/// The RFC 1870 size: the message with CRLF line ends, without dot-stuffing.
pub fn message_size(data: &[u8]) -> u64 {
    let mut bare_lf = 0usize;
    let mut from = 0usize;
    while let Some(at) = find_lf(&data[from..]) {
        let at = from + at;
        if at == 0 || data[at - 1] != b'\r' {
            bare_lf += 1;
        }
        from = at + 1;
    }
    let unterminated = u64::from(!data.is_empty() && !data.ends_with(b"\n")) * 2;
    (data.len() + bare_lf) as u64 + unterminated
}

/// Whether `data` has a byte outside ASCII (then `BODY=8BITMIME`). An OR over all bytes, which
/// the compiler vectorizes, instead of a search that stops early byte by byte.
pub fn has_eight_bit(data: &[u8]) -> bool {
    data.iter().fold(0u8, |acc, b| acc | b) >= 0x80
}

/// The position of the first `\n` in `s`, eight bytes at a time (a word is tested for a LF
/// byte with the classic has-zero-byte trick on `word ^ 0x0a0a…`).
fn find_lf(s: &[u8]) -> Option<usize> {
    const LF: u64 = 0x0a0a_0a0a_0a0a_0a0a;
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut i = 0;
    while i + 8 <= s.len() {
        let mut word = [0u8; 8];
        word.copy_from_slice(&s[i..i + 8]);
        let x = u64::from_le_bytes(word) ^ LF;
        if x.wrapping_sub(LOW) & !x & HIGH != 0 {
            break;
        }
        i += 8;
    }
    s[i..].iter().position(|&b| b == b'\n').map(|p| p + i)
}

/// The DATA payload: CRLF line ends (a bare LF becomes CRLF), a `.` at the start of a line
/// doubled (RFC 5321 §4.5.2), a final CRLF if missing, and the terminating `.` line.
pub fn dot_stuff(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 64 + 8);
    let mut stuffer = DotStuffer::new();
    stuffer.push(raw, &mut out);
    stuffer.finish(&mut out);
    out
}

/// [`dot_stuff`] a piece at a time, so a large message is sent through a small buffer instead
/// of being copied whole: [`DotStuffer::push`] each piece in order, then [`DotStuffer::finish`].
#[derive(Debug, Clone, Copy)]
pub struct DotStuffer {
    at_line_start: bool,
    prev: u8,
    empty: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl DotStuffer {
    /// At the start of a message.
    pub fn new() -> Self {
        Self {
            at_line_start: true,
            prev: 0,
            empty: true,
        }
    }

    /// Appends the stuffed form of the next piece of the message to `out`: whole lines are
    /// copied as slices (the line ends found a word at a time), not byte by byte.
    pub fn push(&mut self, raw: &[u8], out: &mut Vec<u8>) {
        out.reserve(raw.len() + raw.len() / 64 + 2);
        let mut rest = raw;
        while let Some(&first) = rest.first() {
            if self.at_line_start && first == b'.' {
                out.push(b'.');
            }
            match find_lf(rest) {
                Some(at) => {
                    out.extend_from_slice(&rest[..at]);
                    let before = if at > 0 { rest[at - 1] } else { self.prev };
                    if before != b'\r' {
                        out.push(b'\r');
                    }
                    out.push(b'\n');
                    self.prev = b'\n';
                    self.at_line_start = true;
                    rest = &rest[at + 1..];
                }
                None => {
                    out.extend_from_slice(rest);
                    self.prev = rest[rest.len() - 1];
                    self.at_line_start = false;
                    rest = &[];
                }
            }
        }
        self.empty &= raw.is_empty();
    }

    /// Appends the final CRLF (if the message did not end with one) and the `.` line.
    pub fn finish(self, out: &mut Vec<u8>) {
        if !self.empty && !self.at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// Why bytes from a server are not an SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    /// A line longer than [`MAX_LINE`].
    LineTooLong,
    /// More than [`MAX_REPLY_LINES`] lines.
    TooManyLines,
    /// A line that is not a reply line (the reason, with the line shown harmlessly).
    Malformed(String),
    /// The code changed between the lines of one reply.
    CodeChanged {
        /// The first line's code.
        from: u16,
        /// The offending line's code.
        to: u16,
    },
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LineTooLong => write!(f, "reply line longer than {MAX_LINE} octets"),
            Self::TooManyLines => write!(f, "reply longer than {MAX_REPLY_LINES} lines"),
            Self::Malformed(reason) => f.write_str(reason),
            Self::CodeChanged { from, to } => {
                write!(f, "reply code changed from {from} to {to} mid-reply")
            }
        }
    }
}

/// Assembles one (possibly multi-line) reply from the bytes a server sends. Feed it what was
/// read with [`ReplyReceiver::push`]; it takes bytes up to the end of the reply and no further,
/// so bytes the server sent after it (pipelined replies, or data injected after a `220` to
/// `STARTTLS`) stay with the caller. Holds at most one line of [`MAX_LINE`] octets and
/// [`MAX_REPLY_LINES`] lines.
#[derive(Debug, Default)]
pub struct ReplyReceiver {
    lines: Vec<String>,
    code: Option<u16>,
}

impl ReplyReceiver {
    /// A receiver at the start of a reply.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads complete lines from `input`: `Ok((consumed, Some(reply)))` when a reply ended,
    /// `Ok((consumed, None))` when more bytes are needed (an unfinished line is not consumed:
    /// call again with it and what follows).
    pub fn push(&mut self, input: &[u8]) -> Result<(usize, Option<Reply>), ReplyError> {
        let mut at = 0;
        loop {
            let Some(i) = input[at..].iter().position(|&b| b == b'\n') else {
                if input.len() - at >= MAX_LINE {
                    return Err(ReplyError::LineTooLong);
                }
                return Ok((at, None));
            };
            if i + 1 > MAX_LINE {
                return Err(ReplyError::LineTooLong);
            }
            let mut line = &input[at..at + i];
            at += i + 1;
            if let Some(l) = line.strip_suffix(b"\r") {
                line = l;
            }
            let (c, last, text) = parse_reply_line(line).map_err(ReplyError::Malformed)?;
            let first = *self.code.get_or_insert(c);
            if first != c {
                return Err(ReplyError::CodeChanged { from: first, to: c });
            }
            self.lines.push(text);
            if last {
                let lines = std::mem::take(&mut self.lines);
                self.code = None;
                return Ok((at, Some(Reply { code: c, lines })));
            }
            if self.lines.len() >= MAX_REPLY_LINES {
                return Err(ReplyError::TooManyLines);
            }
        }
    }
}

/// Every complete reply in `input`, in order, until the first error or the end of the input.
/// For tests and fuzzing.
pub fn parse_replies(input: &[u8]) -> (Vec<Reply>, Option<ReplyError>) {
    let mut receiver = ReplyReceiver::new();
    let mut replies = Vec::new();
    let mut at = 0;
    loop {
        match receiver.push(&input[at..]) {
            Ok((n, Some(reply))) => {
                at += n;
                replies.push(reply);
            }
            Ok(_) => return (replies, None),
            Err(e) => return (replies, Some(e)),
        }
    }
}
