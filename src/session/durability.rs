//! Durable sessions, from the manager's side: what is written to the store when (the
//! hooks in manager.rs call `persist`), checkpoints of variables, and bringing every stored
//! session back when the daemon starts. Store failures are logged, not returned: the
//! session keeps working, only its durability is degraded, and the log says so.

use std::sync::Arc;

use super::{
    Cause, EventKind, Runtime, Session, SessionDefinition, SessionManager, SessionState, Trigger,
};
use crate::error::Error;
use crate::store::{SessionRecord, SessionStore};
use crate::worker::{CarriedState, WorkerProcess};

impl SessionManager {
    /// Makes sessions durable in `store` from now on.
    pub fn attach_store(&self, store: Arc<SessionStore>) {
        let _ = self.store.set(store);
    }

    /// Runs one store update if a store is attached; failures are logged.
    pub(super) fn persist(&self, update: impl FnOnce(&SessionStore) -> anyhow::Result<()>) {
        if let Some(store) = self.store.get()
            && let Err(error) = update(store)
        {
            tracing::error!(error = %format!("{error:#}"), "could not update the session store");
        }
    }

    /// `persist` for one session's record. Python sessions are never stored: their state
    /// lives in their process, and a daemon restart ends them.
    pub(super) fn persist_session(
        &self,
        session: &Session,
        update: impl FnOnce(&SessionStore) -> anyhow::Result<()>,
    ) {
        if session.runtime == Runtime::Graph {
            self.persist(update);
        }
    }

    /// Writes `state` as the session's checkpoint (graph sessions' variables only).
    pub(super) fn write_checkpoint(&self, session: &Session, state: &CarriedState) {
        if let Some(variables) = state.variables() {
            self.persist_blocking(|store| store.write_checkpoint(session.id(), variables));
        }
    }

    /// `persist` for big writes (checkpoints), off the async executor's thread.
    pub(super) fn persist_blocking(
        &self,
        update: impl FnOnce(&SessionStore) -> anyhow::Result<()>,
    ) {
        tokio::task::block_in_place(|| self.persist(update));
    }

    pub(super) fn record_of(
        &self,
        session: &Session,
        graph_def: &[u8],
        config: &[u8],
    ) -> SessionRecord {
        SessionRecord {
            id: session.id.clone(),
            owner: session.owner.clone(),
            labels: session.labels.clone(),
            config: config.to_vec(),
            graph_def: graph_def.to_vec(),
            graph_version: session.stats().graph_version,
            policy: session.policy,
            durable_variables: session.durable_variables,
            created_at: session.created_at,
        }
    }

    /// Imports the session's last checkpoint into `worker`; the number of variables set.
    pub(super) async fn restore_checkpoint(
        &self,
        session: &Session,
        worker: &WorkerProcess,
    ) -> usize {
        let Some(store) = self.store.get().filter(|_| session.durable_variables) else {
            return 0;
        };
        let variables = match tokio::task::block_in_place(|| store.read_checkpoint(&session.id)) {
            Ok(Some(variables)) if !variables.is_empty() => variables,
            Ok(_) => return 0,
            Err(error) => {
                tracing::error!(session_id = %session.id, error = %format!("{error:#}"), "could not read the checkpoint");
                return 0;
            }
        };
        let count = variables.len();
        let import = worker.import_state(CarriedState::Variables(variables));
        let imported = tokio::time::timeout(self.deadlines.call, import)
            .await
            .unwrap_or_else(|_| {
                // A fresh worker that does not take its checkpoint in time is hung: the
                // session goes on without the variables (as after a crash without one).
                worker.kill_as_failure();
                Err(Error::Unavailable(format!(
                    "worker pid {} did not import the checkpoint within {:?} \
                     (workers.call_timeout)",
                    worker.pid(),
                    self.deadlines.call
                )))
            });
        match imported {
            Ok(()) => count,
            Err(error) => {
                tracing::error!(session_id = %session.id, %error, "could not restore the checkpoint");
                0
            }
        }
    }

    /// Checkpoints one durable session's variables now.
    pub(super) async fn checkpoint(&self, session: &Session) {
        let core = session.core.read().await;
        let Some(worker) = session.worker.get() else {
            return;
        };
        let exported = self
            .within(
                session,
                &worker,
                "a checkpoint's export",
                worker.export_state(),
            )
            .await;
        drop(core);
        match exported {
            Ok(state) => self.write_checkpoint(session, &state),
            Err(error) => {
                tracing::warn!(session_id = %session.id, %error, "could not checkpoint the variables");
            }
        }
    }

    /// Checkpoints every durable session (periodically, and before a graceful shutdown).
    pub async fn checkpoint_all(&self) {
        if self.store.get().is_none() {
            return;
        }
        let durable: Vec<_> = self
            .sessions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|session| session.durable_variables)
            .cloned()
            .collect();
        for session in durable {
            self.checkpoint(&session).await;
        }
    }

    /// Brings back every stored session under its id, with its graph, and the variables of
    /// its last checkpoint when it asked for durable variables. A session that cannot be
    /// brought back (its graph no longer loads) stays in the store and is reported.
    pub async fn restore_from_store(self: &Arc<Self>) -> usize {
        let Some(store) = self.store.get().cloned() else {
            return 0;
        };
        let records = match store.all() {
            Ok(records) => records,
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "could not read the session store");
                return 0;
            }
        };
        let mut restored = 0;
        for record in records {
            let worker = match self
                .start_worker(
                    Runtime::Graph,
                    &record.graph_def,
                    &record.config.clone().into(),
                    record.policy.hard_limit_bytes,
                    // The store keeps no GPU placement: a restored session sees what its
                    // pool's workers see.
                    &std::collections::BTreeMap::new(),
                )
                .await
            {
                Ok(worker) => worker,
                Err(error) => {
                    tracing::error!(session_id = %record.id, %error, "could not bring a stored session back");
                    continue;
                }
            };
            let session = Arc::new(Session::new(SessionDefinition {
                id: record.id.clone(),
                runtime: Runtime::Graph,
                owner: record.owner.clone(),
                durable_variables: record.durable_variables,
                labels: record.labels.clone(),
                policy: self.policy.with_gpu_defaults(record.policy),
                gpus: self
                    .session_gpus(Runtime::Graph, &crate::gpu::GpuRequest::Any)
                    .unwrap_or_default(),
                graph_def: record.graph_def.clone(),
                config: record.config.clone().into(),
            }));
            session.touch_policy(|stats| stats.graph_version = record.graph_version);
            let variables = self.restore_checkpoint(&session, &worker).await;
            let mut core = session.core.write().await;
            self.replace_worker(&session, &mut core, Some(worker.clone()));
            drop(core);
            self.sessions
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(record.id.clone(), session.clone());
            session.touch_policy(|stats| stats.state = SessionState::Ready);
            let cause = Cause::daemon(
                Trigger::Restart,
                format!(
                    "brought back after a daemon restart (created {}); {variables} variables \
                     restored from the last checkpoint",
                    humantime::format_rfc3339_seconds(record.created_at)
                ),
            );
            self.events.publish(
                session
                    .event(EventKind::Restored, worker.pid(), record.graph_version)
                    .cause(&cause),
            );
            restored += 1;
        }
        restored
    }
}
