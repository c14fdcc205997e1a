//! POP3 (RFC 1939, RFC 2449, RFC 3206), sans-IO, both sides: the commands the local POP3 server
//! reads ([`Command::parse`], [`message_number`], [`top_arguments`], and [`top`] for the reply
//! body), and the replies and multi-line bodies the fetch client reads ([`Reply::parse`],
//! [`MultilineReceiver`], [`is_transient_err`]). The byte-stuffing of bodies is SMTP's
//! ([`crate::wire::smtp_client::dot_stuff`]).
//!
//! Hand-written: POP3 is a dozen verbs and three reply forms; the crates that parse it come with
//! their own session types (stalwart's `pop3` crate is part of its mail server, not published on
//! its own), and the fetch client must answer the XOAUTH2 error challenge that Exchange Online
//! sends, which no POP3 client crate does.

/// A POP3 verb the server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `CAPA`.
    Capa,
    /// `STLS`.
    Stls,
    /// `USER`.
    User,
    /// `PASS`.
    Pass,
    /// `QUIT`.
    Quit,
    /// `STAT`.
    Stat,
    /// `LIST`.
    List,
    /// `UIDL`.
    Uidl,
    /// `RETR`.
    Retr,
    /// `DELE`.
    Dele,
    /// `RSET`.
    Rset,
    /// `NOOP`.
    Noop,
    /// `TOP`.
    Top,
    /// Anything else.
    Unknown,
}

impl Verb {
    /// Whether the verb belongs to the transaction state (RFC 1939 §5).
    pub fn is_transaction(self) -> bool {
        matches!(
            self,
            Self::Stat
                | Self::List
                | Self::Uidl
                | Self::Retr
                | Self::Dele
                | Self::Rset
                | Self::Noop
                | Self::Top
        )
    }
}

/// One command line: the verb and its argument (everything after the first space, as sent:
/// a password may hold spaces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The verb.
    pub verb: Verb,
    /// The argument.
    pub arg: String,
}

impl Command {
    /// Parses a line (without its line end; invalid UTF-8 replaced).
    pub fn parse(line: &[u8]) -> Self {
        let text = String::from_utf8_lossy(line);
        let (verb, arg) = match text.split_once(' ') {
            Some((v, a)) => (v, a),
            None => (text.as_ref(), ""),
        };
        let verb = match verb.to_ascii_uppercase().as_str() {
            "CAPA" => Verb::Capa,
            "STLS" => Verb::Stls,
            "USER" => Verb::User,
            "PASS" => Verb::Pass,
            "QUIT" => Verb::Quit,
            "STAT" => Verb::Stat,
            "LIST" => Verb::List,
            "UIDL" => Verb::Uidl,
            "RETR" => Verb::Retr,
            "DELE" => Verb::Dele,
            "RSET" => Verb::Rset,
            "NOOP" => Verb::Noop,
            "TOP" => Verb::Top,
            _ => Verb::Unknown,
        };
        Self {
            verb,
            arg: arg.to_owned(),
        }
    }
}

/// A message number argument: 1-based, at most `count`. The error is the `-ERR` reply.
pub fn message_number(arg: &str, count: usize) -> Result<usize, &'static str> {
    let n: usize = arg
        .trim()
        .parse()
        .map_err(|_| "-ERR invalid message number")?;
    if n == 0 || n > count {
        return Err("-ERR no such message");
    }
    Ok(n - 1)
}

/// The arguments of `TOP msg n`: the message number text and the line count.
pub fn top_arguments(arg: &str) -> Result<(&str, usize), &'static str> {
    let arg = arg.trim();
    let (n, lines) = arg.split_once(' ').unwrap_or((arg, ""));
    lines
        .trim()
        .parse::<usize>()
        .map(|lines| (n, lines))
        .map_err(|_| "-ERR TOP needs a message number and a line count")
}

