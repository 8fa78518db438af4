//! The daemon's address as an operator types it, and the connection to it.

use std::fmt;
use std::str::FromStr;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::{CliError, ClientOptions};
use crate::proto::tfsd::v1::session_service_client::SessionServiceClient;

pub type Client = SessionServiceClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer TOKEN` to every call when a token was given (`--token-file`).
#[derive(Debug, Clone, Default)]
pub struct BearerToken(Option<AsciiMetadataValue>);

impl BearerToken {
    /// The token in `path` (surrounding whitespace ignored), or none without a path.
    fn read(path: Option<&std::path::Path>) -> Result<BearerToken, CliError> {
        let Some(path) = path else {
            return Ok(BearerToken(None));
        };
        let invalid = |reason: String| CliError::TokenFile {
            path: path.display().to_string(),
            reason,
        };
        let token = std::fs::read_to_string(path).map_err(|error| invalid(error.to_string()))?;
        let value = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| invalid("the token is not printable ASCII".to_string()))?;
        Ok(BearerToken(Some(value)))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// `HOST:PORT`, `http://HOST:PORT` or `unix:PATH` (the daemon's `server.unix_socket`),
/// checked when the flag is parsed so that a typo is a usage error (exit 2) rather than a
/// failed connection (exit 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonAddress {
    /// `HOST:PORT`, as messages show it.
    Tcp { authority: String },
    /// The socket file's path.
    Unix { path: String },
}

impl DaemonAddress {
    /// What tonic's `Endpoint` takes: `http://HOST:PORT`, or `unix:PATH` (tonic connects to a
    /// Unix socket for that form itself).
    fn uri(&self) -> String {
        match self {
            DaemonAddress::Tcp { authority } => format!("http://{authority}"),
            DaemonAddress::Unix { path } => format!("unix:{path}"),
        }
    }
}

impl FromStr for DaemonAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<DaemonAddress, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            // grpc's own spellings: unix:PATH and unix:///ABSOLUTE/PATH.
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(format!(
                    "{text:?} names no socket: use unix:PATH, e.g. unix:/run/tfsd/tfsd.sock"
                ));
            }
            return Ok(DaemonAddress::Unix {
                path: path.to_string(),
            });
        }
        if text.starts_with("https://") {
            return Err("tfsd.v1 is served without TLS: use HOST:PORT or http://HOST:PORT".into());
        }
        let authority = text.strip_prefix("http://").unwrap_or(text);
        let authority = authority.strip_suffix('/').unwrap_or(authority);
        let shape = "is not an address like 127.0.0.1:50051, http://127.0.0.1:50051 or \
                     unix:/run/tfsd/tfsd.sock";
        let Some((host, port)) = authority.rsplit_once(':') else {
            return Err(format!("{text:?} {shape} (the port is missing)"));
        };
        if host.is_empty() || authority.contains('/') || port.parse::<u16>().is_err() {
            return Err(format!("{text:?} {shape}"));
        }
        let address = DaemonAddress::Tcp {
            authority: authority.to_string(),
        };
        Endpoint::from_shared(address.uri()).map_err(|_| format!("{text:?} {shape}"))?;
        Ok(address)
    }
}

impl fmt::Display for DaemonAddress {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DaemonAddress::Tcp { authority } => formatter.write_str(authority),
            DaemonAddress::Unix { path } => write!(formatter, "unix:{path}"),
        }
    }
}

/// Connects eagerly, within `--timeout`, so that "nobody listens there" is reported as such
/// (exit 3) before any command starts, instead of surfacing as the first call's error.
pub async fn connect(options: &ClientOptions) -> Result<Client, CliError> {
    let token = BearerToken::read(options.token_file.as_deref())?;
    Ok(SessionServiceClient::with_interceptor(
        connect_channel(options).await?,
        token,
    ))
}

/// The connection itself, for clients of other services (grpc.health.v1).
pub async fn connect_channel(options: &ClientOptions) -> Result<Channel, CliError> {
    let unreachable = |reason: String| CliError::Unreachable {
        address: options.address.to_string(),
        reason,
    };
    let endpoint = Endpoint::from_shared(options.address.uri())
        .map_err(|error| unreachable(error_chain(&error)))?
        .connect_timeout(options.timeout);
    match tokio::time::timeout(options.timeout, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(error)) => Err(unreachable(error_chain(&error))),
        Err(_) => Err(unreachable(format!(
            "no connection within {}",
            humantime::format_duration(options.timeout)
        ))),
    }
}

/// An error and its causes on one line ("transport error: tcp connect error: Connection
/// refused (os error 111)"): the outer layers alone say nothing an operator can act on.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some layers repeat their cause's message; print it once.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_and_without_a_scheme_are_accepted() {
        for (text, shown) in [
            ("127.0.0.1:50051", "127.0.0.1:50051"),
            ("http://127.0.0.1:50051", "127.0.0.1:50051"),
            ("http://localhost:7000/", "localhost:7000"),
            ("[::1]:50051", "[::1]:50051"),
            ("unix:/run/tfsd/tfsd.sock", "unix:/run/tfsd/tfsd.sock"),
            ("unix:///run/tfsd/tfsd.sock", "unix:/run/tfsd/tfsd.sock"),
            ("unix:tfsd.sock", "unix:tfsd.sock"),
        ] {
            let address: DaemonAddress = text.parse().expect(text);
            assert_eq!(address.to_string(), shown);
        }
    }

    #[test]
    fn malformed_addresses_are_rejected_with_the_expected_shape() {
        for text in [
            "localhost",
            ":50051",
            "127.0.0.1:port",
            "127.0.0.1:70000",
            "http://h:1/path",
            "https://h:1",
            "unix:",
            "unix://",
        ] {
            let error = text.parse::<DaemonAddress>().expect_err(text);
            assert!(
                error.contains("HOST:PORT")
                    || error.contains("like")
                    || error.contains("unix:PATH"),
                "{error}"
            );
        }
    }

    #[test]
    fn error_chains_print_every_distinct_cause() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("tcp connect error")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let error = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused",
        ));
        assert_eq!(error_chain(&error), "tcp connect error: Connection refused");
    }
}
