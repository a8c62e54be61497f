//! Autoscaling of serving groups (`spec.autoscaling`), in the HPA's manner but per group, with the
//! signal read from the router:
//!
//! - [`signal`]: the router's `/v1/autoscaling` report and how the reports of several router
//!   pods combine into one signal (pure);
//! - [`decide`]: the decision: how many groups, which to add, which to drain (pure, no clock);
//! - [`fetch`]: the HTTP client that reads the reports from the router pods (I/O).
//!
//! The reconcile stage that wires them together is `reconcile::autoscale`.

pub mod decide;
pub mod fetch;
pub mod signal;

use std::time::Duration;

use crate::crd::AutoscalingMetric;

/// The longest window or delay `spec.autoscaling` accepts: a day. Longer is surely a typo, and
/// the recommendations kept in memory grow with the windows.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// `spec.autoscaling`, checked and parsed by `validate`: what [`decide::decide`] takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub min_groups: i32,
    pub max_groups: i32,
    pub metric: AutoscalingMetric,
    /// The per-group average to hold the signal at; above 0.
    pub target: f64,
    pub scale_up_stabilization: Duration,
    pub scale_down_delay: Duration,
    pub scale_to_zero_after: Duration,
    /// Relative band around the target in which nothing changes.
    pub tolerance: f64,
}

/// A duration as `spec.autoscaling` writes it: one or more `<digits><unit>` with unit `h`, `m`
/// or `s` (`0s`, `30s`, `5m`, `1h30m`), at most [`MAX_DURATION`]. `None` when it is not one.
pub fn parse_duration(text: &str) -> Option<Duration> {
    if text.is_empty() {
        return None;
    }
    let mut seconds: u64 = 0;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        // Parsing fails on overflow (a long run of digits) as it does on an empty number.
        let number: u64 = digits.parse().ok()?;
        digits.clear();
        seconds = seconds.checked_add(number.checked_mul(unit)?)?;
    }
    if !digits.is_empty() {
        return None;
    }
    let duration = Duration::from_secs(seconds);
    (duration <= MAX_DURATION).then_some(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_the_hpa_and_kubectl_write_them() {
        let d = |s| parse_duration(s).map(|d| d.as_secs());
        assert_eq!(d("0s"), Some(0));
        assert_eq!(d("30s"), Some(30));
        assert_eq!(d("5m"), Some(300));
        assert_eq!(d("1h30m"), Some(5400));
        assert_eq!(d("90s"), Some(90));
        assert_eq!(d("24h"), Some(86400));
        for bad in [
            "",
            "5",
            "m",
            "5x",
            "1.5m",
            "-1s",
            "25h",
            "99999999999999999999999s",
        ] {
            assert_eq!(d(bad), None, "{bad:?}");
        }
    }
}
