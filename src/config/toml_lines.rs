//! Places in config text: key paths, the line a key path is on, and the cuts at table
//! headers that let a valid file be read one connection at a time.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One step of a key path.
#[derive(Debug, Clone)]
pub(super) enum Segment {
    Key(String),
    Index(usize),
}

impl From<&str> for Segment {
    fn from(name: &str) -> Self {
        key(name)
    }
}

pub(super) fn key(name: &str) -> Segment {
    Segment::Key(name.to_owned())
}

/// `connections[2].platform`.
pub(super) fn render_path(path: &[Segment]) -> String {
    let mut rendered = String::new();
    for segment in path {
        match segment {
            Segment::Key(key) => {
                if !rendered.is_empty() {
                    rendered.push('.');
                }
                rendered.push_str(key);
            }
            Segment::Index(index) => rendered.push_str(&format!("[{index}]")),
        }
    }
    rendered
}

/// The 1-based line of a byte offset.
pub(super) fn line_at(text: &str, offset: usize) -> usize {
    text[..offset].matches('\n').count() + 1
}

/// The line of the deepest part of `path` found in `spans`, the document parsed with
/// positions.
pub(super) fn line_of(text: &str, spans: &Spanned<DeTable<'_>>, path: &[Segment]) -> Option<usize> {
    let mut offset = None;
    let mut current: Option<&DeValue<'_>> = None;
    let mut table: Option<&DeTable<'_>> = Some(spans.get_ref());
    for segment in path {
        let next = match (segment, table, current) {
            (Segment::Key(name), Some(table), _) => table
                .iter()
                .find(|(candidate, _)| candidate.get_ref().as_ref() == name.as_str())
                .map(|(candidate, value)| (candidate.span().start, value)),
            (Segment::Index(index), _, Some(DeValue::Array(array))) => {
                array.get(*index).map(|value| (value.span().start, value))
            }
            _ => None,
        };
        let Some((start, value)) = next else { break };
        offset = Some(start);
        current = Some(value.get_ref());
        table = match value.get_ref() {
            DeValue::Table(inner) => Some(inner),
            _ => None,
        };
    }
    offset.map(|offset| line_at(text, offset))
}

/// A config cut before each `[[connections]]` header and before the header that ends a
/// connection's keys.
pub(super) struct Pieces {
    /// Everything that is not a connection, in file order.
    pub(super) others: Vec<Range<usize>>,
    /// One `[[connections]]` header and its keys each.
    pub(super) connections: Vec<Range<usize>>,
}

impl Pieces {
    /// Cuts at lines that look like table headers. The lines are not lexed here: a cut
    /// that is not really at a header leaves a piece that does not parse on its own.
    pub(super) fn split(text: &str) -> Pieces {
        let mut pieces = Pieces {
            others: Vec::new(),
            connections: Vec::new(),
        };
        let mut start = 0;
        let mut offset = 0;
        let mut in_connection = false;
        for line in text.split_inclusive('\n') {
            let trimmed = line.trim_start_matches([' ', '\t']);
            if trimmed.starts_with('[') {
                let connection_header = is_connection_header(trimmed);
                if connection_header || in_connection {
                    pieces.push(in_connection, start..offset);
                    start = offset;
                    in_connection = connection_header;
                }
            }
            offset += line.len();
        }
        pieces.push(in_connection, start..offset);
        pieces
    }

    fn push(&mut self, connection: bool, range: Range<usize>) {
        if connection {
            self.connections.push(range);
        } else if !range.is_empty() {
            self.others.push(range);
        }
    }
}

/// `[[connections]]`, with the spaces TOML allows inside the brackets.
fn is_connection_header(line: &str) -> bool {
    line.strip_prefix("[[")
        .and_then(|rest| rest.split_once("]]"))
        .is_some_and(|(name, _)| name.trim_matches([' ', '\t']) == "connections")
}
