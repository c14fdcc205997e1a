//! The operators' pages: sign-in and sign-out, fleet overview, mailbox, device, agents and
//! audit. Each handler checks the session (and, for POSTs, the CSRF token), calls admin
//! operations with the session's principal, and renders the result. Buttons appear only for
//! principals with write access to the tenant; the operations refuse forged requests anyway.

use std::collections::HashMap;
use std::fmt::Write as _;

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use time::OffsetDateTime;
use tokenfleet_core::fleet::model::{ConnectionTarget, ConnectionTestResult, DeviceHealth};
use tokenfleet_core::fleet::{self, TestRequest};
use tokenfleet_core::resources::mailboxes::MailboxView;
use tokenfleet_domain::{AuditEvent, TokenStatus};

use super::ConsoleState;
use super::help::anchor_for;
use super::html::{
    Chrome, action_button, badge, csrf_field, esc, notice, page, relative, seg, status_words,
    when_at,
};
use super::session::{
    self, MAX_LIFETIME, SESSION_COOKIE, SIGNIN_COOKIE, cookie, read_cookie, same_token,
};
use crate::audit::{self, AuditQuery};
use crate::authz::{Access, Principal};
use crate::consent_links;
use crate::identity::enrollment::{self, CodeRequest};
use crate::metrics::SignIn;
use crate::ops::Error;
use crate::tokens::consent::Challenge;
use crate::tokens::operator;

type FormData = Form<HashMap<String, String>>;

/// A request with a live session.
pub(super) struct Signed {
    pub principal: Principal,
    pub csrf: String,
    sid: String,
}

impl Signed {
    fn chrome<'a>(&'a self, active: &'a str) -> Chrome<'a> {
        let p = &self.principal;
        let who = match &p.tenant {
            Some(t) => format!("{} · {} of {t}", p.key_id, p.role.as_str()),
            None => format!("{} · {}", p.key_id, p.role.as_str()),
        };
        Chrome {
            who,
            csrf: &self.csrf,
            active,
        }
    }

    fn may_write(&self, tenant: &str) -> bool {
        self.principal.may_access_tenant(tenant, Access::Write)
    }
}

fn cookie_header(headers: &HeaderMap) -> &str {
    headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

fn to_sign_in() -> Response {
    Redirect::to("/console/sign-in").into_response()
}

/// The session of a request, or the answer to give instead (sign-in page).
async fn signed_in(state: &ConsoleState, headers: &HeaderMap) -> Result<Signed, Response> {
    let Some(sid) = read_cookie(cookie_header(headers), SESSION_COOKIE) else {
        return Err(to_sign_in());
    };
    let Some(s) = state.sessions.get(sid) else {
        return Err(to_sign_in());
    };
    // A key revoked since sign-in ends its sessions at once.
    match crate::api_keys::get(state.admin.broker_state(), &s.principal.key_id).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            state.sessions.remove_key(&s.principal.key_id);
            return Err(to_sign_in());
        }
        Err(e) => return Err(error_page(&Error::from(e), None)),
    }
    // The key's call rate holds for its console session too.
    state
        .admin
        .check_call_rate(&s.principal.key_id)
        .map_err(|e| error_page(&e, None))?;
    Ok(Signed {
        principal: s.principal,
        csrf: s.csrf,
        sid: sid.to_owned(),
    })
}

/// A page handler's signed-in session: a request without a live session is answered with the
/// redirect to the sign-in page (or the error page) before the handler runs.
impl axum::extract::FromRequestParts<ConsoleState> for Signed {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &ConsoleState,
    ) -> Result<Self, Self::Rejection> {
        signed_in(state, &parts.headers).await
    }
}

/// The session of a POST with a matching CSRF token.
async fn signed_post(
    state: &ConsoleState,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<Signed, Response> {
    let s = signed_in(state, headers).await?;
    let sent = form.get("csrf").map(String::as_str).unwrap_or_default();
    if !same_token(sent, &s.csrf) {
        tracing::info!(principal = %s.principal.key_id, "console: POST refused, CSRF token missing or wrong");
        return Err(status_page(
            StatusCode::FORBIDDEN,
            "Request refused",
            Some(&s.chrome("")),
            &notice(
                "bad",
                "The form's security token is missing or does not match this session (CSRF check). Reload the page and try again.",
            ),
        ));
    }
    Ok(s)
}

fn status_page(
    status: StatusCode,
    title: &str,
    chrome: Option<&Chrome<'_>>,
    body: &str,
) -> Response {
    (status, Html(page(title, chrome, body))).into_response()
}

/// The answer to a failed operation: its HTTP status and its message.
fn error_page(err: &Error, chrome: Option<&Chrome<'_>>) -> Response {
    let status = StatusCode::from_u16(crate::edge::http_status::http_status(err))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let text = match err {
        Error::Internal { detail, .. } => {
            tracing::error!(error = %detail, "console: operation failed");
            err.to_string()
        }
        other => other.to_string(),
    };
    let title = match err {
        Error::PermissionDenied(_) => "Not allowed",
        Error::NotFound(_) => "Not found",
        Error::Unauthenticated(_) => "Not signed in",
        _ => "The operation failed",
    };
    let mut page = status_page(status, title, chrome, &notice("bad", &text));
    if let Error::ResourceExhausted {
        retry_after: Some(wait),
        ..
    } = err
    {
        let secs = crate::ops::error::retry_after_secs(*wait).to_string();
        if let Ok(value) = HeaderValue::from_str(&secs) {
            page.headers_mut().insert(header::RETRY_AFTER, value);
        }
    }
    page
}

// ---------------------------------------------------------------------------------------------
// Sign-in and sign-out

pub(super) async fn sign_in_form(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
) -> Response {
    if signed_in(&state, &headers).await.is_ok() {
        return Redirect::to("/console/").into_response();
    }
    sign_in_page(StatusCode::OK, None)
}

fn sign_in_page(status: StatusCode, problem: Option<&str>) -> Response {
    let Some(pre) = session::random_token() else {
        return status_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Sign in",
            None,
            &notice(
                "bad",
                "The broker could not make a random value; try again.",
            ),
        );
    };
    let mut body = String::new();
    if let Some(problem) = problem {
        body.push_str(&notice("bad", problem));
    }
    let _ = write!(
        body,
        "<form class=\"card narrow\" method=\"post\" action=\"/console/sign-in\">{}\
<p>Sign in with an admin API key (made with <code>tokenfleetctl apikey create</code>). The key is checked once; your browser keeps only a session cookie.</p>\
<label for=\"api_key\">API key</label>\
<input id=\"api_key\" name=\"api_key\" type=\"password\" autocomplete=\"current-password\" required autofocus spellcheck=\"false\">\
<button class=\"btn primary\" type=\"submit\">Sign in</button></form>",
        csrf_field(&pre)
    );
    let mut response = status_page(status, "Sign in", None, &body);
    if let Ok(v) = HeaderValue::from_str(&cookie(SIGNIN_COOKIE, &pre, 600)) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

/// A sign-in's client address for the log (`unknown` when the router is driven directly).
fn shown_client(client: Option<std::net::IpAddr>) -> String {
    client.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string())
}

