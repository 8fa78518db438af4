//! Operator maxima on what clients may ask of the daemon: sessions in total and per
//! principal, message and GraphDef sizes, tensor elements and decoded bytes per feed,
//! concurrent runs per session, and a ceiling on run timeouts. Going past one is a clear
//! RESOURCE_EXHAUSTED (counts, and an answer too big to send) or INVALID_ARGUMENT (sizes of
//! what a client sent) that names the limit. Besides the operator's limits, fixed bounds on
//! ids, names, labels and script arguments (`input.rs`).
//!
//! The checks live here, as domain errors, for every API to apply alike: tfsd.v1 (`grpc/`)
//! and TensorFlow's MasterService (`master/`). An API decides only who the principal is;
//! its tonic server enforces the message size on what arrives.

mod input;

use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::error::{Error, quoted};
use crate::proto::tensorflow::TensorProto;
use crate::session::RunSpec;
use crate::tensor;
use crate::units::parse_bytes;

pub use input::{
    MAX_ID_BYTES, MAX_LABEL_KEY_BYTES, MAX_LABEL_VALUE_BYTES, MAX_LABELS, MAX_LABELS_BYTES,
    MAX_NAME_BYTES, MAX_NAMES, MAX_SCRIPT_ARG_BYTES, MAX_SCRIPT_ARGS, MAX_SCRIPT_ARGS_BYTES,
    MAX_SCRIPT_PATH_BYTES, RESERVED_LABEL_PREFIX, check_client_labels, check_id, check_labels,
    check_name, check_names, check_script, is_reserved,
};

/// What one feed may decode to by default (`limits.max_feed_size`). A feed can declare far
/// more than it carries: TensorFlow repeats the last value to fill the shape, so a 66-byte
/// Run declaring `[1 << 28]` floats made a worker allocate 2 GiB (the decoded buffer and
/// TensorFlow's tensor). 512 MiB is three times a large image batch
/// (256 × 224 × 224 × 3 float32, 147 MiB) and costs a worker about 1 GiB at most.
pub const DEFAULT_MAX_FEED_BYTES: u64 = 512 << 20;

