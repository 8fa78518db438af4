//! `tfsd check-config --config FILE`: validates a config file the way `serve` would and
//! prints what it resolves to, keyed by the TOML keys, so an operator can see every default
//! that applies, `TFSD_*` environment overrides included: every table of the file, one block
//! each. The daemon is not contacted. Secrets are never printed: a bearer token shows only
//! where it comes from (an inline SHA-256 digest, or a file's path).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::CliError;
use super::format::fields;
use super::human::Human;
use super::output::Output;
use crate::config::{Config, LogFormat, SandboxMode};
use crate::policy::{GentleAction, IdleAction};

pub fn run(path: &Path, output: &mut Output) -> Result<(), CliError> {
    let config = Config::load(path).map_err(CliError::InvalidConfig)?;
    // Read again for what the validated config keeps only as digests: where each
    // credential comes from (the file has just been read and validated as a whole).
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read config file {}", path.display()))
        .map_err(CliError::InvalidConfig)?;
    let report = ConfigReport::new(path, &text, &config).map_err(CliError::InvalidConfig)?;
    // Stderr, so that `--json` stdout stays one document; the file is valid all the same.
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    output.report(&report)
}

/// The resolved config, under the same names as the TOML keys. A table that is switched off
/// has its keys, each `null`.
#[derive(Debug, Serialize)]
pub struct ConfigReport {
    pub path: String,
    pub valid: bool,
    pub server: ServerReport,
    pub metrics: MetricsReport,
    pub master: MasterReport,
    pub workers: WorkersReport,
    pub python: PythonReport,
    pub policy: PolicyReport,
    pub auth: AuthReport,
    pub tls: TlsReport,
    pub limits: LimitsReport,
    pub state: StateReport,
    pub log: LogReport,
    pub sandbox: SandboxReport,
    pub gpu: GpuReport,
    /// Things that would stop `serve` although the file itself is valid.
    pub warnings: Vec<String>,
}

/// `[gpu]`: placements as TOML writes them ("all", or a list of indices).
#[derive(Debug, Serialize)]
pub struct GpuReport {
    pub graph_devices: serde_json::Value,
    pub python_devices: serde_json::Value,
    pub memory_growth: bool,
    /// `None`: TensorFlow's default allocator.
    pub allocator: Option<String>,
}

fn placement_value(placement: &crate::gpu::Placement) -> serde_json::Value {
    match placement {
        crate::gpu::Placement::All => serde_json::json!("all"),
        crate::gpu::Placement::Devices(devices) => serde_json::json!(devices),
    }
}