pub(super) async fn sign_in(
    State(state): State<ConsoleState>,
    client: Option<axum::Extension<crate::listener::ClientAddress>>,
    headers: HeaderMap,
    Form(form): FormData,
) -> Response {
    // The client's address (set by the HTTP listener, behind trusted proxies the one they
    // name; absent when the router is driven directly): failed sign-ins are counted per source.
    let peer = client.map(|axum::Extension(crate::listener::ClientAddress(ip))| ip);
    // Double-submit check of the sign-in form (there is no session yet).
    let pre = read_cookie(cookie_header(&headers), SIGNIN_COOKIE).unwrap_or_default();
    let sent = form.get("csrf").map(String::as_str).unwrap_or_default();
    if !same_token(sent, pre) {
        state.metrics.sign_in(SignIn::CsrfFailed);
        return sign_in_page(
            StatusCode::FORBIDDEN,
            Some(
                "The sign-in form expired or was not sent from this console (CSRF check); sign in again.",
            ),
        );
    }
    if !state.sessions.failure_allowed(peer) {
        state.metrics.sign_in(SignIn::RateLimited);
        tracing::info!(client = %shown_client(peer), "console sign-in refused: too many failed sign-ins from this address");
        return sign_in_page(
            StatusCode::TOO_MANY_REQUESTS,
            Some(
                "Too many failed sign-ins from your address in the last minute; wait a minute and try again.",
            ),
        );
    }
    let key = form.get("api_key").map(|k| k.trim()).unwrap_or_default();
    let principal = match crate::api_keys::authenticate(state.admin.broker_state(), key).await {
        Ok(p) => p,
        Err(Error::Unauthenticated(msg)) => {
            state.sessions.record_failure(peer);
            state.metrics.sign_in(SignIn::Unauthenticated);
            tracing::info!(client = %shown_client(peer), "console sign-in refused: {msg}");
            return sign_in_page(
                StatusCode::UNAUTHORIZED,
                Some(&format!("{msg}; check the key and try again.")),
            );
        }
        Err(e) => return error_page(&e, None),
    };
    state.metrics.sign_in(SignIn::Ok);
    tracing::info!(principal = %principal.key_id, "console sign-in");
    let broker = state.admin.broker_state();
    crate::audit::record(
        broker,
        &tokenfleet_store::Scope::Global,
        tokenfleet_domain::AuditEvent {
            time: broker.clock.now(),
            actor: principal.actor(),
            action: "console.sign_in".to_owned(),
            target: "console".to_owned(),
            tenant: String::new(),
            result: "ok".to_owned(),
            detail: "signed in to the web console".to_owned(),
        },
    )
    .await;
    let Some((sid, _)) = state.sessions.create(principal) else {
        return error_page(
            &Error::Internal {
                message: "the broker could not make a session id; try again".to_owned(),
                detail: "getrandom failed".to_owned(),
            },
            None,
        );
    };
    let mut response = Redirect::to("/console/").into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&cookie(SESSION_COOKIE, &sid, MAX_LIFETIME.as_secs())) {
        h.append(header::SET_COOKIE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&cookie(SIGNIN_COOKIE, "", 0)) {
        h.append(header::SET_COOKIE, v);
    }
    response
}

pub(super) async fn sign_out(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): FormData,
) -> Response {
    let s = match signed_post(&state, &headers, &form).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    state.sessions.remove(&s.sid);
    let mut response = Redirect::to("/console/sign-in").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie(SESSION_COOKIE, "", 0)) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

// ---------------------------------------------------------------------------------------------
// Overview

/// Tenants the principal may see.
async fn visible_tenants(state: &ConsoleState, s: &Signed) -> Result<Vec<String>, Error> {
    if let Some(t) = &s.principal.tenant {
        return Ok(vec![t.clone()]);
    }
    Ok(state
        .admin
        .console_tenants(&s.principal)
        .await?
        .into_iter()
        .map(|t| t.value.name)
        .collect())
}

