//! The HTTP side of a probe: one authenticated request with the connection's own token.
//!
//! Network only; every platform failure comes back as an `Outcome` value, never an `Err`.
//! Redirects are never followed: a cross-host redirect would drop the Authorization header
//! and fake a 401 ("credentials revoked") where there is none.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

use crate::config::{PlatformConfig, ProbeConfig};
use crate::domain::{Outcome, ProbeReport, bounded};

/// Longest error message kept from a platform's answer.
pub const MESSAGE_LIMIT: usize = 200;
/// Most of a body read to classify an answer.
const BODY_LIMIT: usize = 64 * 1024;

/// One HTTP client (keep-alive pool) and one concurrency cap per platform.
#[derive(Clone)]
pub struct Prober {
    platforms: Arc<BTreeMap<String, PlatformClient>>,
}

type RateLimiter = governor::DefaultDirectRateLimiter;

#[derive(Clone)]
struct PlatformClient {
    config: Arc<PlatformConfig>,
    /// `base_url` + `probe.path`, parsed once (not on every probe).
    probe_url: Option<reqwest::Url>,
    client: reqwest::Client,
    permits: Arc<Semaphore>,
    /// Requests per second to this platform, when capped.
    rate: Option<Arc<RateLimiter>>,
}

/// A probe could not even be attempted: our configuration's fault.
#[derive(Debug, thiserror::Error)]
pub enum ProbeSetupError {
    /// The HTTP client could not be built (TLS setup).
    #[error("cannot build the HTTP client for platform {platform}: {source}")]
    Client {
        platform: String,
        #[source]
        source: reqwest::Error,
    },
}

impl Prober {
    pub fn new(
        platforms: &BTreeMap<String, PlatformConfig>,
        probe: &ProbeConfig,
    ) -> Result<Prober, ProbeSetupError> {
        let mut clients = BTreeMap::new();
        for (name, platform) in platforms {
            let client = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                // Never retried: a probe reports what the platform answered (and the
                // default policy copied every request in case of a retry).
                .retry(reqwest::retry::never().max_retries_per_request(0))
                .connect_timeout(probe.connect_timeout)
                .timeout(probe.timeout)
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(platform.concurrency as usize)
                .user_agent(concat!("connwatch/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|source| ProbeSetupError::Client {
                    platform: name.clone(),
                    source,
                })?;
            clients.insert(
                name.clone(),
                PlatformClient {
                    probe_url: reqwest::Url::parse(&format!(
                        "{}{}",
                        platform.base_url, platform.probe_path
                    ))
                    .ok(),
                    config: Arc::new(platform.clone()),
                    client,
                    permits: Arc::new(Semaphore::new(platform.concurrency as usize)),
                    rate: platform
                        .rate_limit
                        .and_then(std::num::NonZeroU32::new)
                        .map(|limit| {
                            Arc::new(RateLimiter::direct(governor::Quota::per_second(limit)))
                        }),
                },
            );
        }
        Ok(Prober {
            platforms: Arc::new(clients),
        })
    }

    /// Probes once with `token`. Waits for a slot under the platform's concurrency cap
    /// (other platforms are never held up by this one).
    pub async fn probe(&self, platform: &str, token: &SecretString) -> ProbeReport {
        let Some(client) = self.platforms.get(platform) else {
            return failure(Outcome::ClientError, 0, "platform not configured".into());
        };
        let config = &client.config;
        let sent = match &client.probe_url {
            Some(url) => {
                self.request(
                    platform,
                    config.probe_method.clone(),
                    url.clone(),
                    token,
                    BODY_LIMIT,
                )
                .await
            }
            // Not a URL: the request fails and says why.
            None => {
                let url = format!("{}{}", config.base_url, config.probe_path);
                self.request(
                    platform,
                    config.probe_method.clone(),
                    url.as_str(),
                    token,
                    BODY_LIMIT,
                )
                .await
            }
        };
        let mut report = match sent {
            Ok(answer) => read_answer(
                config,
                answer.status,
                &answer.headers,
                &answer.body,
                answer.latency_ms,
            ),
            Err(report) => report,
        };
        // Platforms echo tokens (in messages, codes, request ids): nothing a platform said
        // goes further with the token in it.
        report.redact(&[token.expose_secret()]);
        report
    }

