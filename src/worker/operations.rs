//! The worker contract, typed: one method per operation a worker performs, each returning
//! domain results and domain errors. This is the only place in the supervisor that builds
//! worker requests and reads worker answers; `session/` calls `worker.reset_graph()`, never
//! assembles a wire message.
//!
//! Two runtimes implement the contract (`Runtime`): `tfsd-worker` hosts a TensorFlow graph,
//! the Python worker (`python/tfsd_worker/`) runs Python code. Both speak the same frames;
//! an operation a runtime does not implement answers UNIMPLEMENTED, and the domain checks the
//! runtime before it asks. What every runtime must honour is in docs/ARCHITECTURE.md.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{WorkerError, WorkerProcess};
use crate::error::{Error, Result, TfCode};
use crate::proto::tensorflow::TensorProto;
use crate::proto::tfsd::worker::v1 as wire;
use wire::{worker_request::Kind, worker_response::Result as Reply};

/// What runs in a worker process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    /// `tfsd-worker`: one TensorFlow graph and session (load, extend, run, partial runs).
    Graph,
    /// A Python interpreter that has already imported TensorFlow and Keras: calls.
    Python,
}

impl Runtime {
    /// The name used in logs, metric labels and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Graph => "graph",
            Runtime::Python => "python",
        }
    }
}

/// As in a sentence: "a graph session", "a Python session".
impl std::fmt::Display for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Runtime::Graph => "graph",
            Runtime::Python => "Python",
        })
    }
}

/// One step's inputs, as the worker takes them.
#[derive(Debug, Clone, Default)]
pub struct StepRequest {
    pub feeds: Vec<(String, TensorProto)>,
    pub fetches: Vec<String>,
    pub targets: Vec<String>,
    /// TensorFlow cancels the step after this long.
    pub timeout: Option<Duration>,
}

/// What a session carries to a fresh worker on a preserving recycle, and what a durable
/// session checkpoints. Opaque to the domain: it is passed from one worker's
/// `export_state` to another's `import_state` (and to the store) unchanged.
#[derive(Debug, Clone)]
pub enum CarriedState {
    /// A graph session's initialised variables.
    Variables(Vec<wire::NamedTensor>),
    /// A Python session's `tfsd_worker.state` namespace, serialized by the worker.
    Python { state: Vec<u8>, objects: u32 },
}

impl CarriedState {
    /// Variables or namespace entries carried.
    pub fn object_count(&self) -> u32 {
        match self {
            CarriedState::Variables(variables) => variables.len() as u32,
            CarriedState::Python { objects, .. } => *objects,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.object_count() == 0
    }

    /// The variables, for a checkpoint file; `None` for state that is not made of variables.
    pub fn variables(&self) -> Option<&[wire::NamedTensor]> {
        match self {
            CarriedState::Variables(variables) => Some(variables),
            CarriedState::Python { .. } => None,
        }
    }
}

/// What a Python call runs.
#[derive(Debug, Clone)]
pub enum CallTarget {
    /// `cloudpickle.dumps((function, args, kwargs))`.
    Pickled(Bytes),
    /// A script run as `__main__`.
    Script {
        path: String,
        source: Bytes,
        argv: Vec<String>,
    },
}

/// Which stream a call wrote to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// A piece of a call's output, in the order the code wrote it.
#[derive(Debug, Clone)]
pub struct CallOutput {
    pub stream: OutputStream,
    pub data: Bytes,
}

/// How a call ended, when the worker answered.
#[derive(Debug, Clone)]
pub enum CallOutcome {
    /// A callable's return value, cloudpickled.
    Returned(Bytes),
    /// A script's exit status.
    Exited(i32),
    /// The user's code raised.
    Raised(RemoteException),
}

/// An exception raised by the user's code in a Python worker.
#[derive(Debug, Clone)]
pub struct RemoteException {
    pub type_name: String,
    pub message: String,
    pub traceback: String,
}

impl WorkerProcess {
    /// Imports a GraphDef into an empty graph and opens a TensorFlow session with `config`.
    pub async fn load(&self, graph_def: &[u8], config: &[u8]) -> Result<()> {
        let load = Kind::Load(wire::Load {
            graph_def: graph_def.to_vec(),
            config: config.to_vec(),
        });
        self.expect_done(load).await
    }

