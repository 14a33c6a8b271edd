//! Duration (`250ms`, `30s`, `5m`, `1h`) and byte-size (`4096`, `64KiB`,
//! `4MiB`, `1GiB`) values as the config writes them.

use std::time::Duration;

/// Parses `<integer><unit>` with unit `ms`, `s`, `m` or `h`. A unit is
/// required: a bare `30` is ambiguous between seconds and milliseconds.
///
/// ```
/// use std::time::Duration;
/// use sluice::config::units::parse_duration;
///
/// assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
/// assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
/// assert!(parse_duration("30").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration `{text}` needs a unit: ms, s, m or h"))?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 250ms, 30s, 5m or 1h"))?;
    let ms_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "`{text}` is not a duration like 250ms, 30s, 5m or 1h"
            ));
        }
    };
    // A year at most: every deadline is computed as `now + duration`, which
    // must not overflow the clock.
    const MAX_MS: u64 = 365 * 24 * 3_600_000;
    n.checked_mul(ms_per_unit)
        .filter(|ms| *ms <= MAX_MS)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration `{text}` is too large (at most 8760h)"))
}

/// Parses a byte count, bare or with a binary (`KiB`, `MiB`, `GiB`) or
/// decimal (`KB`, `MB`, `GB`) suffix.
///
/// ```
/// use sluice::config::units::parse_size;
///
/// assert_eq!(parse_size("4MiB"), Ok(4 * 1024 * 1024));
/// assert_eq!(parse_size("4096"), Ok(4096));
/// ```
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    // `1_000_000` reads as YAML wrote it, as numbers do.
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .replace('_', "")
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 4096, 64KiB, 4MiB or 1GiB"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(format!(
                "`{text}` is not a size like 4096, 64KiB, 4MiB or 1GiB"
            ));
        }
    };
    n.checked_mul(multiplier)
        .ok_or_else(|| format!("size `{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("30").unwrap_err().contains("needs a unit"));
        assert!(parse_duration("3x").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        assert!(parse_duration("8760h").is_ok());
        assert!(
            parse_duration("8761h")
                .unwrap_err()
                .contains("at most 8760h")
        );
    }

    #[test]
    fn sizes_bare_and_suffixed() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert_eq!(parse_size("1_048_576"), Ok(1 << 20));
        assert!(parse_size("_").is_err());
        assert!(parse_size("4 parsecs").is_err());
        assert!(parse_size("").is_err());
    }
}
