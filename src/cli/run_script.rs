//! `tfsd run SCRIPT [ARGS...]`: runs a Python script in a fresh Python session (a process that
//! has already imported TensorFlow and Keras), streams its output, closes the session, and
//! exits with the script's exit status: `python SCRIPT ARGS...` without the import wait,
//! supervised like every session.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use super::CliError;
use super::connect::{Client, DaemonAddress};
use crate::proto::tfsd::v1 as api;

/// Label every session `tfsd run` creates carries, with the script's file name.
const SCRIPT_LABEL: &str = "script";
/// How long closing the session may take once the script is done.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// What `tfsd run` was asked to do.
#[derive(Debug, Clone)]
pub struct ScriptRun<'a> {
    pub script: &'a Path,
    pub argv: Vec<String>,
    /// Stops the script after this long (0 = no limit).
    pub timeout: Option<Duration>,
}

/// Runs the script; answers its exit status (0–255).
pub async fn run(
    mut client: Client,
    address: &DaemonAddress,
    request: ScriptRun<'_>,
) -> Result<u8, CliError> {
    let source = std::fs::read(request.script).map_err(|error| CliError::Script {
        path: request.script.display().to_string(),
        error,
    })?;
    let name = request
        .script
        .file_name()
        .map_or_else(String::new, |name| name.to_string_lossy().into_owned());
    let created = client
        .create_session(api::CreateSessionRequest {
            runtime: api::Runtime::Python as i32,
            labels: [(SCRIPT_LABEL.to_string(), name)].into_iter().collect(),
            ..Default::default()
        })
        .await
        .map_err(|status| CliError::from_status(status, address))?
        .into_inner();
    let session_id = created
        .session
        .map(|session| session.session_id)
        .unwrap_or_default();
    let call = api::CallRequest {
        session_id: session_id.clone(),
        target: Some(api::call_request::Target::Script(api::Script {
            path: request.script.display().to_string(),
            source,
            argv: request.argv,
        })),
        timeout_ms: request
            .timeout
            .map_or(0, |timeout| timeout.as_millis().max(1) as u64),
        // A `tfsd run` killed mid-script leaves no session behind.
        close_session_after: true,
    };
    // Ctrl-C ends the script: the session is closed, which stops its process.
    let outcome = tokio::select! {
        outcome = stream_call(&mut client, address, call) => outcome,
        _ = tokio::signal::ctrl_c() => Ok(130),
    };
    let close = client.close_session(api::CloseSessionRequest { session_id });
    if let Ok(Err(status)) = tokio::time::timeout(CLOSE_TIMEOUT, close).await
        && status.code() != tonic::Code::NotFound
    {
        eprintln!(
            "warning: could not close the script's session: {}",
            status.message()
        );
    }
    outcome
}

async fn stream_call(
    client: &mut Client,
    address: &DaemonAddress,
    call: api::CallRequest,
) -> Result<u8, CliError> {
    let mut events = client
        .call(call)
        .await
        .map_err(|status| CliError::from_status(status, address))?
        .into_inner();
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        let event = events
            .message()
            .await
            .map_err(|status| CliError::from_status(status, address))?;
        let Some(api::CallEvent { event: Some(event) }) = event else {
            return Err(CliError::Daemon(tonic::Status::internal(
                "the call ended without a result",
            )));
        };
        match event {
            api::call_event::Event::Output(output) => {
                let written = if output.stream == api::Stream::Stderr as i32 {
                    stderr.write_all(&output.data).and_then(|()| stderr.flush())
                } else {
                    stdout.write_all(&output.data).and_then(|()| stdout.flush())
                };
                written?;
            }
            // As the interpreter does: the status modulo 256.
            api::call_event::Event::Result(result) => return Ok(result.exit_code as u8),
            api::call_event::Event::Exception(exception) => {
                // What `python SCRIPT` prints for an uncaught exception, and its status.
                stderr.write_all(exception.traceback.as_bytes())?;
                if !exception.traceback.ends_with('\n') {
                    stderr.write_all(b"\n")?;
                }
                return Ok(1);
            }
        }
    }
}
