//! The devices this agent serves, as the broker configured them ([`DeviceRegistry`]): each
//! device's upstream [`Delivery`], the mailbox its sender mode sends as, and the ingress table
//! ([`FleetIngress`]: local credentials and source ranges) — swapped as a whole when a new
//! configuration arrives.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use tokenfleet_proto::v1 as pb;
use tokio::sync::Notify;

use crate::ingress::{
    DeliverError, Incoming, IngressHandler, LocalDevice, LocalDevices, Password, PasswordChecker,
    SenderPolicy, check_devices, parse_source,
};
use crate::metrics::AgentMetrics;
use crate::spool::{Envelope, Spool, SpoolId};
use crate::upstream::Delivery;

/// Builds the upstream [`Delivery`] of a device from its send profile.
pub trait DeliveryFactory: Send + Sync + 'static {
    /// The delivery for `device`, or why it cannot be built (names the field).
    fn delivery(&self, device: &pb::AgentDevice) -> Result<Arc<dyn Delivery>, String>;
}

/// The production [`DeliveryFactory`]: SMTP submission by default, Microsoft Graph or the Gmail
/// API per `smtp.method`.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpstreamDeliveries;

impl DeliveryFactory for UpstreamDeliveries {
    fn delivery(&self, device: &pb::AgentDevice) -> Result<Arc<dyn Delivery>, String> {
        super::profiles::delivery(&device.smtp.clone().unwrap_or_default())
    }
}

/// One configured device.
#[derive(Debug, Clone)]
pub struct DeviceEntry {
    /// The broker's view of the device.
    pub spec: pb::AgentDevice,
    /// Its upstream, or why there is none.
    pub delivery: Result<Arc<dyn Delivery>, String>,
}

impl DeviceEntry {
    /// The mailbox (name) the device's sender mode sends as when the ingress did not choose one:
    /// the admin mailbox (FIXED_ADMIN) or the bulk sender (BULK).
    pub fn default_mailbox(&self) -> Option<&str> {
        fn pick(m: &Option<pb::MailboxRef>) -> Option<&str> {
            m.as_ref()
                .map(|m| m.name.as_str())
                .filter(|n| !n.is_empty())
        }
        match pb::SenderMode::try_from(self.spec.sender_mode).unwrap_or_default() {
            pb::SenderMode::Bulk => pick(&self.spec.bulk_mailbox),
            pb::SenderMode::FixedAdmin => pick(&self.spec.admin_mailbox),
            _ => pick(&self.spec.admin_mailbox).or_else(|| pick(&self.spec.bulk_mailbox)),
        }
    }
}

/// The devices of one configuration revision.
#[derive(Debug, Clone, Default)]
pub struct DeviceSet {
    /// The configuration they came from.
    pub config: pb::AgentConfig,
    /// By device name.
    pub devices: BTreeMap<String, DeviceEntry>,
}

/// The current device configuration; replaced as a whole by [`DeviceRegistry::apply`].
pub struct DeviceRegistry {
    factory: Arc<dyn DeliveryFactory>,
    current: RwLock<Arc<DeviceSet>>,
}

impl std::fmt::Debug for DeviceRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRegistry")
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

impl DeviceRegistry {
    /// An empty registry building deliveries with `factory`.
    pub fn new(factory: Arc<dyn DeliveryFactory>) -> Self {
        Self {
            factory,
            current: RwLock::new(Arc::new(DeviceSet::default())),
        }
    }

    /// The current devices.
    pub fn current(&self) -> Arc<DeviceSet> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// One device.
    pub fn device(&self, name: &str) -> Option<DeviceEntry> {
        self.current().devices.get(name).cloned()
    }

    /// Replaces the configuration; returns the names of devices without a usable upstream.
    pub fn apply(&self, config: pb::AgentConfig) -> Vec<(String, String)> {
        let mut devices = BTreeMap::new();
        let mut broken = Vec::new();
        for spec in &config.devices {
            let delivery = self.factory.delivery(spec);
            if let Err(why) = &delivery {
                broken.push((spec.name.clone(), why.clone()));
            }
            devices.insert(
                spec.name.clone(),
                DeviceEntry {
                    spec: spec.clone(),
                    delivery,
                },
            );
        }
        let set = Arc::new(DeviceSet { config, devices });
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = set;
        broken
    }
}