    /// Adds nodes to the graph.
    pub async fn extend(&self, graph_def: &[u8]) -> Result<()> {
        let extend = Kind::Extend(wire::Extend {
            graph_def: graph_def.to_vec(),
        });
        self.expect_done(extend).await
    }

    /// Runs one step; one output per fetch.
    pub async fn run(&self, step: StepRequest) -> Result<Vec<TensorProto>> {
        let run = Kind::Run(wire::Run {
            feeds: step.feeds.into_iter().collect(),
            fetches: step.fetches,
            targets: step.targets,
            timeout_ms: step
                .timeout
                .map_or(0, |timeout| timeout.as_millis().max(1) as u64),
        });
        match self.call(run).await {
            Ok(Reply::Run(result)) => Ok(result.outputs),
            other => Err(self.unexpected(other)),
        }
    }

    /// Sets a partial run up; answers TensorFlow's handle.
    pub async fn partial_run_setup(
        &self,
        feeds: Vec<String>,
        fetches: Vec<String>,
        targets: Vec<String>,
    ) -> Result<String> {
        let setup = Kind::PartialRunSetup(wire::PartialRunSetup {
            feeds,
            fetches,
            targets,
        });
        match self.call(setup).await {
            Ok(Reply::PartialRunHandle(reply)) => Ok(reply.handle),
            other => Err(self.unexpected(other)),
        }
    }

    /// Feeds and fetches part of a partial run.
    pub async fn partial_run(
        &self,
        handle: String,
        feeds: Vec<(String, TensorProto)>,
        fetches: Vec<String>,
    ) -> Result<Vec<TensorProto>> {
        let run = Kind::PartialRun(wire::PartialRun {
            handle,
            feeds: feeds.into_iter().collect(),
            fetches,
        });
        match self.call(run).await {
            Ok(Reply::Run(result)) => Ok(result.outputs),
            other => Err(self.unexpected(other)),
        }
    }

    /// The rlimit backstop set by the worker on itself (`SetDataLimit`), for a worker the
    /// supervisor may not prlimit: RLIMIT_DATA for `hard_limit`, computed from what it has
    /// mapped now (`limiter::data_rlimit_for`).
    pub async fn set_own_data_limit(&self, hard_limit: Option<u64>) -> Result<()> {
        let bytes = super::limiter::data_rlimit_for(self.pid(), hard_limit)
            .map_err(|error| Error::Protocol(format!("read worker pid {}: {error}", self.pid())))?;
        self.expect_done(Kind::SetDataLimit(wire::SetDataLimit { bytes }))
            .await
    }

    /// Graph: an empty graph and a new TensorFlow session. Python: Keras' and TensorFlow's
    /// global state cleared and garbage collected; the session's namespace is kept.
    pub async fn reset_graph(&self) -> Result<()> {
        self.expect_done(Kind::ResetGraph(wire::ResetGraph {}))
            .await
    }

    /// Graph: the same graph in a new TensorFlow session, every variable uninitialised.
    /// Python: the session's namespace emptied, then what `reset_graph` does.
    pub async fn purge_variables(&self) -> Result<()> {
        self.expect_done(Kind::PurgeVariables(wire::PurgeVariables {}))
            .await
    }

    /// The state a fresh worker needs to carry on where this one is.
    pub async fn export_state(&self) -> Result<CarriedState> {
        match self.runtime() {
            Runtime::Graph => match self
                .call(Kind::ExportVariables(wire::ExportVariables {}))
                .await
            {
                Ok(Reply::Variables(variables)) => Ok(CarriedState::Variables(variables.variables)),
                other => Err(self.unexpected(other)),
            },
            Runtime::Python => match self.call(Kind::ExportState(wire::ExportState {})).await {
                Ok(Reply::State(state)) => Ok(CarriedState::Python {
                    state: state.state,
                    objects: state.objects,
                }),
                other => Err(self.unexpected(other)),
            },
        }
    }

