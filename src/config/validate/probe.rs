//! `[probe]`: the probe interval, timeouts, concurrency and health thresholds.

use crate::config::ProbeConfig;
use crate::config::raw::RawProbe;
use crate::config::toml_lines::key;

use super::Checker;

/// Validates `[probe]`; every value is checked even after a problem.
pub(super) fn validate(checker: &mut Checker, raw: RawProbe) -> ProbeConfig {
    let path = |name: &str| [key("probe"), key(name)];
    let interval = checker.duration(&path("interval"), raw.interval.as_deref(), "5m");
    let timeout = checker.duration(&path("timeout"), raw.timeout.as_deref(), "10s");
    let connect_timeout = checker.duration(
        &path("connect_timeout"),
        raw.connect_timeout.as_deref(),
        "5s",
    );
    let confirm_after =
        checker.duration(&path("confirm_after"), raw.confirm_after.as_deref(), "30s");
    let reauth_backoff = checker.duration(
        &path("reauth_backoff"),
        raw.reauth_backoff.as_deref(),
        "15m",
    );
    let token_check_interval = checker.duration(
        &path("token_check_interval"),
        raw.token_check_interval.as_deref(),
        "10s",
    );
    let concurrency = checker.positive(&path("concurrency"), raw.concurrency, 256);
    let failure_threshold = checker.positive(&path("failure_threshold"), raw.failure_threshold, 2);
    let unreachable_threshold =
        checker.positive(&path("unreachable_threshold"), raw.unreachable_threshold, 3);
    if timeout >= interval {
        checker.problem(&path("timeout"), "must be shorter than probe.interval");
    }
    ProbeConfig {
        interval,
        timeout,
        connect_timeout: connect_timeout.min(timeout),
        concurrency,
        confirm_after,
        failure_threshold,
        unreachable_threshold,
        reauth_backoff,
        token_check_interval,
    }
}
