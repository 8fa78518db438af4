//! Configuration: the raw TOML shape (`RawConfig`, every field optional) and the validated
//! `Config` built from it by one function that names every field. A bad config is an error
//! that names the key, reported before anything is bound or spawned.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

/// Address the tfsd.v1 API listens on when the config names none.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Pre-started workers kept ready so a create or a recycle does not wait for TensorFlow to load.
pub const DEFAULT_POOL_SIZE: usize = 1;
/// How long a new worker may take to load TensorFlow and say it is ready.
pub const DEFAULT_WORKER_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Environment every worker gets unless the config overrides it. oneDNN's CPU allocator pools
/// freed memory, so an in-process purge or graph reset would not give memory back
/// (FACTS §3); TensorFlow's info logs are noise in the daemon's log.
pub const DEFAULT_WORKER_ENV: [(&str, &str); 2] = [
    ("TF_ENABLE_ONEDNN_OPTS", "0"),
    ("TF_CPP_MIN_LOG_LEVEL", "1"),
];
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
    log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkers {
    binary: Option<PathBuf>,
    pool_size: Option<usize>,
    start_timeout: Option<String>,
    library_dir: Option<PathBuf>,
    env: Option<BTreeMap<String, String>>,
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
    pub workers: WorkerConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The `tfsd-worker` binary.
    pub binary: PathBuf,
    pub pool_size: usize,
    pub start_timeout: Duration,
    /// Prepended to the workers' LD_LIBRARY_PATH when set (libtensorflow's directory).
    pub library_dir: Option<PathBuf>,
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
    /// Reads and validates a TOML file; paths in it are relative to the file's directory.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read config file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base).with_context(|| format!("config file {}", path.display()))
    }

    /// Validates TOML text. `base` resolves relative paths.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<Config> {
        let raw: RawConfig = toml::from_str(text)?;
        Config::from_raw(raw, base)
    }

    /// The configuration with every default, for running without a file.
    pub fn defaults() -> anyhow::Result<Config> {
        Config::from_raw(RawConfig::default(), Path::new("."))
    }

    fn from_raw(raw: RawConfig, base: &Path) -> anyhow::Result<Config> {
        let listen_text = raw.server.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = listen_text.parse().with_context(|| {
            format!("server.listen = {listen_text:?} is not an address like \"127.0.0.1:50051\"")
        })?;

        let binary = match raw.workers.binary {
            Some(path) => base.join(path),
            None => default_worker_binary()?,
        };
        let pool_size = raw.workers.pool_size.unwrap_or(DEFAULT_POOL_SIZE);
        if pool_size > 64 {
            bail!("workers.pool_size = {pool_size} is too large (at most 64)");
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

        let format = match raw.log.format.as_deref() {
            None | Some("human") => LogFormat::Human,
            Some("json") => LogFormat::Json,
            Some(other) => bail!("log.format = {other:?} is not one of \"human\", \"json\""),
        };
        let filter = raw
            .log
            .filter
            .unwrap_or_else(|| DEFAULT_LOG_FILTER.to_string());

        Ok(Config {
            listen,
            workers: WorkerConfig {
                binary,
                pool_size,
                start_timeout,
                library_dir,
                env,
            },
            log: LogConfig { filter, format },
        })
    }
}

fn parse_duration(key: &str, text: &str) -> anyhow::Result<Duration> {
    let duration = humantime::parse_duration(text)
        .with_context(|| format!("{key} = {text:?} is not a duration like \"30s\" or \"250ms\""))?;
    if duration.is_zero() {
        bail!("{key} must be more than zero");
    }
    Ok(duration)
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

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let config = Config::parse("", Path::new("/etc/tfsd")).expect("valid");
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.workers.pool_size, DEFAULT_POOL_SIZE);
        assert_eq!(config.workers.start_timeout, DEFAULT_WORKER_START_TIMEOUT);
        assert_eq!(config.workers.env["TF_ENABLE_ONEDNN_OPTS"], "0");
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
            [log]
            filter = "debug"
            format = "json"
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
    fn unknown_keys_are_named() {
        let error = Config::parse("[workers]\npool_sise = 2\n", Path::new(".")).expect_err("typo");
        assert!(format!("{error:#}").contains("pool_sise"), "{error:#}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("[server]\nlisten = \"localhost\"", "server.listen"),
            (
                "[workers]\nstart_timeout = \"soon\"",
                "workers.start_timeout",
            ),
            ("[workers]\nstart_timeout = \"0s\"", "workers.start_timeout"),
            ("[workers]\npool_size = 1000", "workers.pool_size"),
            ("[log]\nformat = \"xml\"", "log.format"),
        ] {
            let error = Config::parse(text, Path::new(".")).expect_err(text);
            assert!(format!("{error:#}").contains(key), "{text}: {error:#}");
        }
    }
}
