//! Process metrics under the names every Prometheus client library uses (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, …), read from `/proc/self` when scraped.
//! Elsewhere than on Linux the files are missing and the series are left out.
//!
//! Hand-written because prometheus-client has no process collector, and the crates that read
//! `/proc` bring far more than these few numbers need. CPU times in `/proc/self/stat` are in
//! clock ticks of `USER_HZ`, which Linux fixes at 100 for user space on every architecture
//! (the Prometheus `procfs` library assumes the same); asking `sysconf` would need `unsafe`.

use std::fmt;
use std::fs;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Unit;

use super::{Sample, encode_one};

/// Clock ticks per second of the times in `/proc/<pid>/stat`.
const USER_HZ: f64 = 100.0;

/// Reads `/proc/self` when scraped.
#[derive(Debug)]
pub struct ProcessCollector;

/// What `/proc/self` tells.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessSample {
    /// User and system CPU time, in seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size, in bytes.
    pub resident_bytes: Option<u64>,
    /// Virtual memory size, in bytes.
    pub virtual_bytes: Option<u64>,
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// The soft limit of open file descriptors.
    pub max_fds: Option<u64>,
    /// Start time, in seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
}

impl ProcessSample {
    /// Reads `/proc/self` now.
    pub fn read() -> Self {
        let stat = fs::read_to_string("/proc/self/stat").ok();
        let fields = stat.as_deref().map(stat_fields).unwrap_or_default();
        // Fields after the command name, counted from `state` (field 3 of proc(5)) as 0.
        let field = |n: usize| fields.get(n).and_then(|f| f.parse::<u64>().ok());
        let cpu_seconds = match (field(11), field(12)) {
            (Some(utime), Some(stime)) => Some((utime + stime) as f64 / USER_HZ),
            _ => None,
        };
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let boot_time = fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        let start_time_seconds = match (boot_time, field(19)) {
            (Some(boot), Some(ticks)) => Some(boot as f64 + ticks as f64 / USER_HZ),
            _ => None,
        };
        Self {
            cpu_seconds,
            resident_bytes: status_kib(&status, "VmRSS:").map(|k| k * 1024),
            virtual_bytes: status_kib(&status, "VmSize:").map(|k| k * 1024),
            open_fds: fs::read_dir("/proc/self/fd")
                .ok()
                .map(|dir| dir.count() as u64),
            max_fds: fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|limits| max_open_files(&limits)),
            start_time_seconds,
        }
    }
}

/// The fields of `/proc/<pid>/stat` after `(comm)` — the command name may hold spaces and
/// parentheses, so the split is at the last `)`.
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

/// A `Key:   123 kB` line of `/proc/<pid>/status`.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The soft limit of `Max open files` in `/proc/<pid>/limits` (`None` when unlimited).
fn max_open_files(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn gauge(v: u64) -> Sample {
    Sample::GaugeInt(i64::try_from(v).unwrap_or(i64::MAX))
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let sample = ProcessSample::read();
        let series: [(&str, &str, Option<Unit>, Option<Sample>); 6] = [
            (
                "process_cpu",
                "Total user and system CPU time spent.",
                Some(Unit::Seconds),
                sample.cpu_seconds.map(Sample::Counter),
            ),
            (
                "process_resident_memory",
                "Resident memory size.",
                Some(Unit::Bytes),
                sample.resident_bytes.map(gauge),
            ),
            (
                "process_virtual_memory",
                "Virtual memory size.",
                Some(Unit::Bytes),
                sample.virtual_bytes.map(gauge),
            ),
            (
                "process_open_fds",
                "Open file descriptors.",
                None,
                sample.open_fds.map(gauge),
            ),
            (
                "process_max_fds",
                "Most open file descriptors allowed (soft limit).",
                None,
                sample.max_fds.map(gauge),
            ),
            (
                "process_start_time",
                "Start time of the process since the Unix epoch.",
                Some(Unit::Seconds),
                sample.start_time_seconds.map(Sample::Gauge),
            ),
        ];
        for (name, help, unit, value) in series {
            if let Some(value) = value {
                encode_one(&mut encoder, name, help, unit.as_ref(), value)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let stat = "4242 (tokenfleet (x) agent) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 3 0 123456 9000000 700 18446744073709551615";
        let fields = stat_fields(stat);
        assert_eq!(fields[0], "S");
        assert_eq!(fields[11], "250");
        assert_eq!(fields[12], "50");
        assert_eq!(fields[19], "123456");
        assert_eq!(
            status_kib(
                "Name:\tx\nVmSize:\t  10240 kB\nVmRSS:\t   2048 kB\n",
                "VmRSS:"
            ),
            Some(2048)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max processes             63459                63459                processes\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
    }

    #[test]
    fn this_process_reads_on_linux() {
        if !std::path::Path::new("/proc/self/stat").exists() {
            return;
        }
        let s = ProcessSample::read();
        assert!(s.cpu_seconds.is_some_and(|c| c >= 0.0), "{s:?}");
        assert!(s.resident_bytes.is_some_and(|b| b > 1024 * 1024), "{s:?}");
        assert!(s.open_fds.is_some_and(|n| n >= 3), "{s:?}");
        assert!(s.start_time_seconds.is_some_and(|t| t > 1.6e9), "{s:?}");
    }
}
