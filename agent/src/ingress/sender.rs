//! Sender modes: who a device's message is sent as, decided when `DATA` completes.
//!
//! * [`SenderPolicy::FixedMailbox`] (FIXED_ADMIN, BULK): every message goes out as one mailbox.
//!   The header `From:` is replaced by `"<display name>" <address>` (the original `From` is kept
//!   as `Reply-To:` when the message has none, so answers still reach the person), the envelope
//!   sender becomes the address and [`Envelope::mailbox`] the mailbox name.
//! * [`SenderPolicy::LoginUser`]: the message goes out as the user signed in at the device — the
//!   address of the header `From:` (or `MAIL FROM` when the message has no `From`). A `From`
//!   that is not exactly one valid address, or no sender at all, is refused with `550 5.7.1`.
//!   Sets [`Envelope::user_address`].
//! * [`SenderPolicy::AllowUserChange`]: as `LoginUser`, but a `From` naming one of the allowed
//!   mailboxes' addresses sends as that mailbox ([`Envelope::mailbox`]).
//!
//! Rewriting touches only the header block (up to the first empty line), unfolds folded `From`
//! fields and leaves every other byte as it was. The header block, its fields and address lists
//! come from [`crate::wire::header`], the parser the mail APIs use too.

use super::handoff::DeliverError;
use crate::spool::Envelope;
use crate::wire::header::{Field, fields, split_header_block};

/// How the sender of a device's messages is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderPolicy {
    /// Always this mailbox (sender modes FIXED_ADMIN and BULK).
    FixedMailbox {
        /// The mailbox name (recorded in the envelope; the delivery worker fetches its token).
        mailbox: String,
        /// The address written into `From:` and used as the envelope sender.
        address: String,
        /// The display name in `From:`; empty = the bare address.
        display_name: String,
    },
    /// The signed-in user's own mailbox: the `From` address (sender mode LOGIN_USER).
    LoginUser,
    /// The signed-in user's mailbox, or one of these mailboxes when `From` names its address
    /// (sender mode ALLOW_USER_CHANGE).
    AllowUserChange {
        /// `(mailbox name, address)` pairs.
        allowed: Vec<(String, String)>,
    },
    /// The device's configuration does not say who sends (e.g. FIXED_ADMIN without an admin
    /// mailbox): every message is refused with `451 4.3.5` until the configuration is fixed, so
    /// devices that retry lose nothing.
    Misconfigured(String),
}

/// Applies `policy` of `device` to a complete message: updates `envelope` and returns the
/// (possibly rewritten) message, or the refusal to send to the client.
pub fn apply_sender_policy(
    policy: &SenderPolicy,
    device: &str,
    envelope: &mut Envelope,
    message: Vec<u8>,
) -> Result<Vec<u8>, DeliverError> {
    match policy {
        SenderPolicy::Misconfigured(reason) => Err(DeliverError::Rejected {
            code: 451,
            text: format!("4.3.5 Device \"{device}\" cannot send: {reason}"),
        }),
        SenderPolicy::FixedMailbox {
            mailbox,
            address,
            display_name,
        } => {
            let message = rewrite_from(&message, address, display_name);
            envelope.from = address.clone();
            envelope.mailbox = mailbox.clone();
            envelope.user_address.clear();
            Ok(message)
        }
        SenderPolicy::LoginUser => {
            let user = sender_address(device, envelope, &message)?;
            envelope.user_address = user;
            envelope.mailbox.clear();
            Ok(message)
        }
        SenderPolicy::AllowUserChange { allowed } => {
            let user = sender_address(device, envelope, &message)?;
            match allowed.iter().find(|(_, a)| a.eq_ignore_ascii_case(&user)) {
                Some((name, _)) => {
                    envelope.mailbox = name.clone();
                    envelope.user_address.clear();
                }
                None => {
                    envelope.user_address = user;
                    envelope.mailbox.clear();
                }
            }
            Ok(message)
        }
    }
}

fn refuse(device: &str, sender: &str, why: &str) -> DeliverError {
    DeliverError::Rejected {
        code: 550,
        text: format!("5.7.1 Sender <{sender}> is not allowed for device \"{device}\": {why}"),
    }
}

