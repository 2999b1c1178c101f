//! From config text to tables: the whole document as one tree, or, when the file is
//! plainly valid, one connection at a time; the tables are then handed to `validate`.

use toml::de::DeTable;

use super::entries::ConnectionEntries;
use super::toml_lines::{Pieces, line_at};
use super::validate::{Checker, assemble};
use super::{Config, Problem};

/// Parses and validates config text; on failure returns every problem found.
///
/// A tree of the whole document costs about 4.5 KiB per connection (460 MiB of peak
/// resident memory for 100,000 connections), so the common case, a valid file, is read one
/// connection at a time. Anything unusual or wrong is read again as one tree: that path
/// alone words problems, so the diagnostics never depend on which path ran.
pub(super) fn parse(text: &str) -> Result<Config, Vec<Problem>> {
    match parse_in_pieces(text) {
        Some(config) => Ok(config),
        None => parse_whole(text),
    }
}

/// The whole document as one tree: slow and memory-hungry, but places every problem.
fn parse_whole(text: &str) -> Result<Config, Vec<Problem>> {
    let syntax_problem = |error: toml::de::Error| {
        let message = error.message().trim();
        // The parser's words for a number TOML cannot hold name a Rust type.
        let message = if message.contains("as i128") {
            format!("integer out of range (at most {}): {message}", i64::MAX)
        } else {
            message.to_owned()
        };
        vec![Problem {
            key: error
                .span()
                .and_then(|span| key_at(text, span.start))
                .unwrap_or_else(|| "(syntax)".into()),
            line: error.span().map(|span| line_at(text, span.start)),
            message,
        }]
    };
    let mut table: toml::Table = toml::from_str(text).map_err(syntax_problem)?;
    let mut entries = match table.remove("connections") {
        Some(toml::Value::Array(entries)) => ConnectionEntries::Parsed(entries.into_iter()),
        Some(_) => ConnectionEntries::NotAnArray,
        None => ConnectionEntries::Absent,
    };
    assemble(Checker::new(text), table, &mut entries)
}

/// The dotted key of the `key = value` line at `offset`, from the table header above it
/// (`probe.concurrency`, `connections[2].token`); `None` off such a line.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |index| index + 1);
    let line_end = text[line_start..]
        .find('\n')
        .map_or(text.len(), |index| line_start + index);
    let name = text[line_start..line_end].split_once('=')?.0.trim();
    let name = name.trim_matches('"');
    if name.is_empty() || name.starts_with('#') || name.starts_with('[') {
        return None;
    }
    let mut table = String::new();
    let mut connections = 0;
    for header in text[..line_start]
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with('['))
    {
        if header.starts_with("[[") {
            let array = header.trim_matches(|c| c == '[' || c == ']').trim();
            table = format!("{array}[{connections}]");
            connections += 1;
        } else {
            table = header
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned();
        }
    }
    Some(if table.is_empty() {
        name.to_owned()
    } else {
        format!("{table}.{name}")
    })
}

