//! The event bus: what the daemon tells its watchers (the demo, tests) as it happens.

use crate::domain::{ConnectionId, ProbeReport, Transition};

/// Something worth telling a watcher of the daemon (the demo, tests).
#[derive(Debug, Clone)]
pub enum Event {
    /// A probe was stored.
    Probed {
        id: ConnectionId,
        report: ProbeReport,
    },
    /// A connection changed health.
    Transition {
        id: ConnectionId,
        name: String,
        transition: Transition,
    },
    /// A webhook said the connection needs reauthorization.
    WebhookReauth { id: ConnectionId },
    /// A poll found changes no webhook delivered.
    Recovered { id: ConnectionId, changes: usize },
}
