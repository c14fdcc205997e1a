//! Fuzz targets for the agent's protocol parsers ([`crate::wire`], [`crate::sasl`]) and the
//! small mutation driver that runs them on the stable toolchain.
//!
//! **Why this driver, not cargo-fuzz or bolero.** cargo-fuzz (libFuzzer) needs a nightly
//! toolchain for its sanitizer and coverage flags, and the project builds on stable only.
//! bolero runs its targets under `cargo test` on stable, but without coverage there it is a
//! random-input generator too, and it brings its own engine crates (and a C build for the
//! libFuzzer engine) into a 2-core CI for no gain. So: a coverage-less mutation driver, ~200
//! lines, no dependencies: a pool seeded from the corpus in the repository
//! (`agent/tests/fuzz/corpus/<target>/`), mutations that know the protocols (line ends, dots,
//! literal markers, base64, over-long runs for the size limits), and in place of coverage a
//! *behaviour signature* per input — each target returns a hash of what the parser made of the
//! input (which replies, which errors, how many parts) — and inputs with a new signature join the
//! pool. Every input runs under `catch_unwind`; a panic or a failed property is a [`Crash`] with
//! the input, which the long-run command writes to `agent/tests/fuzz/regressions/<target>/`,
//! where the suite replays it for ever after.
//!
//! **What the targets check**, beyond "no panic": bounds (reply lines and line lengths, literal
//! sizes, body sizes), round trips where the agent has the serializer (the `DATA` payload, POP3
//! bodies, SMTP replies, XOAUTH2/OAUTHBEARER payloads), chunking independence of the sans-IO
//! receivers (bytes fed in any split give the same result as all at once; the `DATA` block
//! scanner the ingress runs gives, cut anywhere, what the line grammar gives), agreement with
//! stalwart's `smtp-proto` (`DATA` end and content on CRLF-only input; STARTTLS, 8BITMIME and
//! the OAuth mechanisms of generated EHLO replies), the SMTP-smuggling rule (a message ends only
//! at `<CR><LF>.<CR><LF>`), and that the sender rewrite changes nothing outside the header block.
//!
//! Run: the suite runs every target for a few seconds (`agent/tests/integration/fuzz.rs`);
//! longer, by hand: `cargo run --release -p tokenfleet-testkit --bin fuzz -- --target NAME
//! --secs N` (see `tests/src/bin/fuzz.rs`).

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use crate::ingress::{SenderPolicy, apply_sender_policy};
use crate::sasl;
use crate::spool::Envelope;
use crate::wire::{header, imap, pop3, smtp_client, smtp_server};

/// One fuzz target: a name, the function (input → behaviour signature; panics on a failed
/// property) and tokens the mutator inserts.
#[derive(Clone, Copy)]
pub struct Target {
    /// The target's name (also its corpus directory).
    pub name: &'static str,
    /// What it parses.
    pub about: &'static str,
    /// Runs one input; returns the behaviour signature; panics when a property fails.
    pub run: fn(&[u8]) -> u64,
    /// Protocol tokens for the mutator.
    pub dictionary: &'static [&'static [u8]],
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

