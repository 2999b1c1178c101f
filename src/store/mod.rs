//! The only place with SQL. One boundary with intent-named methods, over SQLite or PostgreSQL.
//!
//! Both backends run the same statements through sqlx's `Any` driver (`$1` placeholders,
//! times as i64 milliseconds); where they differ (row locks, write transactions) the
//! difference stays in this module. Migrations live in `migrations/{sqlite,postgres}`.

mod connections;
mod email_outbox;
mod incidents;
mod maintenance;
mod polls;
mod probes;
mod read;
mod relay_outbox;
mod rows;
mod webhooks;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor, Transaction};

use crate::domain::Millis;

pub use connections::SyncConnection;
pub use email_outbox::{EmailJob, UnreadableEmail};
pub use maintenance::checkpoint_wal;
pub use polls::{PollClaim, PolledChange};
pub use probes::{Claimed, ProbeRecord};
pub use read::{ConnectionDetail, ConnectionSummary, IncidentRow, ProbeRow, TransitionRow};
pub use relay_outbox::RelayMessage;
pub use webhooks::{WebhookDelivery, WebhookStored};

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Errors of the store: always our side (database down, bad URL), never a platform's.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names no supported database.
    #[error("store.url must start with sqlite: or postgres://")]
    UnsupportedUrl,
    /// The SQLite file's folder does not exist.
    #[error("the folder of the SQLite database {0} does not exist")]
    MissingFolder(String),
    /// A query or connection failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Another daemon holds the SQLite database.
    #[error(
        "another `connwatch run` uses {0}: on SQLite one daemon owns the database \
         (replicas share PostgreSQL)"
    )]
    InUse(String),
    /// The SQLite database file could not be created.
    #[error("cannot create the SQLite database {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    /// The SQLite database file could not be locked (not because another daemon has it).
    #[error("{0}")]
    Lock(String),
    /// A stored value is not one connwatch writes (a newer schema, or manual edits).
    #[error("unexpected stored value {value:?} in {column}")]
    Corrupt { column: &'static str, value: String },
}

/// The database behind connwatch.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// Where write transactions run: on SQLite one connection of its own, so its page
    /// cache stays valid from commit to commit (SQLite drops a connection's cache when
    /// another connection has written); on PostgreSQL the pool itself.
    writer: AnyPool,
    backend: Backend,
    /// SQLite writers of this process take turns here (see `begin_write`).
    write_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// SQLite probe claims of this process take turns here (`Store::claim_due`).
    claim_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// On SQLite, the probe leases of this process (see `Store::claim_due`).
    leases: std::sync::Arc<std::sync::Mutex<probes::MemoryLeases>>,
    /// The SQLite database file (not for `:memory:`).
    sqlite_path: Option<std::path::PathBuf>,
    /// The daemon's lock on the SQLite file (`hold_database`), released on exit.
    held: std::sync::Arc<std::sync::Mutex<Option<std::fs::File>>>,
    /// Why the last write transaction failed, until one commits again (`/readyz`).
    write_failure: WriteFailure,
}

/// Why the last write transaction failed to begin or commit; `None` once one commits.
type WriteFailure = std::sync::Arc<std::sync::Mutex<Option<String>>>;

