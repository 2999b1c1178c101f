//! `[relay]`: where recovered changes are handed on, and the secret they are signed with.

use crate::config::RelayConfig;
use crate::config::raw::RawRelay;
use crate::config::toml_lines::key;
use crate::domain::decode_standard_secret;

use super::Checker;

/// Validates `[relay]`; `None` when it has a problem.
pub(super) fn validate(checker: &mut Checker, raw: RawRelay) -> Option<RelayConfig> {
    let before = checker.problems.len();
    if reqwest::Url::parse(&raw.url)
        .map(|url| !matches!(url.scheme(), "http" | "https"))
        .unwrap_or(true)
    {
        checker.problem(
            &[key("relay"), key("url")],
            "is not an http(s) URL (not echoed: it may carry credentials)",
        );
    }
    match raw.secret.read() {
        Ok(secret) => {
            if let Err(message) =
                decode_standard_secret(secrecy::ExposeSecret::expose_secret(&secret))
            {
                checker.problem(&[key("relay"), key("secret")], message);
            }
        }
        Err(error) => checker.problem(&[key("relay"), key("secret")], error.to_string()),
    }
    let timeout = checker.duration(
        &[key("relay"), key("timeout")],
        raw.timeout.as_deref(),
        "10s",
    );
    let max_attempts = checker.positive(&[key("relay"), key("max_attempts")], raw.max_attempts, 20);
    (checker.problems.len() == before).then_some(RelayConfig {
        url: raw.url,
        secret: raw.secret,
        timeout,
        max_attempts,
    })
}
