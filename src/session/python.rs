//! Python sessions' calls: run the user's code in the session's Python worker, stream its
//! output, and stop it when its deadline passes or its caller goes away.
//!
//! Stopping a call is certain: the worker is first asked to interrupt it (a KeyboardInterrupt
//! in the code), and if the code has not stopped within `CANCEL_GRACE` (it is inside a long
//! TensorFlow kernel, or it catches the interrupt), the worker is killed and the session is
//! restored in a fresh Python process, with the event saying why.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::manager::{InFlight, usable_worker};
use super::{Cause, Runtime, Session, SessionManager, Trigger};
use crate::error::{Error, Result};
use crate::worker::{CallOutcome, CallOutput, CallTarget, OutputStream};

/// How long interrupted code has to stop before its worker is killed.
pub const CANCEL_GRACE: Duration = Duration::from_secs(2);
/// Output pieces buffered between the worker and a slow caller; past this the worker's
/// writes wait (its output is never dropped while the caller listens).
const OUTPUT_BUFFER: usize = 64;
/// How long the output left at a call's end, and its result, may wait for a caller that
/// does not read before they are dropped.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest piece of output copied into one log line.
const LOG_LINE_BYTES: usize = 4096;

/// What a caller of `SessionManager::call` receives: output as the code writes it, then
/// exactly one `Finished`.
#[derive(Debug)]
pub enum CallEvent {
    Output(CallOutput),
    Finished(Result<CallOutcome>),
}

/// Why a call is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Deadline(Duration),
    CallerGone,
}

