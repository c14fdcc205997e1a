//! `[metrics]`: what `/metrics` shows beyond the defaults (tenant labels) and how often the
//! fleet gauges are recomputed (see [`crate::inventory`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[metrics]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Adds a `tenant` label to the token, alert and fleet series. Off by default: tenant names
    /// are customer names, and each tenant multiplies the series.
    pub per_tenant_labels: bool,
    /// Seconds between two computations of the fleet gauges (mailboxes by status, agents,
    /// queues), 1-3600.
    pub inventory_interval_seconds: u64,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            per_tenant_labels: false,
            inventory_interval_seconds: 30,
        }
    }
}

/// Validated `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// `per_tenant_labels`.
    pub per_tenant_labels: bool,
    /// `inventory_interval_seconds`.
    pub inventory_interval: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            per_tenant_labels: false,
            inventory_interval: Duration::from_secs(30),
        }
    }
}

impl MetricsSection {
    /// The validated settings (the error names the field).
    pub fn to_config(&self) -> Result<MetricsConfig, ConfigError> {
        if !(1..=3600).contains(&self.inventory_interval_seconds) {
            return Err(ConfigError::invalid(
                "metrics.inventory_interval_seconds",
                format!("must be 1-3600, got {}", self.inventory_interval_seconds),
            ));
        }
        Ok(MetricsConfig {
            per_tenant_labels: self.per_tenant_labels,
            inventory_interval: Duration::from_secs(self.inventory_interval_seconds),
        })
    }
}
