//! Email template files: the built-in set and an override folder, read and checked.
//!
//! Here, below `alert`, because `[email] templates = "DIR"` is checked with the rest of the
//! config at start-up; `alert::templates` renders what this reads.

use std::collections::BTreeMap;
use std::path::Path;

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

/// The built-in template files with the overrides in `folder` (if any), by file name,
/// checked: every file name is known and every placeholder is known and allowed for the
/// file's audience.
pub fn read_files(folder: Option<&Path>) -> Result<BTreeMap<String, String>, String> {
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
    Ok(files)
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
