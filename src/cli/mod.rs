//! The operator CLI: `tfsd status`, `sessions`, `show`, `reset-graph`, `purge`, `recycle`,
//! `close`, `watch`, `health` and `check-config`, for people at a terminal and for scripts.
//!
//! Every command but `check-config` is a tfsd.v1 client call made through the generated
//! tonic client, so the CLI sees exactly what any other client sees and needs no access to
//! the daemon's process. Human output is the default; `--json` prints one JSON document per
//! command (one object per line for `watch`), built from this module's own serde structs in
//! `report.rs`, never from the prost types, so the JSON keys stay stable when the proto
//! grows. Exit codes are part of the interface (see [`EXIT_CODES_HELP`]).
//!
//! This module is a client only: it must not touch the daemon's domain (`session/`,
//! `worker/`); it knows the tfsd.v1 prost types the way any client does.

mod check_config;
mod commands;
mod connect;
mod error;
mod format;
mod health;
mod human;
mod output;
mod report;
mod run_script;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

pub use connect::DaemonAddress;
pub use error::CliError;

/// Every command succeeded.
pub const EXIT_OK: u8 = 0;
/// The daemon answered with an error (e.g. NOT_FOUND), or `check-config` found the file
/// invalid.
pub const EXIT_FAILED: u8 = 1;
/// Bad usage: an unknown flag, a missing argument (clap exits with this code itself).
pub const EXIT_USAGE: u8 = 2;
/// The daemon is not reachable: nothing listens at the address, the connection timed out,
/// or it broke during the call.
pub const EXIT_UNREACHABLE: u8 = 3;

/// The exit codes, for `--help`; scripts branch on them, so they are part of the interface.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  the daemon answered with an error (stderr: `error: CODE: message`, e.g. NOT_FOUND for
     an unknown session), or check-config found the file invalid
  2  bad usage (unknown flag, missing argument)
  3  the daemon is not reachable (stderr: `error: cannot reach tfsd at ADDRESS: reason`)

On an error stdout stays empty and stderr says why. `watch` exits 0 on Ctrl-C or when the
daemon ends the stream.";

/// Where the daemon is and how to print: flags every operator command shares.
#[derive(Debug, Clone, Args)]
pub struct ClientOptions {
    /// The daemon to talk to (operator commands; `serve` uses --listen): HOST:PORT,
    /// http://HOST:PORT, or unix:PATH for its Unix socket (server.unix_socket).
    #[arg(
        long,
        global = true,
        env = "TFSD_ADDRESS",
        default_value = "127.0.0.1:50051",
        value_name = "ADDRESS"
    )]
    pub address: DaemonAddress,
    /// Machine output: one JSON document per command (one object per line for `watch`).
    #[arg(long, global = true)]
    pub json: bool,
    /// A file holding the bearer token to authenticate with (`[[auth.tokens]]` on the daemon).
    #[arg(long, global = true, env = "TFSD_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// How long to wait for the connection to the daemon (e.g. 5s, 500ms); calls themselves
    /// are not cut short, since a recycle may wait for a worker to start.
    #[arg(
        long,
        global = true,
        default_value = "5s",
        value_parser = humantime::parse_duration,
        value_name = "DURATION"
    )]
    pub timeout: Duration,
}

