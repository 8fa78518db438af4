//! The `[policy]` table of the config: its raw TOML shape and its validation into
//! `PolicyConfig` (kept beside the policy it configures, so `config.rs` stays the list of
//! tables).
//!
//! Out of the box one session cannot take the machine: without a `hard_limit` (and a
//! `max_hard_limit`) in the config, both default to `DEFAULT_HARD_LIMIT_PERCENT` of the
//! memory budget (`system::memory_budget`: the machine's memory, or its cgroup's limit if
//! lower). `"off"` switches either off.

use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use super::{GentleAction, IdleAction, PolicyConfig, PressureConfig};
use crate::system::MemoryBudget;
use crate::units::{parse_bytes, parse_duration};

/// Sessions nobody has called for this long are abandoned (their client crashed or forgot
/// to close them), and each holds a worker (~300 MiB) until an operator notices: by default
/// they are closed after a day. "" or "off" keeps them forever.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// What happens to an idle session by default: closed, which frees its worker (a recycle
/// would only replace it).
pub const DEFAULT_IDLE_ACTION: IdleAction = IdleAction::Close;

/// The default hard limit of a session (and the default ceiling on the hard limit a session
/// may ask for), as a percentage of the memory budget. Above it the policy recycles the
/// session at once and kills a running step, which fails with RESOURCE_EXHAUSTED and names
/// the limit, rather than letting the kernel's OOM killer pick a victim, which may be
/// another session or the daemon. Three quarters leaves the rest for the daemon, the warm
/// pool (~280 MiB RSS per worker, mostly shared), other sessions and the system.
pub const DEFAULT_HARD_LIMIT_PERCENT: u64 = 75;

/// The value of a hard-limit key that switches the limit off.
pub const OFF: &str = "off";