const SMTP_WORDS: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r\n.\n",
    b"\n.\r\n",
    b"..",
    b"EHLO ",
    b"HELO ",
    b"MAIL FROM:<",
    b"RCPT TO:<",
    b">",
    b"<>",
    b" SIZE=",
    b" BODY=8BITMIME",
    b"DATA",
    b"AUTH PLAIN ",
    b"AUTH LOGIN",
    b"STARTTLS",
    b"QUIT",
    b"RSET",
    b"250-",
    b"250 ",
    b"334 ",
    b"535 5.7.3 ",
    b"AUTH XOAUTH2 OAUTHBEARER",
    b"8BITMIME",
    b"SIZE 35882577",
    b"\x00",
    b"\xff",
];
const IMAP_WORDS: &[&[u8]] = &[
    b"\r\n",
    b"* ",
    b"+ ",
    b"t1 OK ",
    b"t2 NO ",
    b"t3 BAD ",
    b"{5}\r\n",
    b"{0}\r\n",
    b"{99}\r\n",
    b"{18446744073709551615}",
    b"{7+}",
    b" FETCH (UID ",
    b" BODY[] ",
    b"RFC822.SIZE ",
    b"[UIDVALIDITY ",
    b"]",
    b"CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2",
    b" EXISTS",
    b"(",
    b")",
    b"\"",
    b"\\",
];
const POP3_WORDS: &[&[u8]] = &[
    b"\r\n",
    b"+OK ",
    b"-ERR ",
    b"+ ",
    b".\r\n",
    b"..",
    b"USER ",
    b"PASS ",
    b"STAT",
    b"LIST ",
    b"UIDL",
    b"RETR 1",
    b"DELE 1",
    b"TOP 1 0",
    b"CAPA",
    b"STLS",
    b"QUIT",
    b"[IN-USE]",
    b"[SYS/TEMP]",
    b"4294967296",
    b"0",
    b"-1",
];
const HEADER_WORDS: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"From: ",
    b"To: ",
    b"Cc: ",
    b"Bcc: ",
    b"Reply-To: ",
    b"\r\n ",
    b"\"",
    b"<",
    b">",
    b"@",
    b",",
    b";",
    b":",
    b"(",
    b")",
    b"\\",
    b"=?utf-8?b?w7w=?=",
    b"grp: ",
    b"\xc3\xbc",
];
const SASL_WORDS: &[&[u8]] = &[
    b"\x00",
    b"\x01",
    b"=",
    b"*",
    b"user=",
    b"auth=Bearer ",
    b"n,a=",
    b"host=",
    b"port=",
    b"=2C",
    b"=3D",
    b"AGEAYg==",
    b"eyJzdGF0dXMiOiI0MDEifQ==",
    b"\r\n",
];

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "smtp_command",
        about: "SMTP server commands: verbs, MAIL/RCPT paths and parameters",
        run: smtp_command,
        dictionary: SMTP_WORDS,
    },
    Target {
        name: "smtp_data",
        about: "SMTP DATA lines: end of message, dot-unstuffing, smuggling",
        run: smtp_data,
        dictionary: SMTP_WORDS,
    },
    Target {
        name: "smtp_reply",
        about: "SMTP replies and EHLO keywords (client side)",
        run: smtp_reply,
        dictionary: SMTP_WORDS,
    },
    Target {
        name: "imap_response",
        about: "IMAP responses: tagged, untagged with literals, continuations",
        run: imap_response,
        dictionary: IMAP_WORDS,
    },
    Target {
        name: "pop3_command",
        about: "POP3 server commands and their arguments",
        run: pop3_command,
        dictionary: POP3_WORDS,
    },
    Target {
        name: "pop3_response",
        about: "POP3 replies and multi-line bodies (client side)",
        run: pop3_response,
        dictionary: POP3_WORDS,
    },
    Target {
        name: "header",
        about: "RFC 5322 header blocks, address lists and the From rewrite",
        run: header_block,
        dictionary: HEADER_WORDS,
    },
    Target {
        name: "sasl",
        about: "SASL: PLAIN/LOGIN responses, XOAUTH2/OAUTHBEARER payloads, error challenges",
        run: sasl_payloads,
        dictionary: SASL_WORDS,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// A length bucketed by its power of two, for signatures that should not tell every length apart.
fn bucket(n: usize) -> u32 {
    usize::BITS - n.leading_zeros()
}

fn signature(parts: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// A small deterministic generator (xorshift64*), seeded from the input where a target needs
/// randomness of its own (chunk splits), so a crash replays exactly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is mapped to a fixed non-zero state).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// Splits `input` into chunks at points drawn from `rng`.
fn chunks<'a>(input: &'a [u8], rng: &mut Rng) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let n = 1 + rng.below(rest.len().min(64));
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Targets.

fn smtp_command(input: &[u8]) -> u64 {
    let mut kinds = std::collections::BTreeSet::new();
    for line in input.split(|&b| b == b'\n').take(64) {
        let text = smtp_server::command_text(line);
        let command = smtp_server::Command::parse(&text);
        let kind = std::mem::discriminant(&command);
        kinds.insert(signature(kind));
        match command {
            smtp_server::Command::Mail(args) | smtp_server::Command::Rcpt(args) => {
                assert!(text.contains(args), "arguments are not part of the line");
                for prefix in ["FROM:", "TO:"] {
                    if let Some((addr, params)) = smtp_server::parse_path(args, prefix) {
                        assert!(args.contains(addr) && args.contains(params));
                        assert!(!addr.contains('<') && !addr.chars().any(char::is_control));
                        let params = smtp_server::mail_params(params);
                        kinds.extend(params.map(|p| signature(std::mem::discriminant(&p))));
                    }
                }
            }
            smtp_server::Command::Ehlo(name) => {
                let shown = smtp_server::printable_name(name);
                assert!(shown.len() <= 64 && shown.bytes().all(|b| b.is_ascii_graphic()));
            }
            smtp_server::Command::Auth { mechanism, initial } => {
                assert!(!mechanism.contains(' '));
                if let Some(i) = initial {
                    kinds.insert(signature(sasl::decode_response(i.as_bytes()).is_ok()));
                }
            }
            _ => {}
        }
    }
    signature(kinds)
}

fn smtp_data(input: &[u8]) -> u64 {
    const MAX_LINE: usize = 1001;
    let result = smtp_server::receive_data(input, MAX_LINE);
    // The session reads DATA in blocks (`DataScanner`): cut anywhere, the same result as line
    // by line.
    let mut hasher = DefaultHasher::new();
    input.hash(&mut hasher);
    let h = hasher.finish();
    let cuts = [
        1 + (h % 7) as usize,
        1 + ((h >> 8) % 64) as usize,
        1 + ((h >> 16) % 4096) as usize,
    ];
    for cuts in [&cuts[..], &[usize::MAX]] {
        assert_eq!(
            smtp_server::receive_data_blocks(input, MAX_LINE, cuts),
            result,
            "DATA in blocks {cuts:?} differs from DATA in lines"
        );
    }
    // The smuggling rule: the end is a `.` line with CRLF before and after.
    if let Some(Ok((_, used)) | Err(used)) = result {
        let end = &input[..used];
        assert!(
            end == b".\r\n" || end.ends_with(b"\r\n.\r\n"),
            "DATA ended without <CR><LF>.<CR><LF>"
        );
        // And it is the first such place.
        let first = if input.starts_with(b".\r\n") {
            3
        } else {
            input
                .windows(5)
                .position(|w| w == b"\r\n.\r\n")
                .map_or(usize::MAX, |i| i + 5)
        };
        assert_eq!(used, first, "DATA ended at a later terminator");
    } else {
        assert!(
            !input.starts_with(b".\r\n") && !input.windows(5).any(|w| w == b"\r\n.\r\n"),
            "DATA missed its terminator"
        );
    }
    if let Some(Ok((message, _))) = &result {
        let lfs = input.iter().filter(|&&b| b == b'\n').count();
        assert!(message.len() <= input.len() + lfs, "DATA output grew");
    }
    // Round trip: what the upstream client sends, the ingress reads back as the message with
    // CRLF line ends.
    let body = &input[..input.len().min(4096)];
    let stuffed = smtp_client::dot_stuff(body);
    let mut expected = Vec::with_capacity(body.len() + 8);
    let mut prev = 0u8;
    for &b in body {
        if b == b'\n' && prev != b'\r' {
            expected.push(b'\r');
        }
        expected.push(b);
        prev = b;
    }
    if !body.is_empty() && !body.ends_with(b"\n") {
        expected.extend_from_slice(b"\r\n");
    }
    assert_eq!(
        smtp_server::receive_data(&stuffed, usize::MAX),
        Some(Ok((expected, stuffed.len()))),
        "dot_stuff then DATA is not the identity"
    );
    // Agreement with smtp-proto on CRLF-only input.
    let crlf_only = input.iter().enumerate().all(|(i, &b)| match b {
        b'\n' => i > 0 && input[i - 1] == b'\r',
        b'\r' => input.get(i + 1) == Some(&b'\n'),
        _ => true,
    });
    if crlf_only {
        let mut reference = smtp_proto::request::receiver::DataReceiver::new();
        let mut buf = Vec::new();
        let primer = b"\r\n";
        let _ = reference.ingest(&mut primer.iter(), &mut buf);
        let mut rest = input.iter();
        let ended = reference.ingest(&mut rest, &mut buf);
        let theirs = ended.then(|| (buf[2..].to_vec(), input.len() - rest.len()));
        let ours = smtp_server::receive_data(input, usize::MAX).and_then(Result::ok);
        assert_eq!(ours, theirs, "DATA disagrees with smtp-proto");
    }
    signature(result.map(|r| r.map(|(m, used)| (bucket(m.len()), used == input.len()))))
}

fn smtp_reply(input: &[u8]) -> u64 {
    let (replies, error) = smtp_client::parse_replies(input);
    for reply in &replies {
        assert!((200..600).contains(&reply.code));
        assert!(!reply.lines.is_empty() && reply.lines.len() <= smtp_client::MAX_REPLY_LINES);
        for line in &reply.lines {
            assert!(line.len() <= 3 * smtp_client::MAX_LINE);
            assert!(!line.chars().any(char::is_control));
        }
        // Round trip through the wire form.
        let mut wire = Vec::new();
        for (i, line) in reply.lines.iter().enumerate() {
            let sep = if i + 1 == reply.lines.len() { ' ' } else { '-' };
            wire.extend_from_slice(format!("{}{sep}{line}\r\n", reply.code).as_bytes());
        }
        let (again, e) = smtp_client::parse_replies(&wire);
        if wire.len() < smtp_client::MAX_LINE {
            assert_eq!((again.as_slice(), e), (std::slice::from_ref(reply), None));
        }
        let caps = smtp_client::Capabilities::parse(reply);
        assert!(caps.lines.len() < reply.lines.len().max(1));
        let _ = reply.enhanced_code();
        let _ = reply.to_string();
    }
    // Chunking independence: the receiver fed in pieces sees the same replies.
    let mut rng = Rng::new(signature(input));
    let mut receiver = smtp_client::ReplyReceiver::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut piecewise = Vec::new();
    let mut piecewise_error = None;
    'feed: for chunk in chunks(input, &mut rng) {
        pending.extend_from_slice(chunk);
        loop {
            match receiver.push(&pending) {
                Ok((n, reply)) => {
                    pending.drain(..n);
                    match reply {
                        Some(r) => piecewise.push(r),
                        None => break,
                    }
                }
                Err(e) => {
                    piecewise_error = Some(e);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(piecewise, replies, "chunked replies differ");
    if matches!(error, Some(smtp_client::ReplyError::Malformed(_)))
        || piecewise_error.is_some() && error.is_some()
    {
        assert_eq!(piecewise_error.is_some(), error.is_some());
    }
    ehlo_agreement(input);
    signature((
        replies
            .iter()
            .map(|r| (r.code, r.lines.len()))
            .collect::<Vec<_>>(),
        error.map(|e| std::mem::discriminant(&e)),
    ))
}

/// A generated EHLO reply parsed by the agent and by smtp-proto: the same answer on STARTTLS,
/// 8BITMIME and the OAuth mechanisms.
fn ehlo_agreement(input: &[u8]) {
    const KEYWORDS: &[&str] = &[
        "STARTTLS",
        "8BITMIME",
        "PIPELINING",
        "SIZE 35882577",
        "AUTH XOAUTH2",
        "AUTH OAUTHBEARER XOAUTH2",
        "AUTH PLAIN LOGIN",
        "ENHANCEDSTATUSCODES",
        "X-VENDOR-THING",
        "CHUNKING",
    ];
    let lines: Vec<&str> = input
        .iter()
        .take(8)
        .map(|&b| KEYWORDS[usize::from(b) % KEYWORDS.len()])
        .collect();
    let mut wire = String::from(if lines.is_empty() {
        "250 mx.example\r\n"
    } else {
        "250-mx.example\r\n"
    });
    for (i, l) in lines.iter().enumerate() {
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        wire.push_str(&format!("250{sep}{l}\r\n"));
    }
    let (ours, _) = smtp_client::parse_replies(wire.as_bytes());
    let [reply] = ours.as_slice() else {
        panic!("a generated EHLO reply did not parse: {wire:?}");
    };
    let caps = smtp_client::Capabilities::parse(reply);
    let Ok(theirs) = smtp_proto::EhloResponse::parse(&mut wire.as_bytes().iter()) else {
        panic!("smtp-proto refused a generated EHLO reply: {wire:?}");
    };
    assert_eq!(
        caps.starttls,
        theirs.capabilities & smtp_proto::EXT_START_TLS != 0
    );
    assert_eq!(
        caps.eight_bit_mime,
        theirs.capabilities & smtp_proto::EXT_8BIT_MIME != 0
    );
    assert_eq!(
        caps.offers(sasl::Mechanism::XOAuth2),
        theirs.auth_mechanisms & smtp_proto::AUTH_XOAUTH2 != 0
    );
    assert_eq!(
        caps.offers(sasl::Mechanism::OAuthBearer),
        theirs.auth_mechanisms & smtp_proto::AUTH_OAUTHBEARER != 0
    );
}

fn imap_response(input: &[u8]) -> u64 {
    const MAX_LINE: usize = 4096;
    const MAX_LITERAL: usize = 64;
    let (responses, error) = imap::parse_responses(input, MAX_LINE, MAX_LITERAL);
    let mut shape = Vec::new();
    for response in &responses {
        match response {
            imap::Response::Untagged(parts) => {
                assert!(parts.len() <= 2 * imap::MAX_LITERALS + 1);
                for part in parts {
                    match part {
                        imap::Part::Literal(bytes) => assert!(bytes.len() <= MAX_LITERAL),
                        imap::Part::TooLarge(n) => assert!(*n > MAX_LITERAL as u64),
                        imap::Part::Text(t) => assert!(t.len() < MAX_LINE),
                    }
                }
                if let Some(imap::Part::Text(first)) = parts.first() {
                    let text = String::from_utf8_lossy(first);
                    let _ = imap::capability_words(&text);
                    let _ = imap::uidvalidity(&text);
                }
                let _ = imap::fetch_body(parts);
                shape.push(u64::from(bucket(parts.len())));
            }
            imap::Response::Tagged { tag, .. } => {
                assert!(!tag.is_empty() && !tag.contains(' '));
                shape.push(1_000);
            }
            imap::Response::Continuation(_) => shape.push(2_000),
        }
    }
    shape.sort_unstable();
    shape.dedup();
    signature((shape, error.map(|e| e.split(' ').next().map(str::to_owned))))
}

fn pop3_command(input: &[u8]) -> u64 {
    let mut kinds = std::collections::BTreeSet::new();
    for line in input.split(|&b| b == b'\n').take(64) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let command = pop3::Command::parse(line);
        kinds.insert(command.verb as u64);
        if let Ok(i) = pop3::message_number(&command.arg, 10) {
            assert!(i < 10);
        }
        if let Ok((n, lines)) = pop3::top_arguments(&command.arg) {
            assert!(command.arg.contains(n));
            let shown = pop3::top(input, lines);
            assert!(input.starts_with(shown));
        }
    }
    signature(kinds)
}

fn pop3_response(input: &[u8]) -> u64 {
    const MAX: usize = 4096;
    let mut kinds = Vec::new();
    let mut lines = input
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    if let Some(first) = lines.next() {
        let text = String::from_utf8_lossy(first);
        kinds.push(match pop3::Reply::parse(&text) {
            pop3::Reply::Ok(_) => 1,
            pop3::Reply::Err(e) => 2 + u64::from(pop3::is_transient_err(e)),
            pop3::Reply::Continuation(_) => 4,
        });
    }
    let mut receiver = pop3::MultilineReceiver::new(MAX);
    for line in lines {
        match receiver.line(line) {
            Ok(Some(body)) => {
                assert!(body.len() <= MAX);
                kinds.push(u64::from(bucket(pop3::body_lines(&body).len())));
                break;
            }
            Ok(None) => {}
            Err(_) => {
                kinds.push(u64::MAX);
                break;
            }
        }
    }
    // Round trip: the server's stuffing, read back by the client, is the message with CRLF.
    let body = &input[..input.len().min(MAX / 2)];
    let stuffed = smtp_client::dot_stuff(body);
    let mut receiver = pop3::MultilineReceiver::new(usize::MAX);
    let mut got = None;
    for line in stuffed.split_inclusive(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Ok(Some(b)) = receiver.line(line) {
            got = Some(b);
            break;
        }
    }
    let Some(got) = got else {
        panic!("a dot-stuffed body has no end");
    };
    let (expected, _) = smtp_server::receive_data(&stuffed, usize::MAX)
        .and_then(Result::ok)
        .unwrap_or_default();
    assert_eq!(
        got, expected,
        "POP3 and SMTP read a stuffed body differently"
    );
    signature(kinds)
}

fn header_block(input: &[u8]) -> u64 {
    let (block, rest) = header::split_header_block(input);
    assert_eq!([block, rest].concat(), input);
    let fields = header::fields(block);
    let mut covered = 0;
    let mut entries = 0;
    for f in &fields {
        assert_eq!(f.range.start, covered, "fields leave a gap");
        assert_eq!(&block[f.range.clone()], f.raw);
        covered = f.range.end;
        let addresses = f.addresses_raw();
        assert!(addresses.len() <= f.raw.len());
        entries += addresses.len();
        assert!(f.unfolded_bytes().len() <= f.raw.len());
    }
    assert_eq!(covered, block.len(), "fields do not cover the block");
    // The From rewrite keeps every byte after the header block.
    let policy = SenderPolicy::FixedMailbox {
        mailbox: "scans".to_owned(),
        address: "scans@example.com".to_owned(),
        display_name: "Scanner".to_owned(),
    };
    let mut envelope = Envelope {
        device: "d".to_owned(),
        from: String::new(),
        rcpts: vec!["a@example.com".to_owned()],
        mailbox: String::new(),
        user_address: String::new(),
    };
    if let Ok(out) = apply_sender_policy(&policy, "d", &mut envelope, input.to_vec()) {
        assert!(out.ends_with(rest), "the rewrite changed the body");
        let (new_block, _) = header::split_header_block(&out);
        let froms = header::fields(new_block)
            .into_iter()
            .filter(|f| f.is("from"))
            .count();
        assert!(froms >= 1, "the rewrite lost the From field");
    }
    let mut login = envelope.clone();
    let login_result =
        apply_sender_policy(&SenderPolicy::LoginUser, "d", &mut login, input.to_vec());
    signature((bucket(fields.len()), bucket(entries), login_result.is_ok()))
}

fn sasl_payloads(input: &[u8]) -> u64 {
    let decoded = sasl::decode_response(input);
    let plain = decoded
        .as_ref()
        .ok()
        .map(|bytes| sasl::parse_plain(bytes).is_ok());
    if let Ok(bytes) = &decoded
        && let Ok(p) = sasl::parse_plain(bytes)
    {
        assert_eq!(
            p.authzid.len() + p.user.len() + p.password.len() + 2,
            bytes.len()
        );
    }
    let challenge = sasl::decode_error_challenge(&String::from_utf8_lossy(input)).is_some();
    // Round trips: the payloads the agent builds parse back to what went in.
    let text = String::from_utf8_lossy(input).replace('\x01', "");
    let mut half = text.len() / 2;
    while !text.is_char_boundary(half) {
        half -= 1;
    }
    let (user, token) = text.split_at(half);
    let token = sasl::AccessToken::new(token);
    let payload = sasl::xoauth2_payload(user, &token);
    let raw = base64_decode(payload.expose());
    assert_eq!(
        sasl::parse_xoauth2(&raw),
        Some((user, token.expose())),
        "XOAUTH2 payload does not round-trip"
    );
    let port = u16::from_le_bytes([
        input.first().copied().unwrap_or(0),
        input.get(1).copied().unwrap_or(0),
    ]);
    let payload = sasl::oauthbearer_payload(user, "mail.example.com", port, &token);
    let raw = base64_decode(payload.expose());
    assert_eq!(
        sasl::parse_oauthbearer(&raw),
        Some((user.to_owned(), "mail.example.com", port, token.expose())),
        "OAUTHBEARER payload does not round-trip"
    );
    signature((
        decoded
            .as_ref()
            .map(|d| bucket(d.len()))
            .map_err(|e| *e as u8),
        plain,
        challenge,
    ))
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The driver.

/// A failed input: a panic or a failed property.
#[derive(Debug, Clone)]
pub struct Crash {
    /// The input.
    pub input: Vec<u8>,
    /// The panic message.
    pub message: String,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Inputs run.
    pub executions: u64,
    /// Distinct behaviour signatures seen.
    pub signatures: usize,
    /// Inputs in the pool at the end (seeds and new-signature inputs).
    pub pool: usize,
    /// Inputs that joined the pool for a new signature (worth adding to the corpus).
    pub discovered: Vec<Vec<u8>>,
    /// Failed inputs (distinct messages).
    pub crashes: Vec<Crash>,
    /// How long it ran.
    pub elapsed: Duration,
}

/// How long and how a run goes.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Stop after this long.
    pub time: Duration,
    /// Stop after this many inputs (whichever comes first).
    pub executions: u64,
    /// Seed of the mutator.
    pub seed: u64,
    /// Longest input generated.
    pub max_len: usize,
    /// Most inputs kept in the pool.
    pub max_pool: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            time: Duration::from_secs(2),
            executions: u64::MAX,
            seed: 1,
            max_len: 16 * 1024,
            max_pool: 4096,
        }
    }
}

/// Runs one input, catching a panic. The panic hook is left to the caller ([`quiet_panics`]).
pub fn run_one(target: &Target, input: &[u8]) -> Result<u64, String> {
    catch_unwind(AssertUnwindSafe(|| (target.run)(input))).map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panic".to_owned())
    })
}

