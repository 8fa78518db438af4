//! One worker process: spawn, request/response over the socketpair, exit watching, kill.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};

use super::Runtime;
use super::budget::{self, BufferBudget};
use super::cgroup::WorkerCgroup;
use super::limiter::MemoryLimiter;
use super::sandbox::{PreparedWorker, Sandbox};
use crate::memory::{self, MemoryUsage};
use crate::metrics::Metrics;
use crate::proto::tfsd::worker::v1::{
    CallOutput, WorkerRequest, WorkerResponse, worker_request, worker_response,
};

/// The fd number the worker finds its end of the socketpair on.
pub const WORKER_FD: i32 = 3;
/// How long a worker may pause in the middle of a frame before it counts as hung (see
/// `next_frame`). Between frames it may be silent as long as it likes.
const FRAME_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame either side accepts: big tensors travel in one frame.
const MAX_FRAME_BYTES: usize = 2 << 30;

/// How to start a worker.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub runtime: Runtime,
    /// The program: `tfsd-worker`, or the Python interpreter.
    pub binary: PathBuf,
    /// Its arguments (`-m tfsd_worker` for Python).
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub library_dir: Option<PathBuf>,
    pub start_timeout: Duration,
    /// Where worker starts and exits are counted.
    pub metrics: Arc<Metrics>,
    /// What holds each worker to its session's hard limit (a cgroup, an rlimit, or only
    /// the policy's sampling).
    pub limiter: Arc<MemoryLimiter>,
    /// The sandbox each worker starts in; `None` when it is off.
    pub sandbox: Option<Arc<Sandbox>>,
    /// What the daemon may hold of large frames at once, shared by every worker.
    pub budget: BufferBudget,
}

/// How a worker process ended, in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitDescription {
    text: String,
    how: ExitKind,
    /// Set when the kernel killed the worker at its cgroup's memory limit: that limit.
    memory_limit: Option<u64>,
}

/// How a process ended, as the supervisor branches on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Signal(i32),
    Code(i32),
    /// It could not be waited for.
    Unknown,
}

impl ExitDescription {
    fn from_status(status: ExitStatus) -> ExitDescription {
        if let Some(signal) = status.signal() {
            let name = signal_name(signal);
            let core = if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            };
            ExitDescription {
                text: format!("killed by signal {signal} ({name}{core})"),
                how: ExitKind::Signal(signal),
                memory_limit: None,
            }
        } else {
            let code = status.code().unwrap_or_default();
            ExitDescription {
                text: format!("exited with code {code}"),
                how: ExitKind::Code(code),
                memory_limit: None,
            }
        }
    }

    fn other(text: String) -> ExitDescription {
        ExitDescription {
            text,
            how: ExitKind::Unknown,
            memory_limit: None,
        }
    }

    /// This SIGKILL came from the kernel, at the worker's cgroup memory limit of `limit`.
    fn at_memory_limit(self, limit: u64) -> ExitDescription {
        ExitDescription {
            text: format!(
                "killed by the kernel at its memory limit ({:.1} MiB, the session's hard \
                 limit, enforced by its cgroup)",
                limit as f64 / (1024.0 * 1024.0)
            ),
            memory_limit: Some(limit),
            ..self
        }
    }

    /// The cgroup memory limit the kernel killed the worker at, if that is how it died.
    pub fn memory_limit(&self) -> Option<u64> {
        self.memory_limit
    }

    pub fn kind(&self) -> ExitKind {
        self.how
    }

    /// Killed with SIGKILL: by tfsd, an operator, or the kernel's OOM killer.
    pub fn was_killed(&self) -> bool {
        self.how == ExitKind::Signal(libc::SIGKILL)
    }

    /// Short and label-friendly, for metrics: the signal's name or `exit_code_N`.
    pub fn cause(&self) -> String {
        match self.how {
            ExitKind::Signal(signal) => signal_name(signal).to_string(),
            ExitKind::Code(code) => format!("exit_code_{code}"),
            ExitKind::Unknown => "unknown".to_string(),
        }
    }
}

impl fmt::Display for ExitDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGINT => "SIGINT",
        _ => "signal",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("worker pid {pid} died: {how}")]
    Died { pid: u32, how: ExitDescription },
    #[error("could not start worker {binary}: {reason}")]
    Start { binary: String, reason: String },
    #[error("worker protocol error: {0}")]
    Protocol(String),
    /// Too many creates already wait for a worker (workers.max_waiting_creates).
    #[error("{0}")]
    Busy(String),
    /// No start slot came free within workers.start_wait.
    #[error("{0}")]
    StartWait(String),
}

