//! `/healthz`: whether the running agent can take mail — every listener it should have is bound
//! and serving, and the spool takes a write — or, in a short line, why not.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Longest a spool write check may take before the agent counts as unhealthy.
const SPOOL_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
enum ListenerState {
    Starting,
    Up,
    Failed(String),
}

#[derive(Debug)]
struct Inner {
    /// Where the write check writes (the spool's `tmp/`, emptied at every start).
    probe_dir: PathBuf,
    listeners: Mutex<Vec<(&'static str, ListenerState)>>,
    stopping: AtomicBool,
    probes: AtomicU64,
}

/// The agent's health (see the module documentation). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

impl Health {
    /// Health of an agent whose spool is in `spool_dir`.
    pub fn new(spool_dir: &Path) -> Self {
        Self {
            inner: Arc::new(Inner {
                probe_dir: spool_dir.join("tmp"),
                listeners: Mutex::new(Vec::new()),
                stopping: AtomicBool::new(false),
                probes: AtomicU64::new(0),
            }),
        }
    }

    fn set(&self, name: &'static str, state: ListenerState) {
        let mut listeners = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match listeners.iter_mut().find(|(n, _)| *n == name) {
            Some((_, s)) => *s = state,
            None => listeners.push((name, state)),
        }
    }

    /// The agent will have listener `name` (e.g. `SMTP ingress`); unhealthy until it is up.
    pub fn expect_listener(&self, name: &'static str) {
        self.set(name, ListenerState::Starting);
    }

    /// Listener `name` is bound and serving.
    pub fn listener_up(&self, name: &'static str) {
        self.set(name, ListenerState::Up);
    }

    /// Listener `name` stopped serving for `why`.
    pub fn listener_failed(&self, name: &'static str, why: impl Into<String>) {
        self.set(name, ListenerState::Failed(why.into()));
    }

    /// The agent is shutting down.
    pub fn stopping(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
    }

    /// `Ok` when healthy, else why not (one line).
    pub async fn check(&self) -> Result<(), String> {
        if self.inner.stopping.load(Ordering::SeqCst) {
            return Err("stopping".to_owned());
        }
        let listeners = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for (name, state) in listeners {
            match state {
                ListenerState::Up => {}
                ListenerState::Starting => return Err(format!("{name}: not listening yet")),
                ListenerState::Failed(why) => return Err(format!("{name}: {why}")),
            }
        }
        let n = self.inner.probes.fetch_add(1, Ordering::Relaxed);
        let path = self
            .inner
            .probe_dir
            .join(format!("healthz-{}-{n}.probe", std::process::id()));
        let write = tokio::task::spawn_blocking(move || {
            let result = std::fs::write(&path, b"ok");
            let _ = std::fs::remove_file(&path);
            result
        });
        match tokio::time::timeout(SPOOL_CHECK_TIMEOUT, write).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(error))) => Err(format!("spool not writable: {error}")),
            Ok(Err(error)) => Err(format!("spool check failed: {error}")),
            Err(_) => Err(format!(
                "spool not writable: no write within {} s",
                SPOOL_CHECK_TIMEOUT.as_secs()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listeners_and_the_spool_decide() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        let health = Health::new(dir.path());
        assert_eq!(health.check().await, Ok(()));
        health.expect_listener("SMTP ingress");
        assert_eq!(
            health.check().await,
            Err("SMTP ingress: not listening yet".into())
        );
        health.listener_up("SMTP ingress");
        assert_eq!(health.check().await, Ok(()));
        // The probe file is gone again.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        std::fs::remove_dir(dir.path().join("tmp")).unwrap();
        let err = health.check().await.unwrap_err();
        assert!(err.starts_with("spool not writable: "), "{err}");
        health.listener_failed("SMTP ingress", "stopped: accept failed");
        assert_eq!(
            health.check().await,
            Err("SMTP ingress: stopped: accept failed".into())
        );
        health.stopping();
        assert_eq!(health.check().await, Err("stopping".into()));
    }
}
