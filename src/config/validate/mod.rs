//! From deserialized sections to a validated `Config`, collecting every problem on the
//! way: one file per section, in the order problems are reported.

mod checker;
mod connections;
mod email;
mod log;
mod platforms;
mod probe;
mod relay;
mod server;
mod store;
mod webhooks;

use serde::de::DeserializeOwned;

use super::raw::{
    RawEmail, RawLog, RawProbe, RawRelay, RawServer, RawStore, RawWebhooks, SECTIONS,
};
use super::toml_lines::key;
use super::{Config, Problem};
use crate::config::entries::ConnectionEntries;
pub(super) use checker::Checker;

/// Deserializes and validates every section, in the order problems are reported.
pub(super) fn assemble(
    mut checker: Checker,
    mut table: toml::Table,
    entries: &mut ConnectionEntries,
) -> Result<Config, Vec<Problem>> {
    unknown_sections(&mut checker, &table);
    let raw_store: RawStore = section_or_default(&mut checker, &mut table, "store");
    let raw_server: RawServer = section_or_default(&mut checker, &mut table, "server");
    let raw_probe: RawProbe = section_or_default(&mut checker, &mut table, "probe");
    let raw_log: RawLog = section_or_default(&mut checker, &mut table, "log");
    let raw_webhooks: RawWebhooks = section_or_default(&mut checker, &mut table, "webhooks");
    let raw_relay: Option<RawRelay> = optional_section(&mut checker, &mut table, "relay");
    let webhooks = webhooks::validate(&mut checker, raw_webhooks);
    let relay = raw_relay.and_then(|raw| relay::validate(&mut checker, raw));
    let raw_email: Option<RawEmail> = optional_section(&mut checker, &mut table, "email");
    let email = raw_email.map(|raw| email::validate(&mut checker, raw));
    let store = store::validate(&mut checker, raw_store);
    let server = server::validate(&mut checker, raw_server);
    let probe = probe::validate(&mut checker, raw_probe);
    let log = log::validate(&mut checker, raw_log);
    let platforms = platforms::validate(&mut checker, table.remove("platforms"), probe.concurrency);
    let connections = connections::validate(&mut checker, entries, &platforms, &webhooks);
    if checker.problems.is_empty() {
        Ok(Config {
            store,
            server,
            probe,
            platforms,
            connections,
            log,
            webhooks,
            relay,
            email,
        })
    } else {
        Err(checker.problems)
    }
}

fn unknown_sections(checker: &mut Checker, table: &toml::Table) {
    for name in table.keys() {
        if !SECTIONS.contains(&name.as_str()) {
            checker.problem(
                &[key(name)],
                format!("unknown section; known: {}", SECTIONS.join(", ")),
            );
        }
    }
}

/// Section `name`, taken out of `table`; its defaults when absent or malformed.
fn section_or_default<T: DeserializeOwned + Default>(
    checker: &mut Checker,
    table: &mut toml::Table,
    name: &str,
) -> T {
    optional_section(checker, table, name).unwrap_or_default()
}

/// Section `name`, taken out of `table`; `None` when absent or malformed.
fn optional_section<T: DeserializeOwned>(
    checker: &mut Checker,
    table: &mut toml::Table,
    name: &str,
) -> Option<T> {
    let value = table.remove(name)?;
    checker.section(value, &[key(name)])
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::PLATFORM;
    use crate::config::parse::parse;

    #[test]
    fn a_minimal_config_is_valid_with_defaults() {
        let config = parse(PLATFORM).expect("valid");
        assert_eq!(config.probe.interval, Duration::from_secs(300));
        assert_eq!(config.probe.failure_threshold, 2);
        assert_eq!(config.platforms["makini"].auth_scheme, "Bearer");
    }

    #[test]
    fn every_problem_is_reported_with_its_key_and_line() {
        let text = format!(
            r#"
[probe]
interval = "soon"
timeout = "often"
colour = "blue"
{PLATFORM}
[[connections]]
id = "acme"
platform = "nango"
token = {{ env = "CONNWATCH_TEST_SURELY_UNSET" }}
contacts = ["not-an-email"]

[[connections]]
id = "acme"
platform = "makini"
token = "literal-secret"
"#
        );
        let problems = parse(&text).expect_err("invalid");
        let rendered: Vec<String> = problems.iter().map(ToString::to_string).collect();
        let has = |needle: &str| rendered.iter().any(|line| line.contains(needle));
        assert!(has("probe.interval (line 3)"), "{rendered:#?}");
        assert!(has("probe.timeout (line 4)"), "{rendered:#?}");
        assert!(has("probe.colour (line 5): unknown key"), "{rendered:#?}");
        assert!(has("connections[0].platform"), "{rendered:#?}");
        assert!(has("connections[0].contacts[0]"), "{rendered:#?}");
        assert!(has("CONNWATCH_TEST_SURELY_UNSET"), "{rendered:#?}");
        assert!(has("connections[1].token"), "{rendered:#?}");
        assert!(has("literal secret"), "{rendered:#?}");
        assert!(!has("literal-secret"), "the literal value is never echoed");
    }
}
