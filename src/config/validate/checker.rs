//! The validators' shared state: the problems found so far, each placed on its line, and
//! the checks every section uses (section shape, durations, counts, secrets, pointers).

use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::DeTable;

use crate::config::toml_lines::{Segment, key, line_of, render_path};
use crate::config::{Problem, SecretRef};

/// Collects problems while the sections are validated.
pub(in crate::config) struct Checker<'t> {
    text: &'t str,
    /// Key positions, parsed only when there is a problem to place (a big config costs
    /// no second tree when it is valid).
    spans: Option<Option<Spanned<DeTable<'t>>>>,
    pub(super) problems: Vec<Problem>,
}

impl<'t> Checker<'t> {
    pub(in crate::config) fn new(text: &'t str) -> Checker<'t> {
        Checker {
            text,
            spans: None,
            problems: Vec::new(),
        }
    }

    pub(super) fn problem(&mut self, path: &[Segment], message: impl Into<String>) {
        if self.spans.is_none() {
            self.spans = Some(DeTable::parse(self.text).ok());
        }
        let line = self
            .spans
            .as_ref()
            .and_then(Option::as_ref)
            .and_then(|spans| line_of(self.text, spans, path));
        self.problems.push(Problem {
            key: render_path(path),
            line,
            message: message.into(),
        });
    }

    /// Deserializes one section; unknown keys and type errors become problems.
    pub(super) fn section<T: DeserializeOwned>(
        &mut self,
        value: toml::Value,
        path: &[Segment],
    ) -> Option<T> {
        let mut unknown: Vec<Vec<Segment>> = Vec::new();
        let mut collect = |ignored_path: serde_ignored::Path| {
            unknown.push(ignored_segments(&ignored_path.to_string()));
        };
        let ignored = serde_ignored::Deserializer::new(value, &mut collect);
        let result: Result<T, _> = serde_path_to_error::deserialize(ignored);
        for unknown_path in unknown {
            let full: Vec<Segment> = path.iter().cloned().chain(unknown_path).collect();
            self.problem(&full, "unknown key");
        }
        match result {
            Ok(section) => Some(section),
            Err(error) => {
                let mut full = path.to_vec();
                for segment in error.path().iter() {
                    match segment {
                        serde_path_to_error::Segment::Seq { index } => {
                            full.push(Segment::Index(*index))
                        }
                        serde_path_to_error::Segment::Map { key: name } => full.push(key(name)),
                        serde_path_to_error::Segment::Enum { .. }
                        | serde_path_to_error::Segment::Unknown => {}
                    }
                }
                self.problem(&full, error.inner().message().to_owned());
                None
            }
        }
    }

    pub(super) fn duration(
        &mut self,
        path: &[Segment],
        raw: Option<&str>,
        default: &str,
    ) -> Duration {
        let text = raw.unwrap_or(default);
        match humantime::parse_duration(text) {
            Ok(duration) if !duration.is_zero() => duration,
            Ok(_) => {
                self.problem(path, "must be longer than zero");
                humantime::parse_duration(default).unwrap_or(Duration::from_secs(1))
            }
            Err(error) => {
                self.problem(
                    path,
                    format!(
                        "{text:?} is not a duration ({error}); write e.g. \"30s\", \"5m\", \"24h\""
                    ),
                );
                humantime::parse_duration(default).unwrap_or(Duration::from_secs(1))
            }
        }
    }

    pub(super) fn positive(&mut self, path: &[Segment], raw: Option<u32>, default: u32) -> u32 {
        match raw {
            Some(0) => {
                self.problem(path, "must be at least 1");
                default
            }
            Some(value) => value,
            None => default,
        }
    }

    pub(super) fn secret_readable(&mut self, path: &[Segment], secret: &SecretRef) {
        if let Err(error) = secret.read() {
            self.problem(path, error.to_string());
        }
    }
}

/// `path` with one more key: `platforms.makini` + `base_url`.
pub(super) fn child(path: &[Segment], leaf: &str) -> Vec<Segment> {
    let mut full = path.to_vec();
    full.push(key(leaf));
    full
}

pub(super) fn json_pointer(
    checker: &mut Checker,
    path: &[Segment],
    pointer: Option<String>,
) -> Option<String> {
    match pointer {
        Some(pointer) if !pointer.is_empty() && !pointer.starts_with('/') => {
            checker.problem(
                path,
                format!("{pointer:?} is not a JSON pointer (it starts with '/')"),
            );
            None
        }
        other => other,
    }
}

/// serde_ignored renders paths as `a.0.b`; numbers are sequence indexes.
fn ignored_segments(rendered: &str) -> Vec<Segment> {
    rendered
        .split('.')
        .filter(|part| !part.is_empty() && *part != "?")
        .map(|part| match part.parse::<usize>() {
            Ok(index) => Segment::Index(index),
            Err(_) => key(part),
        })
        .collect()
}