/// The fast path: every other section as one small tree, then one tree per connection.
///
/// `None` when the file is anything but plainly valid: a piece that does not parse on its
/// own, a `connections` key outside a `[[connections]]` header, or any problem at all.
fn parse_in_pieces(text: &str) -> Option<Config> {
    let pieces = Pieces::split(text);
    // Every piece must parse on its own: then each cut lies between two statements (no
    // valid document ends inside a string or an array), and the pieces together say what
    // the whole file says. A header-looking line inside a multi-line string fails here.
    let mut others = String::new();
    for range in &pieces.others {
        let piece = &text[range.clone()];
        DeTable::parse(piece).ok()?;
        others.push_str(piece);
    }
    let table: toml::Table = toml::from_str(&others).ok()?;
    if table.contains_key("connections") {
        return None;
    }
    let mut entries = ConnectionEntries::Pieces {
        text,
        ranges: pieces.connections.into_iter(),
        strayed: false,
    };
    let config = assemble(Checker::new(&others), table, &mut entries).ok()?;
    match entries {
        ConnectionEntries::Pieces { strayed: false, .. } => Some(config),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::config::{PLATFORM, SecretRef};

    #[test]
    fn an_integer_too_large_names_its_key_and_says_why() {
        let text = "[platforms.makini]\nbase_url = \"http://127.0.0.1:1\"\n\
                    probe = { path = \"/v1/connection\" }\n[probe]\n\
                    concurrency = 99999999999999999999\n";
        let problems = parse(text).expect_err("invalid");
        assert_eq!(problems[0].key, "probe.concurrency", "{problems:?}");
        assert_eq!(problems[0].line, Some(5));
        assert!(problems[0].message.contains("out of range"), "{problems:?}");
    }

    #[test]
    fn a_valid_config_is_read_one_connection_at_a_time_with_the_same_result() {
        let text = format!(
            "# comment\n{PLATFORM}\n[[connections]]\nid = \"a\"\nplatform = \"makini\"\n\
             token = {{ file = \"/etc/hostname\" }}\ncontacts = [\n  \"ops@example.com\",\n]\n\
             \n[[ connections ]]  # spaced header\nid = \"b\"\nplatform = \"makini\"\n\
             token.file = \"/etc/hostname\"\n\
             \n[probe]\ninterval = \"2m\"\n\
             \n[[connections]]\r\nid = \"c\"\r\nplatform = \"makini\"\r\n\
             token = {{ env = \"PATH\" }}\r\npaused = true\r\n"
        );
        let piecewise = parse_in_pieces(&text).expect("read in pieces");
        let whole = parse_whole(&text).expect("valid");
        assert_eq!(format!("{piecewise:?}"), format!("{whole:?}"));
        let ids: Vec<&str> = piecewise
            .connections
            .iter()
            .map(|connection| connection.id.as_str())
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(piecewise.probe.interval, Duration::from_secs(120));
    }

    #[test]
    fn the_example_config_reads_the_same_in_pieces_as_whole() {
        let folder = std::env::temp_dir().join(format!("connwatch-example-{}", std::process::id()));
        std::fs::create_dir_all(&folder).expect("folder");
        let example = include_str!("../../connwatch.example.toml");
        for name in example
            .split("credential = \"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
        {
            std::fs::write(folder.join(name), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
                .expect("write");
        }
        let text = example
            .replace(
                "{ credential = \"",
                &format!("{{ file = \"{}/", folder.display()),
            )
            .replace("{ env = \"BUGFREE_TOKEN\" }", "{ env = \"PATH\" }");
        let piecewise = parse_in_pieces(&text).expect("read in pieces");
        let whole = parse_whole(&text).expect("valid");
        assert_eq!(format!("{piecewise:?}"), format!("{whole:?}"));
        assert_eq!(piecewise.connections.len(), 2);
        let _ = std::fs::remove_dir_all(folder);
    }

    #[test]
    fn a_header_inside_a_multi_line_string_is_not_taken_for_a_connection() {
        let text = format!(
            "[log]\nlevel = \"\"\"\n[[connections]]\nid = \"a\"\nplatform = \"makini\"\n\
             token = {{ file = \"/etc/hostname\" }}\n[probe]\n\"\"\"\n{PLATFORM}"
        );
        assert!(parse_in_pieces(&text).is_none());
        let config = parse(&text).expect("valid");
        assert!(config.connections.is_empty());
        assert!(config.log.level.contains("[[connections]]"));
    }

    #[test]
    fn a_connection_sub_table_is_read_from_the_whole_document() {
        let text = format!(
            "{PLATFORM}\n[[connections]]\nid = \"a\"\nplatform = \"makini\"\n\
             [connections.token]\nfile = \"/etc/hostname\"\n"
        );
        assert!(parse_in_pieces(&text).is_none());
        let config = parse(&text).expect("valid");
        assert_eq!(
            config.connections[0].token,
            SecretRef::File(PathBuf::from("/etc/hostname"))
        );
    }

    #[test]
    fn a_problem_in_a_late_connection_is_placed_on_its_line_in_the_file() {
        let connection = "\n[[connections]]\nid = \"ID\"\nplatform = \"makini\"\n\
                          token = { file = \"/etc/hostname\" }\n";
        let text = format!(
            "{PLATFORM}{}{}[probe]\ninterval = \"1m\"\n{}",
            connection.replace("ID", "a"),
            connection.replace("ID", "b"),
            connection
                .replace("ID", "c")
                .replace("platform", "colour = 1\nplatform"),
        );
        assert!(parse_in_pieces(&text).is_none());
        let problems = parse(&text).expect_err("invalid");
        let rendered: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(rendered, ["connections[2].colour (line 20): unknown key"]);
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let problems = parse("[store]\nurl = \n").expect_err("invalid");
        assert_eq!(problems[0].line, Some(2));
    }
}
