//! The `[policy]` table of the config: its raw TOML shape and its validation into
//! `PolicyConfig` (kept beside the policy it configures, so `config.rs` stays the list of
//! tables).

use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use super::{GentleAction, IdleAction, PolicyConfig, PressureConfig};
use crate::units::{parse_bytes, parse_duration};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    interval: Option<String>,
    dry_run: Option<bool>,
    soft_limit: Option<String>,
    hard_limit: Option<String>,
    max_soft_limit: Option<String>,
    max_hard_limit: Option<String>,
    gentle_action: Option<String>,
    cooldown: Option<String>,
    rearm_below: Option<f64>,
    max_actions: Option<usize>,
    action_window: Option<String>,
    #[serde(default)]
    pressure: RawPressure,
    #[serde(default)]
    idle: RawIdle,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPressure {
    min_available: Option<String>,
    psi_some_avg10: Option<f64>,
    psi_for: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdle {
    timeout: Option<String>,
    action: Option<String>,
}

impl PolicyConfig {
    /// Validates the `[policy]` table; errors name the key.
    pub fn from_raw(raw: RawPolicy) -> anyhow::Result<PolicyConfig> {
        let defaults = PolicyConfig::default();
        let duration = |key: &str, value: Option<String>, default: Duration| match value {
            Some(text) => parse_duration(key, &text),
            None => Ok(default),
        };
        let bytes = |key: &str, value: Option<String>| -> anyhow::Result<Option<u64>> {
            match value.as_deref() {
                None | Some("") => Ok(None),
                Some(text) => parse_bytes(text)
                    .map(Some)
                    .with_context(|| format!("{key} = {text:?}")),
            }
        };
        let gentle_action = match raw.gentle_action.as_deref() {
            None | Some("purge_variables") => GentleAction::PurgeVariables,
            Some("reset_graph") => GentleAction::ResetGraph,
            Some(other) => bail!(
                "policy.gentle_action = {other:?} is not one of \"purge_variables\", \"reset_graph\""
            ),
        };
        let idle_action = match raw.idle.action.as_deref() {
            None | Some("recycle") => IdleAction::Recycle,
            Some("close") => IdleAction::Close,
            Some(other) => {
                bail!("policy.idle.action = {other:?} is not one of \"recycle\", \"close\"")
            }
        };
        let rearm_below = raw.rearm_below.unwrap_or(defaults.rearm_below);
        if !(0.0..=1.0).contains(&rearm_below) {
            bail!("policy.rearm_below = {rearm_below} must be between 0 and 1");
        }
        let idle_timeout = match raw.idle.timeout.as_deref() {
            None | Some("") => None,
            Some(text) => Some(parse_duration("policy.idle.timeout", text)?),
        };
        let policy = PolicyConfig {
            interval: duration("policy.interval", raw.interval, defaults.interval)?,
            dry_run: raw.dry_run.unwrap_or(false),
            soft_limit_bytes: bytes("policy.soft_limit", raw.soft_limit)?,
            hard_limit_bytes: bytes("policy.hard_limit", raw.hard_limit)?,
            max_soft_limit_bytes: bytes("policy.max_soft_limit", raw.max_soft_limit)?,
            max_hard_limit_bytes: bytes("policy.max_hard_limit", raw.max_hard_limit)?,
            gentle_action,
            cooldown: duration("policy.cooldown", raw.cooldown, defaults.cooldown)?,
            rearm_below,
            max_actions: raw.max_actions.unwrap_or(defaults.max_actions),
            action_window: duration(
                "policy.action_window",
                raw.action_window,
                defaults.action_window,
            )?,
            pressure: PressureConfig {
                min_available_bytes: bytes(
                    "policy.pressure.min_available",
                    raw.pressure.min_available,
                )?,
                psi_some_avg10: raw.pressure.psi_some_avg10,
                psi_duration: duration(
                    "policy.pressure.psi_for",
                    raw.pressure.psi_for,
                    Duration::from_secs(10),
                )?,
            },
            idle_timeout,
            idle_action,
        };
        if let (Some(soft), Some(hard)) = (policy.soft_limit_bytes, policy.hard_limit_bytes)
            && hard < soft
        {
            bail!("policy.hard_limit ({hard} bytes) is below policy.soft_limit ({soft} bytes)");
        }
        if policy.max_actions == 0 {
            bail!("policy.max_actions must be at least 1");
        }
        Ok(policy)
    }
}
