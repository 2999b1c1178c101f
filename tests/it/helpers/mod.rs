//! Shared test helpers: the test app (`spawn_app`), real databases (a SQLite file, a fresh
//! PostgreSQL database), configs pointing at a fake platform, metrics, and waiting with a
//! deadline (`eventually`).

pub mod app;
pub mod config;
pub mod process;
pub mod smtp;

pub use app::{TestApp, spawn_app, test_app, token_of};
pub use config::{
    Conn, NANGO_SECRET, RELAY_SECRET, STAFF, WEBHOOK_SECRET, config_text, parse, token_file,
};

use std::path::Path;
use std::time::Duration;

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

/// The sum of the samples on the admin listener's `/metrics` whose line starts with
/// `prefix` (the one sample when the prefix names every label); 0 when there is none.
pub async fn metric(admin: impl std::fmt::Display, prefix: &str) -> f64 {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs each scenario, an `async fn(Kind)`, as two tests: `sqlite::NAME` on a SQLite file
/// and `postgres::NAME` on the real PostgreSQL.
macro_rules! both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $scenario() {
                super::$scenario($crate::helpers::Kind::Sqlite).await;
            })*
        }
        mod postgres {
            $(#[tokio::test] async fn $scenario() {
                super::$scenario($crate::helpers::Kind::Postgres).await;
            })*
        }
    };
}
pub(crate) use both_backends;
