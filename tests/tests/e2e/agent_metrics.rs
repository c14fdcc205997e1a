//! The agent's metrics listener end to end: the real `tokenfleet-agent run` of an [`AgentSite`]
//! (enrolled at a TLS broker, the fake identity provider, Dovecot upstream) with `[metrics]
//! listen` on a free loopback port. Traffic first — a printer message delivered and fetched
//! back by the device's POP3 fetch job, an on-demand connection test, then the upstream taken
//! away so a second message is deferred — then `/metrics` scraped as OpenMetrics and as the
//! Prometheus 0.0.4 text and the series checked by value; `/healthz` answers 200, and 503 with
//! the reason while the spool cannot be written; the listener's limits hold (header size,
//! request bodies, methods, connections per source, header read timeout), and a full listener
//! makes room for a new connection by closing the one that has waited longest for a request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use tokenfleet_proto::v1 as pb;
use tokenfleet_testkit::agent_site::{
    ADDRESS, AgentSite, DEVICE, DEVICE_USER, MAILBOX, SiteOptions, TENANT, TcpRelay, eventually,
    plain_fetch, plain_smtp,
};
use tokenfleet_testkit::dovecot::Dovecot;
use tokenfleet_testkit::silent::{closed_within, connect_silent_from};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const OPENMETRICS: &str = "application/openmetrics-text;version=1.0.0,text/plain;q=0.5";

/// One HTTP/1.1 exchange on a new connection (`Connection: close`): status, head, body.
async fn http(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut raw))
        .await
        .expect("an answer within 20 s")
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status line in {text:?}"));
    (status, head.to_owned(), body.to_owned())
}

async fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> (u16, String, String) {
    let accept = accept.map_or_else(String::new, |a| format!("Accept: {a}\r\n"));
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n");
    http(addr, request.as_bytes()).await
}

/// Logs in to the SMTP ingress at `addr` with `AUTH PLAIN` and returns the reply to it.
async fn smtp_auth_plain(addr: SocketAddr, user: &str, password: &str) -> String {
    use base64::Engine as _;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(read));
    // The reply to the last command: its lines up to the one without a continuation.
    let mut reply = async || loop {
        let line = lines.next_line().await.unwrap().expect("a reply");
        if line.as_bytes().get(3) != Some(&b'-') {
            return line;
        }
    };
    assert!(reply().await.starts_with("220 "));
    write.write_all(b"EHLO metrics-test\r\n").await.unwrap();
    assert!(reply().await.starts_with("250 "));
    let credentials =
        base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    write
        .write_all(format!("AUTH PLAIN {credentials}\r\n").as_bytes())
        .await
        .unwrap();
    reply().await
}

/// Logs in to the POP3 server at `addr` with `USER`/`PASS` and returns the reply to `PASS`.
async fn pop3_user_pass(addr: SocketAddr, user: &str, password: &str) -> String {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(read));
    let greeting = lines.next_line().await.unwrap().expect("a greeting");
    assert!(greeting.starts_with("+OK"), "{greeting}");
    for command in [format!("USER {user}\r\n"), format!("PASS {password}\r\n")] {
        write.write_all(command.as_bytes()).await.unwrap();
    }
    let user_reply = lines.next_line().await.unwrap().expect("a reply to USER");
    assert!(user_reply.starts_with("+OK"), "{user_reply}");
    lines.next_line().await.unwrap().expect("a reply to PASS")
}

/// The value of the sample `series` (name and label set exactly as exposed) in `text`.
pub(crate) fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// [`value`], which must be there.
pub(crate) fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// Every label name used by a sample in `text`.
fn label_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((_, rest)) = line.split_once('{') else {
            continue;
        };
        let labels = rest.rsplit_once('}').map_or(rest, |(l, _)| l);
        for pair in labels.split("\",") {
            if let Some((name, _)) = pair.split_once('=') {
                names.insert(name.trim_start_matches(',').to_owned());
            }
        }
    }
    names
}

