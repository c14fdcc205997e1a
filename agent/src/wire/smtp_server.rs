//! The SMTP server grammar of the ingress, sans-IO: a command line in, a typed [`Command`] out
//! ([`Command::parse`], with [`parse_path`] and [`MailParam`] for `MAIL`/`RCPT`), and the `DATA`
//! line grammar ([`DataReceiver`]: one line in, content or the end of the message out;
//! [`DataScanner`]: the same grammar over blocks of input as they arrive, which is what the
//! session runs). No sockets, no clocks; the session loop in [`crate::ingress`] reads bounded
//! command lines and `DATA` blocks and decides the replies.
//!
//! Why not stalwart's `smtp-proto` `RequestReceiver`/`DataReceiver` here (its `DataReceiver` is
//! the reference the `smtp_data` fuzz target checks this one against, [`crate::fuzz`]): the ingress answers malformed input
//! with exact reply codes its printers and tests rely on (`501 5.5.4 Syntax: MAIL
//! FROM:<address>`, `555` for an unknown parameter, `500 5.5.2` for an over-long line), which
//! `smtp-proto`'s single `Error::SyntaxError` cannot tell apart; and `DATA` must keep its line
//! rules — the header block is kept in memory for the sender rewrite while the body streams to
//! disk, every line is held to the line limit, and bare LF line ends are normalized to CRLF,
//! where `smtp-proto`'s data receiver yields one unbounded byte stream with bare LFs passed
//! through. [`DataScanner`] applies those rules to blocks (the fuzz target checks it against
//! [`DataReceiver`] with the input cut anywhere).
//!
//! **SMTP smuggling.** The message ends only at `<CR><LF>.<CR><LF>`: a `.` line ended by a bare
//! LF, or one that follows a line ended by a bare LF, is content (`\n.\n`, `\n.\r\n`,
//! `\r\n.\n` never end a message), so a message cannot carry a second, smuggled message past a
//! server that reads line ends differently. Upstream, the client dot-stuffs every line again
//! ([`crate::wire::smtp_client::dot_stuff`]).

