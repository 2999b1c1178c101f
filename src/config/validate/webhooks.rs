//! `[webhooks]`: quiet detection, polling and de-duplication.

use std::time::Duration;

use crate::config::WebhooksConfig;
use crate::config::raw::RawWebhooks;
use crate::config::toml_lines::key;

use super::Checker;

/// Validates `[webhooks]`; every value is checked even after a problem.
pub(super) fn validate(checker: &mut Checker, raw: RawWebhooks) -> WebhooksConfig {
    let path = |name: &str| [key("webhooks"), key(name)];
    let expected_interval = checker.duration(
        &path("expected_interval"),
        raw.expected_interval.as_deref(),
        "1h",
    );
    let grace = checker.duration(&path("grace"), raw.grace.as_deref(), "15m");
    let poll_interval =
        checker.duration(&path("poll_interval"), raw.poll_interval.as_deref(), "5m");
    let overlap = checker.duration(&path("overlap"), raw.overlap.as_deref(), "5m");
    let retention = checker.duration(&path("retention"), raw.retention.as_deref(), "48h");
    if retention < Duration::from_secs(48 * 3600) {
        checker.problem(
            &path("retention"),
            "must be at least 48h: longer than the platform's retry window, or duplicates pass",
        );
    }
    WebhooksConfig {
        expected_interval,
        grace,
        poll_interval,
        overlap,
        retention,
    }
}