/// The header of `message`, the empty line and the first `lines` body lines (`TOP`).
pub fn top(message: &[u8], lines: usize) -> &[u8] {
    let mut end = 0;
    let mut in_body = false;
    let mut body_lines = 0;
    for line in message.split_inclusive(|&b| b == b'\n') {
        if in_body {
            if body_lines == lines {
                break;
            }
            body_lines += 1;
        } else if line == b"\r\n" || line == b"\n" {
            in_body = true;
        }
        end += line.len();
    }
    &message[..end]
}

/// A server's reply line, as the fetch client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `+OK …` (the whole line).
    Ok(&'a str),
    /// `-ERR …` or anything else that is not `+OK` or a continuation (the whole line).
    Err(&'a str),
    /// A `+` continuation (`+`, `+ `, `+ <text>`): the text after it.
    Continuation(&'a str),
}

impl<'a> Reply<'a> {
    /// Classifies a reply line (without its line end).
    pub fn parse(line: &'a str) -> Self {
        if line.starts_with("+OK") {
            return Self::Ok(line);
        }
        match line.strip_prefix('+') {
            Some(rest) => Self::Continuation(rest.strip_prefix(' ').unwrap_or(rest)),
            None => Self::Err(line),
        }
    }
}

/// Whether a `-ERR` reply is temporary: RFC 3206 `[IN-USE]`, `[SYS/TEMP]` and RFC 2449
/// `[LOGIN-DELAY]`.
pub fn is_transient_err(reply: &str) -> bool {
    let upper = reply.to_ascii_uppercase();
    upper.contains("[IN-USE]") || upper.contains("[SYS/TEMP]") || upper.contains("[LOGIN-DELAY]")
}

/// A multi-line body (after `+OK`) line by line: dot-unstuffed, CRLF line ends, ended by the `.`
/// line, at most `max` bytes.
#[derive(Debug)]
pub struct MultilineReceiver {
    out: Vec<u8>,
    max: usize,
}

impl MultilineReceiver {
    /// A body of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            out: Vec::new(),
            max,
        }
    }

    /// One line without its line end: `Ok(Some(body))` at the final `.`, `Ok(None)` for more,
    /// `Err` when the body grows over the limit.
    pub fn line(&mut self, line: &[u8]) -> Result<Option<Vec<u8>>, String> {
        if line == b"." {
            return Ok(Some(std::mem::take(&mut self.out)));
        }
        let line = line.strip_prefix(b".").unwrap_or(line);
        if self.out.len() + line.len() + 2 > self.max {
            return Err(format!("multi-line reply larger than {} bytes", self.max));
        }
        self.out.extend_from_slice(line);
        self.out.extend_from_slice(b"\r\n");
        Ok(None)
    }
}

/// The non-empty CRLF-separated lines of a multi-line body (lossy UTF-8).
pub fn body_lines(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_arguments() {
        let c = Command::parse(b"pass secret with spaces");
        assert_eq!(c.verb, Verb::Pass);
        assert_eq!(c.arg, "secret with spaces");
        assert_eq!(Command::parse(b"XYZZY").verb, Verb::Unknown);
        assert_eq!(message_number("2", 3), Ok(1));
        assert_eq!(message_number("0", 3), Err("-ERR no such message"));
        assert_eq!(message_number("x", 3), Err("-ERR invalid message number"));
        assert_eq!(top_arguments("1 10"), Ok(("1", 10)));
        assert!(top_arguments("1").is_err());
    }

    #[test]
    fn replies_and_bodies() {
        assert_eq!(Reply::parse("+OK 2 200"), Reply::Ok("+OK 2 200"));
        assert_eq!(Reply::parse("+ eyJ9"), Reply::Continuation("eyJ9"));
        assert_eq!(Reply::parse("+"), Reply::Continuation(""));
        assert_eq!(Reply::parse("-ERR no"), Reply::Err("-ERR no"));
        assert!(is_transient_err("-ERR [IN-USE] busy"));
        let mut m = MultilineReceiver::new(100);
        assert_eq!(m.line(b"a"), Ok(None));
        assert_eq!(m.line(b"..b"), Ok(None));
        assert_eq!(m.line(b"."), Ok(Some(b"a\r\n.b\r\n".to_vec())));
        assert!(MultilineReceiver::new(2).line(b"abc").is_err());
    }
}