pub(super) type Reply = Result<worker_response::Result, WorkerError>;

/// A request waiting for its answer, and where the output frames of a Python call go until
/// the final answer comes.
struct Waiter {
    reply: oneshot::Sender<Reply>,
    output: Option<mpsc::Sender<CallOutput>>,
}

/// Requests waiting for their response. `None` once the worker has exited: a request made
/// after that fails at once instead of waiting for an answer that cannot come.
type Pending = Mutex<Option<HashMap<u64, Waiter>>>;

/// A running worker. Cheap to share (`Arc`); the process is killed when the last handle
/// goes, and always reaped by its exit watcher.
pub struct WorkerProcess {
    pid: u32,
    runtime: Runtime,
    tensorflow_version: String,
    /// The runtime's own description of itself (Python, TensorFlow and Keras versions).
    runtime_description: String,
    /// Frames are written whole under this lock; see `send_frame`.
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    pending: Arc<Pending>,
    next_id: AtomicU64,
    exit: watch::Receiver<Option<ExitDescription>>,
    kill: Arc<Mutex<Option<oneshot::Sender<()>>>>,
    /// Set before the supervisor kills the worker on purpose, so that the exit is not
    /// reported as a crash.
    expected_exit: Arc<AtomicBool>,
    /// The session this worker serves, for tagging its stderr lines in the log.
    session_id: Arc<Mutex<Option<String>>>,
    /// Its cgroup, under cgroup enforcement. Owned by the exit watcher, which removes it
    /// once the worker is reaped (off the async threads); gone after that.
    cgroup: Option<std::sync::Weak<WorkerCgroup>>,
    /// Whether its hard limit is an RLIMIT_DATA (the backstop without cgroups).
    rlimit_backstop: bool,
    /// Its sandbox's scratch directory (removed once it is reaped).
    scratch: Option<PathBuf>,
}

