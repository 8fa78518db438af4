//! Configuration: the raw TOML shape (`RawConfig`, every field optional) and the validated
//! `Config` built from it by one function that names every field. A bad config is an error
//! that names the key, reported before anything is bound or spawned.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::policy::PolicyConfig;
use crate::units::parse_duration;

/// Address the tfsd.v1 API listens on when the config names none.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Address of the Prometheus endpoint (`GET /metrics`) when the config names none.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// Address of TensorFlow's MasterService (`tf.compat.v1.Session("grpc://127.0.0.1:2222")`)
/// when the config names none: TensorFlow's customary port for a local server.
pub const DEFAULT_MASTER_LISTEN: &str = "127.0.0.1:2222";

/// Environment variables that override one config key each, applied on top of the file.
pub const ENV_OVERRIDES: [(&str, &str); 10] = [
    ("TFSD_LISTEN", "server.listen"),
    ("TFSD_METRICS_LISTEN", "metrics.listen"),
    ("TFSD_MASTER_LISTEN", "master.listen"),
    ("TFSD_STATE_DIR", "state.dir"),
    ("TFSD_WORKER_BINARY", "workers.binary"),
    ("TFSD_POOL_SIZE", "workers.pool_size"),
    ("TFSD_WORKER_START_TIMEOUT", "workers.start_timeout"),
    ("TFSD_PYTHON_INTERPRETER", "python.interpreter"),
    ("TFSD_LOG_FILTER", "log.filter"),
    ("TFSD_LOG_FORMAT", "log.format"),
];
/// Pre-started workers kept ready so a create or a recycle does not wait for TensorFlow to load.
pub const DEFAULT_POOL_SIZE: usize = 1;
/// How far the graph workers' pool grows while demand drains it (one more ready worker per
/// take that found it empty; back toward pool_size after a minute without takes). Back-to-back
/// recycles with a pool of one waited 0.42–0.82 s for a fresh worker instead of 25–60 ms.
pub const DEFAULT_POOL_MAX: usize = 4;
/// The same for Python workers, which hold more memory each.
pub const DEFAULT_PYTHON_POOL_MAX: usize = 2;
/// The one drain deadline after SIGTERM: in-flight steps, checkpoints and closes of every
/// session proceed in parallel for at most this long, then the workers still busy are
/// killed. Shorter than the stop timeouts the shipped units give (systemd's TimeoutStopSec
/// and Kubernetes' terminationGracePeriodSeconds, both 45 s), so that the daemon, not the
/// service manager, ends the drain.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Tasks (processes and threads) one worker's cgroup may hold: TensorFlow starts two thread
/// pools of one thread per core, Python sessions may start subprocesses; a fork bomb stops
/// here instead of at the machine's limit.
pub const DEFAULT_MAX_TASKS: u64 = 2048;
/// How long a new worker may take to load TensorFlow and say it is ready.
pub const DEFAULT_WORKER_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a worker may take to answer a control operation (load, extend, a reset, a
/// state export or import) before it counts as hung and is killed. Generous: exporting or
/// importing gigabytes of variables takes seconds, not minutes.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Added to a step's own timeout before the supervisor gives up on the worker: TensorFlow
/// cancels a step only between kernels, so its DEADLINE_EXCEEDED comes a little late.
pub const DEFAULT_RUN_GRACE: Duration = Duration::from_secs(5);
/// How long a worker may stay stopped (SIGSTOP, a debugger: state T in /proc/PID/stat)
/// before it is killed and its session restored.
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(5);
/// Creates that may wait for a worker at once; more get RESOURCE_EXHAUSTED at once.
pub const DEFAULT_MAX_WAITING_CREATES: usize = 64;
/// How long a create (or recycle, or restore) waits for a worker to start before it gets
/// UNAVAILABLE.
pub const DEFAULT_START_WAIT: Duration = Duration::from_secs(120);
/// Environment every worker gets unless the config overrides it. oneDNN's CPU allocator pools
/// freed memory, so an in-process purge or graph reset would not give memory back (a session
/// holding a 200 MiB variable, closed in-process, left RSS 200 MiB higher and `malloc_trim`
/// did not help; with `TF_ENABLE_ONEDNN_OPTS=0` RSS went back to the baseline); TensorFlow's info logs are noise in the daemon's log; TensorFlow's pool
/// threads spinning while idle take CPU from every other session (worker/src/runtime.rs).
pub const DEFAULT_WORKER_ENV: [(&str, &str); 3] = [
    ("TF_ENABLE_ONEDNN_OPTS", "0"),
    ("TF_CPP_MIN_LOG_LEVEL", "1"),
    ("TFSD_THREAD_SPINNING", "0"),
];
/// Modules a Python worker imports before it reports ready, so that a call never waits for
/// them (importing TensorFlow and Keras takes seconds).
pub const DEFAULT_PYTHON_PRELOAD: [&str; 2] = ["tensorflow", "keras"];
/// Python workers kept ready.
pub const DEFAULT_PYTHON_POOL_SIZE: usize = 1;
/// How long a Python worker may take to import its preload list and say it is ready
/// (`import tensorflow, keras` took 2.5–5.7 s on the development machine; a loaded host or a
/// cold page cache takes longer).
pub const DEFAULT_PYTHON_START_TIMEOUT: Duration = Duration::from_secs(120);
/// Worker starts at once by default: one per core. A start is CPU-bound (loading
/// libtensorflow, or importing TensorFlow and Keras); more at once only makes every one of
/// them slower (200 at once on 2 cores took a median 137 s each and tripped start timeouts).
pub fn default_concurrent_starts() -> usize {
    std::thread::available_parallelism().map_or(2, |cores| cores.get())
}
/// Log filter (tracing-subscriber's EnvFilter syntax) when neither config nor RUST_LOG set one.
pub const DEFAULT_LOG_FILTER: &str = "info";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    workers: RawWorkers,
    #[serde(default)]
    python: RawPython,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    policy: crate::policy::config::RawPolicy,
    #[serde(default)]
    master: RawMaster,
    #[serde(default)]
    auth: crate::auth::RawAuth,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    limits: crate::limits::RawLimits,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    sandbox: RawSandbox,
    #[serde(default)]
    gpu: crate::gpu::config::RawGpu,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<PathBuf>,
    checkpoint_interval: Option<String>,
}

