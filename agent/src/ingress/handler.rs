//! [`LocalDevices`]: the production [`IngressHandler`] — per-device local credentials (argon2 PHC
//! hashes, checked by a shared [`PasswordChecker`]) or source allowlists (addresses and CIDR
//! ranges), the device's [`SenderPolicy`], and delivery into the spool.
//!
//! Sender binding (LOGIN_USER / ALLOW_USER_CHANGE): the user a message is sent as comes from
//! its `From`, which the device's login does not vouch for. Like Postfix's
//! `reject_sender_login_mismatch`, the user address must be one the device is configured to
//! send as ([`LocalDevice::user_addresses`]: exact addresses, or `@domain` for every address of
//! a domain); any other is refused with `553 5.7.1` naming the login and the address. No
//! addresses configured = no user may be sent as. The broker checks the same list before it
//! hands out a user's token, so an agent cannot get around it either.
//!
//! Refused configurations (the device's logins and sources are not used, and the problem is
//! reported): a source range wider than /8 (IPv4) or /16 (IPv6) — `0.0.0.0/0` would make an
//! open relay of an agent that listens publicly — and a user name that two devices share.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::IpNet;
use tokenfleet_proto::v1 as pb;

use super::handoff::{DeliverError, Incoming, IngressHandler};
use super::password::Password;
use super::password::PasswordChecker;
use super::sender::{SenderPolicy, apply_sender_policy};
use crate::spool::{Envelope, Spool, SpoolError, SpoolId};

/// One device as the ingress sees it: local credentials, source allowlist, sender policy.
#[derive(Debug, Clone)]
pub struct LocalDevice {
    /// The device name (recorded in the spool envelope).
    pub device: String,
    /// The user name the device logs in with, if it authenticates.
    pub username: Option<String>,
    /// Argon2 PHC string of its password (`$argon2id$v=19$...`).
    pub password_hash: Option<String>,
    /// Source addresses and ranges that may send as this device without `AUTH` (an exact
    /// address is a `/32` or `/128`: `IpNet::from(ip)`; text via [`parse_source`]).
    pub allowed_addresses: Vec<IpNet>,
    /// Who the device's messages are sent as.
    pub sender: SenderPolicy,
    /// The user addresses (lower case) a LOGIN_USER / ALLOW_USER_CHANGE device may send as:
    /// `jane@contoso.example`, or `@contoso.example` for any address of the domain.
    pub user_addresses: Vec<String>,
}

/// Parses an allowed source: an address (`192.168.1.20`, `fd00::7`) or a CIDR range
/// (`192.168.1.0/24`; host bits are cleared). Ranges wider than /8 (IPv4) or /16 (IPv6), such
/// as `0.0.0.0/0` or `::/0`, are refused: they would admit the whole internet
/// ([`tokenfleet_listen::parse_network`]).
pub fn parse_source(text: &str) -> Result<IpNet, String> {
    tokenfleet_listen::parse_network(text).map_err(|error| match error {
        tokenfleet_listen::NetworkError::TooWide(_) => format!(
            "{error}: it would let any host send as the device; list the devices' addresses or their LAN range"
        ),
        tokenfleet_listen::NetworkError::NotANetwork(_) => error.to_string(),
    })
}

/// Problems the agent refuses in a set of devices that each device alone does not show: a
/// user name that two devices share (the login could not say which device it is). Returns
/// (device, problem) for every device involved.
pub fn check_devices(devices: &[pb::AgentDevice]) -> Vec<(String, String)> {
    let mut by_user: HashMap<String, Vec<&str>> = HashMap::new();
    for d in devices.iter().filter(|d| !d.ingress_username.is_empty()) {
        by_user
            .entry(d.ingress_username.to_lowercase())
            .or_default()
            .push(&d.name);
    }
    let mut problems = Vec::new();
    for d in devices {
        let Some(names) = by_user.get(&d.ingress_username.to_lowercase()) else {
            continue;
        };
        if names.len() > 1 {
            let others: Vec<&str> = names.iter().copied().filter(|n| *n != d.name).collect();
            problems.push((
                d.name.clone(),
                format!(
                    "ingress_username {:?} is also the login of device(s) {}; logins with it are refused until each device has its own",
                    d.ingress_username,
                    others.join(", ")
                ),
            ));
        }
    }
    problems
}

/// An IPv4 client on a dual-stack socket (`::ffff:192.0.2.7`) is matched as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

