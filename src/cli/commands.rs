//! The one-call commands: status, sessions, show, reset-graph, purge, recycle, close. Each
//! makes one tfsd.v1 call, turns the answer into a report and hands it to the output.

use std::time::SystemTime;

use super::CliError;
use super::connect::{Client, DaemonAddress};
use super::output::Output;
use super::report::{
    CloseReport, DaemonStatusReport, ResetOperation, ResetReport, SessionListReport, SessionReport,
};
use crate::proto::tfsd::v1 as api;

/// `tfsd status`.
pub async fn status(
    mut client: Client,
    address: &DaemonAddress,
    output: &mut Output,
) -> Result<(), CliError> {
    let status = client
        .get_daemon_status(api::GetDaemonStatusRequest {})
        .await
        .map_err(|status| CliError::from_status(status, address))?
        .into_inner();
    let report = DaemonStatusReport::new(address.to_string(), &status, SystemTime::now());
    output.report(&report)
}

/// `tfsd sessions`.
pub async fn sessions(
    mut client: Client,
    address: &DaemonAddress,
    output: &mut Output,
) -> Result<(), CliError> {
    let sessions = client
        .list_sessions(api::ListSessionsRequest {})
        .await
        .map_err(|status| CliError::from_status(status, address))?
        .into_inner()
        .sessions;
    output.report(&SessionListReport::new(&sessions, SystemTime::now()))
}

/// `tfsd show ID`.
pub async fn show(
    mut client: Client,
    address: &DaemonAddress,
    session_id: String,
    output: &mut Output,
) -> Result<(), CliError> {
    let session = client
        .get_session(api::GetSessionRequest { session_id })
        .await
        .map_err(|status| CliError::from_status(status, address))?
        .into_inner();
    output.report(&SessionReport::new(&session, SystemTime::now()))
}

/// `tfsd reset-graph ID`, `purge ID` and `recycle ID [--preserve-variables]`.
pub async fn reset(
    mut client: Client,
    address: &DaemonAddress,
    operation: ResetOperation,
    session_id: String,
    preserve_variables: bool,
    output: &mut Output,
) -> Result<(), CliError> {
    let id = session_id.clone();
    let response = match operation {
        ResetOperation::ResetGraph => {
            client
                .reset_graph(api::ResetGraphRequest { session_id })
                .await
        }
        ResetOperation::Purge => {
            client
                .purge_variables(api::PurgeVariablesRequest { session_id })
                .await
        }
        ResetOperation::Recycle => {
            let request = api::RecycleSessionRequest {
                session_id,
                preserve_variables,
            };
            client.recycle_session(request).await
        }
    }
    .map_err(|status| CliError::from_status(status, address))?
    .into_inner();
    let report = ResetReport::new(operation, &id, &response, SystemTime::now());
    output.report(&report)
}

/// `tfsd close ID`.
pub async fn close(
    mut client: Client,
    address: &DaemonAddress,
    session_id: String,
    output: &mut Output,
) -> Result<(), CliError> {
    let request = api::CloseSessionRequest {
        session_id: session_id.clone(),
    };
    client
        .close_session(request)
        .await
        .map_err(|status| CliError::from_status(status, address))?;
    output.report(&CloseReport {
        session_id,
        closed: true,
    })
}
