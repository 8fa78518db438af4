//! `tfsd watch [ID]`: follows WatchEvents, one line per event, until Ctrl-C or until the
//! daemon ends the stream.

use tokio::signal::unix::{SignalKind, signal};

use super::CliError;
use super::connect::{Client, DaemonAddress};
use super::output::Output;
use super::report::EventReport;
use crate::proto::tfsd::v1 as api;

pub async fn run(
    mut client: Client,
    address: &DaemonAddress,
    session_id: Option<String>,
    output: &mut Output,
) -> Result<(), CliError> {
    let failed = |status: tonic::Status| CliError::from_status(status, address);
    // The daemon filters by id without checking it; a typo would wait forever in silence.
    if let Some(session_id) = &session_id {
        let request = api::GetSessionRequest {
            session_id: session_id.clone(),
        };
        client.get_session(request).await.map_err(failed)?;
    }
    // Ctrl-C is how a person stops watching: a normal end (exit 0), not a death by signal.
    let mut interrupt = signal(SignalKind::interrupt()).map_err(CliError::Signal)?;
    let request = api::WatchEventsRequest {
        session_id: session_id.clone().unwrap_or_default(),
    };
    let mut events = client
        .watch_events(request)
        .await
        .map_err(failed)?
        .into_inner();
    // The answer's headers arrive once the daemon has subscribed this stream, so from this
    // line on no event is missed; tests and scripts may wait for it before acting.
    let which = match &session_id {
        Some(id) => format!("session {id}"),
        None => "every session".to_string(),
    };
    eprintln!("watching events of {which} at {address}; Ctrl-C to stop");
    loop {
        tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            message = events.message() => match message.map_err(failed)? {
                Some(event) => output.line(&EventReport::new(&event))?,
                None => {
                    eprintln!("the daemon ended the event stream (it is shutting down)");
                    return Ok(());
                }
            },
        }
    }
}
