//! `tfsd check-config --config FILE`: validates a config file the way `serve` would and
//! prints what it resolves to, keyed by the TOML keys, so an operator can see every default
//! that applies, `TFSD_*` environment overrides included. The daemon is not contacted.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use serde::Serialize;

use super::CliError;
use super::format::fields;
use super::human::Human;
use super::output::Output;
use crate::config::{Config, LogFormat};

pub fn run(path: &Path, output: &mut Output) -> Result<(), CliError> {
    let config = Config::load(path).map_err(CliError::InvalidConfig)?;
    let report = ConfigReport::new(path, &config);
    // Stderr, so that `--json` stdout stays one document; the file is valid all the same.
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    output.report(&report)
}

/// The resolved config, under the same names as the TOML keys.
#[derive(Debug, Serialize)]
pub struct ConfigReport {
    pub path: String,
    pub valid: bool,
    pub server: ServerReport,
    pub metrics: MetricsReport,
    pub master: MasterReport,
    pub workers: WorkersReport,
    pub log: LogReport,
    /// Things that would stop `serve` although the file itself is valid.
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ServerReport {
    pub listen: String,
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
}

#[derive(Debug, Serialize)]
pub struct WorkersReport {
    pub binary: String,
    pub pool_size: usize,
    /// In the TOML file's own syntax ("1m", "250ms").
    pub start_timeout: String,
    pub library_dir: Option<String>,
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
pub struct LogReport {
    pub filter: String,
    pub format: &'static str,
}

impl ConfigReport {
    fn new(path: &Path, config: &Config) -> ConfigReport {
        let mut warnings = Vec::new();
        if !config.workers.binary.is_file() {
            warnings.push(format!(
                "workers.binary {} does not exist: `tfsd serve` would refuse to start",
                config.workers.binary.display()
            ));
        }
        ConfigReport {
            path: path.display().to_string(),
            valid: true,
            server: ServerReport {
                listen: config.listen.to_string(),
            },
            metrics: MetricsReport {
                listen: config.metrics_listen.map(|address| address.to_string()),
            },
            master: MasterReport {
                listen: config.master_listen.map(|address| address.to_string()),
            },
            workers: WorkersReport {
                binary: config.workers.binary.display().to_string(),
                pool_size: config.workers.pool_size,
                start_timeout: humantime::format_duration(config.workers.start_timeout).to_string(),
                library_dir: config
                    .workers
                    .library_dir
                    .as_ref()
                    .map(|dir| dir.display().to_string()),
                env: config.workers.env.clone(),
            },
            log: LogReport {
                filter: config.log.filter.clone(),
                format: match config.log.format {
                    LogFormat::Human => "human",
                    LogFormat::Json => "json",
                },
            },
            warnings,
        }
    }
}

impl Human for ConfigReport {
    fn human(&self, _now: SystemTime) -> String {
        let env = self
            .workers
            .env
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut text = format!("{} is valid\n", self.path);
        text.push_str(&fields(&[
            ("server.listen", self.server.listen.clone()),
            (
                "metrics.listen",
                self.metrics
                    .listen
                    .clone()
                    .unwrap_or_else(|| "(off)".into()),
            ),
            (
                "master.listen",
                self.master.listen.clone().unwrap_or_else(|| "(off)".into()),
            ),
            ("workers.binary", self.workers.binary.clone()),
            ("workers.pool_size", self.workers.pool_size.to_string()),
            ("workers.start_timeout", self.workers.start_timeout.clone()),
            (
                "workers.library_dir",
                self.workers
                    .library_dir
                    .clone()
                    .unwrap_or_else(|| "(none)".into()),
            ),
            ("workers.env", env),
            ("log.filter", self.log.filter.clone()),
            ("log.format", self.log.format.into()),
        ]));
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_uses_the_toml_keys_and_syntax() {
        let config = Config::parse(
            "[workers]\npool_size = 2\nstart_timeout = \"1m\"\n",
            Path::new("/etc/tfsd"),
        )
        .expect("valid");
        let report = ConfigReport::new(Path::new("/etc/tfsd/tfsd.toml"), &config);
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["workers"]["pool_size"], 2);
        assert_eq!(json["workers"]["start_timeout"], "1m");
        assert_eq!(json["log"]["format"], "human");
        assert_eq!(json["master"]["listen"], "127.0.0.1:2222");
        let text = report.human(SystemTime::now());
        assert!(text.starts_with("/etc/tfsd/tfsd.toml is valid\n"), "{text}");
        assert!(text.contains("workers.start_timeout  1m\n"), "{text}");
    }
}
