//! `[server]`: the admin and webhook listeners.

use std::net::SocketAddr;

use crate::config::ServerConfig;
use crate::config::raw::RawServer;
use crate::config::toml_lines::key;

use super::Checker;

/// Validates `[server]`; every value is checked even after a problem.
pub(super) fn validate(checker: &mut Checker, raw: RawServer) -> ServerConfig {
    let admin_text = raw.admin.unwrap_or_else(|| "127.0.0.1:9464".to_owned());
    let admin = match admin_text.parse::<SocketAddr>() {
        Ok(address) => address,
        Err(_) => {
            checker.problem(
                &[key("server"), key("admin")],
                format!("{admin_text:?} is not an address like \"127.0.0.1:9464\""),
            );
            SocketAddr::from(([127, 0, 0, 1], 9464))
        }
    };
    match &raw.admin_token {
        Some(token) => checker.secret_readable(&[key("server"), key("admin_token")], token),
        None if !admin.ip().is_loopback() => checker.problem(
            &[key("server"), key("admin_token")],
            "required when the admin listener is not bound to loopback",
        ),
        None => {}
    }
    let webhooks = raw
        .webhooks
        .and_then(|text| match text.parse::<SocketAddr>() {
            Ok(address) => Some(address),
            Err(_) => {
                checker.problem(
                    &[key("server"), key("webhooks")],
                    format!("{text:?} is not an address like \"0.0.0.0:8080\""),
                );
                None
            }
        });
    if let Some(webhooks) = webhooks
        && webhooks.port() == admin.port()
        && webhooks.port() != 0
        && (webhooks.ip() == admin.ip()
            || webhooks.ip().is_unspecified()
            || admin.ip().is_unspecified())
    {
        checker.problem(
            &[key("server"), key("webhooks")],
            format!("{webhooks} is where the admin listener is ({admin}): give each its own port"),
        );
    }
    let webhook_max_bytes = checker.positive(
        &[key("server"), key("webhook_max_bytes")],
        raw.webhook_max_bytes,
        256 * 1024,
    ) as usize;
    ServerConfig {
        admin,
        admin_token: raw.admin_token,
        webhooks,
        webhook_max_bytes,
        per_connection_metrics: raw.per_connection_metrics,
        admin_hosts: admin_hosts(checker, raw.admin_hosts),
    }
}

/// `[server] admin_hosts`: host names (no scheme, port or path) the admin listener also
/// answers to, e.g. the name a reverse proxy forwards.
fn admin_hosts(checker: &mut Checker, raw: Option<Vec<String>>) -> Option<Vec<String>> {
    let hosts = raw?;
    for (index, host) in hosts.iter().enumerate() {
        let valid = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
        if !valid {
            checker.problem(
                &[
                    key("server"),
                    key("admin_hosts"),
                    crate::config::toml_lines::Segment::Index(index),
                ],
                format!("{host:?} is not a host name (no scheme, port or path)"),
            );
        }
    }
    Some(hosts)
}

#[cfg(test)]
mod tests {
    use crate::config::PLATFORM;
    use crate::config::parse::parse;

    fn server_problem(server: &str) -> Option<String> {
        let text = format!("{PLATFORM}\n[server]\n{server}\n");
        parse(&text)
            .err()
            .unwrap_or_default()
            .into_iter()
            .find(|problem| problem.key == "server.webhooks")
            .map(|problem| problem.message)
    }

    #[test]
    fn admin_hosts_are_names_not_urls() {
        let text = format!(
            "{PLATFORM}\n[server]\nadmin_hosts = [\"connwatch.internal\", \"http://evil/\"]\n"
        );
        let problems = parse(&text).expect_err("invalid");
        assert!(
            problems
                .iter()
                .any(|problem| problem.key.starts_with("server.admin_hosts")),
            "{problems:?}"
        );
    }

    #[test]
    fn both_listeners_on_one_port_are_refused() {
        assert!(
            server_problem("admin = \"127.0.0.1:9464\"\nwebhooks = \"0.0.0.0:9464\"").is_some()
        );
        assert!(
            server_problem("admin = \"127.0.0.1:9464\"\nwebhooks = \"127.0.0.1:9464\"").is_some()
        );
        assert!(
            server_problem("admin = \"127.0.0.1:9464\"\nwebhooks = \"0.0.0.0:8080\"").is_none()
        );
    }
}