impl fmt::Debug for WorkerProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerProcess")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl WorkerProcess {
    /// Starts a worker and waits (up to the spec's start timeout) until it says it is ready.
    pub async fn spawn(spec: &WorkerSpec) -> Result<Arc<WorkerProcess>, WorkerError> {
        let start_error = |reason: String| WorkerError::Start {
            binary: spec.binary.display().to_string(),
            reason,
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|error| start_error(format!("socketpair: {error}")))?;
        let theirs = OwnedFd::from(theirs);
        let their_fd = theirs.as_raw_fd();

        let cgroup = spec
            .limiter
            .worker_cgroup()
            .map_err(|error| start_error(format!("could not make the worker's cgroup: {error}")))?
            .map(Arc::new);
        let sandbox = match &spec.sandbox {
            Some(sandbox) => Some(Arc::new(sandbox.prepare(&spec.binary).map_err(
                |error| start_error(format!("could not prepare the worker's sandbox: {error}")),
            )?)),
            None => None,
        };

        let scratch = sandbox
            .as_ref()
            .and_then(|sandbox| sandbox.scratch_dir().map(PathBuf::from));
        let mut command = Command::new(&spec.binary);
        if let Some(sandbox) = &sandbox {
            // First, so that the operator's own env (workers.env, python.env) wins.
            command.envs(sandbox.env());
        }
        command
            .args(&spec.args)
            .envs(&spec.env)
            .env("TFSD_WORKER_FD", WORKER_FD.to_string())
            .env("TFSD_SUPERVISOR_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = &spec.library_dir {
            let mut path = dir.as_os_str().to_owned();
            if let Some(existing) = std::env::var_os("LD_LIBRARY_PATH") {
                path.push(":");
                path.push(existing);
            }
            command.env("LD_LIBRARY_PATH", path);
        }
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // async-signal-safe functions (dup2, fcntl, prctl, setpgid, getppid, kill; the
        // cgroup join and the sandbox are single system calls on what was prepared above).
        unsafe {
            let parent = libc::getpid();
            let (cgroup, sandbox) = (cgroup.clone(), sandbox.clone());
            command.pre_exec(move || {
                if their_fd == WORKER_FD {
                    // dup2 onto itself would keep FD_CLOEXEC; clear it by hand.
                    if libc::fcntl(WORKER_FD, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(their_fd, WORKER_FD) < 0 {
                    // dup2 clears FD_CLOEXEC on the new descriptor, so fd 3 survives exec.
                    return Err(std::io::Error::last_os_error());
                }
                // Die with the supervisor, even if it is killed with SIGKILL.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                // Own process group: a Ctrl-C at the daemon's terminal reaches the supervisor,
                // which then stops workers in order, instead of killing them mid-step.
                libc::setpgid(0, 0);
                // Into its cgroup before it allocates anything, then into its sandbox (which
                // would forbid writing to the cgroup file system).
                if let Some(cgroup) = &cgroup {
                    cgroup.join_in_child()?;
                }
                if let Some(sandbox) = &sandbox {
                    sandbox.apply_in_child()?;
                }
                Ok(())
            });
        }
        let spawned = command.spawn();
        // The pre_exec closure holds the cgroup too: only the exit watcher may keep it.
        drop(command);
        let mut child = spawned.map_err(|error| start_error(error.to_string()))?;
        drop(theirs);
        let pid = child.id().unwrap_or_default();

        let session_id = Arc::new(Mutex::new(None));
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(forward_stderr(pid, session_id.clone(), stderr));
        }

        ours.set_nonblocking(true)
            .map_err(|error| start_error(error.to_string()))?;
        let stream = UnixStream::from_std(ours).map_err(|error| start_error(error.to_string()))?;
        let (read_half, write_half) = stream.into_split();
        let mut reader = BufReader::new(read_half);

        let pending: Arc<Pending> = Arc::new(Mutex::new(Some(HashMap::new())));
        let (exit_tx, exit_rx) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel();
        let expected_exit = Arc::new(AtomicBool::new(false));
        spec.metrics.record_worker_spawn();
        tokio::spawn(watch_exit(
            child,
            pid,
            kill_rx,
            pending.clone(),
            exit_tx,
            ExitAccounting {
                expected: expected_exit.clone(),
                metrics: spec.metrics.clone(),
                cgroup: cgroup.clone(),
                sandbox,
            },
        ));

        // The first frame is Ready, sent once TensorFlow is loaded.
        let mut exit_for_start = exit_rx.clone();
        let ready = tokio::time::timeout(spec.start_timeout, async {
            tokio::select! {
                frame = next_frame(&mut reader, &spec.budget) => Ok(frame),
                _ = exit_for_start.wait_for(Option::is_some) => Err(()),
            }
        })
        .await;
        let kill_now = |tx: oneshot::Sender<()>| {
            let _ = tx.send(());
        };
        let ready = match ready {
            Ok(Ok(Ok(Some(frame)))) => {
                WorkerResponse::decode(frame)
                    .ok()
                    .and_then(|response| match response.result {
                        Some(worker_response::Result::Ready(ready)) => Some(ready),
                        _ => None,
                    })
            }
            Err(_) => {
                kill_now(kill_tx);
                return Err(start_error(format!(
                    "not ready after {:?} (raise workers.start_timeout if TensorFlow loads slowly)",
                    spec.start_timeout
                )));
            }
            _ => None,
        };
        let Some(ready) = ready else {
            let how = exit_rx
                .clone()
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|exit| exit.clone());
            kill_now(kill_tx);
            let how = how.map_or_else(|| "it sent no ready message".to_string(), |how| how.text);
            return Err(start_error(format!(
                "the worker {how} before it was ready (its stderr is in the daemon's log)"
            )));
        };

        let kill = Arc::new(Mutex::new(Some(kill_tx)));
        tokio::spawn(read_responses(
            reader,
            spec.budget.clone(),
            pending.clone(),
            pid,
            kill.clone(),
        ));
        tracing::debug!(worker_pid = pid, runtime = %spec.runtime, tensorflow = %ready.tensorflow_version, "worker ready");
        Ok(Arc::new(WorkerProcess {
            pid,
            runtime: spec.runtime,
            tensorflow_version: ready.tensorflow_version,
            runtime_description: ready.runtime,
            writer: Arc::new(tokio::sync::Mutex::new(write_half)),
            pending,
            next_id: AtomicU64::new(1),
            exit: exit_rx,
            kill,
            expected_exit,
            session_id,
            cgroup: cgroup.as_ref().map(Arc::downgrade),
            rlimit_backstop: spec.limiter.uses_rlimit(),
            scratch,
        }))
    }

    /// Has the kernel hold this worker to `hard_limit` (its session's; `None` for none): its
    /// cgroup's memory limit, or under the rlimit backstop its RLIMIT_DATA. Under sampling
    /// only, nothing.
    pub fn confine_memory(&self, hard_limit: Option<u64>) -> std::io::Result<()> {
        if let Some(cgroup) = &self.cgroup {
            let Some(cgroup) = cgroup.upgrade() else {
                return Err(std::io::Error::other("the worker has exited"));
            };
            cgroup.set_memory_limit(hard_limit)
        } else if self.rlimit_backstop {
            super::limiter::set_data_rlimit(self.pid, hard_limit)
        } else {
            Ok(())
        }
    }

    /// Whether its hard limit is held by the rlimit backstop.
    pub fn uses_rlimit_backstop(&self) -> bool {
        self.rlimit_backstop
    }

    /// The worker's scratch directory, the one place its sandbox lets it write.
    pub fn scratch_dir(&self) -> Option<&std::path::Path> {
        self.scratch.as_deref()
    }

    /// Memory charged to the worker's cgroup (page cache and kernel memory included), under
    /// cgroup enforcement.
    pub fn cgroup_memory(&self) -> Option<u64> {
        self.cgroup.as_ref()?.upgrade()?.memory_current()
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn tensorflow_version(&self) -> &str {
        &self.tensorflow_version
    }

    pub fn runtime(&self) -> Runtime {
        self.runtime
    }

    /// What the worker said it runs (for a Python worker: Python, TensorFlow, Keras versions).
    pub fn runtime_description(&self) -> &str {
        &self.runtime_description
    }

    /// Tags this worker's log lines (TensorFlow's stderr) with the session it serves.
    pub fn assign_session(&self, session_id: &str) {
        *self.session_id.lock().unwrap_or_else(|e| e.into_inner()) = Some(session_id.to_string());
    }

    /// The worker's memory now; zeros once it is gone.
    pub fn memory(&self) -> MemoryUsage {
        let Ok(mut usage) = memory::process_memory(self.pid) else {
            return MemoryUsage::default();
        };
        usage.cgroup_bytes = self.cgroup_memory().unwrap_or(0);
        usage
    }

    /// How the worker ended, if it has.
    pub fn exit_description(&self) -> Option<ExitDescription> {
        self.exit.borrow().clone()
    }

    /// Waits until the process has exited and been reaped.
    pub async fn exited(&self) -> ExitDescription {
        let mut exit = self.exit.clone();
        match exit.wait_for(Option::is_some).await {
            Ok(description) => description.clone().unwrap_or_else(unknown_exit),
            // The watcher is gone only after it published the exit.
            Err(_) => self.exit_description().unwrap_or_else(unknown_exit),
        }
    }

    /// A future that completes when the process has exited, without holding the worker.
    pub fn exit_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut exit = self.exit.clone();
        async move {
            let _ = exit.wait_for(Option::is_some).await;
        }
    }

    /// True when the supervisor stopped this worker on purpose.
    pub fn exit_was_expected(&self) -> bool {
        self.expected_exit.load(Ordering::SeqCst)
    }

    /// Sends one request and waits for its response. A TensorFlow error is a normal response
    /// (`worker_response::Result::Error`); `Err` means the worker or the protocol failed.
    /// Only the typed operations (`operations.rs`) call this.
    pub(super) async fn call(&self, kind: worker_request::Kind) -> Reply {
        self.call_streaming(kind, None, None).await
    }

    /// `call`, with the output frames a Python call sends before its answer forwarded to
    /// `output`, and the request's id sent on `started` once it is registered.
    pub(super) async fn call_streaming(
        &self,
        kind: worker_request::Kind,
        output: Option<mpsc::Sender<CallOutput>>,
        started: Option<oneshot::Sender<u64>>,
    ) -> Reply {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            match pending.as_mut() {
                Some(map) => {
                    map.insert(id, Waiter { reply: tx, output });
                }
                None => return Err(self.died()),
            }
        }
        if let Some(started) = started {
            let _ = started.send(id);
        }
        let request = WorkerRequest {
            id,
            kind: Some(kind),
        };
        let length = request.encoded_len();
        if length > MAX_FRAME_BYTES {
            self.forget(id);
            return Err(WorkerError::Protocol(format!(
                "a request of {length} bytes is larger than a worker frame may be \
                 ({MAX_FRAME_BYTES} bytes)"
            )));
        }
        // The one copy of the payload on the way out: the frame is encoded straight into
        // the buffer that is written to the socket. Not counted in the budget: the client's
        // request is already decoded in full (tonic), and waiting for the budget here while
        // a worker waits to hand over its answer could close a cycle.
        let mut frame = Vec::with_capacity(4 + length);
        frame.extend_from_slice(&(length as u32).to_be_bytes());
        request
            .encode(&mut frame)
            .expect("a Vec grows to fit the message");
        if self.send_frame(Bytes::from(frame)).await.is_err() {
            // The socket is gone: the worker died or is dying. Its exit watcher answers this
            // request with the exit status, which says more than the write error.
            return match rx.await {
                Ok(reply) => reply,
                Err(_) => Err(self.died()),
            };
        }
        match rx.await {
            Ok(reply) => reply,
            Err(_) => Err(self.died()),
        }
    }

    /// Writes one frame (4-byte big-endian length, then the message: `LengthDelimitedCodec`'s
    /// framing, which the worker reads). Written from the caller's task, without a hand-off;
    /// a frame that does not fit the socket's buffer at once is finished by a task of its
    /// own, so that a caller whose RPC is cancelled never leaves half a frame behind.
    async fn send_frame(&self, frame: Bytes) -> std::io::Result<()> {
        let mut writer = self.writer.clone().lock_owned().await;
        let mut written = 0;
        while written < frame.len() {
            match writer.try_write(&frame[written..]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    let rest = frame.slice(written..);
                    return tokio::spawn(async move {
                        use tokio::io::AsyncWriteExt;
                        writer.write_all(&rest).await
                    })
                    .await
                    .unwrap_or_else(|join| Err(std::io::Error::other(join)));
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    fn forget(&self, id: u64) {
        if let Some(map) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            map.remove(&id);
        }
    }

    fn died(&self) -> WorkerError {
        WorkerError::Died {
            pid: self.pid,
            how: self.exit_description().unwrap_or_else(unknown_exit),
        }
    }

    /// Kills the worker without marking the exit as expected, so that whoever watches it
    /// (the session's monitor) handles it like a crash and restores the session. Used by the
    /// memory policy's hard limit, which must stop a step that is still running.
    pub fn kill_as_failure(&self) {
        self.signal_kill();
    }

    /// Kills the worker on purpose without waiting for it to be reaped: the requests on it
    /// fail at once, and no restore follows (its exit is expected).
    pub fn kill_expected(&self) {
        self.expected_exit.store(true, Ordering::SeqCst);
        self.signal_kill();
    }

    /// The process's scheduling state from /proc/PID/stat (`R`, `S`, `D`, `T` stopped, `t`
    /// stopped by a tracer, `Z`...); `None` once it is gone.
    pub fn process_state(&self) -> Option<char> {
        self.stat_fields()?.first()?.chars().next()
    }

    /// CPU time the process has used so far (user + system, in clock ticks); `None` once it
    /// is gone. Whether it grows tells a worker busy inside a long kernel from a hung one.
    pub fn cpu_ticks(&self) -> Option<u64> {
        let fields = self.stat_fields()?;
        // utime and stime are fields 14 and 15 of /proc/PID/stat; `fields` starts at 3.
        let user: u64 = fields.get(11)?.parse().ok()?;
        let system: u64 = fields.get(12)?.parse().ok()?;
        Some(user + system)
    }

    /// The fields of /proc/PID/stat after the command name (the state first).
    fn stat_fields(&self) -> Option<Vec<String>> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // The command name is in parentheses and may itself hold spaces or parentheses: the
        // state is the first field after the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        Some(rest.split_whitespace().map(str::to_string).collect())
    }

    /// Kills the worker on purpose and waits until it is reaped.
    pub async fn stop(&self) -> ExitDescription {
        self.expected_exit.store(true, Ordering::SeqCst);
        self.signal_kill();
        self.exited().await
    }

    fn signal_kill(&self) {
        let sender = self.kill.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(sender) = sender {
            let _ = sender.send(());
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // The watcher task kills and reaps; it outlives this handle.
        self.expected_exit.store(true, Ordering::SeqCst);
        self.signal_kill();
    }
}

fn unknown_exit() -> ExitDescription {
    ExitDescription::other("exited".to_string())
}

/// What the exit watcher needs to count an exit under the right cause.
struct ExitAccounting {
    expected: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    /// Read for OOM kills, then removed, once the worker is reaped.
    cgroup: Option<Arc<WorkerCgroup>>,
    /// Its scratch directory is removed once the worker is reaped.
    sandbox: Option<Arc<PreparedWorker>>,
}

/// Owns the child: reaps it when it exits on its own, or kills then reaps it when asked.
/// Then fails every pending request with the exit status and publishes the exit.
async fn watch_exit(
    mut child: Child,
    pid: u32,
    kill: oneshot::Receiver<()>,
    pending: Arc<Pending>,
    exit: watch::Sender<Option<ExitDescription>>,
    mut accounting: ExitAccounting,
) {
    let status = tokio::select! {
        status = child.wait() => status,
        _ = kill => {
            // The whole process group: the worker leads its own (see `spawn`), and what its
            // code started (a Python session's subprocesses) must not outlive it. The group
            // is still the worker's: it has not been reaped yet.
            // (A pid of 0 would name the supervisor's own group: never signal that.)
            if let Ok(group) = libc::pid_t::try_from(pid)
                && group > 0
            {
                // SAFETY: kill(2) with a negative pid signals a process group; no memory is
                // touched.
                unsafe {
                    libc::kill(-group, libc::SIGKILL);
                }
            }
            let _ = child.start_kill();
            child.wait().await
        }
    };
    let mut description = match status {
        Ok(status) => ExitDescription::from_status(status),
        Err(error) => ExitDescription::other(format!("could not be waited for: {error}")),
    };
    if let Some(cgroup) = &accounting.cgroup
        && description.was_killed()
        && !accounting.expected.load(Ordering::SeqCst)
        && cgroup.killed_at_own_limit()
        && let Some(limit) = cgroup.memory_limit()
    {
        description = description.at_memory_limit(limit);
    }
    // The cgroup and the scratch directory go with the worker (off the async threads: a
    // leftover process in the cgroup is killed and waited for).
    let (cgroup, sandbox) = (accounting.cgroup.take(), accounting.sandbox.take());
    if cgroup.is_some() || sandbox.is_some() {
        tokio::task::spawn_blocking(move || drop((cgroup, sandbox)));
    }
    tracing::debug!(worker_pid = pid, how = %description, "worker reaped");
    if accounting.expected.load(Ordering::SeqCst) {
        accounting.metrics.record_worker_exit("stopped");
    } else {
        accounting.metrics.record_worker_exit(&description.cause());
    }
    let waiting = pending.lock().unwrap_or_else(|e| e.into_inner()).take();
    for (_, waiter) in waiting.into_iter().flatten() {
        let _ = waiter.reply.send(Err(WorkerError::Died {
            pid,
            how: description.clone(),
        }));
    }
    let _ = exit.send(Some(description));
}

/// Routes each response frame to the request waiting for it. A stream that breaks while the
/// worker lives (a frame over the size limit, bytes out of step) kills the worker: the
/// requests waiting on it then fail with its exit, and the session is restored, instead of
/// waiting forever for answers that can no longer be read.
async fn read_responses(
    mut reader: BufReader<OwnedReadHalf>,
    budget: BufferBudget,
    pending: Arc<Pending>,
    pid: u32,
    kill: Arc<Mutex<Option<oneshot::Sender<()>>>>,
) {
    loop {
        let frame = match next_frame(&mut reader, &budget).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            // A worker killed with frames unread resets the socket, or ends it mid-frame:
            // that is its exit, which the exit watcher reports, not a broken stream.
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                return;
            }
            Err(error) => {
                tracing::error!(worker_pid = pid, %error, "unreadable stream from a worker: killing it");
                if let Some(kill) = kill.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = kill.send(());
                }
                return;
            }
        };
        let response = match WorkerResponse::decode(frame) {
            Ok(response) => response,
            Err(error) => {
                tracing::error!(%error, "undecodable frame from a worker");
                continue;
            }
        };
        if let Some(worker_response::Result::Output(output)) = response.result {
            // Not the answer yet: a piece of a Python call's output. Sent without holding
            // the lock; a full channel holds this worker's answers back (bounded memory).
            let sink = pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .and_then(|map| map.get(&response.id))
                .and_then(|waiter| waiter.output.clone());
            if let Some(sink) = sink {
                let _ = sink.send(output).await;
            }
            continue;
        }
        let waiter = pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .and_then(|map| map.remove(&response.id));
        if let Some(waiter) = waiter {
            let reply = response
                .result
                .ok_or_else(|| WorkerError::Protocol("a response without a result".into()));
            let _ = waiter.reply.send(reply);
        }
    }
}

