//! The MasterService handlers: validate, check the operator's limits, convert
//! (`convert.rs`), call the `SessionManager`, convert back. Requests that carry a
//! `request_id` go through `RecentRequests`, so a client's retry never runs a step twice.
//! CreateSession establishes who the client is (`credentials.rs`); every other call names a
//! session by its handle, the capability.

use std::net::IpAddr;
use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use super::callables;
use super::convert;
use super::credentials::MasterAccess;
use super::dedup::RecentRequests;
use super::errors;
use super::sessions::{
    CLIENT_LABEL, MasterSession, MasterSessions, NAME_LABEL, OPERATION_TIMEOUT_LABEL, ORIGIN_LABEL,
    ORIGIN_MASTER, PRINCIPAL_LABEL,
};
use crate::auth::Caller;
use crate::error::Error;
use crate::limits::{self, Limits};
use crate::policy::SessionPolicy;
use crate::proto::tensorflow as tf;
use crate::session::{PartialRunSpec, RunSpec, SessionManager};

type Answer<T> = Result<T, Status>;

/// The size of an answer, for the de-duplication cache's byte bound.
/// A tensor whose content is a slice of a worker's frame, copied out of it (see
/// `RecentRequests::detaching`). Small answers came in frames the budget does not count.
fn detach_tensor(tensor: &mut tf::TensorProto) {
    if !tensor.tensor_content.is_empty() {
        tensor.tensor_content = bytes::Bytes::copy_from_slice(&tensor.tensor_content);
    }
}

fn detach_run_step(mut answer: Answer<tf::RunStepResponse>) -> Answer<tf::RunStepResponse> {
    if let Ok(response) = &mut answer
        && response.encoded_len() >= crate::worker::budget::SMALL_FRAME_BYTES
    {
        for named in &mut response.tensor {
            named.tensor.iter_mut().for_each(detach_tensor);
        }
    }
    answer
}

fn detach_run_callable(
    mut answer: Answer<tf::RunCallableResponse>,
) -> Answer<tf::RunCallableResponse> {
    if let Ok(response) = &mut answer
        && response.encoded_len() >= crate::worker::budget::SMALL_FRAME_BYTES
    {
        response.fetch.iter_mut().for_each(detach_tensor);
    }
    answer
}

fn answer_size<T: Message>(answer: &Answer<T>) -> usize {
    match answer {
        Ok(message) => message.encoded_len(),
        Err(status) => status.message().len(),
    }
}

/// What every handler shares.
#[derive(Debug)]
pub struct Master {
    manager: Arc<SessionManager>,
    sessions: Arc<MasterSessions>,
    limits: Limits,
    access: MasterAccess,
    run_steps: Arc<RecentRequests<Answer<tf::RunStepResponse>>>,
    partial_run_setups: Arc<RecentRequests<Answer<tf::PartialRunSetupResponse>>>,
    make_callables: Arc<RecentRequests<Answer<tf::MakeCallableResponse>>>,
    run_callables: Arc<RecentRequests<Answer<tf::RunCallableResponse>>>,
}

impl Master {
    pub fn new(
        manager: Arc<SessionManager>,
        sessions: Arc<MasterSessions>,
        limits: Limits,
        access: MasterAccess,
    ) -> Arc<Master> {
        Arc::new(Master {
            manager,
            sessions,
            limits,
            access,
            run_steps: Arc::new(RecentRequests::detaching(answer_size, detach_run_step)),
            partial_run_setups: Arc::new(RecentRequests::new(answer_size)),
            make_callables: Arc::new(RecentRequests::new(answer_size)),
            run_callables: Arc::new(RecentRequests::detaching(answer_size, detach_run_callable)),
        })
    }

