//! Conversions between MasterService messages and the domain, in one place: the few fields
//! tfsd reads out of TensorFlow's `ConfigProto`, `RunOptions` and `CallableOptions` (which
//! travel as bytes), named tensors, and the device list.

use std::time::Duration;

use prost::Message;
use tonic::Status;

use super::credentials::{self, Token};
use super::sessions::NAME_LABEL;
use crate::error::quoted;
use crate::limits;
use crate::proto::tensorflow::{DeviceAttributes, DeviceLocality, NamedTensorProto, TensorProto};

/// The one device every worker has: TensorFlow's DirectSession names its CPU this way.
pub const CPU_DEVICE: &str = "/job:localhost/replica:0/task:0/device:CPU:0";
/// What TensorFlow reports as a CPU device's memory limit (a fixed 256 MiB, not a limit).
const CPU_MEMORY_LIMIT: i64 = 256 << 20;

/// `ConfigProto.experimental` (field 16) and its `session_metadata` (field 11).
const CONFIG_EXPERIMENTAL: u32 = 16;
const EXPERIMENTAL_SESSION_METADATA: u32 = 11;

/// The fields of `tensorflow.ConfigProto` tfsd reads.
#[derive(Clone, PartialEq, Message)]
struct ConfigView {
    #[prost(int64, tag = "11")]
    operation_timeout_in_ms: i64,
    #[prost(message, optional, tag = "16")]
    experimental: Option<ExperimentalView>,
}

#[derive(Clone, PartialEq, Message)]
struct ExperimentalView {
    #[prost(message, optional, tag = "11")]
    session_metadata: Option<SessionMetadataView>,
}

#[derive(Clone, PartialEq, Message)]
struct SessionMetadataView {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(int64, tag = "2")]
    version: i64,
}

/// The fields of `tensorflow.RunOptions` tfsd reads.
#[derive(Clone, PartialEq, Message)]
struct RunOptionsView {
    #[prost(int64, tag = "2")]
    timeout_in_ms: i64,
}

/// The fields of `tensorflow.CallableOptions` tfsd reads.
#[derive(Clone, PartialEq, Message)]
struct CallableOptionsView {
    #[prost(string, repeated, tag = "1")]
    feed: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    fetch: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    target: Vec<String>,
    #[prost(bytes = "vec", tag = "4")]
    run_options: Vec<u8>,
    #[prost(bytes = "vec", repeated, tag = "5")]
    tensor_connection: Vec<Vec<u8>>,
}

/// What a client's ConfigProto asks of tfsd.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionConfig {
    /// `operation_timeout_in_ms`: the default step timeout.
    pub operation_timeout: Option<Duration>,
    /// `experimental.session_metadata.name`: how the client names its session.
    pub name: Option<String>,
    /// The token on the name field's second line (`credentials.rs`), if any.
    pub token: Option<Token>,
    /// The ConfigProto for the worker, without `session_metadata` (TensorFlow refuses two
    /// sessions with the same metadata in one process, and a purge opens the new session
    /// before it closes the old one; and it may hold a token, which goes no further).
    pub worker_config: Vec<u8>,
}

pub fn session_config(config: &[u8]) -> Result<SessionConfig, Status> {
    let view = ConfigView::decode(config).map_err(|error| {
        Status::invalid_argument(format!("config is not a ConfigProto: {error}"))
    })?;
    let metadata = view
        .experimental
        .and_then(|experimental| experimental.session_metadata);
    let has_metadata = metadata.is_some();
    let (name, token) = match &metadata {
        None => (None, None),
        Some(metadata) => {
            let (name, token) = credentials::split_name(&metadata.name)?;
            let name = match metadata.version {
                0 => name.to_string(),
                version => format!("{name}/{version}"),
            };
            (Some(name).filter(|name| !name.is_empty()), token)
        }
    };
    if let Some(name) = &name {
        // It becomes the session's `tfsd.master.name` label, within the labels' bounds.
        crate::limits::check_labels([(&NAME_LABEL.to_string(), name)]).map_err(|error| {
            Status::invalid_argument(format!(
                "config.experimental.session_metadata.name: {error}"
            ))
        })?;
    }
    let worker_config = if has_metadata {
        strip_session_metadata(config).map_err(|error| {
            Status::invalid_argument(format!("config is not a ConfigProto: {error}"))
        })?
    } else {
        config.to_vec()
    };
    Ok(SessionConfig {
        operation_timeout: millis(view.operation_timeout_in_ms),
        name,
        token,
        worker_config,
    })
}