    /// One authenticated request to a platform (probe or poll), under its concurrency cap.
    /// A transport failure comes back as the report to record.
    pub async fn request(
        &self,
        platform: &str,
        method: reqwest::Method,
        url: impl reqwest::IntoUrl,
        token: &SecretString,
        body_limit: usize,
    ) -> Result<Answer, ProbeReport> {
        let Some(platform) = self.platforms.get(platform) else {
            return Err(failure(
                Outcome::ClientError,
                0,
                "platform not configured".into(),
            ));
        };
        let _permit = platform.permits.acquire().await.ok();
        if let Some(rate) = &platform.rate {
            rate.until_ready().await;
        }
        let config = &platform.config;
        let mut authorization = if config.auth_scheme.is_empty() {
            HeaderValue::from_str(token.expose_secret())
        } else {
            HeaderValue::from_str(&format!("{} {}", config.auth_scheme, token.expose_secret()))
        }
        .unwrap_or_else(|_| HeaderValue::from_static("invalid-token"));
        authorization.set_sensitive(true);
        let started = Instant::now();
        let sent = platform
            .client
            .request(method, url)
            .header(config.auth_header.as_str(), authorization)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => return Err(transport_failure(&error, elapsed_ms(started))),
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = match read_bounded(response, body_limit).await {
            Ok(body) => body,
            Err(error) => return Err(transport_failure(&error, elapsed_ms(started))),
        };
        Ok(Answer {
            status,
            headers,
            body,
            latency_ms: elapsed_ms(started),
        })
    }

    /// The platform's settings, if configured.
    pub fn platform(&self, name: &str) -> Option<Arc<PlatformConfig>> {
        self.platforms.get(name).map(|client| client.config.clone())
    }
}

/// A complete HTTP answer from a platform.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub latency_ms: i64,
}

async fn read_bounded(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= limit {
            break;
        }
    }
    Ok(body)
}

fn elapsed_ms(started: Instant) -> i64 {
    i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX)
}

pub fn failure(outcome: Outcome, latency_ms: i64, message: String) -> ProbeReport {
    ProbeReport {
        outcome,
        status: None,
        latency_ms,
        request_id: None,
        error_code: None,
        message: Some(bounded(&message, MESSAGE_LIMIT)),
        retry_after_secs: None,
    }
}

fn transport_failure(error: &reqwest::Error, latency_ms: i64) -> ProbeReport {
    // The error text names the URL (never the token, which travels only in a header).
    let detail = std::error::Error::source(error)
        .map(ToString::to_string)
        .unwrap_or_else(|| error.to_string());
    if error.is_timeout() {
        failure(
            Outcome::Timeout,
            latency_ms,
            "no answer within the probe timeout".into(),
        )
    } else if error.is_connect() {
        failure(
            Outcome::NetworkError,
            latency_ms,
            format!("cannot connect: {detail}"),
        )
    } else if error.is_body() || error.is_decode() {
        failure(
            Outcome::InvalidResponse,
            latency_ms,
            format!("broken answer: {detail}"),
        )
    } else {
        failure(
            Outcome::NetworkError,
            latency_ms,
            format!("request failed: {detail}"),
        )
    }
}