/// Durable sessions: where they are kept, and how often durable variables are checkpointed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateConfig {
    pub dir: PathBuf,
    pub checkpoint_interval: Duration,
}

/// How often durable sessions' variables are checkpointed when the config says nothing.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(600);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
}

/// TLS for the tfsd.v1 listener: the server's certificate chain and key (PEM), and, for
/// client certificates (mTLS), the CA that signs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMaster {
    listen: Option<String>,
    allow_unauthenticated: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    drain_timeout: Option<String>,
    unix_socket: Option<PathBuf>,
    /// An octal string ("0660") or a TOML integer (0o660): see `unix_socket::parse_mode`.
    unix_socket_mode: Option<toml::Value>,
    /// A group name or gid (a string or an integer).
    unix_socket_group: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkers {
    binary: Option<PathBuf>,
    pool_size: Option<usize>,
    pool_max: Option<usize>,
    start_timeout: Option<String>,
    library_dir: Option<PathBuf>,
    env: Option<BTreeMap<String, String>>,
    call_timeout: Option<String>,
    run_grace: Option<String>,
    liveness_timeout: Option<String>,
    max_concurrent_starts: Option<usize>,
    max_waiting_creates: Option<usize>,
    start_wait: Option<String>,
    /// A user name or uid (a string or an integer): see `sandbox::resolve_worker_user`.
    user: Option<toml::Value>,
    memory_enforcement: Option<String>,
    max_tasks: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPython {
    interpreter: Option<PathBuf>,
    preload: Option<Vec<String>>,
    pool_size: Option<usize>,
    pool_max: Option<usize>,
    start_timeout: Option<String>,
    env: Option<BTreeMap<String, String>>,
}

/// `[sandbox]`: what confines each worker (src/worker/sandbox.rs, docs/SANDBOX.md).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    /// `"auto"`, `true` or `false`: see `SandboxMode`.
    enabled: Option<toml::Value>,
    read_paths: Option<Vec<PathBuf>>,
    write_paths: Option<Vec<PathBuf>>,
    max_open_files: Option<u64>,
    network: Option<bool>,
}

/// Open files a worker may hold (RLIMIT_NOFILE, soft and hard) when the config says nothing.
/// TensorFlow and a Python interpreter with Keras loaded hold a few dozen; a tf.data
/// pipeline over many files holds one per open file.
pub const DEFAULT_MAX_OPEN_FILES: u64 = 4096;

/// Whether workers run in the sandbox (`sandbox.enabled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    /// `"auto"` (the default): on, with Landlock where the kernel has it; on a kernel
    /// without Landlock the rest of the sandbox applies and the log says so.
    Auto,
    /// `true`: on, and the daemon refuses to start on a kernel without Landlock.
    Required,
    /// `false`: workers run unconfined, in the daemon's directory, with no scratch
    /// directory (`workers.user` still applies).
    Off,
}

/// `[sandbox]`, validated. Paths are resolved against the config file's directory; that
/// they exist is checked when the daemon starts (`Sandbox::new`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    pub mode: SandboxMode,
    /// Read (and execute) access beyond what the runtimes need.
    pub read_paths: Vec<PathBuf>,
    /// Read-write access beyond the worker's own scratch directory (shared by every worker).
    pub write_paths: Vec<PathBuf>,
    /// RLIMIT_NOFILE, soft and hard (at most the daemon's own hard limit).
    pub max_open_files: u64,
    /// Whether workers may open network sockets (TCP, UDP, ...): false by default.
    pub network: bool,
}

