//! Where reports go: stdout, as human text or as JSON. Commands hand a report over and do
//! not know which; that keeps the two outputs from drifting apart.

use std::io::Write;
use std::time::SystemTime;

use serde::Serialize;

use super::CliError;
use super::human::Human;

pub struct Output {
    json: bool,
    stdout: std::io::Stdout,
}

impl Output {
    pub fn stdout(json: bool) -> Output {
        Output {
            json,
            stdout: std::io::stdout(),
        }
    }

    /// A command's one result: a pretty-printed JSON document, or the human text.
    pub fn report<R: Serialize + Human>(&mut self, report: &R) -> Result<(), CliError> {
        let text = if self.json {
            serde_json::to_string_pretty(report).map_err(std::io::Error::from)? + "\n"
        } else {
            report.human(SystemTime::now())
        };
        self.write(&text)
    }

    /// One item of a stream: a single-line JSON object, or the human line; flushed at once
    /// so that a reader (`jq`, `grep --line-buffered`, a test) sees each event as it comes.
    pub fn line<R: Serialize + Human>(&mut self, report: &R) -> Result<(), CliError> {
        let text = if self.json {
            serde_json::to_string(report).map_err(std::io::Error::from)? + "\n"
        } else {
            report.human(SystemTime::now())
        };
        self.write(&text)
    }

    fn write(&mut self, text: &str) -> Result<(), CliError> {
        let mut stdout = self.stdout.lock();
        stdout.write_all(text.as_bytes())?;
        stdout.flush()?;
        Ok(())
    }
}