/// `RunOptions.timeout_in_ms`, if set (zero and negative mean none, as in TensorFlow).
pub fn run_timeout(options: &[u8]) -> Result<Option<Duration>, Status> {
    let view = RunOptionsView::decode(options).map_err(|error| {
        Status::invalid_argument(format!("options is not a RunOptions: {error}"))
    })?;
    Ok(millis(view.timeout_in_ms))
}

/// Longest margin a MasterService step's timeout is shortened by (see `ahead_of_client`).
const CLIENT_DEADLINE_MARGIN: Duration = Duration::from_secs(1);

/// The timeout a MasterService step runs with, given the one the TensorFlow client asked
/// for. TensorFlow's client makes a step's timeout (RunOptions' `timeout_in_ms`, or the
/// ConfigProto's `operation_timeout_in_ms`) its own gRPC deadline for the call as well. A
/// step stopped exactly at that timeout races the client's deadline, and on a loaded machine
/// the client wins and raises CancelledError ("Timeout expired") instead of the
/// DeadlineExceededError the step really ended with. So the step stops a margin earlier:
/// half its timeout, at most one second. The client gives up at its timeout either way.
pub fn ahead_of_client(timeout: Duration) -> Duration {
    timeout - (timeout / 2).min(CLIENT_DEADLINE_MARGIN)
}

fn millis(value: i64) -> Option<Duration> {
    (value > 0).then(|| Duration::from_millis(value as u64))
}

/// A callable as MakeCallable describes it: an ordinary step with fixed feeds, fetches and
/// targets.
#[derive(Debug, Clone, PartialEq)]
pub struct CallableSpec {
    pub feeds: Vec<String>,
    pub fetches: Vec<String>,
    pub targets: Vec<String>,
    pub timeout: Option<Duration>,
}

pub fn callable_spec(options: &[u8]) -> Result<CallableSpec, Status> {
    let view = CallableOptionsView::decode(options).map_err(|error| {
        Status::invalid_argument(format!("options is not a CallableOptions: {error}"))
    })?;
    for (field, names) in [
        ("options.feed", &view.feed),
        ("options.fetch", &view.fetch),
        ("options.target", &view.target),
    ] {
        limits::check_names(field, names.iter().map(String::as_str))
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
    }
    if !view.tensor_connection.is_empty() {
        return Err(Status::unimplemented(
            "CallableOptions.tensor_connection is not supported by tfsd: feed the tensor \
             instead of connecting it",
        ));
    }
    Ok(CallableSpec {
        feeds: view.feed,
        fetches: view.fetch,
        targets: view.target,
        timeout: run_timeout(&view.run_options)?,
    })
}

/// The feeds of a RunStep as (name, tensor) pairs.
pub fn feeds(named: Vec<NamedTensorProto>) -> Result<Vec<(String, TensorProto)>, Status> {
    named
        .into_iter()
        .map(|feed| match feed.tensor {
            Some(tensor) => Ok((feed.name, tensor)),
            None => Err(Status::invalid_argument(format!(
                "feed {} has no tensor",
                quoted(&feed.name)
            ))),
        })
        .collect()
}

/// Results named by the fetches they answer, as TensorFlow's client matches them.
pub fn named(fetches: &[String], outputs: Vec<TensorProto>) -> Vec<NamedTensorProto> {
    fetches
        .iter()
        .zip(outputs)
        .map(|(name, tensor)| NamedTensorProto {
            name: name.clone(),
            tensor: Some(tensor),
        })
        .collect()
}

/// The worker's CPU device. `incarnation` changes when the device does (a new worker).
pub fn cpu_device(incarnation: u64) -> DeviceAttributes {
    DeviceAttributes {
        name: CPU_DEVICE.to_string(),
        device_type: "CPU".to_string(),
        memory_limit: CPU_MEMORY_LIMIT,
        locality: Some(DeviceLocality::default()),
        incarnation,
        physical_device_desc: String::new(),
    }
}

/// A non-zero incarnation number derived from what identifies a device's life.
pub fn incarnation(parts: &[&str]) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    parts.hash(&mut hasher);
    hasher.finish().max(1)
}