impl Default for SandboxConfig {
    fn default() -> SandboxConfig {
        SandboxConfig {
            mode: SandboxMode::Auto,
            read_paths: Vec::new(),
            write_paths: Vec::new(),
            max_open_files: DEFAULT_MAX_OPEN_FILES,
            network: false,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    filter: Option<String>,
    format: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// tfsd.v1 on a Unix socket too (`server.unix_socket`); `None`: off.
    pub unix_socket: Option<crate::unix_socket::UnixSocketConfig>,
    /// The one drain deadline after SIGTERM (server.drain_timeout).
    pub drain_timeout: Duration,
    /// `None` when metrics are switched off (`metrics.listen = ""`).
    pub metrics_listen: Option<SocketAddr>,
    /// TensorFlow's MasterService; `None` when switched off (`master.listen = ""`).
    pub master_listen: Option<SocketAddr>,
    /// With `[auth]` credentials configured, whether TensorFlow clients without a token
    /// may still create MasterService sessions (master.allow_unauthenticated; default no).
    pub master_allow_unauthenticated: bool,
    pub workers: WorkerConfig,
    /// Python sessions; `None` when `python.interpreter` is not set (they are refused).
    pub python: Option<PythonConfig>,
    pub policy: PolicyConfig,
    pub auth: crate::auth::AuthConfig,
    /// `None`: plaintext (the default; fine on loopback).
    pub tls: Option<TlsConfig>,
    pub limits: crate::limits::Limits,
    /// `None`: sessions live as long as the daemon (no state directory).
    pub state: Option<StateConfig>,
    pub log: LogConfig,
    pub sandbox: SandboxConfig,
    /// `[gpu]`: which devices each pool's workers see, TensorFlow's GPU settings.
    pub gpu: crate::gpu::GpuConfig,
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The `tfsd-worker` binary.
    pub binary: PathBuf,
    pub pool_size: usize,
    /// The most ready workers the pool grows to under demand.
    pub pool_max: usize,
    pub start_timeout: Duration,
    /// Prepended to the workers' LD_LIBRARY_PATH when set (libtensorflow's directory).
    pub library_dir: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    /// When a worker counts as hung.
    pub deadlines: crate::worker::Deadlines,
    /// How many workers start at once, and how long and how many creates wait for one.
    pub starts: crate::worker::StartLimits,
    /// The user workers run as (`workers.user`, resolved); `None`: the daemon's own.
    pub user: Option<crate::worker::sandbox::WorkerUser>,
    /// What holds a worker to its session's hard limit: a cgroup per worker, an rlimit, or
    /// the policy's sampling alone.
    pub memory_enforcement: crate::worker::EnforcementMode,
    /// Tasks (processes and threads) a worker's cgroup may hold (cgroup v2 `pids.max`).
    pub max_tasks: u64,
}

/// Python sessions' workers: `INTERPRETER -m tfsd_worker`, which imports `preload` and waits.
#[derive(Debug, Clone)]
pub struct PythonConfig {
    /// The environment's interpreter; the `tfsd_worker` package must be installed in it.
    pub interpreter: PathBuf,
    pub preload: Vec<String>,
    pub pool_size: usize,
    /// The most ready workers the pool grows to under demand.
    pub pool_max: usize,
    pub start_timeout: Duration,
    /// The workers' environment on top of the daemon's: `[workers.env]` (TensorFlow's
    /// settings apply to Python's TensorFlow too), then `[python.env]`.
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub filter: String,
    pub format: LogFormat,
}

impl Config {
    /// Reads and validates a TOML file, then applies the process's `TFSD_*` environment
    /// overrides (`ENV_OVERRIDES`). Paths in the file are relative to its directory.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        Config::load_with_env(Some(path))
    }

    /// Validates TOML text. `base` resolves relative paths.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<Config> {
        Config::parse_with_env(text, base, |_| None)
    }

