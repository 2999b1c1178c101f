//! `[store]`: the database URL, retention and the pruning schedule.

use crate::config::StoreConfig;
use crate::config::raw::RawStore;
use crate::config::toml_lines::key;

use super::Checker;

/// Validates `[store]`; every value is checked even after a problem.
pub(super) fn validate(checker: &mut Checker, raw: RawStore) -> StoreConfig {
    let url = raw
        .url
        .unwrap_or_else(|| "sqlite:///var/lib/connwatch/connwatch.db".to_owned());
    if !(url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://"))
    {
        checker.problem(
            &[key("store"), key("url")],
            "must start with sqlite: or postgres:// (the credentials may be given by PGPASSWORD)",
        );
    }
    let retention = checker.duration(
        &[key("store"), key("retention")],
        raw.retention.as_deref(),
        "7d",
    );
    let prune_schedule = raw
        .prune_schedule
        .unwrap_or_else(|| "0 17 3 * * *".to_owned());
    if prune_schedule.split_whitespace().count() != 6 {
        checker.problem(
            &[key("store"), key("prune_schedule")],
            "a cron expression with six fields (seconds first), e.g. \"0 17 3 * * *\"",
        );
    }
    let max_connections = checker.positive(
        &[key("store"), key("max_connections")],
        raw.max_connections,
        8,
    );
    StoreConfig {
        url,
        retention,
        prune_schedule,
        max_connections,
    }
}