impl LocalDevice {
    /// A device with no credentials, no allowed sources, and the given sender policy.
    pub fn new(device: impl Into<String>, sender: SenderPolicy) -> Self {
        Self {
            device: device.into(),
            username: None,
            password_hash: None,
            allowed_addresses: Vec::new(),
            sender,
            user_addresses: Vec::new(),
        }
    }

    /// Whether the device may send as the user `address` (see the module documentation).
    pub fn may_send_as(&self, address: &str) -> bool {
        let address = address.trim().to_lowercase();
        let domain = address.rsplit_once('@').map(|(_, d)| d);
        self.user_addresses.iter().any(|a| {
            a == &address
                || a.strip_prefix('@')
                    .is_some_and(|d| domain.is_some_and(|domain| domain == d))
        })
    }

    /// Who submitted, for replies: the device's login, else its name and the source allowlist.
    fn login(&self) -> String {
        match &self.username {
            Some(user) => format!("login \"{user}\" (device \"{}\")", self.device),
            None => format!("device \"{}\" (source allowlist, no login)", self.device),
        }
    }

    /// Whether `ip` is one of the device's allowed sources.
    pub fn allows_source(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.allowed_addresses.iter().any(|net| net.contains(&ip))
    }

    /// The ingress view of a device the broker configured ([`pb::AgentDevice`]):
    /// `ingress_username`/`ingress_password_hash` (empty = none), `ingress_allowed_sources`
    /// (addresses or CIDR ranges) and the sender mode —
    ///
    /// * FIXED_ADMIN / BULK → [`SenderPolicy::FixedMailbox`] with the admin / bulk mailbox; the
    ///   address is `smtp.sender_address` when set, else the mailbox address; the display name
    ///   is `smtp.sender_name`, else the device's display name;
    /// * LOGIN_USER → [`SenderPolicy::LoginUser`];
    /// * ALLOW_USER_CHANGE → [`SenderPolicy::AllowUserChange`] with `allowed_mailboxes` (and the
    ///   admin mailbox, when set).
    ///
    /// Errors name the device and the field (an unparsable source, a fixed mode without its
    /// mailbox, an unspecified mode). [`SenderPolicy::Misconfigured`] is for callers that want
    /// to keep such a device on the table and refuse its mail with `451` instead.
    pub fn from_agent_device(device: &pb::AgentDevice) -> Result<Self, String> {
        let name = &device.name;
        if name.is_empty() {
            return Err("agent device without a name".to_owned());
        }
        let mut sources = Vec::new();
        for s in &device.ingress_allowed_sources {
            sources.push(
                parse_source(s)
                    .map_err(|e| format!("device {name:?}: ingress_allowed_sources: {e}"))?,
            );
        }
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        Ok(Self {
            device: name.clone(),
            username: nonempty(&device.ingress_username),
            password_hash: nonempty(&device.ingress_password_hash),
            allowed_addresses: sources,
            sender: SenderPolicy::from_agent_device(device)?,
            user_addresses: device
                .ingress_user_addresses
                .iter()
                .map(|a| a.trim().to_lowercase())
                .filter(|a| !a.is_empty())
                .collect(),
        })
    }
}

impl SenderPolicy {
    /// The sender policy of a broker-configured device (the mapping is described at
    /// [`LocalDevice::from_agent_device`]); the error names the device and the field. Callers
    /// that keep the device anyway use `.unwrap_or_else(SenderPolicy::Misconfigured)`.
    pub fn from_agent_device(device: &pb::AgentDevice) -> Result<Self, String> {
        sender_policy(device)
    }
}

fn sender_policy(device: &pb::AgentDevice) -> Result<SenderPolicy, String> {
    let name = &device.name;
    let usable = |m: &Option<pb::MailboxRef>| {
        m.as_ref()
            .filter(|m| !m.name.is_empty() && !m.address.is_empty())
            .cloned()
    };
    let fixed = |m: Option<pb::MailboxRef>, field: &str| -> Result<SenderPolicy, String> {
        let m = m.ok_or_else(|| {
            format!("device {name:?}: sender mode needs {field} with a name and an address")
        })?;
        let smtp = device.smtp.clone().unwrap_or_default();
        let address = if smtp.sender_address.trim().is_empty() {
            m.address
        } else {
            smtp.sender_address.trim().to_owned()
        };
        let display_name = if smtp.sender_name.trim().is_empty() {
            device.display_name.trim().to_owned()
        } else {
            smtp.sender_name.trim().to_owned()
        };
        Ok(SenderPolicy::FixedMailbox {
            mailbox: m.name,
            address,
            display_name,
        })
    };
    match pb::SenderMode::try_from(device.sender_mode) {
        Ok(pb::SenderMode::FixedAdmin) => fixed(usable(&device.admin_mailbox), "admin_mailbox"),
        Ok(pb::SenderMode::Bulk) => fixed(usable(&device.bulk_mailbox), "bulk_mailbox"),
        Ok(pb::SenderMode::LoginUser) => Ok(SenderPolicy::LoginUser),
        Ok(pb::SenderMode::AllowUserChange) => {
            let mut allowed: Vec<(String, String)> = device
                .allowed_mailboxes
                .iter()
                .filter(|m| !m.name.is_empty() && !m.address.is_empty())
                .map(|m| (m.name.clone(), m.address.clone()))
                .collect();
            if let Some(admin) = usable(&device.admin_mailbox) {
                allowed.push((admin.name, admin.address));
            }
            Ok(SenderPolicy::AllowUserChange { allowed })
        }
        Ok(pb::SenderMode::Unspecified) | Err(_) => Err(format!(
            "device {name:?}: sender_mode {} is not a known sender mode",
            device.sender_mode
        )),
    }
}

