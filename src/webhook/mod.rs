//! The webhook listener: verify the signature on the raw body, parse, store (de-duplicated,
//! durably, before answering), and nudge quiet tracking.
//!
//! No network call happens while the sender waits: the answer follows the commit of a
//! batched write transaction shared by concurrent deliveries (group commit).

pub mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::Instrument;

use crate::clock::Clock;
use crate::config::{PlatformConfig, PlatformWebhooks, SignatureScheme};
use crate::domain::Millis;
use crate::events::Event;
use crate::metrics::Metrics;
use crate::rules::SharedRules;
use crate::store::{Store, WebhookDelivery, WebhookStored};
use verify::{SignatureError, decode_standard_secret, verify_hex, verify_standard};

/// Most deliveries committed in one transaction.
const WRITE_BATCH: usize = 256;

/// The longest webhook id stored as it is (`stored_webhook_id`).
pub const WEBHOOK_ID_LIMIT: usize = 200;

/// Signing keys, decoded once; never printed.
struct Keys(Vec<Vec<u8>>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "Keys([{} redacted])", self.0.len())
    }
}

/// One platform's webhook profile with its keys.
#[derive(Debug)]
struct Receiver {
    profile: PlatformWebhooks,
    keys: Keys,
}

type Reply = oneshot::Sender<Result<WebhookStored, ()>>;

/// What the webhook handler shares.
#[derive(Clone)]
pub struct WebhookState {
    receivers: Arc<std::sync::RwLock<Arc<BTreeMap<String, Receiver>>>>,
    writer: mpsc::Sender<(WebhookDelivery, Reply)>,
    metrics: Metrics,
    clock: Clock,
    /// The refusal log line, throttled (a flood of bad signatures).
    refusals: Arc<std::sync::Mutex<crate::listen::Throttled>>,
}

/// A webhook secret could not be read or decoded at start-up.
#[derive(Debug, thiserror::Error)]
#[error("platforms.{platform}.webhooks.secrets[{index}]: {message}")]
pub struct KeyError {
    platform: String,
    index: usize,
    message: String,
}

impl WebhookState {
    /// Reads the platforms' webhook secrets and starts the batching writer.
    pub fn new(
        platforms: &BTreeMap<String, PlatformConfig>,
        store: Store,
        metrics: Metrics,
        events: broadcast::Sender<Event>,
        clock: Clock,
        rules: SharedRules,
    ) -> Result<WebhookState, KeyError> {
        let receivers = load_receivers(platforms, &metrics)?;
        let (writer, queue) = mpsc::channel(4 * WRITE_BATCH);
        tokio::spawn(write_deliveries(store, queue, events, rules));
        Ok(WebhookState {
            receivers: Arc::new(std::sync::RwLock::new(Arc::new(receivers))),
            writer,
            metrics,
            clock,
            refusals: Arc::default(),
        })
    }

    /// Re-reads the webhook profiles and secrets (reload; secret rotation).
    pub fn reload(&self, platforms: &BTreeMap<String, PlatformConfig>) -> Result<(), KeyError> {
        let receivers = load_receivers(platforms, &self.metrics)?;
        *self.receivers.write().expect("receivers lock") = Arc::new(receivers);
        Ok(())
    }

    fn receiver_set(&self) -> Arc<BTreeMap<String, Receiver>> {
        self.receivers.read().expect("receivers lock").clone()
    }
}

fn load_receivers(
    platforms: &BTreeMap<String, PlatformConfig>,
    metrics: &Metrics,
) -> Result<BTreeMap<String, Receiver>, KeyError> {
    let mut receivers = BTreeMap::new();
    for (name, platform) in platforms {
        let Some(profile) = &platform.webhooks else {
            continue;
        };
        let mut keys = Vec::new();
        for (index, secret) in profile.secrets.iter().enumerate() {
            let failure = |message: String| KeyError {
                platform: name.clone(),
                index,
                message,
            };
            let value = secret.read().map_err(|error| failure(error.to_string()))?;
            let key = match profile.scheme {
                SignatureScheme::Standard => {
                    decode_standard_secret(value.expose_secret()).map_err(failure)?
                }
                SignatureScheme::HexHmac { .. } => value.expose_secret().as_bytes().to_vec(),
            };
            keys.push(key);
        }
        metrics.declare_webhook_platform(name, platform.changes.is_some());
        receivers.insert(
            name.clone(),
            Receiver {
                profile: profile.clone(),
                keys: Keys(keys),
            },
        );
    }
    Ok(receivers)
}

/// `POST /webhooks/{platform}`, with the body limit (413 above it).
pub fn router(state: WebhookState, max_bytes: usize) -> Router {
    Router::new()
        .route("/webhooks/{platform}", post(receive))
        .layer(DefaultBodyLimit::max(max_bytes))
        .with_state(state)
}

fn answer(status: StatusCode, result: &str) -> Response {
    (status, axum::Json(json!({ "result": result }))).into_response()
}

