//! Operator maxima on what clients may ask of the daemon: sessions in total and per
//! principal, message and GraphDef sizes, tensor elements per feed, concurrent runs per
//! session, and a ceiling on run timeouts. Going past one is a clear RESOURCE_EXHAUSTED
//! (counts, and an answer too big to send) or INVALID_ARGUMENT (sizes of what a client
//! sent) that names the limit.
//!
//! The checks live here, as domain errors, for every API to apply alike: tfsd.v1 (`grpc/`)
//! and TensorFlow's MasterService (`master/`). An API decides only who the principal is;
//! its tonic server enforces the message size on what arrives.

use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::error::Error;
use crate::proto::tensorflow::TensorProto;
use crate::session::RunSpec;
use crate::units::parse_bytes;

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
                    parse_bytes(&text)
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

    /// limits.max_graph_def_size, for a GraphDef that creates or extends a session.
    pub fn check_graph_def_size(&self, bytes: usize) -> Result<(), Error> {
        match self.max_graph_def_bytes {
            Some(max) if bytes > max => Err(Error::InvalidArgument(format!(
                "graph_def is {bytes} bytes; limits.max_graph_def_size is {max} bytes"
            ))),
            _ => Ok(()),
        }
    }

    /// limits.max_message_size, for an answer a handler is about to send. tonic's encoder
    /// would refuse it too, but with OUT_OF_RANGE, which TensorFlow's client raises as
    /// `OutOfRangeError`: the "end of input" that training loops stop on without a word.
    pub fn check_answer_size(&self, bytes: usize) -> Result<(), Error> {
        if bytes > self.max_message_bytes {
            return Err(Error::ResourceExhausted(format!(
                "the answer is {bytes} bytes; limits.max_message_size is {} bytes: fetch less \
                 in one step",
                self.max_message_bytes
            )));
        }
        Ok(())
    }

    /// limits.max_sessions and max_sessions_per_principal, before a session is created:
    /// `sessions` is how many the daemon hosts, `own` how many of them belong to `principal`
    /// (as messages name it). Checked before the worker is taken, so concurrent creates may
    /// overshoot by the number in flight.
    pub fn check_session_count(
        &self,
        sessions: usize,
        own: usize,
        principal: &str,
    ) -> Result<(), Error> {
        if let Some(max) = self.max_sessions
            && sessions >= max
        {
            return Err(Error::ResourceExhausted(format!(
                "the daemon already hosts {sessions} sessions, the most limits.max_sessions \
                 allows; close one first"
            )));
        }
        if let Some(max) = self.max_sessions_per_principal
            && own >= max
        {
            return Err(Error::ResourceExhausted(format!(
                "{principal} already has {own} sessions, the most \
                 limits.max_sessions_per_principal allows; close one first"
            )));
        }
        Ok(())
    }

    /// limits.max_feed_elements, for each feed by its declared shape.
    pub fn check_feed_elements<'a>(
        &self,
        feeds: impl IntoIterator<Item = (&'a str, &'a TensorProto)>,
    ) -> Result<(), Error> {
        let Some(max) = self.max_feed_elements else {
            return Ok(());
        };
        for (name, tensor) in feeds {
            let elements = element_count(tensor);
            if elements > max {
                return Err(Error::InvalidArgument(format!(
                    "feed {name:?} has {elements} elements; limits.max_feed_elements is {max}"
                )));
            }
        }
        Ok(())
    }

    /// A step within the limits: its feeds checked, its timeout capped (or set), and its
    /// runs in flight bounded (limits.max_concurrent_runs_per_session, which the session
    /// manager enforces).
    pub fn limit_run(&self, spec: RunSpec) -> Result<RunSpec, Error> {
        self.check_feed_elements(
            spec.feeds
                .iter()
                .map(|(name, tensor)| (name.as_str(), tensor)),
        )?;
        Ok(RunSpec {
            timeout: self.run_timeout(spec.timeout),
            max_runs_in_flight: self.max_concurrent_runs_per_session,
            ..spec
        })
    }
}

