//! Every judgement of connwatch, pure: (state, event, policy, now) -> decisions. Health
//! (`health`), incidents and the emails they send (`email`), platform storms (`storm`),
//! which change times may move a watermark (`changes`).
//! No I/O: the store persists what is decided here, in one transaction, and decides
//! nothing itself. The table tests in `tests.rs` are the readable specification.

pub mod changes;
pub mod email;
pub mod health;
#[cfg(test)]
mod properties;
pub mod storm;
#[cfg(test)]
mod tests;

use std::sync::{Arc, RwLock};

pub use email::{MailPolicy, OutboxEmail, Recipients};
pub use health::{ConnectionState, Policy, Verdict, classify};
pub use storm::{PlatformIncidents, StormDecision, StormPolicy};

use crate::config::Config;
use crate::domain::time::millis;
use crate::domain::{Cause, Millis, ProbeReport, Transition};

/// The policies every judgement follows, from the config.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub probe: Policy,
    /// `None` without `[email]`: no emails are planned.
    pub mail: Option<MailPolicy>,
    pub storm: Option<StormPolicy>,
}

/// Something that happened to one connection.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A probe answered (or failed); `regular_due` is the connection's next slot.
    Probe {
        report: &'a ProbeReport,
        regular_due: Millis,
    },
    /// The platform said by webhook that the connection needs reauthorization.
    WebhookReauth,
    /// The platform said by webhook that the customer reconnected.
    WebhookReconnected,
    /// A webhook arrived for a quiet connection.
    WebhooksResumed,
    /// No webhook within the expected interval + grace.
    WentQuiet,
    /// The pause switch (operator or config) changed to `paused`.
    PauseChanged { paused: bool },
}

/// What a transition does to the connection's incidents, and the emails that go with it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct IncidentPlan {
    /// Close the open incident: its unsent emails are cancelled, then these enqueued.
    pub close: Option<Vec<OutboxEmail>>,
    /// Open an incident (of the transition's new health) with these emails.
    pub open: Option<Vec<OutboxEmail>>,
}

/// The rules in force, shared by every part that judges; a reload replaces them.
#[derive(Debug, Clone)]
pub struct SharedRules(Arc<RwLock<Arc<Rules>>>);

impl Rules {
    /// The rules the config describes.
    pub fn from_config(config: &Config) -> Rules {
        let probe = &config.probe;
        Rules {
            probe: Policy {
                failure_threshold: probe.failure_threshold,
                unreachable_threshold: probe.unreachable_threshold,
                confirm_after: millis(probe.confirm_after),
                reauth_backoff: millis(probe.reauth_backoff),
            },
            mail: config.email.as_ref().map(MailPolicy::from_config),
            storm: config.email.as_ref().map(StormPolicy::from_config),
        }
    }

    /// Judges one event for a connection in `state`: health, incidents, emails.
    pub fn judge(&self, state: &ConnectionState, event: Event<'_>, now: Millis) -> Verdict {
        let mut verdict = match event {
            Event::Probe {
                report,
                regular_due,
            } => classify(state, report, &self.probe, now, regular_due),
            Event::WebhookReauth => health::reauth_by_webhook(state, now),
            Event::WebhookReconnected => health::reconnected_by_webhook(state, now),
            Event::WebhooksResumed => health::quiet_changed(state, Cause::WebhooksResumed, now),
            Event::WentQuiet => health::quiet_changed(state, Cause::Quiet, now),
            Event::PauseChanged { paused } => health::pause_changed(state, paused, now),
        };
        if let (Some(mail), Some(transition)) = (&self.mail, &verdict.transition) {
            email::plan(&mut verdict.incident, transition, mail);
        }
        verdict
    }

    /// Storms begun and ended, from each platform's incident counts.
    pub fn storms(&self, platforms: &[PlatformIncidents], now: Millis) -> Vec<StormDecision> {
        match &self.storm {
            Some(policy) => storm::decide(platforms, policy, self.mail.as_ref(), now),
            None => Vec::new(),
        }
    }

    /// The daily staff digest of open incidents on `date`.
    pub fn daily_digest(&self, date: &str, now: Millis) -> Option<OutboxEmail> {
        let payload = serde_json::json!({ "title": format!("Open incidents on {date}") });
        let mail = self.mail.as_ref()?;
        Some(email::staff_digest(mail, payload.to_string(), now))
    }

    /// What follows an opening email whose incident was resolved while it was sent.
    pub fn after_opening_sent(&self, now: Millis) -> Option<OutboxEmail> {
        email::resolved_after_late_opening(self.mail.as_ref()?, now)
    }
}

impl IncidentPlan {
    /// The incidents a transition closes and opens (emails not yet planned): leaving
    /// `needs_reauth` or `unreachable` closes one, entering either opens one.
    pub fn of(transition: &Transition) -> IncidentPlan {
        let changed = transition.from != transition.to;
        IncidentPlan {
            close: (changed && transition.from.is_incident()).then(Vec::new),
            open: (changed && transition.to.is_incident()).then(Vec::new),
        }
    }
}

impl SharedRules {
    pub fn new(rules: Rules) -> SharedRules {
        SharedRules(Arc::new(RwLock::new(Arc::new(rules))))
    }

    /// The rules in force now.
    pub fn current(&self) -> Arc<Rules> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Puts new rules in force (reload).
    pub fn replace(&self, rules: Rules) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(rules);
    }
}