/// One row of "needs attention".
struct Problem {
    rank: u8,
    tenant: String,
    what: String,
    link: String,
    status: (String, &'static str),
    detail: String,
}

fn mailbox_link(tenant: &str, name: &str) -> String {
    format!("/console/t/{}/mailboxes/{}", seg(tenant), seg(name))
}

fn device_link(tenant: &str, name: &str) -> String {
    format!("/console/t/{}/devices/{}", seg(tenant), seg(name))
}

/// How long an agent may stay silent before the overview lists it.
const AGENT_SILENT: time::Duration = time::Duration::minutes(5);
/// A refresh token this close to its expiry is listed.
const REFRESH_TOKEN_SOON: time::Duration = time::Duration::days(7);

fn mailbox_problem(view: &MailboxView, now: OffsetDateTime) -> Option<Problem> {
    let m = &view.mailbox;
    let token = &m.token;
    let (word, class) = status_words(token.status);
    let reason = token
        .last_error
        .as_ref()
        .map(|e| e.reason.clone())
        .unwrap_or_default();
    let rank = match token.status {
        TokenStatus::ReauthRequired => 0,
        TokenStatus::RefreshFailing => 1,
        TokenStatus::ConsentPending => 2,
        TokenStatus::NotRetrieved => 3,
        TokenStatus::Active | TokenStatus::Disabled => {
            let expiring = view
                .grant
                .as_ref()
                .and_then(|g| g.refresh_token_expires)
                .filter(|t| *t - now < REFRESH_TOKEN_SOON)?;
            return Some(Problem {
                rank: 2,
                tenant: m.tenant.clone(),
                what: format!("mailbox {}", m.name),
                link: mailbox_link(&m.tenant, &m.name),
                status: ("REFRESH_TOKEN_EXPIRING".to_owned(), "warn"),
                detail: format!(
                    "the refresh token expires {}; consent again before then",
                    relative(expiring, now)
                ),
            });
        }
    };
    let detail = match rank {
        2 => "waiting for a person to sign in".to_owned(),
        3 if reason.is_empty() => "no consent yet".to_owned(),
        _ => reason,
    };
    Some(Problem {
        rank,
        tenant: m.tenant.clone(),
        what: format!("mailbox {}", m.name),
        link: mailbox_link(&m.tenant, &m.name),
        status: (word.to_owned(), class),
        detail,
    })
}

fn health_words(health: DeviceHealth) -> (&'static str, &'static str) {
    match health {
        DeviceHealth::Ok => ("OK", "ok"),
        DeviceHealth::Degraded => ("DEGRADED", "warn"),
        DeviceHealth::Failing => ("FAILING", "bad"),
        DeviceHealth::Unknown | DeviceHealth::Unspecified => ("SILENT", "warn"),
    }
}

#[derive(Default)]
struct TenantCounts {
    mailboxes: usize,
    active: usize,
    need_person: usize,
    devices: usize,
    devices_bad: usize,
    agents: usize,
    agents_silent: usize,
}

pub(super) async fn overview(
    State(state): State<ConsoleState>,
    s: Signed,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let chrome = s.chrome("overview");
    match overview_body(&state, &s, &q).await {
        Ok(body) => status_page(StatusCode::OK, "Fleet overview", Some(&chrome), &body),
        Err(e) => error_page(&e, Some(&chrome)),
    }
}

async fn overview_body(
    state: &ConsoleState,
    s: &Signed,
    q: &HashMap<String, String>,
) -> Result<String, Error> {
    let now = state.admin.broker_state().clock.now();
    let search = q
        .get("q")
        .map(|v| v.trim().to_lowercase())
        .unwrap_or_default();
    let only_tenant = q
        .get("tenant")
        .map(|v| v.trim().to_owned())
        .unwrap_or_default();
    let tenants = visible_tenants(state, s).await?;
    let mut problems = Vec::new();
    let mut counts: Vec<(String, TenantCounts)> = Vec::new();
    let mut mailboxes = Vec::new();
    let fleet = fleet::fleet_status(state.admin.broker_state(), &s.principal, "").await?;
    for tenant in &tenants {
        let mut c = TenantCounts::default();
        for m in state.admin.console_mailboxes(&s.principal, tenant).await? {
            c.mailboxes += 1;
            if m.mailbox.token.status == TokenStatus::Active {
                c.active += 1;
            }
            if let Some(p) = mailbox_problem(&m, now) {
                if p.rank <= 3 && p.status.0 != "REFRESH_FAILING" {
                    c.need_person += 1;
                }
                problems.push(p);
            }
            mailboxes.push(m);
        }
        for a in state.admin.console_agents(&s.principal, tenant).await? {
            let a = a.value;
            c.agents += 1;
            if a.revoked {
                continue;
            }
            let seen = a.last_seen;
            if seen.is_none_or(|t| now - t > AGENT_SILENT) {
                c.agents_silent += 1;
                problems.push(Problem {
                    rank: 4,
                    tenant: a.tenant.clone(),
                    what: format!("agent {}", a.name),
                    link: "/console/agents".to_owned(),
                    status: ("NOT_SEEN".to_owned(), "warn"),
                    detail: match seen {
                        Some(t) => format!("last seen {}", relative(t, now)),
                        None => "never connected (enroll it)".to_owned(),
                    },
                });
            }
        }
        counts.push((tenant.clone(), c));
    }
    for d in &fleet {
        if let Some((_, c)) = counts.iter_mut().find(|(t, _)| *t == d.tenant) {
            c.devices += 1;
            if d.health != DeviceHealth::Ok {
                c.devices_bad += 1;
            }
        }
        if d.health == DeviceHealth::Ok {
            continue;
        }
        let (word, class) = health_words(d.health);
        let queue = d
            .status
            .as_ref()
            .filter(|st| st.queue_depth > 0 || st.dead_lettered_total > 0)
            .map(|st| {
                format!(
                    " · queue {} · dead letters {}",
                    st.queue_depth, st.dead_lettered_total
                )
            })
            .unwrap_or_default();
        problems.push(Problem {
            rank: if word == "FAILING" { 1 } else { 3 },
            tenant: d.tenant.clone(),
            what: format!("device {}", d.device),
            link: device_link(&d.tenant, &d.device),
            status: (word.to_owned(), class),
            detail: format!("{}{queue}", d.problem),
        });
    }
    let matches = |tenant: &str, text: &str| {
        (only_tenant.is_empty() || only_tenant == tenant)
            && (search.is_empty() || text.to_lowercase().contains(&search))
    };
    problems.retain(|p| matches(&p.tenant, &format!("{} {} {}", p.tenant, p.what, p.detail)));
    problems.sort_by(|a, b| {
        a.rank
            .cmp(&b.rank)
            .then_with(|| a.tenant.cmp(&b.tenant))
            .then_with(|| a.what.cmp(&b.what))
    });

    let mut body = String::new();
    // Filter form (GET, works without script).
    let _ = write!(
        body,
        "<form class=\"filters\" method=\"get\" action=\"/console/\" role=\"search\">\
<label for=\"q\">Search</label><input id=\"q\" name=\"q\" type=\"search\" value=\"{}\" placeholder=\"mailbox, device, address…\">\
<label for=\"tenant\">Tenant</label><select id=\"tenant\" name=\"tenant\"><option value=\"\">All tenants</option>",
        esc(&search)
    );
    for t in &tenants {
        let sel = if *t == only_tenant { " selected" } else { "" };
        let _ = write!(body, "<option value=\"{0}\"{sel}>{0}</option>", esc(t));
    }
    body.push_str("</select><button class=\"btn\" type=\"submit\">Filter</button></form>");

    let _ = write!(
        body,
        "<section aria-labelledby=\"problems-h\"><h2 id=\"problems-h\">Needs attention <span class=\"count\">{}</span></h2>",
        problems.len()
    );
    if problems.is_empty() {
        body.push_str(&notice("ok", "Nothing needs attention."));
    } else {
        body.push_str("<div class=\"table-wrap\"><table id=\"problems\"><thead><tr><th scope=\"col\">Status</th><th scope=\"col\">Tenant</th><th scope=\"col\">What</th><th scope=\"col\">Why</th></tr></thead><tbody>");
        for p in &problems {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td><a href=\"{}\">{}</a></td><td>{}</td></tr>",
                badge(&p.status.0, p.status.1),
                esc(&p.tenant),
                esc(&p.link),
                esc(&p.what),
                esc(&p.detail)
            );
        }
        body.push_str("</tbody></table></div>");
    }
    body.push_str("</section>");

