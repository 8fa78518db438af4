//! The `tfsd` binary: the boot sequence of the daemon, and nothing else.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use tfsd::config::Config;

#[derive(Debug, Parser)]
#[command(name = "tfsd", version, about = "TensorFlow session daemon")]
struct Cli {
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
    /// Validate a config file and print what it resolves to.
    CheckConfig {
        #[arg(long, env = "TFSD_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
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
                .block_on(tfsd::daemon::serve(config))
        }
        Command::CheckConfig { config } => {
            let config = Config::load(&config)?;
            println!("{config:#?}");
            Ok(())
        }
    }
}