/// An SMTP command, as the ingress understands it. Arguments borrow from the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// `EHLO <name>` (`name` empty: a syntax error to answer).
    Ehlo(&'a str),
    /// `HELO <name>`.
    Helo(&'a str),
    /// `MAIL <args>` (`FROM:<path> params`, parsed with [`parse_path`]).
    Mail(&'a str),
    /// `RCPT <args>` (`TO:<path> params`).
    Rcpt(&'a str),
    /// `DATA <args>` (arguments are a syntax error).
    Data(&'a str),
    /// `AUTH <mechanism> [initial response]`; the mechanism upper-cased.
    Auth {
        /// `PLAIN`, `LOGIN`, … (empty when missing).
        mechanism: String,
        /// The initial response, if given.
        initial: Option<&'a str>,
    },
    /// `RSET`.
    Rset,
    /// `NOOP`.
    Noop,
    /// `VRFY`.
    Vrfy,
    /// `HELP`.
    Help,
    /// `QUIT`.
    Quit,
    /// `STARTTLS <args>`.
    StartTls(&'a str),
    /// A command the ingress knows but does not implement (`EXPN`, `TURN`, `ETRN`, `BDAT`).
    NotImplemented,
    /// An empty line.
    Empty,
    /// Anything else.
    Unknown,
}

/// The text of a command line (lossy UTF-8, trailing whitespace removed).
pub fn command_text(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    text.trim_end().to_owned()
}

impl<'a> Command<'a> {
    /// Parses a command from `text` (one line without its line end, see [`command_text`]).
    pub fn parse(text: &'a str) -> Self {
        let (verb, args) = match text.split_once(' ') {
            Some((v, a)) => (v, a.trim()),
            None => (text, ""),
        };
        let verb = verb.to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => Self::Ehlo(args),
            "HELO" => Self::Helo(args),
            "MAIL" => Self::Mail(args),
            "RCPT" => Self::Rcpt(args),
            "DATA" => Self::Data(args),
            "AUTH" => {
                let (mechanism, initial) = match args.split_once(' ') {
                    Some((m, i)) => (m.to_ascii_uppercase(), Some(i.trim())),
                    None => (args.to_ascii_uppercase(), None),
                };
                Self::Auth { mechanism, initial }
            }
            "RSET" => Self::Rset,
            "NOOP" => Self::Noop,
            "VRFY" => Self::Vrfy,
            "HELP" => Self::Help,
            "QUIT" => Self::Quit,
            "STARTTLS" => Self::StartTls(args),
            "EXPN" | "TURN" | "ETRN" | "BDAT" => Self::NotImplemented,
            "" => Self::Empty,
            _ => Self::Unknown,
        }
    }
}

/// The client's EHLO name as echoed back: printable ASCII only, at most 64 characters.
pub fn printable_name(name: &str) -> String {
    name.split(' ')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect()
}

/// Parses `<prefix><path> params…` (prefix `FROM:` or `TO:`, case-insensitive, optional space
/// after the colon) into the address inside the angle brackets and the parameters.
pub fn parse_path<'a>(args: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    let head = args.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = args[prefix.len()..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    let addr = &rest[..end];
    if addr.chars().any(|c| c.is_control() || c == '<') {
        return None;
    }
    Some((addr, rest[end + 1..].trim()))
}

/// One `MAIL FROM` parameter (RFC 1870 `SIZE`, RFC 6152 `BODY`, RFC 4954 `AUTH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailParam {
    /// `SIZE=<n>`.
    Size(u64),
    /// `SIZE=` with something that is not a number.
    BadSize,
    /// `BODY=7BIT` or `BODY=8BITMIME`.
    Body,
    /// `AUTH=…` (accepted and ignored).
    Auth,
    /// Anything else.
    Unsupported,
}

/// The parameters after a `MAIL FROM:<path>`.
pub fn mail_params(params: &str) -> impl Iterator<Item = MailParam> + '_ {
    params.split_ascii_whitespace().map(|param| {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        match key.to_ascii_uppercase().as_str() {
            "SIZE" => value
                .parse::<u64>()
                .map_or(MailParam::BadSize, MailParam::Size),
            "BODY"
                if value.eq_ignore_ascii_case("7BIT") || value.eq_ignore_ascii_case("8BITMIME") =>
            {
                MailParam::Body
            }
            "AUTH" => MailParam::Auth,
            _ => MailParam::Unsupported,
        }
    })
}

/// What one `DATA` line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLine<'a> {
    /// A line of the message, without its line end, dot-unstuffed.
    Content(&'a [u8]),
    /// The end of the message (`.` on a line of its own, CRLF before and after).
    End,
}

/// The `DATA` line grammar: feed it each line as read, line end included (`\n` or `\r\n`).
#[derive(Debug, Clone)]
pub struct DataReceiver {
    /// Whether the previous line ended with CRLF (the `DATA` command's line counts as one).
    after_crlf: bool,
}

impl Default for DataReceiver {
    fn default() -> Self {
        Self::new()
    }
}

impl DataReceiver {
    /// A receiver at the start of a message.
    pub fn new() -> Self {
        Self { after_crlf: true }
    }

    /// One line, with its line end (a final line without one, at end of input, is content).
    pub fn line<'a>(&mut self, raw: &'a [u8]) -> DataLine<'a> {
        let after_crlf = std::mem::replace(&mut self.after_crlf, raw.ends_with(b"\r\n"));
        if after_crlf && raw == b".\r\n" {
            return DataLine::End;
        }
        let text = raw.strip_suffix(b"\n").unwrap_or(raw);
        let text = if raw.ends_with(b"\r\n") {
            text.strip_suffix(b"\r").unwrap_or(text)
        } else {
            text
        };
        // Unstuff only a line that RFC 5321 delimits (after CRLF); after a bare LF the dot is
        // the sender's, kept as is.
        if after_crlf {
            DataLine::Content(text.strip_prefix(b".").unwrap_or(text))
        } else {
            DataLine::Content(text)
        }
    }

    /// A line over the length limit was discarded; `crlf` tells how it ended.
    pub fn skipped(&mut self, crlf: bool) {
        self.after_crlf = crlf;
    }
}

/// What [`DataScanner::feed`] stopped at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataEvent {
    /// All input was taken (complete lines as content, a partial line kept): feed more.
    More,
    /// A line over the length limit ended (consumed and discarded): the message is refused, the
    /// rest of the section is still read to its end.
    LineTooLong,
    /// The end of the message (`<CR><LF>.<CR><LF>`), consumed; nothing after it was taken.
    End,
}

/// The `DATA` grammar over blocks of input instead of lines: the same result as
/// [`DataReceiver`] fed each line (the content, the end, the over-long lines), without a call,
/// an allocation or a copy per line. Lines that are already in their stored form — after a CRLF,
/// ended by CRLF, not starting with a dot: almost every line of a message — are found with one
/// `memchr` each and copied to the output in runs; the other lines (dot-stuffed, bare LF, the
/// end) go through [`DataReceiver::line`] one by one. A line cut by the end of a block waits in
/// the scanner (at most `max_line` bytes) for the rest. `max_line` counts the line end, as the
/// session's line reader does.
#[derive(Debug, Clone)]
pub struct DataScanner {
    receiver: DataReceiver,
    max_line: usize,
    /// The start of a line that the previous input did not finish.
    partial: Vec<u8>,
    /// Inside an over-long line: the last byte of it seen (to tell its CRLF from a bare LF).
    skipping: Option<u8>,
}

