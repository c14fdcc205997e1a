//! Issue 14's "CLI that matches", through the real `tokenfleetctl` binary against in-process
//! brokers: output formats and truncation, the positional NAME with its `--name` alias,
//! confirmation of irreversible verbs, named contexts, shell completion with object names,
//! `apply -f` / `export`, and `fleet status --watch`.

// Helpers outside #[test] functions panic on failure too, which is what a test wants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokenfleet_domain::Role;
use tokenfleet_testkit::broker::{TestBroker, TestStore};

use super::cli::{Run, admin, ctl, ctl_env, write};

const LONG_NAME: &str =
    "Acme Corporation — Head Office, Building 7, Printing and Scanning Department";
const CLIENT_SECRET: &str = "apply-client-s3cret";
const INGRESS_PASSWORD: &str = "apply-ingress-pa55";

async fn broker() -> TestBroker {
    TestBroker::start(TestStore::Embedded).await.unwrap()
}

fn url(broker: &TestBroker) -> String {
    format!("http://{}", broker.grpc_addr)
}

fn names(run: &Run) -> Vec<String> {
    run.stdout.lines().map(str::to_owned).collect()
}

/// A tenant with a long display name, a provider and two mailboxes.
async fn small_fleet(broker: &TestBroker) {
    admin(
        broker,
        &["tenant", "create", "acme", "--display-name", LONG_NAME],
    )
    .await
    .ok();
    admin(
        broker,
        &[
            "provider",
            "create",
            "m365",
            "--tenant",
            "acme",
            "--kind",
            "microsoft",
            "--client-id",
            "11111111-2222-3333-4444-555555555555",
        ],
    )
    .await
    .ok();
    for name in ["scan", "fax"] {
        admin(
            broker,
            &[
                "mailbox",
                "create",
                "--name",
                name,
                "--tenant",
                "acme",
                "--address",
                &format!("{name}@acme.example"),
                "--provider",
                "m365",
                "--grant-type",
                "delegated_device_code",
                "--kind",
                "bulk",
                "--purpose",
                "send",
            ],
        )
        .await
        .ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_command_prints_every_format_and_tables_cut_long_cells() {
    let broker = broker().await;
    small_fleet(&broker).await;

    let table = admin(&broker, &["tenant", "list"]).await.ok();
    assert!(!table.stdout.contains(LONG_NAME), "{}", table.stdout);
    assert!(
        table.stdout.contains("Acme Corporation — Head Office"),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains('…'), "{}", table.stdout);
    let wide = admin(&broker, &["tenant", "list", "-o", "wide"]).await.ok();
    assert!(wide.stdout.contains(LONG_NAME), "{}", wide.stdout);
    let shown = admin(&broker, &["tenant", "show", "acme"]).await.ok();
    assert!(shown.stdout.contains('…') && !shown.stdout.contains(LONG_NAME));

    let listed = admin(&broker, &["tenant", "list", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(listed[0]["display_name"], LONG_NAME);
    let yaml = admin(&broker, &["tenant", "list", "-o", "yaml"]).await.ok();
    let parsed: Value = serde_norway::from_str(&yaml.stdout).unwrap();
    assert_eq!(parsed[0]["display_name"], LONG_NAME);
    assert_eq!(parsed[0]["name"], "acme");
    let named = admin(
        &broker,
        &["mailbox", "list", "--tenant", "acme", "-o", "name"],
    )
    .await
    .ok();
    assert_eq!(names(&named), ["fax", "scan"]);

    // One object: positional NAME or --name, in every format.
    let json_one = admin(
        &broker,
        &["mailbox", "show", "scan", "--tenant", "acme", "-o", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(json_one["address"], "scan@acme.example");
    let alias = admin(
        &broker,
        &[
            "mailbox", "show", "--name", "scan", "--tenant", "acme", "-o", "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(alias, json_one);
    let yaml_one = admin(
        &broker,
        &["mailbox", "show", "scan", "--tenant", "acme", "-o", "yaml"],
    )
    .await
    .ok();
    let parsed: Value = serde_norway::from_str(&yaml_one.stdout).unwrap();
    assert_eq!(parsed["token"]["status"], "not_retrieved");
    let name_one = admin(
        &broker,
        &["mailbox", "show", "scan", "--tenant", "acme", "-o", "name"],
    )
    .await
    .ok();
    assert_eq!(name_one.stdout, "acme/scan\n");
    for format in ["table", "wide"] {
        let run = admin(
            &broker,
            &["provider", "list", "--tenant", "acme", "-o", format],
        )
        .await
        .ok();
        assert!(
            run.stdout.contains("m365") && run.stdout.contains("NAME"),
            "{}",
            run.stdout
        );
    }
    for args in [
        &["agent", "list", "--tenant", "acme", "-o", "yaml"][..],
        &["device", "list", "--tenant", "acme", "-o", "json"][..],
        &["audit", "--tenant", "acme", "-o", "name"][..],
        &["whoami", "-o", "yaml"][..],
        &["fleet", "status", "-o", "wide"][..],
    ] {
        admin(&broker, args).await.ok();
    }

    // Both spellings at once, or neither: a usage error that says so.
    let both = admin(
        &broker,
        &[
            "mailbox", "show", "scan", "--name", "fax", "--tenant", "acme",
        ],
    )
    .await;
    assert_eq!(both.code, 2, "{}", both.stderr);
    assert!(
        both.stderr.contains("cannot be used with"),
        "{}",
        both.stderr
    );
    let neither = admin(&broker, &["tenant", "show"]).await;
    assert_eq!(neither.code, 2);
    assert!(neither.stderr.contains("<NAME>"), "{}", neither.stderr);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn irreversible_verbs_are_refused_without_yes_when_nobody_can_answer() {
    let broker = broker().await;
    small_fleet(&broker).await;
    admin(&broker, &["agent", "create", "site-a", "--tenant", "acme"])
        .await
        .ok();
    // Standard input is not a terminal here (the helpers give /dev/null).
    for args in [
        &["mailbox", "delete", "fax", "--tenant", "acme"][..],
        &["mailbox", "delete-token", "scan", "--tenant", "acme"][..],
        &["agent", "revoke", "site-a", "--tenant", "acme"][..],
        &["provider", "delete", "m365", "--tenant", "acme"][..],
    ] {
        let run = admin(&broker, args).await;
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains("--yes") && run.stderr.contains("not a terminal"),
            "{args:?}: {}",
            run.stderr
        );
    }
    // Nothing happened.
    let mailboxes = admin(
        &broker,
        &["mailbox", "list", "--tenant", "acme", "-o", "name"],
    )
    .await
    .ok();
    assert_eq!(names(&mailboxes), ["fax", "scan"]);
    let agent = admin(
        &broker,
        &["agent", "show", "site-a", "--tenant", "acme", "-o", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(agent["revoked"], false);

    let deleted = admin(
        &broker,
        &["mailbox", "delete", "fax", "--tenant", "acme", "--yes"],
    )
    .await
    .ok();
    assert_eq!(deleted.stdout.trim(), "deleted mailbox acme/fax");
    let revoked = admin(
        &broker,
        &[
            "agent", "revoke", "site-a", "--tenant", "acme", "-y", "-o", "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(revoked["revoked"], true);
    admin(
        &broker,
        &[
            "mailbox",
            "delete-token",
            "scan",
            "--tenant",
            "acme",
            "--yes",
        ],
    )
    .await
    .ok();
    broker.shutdown().await;
}

/// Runs `args` under a pseudo-terminal (util-linux `script`), typing `answer` at the prompt.
async fn on_terminal(broker: &TestBroker, args: &str, answer: &str) -> (i32, String) {
    use tokio::io::AsyncWriteExt as _;
    let command = format!("{} {args}", env!("CARGO_BIN_EXE_tokenfleetctl"));
    let mut child = tokio::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("TOKENFLEET_BROKER", url(broker))
        .env("TOKENFLEET_API_KEY", broker.admin_key.expose())
        .env(
            "TOKENFLEETCTL_CONFIG",
            "/nonexistent/tokenfleetctl/config.yaml",
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("util-linux `script` runs the CLI on a terminal");
    let mut stdin = child.stdin.take().unwrap();
    // Typed once the question is up; the terminal echoes it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stdin.write_all(answer.as_bytes()).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the CLI answers within 20 s")
        .unwrap();
    drop(stdin);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_at_a_terminal_is_asked_first() {
    let broker = broker().await;
    admin(&broker, &["tenant", "create", "gone"]).await.ok();
    let (code, screen) = on_terminal(&broker, "tenant delete gone", "n\n").await;
    assert_eq!(code, 2, "{screen}");
    assert!(
        screen.contains("delete tenant gone? This cannot be undone. [y/N]"),
        "{screen}"
    );
    assert!(screen.contains("not confirmed"), "{screen}");
    admin(&broker, &["tenant", "show", "gone"]).await.ok();
    let (code, screen) = on_terminal(&broker, "tenant delete gone", "y\n").await;
    assert_eq!(code, 0, "{screen}");
    assert!(screen.contains("deleted tenant gone"), "{screen}");
    let run = admin(&broker, &["tenant", "show", "gone"]).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_name_brokers_and_flags_override_them() {
    let east = broker().await;
    let west = broker().await;
    admin(&east, &["tenant", "create", "acme"]).await.ok();
    admin(&west, &["tenant", "create", "beta"]).await.ok();
    let dir = tempfile::tempdir().unwrap();
    let east_key = write(dir.path(), "east.key", east.admin_key.expose());
    let west_key = write(dir.path(), "west.key", west.admin_key.expose());
    let config = dir.path().join("cfg").join("config.yaml");
    let config_text = config.display().to_string();
    let env = [("TOKENFLEETCTL_CONFIG", config_text.as_str())];
    let run = |args: Vec<&str>| {
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ctl_env(None, None, &env, &args).await
        }
    };

    let east_url = url(&east);
    let west_url = url(&west);
    run(vec![
        "config",
        "set-context",
        "east",
        "--broker",
        &east_url,
        "--key-file",
        &east_key,
        "--tenant",
        "acme",
    ])
    .await
    .ok();
    run(vec![
        "config",
        "set-context",
        "west",
        "--broker",
        &west_url,
        "--key-file",
        &west_key,
    ])
    .await
    .ok();
    let mode = std::fs::metadata(&config).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the config file is owner-only");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        !text.contains(east.admin_key.expose()),
        "keys stay in their files"
    );

    let contexts = run(vec!["config", "get-contexts", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(contexts.as_array().map(Vec::len), Some(2));
    assert_eq!(contexts[0]["name"], "east");
    assert_eq!(
        contexts[0]["current"], true,
        "the first context becomes current"
    );

    // The current context names the broker, the key and the default tenant.
    let tenants = run(vec!["tenant", "list", "-o", "name"]).await.ok();
    assert_eq!(names(&tenants), ["acme"]);
    run(vec!["mailbox", "list", "-o", "json"]).await.ok();
    // Switching.
    run(vec!["config", "use-context", "west"]).await.ok();
    assert_eq!(
        run(vec!["config", "current-context"]).await.ok().stdout,
        "west\n"
    );
    let tenants = run(vec!["tenant", "list", "-o", "name"]).await.ok();
    assert_eq!(names(&tenants), ["beta"]);
    let no_tenant = run(vec!["mailbox", "list"]).await;
    assert_eq!(no_tenant.code, 2);
    assert!(
        no_tenant.stderr.contains("no tenant"),
        "{}",
        no_tenant.stderr
    );
    // --context picks another for one command.
    let tenants = run(vec!["--context", "east", "tenant", "list", "-o", "name"])
        .await
        .ok();
    assert_eq!(names(&tenants), ["acme"]);
    // Flags and environment override the context.
    let tenants = run(vec![
        "tenant",
        "list",
        "-o",
        "name",
        "--broker",
        &east_url,
        "--api-key-file",
        &east_key,
    ])
    .await
    .ok();
    assert_eq!(names(&tenants), ["acme"]);
    let by_env = ctl_env(
        Some(&east_url),
        Some(east.admin_key.expose()),
        &env,
        &["tenant", "list", "-o", "name"],
    )
    .await
    .ok();
    assert_eq!(names(&by_env), ["acme"]);
    // An unknown context names the known ones.
    let unknown = run(vec!["--context", "north", "tenant", "list"]).await;
    assert_eq!(unknown.code, 2);
    assert!(unknown.stderr.contains("east, west"), "{}", unknown.stderr);
    east.shutdown().await;
    west.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_scripts_complete_commands_and_object_names() {
    let broker = broker().await;
    small_fleet(&broker).await;
    for shell in ["bash", "zsh", "fish"] {
        let run = ctl_env(None, None, &[], &["completion", shell]).await.ok();
        assert!(run.stdout.contains("tokenfleetctl"), "{shell}");
        assert!(
            run.stdout.contains("__complete"),
            "{shell}: names are completed"
        );
        assert!(run.stdout.contains("mailbox"), "{shell}");
    }
    let help = ctl_env(None, None, &[], &["completion", "--help"])
        .await
        .ok();
    assert!(help.stdout.contains("Install:"), "{}", help.stdout);

    let listed = admin(&broker, &["__complete", "mailbox", "--tenant", "acme"])
        .await
        .ok();
    assert_eq!(names(&listed), ["fax", "scan"]);

    // The bash script itself, run the way bash runs it on <TAB>.
    let script = ctl_env(None, None, &[], &["completion", "bash"])
        .await
        .ok()
        .stdout;
    let dir = tempfile::tempdir().unwrap();
    let script_path = write(dir.path(), "tokenfleetctl.bash", &script);
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_tokenfleetctl"))
        .parent()
        .unwrap()
        .display()
        .to_string();
    let path = format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default());
    let complete = |line: &'static str, cword: usize| {
        let program = format!(
            "source {script_path}; COMP_WORDS=({line}); COMP_CWORD={cword}; \
             _tokenfleetctl_with_names tokenfleetctl \"${{COMP_WORDS[COMP_CWORD]}}\" \
             \"${{COMP_WORDS[COMP_CWORD-1]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\""
        );
        let mut cmd = tokio::process::Command::new("bash");
        cmd.args(["--norc", "-c", &program])
            .env("PATH", &path)
            .env("TOKENFLEET_BROKER", url(&broker))
            .env("TOKENFLEET_API_KEY", broker.admin_key.expose())
            .env(
                "TOKENFLEETCTL_CONFIG",
                "/nonexistent/tokenfleetctl/config.yaml",
            )
            .env_remove("TOKENFLEET_TENANT");
        async move {
            let out = cmd.output().await.unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let got = complete("tokenfleetctl mailbox show --tenant acme ''", 5).await;
    assert_eq!(got.lines().collect::<Vec<_>>(), ["fax", "scan"], "{got}");
    let got = complete("tokenfleetctl mailbox delete --tenant acme s", 5).await;
    assert_eq!(got.lines().collect::<Vec<_>>(), ["scan"], "{got}");
    let got = complete("tokenfleetctl tenant show ''", 3).await;
    assert_eq!(got.lines().collect::<Vec<_>>(), ["acme"], "{got}");
    let got = complete("tokenfleetctl mailbox list --tenant ''", 4).await;
    assert_eq!(got.lines().collect::<Vec<_>>(), ["acme"], "{got}");
    // Subcommands still come from clap_complete's part.
    let got = complete("tokenfleetctl mail", 1).await;
    assert!(got.lines().any(|l| l == "mailbox"), "{got}");
    broker.shutdown().await;
}

const MANIFEST: &str = r#"
# Devices first on purpose: apply sorts by dependency.
kind: device
tenant: acme
name: mfp-1
spec:
  display_name: 2nd floor MFP
  sender_mode: bulk
  bulk_mailbox: scan
  smtp: {server: smtp.office365.com, port: 587, security: starttls, tls_min_version: "1.2"}
  fetch: {protocol: pop3, server: outlook.office365.com, port: 995, security: implicit_tls, interval_seconds: 300}
  ingress:
    username: mfp1
    password: {file: ingress.pw}
    allowed_sources: [192.168.1.20/32]
---
kind: mailbox
tenant: acme
name: scan
spec:
  address: scan@acme.example
  provider: m365
  grant_type: delegated_device_code
  kind: bulk
  purposes: [send, pop]
---
kind: provider
tenant: acme
name: m365
spec:
  kind: microsoft
  authority: organizations
  client_id: 11111111-2222-3333-4444-555555555555
  client_secret: {env: APPLY_TEST_CLIENT_SECRET}
  endpoints: {token_url: "http://127.0.0.1:9/token"}
---
kind: tenant
name: acme
spec: {display_name: Acme Corp}
"#;

fn actions(run: &Run) -> Vec<(String, String, String)> {
    run.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap_or_default().to_owned(),
                r["name"].as_str().unwrap_or_default().to_owned(),
                r["action"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn all(action: &str) -> Vec<(String, String, String)> {
    [
        ("tenant", "acme"),
        ("provider", "m365"),
        ("mailbox", "scan"),
        ("device", "mfp-1"),
    ]
    .iter()
    .map(|(k, n)| ((*k).to_owned(), (*n).to_owned(), action.to_owned()))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_creates_in_order_export_gives_it_back_and_reapply_changes_nothing() {
    tokenfleet_testkit::logs::secret(CLIENT_SECRET);
    tokenfleet_testkit::logs::secret(INGRESS_PASSWORD);
    let broker = broker().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ingress.pw", &format!("{INGRESS_PASSWORD}\n"));
    let file = write(dir.path(), "fleet.yaml", MANIFEST);
    let key = broker.admin_key.expose().to_owned();
    let burl = url(&broker);
    let apply = |args: Vec<String>| {
        let key = key.clone();
        let burl = burl.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ctl_env(
                Some(&burl),
                Some(&key),
                &[("APPLY_TEST_CLIENT_SECRET", CLIENT_SECRET)],
                &args,
            )
            .await
        }
    };
    let args = |extra: &[&str]| -> Vec<String> {
        ["apply", "-f"]
            .iter()
            .copied()
            .chain(std::iter::once(file.as_str()))
            .chain(extra.iter().copied())
            .map(str::to_owned)
            .collect()
    };

    let dry = apply(args(&["--dry-run", "-o", "json"])).await.ok();
    assert_eq!(actions(&dry), all("would create"));
    let tenants = admin(&broker, &["tenant", "list", "-o", "name"]).await.ok();
    assert!(tenants.stdout.is_empty(), "a dry run changes nothing");

    let created = apply(args(&["-o", "json"])).await.ok();
    assert_eq!(actions(&created), all("created"));
    let provider = admin(
        &broker,
        &["provider", "show", "m365", "--tenant", "acme", "-o", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(provider["client_secret_set"], true);
    let device = admin(
        &broker,
        &["device", "show", "mfp-1", "--tenant", "acme", "-o", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(device["ingress"]["password_set"], true);
    assert_eq!(device["smtp"]["tls_min_version"], "1.2");
    assert_eq!(device["fetch"]["interval_seconds"], 300);

    let again = apply(args(&["-o", "json"])).await.ok();
    let mut expected = all("unchanged");
    // The secrets read from a file or variable are sent again: the broker cannot say whether
    // they are the same.
    expected[1].2 = "updated".into();
    expected[3].2 = "updated".into();
    assert_eq!(actions(&again), expected);

    // Export: every object, no secret, and `apply` takes it back unchanged.
    let exported = admin(&broker, &["export"]).await.ok().stdout;
    assert!(!exported.contains(CLIENT_SECRET) && !exported.contains(INGRESS_PASSWORD));
    assert!(exported.contains("stored: true"), "{exported}");
    let export_file = write(dir.path(), "export.yaml", &exported);
    let round = apply(vec![
        "apply".into(),
        "-f".into(),
        export_file.clone(),
        "-o".into(),
        "json".into(),
    ])
    .await
    .ok();
    assert_eq!(actions(&round), all("unchanged"));
    let table = apply(vec!["apply".into(), "-f".into(), export_file.clone()])
        .await
        .ok();
    assert!(table.stdout.contains("unchanged"), "{}", table.stdout);

    // One field changed: exactly that field is updated.
    let edited = exported.replace("port: 587", "port: 465");
    let edited_file = write(dir.path(), "edited.yaml", &edited);
    let changed = apply(vec![
        "apply".into(),
        "-f".into(),
        edited_file,
        "-o".into(),
        "json".into(),
    ])
    .await
    .ok();
    let mut expected = all("unchanged");
    expected[3].2 = "updated".into();
    assert_eq!(actions(&changed), expected);
    assert_eq!(changed.json()[3]["fields"], json!(["smtp"]));
    let device = admin(
        &broker,
        &["device", "show", "mfp-1", "--tenant", "acme", "-o", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(device["smtp"]["port"], 465);
    assert_eq!(
        device["ingress"]["password_set"], true,
        "the stored password is kept"
    );

    // A tenant-scoped export holds only that tenant.
    let one = admin(&broker, &["export", "--tenant", "acme"])
        .await
        .ok()
        .stdout;
    assert_eq!(
        one.matches("kind: ").count(),
        exported.matches("kind: ").count()
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_document_is_named_and_nothing_is_applied() {
    let broker = broker().await;
    let dir = tempfile::tempdir().unwrap();
    let bad = r#"
kind: tenant
name: fresh
---
kind: mailbox
tenant: fresh
name: scan
spec:
  address: scan@fresh.example
  provider: m365
  grant_type: delegated_device_code
  kind: bulky
  purposes: [send]
"#;
    let file = write(dir.path(), "bad.yaml", bad);
    let run = admin(&broker, &["apply", "-f", &file]).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("document 2"), "{}", run.stderr);
    assert!(run.stderr.contains("spec.kind"), "{}", run.stderr);
    assert!(run.stderr.contains("admin, bulk, user"), "{}", run.stderr);
    let typo = write(
        dir.path(),
        "typo.yaml",
        &bad.replace("kind: bulky", "kind: bulk")
            .replace("address:", "adress:"),
    );
    let run = admin(&broker, &["apply", "-f", &typo]).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("document 2") && run.stderr.contains("adress"),
        "{}",
        run.stderr
    );
    let missing = write(
        dir.path(),
        "secret.yaml",
        "kind: tenant\nname: fresh\n---\nkind: provider\ntenant: fresh\nname: p\nspec:\n  kind: microsoft\n  client_id: x\n  client_secret: {stored: true}\n",
    );
    let run = admin(&broker, &["apply", "-f", &missing]).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("document 2") && run.stderr.contains("holds none"),
        "{}",
        run.stderr
    );
    let tenants = admin(&broker, &["tenant", "list", "-o", "name"]).await.ok();
    assert!(
        tenants.stdout.is_empty(),
        "nothing applied: {}",
        tenants.stdout
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_tenants_lists_what_the_key_may_see_and_status_is_checked() {
    let broker = broker().await;
    small_fleet(&broker).await;
    admin(&broker, &["tenant", "create", "beta"]).await.ok();
    admin(
        &broker,
        &[
            "provider",
            "create",
            "g",
            "--tenant",
            "beta",
            "--kind",
            "google",
            "--client-id",
            "x",
        ],
    )
    .await
    .ok();
    admin(
        &broker,
        &[
            "mailbox",
            "create",
            "relay",
            "--tenant",
            "beta",
            "--address",
            "relay@beta.example",
            "--provider",
            "g",
            "--grant-type",
            "delegated_auth_code",
            "--kind",
            "bulk",
            "--purpose",
            "send",
        ],
    )
    .await
    .ok();
    let everything = admin(&broker, &["mailbox", "list", "--all-tenants", "-o", "name"])
        .await
        .ok();
    assert_eq!(names(&everything), ["acme/fax", "acme/scan", "beta/relay"]);
    let table = admin(&broker, &["mailbox", "list", "--all-tenants"])
        .await
        .ok();
    assert!(
        table.stdout.contains("TENANT") && table.stdout.contains("beta"),
        "{}",
        table.stdout
    );
    let beta_key = broker.create_key(Role::TenantAdmin, Some("beta")).await;
    let own = ctl(
        &broker,
        &beta_key,
        &["mailbox", "list", "--all-tenants", "-o", "json"],
    )
    .await
    .ok()
    .json();
    let seen: Vec<&str> = own
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["tenant"].as_str())
        .collect();
    assert_eq!(seen, ["beta"], "a tenant key sees only its own tenant");
    let filtered = admin(
        &broker,
        &[
            "mailbox",
            "list",
            "--all-tenants",
            "--status",
            "NOT_RETRIEVED",
            "-o",
            "name",
        ],
    )
    .await
    .ok();
    assert_eq!(names(&filtered), ["acme/fax", "acme/scan", "beta/relay"]);
    let none = admin(
        &broker,
        &[
            "mailbox",
            "list",
            "--all-tenants",
            "--status",
            "reauth_required",
            "-o",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(none, json!([]));
    let bad = admin(
        &broker,
        &["mailbox", "list", "--all-tenants", "--status", "broken"],
    )
    .await;
    assert_eq!(bad.code, 2);
    for allowed in [
        "not_retrieved",
        "consent_pending",
        "active",
        "refresh_failing",
        "reauth_required",
        "disabled",
    ] {
        assert!(bad.stderr.contains(allowed), "{allowed}: {}", bad.stderr);
    }
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_status_watch_renders_again_until_interrupted() {
    let broker = broker().await;
    small_fleet(&broker).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenfleetctl"))
        .args(["fleet", "status", "--watch", "--interval", "1"])
        .env("TOKENFLEET_BROKER", url(&broker))
        .env("TOKENFLEET_API_KEY", broker.admin_key.expose())
        .env(
            "TOKENFLEETCTL_CONFIG",
            "/nonexistent/tokenfleetctl/config.yaml",
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert!(child.try_wait().unwrap().is_none(), "still watching");
    child.start_kill().unwrap();
    let out = child.wait_with_output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.matches("Every 1s: fleet status").count() >= 2,
        "{text}"
    );
    let bad = admin(&broker, &["fleet", "status", "--interval", "5"]).await;
    assert_eq!(bad.code, 2, "--interval needs --watch");
    broker.shutdown().await;
}
