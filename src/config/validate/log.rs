//! `[log]`: the log format and level.

use crate::config::raw::RawLog;
use crate::config::toml_lines::key;
use crate::config::{LogConfig, LogFormat};

use super::Checker;

/// Validates `[log]`.
pub(super) fn validate(checker: &mut Checker, raw: RawLog) -> LogConfig {
    let format = match raw.format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            checker.problem(
                &[key("log"), key("format")],
                format!("{other:?} is not a log format; use \"text\" or \"json\""),
            );
            LogFormat::Text
        }
    };
    LogConfig {
        format,
        level: raw.level.unwrap_or_else(|| "info".to_owned()),
    }
}
