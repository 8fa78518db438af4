//! `tfsd-worker`: one tfsd session's process. It links libtensorflow, hosts one graph and one
//! TensorFlow session, and answers the supervisor's requests on the socketpair it inherits
//! as fd 3 (protocol: `proto/tfsd/worker/v1/worker.proto`). It exits when that socket closes
//! or, through `PR_SET_PDEATHSIG`, when the supervisor dies.

mod byte_string;
mod failure;
mod runtime;

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use prost::Message;
use tfsd_protocol::tfsd::worker::v1 as wire;
use wire::{worker_request::Kind, worker_response::Result as Reply};

use crate::failure::Failure;
use crate::runtime::Runtime;

/// Largest frame either side accepts (the supervisor uses the same limit).
const MAX_FRAME_BYTES: usize = 2 << 30;
/// Most requests handled at once (concurrent runs on the session; tokio's blocking pool,
/// which this replaces, had the same cap). Past it, requests wait for a free thread.
const MAX_HANDLERS: usize = 512;
/// Stack of a handler thread: with `inter_op_parallelism_threads = -1` TensorFlow runs the
/// step's kernels on it, so it gets the size TensorFlow gives its own threads.
const HANDLER_STACK_BYTES: usize = 8 << 20;

fn main() -> anyhow::Result<()> {
    let fd: i32 = std::env::var("TFSD_WORKER_FD")
        .context("TFSD_WORKER_FD is not set: tfsd-worker is started by the tfsd daemon")?
        .parse()
        .context("TFSD_WORKER_FD is not a number")?;
    if let Ok(supervisor) = std::env::var("TFSD_SUPERVISOR_PID") {
        // The supervisor may have died between fork and PR_SET_PDEATHSIG taking effect.
        // SAFETY: getppid has no preconditions.
        if supervisor.parse::<i32>().ok() != Some(unsafe { libc::getppid() }) {
            bail!("the tfsd supervisor (pid {supervisor}) is gone");
        }
    }
    tune_allocator();
    let runtime = Runtime::new().map_err(|f| anyhow::anyhow!(f.message))?;
    // SAFETY: fd 3 was set up by the supervisor for this process and nothing else owns it.
    let socket = unsafe { UnixStream::from_raw_fd(fd) };
    let worker = Arc::new(Worker {
        runtime,
        writer: Mutex::new(socket.try_clone()?),
        reader: Mutex::new(socket),
        handlers: AtomicUsize::new(1),
        waiting: AtomicUsize::new(0),
    });
    let tensorflow_version = tensorflow::version().unwrap_or_default();
    let ready = wire::WorkerResponse {
        id: 0,
        result: Some(Reply::Ready(wire::Ready {
            pid: std::process::id(),
            runtime: format!(
                "tfsd-worker {}, tensorflow {tensorflow_version}",
                env!("CARGO_PKG_VERSION")
            ),
            tensorflow_version,
        })),
    };
    worker.send(&ready)?;
    worker.serve()
}

/// The worker's threads, in the leader/follower pattern: whichever thread holds `reader`
/// reads the next request, lets go of `reader` (so another thread reads the one after) and
/// handles the request itself, writing the response straight to the socket. A request thus
/// runs on the thread the kernel woke with its bytes: no hand-off between threads on the
/// way in or out (the tokio version this replaces crossed four per step). A thread is added
/// when a request arrives and no other thread is waiting to read, so requests never wait
/// for one another (concurrent runs, a run blocked on a queue that a later run fills).
struct Worker {
    runtime: Runtime,
    reader: Mutex<UnixStream>,
    writer: Mutex<UnixStream>,
    /// Threads serving requests (at most MAX_HANDLERS).
    handlers: AtomicUsize,
    /// Threads waiting for `reader`.
    waiting: AtomicUsize,
}

impl Worker {
    fn serve(self: Arc<Self>) -> anyhow::Result<()> {
        loop {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let frame = {
                let mut reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                read_frame(&mut reader)
            };
            let request = match frame {
                Ok(Some(frame)) => wire::WorkerRequest::decode(bytes::Bytes::from(frame))?,
                // The supervisor closed the socket: it is done with this worker, or gone.
                // Leave at once; the OS takes back every byte TensorFlow held.
                Ok(None) => std::process::exit(0),
                Err(error) => return Err(error),
            };
            if self.waiting.load(Ordering::SeqCst) == 0 {
                self.add_handler();
            }
            let response = wire::WorkerResponse {
                id: request.id,
                result: Some(self.answer(request.kind)),
            };
            if self.send(&response).is_err() {
                std::process::exit(0);
            }
        }
    }

