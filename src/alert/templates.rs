//! Email templates: built-in defaults (the files in `templates/`), overridable per file
//! from `[email] templates = "DIR"`. `{{name}}` placeholders; values are HTML-escaped in
//! `.html` parts. Checked at start-up: an unknown file or placeholder is a config error.

use std::collections::BTreeMap;
use std::path::Path;

pub use crate::domain::{Audience, EmailKind};

/// Placeholders any template may use.
const SHARED: &[&str] = &[
    "connection_name",
    "connection_id",
    "platform",
    "reconnect_url",
    "since",
    "error_code",
    "request_id",
    "incident_id",
    "reminder_number",
    "resolved_at",
];
/// Placeholders only staff templates may use (internal details).
const STAFF_ONLY: &[&str] = &["last_message", "remote_id", "title", "connections", "count"];

/// Every (kind, audience) that has templates.
pub const TEMPLATES: &[(EmailKind, Audience)] = &[
    (EmailKind::ReauthRequired, Audience::Customer),
    (EmailKind::ReauthRequired, Audience::Staff),
    (EmailKind::Reminder, Audience::Customer),
    (EmailKind::Reminder, Audience::Staff),
    (EmailKind::Resolved, Audience::Customer),
    (EmailKind::Resolved, Audience::Staff),
    (EmailKind::Unreachable, Audience::Staff),
    (EmailKind::StaffDigest, Audience::Staff),
];

const PARTS: [&str; 3] = ["subject", "txt", "html"];

macro_rules! builtin {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../../templates/", $name)))),*]
    };
}

const BUILTIN: &[(&str, &str)] = builtin!(
    "reauth_required.customer.subject",
    "reauth_required.customer.txt",
    "reauth_required.customer.html",
    "reauth_required.staff.subject",
    "reauth_required.staff.txt",
    "reauth_required.staff.html",
    "reminder.customer.subject",
    "reminder.customer.txt",
    "reminder.customer.html",
    "reminder.staff.subject",
    "reminder.staff.txt",
    "reminder.staff.html",
    "resolved.customer.subject",
    "resolved.customer.txt",
    "resolved.customer.html",
    "resolved.staff.subject",
    "resolved.staff.txt",
    "resolved.staff.html",
    "unreachable.staff.subject",
    "unreachable.staff.txt",
    "unreachable.staff.html",
    "staff_digest.staff.subject",
    "staff_digest.staff.txt",
    "staff_digest.staff.html",
);

/// A rendered email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// The loaded templates, by file name.
#[derive(Debug, Clone)]
pub struct Templates {
    files: BTreeMap<String, String>,
}

