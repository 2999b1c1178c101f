//! Shared test helpers: real databases (a SQLite file, a fresh PostgreSQL database),
//! configs pointing at a fake platform, and waiting with a deadline.

pub mod process;
pub mod smtp;

use std::path::{Path, PathBuf};
use std::time::Duration;

use connwatch::config::Config;
use sqlx::Connection;

/// The PostgreSQL server tests use (trust auth on this machine and in CI).
pub fn postgres_admin_url() -> String {
    std::env::var("CONNWATCH_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A database for one test: a SQLite file in a temp dir, or a fresh PostgreSQL database
/// dropped at the end.
pub struct TestDb {
    pub url: String,
    pub folder: tempfile::TempDir,
    postgres_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

impl TestDb {
    pub async fn new(kind: Kind) -> TestDb {
        let folder = tempfile::tempdir().expect("temp dir");
        match kind {
            Kind::Sqlite => TestDb {
                url: format!("sqlite://{}", folder.path().join("connwatch.db").display()),
                folder,
                postgres_name: None,
            },
            Kind::Postgres => {
                let name = format!("connwatch_test_{:016x}", rand::random::<u64>());
                let mut admin = sqlx::PgConnection::connect(&postgres_admin_url())
                    .await
                    .expect("PostgreSQL on 127.0.0.1:5432 (set CONNWATCH_TEST_POSTGRES)");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut admin)
                    .await
                    .expect("create database");
                let base = postgres_admin_url();
                let url = match base.rfind('/') {
                    Some(slash) => format!("{}/{name}", &base[..slash]),
                    None => panic!("bad CONNWATCH_TEST_POSTGRES"),
                };
                TestDb {
                    url,
                    folder,
                    postgres_name: Some(name),
                }
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.folder.path()
    }

    /// Drops the PostgreSQL database now (e.g. to simulate the store going away).
    pub async fn drop_postgres(&self) {
        if let Some(name) = &self.postgres_name {
            drop_database(name).await;
        }
    }
}

async fn drop_database(name: &str) {
    if let Ok(mut admin) = sqlx::PgConnection::connect(&postgres_admin_url()).await {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.postgres_name.take() {
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(drop_database(&name));
            })
            .join();
        }
    }
}

/// One connection of a test config.
pub struct Conn<'a> {
    pub id: &'a str,
    pub platform: &'a str,
    pub token_file: PathBuf,
}

/// A config with short intervals, one `[platforms.NAME]` per (name, base URL).
pub fn config_text(
    db_url: &str,
    platforms: &[(&str, String)],
    connections: &[Conn<'_>],
    extra_probe: &str,
) -> String {
    let mut text = format!(
        "[store]\nurl = \"{db_url}\"\n\n[server]\nadmin = \"127.0.0.1:0\"\n\n[probe]\n\
         interval = \"1s\"\ntimeout = \"500ms\"\nconfirm_after = \"200ms\"\n\
         failure_threshold = 2\ntoken_check_interval = \"100ms\"\n{extra_probe}\n"
    );
    for (name, base_url) in platforms {
        text.push_str(&format!(
            "\n[platforms.{name}]\nbase_url = \"{base_url}\"\n\
             probe = {{ method = \"GET\", path = \"/v1/connection\" }}\n\
             auth_failure_codes = [\"AUTHENTICATION_FAILED\"]\n\
             reauth_pointer = \"/status\"\nreauth_values = [\"reauthorization_required\"]\n\
             request_id_header = \"x-request-id\"\n"
        ));
    }
    for connection in connections {
        text.push_str(&format!(
            "\n[[connections]]\nid = \"{}\"\nname = \"Customer {}\"\nplatform = \"{}\"\n\
             remote_id = \"conn_{}\"\ntoken = {{ file = \"{}\" }}\ncontacts = [\"it@{}.example\"]\n\
             reconnect_url = \"https://app.example.com/reconnect/{}\"\n",
            connection.id,
            connection.id,
            connection.platform,
            connection.id,
            connection.token_file.display(),
            connection.id,
            connection.id
        ));
    }
    text
}

pub fn parse(text: &str) -> Config {
    Config::parse(text).unwrap_or_else(|problems| panic!("test config invalid: {problems:?}"))
}

/// Writes a token file and returns its path.
pub fn token_file(folder: &Path, id: &str, token: &str) -> PathBuf {
    let path = folder.join(format!("{id}.token"));
    std::fs::write(&path, token).expect("write token");
    path
}

/// Polls `check` every 50 ms until it returns Some, or panics after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Milliseconds since the epoch on the system clock (what a real platform signs with).
pub fn now_millis() -> i64 {
    connwatch::clock::Clock::system().now()
}