/// Reads one frame (a 4-byte big-endian length, then the message), its buffer sized from
/// the length. A large frame first reserves its size from the daemon's budget, before a byte
/// of its body is read: until there is room the worker waits on a full socket. The
/// reservation lives in the returned `Bytes` and every slice decoded from it. `None`: the
/// worker closed the socket between frames.
async fn next_frame(
    reader: &mut BufReader<OwnedReadHalf>,
    budget: &BufferBudget,
) -> std::io::Result<Option<Bytes>> {
    let mut header = [0u8; 4];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let length = u32::from_be_bytes(header) as usize;
    if length > MAX_FRAME_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {length} bytes (at most {MAX_FRAME_BYTES})"),
        ));
    }
    let reservation = budget.reserve(length).await;
    let mut body = vec![0; length];
    // The reservation is held from here: a worker that stops sending mid-frame (stopped,
    // or session code writing to the socket itself) would hold it, and with it every
    // other worker's large answers, for good. A frame's bytes come at memory speed: a
    // pause this long means the worker is no longer sending, and it is killed.
    let mut filled = 0;
    while filled < length {
        match tokio::time::timeout(FRAME_STALL_TIMEOUT, reader.read(&mut body[filled..])).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(Ok(read)) => filled += read,
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "stopped sending a frame of {length} bytes for {FRAME_STALL_TIMEOUT:?} \
                         after {filled} bytes"
                    ),
                ));
            }
        }
    }
    Ok(Some(budget::hold(body, reservation)))
}