    /// Like `parse`, with the `ENV_OVERRIDES` variables that `env` returns applied on top.
    pub fn parse_with_env(
        text: &str,
        base: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Config> {
        let mut raw: RawConfig = toml::from_str(text)?;
        raw.apply_env(env)?;
        Config::from_raw(raw, base)
    }

    /// Reads a file (or none, for every default) and applies the process's `TFSD_*`
    /// environment overrides.
    fn load_with_env(path: Option<&Path>) -> anyhow::Result<Config> {
        let env = |name: &str| std::env::var(name).ok();
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("read config file {}", path.display()))?;
                let base = path.parent().unwrap_or(Path::new("."));
                Config::parse_with_env(&text, base, env)
                    .with_context(|| format!("config file {}", path.display()))
            }
            None => Config::parse_with_env("", Path::new("."), env),
        }
    }

    /// Every default, with the process's `TFSD_*` environment overrides applied: the
    /// configuration of a daemon started without a file.
    pub fn defaults() -> anyhow::Result<Config> {
        Config::load_with_env(None)
    }

    fn from_raw(raw: RawConfig, base: &Path) -> anyhow::Result<Config> {
        let listen_text = raw.server.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text.parse().with_context(|| {
            format!("server.listen = {listen_text:?} is not an address like \"127.0.0.1:50051\"")
        })?;
        let drain_timeout = match raw.server.drain_timeout {
            Some(text) => parse_duration("server.drain_timeout", &text)?,
            None => DEFAULT_DRAIN_TIMEOUT,
        };
        let unix_socket = crate::unix_socket::UnixSocketConfig::from_raw(
            raw.server.unix_socket,
            raw.server.unix_socket_mode.as_ref(),
            raw.server.unix_socket_group.as_ref(),
            base,
        )?;

        let metrics_text = raw
            .metrics
            .listen
            .as_deref()
            .unwrap_or(DEFAULT_METRICS_LISTEN);
        let metrics_listen = if metrics_text.is_empty() {
            None
        } else {
            Some(metrics_text.parse().with_context(|| {
                format!(
                    "metrics.listen = {metrics_text:?} is not an address like \"127.0.0.1:9464\" \
                     (or \"\" to switch metrics off)"
                )
            })?)
        };

        let master_text = raw
            .master
            .listen
            .as_deref()
            .unwrap_or(DEFAULT_MASTER_LISTEN);
        let master_listen = if master_text.is_empty() {
            None
        } else {
            Some(master_text.parse().with_context(|| {
                format!(
                    "master.listen = {master_text:?} is not an address like \"127.0.0.1:2222\" \
                     (or \"\" to switch the MasterService off)"
                )
            })?)
        };

        let binary = match raw.workers.binary {
            Some(path) => base.join(path),
            None => default_worker_binary()?,
        };
        let pool_size = raw.workers.pool_size.unwrap_or(DEFAULT_POOL_SIZE);
        if pool_size > 64 {
            bail!("workers.pool_size = {pool_size} is too large (at most 64)");
        }
        // pool_size = 0 means no warm pool: it does not grow either unless pool_max says so.
        let pool_max = raw.workers.pool_max.unwrap_or(if pool_size == 0 {
            0
        } else {
            DEFAULT_POOL_MAX.max(pool_size)
        });
        if !(pool_size..=64).contains(&pool_max) {
            bail!(
                "workers.pool_max = {pool_max} must be between workers.pool_size ({pool_size}) and 64"
            );
        }
        let start_timeout = match raw.workers.start_timeout {
            Some(text) => parse_duration("workers.start_timeout", &text)?,
            None => DEFAULT_WORKER_START_TIMEOUT,
        };
        let mut env: BTreeMap<String, String> = DEFAULT_WORKER_ENV
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        env.extend(raw.workers.env.unwrap_or_default());
        let library_dir = raw.workers.library_dir.map(|dir| base.join(dir));
        let duration_or = |key: &str, text: Option<String>, default: Duration| match text {
            Some(text) => parse_duration(key, &text),
            None => Ok(default),
        };
        let deadlines = crate::worker::Deadlines {
            call: duration_or(
                "workers.call_timeout",
                raw.workers.call_timeout,
                DEFAULT_CALL_TIMEOUT,
            )?,
            run_grace: duration_or(
                "workers.run_grace",
                raw.workers.run_grace,
                DEFAULT_RUN_GRACE,
            )?,
            liveness: duration_or(
                "workers.liveness_timeout",
                raw.workers.liveness_timeout,
                DEFAULT_LIVENESS_TIMEOUT,
            )?,
        };
        if deadlines.call.is_zero() || deadlines.liveness.is_zero() {
            bail!("workers.call_timeout and workers.liveness_timeout must be longer than 0s");
        }
        let max_concurrent_starts = raw
            .workers
            .max_concurrent_starts
            .unwrap_or_else(default_concurrent_starts);
        if !(1..=256).contains(&max_concurrent_starts) {
            bail!(
                "workers.max_concurrent_starts = {max_concurrent_starts} must be between 1 and 256"
            );
        }
        let max_waiting_creates = raw
            .workers
            .max_waiting_creates
            .unwrap_or(DEFAULT_MAX_WAITING_CREATES);
        if max_waiting_creates > 100_000 {
            bail!(
                "workers.max_waiting_creates = {max_waiting_creates} is too large (at most 100000)"
            );
        }
        let starts = crate::worker::StartLimits {
            max_concurrent: max_concurrent_starts,
            max_waiting: max_waiting_creates,
            wait: duration_or(
                "workers.start_wait",
                raw.workers.start_wait,
                DEFAULT_START_WAIT,
            )?,
        };
        let memory_enforcement = match raw.workers.memory_enforcement.as_deref() {
            None => crate::worker::EnforcementMode::default(),
            Some(text) => crate::worker::EnforcementMode::parse(text).with_context(|| {
                format!(
                    "workers.memory_enforcement = {} must be {}",
                    crate::error::quoted(text),
                    crate::worker::EnforcementMode::NAMES
                )
            })?,
        };
        let max_tasks = raw.workers.max_tasks.unwrap_or(DEFAULT_MAX_TASKS);
        if max_tasks < 64 {
            bail!(
                "workers.max_tasks = {max_tasks} is too small (at least 64: TensorFlow runs a \
                 thread pool per core)"
            );
        }
        let user = raw
            .workers
            .user
            .map(|value| crate::worker::sandbox::resolve_worker_user(&value))
            .transpose()?;
        let python_tuned = raw.python.preload.is_some()
            || raw.python.pool_size.is_some()
            || raw.python.pool_max.is_some()
            || raw.python.start_timeout.is_some()
            || raw.python.env.is_some();
        let python = match raw.python.interpreter {
            None => None,
            Some(path) if path.as_os_str().is_empty() => None,
            Some(path) => {
                let pool_size = raw.python.pool_size.unwrap_or(DEFAULT_PYTHON_POOL_SIZE);
                if pool_size > 64 {
                    bail!("python.pool_size = {pool_size} is too large (at most 64)");
                }
                let pool_max = raw.python.pool_max.unwrap_or(if pool_size == 0 {
                    0
                } else {
                    DEFAULT_PYTHON_POOL_MAX.max(pool_size)
                });
                if !(pool_size..=64).contains(&pool_max) {
                    bail!(
                        "python.pool_max = {pool_max} must be between python.pool_size \
                         ({pool_size}) and 64"
                    );
                }
                let mut python_env = env.clone();
                python_env.extend(raw.python.env.unwrap_or_default());
                Some(PythonConfig {
                    interpreter: base.join(path),
                    preload: match raw.python.preload {
                        Some(modules) => modules,
                        None => DEFAULT_PYTHON_PRELOAD.map(str::to_string).to_vec(),
                    },
                    pool_size,
                    pool_max,
                    start_timeout: match raw.python.start_timeout {
                        Some(text) => parse_duration("python.start_timeout", &text)?,
                        None => DEFAULT_PYTHON_START_TIMEOUT,
                    },
                    env: python_env,
                })
            }
        };
        if python.is_none() && python_tuned {
            bail!(
                "python.preload, python.pool_size, python.pool_max, python.start_timeout and python.env need \
                 python.interpreter (Python sessions are off without it)"
            );
        }

        let format = match raw.log.format.as_deref() {
            None | Some("human") => LogFormat::Human,
            Some("json") => LogFormat::Json,
            Some(other) => bail!("log.format = {other:?} is not one of \"human\", \"json\""),
        };
        let filter = raw
            .log
            .filter
            .unwrap_or_else(|| DEFAULT_LOG_FILTER.to_string());

        let policy = PolicyConfig::from_raw(raw.policy)?;
        let auth = crate::auth::AuthConfig::from_raw(raw.auth, base)?;
        let tls = match (raw.tls.cert, raw.tls.key, raw.tls.client_ca) {
            (None, None, None) => None,
            (Some(cert), Some(key), client_ca) => Some(TlsConfig {
                cert: base.join(cert),
                key: base.join(key),
                client_ca: client_ca.map(|ca| base.join(ca)),
            }),
            _ => bail!("tls needs both tls.cert and tls.key (tls.client_ca is optional)"),
        };
        let limits = crate::limits::Limits::from_raw(raw.limits)?;
        let state = match raw.state.dir {
            None => None,
            Some(dir) if dir.as_os_str().is_empty() => None,
            Some(dir) => Some(StateConfig {
                dir: base.join(dir),
                checkpoint_interval: match raw.state.checkpoint_interval {
                    Some(text) => parse_duration("state.checkpoint_interval", &text)?,
                    None => DEFAULT_CHECKPOINT_INTERVAL,
                },
            }),
        };

        let sandbox = sandbox_from_raw(raw.sandbox, base)?;
        let gpu = crate::gpu::GpuConfig::from_raw(raw.gpu)?;
        let config = Config {
            gpu,
            listen,
            unix_socket,
            drain_timeout,
            metrics_listen,
            policy,
            auth,
            tls,
            limits,
            state,
            master_listen,
            master_allow_unauthenticated: raw.master.allow_unauthenticated.unwrap_or(false),
            workers: WorkerConfig {
                binary,
                pool_size,
                pool_max,
                start_timeout,
                library_dir,
                env,
                deadlines,
                starts,
                user,
                memory_enforcement,
                max_tasks,
            },
            python,
            log: LogConfig { filter, format },
            sandbox,
        };
        config.ensure_safe_exposure()?;
        Ok(config)
    }

    /// Secure by default: nobody off this machine reaches an unauthenticated API unless the
    /// operator says so in as many words. Checked when the config is read and again after
    /// command-line overrides, before anything is bound.
    pub fn ensure_safe_exposure(&self) -> anyhow::Result<()> {
        if !self.listen.ip().is_loopback()
            && !self.auth.required()
            && !self.auth.allow_unauthenticated
        {
            bail!(
                "server.listen = {} is not a loopback address and no [auth] credentials are \
                 configured: anyone who can reach it could run code in tfsd's workers. \
                 Configure [[auth.tokens]] or [[auth.certificates]], or set \
                 auth.allow_unauthenticated = true to accept the risk",
                self.listen
            );
        }
        // TensorFlow's client speaks plaintext gRPC only: a token it sends (and the session
        // handle, the capability for every later call) would cross the network in the clear.
        // So only loopback or an explicit yes, tokens or not.
        if let Some(master) = self.master_listen
            && !master.ip().is_loopback()
            && !self.auth.allow_unauthenticated
        {
            bail!(
                "master.listen = {master} is not a loopback address, and TensorFlow's \
                 MasterService client speaks plaintext gRPC only: its token and session \
                 handles would cross the network in the clear (and without a token anyone who \
                 can reach it could run code in tfsd's workers). Keep it on loopback, switch it off with \
                 master.listen = \"\", or set auth.allow_unauthenticated = true to accept the \
                 risk"
            );
        }
        Ok(())
    }
}

