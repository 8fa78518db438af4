//! Operator maxima on what clients may ask of the daemon: sessions in total and per
//! principal, message and GraphDef sizes, tensor elements per feed, concurrent runs per
//! session, and a ceiling on run timeouts. Going past one is a clear RESOURCE_EXHAUSTED
//! (counts) or INVALID_ARGUMENT (sizes) that names the limit.

use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    max_sessions: Option<usize>,
    max_sessions_per_principal: Option<usize>,
    max_message_size: Option<String>,
    max_graph_def_size: Option<String>,
    max_feed_elements: Option<u64>,
    max_concurrent_runs_per_session: Option<u32>,
    max_run_timeout: Option<String>,
}

/// The validated limits; `None` means unlimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_sessions: Option<usize>,
    pub max_sessions_per_principal: Option<usize>,
    /// Largest gRPC message either way (default INT32_MAX, what TensorFlow's client allows).
    pub max_message_bytes: usize,
    pub max_graph_def_bytes: Option<usize>,
    pub max_feed_elements: Option<u64>,
    pub max_concurrent_runs_per_session: Option<u32>,
    /// Runs without a timeout get this one; longer timeouts are cut to it.
    pub max_run_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: None,
            max_sessions_per_principal: None,
            max_message_bytes: i32::MAX as usize,
            max_graph_def_bytes: None,
            max_feed_elements: None,
            max_concurrent_runs_per_session: None,
            max_run_timeout: None,
        }
    }
}

impl Limits {
    pub fn from_raw(raw: RawLimits) -> anyhow::Result<Limits> {
        let size = |key: &str, value: Option<String>| -> anyhow::Result<Option<usize>> {
            value
                .map(|text| {
                    crate::config::parse_bytes(&text)
                        .map(|bytes| bytes as usize)
                        .with_context(|| format!("limits.{key} = {text:?}"))
                })
                .transpose()
        };
        let max_message_bytes = size("max_message_size", raw.max_message_size)?
            .unwrap_or(i32::MAX as usize)
            .min(i32::MAX as usize);
        let max_run_timeout = raw
            .max_run_timeout
            .map(|text| {
                humantime::parse_duration(&text).with_context(|| {
                    format!("limits.max_run_timeout = {text:?} is not a duration like \"10m\"")
                })
            })
            .transpose()?;
        Ok(Limits {
            max_sessions: raw.max_sessions,
            max_sessions_per_principal: raw.max_sessions_per_principal,
            max_message_bytes,
            max_graph_def_bytes: size("max_graph_def_size", raw.max_graph_def_size)?,
            max_feed_elements: raw.max_feed_elements,
            max_concurrent_runs_per_session: raw.max_concurrent_runs_per_session,
            max_run_timeout,
        })
    }

    /// The timeout a run gets: the client's, capped by the ceiling; the ceiling when the
    /// client set none.
    pub fn run_timeout(&self, requested: Option<Duration>) -> Option<Duration> {
        match (requested, self.max_run_timeout) {
            (Some(requested), Some(max)) => Some(requested.min(max)),
            (None, max) => max,
            (requested, None) => requested,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(text: &str) -> anyhow::Result<Limits> {
        Limits::from_raw(toml::from_str(text)?)
    }

    #[test]
    fn every_key_is_read() {
        let limits = limits(
            "max_sessions = 10\nmax_sessions_per_principal = 3\nmax_message_size = \"64MiB\"\n\
             max_graph_def_size = \"8MiB\"\nmax_feed_elements = 1000\n\
             max_concurrent_runs_per_session = 4\nmax_run_timeout = \"10m\"\n",
        )
        .expect("valid");
        assert_eq!(limits.max_sessions, Some(10));
        assert_eq!(limits.max_sessions_per_principal, Some(3));
        assert_eq!(limits.max_message_bytes, 64 << 20);
        assert_eq!(limits.max_graph_def_bytes, Some(8 << 20));
        assert_eq!(limits.max_feed_elements, Some(1000));
        assert_eq!(limits.max_concurrent_runs_per_session, Some(4));
        assert_eq!(limits.max_run_timeout, Some(Duration::from_secs(600)));
    }

    #[test]
    fn run_timeouts_are_capped_and_defaulted() {
        let limits = Limits {
            max_run_timeout: Some(Duration::from_secs(60)),
            ..Limits::default()
        };
        assert_eq!(limits.run_timeout(None), Some(Duration::from_secs(60)));
        assert_eq!(
            limits.run_timeout(Some(Duration::from_secs(5))),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            limits.run_timeout(Some(Duration::from_secs(600))),
            Some(Duration::from_secs(60))
        );
        assert_eq!(Limits::default().run_timeout(None), None);
    }

    #[test]
    fn bad_values_name_the_key() {
        let error = limits("max_message_size = \"big\"").expect_err("bad size");
        assert!(format!("{error:#}").contains("limits.max_message_size"));
        let error = limits("max_run_timeout = \"forever\"").expect_err("bad duration");
        assert!(format!("{error:#}").contains("limits.max_run_timeout"));
        let error = limits("max_sesions = 3").expect_err("typo");
        assert!(format!("{error:#}").contains("max_sesions"));
    }
}
