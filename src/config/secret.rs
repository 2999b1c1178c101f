//! Secret references: `{ env = NAME }`, `{ file = PATH }`, `{ credential = NAME }`.
//!
//! Secrets never appear in the config file itself; this is the only code that reads them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use secrecy::SecretString;
use serde::{Deserialize, Deserializer};

/// Where a secret lives. Holds no secret itself, so it may be logged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SecretRef {
    /// An environment variable.
    Env(String),
    /// A file; replacing it rotates the secret (token files are watched, see `app.rs`).
    File(PathBuf),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/NAME`.
    Credential(String),
}

/// Why a secret could not be read. Names the reference, never the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The environment variable is not set (or not UTF-8).
    #[error("environment variable {0} is not set")]
    MissingEnv(String),
    /// The file could not be read.
    #[error("cannot read secret file {path}: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A credential was named but systemd passed no credentials directory.
    #[error("credential {0:?} needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=)")]
    NoCredentialsDirectory(String),
    /// The secret is empty after trimming.
    #[error("secret from {0} is empty")]
    Empty(String),
    /// A control character (a CR or LF) inside the secret would break the header it is
    /// sent in: the platform would see a broken token and answer 401, a false alarm.
    #[error("secret from {0} contains control characters (a line break inside the value?)")]
    ControlCharacters(String),
    /// A FIFO, a device or a directory: reading it could block or never end.
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    /// Secrets are short; a large file is a mistake (or `/dev/zero`).
    #[error("{path} is {size} bytes; a secret file holds at most {limit} bytes", limit = SECRET_FILE_LIMIT)]
    TooLarge { path: PathBuf, size: u64 },
}

/// The largest secret file read.
pub const SECRET_FILE_LIMIT: u64 = 64 * 1024;

impl SecretRef {
    /// Reads the secret now; surrounding whitespace (a trailing newline) is dropped.
    pub fn read(&self) -> Result<SecretString, SecretError> {
        let raw = match self {
            SecretRef::Env(name) => {
                std::env::var(name).map_err(|_| SecretError::MissingEnv(name.clone()))?
            }
            SecretRef::File(path) => read_file(path)?,
            SecretRef::Credential(name) => {
                let directory = std::env::var_os("CREDENTIALS_DIRECTORY")
                    .ok_or_else(|| SecretError::NoCredentialsDirectory(name.clone()))?;
                read_file(&PathBuf::from(directory).join(name))?
            }
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(SecretError::Empty(self.to_string()));
        }
        if trimmed.chars().any(char::is_control) {
            return Err(SecretError::ControlCharacters(self.to_string()));
        }
        Ok(SecretString::from(trimmed.to_owned()))
    }

    /// The file behind this reference, if any (for rotation watching).
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            SecretRef::File(path) => Some(path.clone()),
            SecretRef::Credential(name) => std::env::var_os("CREDENTIALS_DIRECTORY")
                .map(|directory| PathBuf::from(directory).join(name)),
            SecretRef::Env(_) => None,
        }
    }
}

/// Reads a regular file of at most `SECRET_FILE_LIMIT` bytes; anything else (a FIFO that
/// would block, `/dev/zero` that never ends, a huge file) is refused before it is read.
fn read_file(path: &PathBuf) -> Result<String, SecretError> {
    use std::io::Read;
    let unreadable = |source| SecretError::Unreadable {
        path: path.clone(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(unreadable)?;
    if !metadata.is_file() {
        return Err(SecretError::NotAFile(path.clone()));
    }
    if metadata.len() > SECRET_FILE_LIMIT {
        return Err(SecretError::TooLarge {
            path: path.clone(),
            size: metadata.len(),
        });
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(unreadable)?
        .take(SECRET_FILE_LIMIT)
        .read_to_string(&mut text)
        .map_err(unreadable)?;
    Ok(text)
}

impl fmt::Display for SecretRef {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(name) => write!(formatter, "env {name}"),
            SecretRef::File(path) => write!(formatter, "file {}", path.display()),
            SecretRef::Credential(name) => write!(formatter, "credential {name}"),
        }
    }
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Literal(String),
            Reference(BTreeMap<String, String>),
        }
        use serde::de::Error;
        match Raw::deserialize(deserializer)? {
            // The literal is dropped unread: it must not reach any message.
            Raw::Literal(literal) => Err({
                drop(literal);
                D::Error::custom(
                    "a literal secret is not allowed in the config file (it would end up in backups \
                 and version control); use { env = \"NAME\" }, { file = \"/path\" } or \
                 { credential = \"NAME\" }",
                )
            }),
            Raw::Reference(map) => {
                let mut entries = map.into_iter();
                match (entries.next(), entries.next()) {
                    (Some((kind, value)), None) => match kind.as_str() {
                        "env" => Ok(SecretRef::Env(value)),
                        // Relative paths would depend on the daemon's working directory,
                        // not on where the config file is.
                        "file" if !value.starts_with('/') => Err(D::Error::custom(format!(
                            "file {value:?} must be an absolute path (a relative one depends \
                             on the working directory of whoever starts connwatch)"
                        ))),
                        "file" => Ok(SecretRef::File(PathBuf::from(value))),
                        "credential" => Ok(SecretRef::Credential(value)),
                        other => Err(D::Error::custom(format!(
                            "unknown secret source {other:?}; use env, file or credential"
                        ))),
                    },
                    _ => Err(D::Error::custom(
                        "a secret reference has exactly one of env, file or credential",
                    )),
                }
            }
        }
    }
}

/// What identifies one version of a secret file: a change means the secret was rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<std::time::SystemTime>,
    length: u64,
    inode: u64,
}

impl FileStamp {
    /// The file's current stamp; `None` for an unreadable file.
    pub fn of(path: &std::path::Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            modified: metadata.modified().ok(),
            length: metadata.len(),
            inode: metadata.ino(),
        })
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn file(path: &str) -> SecretRef {
        SecretRef::File(PathBuf::from(path))
    }

    #[test]
    fn a_fifo_a_device_and_a_huge_file_are_refused_without_being_read() {
        let folder = tempfile::tempdir().expect("dir");
        let fifo = folder.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        // Reading a FIFO nobody writes to blocks for good: refused at once.
        assert!(matches!(
            SecretRef::File(fifo).read(),
            Err(SecretError::NotAFile(_))
        ));
        assert!(matches!(
            file("/dev/zero").read(),
            Err(SecretError::NotAFile(_))
        ));
        let huge = folder.path().join("huge");
        std::fs::write(&huge, vec![b'a'; 300 * 1024]).expect("write");
        assert!(matches!(
            SecretRef::File(huge).read(),
            Err(SecretError::TooLarge { size, .. }) if size == 300 * 1024
        ));
    }

    #[test]
    fn a_line_break_inside_a_token_is_refused_and_a_trailing_one_dropped() {
        let folder = tempfile::tempdir().expect("dir");
        let broken = folder.path().join("broken");
        std::fs::write(&broken, "tok_first\r\ntok_second\n").expect("write");
        assert!(matches!(
            SecretRef::File(broken).read(),
            Err(SecretError::ControlCharacters(_))
        ));
        let fine = folder.path().join("fine");
        std::fs::write(&fine, "tok_fine\n").expect("write");
        let token = SecretRef::File(fine).read().expect("readable");
        assert_eq!(token.expose_secret(), "tok_fine");
    }

    #[test]
    fn a_relative_token_path_is_refused_when_the_config_is_read() {
        let relative: Result<SecretRef, _> =
            toml::from_str::<toml::Value>("t = { file = \"tokens/acme\" }").expect("toml")["t"]
                .clone()
                .try_into();
        let message = relative.expect_err("refused").to_string();
        assert!(message.contains("absolute path"), "{message}");
        let absolute: Result<SecretRef, _> =
            toml::from_str::<toml::Value>("t = { file = \"/etc/connwatch/acme\" }").expect("toml")
                ["t"]
                .clone()
                .try_into();
        assert!(absolute.is_ok());
    }
}