impl DataScanner {
    /// A scanner at the start of a message, for lines of at most `max_line` bytes.
    pub fn new(max_line: usize) -> Self {
        Self {
            receiver: DataReceiver::new(),
            max_line,
            partial: Vec::new(),
            skipping: None,
        }
    }

    /// Takes what it can of `input`, appending the content of each complete line (dot-unstuffed,
    /// CRLF-terminated) to `out`. Returns how many bytes it took and why it stopped: after the
    /// end of the message or after an over-long line (the caller feeds the rest again), or
    /// because the input is used up.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, DataEvent) {
        if let Some(last) = self.skipping {
            return match memchr::memchr(b'\n', input) {
                None => {
                    self.skipping = Some(input.last().copied().unwrap_or(last));
                    (input.len(), DataEvent::More)
                }
                Some(i) => {
                    let before = if i > 0 { input[i - 1] } else { last };
                    self.skipping = None;
                    self.receiver.skipped(before == b'\r');
                    (i + 1, DataEvent::LineTooLong)
                }
            };
        }
        let mut at = 0;
        if !self.partial.is_empty() {
            let Some(i) = memchr::memchr(b'\n', input) else {
                if self.partial.len() + input.len() > self.max_line {
                    self.skipping = input.last().or(self.partial.last()).copied();
                    self.partial.clear();
                } else {
                    self.partial.extend_from_slice(input);
                }
                return (input.len(), DataEvent::More);
            };
            if self.partial.len() + i + 1 > self.max_line {
                let before = if i > 0 {
                    input[i - 1]
                } else {
                    self.partial.last().copied().unwrap_or(0)
                };
                self.partial.clear();
                self.receiver.skipped(before == b'\r');
                return (i + 1, DataEvent::LineTooLong);
            }
            self.partial.extend_from_slice(&input[..=i]);
            let line = std::mem::take(&mut self.partial);
            at = i + 1;
            match self.receiver.line(&line) {
                DataLine::End => return (at, DataEvent::End),
                DataLine::Content(content) => {
                    out.extend_from_slice(content);
                    out.extend_from_slice(b"\r\n");
                }
            }
            // Keep the allocation for the next cut line.
            self.partial = line;
            self.partial.clear();
        }
        // Lines stored as they came, not yet copied: input[run..at].
        let mut run = at;
        while let Some(i) = memchr::memchr(b'\n', &input[at..]) {
            let end = at + i + 1;
            let raw = &input[at..end];
            if raw.len() > self.max_line {
                out.extend_from_slice(&input[run..at]);
                self.receiver.skipped(raw.ends_with(b"\r\n"));
                return (end, DataEvent::LineTooLong);
            }
            if self.receiver.after_crlf && raw.ends_with(b"\r\n") && raw[0] != b'.' {
                // Content as it is (and the receiver's state stays "after CRLF").
                at = end;
                continue;
            }
            out.extend_from_slice(&input[run..at]);
            match self.receiver.line(raw) {
                DataLine::End => return (end, DataEvent::End),
                DataLine::Content(content) => {
                    out.extend_from_slice(content);
                    out.extend_from_slice(b"\r\n");
                }
            }
            at = end;
            run = at;
        }
        out.extend_from_slice(&input[run..at]);
        let rest = &input[at..];
        if rest.len() > self.max_line {
            self.skipping = rest.last().copied();
        } else {
            self.partial.extend_from_slice(rest);
        }
        (input.len(), DataEvent::More)
    }
}