    body.push_str("<section aria-labelledby=\"tenants-h\"><h2 id=\"tenants-h\">Tenants</h2><div class=\"table-wrap\"><table><thead><tr><th scope=\"col\">Tenant</th><th scope=\"col\">Mailboxes</th><th scope=\"col\">Active</th><th scope=\"col\">Need a person</th><th scope=\"col\">Devices</th><th scope=\"col\">Devices with problems</th><th scope=\"col\">Agents</th><th scope=\"col\">Agents not seen</th></tr></thead><tbody>");
    for (t, c) in counts
        .iter()
        .filter(|(t, _)| only_tenant.is_empty() || *t == only_tenant)
    {
        let _ = write!(
            body,
            "<tr><th scope=\"row\"><a href=\"/console/?tenant={}\">{}</a></th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            seg(t),
            esc(t),
            c.mailboxes,
            c.active,
            c.need_person,
            c.devices,
            c.devices_bad,
            c.agents,
            c.agents_silent
        );
    }
    body.push_str("</tbody></table></div></section>");

    body.push_str("<section aria-labelledby=\"mailboxes-h\"><h2 id=\"mailboxes-h\">Mailboxes</h2><div class=\"table-wrap\"><table id=\"mailboxes\"><thead><tr><th scope=\"col\">Status</th><th scope=\"col\">Tenant</th><th scope=\"col\">Mailbox</th><th scope=\"col\">Address</th><th scope=\"col\">Access token expires</th></tr></thead><tbody>");
    for m in mailboxes
        .iter()
        .map(|v| &v.mailbox)
        .filter(|m| matches(&m.tenant, &format!("{} {} {}", m.tenant, m.name, m.address)))
    {
        let (word, class) = status_words(m.token.status);
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td><a href=\"{}\">{}</a></td><td>{}</td><td>{}</td></tr>",
            badge(word, class),
            esc(&m.tenant),
            esc(&mailbox_link(&m.tenant, &m.name)),
            esc(&m.name),
            esc(&m.address),
            when_at(m.token.access_token_expires, now)
        );
    }
    body.push_str("</tbody></table></div></section>");

    body.push_str("<section aria-labelledby=\"devices-h\"><h2 id=\"devices-h\">Devices</h2><div class=\"table-wrap\"><table id=\"devices\"><thead><tr><th scope=\"col\">Health</th><th scope=\"col\">Tenant</th><th scope=\"col\">Device</th><th scope=\"col\">Agent</th><th scope=\"col\">Last report</th><th scope=\"col\">Problem</th></tr></thead><tbody>");
    for d in fleet
        .iter()
        .filter(|d| matches(&d.tenant, &format!("{} {} {}", d.tenant, d.device, d.agent)))
    {
        let (word, class) = health_words(d.health);
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td><a href=\"{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            badge(word, class),
            esc(&d.tenant),
            esc(&device_link(&d.tenant, &d.device)),
            esc(&d.device),
            esc(&d.agent),
            when_at(d.last_report_time, now),
            esc(&d.problem)
        );
    }
    body.push_str("</tbody></table></div></section>");
    Ok(body)
}

// ---------------------------------------------------------------------------------------------
// Mailbox

pub(super) async fn mailbox(
    State(state): State<ConsoleState>,
    s: Signed,
    Path((tenant, name)): Path<(String, String)>,
) -> Response {
    mailbox_page(&state, &s, &tenant, &name, None).await
}