impl RawConfig {
    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        for (variable, key) in ENV_OVERRIDES {
            let Some(value) = env(variable) else { continue };
            let invalid = || format!("{variable} = {value:?} is not valid for {key}");
            match key {
                "server.listen" => self.server.listen = Some(value.clone()),
                "metrics.listen" => self.metrics.listen = Some(value.clone()),
                "master.listen" => self.master.listen = Some(value.clone()),
                "workers.binary" => self.workers.binary = Some(PathBuf::from(&value)),
                "workers.pool_size" => {
                    self.workers.pool_size = Some(value.parse().with_context(invalid)?)
                }
                "workers.start_timeout" => self.workers.start_timeout = Some(value.clone()),
                "python.interpreter" => self.python.interpreter = Some(PathBuf::from(&value)),
                "log.filter" => self.log.filter = Some(value.clone()),
                "log.format" => self.log.format = Some(value.clone()),
                "state.dir" => self.state.dir = Some(PathBuf::from(&value)),
                _ => unreachable!("every ENV_OVERRIDES key is handled"),
            }
        }
        Ok(())
    }
}

/// `[sandbox]`, validated: every key named on error.
fn sandbox_from_raw(raw: RawSandbox, base: &Path) -> anyhow::Result<SandboxConfig> {
    let mode = match raw.enabled {
        None => SandboxMode::Auto,
        Some(toml::Value::Boolean(true)) => SandboxMode::Required,
        Some(toml::Value::Boolean(false)) => SandboxMode::Off,
        Some(toml::Value::String(text)) if text == "auto" => SandboxMode::Auto,
        Some(other) => bail!("sandbox.enabled = {other} is not one of \"auto\", true, false"),
    };
    let paths = |key: &str, paths: Option<Vec<PathBuf>>| -> anyhow::Result<Vec<PathBuf>> {
        let paths = paths.unwrap_or_default();
        if paths.iter().any(|path| path.as_os_str().is_empty()) {
            bail!("sandbox.{key} has an empty path");
        }
        Ok(paths.into_iter().map(|path| base.join(path)).collect())
    };
    let max_open_files = raw.max_open_files.unwrap_or(DEFAULT_MAX_OPEN_FILES);
    if !(64..=1 << 20).contains(&max_open_files) {
        bail!("sandbox.max_open_files = {max_open_files} must be between 64 and 1048576");
    }
    Ok(SandboxConfig {
        mode,
        read_paths: paths("read_paths", raw.read_paths)?,
        write_paths: paths("write_paths", raw.write_paths)?,
        max_open_files,
        network: raw.network.unwrap_or(false),
    })
}