impl Store {
    /// Opens the database (creating a SQLite file if missing) without migrating.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        Store::connect_with(url, max_connections, true).await
    }

    /// As `connect`; with `auto_checkpoint` false, SQLite commits never checkpoint the
    /// WAL themselves and the caller runs `checkpoint` regularly (the daemon does).
    pub async fn connect_with(
        url: &str,
        max_connections: u32,
        auto_checkpoint: bool,
    ) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl);
        };
        let url = match backend {
            Backend::Sqlite => sqlite_url(url)?,
            Backend::Postgres => url.to_owned(),
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let pool = open_pool(&options, backend, max_connections, auto_checkpoint, false).await?;
        let writer = match backend {
            Backend::Sqlite => open_pool(&options, backend, 1, auto_checkpoint, true).await?,
            Backend::Postgres => pool.clone(),
        };
        Ok(Store {
            pool,
            writer,
            backend,
            write_lock: Default::default(),
            claim_lock: Default::default(),
            leases: Default::default(),
            sqlite_path: match backend {
                Backend::Sqlite => sqlite_path(&url),
                Backend::Postgres => None,
            },
            held: Default::default(),
            write_failure: Default::default(),
        })
    }

    /// Brings the schema up to date.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self.backend {
            Backend::Sqlite => sqlx::migrate!("migrations/sqlite").run(&self.pool).await?,
            Backend::Postgres => {
                sqlx::migrate!("migrations/postgres")
                    .run(&self.pool)
                    .await?
            }
        }
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Why the last write transaction failed (a full disk answers reads, not writes),
    /// unless one has committed since.
    pub fn write_failure(&self) -> Option<String> {
        record_write(&self.write_failure).clone()
    }

    /// Makes this process the one daemon of a SQLite database: its probe leases live in
    /// its memory (`Store::claim_due`), so a second daemon on the same file would probe
    /// every connection twice (`connwatch probe` takes it as well). An exclusive `flock`
    /// on the file, released when the process ends (even by `kill -9`); SQLite's own
    /// locks (`fcntl`) are not affected, so `status` still reads beside the daemon.
    /// Nothing to do on PostgreSQL.
    pub fn hold_database(&self) -> Result<(), StoreError> {
        let Some(path) = &self.sqlite_path else {
            return Ok(());
        };
        let file = std::fs::File::open(path).map_err(|error| {
            StoreError::Lock(format!("cannot open {}: {error}", path.display()))
        })?;
        match file.try_lock() {
            Ok(()) => {
                *self.held.lock().expect("database lock") = Some(file);
                Ok(())
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                Err(StoreError::InUse(path.display().to_string()))
            }
            Err(std::fs::TryLockError::Error(error)) => Err(StoreError::Lock(format!(
                "cannot lock {}: {error}",
                path.display()
            ))),
        }
    }

    /// Closes every pooled connection (graceful shutdown).
    pub async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
        self.held.lock().expect("database lock").take();
    }

    /// Starts a write transaction. On SQLite the writers of this process queue on an
    /// in-process lock first, then take SQLite's write lock at once: a writer that found
    /// the file locked would sleep in SQLite's busy handler (1 ms, 2 ms, … 100 ms), which at
    /// thousands of probes a second left the claim and the result writer waiting on each
    /// other's sleeps. Another process (the CLI) still waits for the busy timeout.
    async fn begin_write(&self) -> Result<WriteTransaction, StoreError> {
        let (begun, turn) = match self.backend {
            Backend::Sqlite => {
                let turn = self.write_lock.clone().lock_owned().await;
                (self.writer.begin_with("BEGIN IMMEDIATE").await, Some(turn))
            }
            Backend::Postgres => (self.pool.begin().await, None),
        };
        match begun {
            Ok(inner) => Ok(WriteTransaction {
                inner,
                _turn: turn,
                failure: self.write_failure.clone(),
            }),
            Err(error) => {
                *record_write(&self.write_failure) = Some(error.to_string());
                Err(error.into())
            }
        }
    }
}

impl Store {
    /// Copies what the WAL holds into the SQLite database (passive checkpoints), so the
    /// next writer starts the WAL over: first beside the writers (the bulk of the copy),
    /// then once more between two writes (the few pages committed meanwhile; it takes the
    /// writer turn). Beside a busy writer alone, a checkpoint always lagged a commit
    /// behind, the WAL never started over and grew by ~90 MiB a second at 13,000 probes a
    /// second; under the turn alone, the whole copy held up webhook answers (p99 50 ms).
    /// SQLite's automatic checkpoint runs inside the commit that crosses 1,000 pages,
    /// which stalled that commit's answers likewise: the daemon turns it off and calls
    /// this from a task of its own. Does nothing on PostgreSQL.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        if self.backend == Backend::Sqlite {
            sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_optional(&self.pool)
                .await?;
            let _turn = self.write_lock.lock().await;
            sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_optional(&self.writer)
                .await?;
        }
        Ok(())
    }
}

