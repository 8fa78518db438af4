//! The MasterService's own view of its sessions: which tfsd sessions it created (the
//! session handle *is* the tfsd session id), the client address each came from and whether
//! the client proved who it is (the scope of Reset and of the per-address session count),
//! the ConfigProto's `operation_timeout_in_ms`, and the session's callables.
//!
//! Handles of sessions created through tfsd.v1 are not here, so a TensorFlow client can
//! neither run nor reset them. Entries go when the MasterService closes the session, or when
//! anyone else (an operator, the daemon) closes it: `forget_closed` follows the event bus.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::callables::Callables;
use crate::session::{EventKind, SessionManager, SessionSnapshot};

/// Label on every tfsd session the MasterService created: what makes a tfsd session a
/// MasterService session (`adopt_restored` finds them again by it after a restart). Clients
/// cannot set it: labels under `tfsd.` are the daemon's (`limits::RESERVED_LABEL_PREFIX`).
pub const ORIGIN_LABEL: &str = "tfsd.origin";
pub const ORIGIN_MASTER: &str = "master";
/// Label with the address (IP:port) of the TensorFlow client that created the session.
pub const CLIENT_LABEL: &str = "tfsd.master.client";
/// Label with the name the client gave its session in
/// `ConfigProto.experimental.session_metadata.name` (`NAME/VERSION` for a non-zero version).
pub const NAME_LABEL: &str = "tfsd.master.name";
/// Label with the ConfigProto's `operation_timeout_in_ms`, when set: the session's default
/// step timeout, kept where a restart (durable sessions) finds it again.
pub const OPERATION_TIMEOUT_LABEL: &str = "tfsd.master.operation_timeout_ms";
/// Label with the principal whose token created the session (`credentials.rs`), the
/// session's owner: how `adopt_restored` tells such a session from a tfsd.v1 one.
pub const PRINCIPAL_LABEL: &str = "tfsd.master.principal";

#[derive(Debug)]
pub struct MasterSession {
    /// The address the client that created the session connected from.
    pub client_ip: Option<IpAddr>,
    /// The principal whose token created the session; empty for a client without
    /// credentials.
    pub owner: String,
    pub operation_timeout: Option<Duration>,
    pub callables: Callables,
}

#[derive(Debug, Default)]
pub struct MasterSessions {
    sessions: Mutex<HashMap<String, MasterSession>>,
}

impl MasterSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, MasterSession>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, handle: String, session: MasterSession) {
        self.lock().insert(handle, session);
    }

    /// Forgets a session; false if it was not a MasterService session.
    pub fn remove(&self, handle: &str) -> bool {
        self.lock().remove(handle).is_some()
    }

    /// Runs `f` on the session, or answers NOT_FOUND for a handle that is not (or no longer)
    /// a MasterService session.
    pub fn with<R>(
        &self,
        handle: &str,
        f: impl FnOnce(&mut MasterSession) -> Result<R, Status>,
    ) -> Result<R, Status> {
        match self.lock().get_mut(handle) {
            Some(session) => f(session),
            None => Err(not_found(handle)),
        }
    }

    /// The handles of the sessions clients without credentials created from `client_ip`:
    /// those a Reset from that address reaches, and those counted as the principal
    /// `master:IP`. A session created with a token is its principal's, counted as theirs,
    /// and out of reach of a Reset, which carries no credentials.
    pub fn anonymous_from(&self, client_ip: Option<IpAddr>) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, session)| session.owner.is_empty() && session.client_ip == client_ip)
            .map(|(handle, _)| handle.clone())
            .collect()
    }

    /// Takes over the MasterService sessions the daemon restored from its state directory,
    /// with what their labels say (client address, operation timeout); their callables were
    /// not kept. Returns how many. A session with an owner is the MasterService's only if
    /// its `tfsd.master.principal` label names that owner (a client with a token created
    /// it); any other came through tfsd.v1, whatever its labels say: a state directory
    /// written before `tfsd.` labels were reserved may hold a client's forged
    /// `tfsd.origin=master`.
    pub fn adopt_restored(&self, snapshots: &[SessionSnapshot]) -> usize {
        let mut adopted = 0;
        for snapshot in snapshots {
            if snapshot.labels.get(ORIGIN_LABEL).map(String::as_str) != Some(ORIGIN_MASTER) {
                continue;
            }
            let authenticated = snapshot.labels.get(PRINCIPAL_LABEL) == Some(&snapshot.owner);
            if !snapshot.owner.is_empty() && !authenticated {
                tracing::warn!(
                    session_id = %snapshot.id,
                    owner = %snapshot.owner,
                    "a restored tfsd.v1 session carries the label {ORIGIN_LABEL}={ORIGIN_MASTER}; \
                     it stays a tfsd.v1 session"
                );
                continue;
            }
            let client_ip = snapshot
                .labels
                .get(CLIENT_LABEL)
                .and_then(|client| client.parse::<std::net::SocketAddr>().ok())
                .map(|client| client.ip());
            let operation_timeout = snapshot
                .labels
                .get(OPERATION_TIMEOUT_LABEL)
                .and_then(|millis| millis.parse().ok())
                .map(Duration::from_millis);
            self.insert(
                snapshot.id.clone(),
                MasterSession {
                    client_ip,
                    owner: snapshot.owner.clone(),
                    operation_timeout,
                    callables: Callables::default(),
                },
            );
            adopted += 1;
        }
        adopted
    }

    /// Forgets sessions closed by anyone, until `shutdown`.
    pub async fn forget_closed(
        self: Arc<Self>,
        manager: Arc<SessionManager>,
        shutdown: CancellationToken,
    ) {
        let mut events = manager.subscribe();
        loop {
            let received = tokio::select! {
                received = events.recv() => received,
                _ = shutdown.cancelled() => return,
            };
            match received {
                Ok(event) if event.kind == EventKind::Closed => {
                    self.remove(&event.session_id);
                }
                Ok(_) => {}
                // Missed events: keep only the sessions the manager still has.
                Err(RecvError::Lagged(_)) => self
                    .lock()
                    .retain(|handle, _| manager.session(handle).is_ok()),
                Err(RecvError::Closed) => return,
            }
        }
    }
}

