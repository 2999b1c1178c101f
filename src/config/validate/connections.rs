//! `[[connections]]`: each customer connection, its platform, token and contacts; ids unique.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::config::entries::ConnectionEntries;
use crate::config::raw::RawConnection;
use crate::config::toml_lines::{Segment, key};
use crate::config::{ConnectionConfig, PlatformConfig, WebhooksConfig};
use crate::domain::{ConnectionId, EmailAddress};

use super::Checker;
use super::checker::child;

/// Validates every connection in file order; one with a problem, or a repeated id, is
/// left out.
pub(super) fn validate(
    checker: &mut Checker,
    entries: &mut ConnectionEntries,
    platforms: &BTreeMap<String, PlatformConfig>,
    webhooks: &WebhooksConfig,
) -> Vec<Arc<ConnectionConfig>> {
    // Sized once: with 100,000 connections, growing by doubling would briefly hold
    // the list twice.
    let mut connections = Vec::with_capacity(entries.remaining());
    let mut seen = BTreeSet::new();
    if matches!(entries, ConnectionEntries::NotAnArray) {
        checker.problem(&[key("connections")], "must be an array of [[connections]]");
    }
    for (index, value) in entries.enumerate() {
        let path = [key("connections"), Segment::Index(index)];
        let Some(raw) = checker.section::<RawConnection>(value, &path) else {
            continue;
        };
        let Some(connection) = connection(checker, &path, raw, platforms, webhooks) else {
            continue;
        };
        if !seen.insert(connection.id.clone()) {
            checker.problem(
                &[path[0].clone(), path[1].clone(), key("id")],
                format!("duplicate connection id {:?}", connection.id.as_str()),
            );
            continue;
        }
        connections.push(Arc::new(connection));
    }
    connections
}

fn connection(
    checker: &mut Checker,
    path: &[Segment],
    raw: RawConnection,
    platforms: &BTreeMap<String, PlatformConfig>,
    webhooks: &WebhooksConfig,
) -> Option<ConnectionConfig> {
    let at = |leaf: &str| child(path, leaf);
    let before = checker.problems.len();
    let id = match ConnectionId::parse(&raw.id) {
        Ok(id) => Some(id),
        Err(message) => {
            checker.problem(&at("id"), message);
            None
        }
    };
    // A platform whose own section has problems is defined all the same: a second line
    // saying "unknown platform" would send the reader to the wrong place.
    let broken_platform = format!("platforms.{}", raw.platform);
    let reported = checker.problems.iter().any(|problem| {
        problem.key == broken_platform || problem.key.starts_with(&format!("{broken_platform}."))
    });
    if !platforms.contains_key(&raw.platform) && !reported {
        unknown_platform(checker, &at("platform"), &raw.platform, platforms);
    }
    let contacts = contacts(checker, &at("contacts"), &raw.contacts);
    if let Some(url) = &raw.reconnect_url {
        // The link goes into the customer's email: only a web page will do there
        // (`javascript:` or `data:` would run in their mail client's browser).
        match reqwest::Url::parse(url) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
            Ok(_) => checker.problem(
                &at("reconnect_url"),
                format!("{url:?} must be an http:// or https:// link"),
            ),
            Err(_) => checker.problem(&at("reconnect_url"), format!("{url:?} is not a URL")),
        }
    }
    checker.secret_readable(&at("token"), &raw.token);
    let expected_webhook_interval = expected_webhook_interval(
        checker,
        &at("expected_webhook_interval"),
        &raw,
        platforms,
        webhooks,
    );
    let id = id?;
    (checker.problems.len() == before).then(|| ConnectionConfig {
        name: raw.name.unwrap_or_else(|| id.to_string()),
        id,
        platform: raw.platform,
        remote_id: raw.remote_id,
        token: raw.token,
        contacts,
        reconnect_url: raw.reconnect_url,
        paused: raw.paused,
        expected_webhook_interval,
    })
}