/// A pool of connections to the database; on SQLite each connection is set up for WAL.
async fn open_pool(
    options: &AnyConnectOptions,
    backend: Backend,
    max_connections: u32,
    auto_checkpoint: bool,
    writer: bool,
) -> Result<AnyPool, StoreError> {
    let mut pool = AnyPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10));
    if writer {
        // The SQLite writer: its page cache is the point, so it is never recycled.
        pool = pool.idle_timeout(None).max_lifetime(None);
    }
    let pool = pool
        // A connection still inside a transaction is closed, not handed out: a COMMIT that
        // failed on a full disk (SQLite had already rolled back, so sqlx's ROLLBACK failed
        // as well) left the one writer refusing every BEGIN after space returned.
        .before_acquire(|connection, _meta| {
            Box::pin(async move { Ok(!sqlx::Connection::is_in_transaction(connection)) })
        })
        .after_connect(move |connection, _meta| {
            Box::pin(async move {
                if backend == Backend::Sqlite {
                    // WAL lets readers run beside the writer; NORMAL is durable against
                    // a crash of the process (kill -9), which is what we promise.
                    connection.execute("PRAGMA journal_mode = WAL").await?;
                    connection.execute("PRAGMA synchronous = NORMAL").await?;
                    connection.execute("PRAGMA busy_timeout = 10000").await?;
                    // A multi-row statement keeps its undo pages (statement journal)
                    // in memory instead of a temporary file.
                    connection.execute("PRAGMA temp_store = MEMORY").await?;
                    // 16 MiB of page cache (SQLite's default is 2 MiB): the pages of
                    // the connections table and its indexes stay in memory instead of
                    // being read back from the file on every probe's update.
                    connection.execute("PRAGMA cache_size = -16384").await?;
                    // The daemon checkpoints from its own task (`checkpoint`), so
                    // a commit never stops to copy the WAL into the database.
                    if !auto_checkpoint {
                        connection.execute("PRAGMA wal_autocheckpoint = 0").await?;
                    }
                    // A WAL that grew in a burst is cut back to 64 MiB when it
                    // starts over (SQLite's default keeps it at its largest).
                    connection
                        .execute("PRAGMA journal_size_limit = 67108864")
                        .await?;
                }
                Ok(())
            })
        })
        .connect_with(options.clone())
        .await?;
    Ok(pool)
}

/// A transaction as the statements of every aggregate take it.
pub(super) type Tx = Transaction<'static, sqlx::Any>;

/// A write transaction; on SQLite it holds this process's writer turn until it ends.
pub(super) struct WriteTransaction {
    inner: Transaction<'static, sqlx::Any>,
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
    /// Where a failed commit is recorded (and a successful one clears it).
    failure: WriteFailure,
}

impl WriteTransaction {
    pub(super) async fn commit(self) -> Result<(), sqlx::Error> {
        let WriteTransaction {
            inner,
            _turn,
            failure,
        } = self;
        let committed = inner.commit().await;
        *record_write(&failure) = committed.as_ref().err().map(ToString::to_string);
        committed
    }
}