/// A whole `DATA` section from `input` (the bytes after the `354`), as the session would store
/// it: the message (each line CRLF-terminated) and how many input bytes the section took, or
/// `None` when the input ends before the terminating line. Lines longer than `max_line` bytes
/// (line end included) make the result `Err(consumed)`. For tests and fuzzing.
pub fn receive_data(input: &[u8], max_line: usize) -> Option<Result<(Vec<u8>, usize), usize>> {
    let mut receiver = DataReceiver::new();
    let mut out = Vec::new();
    let mut too_long = false;
    let mut at = 0;
    while at < input.len() {
        let end = input[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| at + i + 1)?;
        let raw = &input[at..end];
        at = end;
        if raw.len() > max_line {
            too_long = true;
            receiver.skipped(raw.ends_with(b"\r\n"));
            continue;
        }
        match receiver.line(raw) {
            DataLine::End => return Some(if too_long { Err(at) } else { Ok((out, at)) }),
            DataLine::Content(line) => {
                out.extend_from_slice(line);
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    None
}

/// [`receive_data`] through a [`DataScanner`], the input cut into blocks of the given sizes (in
/// turn; the last size repeats): the same result whatever the cuts. For tests and fuzzing.
pub fn receive_data_blocks(
    input: &[u8],
    max_line: usize,
    cuts: &[usize],
) -> Option<Result<(Vec<u8>, usize), usize>> {
    let mut scanner = DataScanner::new(max_line);
    let mut out = Vec::new();
    let mut too_long = false;
    let mut at = 0;
    let mut cut = 0;
    while at < input.len() {
        let size = cuts
            .get(cut)
            .or(cuts.last())
            .copied()
            .unwrap_or(usize::MAX)
            .max(1);
        cut += 1;
        let block = &input[at..input.len().min(at.saturating_add(size))];
        let mut taken = 0;
        while taken < block.len() {
            let (n, event) = scanner.feed(&block[taken..], &mut out);
            taken += n;
            match event {
                DataEvent::More => {}
                DataEvent::LineTooLong => too_long = true,
                DataEvent::End => {
                    let used = at + taken;
                    return Some(if too_long { Err(used) } else { Ok((out, used)) });
                }
            }
        }
        at += block.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(Command::parse("ehlo printer"), Command::Ehlo("printer"));
        assert_eq!(
            Command::parse("MAIL FROM:<a@b>"),
            Command::Mail("FROM:<a@b>")
        );
        assert_eq!(
            Command::parse("auth plain AGEAYg=="),
            Command::Auth {
                mechanism: "PLAIN".to_owned(),
                initial: Some("AGEAYg==")
            }
        );
        assert_eq!(Command::parse(""), Command::Empty);
        assert_eq!(Command::parse("BDAT 10"), Command::NotImplemented);
        assert_eq!(Command::parse("FOO"), Command::Unknown);
        assert_eq!(
            parse_path("FROM: <a@b> SIZE=1", "FROM:"),
            Some(("a@b", "SIZE=1"))
        );
        assert_eq!(parse_path("FROM:a@b", "FROM:"), None);
        assert_eq!(
            mail_params("size=10 BODY=8bitmime AUTH=<> X=1").collect::<Vec<_>>(),
            vec![
                MailParam::Size(10),
                MailParam::Body,
                MailParam::Auth,
                MailParam::Unsupported
            ]
        );
    }

    #[test]
    fn data_ends_only_at_crlf_dot_crlf() {
        let ok = receive_data(b"a\r\n..b\r\n.\r\nNEXT", 1000);
        assert_eq!(ok, Some(Ok((b"a\r\n.b\r\n".to_vec(), 11))));
        // Bare LF forms are content, never the end.
        for smuggled in [
            &b"a\n.\nb\r\n.\r\n"[..],
            b"a\r\n.\nb\r\n.\r\n",
            b"a\n.\r\nb\r\n.\r\n",
        ] {
            let Some(Ok((message, used))) = receive_data(smuggled, 1000) else {
                panic!("no end found in {smuggled:?}");
            };
            assert_eq!(used, smuggled.len());
            assert!(message.ends_with(b"b\r\n"), "{message:?}");
        }
        assert_eq!(receive_data(b"a\r\n.\n", 1000), None);
        assert_eq!(receive_data(b".\r\n", 1000), Some(Ok((Vec::new(), 3))));
        assert_eq!(receive_data(b"xxxxx\r\n.\r\n", 4), Some(Err(10)));
    }

    #[test]
    fn blocks_give_what_lines_give_wherever_the_input_is_cut() {
        let inputs: [&[u8]; 9] = [
            b"a\r\n..b\r\n.\r\nNEXT",
            b"a\n.\nb\r\n.\r\n",
            b"a\r\n.\nb\r\n.\r\n",
            b"a\n.\r\nb\r\n.\r\n",
            b"a\r\n.\n",
            b".\r\n",
            b"xxxxx\r\n.\r\n",
            b"ok\r\nxxxxxxx\ny\r\nxxxxxx\r\n..\r\n.\r\n",
            b"\r\n\r\n.x\r\n\n\r\r\n.\r\n.\r\n",
        ];
        for input in inputs {
            let expected = receive_data(input, 5);
            for cuts in [&[usize::MAX][..], &[1], &[2], &[3], &[4, 1], &[7, 2, 5]] {
                assert_eq!(
                    receive_data_blocks(input, 5, cuts),
                    expected,
                    "{input:?} cut {cuts:?}"
                );
            }
        }
        // A long message of ordinary lines is copied in runs and comes out as it went in.
        let mut message = Vec::new();
        for i in 0..2000 {
            message.extend_from_slice(format!("line {i} of a scan, base64 AAAA\r\n").as_bytes());
        }
        let mut input = message.clone();
        input.extend_from_slice(b".\r\n");
        assert_eq!(
            receive_data_blocks(&input, 1001, &[8192, 16384, 333]),
            Some(Ok((message, input.len())))
        );
    }
}