/// The ingress handler of the agent: authenticates devices and spools their mail.
#[derive(Debug, Clone)]
pub struct LocalDevices {
    devices: Arc<Vec<LocalDevice>>,
    spool: Arc<Spool>,
    passwords: Arc<PasswordChecker>,
}

impl LocalDevices {
    /// A handler for these devices, spooling into `spool`, with its own [`PasswordChecker`].
    pub fn new(devices: Vec<LocalDevice>, spool: Arc<Spool>) -> Self {
        Self::with_checker(devices, spool, Arc::new(PasswordChecker::default()))
    }

    /// A handler whose password checks go through `passwords` (shared across device tables).
    pub fn with_checker(
        devices: Vec<LocalDevice>,
        spool: Arc<Spool>,
        passwords: Arc<PasswordChecker>,
    ) -> Self {
        Self {
            devices: Arc::new(devices),
            spool,
            passwords,
        }
    }
}

impl IngressHandler for LocalDevices {
    fn device_for_peer(&self, peer: SocketAddr) -> Option<String> {
        self.devices
            .iter()
            .find(|d| d.allows_source(peer.ip()))
            .map(|d| d.device.clone())
    }

    async fn authenticate(
        &self,
        _peer: SocketAddr,
        user: String,
        password: Password,
    ) -> Option<String> {
        let device = self
            .devices
            .iter()
            .find(|d| d.username.as_deref() == Some(user.as_str()))?
            .clone();
        let hash = device.password_hash?;
        let ok = self.passwords.verify(&user, password, &hash).await;
        ok.then_some(device.device)
    }