/// A ConfigProto without `experimental.session_metadata`, every other field kept byte for
/// byte (decoding into a partial view and re-encoding would drop the fields tfsd does not
/// declare).
fn strip_session_metadata(config: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(config.len());
    for field in fields(config) {
        let field = field?;
        if field.number == CONFIG_EXPERIMENTAL && field.wire_type == WIRE_LEN {
            let mut inner = Vec::with_capacity(field.payload.len());
            for nested in fields(field.payload) {
                let nested = nested?;
                if nested.number != EXPERIMENTAL_SESSION_METADATA {
                    inner.extend_from_slice(nested.raw);
                }
            }
            prost::encoding::encode_key(
                CONFIG_EXPERIMENTAL,
                prost::encoding::WireType::LengthDelimited,
                &mut out,
            );
            prost::encoding::encode_varint(inner.len() as u64, &mut out);
            out.extend_from_slice(&inner);
        } else {
            out.extend_from_slice(field.raw);
        }
    }
    Ok(out)
}

const WIRE_VARINT: u64 = 0;
const WIRE_FIXED64: u64 = 1;
const WIRE_LEN: u64 = 2;
const WIRE_FIXED32: u64 = 5;

#[derive(Debug, thiserror::Error)]
#[error("malformed protobuf at byte {0}")]
struct WireError(usize);

/// One top-level field of a serialized message: its number, wire type, payload (for
/// length-delimited fields) and its raw bytes, key included.
struct Field<'a> {
    number: u32,
    wire_type: u64,
    payload: &'a [u8],
    raw: &'a [u8],
}

fn fields(bytes: &[u8]) -> impl Iterator<Item = Result<Field<'_>, WireError>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= bytes.len() {
            return None;
        }
        let start = at;
        let field = (|| {
            let key = varint(bytes, &mut at)?;
            let wire_type = key & 7;
            let number = u32::try_from(key >> 3).map_err(|_| WireError(start))?;
            let payload_start;
            match wire_type {
                WIRE_VARINT => {
                    varint(bytes, &mut at)?;
                    payload_start = at;
                }
                WIRE_FIXED64 | WIRE_FIXED32 => {
                    payload_start = at;
                    at += if wire_type == WIRE_FIXED64 { 8 } else { 4 };
                }
                WIRE_LEN => {
                    let length =
                        usize::try_from(varint(bytes, &mut at)?).map_err(|_| WireError(start))?;
                    payload_start = at;
                    at = at.checked_add(length).ok_or(WireError(start))?;
                }
                _ => return Err(WireError(start)),
            }
            if at > bytes.len() {
                return Err(WireError(start));
            }
            let payload = if wire_type == WIRE_LEN {
                &bytes[payload_start..at]
            } else {
                &[][..]
            };
            Ok(Field {
                number,
                wire_type,
                payload,
                raw: &bytes[start..at],
            })
        })();
        if field.is_err() {
            at = bytes.len();
        }
        Some(field)
    })
}

