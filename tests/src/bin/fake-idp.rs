//! Runs the fake identity provider on a loopback address for demos: prints its endpoint URLs and
//! registers a demo client and users from flags. Device codes can be approved by hand at the
//! printed `/devicelogin` page; `/authorize` signs in `--default-user` without asking.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokenfleet_testkit::fake_idp::{ClientSpec, FakeIdp};

/// Fake Microsoft Entra ID / Google OAuth endpoints for demos and manual tests.
#[derive(Debug, Parser)]
#[command(name = "fake-idp", version)]
struct Args {
    /// Address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1:8990")]
    listen: SocketAddr,
    /// Client id of the demo app registration.
    #[arg(long, default_value = "demo-client")]
    client_id: String,
    /// Client secret of the demo app (omit for a public client).
    #[arg(long, env = "FAKE_IDP_CLIENT_SECRET")]
    client_secret: Option<String>,
    /// Turn "Allow public client flows" off (device code then fails with AADSTS7000218).
    #[arg(long)]
    no_public_client_flows: bool,
    /// Users (mailboxes) that can sign in; repeat the flag.
    #[arg(long = "user")]
    users: Vec<String>,
    /// User the /authorize pages sign in without asking.
    #[arg(long)]
    default_user: Option<String>,
    /// Google service accounts to register; their JSON key files are printed.
    #[arg(long = "service-account")]
    service_accounts: Vec<String>,
    /// Lifetime of access tokens, seconds.
    #[arg(long, default_value_t = 3599)]
    access_token_lifetime: u64,
    /// Device code polling interval handed out, seconds.
    #[arg(long, default_value_t = 5)]
    device_interval: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        eprintln!(
            "fake-idp: --listen must be a loopback address, not {}",
            args.listen
        );
        return ExitCode::from(64);
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-idp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let fake = FakeIdp::start_on(args.listen).await?;
    let mut client = match &args.client_secret {
        Some(secret) => ClientSpec::confidential(&args.client_id, secret),
        None => ClientSpec::public(&args.client_id),
    };
    client.public_client_flows = !args.no_public_client_flows;
    fake.register_client(client);
    for user in &args.users {
        fake.add_user(user);
    }
    if let Some(user) = &args.default_user {
        fake.add_user(user);
        fake.set_default_user(Some(user));
    }
    fake.set_access_token_lifetime(Duration::from_secs(args.access_token_lifetime));
    fake.set_device_interval(args.device_interval);

    let base = fake.base_url();
    println!("fake identity provider listening on {base}");
    println!(
        "  Microsoft (authority <tenant>): {base}/<tenant>/oauth2/v2.0/{{devicecode,token,authorize}}"
    );
    println!("  Google authorize:  {}", fake.google_authorize_url());
    println!("  Google token:      {}", fake.google_token_url());
    println!("  Google revoke:     {}", fake.revoke_url());
    println!("  introspection:     {}", fake.introspection_url());
    println!("  device login page: {}", fake.device_login_url());
    println!(
        "  client: {} ({})",
        args.client_id,
        if args.client_secret.is_some() {
            "confidential"
        } else {
            "public"
        }
    );
    for user in &args.users {
        println!("  user: {user}");
    }
    for sa in &args.service_accounts {
        println!(
            "  service account {sa} key file:\n{}",
            fake.service_account_json(sa)
        );
    }
    tokio::signal::ctrl_c().await?;
    println!("stopping");
    Ok(())
}
