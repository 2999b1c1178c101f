//! Every metric name and help text, in one file. Labels come from bounded sets only:
//! no connection ids, customer names, URLs or error strings.

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::domain::{Health, Outcome};

/// The daemon's metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `connwatch_connections{health}`: connections per health state.
    pub connections: IntGaugeVec,
    /// `connwatch_probes_total{platform,outcome}`.
    pub probes: IntCounterVec,
    /// `connwatch_probe_duration_seconds{platform}`.
    pub probe_duration: HistogramVec,
    /// `connwatch_scheduler_last_tick_timestamp_seconds`.
    pub scheduler_last_tick: Gauge,
    /// `connwatch_probes_in_flight`.
    pub probes_in_flight: IntGauge,
    /// `connwatch_probe_lateness_seconds`: probe start minus its due time.
    pub probe_lateness: prometheus::Histogram,
    /// `connwatch_transitions_total{to}`.
    pub transitions: IntCounterVec,
    /// `connwatch_store_errors_total{operation}`.
    pub store_errors: IntCounterVec,
    /// `connwatch_jobs_skipped_total{job}`: a cron run skipped because the last one still ran.
    pub jobs_skipped: IntCounterVec,
    /// `connwatch_job_last_run_timestamp_seconds{job}`.
    pub job_last_run: GaugeVec,
    /// `connwatch_webhooks_received_total{platform,result}`.
    pub webhooks_received: IntCounterVec,
    /// `connwatch_connections_quiet`.
    pub connections_quiet: IntGauge,
    /// `connwatch_polls_total{platform,result}`.
    pub polls: IntCounterVec,
    /// `connwatch_changes_recovered_total{platform}`.
    pub changes_recovered: IntCounterVec,
    /// `connwatch_relay_total{result}`.
    pub relay: IntCounterVec,
    /// `connwatch_relay_outbox_pending`.
    pub relay_outbox_pending: IntGauge,
    /// `connwatch_relay_outbox_dead`.
    pub relay_outbox_dead: IntGauge,
    /// `connwatch_emails_total{kind,result}`.
    pub emails: IntCounterVec,
    /// `connwatch_email_outbox_pending`.
    pub email_outbox_pending: IntGauge,
    /// `connwatch_email_outbox_oldest_pending_age_seconds`.
    pub email_outbox_oldest_age: Gauge,
    /// `connwatch_connection_health{connection,health}`: only with
    /// `[server] per_connection_metrics = true` (unbounded labels otherwise).
    pub connection_health: IntGaugeVec,
    /// `connwatch_leader`: 1 on the replica running the once-only jobs.
    pub leader: IntGauge,
}

/// Results of `connwatch_emails_total`.
pub const EMAIL_RESULTS: [&str; 3] = ["sent", "failed", "rejected"];

/// Results of `connwatch_webhooks_received_total`.
pub const WEBHOOK_RESULTS: [&str; 6] = [
    "accepted",
    "duplicate",
    "bad_signature",
    "malformed",
    "too_large",
    "unknown_connection",
];
/// Results of `connwatch_polls_total`.
pub const POLL_RESULTS: [&str; 4] = ["ok", "auth_failed", "rate_limited", "error"];
/// Results of `connwatch_relay_total`.
pub const RELAY_RESULTS: [&str; 3] = ["sent", "failed", "dead"];

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric")
}

