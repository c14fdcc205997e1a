//! Agent enrollment from the operator's side: `agent enroll-code` (a one-time code for
//! `tokenfleet-agent enroll`, printed once) and `agent revoke`.

use clap::Args;
use serde::Serialize;
use tokenfleet_proto::v1 as pb;

use crate::args::{ConfirmArg, ScopedName};
use crate::view::{AgentView, rfc3339};

/// `agent enroll-code`
#[derive(Debug, Clone, Args)]
pub struct EnrollCodeArgs {
    #[command(flatten)]
    pub id: ScopedName,
    /// Human-readable name (site) when the agent is new.
    #[arg(long, value_name = "TEXT")]
    pub display_name: Option<String>,
    /// How long the code works: seconds, or with a unit (`90s`, `15m`, `2h`); 1m-24h, default 1h.
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
    pub ttl: Option<i32>,
    /// Make a re-enroll code: needed when the agent holds a current certificate. Enrolling with
    /// it replaces that certificate and cuts off the agent process running with it.
    #[arg(long)]
    pub re_enroll: bool,
}

/// `agent revoke`
#[derive(Debug, Clone, Args)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub id: ScopedName,
    #[command(flatten)]
    pub confirm: ConfirmArg,
}

/// Reads `900`, `90s`, `15m`, `2h` as seconds (60-86400).
fn parse_ttl(text: &str) -> Result<i32, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let value: i64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (e.g. 900, 15m, 2h)"))?;
    let seconds = match unit {
        "" | "s" => value,
        "m" => value.saturating_mul(60),
        "h" => value.saturating_mul(3600),
        other => return Err(format!("unknown unit `{other}` (use s, m or h)")),
    };
    if !(60..=86_400).contains(&seconds) {
        return Err(format!("must be between 1m and 24h, got {seconds} s"));
    }
    i32::try_from(seconds).map_err(|_| "too long".to_owned())
}

/// The request of `agent enroll-code`.
pub fn enroll_code_request(args: EnrollCodeArgs) -> pb::CreateEnrollmentCodeRequest {
    pb::CreateEnrollmentCodeRequest {
        tenant: args.id.tenant,
        agent: args.id.name,
        display_name: args.display_name.unwrap_or_default(),
        ttl_seconds: args.ttl.unwrap_or(0),
        re_enroll: args.re_enroll,
    }
}

/// The request of `agent revoke`.
pub fn revoke_request(args: RevokeArgs) -> pb::RevokeAgentRequest {
    pb::RevokeAgentRequest {
        tenant: args.id.tenant,
        name: args.id.name,
    }
}

/// What `agent enroll-code` prints: the code (shown only this once) and how to use it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnrollmentCodeView {
    pub tenant: String,
    pub agent: String,
    pub code: String,
    pub expire_time: Option<String>,
    /// The command to run at the site.
    pub enroll_command: String,
    pub agent_record: Option<AgentView>,
}

/// Builds the view of a created code for a broker reached at `broker_url`.
pub fn enroll_code_view(
    response: &pb::CreateEnrollmentCodeResponse,
    broker_url: &str,
) -> EnrollmentCodeView {
    let agent = response.agent.as_ref();
    EnrollmentCodeView {
        tenant: agent.map(|a| a.tenant.clone()).unwrap_or_default(),
        agent: agent.map(|a| a.name.clone()).unwrap_or_default(),
        code: response.code.clone(),
        expire_time: rfc3339(response.expire_time.as_ref()),
        enroll_command: format!(
            "tokenfleet-agent enroll --broker {broker_url} --code {} [--ca-file <broker CA>]",
            response.code
        ),
        agent_record: agent.map(AgentView::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> ScopedName {
        ScopedName {
            tenant: "acme".into(),
            name: "site-a".into(),
        }
    }

    #[test]
    fn ttls_take_units_and_limits() {
        assert_eq!(parse_ttl("900"), Ok(900));
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("15m"), Ok(900));
        assert_eq!(parse_ttl("24h"), Ok(86_400));
        for bad in ["", "59", "25h", "1d", "m", "-5m"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_carry_the_flags() {
        let req = enroll_code_request(EnrollCodeArgs {
            id: id(),
            display_name: Some("Head office".into()),
            ttl: Some(600),
            re_enroll: true,
        });
        assert_eq!(
            (req.tenant.as_str(), req.agent.as_str(), req.ttl_seconds),
            ("acme", "site-a", 600)
        );
        assert_eq!(req.display_name, "Head office");
        let req = enroll_code_request(EnrollCodeArgs {
            id: id(),
            display_name: None,
            ttl: None,
            re_enroll: false,
        });
        assert_eq!(req.ttl_seconds, 0);
        assert!(!req.re_enroll);
        let req = revoke_request(RevokeArgs {
            id: id(),
            confirm: ConfirmArg::default(),
        });
        assert_eq!((req.tenant.as_str(), req.name.as_str()), ("acme", "site-a"));
    }

    #[test]
    fn the_view_says_how_to_enroll() {
        let view = enroll_code_view(
            &pb::CreateEnrollmentCodeResponse {
                code: "tfe_0123".into(),
                expire_time: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: 0,
                }),
                agent: Some(pb::Agent {
                    tenant: "acme".into(),
                    name: "site-a".into(),
                    ..Default::default()
                }),
            },
            "https://localhost:50051",
        );
        assert_eq!(view.agent, "site-a");
        assert_eq!(view.expire_time.as_deref(), Some("1970-01-01T00:00:00Z"));
        assert!(
            view.enroll_command.starts_with(
                "tokenfleet-agent enroll --broker https://localhost:50051 --code tfe_0123"
            ),
            "{}",
            view.enroll_command
        );
    }
}