    /// Starts one more thread to read the next request, unless there are enough.
    fn add_handler(self: &Arc<Self>) {
        let added = self
            .handlers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_HANDLERS).then_some(n + 1)
            })
            .is_ok();
        if !added {
            return;
        }
        let worker = self.clone();
        let spawned = std::thread::Builder::new()
            .name("tfsd-handler".into())
            .stack_size(HANDLER_STACK_BYTES)
            .spawn(move || {
                if let Err(error) = worker.serve() {
                    eprintln!("tfsd-worker: {error:#}");
                    std::process::exit(1);
                }
            });
        if spawned.is_err() {
            self.handlers.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Handles one request. A panic (a bug in tfsd or in the TensorFlow binding) still
    /// answers it, or the client would wait forever.
    fn answer(&self, kind: Option<Kind>) -> Reply {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle(&self.runtime, kind)))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic");
                Err(Failure::internal(format!(
                    "the worker failed while handling this request: {what}"
                )))
            })
            .unwrap_or_else(|failure| {
                Reply::Error(wire::Error {
                    code: failure.code,
                    message: failure.message,
                })
            })
    }

    /// Writes one response frame: a 4-byte big-endian length, then the message (the framing
    /// of tokio-util's `LengthDelimitedCodec`, which the supervisor reads with).
    fn send(&self, response: &wire::WorkerResponse) -> std::io::Result<()> {
        let length = response.encoded_len();
        if length > MAX_FRAME_BYTES {
            let refusal = wire::WorkerResponse {
                id: response.id,
                result: Some(Reply::Error(wire::Error {
                    code: Failure::RESOURCE_EXHAUSTED,
                    message: format!(
                        "the answer is {length} bytes, more than the supervisor and its \
                         worker exchange in one message ({MAX_FRAME_BYTES} bytes): fetch less \
                         in one step"
                    ),
                })),
            };
            return self.send(&refusal);
        }
        let mut frame = Vec::with_capacity(4 + length);
        frame.extend_from_slice(&(length as u32).to_be_bytes());
        response
            .encode(&mut frame)
            .expect("a Vec grows to fit the message");
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        writer.write_all(&frame)
    }
}

/// Reads one length-delimited frame; `None` when the socket closed between frames.
fn read_frame(reader: &mut UnixStream) -> anyhow::Result<Option<Vec<u8>>> {
    let mut head = [0u8; 4];
    match reader.read_exact(&mut head) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error).context("read a frame from the supervisor"),
    }
    let length = u32::from_be_bytes(head) as usize;
    if length > MAX_FRAME_BYTES {
        bail!("the supervisor sent a frame of {length} bytes (most: {MAX_FRAME_BYTES})");
    }
    // read_to_end fills the spare capacity without zeroing it first.
    let mut frame = Vec::with_capacity(length);
    reader
        .take(length as u64)
        .read_to_end(&mut frame)
        .context("read a frame from the supervisor")?;
    if frame.len() < length {
        return Ok(None);
    }
    Ok(Some(frame))
}

/// Makes freed tensor memory go back to the OS. glibc serves big allocations with mmap
/// (returned at free) but raises that threshold dynamically up to 32 MiB after the first
/// big free, after which tensors of a few MiB come from the heap and stay there when a
/// purge frees them. A fixed threshold stops the drift.
fn tune_allocator() {
    /// Allocations from this size up are mmapped, and unmapped when freed.
    const MMAP_THRESHOLD: i32 = 1 << 20;
    // SAFETY: mallopt only changes allocator parameters; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

fn handle(runtime: &Runtime, kind: Option<Kind>) -> Result<Reply, Failure> {
    let done = || Reply::Done(wire::Done {});
    match kind.ok_or_else(|| Failure::invalid_argument("a request without a kind"))? {
        Kind::Load(load) => runtime.load(&load.graph_def, &load.config).map(|()| done()),
        Kind::Extend(extend) => runtime.extend(&extend.graph_def).map(|()| done()),
        Kind::Run(run) => runtime
            .run(run)
            .map(|outputs| Reply::Run(wire::RunResult { outputs })),
        Kind::ResetGraph(_) => runtime.reset_graph().map(|()| done()),
        Kind::SetDataLimit(limit) => set_data_limit(limit.bytes).map(|()| done()),
        Kind::PurgeVariables(_) => runtime.purge_variables().map(|()| done()),
        Kind::ExportVariables(_) => runtime
            .export_variables()
            .map(|variables| Reply::Variables(wire::Variables { variables })),
        Kind::ImportVariables(import) => {
            runtime.import_variables(import.variables).map(|()| done())
        }
        Kind::PartialRunSetup(setup) => runtime
            .partial_run_setup(setup)
            .map(|handle| Reply::PartialRunHandle(wire::PartialRunHandle { handle })),
        Kind::PartialRun(run) => runtime
            .partial_run(run)
            .map(|outputs| Reply::Run(wire::RunResult { outputs })),
        // The Python runtime's operations: a graph session runs no Python code, and carries
        // its state as variables (ExportVariables / ImportVariables).
        Kind::Call(_) | Kind::Cancel(_) | Kind::ExportState(_) | Kind::ImportState(_) => {
            Err(Failure::new(
                UNIMPLEMENTED,
                "a graph worker runs no Python code: this operation applies to Python sessions",
            ))
        }
    }
}

/// TensorFlow's (and gRPC's) status code for an operation a runtime does not implement.
const UNIMPLEMENTED: i32 = 12;

/// RLIMIT_DATA, soft and hard, on this process (lowering needs no privilege; raising past
/// the hard limit is refused, which keeps a session from lifting its own limit).
fn set_data_limit(bytes: u64) -> Result<(), Failure> {
    let value = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: setrlimit reads the struct passed.
    if unsafe { libc::setrlimit(libc::RLIMIT_DATA, &value) } == 0 {
        Ok(())
    } else {
        Err(Failure::internal(format!(
            "setrlimit(RLIMIT_DATA, {bytes}): {}",
            std::io::Error::last_os_error()
        )))
    }
}
