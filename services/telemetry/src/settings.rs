//! The `[tracing]` section both binaries read: where spans go (`otlp_endpoint`, empty = off),
//! which share of new traces is kept (`sample_ratio`), and the `service.name` spans carry.

use std::fmt;
use std::marker::PhantomData;

use serde::{Deserialize, Serialize};

/// Which program a `[tracing]` section belongs to: its default `service_name`.
pub trait Program: 'static {
    /// The default `service.name` (`tokenfleet-broker`, `tokenfleet-agent`).
    const SERVICE_NAME: &'static str;
}

/// `[tracing]` as written. Off by default: spans leave the process only when `otlp_endpoint` is
/// set. Generic over the program only for its default `service_name`, so a `[tracing]` table
/// that sets just the endpoint still gets the program's name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, bound = "")]
pub struct RawTracing<P: Program> {
    /// OTLP/gRPC collector, `http://host:port` or `https://host:port` (system CA roots);
    /// empty = no traces.
    pub otlp_endpoint: String,
    /// Share of new traces recorded, 0.0 to 1.0. A request that arrives with a `traceparent`
    /// follows the caller's decision instead (parent-based sampling), so one trace is whole or
    /// absent across agent and broker.
    pub sample_ratio: f64,
    /// `service.name` of the spans.
    pub service_name: String,
    #[serde(skip)]
    program: PhantomData<fn() -> P>,
}

impl<P: Program> Default for RawTracing<P> {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            sample_ratio: 1.0,
            service_name: P::SERVICE_NAME.to_owned(),
            program: PhantomData,
        }
    }
}

/// One bad value of `[tracing]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The full key, `tracing.sample_ratio`.
    pub key: &'static str,
    /// The value as written (TOML-quoted for strings).
    pub value: String,
    /// What is wrong and what to write instead.
    pub problem: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.key, self.value, self.problem)
    }
}

/// The checked `[tracing]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    /// Collector URL (`scheme://host:port`); `None` = traces off.
    pub otlp_endpoint: Option<String>,
    /// Share of new traces recorded.
    pub sample_ratio: f64,
    /// `service.name`.
    pub service_name: String,
}

impl TracingSettings {
    /// Traces off (the default).
    pub fn off(service_name: &str) -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            service_name: service_name.to_owned(),
        }
    }

    /// One line for start-up logs and `check-config`: `off`, or where spans go and how many.
    pub fn describe(&self) -> String {
        match &self.otlp_endpoint {
            None => "off".to_owned(),
            Some(endpoint) => format!(
                "OTLP to {endpoint} as {}, sampling {}",
                self.service_name, self.sample_ratio
            ),
        }
    }
}

impl<P: Program> RawTracing<P> {
    /// Checks every value; all problems at once.
    pub fn check(&self) -> Result<TracingSettings, Vec<Problem>> {
        let mut problems = Vec::new();
        let otlp_endpoint = match self.otlp_endpoint.trim() {
            "" => None,
            text => match check_endpoint(text) {
                Ok(endpoint) => Some(endpoint),
                Err(problem) => {
                    problems.push(Problem {
                        key: "tracing.otlp_endpoint",
                        value: format!("{:?}", self.otlp_endpoint),
                        problem,
                    });
                    None
                }
            },
        };
        if !(self.sample_ratio.is_finite() && (0.0..=1.0).contains(&self.sample_ratio)) {
            problems.push(Problem {
                key: "tracing.sample_ratio",
                value: self.sample_ratio.to_string(),
                problem: "must be a number from 0.0 (no new traces) to 1.0 (every trace)"
                    .to_owned(),
            });
        }
        let name = self.service_name.trim();
        if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
            problems.push(Problem {
                key: "tracing.service_name",
                value: format!("{:?}", self.service_name),
                problem: format!(
                    "must be 1 to 255 printable characters (default \"{}\")",
                    P::SERVICE_NAME
                ),
            });
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(TracingSettings {
            otlp_endpoint,
            sample_ratio: self.sample_ratio,
            service_name: name.to_owned(),
        })
    }
}

/// `http(s)://host:port`, nothing else: gRPC has no path, and credentials do not belong in a URL
/// that is printed by `print-config` and logged at start.
fn check_endpoint(text: &str) -> Result<String, String> {
    const EXAMPLE: &str =
        "e.g. \"http://127.0.0.1:4317\" or \"https://otel-collector.example:4317\"";
    let url = url::Url::parse(text).map_err(|e| format!("not a URL ({e}); {EXAMPLE}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme `{}` is not http or https; {EXAMPLE}",
            url.scheme()
        ));
    }
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err(format!("names no host; {EXAMPLE}"));
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry user name or password".to_owned());
    }
    let Some(port) = url.port() else {
        return Err(format!(
            "needs a port (the OTLP/gRPC port is usually 4317); {EXAMPLE}"
        ));
    };
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "must not have a path, query or fragment (gRPC names its own path); {EXAMPLE}"
        ));
    }
    Ok(format!("{}://{host}:{port}", url.scheme()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct Test;
    impl Program for Test {
        const SERVICE_NAME: &'static str = "tokenfleet-test";
    }

    fn raw(endpoint: &str, ratio: f64, name: &str) -> RawTracing<Test> {
        RawTracing {
            otlp_endpoint: endpoint.to_owned(),
            sample_ratio: ratio,
            service_name: name.to_owned(),
            program: PhantomData,
        }
    }

    #[test]
    fn off_by_default() {
        let s = RawTracing::<Test>::default().check().unwrap();
        assert_eq!(s, TracingSettings::off("tokenfleet-test"));
        assert_eq!(s.describe(), "off");
    }

    #[test]
    fn endpoints() {
        for (text, want) in [
            ("http://127.0.0.1:4317", "http://127.0.0.1:4317"),
            (
                "https://collector.example:4317/",
                "https://collector.example:4317",
            ),
            ("  http://[::1]:4317 ", "http://[::1]:4317"),
        ] {
            let s = raw(text, 1.0, "x").check().unwrap();
            assert_eq!(s.otlp_endpoint.as_deref(), Some(want), "{text}");
        }
        for (text, why) in [
            ("127.0.0.1:4317", "not a URL"),
            ("grpc://127.0.0.1:4317", "scheme"),
            ("http://127.0.0.1", "needs a port"),
            ("http://u:p@127.0.0.1:4317", "user name or password"),
            ("http://127.0.0.1:4317/v1/traces", "path"),
            ("nonsense", "not a URL"),
        ] {
            let e = raw(text, 1.0, "x").check().unwrap_err();
            assert_eq!(e.len(), 1, "{text}: {e:?}");
            assert_eq!(e[0].key, "tracing.otlp_endpoint");
            assert!(e[0].problem.contains(why), "{text}: {}", e[0]);
        }
    }

    #[test]
    fn every_problem_at_once() {
        let e = raw("ftp://x:1", 1.5, "").check().unwrap_err();
        let keys: Vec<_> = e.iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "tracing.otlp_endpoint",
                "tracing.sample_ratio",
                "tracing.service_name"
            ]
        );
        assert_eq!(
            e[1].to_string(),
            "tracing.sample_ratio = 1.5: must be a number from 0.0 (no new traces) to 1.0 (every trace)"
        );
        assert!(raw("", f64::NAN, "x").check().is_err());
        assert!(raw("", -0.1, "x").check().is_err());
        assert!(raw("", 0.0, "x").check().is_ok());
    }
}