    /// limits.max_sessions, and max_sessions_per_principal: a client with a token counts as
    /// its principal, exactly as over tfsd.v1; every address of clients without credentials
    /// as one principal, `master:IP`, since the address is all the MasterService knows them
    /// by (as for Reset). The slot is reserved atomically (`SessionManager::admit`), so that
    /// concurrent creates cannot all pass the check.
    fn admit(
        &self,
        client_ip: Option<IpAddr>,
        caller: Option<&Caller>,
    ) -> Result<crate::session::Admitted, Status> {
        if let Some(caller) = caller {
            let actor = caller.actor();
            return self
                .manager
                .admit(&caller.principal, |total, own| {
                    self.limits.check_session_count(total, own, &actor)
                })
                .map_err(errors::status);
        }
        let (key, principal) = match client_ip {
            Some(ip) => (
                format!("master:{ip}"),
                format!("master:{ip} (the MasterService clients at {ip})"),
            ),
            None => (
                "master:".to_string(),
                "master: (the MasterService clients of unknown address)".to_string(),
            ),
        };
        self.manager
            // A client without credentials: the session has no owner.
            .admit_as("", &key, |total, creating| {
                // Counted under the admission lock, and the reservation is held until the
                // session is in this map (see `create_session`): a create from the same
                // address is counted in one place or the other at every instant.
                let created = self.sessions.anonymous_from(client_ip).len();
                self.limits
                    .check_session_count(total, created + creating, &principal)
            })
            .map_err(errors::status)
    }
}

#[derive(Debug)]
pub struct MasterService {
    master: Arc<Master>,
}

impl MasterService {
    pub fn new(master: Arc<Master>) -> MasterService {
        MasterService { master }
    }
}

/// Unwraps a de-duplicated answer (cloned only when a retry shares it).
fn replayed<T: Clone>(answer: Result<Arc<Answer<T>>, Status>) -> Answer<T> {
    let answer = answer?;
    Arc::try_unwrap(answer).unwrap_or_else(|shared| (*shared).clone())
}

fn required_handle(handle: &str) -> Result<&str, Status> {
    if handle.is_empty() {
        return Err(Status::invalid_argument("session_handle is required"));
    }
    limits::check_id("session_handle", handle).map_err(errors::status)?;
    Ok(handle)
}

/// The names of a step or a partial run (feeds, fetches, targets) within
/// `limits::check_names`.
fn check_names(feeds: &[String], fetches: &[String], targets: &[String]) -> Result<(), Status> {
    for (field, names) in [("feed", feeds), ("fetch", fetches), ("target", targets)] {
        limits::check_names(field, names.iter().map(String::as_str)).map_err(errors::status)?;
    }
    Ok(())
}

