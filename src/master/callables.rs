//! Callables (MakeCallable / RunCallable / ReleaseCallable), emulated with ordinary runs:
//! a callable is its CallableOptions' feeds, fetches and targets, kept per session, and
//! RunCallable is one step with those names and the feeds' values in order. Graph-mode Keras
//! (`tf_keras`) uses them through the private `_make_callable_from_options` API.

use std::collections::HashMap;
use std::time::Duration;

use tonic::Status;

use super::convert::CallableSpec;
use crate::proto::tensorflow::TensorProto;
use crate::session::RunSpec;

/// Callables one session may hold at once; a client that never releases its callables gets
/// RESOURCE_EXHAUSTED instead of growing the daemon's memory.
pub const MAX_CALLABLES_PER_SESSION: usize = 10_000;

/// One session's callables by handle.
#[derive(Debug, Default)]
pub struct Callables {
    next_handle: i64,
    specs: HashMap<i64, CallableSpec>,
}

impl Callables {
    pub fn make(&mut self, spec: CallableSpec) -> Result<i64, Status> {
        if self.specs.len() >= MAX_CALLABLES_PER_SESSION {
            return Err(Status::resource_exhausted(format!(
                "this session already holds {MAX_CALLABLES_PER_SESSION} callables; release \
                 some with ReleaseCallable"
            )));
        }
        let handle = self.next_handle;
        self.next_handle += 1;
        self.specs.insert(handle, spec);
        Ok(handle)
    }

    pub fn get(&self, handle: i64) -> Result<&CallableSpec, Status> {
        self.specs.get(&handle).ok_or_else(|| unknown(handle))
    }

    pub fn release(&mut self, handle: i64) -> Result<(), Status> {
        self.specs
            .remove(&handle)
            .map(drop)
            .ok_or_else(|| unknown(handle))
    }
}

fn unknown(handle: i64) -> Status {
    Status::invalid_argument(format!(
        "no callable with handle {handle} in this session (released, or never made)"
    ))
}

/// The step that runs `spec` with `feeds`, one per `spec.feeds` in order. Without a timeout
/// of its own the callable gets the session's `operation_timeout`.
pub fn run_spec(
    spec: &CallableSpec,
    feeds: Vec<TensorProto>,
    operation_timeout: Option<Duration>,
) -> Result<RunSpec, Status> {
    if feeds.len() != spec.feeds.len() {
        return Err(Status::invalid_argument(format!(
            "the callable takes {} feeds ({}), the request has {}",
            spec.feeds.len(),
            spec.feeds.join(", "),
            feeds.len()
        )));
    }
    Ok(RunSpec {
        feeds: spec.feeds.iter().cloned().zip(feeds).collect(),
        fetches: spec.fetches.clone(),
        targets: spec.targets.clone(),
        timeout: spec
            .timeout
            .or(operation_timeout)
            .map(super::convert::ahead_of_client),
        max_runs_in_flight: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CallableSpec {
        CallableSpec {
            feeds: vec!["x:0".into()],
            fetches: vec!["y:0".into()],
            targets: vec!["train".into()],
            timeout: None,
        }
    }

    #[test]
    fn callables_are_made_run_and_released() {
        let mut callables = Callables::default();
        let first = callables.make(spec()).expect("make");
        let second = callables.make(spec()).expect("make");
        assert_ne!(first, second);
        let run = run_spec(
            callables.get(first).expect("get"),
            vec![TensorProto::default()],
            Some(Duration::from_secs(1)),
        )
        .expect("run spec");
        assert_eq!(run.feeds[0].0, "x:0");
        assert_eq!(run.targets, ["train"]);
        // The session's operation timeout, stopped ahead of the client's own deadline.
        assert_eq!(run.timeout, Some(Duration::from_millis(500)));
        callables.release(first).expect("release");
        assert_eq!(
            callables.get(first).expect_err("released").code(),
            tonic::Code::InvalidArgument
        );
        assert!(callables.release(first).is_err());
    }

    #[test]
    fn feeds_must_match_the_callable() {
        let status = run_spec(&spec(), Vec::new(), None).expect_err("missing feed");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("x:0"), "{}", status.message());
    }
}