/// The outcome of a complete answer, and a description when the answer alone does not
/// explain it. `reauth`: the profile's reauthorization state of a success (`Err`: the
/// answer was not JSON), `None` when the profile reads none.
fn outcome_of(
    platform: &PlatformConfig,
    status: u16,
    code_is_auth: bool,
    reauth: Option<Result<Option<String>, ()>>,
) -> (Outcome, Option<String>) {
    if platform.auth_failure_status.contains(&status) || code_is_auth {
        return (Outcome::AuthFailed, None);
    }
    if (200..300).contains(&status) {
        return match reauth {
            Some(Err(())) => (
                Outcome::InvalidResponse,
                Some("answer is not JSON".to_owned()),
            ),
            Some(Ok(Some(state))) if platform.reauth_values.contains(&state) => (
                Outcome::AuthFailed,
                Some("platform reports reauthorization required".to_owned()),
            ),
            Some(Ok(_)) | None => (Outcome::Ok, None),
        };
    }
    if status == 429 {
        (Outcome::RateLimited, None)
    } else if (300..400).contains(&status) {
        (
            Outcome::InvalidResponse,
            Some(format!(
                "redirect ({status}) not followed; fix the probe path or base_url"
            )),
        )
    } else if status >= 500 {
        (Outcome::ServerError, None)
    } else {
        (Outcome::ClientError, None)
    }
}