/// Elements in a feed by its declared shape (1 without a shape, `u64::MAX` when the product
/// overflows or a dimension is negative: tensor validation reports a malformed shape).
pub fn element_count(tensor: &TensorProto) -> u64 {
    tensor.tensor_shape.as_ref().map_or(1, |shape| {
        shape
            .dim
            .iter()
            .try_fold(1u64, |total, dim| {
                u64::try_from(dim.size)
                    .ok()
                    .and_then(|size| total.checked_mul(size))
            })
            .unwrap_or(u64::MAX)
    })
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
    fn sizes_are_invalid_arguments_naming_the_limit() {
        let limits = Limits {
            max_graph_def_bytes: Some(10),
            max_feed_elements: Some(6),
            ..Limits::default()
        };
        assert!(limits.check_graph_def_size(10).is_ok());
        let error = limits.check_graph_def_size(11).expect_err("too big");
        assert!(matches!(&error, Error::InvalidArgument(message)
            if message.contains("limits.max_graph_def_size")));

        let mut tensor = TensorProto::default();
        assert_eq!(element_count(&tensor), 1, "a scalar");
        tensor.tensor_shape = Some(crate::proto::tensorflow::TensorShapeProto {
            dim: [2, 3]
                .into_iter()
                .map(|size| crate::proto::tensorflow::tensor_shape_proto::Dim {
                    size,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        assert_eq!(element_count(&tensor), 6);
        assert!(limits.check_feed_elements([("x", &tensor)]).is_ok());
        let too_many = Limits {
            max_feed_elements: Some(5),
            ..Limits::default()
        };
        let error = too_many
            .check_feed_elements([("x", &tensor)])
            .expect_err("six elements");
        assert!(matches!(&error, Error::InvalidArgument(message)
            if message.contains("\"x\"") && message.contains("limits.max_feed_elements")));
        assert!(
            Limits::default()
                .check_feed_elements([("x", &tensor)])
                .is_ok()
        );

        let small = Limits {
            max_message_bytes: 100,
            ..Limits::default()
        };
        assert!(small.check_answer_size(100).is_ok());
        let error = small.check_answer_size(101).expect_err("too big");
        assert!(matches!(&error, Error::ResourceExhausted(message)
            if message.contains("limits.max_message_size")));
    }

    #[test]
    fn session_counts_are_resource_exhausted_naming_the_limit() {
        let limits = Limits {
            max_sessions: Some(3),
            max_sessions_per_principal: Some(2),
            ..Limits::default()
        };
        assert!(limits.check_session_count(2, 1, "alice").is_ok());
        let error = limits
            .check_session_count(3, 0, "alice")
            .expect_err("daemon full");
        assert!(matches!(&error, Error::ResourceExhausted(message)
            if message.contains("limits.max_sessions ")));
        let error = limits
            .check_session_count(2, 2, "alice")
            .expect_err("alice full");
        assert!(matches!(&error, Error::ResourceExhausted(message)
            if message.starts_with("alice ")
                && message.contains("limits.max_sessions_per_principal")));
        assert!(
            Limits::default()
                .check_session_count(1000, 1000, "alice")
                .is_ok()
        );
    }

    #[test]
    fn runs_get_the_timeout_ceiling_and_the_concurrency_bound() {
        let limits = Limits {
            max_run_timeout: Some(Duration::from_secs(60)),
            max_concurrent_runs_per_session: Some(2),
            ..Limits::default()
        };
        let spec = limits
            .limit_run(RunSpec {
                timeout: Some(Duration::from_secs(600)),
                ..RunSpec::default()
            })
            .expect("within the limits");
        assert_eq!(spec.timeout, Some(Duration::from_secs(60)));
        assert_eq!(spec.max_runs_in_flight, Some(2));
        let unlimited = Limits::default()
            .limit_run(RunSpec::default())
            .expect("unlimited");
        assert_eq!(unlimited.timeout, None);
        assert_eq!(unlimited.max_runs_in_flight, None);
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
