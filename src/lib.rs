//! connwatch: watches customer connections on unified integration platforms.
//!
//! Modules in reading order (ARCHITECTURE.md has the map): the vocabulary, time, the
//! config, the pure judgement, the store, the parts that do I/O, and the assembly. Each
//! line is its own group so that rustfmt keeps this order.

/// Ids, outcomes, health, transitions, email kinds, time helpers. No I/O.
pub mod domain;

/// The only reader of "now".
pub mod clock;

/// The config: parsed, validated, every problem with its key.
pub mod config;

/// Every judgement, pure: health, incidents, emails, storms.
pub mod rules;

/// The only place with SQL; persists what the rules decided.
pub mod store;

/// Every metric name and help text.
pub mod metrics;

/// The HTTP side of a probe.
pub mod probe;

/// Who is due; probes them; batches the results into the store.
pub mod schedule;

/// Serving a listener with connection limits and timeouts.
pub mod listen;

/// The webhook listener: verify, parse, store, answer.
pub mod webhook;

/// Quiet connections polled for the changes no webhook delivered.
pub mod poll;

/// Recovered changes handed on, signed.
pub mod relay;

/// Emails from the outbox: templates, SMTP, the dispatcher.
pub mod alert;

/// The admin listener: API, health checks, metrics.
pub mod server;

/// Wall-clock jobs (pruning, daily digest).
pub mod jobs;

/// Which replica runs the once-only work.
pub mod leader;

/// Assembles the daemon; runs until cancelled.
pub mod app;

/// `connwatch run` under systemd: signals and notifications.
pub mod service;

/// The one-shot commands: check-config, migrate, status, probe, send-test-email.
pub mod commands;

/// `connwatch demo`: a self-contained tour.
pub mod demo;
