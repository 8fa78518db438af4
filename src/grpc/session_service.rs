//! tfsd.v1.SessionService: each handler checks who is calling (`authorize`) and the
//! operator's limits (through `limits.rs`, the checks the MasterService applies too),
//! validates, converts, calls the `SessionManager`, and converts back. No domain logic lives
//! here.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use prost::Message;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::convert;
use crate::auth::Caller;
use crate::error::Error;
use crate::limits::{self, Limits};
use crate::proto::tfsd::v1 as api;
use crate::session::{CallEvent, Cause, InPlaceReset, RunSpec, SessionManager};

#[derive(Debug)]
pub struct SessionService {
    manager: Arc<SessionManager>,
    limits: Limits,
    /// Ends event streams when the daemon shuts down, so they do not hold the drain open.
    shutdown: CancellationToken,
}

impl SessionService {
    pub fn new(manager: Arc<SessionManager>, limits: Limits, shutdown: CancellationToken) -> Self {
        SessionService {
            manager,
            limits,
            shutdown,
        }
    }
}

/// A client's memory policy, checked: a known gentle action, and a hard limit (if any) not
/// below the soft limit.
fn validate_memory_policy(
    policy: Option<api::MemoryPolicy>,
) -> Result<crate::policy::SessionPolicy, Status> {
    if let Some(policy) = &policy {
        if api::GentleAction::try_from(policy.gentle_action).is_err() {
            return Err(Status::invalid_argument(format!(
                "memory_policy.gentle_action = {} is not a GentleAction",
                policy.gentle_action
            )));
        }
        if policy.hard_limit_bytes > 0 && policy.hard_limit_bytes < policy.soft_limit_bytes {
            return Err(Status::invalid_argument(format!(
                "memory_policy.hard_limit_bytes ({}) is below soft_limit_bytes ({})",
                policy.hard_limit_bytes, policy.soft_limit_bytes
            )));
        }
        if policy.gpu_hard_limit_bytes > 0
            && policy.gpu_hard_limit_bytes < policy.gpu_soft_limit_bytes
        {
            return Err(Status::invalid_argument(format!(
                "memory_policy.gpu_hard_limit_bytes ({}) is below gpu_soft_limit_bytes ({})",
                policy.gpu_hard_limit_bytes, policy.gpu_soft_limit_bytes
            )));
        }
    }
    Ok(convert::memory_policy_from_api(policy))
}

fn required_id(id: &str) -> Result<&str, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("session_id is required"));
    }
    limits::check_id("session_id", id)?;
    Ok(id)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<api::SessionEvent, Status>> + Send>>;
type CallStream = Pin<Box<dyn Stream<Item = Result<api::CallEvent, Status>> + Send>>;