/// `tfsd-worker` in the directory of the running `tfsd` binary (cargo puts both in the same
/// target directory; an installation puts both in one `bin/`).
fn default_worker_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("find the tfsd binary's own path")?;
    let dir = exe
        .parent()
        .context("the tfsd binary has no parent directory")?;
    // Test binaries live one level down, in target/<profile>/deps.
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    Ok(dir.join("tfsd-worker"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{GentleAction, IdleAction};

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let config = Config::parse("", Path::new("/etc/tfsd")).expect("valid");
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.workers.pool_size, DEFAULT_POOL_SIZE);
        assert_eq!(
            config.master_listen.map(|a| a.to_string()).as_deref(),
            Some(DEFAULT_MASTER_LISTEN)
        );
        assert_eq!(config.workers.start_timeout, DEFAULT_WORKER_START_TIMEOUT);
        assert_eq!(config.workers.env["TF_ENABLE_ONEDNN_OPTS"], "0");
        assert_eq!(config.workers.env["TFSD_THREAD_SPINNING"], "0");
        assert_eq!(config.log.format, LogFormat::Human);
    }

    #[test]
    fn every_key_is_read() {
        let text = r#"
            [server]
            listen = "0.0.0.0:7000"
            [workers]
            binary = "bin/tfsd-worker"
            pool_size = 3
            start_timeout = "5s"
            library_dir = "/opt/tf/lib"
            env = { TF_ENABLE_ONEDNN_OPTS = "1", OMP_NUM_THREADS = "2" }
            memory_enforcement = "rlimit"
            max_tasks = 512
            [log]
            filter = "debug"
            format = "json"
            [auth]
            allow_unauthenticated = true
        "#;
        let config = Config::parse(text, Path::new("/etc/tfsd")).expect("valid");
        assert_eq!(config.listen.to_string(), "0.0.0.0:7000");
        assert_eq!(
            config.workers.binary,
            Path::new("/etc/tfsd/bin/tfsd-worker")
        );
        assert_eq!(config.workers.pool_size, 3);
        assert_eq!(config.workers.start_timeout, Duration::from_secs(5));
        assert_eq!(
            config.workers.library_dir.as_deref(),
            Some(Path::new("/opt/tf/lib"))
        );
        assert_eq!(config.workers.env["TF_ENABLE_ONEDNN_OPTS"], "1");
        assert_eq!(config.workers.env["OMP_NUM_THREADS"], "2");
        assert_eq!(
            config.workers.memory_enforcement,
            crate::worker::EnforcementMode::Rlimit
        );
        assert_eq!(config.workers.max_tasks, 512);
        assert_eq!(config.log.filter, "debug");
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn the_shipped_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tfsd.toml");
        let config = Config::load(&path).expect("config/tfsd.toml");
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.workers.env["TF_ENABLE_ONEDNN_OPTS"], "0");
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = |name: &str| match name {
            "TFSD_POOL_SIZE" => Some("4".to_string()),
            "TFSD_METRICS_LISTEN" => Some(String::new()),
            "TFSD_MASTER_LISTEN" => Some("127.0.0.1:0".to_string()),
            "TFSD_LISTEN" => Some("127.0.0.1:0".to_string()),
            _ => None,
        };
        let config = Config::parse_with_env("[workers]\npool_size = 2\n", Path::new("."), env)
            .expect("valid");
        assert_eq!(config.workers.pool_size, 4);
        assert_eq!(config.metrics_listen, None);
        assert_eq!(config.master_listen.map(|a| a.port()), Some(0));
        assert_eq!(config.listen.port(), 0);

        let bad = |name: &str| (name == "TFSD_POOL_SIZE").then(|| "many".to_string());
        let error = Config::parse_with_env("", Path::new("."), bad).expect_err("not a number");
        assert!(format!("{error:#}").contains("TFSD_POOL_SIZE"), "{error:#}");
    }

    #[test]
    fn the_policy_is_read_and_checked() {
        let text = r#"
            [policy]
            interval = "100ms"
            dry_run = true
            soft_limit = "1GiB"
            hard_limit = "2GiB"
            max_soft_limit = "4GiB"
            max_hard_limit = "8GiB"
            gentle_action = "reset_graph"
            cooldown = "10s"
            rearm_below = 0.8
            max_actions = 7
            action_window = "5m"
            [policy.pressure]
            min_available = "512MiB"
            psi_some_avg10 = 40.0
            psi_for = "20s"
            [policy.idle]
            timeout = "1h"
            action = "close"
        "#;
        let policy = Config::parse(text, Path::new(".")).expect("valid").policy;
        assert_eq!(policy.interval, Duration::from_millis(100));
        assert!(policy.dry_run);
        assert_eq!(policy.soft_limit_bytes, Some(1 << 30));
        assert_eq!(policy.hard_limit_bytes, Some(2 << 30));
        assert_eq!(policy.max_soft_limit_bytes, Some(4 << 30));
        assert_eq!(policy.max_hard_limit_bytes, Some(8 << 30));
        assert_eq!(policy.gentle_action, GentleAction::ResetGraph);
        assert_eq!(policy.cooldown, Duration::from_secs(10));
        assert_eq!(policy.rearm_below, 0.8);
        assert_eq!(policy.max_actions, 7);
        assert_eq!(policy.action_window, Duration::from_secs(300));
        assert_eq!(policy.pressure.min_available_bytes, Some(512 << 20));
        assert_eq!(policy.pressure.psi_some_avg10, Some(40.0));
        assert_eq!(policy.pressure.psi_duration, Duration::from_secs(20));
        assert_eq!(policy.idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(policy.idle_action, IdleAction::Close);

        for (text, key) in [
            ("[policy]\nsoft_limit = \"huge\"", "policy.soft_limit"),
            (
                "[policy]\nsoft_limit = \"2GiB\"\nhard_limit = \"1GiB\"",
                "policy.hard_limit",
            ),
            ("[policy]\ngentle_action = \"nuke\"", "policy.gentle_action"),
            ("[policy]\nrearm_below = 3.0", "policy.rearm_below"),
            ("[policy.idle]\naction = \"delete\"", "policy.idle.action"),
            ("[policy.pressure]\nthreshold = 1", "threshold"),
        ] {
            let error = Config::parse(text, Path::new(".")).expect_err(text);
            assert!(format!("{error:#}").contains(key), "{text}: {error:#}");
        }
    }

    #[test]
    fn a_non_loopback_address_needs_credentials_or_an_explicit_yes() {
        let error = Config::parse("[server]\nlisten = \"0.0.0.0:7000\"\n", Path::new("."))
            .expect_err("exposed without auth");
        assert!(
            format!("{error:#}").contains("auth.allow_unauthenticated"),
            "{error:#}"
        );
        let digest = "a".repeat(64);
        let with_token = format!(
            "[server]\nlisten = \"0.0.0.0:7000\"\n[[auth.tokens]]\nprincipal = \"p\"\nsha256 = \"{digest}\"\n"
        );
        assert!(Config::parse(&with_token, Path::new(".")).is_ok());
    }

    #[test]
    fn the_sandbox_table_is_read_and_checked() {
        let defaults = Config::parse("", Path::new("/etc/tfsd"))
            .expect("valid")
            .sandbox;
        assert_eq!(defaults, SandboxConfig::default());
        assert_eq!(defaults.mode, SandboxMode::Auto);
        let text = "[sandbox]\nenabled = true\nread_paths = [\"/data\", \"models\"]\n\
                    write_paths = [\"out\"]\nmax_open_files = 1000\nnetwork = true\n";
        let sandbox = Config::parse(text, Path::new("/etc/tfsd"))
            .expect("valid")
            .sandbox;
        assert_eq!(
            sandbox,
            SandboxConfig {
                mode: SandboxMode::Required,
                read_paths: vec!["/data".into(), "/etc/tfsd/models".into()],
                write_paths: vec!["/etc/tfsd/out".into()],
                max_open_files: 1000,
                network: true,
            }
        );
        let off = Config::parse("[sandbox]\nenabled = false\n", Path::new(".")).expect("valid");
        assert_eq!(off.sandbox.mode, SandboxMode::Off);
        for (text, key) in [
            ("[sandbox]\nenabled = \"yes\"", "sandbox.enabled"),
            ("[sandbox]\nmax_open_files = 10", "sandbox.max_open_files"),
            ("[sandbox]\nread_paths = [\"\"]", "sandbox.read_paths"),
            ("[sandbox]\nwrite_path = []", "write_path"),
        ] {
            let error = Config::parse(text, Path::new(".")).expect_err(text);
            assert!(format!("{error:#}").contains(key), "{text}: {error:#}");
        }
    }

    #[test]
    fn the_unix_socket_is_read_and_checked() {
        let off = Config::parse("", Path::new("/etc/tfsd")).expect("valid");
        assert_eq!(off.unix_socket, None);
        let text = "[server]\nunix_socket = \"run/tfsd.sock\"\nunix_socket_mode = \"0600\"\n\
                    unix_socket_group = 0\n";
        let socket = Config::parse(text, Path::new("/etc/tfsd"))
            .expect("valid")
            .unix_socket
            .expect("on");
        assert_eq!(socket.path, Path::new("/etc/tfsd/run/tfsd.sock"));
        assert_eq!(socket.mode, 0o600);
        assert_eq!(socket.group.map(|group| group.gid), Some(0));
        let default_mode = Config::parse(
            "[server]\nunix_socket = \"/run/tfsd/tfsd.sock\"\n",
            Path::new("."),
        )
        .expect("valid")
        .unix_socket
        .expect("on");
        assert_eq!(
            default_mode.mode,
            crate::unix_socket::DEFAULT_UNIX_SOCKET_MODE
        );
        assert_eq!(default_mode.group, None);
        for (text, key) in [
            (
                "[server]\nunix_socket_mode = \"0600\"",
                "server.unix_socket",
            ),
            (
                "[server]\nunix_socket = \"/run/t.sock\"\nunix_socket_mode = \"999\"",
                "server.unix_socket_mode",
            ),
            (
                "[server]\nunix_socket = \"/run/t.sock\"\nunix_socket_group = \"no-such-group-tfsd\"",
                "server.unix_socket_group",
            ),
        ] {
            let error = Config::parse(text, Path::new(".")).expect_err(text);
            assert!(format!("{error:#}").contains(key), "{text}: {error:#}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let error = Config::parse("[workers]\npool_sise = 2\n", Path::new(".")).expect_err("typo");
        assert!(format!("{error:#}").contains("pool_sise"), "{error:#}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("[server]\nlisten = \"localhost\"", "server.listen"),
            ("[master]\nlisten = \"2222\"", "master.listen"),
            (
                "[workers]\nstart_timeout = \"soon\"",
                "workers.start_timeout",
            ),
            ("[workers]\nstart_timeout = \"0s\"", "workers.start_timeout"),
            ("[workers]\npool_size = 1000", "workers.pool_size"),
            (
                "[workers]\nmemory_enforcement = \"kernel\"",
                "workers.memory_enforcement",
            ),
            ("[workers]\nmax_tasks = 8", "workers.max_tasks"),
            ("[log]\nformat = \"xml\"", "log.format"),
        ] {
            let error = Config::parse(text, Path::new(".")).expect_err(text);
            assert!(format!("{error:#}").contains(key), "{text}: {error:#}");
        }
    }

    #[test]
    fn an_exposed_master_service_needs_an_explicit_yes() {
        let exposed = "[master]\nlisten = \"0.0.0.0:2222\"\n";
        let error = Config::parse(exposed, Path::new(".")).expect_err("exposed");
        assert!(format!("{error:#}").contains("master.listen"), "{error:#}");
        let digest = "a".repeat(64);
        let with_token =
            format!("{exposed}[[auth.tokens]]\nprincipal = \"p\"\nsha256 = \"{digest}\"\n");
        assert!(
            Config::parse(&with_token, Path::new(".")).is_err(),
            "tokens do not protect the MasterService"
        );
        let accepted = format!("{exposed}[auth]\nallow_unauthenticated = true\n");
        assert!(Config::parse(&accepted, Path::new(".")).is_ok());
    }
}