impl SessionManager {
    /// Starts a call in a Python session and answers the stream of its events. The call runs
    /// as a task of its own: a caller that goes away (its receiver dropped) stops the call
    /// instead of leaving it running unseen.
    /// With `close_after`, the session is closed when the call ends, however it ends (if it
    /// ran: a call refused before it started leaves the session alone).
    pub fn call(
        self: &Arc<Self>,
        id: &str,
        target: CallTarget,
        timeout: Option<Duration>,
        max_runs_in_flight: Option<u32>,
        close_after: bool,
    ) -> Result<mpsc::Receiver<CallEvent>> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let session = self.get(id)?;
        session.expect_runtime(Runtime::Python, "Call")?;
        let (events, receiver) = mpsc::channel(OUTPUT_BUFFER);
        let manager = self.clone();
        self.tracker.spawn(async move {
            let started = Instant::now();
            let mut admitted = false;
            let result = manager
                .drive_call(
                    &session,
                    target,
                    timeout,
                    max_runs_in_flight,
                    &events,
                    &mut admitted,
                )
                .await;
            session.touch(|stats| stats.call_count += 1);
            manager
                .metrics
                .record_run(started.elapsed(), result.is_ok());
            if close_after && admitted {
                let cause = Cause {
                    reason: "its one call ended".to_string(),
                    ..Cause::client()
                };
                // Already gone (closed meanwhile) is fine.
                let _ = manager.close_because(session.id(), cause).await;
            }
            // A caller that stopped reading does not hold the task (and the shutdown) forever.
            let finished = events.send(CallEvent::Finished(result));
            let _ = tokio::time::timeout(DELIVERY_TIMEOUT, finished).await;
        });
        Ok(receiver)
    }

    async fn drive_call(
        &self,
        session: &Arc<Session>,
        target: CallTarget,
        timeout: Option<Duration>,
        max_runs_in_flight: Option<u32>,
        events: &mpsc::Sender<CallEvent>,
        admitted: &mut bool,
    ) -> Result<CallOutcome> {
        let deadline = timeout.map(|timeout| tokio::time::Instant::now() + timeout);
        let core = session.core.read().await;
        let worker = usable_worker(session, &core)?;
        let _in_flight = InFlight::enter(session, max_runs_in_flight)?;
        // One call at a time per session, waiting here rather than inside the worker (which
        // runs calls one after another anyway): a call stopped while it waits never reaches
        // the worker, and a stop always concerns the call the worker is running.
        let _turn = tokio::select! {
            turn = session.call_turn.lock() => turn,
            _ = sleep_until(deadline), if deadline.is_some() => {
                return Err(Error::DeadlineExceeded(format!(
                    "the call waited past its timeout of {:?} behind another call of this \
                     session and never ran",
                    timeout.unwrap_or_default()
                )));
            }
            _ = events.closed() => {
                return Err(Error::FailedPrecondition("the caller went away".to_string()));
            }
        };
        *admitted = true;
        let (output, mut outputs) = mpsc::channel(OUTPUT_BUFFER);
        let (started, call_id) = oneshot::channel();
        let call = worker.call_python(target, output, started);
        tokio::pin!(call);
        let exited = worker.exit_signal();
        tokio::pin!(exited);
        let mut call_id = Some(call_id);
        let mut stop: Option<Stop> = None;
        let mut kill_at: Option<tokio::time::Instant> = None;
        let mut outputs_open = true;
        let mut worker_gone = false;
        // A piece of output waiting for room in the caller's stream. While one waits, no more
        // is read from the worker (back-pressure), but every timer stays live: the send is
        // never awaited inside the loop.
        let mut pending: Option<CallOutput> = None;
        let result = loop {
            tokio::select! {
                result = &mut call => break result,
                piece = outputs.recv(), if outputs_open && pending.is_none() => match piece {
                    Some(piece) => {
                        log_output(session.id(), &piece);
                        if stop.is_none() && !worker_gone {
                            pending = Some(piece);
                        }
                    }
                    None => outputs_open = false,
                },
                permit = events.reserve(), if pending.is_some() => match permit {
                    Ok(permit) => {
                        if let Some(piece) = pending.take() {
                            permit.send(CallEvent::Output(piece));
                        }
                    }
                    Err(_) => stop = Some(Stop::CallerGone),
                },
                _ = sleep_until(deadline), if stop.is_none() && deadline.is_some() => {
                    stop = timeout.map(Stop::Deadline);
                }
                _ = events.closed(), if stop.is_none() => stop = Some(Stop::CallerGone),
                // A dead worker's last output is drained, not delivered: the call's answer
                // (its death) must not wait for a caller that does not read.
                _ = &mut exited, if !worker_gone => worker_gone = true,
                _ = sleep_until(kill_at), if kill_at.is_some() => {
                    kill_at = None;
                    let reason = match stop {
                        Some(Stop::Deadline(timeout)) => format!(
                            "a call ran past its timeout of {timeout:?} and did not stop within \
                             {CANCEL_GRACE:?} of being interrupted"
                        ),
                        _ => format!(
                            "the caller went away and the call did not stop within \
                             {CANCEL_GRACE:?} of being interrupted"
                        ),
                    };
                    session.touch_policy(|stats| {
                        stats.pending_kill =
                            Some((worker.pid(), Cause::daemon(Trigger::CallStopped, reason)));
                    });
                    worker.kill_as_failure();
                }
            }
            if stop.is_some() || worker_gone {
                pending = None;
            }
            // A stop was just decided: interrupt the code, and give it a grace period.
            if stop.is_some()
                && kill_at.is_none()
                && let Some(call_id) = call_id.take()
            {
                let worker = worker.clone();
                // Not awaited here: the worker's answer to the cancel may queue behind output
                // this loop must keep draining.
                tokio::spawn(async move {
                    if let Ok(id) = call_id.await {
                        let _ = worker.cancel(id).await;
                    }
                });
                kill_at = Some(tokio::time::Instant::now() + CANCEL_GRACE);
            }
        };
        drop(core);
        // Output the worker sent before its answer, delivered within a bounded wait.
        let mut rest: Vec<CallOutput> = pending.into_iter().collect();
        while let Ok(piece) = outputs.try_recv() {
            log_output(session.id(), &piece);
            rest.push(piece);
        }
        if stop.is_none() {
            let deliver = async {
                for piece in rest {
                    if events.send(CallEvent::Output(piece)).await.is_err() {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DELIVERY_TIMEOUT, deliver).await;
        }
        let killed_by_policy = |error: &Error| {
            matches!(error, Error::WorkerDied { pid, .. } if session.kill_cause(*pid)
                .is_some_and(|cause| cause.trigger != Trigger::CallStopped))
        };
        match (stop, result) {
            (_, Err(error)) if killed_by_policy(&error) => Err(session.explain_kill(error)),
            (None, result) => result.map_err(|error| session.explain_kill(error)),
            (Some(Stop::Deadline(timeout)), Ok(_)) => Err(Error::DeadlineExceeded(format!(
                "the call ran past its timeout of {timeout:?} and was interrupted; the session \
                 and its state are kept"
            ))),
            (Some(Stop::Deadline(timeout)), Err(Error::WorkerDied { .. })) => {
                Err(Error::DeadlineExceeded(format!(
                    "the call ran past its timeout of {timeout:?} and did not stop when \
                     interrupted, so its worker was replaced: the session goes on in a fresh \
                     Python process, without its state"
                )))
            }
            (Some(_), result) => result,
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The code's output goes to the daemon's log too, tagged with its session.
fn log_output(session_id: &str, piece: &CallOutput) {
    let stream = match piece.stream {
        OutputStream::Stdout => "stdout",
        OutputStream::Stderr => "stderr",
    };
    let shown = &piece.data[..piece.data.len().min(LOG_LINE_BYTES)];
    let text = String::from_utf8_lossy(shown);
    tracing::info!(
        target: "tfsd::session_output",
        %session_id,
        stream,
        "{}",
        text.trim_end()
    );
}