/// The operator commands (`serve` lives in `main.rs`: it is the daemon, not a client).
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// The daemon: version, TensorFlow version, pid, memory, sessions, warm pool, system
    /// memory.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Status,
    /// Every session as a table: state, worker pid, memory, counters, idle time, labels.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Sessions,
    /// Every field of one session.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Show {
        /// The session id (e.g. s-0123abcd...).
        id: String,
    },
    /// Discard the session's graph and variables (same worker); prints memory before and
    /// after.
    #[command(after_long_help = EXIT_CODES_HELP)]
    ResetGraph {
        /// The session id.
        id: String,
    },
    /// Uninitialise every variable, keeping the graph (same worker); prints memory before
    /// and after.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Purge {
        /// The session id.
        id: String,
    },
    /// Move the session to a fresh worker process; prints both pids and memory before and
    /// after.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Recycle {
        /// The session id.
        id: String,
        /// Carry every initialised variable's value over to the fresh worker.
        #[arg(long)]
        preserve_variables: bool,
    },
    /// Close the session and stop its worker.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Close {
        /// The session id.
        id: String,
    },
    /// Follow lifecycle events (created, reset, recycled, worker exited, closed, ...) until
    /// Ctrl-C or until the daemon ends the stream.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Watch {
        /// Only this session's events; without it, every session's.
        id: Option<String>,
    },
    /// One gRPC health check (grpc.health.v1): exit 0 when SERVING, 1 when not. For
    /// container health checks and scripts.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Health {
        /// The service to check; "" checks the server as a whole.
        #[arg(long, default_value = crate::grpc::SESSION_SERVICE)]
        service: String,
    },
    /// Validate a config file and print what it resolves to, TFSD_* environment overrides
    /// included (the daemon is not contacted).
    /// Run a Python script in a fresh Python session (TensorFlow and Keras already imported),
    /// stream its output, and exit with its exit status. The session is closed afterwards.
    /// Errors of tfsd itself (no daemon, no Python sessions configured) exit as every other
    /// command does (1, 3), with `error:` on stderr.
    #[command(trailing_var_arg = true)]
    Run {
        /// The script (read here, run in the daemon's Python environment).
        script: PathBuf,
        /// The script's arguments (sys.argv[1:]).
        #[arg(allow_hyphen_values = true)]
        args: Vec<String>,
        /// Stop the script after this long (e.g. "10m"); none by default.
        #[arg(long = "call-timeout", value_parser = humantime::parse_duration, value_name = "DURATION")]
        call_timeout: Option<Duration>,
    },
    #[command(after_long_help = EXIT_CODES_HELP)]
    CheckConfig {
        /// The config file (TOML).
        #[arg(long, env = "TFSD_CONFIG")]
        config: PathBuf,
    },
}

/// Runs one operator command and returns the process's exit code. Errors are printed here,
/// once, as `error: ...` on stderr (with a hint when one helps).
pub async fn run(options: ClientOptions, command: Command) -> ExitCode {
    if let Command::Run {
        script,
        args,
        call_timeout,
    } = &command
    {
        let request = run_script::ScriptRun {
            script,
            argv: args.clone(),
            timeout: *call_timeout,
        };
        let ran = match connect::connect(&options).await {
            Ok(client) => run_script::run(client, &options.address, request).await,
            Err(error) => Err(error),
        };
        return match ran {
            Ok(code) => ExitCode::from(code),
            Err(error) => fail(error),
        };
    }
    let mut output = output::Output::stdout(options.json);
    match execute(&options, command, &mut output).await {
        Ok(()) => ExitCode::from(EXIT_OK),
        // A closed pipe (`tfsd watch | head -1`) means the reader has what it wanted.
        Err(CliError::Output(error)) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::from(EXIT_OK)
        }
        Err(error) => fail(error),
    }
}

/// Prints a failed command's error (and a hint when one helps); its exit code.
fn fail(error: CliError) -> ExitCode {
    eprintln!("error: {error}");
    if let Some(hint) = error.hint() {
        eprintln!("hint: {hint}");
    }
    ExitCode::from(error.exit_code())
}

async fn execute(
    options: &ClientOptions,
    command: Command,
    output: &mut output::Output,
) -> Result<(), CliError> {
    use report::ResetOperation;
    let address = &options.address;
    // Every command but check-config needs the daemon; each connects first, so that an
    // unreachable daemon is reported (exit 3) before anything else happens.
    let client = || connect::connect(options);
    match command {
        Command::Status => commands::status(client().await?, address, output).await,
        Command::Sessions => commands::sessions(client().await?, address, output).await,
        Command::Show { id } => commands::show(client().await?, address, id, output).await,
        Command::ResetGraph { id } => {
            let operation = ResetOperation::ResetGraph;
            commands::reset(client().await?, address, operation, id, false, output).await
        }
        Command::Purge { id } => {
            let operation = ResetOperation::Purge;
            commands::reset(client().await?, address, operation, id, false, output).await
        }
        Command::Recycle {
            id,
            preserve_variables,
        } => {
            let operation = ResetOperation::Recycle;
            let client = client().await?;
            commands::reset(client, address, operation, id, preserve_variables, output).await
        }
        Command::Close { id } => commands::close(client().await?, address, id, output).await,
        Command::Watch { id } => watch::run(client().await?, address, id, output).await,
        Command::Health { service } => {
            let channel = connect::connect_channel(options).await?;
            health::run(channel, address, service, output).await
        }
        Command::CheckConfig { config } => check_config::run(&config, output),
        Command::Run { .. } => unreachable!("`run` is handled by `cli::run`"),
    }
}