async fn scrape(site: &AgentSite) -> String {
    let (status, _, body) = get(site.metrics, "/metrics", Some(OPENMETRICS)).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_agent_did_in_both_formats_and_healthz_tells_the_truth() {
    let site = AgentSite::start(SiteOptions {
        purposes: vec![pb::MailPurpose::Send, pb::MailPurpose::Pop],
        device: Box::new(|dovecot: &Dovecot| pb::Device {
            smtp: Some(plain_smtp(dovecot.submission_addr())),
            fetch: Some(plain_fetch(
                pb::FetchProtocol::Pop3,
                dovecot.pop3_addr(),
                10,
            )),
            ..Default::default()
        }),
        // No periodic tests: the one on-demand test below is the only one counted. A short
        // header timeout for the slow-client check.
        agent_config: "connection_test_interval_seconds = 0\n\
                       metrics.header_read_timeout_seconds = 2\n"
            .into(),
        ..SiteOptions::default()
    })
    .await;

    let (status, head, body) = get(site.metrics, "/healthz", None).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"), "{head}");

    // Delivered, then fetched back from the same mailbox by the device's fetch job.
    site.print(1, None).await;
    let text = eventually(
        "the delivered message fetched back",
        Duration::from_secs(40),
        || async {
            let text = scrape(&site).await;
            (value(&text, "tokenfleet_agent_messages_delivered_total") == Some(1.0)
                && value(&text, "tokenfleet_agent_fetched_messages_total") == Some(1.0))
            .then_some(text)
        },
    )
    .await;
    assert!(
        must(&text, "tokenfleet_agent_fetch_runs_total{result=\"ok\"}") >= 1.0,
        "{text}"
    );
    // The printer logged in; a wrong password is answered 535 and counted as failed.
    assert!(
        must(
            &text,
            "tokenfleet_agent_ingress_logins_total{protocol=\"smtp\",result=\"ok\"}"
        ) >= 1.0,
        "{text}"
    );
    let reply = smtp_auth_plain(site.smtp, DEVICE_USER, "not-the-password").await;
    assert!(reply.starts_with("535 "), "{reply}");
    // And on the local POP3 server: `-ERR [AUTH]`, counted as a failed POP3 login.
    let reply = pop3_user_pass(site.pop3, DEVICE_USER, "not-the-password").await;
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    let text = scrape(&site).await;
    for protocol in ["smtp", "pop3"] {
        let series = format!(
            "tokenfleet_agent_ingress_logins_total{{protocol=\"{protocol}\",result=\"failed\"}}"
        );
        assert_eq!(must(&text, &series), 1.0, "{text}");
    }

    // An on-demand connection test of the send profile.
    let result = site
        .admin()
        .test_connection(pb::TestConnectionRequest {
            tenant: TENANT.into(),
            device: DEVICE.into(),
            target: pb::ConnectionTarget::Send as i32,
            timeout_seconds: 20,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        result.verdict,
        pb::ConnectionVerdict::Ok as i32,
        "{result:#?}"
    );

    // The upstream goes away: the next message is deferred and waits in the spool.
    let relay = TcpRelay::start(site.dovecot.submission_addr()).await;
    relay.pause(true);
    site.update_device(|d| d.smtp = Some(plain_smtp(relay.addr())))
        .await;
    site.print(1, None).await;
    let om = eventually(
        "a deferred message in the queue",
        Duration::from_secs(30),
        || async {
            let text = scrape(&site).await;
            (value(
                &text,
                "tokenfleet_agent_messages_deferred_total{kind=\"upstream\"}",
            ) >= Some(1.0)
                && value(&text, "tokenfleet_agent_oldest_queued_message_age_seconds") > Some(0.0))
            .then_some(text)
        },
    )
    .await;

    // OpenMetrics, by value.
    let (status, head, om_again) = get(site.metrics, "/metrics", Some(OPENMETRICS)).await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    for text in [&om, &om_again] {
        assert!(text.ends_with("# EOF\n"), "{text}");
        for (series, want) in [
            ("tokenfleet_agent_messages_accepted_total", 2.0),
            ("tokenfleet_agent_messages_delivered_total", 1.0),
            (
                "tokenfleet_agent_messages_dead_lettered_total{kind=\"permanent\"}",
                0.0,
            ),
            (
                "tokenfleet_agent_messages_deferred_total{kind=\"no_token\"}",
                0.0,
            ),
            ("tokenfleet_agent_fetched_messages_total", 1.0),
            (
                "tokenfleet_agent_fetch_runs_total{result=\"no_token\"}",
                0.0,
            ),
            // One send token and one fetch token, each asked once (then cached).
            ("tokenfleet_agent_token_requests_total{result=\"ok\"}", 2.0),
            (
                "tokenfleet_agent_token_requests_total{result=\"denied\"}",
                0.0,
            ),
            (
                "tokenfleet_agent_connection_tests_total{target=\"send\",verdict=\"ok\"}",
                1.0,
            ),
            ("tokenfleet_agent_queued_messages", 1.0),
            ("tokenfleet_agent_dead_letter_messages", 0.0),
        ] {
            assert_eq!(must(text, series), want, "{series} in:\n{text}");
        }
    }
    for line in [
        "# TYPE tokenfleet_agent_messages_accepted counter",
        "# TYPE tokenfleet_agent_oldest_queued_message_age_seconds gauge",
        "# UNIT tokenfleet_agent_oldest_queued_message_age_seconds seconds",
        "# TYPE tokenfleet_agent_build info",
        "# TYPE process_cpu_seconds counter",
    ] {
        assert!(om.lines().any(|l| l == line), "{line} missing in:\n{om}");
    }
    let version = format!(
        "tokenfleet_agent_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(must(&om, &version), 1.0);
    let queued = must(&om, "tokenfleet_agent_queued_message_bytes");
    assert!(queued > 100.0, "{om}");
    assert!(
        must(&om, "tokenfleet_agent_spool_disk_usage_bytes") >= queued,
        "{om}"
    );
    assert_eq!(
        must(&om, "tokenfleet_agent_spool_quota_bytes"),
        1_073_741_824.0
    );
    assert!(must(&om, "process_cpu_seconds_total") > 0.0, "{om}");
    assert!(must(&om, "process_resident_memory_bytes") > 1e6, "{om}");
    assert!(must(&om, "process_open_fds") >= 5.0, "{om}");
    assert!(must(&om, "process_start_time_seconds") > 1.7e9, "{om}");

    // No tenant, mailbox, device or address in any label: only the fixed label names.
    let names = label_names(&om);
    let allowed: BTreeSet<String> = [
        "kind", "listener", "protocol", "reason", "result", "target", "verdict", "version",
    ]
    .map(str::to_owned)
    .into();
    assert!(names.is_subset(&allowed), "label names {names:?}");
    // The dashboard check (`observability`) knows the agent's series by a list: it must be
    // exactly what the agent serves, so neither a missing nor a misspelt name hides there.
    let served: BTreeSet<&str> = om
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .filter(|name| name.starts_with("tokenfleet_agent_"))
        .collect();
    let listed: BTreeSet<&str> = crate::observability::AGENT_SERIES.iter().copied().collect();
    assert_eq!(
        served, listed,
        "the agent's series against observability::AGENT_SERIES"
    );
    for name in [TENANT, DEVICE, MAILBOX, ADDRESS] {
        assert!(
            !om.lines()
                .filter(|l| !l.starts_with('#'))
                .any(|l| l.contains(&format!("\"{name}\""))),
            "{name} as a label value in:\n{om}"
        );
    }

    // The same numbers in the Prometheus 0.0.4 text (no Accept header, as curl sends).
    let (status, head, prom) = get(site.metrics, "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    for (series, want) in [
        ("tokenfleet_agent_messages_accepted_total", 2.0),
        ("tokenfleet_agent_messages_delivered_total", 1.0),
        ("tokenfleet_agent_token_requests_total{result=\"ok\"}", 2.0),
        ("tokenfleet_agent_queued_messages", 1.0),
        (&version, 1.0),
    ] {
        assert_eq!(must(&prom, series), want, "{series} in:\n{prom}");
    }
    assert!(
        must(
            &prom,
            "tokenfleet_agent_messages_deferred_total{kind=\"upstream\"}"
        ) >= 1.0,
        "{prom}"
    );
    for line in [
        "# TYPE tokenfleet_agent_messages_accepted_total counter",
        "# HELP tokenfleet_agent_messages_delivered_total Messages the upstream accepted.",
        "# TYPE tokenfleet_agent_build_info gauge",
        "# TYPE process_cpu_seconds_total counter",
        "# TYPE tokenfleet_agent_spool_disk_usage_bytes gauge",
    ] {
        assert!(
            prom.lines().any(|l| l == line),
            "{line} missing in:\n{prom}"
        );
    }
    assert!(
        !prom.contains("# EOF") && !prom.contains("# UNIT"),
        "OpenMetrics-only lines in the 0.0.4 text:\n{prom}"
    );
    // Every sample line of the 0.0.4 text belongs to a family it declared with # TYPE.
    let declared: BTreeSet<&str> = prom
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for line in prom.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        assert!(
            declared.contains(name),
            "{name} has no # TYPE of its own:\n{prom}"
        );
    }

    // /healthz: 503 with the reason while the spool cannot take a write, 200 again after.
    let spool_tmp = site.state.join("spool").join("tmp");
    std::fs::remove_dir_all(&spool_tmp).unwrap();
    std::fs::write(&spool_tmp, b"not a directory").unwrap();
    let (status, _, body) = get(site.metrics, "/healthz", None).await;
    std::fs::remove_file(&spool_tmp).unwrap();
    std::fs::create_dir(&spool_tmp).unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("spool not writable: "), "{body:?}");
    let (status, _, body) = get(site.metrics, "/healthz", None).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_refuses_what_is_over_its_limits() {
    let site = AgentSite::start(SiteOptions {
        purposes: vec![pb::MailPurpose::Send],
        agent_config: "metrics.header_read_timeout_seconds = 4\n\
                       metrics.max_connections = 4\n\
                       metrics.max_connections_per_source = 3\n"
            .into(),
        ..SiteOptions::default()
    })
    .await;
    let addr = site.metrics;

    // A request header over max_request_header_bytes (8192 by default): 431.
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    let (status, _, _) = http(addr, big.as_bytes()).await;
    assert_eq!(status, 431);
    // A request with a body: 413; another method: 405; another path: 404.
    let (status, _, body) = http(
        addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert_eq!(status, 413, "{body}");
    let (status, head, _) = http(
        addr,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);
    assert!(
        head.to_ascii_lowercase().contains("allow: get, head"),
        "{head}"
    );
    let (status, _, _) = get(addr, "/admin", None).await;
    assert_eq!(status, 404);

    // A client that never sends its header is disconnected after the header read timeout.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), idle.read_to_end(&mut buf))
        .await
        .expect("closed within 15 s")
        .ok();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(3500) && waited < Duration::from_secs(10),
        "closed after {waited:?}"
    );

    // Connections per source: the fourth open one from 127.0.0.1 gets 503 and is closed.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _, body) = get(addr, "/healthz", None).await;
    assert_eq!((status, body.as_str()), (503, "too many connections\n"));
    drop(held);
    let (status, _, body) = eventually("a free slot again", Duration::from_secs(5), || async {
        let answer = get(addr, "/healthz", None).await;
        (answer.0 == 200).then_some(answer)
    })
    .await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    // A full listener makes room: a keep-alive connection idle after its answer and three
    // connections from two other hosts that send nothing fill it; four more silent ones from two
    // more hosts each close the one that has waited longest (at once, not after the header read
    // timeout), the newest still wait, and a health probe still gets in.
    let mut keep_alive = TcpStream::connect(addr).await.unwrap();
    keep_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"ok\n") {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), keep_alive.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert!(n > 0, "closed before its answer: {answer:?}");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200 "), "{answer:?}");
    let host = |n: u8| std::net::IpAddr::from([127, 0, 0, n]);
    let mut oldest = connect_silent_from(host(2), addr, 2).await;
    oldest.extend(connect_silent_from(host(3), addr, 1).await);
    let mut newest = connect_silent_from(host(4), addr, 2).await;
    newest.extend(connect_silent_from(host(5), addr, 2).await);
    assert!(
        closed_within(&mut keep_alive, Duration::from_secs(1)).await,
        "the idle keep-alive connection was not closed for a newer one"
    );
    for (n, stream) in oldest.iter_mut().enumerate() {
        assert!(
            closed_within(stream, Duration::from_secs(1)).await,
            "silent connection {n} was not closed for a newer one"
        );
    }
    let still_open = futures::future::join_all(
        newest
            .iter_mut()
            .map(|stream| closed_within(stream, Duration::from_millis(300))),
    )
    .await;
    assert_eq!(still_open, [false; 4], "the newest connections were closed");
    let (status, _, body) = get(addr, "/healthz", None).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // One of the newest made room for the probe; the others stay.
    let mut closed = 0;
    for stream in &mut newest {
        closed += usize::from(closed_within(stream, Duration::from_millis(100)).await);
    }
    assert_eq!(
        closed, 1,
        "the probe closed {closed} of the four waiting connections"
    );
    // What the caps closed is counted: the keep-alive connection, the three oldest and one of
    // the newest made room, and the fourth connection from one address was refused.
    let text = scrape(&site).await;
    let series = |reason: &str| {
        format!(
            "tokenfleet_agent_connections_closed_total{{listener=\"metrics\",reason=\"{reason}\"}}"
        )
    };
    assert!(must(&text, &series("made_room")) >= 5.0, "{text}");
    assert!(must(&text, &series("refused_per_source")) >= 1.0, "{text}");
}