fn varint(bytes: &[u8], at: &mut usize) -> Result<u64, WireError> {
    let start = *at;
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at).ok_or(WireError(start))?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(WireError(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ConfigProto with inter_op_parallelism_threads (5), operation_timeout_in_ms (11) and
    /// experimental (16) holding session_metadata (11) and another field (7).
    fn config(with_metadata: bool) -> Vec<u8> {
        #[derive(Clone, PartialEq, Message)]
        struct Config {
            #[prost(int32, tag = "5")]
            inter_op_parallelism_threads: i32,
            #[prost(int64, tag = "11")]
            operation_timeout_in_ms: i64,
            #[prost(message, optional, tag = "16")]
            experimental: Option<Experimental>,
        }
        #[derive(Clone, PartialEq, Message)]
        struct Experimental {
            #[prost(string, tag = "7")]
            other: String,
            #[prost(message, optional, tag = "11")]
            session_metadata: Option<SessionMetadataView>,
        }
        Config {
            inter_op_parallelism_threads: 2,
            operation_timeout_in_ms: 1500,
            experimental: Some(Experimental {
                other: "kept".into(),
                session_metadata: with_metadata.then(|| SessionMetadataView {
                    name: "exp-1".into(),
                    version: 0,
                }),
            }),
        }
        .encode_to_vec()
    }

    #[test]
    fn steps_stop_ahead_of_the_clients_deadline() {
        assert_eq!(
            ahead_of_client(Duration::from_millis(200)),
            Duration::from_millis(100)
        );
        assert_eq!(
            ahead_of_client(Duration::from_secs(60)),
            Duration::from_secs(59)
        );
        assert_eq!(
            ahead_of_client(Duration::from_millis(1)),
            Duration::from_micros(500)
        );
    }

    #[test]
    fn session_metadata_names_the_session_and_stays_away_from_the_worker() {
        let parsed = session_config(&config(true)).expect("valid");
        assert_eq!(parsed.name.as_deref(), Some("exp-1"));
        assert_eq!(parsed.operation_timeout, Some(Duration::from_millis(1500)));
        // Everything else survives byte for byte.
        assert_eq!(parsed.worker_config, config(false));
    }

    #[test]
    fn a_token_is_split_off_the_name_and_never_reaches_the_worker() {
        #[derive(Clone, PartialEq, Message)]
        struct Config {
            #[prost(int64, tag = "11")]
            operation_timeout_in_ms: i64,
            #[prost(message, optional, tag = "16")]
            experimental: Option<ExperimentalView>,
        }
        let token = "alice-master-token-0123";
        let with = |name: &str, version: i64| {
            Config {
                operation_timeout_in_ms: 1500,
                experimental: Some(ExperimentalView {
                    session_metadata: Some(SessionMetadataView {
                        name: name.to_string(),
                        version,
                    }),
                }),
            }
            .encode_to_vec()
        };
        let parsed =
            session_config(&with(&format!("exp-1\ntfsd-token={token}"), 2)).expect("valid");
        assert_eq!(parsed.name.as_deref(), Some("exp-1/2"));
        assert!(parsed.token.is_some());
        assert!(!format!("{parsed:?}").contains(token), "{parsed:?}");
        let worker = String::from_utf8_lossy(&parsed.worker_config).into_owned();
        assert!(!worker.contains(token), "the worker never sees the token");
        assert_eq!(parsed.operation_timeout, Some(Duration::from_millis(1500)));

        // A token without a name: no name label, and the metadata still goes.
        let parsed = session_config(&with(&format!("\ntfsd-token={token}"), 0)).expect("valid");
        assert_eq!(parsed.name, None);
        assert!(parsed.token.is_some());
        assert!(!String::from_utf8_lossy(&parsed.worker_config).contains(token));
    }

    #[test]
    fn a_config_without_metadata_passes_through() {
        let parsed = session_config(&config(false)).expect("valid");
        assert_eq!(parsed.name, None);
        assert_eq!(parsed.worker_config, config(false));
        assert_eq!(
            session_config(&[]).expect("empty"),
            SessionConfig::default()
        );
    }

    #[test]
    fn malformed_configs_are_invalid_arguments() {
        let status = session_config(&[0x0a, 0x05, 0x01]).expect_err("truncated");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_session_name_is_bounded_like_a_label_value() {
        #[derive(Clone, PartialEq, Message)]
        struct Config {
            #[prost(message, optional, tag = "16")]
            experimental: Option<ExperimentalView>,
        }
        let named = |name: String| {
            Config {
                experimental: Some(ExperimentalView {
                    session_metadata: Some(SessionMetadataView { name, version: 0 }),
                }),
            }
            .encode_to_vec()
        };
        let name = "n".repeat(crate::limits::MAX_LABEL_VALUE_BYTES);
        assert_eq!(
            session_config(&named(name.clone())).expect("valid").name,
            Some(name)
        );
        let status = session_config(&named("n".repeat(5 << 20))).expect_err("too long");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status
                .message()
                .starts_with("config.experimental.session_metadata.name: label"),
            "{status:?}"
        );
        assert!(status.message().len() < 300, "{}", status.message().len());
    }

    #[test]
    fn callable_names_are_bounded() {
        let options = CallableOptionsView {
            feed: vec!["x".repeat(crate::limits::MAX_NAME_BYTES + 1)],
            fetch: vec![],
            target: vec![],
            run_options: Vec::new(),
            tensor_connection: vec![],
        };
        let status = callable_spec(&options.encode_to_vec()).expect_err("too long");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with("options.feed: "), "{status:?}");
        let status = feeds(vec![NamedTensorProto {
            name: "f".repeat(1 << 20),
            tensor: None,
        }])
        .expect_err("no tensor");
        assert!(status.message().len() < 200, "{status:?}");
    }

    #[test]
    fn callables_with_tensor_connections_are_unimplemented() {
        let options = CallableOptionsView {
            feed: vec!["x:0".into()],
            fetch: vec!["y:0".into()],
            target: vec![],
            run_options: RunOptionsView { timeout_in_ms: 20 }.encode_to_vec(),
            tensor_connection: vec![],
        };
        let spec = callable_spec(&options.encode_to_vec()).expect("valid");
        assert_eq!(spec.timeout, Some(Duration::from_millis(20)));
        assert_eq!(spec.feeds, ["x:0"]);
        let connected = CallableOptionsView {
            tensor_connection: vec![vec![0x0a, 0x01, b'a']],
            ..options
        };
        let status = callable_spec(&connected.encode_to_vec()).expect_err("unsupported");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert!(status.message().contains("tensor_connection"));
    }
}
