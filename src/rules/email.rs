//! Which emails a decision sends, to whom and when: the reauthorization email and its
//! reminders, the staff notice of an outage, the resolved notice, staff digests.

use super::IncidentPlan;
use crate::config::EmailConfig;
use crate::domain::time::millis;
use crate::domain::{Audience, EmailKind, Health, Millis, Transition};

/// What email planning follows (from `[email]`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MailPolicy {
    pub staff: Vec<String>,
    /// Delays after the incident opened.
    pub reminders: Vec<Millis>,
    pub send_resolved: bool,
    /// Per-connection emails become due this long after the transition, so a platform
    /// storm is recognised before customers are told.
    pub hold: Millis,
    /// Domain of the From address, for Message-IDs.
    pub domain: String,
}

/// Who an outbox email goes to; the store expands it to addresses when it writes the rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipients {
    /// The connection's customer contacts (audience customer).
    Contacts,
    /// These staff addresses (audience staff).
    Staff(Vec<String>),
    /// Whoever was sent the incident's opening email, each in the audience they had.
    ToldOfOpening,
}

/// One email to put in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEmail {
    pub kind: EmailKind,
    pub to: Recipients,
    /// 0 for the first email of its kind; reminders count from 1.
    pub sequence: u32,
    pub due_at: Millis,
    /// Digests: what they are about (rendered into the template).
    pub payload: Option<String>,
    /// Domain of the Message-ID.
    pub message_domain: String,
}

impl MailPolicy {
    /// The policy `[email]` describes.
    pub fn from_config(email: &EmailConfig) -> MailPolicy {
        MailPolicy {
            staff: email
                .staff
                .iter()
                .map(|address| address.as_str().to_owned())
                .collect(),
            reminders: email.reminders.iter().map(|delay| millis(*delay)).collect(),
            send_resolved: email.send_resolved,
            hold: millis(email.hold),
            domain: from_domain(&email.from),
        }
    }

    fn email(&self, kind: EmailKind, to: Recipients, sequence: u32, due_at: Millis) -> OutboxEmail {
        OutboxEmail {
            kind,
            to,
            sequence,
            due_at,
            payload: None,
            message_domain: self.domain.clone(),
        }
    }
}

impl Recipients {
    /// The audience of these recipients (`ToldOfOpening`: each keeps the one they had).
    pub fn audience(&self) -> Option<Audience> {
        match self {
            Recipients::Contacts => Some(Audience::Customer),
            Recipients::Staff(_) => Some(Audience::Staff),
            Recipients::ToldOfOpening => None,
        }
    }
}

/// The domain of a From address (`Name <user@domain>`), for Message-IDs.
pub fn from_domain(from: &str) -> String {
    from.parse::<lettre::message::Mailbox>()
        .map(|mailbox| mailbox.email.domain().to_owned())
        .unwrap_or_else(|_| "connwatch.invalid".to_owned())
}

/// Adds the emails of a transition to the incidents it closes and opens. Closing cancels
/// the incident's unsent emails (so a flap shorter than `hold` sends nothing) and tells
/// those who heard it began that it is over, when the connection is healthy again.
pub fn plan(incident: &mut IncidentPlan, transition: &Transition, policy: &MailPolicy) {
    if let Some(closing) = &mut incident.close
        && policy.send_resolved
        && transition.to == Health::Healthy
    {
        closing.push(resolved(policy, transition.at));
    }
    if let Some(opening) = &mut incident.open {
        opening.extend(opening_emails(transition, policy));
    }
}

/// The emails an incident opens with: reauthorization (customer and staff, then
/// reminders) or an outage notice (staff only: an outage is not the customer's to fix).
pub fn opening_emails(transition: &Transition, policy: &MailPolicy) -> Vec<OutboxEmail> {
    let due = transition.at + policy.hold;
    let staff = || Recipients::Staff(policy.staff.clone());
    match transition.to {
        Health::NeedsReauth => {
            let mut emails = vec![
                policy.email(EmailKind::ReauthRequired, Recipients::Contacts, 0, due),
                policy.email(EmailKind::ReauthRequired, staff(), 0, due),
            ];
            for (index, delay) in policy.reminders.iter().enumerate() {
                let sequence = u32::try_from(index + 1).unwrap_or(u32::MAX);
                let due = transition.at + delay;
                emails.push(policy.email(EmailKind::Reminder, Recipients::Contacts, sequence, due));
                emails.push(policy.email(EmailKind::Reminder, staff(), sequence, due));
            }
            emails
        }
        Health::Unreachable => vec![policy.email(EmailKind::Unreachable, staff(), 0, due)],
        Health::Unknown | Health::Healthy | Health::Degraded | Health::Paused => Vec::new(),
    }
}

/// The resolved notice, to whoever was told the incident began.
pub fn resolved(policy: &MailPolicy, now: Millis) -> OutboxEmail {
    policy.email(EmailKind::Resolved, Recipients::ToldOfOpening, 0, now)
}

/// After an opening email is sent: if its incident was resolved meanwhile (the resolved
/// notice found nobody told yet), this notice follows it.
pub fn resolved_after_late_opening(policy: &MailPolicy, now: Millis) -> Option<OutboxEmail> {
    policy.send_resolved.then(|| resolved(policy, now))
}

/// One staff digest (storm or daily) carrying `payload`.
pub fn staff_digest(policy: &MailPolicy, payload: String, due_at: Millis) -> OutboxEmail {
    OutboxEmail {
        payload: Some(payload),
        ..policy.email(
            EmailKind::StaffDigest,
            Recipients::Staff(policy.staff.clone()),
            0,
            due_at,
        )
    }
}
