//! Storms: many connections of one platform failing at once is the platform, not the
//! customers. Staff get one digest; per-connection emails of that platform wait.

use serde_json::json;

use super::email::{MailPolicy, OutboxEmail, staff_digest};
use crate::config::EmailConfig;
use crate::domain::time::millis;
use crate::domain::{EmailKind, Millis};

/// The share rule needs at least this many failing connections: a platform with three
/// customers, two of them broken, still tells those two customers.
pub const STORM_SHARE_FLOOR: i64 = 5;

/// When a storm begins (from `[email]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StormPolicy {
    /// Incidents opened within this window count towards a new storm.
    pub window: Millis,
    /// This many recent incidents on one platform are a storm...
    pub min_connections: i64,
    /// ...or this share of its connections (and `STORM_SHARE_FLOOR` or more).
    pub share: f64,
}

/// What the store knows about one platform's incidents.
#[derive(Debug, Clone, PartialEq)]
pub struct PlatformIncidents {
    pub platform: String,
    /// Open incidents.
    pub open: i64,
    /// Incidents opened within the window.
    pub recent: i64,
    /// Active connections of the platform.
    pub connections: i64,
    /// A storm of this platform is in progress.
    pub storming: bool,
}

/// A storm that begins or ends.
#[derive(Debug, Clone, PartialEq)]
pub enum StormDecision {
    /// A storm begins: staff get this digest (one per recipient, once per storm).
    Begin {
        platform: String,
        connections: i64,
        digest: Option<OutboxEmail>,
    },
    /// The storm is over: the held emails of connections still broken go out.
    End { platform: String },
}

impl StormPolicy {
    pub fn from_config(email: &EmailConfig) -> StormPolicy {
        StormPolicy {
            window: millis(email.storm_window),
            min_connections: i64::from(email.storm_min_connections),
            share: email.storm_share,
        }
    }

    fn storming(&self, count: i64, connections: i64) -> bool {
        count >= self.min_connections
            || (count >= STORM_SHARE_FLOOR
                && connections > 0
                && count as f64 / connections as f64 >= self.share)
    }
}

/// Starts and ends storms. One begins when enough connections of a platform opened an
/// incident within the window; it ends when the platform's open incidents fall below both
/// thresholds.
pub fn decide(
    platforms: &[PlatformIncidents],
    policy: &StormPolicy,
    mail: Option<&MailPolicy>,
    now: Millis,
) -> Vec<StormDecision> {
    platforms
        .iter()
        .filter_map(|platform| {
            match (
                platform.storming,
                policy.storming(platform.recent, platform.connections),
                policy.storming(platform.open, platform.connections),
            ) {
                (false, true, _) => Some(StormDecision::Begin {
                    platform: platform.platform.clone(),
                    connections: platform.open,
                    digest: mail.map(|mail| storm_digest(mail, &platform.platform, now)),
                }),
                (true, _, false) => Some(StormDecision::End {
                    platform: platform.platform.clone(),
                }),
                (false, false, _) | (true, _, true) => None,
            }
        })
        .collect()
}

/// Whether emails of this kind wait while their platform storms.
pub fn held_in_storm(kind: EmailKind) -> bool {
    match kind {
        EmailKind::ReauthRequired | EmailKind::Reminder | EmailKind::Unreachable => true,
        EmailKind::Resolved | EmailKind::StaffDigest => false,
    }
}

/// The storm's staff digest. Its list of connections is read when it is sent (after the
/// hold), so it names every connection caught in the storm by then.
fn storm_digest(mail: &MailPolicy, platform: &str, now: Millis) -> OutboxEmail {
    let payload = json!({
        "title": format!(
            "Platform {platform}: many connections failing at once (customer emails held)"
        ),
        "platform": platform,
    })
    .to_string();
    staff_digest(mail, payload, now + mail.hold)
}