pub fn not_found(handle: &str) -> Status {
    Status::not_found(format!(
        "no MasterService session with handle {}: it was closed (by the client or an \
         operator), or never created through this MasterService",
        crate::error::quoted(handle)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(ip: Option<&str>) -> MasterSession {
        owned_session(ip, "")
    }

    fn owned_session(ip: Option<&str>, owner: &str) -> MasterSession {
        MasterSession {
            client_ip: ip.map(|ip| ip.parse().expect("ip")),
            owner: owner.to_string(),
            operation_timeout: None,
            callables: Callables::default(),
        }
    }

    fn snapshot(id: &str, owner: &str, labels: &[(&str, &str)]) -> SessionSnapshot {
        SessionSnapshot {
            id: id.into(),
            runtime: crate::session::Runtime::Graph,
            owner: owner.into(),
            durable_variables: true,
            labels: labels
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            state: crate::session::SessionState::Ready,
            worker_pid: 0,
            memory: crate::memory::MemoryUsage::default(),
            gpu_placement: crate::gpu::Placement::All,
            graph_version: 0,
            run_count: 0,
            call_count: 0,
            runs_in_flight: 0,
            graph_reset_count: 0,
            purge_count: 0,
            recycle_count: 0,
            worker_restart_count: 0,
            created_at: std::time::SystemTime::UNIX_EPOCH,
            last_used_at: std::time::SystemTime::UNIX_EPOCH,
            peak_private_bytes: 0,
            policy: crate::policy::SessionPolicy::default(),
            unhealthy: false,
            automatic_action_count: 0,
        }
    }

    #[test]
    fn only_ownerless_sessions_labelled_as_the_masters_are_adopted() {
        let sessions = MasterSessions::default();
        let origin = (ORIGIN_LABEL, ORIGIN_MASTER);
        let adopted = sessions.adopt_restored(&[
            snapshot("s-master", "", &[origin, (CLIENT_LABEL, "127.0.0.1:5000")]),
            // A tfsd.v1 session with a forged label, from a state directory written before
            // `tfsd.` labels were reserved.
            snapshot("s-forged", "alice", &[origin]),
            snapshot(
                "s-forged-principal",
                "alice",
                &[origin, (PRINCIPAL_LABEL, "bob")],
            ),
            snapshot("s-v1", "", &[("run", "1")]),
            // Created with alice's token.
            snapshot("s-alice", "alice", &[origin, (PRINCIPAL_LABEL, "alice")]),
        ]);
        assert_eq!(adopted, 2);
        assert!(sessions.with("s-master", |_| Ok(())).is_ok());
        assert!(
            sessions
                .with("s-alice", |s| Ok(s.owner == "alice"))
                .expect("adopted")
        );
        assert!(sessions.with("s-forged-principal", |_| Ok(())).is_err());
        assert!(sessions.with("s-forged", |_| Ok(())).is_err());
        assert!(sessions.with("s-v1", |_| Ok(())).is_err());
        let status = sessions
            .with(&"h".repeat(1 << 20), |_| Ok(()))
            .expect_err("unknown");
        assert!(status.message().len() < 300, "{}", status.message().len());
    }

    #[test]
    fn reset_reaches_only_sessions_created_from_the_same_address_without_credentials() {
        let sessions = MasterSessions::default();
        sessions.insert("s-a".into(), session(Some("127.0.0.1")));
        sessions.insert("s-b".into(), session(Some("127.0.0.1")));
        sessions.insert("s-c".into(), session(Some("10.1.2.3")));
        sessions.insert("s-d".into(), session(None));
        sessions.insert("s-alice".into(), owned_session(Some("127.0.0.1"), "alice"));
        let mut local = sessions.anonymous_from(Some("127.0.0.1".parse().expect("ip")));
        local.sort();
        assert_eq!(local, ["s-a", "s-b"]);
        assert_eq!(
            sessions.anonymous_from(Some("10.1.2.3".parse().expect("ip"))),
            ["s-c"]
        );
        assert!(sessions.remove("s-a"));
        assert!(!sessions.remove("s-a"), "forgotten once");
        let status = sessions.with("s-a", |_| Ok(())).expect_err("gone");
        assert_eq!(status.code(), tonic::Code::NotFound);
    }
}