    async fn deliver(
        &self,
        mut envelope: Envelope,
        message: Incoming,
    ) -> Result<SpoolId, DeliverError> {
        let Incoming { head, tail } = message;
        // The sender policy reads and rewrites only the header block, which is all in `head`.
        // A session without a known device (only when `require_auth` is off) is spooled as is.
        let head = match self.devices.iter().find(|d| d.device == envelope.device) {
            Some(device) => {
                let head =
                    apply_sender_policy(&device.sender, &device.device, &mut envelope, head)?;
                if !envelope.user_address.is_empty() && !device.may_send_as(&envelope.user_address)
                {
                    return Err(DeliverError::Rejected {
                        code: 553,
                        text: format!(
                            "5.7.1 Sender <{}> is not an address {} may send as: add it to the device's ingress user addresses",
                            envelope.user_address,
                            device.login()
                        ),
                    });
                }
                head
            }
            None => head,
        };
        let spool = Arc::clone(&self.spool);
        let stored =
            tokio::task::spawn_blocking(move || spool.accept_incoming(&envelope, &head, tail))
                .await;
        match stored {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(e @ SpoolError::Full { .. })) => {
                tracing::warn!(error = %e, "message refused: the spool is full");
                Err(DeliverError::Rejected {
                    code: 452,
                    text: "4.3.1 Insufficient system storage: the agent's spool is full, try again later".to_owned(),
                })
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "spooling a message failed");
                Err(DeliverError::Temporary(e.to_string()))
            }
            Err(e) => Err(DeliverError::Temporary(format!("spool task failed: {e}"))),
        }
    }

    fn tail_path(&self) -> Option<PathBuf> {
        self.spool.tail_path().ok()
    }

    fn room(&self) -> Option<u64> {
        Some(self.spool.room())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(name: &str, address: &str) -> Option<pb::MailboxRef> {
        Some(pb::MailboxRef {
            name: name.into(),
            address: address.into(),
            ..Default::default()
        })
    }

    #[test]
    fn agent_devices_map_to_local_devices() {
        let mut d = pb::AgentDevice {
            name: "mfd-3".into(),
            display_name: "MFD 3rd floor".into(),
            sender_mode: pb::SenderMode::FixedAdmin as i32,
            admin_mailbox: mailbox("admin-3", "admin3@x.org"),
            ingress_username: "mfd3".into(),
            ingress_allowed_sources: vec!["10.1.2.3".into(), "10.9.0.0/16".into()],
            ..Default::default()
        };
        let local = LocalDevice::from_agent_device(&d).unwrap();
        assert_eq!(local.username.as_deref(), Some("mfd3"));
        assert_eq!(local.password_hash, None);
        assert!(local.allows_source("10.1.2.3".parse().unwrap()));
        assert!(local.allows_source("::ffff:10.9.200.1".parse().unwrap()));
        assert!(!local.allows_source("10.1.2.4".parse().unwrap()));
        assert_eq!(
            local.sender,
            SenderPolicy::FixedMailbox {
                mailbox: "admin-3".into(),
                address: "admin3@x.org".into(),
                display_name: "MFD 3rd floor".into(),
            }
        );

        d.sender_mode = pb::SenderMode::Bulk as i32;
        let err = LocalDevice::from_agent_device(&d).unwrap_err();
        assert!(
            err.contains("bulk_mailbox") && err.contains("mfd-3"),
            "{err}"
        );
        assert!(matches!(
            SenderPolicy::from_agent_device(&d).unwrap_or_else(SenderPolicy::Misconfigured),
            SenderPolicy::Misconfigured(_)
        ));

        d.sender_mode = pb::SenderMode::AllowUserChange as i32;
        d.allowed_mailboxes = vec![mailbox("frontdesk", "fd@x.org").unwrap_or_default()];
        assert_eq!(
            LocalDevice::from_agent_device(&d).unwrap().sender,
            SenderPolicy::AllowUserChange {
                allowed: vec![
                    ("frontdesk".into(), "fd@x.org".into()),
                    ("admin-3".into(), "admin3@x.org".into())
                ]
            }
        );
        d.ingress_allowed_sources.push("printer.lan".into());
        let err = LocalDevice::from_agent_device(&d).unwrap_err();
        assert!(err.contains("ingress_allowed_sources"), "{err}");
    }

    #[test]
    fn the_whole_internet_is_not_a_source() {
        for wide in ["0.0.0.0/0", "::/0", "128.0.0.0/1", "10.0.0.0/7", "fc00::/7"] {
            let err = parse_source(wide).unwrap_err();
            assert!(err.contains("too wide"), "{wide}: {err}");
        }
        for fine in ["10.0.0.0/8", "192.168.1.20", "fd00::/16", "2001:db8::/48"] {
            assert!(parse_source(fine).is_ok(), "{fine}");
        }
        let d = pb::AgentDevice {
            name: "mfd".into(),
            sender_mode: pb::SenderMode::LoginUser as i32,
            ingress_allowed_sources: vec!["0.0.0.0/0".into()],
            ..Default::default()
        };
        let err = LocalDevice::from_agent_device(&d).unwrap_err();
        assert!(
            err.contains("ingress_allowed_sources") && err.contains("too wide"),
            "{err}"
        );
    }

    #[test]
    fn a_login_shared_by_two_devices_is_reported_for_both() {
        let device = |name: &str, user: &str| pb::AgentDevice {
            name: name.into(),
            ingress_username: user.into(),
            ..Default::default()
        };
        let problems = check_devices(&[
            device("a", "scanner"),
            device("b", "Scanner"),
            device("c", "other"),
            device("d", ""),
            device("e", ""),
        ]);
        let named: Vec<&str> = problems.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(named, ["a", "b"]);
        assert!(
            problems[0].1.contains("ingress_username") && problems[0].1.contains('b'),
            "{problems:?}"
        );
    }

    #[test]
    fn user_addresses_match_exactly_or_by_domain() {
        let mut d = LocalDevice::new("mfd", SenderPolicy::LoginUser);
        d.user_addresses = vec!["alice@contoso.example".into(), "@fabrikam.example".into()];
        assert!(d.may_send_as("Alice@Contoso.example"));
        assert!(d.may_send_as("anyone@fabrikam.example"));
        assert!(!d.may_send_as("bob@contoso.example"));
        assert!(!d.may_send_as("x@sub.fabrikam.example"));
        assert!(!d.may_send_as("fabrikam.example"));
    }
}