/// Classifies a complete answer. Pure; the profile says where codes live.
pub fn read_answer(
    platform: &PlatformConfig,
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    latency_ms: i64,
) -> ProbeReport {
    // A success is read only when the profile looks into it (a reauthorization state, an
    // error code that means revoked credentials); most answers are a plain 200, and
    // parsing every one was a few per cent of a probe's CPU.
    let reads_body = !(200..300).contains(&status)
        || platform.reauth_pointer.is_some()
        || !platform.auth_failure_codes.is_empty();
    let json: Option<serde_json::Value> = if reads_body {
        serde_json::from_slice(body).ok()
    } else {
        None
    };
    let text_at = |pointer: &Option<String>| -> Option<String> {
        let value = json.as_ref()?.pointer(pointer.as_deref()?)?;
        match value {
            serde_json::Value::String(text) => Some(text.clone()),
            serde_json::Value::Null => None,
            other => Some(other.to_string()),
        }
    };
    let error_code = text_at(&platform.error_code_pointer).map(|code| bounded(&code, 100));
    let mut message = text_at(&platform.error_message_pointer);
    let request_id = platform
        .request_id_header
        .as_deref()
        .and_then(|name| headers.get(name))
        .and_then(|value| value.to_str().ok())
        .map(|value| bounded(value, 200));
    let retry_after_secs = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    let code_is_auth = error_code.as_ref().is_some_and(|code| {
        platform
            .auth_failure_codes
            .iter()
            .any(|listed| listed == code)
    });
    // What the answer says about the credentials: `None` when the profile does not ask.
    let reauth = platform.reauth_pointer.as_ref().map(|_| match &json {
        None => Err(()),
        Some(_) => Ok(text_at(&platform.reauth_pointer)),
    });
    let (outcome, detail) = outcome_of(platform, status, code_is_auth, reauth);
    if let Some(detail) = detail {
        match outcome {
            // A redirect's explanation replaces whatever the body said.
            Outcome::InvalidResponse if (300..400).contains(&status) => message = Some(detail),
            Outcome::Ok
            | Outcome::AuthFailed
            | Outcome::RateLimited
            | Outcome::ServerError
            | Outcome::ClientError
            | Outcome::Timeout
            | Outcome::NetworkError
            | Outcome::InvalidResponse => {
                message.get_or_insert(detail);
            }
        }
    }
    let retry_after_secs = match outcome {
        Outcome::RateLimited | Outcome::ServerError => retry_after_secs,
        Outcome::Ok
        | Outcome::AuthFailed
        | Outcome::ClientError
        | Outcome::Timeout
        | Outcome::NetworkError
        | Outcome::InvalidResponse => None,
    };
    ProbeReport {
        outcome,
        status: Some(status),
        latency_ms,
        request_id,
        error_code,
        message: message.map(|text| bounded(&text, MESSAGE_LIMIT)),
        retry_after_secs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn platform() -> PlatformConfig {
        let config = Config::parse(
            r#"
[platforms.makini]
base_url = "http://127.0.0.1:1"
probe = { path = "/v1/connection" }
reauth_pointer = "/status"
reauth_values = ["reauthorization_required"]
auth_failure_codes = ["AUTHENTICATION_FAILED"]
request_id_header = "x-request-id"
"#,
        )
        .expect("valid");
        config.platforms["makini"].clone()
    }

    fn answer(status: u16, body: &str, headers: &[(&'static str, &'static str)]) -> ProbeReport {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, HeaderValue::from_static(value));
        }
        read_answer(&platform(), status, &map, body.as_bytes(), 3)
    }

    #[test]
    fn answers_are_classified_by_status_code_and_body() {
        let cases: &[(u16, &str, Outcome)] = &[
            (200, r#"{"status":"active"}"#, Outcome::Ok),
            (
                200,
                r#"{"status":"reauthorization_required"}"#,
                Outcome::AuthFailed,
            ),
            (200, "not json", Outcome::InvalidResponse),
            (401, "", Outcome::AuthFailed),
            (403, "", Outcome::AuthFailed),
            (
                400,
                r#"{"error":{"code":"AUTHENTICATION_FAILED"}}"#,
                Outcome::AuthFailed,
            ),
            (
                400,
                r#"{"error":{"code":"BAD_REQUEST"}}"#,
                Outcome::ClientError,
            ),
            (404, "", Outcome::ClientError),
            (429, "", Outcome::RateLimited),
            (302, "", Outcome::InvalidResponse),
            (500, "", Outcome::ServerError),
            (503, "", Outcome::ServerError),
        ];
        for (status, body, expected) in cases {
            assert_eq!(
                answer(*status, body, &[]).outcome,
                *expected,
                "{status} {body}"
            );
        }
    }

    #[test]
    fn error_code_message_and_request_id_are_kept() {
        let report = answer(
            401,
            r#"{"error":{"code":"AUTHENTICATION_FAILED","message":"password changed"}}"#,
            &[("x-request-id", "req-42")],
        );
        assert_eq!(report.error_code.as_deref(), Some("AUTHENTICATION_FAILED"));
        assert_eq!(report.message.as_deref(), Some("password changed"));
        assert_eq!(report.request_id.as_deref(), Some("req-42"));
    }

    #[test]
    fn a_plain_profile_reads_the_body_of_failures_only() {
        let config = Config::parse(
            r#"
[platforms.plain]
base_url = "http://127.0.0.1:1"
probe = { path = "/v1/connection" }
"#,
        )
        .expect("valid");
        let plain = &config.platforms["plain"];
        let body = br#"{"error":{"code":"TOKEN_EXPIRED","message":"token expired"}}"#;
        let failure = read_answer(plain, 401, &HeaderMap::new(), body, 3);
        assert_eq!(failure.outcome, Outcome::AuthFailed);
        assert_eq!(failure.error_code.as_deref(), Some("TOKEN_EXPIRED"));
        assert_eq!(failure.message.as_deref(), Some("token expired"));
        // Nothing in the profile looks into a success: it is not parsed, not even when
        // it is not JSON.
        let success = read_answer(plain, 200, &HeaderMap::new(), b"not json", 3);
        assert_eq!(success.outcome, Outcome::Ok);
        assert_eq!(success.error_code, None);
    }

    #[test]
    fn retry_after_is_read_on_429_and_503_only() {
        assert_eq!(
            answer(429, "", &[("retry-after", "120")]).retry_after_secs,
            Some(120)
        );
        assert_eq!(
            answer(503, "", &[("retry-after", "7")]).retry_after_secs,
            Some(7)
        );
        assert_eq!(
            answer(401, "", &[("retry-after", "7")]).retry_after_secs,
            None
        );
    }
}