/// Names the platforms that are defined, so a typo is easy to see.
fn unknown_platform(
    checker: &mut Checker,
    path: &[Segment],
    platform: &str,
    platforms: &BTreeMap<String, PlatformConfig>,
) {
    let known: Vec<&str> = platforms.keys().map(String::as_str).collect();
    checker.problem(
        path,
        format!(
            "unknown platform {:?}; defined: {}",
            platform,
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ),
    );
}

fn contacts(checker: &mut Checker, path: &[Segment], raw: &[String]) -> Vec<EmailAddress> {
    let mut contacts = Vec::new();
    for (index, contact) in raw.iter().enumerate() {
        let mut contact_path = path.to_vec();
        contact_path.push(Segment::Index(index));
        match EmailAddress::parse(contact) {
            Ok(address) => contacts.push(address),
            Err(message) => checker.problem(&contact_path, message),
        }
    }
    contacts
}

/// The connection's own interval, else `[webhooks]`'s; none when its platform sends no
/// webhooks (and then setting one is a problem).
fn expected_webhook_interval(
    checker: &mut Checker,
    path: &[Segment],
    raw: &RawConnection,
    platforms: &BTreeMap<String, PlatformConfig>,
    webhooks: &WebhooksConfig,
) -> Option<Duration> {
    let platform_has_webhooks = platforms
        .get(&raw.platform)
        .is_some_and(|platform| platform.webhooks.is_some());
    match (&raw.expected_webhook_interval, platform_has_webhooks) {
        (Some(text), true) => Some(checker.duration(path, Some(text), "1h")),
        (None, true) => Some(webhooks.expected_interval),
        (Some(_), false) => {
            checker.problem(
                path,
                format!(
                    "platform {:?} has no [platforms.{}.webhooks] section",
                    raw.platform, raw.platform
                ),
            );
            None
        }
        (None, false) => None,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::PLATFORM;
    use crate::config::parse::parse;

    #[test]
    fn a_reconnect_link_that_is_not_a_web_page_is_refused() {
        for (link, accepted) in [
            ("https://app.example.com/reconnect", true),
            ("javascript:alert(document.cookie)", false),
            ("data:text/html,hi", false),
        ] {
            let text = format!(
                "{PLATFORM}\n[[connections]]\nid = \"a\"\nplatform = \"makini\"\n\
                 token = {{ file = \"/etc/hostname\" }}\nreconnect_url = \"{link}\"\n"
            );
            let refused = parse(&text)
                .err()
                .unwrap_or_default()
                .iter()
                .any(|problem| problem.key == "connections[0].reconnect_url");
            assert_eq!(refused, !accepted, "{link}");
        }
    }

    #[test]
    fn a_broken_platform_is_reported_once_not_again_as_unknown() {
        let text = "[platforms.makini]\nbase_url = \"not a url\"\nprobe = { path = \"/v1\" }\n\
                    [[connections]]\nid = \"a\"\nplatform = \"makini\"\n\
                    token = { file = \"/etc/hostname\" }\n";
        let problems = parse(text).expect_err("invalid");
        let keys: Vec<&str> = problems
            .iter()
            .map(|problem| problem.key.as_str())
            .collect();
        assert!(
            keys.iter().any(|key| key.starts_with("platforms.makini")),
            "{keys:?}"
        );
        assert!(!keys.contains(&"connections[0].platform"), "{problems:?}");
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let text = format!(
            "{PLATFORM}\n[[connections]]\nid = \"a\"\nplatform = \"makini\"\ntoken = {{ file = \"/etc/hostname\" }}\n\
             [[connections]]\nid = \"a\"\nplatform = \"makini\"\ntoken = {{ file = \"/etc/hostname\" }}\n"
        );
        let problems = parse(&text).expect_err("invalid");
        assert!(
            problems
                .iter()
                .any(|problem| problem.key == "connections[1].id"
                    && problem.message.contains("duplicate"))
        );
    }
}
