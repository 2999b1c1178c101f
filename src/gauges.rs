//! The fleet-wide gauges, recounted from the store on the leader: connections per health
//! (and, when enabled, per connection), quiet connections, relay outbox sizes.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::domain::Health;
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::store::Store;

/// How often the fleet-wide gauges are recounted (a count over every connection; scrapes
/// are typically 15–60 s apart).
const GAUGE_REFRESH: Duration = Duration::from_secs(5);

/// Keeps `connwatch_connections{health}` (and, when enabled, the per-connection
/// `connwatch_connection_health{connection,health}`) current from the store until
/// `cancel`.
pub async fn refresh_health_gauges(
    store: Store,
    metrics: Metrics,
    per_connection: bool,
    leadership: Leadership,
    cancel: CancellationToken,
) {
    loop {
        // Fleet-wide gauges come from the leader only; the others show 0, so `max`
        // across replicas is the fleet's value.
        if leadership.is_leader() {
            if per_connection {
                count_per_connection(&store, &metrics).await;
            }
            count_fleet(&store, &metrics).await;
        } else {
            zero_fleet(&metrics);
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(GAUGE_REFRESH) => {}
        }
    }
}

/// A follower's gauges: zero, so `max` across replicas is the leader's count.
fn zero_fleet(metrics: &Metrics) {
    for health in Health::ALL {
        metrics
            .connections
            .with_label_values(&[health.as_str()])
            .set(0);
    }
    metrics.connections_quiet.set(0);
    metrics.relay_outbox_pending.set(0);
    metrics.relay_outbox_dead.set(0);
    metrics.email_outbox_pending.set(0);
    metrics.email_outbox_oldest_age.set(0.0);
}

/// `connwatch_connection_health{connection,health}`: 1 for each connection's health.
async fn count_per_connection(store: &Store, metrics: &Metrics) {
    match store.list_connections().await {
        Ok(connections) => {
            metrics.connection_health.reset();
            for connection in connections {
                metrics
                    .connection_health
                    .with_label_values(&[connection.id.as_str(), connection.health.as_str()])
                    .set(1);
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot list connections for per-connection metrics")
        }
    }
}

/// Connections per health, quiet connections and the relay outbox.
async fn count_fleet(store: &Store, metrics: &Metrics) {
    match store.health_counts().await {
        Ok(counts) => {
            for (health, count) in counts {
                metrics
                    .connections
                    .with_label_values(&[health.as_str()])
                    .set(count);
            }
        }
        Err(error) => {
            metrics
                .store_errors
                .with_label_values(&["health_counts"])
                .inc();
            tracing::warn!(%error, "cannot count connections per health");
        }
    }
    match (store.quiet_count().await, store.relay_counts().await) {
        (Ok(quiet), Ok((pending, dead))) => {
            metrics.connections_quiet.set(quiet);
            metrics.relay_outbox_pending.set(pending);
            metrics.relay_outbox_dead.set(dead);
        }
        (Err(error), _) | (_, Err(error)) => {
            metrics.store_errors.with_label_values(&["gauges"]).inc();
            tracing::warn!(%error, "cannot count quiet connections and relay messages");
        }
    }
}