/// What the daemon itself may hold at once of large answers from workers, by default
/// (`limits.max_buffered_size`, `worker::budget`): from reading them until their client's
/// response is encoded. Three concurrent 381 MiB fetches took an unbounded daemon from 2 MiB
/// to 1.2 GiB; 1 GiB lets two such fetches through at once and holds the rest back (their
/// workers wait on a full socket), and a single larger answer still goes, alone.
pub const DEFAULT_MAX_BUFFERED_BYTES: u64 = 1 << 30;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    max_sessions: Option<usize>,
    max_sessions_per_principal: Option<usize>,
    max_message_size: Option<String>,
    max_graph_def_size: Option<String>,
    max_feed_elements: Option<u64>,
    max_feed_size: Option<String>,
    max_buffered_size: Option<String>,
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
    /// Bytes one feed may decode to (`tensor::decoded_size`); on by default
    /// (`DEFAULT_MAX_FEED_BYTES`), off only when the config says "off".
    pub max_feed_bytes: Option<u64>,
    /// Bytes of tensors in transit the daemon holds at once (`worker::budget`); on by
    /// default (`DEFAULT_MAX_BUFFERED_BYTES`), off only when the config says "off".
    pub max_buffered_bytes: Option<u64>,
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
            max_feed_bytes: Some(DEFAULT_MAX_FEED_BYTES),
            max_buffered_bytes: Some(DEFAULT_MAX_BUFFERED_BYTES),
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
        let max_feed_bytes = match raw.max_feed_size.as_deref() {
            None | Some("") => Some(DEFAULT_MAX_FEED_BYTES),
            Some("off") => None,
            Some(text) => Some(parse_bytes(text).with_context(|| {
                format!("limits.max_feed_size = {text:?} (a size like \"1GiB\", or \"off\")")
            })?),
        };
        let max_buffered_bytes = match raw.max_buffered_size.as_deref() {
            None | Some("") => Some(DEFAULT_MAX_BUFFERED_BYTES),
            Some("off") => None,
            Some(text) => {
                let bytes = parse_bytes(text).with_context(|| {
                    format!(
                        "limits.max_buffered_size = {text:?} (a size like \"1GiB\", or \"off\")"
                    )
                })?;
                if bytes < 1 << 20 {
                    bail!(
                        "limits.max_buffered_size = {text:?} is less than 1 MiB: every large \
                         tensor would wait for the whole budget; use \"off\" for no bound"
                    );
                }
                Some(bytes)
            }
        };
        Ok(Limits {
            max_sessions: raw.max_sessions,
            max_sessions_per_principal: raw.max_sessions_per_principal,
            max_message_bytes,
            max_graph_def_bytes: size("max_graph_def_size", raw.max_graph_def_size)?,
            max_feed_elements: raw.max_feed_elements,
            max_feed_bytes,
            max_buffered_bytes,
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
    /// (as messages name it), creates and closes in progress included. Called by
    /// `SessionManager::admit` under its lock, which reserves the slot when this passes, so
    /// concurrent creates cannot overshoot.
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

    /// Each feed before a worker sees it: its name (`check_names`), limits.max_feed_elements
    /// by its declared shape, and limits.max_feed_size by what it decodes to (which validates
    /// the tensor: a malformed one is an INVALID_ARGUMENT naming the feed).
    pub fn check_feeds<'a>(
        &self,
        feeds: impl ExactSizeIterator<Item = (&'a str, &'a TensorProto)> + Clone,
    ) -> Result<(), Error> {
        check_names("feeds", feeds.clone().map(|(name, _)| name))?;
        for (name, tensor) in feeds {
            if let Some(max) = self.max_feed_elements {
                let elements = element_count(tensor);
                if elements > max {
                    return Err(Error::InvalidArgument(format!(
                        "feed {} has {elements} elements; limits.max_feed_elements is {max}",
                        quoted(name)
                    )));
                }
            }
            if let Some(max) = self.max_feed_bytes {
                let bytes = tensor::decoded_size(tensor).map_err(|error| {
                    Error::InvalidArgument(format!("feed {}: {error}", quoted(name)))
                })?;
                if bytes > max {
                    return Err(Error::InvalidArgument(format!(
                        "feed {} decodes to {bytes} bytes (its shape, filled); \
                         limits.max_feed_size is {max} bytes: send less in one step, or raise \
                         the limit",
                        quoted(name)
                    )));
                }
            }
        }
        Ok(())
    }

    /// A step within the limits: its names and feeds checked, its timeout capped (or set),
    /// and its runs in flight bounded (limits.max_concurrent_runs_per_session, which the
    /// session manager enforces).
    pub fn limit_run(&self, spec: RunSpec) -> Result<RunSpec, Error> {
        self.check_feeds(
            spec.feeds
                .iter()
                .map(|(name, tensor)| (name.as_str(), tensor)),
        )?;
        check_names("fetches", spec.fetches.iter().map(String::as_str))?;
        check_names("targets", spec.targets.iter().map(String::as_str))?;
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
             max_feed_size = \"64MiB\"\n\
             max_concurrent_runs_per_session = 4\nmax_run_timeout = \"10m\"\n",
        )
        .expect("valid");
        assert_eq!(limits.max_sessions, Some(10));
        assert_eq!(limits.max_sessions_per_principal, Some(3));
        assert_eq!(limits.max_message_bytes, 64 << 20);
        assert_eq!(limits.max_graph_def_bytes, Some(8 << 20));
        assert_eq!(limits.max_feed_elements, Some(1000));
        assert_eq!(limits.max_feed_bytes, Some(64 << 20));
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

        let mut tensor = TensorProto {
            dtype: 1,
            ..TensorProto::default()
        };
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
        assert!(limits.check_feeds([("x", &tensor)].into_iter()).is_ok());
        let too_many = Limits {
            max_feed_elements: Some(5),
            ..Limits::default()
        };
        let error = too_many
            .check_feeds([("x", &tensor)].into_iter())
            .expect_err("six elements");
        assert!(matches!(&error, Error::InvalidArgument(message)
            if message.contains("\"x\"") && message.contains("limits.max_feed_elements")));
        assert!(
            Limits::default()
                .check_feeds([("x", &tensor)].into_iter())
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
    fn feeds_are_capped_by_what_they_decode_to_by_default() {
        // 66 bytes on the wire, 1 GiB decoded: refused before any worker sees it.
        let mut broadcast = TensorProto {
            dtype: 1,
            float_val: vec![1.0],
            ..TensorProto::default()
        };
        broadcast.tensor_shape = Some(crate::proto::tensorflow::TensorShapeProto {
            dim: vec![crate::proto::tensorflow::tensor_shape_proto::Dim {
                size: 1 << 28,
                ..Default::default()
            }],
            ..Default::default()
        });
        let error = Limits::default()
            .check_feeds([("x", &broadcast)].into_iter())
            .expect_err("1 GiB");
        assert!(
            matches!(&error, Error::InvalidArgument(message)
            if message.starts_with("feed \"x\" decodes to 1073741824 bytes")
                && message.contains("limits.max_feed_size")),
            "{error}"
        );
        let off = limits("max_feed_size = \"off\"").expect("off");
        assert_eq!(off.max_feed_bytes, None);
        assert!(off.check_feeds([("x", &broadcast)].into_iter()).is_ok());
        assert_eq!(
            limits("").expect("defaults").max_feed_bytes,
            Some(DEFAULT_MAX_FEED_BYTES)
        );
        // A malformed feed is named whatever limit finds it.
        let mut malformed = broadcast.clone();
        malformed.dtype = 1000;
        let error = Limits::default()
            .check_feeds([("x", &malformed)].into_iter())
            .expect_err("malformed");
        assert!(
            error.to_string().starts_with("feed \"x\": dtype 1000"),
            "{error}"
        );
    }

    #[test]
    fn runs_name_at_most_so_many_tensors_of_bounded_names() {
        let long = "y".repeat(MAX_NAME_BYTES + 1);
        let error = Limits::default()
            .limit_run(RunSpec {
                fetches: vec![long.clone()],
                ..RunSpec::default()
            })
            .expect_err("long fetch");
        assert!(
            error.to_string().starts_with("fetches: the name \"yyy"),
            "{error}"
        );
        let error = Limits::default()
            .limit_run(RunSpec {
                feeds: vec![(long, TensorProto::default())],
                ..RunSpec::default()
            })
            .expect_err("long feed name");
        assert!(error.to_string().starts_with("feeds: "), "{error}");
        let error = Limits::default()
            .limit_run(RunSpec {
                targets: vec![String::new(); MAX_NAMES + 1],
                ..RunSpec::default()
            })
            .expect_err("many targets");
        assert!(
            error.to_string().starts_with("targets has 10001 names"),
            "{error}"
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let error = limits("max_message_size = \"big\"").expect_err("bad size");
        assert!(format!("{error:#}").contains("limits.max_message_size"));
        let error = limits("max_run_timeout = \"forever\"").expect_err("bad duration");
        assert!(format!("{error:#}").contains("limits.max_run_timeout"));
        let error = limits("max_feed_size = \"lots\"").expect_err("bad size");
        assert!(format!("{error:#}").contains("limits.max_feed_size"));
        let error = limits("max_sesions = 3").expect_err("typo");
        assert!(format!("{error:#}").contains("max_sesions"));
    }
}