/// The write failure record, locked (a poisoned lock still holds a usable record).
fn record_write(failure: &WriteFailure) -> std::sync::MutexGuard<'_, Option<String>> {
    failure
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl std::ops::Deref for WriteTransaction {
    type Target = Transaction<'static, sqlx::Any>;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl std::ops::DerefMut for WriteTransaction {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

/// A lease claim: which rows of which table are due, in what order, and what to return.
pub(super) struct LeaseClaim {
    pub table: &'static str,
    pub owner_column: &'static str,
    pub until_column: &'static str,
    /// SQL condition for a due row; `$3` is now.
    pub due: &'static str,
    pub order: &'static str,
    pub returning: &'static str,
}

impl Store {
    /// Leases up to `limit` due rows to `owner` until `lease_until`, in one write
    /// transaction; on PostgreSQL `FOR UPDATE SKIP LOCKED`, so replicas never claim a row
    /// twice. A row whose lease expired (its holder died) is due again.
    pub(super) async fn claim_leased(
        &self,
        claim: &LeaseClaim,
        now: Millis,
        limit: u32,
        owner: &str,
        lease_until: Millis,
    ) -> Result<Vec<sqlx::any::AnyRow>, StoreError> {
        let lock = match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
        };
        let LeaseClaim {
            table,
            owner_column,
            until_column,
            due,
            order,
            returning,
        } = claim;
        let sql = format!(
            "UPDATE {table} SET {owner_column} = $1, {until_column} = $2 WHERE id IN \
             (SELECT id FROM {table} WHERE {due} AND {until_column} <= $3 \
              ORDER BY {order} LIMIT $4 {lock}) RETURNING {returning}"
        );
        let mut transaction = self.begin_write().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&mut **transaction)
            .await?;
        transaction.commit().await?;
        Ok(rows)
    }
}

impl Store {
    /// Rows per multi-row statement, largest first. On SQLite every statement is a round
    /// trip to sqlx's worker thread (two thread wake-ups), so many rows go in one. The
    /// sizes are powers of two: a batch of any length takes one statement per bit of its
    /// remainder (a webhook batch of 47 takes 5, not the 8 that sizes 64, 16, 4, 1 took),
    /// and sqlx prepares and caches one statement per SQL text, so a batch of any length
    /// reuses at most seven shapes. PostgreSQL gets one row per statement: sqlx sets no
    /// TCP_NODELAY, and a statement larger than one TCP segment waits for the server's
    /// delayed ACK (~40 ms).
    pub(super) fn chunk_sizes(&self) -> &'static [usize] {
        match self.backend {
            Backend::Sqlite => &[64, 32, 16, 8, 4, 2, 1],
            Backend::Postgres => &[1],
        }
    }

    /// `value_rows` for this store's database.
    pub(super) fn value_rows(&self, rows: usize, row: &str) -> String {
        value_rows(self.backend, rows, row)
    }
}

/// `rows` copies of `row` joined by commas: the VALUES of a multi-row statement. On
/// PostgreSQL each `?` becomes the next `$n`, e.g. `value_rows(Postgres, 2, "(?, 'x', ?)")`
/// is `($1, 'x', $2), ($3, 'x', $4)`. SQLite keeps the anonymous `?`: sqlx looks up the
/// name of every numbered parameter, and SQLite finds a name by scanning the statement's
/// list of them, which is quadratic in the statement's size (at 64 rows of 15 parameters
/// it was a tenth of all CPU); anonymous parameters are bound by position. The statement
/// must then have no other parameters.
pub(super) fn value_rows(backend: Backend, rows: usize, row: &str) -> String {
    let mut sql = String::with_capacity(rows * (row.len() + 8));
    let mut number = 0;
    for index in 0..rows {
        if index > 0 {
            sql.push_str(", ");
        }
        if backend == Backend::Sqlite {
            sql.push_str(row);
            continue;
        }
        for (position, piece) in row.split('?').enumerate() {
            if position > 0 {
                number += 1;
                sql.push_str(&format!("${number}"));
            }
            sql.push_str(piece);
        }
    }
    sql
}

/// Splits `items` into chunks of the given sizes (largest first, the last one 1).
pub(super) fn chunks_of<'a, T>(mut items: &'a [T], sizes: &[usize]) -> Vec<&'a [T]> {
    let mut chunks = Vec::new();
    for &size in sizes {
        while items.len() >= size.max(1) {
            let (chunk, rest) = items.split_at(size.max(1));
            chunks.push(chunk);
            items = rest;
        }
    }
    if !items.is_empty() {
        chunks.push(items);
    }
    chunks
}

/// A session-level advisory lock, held while its connection lives.
pub struct AdvisoryLock {
    /// Out of the pool: dropping it closes the session, which releases the lock.
    connection: sqlx::AnyConnection,
}

impl AdvisoryLock {
    /// Fails when the connection (and so the lock) is gone.
    pub async fn check(&mut self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&mut self.connection)
            .await?;
        Ok(())
    }
}