/// The user's address: the single address of the `From` field, or `MAIL FROM` without one.
fn sender_address(
    device: &str,
    envelope: &Envelope,
    message: &[u8],
) -> Result<String, DeliverError> {
    let (block, _) = split_header_block(message);
    let from_fields: Vec<Field<'_>> = fields(block).into_iter().filter(|f| f.is("from")).collect();
    let froms: Vec<String> = from_fields.iter().map(Field::unfolded).collect();
    match froms.as_slice() {
        [] => {
            let from = envelope.from.trim();
            if from.is_empty() {
                return Err(DeliverError::Rejected {
                    code: 550,
                    text: format!(
                        "5.7.1 Message refused for device \"{device}\": it has no From header and \
                         MAIL FROM is empty, so the signed-in user is unknown"
                    ),
                });
            }
            if !valid_address(from) {
                return Err(refuse(
                    device,
                    from,
                    "MAIL FROM is not a valid address and there is no From header",
                ));
            }
            Ok(from.to_owned())
        }
        [one] => {
            let shown: String = one
                .trim()
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect();
            let addresses = from_fields[0].addresses_raw();
            match addresses.as_slice() {
                [a] if valid_address(a) => Ok(a.clone()),
                [] => Err(refuse(device, &shown, "the From header holds no address")),
                [a] => Err(refuse(device, a, "the From header address is malformed")),
                _ => Err(refuse(
                    device,
                    &shown,
                    "the From header names more than one address",
                )),
            }
        }
        _ => Err(refuse(
            device,
            &froms[0]
                .trim()
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect::<String>(),
            "the message has more than one From header",
        )),
    }
}

/// `local@domain` with printable, unspaced parts.
fn valid_address(a: &str) -> bool {
    let Some((local, domain)) = a.rsplit_once('@') else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| !c.is_control() && !c.is_whitespace() && !"<>()[],;:\\\"".contains(c))
    };
    ok(local) && ok(domain)
}

