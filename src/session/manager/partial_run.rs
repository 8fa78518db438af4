//! Partial runs (`tf.compat.v1.Session.partial_run`): one TensorFlow step whose feeds arrive
//! and whose fetches leave over several calls, all in the session's current worker.
//!
//! A partial run lives in one TensorFlow session in one process, so its handle names the
//! worker: after a recycle, a purge or a restore the step is gone, and continuing it answers
//! a clear error instead of reaching a different process.

use std::time::Instant;

use super::{InFlight, Runtime, SessionManager, usable_worker};
use crate::error::{Error, Result};
use crate::proto::tensorflow::TensorProto;
use crate::tensor;

/// What a partial run needs up front: every feed and fetch it will use, and its targets.
#[derive(Debug, Clone, Default)]
pub struct PartialRunSpec {
    pub feeds: Vec<String>,
    pub fetches: Vec<String>,
    pub targets: Vec<String>,
}

impl SessionManager {
    /// Sets a partial run up; answers its handle ("WORKER_PID/TENSORFLOW_HANDLE").
    pub async fn partial_run_setup(&self, id: &str, spec: PartialRunSpec) -> Result<String> {
        let session = self.get(id)?;
        session.expect_runtime(Runtime::Graph, "a partial run")?;
        let core = session.core.read().await;
        let worker = usable_worker(&session, &core)?;
        let setup = worker.partial_run_setup(spec.feeds, spec.fetches, spec.targets);
        let handle = self
            .within(&session, &worker, "PartialRunSetup", setup)
            .await?;
        Ok(format!("{}/{handle}", worker.pid()))
    }

    /// Feeds some inputs of a partial run and fetches some of its outputs. Each call is a
    /// run in flight on the session, refused past `max_runs_in_flight` like a step.
    pub async fn partial_run(
        &self,
        id: &str,
        handle: &str,
        feeds: Vec<(String, TensorProto)>,
        fetches: Vec<String>,
        max_runs_in_flight: Option<u32>,
    ) -> Result<Vec<TensorProto>> {
        for (name, tensor) in &feeds {
            tensor::validate(tensor)
                .map_err(|error| Error::InvalidArgument(format!("feed {name:?}: {error}")))?;
        }
        let session = self.get(id)?;
        session.expect_runtime(Runtime::Graph, "a partial run")?;
        let core = session.core.read().await;
        let worker = usable_worker(&session, &core)?;
        let (pid, tensorflow_handle) = handle
            .split_once('/')
            .and_then(|(pid, rest)| Some((pid.parse::<u32>().ok()?, rest)))
            .ok_or_else(|| {
                Error::InvalidArgument(format!("{handle:?} is not a partial run handle"))
            })?;
        if pid != worker.pid() {
            return Err(Error::InvalidArgument(format!(
                "partial run {handle:?} was set up in worker pid {pid}, which session {id} has \
                 since left (recycled or restored); set the partial run up again"
            )));
        }
        let started = Instant::now();
        let in_flight = InFlight::enter(&session, max_runs_in_flight)?;
        let result = worker
            .partial_run(tensorflow_handle.to_string(), feeds, fetches)
            .await;
        drop(in_flight);
        drop(core);
        session.touch(|stats| stats.run_count += 1);
        self.metrics.record_run(started.elapsed(), result.is_ok());
        result
    }
}