#[derive(Debug, Serialize)]
pub struct ServerReport {
    pub listen: String,
    /// The one drain deadline after SIGTERM.
    pub drain_timeout: String,
    /// The Unix socket's path; every `unix_socket*` key `None` when it is off.
    pub unix_socket: Option<String>,
    /// Octal, as the TOML file writes it ("0660").
    pub unix_socket_mode: Option<String>,
    /// "NAME (gid G)"; `None` (with the socket on): the daemon's own group.
    pub unix_socket_group: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct MetricsReport {
    /// `None` when metrics are switched off.
    pub listen: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct MasterReport {
    /// `None` when TensorFlow's MasterService is switched off.
    pub listen: Option<String>,
    /// With `[auth]`: whether TensorFlow clients without a token may still create sessions.
    pub allow_unauthenticated: bool,
}

#[derive(Debug, Serialize)]
pub struct WorkersReport {
    pub binary: String,
    pub pool_size: usize,
    pub pool_max: usize,
    /// In the TOML file's own syntax ("1m", "250ms").
    pub start_timeout: String,
    pub library_dir: Option<String>,
    pub env: BTreeMap<String, String>,
    pub call_timeout: String,
    pub run_grace: String,
    pub liveness_timeout: String,
    pub max_concurrent_starts: usize,
    pub max_waiting_creates: usize,
    pub start_wait: String,
    /// The user workers run as (`workers.user`): "NAME (uid U, gid G)"; `None`: the daemon's.
    pub user: Option<String>,
    /// "auto", "cgroup", "rlimit" or "sampling": what the daemon will try (which one is in
    /// force is known only where it runs: its log and `tfsd status` say).
    pub memory_enforcement: &'static str,
    pub max_tasks: u64,
}

/// Python sessions; every key `None` when they are off (no `python.interpreter`).
#[derive(Debug, Serialize)]
pub struct PythonReport {
    pub interpreter: Option<String>,
    pub preload: Option<Vec<String>>,
    pub pool_size: Option<usize>,
    pub pool_max: Option<usize>,
    pub start_timeout: Option<String>,
    /// The Python workers' whole environment: `[workers.env]`, then `[python.env]`.
    pub env: Option<BTreeMap<String, String>>,
}

/// A byte size: exact, and for people ("512 MiB", "2.0 GiB").
#[derive(Debug, Clone, Serialize)]
pub struct SizeReport {
    pub bytes: u64,
    pub human: String,
}

#[derive(Debug, Serialize)]
pub struct PolicyReport {
    pub interval: String,
    pub dry_run: bool,
    /// Sizes are `None` when no limit applies.
    pub soft_limit: Option<SizeReport>,
    pub hard_limit: Option<SizeReport>,
    pub max_soft_limit: Option<SizeReport>,
    pub max_hard_limit: Option<SizeReport>,
    /// Where `hard_limit` and `max_hard_limit` come from: "config", "default" (derived from
    /// `memory_budget`) or "off".
    pub hard_limit_from: &'static str,
    pub max_hard_limit_from: &'static str,
    /// What the derived defaults come from, as measured where check-config runs: this
    /// machine's memory, or its cgroup's limit when lower (`memory_budget_from`).
    pub memory_budget: Option<SizeReport>,
    pub memory_budget_from: Option<&'static str>,
    /// GPU memory limits, summed over a session's devices; `None`: off.
    pub gpu_soft_limit: Option<SizeReport>,
    pub gpu_hard_limit: Option<SizeReport>,
    pub max_gpu_soft_limit: Option<SizeReport>,
    pub max_gpu_hard_limit: Option<SizeReport>,
    pub gentle_action: &'static str,
    pub cooldown: String,
    pub rearm_below: f64,
    pub max_actions: usize,
    pub action_window: String,
    pub pressure: PressureReport,
    pub idle: IdleReport,
}

#[derive(Debug, Serialize)]
pub struct PressureReport {
    pub min_available: Option<SizeReport>,
    pub psi_some_avg10: Option<f64>,
    pub psi_for: String,
    pub min_gpu_free: Option<SizeReport>,
}

#[derive(Debug, Serialize)]
pub struct IdleReport {
    /// `None`: idle sessions are left alone.
    pub timeout: Option<String>,
    pub action: &'static str,
}

/// Who may call tfsd.v1. No secret appears here: tokens show where they come from only.
#[derive(Debug, Serialize)]
pub struct AuthReport {
    pub allow_unauthenticated: bool,
    pub tokens: Vec<TokenReport>,
    pub certificates: Vec<CertificateReport>,
    /// Unix-socket peers by uid, in uid order.
    pub peers: Vec<PeerReport>,
}

#[derive(Debug, Serialize)]
pub struct PeerReport {
    pub uid: u32,
    pub principal: String,
    pub role: &'static str,
}

#[derive(Debug, Serialize)]
pub struct TokenReport {
    pub principal: String,
    pub role: String,
    /// "inline" (the config holds the token's SHA-256) or "file" (a file holds the token).
    pub source: &'static str,
    /// The token file's path when `source` is "file".
    pub file: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CertificateReport {
    pub principal: String,
    pub role: String,
    /// SHA-256 of the client certificate's DER form (public, like the certificate).
    pub sha256: String,
}

/// Every key `None` when the listener is plaintext.
#[derive(Debug, Serialize)]
pub struct TlsReport {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub client_ca: Option<String>,
}

/// `None`: unlimited.
#[derive(Debug, Serialize)]
pub struct LimitsReport {
    pub max_sessions: Option<usize>,
    pub max_sessions_per_principal: Option<usize>,
    pub max_message_size: SizeReport,
    pub max_graph_def_size: Option<SizeReport>,
    pub max_feed_elements: Option<u64>,
    pub max_feed_size: Option<SizeReport>,
    /// "config", "default" or "off".
    pub max_feed_size_from: &'static str,
    pub max_buffered_size: Option<SizeReport>,
    /// "config", "default" or "off".
    pub max_buffered_size_from: &'static str,
    pub max_concurrent_runs_per_session: Option<u32>,
    pub max_run_timeout: Option<String>,
}

/// Every key `None` when sessions live as long as the daemon (no state directory).
#[derive(Debug, Serialize)]
pub struct StateReport {
    pub dir: Option<String>,
    pub checkpoint_interval: Option<String>,
}

/// `[sandbox]`, and what the kernel where check-config runs offers.
#[derive(Debug, Serialize)]
pub struct SandboxReport {
    /// "auto", "true" or "false".
    pub enabled: &'static str,
    pub read_paths: Vec<String>,
    pub write_paths: Vec<String>,
    pub max_open_files: u64,
    pub network: bool,
    /// The Landlock ABI of this machine's kernel; `None`: no Landlock here.
    pub landlock_abi: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct LogReport {
    pub filter: String,
    pub format: &'static str,
}

/// The `[auth]` table as the file writes it: the validated config keeps credentials only as
/// digests, without where each came from.
#[derive(Debug, Default, Deserialize)]
struct FileText {
    #[serde(default)]
    auth: FileAuth,
    #[serde(default)]
    policy: FilePolicy,
    #[serde(default)]
    limits: FileLimits,
}

/// The keys whose defaults are derived or on unless switched off: whether the file sets them.
#[derive(Debug, Default, Deserialize)]
struct FilePolicy {
    hard_limit: Option<String>,
    max_hard_limit: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct FileLimits {
    max_feed_size: Option<String>,
    max_buffered_size: Option<String>,
}

/// Where a key's value comes from, as the file writes it: absent or "" is the default.
fn value_from(value: &Option<String>) -> &'static str {
    match value.as_deref() {
        None | Some("") => "default",
        Some(crate::policy::config::OFF) => "off",
        Some(_) => "config",
    }
}

#[derive(Debug, Default, Deserialize)]
struct FileAuth {
    #[serde(default)]
    tokens: Vec<FileCredential>,
    #[serde(default)]
    certificates: Vec<FileCredential>,
}

#[derive(Debug, Deserialize)]
struct FileCredential {
    principal: String,
    role: Option<String>,
    sha256: Option<String>,
    file: Option<std::path::PathBuf>,
}

/// A duration in the TOML file's own syntax ("30s", "1m", "250ms").
fn toml_duration(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// Bytes for people: the largest binary unit that fits, exact when it divides ("512 MiB"),
/// else to one decimal ("2.0 GiB" for 2 GiB - 1).
fn human_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if bytes >= size {
            return if bytes.is_multiple_of(size) {
                format!("{} {unit}", bytes / size)
            } else {
                format!("{:.1} {unit}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes} B")
}

fn size(bytes: u64) -> SizeReport {
    SizeReport {
        bytes,
        human: human_size(bytes),
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

impl ConfigReport {
    /// `text` is the file `config` was loaded from, for where each credential comes from.
    fn new(path: &Path, text: &str, config: &Config) -> anyhow::Result<ConfigReport> {
        let base = path.parent().unwrap_or(Path::new("."));
        let file: FileText = toml::from_str(text).context("read the [auth] table")?;
        let mut warnings = Vec::new();
        if !config.workers.binary.is_file() {
            warnings.push(format!(
                "workers.binary {} does not exist: `tfsd serve` would refuse to start",
                config.workers.binary.display()
            ));
        }
        if let Some(python) = &config.python
            && !python.interpreter.is_file()
        {
            warnings.push(format!(
                "python.interpreter {} does not exist: `tfsd serve` would refuse to start \
                 (scripts/python-env makes the project's environment)",
                python.interpreter.display()
            ));
        }
        if let Some(tls) = &config.tls {
            for (key, path) in [
                ("tls.cert", Some(&tls.cert)),
                ("tls.key", Some(&tls.key)),
                ("tls.client_ca", tls.client_ca.as_ref()),
            ] {
                if let Some(path) = path
                    && !path.is_file()
                {
                    warnings.push(format!(
                        "{key} {} does not exist: `tfsd serve` would refuse to start",
                        path.display()
                    ));
                }
            }
        }
        if let Some(state) = &config.state
            && state.dir.exists()
            && !state.dir.is_dir()
        {
            warnings.push(format!(
                "state.dir {} is not a directory: `tfsd serve` would refuse to start",
                state.dir.display()
            ));
        }
        let landlock_abi = crate::worker::sandbox::landlock_abi();
        if config.sandbox.mode == SandboxMode::Required && landlock_abi.is_none() {
            warnings.push(
                "sandbox.enabled = true, but this kernel has no Landlock: `tfsd serve` would \
                 refuse to start here"
                    .to_string(),
            );
        }
        for (key, paths) in [
            ("sandbox.read_paths", &config.sandbox.read_paths),
            ("sandbox.write_paths", &config.sandbox.write_paths),
        ] {
            for path in paths.iter().filter(|path| !path.exists()) {
                warnings.push(format!(
                    "{key}: {} does not exist: `tfsd serve` would refuse to start",
                    path.display()
                ));
            }
        }
        let role = |role: &Option<String>| role.clone().unwrap_or_else(|| "client".into());
        let policy = &config.policy;
        let budget = crate::system::memory_budget();
        Ok(ConfigReport {
            path: display(path),
            valid: true,
            server: ServerReport {
                listen: config.listen.to_string(),
                drain_timeout: toml_duration(config.drain_timeout),
                unix_socket: config
                    .unix_socket
                    .as_ref()
                    .map(|socket| display(&socket.path)),
                unix_socket_mode: config
                    .unix_socket
                    .as_ref()
                    .map(|socket| format!("{:04o}", socket.mode)),
                unix_socket_group: config
                    .unix_socket
                    .as_ref()
                    .and_then(|socket| socket.group.as_ref())
                    .map(|group| format!("{} (gid {})", group.name, group.gid)),
            },
            metrics: MetricsReport {
                listen: config.metrics_listen.map(|address| address.to_string()),
            },
            master: MasterReport {
                listen: config.master_listen.map(|address| address.to_string()),
                allow_unauthenticated: config.master_allow_unauthenticated,
            },
            workers: WorkersReport {
                binary: display(&config.workers.binary),
                pool_size: config.workers.pool_size,
                pool_max: config.workers.pool_max,
                start_timeout: toml_duration(config.workers.start_timeout),
                library_dir: config.workers.library_dir.as_deref().map(display),
                env: config.workers.env.clone(),
                call_timeout: toml_duration(config.workers.deadlines.call),
                run_grace: toml_duration(config.workers.deadlines.run_grace),
                liveness_timeout: toml_duration(config.workers.deadlines.liveness),
                max_concurrent_starts: config.workers.starts.max_concurrent,
                max_waiting_creates: config.workers.starts.max_waiting,
                start_wait: toml_duration(config.workers.starts.wait),
                user: config
                    .workers
                    .user
                    .as_ref()
                    .map(|user| format!("{} (uid {}, gid {})", user.name, user.uid, user.gid)),
                memory_enforcement: config.workers.memory_enforcement.as_str(),
                max_tasks: config.workers.max_tasks,
            },
            python: PythonReport {
                interpreter: config.python.as_ref().map(|p| display(&p.interpreter)),
                preload: config.python.as_ref().map(|p| p.preload.clone()),
                pool_size: config.python.as_ref().map(|p| p.pool_size),
                pool_max: config.python.as_ref().map(|p| p.pool_max),
                start_timeout: config
                    .python
                    .as_ref()
                    .map(|p| toml_duration(p.start_timeout)),
                env: config.python.as_ref().map(|p| p.env.clone()),
            },
            policy: PolicyReport {
                interval: toml_duration(policy.interval),
                dry_run: policy.dry_run,
                soft_limit: policy.soft_limit_bytes.map(size),
                hard_limit: policy.hard_limit_bytes.map(size),
                max_soft_limit: policy.max_soft_limit_bytes.map(size),
                max_hard_limit: policy.max_hard_limit_bytes.map(size),
                hard_limit_from: value_from(&file.policy.hard_limit),
                max_hard_limit_from: value_from(&file.policy.max_hard_limit),
                memory_budget: budget.map(|budget| size(budget.bytes)),
                memory_budget_from: budget.map(|budget| {
                    if budget.from_cgroup {
                        "cgroup"
                    } else {
                        "machine"
                    }
                }),
                gpu_soft_limit: policy.gpu_soft_limit_bytes.map(size),
                gpu_hard_limit: policy.gpu_hard_limit_bytes.map(size),
                max_gpu_soft_limit: policy.max_gpu_soft_limit_bytes.map(size),
                max_gpu_hard_limit: policy.max_gpu_hard_limit_bytes.map(size),
                gentle_action: match policy.gentle_action {
                    GentleAction::PurgeVariables => "purge_variables",
                    GentleAction::ResetGraph => "reset_graph",
                },
                cooldown: toml_duration(policy.cooldown),
                rearm_below: policy.rearm_below,
                max_actions: policy.max_actions,
                action_window: toml_duration(policy.action_window),
                pressure: PressureReport {
                    min_available: policy.pressure.min_available_bytes.map(size),
                    psi_some_avg10: policy.pressure.psi_some_avg10,
                    psi_for: toml_duration(policy.pressure.psi_duration),
                    min_gpu_free: policy.pressure.min_gpu_free_bytes.map(size),
                },
                idle: IdleReport {
                    timeout: policy.idle_timeout.map(toml_duration),
                    action: match policy.idle_action {
                        IdleAction::Close => "close",
                        IdleAction::Recycle => "recycle",
                    },
                },
            },
            auth: AuthReport {
                allow_unauthenticated: config.auth.allow_unauthenticated,
                tokens: file
                    .auth
                    .tokens
                    .iter()
                    .map(|token| TokenReport {
                        principal: token.principal.clone(),
                        role: role(&token.role),
                        source: if token.file.is_some() {
                            "file"
                        } else {
                            "inline"
                        },
                        file: token.file.as_ref().map(|file| display(&base.join(file))),
                    })
                    .collect(),
                certificates: file
                    .auth
                    .certificates
                    .iter()
                    .map(|certificate| CertificateReport {
                        principal: certificate.principal.clone(),
                        role: role(&certificate.role),
                        sha256: certificate
                            .sha256
                            .as_deref()
                            .unwrap_or_default()
                            .trim()
                            .to_ascii_lowercase(),
                    })
                    .collect(),
                peers: {
                    let mut peers: Vec<PeerReport> = config
                        .auth
                        .peers()
                        .map(|(uid, caller)| PeerReport {
                            uid,
                            principal: caller.principal.clone(),
                            role: match caller.role {
                                crate::auth::Role::Client => "client",
                                crate::auth::Role::Operator => "operator",
                            },
                        })
                        .collect();
                    peers.sort_by_key(|peer| peer.uid);
                    peers
                },
            },
            tls: TlsReport {
                cert: config.tls.as_ref().map(|tls| display(&tls.cert)),
                key: config.tls.as_ref().map(|tls| display(&tls.key)),
                client_ca: config
                    .tls
                    .as_ref()
                    .and_then(|tls| tls.client_ca.as_deref().map(display)),
            },
            limits: LimitsReport {
                max_sessions: config.limits.max_sessions,
                max_sessions_per_principal: config.limits.max_sessions_per_principal,
                max_message_size: size(config.limits.max_message_bytes as u64),
                max_graph_def_size: config
                    .limits
                    .max_graph_def_bytes
                    .map(|bytes| size(bytes as u64)),
                max_feed_elements: config.limits.max_feed_elements,
                max_feed_size: config.limits.max_feed_bytes.map(size),
                max_feed_size_from: value_from(&file.limits.max_feed_size),
                max_buffered_size: config.limits.max_buffered_bytes.map(size),
                max_buffered_size_from: value_from(&file.limits.max_buffered_size),
                max_concurrent_runs_per_session: config.limits.max_concurrent_runs_per_session,
                max_run_timeout: config.limits.max_run_timeout.map(toml_duration),
            },
            state: StateReport {
                dir: config.state.as_ref().map(|state| display(&state.dir)),
                checkpoint_interval: config
                    .state
                    .as_ref()
                    .map(|state| toml_duration(state.checkpoint_interval)),
            },
            log: LogReport {
                filter: config.log.filter.clone(),
                format: match config.log.format {
                    LogFormat::Human => "human",
                    LogFormat::Json => "json",
                },
            },
            sandbox: SandboxReport {
                enabled: match config.sandbox.mode {
                    SandboxMode::Auto => "auto",
                    SandboxMode::Required => "true",
                    SandboxMode::Off => "false",
                },
                read_paths: config
                    .sandbox
                    .read_paths
                    .iter()
                    .map(|p| display(p))
                    .collect(),
                write_paths: config
                    .sandbox
                    .write_paths
                    .iter()
                    .map(|p| display(p))
                    .collect(),
                max_open_files: config.sandbox.max_open_files,
                network: config.sandbox.network,
                landlock_abi,
            },
            gpu: GpuReport {
                graph_devices: placement_value(&config.gpu.graph),
                python_devices: placement_value(&config.gpu.python),
                memory_growth: config.gpu.memory_growth,
                allocator: config.gpu.allocator.clone(),
            },
            warnings,
        })
    }
}

/// "1073741824 bytes (1 GiB)", or `absent` when there is no size.
fn size_text(size: &Option<SizeReport>, absent: &str) -> String {
    match size {
        Some(size) => format!("{} bytes ({})", size.bytes, size.human),
        None => absent.to_string(),
    }
}

fn or_text<T: ToString>(value: &Option<T>, absent: &str) -> String {
    value
        .as_ref()
        .map_or_else(|| absent.to_string(), ToString::to_string)
}

fn env_text(env: &BTreeMap<String, String>) -> String {
    env.iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl ConfigReport {
    /// One list of "key  value" lines per table, in the order of the JSON report.
    fn blocks(&self) -> Vec<Vec<(String, String)>> {
        let line = |key: &str, value: String| (key.to_string(), value);
        let mut blocks = vec![
            vec![
                line("server.listen", self.server.listen.clone()),
                line("server.drain_timeout", self.server.drain_timeout.clone()),
                line(
                    "server.unix_socket",
                    or_text(&self.server.unix_socket, "(off)"),
                ),
                line(
                    "server.unix_socket_mode",
                    or_text(&self.server.unix_socket_mode, "-"),
                ),
                line(
                    "server.unix_socket_group",
                    match (&self.server.unix_socket, &self.server.unix_socket_group) {
                        (None, _) => "-".to_string(),
                        (Some(_), None) => "(the daemon's own group)".to_string(),
                        (Some(_), Some(group)) => group.clone(),
                    },
                ),
            ],
            vec![line(
                "metrics.listen",
                or_text(&self.metrics.listen, "(off)"),
            )],
            vec![
                line("master.listen", or_text(&self.master.listen, "(off)")),
                line(
                    "master.allow_unauthenticated",
                    self.master.allow_unauthenticated.to_string(),
                ),
            ],
            vec![
                line("workers.binary", self.workers.binary.clone()),
                line("workers.pool_size", self.workers.pool_size.to_string()),
                line("workers.pool_max", self.workers.pool_max.to_string()),
                line("workers.start_timeout", self.workers.start_timeout.clone()),
                line(
                    "workers.library_dir",
                    or_text(&self.workers.library_dir, "(none)"),
                ),
                line("workers.env", env_text(&self.workers.env)),
                line("workers.call_timeout", self.workers.call_timeout.clone()),
                line("workers.run_grace", self.workers.run_grace.clone()),
                line(
                    "workers.liveness_timeout",
                    self.workers.liveness_timeout.clone(),
                ),
                line(
                    "workers.max_concurrent_starts",
                    self.workers.max_concurrent_starts.to_string(),
                ),
                line(
                    "workers.max_waiting_creates",
                    self.workers.max_waiting_creates.to_string(),
                ),
                line("workers.start_wait", self.workers.start_wait.clone()),
                line(
                    "workers.user",
                    or_text(
                        &self.workers.user,
                        "(none: the daemon's user; nobody if that is root)",
                    ),
                ),
                line(
                    "workers.memory_enforcement",
                    self.workers.memory_enforcement.to_string(),
                ),
                line("workers.max_tasks", self.workers.max_tasks.to_string()),
            ],
        ];
        let python = &self.python;
        blocks.push(match &python.interpreter {
            None => vec![line(
                "python.interpreter",
                "(off: Python sessions are refused)".into(),
            )],
            Some(interpreter) => vec![
                line("python.interpreter", interpreter.clone()),
                line(
                    "python.preload",
                    python.preload.as_deref().unwrap_or_default().join(", "),
                ),
                line("python.pool_size", or_text(&python.pool_size, "")),
                line("python.pool_max", or_text(&python.pool_max, "")),
                line("python.start_timeout", or_text(&python.start_timeout, "")),
                line(
                    "python.env",
                    python.env.as_ref().map(env_text).unwrap_or_default(),
                ),
            ],
        });
        let policy = &self.policy;
        let budget = match (&policy.memory_budget, policy.memory_budget_from) {
            (Some(budget), Some("cgroup")) => format!("its cgroup's limit, {}", budget.human),
            (Some(budget), _) => format!("this machine's {}", budget.human),
            (None, _) => "this machine's memory, unknown here".to_string(),
        };
        let share = policy.memory_budget.as_ref().map(|budget| {
            crate::policy::config::default_hard_limit(crate::system::MemoryBudget {
                bytes: budget.bytes,
                from_cgroup: false,
            })
        });
        let derived = |size: &Option<SizeReport>, from: &str| match from {
            "default" if size.as_ref().map(|size| size.bytes) == share => format!(
                "{}: default, {}% of {budget}",
                size_text(size, "(none)"),
                crate::policy::config::DEFAULT_HARD_LIMIT_PERCENT
            ),
            // The derived figure, raised to a configured soft (or hard) limit above it.
            "default" => format!(
                "{}: default, raised to the configured limit",
                size_text(size, "(none)")
            ),
            "off" => "(off)".to_string(),
            _ => size_text(size, "(none)"),
        };
        blocks.push(vec![
            line("policy.interval", policy.interval.clone()),
            line("policy.dry_run", policy.dry_run.to_string()),
            line("policy.soft_limit", size_text(&policy.soft_limit, "(none)")),
            line(
                "policy.hard_limit",
                derived(&policy.hard_limit, policy.hard_limit_from),
            ),
            line(
                "policy.max_soft_limit",
                size_text(&policy.max_soft_limit, "(none)"),
            ),
            line(
                "policy.max_hard_limit",
                derived(&policy.max_hard_limit, policy.max_hard_limit_from),
            ),
            line(
                "policy.gpu_soft_limit",
                size_text(&policy.gpu_soft_limit, "(off)"),
            ),
            line(
                "policy.gpu_hard_limit",
                size_text(&policy.gpu_hard_limit, "(off)"),
            ),
            line(
                "policy.max_gpu_soft_limit",
                size_text(&policy.max_gpu_soft_limit, "(none)"),
            ),
            line(
                "policy.max_gpu_hard_limit",
                size_text(&policy.max_gpu_hard_limit, "(none)"),
            ),
            line("policy.gentle_action", policy.gentle_action.into()),
            line("policy.cooldown", policy.cooldown.clone()),
            line("policy.rearm_below", policy.rearm_below.to_string()),
            line("policy.max_actions", policy.max_actions.to_string()),
            line("policy.action_window", policy.action_window.clone()),
            line(
                "policy.pressure.min_available",
                size_text(&policy.pressure.min_available, "(none)"),
            ),
            line(
                "policy.pressure.psi_some_avg10",
                or_text(&policy.pressure.psi_some_avg10, "(none)"),
            ),
            line("policy.pressure.psi_for", policy.pressure.psi_for.clone()),
            line(
                "policy.pressure.min_gpu_free",
                size_text(&policy.pressure.min_gpu_free, "(none)"),
            ),
            line(
                "policy.idle.timeout",
                or_text(&policy.idle.timeout, "(none: idle sessions stay)"),
            ),
            line("policy.idle.action", policy.idle.action.into()),
        ]);
        let auth = &self.auth;
        let mut auth_block = vec![
            line(
                "auth",
                if auth.tokens.is_empty() && auth.certificates.is_empty() && auth.peers.is_empty() {
                    "off (no credentials: every caller is the anonymous operator)".into()
                } else {
                    "every call needs a token, a client certificate, or (on the Unix socket) a \
                     mapped uid"
                        .into()
                },
            ),
            line(
                "auth.allow_unauthenticated",
                auth.allow_unauthenticated.to_string(),
            ),
        ];
        if auth.tokens.is_empty() {
            auth_block.push(line("auth.tokens", "(none)".into()));
        }
        for (index, token) in auth.tokens.iter().enumerate() {
            let how = match &token.file {
                Some(file) => format!("token file {file}"),
                None => "token (inline SHA-256, 32 bytes)".into(),
            };
            auth_block.push(line(
                &format!("auth.tokens[{index}]"),
                format!("{} ({}): {how}", token.principal, token.role),
            ));
        }
        if auth.certificates.is_empty() {
            auth_block.push(line("auth.certificates", "(none)".into()));
        }
        for (index, certificate) in auth.certificates.iter().enumerate() {
            auth_block.push(line(
                &format!("auth.certificates[{index}]"),
                format!(
                    "{} ({}): client certificate SHA-256 {}",
                    certificate.principal, certificate.role, certificate.sha256
                ),
            ));
        }
        if auth.peers.is_empty() {
            auth_block.push(line("auth.peers", "(none)".into()));
        }
        for (index, peer) in auth.peers.iter().enumerate() {
            auth_block.push(line(
                &format!("auth.peers[{index}]"),
                format!(
                    "{} ({}): Unix-socket peer uid {}",
                    peer.principal, peer.role, peer.uid
                ),
            ));
        }
        blocks.push(auth_block);
        blocks.push(match &self.tls.cert {
            None => vec![line("tls.cert", "(off: plaintext)".into())],
            Some(cert) => vec![
                line("tls.cert", cert.clone()),
                line("tls.key", or_text(&self.tls.key, "")),
                line(
                    "tls.client_ca",
                    or_text(&self.tls.client_ca, "(none: no client certificates)"),
                ),
            ],
        });
        let limits = &self.limits;
        blocks.push(vec![
            line(
                "limits.max_sessions",
                or_text(&limits.max_sessions, "(none)"),
            ),
            line(
                "limits.max_sessions_per_principal",
                or_text(&limits.max_sessions_per_principal, "(none)"),
            ),
            line(
                "limits.max_message_size",
                size_text(&Some(limits.max_message_size.clone()), ""),
            ),
            line(
                "limits.max_graph_def_size",
                size_text(&limits.max_graph_def_size, "(none)"),
            ),
            line(
                "limits.max_feed_elements",
                or_text(&limits.max_feed_elements, "(none)"),
            ),
            line(
                "limits.max_feed_size",
                match limits.max_feed_size_from {
                    "default" => format!("{}: default", size_text(&limits.max_feed_size, "")),
                    "off" => "(off)".to_string(),
                    _ => size_text(&limits.max_feed_size, "(none)"),
                },
            ),
            line(
                "limits.max_buffered_size",
                match limits.max_buffered_size_from {
                    "default" => format!("{}: default", size_text(&limits.max_buffered_size, "")),
                    "off" => "(off)".to_string(),
                    _ => size_text(&limits.max_buffered_size, "(none)"),
                },
            ),
            line(
                "limits.max_concurrent_runs_per_session",
                or_text(&limits.max_concurrent_runs_per_session, "(none)"),
            ),
            line(
                "limits.max_run_timeout",
                or_text(&limits.max_run_timeout, "(none)"),
            ),
        ]);
        blocks.push(match &self.state.dir {
            None => vec![line(
                "state.dir",
                "(off: sessions last as long as the daemon)".into(),
            )],
            Some(dir) => vec![
                line("state.dir", dir.clone()),
                line(
                    "state.checkpoint_interval",
                    or_text(&self.state.checkpoint_interval, ""),
                ),
            ],
        });
        let sandbox = &self.sandbox;
        let paths = |paths: &[String]| match paths {
            [] => "(none)".to_string(),
            paths => paths.join(", "),
        };
        blocks.push(vec![
            line(
                "sandbox.enabled",
                match (sandbox.enabled, sandbox.landlock_abi) {
                    ("false", _) => "false (workers run unconfined)".to_string(),
                    (enabled, Some(abi)) => format!("{enabled} (landlock ABI {abi} here)"),
                    (enabled, None) => format!("{enabled} (no landlock here)"),
                },
            ),
            line("sandbox.read_paths", paths(&sandbox.read_paths)),
            line("sandbox.write_paths", paths(&sandbox.write_paths)),
            line("sandbox.max_open_files", sandbox.max_open_files.to_string()),
            line(
                "sandbox.network",
                if sandbox.network {
                    "true (workers may open sockets)".to_string()
                } else {
                    "false (no sockets but AF_UNIX)".to_string()
                },
            ),
        ]);
        blocks.push(vec![
            line("gpu.graph_devices", self.gpu.graph_devices.to_string()),
            line("gpu.python_devices", self.gpu.python_devices.to_string()),
            line("gpu.memory_growth", self.gpu.memory_growth.to_string()),
            line(
                "gpu.allocator",
                or_text(&self.gpu.allocator, "(TensorFlow's default)"),
            ),
        ]);
        blocks.push(vec![
            line("log.filter", self.log.filter.clone()),
            line("log.format", self.log.format.into()),
        ]);
        blocks
    }
}

impl Human for ConfigReport {
    fn human(&self, _now: SystemTime) -> String {
        let mut text = format!("{} is valid\n", self.path);
        for block in self.blocks() {
            let pairs: Vec<(&str, String)> = block
                .iter()
                .map(|(key, value)| (key.as_str(), value.clone()))
                .collect();
            text.push('\n');
            text.push_str(&fields(&pairs));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own for one test, removed when dropped.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "tfsd-check-config-{}",
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::create_dir_all(&dir).expect("create the test directory");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The report for `text` as if read from `dir/tfsd.toml`.
    fn report(dir: &Path, text: &str) -> ConfigReport {
        let config = Config::parse(text, dir).expect("valid");
        ConfigReport::new(&dir.join("tfsd.toml"), text, &config).expect("report")
    }

    const FILE_TOKEN: &str = "file-secret-token-0123456789";
    const INLINE_TOKEN: &str = "inline-secret-token-abcdefghij";

    fn sha256_hex(text: &str) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(text.as_bytes()))
    }

    /// A config that sets every key of every table, with a token file in `dir`.
    fn every_key(dir: &Path) -> String {
        std::fs::write(dir.join("ops.token"), format!("{FILE_TOKEN}\n")).expect("token file");
        // Only the daemon's user may read a token file (auth.rs refuses it otherwise).
        let private = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600);
        std::fs::set_permissions(dir.join("ops.token"), private).expect("chmod the token file");
        format!(
            r#"
            [server]
            listen = "0.0.0.0:7000"
            unix_socket = "/run/tfsd/tfsd.sock"
            unix_socket_mode = "0600"
            unix_socket_group = "root"
            [metrics]
            listen = "127.0.0.1:9999"
            [master]
            listen = ""
            [workers]
            binary = "bin/tfsd-worker"
            pool_size = 3
            start_timeout = "5s"
            library_dir = "/opt/tf/lib"
            env = {{ OMP_NUM_THREADS = "2" }}
            [python]
            interpreter = "/nonexistent/venv/bin/python"
            preload = ["tensorflow", "numpy"]
            pool_size = 2
            start_timeout = "90s"
            env = {{ KERAS_BACKEND = "tensorflow" }}
            [policy]
            interval = "100ms"
            dry_run = true
            soft_limit = "1GiB"
            hard_limit = "2GiB"
            max_soft_limit = "4GiB"
            max_hard_limit = "1.5GB"
            gpu_soft_limit = "6GiB"
            gpu_hard_limit = "8GiB"
            max_gpu_soft_limit = "12GiB"
            max_gpu_hard_limit = "16GiB"
            gentle_action = "reset_graph"
            cooldown = "10s"
            rearm_below = 0.8
            max_actions = 7
            action_window = "5m"
            [policy.pressure]
            min_available = "512MiB"
            psi_some_avg10 = 40.0
            psi_for = "20s"
            min_gpu_free = "1GiB"
            [policy.idle]
            timeout = "1h"
            action = "close"
            [auth]
            allow_unauthenticated = false
            [[auth.tokens]]
            principal = "alice"
            sha256 = "{inline}"
            [[auth.tokens]]
            principal = "ops"
            role = "operator"
            file = "ops.token"
            [[auth.certificates]]
            principal = "trainer"
            sha256 = "{certificate}"
            [[auth.peers]]
            uid = 1000
            principal = "alice"
            [[auth.peers]]
            user = "root"
            principal = "admin"
            role = "operator"
            [tls]
            cert = "server.pem"
            key = "server.key"
            client_ca = "/etc/tfsd/clients-ca.pem"
            [limits]
            max_sessions = 64
            max_sessions_per_principal = 8
            max_message_size = "512MiB"
            max_graph_def_size = "256MiB"
            max_feed_elements = 268435456
            max_feed_size = "1GiB"
            max_concurrent_runs_per_session = 4
            max_run_timeout = "1h"
            [state]
            dir = "state"
            checkpoint_interval = "15m"
            [log]
            filter = "debug"
            format = "json"
            [gpu]
            graph_devices = [1, 0]
            python_devices = []
            memory_growth = false
            allocator = "cuda_malloc_async"
            "#,
            inline = sha256_hex(INLINE_TOKEN),
            certificate = "ab".repeat(32),
        )
    }

    #[test]
    fn the_report_uses_the_toml_keys_and_syntax() {
        let text = "[workers]\npool_size = 2\nstart_timeout = \"1m\"\n";
        let config = Config::parse(text, Path::new("/etc/tfsd")).expect("valid");
        let report =
            ConfigReport::new(Path::new("/etc/tfsd/tfsd.toml"), text, &config).expect("report");
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["workers"]["pool_size"], 2);
        assert_eq!(json["workers"]["start_timeout"], "1m");
        // Supervision defaults are shown with their values.
        assert_eq!(json["workers"]["call_timeout"], "2m");
        assert_eq!(json["workers"]["liveness_timeout"], "5s");
        assert_eq!(json["workers"]["max_waiting_creates"], 64);
        assert_eq!(json["workers"]["pool_max"], 4);
        assert_eq!(json["server"]["drain_timeout"], "30s");
        assert_eq!(json["log"]["format"], "human");
        assert_eq!(json["master"]["listen"], "127.0.0.1:2222");
        let text = report.human(SystemTime::now());
        assert!(text.starts_with("/etc/tfsd/tfsd.toml is valid\n"), "{text}");
        assert!(
            text.lines()
                .any(|line| line.starts_with("workers.start_timeout ") && line.ends_with(" 1m")),
            "{text}"
        );
    }

    #[test]
    fn every_section_shows_each_value_under_its_key() {
        let dir = TempDir::new();
        let report = report(&dir.0, &every_key(&dir.0));
        let json = serde_json::to_value(&report).expect("json");
        let at = |path: &str| dir.0.join(path).display().to_string();

        assert_eq!(json["server"]["listen"], "0.0.0.0:7000");
        assert_eq!(json["server"]["unix_socket"], "/run/tfsd/tfsd.sock");
        assert_eq!(json["server"]["unix_socket_mode"], "0600");
        assert_eq!(json["server"]["unix_socket_group"], "root (gid 0)");
        assert_eq!(json["metrics"]["listen"], "127.0.0.1:9999");
        assert_eq!(json["master"]["listen"], serde_json::Value::Null);
        assert_eq!(json["workers"]["binary"], at("bin/tfsd-worker"));
        assert_eq!(json["workers"]["pool_size"], 3);
        assert_eq!(json["workers"]["start_timeout"], "5s");
        assert_eq!(json["workers"]["library_dir"], "/opt/tf/lib");
        assert_eq!(json["workers"]["env"]["OMP_NUM_THREADS"], "2");

        let python = &json["python"];
        assert_eq!(python["interpreter"], "/nonexistent/venv/bin/python");
        assert_eq!(
            python["preload"],
            serde_json::json!(["tensorflow", "numpy"])
        );
        assert_eq!(python["pool_size"], 2);
        assert_eq!(python["start_timeout"], "1m 30s");
        assert_eq!(python["env"]["KERAS_BACKEND"], "tensorflow");
        assert_eq!(python["env"]["OMP_NUM_THREADS"], "2", "[workers.env] too");

        let policy = &json["policy"];
        assert_eq!(policy["interval"], "100ms");
        assert_eq!(policy["dry_run"], true);
        assert_eq!(policy["soft_limit"]["bytes"], 1u64 << 30);
        assert_eq!(policy["soft_limit"]["human"], "1 GiB");
        assert_eq!(policy["hard_limit"]["bytes"], 2u64 << 30);
        assert_eq!(policy["max_soft_limit"]["bytes"], 4u64 << 30);
        assert_eq!(policy["max_hard_limit"]["bytes"], 1_500_000_000u64);
        assert_eq!(policy["max_hard_limit"]["human"], "1.4 GiB");
        assert_eq!(policy["hard_limit_from"], "config");
        assert_eq!(policy["max_hard_limit_from"], "config");
        assert_eq!(policy["gentle_action"], "reset_graph");
        assert_eq!(policy["cooldown"], "10s");
        assert_eq!(policy["rearm_below"], 0.8);
        assert_eq!(policy["max_actions"], 7);
        assert_eq!(policy["action_window"], "5m");
        assert_eq!(policy["pressure"]["min_available"]["bytes"], 512u64 << 20);
        assert_eq!(policy["pressure"]["min_available"]["human"], "512 MiB");
        assert_eq!(policy["pressure"]["psi_some_avg10"], 40.0);
        assert_eq!(policy["pressure"]["psi_for"], "20s");
        assert_eq!(policy["pressure"]["min_gpu_free"]["bytes"], 1u64 << 30);
        assert_eq!(policy["gpu_soft_limit"]["bytes"], 6u64 << 30);
        assert_eq!(policy["gpu_hard_limit"]["bytes"], 8u64 << 30);
        assert_eq!(policy["max_gpu_soft_limit"]["bytes"], 12u64 << 30);
        assert_eq!(policy["max_gpu_hard_limit"]["bytes"], 16u64 << 30);
        assert_eq!(policy["idle"]["timeout"], "1h");
        assert_eq!(policy["idle"]["action"], "close");

        let gpu = &json["gpu"];
        assert_eq!(gpu["graph_devices"], serde_json::json!([1, 0]));
        assert_eq!(gpu["python_devices"], serde_json::json!([]));
        assert_eq!(gpu["memory_growth"], false);
        assert_eq!(gpu["allocator"], "cuda_malloc_async");

        let auth = &json["auth"];
        assert_eq!(auth["allow_unauthenticated"], false);
        assert_eq!(
            auth["tokens"],
            serde_json::json!([
                {"principal": "alice", "role": "client", "source": "inline", "file": null},
                {"principal": "ops", "role": "operator", "source": "file", "file": at("ops.token")},
            ])
        );
        assert_eq!(
            auth["certificates"],
            serde_json::json!([
                {"principal": "trainer", "role": "client", "sha256": "ab".repeat(32)},
            ])
        );
        assert_eq!(
            auth["peers"],
            serde_json::json!([
                {"uid": 0, "principal": "admin", "role": "operator"},
                {"uid": 1000, "principal": "alice", "role": "client"},
            ])
        );

        assert_eq!(json["tls"]["cert"], at("server.pem"));
        assert_eq!(json["tls"]["key"], at("server.key"));
        assert_eq!(json["tls"]["client_ca"], "/etc/tfsd/clients-ca.pem");

        let limits = &json["limits"];
        assert_eq!(limits["max_sessions"], 64);
        assert_eq!(limits["max_sessions_per_principal"], 8);
        assert_eq!(limits["max_message_size"]["bytes"], 512u64 << 20);
        assert_eq!(limits["max_graph_def_size"]["bytes"], 256u64 << 20);
        assert_eq!(limits["max_graph_def_size"]["human"], "256 MiB");
        assert_eq!(limits["max_feed_elements"], 268_435_456u64);
        assert_eq!(limits["max_feed_size"]["bytes"], 1u64 << 30);
        assert_eq!(limits["max_feed_size_from"], "config");
        assert_eq!(limits["max_concurrent_runs_per_session"], 4);
        assert_eq!(limits["max_run_timeout"], "1h");

        assert_eq!(json["state"]["dir"], at("state"));
        assert_eq!(json["state"]["checkpoint_interval"], "15m");
        assert_eq!(json["log"]["filter"], "debug");
        assert_eq!(json["log"]["format"], "json");

        // The interpreter and the TLS files do not exist: serve would refuse them.
        for key in ["python.interpreter", "tls.cert", "tls.key", "tls.client_ca"] {
            assert!(
                report
                    .warnings
                    .iter()
                    .any(|warning| warning.starts_with(key)),
                "{key}: {:?}",
                report.warnings
            );
        }

        let text = report.human(SystemTime::now());
        for line in [
            "python.preload        tensorflow, numpy\n",
            "policy.soft_limit               1073741824 bytes (1 GiB)\n",
            "policy.idle.action              close\n",
            "auth.tokens[0]              alice (client): token (inline SHA-256, 32 bytes)\n",
            "limits.max_run_timeout                  1h\n",
            "state.checkpoint_interval  15m\n",
            "tls.client_ca  /etc/tfsd/clients-ca.pem\n",
            "auth.peers[1]               alice (client): Unix-socket peer uid 1000\n",
            "server.unix_socket_group  root (gid 0)\n",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
        assert!(
            text.contains(&format!("ops (operator): token file {}\n", at("ops.token"))),
            "{text}"
        );
        assert!(
            text.contains(&format!("client certificate SHA-256 {}", "ab".repeat(32))),
            "{text}"
        );
    }

    #[test]
    fn a_token_never_appears_in_either_output() {
        let dir = TempDir::new();
        let report = report(&dir.0, &every_key(&dir.0));
        let json = serde_json::to_string_pretty(&report).expect("json");
        let text = report.human(SystemTime::now());
        let warnings = report.warnings.join("\n");
        for secret in [
            FILE_TOKEN.to_string(),
            INLINE_TOKEN.to_string(),
            // Not the token, but all an attacker needs to test guesses offline.
            sha256_hex(INLINE_TOKEN),
            sha256_hex(FILE_TOKEN),
        ] {
            for (name, output) in [("json", &json), ("human", &text), ("warnings", &warnings)] {
                assert!(!output.contains(&secret), "{secret} in {name}:\n{output}");
            }
        }
    }

    #[test]
    fn an_empty_file_shows_every_default() {
        let dir = TempDir::new();
        let report = report(&dir.0, "");
        let json = serde_json::to_value(&report).expect("json");
        let null = serde_json::Value::Null;
        for section in [
            "server", "metrics", "master", "workers", "python", "policy", "auth", "tls", "limits",
            "state", "log",
        ] {
            assert!(json[section].is_object(), "{section}: {json}");
        }
        assert_eq!(json["server"]["listen"], crate::config::DEFAULT_LISTEN);
        assert_eq!(
            json["metrics"]["listen"],
            crate::config::DEFAULT_METRICS_LISTEN
        );
        assert_eq!(json["workers"]["start_timeout"], "1m");
        assert_eq!(json["workers"]["env"]["TF_ENABLE_ONEDNN_OPTS"], "0");
        for key in [
            "interpreter",
            "preload",
            "pool_size",
            "start_timeout",
            "env",
        ] {
            assert_eq!(json["python"][key], null, "python.{key}");
        }
        let policy = &json["policy"];
        assert_eq!(policy["interval"], "250ms");
        assert_eq!(policy["dry_run"], false);
        for key in ["soft_limit", "max_soft_limit"] {
            assert_eq!(policy[key], null, "policy.{key}");
        }
        // Out of the box a session cannot take the machine: hard limits derived from its
        // memory (or its cgroup's limit).
        let budget = crate::system::memory_budget().expect("this machine's memory");
        let derived = crate::policy::config::default_hard_limit(budget);
        assert_eq!(policy["memory_budget"]["bytes"], budget.bytes);
        for key in ["hard_limit", "max_hard_limit"] {
            assert_eq!(policy[key]["bytes"], derived, "policy.{key}");
            assert_eq!(policy[&format!("{key}_from")], "default", "policy.{key}");
        }
        assert_eq!(policy["gentle_action"], "purge_variables");
        assert_eq!(policy["cooldown"], "30s");
        assert_eq!(policy["rearm_below"], 0.9);
        assert_eq!(policy["max_actions"], 5);
        assert_eq!(policy["action_window"], "10m");
        assert_eq!(policy["pressure"]["min_available"], null);
        assert_eq!(policy["pressure"]["psi_some_avg10"], null);
        assert_eq!(policy["pressure"]["psi_for"], "10s");
        // Abandoned sessions are closed after a day by default.
        assert_eq!(policy["idle"]["timeout"], "1day");
        assert_eq!(policy["idle"]["action"], "close");
        assert_eq!(
            json["auth"],
            serde_json::json!({
                "allow_unauthenticated": false, "tokens": [], "certificates": [], "peers": []
            })
        );
        assert_eq!(
            json["tls"],
            serde_json::json!({"cert": null, "key": null, "client_ca": null})
        );
        let limits = &json["limits"];
        assert_eq!(limits["max_message_size"]["bytes"], i32::MAX as u64);
        assert_eq!(limits["max_message_size"]["human"], "2.0 GiB");
        assert_eq!(
            limits["max_feed_size"]["bytes"],
            crate::limits::DEFAULT_MAX_FEED_BYTES
        );
        assert_eq!(limits["max_feed_size_from"], "default");
        for key in [
            "max_sessions",
            "max_sessions_per_principal",
            "max_graph_def_size",
            "max_feed_elements",
            "max_concurrent_runs_per_session",
            "max_run_timeout",
        ] {
            assert_eq!(limits[key], null, "limits.{key}");
        }
        assert_eq!(
            json["state"],
            serde_json::json!({"dir": null, "checkpoint_interval": null})
        );

        let text = report.human(SystemTime::now());
        for line in [
            "python.interpreter  (off: Python sessions are refused)\n",
            "policy.soft_limit               (none)\n",
            "auth.tokens                 (none)\n",
            "tls.cert  (off: plaintext)\n",
            "limits.max_message_size                 2147483647 bytes (2.0 GiB)\n",
            "limits.max_sessions                     (none)\n",
            "limits.max_feed_size                    536870912 bytes (512 MiB): default\n",
            "limits.max_buffered_size                1073741824 bytes (1 GiB): default\n",
            "state.dir  (off: sessions last as long as the daemon)\n",
            "\nlog.filter  info\n",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
    }

    #[test]
    fn switched_off_defaults_say_so() {
        let dir = TempDir::new();
        let text = "[policy]\nhard_limit = \"off\"\nmax_hard_limit = \"off\"\n\
                    [limits]\nmax_feed_size = \"off\"\n";
        let report = report(&dir.0, text);
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["policy"]["hard_limit"], serde_json::Value::Null);
        assert_eq!(json["policy"]["hard_limit_from"], "off");
        assert_eq!(json["limits"]["max_feed_size"], serde_json::Value::Null);
        assert_eq!(json["limits"]["max_feed_size_from"], "off");
        let human = report.human(SystemTime::now());
        for line in [
            "policy.hard_limit               (off)\n",
            "policy.max_hard_limit           (off)\n",
            "limits.max_feed_size                    (off)\n",
        ] {
            assert!(human.contains(line), "{line:?} in\n{human}");
        }
        let defaults = report_human(&dir.0, "");
        assert!(
            defaults.contains(": default, 75% of this machine's ")
                || defaults.contains(": default, 75% of its cgroup's limit, "),
            "{defaults}"
        );
        // A configured hard limit above the derived one is the default ceiling too.
        let raised = report_human(&dir.0, "[policy]\nhard_limit = \"1000TiB\"\n");
        assert!(
            raised.contains(
                "policy.max_hard_limit           1099511627776000 bytes (1000 TiB): default, \
                 raised to the configured limit\n"
            ),
            "{raised}"
        );
    }

    #[test]
    fn the_sandbox_is_shown_with_what_this_kernel_offers() {
        let dir = TempDir::new();
        let defaults = report(&dir.0, "");
        let json = serde_json::to_value(&defaults).expect("json");
        assert_eq!(json["sandbox"]["enabled"], "auto");
        assert_eq!(json["sandbox"]["max_open_files"], 4096);
        assert_eq!(json["sandbox"]["network"], false);
        assert_eq!(json["workers"]["user"], serde_json::Value::Null);
        let abi = crate::worker::sandbox::landlock_abi();
        assert_eq!(json["sandbox"]["landlock_abi"], serde_json::json!(abi));
        let text = defaults.human(SystemTime::now());
        let enabled = match abi {
            Some(abi) => format!("sandbox.enabled         auto (landlock ABI {abi} here)\n"),
            None => "sandbox.enabled         auto (no landlock here)\n".to_string(),
        };
        for line in [
            enabled.as_str(),
            "sandbox.network         false (no sockets but AF_UNIX)\n",
            "workers.user                   (none: the daemon's user; nobody if that is root)\n",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }

        let text = "[sandbox]\nenabled = false\nread_paths = [\"/usr/share\", \"data\"]\n\
                    write_paths = [\"out\"]\nmax_open_files = 1000\nnetwork = true\n";
        let report = report(&dir.0, text);
        let json = serde_json::to_value(&report).expect("json");
        let at = |path: &str| dir.0.join(path).display().to_string();
        assert_eq!(
            json["sandbox"],
            serde_json::json!({
                "enabled": "false",
                "read_paths": ["/usr/share", at("data")],
                "write_paths": [at("out")],
                "max_open_files": 1000,
                "network": true,
                "landlock_abi": abi,
            })
        );
        for missing in ["sandbox.read_paths", "sandbox.write_paths"] {
            assert!(
                report
                    .warnings
                    .iter()
                    .any(|warning| warning.starts_with(missing)),
                "{missing}: {:?}",
                report.warnings
            );
        }
    }

    fn report_human(dir: &Path, text: &str) -> String {
        report(dir, text).human(SystemTime::now())
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(1536 << 20), "1.5 GiB");
        assert_eq!(human_size(3 << 40), "3 TiB");
    }
}
