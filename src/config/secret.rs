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
}

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

fn read_file(path: &PathBuf) -> Result<String, SecretError> {
    std::fs::read_to_string(path).map_err(|source| SecretError::Unreadable {
        path: path.clone(),
        source,
    })
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
