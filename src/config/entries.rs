//! The `[[connections]]` entries as parsing hands them to validation: from the whole
//! document's tree, or one piece of text at a time.

use std::ops::Range;

/// The `[[connections]]` entries, handed over one at a time so that on the fast path only
/// one connection's tree is alive at once.
pub(in crate::config) enum ConnectionEntries<'t> {
    /// The file has no `connections`.
    Absent,
    /// `connections` is something other than an array of tables.
    NotAnArray,
    /// The entries of the whole document's tree.
    Parsed(std::vec::IntoIter<toml::Value>),
    /// `[[connections]]` pieces of the text, each parsed when its turn comes.
    Pieces {
        text: &'t str,
        ranges: std::vec::IntoIter<Range<usize>>,
        /// A piece was not exactly one connection: the entries stopped early and the
        /// result must not be used.
        strayed: bool,
    },
}

impl ConnectionEntries<'_> {
    /// How many entries are left (at most), to size the connection list once.
    pub(in crate::config) fn remaining(&self) -> usize {
        match self {
            ConnectionEntries::Absent | ConnectionEntries::NotAnArray => 0,
            ConnectionEntries::Parsed(entries) => entries.len(),
            ConnectionEntries::Pieces { ranges, .. } => ranges.len(),
        }
    }
}

impl Iterator for ConnectionEntries<'_> {
    type Item = toml::Value;

    fn next(&mut self) -> Option<toml::Value> {
        match self {
            ConnectionEntries::Absent | ConnectionEntries::NotAnArray => None,
            ConnectionEntries::Parsed(entries) => entries.next(),
            ConnectionEntries::Pieces {
                text,
                ranges,
                strayed,
            } => {
                let range = ranges.next()?;
                let entry = only_connection(&text[range]);
                *strayed |= entry.is_none();
                entry
            }
        }
    }
}

/// The one entry of a `[[connections]]` piece; `None` if the piece holds anything else.
fn only_connection(piece: &str) -> Option<toml::Value> {
    let mut table: toml::Table = toml::from_str(piece).ok()?;
    let Some(toml::Value::Array(mut entries)) = table.remove("connections") else {
        return None;
    };
    if !table.is_empty() || entries.len() != 1 {
        return None;
    }
    entries.pop()
}