async fn mailbox_page(
    state: &ConsoleState,
    s: &Signed,
    tenant: &str,
    name: &str,
    flash: Option<String>,
) -> Response {
    let chrome = s.chrome("overview");
    let view = match state
        .admin
        .console_mailbox(&s.principal, tenant, name)
        .await
    {
        Ok(view) => view,
        Err(e) => return error_page(&e, Some(&chrome)),
    };
    let now = state.admin.broker_state().clock.now();
    let (m, grant) = (&view.mailbox, view.grant.clone().unwrap_or_default());
    let token = &m.token;
    let (word, class) = status_words(token.status);
    let base = mailbox_link(tenant, name);
    let write = s.may_write(tenant);
    let mut body = String::new();
    if let Some(flash) = flash {
        body.push_str(&flash);
    }
    let _ = write!(
        body,
        "<p class=\"lead\"><strong>{}</strong> · tenant {} · provider {} · {}</p>\
<section class=\"card\" aria-labelledby=\"status-h\"><h2 id=\"status-h\">Status <span id=\"live-status\" data-poll=\"{}/status.json\">{}</span></h2>",
        esc(&m.address),
        esc(tenant),
        esc(&m.provider),
        esc(m.grant_type.as_str()),
        esc(&base),
        badge(word, class)
    );
    if let Some(err) = &token.last_error {
        let anchor = anchor_for(&err.code, word);
        let _ = write!(
            body,
            "<dl class=\"facts\"><dt>Reason</dt><dd>{}</dd><dt>Fix</dt><dd>{}</dd><dt>Help</dt><dd><a href=\"/console/help/troubleshooting#{}\">Troubleshooting: {}</a></dd></dl>",
            esc(&err.reason),
            esc(&err.fix),
            esc(&anchor),
            esc(if err.code.is_empty() { word } else { &err.code })
        );
    }
    if let Some(dc) = &grant.pending_device_code {
        let expires = dc.expires.unix_timestamp();
        let _ = write!(
            body,
            "<div class=\"device-code\" aria-live=\"polite\"><p>Sign in as <strong>{}</strong> at <a href=\"{}\" target=\"_blank\" rel=\"noopener noreferrer\">{}</a> and enter the code</p>\
<p class=\"user-code\" id=\"user-code\">{}</p><p>The code expires in <span data-countdown=\"{}\">{}</span>. This page updates by itself when the mailbox becomes ACTIVE.</p></div>",
            esc(if m.consent_account.is_empty() {
                &m.address
            } else {
                &m.consent_account
            }),
            esc(&dc.verification_uri),
            esc(&dc.verification_uri),
            esc(&dc.user_code),
            expires,
            esc(&relative(dc.expires, now))
        );
    }
    let _ = write!(
        body,
        "<dl class=\"facts\"><dt>Access token expires</dt><dd>{}</dd><dt>Refresh token expires</dt><dd>{}</dd><dt>Last refresh</dt><dd>{}</dd><dt>Next refresh</dt><dd>{}</dd><dt>Failed refreshes in a row</dt><dd>{}</dd><dt>Clock skew</dt><dd>{}</dd></dl>",
        when_at(token.access_token_expires, now),
        when_at(grant.refresh_token_expires, now),
        when_at(token.last_refresh, now),
        when_at(grant.next_refresh, now),
        grant.consecutive_failures,
        if grant.clock_skew_secs == 0 {
            "—".to_owned()
        } else {
            format!("{} s", grant.clock_skew_secs)
        }
    );
    if write {
        body.push_str("<div class=\"actions\">");
        body.push_str(&action_button(
            &format!("{base}/consent"),
            &s.csrf,
            "Start consent",
            "primary",
            None,
        ));
        body.push_str(&action_button(
            &format!("{base}/refresh"),
            &s.csrf,
            "Refresh now",
            "",
            None,
        ));
        body.push_str(&action_button(
            &format!("{base}/delete-token"),
            &s.csrf,
            "Delete token",
            "danger",
            Some("Delete the stored token? Devices stop getting tokens until someone consents again."),
        ));
        body.push_str("</div>");
    }
    body.push_str("</section>");

    // Consent links.
    body.push_str("<section class=\"card\" aria-labelledby=\"links-h\"><h2 id=\"links-h\">Consent links</h2><p>A consent link lets the mailbox's owner sign in without you: it works once, expires, and can be withdrawn.</p>");
    if write {
        let _ = write!(
            body,
            "<form class=\"inline-form\" method=\"post\" action=\"{}/links\">{}<label for=\"ttl\">Valid for</label><select id=\"ttl\" name=\"ttl_seconds\"><option value=\"86400\">1 day</option><option value=\"604800\" selected>7 days</option><option value=\"2592000\">30 days</option></select><button class=\"btn primary\" type=\"submit\">Create consent link</button></form>",
            esc(&base),
            csrf_field(&s.csrf)
        );
    }
    match consent_links::list(state.admin.broker_state(), &s.principal, tenant, name).await {
        Ok(links) if !links.is_empty() => {
            body.push_str("<div class=\"table-wrap\"><table id=\"links\"><thead><tr><th scope=\"col\">Link id</th><th scope=\"col\">State</th><th scope=\"col\">Created</th><th scope=\"col\">Expires</th><th scope=\"col\"><span class=\"sr-only\">Actions</span></th></tr></thead><tbody>");
            for l in links {
                let shown = l.shown_state(now);
                let revoke = if write && (shown == "pending" || shown == "used") {
                    action_button(
                        &format!(
                            "/console/t/{}/links/{}/revoke?mailbox={}",
                            seg(tenant),
                            seg(l.id()),
                            seg(name)
                        ),
                        &s.csrf,
                        "Revoke",
                        "danger",
                        Some("Withdraw this consent link? Its page stops working at once."),
                    )
                } else {
                    String::new()
                };
                let _ = write!(
                    body,
                    "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{revoke}</td></tr>",
                    esc(l.id()),
                    badge(shown, if shown == "pending" { "warn" } else { "muted" }),
                    when_at(Some(l.created), now),
                    when_at(Some(l.expires), now)
                );
            }
            body.push_str("</tbody></table></div>");
        }
        Ok(_) => body.push_str("<p class=\"muted\">No consent links.</p>"),
        Err(e) => body.push_str(&notice("bad", &e.to_string())),
    }
    body.push_str("</section>");

    // History from the audit log.
    body.push_str(
        "<section class=\"card\" aria-labelledby=\"history-h\"><h2 id=\"history-h\">History</h2>",
    );
    let target = format!("tenants/{tenant}/mailboxes/{name}");
    let query = AuditQuery {
        tenant: tenant.to_owned(),
        page_size: 500,
        ..AuditQuery::default()
    };
    match audit::list_events(state.admin.broker_state(), &s.principal, &query).await {
        Ok(page) => {
            let rows: Vec<_> = page
                .events
                .iter()
                .map(|(_, e)| e)
                .filter(|e| e.target == target)
                .take(50)
                .collect();
            if rows.is_empty() {
                body.push_str("<p class=\"muted\">No events yet.</p>");
            } else {
                body.push_str(&audit_table(&rows, now));
            }
        }
        Err(e) => body.push_str(&notice("bad", &e.to_string())),
    }
    body.push_str("</section>");
    status_page(
        StatusCode::OK,
        &format!("Mailbox {name}"),
        Some(&chrome),
        &body,
    )
}

/// Live status of a mailbox for the page's script.
pub(super) async fn mailbox_status(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path((tenant, name)): Path<(String, String)>,
) -> Response {
    let s = match signed_in(&state, &headers).await {
        Ok(s) => s,
        Err(_) => {
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(serde_json::json!({"error": "signed out"})),
            )
                .into_response();
        }
    };
    match state
        .admin
        .console_mailbox(&s.principal, &tenant, &name)
        .await
    {
        Ok(m) => axum::Json(status_json(&m)).into_response(),
        Err(e) => {
            let status = StatusCode::from_u16(crate::edge::http_status::http_status(&e))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (
                status,
                axum::Json(serde_json::json!({"error": e.to_string()})),
            )
                .into_response()
        }
    }
}

/// The JSON the live parts poll: status word, its class, reason and fix.
pub(super) fn status_json(view: &MailboxView) -> serde_json::Value {
    let token = &view.mailbox.token;
    let (word, class) = status_words(token.status);
    let (reason, fix) = token
        .last_error
        .as_ref()
        .map(|e| (e.reason.as_str(), e.fix.as_str()))
        .unwrap_or_default();
    serde_json::json!({
        "status": word,
        "class": class,
        "reason": reason,
        "fix": fix,
    })
}

