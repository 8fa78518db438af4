//! The `tfsd` binary: `serve` runs the daemon (its boot sequence is in `tfsd::daemon`); the
//! other subcommands are the operator CLI (`tfsd::cli`), a client of a running daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use tfsd::cli::{ClientOptions, EXIT_CODES_HELP};
use tfsd::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "tfsd",
    version,
    about = "TensorFlow session daemon",
    long_about = "TensorFlow session daemon: `tfsd serve` runs it; the other commands talk to \
                  a running daemon over tfsd.v1 (human tables by default, --json for scripts).",
    after_long_help = EXIT_CODES_HELP
)]
struct Cli {
    #[command(flatten)]
    client: ClientOptions,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        /// The config file (TOML); without one, every default applies.
        #[arg(long, env = "TFSD_CONFIG")]
        config: Option<PathBuf>,
        /// Overrides server.listen; port 0 picks a free port. The daemon prints
        /// "tfsd listening on ADDRESS" on stdout once it accepts connections.
        #[arg(long, env = "TFSD_LISTEN")]
        listen: Option<std::net::SocketAddr>,
    },
    #[command(flatten)]
    Operator(tfsd::cli::Command),
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, listen } => {
            let mut config = match config {
                Some(path) => Config::load(&path)?,
                None => Config::defaults()?,
            };
            if let Some(listen) = listen {
                config.listen = listen;
            }
            tokio::runtime::Runtime::new()
                .context("start the tokio runtime")?
                .block_on(tfsd::daemon::serve(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Operator(command) => {
            // One call, or one stream, at a time: a single thread is plenty.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("start the tokio runtime")?;
            Ok(runtime.block_on(tfsd::cli::run(cli.client, command)))
        }
    }
}
