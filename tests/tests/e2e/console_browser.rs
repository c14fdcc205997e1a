//! The console in a real browser: Debian's Chromium, headless, driven by its chromedriver over
//! the W3C WebDriver protocol (plain JSON over HTTP on loopback, with this suite's small HTTP
//! client — no WebDriver crate is available offline). Against the real broker binary and the
//! fake identity provider: sign in; the overview lists the REAUTH_REQUIRED mailbox first; a
//! device-code consent runs to ACTIVE with the page updating itself; a consent link opened in a
//! fresh browser (another WebDriver session, so no shared cookies) completes the auth-code
//! flow and the operator's page shows ACTIVE; a connection test shows its verdict; a viewer
//! sees no change buttons. Every page is saved as a screenshot at 1280 and 390 px wide in
//! `target/test-artifacts/console/`.
//!
//! Needs `chromium` and `chromium-driver` (installed by `scripts/test-setup.sh`); without them
//! the test says so and passes as skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tokenfleet_proto::v1 as pb;

use super::console::{SCAN_USER, TENANT, WEB_USER, fleet, request};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_binary(names: &[&str]) -> Option<PathBuf> {
    names
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .map(Path::to_path_buf)
}

/// A running chromedriver.
struct Driver {
    addr: SocketAddr,
    child: Child,
    /// chromedriver runs in a PID namespace of its own (`unshare`).
    namespaced: bool,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // In a PID namespace (see `start`), killing `unshare` kills chromedriver (`--kill-child`),
        // the namespace's first process, and with it every browser it started. Without one,
        // chromedriver leads a process group of its own with its browsers: end that group, and
        // only when it is still chromedriver's own (never a group this test shares).
        if !self.namespaced && process_group_of(self.child.id()) == Some(self.child.id()) {
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", self.child.id())])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The process group of `pid` from `/proc/PID/stat` (field 5, after the parenthesised name).
fn process_group_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(2)?.parse().ok()
}

/// Whether `unshare` can give chromedriver and its browsers a PID namespace of their own here
/// (root, or user namespaces allowed).
fn pid_namespace_available() -> bool {
    Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "--mount-proc", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One browser (a WebDriver session: its own profile, so its own cookies).
struct Browser {
    driver: SocketAddr,
    session: String,
    base: String,
}

async fn wd(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Value {
    let text = body.map(|b| b.to_string()).unwrap_or_default();
    let headers: &[(&str, &str)] = if text.is_empty() {
        &[]
    } else {
        &[("Content-Type", "application/json")]
    };
    let a = request(addr, method, path, headers, &text).await;
    let v: Value = serde_json::from_str(&a.body)
        .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}: {}", a.body));
    assert!(
        a.status == 200,
        "webdriver {method} {path} answered {}: {}",
        a.status,
        a.body
    );
    v["value"].clone()
}

impl Driver {
    async fn start(binary: &Path) -> Driver {
        let port = tokenfleet_testkit::agent_site::free_port();
        // The browsers run where no signal they or chromedriver send can reach anything else:
        // a PID namespace of their own when `unshare` can make one (a stray `kill(-1)` there
        // ends only them), else a process group of their own.
        let namespaced = pid_namespace_available();
        let mut command = if namespaced {
            let mut c = Command::new("unshare");
            c.args(["--pid", "--fork", "--kill-child", "--mount-proc"])
                .arg(binary);
            c
        } else {
            Command::new(binary)
        };
        let child = command
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                    .await
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Driver {
            addr,
            child,
            namespaced,
        }
    }

    async fn browser(&self, chromium: &Path, base: &str) -> Browser {
        let v = wd(
            self.addr,
            "POST",
            "/session",
            Some(json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium.to_string_lossy(),
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--window-size=1280,1000",
                             "--no-first-run", "--password-store=basic",
                             "--disable-background-networking", "--disable-component-update",
                             "--disable-sync", "--disable-quic"]
                }
            }}})),
        )
        .await;
        Browser {
            driver: self.addr,
            session: v["sessionId"].as_str().unwrap().to_owned(),
            base: base.to_owned(),
        }
    }
}