impl Templates {
    /// The built-in templates with the overrides in `folder` (if any), checked.
    pub fn load(folder: Option<&Path>) -> Result<Templates, String> {
        let mut files: BTreeMap<String, String> = BUILTIN
            .iter()
            .map(|(name, text)| ((*name).to_owned(), (*text).to_owned()))
            .collect();
        if let Some(folder) = folder {
            let entries = std::fs::read_dir(folder).map_err(|error| {
                format!("cannot read template folder {}: {error}", folder.display())
            })?;
            for entry in entries {
                let entry = entry.map_err(|error| error.to_string())?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                if !files.contains_key(&name) {
                    return Err(format!(
                        "{name}: not a template name; expected KIND.AUDIENCE.{{subject,txt,html}} such as reauth_required.customer.txt"
                    ));
                }
                let text = std::fs::read_to_string(entry.path())
                    .map_err(|error| format!("{name}: cannot read: {error}"))?;
                files.insert(name, text);
            }
        }
        for (name, text) in &files {
            let staff = name.contains(".staff.");
            for placeholder in placeholders(text).map_err(|message| format!("{name}: {message}"))? {
                if STAFF_ONLY.contains(&placeholder.as_str()) && !staff {
                    return Err(format!(
                        "{name}: {{{{{placeholder}}}}} is for staff emails only (customer emails never carry internal details)"
                    ));
                }
                if !SHARED.contains(&placeholder.as_str())
                    && !STAFF_ONLY.contains(&placeholder.as_str())
                {
                    return Err(format!(
                        "{name}: unknown placeholder {{{{{placeholder}}}}}; known: {}",
                        SHARED
                            .iter()
                            .chain(STAFF_ONLY)
                            .copied()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
        }
        Ok(Templates { files })
    }

    /// Renders one email; missing values render as `-`.
    pub fn render(
        &self,
        kind: EmailKind,
        audience: Audience,
        values: &BTreeMap<&str, String>,
    ) -> Option<Rendered> {
        let part = |part: &str| {
            self.files
                .get(&format!("{kind}.{}.{part}", audience.as_str()))
        };
        let [subject, text, html] = PARTS.map(part);
        Some(Rendered {
            subject: substitute(subject?, values, false)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
            text: substitute(text?, values, false),
            html: substitute(html?, values, true),
        })
    }
}

fn placeholders(text: &str) -> Result<Vec<String>, String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or("an unclosed {{")?;
        found.push(after[..end].trim().to_owned());
        rest = &after[end + 2..];
    }
    Ok(found)
}

fn substitute(template: &str, values: &BTreeMap<&str, String>, html: bool) -> String {
    let mut output = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        output.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        let name = after[..end].trim();
        // Pre-rendered HTML lists (digests) are escaped when they are built.
        if html && name == "connections" {
            output.push_str(
                values
                    .get("connections_html")
                    .map(String::as_str)
                    .unwrap_or("-"),
            );
        } else if html {
            output.push_str(&escape_html(
                values.get(name).map(String::as_str).unwrap_or("-"),
            ));
        } else {
            output.push_str(values.get(name).map(String::as_str).unwrap_or("-"));
        }
        rest = &after[end + 2..];
    }
    output.push_str(rest);
    output
}

pub fn escape_html(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_templates_are_complete_and_valid() {
        let templates = Templates::load(None).expect("valid");
        let mut values = BTreeMap::new();
        values.insert("connection_name", "ACME <Pest> Control".to_owned());
        for (kind, audience) in TEMPLATES {
            let rendered = templates
                .render(*kind, *audience, &values)
                .expect("every part exists");
            assert!(!rendered.subject.is_empty());
            assert!(
                !rendered.html.contains("<Pest>"),
                "values are escaped in HTML"
            );
        }
        let reauth = templates
            .render(EmailKind::ReauthRequired, Audience::Customer, &values)
            .expect("render");
        assert_eq!(
            reauth.subject,
            "Action needed: reconnect ACME <Pest> Control"
        );
    }

    #[test]
    fn overrides_with_unknown_names_or_placeholders_are_refused() {
        let folder =
            std::env::temp_dir().join(format!("connwatch-templates-{}", std::process::id()));
        std::fs::create_dir_all(&folder).expect("folder");
        std::fs::write(
            folder.join("reauth_required.customer.txt"),
            "Hi {{connection_name}}",
        )
        .expect("write");
        assert!(Templates::load(Some(&folder)).is_ok());
        std::fs::write(
            folder.join("reauth_required.customer.txt"),
            "Hi {{last_message}}",
        )
        .expect("write");
        let error = Templates::load(Some(&folder)).expect_err("internal detail");
        assert!(error.contains("staff emails only"), "{error}");
        std::fs::write(folder.join("reauth_required.customer.txt"), "Hi {{nme}}").expect("write");
        assert!(
            Templates::load(Some(&folder))
                .expect_err("typo")
                .contains("unknown placeholder")
        );
        std::fs::write(folder.join("reauth_required.customer.txt"), "Hi").expect("write");
        std::fs::write(folder.join("welcome.txt"), "Hi").expect("write");
        assert!(
            Templates::load(Some(&folder))
                .expect_err("unknown file")
                .contains("welcome.txt")
        );
        let _ = std::fs::remove_dir_all(folder);
    }
}