async fn receive(
    State(state): State<WebhookState>,
    Path(platform): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let receivers = state.receiver_set();
    let Some(receiver) = receivers.get(&platform) else {
        return answer(StatusCode::NOT_FOUND, "unknown_platform");
    };
    let count = |result: &str| {
        state
            .metrics
            .webhooks_received
            .with_label_values(&[platform.as_str(), result])
            .inc();
    };
    match read_delivery(&state, &platform, receiver, &headers, body) {
        Ok(delivery) => store_delivery(&state, &platform, delivery, count).await,
        Err(refused) => {
            count(refused.result);
            answer(refused.status, refused.answer)
        }
    }
}

/// A delivery refused before it is stored: the metric's result, the status and answer.
struct Refused {
    result: &'static str,
    status: StatusCode,
    answer: &'static str,
}

impl Refused {
    fn new(result: &'static str, status: StatusCode) -> Refused {
        Refused {
            result,
            status,
            answer: result,
        }
    }
}

/// Checks size, signature and shape of a delivery, on the raw body.
fn read_delivery(
    state: &WebhookState,
    platform: &str,
    receiver: &Receiver,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<WebhookDelivery, Refused> {
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(Refused::new("too_large", StatusCode::PAYLOAD_TOO_LARGE));
        }
        Err(_) => return Err(Refused::new("malformed", StatusCode::BAD_REQUEST)),
    };
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let verified = match &receiver.profile.scheme {
        SignatureScheme::Standard => verify_standard(
            &receiver.keys.0,
            header("webhook-id"),
            header("webhook-timestamp"),
            header("webhook-signature"),
            &body,
            state.clock.now() / 1000,
        ),
        SignatureScheme::HexHmac { header: name } => {
            verify_hex(&receiver.keys.0, header(name), &body)
        }
    };
    if let Err(error) = verified {
        let due = state
            .refusals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .due();
        if let Some(refused) = due {
            // At most a line a minute; `refused` counts them (the metric counts each).
            tracing::warn!(platform = %platform, reason = %error, refused, "webhook refused");
        }
        return Err(Refused {
            answer: signature_result(error),
            ..Refused::new("bad_signature", StatusCode::UNAUTHORIZED)
        });
    }
    let webhook_id = match &receiver.profile.scheme {
        SignatureScheme::Standard => header("webhook-id").map(str::to_owned),
        SignatureScheme::HexHmac { .. } => Some(
            receiver
                .profile
                .id_header
                .as_deref()
                .and_then(header)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("sha256:{:x}", Sha256::digest(&body))),
        ),
    };
    webhook_id
        .and_then(|id| parse_delivery(platform, &receiver.profile, id, &body, state.clock.now()))
        .ok_or(Refused::new("malformed", StatusCode::BAD_REQUEST))
}

/// Hands a verified delivery to the batching writer and answers once it is durable.
async fn store_delivery(
    state: &WebhookState,
    platform: &str,
    delivery: WebhookDelivery,
    count: impl Fn(&str),
) -> Response {
    // Debug level: what is logged above it names its fields itself, and a span at the
    // daemon's level formatted its fields on every delivery.
    let span =
        tracing::debug_span!("webhook", platform = %platform, remote_id = %delivery.remote_id);
    let (reply, stored) = oneshot::channel();
    if let Err(unsent) = state.writer.send((delivery, reply)).await {
        let (delivery, _) = unsent.0;
        tracing::error!(
            platform = %platform,
            remote_id = %delivery.remote_id,
            "the webhook writer is gone; answering 503"
        );
        return answer(StatusCode::SERVICE_UNAVAILABLE, "shutting_down");
    }
    // The span is entered only around synchronous code, never across an await.
    let waited = tokio::time::timeout(Duration::from_secs(10), stored)
        .instrument(span.clone())
        .await;
    let _entered = span.enter();
    match waited {
        Ok(Ok(Ok(WebhookStored::Accepted { connection, .. }))) => {
            count("accepted");
            tracing::debug!(connection_id = %connection, "webhook stored");
            answer(StatusCode::OK, "accepted")
        }
        Ok(Ok(Ok(WebhookStored::Duplicate))) => {
            count("duplicate");
            answer(StatusCode::OK, "duplicate")
        }
        Ok(Ok(Ok(WebhookStored::UnknownConnection))) => {
            count("unknown_connection");
            answer(StatusCode::ACCEPTED, "unknown_connection")
        }
        // Not stored: the platform retries later.
        Ok(Ok(Err(()))) | Ok(Err(_)) | Err(_) => {
            answer(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
        }
    }
}

/// The id a delivery is stored (and de-duplicated) under. Ids up to `WEBHOOK_ID_LIMIT`
/// characters are kept as they are; a longer one keeps its beginning and a digest of the
/// whole, so two ids sharing a long prefix stay two deliveries (cutting them made the
/// second a "duplicate", lost for good).
pub fn stored_webhook_id(raw: &str) -> String {
    if raw.chars().count() <= WEBHOOK_ID_LIMIT {
        return raw.to_owned();
    }
    let prefix: String = raw.chars().take(WEBHOOK_ID_LIMIT - 72).collect();
    format!("{prefix}~sha256:{:x}", Sha256::digest(raw.as_bytes()))
}

fn signature_result(error: SignatureError) -> &'static str {
    match error {
        SignatureError::Missing => "missing_signature",
        SignatureError::BadTimestamp | SignatureError::Stale => "stale_timestamp",
        SignatureError::Mismatch => "bad_signature",
    }
}

