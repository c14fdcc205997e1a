//! IMAP responses (RFC 3501 §7), sans-IO, for the fetch client ([`crate::fetch::imap`]):
//! [`ResponseAssembler`] turns the lines and literals a server sends into [`Response`]s and says
//! what to read next (a line, a literal of `n` bytes, or `n` bytes to discard because the literal
//! is over the size limit), so the socket loop never holds more than the limits allow; and the
//! few response fields the client reads ([`parse_tagged`], [`capability_words`],
//! [`uidvalidity`], [`fetch_body`]).
//!
//! Why not `imap-codec`: its decoders take a whole response from one buffer, so a message body —
//! a literal of up to the maildrop's size limit — must be in memory before the response parses,
//! and a literal over the limit cannot be skipped while it streams past; version 2 (with the
//! framing the agent would need) is an alpha. The agent reads nine response forms, and the
//! assembler here bounds every one: lines by the connection's line limit, literals by
//! `max_literal` and [`MAX_LITERALS`] per response.

/// Most literals in one response.
pub const MAX_LITERALS: usize = 64;

/// Status of a tagged response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `OK`.
    Ok,
    /// `NO`.
    No,
    /// `BAD`.
    Bad,
}

/// One piece of an untagged response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Response text (one line, or the rest of a line after a literal), without CRLF.
    Text(Vec<u8>),
    /// A literal's bytes.
    Literal(Vec<u8>),
    /// A literal above the size limit, read and discarded.
    TooLarge(u64),
}

/// One server response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `+ text`.
    Continuation(String),
    /// `* …`, with its literals.
    Untagged(Vec<Part>),
    /// `<tag> OK|NO|BAD text`.
    Tagged {
        tag: String,
        status: Status,
        /// The whole line, for reports.
        line: String,
    },
}

/// The size of a literal announced at the end of `line` (`{123}` or `{123+}`).
pub fn literal_size(line: &[u8]) -> Option<u64> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let digits = &inner[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Parses a tagged line `<tag> <status> <text>`.
pub fn parse_tagged(line: &str) -> Option<(String, Status)> {
    let mut f = line.splitn(3, ' ');
    let tag = f.next()?;
    let status = match f.next()?.to_ascii_uppercase().as_str() {
        "OK" => Status::Ok,
        "NO" => Status::No,
        "BAD" => Status::Bad,
        _ => return None,
    };
    let valid_tag = !tag.is_empty()
        && tag.bytes().all(|b| {
            b.is_ascii_graphic()
                && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b'+')
        });
    valid_tag.then(|| (tag.to_owned(), status))
}

/// The capability words of a `CAPABILITY` response text (`* CAPABILITY …` or `[CAPABILITY …]`).
pub fn capability_words(text: &str) -> Option<Vec<String>> {
    let upper = text.to_ascii_uppercase();
    let start = upper.find("CAPABILITY ")? + "CAPABILITY ".len();
    let rest = &text[start..];
    let rest = rest.split(']').next().unwrap_or(rest);
    Some(
        rest.split_whitespace()
            .map(str::to_ascii_uppercase)
            .collect(),
    )
}

/// The value after `[UIDVALIDITY ` in an untagged `OK`.
pub fn uidvalidity(text: &str) -> Option<u32> {
    let upper = text.to_ascii_uppercase();
    let start = upper.find("[UIDVALIDITY ")? + "[UIDVALIDITY ".len();
    text[start..].split(']').next()?.trim().parse().ok()
}

/// A fetched body, or the size of one above the limit.
pub type Body = Result<Vec<u8>, u64>;

/// The UID and body of a FETCH response, if it is one: `* n FETCH (… UID u … BODY[] {k}` + literal.
pub fn fetch_body(parts: &[Part]) -> Option<(Option<u32>, Option<Body>)> {
    let Some(Part::Text(first)) = parts.first() else {
        return None;
    };
    let first = String::from_utf8_lossy(first);
    let mut words = first.split(' ');
    if words.next() != Some("*") {
        return None;
    }
    words.next()?.parse::<u32>().ok()?;
    if !words.next()?.eq_ignore_ascii_case("FETCH") {
        return None;
    }
    let mut uid = None;
    let mut body = None;
    let mut previous_text = String::new();
    for part in parts {
        match part {
            Part::Text(t) => {
                let text = String::from_utf8_lossy(t).to_ascii_uppercase();
                let mut it = text.split([' ', '(', ')']);
                while let Some(w) = it.next() {
                    if w == "UID"
                        && let Some(v) = it.next().and_then(|n| n.parse().ok())
                    {
                        uid = Some(v);
                    }
                }
                previous_text = text;
            }
            Part::Literal(bytes) => {
                if announced_by_body(&previous_text) {
                    body = Some(Ok(bytes.clone()));
                }
            }
            Part::TooLarge(n) => {
                if announced_by_body(&previous_text) {
                    body = Some(Err(*n));
                }
            }
        }
    }
    Some((uid, body))
}