#[tonic::async_trait]
impl tf::master_service_server::MasterService for MasterService {
    async fn create_session(
        &self,
        request: Request<tf::CreateSessionRequest>,
    ) -> Result<Response<tf::CreateSessionResponse>, Status> {
        let client = request.remote_addr();
        let request = request.into_inner();
        let config = convert::session_config(&request.config)?;
        let caller = self.master.access.caller(config.token.as_ref())?;
        let client_ip = client.map(|address| address.ip());
        self.master
            .limits
            .check_graph_def_size(request.graph_def.len())
            .map_err(errors::status)?;
        let admitted = self.master.admit(client_ip, caller.as_ref())?;
        let mut labels = std::collections::BTreeMap::from([(
            ORIGIN_LABEL.to_string(),
            ORIGIN_MASTER.to_string(),
        )]);
        if let Some(client) = client {
            labels.insert(CLIENT_LABEL.to_string(), client.to_string());
        }
        if let Some(caller) = &caller {
            labels.insert(PRINCIPAL_LABEL.to_string(), caller.principal.clone());
        }
        if let Some(name) = &config.name {
            labels.insert(NAME_LABEL.to_string(), name.clone());
        }
        if let Some(timeout) = config.operation_timeout {
            labels.insert(
                OPERATION_TIMEOUT_LABEL.to_string(),
                timeout.as_millis().to_string(),
            );
        }
        let snapshot = self
            .master
            .manager
            .create_owned(
                admitted.clone(),
                // With a state directory, the variables come back after a daemon restart:
                // the client cannot know it should initialise them again.
                true,
                request.graph_def.into(),
                config.worker_config.into(),
                labels,
                // A TensorFlow client cannot re-initialise variables it does not know were
                // lost, so a recycle by the memory policy carries them over.
                SessionPolicy {
                    preserve_variables: true,
                    ..SessionPolicy::default()
                },
                // TensorFlow's client has no way to ask: the pool's GPUs.
                crate::gpu::GpuRequest::Any,
            )
            .await
            .map_err(errors::status)?;
        tracing::info!(
            session_id = %snapshot.id,
            client = %client.map_or_else(|| "unknown".to_string(), |client| client.to_string()),
            principal = %caller.as_ref().map_or("none", |caller| caller.principal.as_str()),
            "MasterService session created"
        );
        self.master.sessions.insert(
            snapshot.id.clone(),
            MasterSession {
                client_ip,
                owner: snapshot.owner.clone(),
                operation_timeout: config.operation_timeout,
                callables: callables::Callables::default(),
            },
        );
        // Counted by `anonymous_from` (or as the principal's) now: the reservation can go.
        drop(admitted);
        Ok(Response::new(tf::CreateSessionResponse {
            session_handle: snapshot.id,
            graph_version: snapshot.graph_version as i64,
        }))
    }

    async fn extend_session(
        &self,
        request: Request<tf::ExtendSessionRequest>,
    ) -> Result<Response<tf::ExtendSessionResponse>, Status> {
        let request = request.into_inner();
        let handle = required_handle(&request.session_handle)?;
        self.master.sessions.with(handle, |_| Ok(()))?;
        let current = u64::try_from(request.current_graph_version)
            .map_err(|_| Status::invalid_argument("current_graph_version must not be negative"))?;
        self.master
            .limits
            .check_graph_def_size(request.graph_def.len())
            .map_err(errors::status)?;
        let version = self
            .master
            .manager
            .extend(handle, request.graph_def.into(), current)
            .await
            .map_err(errors::status)?;
        Ok(Response::new(tf::ExtendSessionResponse {
            new_graph_version: version as i64,
        }))
    }

    async fn partial_run_setup(
        &self,
        request: Request<tf::PartialRunSetupRequest>,
    ) -> Result<Response<tf::PartialRunSetupResponse>, Status> {
        let request = request.into_inner();
        let master = self.master.clone();
        let handle = request.session_handle.clone();
        let answer = self
            .master
            .partial_run_setups
            .run(&handle, request.request_id, async move {
                let handle = required_handle(&request.session_handle)?;
                master.sessions.with(handle, |_| Ok(()))?;
                check_names(&request.feed, &request.fetch, &request.target)?;
                let spec = PartialRunSpec {
                    feeds: request.feed,
                    fetches: request.fetch,
                    targets: request.target,
                };
                let partial_run_handle = master
                    .manager
                    .partial_run_setup(handle, spec)
                    .await
                    .map_err(errors::status)?;
                Ok(tf::PartialRunSetupResponse { partial_run_handle })
            })
            .await;
        replayed(answer).map(Response::new)
    }

    async fn run_step(
        &self,
        request: Request<tf::RunStepRequest>,
    ) -> Result<Response<tf::RunStepResponse>, Status> {
        let request = request.into_inner();
        let store_errors_in_response_body = request.store_errors_in_response_body;
        let master = self.master.clone();
        let handle = request.session_handle.clone();
        let answer = self
            .master
            .run_steps
            .run(&handle, request.request_id, run_step(master, request))
            .await;
        errors::run_step_answer(store_errors_in_response_body, replayed(answer))
    }