pub(super) async fn mailbox_action(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path((tenant, name, action)): Path<(String, String, String)>,
    Form(form): FormData,
) -> Response {
    let s = match signed_post(&state, &headers, &form).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let chrome = s.chrome("overview");
    let p = &s.principal;
    let broker = state.admin.broker_state();
    let flash = match action.as_str() {
        // Consent redirects to the broker's own callback (no redirect URI of the caller's).
        "consent" => {
            match operator::start_consent(broker, p, &tenant, &name, "", state.admin.public_url())
                .await
            {
                Ok(started) => match started.challenge {
                    Challenge::Authorization { url, .. } => {
                        // Off to the provider; it comes back through /oauth/callback.
                        return Redirect::to(&url).into_response();
                    }
                    Challenge::DeviceCode { .. } => notice(
                        "ok",
                        "Device code issued: the person signs in with the code below.",
                    ),
                    Challenge::None => notice("ok", "Token obtained; nobody had to sign in."),
                },
                Err(e) => return error_page(&e, Some(&chrome)),
            }
        }
        "refresh" => match operator::refresh_now(state.admin.tokens(), p, &tenant, &name).await {
            Ok(_) => notice("ok", "Refreshed."),
            Err(e) => return error_page(&e, Some(&chrome)),
        },
        "delete-token" => {
            match operator::delete_token(state.admin.tokens(), p, &tenant, &name).await {
                Ok(_) => notice("ok", "Token deleted; the mailbox is NOT_RETRIEVED."),
                Err(e) => return error_page(&e, Some(&chrome)),
            }
        }
        "links" => {
            let ttl = form
                .get("ttl_seconds")
                .and_then(|v| v.trim().parse::<i32>().ok())
                .unwrap_or(0);
            let created = match consent_links::ttl_from_seconds(ttl.into()) {
                Ok(ttl) => consent_links::create(broker, p, &tenant, &name, ttl).await,
                Err(e) => Err(e),
            };
            match created {
                Ok(created) => format!(
                    "<div class=\"notice ok\" role=\"status\"><p>Consent link created. Send this address to the mailbox's owner; it is shown only now.</p>\
<label for=\"link-url\">Consent link</label><input id=\"link-url\" class=\"copy\" readonly value=\"{}\"><button class=\"btn\" type=\"button\" data-copy=\"link-url\">Copy</button></div>",
                    esc(&created.url(state.admin.public_url()))
                ),
                Err(e) => return error_page(&e, Some(&chrome)),
            }
        }
        _ => {
            return status_page(
                StatusCode::NOT_FOUND,
                "Not found",
                Some(&chrome),
                &notice("bad", "No such mailbox action."),
            );
        }
    };
    mailbox_page(&state, &s, &tenant, &name, Some(flash)).await
}

pub(super) async fn revoke_link(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path((tenant, id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    Form(form): FormData,
) -> Response {
    let s = match signed_post(&state, &headers, &form).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let chrome = s.chrome("overview");
    match consent_links::revoke(state.admin.broker_state(), &s.principal, &tenant, &id).await {
        Ok(link) => {
            let mailbox = q
                .get("mailbox")
                .cloned()
                .unwrap_or_else(|| link.mailbox.clone());
            mailbox_page(
                &state,
                &s,
                &tenant,
                &mailbox,
                Some(notice(
                    "ok",
                    &format!("Consent link {} revoked.", link.id()),
                )),
            )
            .await
        }
        Err(e) => error_page(&e, Some(&chrome)),
    }
}

// ---------------------------------------------------------------------------------------------
// Device

pub(super) async fn device(
    State(state): State<ConsoleState>,
    s: Signed,
    Path((tenant, name)): Path<(String, String)>,
) -> Response {
    device_page(&state, &s, &tenant, &name, None).await
}

async fn device_page(
    state: &ConsoleState,
    s: &Signed,
    tenant: &str,
    name: &str,
    result: Option<ConnectionTestResult>,
) -> Response {
    let chrome = s.chrome("overview");
    let d = match state.admin.console_device(&s.principal, tenant, name).await {
        Ok(d) => d.value,
        Err(e) => return error_page(&e, Some(&chrome)),
    };
    let now = state.admin.broker_state().clock.now();
    let fleet = fleet::fleet_status(state.admin.broker_state(), &s.principal, tenant)
        .await
        .ok()
        .and_then(|f| f.into_iter().find(|x| x.device == name));
    let mut body = String::new();
    if let Some(r) = &result {
        body.push_str(&test_result(r, now));
    }
    let _ = write!(
        body,
        "<section class=\"card\" aria-labelledby=\"dev-h\"><h2 id=\"dev-h\">{}</h2><dl class=\"facts\"><dt>Agent</dt><dd>{}</dd><dt>Sender mode</dt><dd>{}</dd><dt>Mailboxes</dt><dd>",
        esc(if d.display_name.is_empty() {
            &d.name
        } else {
            &d.display_name
        }),
        esc(if d.agent.is_empty() {
            "none assigned"
        } else {
            &d.agent
        }),
        esc(d.sender_mode.as_str())
    );
    let names: Vec<&str> = [d.admin_mailbox.as_str(), d.bulk_mailbox.as_str()]
        .into_iter()
        .chain(d.allowed_mailboxes.iter().map(String::as_str))
        .filter(|m| !m.is_empty())
        .collect();
    if names.is_empty() {
        body.push('—');
    }
    for (i, m) in names.iter().enumerate() {
        if i > 0 {
            body.push_str(", ");
        }
        let _ = write!(
            body,
            "<a href=\"{}\">{}</a>",
            esc(&mailbox_link(tenant, m)),
            esc(m)
        );
    }
    body.push_str("</dd>");
    if let Some(f) = &fleet {
        let (word, class) = health_words(f.health);
        let _ = write!(
            body,
            "<dt>Health</dt><dd>{} {}</dd><dt>Agent connected</dt><dd>{}</dd><dt>Last report</dt><dd>{}</dd>",
            badge(word, class),
            esc(&f.problem),
            if f.agent_connected { "yes" } else { "no" },
            when_at(f.last_report_time, now)
        );
        if let Some(st) = &f.status {
            let last = st
                .last_delivery
                .as_ref()
                .map(|l| format!("{} {}", if l.ok { "ok" } else { "failed" }, l.final_reply))
                .unwrap_or_else(|| "—".to_owned());
            let _ = write!(
                body,
                "<dt>Queue</dt><dd>{} (dead letters {})</dd><dt>Last delivery</dt><dd>{}</dd>",
                st.queue_depth,
                st.dead_lettered_total,
                esc(&last)
            );
        }
    }
    body.push_str("</dl>");
    if s.may_write(tenant) {
        let _ = write!(
            body,
            "<form class=\"inline-form\" method=\"post\" action=\"{}/test\">{}<label for=\"target\">Connection test</label><select id=\"target\" name=\"target\"><option value=\"send\">Send (SMTP / API)</option><option value=\"fetch\">Fetch (POP3 / IMAP)</option></select><button class=\"btn primary\" type=\"submit\" data-busy=\"Testing…\">Run test</button></form>",
            esc(&device_link(tenant, name)),
            csrf_field(&s.csrf)
        );
    }
    body.push_str("</section>");
    if result.is_none()
        && let Some(last) = fleet
            .as_ref()
            .and_then(|f| f.status.as_ref())
            .and_then(|st| st.last_connection_test.as_ref())
    {
        body.push_str("<h2>Last connection test</h2>");
        body.push_str(&test_result(last, now));
    }
    status_page(
        StatusCode::OK,
        &format!("Device {name}"),
        Some(&chrome),
        &body,
    )
}

fn test_result(r: &ConnectionTestResult, now: OffsetDateTime) -> String {
    let verdict = r
        .verdict
        .wire_name()
        .trim_start_matches("CONNECTION_VERDICT_")
        .to_owned();
    let class = if verdict == "OK" { "ok" } else { "bad" };
    let mut out = format!(
        "<section class=\"card\" id=\"test-result\" aria-live=\"polite\"><h2>Verdict {}</h2><dl class=\"facts\"><dt>Endpoint</dt><dd>{}</dd><dt>Summary</dt><dd>{}</dd>",
        badge(&verdict, class),
        esc(&r.endpoint),
        esc(&r.summary)
    );
    if !r.fix.is_empty() {
        let _ = write!(
            out,
            "<dt>Fix</dt><dd>{}</dd><dt>Help</dt><dd><a href=\"/console/help/troubleshooting#{}\">Troubleshooting</a></dd>",
            esc(&r.fix),
            esc(&anchor_for(&verdict.to_lowercase(), &r.summary))
        );
    }
    let _ = write!(out, "<dt>Time</dt><dd>{}</dd></dl>", when_at(r.time, now));
    if !r.steps.is_empty() {
        out.push_str("<div class=\"table-wrap\"><table class=\"steps\"><thead><tr><th scope=\"col\">Step</th><th scope=\"col\">Result</th><th scope=\"col\">Detail</th><th scope=\"col\">ms</th></tr></thead><tbody>");
        for st in &r.steps {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&st.name),
                badge(
                    if st.ok { "ok" } else { "failed" },
                    if st.ok { "ok" } else { "bad" }
                ),
                esc(&st.detail),
                st.duration_ms
            );
        }
        out.push_str("</tbody></table></div>");
    }
    out.push_str("</section>");
    out
}

