//! Storage: one diesel schema served by SQLite (embedded default) or PostgreSQL, chosen by
//! the database URL.
//!
//! Invariant: diesel is synchronous, so every query runs through [`Db::run`], which moves it
//! onto tokio's blocking pool. Nothing here is ever called from an async worker thread
//! directly.

pub mod schema;

use std::path::PathBuf;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::{self, ManageConnection, Pool, PooledConnection};
use diesel::sqlite::SqliteConnection;
use diesel::{Connection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations/postgres");

/// One connection to either backend. Queries written against the shared schema run on both;
/// the few dialect differences match on the variant.
#[derive(diesel::MultiConnection)]
pub enum DbConnection {
    Postgres(PgConnection),
    Sqlite(SqliteConnection),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// libpq tries GSSAPI encryption first by default, which loads Kerberos; its thread-local
/// teardown can abort the process at exit (`krb5int_getspecific` assertion), failing a
/// clean `panel migrate`. The panel never authenticates with Kerberos, so it asks for no GSS
/// encryption unless the URL says otherwise.
fn without_gss_encryption(url: &str) -> String {
    if url.contains("gssencmode=") {
        return url.to_string();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}gssencmode=disable")
}

impl DatabaseUrl {
    pub fn parse(url: &str) -> Result<DatabaseUrl, DbError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(DbError::Config("sqlite:// needs a file path".into()));
            }
            return Ok(DatabaseUrl::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DatabaseUrl::Postgres(without_gss_encryption(url)));
        }
        Err(DbError::Config(
            "the database URL must start with sqlite:// or postgres://".into(),
        ))
    }

    pub fn backend(&self) -> Backend {
        match self {
            DatabaseUrl::Sqlite(_) => Backend::Sqlite,
            DatabaseUrl::Postgres(_) => Backend::Postgres,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database configuration: {0}")]
    Config(String),
    #[error("no database connection available: {0}")]
    Unavailable(String),
    #[error("query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("the blocking pool refused the query: {0}")]
    Blocking(String),
}

impl DbError {
    pub fn is_unique_violation(&self) -> bool {
        matches!(
            self,
            DbError::Query(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                _
            ))
        )
    }
}

/// Opens connections of the backend the URL names. (The derived `establish` would guess
/// by trying each backend in turn, and SQLite happily creates a file named after any string.)
#[derive(Debug)]
pub struct ConnectionManager {
    url: DatabaseUrl,
}

impl ManageConnection for ConnectionManager {
    type Connection = DbConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<DbConnection, Self::Error> {
        match &self.url {
            DatabaseUrl::Sqlite(path) => {
                let path = path.to_string_lossy();
                let mut conn = SqliteConnection::establish(&path).map_err(r2d2::Error::ConnectionError)?;
                // Foreign keys are off by default in SQLite; WAL lets readers run during a
                // write, and the busy timeout makes writers queue instead of failing.
                conn.batch_execute(
                    "PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000; \
                     PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;",
                )
                .map_err(r2d2::Error::QueryError)?;
                Ok(DbConnection::Sqlite(conn))
            }
            DatabaseUrl::Postgres(url) => PgConnection::establish(url)
                .map(DbConnection::Postgres)
                .map_err(r2d2::Error::ConnectionError),
        }
    }

    fn is_valid(&self, conn: &mut DbConnection) -> Result<(), Self::Error> {
        diesel::sql_query("SELECT 1")
            .execute(conn)
            .map(|_| ())
            .map_err(r2d2::Error::QueryError)
    }

    /// Checked when a connection comes back: one the server dropped (a restart, a failover)
    /// is discarded instead of being handed out again.
    fn has_broken(&self, conn: &mut DbConnection) -> bool {
        match conn {
            DbConnection::Postgres(c) => diesel::r2d2::R2D2Connection::is_broken(c),
            DbConnection::Sqlite(c) => diesel::r2d2::R2D2Connection::is_broken(c),
        }
    }
}

pub type PooledConn = PooledConnection<ConnectionManager>;

