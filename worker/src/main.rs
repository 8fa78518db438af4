//! `tfsd-worker`: one tfsd session's process. It links libtensorflow, hosts one graph and one
//! TensorFlow session, and answers the supervisor's requests on the socketpair it inherits
//! as fd 3 (protocol: `proto/tfsd/worker/v1/worker.proto`). It exits when that socket closes
//! or, through `PR_SET_PDEATHSIG`, when the supervisor dies.

mod byte_string;
mod failure;
mod runtime;
mod tensors;

use std::os::fd::FromRawFd;
use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use prost::Message;
use tfsd::proto::tfsd::worker::v1 as wire;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use wire::{worker_request::Kind, worker_response::Result as Reply};

use crate::failure::Failure;
use crate::runtime::Runtime;

/// Largest frame either side accepts (the supervisor uses the same limit).
const MAX_FRAME_BYTES: usize = 2 << 30;
/// Responses queued for the socket before handlers wait.
const RESPONSE_QUEUE: usize = 64;

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
    let runtime = Arc::new(Runtime::new().map_err(|f| anyhow::anyhow!(f.message))?);
    // SAFETY: fd 3 was set up by the supervisor for this process and nothing else owns it.
    let socket = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    socket.set_nonblocking(true)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(serve(socket, runtime))
}

async fn serve(
    socket: std::os::unix::net::UnixStream,
    runtime: Arc<Runtime>,
) -> anyhow::Result<()> {
    let (read_half, write_half) = tokio::net::UnixStream::from_std(socket)?.into_split();
    let codec = || {
        LengthDelimitedCodec::builder()
            .max_frame_length(MAX_FRAME_BYTES)
            .new_codec()
    };
    let mut reader = FramedRead::new(read_half, codec());
    let mut writer = FramedWrite::new(write_half, codec());
    let (responses, mut outgoing) = mpsc::channel::<wire::WorkerResponse>(RESPONSE_QUEUE);

    let ready = wire::WorkerResponse {
        id: 0,
        result: Some(Reply::Ready(wire::Ready {
            pid: std::process::id(),
            tensorflow_version: tensorflow::version().unwrap_or_default(),
        })),
    };
    writer.send(Bytes::from(ready.encode_to_vec())).await?;
    tokio::spawn(async move {
        while let Some(response) = outgoing.recv().await {
            if writer
                .send(Bytes::from(response.encode_to_vec()))
                .await
                .is_err()
            {
                break;
            }
        }
    });

    while let Some(frame) = reader.next().await {
        let request = wire::WorkerRequest::decode(frame?.freeze())?;
        let runtime = runtime.clone();
        let responses = responses.clone();
        tokio::task::spawn_blocking(move || {
            // A panic (a bug in tfsd or in the TensorFlow binding) must still answer the
            // request, or the client would wait forever.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                handle(&runtime, request.kind)
            }))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic");
                Err(Failure::internal(format!(
                    "the worker failed while handling this request: {what}"
                )))
            });
            let response = wire::WorkerResponse {
                id: request.id,
                result: Some(result.unwrap_or_else(|failure| {
                    Reply::Error(wire::Error {
                        code: failure.code,
                        message: failure.message,
                    })
                })),
            };
            let _ = responses.blocking_send(response);
        });
    }
    // The supervisor closed the socket: it is done with this worker, or gone. Leave at once;
    // the OS takes back every byte TensorFlow held.
    std::process::exit(0);
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
    }
}