/// Reads the fields the profile points at; `None` if the body is not usable. Pure (the
/// handler calls it after the signature check; public for the fuzz target).
pub fn parse_delivery(
    platform: &str,
    profile: &PlatformWebhooks,
    webhook_id: String,
    body: &[u8],
    received_at: Millis,
) -> Option<WebhookDelivery> {
    let text = std::str::from_utf8(body).ok()?;
    let json: Value = serde_json::from_str(text).ok()?;
    let at = |pointer: &Option<String>| {
        pointer
            .as_deref()
            .and_then(|pointer| text_at(&json, pointer))
    };
    let remote_id = text_at(&json, &profile.connection_pointer)?;
    let event_type = at(&profile.type_pointer);
    let change_updated = profile
        .change_updated_pointer
        .as_deref()
        .and_then(|pointer| json.pointer(pointer))
        .and_then(time_value);
    let reauth = event_type
        .as_ref()
        .is_some_and(|kind| profile.reauth_types.contains(kind));
    let reconnected = event_type
        .as_ref()
        .is_some_and(|kind| profile.reconnect_types.contains(kind));
    Some(WebhookDelivery {
        platform: platform.to_owned(),
        webhook_id: stored_webhook_id(&webhook_id),
        received_at,
        remote_id,
        event_type,
        change_id: at(&profile.change_id_pointer),
        change_updated,
        reauth,
        reconnected,
        body: text.to_owned(),
    })
}

/// A JSON value as text: strings as they are, numbers printed; nothing for null or objects.
pub fn text_at(json: &Value, pointer: &str) -> Option<String> {
    match json.pointer(pointer)? {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// A time on the wire: RFC 3339, or Unix seconds / milliseconds as a number; nothing for
/// seconds beyond what milliseconds can hold (they overflowed: a panic in a debug build,
/// a wrapped time in a release build).
pub fn time_value(value: &Value) -> Option<Millis> {
    match value {
        Value::String(text) => crate::domain::time::parse_rfc3339(text),
        Value::Number(number) => {
            let raw = number.as_i64()?;
            if raw > 100_000_000_000 {
                Some(raw)
            } else {
                raw.checked_mul(1000)
            }
        }
        _ => None,
    }
}

/// Commits deliveries in batches and answers each waiting handler.
async fn write_deliveries(
    store: Store,
    mut queue: mpsc::Receiver<(WebhookDelivery, Reply)>,
    events: broadcast::Sender<Event>,
    rules: SharedRules,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while queue.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        let (deliveries, replies): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
        match store.record_webhooks(&deliveries, &rules.current()).await {
            Ok(results) => {
                for (result, reply) in results.into_iter().zip(replies) {
                    if let WebhookStored::Accepted {
                        connection,
                        transition: Some(health),
                    } = &result
                    {
                        tracing::info!(connection_id = %connection, to = %health, "webhook: reauthorization required");
                        let _ = events.send(Event::WebhookReauth {
                            id: connection.clone(),
                        });
                    }
                    let _ = reply.send(Ok(result));
                }
            }
            Err(error) => {
                tracing::error!(%error, deliveries = deliveries.len(), "cannot store webhooks; answering 503");
                for reply in replies {
                    let _ = reply.send(Err(()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_webhook_ids_sharing_a_prefix_stay_apart() {
        let common = "x".repeat(WEBHOOK_ID_LIMIT);
        let first = stored_webhook_id(&format!("{common}-first"));
        let second = stored_webhook_id(&format!("{common}-second"));
        assert_ne!(first, second);
        assert!(first.chars().count() <= WEBHOOK_ID_LIMIT, "{first}");
        assert_eq!(
            stored_webhook_id("msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"),
            "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
        );
        assert_eq!(stored_webhook_id(&common), common);
    }

    #[test]
    fn times_are_read_from_rfc3339_or_epoch_numbers() {
        assert_eq!(time_value(&json!("1970-01-01T00:00:01Z")), Some(1000));
        assert_eq!(time_value(&json!(2)), Some(2000));
        assert_eq!(
            time_value(&json!(1_700_000_000_123_i64)),
            Some(1_700_000_000_123)
        );
        assert_eq!(time_value(&json!("yesterday")), None);
    }

    /// Found by the `changes` and `webhook` fuzz targets: a large negative epoch number
    /// (an `_updatedAt` of -99999999999999999) overflowed when read as seconds.
    #[test]
    fn an_epoch_number_too_large_for_milliseconds_is_no_time() {
        assert_eq!(time_value(&json!(-99_999_999_999_999_999_i64)), None);
        assert_eq!(time_value(&json!(i64::MIN)), None);
        assert_eq!(
            time_value(&json!(-9_223_372_036_854_775_i64)),
            Some(-9_223_372_036_854_775_000)
        );
    }
}
