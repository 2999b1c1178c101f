//! Time helpers, the one home for them: epoch milliseconds, durations, RFC 3339 on the
//! wire. Reading "now" is the clock's job (`crate::clock`), not these.

use std::time::{Duration, UNIX_EPOCH};

use serde::Serializer;

use super::Millis;

/// A duration in milliseconds, saturating far beyond any configured value.
pub fn millis(duration: Duration) -> Millis {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX / 4)
}

/// Formats epoch milliseconds as RFC 3339 UTC with milliseconds (times before the epoch
/// print as the epoch).
pub fn rfc3339(millis: Millis) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or_default());
    humantime::format_rfc3339_millis(time).to_string()
}

/// Reads RFC 3339 with `Z` or a `+00:00` offset.
pub fn parse_rfc3339(text: &str) -> Option<Millis> {
    let normalised = match text.strip_suffix("+00:00") {
        Some(stripped) => format!("{stripped}Z"),
        None => text.to_owned(),
    };
    let time = humantime::parse_rfc3339(&normalised).ok()?;
    let elapsed = time.duration_since(UNIX_EPOCH).ok()?;
    i64::try_from(elapsed.as_millis()).ok()
}

/// Serde: a stored time as RFC 3339.
pub fn serialize<S: Serializer>(millis: &Millis, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&rfc3339(*millis))
}

/// Serde: an optional stored time as RFC 3339 or null.
pub fn serialize_optional<S: Serializer>(
    millis: &Option<Millis>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match millis {
        Some(millis) => serializer.serialize_str(&rfc3339(*millis)),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_reads_both_utc_spellings() {
        assert_eq!(rfc3339(1500), "1970-01-01T00:00:01.500Z");
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01Z"), Some(1000));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01.500+00:00"), Some(1500));
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
    }
}
