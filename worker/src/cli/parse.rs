//! Parsers of flag values that take units or may be off: byte sizes, durations, addresses.

use std::net::SocketAddr;
use std::time::Duration;

/// A listen address that can be turned off with an empty value (`--openai-addr ''`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

/// Parses `HOST:PORT` (an IP address and a port), or nothing for off.
pub fn parse_optional_addr(text: &str) -> Result<OptionalAddr, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Ok(OptionalAddr(None));
    }
    trimmed
        .parse()
        .map(|addr| OptionalAddr(Some(addr)))
        .map_err(|_| format!("`{text}` is not an address like 0.0.0.0:8000 (or '' to turn it off)"))
}

/// Parses a byte size: a number with an optional binary (Ki, Mi, Gi, Ti) or decimal (K, M, G, T)
/// suffix; a trailing `B` is allowed.
pub fn parse_memory_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let without_b = trimmed.strip_suffix('B').unwrap_or(trimmed);
    let split = without_b
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(without_b.len());
    let (number, unit) = without_b.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 8Gi, 512Mi or 100M"))?;
    let scale: u64 = match unit {
        "" => 1,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (use Ki, Mi, Gi, Ti, K, M, G or T)"
            ));
        }
    };
    Ok((value * scale as f64) as u64)
}

/// Parses a duration: a number with an optional unit ms, s (default), m or h.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 30s, 500ms or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{text}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_size("8Gi"), Ok(8 << 30));
        assert_eq!(parse_memory_size("64Mi"), Ok(64 << 20));
        assert_eq!(parse_memory_size("1.5Ki"), Ok(1536));
        assert_eq!(parse_memory_size("100M"), Ok(100_000_000));
        assert_eq!(parse_memory_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_memory_size("4096"), Ok(4096));
        assert!(
            parse_memory_size("8Xi")
                .unwrap_err()
                .contains("unknown unit `Xi`")
        );
        assert!(parse_memory_size("lots").is_err());
    }

    #[test]
    fn optional_addresses() {
        assert_eq!(
            parse_optional_addr("0.0.0.0:8000"),
            Ok(OptionalAddr(Some("0.0.0.0:8000".parse().unwrap())))
        );
        assert_eq!(parse_optional_addr(""), Ok(OptionalAddr(None)));
        assert!(
            parse_optional_addr("localhost")
                .unwrap_err()
                .contains("'' to turn it off")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("5d").is_err());
    }
}