/// Whether a literal announced at the end of `text` (`… BODY[] {n}`) is the message body.
pub fn announced_by_body(text: &str) -> bool {
    text.rfind('{')
        .map(|i| text[..i].trim_end())
        .unwrap_or_default()
        .ends_with("BODY[]")
}

/// What the assembler needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The next line, without its line end.
    Line,
    /// A literal of this many bytes, to pass to [`ResponseAssembler::literal`].
    Literal(usize),
    /// This many bytes to read and drop (a literal over the limit), then
    /// [`ResponseAssembler::discarded`].
    Discard(u64),
}

/// One step of assembling a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Read this, then call the assembler again.
    Need(Need),
    /// The response is complete.
    Done(Response),
}

/// Assembles one response from its lines and literals.
#[derive(Debug)]
pub struct ResponseAssembler {
    parts: Vec<Part>,
    max_literal: usize,
    started: bool,
}

impl ResponseAssembler {
    /// A response whose literals are kept up to `max_literal` bytes.
    pub fn new(max_literal: usize) -> Self {
        Self {
            parts: Vec::new(),
            max_literal,
            started: false,
        }
    }

    /// The first line of the response, or the line after a literal. `Err` says why the
    /// response is malformed.
    pub fn line(&mut self, line: Vec<u8>) -> Result<Step, String> {
        if !std::mem::replace(&mut self.started, true) {
            if let Some(rest) = line.strip_prefix(b"+") {
                let text = String::from_utf8_lossy(rest);
                return Ok(Step::Done(Response::Continuation(
                    text.strip_prefix(' ').unwrap_or(&text).to_owned(),
                )));
            }
            if !line.starts_with(b"* ") {
                let text = String::from_utf8_lossy(&line).into_owned();
                return match parse_tagged(&text) {
                    Some((tag, status)) => Ok(Step::Done(Response::Tagged {
                        tag,
                        status,
                        line: text,
                    })),
                    None => Err(format!("malformed IMAP response {text:?}")),
                };
            }
        }
        let Some(size) = literal_size(&line) else {
            self.parts.push(Part::Text(line));
            return Ok(Step::Done(Response::Untagged(std::mem::take(
                &mut self.parts,
            ))));
        };
        self.parts.push(Part::Text(line));
        if self.parts.len() > 2 * MAX_LITERALS {
            return Err(format!(
                "IMAP response with more than {MAX_LITERALS} literals"
            ));
        }
        if size > self.max_literal as u64 {
            return Ok(Step::Need(Need::Discard(size)));
        }
        let n = usize::try_from(size).map_err(|_| format!("IMAP literal of {size} bytes"))?;
        Ok(Step::Need(Need::Literal(n)))
    }

    /// The literal asked for with [`Need::Literal`].
    pub fn literal(&mut self, bytes: Vec<u8>) -> Step {
        self.parts.push(Part::Literal(bytes));
        Step::Need(Need::Line)
    }

    /// The literal of `n` bytes asked for with [`Need::Discard`] was read and dropped.
    pub fn discarded(&mut self, n: u64) -> Step {
        self.parts.push(Part::TooLarge(n));
        Step::Need(Need::Line)
    }
}

/// Every complete response in `input`, as the fetch client would read them with lines of at
/// most `max_line` bytes (line end included) and literals kept up to `max_literal` bytes; then
/// the error that stopped reading, if any (`None`: the input ran out). For tests and fuzzing.
pub fn parse_responses(
    input: &[u8],
    max_line: usize,
    max_literal: usize,
) -> (Vec<Response>, Option<String>) {
    let mut out = Vec::new();
    let mut at = 0;
    'responses: loop {
        let mut assembler = ResponseAssembler::new(max_literal);
        let mut need = Need::Line;
        loop {
            let step = match need {
                Need::Line => {
                    let Some(i) = input[at..].iter().position(|&b| b == b'\n') else {
                        break 'responses;
                    };
                    if i + 1 > max_line {
                        return (out, Some(format!("line longer than {max_line} bytes")));
                    }
                    let mut line = input[at..at + i].to_vec();
                    at += i + 1;
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    match assembler.line(line) {
                        Ok(step) => step,
                        Err(e) => return (out, Some(e)),
                    }
                }
                Need::Literal(n) => {
                    if input.len() - at < n {
                        break 'responses;
                    }
                    at += n;
                    assembler.literal(input[at - n..at].to_vec())
                }
                Need::Discard(n) => {
                    let left = (input.len() - at) as u64;
                    if left < n {
                        break 'responses;
                    }
                    at += n as usize;
                    assembler.discarded(n)
                }
            };
            match step {
                Step::Need(next) => need = next,
                Step::Done(response) => {
                    out.push(response);
                    continue 'responses;
                }
            }
        }
    }
    (out, None)
}