/// `"Display" <address>` (RFC 2047 encoded-word when the name is not ASCII).
fn from_value(address: &str, display_name: &str) -> String {
    let name = display_name.trim();
    if name.is_empty() {
        return address.to_owned();
    }
    if name.is_ascii() {
        let escaped: String = name
            .chars()
            .filter(|c| !c.is_control())
            .flat_map(|c| match c {
                '"' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        format!("\"{escaped}\" <{address}>")
    } else {
        use base64::Engine as _;
        let encoded = base64::engine::general_purpose::STANDARD.encode(name.as_bytes());
        format!("=?utf-8?b?{encoded}?= <{address}>")
    }
}

/// Replaces every `From` field of the header block by `From: "<display>" <address>` (at the
/// place of the first one, or first in the block when there was none) and adds the original
/// `From` as `Reply-To` when the message has no `Reply-To` and the original sender differs.
fn rewrite_from(message: &[u8], address: &str, display_name: &str) -> Vec<u8> {
    let (block, rest) = split_header_block(message);
    let fields = fields(block);
    let has_reply_to = fields
        .iter()
        .any(|f| f.name.eq_ignore_ascii_case("reply-to"));
    let original_field = fields.iter().find(|f| f.name.eq_ignore_ascii_case("from"));
    let original = original_field.map(Field::unfolded);
    let new_from = format!("From: {}\r\n", from_value(address, display_name));
    let reply_to = original
        .as_ref()
        .zip(original_field)
        .and_then(|(o, field)| {
            let same = field
                .addresses_raw()
                .iter()
                .all(|a| a.eq_ignore_ascii_case(address));
            (!has_reply_to && !same && !o.trim().is_empty()).then(|| {
                let mut line = b"Reply-To:".to_vec();
                let value = field.unfolded_bytes();
                line.extend_from_slice(value.trim_ascii_end());
                line.extend_from_slice(b"\r\n");
                line
            })
        });
    let mut out = Vec::with_capacity(message.len() + new_from.len() + 64);
    let mut placed = false;
    if original.is_none() {
        out.extend_from_slice(new_from.as_bytes());
        placed = true;
    }
    for f in &fields {
        if f.name.eq_ignore_ascii_case("from") {
            if !placed {
                out.extend_from_slice(new_from.as_bytes());
                if let Some(r) = &reply_to {
                    out.extend_from_slice(r);
                }
                placed = true;
            }
            continue;
        }
        out.extend_from_slice(f.raw);
    }
    // A header block without a final CRLF (a message that is one unterminated line).
    if !block.is_empty() && !block.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(from: &str) -> Envelope {
        Envelope {
            device: "mfd".into(),
            from: from.into(),
            rcpts: vec!["a@x.org".into()],
            mailbox: String::new(),
            user_address: String::new(),
        }
    }

    fn fixed() -> SenderPolicy {
        SenderPolicy::FixedMailbox {
            mailbox: "scan-admin".into(),
            address: "scan@contoso.example".into(),
            display_name: "Scanner \"2F\"".into(),
        }
    }

    #[test]
    fn fixed_mailbox_rewrites_only_the_header_block() {
        let body = b"\r\nFrom: not a header\r\n\r\nbody \xff bytes\r\n";
        let msg = [
            b"Subject: s\r\nFrom: \"Jane\r\n Doe\" <jane@x.org>\r\nTo: a@x.org\r\n".as_slice(),
            body,
        ]
        .concat();
        let mut e = env("jane@x.org");
        let out = apply_sender_policy(&fixed(), "mfd", &mut e, msg).unwrap();
        let expected = [
            b"Subject: s\r\nFrom: \"Scanner \\\"2F\\\"\" <scan@contoso.example>\r\nReply-To: \"Jane Doe\" <jane@x.org>\r\nTo: a@x.org\r\n".as_slice(),
            body,
        ]
        .concat();
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&expected)
        );
        assert!(out.ends_with(body));
        assert_eq!(
            (e.from.as_str(), e.mailbox.as_str()),
            ("scan@contoso.example", "scan-admin")
        );
    }

    #[test]
    fn fixed_mailbox_keeps_reply_to_and_adds_from_when_missing() {
        let mut e = env("");
        let out = apply_sender_policy(&fixed(), "mfd", &mut e, b"Subject: s\r\n\r\nb\r\n".to_vec())
            .unwrap();
        assert_eq!(
            out,
            b"From: \"Scanner \\\"2F\\\"\" <scan@contoso.example>\r\nSubject: s\r\n\r\nb\r\n"
        );
        let msg = b"From: a@x.org\r\nReply-To: r@x.org\r\n\r\nb\r\n".to_vec();
        let out = apply_sender_policy(&fixed(), "mfd", &mut e, msg).unwrap();
        assert_eq!(
            out,
            b"From: \"Scanner \\\"2F\\\"\" <scan@contoso.example>\r\nReply-To: r@x.org\r\n\r\nb\r\n"
        );
    }

    #[test]
    fn eight_bit_from_is_kept_byte_for_byte_in_reply_to() {
        let msg = b"From: Ren\xe9\r\n <rene@x.org>\r\n\r\n\xff\r\n".to_vec();
        let out = apply_sender_policy(&fixed(), "mfd", &mut env(""), msg).unwrap();
        assert!(
            out.windows(29)
                .any(|w| w == b"Reply-To: Ren\xe9 <rene@x.org>\r\n"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        assert!(out.ends_with(b"\r\n\r\n\xff\r\n"));
    }

    #[test]
    fn login_user_takes_the_from_address() {
        let mut e = env("device@lan");
        let msg = b"From: Jane Doe\r\n <Jane.Doe@Contoso.example>\r\n\r\nb\r\n".to_vec();
        let out =
            apply_sender_policy(&SenderPolicy::LoginUser, "mfd", &mut e, msg.clone()).unwrap();
        assert_eq!(out, msg);
        assert_eq!(e.user_address, "jane.doe@contoso.example");
        let mut e = env("bob@x.org");
        apply_sender_policy(
            &SenderPolicy::LoginUser,
            "mfd",
            &mut e,
            b"Subject: s\r\n\r\n".to_vec(),
        )
        .unwrap();
        assert_eq!(e.user_address, "bob@x.org");
    }

    #[test]
    fn login_user_refusals_name_the_problem() {
        let cases: [(&str, &[u8], &str); 4] = [
            (
                "",
                b"Subject: s\r\n\r\nb\r\n",
                "no From header and MAIL FROM is empty",
            ),
            (
                "a@x.org",
                b"From: \"Nobody\"\r\n\r\nb\r\n",
                "holds no address",
            ),
            (
                "a@x.org",
                b"From: a@x.org, b@x.org\r\n\r\nb\r\n",
                "more than one address",
            ),
            ("a@x.org", b"From: <a@>\r\n\r\nb\r\n", "malformed"),
        ];
        for (from, msg, why) in cases {
            let err = apply_sender_policy(
                &SenderPolicy::LoginUser,
                "mfd",
                &mut env(from),
                msg.to_vec(),
            )
            .unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with("550 5.7.1"), "{text}");
            assert!(text.contains(why), "{text}");
        }
    }

    #[test]
    fn allow_user_change_picks_an_allowed_mailbox() {
        let policy = SenderPolicy::AllowUserChange {
            allowed: vec![("frontdesk".into(), "frontdesk@x.org".into())],
        };
        let mut e = env("");
        apply_sender_policy(
            &policy,
            "mfd",
            &mut e,
            b"From: FrontDesk@x.org\r\n\r\n".to_vec(),
        )
        .unwrap();
        assert_eq!(
            (e.mailbox.as_str(), e.user_address.as_str()),
            ("frontdesk", "")
        );
        let mut e = env("");
        apply_sender_policy(&policy, "mfd", &mut e, b"From: jane@x.org\r\n\r\n".to_vec()).unwrap();
        assert_eq!(
            (e.mailbox.as_str(), e.user_address.as_str()),
            ("", "jane@x.org")
        );
    }
}