    /// Takes over state another worker of the same runtime exported.
    pub async fn import_state(&self, state: CarriedState) -> Result<()> {
        let request = match (self.runtime(), state) {
            (Runtime::Graph, CarriedState::Variables(variables)) => {
                Kind::ImportVariables(wire::ImportVariables { variables })
            }
            (Runtime::Python, CarriedState::Python { state, .. }) => {
                Kind::ImportState(wire::ImportState { state })
            }
            (runtime, _) => {
                return Err(Error::Protocol(format!(
                    "state exported by another runtime cannot be imported into a {runtime} worker"
                )));
            }
        };
        self.expect_done(request).await
    }

    /// Starts a Python call; its output goes to `output` as the code writes it. The call's id
    /// (for `cancel`) is sent on `started` as soon as the request is on its way.
    pub async fn call_python(
        &self,
        target: CallTarget,
        output: mpsc::Sender<CallOutput>,
        started: tokio::sync::oneshot::Sender<u64>,
    ) -> Result<CallOutcome> {
        let call = Kind::Call(wire::Call {
            target: Some(match target {
                CallTarget::Pickled(pickled) => wire::call::Target::Pickled(pickled.to_vec()),
                CallTarget::Script { path, source, argv } => {
                    wire::call::Target::Script(wire::Script {
                        path,
                        source: source.to_vec(),
                        argv,
                    })
                }
            }),
        });
        let (frames, mut frames_rx) = mpsc::channel(64);
        let forward = async move {
            while let Some(frame) = frames_rx.recv().await {
                let wire::CallOutput { stream, data } = frame;
                let stream = if stream == 2 {
                    OutputStream::Stderr
                } else {
                    OutputStream::Stdout
                };
                // A caller that stopped listening does not stop the call: its output is
                // dropped, the call is cancelled by whoever dropped the receiver.
                let _ = output
                    .send(CallOutput {
                        stream,
                        data: Bytes::from(data),
                    })
                    .await;
            }
        };
        let (reply, ()) = tokio::join!(
            self.call_streaming(call, Some(frames), Some(started)),
            forward
        );
        match reply {
            Ok(Reply::CallReturn(wire::CallReturn {
                outcome: Some(outcome),
            })) => Ok(match outcome {
                wire::call_return::Outcome::Pickled(value) => {
                    CallOutcome::Returned(Bytes::from(value))
                }
                wire::call_return::Outcome::ExitCode(code) => CallOutcome::Exited(code),
                wire::call_return::Outcome::Exception(exception) => {
                    CallOutcome::Raised(RemoteException {
                        type_name: exception.type_name,
                        message: exception.message,
                        traceback: exception.traceback,
                    })
                }
            }),
            other => Err(self.unexpected(other)),
        }
    }

    /// Asks a Python worker to interrupt the call with id `call_id`.
    pub async fn cancel(&self, call_id: u64) -> Result<()> {
        self.expect_done(Kind::Cancel(wire::Cancel { call_id }))
            .await
    }

    async fn expect_done(&self, request: Kind) -> Result<()> {
        match self.call(request).await {
            Ok(Reply::Done(_)) => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }

    /// Turns any answer but the expected one into the domain error.
    fn unexpected(&self, reply: Result<Reply, WorkerError>) -> Error {
        match reply {
            Ok(Reply::Error(error)) => Error::Tensorflow {
                code: TfCode(error.code),
                message: error.message,
            },
            Ok(other) => Error::Protocol(format!(
                "worker pid {} sent an unexpected answer: {}",
                self.pid(),
                reply_name(&other)
            )),
            Err(WorkerError::Died { pid, how }) => Error::WorkerDied {
                pid,
                how: how.to_string(),
                memory_limit: how.memory_limit(),
            },
            Err(error @ WorkerError::Start { .. }) => Error::WorkerStart(error.to_string()),
            Err(WorkerError::Protocol(message)) => Error::Protocol(message),
            Err(WorkerError::Busy(message)) => Error::ResourceExhausted(message),
            Err(WorkerError::StartWait(message)) => Error::Unavailable(message),
        }
    }
}

fn reply_name(reply: &Reply) -> &'static str {
    match reply {
        Reply::Error(_) => "error",
        Reply::Done(_) => "done",
        Reply::Run(_) => "run result",
        Reply::Variables(_) => "variables",
        Reply::Ready(_) => "ready",
        Reply::PartialRunHandle(_) => "partial run handle",
        Reply::Output(_) => "call output",
        Reply::CallReturn(_) => "call return",
        Reply::State(_) => "state",
    }
}