/// The connection pool, cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: Pool<ConnectionManager>,
    backend: Backend,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Db {
    /// Builds the pool. Blocking: call it before the runtime starts or via `spawn_blocking`.
    pub fn connect(url: &str, pool_size: u32, acquire_timeout: Duration) -> Result<Db, DbError> {
        let url = DatabaseUrl::parse(url)?;
        let backend = url.backend();
        // "No setup" includes the folder of a new SQLite file.
        if let DatabaseUrl::Sqlite(path) = &url
            && let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent)
                .map_err(|e| DbError::Config(format!("cannot create {}: {e}", parent.display())))?;
        }
        // SQLite allows one writer at a time; a small pool avoids piling writers onto the
        // busy timeout.
        let size = match backend {
            Backend::Sqlite => pool_size.min(4),
            Backend::Postgres => pool_size,
        };
        let pool = Pool::builder()
            .max_size(size)
            .min_idle(Some(1))
            // A broken connection shows up as a failed query anyway; testing each one on
            // checkout would double the round trips of every request.
            .test_on_check_out(false)
            .connection_timeout(acquire_timeout)
            .build(ConnectionManager { url })
            .map_err(|e| DbError::Unavailable(e.to_string()))?;
        Ok(Db { pool, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Runs `work` with a pooled connection on the blocking pool.
    pub async fn run<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConnection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.get().map_err(|e| DbError::Unavailable(e.to_string()))?;
            work(&mut conn)
        })
        .await
        .map_err(|e| DbError::Blocking(e.to_string()))?
    }

    /// A connection for blocking contexts (CLI commands, tests).
    pub fn get_blocking(&self) -> Result<PooledConn, DbError> {
        self.pool.get().map_err(|e| DbError::Unavailable(e.to_string()))
    }

    /// Applies the embedded migrations that have not run yet; returns their names.
    pub fn migrate_blocking(&self) -> Result<Vec<String>, DbError> {
        let mut conn = self.get_blocking()?;
        let applied = match &mut *conn {
            DbConnection::Sqlite(c) => c.run_pending_migrations(SQLITE_MIGRATIONS),
            DbConnection::Postgres(c) => c.run_pending_migrations(POSTGRES_MIGRATIONS),
        }
        .map_err(|e| DbError::Migration(e.to_string()))?;
        Ok(applied.iter().map(ToString::to_string).collect())
    }

    pub async fn migrate(&self) -> Result<Vec<String>, DbError> {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.migrate_blocking())
            .await
            .map_err(|e| DbError::Blocking(e.to_string()))?
    }

    /// For `/readyz`: a round trip to the database.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.run(|conn| {
            diesel::sql_query("SELECT 1").execute(conn)?;
            Ok(())
        })
        .await
    }
}

/// Rows per multi-row INSERT of [`insert_ignoring_conflicts`]: up to 100 columns a row stays
/// below PostgreSQL's 65,535 bind parameters.
pub const INSERT_CHUNK: usize = 500;

/// Inserts `rows` into `table`, skipping rows whose key is already there; evaluates to the
/// number inserted. PostgreSQL takes multi-row statements; diesel builds those for SQLite
/// only without `ON CONFLICT`, and SQLite runs in-process, so there each row is one
/// (cached, prepared) statement inside the caller's transaction.
macro_rules! insert_ignoring_conflicts {
    ($conn:expr, $table:expr, $rows:expr) => {{
        let mut inserted = 0usize;
        match $conn {
            $crate::db::DbConnection::Postgres(c) => {
                for chunk in $rows.chunks($crate::db::INSERT_CHUNK) {
                    inserted += diesel::RunQueryDsl::execute(
                        diesel::insert_into($table).values(chunk).on_conflict_do_nothing(),
                        c,
                    )?;
                }
            }
            $crate::db::DbConnection::Sqlite(c) => {
                for row in &$rows {
                    inserted += diesel::RunQueryDsl::execute(
                        diesel::insert_into($table).values(row).on_conflict_do_nothing(),
                        c,
                    )?;
                }
            }
        }
        inserted
    }};
}
pub(crate) use insert_ignoring_conflicts;

/// Runs `f` in a transaction, as `Connection::transaction` does, except that on SQLite the
/// outermost one begins `IMMEDIATE`. A deferred SQLite transaction that reads first and
/// writes later fails at its first write with `SQLITE_BUSY` whenever another connection
/// wrote in between (its WAL snapshot is stale), without waiting for `busy_timeout`: a
/// request racing a node's metrics or activity would answer 500. `IMMEDIATE` takes the write
/// lock up front, waiting for it. Nested calls are savepoints, as usual. Every panel
/// transaction goes through here.
pub fn transaction<T, E, F>(conn: &mut DbConnection, f: F) -> Result<T, E>
where
    F: FnOnce(&mut DbConnection) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    use diesel::connection::{AnsiTransactionManager, TransactionManager};
    let DbConnection::Sqlite(sqlite) = conn else {
        return conn.transaction(f);
    };
    if AnsiTransactionManager::transaction_manager_status_mut(sqlite)
        .transaction_depth()?
        .is_some()
    {
        return conn.transaction(f);
    }
    AnsiTransactionManager::begin_transaction_sql(&mut *sqlite, "BEGIN IMMEDIATE")?;
    let outcome = f(conn);
    match (outcome, conn) {
        (Ok(value), DbConnection::Sqlite(sqlite)) => {
            AnsiTransactionManager::commit_transaction(sqlite)?;
            Ok(value)
        }
        (Err(e), DbConnection::Sqlite(sqlite)) => {
            AnsiTransactionManager::rollback_transaction(sqlite)?;
            Err(e)
        }
        // The backend of a connection never changes.
        (outcome, DbConnection::Postgres(_)) => outcome,
    }
}

/// Milliseconds since the Unix epoch: how every timestamp is stored (the same on both
/// backends, and sortable).
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod url_tests {
    use super::without_gss_encryption;

    #[test]
    fn postgres_urls_ask_for_no_gss_encryption_unless_they_say_so() {
        assert_eq!(
            without_gss_encryption("postgres://u@h/db"),
            "postgres://u@h/db?gssencmode=disable"
        );
        assert_eq!(
            without_gss_encryption("postgres://u@h/db?sslmode=require"),
            "postgres://u@h/db?sslmode=require&gssencmode=disable"
        );
        assert_eq!(
            without_gss_encryption("postgres://u@h/db?gssencmode=prefer"),
            "postgres://u@h/db?gssencmode=prefer"
        );
    }
}