impl Metrics {
    /// Registers every metric of the contract.
    // One registration per metric, read top to bottom: splitting the list would only
    // scatter the contract.
    #[allow(clippy::too_many_lines)]
    pub fn new(version: &str) -> Metrics {
        let registry = Registry::new();
        let connections = IntGaugeVec::new(
            Opts::new("connwatch_connections", "Connections per health state."),
            &["health"],
        )
        .expect("valid metric");
        let probes = IntCounterVec::new(
            Opts::new("connwatch_probes_total", "Probes by platform and outcome."),
            &["platform", "outcome"],
        )
        .expect("valid metric");
        let probe_duration = HistogramVec::new(
            HistogramOpts::new(
                "connwatch_probe_duration_seconds",
                "Time from sending a probe to its complete answer.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["platform"],
        )
        .expect("valid metric");
        let scheduler_last_tick = Gauge::new(
            "connwatch_scheduler_last_tick_timestamp_seconds",
            "Unix time of the probe scheduler's last loop turn; stale means stalled.",
        )
        .expect("valid metric");
        let probe_lateness = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "connwatch_probe_lateness_seconds",
                "How late probes start against their due time (scheduler and claim delay).",
            )
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]),
        )
        .expect("valid metric");
        let probes_in_flight = IntGauge::new(
            "connwatch_probes_in_flight",
            "Probes currently waiting for the platform.",
        )
        .expect("valid metric");
        let transitions = IntCounterVec::new(
            Opts::new(
                "connwatch_transitions_total",
                "Health transitions recorded, by the state entered.",
            ),
            &["to"],
        )
        .expect("valid metric");
        let store_errors = IntCounterVec::new(
            Opts::new(
                "connwatch_store_errors_total",
                "Database operations that failed, by operation.",
            ),
            &["operation"],
        )
        .expect("valid metric");
        let jobs_skipped = IntCounterVec::new(
            Opts::new(
                "connwatch_jobs_skipped_total",
                "Scheduled jobs skipped because the previous run had not finished.",
            ),
            &["job"],
        )
        .expect("valid metric");
        let job_last_run = GaugeVec::new(
            Opts::new(
                "connwatch_job_last_run_timestamp_seconds",
                "Unix time a scheduled job last finished.",
            ),
            &["job"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "connwatch_build_info",
                "Always 1; the version is in the label.",
            ),
            &["version"],
        )
        .expect("valid metric");
        build_info.with_label_values(&[version]).set(1);
        let webhooks_received = counter(
            "connwatch_webhooks_received_total",
            "Webhook deliveries by platform and result.",
            &["platform", "result"],
        );
        let connections_quiet = gauge(
            "connwatch_connections_quiet",
            "Connections with no webhook within their expected interval + grace.",
        );
        let polls = counter(
            "connwatch_polls_total",
            "Polls of the recent-changes endpoint for quiet connections, by result.",
            &["platform", "result"],
        );
        let changes_recovered = counter(
            "connwatch_changes_recovered_total",
            "Changes found by polling that no webhook delivered.",
            &["platform"],
        );
        let relay = counter(
            "connwatch_relay_total",
            "Attempts to hand recovered changes on to the relay endpoint, by result.",
            &["result"],
        );
        for result in RELAY_RESULTS {
            relay.with_label_values(&[result]);
        }
        let relay_outbox_pending = gauge(
            "connwatch_relay_outbox_pending",
            "Recovered changes waiting to be relayed.",
        );
        let emails = counter(
            "connwatch_emails_total",
            "Email delivery attempts by kind and result (failed: retried; rejected: 5xx, given up).",
            &["kind", "result"],
        );
        for kind in crate::domain::EmailKind::ALL.map(crate::domain::EmailKind::as_str) {
            for result in EMAIL_RESULTS {
                emails.with_label_values(&[kind, result]);
            }
        }
        let email_outbox_pending = gauge(
            "connwatch_email_outbox_pending",
            "Emails waiting in the outbox (including reminders not yet due).",
        );
        let email_outbox_oldest_age = Gauge::new(
            "connwatch_email_outbox_oldest_pending_age_seconds",
            "How long the oldest due email has been waiting to be sent.",
        )
        .expect("valid metric");
        let connection_health = IntGaugeVec::new(
            Opts::new(
                "connwatch_connection_health",
                "1 for each connection's current health (only with per_connection_metrics).",
            ),
            &["connection", "health"],
        )
        .expect("valid metric");
        let leader = gauge(
            "connwatch_leader",
            "1 on the replica that runs pruning, digests and storm detection and exports the fleet-wide gauges.",
        );
        let relay_outbox_dead = gauge(
            "connwatch_relay_outbox_dead",
            "Recovered changes given up on after the last relay attempt.",
        );

        for collector in [
            Box::new(connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(probes.clone()),
            Box::new(probe_duration.clone()),
            Box::new(scheduler_last_tick.clone()),
            Box::new(probes_in_flight.clone()),
            Box::new(probe_lateness.clone()),
            Box::new(transitions.clone()),
            Box::new(store_errors.clone()),
            Box::new(jobs_skipped.clone()),
            Box::new(job_last_run.clone()),
            Box::new(build_info),
            Box::new(webhooks_received.clone()),
            Box::new(connections_quiet.clone()),
            Box::new(polls.clone()),
            Box::new(changes_recovered.clone()),
            Box::new(relay.clone()),
            Box::new(relay_outbox_pending.clone()),
            Box::new(relay_outbox_dead.clone()),
            Box::new(emails.clone()),
            Box::new(email_outbox_pending.clone()),
            Box::new(email_outbox_oldest_age.clone()),
            Box::new(connection_health.clone()),
            Box::new(leader.clone()),
        ] {
            registry.register(collector).expect("unique metric");
        }
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        for health in Health::ALL {
            connections.with_label_values(&[health.as_str()]).set(0);
        }
        Metrics {
            registry,
            connections,
            probes,
            probe_duration,
            scheduler_last_tick,
            probes_in_flight,
            probe_lateness,
            transitions,
            store_errors,
            jobs_skipped,
            job_last_run,
            webhooks_received,
            connections_quiet,
            polls,
            changes_recovered,
            relay,
            relay_outbox_pending,
            relay_outbox_dead,
            emails,
            email_outbox_pending,
            email_outbox_oldest_age,
            connection_health,
            leader,
        }
    }

    /// Creates every `{platform,outcome}` series at zero so rates exist before the first probe.
    pub fn declare_platform(&self, platform: &str) {
        for outcome in Outcome::ALL {
            self.probes.with_label_values(&[platform, outcome.as_str()]);
        }
        self.probe_duration.with_label_values(&[platform]);
    }

    /// Creates the webhook and polling series of a platform at zero.
    pub fn declare_webhook_platform(&self, platform: &str, polls: bool) {
        for result in WEBHOOK_RESULTS {
            self.webhooks_received
                .with_label_values(&[platform, result]);
        }
        if polls {
            for result in POLL_RESULTS {
                self.polls.with_label_values(&[platform, result]);
            }
            self.changes_recovered.with_label_values(&[platform]);
        }
    }

    /// The Prometheus text format (0.0.4).
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding never fails");
        String::from_utf8(buffer).expect("metrics are UTF-8")
    }
}
