//! Human formatting of durations, byte sizes, timestamps and untrusted text for guardctl's output.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Local, SecondsFormat, Utc};

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;

/// Wall-clock now in Unix ms, the same clock fwd stamps its replies with.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A duration in seconds as its two most significant units: `45s`, `4m 59s`, `1h 2m`, `2d 3h`.
///
/// Two units are enough to read at a glance; the exact value is in `--json`.
pub fn duration(secs: u64) -> String {
    let units = [(DAY, "d"), (HOUR, "h"), (MINUTE, "m"), (1, "s")];
    let Some(first) = units.iter().position(|&(size, _)| secs >= size) else {
        return "0s".to_owned();
    };
    let (size, unit) = units[first];
    let mut out = format!("{}{unit}", secs / size);
    if let Some(&(next_size, next_unit)) = units.get(first + 1) {
        let rest = (secs % size) / next_size;
        if rest > 0 {
            let _ = write!(out, " {rest}{next_unit}");
        }
    }
    out
}

/// Time left until `expires_ms`, rounded up to the second: `never` for 0 (no expiry),
/// `expired` once it has passed (fwd's sweeper may lag the kernel by a moment).
pub fn expires_in(expires_ms: u64, now_ms: u64) -> String {
    if expires_ms == 0 {
        return "never".to_owned();
    }
    if expires_ms <= now_ms {
        return "expired".to_owned();
    }
    duration((expires_ms - now_ms).div_ceil(1000))
}

/// A point in time relative to now: `in 5m`, `3m ago`, or `-` for 0 (no such time).
pub fn relative(at_ms: u64, now_ms: u64) -> String {
    if at_ms == 0 {
        "-".to_owned()
    } else if at_ms > now_ms {
        format!("in {}", duration((at_ms - now_ms).div_ceil(1000)))
    } else {
        format!("{} ago", duration((now_ms - at_ms) / 1000))
    }
}

/// A byte count in IEC units with one decimal: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    // f64 is exact enough for one decimal of a display value.
    #[allow(clippy::cast_precision_loss)]
    let mut value = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for next in &UNITS[1..] {
        // Switch units before rounding would print "1024.0".
        if value < 1023.95 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.1} {unit}")
}

/// A smoothed RTT in microseconds: `850µs`, `12.3ms`, `1.20s`, or `-` with no sample yet.
pub fn rtt(us: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let f = us as f64;
    match us {
        0 => "-".to_owned(),
        1..=999 => format!("{us}µs"),
        1_000..=999_949 => format!("{:.1}ms", f / 1_000.0),
        _ => format!("{:.2}s", f / 1_000_000.0),
    }
}

fn datetime(ms: u64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(i64::try_from(ms).ok()?)
}

/// Unix ms as local time, RFC 3339 to the second (`2025-01-02T15:04:05+01:00`), for tables.
pub fn local_short(ms: u64) -> String {
    match datetime(ms) {
        Some(t) => t
            .with_timezone(&Local)
            .to_rfc3339_opts(SecondsFormat::Secs, false),
        None => "-".to_owned(),
    }
}

/// Unix ms as UTC RFC 3339 with milliseconds (`2025-01-02T14:04:05.123Z`), for JSON.
pub fn rfc3339(ms: u64) -> String {
    datetime(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// A time field of the JSON output: the proto's "0 means none" becomes `null` in both forms.
pub fn json_time(ms: u64) -> (Option<u64>, Option<String>) {
    if ms == 0 {
        (None, None)
    } else {
        (Some(ms), Some(rfc3339(ms)))
    }
}

/// Escapes control characters in text that came from a daemon (DNS names, comments, reasons,
/// error messages), so a hostile string cannot drive the terminal or break table rows.
pub fn sanitize(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// An empty string as `-`, so table columns never look shifted.
pub fn or_dash(s: &str) -> Cow<'_, str> {
    if s.is_empty() {
        Cow::Borrowed("-")
    } else {
        sanitize(s)
    }
}

/// An empty string as `None`, for optional JSON fields.
pub fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn durations_use_two_units() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(1), "1s");
        assert_eq!(duration(59), "59s");
        assert_eq!(duration(60), "1m");
        assert_eq!(duration(299), "4m 59s");
        assert_eq!(duration(3600), "1h");
        assert_eq!(duration(3600 + 120 + 5), "1h 2m");
        assert_eq!(duration(DAY), "1d");
        assert_eq!(duration(2 * DAY + 3 * HOUR + 59), "2d 3h");
        assert_eq!(duration(400 * DAY), "400d");
    }

    #[test]
    fn expires_in_handles_never_expired_and_rounds_up() {
        let now = 1_700_000_000_000;
        assert_eq!(expires_in(0, now), "never");
        assert_eq!(expires_in(now, now), "expired");
        assert_eq!(expires_in(now - 5, now), "expired");
        assert_eq!(expires_in(now + 1, now), "1s");
        assert_eq!(expires_in(now + 300_000, now), "5m");
        assert_eq!(expires_in(now + 299_001, now), "5m");
    }

    #[test]
    fn relative_times() {
        let now = 1_700_000_000_000;
        assert_eq!(relative(0, now), "-");
        assert_eq!(relative(now + 60_000, now), "in 1m");
        assert_eq!(relative(now - 90_000, now), "1m 30s ago");
        assert_eq!(relative(now, now), "0s ago");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(1024 * 1024 - 1), "1.0 MiB");
        assert_eq!(bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
        assert_eq!(bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn rtts() {
        assert_eq!(rtt(0), "-");
        assert_eq!(rtt(850), "850µs");
        assert_eq!(rtt(12_345), "12.3ms");
        assert_eq!(rtt(999_949), "999.9ms");
        assert_eq!(rtt(1_200_000), "1.20s");
    }

    #[test]
    fn rfc3339_is_utc_with_millis() {
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(json_time(0), (None, None));
        assert_eq!(
            json_time(1_700_000_000_000),
            (
                Some(1_700_000_000_000),
                Some("2023-11-14T22:13:20.000Z".to_owned())
            )
        );
    }

    #[test]
    fn local_short_is_rfc3339_to_the_second() {
        let s = local_short(1_700_000_000_123);
        let parsed = DateTime::parse_from_rfc3339(&s).unwrap();
        assert_eq!(parsed.timestamp(), 1_700_000_000);
        assert!(!s.contains('.'), "{s}");
        assert_eq!(local_short(u64::MAX), "-");
    }

    #[test]
    fn sanitize_escapes_control_characters() {
        assert!(matches!(sanitize("example.com"), Cow::Borrowed(_)));
        assert_eq!(sanitize("a\u{1b}[31mb\nc"), "a\\u{1b}[31mb\\nc");
        assert_eq!(or_dash(""), "-");
        assert_eq!(non_empty(""), None);
        assert_eq!(non_empty("x"), Some("x".to_owned()));
    }
}
