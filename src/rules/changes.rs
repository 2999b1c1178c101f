//! Which times may move a connection's watermark (the point up to which its changes are
//! known), from webhooks and from polling.

use crate::domain::Millis;

/// How far ahead of our clock a platform's update time may be and still count: clocks
/// disagree a little, never by years.
pub const CLOCK_SKEW: Millis = 5 * 60 * 1000;

/// The time a change may move the watermark to: its update time, but never past `now` +
/// `CLOCK_SKEW`. A far-future time (year 2999, by mistake or malice) would otherwise make
/// every later poll ask for changes after it, and find nothing for that connection again.
pub fn watermark_candidate(updated_at: Millis, now: Millis) -> Millis {
    updated_at.min(now.saturating_add(CLOCK_SKEW))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_far_future_update_time_moves_the_watermark_no_further_than_now_plus_skew() {
        let now = 1_764_800_000_000;
        let year_2999 = 32_503_680_000_000;
        assert_eq!(watermark_candidate(year_2999, now), now + CLOCK_SKEW);
        assert_eq!(watermark_candidate(now - 1_000, now), now - 1_000);
        assert_eq!(
            watermark_candidate(now + 60_000, now),
            now + 60_000,
            "skew allowed"
        );
        assert_eq!(watermark_candidate(i64::MAX, i64::MAX - 1), i64::MAX);
    }
}