/// The agent's [`IngressHandler`]: the configured devices' [`LocalDevices`] (credentials, source
/// ranges, sender policy), swapped as a whole on every configuration change; wakes the delivery
/// worker for each message spooled, and counts it.
#[derive(Debug)]
pub struct FleetIngress {
    spool: Arc<Spool>,
    table: RwLock<Arc<LocalDevices>>,
    wake: Arc<Notify>,
    passwords: Arc<PasswordChecker>,
    metrics: AgentMetrics,
}

impl FleetIngress {
    /// A handler spooling into `spool`, waking `wake` for each accepted message.
    pub fn new(spool: Arc<Spool>, wake: Arc<Notify>) -> Self {
        Self::with_passwords(spool, wake, Arc::new(PasswordChecker::default()))
    }

    /// [`FleetIngress::new`] checking passwords with `passwords` (its concurrency, memory and
    /// cache limits hold across configuration changes).
    pub fn with_passwords(
        spool: Arc<Spool>,
        wake: Arc<Notify>,
        passwords: Arc<PasswordChecker>,
    ) -> Self {
        let table = Arc::new(LocalDevices::with_checker(
            Vec::new(),
            Arc::clone(&spool),
            Arc::clone(&passwords),
        ));
        Self {
            spool,
            table: RwLock::new(table),
            wake,
            passwords,
            metrics: AgentMetrics::default(),
        }
    }

    /// Counts accepted messages into `metrics`.
    pub fn with_metrics(mut self, metrics: AgentMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    fn table(&self) -> Arc<LocalDevices> {
        Arc::clone(
            &self
                .table
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Installs the ingress view of `devices`. A device whose settings are unusable (a bad or
    /// too wide source entry, a sender mode without its mailbox) stays on the table with its
    /// mail refused with `451` (the device retries; nothing is lost) and only its valid sources;
    /// a user name that several devices share is the login of none of them
    /// ([`check_devices`]). The problems are returned as (device, problem).
    pub fn apply(&self, devices: &[pb::AgentDevice]) -> Vec<(String, String)> {
        let mut problems = check_devices(devices);
        let shared_login: Vec<String> = problems.iter().map(|(d, _)| d.clone()).collect();
        let mut locals = Vec::new();
        for d in devices {
            match LocalDevice::from_agent_device(d) {
                Ok(local) => locals.push(local),
                Err(problem) => {
                    let mut local = LocalDevice::new(
                        d.name.clone(),
                        SenderPolicy::Misconfigured(problem.clone()),
                    );
                    local.username =
                        (!d.ingress_username.is_empty()).then(|| d.ingress_username.clone());
                    local.password_hash = (!d.ingress_password_hash.is_empty())
                        .then(|| d.ingress_password_hash.clone());
                    local.allowed_addresses = d
                        .ingress_allowed_sources
                        .iter()
                        .filter_map(|s| parse_source(s).ok())
                        .collect();
                    problems.push((d.name.clone(), problem));
                    locals.push(local);
                }
            }
        }
        for local in &mut locals {
            if shared_login.contains(&local.device) {
                local.username = None;
                local.password_hash = None;
            }
        }
        let table = Arc::new(LocalDevices::with_checker(
            locals,
            Arc::clone(&self.spool),
            Arc::clone(&self.passwords),
        ));
        *self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = table;
        // A changed or removed password must not be accepted from memory: every login is
        // checked against the new table's hashes.
        self.passwords.forget_all();
        problems
    }
}

impl IngressHandler for FleetIngress {
    fn device_for_peer(&self, peer: SocketAddr) -> Option<String> {
        self.table().device_for_peer(peer)
    }

    async fn authenticate(
        &self,
        peer: SocketAddr,
        user: String,
        password: Password,
    ) -> Option<String> {
        let table = self.table();
        table.authenticate(peer, user, password).await
    }

    async fn deliver(
        &self,
        envelope: Envelope,
        message: Incoming,
    ) -> Result<SpoolId, DeliverError> {
        let table = self.table();
        let id = table.deliver(envelope, message).await?;
        // In the spool and fsynced: the device is told 250 next.
        self.metrics.message_accepted();
        self.wake.notify_one();
        Ok(id)
    }

    fn tail_path(&self) -> Option<std::path::PathBuf> {
        self.table().tail_path()
    }

    fn room(&self) -> Option<u64> {
        self.table().room()
    }
}

impl crate::pop3_server::Pop3Auth for FleetIngress {
    async fn authenticate(
        &self,
        peer: SocketAddr,
        user: String,
        password: Password,
    ) -> Option<String> {
        let table = self.table();
        IngressHandler::authenticate(table.as_ref(), peer, user, password).await
    }
}
