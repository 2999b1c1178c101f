//! Relay of recovered changes: a durable outbox drained by Standard Webhooks–signed POSTs,
//! retried with exponential backoff and jitter; messages past `max_attempts` are dead
//! (kept, counted, shown in `status`).

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::RelayConfig;
use crate::domain::Millis;
use crate::domain::time::millis;
use crate::metrics::Metrics;
use crate::store::{RelayMessage, Store, StoreError};
use crate::webhook::verify::{decode_standard_secret, sign_standard};
use crate::worker::{Crew, LeasedWork, run_leased};

/// Relay messages claimed per turn.
const RELAY_BATCH: u32 = 32;

/// Sends relay messages.
pub struct Relay {
    store: Store,
    metrics: Metrics,
    settings: RelayConfig,
    key: Vec<u8>,
    client: reqwest::Client,
    owner: String,
    clock: Clock,
}

impl Relay {
    pub fn new(
        store: Store,
        metrics: Metrics,
        settings: RelayConfig,
        owner: String,
        clock: Clock,
    ) -> anyhow::Result<Relay> {
        let secret = settings.secret.read()?;
        let key = decode_standard_secret(secret.expose_secret()).map_err(anyhow::Error::msg)?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.timeout)
            .build()?;
        Ok(Relay {
            store,
            metrics,
            settings,
            key,
            client,
            owner,
            clock,
        })
    }

    /// Drains the outbox until `cancel`: one message after another, `RELAY_BATCH` a claim.
    pub async fn run(self, cancel: CancellationToken) {
        let crew = Crew::InLine { batch: RELAY_BATCH };
        run_leased(Arc::new(self), crew, cancel).await;
    }

    async fn send(&self, message: RelayMessage) {
        let timestamp = self.clock.now() / 1000;
        let signature = sign_standard(
            &self.key,
            &message.webhook_id,
            timestamp,
            message.payload.as_bytes(),
        );
        let sent = self
            .client
            .post(&self.settings.url)
            .header("content-type", "application/json")
            .header("webhook-id", &message.webhook_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(message.payload.clone())
            .send()
            .await;
        let failure = match sent {
            Ok(response) if response.status().is_success() => None,
            Ok(response) => Some(format!("relay answered {}", response.status().as_u16())),
            Err(error) if error.is_timeout() => Some("relay timed out".to_owned()),
            Err(_) => Some("cannot reach the relay".to_owned()),
        };
        let now = self.clock.now();
        let attempts = message.attempts + 1;
        let outcome = match &failure {
            None => Ok(()),
            Some(reason) if attempts >= i64::from(self.settings.max_attempts) => {
                Err((reason.as_str(), None))
            }
            Some(reason) => Err((reason.as_str(), Some(now + backoff_ms(attempts)))),
        };
        let result = match &outcome {
            Ok(()) => "sent",
            Err((_, Some(_))) => "failed",
            Err((_, None)) => "dead",
        };
        self.metrics.relay.with_label_values(&[result]).inc();
        if let Some(reason) = &failure {
            tracing::warn!(webhook_id = %message.webhook_id, attempts, %reason, result, "relay attempt failed");
        }
        if let Err(error) = self
            .store
            .finish_relay(message.id, &self.owner, outcome, now)
            .await
        {
            tracing::error!(%error, "cannot record the relay attempt; it will be retried");
        }
    }
}

impl LeasedWork for Relay {
    type Item = RelayMessage;
    const CLAIM_OPERATION: &'static str = "claim_relay";
    const CLAIM_FAILED: &'static str = "cannot claim relay messages";
    const IDLE: Duration = Duration::from_millis(500);

    fn clock(&self) -> &Clock {
        &self.clock
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn lease_until(&self, now: Millis) -> Millis {
        now + 2 * millis(self.settings.timeout) + 5_000
    }

    async fn claim(
        &self,
        now: Millis,
        limit: u32,
        lease_until: Millis,
    ) -> Result<Vec<RelayMessage>, StoreError> {
        self.store
            .claim_relay(now, limit, &self.owner, lease_until)
            .await
    }

    async fn work(&self, message: RelayMessage) {
        self.send(message).await;
    }
}

/// 1 s doubling per attempt, capped at an hour, with ±25 % jitter.
pub fn backoff_ms(attempts: i64) -> i64 {
    let base = 1000_i64
        .saturating_mul(1 << attempts.clamp(0, 12))
        .min(3_600_000);
    let jitter = (base / 4).max(1);
    base - jitter + (rand::random::<u64>() % (2 * jitter as u64)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_with_bounded_jitter() {
        for attempts in 1..20 {
            let base = (1000_i64 << attempts.min(12)).min(3_600_000);
            let delay = backoff_ms(attempts);
            assert!(
                delay >= base * 3 / 4 && delay <= base * 5 / 4,
                "{attempts}: {delay}"
            );
        }
    }
}