/// Forwards TensorFlow's stderr lines to the daemon's log, one event per line, tagged with
/// the worker's pid and the session it serves (empty while it waits in the warm pool).
async fn forward_stderr(
    pid: u32,
    session_id: Arc<Mutex<Option<String>>>,
    stderr: tokio::process::ChildStderr,
) {
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let session_id = session_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default();
        tracing::info!(target: "tfsd::worker_stderr", worker_pid = pid, %session_id, "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn frame(length: usize, fill: u8) -> Vec<u8> {
        let mut frame = (length as u32).to_be_bytes().to_vec();
        frame.resize(4 + length, fill);
        frame
    }

    /// A worker's large answer is not read while the budget is held: the second frame waits
    /// (its bytes stay in the socket) until every slice of the first is dropped.
    #[tokio::test]
    async fn a_large_frame_waits_for_the_budget_before_it_is_read() {
        let (ours, mut worker) = UnixStream::pair().expect("socketpair");
        let (read_half, _write_half) = ours.into_split();
        let mut reader = BufReader::new(read_half);
        let budget = BufferBudget::new(4 << 20);
        let writer = tokio::spawn(async move {
            worker.write_all(&frame(3 << 20, 1)).await.expect("first");
            worker.write_all(&frame(3 << 20, 2)).await.expect("second");
            worker.write_all(&frame(16, 3)).await.expect("small");
            worker
        });
        let first = next_frame(&mut reader, &budget)
            .await
            .expect("read")
            .expect("a frame");
        assert_eq!(first.len(), 3 << 20);
        let kept = first.slice(0..8);
        drop(first);
        let second = {
            let second = next_frame(&mut reader, &budget);
            tokio::pin!(second);
            for _ in 0..16 {
                assert!(
                    futures::poll!(second.as_mut()).is_pending(),
                    "read while the first frame's slice holds the budget"
                );
                tokio::task::yield_now().await;
            }
            drop(kept);
            second.await.expect("read").expect("a frame")
        };
        assert!(second.iter().all(|byte| *byte == 2));
        // Small frames pass while the budget is held.
        let small = next_frame(&mut reader, &budget)
            .await
            .expect("read")
            .expect("a frame");
        assert_eq!(&small[..], &[3; 16]);
        drop(writer.await.expect("writer"));
        assert!(
            next_frame(&mut reader, &budget)
                .await
                .expect("eof")
                .is_none()
        );
    }
}
