//! Byte sizes ("2GiB") and durations ("30s") as the config file writes them. A leaf: the
//! config (`config.rs`), the memory policy's table (`policy/config.rs`) and the operator's
//! limits (`limits.rs`) all parse their values here, and this module uses none of them.

use std::time::Duration;

use anyhow::{Context, bail};

/// Parses a byte size: a number with an optional unit, binary ("KiB", "MiB", "GiB", "TiB")
/// or decimal ("KB", "MB", "GB", "TB"), e.g. "2GiB", "512 MiB", "1.5GB", "1048576".
pub fn parse_bytes(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a size like \"2GiB\" or \"512MiB\""))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => bail!("{other:?} is not a size unit (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"),
    };
    Ok((number * multiplier as f64) as u64)
}

/// Parses the duration at config key `key` ("30s", "250ms", "1h 30m"); zero is refused, since
/// every duration the config takes is an interval or a timeout.
pub fn parse_duration(key: &str, text: &str) -> anyhow::Result<Duration> {
    let duration = humantime::parse_duration(text)
        .with_context(|| format!("{key} = {text:?} is not a duration like \"30s\" or \"250ms\""))?;
    if duration.is_zero() {
        bail!("{key} must be more than zero");
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_take_binary_and_decimal_units() {
        assert_eq!(parse_bytes("2GiB").expect("size"), 2 << 30);
        assert_eq!(parse_bytes("512 MiB").expect("size"), 512 << 20);
        assert_eq!(parse_bytes("1.5GB").expect("size"), 1_500_000_000);
        assert_eq!(parse_bytes("4096").expect("size"), 4096);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }

    #[test]
    fn durations_name_their_key_and_refuse_zero() {
        assert_eq!(
            parse_duration("policy.interval", "250ms").expect("duration"),
            Duration::from_millis(250)
        );
        let error = parse_duration("policy.interval", "soon").expect_err("not a duration");
        assert!(
            format!("{error:#}").contains("policy.interval"),
            "{error:#}"
        );
        let error = parse_duration("policy.interval", "0s").expect_err("zero");
        assert!(format!("{error:#}").contains("more than zero"), "{error:#}");
    }
}