#[tonic::async_trait]
impl api::session_service_server::SessionService for SessionService {
    async fn create_session(
        &self,
        request: Request<api::CreateSessionRequest>,
    ) -> Result<Response<api::CreateSessionResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let policy = validate_memory_policy(request.memory_policy)?;
        let gpus = convert::gpu_request(request.gpus)?;
        limits::check_client_labels(&request.labels)?;
        let runtime = api::Runtime::try_from(request.runtime).map_err(|_| {
            Status::invalid_argument(format!("runtime = {} is not a Runtime", request.runtime))
        })?;
        self.limits.check_graph_def_size(request.graph_def.len())?;
        let admitted = self.admit(&caller)?;
        let snapshot = match runtime {
            api::Runtime::Unspecified | api::Runtime::Graph => {
                self.manager
                    .create_owned(
                        admitted,
                        request.durable_variables,
                        request.graph_def.into(),
                        request.config.into(),
                        request.labels.into_iter().collect(),
                        policy,
                        gpus,
                    )
                    .await?
            }
            api::Runtime::Python => {
                if !request.graph_def.is_empty() || !request.config.is_empty() {
                    return Err(Status::invalid_argument(
                        "a Python session takes no graph_def or config: its code builds what \
                         it needs",
                    ));
                }
                if request.durable_variables {
                    return Err(Status::invalid_argument(
                        "durable_variables applies to graph sessions: a Python session's state \
                         lives in its process (RecycleSession with preserve_variables carries \
                         it to a fresh one) and ends with the daemon",
                    ));
                }
                self.manager
                    .create_python_owned(
                        admitted,
                        request.labels.into_iter().collect(),
                        policy,
                        gpus,
                    )
                    .await?
            }
        };
        Ok(Response::new(api::CreateSessionResponse {
            session: Some(convert::session(snapshot)),
        }))
    }

    async fn extend_graph(
        &self,
        request: Request<api::ExtendGraphRequest>,
    ) -> Result<Response<api::ExtendGraphResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let id = self.authorize(&caller, &request.session_id)?;
        if request.graph_def.is_empty() {
            return Err(Status::invalid_argument(
                "graph_def is empty: ExtendGraph needs the new nodes",
            ));
        }
        self.limits.check_graph_def_size(request.graph_def.len())?;
        let new_graph_version = self
            .manager
            .extend(id, request.graph_def.into(), request.current_graph_version)
            .await?;
        Ok(Response::new(api::ExtendGraphResponse {
            new_graph_version,
        }))
    }

    async fn run(
        &self,
        request: Request<api::RunRequest>,
    ) -> Result<Response<api::RunResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let id = self.authorize(&caller, &request.session_id)?;
        if request.fetches.is_empty() && request.targets.is_empty() {
            return Err(Status::invalid_argument(
                "a run needs at least one fetch or target",
            ));
        }
        let requested = (request.timeout_ms > 0).then(|| Duration::from_millis(request.timeout_ms));
        let spec = self.limits.limit_run(RunSpec {
            feeds: request.feeds.into_iter().collect(),
            fetches: request.fetches,
            targets: request.targets,
            timeout: requested,
            max_runs_in_flight: None,
        })?;
        let outputs = self.manager.run(id, spec).await?;
        let answer = api::RunResponse { outputs };
        // Refused by name rather than by tonic's encoder, whose OUT_OF_RANGE says nothing of
        // the limit or of what to do.
        self.limits.check_answer_size(answer.encoded_len())?;
        Ok(Response::new(answer))
    }

    async fn reset_graph(
        &self,
        request: Request<api::ResetGraphRequest>,
    ) -> Result<Response<api::ResetResponse>, Status> {
        let caller = Caller::of(&request);
        let id = self.authorize(&caller, &request.get_ref().session_id)?;
        let outcome = self
            .manager
            .reset_in_place(id, InPlaceReset::Graph, Cause::by(caller.actor()))
            .await?;
        Ok(Response::new(convert::reset(outcome)))
    }

    async fn purge_variables(
        &self,
        request: Request<api::PurgeVariablesRequest>,
    ) -> Result<Response<api::ResetResponse>, Status> {
        let caller = Caller::of(&request);
        let id = self.authorize(&caller, &request.get_ref().session_id)?;
        let outcome = self
            .manager
            .reset_in_place(id, InPlaceReset::Variables, Cause::by(caller.actor()))
            .await?;
        Ok(Response::new(convert::reset(outcome)))
    }

    async fn recycle_session(
        &self,
        request: Request<api::RecycleSessionRequest>,
    ) -> Result<Response<api::ResetResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let id = self.authorize(&caller, &request.session_id)?;
        let outcome = self
            .manager
            .recycle(id, request.preserve_variables, Cause::by(caller.actor()))
            .await?;
        Ok(Response::new(convert::reset(outcome)))
    }

    async fn close_session(
        &self,
        request: Request<api::CloseSessionRequest>,
    ) -> Result<Response<api::CloseSessionResponse>, Status> {
        let caller = Caller::of(&request);
        let id = self.authorize(&caller, &request.get_ref().session_id)?;
        let cause = Cause {
            reason: format!("closed by {}", caller.actor()),
            ..Cause::by(caller.actor())
        };
        self.manager.close_because(id, cause).await?;
        Ok(Response::new(api::CloseSessionResponse {}))
    }

    async fn get_session(
        &self,
        request: Request<api::GetSessionRequest>,
    ) -> Result<Response<api::SessionInfo>, Status> {
        let caller = Caller::of(&request);
        let id = self.authorize(&caller, &request.get_ref().session_id)?;
        Ok(Response::new(convert::session(self.manager.session(id)?)))
    }

    async fn list_sessions(
        &self,
        request: Request<api::ListSessionsRequest>,
    ) -> Result<Response<api::ListSessionsResponse>, Status> {
        let caller = Caller::of(&request);
        let sessions = self
            .manager
            .list()
            .into_iter()
            .filter(|session| caller.may_access(&session.owner))
            .map(convert::session)
            .collect();
        Ok(Response::new(api::ListSessionsResponse { sessions }))
    }

    async fn get_daemon_status(
        &self,
        _request: Request<api::GetDaemonStatusRequest>,
    ) -> Result<Response<api::DaemonStatus>, Status> {
        Ok(Response::new(convert::daemon_status(self.manager.status())))
    }

    type CallStream = CallStream;

    async fn call(
        &self,
        request: Request<api::CallRequest>,
    ) -> Result<Response<Self::CallStream>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let id = self.authorize(&caller, &request.session_id)?;
        if let Some(api::call_request::Target::Script(script)) = &request.target {
            limits::check_script(&script.path, &script.argv)?;
        }
        let target = convert::call_target(request.target).ok_or_else(|| {
            Status::invalid_argument("a call needs `pickled` (a function) or `script`")
        })?;
        let requested = (request.timeout_ms > 0).then(|| Duration::from_millis(request.timeout_ms));
        let timeout = self.limits.run_timeout(requested);
        let mut events = self.manager.call(
            id,
            target,
            timeout,
            self.limits.max_concurrent_runs_per_session,
            request.close_session_after,
        )?;
        let started = std::time::Instant::now();
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        // Ends when the call does, or when the client goes away: dropping `events` then tells
        // the call to stop.
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    event = events.recv() => event,
                    // A client that went away during a silent call is noticed at once.
                    _ = sender.closed() => break,
                };
                let Some(event) = event else { break };
                let item = match event {
                    CallEvent::Output(output) => Ok(convert::call_output(output)),
                    CallEvent::Finished(Ok(outcome)) => {
                        Ok(convert::call_outcome(outcome, started.elapsed()))
                    }
                    CallEvent::Finished(Err(error)) => Err(Status::from(error)),
                };
                if sender.send(item).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<api::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let caller = Caller::of(&request);
        let only = request.into_inner().session_id;
        if !only.is_empty() {
            self.authorize(&caller, &only)?;
        }
        let mut events = self.manager.subscribe();
        let shutdown = self.shutdown.clone();
        let stream = async_stream(move |yield_event| async move {
            loop {
                let received = tokio::select! {
                    received = events.recv() => received,
                    _ = shutdown.cancelled() => break,
                };
                let event = match received {
                    Ok(event)
                        if (only.is_empty() || event.session_id == only)
                            && caller.may_access(&event.owner) =>
                    {
                        convert::event(event)
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(missed)) => convert::lagged(missed),
                    Err(RecvError::Closed) => break,
                };
                if yield_event.send(Ok(event)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

impl SessionService {
    /// The session id, if the caller may act on that session. Another principal's session
    /// answers exactly like a missing one: its existence is not theirs to know.
    fn authorize<'a>(&self, caller: &Caller, id: &'a str) -> Result<&'a str, Status> {
        let id = required_id(id)?;
        let owner = self.manager.owner(id)?;
        if caller.may_access(&owner) {
            Ok(id)
        } else {
            Err(Error::SessionNotFound(id.to_string()).into())
        }
    }

    /// A slot for one more session under limits.max_sessions and
    /// max_sessions_per_principal (`Limits::check_session_count`), reserved atomically.
    fn admit(&self, caller: &Caller) -> Result<crate::session::Admitted, Status> {
        let actor = caller.actor();
        Ok(self.manager.admit(&caller.principal, |total, own| {
            self.limits.check_session_count(total, own, &actor)
        })?)
    }
}

/// A stream fed by a producer task through a small bounded channel; the task ends when the
/// client goes away (the channel closes).
fn async_stream<F, Fut>(producer: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<api::SessionEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::spawn(producer(sender));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))
}