impl Browser {
    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        wd(
            self.driver,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )
        .await
    }
    async fn go(&self, path: &str) {
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        };
        self.cmd("POST", "/url", Some(json!({ "url": url }))).await;
    }
    async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT].as_str().unwrap().to_owned()
    }
    async fn count(&self, css: &str) -> usize {
        self.cmd(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )
        .await
        .as_array()
        .map_or(0, Vec::len)
    }
    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.cmd(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }
    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.cmd("POST", &format!("/element/{id}/click"), Some(json!({})))
            .await;
    }
    async fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }
    async fn text(&self, css: &str) -> String {
        self.js(&format!(
            "var e = document.querySelector({}); return e ? e.textContent : null;",
            json!(css)
        ))
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }
    async fn url(&self) -> String {
        self.cmd("GET", "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }
    async fn source(&self) -> String {
        self.cmd("GET", "/source", None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }
    /// Waits until `script` returns true.
    async fn until(&self, what: &str, script: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.js(script).await == Value::Bool(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; page:\n{}",
                self.source().await
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    /// Screenshots of the current page at desktop and phone widths.
    async fn shots(&self, dir: &Path, name: &str) {
        for (width, height) in [(1280, 1000), (390, 1400)] {
            self.cmd(
                "POST",
                "/window/rect",
                Some(json!({"width": width, "height": height})),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(150)).await;
            let png = self.cmd("GET", "/screenshot", None).await;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(png.as_str().unwrap())
                .unwrap();
            std::fs::write(dir.join(format!("{name}-{width}.png")), bytes).unwrap();
        }
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({"width": 1280, "height": 1000})),
        )
        .await;
    }
    async fn sign_in(&self, key: &str) {
        self.go("/console/").await;
        assert!(self.url().await.ends_with("/console/sign-in"));
        self.type_into("#api_key", key).await;
        self.click("form button[type=submit]").await;
        self.until(
            "the overview",
            "return location.pathname === '/console/';",
            Duration::from_secs(10),
        )
        .await;
    }
    async fn quit(self) {
        let _ = wd(
            self.driver,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        )
        .await;
    }
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("test-artifacts")
        .join("console");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_chromium() {
    // The walk-through is one large future: keep it on the heap, not the test thread's stack.
    Box::pin(walk_through()).await;
}

async fn walk_through() {
    let Some(chromium) = find_binary(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]) else {
        eprintln!(
            "SKIPPED console_in_chromium: /usr/bin/chromium is missing (apt-get install chromium chromium-driver, as scripts/test-setup.sh does)"
        );
        return;
    };
    let Some(chromedriver) = find_binary(&["/usr/bin/chromedriver"]) else {
        eprintln!(
            "SKIPPED console_in_chromium: /usr/bin/chromedriver is missing (apt-get install chromium-driver, as scripts/test-setup.sh does)"
        );
        return;
    };
    let dir = artifacts();
    let f = fleet().await;
    f.fake.set_default_user(Some(WEB_USER));
    let base = format!("http://{}", f.http());
    let driver = Driver::start(&chromedriver).await;

    // Sign in (the sign-in page first).
    let op = driver.browser(&chromium, &base).await;
    op.go("/console/sign-in").await;
    op.shots(&dir, "01-sign-in").await;
    op.sign_in(f.admin_key().expose()).await;
    // The session cookie is not readable by script (HttpOnly).
    assert_eq!(op.js("return document.cookie;").await, json!(""));

    // Overview: the REAUTH_REQUIRED mailbox first.
    let first = op.text("#problems tbody tr:first-child").await;
    assert!(
        first.contains("REAUTH_REQUIRED") && first.contains("mailbox dead"),
        "first problem row: {first}"
    );
    op.shots(&dir, "02-overview").await;

    // Mailbox `dead`: reason, fix and the troubleshooting link.
    op.go("/console/t/acme/mailboxes/dead").await;
    assert!(op.count("a[href^='/console/help/troubleshooting#']").await >= 1);
    op.shots(&dir, "03-mailbox-reauth-required").await;
    op.click("a[href^='/console/help/troubleshooting#']").await;
    op.shots(&dir, "04-troubleshooting").await;

    // Device-code consent for `scan`: the code, a countdown, then ACTIVE without a reload.
    op.go("/console/t/acme/mailboxes/scan").await;
    op.click("form[action$='/consent'] button").await;
    op.until(
        "the user code",
        "return !!document.querySelector('#user-code');",
        Duration::from_secs(10),
    )
    .await;
    let user_code = op.text("#user-code").await;
    assert!(!user_code.is_empty());
    op.until(
        "the countdown",
        "var e = document.querySelector('[data-countdown]'); return !!e && /^\\d+:\\d\\d$/.test(e.textContent);",
        Duration::from_secs(5),
    )
    .await;
    op.shots(&dir, "05-mailbox-device-code").await;
    // The person enters the code at the provider, in their own browser.
    let person = driver.browser(&chromium, &base).await;
    person.go(&f.fake.device_login_url()).await;
    person.type_into("input[name=user_code]", &user_code).await;
    person.type_into("input[name=user]", SCAN_USER).await;
    person.click("button[value=approve]").await;
    // The provider's answer page first: closing the browser before the form's POST arrived
    // would withdraw the approval (seen under load).
    person
        .until(
            "the provider's sign-in confirmation",
            "return document.body.innerText.indexOf('You have signed in') >= 0;",
            Duration::from_secs(20),
        )
        .await;
    person.quit().await;
    op.until(
        "ACTIVE on the operator's page",
        "var b = document.querySelector('#live-status .badge'); return !!b && b.getAttribute('data-status') === 'ACTIVE';",
        Duration::from_secs(30),
    )
    .await;
    op.shots(&dir, "06-mailbox-active").await;

    // A consent link for `web`, opened in a fresh browser (no session there).
    op.go("/console/t/acme/mailboxes/web").await;
    op.click("form[action$='/links'] button").await;
    op.until(
        "the link",
        "return !!document.querySelector('#link-url');",
        Duration::from_secs(10),
    )
    .await;
    let link = op
        .js("return document.querySelector('#link-url').value;")
        .await
        .as_str()
        .unwrap()
        .to_owned();
    assert!(link.starts_with(&format!("{base}/consent/tfc_")), "{link}");
    op.shots(&dir, "07-mailbox-link-created").await;
    let owner = driver.browser(&chromium, &base).await;
    owner.go(&link).await;
    let page = owner.source().await;
    assert!(page.contains("Reception printer") && page.contains(WEB_USER));
    owner.shots(&dir, "08-consent-link").await;
    // The owner has no console access.
    owner.go("/console/").await;
    assert!(owner.url().await.ends_with("/console/sign-in"));
    owner.go(&link).await;
    owner.click("form button[type=submit]").await;
    owner
        .until(
            "the callback page",
            "return document.body.innerText.indexOf('Consent recorded') >= 0;",
            Duration::from_secs(15),
        )
        .await;
    owner.shots(&dir, "09-consent-link-done").await;
    owner.go(&link).await;
    assert!(owner.source().await.contains("used already"));
    owner.shots(&dir, "10-consent-link-used").await;
    owner.quit().await;
    op.go("/console/t/acme/mailboxes/web").await;
    assert_eq!(
        op.js("return document.querySelector('#live-status .badge').getAttribute('data-status');")
            .await,
        json!("ACTIVE")
    );
    assert_eq!(f.status("web").await, pb::TokenStatus::Active as i32);

    // Device page and a connection test (no agent runs the device: the verdict says so).
    op.go("/console/t/acme/devices/mfp-1").await;
    op.shots(&dir, "11-device").await;
    op.click("form[action$='/test'] button").await;
    op.until(
        "the verdict",
        "return !!document.querySelector('#test-result');",
        Duration::from_secs(60),
    )
    .await;
    let verdict = op.text("#test-result h2").await;
    assert!(verdict.starts_with("Verdict "), "{verdict}");
    assert!(!op.text("#test-result").await.is_empty());
    op.shots(&dir, "12-device-test").await;

    // Agents: enroll shows the one-time code and the command.
    op.go("/console/agents").await;
    op.type_into("#en-name", "site-a").await;
    op.type_into("#en-display", "Head office").await;
    op.click("form[action='/console/agents/enroll'] button[type=submit]")
        .await;
    op.until(
        "the enrollment code",
        "var e = document.querySelector('#en-code'); return !!e && e.value.indexOf('tfe_') === 0;",
        Duration::from_secs(10),
    )
    .await;
    op.shots(&dir, "13-agents-enroll").await;

    // Audit with a filter.
    op.go("/console/audit?tenant=acme&q=consent").await;
    assert!(op.count("table.audit tbody tr").await >= 1);
    op.shots(&dir, "14-audit").await;

    // A viewer: the same pages without any change button.
    let viewer_key = f.key("viewer", TENANT).await;
    let viewer = driver.browser(&chromium, &base).await;
    viewer.sign_in(&viewer_key).await;
    viewer.shots(&dir, "15-viewer-overview").await;
    for path in [
        "/console/t/acme/mailboxes/dead",
        "/console/t/acme/devices/mfp-1",
        "/console/agents",
    ] {
        viewer.go(path).await;
        assert_eq!(
            viewer.count("main form[method=post]").await,
            0,
            "viewer sees a change form on {path}"
        );
    }
    viewer.go("/console/t/acme/mailboxes/dead").await;
    viewer.shots(&dir, "16-viewer-mailbox").await;
    // A forged POST from the viewer's own page (its session, its CSRF token) is refused by the
    // operation.
    let forged = viewer
        .js(
            "var f = document.createElement('form'); f.method = 'post'; \
             f.action = '/console/t/acme/mailboxes/dead/delete-token'; \
             var i = document.createElement('input'); i.name = 'csrf'; \
             i.value = document.querySelector('header input[name=csrf]').value; f.appendChild(i); \
             document.body.appendChild(f); f.submit(); return true;",
        )
        .await;
    assert_eq!(forged, json!(true));
    viewer
        .until(
            "the refusal",
            "return document.title.indexOf('Not allowed') === 0;",
            Duration::from_secs(10),
        )
        .await;
    assert!(viewer.source().await.contains("read-only"));
    viewer.shots(&dir, "17-viewer-forged-post-refused").await;
    viewer.quit().await;
    assert_eq!(
        f.status("dead").await,
        pb::TokenStatus::ReauthRequired as i32
    );

    // Sign out.
    op.click("header form[action='/console/sign-out'] button")
        .await;
    op.until(
        "the sign-in page",
        "return location.pathname === '/console/sign-in';",
        Duration::from_secs(10),
    )
    .await;
    op.quit().await;
    // The screenshots exist, both widths.
    let shots = std::fs::read_dir(&dir).unwrap().count();
    assert!(shots >= 34, "{shots} screenshots in {}", dir.display());
    let _ = request(f.http(), "GET", "/healthz", &[], "").await;
}
