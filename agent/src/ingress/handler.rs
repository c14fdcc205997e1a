//! [`LocalDevices`]: the production [`IngressHandler`] — per-device local credentials (argon2 PHC
//! hashes) or source-address allowlists, and delivery into the spool.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use argon2::{Argon2, PasswordVerifier as _};

use super::{DeliverError, IngressHandler, Password};
use crate::spool::{Envelope, Spool, SpoolId};

/// One device's local ingress credentials.
#[derive(Debug, Clone)]
pub struct LocalDevice {
    /// The device name (recorded in the spool envelope).
    pub device: String,
    /// The user name the device logs in with, if it authenticates.
    pub username: Option<String>,
    /// Argon2 PHC string of its password (`$argon2id$v=19$...`).
    pub password_hash: Option<String>,
    /// Source addresses that may send as this device without `AUTH`.
    pub allowed_addresses: Vec<IpAddr>,
}

/// The ingress handler of the agent: authenticates devices and spools their mail.
#[derive(Debug, Clone)]
pub struct LocalDevices {
    devices: Arc<Vec<LocalDevice>>,
    spool: Arc<Spool>,
}

impl LocalDevices {
    /// A handler for these devices, spooling into `spool`.
    pub fn new(devices: Vec<LocalDevice>, spool: Arc<Spool>) -> Self {
        Self {
            devices: Arc::new(devices),
            spool,
        }
    }
}

impl IngressHandler for LocalDevices {
    fn device_for_peer(&self, peer: SocketAddr) -> Option<String> {
        self.devices
            .iter()
            .find(|d| d.allowed_addresses.contains(&peer.ip()))
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
        // Argon2 is deliberately slow: keep it off the async worker threads.
        let ok = tokio::task::spawn_blocking(move || {
            Argon2::default()
                .verify_password(password.expose().as_bytes(), hash.as_str())
                .is_ok()
        })
        .await
        .unwrap_or(false);
        ok.then_some(device.device)
    }

    async fn deliver(&self, envelope: Envelope, message: Vec<u8>) -> Result<SpoolId, DeliverError> {
        let spool = Arc::clone(&self.spool);
        match tokio::task::spawn_blocking(move || spool.accept(&envelope, &message)).await {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "spooling a message failed");
                Err(DeliverError(e.to_string()))
            }
            Err(e) => Err(DeliverError(format!("spool task failed: {e}"))),
        }
    }
}