impl Store {
    /// Takes the PostgreSQL advisory lock `key` if free; `None` if another session holds it.
    pub async fn hold_advisory_lock(&self, key: i64) -> Result<Option<AdvisoryLock>, StoreError> {
        let mut connection = self.pool.acquire().await?;
        let (taken,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut *connection)
            .await?;
        if taken {
            // Detached from the pool: the lock lives exactly as long as this connection.
            Ok(Some(AdvisoryLock {
                connection: connection.detach(),
            }))
        } else {
            Ok(None)
        }
    }
}

/// Adds `mode=rwc` (create if missing) and checks the folder exists.
fn sqlite_url(url: &str) -> Result<String, StoreError> {
    if let Some(path) = sqlite_path(url) {
        let folder = path
            .parent()
            .filter(|folder| !folder.as_os_str().is_empty());
        if let Some(folder) = folder
            && !folder.is_dir()
        {
            return Err(StoreError::MissingFolder(path.display().to_string()));
        }
        create_private(&path)?;
    }
    if url.contains("mode=") {
        Ok(url.to_owned())
    } else if url.contains('?') {
        Ok(format!("{url}&mode=rwc"))
    } else {
        Ok(format!("{url}?mode=rwc"))
    }
}

/// Creates a missing SQLite file readable by its owner only (SQLite gives its WAL and
/// shared-memory files the same mode). Left to SQLite, it is created 0644 outside
/// systemd (whose `UMask=0077` hid this): customer names, contacts and history readable
/// by every local user.
fn create_private(path: &std::path::Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StoreError::Create {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// The file of a SQLite URL (`sqlite://path?options`); `None` for an in-memory database.
fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:" && !url.contains("mode=memory"))
        .then(|| std::path::PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::{Backend, Store, chunks_of, value_rows};

    #[tokio::test]
    async fn a_new_sqlite_database_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let folder = tempfile::tempdir().expect("dir");
        let path = folder.path().join("connwatch.db");
        let store = Store::connect(&format!("sqlite://{}", path.display()), 2)
            .await
            .expect("connect");
        store.migrate().await.expect("migrate");
        for file in [path.clone(), folder.path().join("connwatch.db-wal")] {
            let mode = std::fs::metadata(&file)
                .expect("exists")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{}", file.display());
        }
        store.close().await;
    }

    #[test]
    fn value_rows_number_the_parameters_row_after_row_on_postgres() {
        let postgres = Backend::Postgres;
        assert_eq!(
            value_rows(postgres, 2, "(?, 'x', ?)"),
            "($1, 'x', $2), ($3, 'x', $4)"
        );
        assert_eq!(
            value_rows(postgres, 1, "(CAST(? AS TEXT))"),
            "(CAST($1 AS TEXT))"
        );
        assert_eq!(value_rows(postgres, 0, "(?)"), "");
    }

    #[test]
    fn value_rows_keep_anonymous_parameters_on_sqlite() {
        assert_eq!(
            value_rows(Backend::Sqlite, 2, "(?, 'x', ?)"),
            "(?, 'x', ?), (?, 'x', ?)"
        );
        assert_eq!(value_rows(Backend::Sqlite, 0, "(?)"), "");
    }

    #[test]
    fn a_batch_splits_into_few_statement_shapes() {
        let items: Vec<u32> = (0..87).collect();
        let sizes = &[64, 32, 16, 8, 4, 2, 1];
        let lengths: Vec<usize> = chunks_of(&items, sizes)
            .iter()
            .map(|chunk| chunk.len())
            .collect();
        assert_eq!(
            lengths,
            vec![64, 16, 4, 2, 1],
            "one statement per bit of 87"
        );
        let rejoined: Vec<u32> = chunks_of(&items, sizes).concat();
        assert_eq!(rejoined, items);
        assert!(chunks_of::<u32>(&[], &[64, 1]).is_empty());
        assert_eq!(chunks_of(&items[..3], &[1]).len(), 3);
    }
}