/// Silences the default panic output while fuzzing (every panic is caught and reported as a
/// [`Crash`]); returns a guard that puts the previous hook back.
pub fn quiet_panics() -> impl Drop {
    type Hook = Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Sync + Send + 'static>;
    struct Restore(Option<Hook>);
    impl Drop for Restore {
        fn drop(&mut self) {
            // A panicking thread may not change the hook (that would abort).
            if std::thread::panicking() {
                return;
            }
            if let Some(hook) = self.0.take() {
                std::panic::set_hook(hook);
            }
        }
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    Restore(Some(previous))
}

/// Fuzzes `target` from `seeds` within `budget`.
pub fn fuzz(target: &Target, seeds: &[Vec<u8>], budget: Budget) -> Report {
    let started = Instant::now();
    let mut rng = Rng::new(budget.seed);
    let mut pool: Vec<Vec<u8>> = vec![Vec::new()];
    let mut seen = HashSet::new();
    let mut report = Report::default();
    let mut messages = HashSet::new();
    let mut consider =
        |input: Vec<u8>, pool: &mut Vec<Vec<u8>>, report: &mut Report, seed: bool| {
            report.executions += 1;
            match run_one(target, &input) {
                Ok(sig) => {
                    if seen.insert(sig) && (seed || pool.len() < budget.max_pool) {
                        if !seed {
                            report.discovered.push(input.clone());
                        }
                        pool.push(input);
                    }
                }
                Err(message) => {
                    if messages.insert(message.clone()) {
                        report.crashes.push(Crash { input, message });
                    }
                }
            }
        };
    for seed in seeds {
        consider(seed.clone(), &mut pool, &mut report, true);
    }
    while report.executions < budget.executions && started.elapsed() < budget.time {
        // Check the clock every few inputs only.
        for _ in 0..64 {
            let base = &pool[rng.below(pool.len())];
            let other = &pool[rng.below(pool.len())];
            let input = mutate(base, other, target.dictionary, &mut rng, budget.max_len);
            consider(input, &mut pool, &mut report, false);
        }
    }
    report.signatures = seen.len();
    report.pool = pool.len();
    report.elapsed = started.elapsed();
    report
}

/// One mutant of `base`: one to eight edits, each a bit flip, a random byte, an insertion or
/// deletion, a protocol token, a splice with `other`, a duplicated run (long lines, many
/// lines), or a truncation.
pub fn mutate(
    base: &[u8],
    other: &[u8],
    dictionary: &[&[u8]],
    rng: &mut Rng,
    max_len: usize,
) -> Vec<u8> {
    let mut out = base.to_vec();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(out.len() + 1);
        match rng.below(9) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.next_u64() as u8;
            }
            2 => out.insert(at, rng.next_u64() as u8),
            3 if !out.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                let start = at.min(end);
                out.drain(start..end);
            }
            4 | 5 if !dictionary.is_empty() => {
                let word = dictionary[rng.below(dictionary.len())];
                out.splice(at..at, word.iter().copied());
            }
            6 if !other.is_empty() => {
                let from = rng.below(other.len());
                let to = (from + 1 + rng.below(64)).min(other.len());
                out.splice(at..at, other[from..to].iter().copied());
            }
            7 if !out.is_empty() => {
                let from = rng.below(out.len());
                let to = (from + 1 + rng.below(8)).min(out.len());
                let run = out[from..to].to_vec();
                let most = if rng.below(8) == 0 { 2048 } else { 8 };
                let times = 1 + rng.below(most);
                for _ in 0..times {
                    if out.len() + run.len() > max_len {
                        break;
                    }
                    out.splice(at..at, run.iter().copied());
                }
            }
            8 => out.truncate(at),
            _ => out.push(b'\n'),
        }
    }
    out.truncate(max_len);
    out
}
