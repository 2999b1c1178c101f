//! `[email]`: the SMTP server, sender, staff, reminders, template overrides and storms.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::raw::RawEmail;
use crate::config::templates::read_files;
use crate::config::toml_lines::{Segment, key};
use crate::config::{EmailConfig, SmtpSecurity};
use crate::domain::EmailAddress;

use super::Checker;

/// Validates `[email]`; every value is checked even after a problem.
pub(super) fn validate(checker: &mut Checker, raw: RawEmail) -> EmailConfig {
    let path = |name: &str| [key("email"), key(name)];
    let (host, port, security) = smtp_server(checker, &raw.smtp_url);
    if raw.from.parse::<lettre::message::Mailbox>().is_err() {
        checker.problem(
            &path("from"),
            format!("{:?} is not like \"Name <address@example.com>\"", raw.from),
        );
    }
    let staff = staff(checker, &raw.staff);
    if let Some(password) = &raw.password {
        checker.secret_readable(&path("password"), password);
        if raw.username.is_none() {
            checker.problem(&path("username"), "required when a password is set");
        }
    }
    let reminders = reminders(checker, raw.reminders);
    let templates = raw.templates.map(PathBuf::from);
    if let Some(folder) = &templates {
        check_templates(checker, folder);
    }
    let ca_file = raw.ca_file.map(PathBuf::from);
    if let Some(file) = &ca_file {
        check_ca_file(checker, file);
    }
    let timeout = checker.duration(&path("timeout"), raw.timeout.as_deref(), "30s");
    let hold = checker.duration(&path("hold"), raw.hold.as_deref(), "60s");
    let storm_window = checker.duration(&path("storm_window"), raw.storm_window.as_deref(), "10m");
    let storm_min_connections = checker.positive(
        &path("storm_min_connections"),
        raw.storm_min_connections,
        10,
    );
    let storm_share = raw.storm_share.unwrap_or(0.5);
    if !(storm_share > 0.0 && storm_share <= 1.0) {
        checker.problem(&path("storm_share"), "a share between 0 (excluded) and 1");
    }
    let daily_digest = raw
        .daily_digest
        .and_then(|text| daily_digest(checker, &text));
    EmailConfig {
        host,
        port,
        security,
        username: raw.username,
        password: raw.password,
        from: raw.from,
        staff,
        reminders,
        send_resolved: raw.send_resolved.unwrap_or(true),
        templates,
        timeout,
        ca_file,
        hold,
        storm_window,
        storm_min_connections,
        storm_share,
        daily_digest,
    }
}

/// Host, port and security from `smtp_url`.
fn smtp_server(checker: &mut Checker, smtp_url: &str) -> (String, u16, SmtpSecurity) {
    match reqwest::Url::parse(smtp_url) {
        Ok(url) if matches!(url.scheme(), "smtp" | "smtps") && url.host_str().is_some() => {
            let security = smtp_security(checker, &url);
            let default_port = if security == SmtpSecurity::Implicit {
                465
            } else {
                25
            };
            let host = url
                .host_str()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_owned();
            (host, url.port().unwrap_or(default_port), security)
        }
        _ => {
            checker.problem(
                &[key("email"), key("smtp_url")],
                // Not echoed: a URL may carry user:password.
                "is not like smtp://host:port or smtps://host:port",
            );
            (String::new(), 25, SmtpSecurity::StartTlsRequired)
        }
    }
}

/// The scheme and its `tls=` query parameter.
fn smtp_security(checker: &mut Checker, url: &reqwest::Url) -> SmtpSecurity {
    let tls = url
        .query_pairs()
        .find(|(name, _)| name == "tls")
        .map(|(_, value)| value.into_owned());
    match (url.scheme(), tls.as_deref()) {
        ("smtps", None) => SmtpSecurity::Implicit,
        ("smtp", None | Some("opportunistic")) => SmtpSecurity::StartTlsOpportunistic,
        ("smtp", Some("required")) => SmtpSecurity::StartTlsRequired,
        ("smtp", Some("none")) => SmtpSecurity::None,
        (_, Some(other)) => {
            checker.problem(
                &[key("email"), key("smtp_url")],
                format!("tls={other:?}: use required, opportunistic or none (smtp:// only)"),
            );
            SmtpSecurity::StartTlsRequired
        }
        _ => SmtpSecurity::StartTlsRequired,
    }
}

fn staff(checker: &mut Checker, addresses: &[String]) -> Vec<EmailAddress> {
    let mut staff = Vec::new();
    for (index, address) in addresses.iter().enumerate() {
        match EmailAddress::parse(address) {
            Ok(address) => staff.push(address),
            Err(message) => checker.problem(
                &[key("email"), key("staff"), Segment::Index(index)],
                message,
            ),
        }
    }
    staff
}

/// The reminder delays; 24 h and 72 h when unset.
fn reminders(checker: &mut Checker, texts: Option<Vec<String>>) -> Vec<Duration> {
    let reminder_texts = texts.unwrap_or_else(|| vec!["24h".into(), "72h".into()]);
    let mut reminders = Vec::new();
    for (index, text) in reminder_texts.iter().enumerate() {
        reminders.push(checker.duration(
            &[key("email"), key("reminders"), Segment::Index(index)],
            Some(text),
            "24h",
        ));
    }
    reminders
}

/// The override folder is read now, so a bad template fails start-up, not an alert.
fn check_templates(checker: &mut Checker, folder: &Path) {
    if let Err(message) = read_files(Some(folder)) {
        checker.problem(&[key("email"), key("templates")], message);
    }
}

fn check_ca_file(checker: &mut Checker, file: &Path) {
    let path = [key("email"), key("ca_file")];
    match std::fs::read(file) {
        Ok(pem) if pem.windows(11).any(|window| window == b"CERTIFICATE") => {}
        Ok(_) => checker.problem(&path, "no PEM certificate in the file"),
        Err(error) => checker.problem(&path, format!("cannot read {}: {error}", file.display())),
    }
}

/// `HH:MM`, local time.
fn daily_digest(checker: &mut Checker, text: &str) -> Option<(u32, u32)> {
    let parsed = text.split_once(':').and_then(|(hours, minutes)| {
        let hours: u32 = hours.parse().ok()?;
        let minutes: u32 = minutes.parse().ok()?;
        (hours < 24 && minutes < 60).then_some((hours, minutes))
    });
    if parsed.is_none() {
        checker.problem(
            &[key("email"), key("daily_digest")],
            format!("{text:?} is not a local time like \"08:30\""),
        );
    }
    parsed
}
