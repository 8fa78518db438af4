//! `tfsd health [--service NAME]`: one grpc.health.v1 Check, for container health checks
//! and scripts. Exit 0 only when the service is SERVING.

use serde::Serialize;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use super::CliError;
use super::connect::DaemonAddress;
use super::human::Human;
use super::output::Output;

#[derive(Debug, Serialize)]
pub struct HealthReport {
    /// The service checked; "" is the server as a whole.
    pub service: String,
    /// SERVING, NOT_SERVING, UNKNOWN or SERVICE_UNKNOWN.
    pub status: String,
}

impl Human for HealthReport {
    fn human(&self, _now: std::time::SystemTime) -> String {
        let service = if self.service.is_empty() {
            "tfsd (overall)"
        } else {
            &self.service
        };
        format!("{service}: {}\n", self.status)
    }
}

pub async fn run(
    channel: Channel,
    address: &DaemonAddress,
    service: String,
    output: &mut Output,
) -> Result<(), CliError> {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.clone(),
        })
        .await
        .map_err(|status| CliError::from_status(status, address))?
        .into_inner();
    let status = ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown);
    output.report(&HealthReport {
        service: service.clone(),
        status: status.as_str_name().to_string(),
    })?;
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(CliError::NotServing { service })
    }
}