    async fn close_session(
        &self,
        request: Request<tf::CloseSessionRequest>,
    ) -> Result<Response<tf::CloseSessionResponse>, Status> {
        let handle = required_handle(&request.get_ref().session_handle)?;
        // A handle that is not (or no longer) a MasterService session answers OK: an
        // operator may have closed it already, and the client's `close()` (or the end of its
        // `with` block) should not fail for that. tfsd.v1 sessions are never closed here.
        if !self.master.sessions.remove(handle) {
            return Ok(Response::new(tf::CloseSessionResponse {}));
        }
        match self.master.manager.close(handle).await {
            Ok(()) | Err(Error::SessionNotFound(_)) => {}
            Err(error) => return Err(errors::status(error)),
        }
        tracing::info!(session_id = %handle, "MasterService session closed");
        Ok(Response::new(tf::CloseSessionResponse {}))
    }

    async fn list_devices(
        &self,
        request: Request<tf::ListDevicesRequest>,
    ) -> Result<Response<tf::ListDevicesResponse>, Status> {
        let handle = &request.get_ref().session_handle;
        let incarnation = if handle.is_empty() {
            convert::incarnation(&["tfsd", &std::process::id().to_string()])
        } else {
            let handle = required_handle(handle)?;
            self.master.sessions.with(handle, |_| Ok(()))?;
            let snapshot = self
                .master
                .manager
                .session(handle)
                .map_err(errors::status)?;
            convert::incarnation(&[handle, &snapshot.worker_pid.to_string()])
        };
        Ok(Response::new(tf::ListDevicesResponse {
            local_device: vec![convert::cpu_device(incarnation)],
            remote_device: Vec::new(),
        }))
    }

    async fn reset(
        &self,
        request: Request<tf::ResetRequest>,
    ) -> Result<Response<tf::ResetResponse>, Status> {
        self.master.access.check_reset()?;
        let client_ip = request.remote_addr().map(|address| address.ip());
        let containers = request.into_inner().container;
        // Only logged, but bounded like every name a client sends.
        limits::check_names("container", containers.iter().map(String::as_str))
            .map_err(errors::status)?;
        // Detached, so that a client hanging up cannot leave its sessions half reset.
        let master = self.master.clone();
        tokio::spawn(async move { reset(&master, client_ip, &containers).await })
            .await
            .map_err(|error| Status::internal(format!("Reset failed: {error}")))??;
        Ok(Response::new(tf::ResetResponse {}))
    }

    async fn make_callable(
        &self,
        request: Request<tf::MakeCallableRequest>,
    ) -> Result<Response<tf::MakeCallableResponse>, Status> {
        let request = request.into_inner();
        let master = self.master.clone();
        let handle = request.session_handle.clone();
        let answer = self
            .master
            .make_callables
            .run(&handle, request.request_id, async move {
                let handle = required_handle(&request.session_handle)?;
                let spec = convert::callable_spec(&request.options)?;
                let callable = master
                    .sessions
                    .with(handle, |session| session.callables.make(spec))?;
                Ok(tf::MakeCallableResponse { handle: callable })
            })
            .await;
        replayed(answer).map(Response::new)
    }

    async fn run_callable(
        &self,
        request: Request<tf::RunCallableRequest>,
    ) -> Result<Response<tf::RunCallableResponse>, Status> {
        let request = request.into_inner();
        let master = self.master.clone();
        let handle = request.session_handle.clone();
        let answer = self
            .master
            .run_callables
            .run(&handle, request.request_id, async move {
                let handle = required_handle(&request.session_handle)?;
                let spec = master.sessions.with(handle, |session| {
                    let callable = session.callables.get(request.handle)?;
                    callables::run_spec(callable, request.feed, session.operation_timeout)
                })?;
                let spec = master.limits.limit_run(spec).map_err(errors::status)?;
                let fetch = master
                    .manager
                    .run(handle, spec)
                    .await
                    .map_err(errors::status)?;
                within_message_size(
                    &master.limits,
                    tf::RunCallableResponse {
                        fetch,
                        metadata: Vec::new(),
                    },
                )
            })
            .await;
        replayed(answer).map(Response::new)
    }