/// `DEFAULT_HARD_LIMIT_PERCENT` of `budget`.
pub fn default_hard_limit(budget: MemoryBudget) -> u64 {
    (u128::from(budget.bytes) * u128::from(DEFAULT_HARD_LIMIT_PERCENT) / 100) as u64
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    interval: Option<String>,
    dry_run: Option<bool>,
    soft_limit: Option<String>,
    hard_limit: Option<String>,
    max_soft_limit: Option<String>,
    max_hard_limit: Option<String>,
    gpu_soft_limit: Option<String>,
    gpu_hard_limit: Option<String>,
    max_gpu_soft_limit: Option<String>,
    max_gpu_hard_limit: Option<String>,
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
    min_gpu_free: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdle {
    timeout: Option<String>,
    action: Option<String>,
}

/// A hard-limit key as written: absent or "" (the default), "off", or a size.
enum HardLimitSetting {
    Default,
    Off,
    Bytes(u64),
}

fn hard_limit_setting(key: &str, value: Option<&str>) -> anyhow::Result<HardLimitSetting> {
    Ok(match value {
        None | Some("") => HardLimitSetting::Default,
        Some(OFF) => HardLimitSetting::Off,
        Some(text) => HardLimitSetting::Bytes(
            parse_bytes(text)
                .with_context(|| format!("{key} = {text:?} (a size like \"8GiB\", or \"off\")"))?,
        ),
    })
}

impl PolicyConfig {
    /// Validates the `[policy]` table; errors name the key. Hard limits the table leaves
    /// unset derive from this machine's memory budget (`system::memory_budget`).
    pub fn from_raw(raw: RawPolicy) -> anyhow::Result<PolicyConfig> {
        PolicyConfig::from_raw_within(raw, crate::system::memory_budget())
    }

    /// `from_raw` on a machine whose memory budget is `budget` (`None`: unknown, and then
    /// no hard limit is derived).
    pub fn from_raw_within(
        raw: RawPolicy,
        budget: Option<MemoryBudget>,
    ) -> anyhow::Result<PolicyConfig> {
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
            None => DEFAULT_IDLE_ACTION,
            Some("recycle") => IdleAction::Recycle,
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
            None => Some(DEFAULT_IDLE_TIMEOUT),
            Some("" | "off") => None,
            Some(text) => Some(parse_duration("policy.idle.timeout", text)?),
        };
        let soft_limit_bytes = bytes("policy.soft_limit", raw.soft_limit)?;
        let derived = budget.map(default_hard_limit);
        // A derived limit never falls below a configured soft limit: the soft limit is the
        // operator's word, the derived one a guess about this machine.
        let derived = derived.map(|derived| derived.max(soft_limit_bytes.unwrap_or(0)));
        let hard_limit_bytes =
            match hard_limit_setting("policy.hard_limit", raw.hard_limit.as_deref())? {
                HardLimitSetting::Default => derived,
                HardLimitSetting::Off => None,
                HardLimitSetting::Bytes(bytes) => Some(bytes),
            };
        // The ceiling on what a session may ask for: by default the derived limit (so that
        // no client can lift its own limit past it), or a configured hard limit above that.
        let max_hard_limit_bytes =
            match hard_limit_setting("policy.max_hard_limit", raw.max_hard_limit.as_deref())? {
                HardLimitSetting::Default => match (derived, hard_limit_bytes) {
                    (Some(derived), Some(hard)) => Some(derived.max(hard)),
                    (derived, _) => derived,
                },
                HardLimitSetting::Off => None,
                HardLimitSetting::Bytes(bytes) => Some(bytes),
            };
        // GPU limits: off unless configured (no machine-derived default: a device's size
        // says nothing of how many sessions share it). "off" is accepted like "".
        let gpu_bytes = |key: &str, value: Option<String>| match value.as_deref() {
            Some(OFF) => Ok(None),
            _ => bytes(key, value),
        };
        let gpu_soft_limit_bytes = gpu_bytes("policy.gpu_soft_limit", raw.gpu_soft_limit)?;
        let gpu_hard_limit_bytes = gpu_bytes("policy.gpu_hard_limit", raw.gpu_hard_limit)?;
        if let (Some(soft), Some(hard)) = (gpu_soft_limit_bytes, gpu_hard_limit_bytes)
            && hard < soft
        {
            bail!(
                "policy.gpu_hard_limit ({hard} bytes) is below policy.gpu_soft_limit ({soft} bytes)"
            );
        }
        let policy = PolicyConfig {
            interval: duration("policy.interval", raw.interval, defaults.interval)?,
            dry_run: raw.dry_run.unwrap_or(false),
            soft_limit_bytes,
            hard_limit_bytes,
            max_soft_limit_bytes: bytes("policy.max_soft_limit", raw.max_soft_limit)?,
            max_hard_limit_bytes,
            gpu_soft_limit_bytes,
            gpu_hard_limit_bytes,
            max_gpu_soft_limit_bytes: gpu_bytes(
                "policy.max_gpu_soft_limit",
                raw.max_gpu_soft_limit,
            )?,
            max_gpu_hard_limit_bytes: gpu_bytes(
                "policy.max_gpu_hard_limit",
                raw.max_gpu_hard_limit,
            )?,
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
                min_gpu_free_bytes: gpu_bytes(
                    "policy.pressure.min_gpu_free",
                    raw.pressure.min_gpu_free,
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

#[cfg(test)]
mod tests {
    use super::*;

    const MACHINE: Option<MemoryBudget> = Some(MemoryBudget {
        bytes: 16 << 30,
        from_cgroup: false,
    });

    fn policy(text: &str, budget: Option<MemoryBudget>) -> anyhow::Result<PolicyConfig> {
        PolicyConfig::from_raw_within(toml::from_str(text)?, budget)
    }

    #[test]
    fn out_of_the_box_a_session_is_held_to_three_quarters_of_the_machine() {
        let defaults = policy("", MACHINE).expect("valid");
        assert_eq!(defaults.hard_limit_bytes, Some(12 << 30));
        assert_eq!(defaults.max_hard_limit_bytes, Some(12 << 30));
        // "" is the default too (the shipped config used to write it for "none").
        let empty = policy("hard_limit = \"\"\nmax_hard_limit = \"\"", MACHINE).expect("valid");
        assert_eq!(empty.hard_limit_bytes, Some(12 << 30));
        // A session asking for more is capped.
        let asked = defaults.effective(crate::policy::SessionPolicy {
            hard_limit_bytes: Some(u64::MAX),
            ..Default::default()
        });
        assert_eq!(asked.hard_limit_bytes, Some(12 << 30));
        let cgroup = Some(MemoryBudget {
            bytes: 4 << 30,
            from_cgroup: true,
        });
        assert_eq!(
            policy("", cgroup).expect("valid").hard_limit_bytes,
            Some(3 << 30)
        );
        assert_eq!(policy("", None).expect("valid").hard_limit_bytes, None);
    }

    #[test]
    fn abandoned_sessions_are_closed_after_a_day_unless_switched_off() {
        let defaults = policy("", MACHINE).expect("valid");
        assert_eq!(defaults.idle_timeout, Some(DEFAULT_IDLE_TIMEOUT));
        assert_eq!(defaults.idle_action, IdleAction::Close);
        for off in ["\"\"", "\"off\""] {
            let kept = policy(&format!("[idle]\ntimeout = {off}"), MACHINE).expect("valid");
            assert_eq!(kept.idle_timeout, None, "{off}");
        }
        let chosen =
            policy("[idle]\ntimeout = \"2h\"\naction = \"recycle\"", MACHINE).expect("valid");
        assert_eq!(chosen.idle_timeout, Some(Duration::from_secs(7200)));
        assert_eq!(chosen.idle_action, IdleAction::Recycle);
    }

    #[test]
    fn gpu_limits_are_off_unless_configured_and_checked() {
        let defaults = policy("", MACHINE).expect("valid");
        assert_eq!(defaults.gpu_soft_limit_bytes, None);
        assert_eq!(defaults.gpu_hard_limit_bytes, None);
        assert_eq!(defaults.pressure.min_gpu_free_bytes, None);
        let set = policy(
            "gpu_soft_limit = \"6GiB\"\ngpu_hard_limit = \"8GiB\"\n\
             max_gpu_hard_limit = \"10GiB\"\nmax_gpu_soft_limit = \"off\"\n\
             [pressure]\nmin_gpu_free = \"2GiB\"",
            MACHINE,
        )
        .expect("valid");
        assert_eq!(set.gpu_soft_limit_bytes, Some(6 << 30));
        assert_eq!(set.gpu_hard_limit_bytes, Some(8 << 30));
        assert_eq!(set.max_gpu_hard_limit_bytes, Some(10 << 30));
        assert_eq!(set.max_gpu_soft_limit_bytes, None);
        assert_eq!(set.pressure.min_gpu_free_bytes, Some(2 << 30));
        // A session's own limits, capped by the maxima; the defaults where it sets none.
        let asked = set.effective(crate::policy::SessionPolicy {
            gpu_hard_limit_bytes: Some(64 << 30),
            ..Default::default()
        });
        assert_eq!(asked.gpu_hard_limit_bytes, Some(10 << 30));
        assert_eq!(asked.gpu_soft_limit_bytes, Some(6 << 30));
        let error = policy(
            "gpu_soft_limit = \"8GiB\"\ngpu_hard_limit = \"6GiB\"",
            MACHINE,
        )
        .expect_err("hard below soft");
        assert!(
            format!("{error:#}").contains("policy.gpu_hard_limit"),
            "{error:#}"
        );
        let error = policy("[pressure]\nmin_gpu_free = \"lots\"", MACHINE).expect_err("bad size");
        assert!(
            format!("{error:#}").contains("policy.pressure.min_gpu_free"),
            "{error:#}"
        );
    }

    #[test]
    fn hard_limits_can_be_set_or_switched_off() {
        let off = policy("hard_limit = \"off\"\nmax_hard_limit = \"off\"", MACHINE).expect("valid");
        assert_eq!(
            (off.hard_limit_bytes, off.max_hard_limit_bytes),
            (None, None)
        );
        // Off by default, but a session may still not ask past the derived ceiling.
        let default_off = policy("hard_limit = \"off\"", MACHINE).expect("valid");
        assert_eq!(default_off.hard_limit_bytes, None);
        assert_eq!(default_off.max_hard_limit_bytes, Some(12 << 30));
        // A configured hard limit above the derived one raises the default ceiling with it.
        let high = policy("hard_limit = \"20GiB\"", MACHINE).expect("valid");
        assert_eq!(high.hard_limit_bytes, Some(20 << 30));
        assert_eq!(high.max_hard_limit_bytes, Some(20 << 30));
        let low = policy("hard_limit = \"2GiB\"", MACHINE).expect("valid");
        assert_eq!(low.max_hard_limit_bytes, Some(12 << 30));
        // A soft limit above the derived hard limit lifts it rather than failing.
        let soft = policy("soft_limit = \"14GiB\"", MACHINE).expect("valid");
        assert_eq!(soft.hard_limit_bytes, Some(14 << 30));
        let error = policy("hard_limit = \"plenty\"", MACHINE).expect_err("bad size");
        assert!(
            format!("{error:#}").contains("policy.hard_limit"),
            "{error:#}"
        );
        assert!(format!("{error:#}").contains("\"off\""), "{error:#}");
    }
}