pub(super) async fn test_connection(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path((tenant, name)): Path<(String, String)>,
    Form(form): FormData,
) -> Response {
    let s = match signed_post(&state, &headers, &form).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let target = match form.get("target").map(String::as_str) {
        Some("fetch") => ConnectionTarget::Fetch,
        _ => ConnectionTarget::Send,
    };
    let req = TestRequest {
        tenant: tenant.clone(),
        device: name.clone(),
        target: Ok(target),
        timeout_seconds: 30,
    };
    match fleet::test_connection(state.admin.broker_state(), &s.principal, req).await {
        Ok(result) => device_page(&state, &s, &tenant, &name, Some(result)).await,
        Err(e) => error_page(&e, Some(&s.chrome("overview"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Agents

pub(super) async fn agents(State(state): State<ConsoleState>, s: Signed) -> Response {
    agents_page(&state, &s, None).await
}

async fn agents_page(state: &ConsoleState, s: &Signed, flash: Option<String>) -> Response {
    let chrome = s.chrome("agents");
    let tenants = match visible_tenants(state, s).await {
        Ok(t) => t,
        Err(e) => return error_page(&e, Some(&chrome)),
    };
    let now = state.admin.broker_state().clock.now();
    let mut body = flash.unwrap_or_default();
    let writable: Vec<&String> = tenants.iter().filter(|t| s.may_write(t)).collect();
    if !writable.is_empty() {
        let _ = write!(
            body,
            "<section class=\"card\" aria-labelledby=\"enroll-h\"><h2 id=\"enroll-h\">Enroll an agent</h2><form class=\"grid-form\" method=\"post\" action=\"/console/agents/enroll\">{}<label for=\"en-tenant\">Tenant</label><select id=\"en-tenant\" name=\"tenant\">",
            csrf_field(&s.csrf)
        );
        for t in &writable {
            let _ = write!(body, "<option value=\"{0}\">{0}</option>", esc(t));
        }
        body.push_str("</select><label for=\"en-name\">Agent name</label><input id=\"en-name\" name=\"agent\" required pattern=\"[a-z0-9][a-z0-9-]*\" autocomplete=\"off\"><label for=\"en-display\">Site (display name)</label><input id=\"en-display\" name=\"display_name\" autocomplete=\"off\"><label class=\"check\"><input type=\"checkbox\" name=\"re_enroll\" value=\"1\"> Re-enroll (replaces the current certificate)</label><button class=\"btn primary\" type=\"submit\">Create one-time code</button></form></section>");
    }
    body.push_str("<div class=\"table-wrap\"><table id=\"agents\"><thead><tr><th scope=\"col\">Tenant</th><th scope=\"col\">Agent</th><th scope=\"col\">Site</th><th scope=\"col\">Last seen</th><th scope=\"col\">Version</th><th scope=\"col\">Certificate expires</th><th scope=\"col\">State</th><th scope=\"col\"><span class=\"sr-only\">Actions</span></th></tr></thead><tbody>");
    for t in &tenants {
        let list = match state.admin.console_agents(&s.principal, t).await {
            Ok(l) => l,
            Err(e) => return error_page(&e, Some(&chrome)),
        };
        for a in list.into_iter().map(|a| a.value) {
            let state_badge = if a.revoked {
                badge("REVOKED", "muted")
            } else if a.last_seen.is_some_and(|x| now - x <= AGENT_SILENT) {
                badge("SEEN", "ok")
            } else {
                badge("NOT_SEEN", "warn")
            };
            let revoke = if s.may_write(t) && !a.revoked {
                action_button(
                    &format!("/console/t/{}/agents/{}/revoke", seg(t), seg(&a.name)),
                    &s.csrf,
                    "Revoke",
                    "danger",
                    Some(
                        "Revoke this agent? It is cut off at once and cannot come back under this name.",
                    ),
                )
            } else {
                String::new()
            };
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{revoke}</td></tr>",
                esc(t),
                esc(&a.name),
                esc(&a.display_name),
                when_at(a.last_seen, now),
                esc(&a.software_version),
                when_at(a.certificate_expires, now),
                state_badge
            );
        }
    }
    body.push_str("</tbody></table></div>");
    status_page(StatusCode::OK, "Agents", Some(&chrome), &body)
}

pub(super) async fn enroll(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): FormData,
) -> Response {
    let s = match signed_post(&state, &headers, &form).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let get = |k: &str| form.get(k).map(|v| v.trim().to_owned()).unwrap_or_default();
    let req = CodeRequest {
        tenant: get("tenant"),
        agent: get("agent"),
        display_name: get("display_name"),
        ttl_seconds: 0,
        re_enroll: form.contains_key("re_enroll"),
    };
    let broker = state.admin.broker_state();
    match enrollment::create_code(broker, &s.principal, &req).await {
        Ok(r) => {
            let public = state.admin.public_url().to_owned();
            let command = format!(
                "tokenfleet-agent enroll --broker <broker gRPC address> --code {} --ca-file ca.pem --state-dir ./agent-data",
                r.code.expose()
            );
            let flash = format!(
                "<div class=\"notice ok\" role=\"status\"><p>One-time code for agent <strong>{}</strong>, shown only now; it expires {}.</p>\
<label for=\"en-code\">Code</label><input id=\"en-code\" class=\"copy\" readonly value=\"{}\"><button class=\"btn\" type=\"button\" data-copy=\"en-code\">Copy</button>\
<label for=\"en-cmd\">Run at the site</label><input id=\"en-cmd\" class=\"copy\" readonly value=\"{}\"><button class=\"btn\" type=\"button\" data-copy=\"en-cmd\">Copy</button><p class=\"muted\">Broker: {}</p></div>",
                esc(&r.agent.value.name),
                when_at(Some(r.expires), broker.clock.now()),
                esc(r.code.expose()),
                esc(&command),
                esc(&public)
            );
            agents_page(&state, &s, Some(flash)).await
        }
        Err(e) => error_page(&e, Some(&s.chrome("agents"))),
    }
}

pub(super) async fn revoke_agent(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path((tenant, name)): Path<(String, String)>,
    Form(form): FormData,
) -> Response {
    let s = match signed_post(&state, &headers, &form).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match enrollment::revoke_agent(state.admin.broker_state(), &s.principal, &tenant, &name).await {
        Ok(a) => {
            agents_page(
                &state,
                &s,
                Some(notice("ok", &format!("Agent {} revoked.", a.value.name))),
            )
            .await
        }
        Err(e) => error_page(&e, Some(&s.chrome("agents"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Audit

fn audit_table(events: &[&AuditEvent], now: OffsetDateTime) -> String {
    let mut out = String::from(
        "<div class=\"table-wrap\"><table class=\"audit\"><thead><tr><th scope=\"col\">Time</th><th scope=\"col\">Actor</th><th scope=\"col\">Action</th><th scope=\"col\">Target</th><th scope=\"col\">Result</th><th scope=\"col\">Detail</th></tr></thead><tbody>",
    );
    for e in events {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            when_at(Some(e.time), now),
            esc(&e.actor),
            esc(&e.action),
            esc(&e.target),
            badge(&e.result, if e.result == "ok" { "ok" } else { "bad" }),
            esc(&e.detail)
        );
    }
    out.push_str("</tbody></table></div>");
    out
}

pub(super) async fn audit(
    State(state): State<ConsoleState>,
    s: Signed,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let chrome = s.chrome("audit");
    let tenants = match visible_tenants(&state, &s).await {
        Ok(t) => t,
        Err(e) => return error_page(&e, Some(&chrome)),
    };
    let default_tenant = if s.principal.tenant.is_some()
        || s.principal.role != tokenfleet_domain::Role::FleetAdmin
    {
        tenants.first().cloned().unwrap_or_default()
    } else {
        String::new()
    };
    let tenant = q.get("tenant").cloned().unwrap_or(default_tenant);
    let kind = q.get("kind").cloned().unwrap_or_default();
    let search = q
        .get("q")
        .map(|v| v.trim().to_lowercase())
        .unwrap_or_default();
    let mut body = String::new();
    let _ = write!(
        body,
        "<form class=\"filters\" method=\"get\" action=\"/console/audit\" role=\"search\"><label for=\"a-tenant\">Tenant</label><select id=\"a-tenant\" name=\"tenant\">"
    );
    if s.principal.role == tokenfleet_domain::Role::FleetAdmin {
        let _ = write!(
            body,
            "<option value=\"\"{}>Global (fleet)</option>",
            if tenant.is_empty() { " selected" } else { "" }
        );
    }
    for t in &tenants {
        let sel = if *t == tenant { " selected" } else { "" };
        let _ = write!(body, "<option value=\"{0}\"{sel}>{0}</option>", esc(t));
    }
    body.push_str(
        "</select><label for=\"a-kind\">Kind</label><select id=\"a-kind\" name=\"kind\">",
    );
    for (value, label) in [
        ("", "All"),
        ("changes", "Changes"),
        ("refused", "Refused"),
        ("issuance", "Token issuance"),
    ] {
        let sel = if value == kind { " selected" } else { "" };
        let _ = write!(body, "<option value=\"{value}\"{sel}>{label}</option>");
    }
    let _ = write!(
        body,
        "</select><label for=\"a-q\">Contains</label><input id=\"a-q\" name=\"q\" type=\"search\" value=\"{}\"><button class=\"btn\" type=\"submit\">Filter</button></form>",
        esc(&search)
    );
    let query = AuditQuery {
        tenant: tenant.clone(),
        kind,
        page_size: 500,
        page_token: String::new(),
    };
    match audit::list_events(state.admin.broker_state(), &s.principal, &query).await {
        Ok(page) => {
            let now = state.admin.broker_state().clock.now();
            let rows: Vec<_> = page
                .events
                .iter()
                .map(|(_, e)| e)
                .filter(|e| {
                    search.is_empty()
                        || format!(
                            "{} {} {} {} {}",
                            e.actor, e.action, e.target, e.result, e.detail
                        )
                        .to_lowercase()
                        .contains(&search)
                })
                .take(200)
                .collect();
            if rows.is_empty() {
                body.push_str("<p class=\"muted\">No events match.</p>");
            } else {
                body.push_str(&audit_table(&rows, now));
            }
        }
        Err(e) => body.push_str(&notice("bad", &e.to_string())),
    }
    status_page(StatusCode::OK, "Audit log", Some(&chrome), &body)
}