    async fn release_callable(
        &self,
        request: Request<tf::ReleaseCallableRequest>,
    ) -> Result<Response<tf::ReleaseCallableResponse>, Status> {
        let request = request.into_inner();
        let handle = required_handle(&request.session_handle)?;
        self.master
            .sessions
            .with(handle, |session| session.callables.release(request.handle))?;
        Ok(Response::new(tf::ReleaseCallableResponse {}))
    }
}

/// One RunStep: an ordinary step, or the next part of a partial run.
async fn run_step(master: Arc<Master>, request: tf::RunStepRequest) -> Answer<tf::RunStepResponse> {
    let handle = required_handle(&request.session_handle)?;
    let operation_timeout = master
        .sessions
        .with(handle, |session| Ok(session.operation_timeout))?;
    let feeds = convert::feeds(request.feed)?;
    let fetches = request.fetch;
    let limits = &master.limits;
    let outputs = if request.partial_run_handle.is_empty() {
        let spec = limits
            .limit_run(RunSpec {
                feeds,
                fetches: fetches.clone(),
                targets: request.target,
                timeout: convert::run_timeout(&request.options)?
                    .or(operation_timeout)
                    .map(convert::ahead_of_client),
                max_runs_in_flight: None,
            })
            .map_err(errors::status)?;
        master.manager.run(handle, spec).await
    } else {
        // TensorFlow's partial runs take no timeout, so max_run_timeout cannot reach them.
        limits
            .check_feeds(feeds.iter().map(|(name, tensor)| (name.as_str(), tensor)))
            .and_then(|()| limits::check_names("fetch", fetches.iter().map(String::as_str)))
            .and_then(|()| limits::check_name("partial_run_handle", &request.partial_run_handle))
            .map_err(errors::status)?;
        master
            .manager
            .partial_run(
                handle,
                &request.partial_run_handle,
                feeds,
                fetches.clone(),
                limits.max_concurrent_runs_per_session,
            )
            .await
    }
    .map_err(errors::status)?;
    within_message_size(
        limits,
        tf::RunStepResponse {
            tensor: convert::named(&fetches, outputs),
            ..tf::RunStepResponse::default()
        },
    )
}

/// The answer, or RESOURCE_EXHAUSTED naming limits.max_message_size when it is too big to
/// send (see `Limits::check_answer_size`).
fn within_message_size<T: Message>(limits: &Limits, answer: T) -> Answer<T> {
    limits
        .check_answer_size(answer.encoded_len())
        .map_err(errors::status)?;
    Ok(answer)
}

/// Reset: clears the state of every MasterService session that clients without credentials
/// created from the caller's address (a purge: the same graph in a fresh TensorFlow session,
/// so every container is cleared). Unlike TensorFlow's server, the sessions stay open and
/// sessions of other clients, of principals (created with a token) and of tfsd.v1 are not
/// touched.
async fn reset(
    master: &Master,
    client_ip: Option<IpAddr>,
    containers: &[String],
) -> Result<(), Status> {
    let handles = master.sessions.anonymous_from(client_ip);
    let mut failures = Vec::new();
    for handle in &handles {
        match master.manager.purge_variables(handle).await {
            Ok(_) | Err(Error::SessionNotFound(_)) => {}
            Err(error) => failures.push(format!("{handle}: {error}")),
        }
    }
    tracing::info!(
        client = %client_ip.map_or_else(|| "unknown".to_string(), |ip| ip.to_string()),
        containers = %containers.join(","),
        sessions = handles.len(),
        failed = failures.len(),
        "MasterService Reset cleared the client's sessions"
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Status::internal(crate::error::clip_message(format!(
            "Reset could not clear {} of {} sessions: {}",
            failures.len(),
            handles.len(),
            failures.join("; ")
        ))))
    }
}
