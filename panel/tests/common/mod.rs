//! Test harness: every database test runs once on SQLite and once on PostgreSQL, each run in
//! a database of its own (a temporary SQLite file; a uniquely named PostgreSQL database
//! that is dropped afterwards).
//!
//! PostgreSQL comes from `MAMBA_TEST_POSTGRES_URL` (scripts/test.sh starts a cluster and
//! sets it). Without it the PostgreSQL half fails under CI (`CI=true`) and is skipped, loudly,
//! elsewhere.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use actix_web::web;
use diesel::{Connection, RunQueryDsl};
use mamba_panel::config::Config;
use mamba_panel::db::Db;
use mamba_panel::http::AppState;
use mamba_panel::keys::MasterKey;
use mamba_panel::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

pub struct TestDb {
    pub db: Db,
    pub url: String,
    pub kind: Kind,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<(String, String)>,
}

impl TestDb {
    /// A fresh, migrated database, or `None` when PostgreSQL is not available outside CI.
    pub fn new(kind: Kind) -> Option<TestDb> {
        let (url, dir, postgres) = match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("panel.db").display());
                (url, Some(dir), None)
            }
            Kind::Postgres => {
                let admin = postgres_admin_url()?;
                let name = format!("mamba_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn =
                    diesel::PgConnection::establish(&admin).expect("connect to MAMBA_TEST_POSTGRES_URL");
                diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
                    .execute(&mut conn)
                    .unwrap();
                let (base, _) = admin.rsplit_once('/').expect("the URL names a database");
                (format!("{base}/{name}"), None, Some((admin, name)))
            }
        };
        let db = Db::connect(&url, 4, Duration::from_secs(10)).unwrap();
        db.migrate_blocking().unwrap();
        Some(TestDb {
            db,
            url,
            kind,
            _dir: dir,
            postgres,
        })
    }

    pub fn config(&self) -> Config {
        let mut config = Config::default();
        config.database.url = self.url.clone();
        // The cheapest cost argon2id allows here: tests hash many passwords.
        config.auth.argon2_memory_kib = 8 * 1024;
        config.auth.argon2_iterations = 1;
        config
    }

    pub fn state(&self) -> web::Data<AppState> {
        self.state_with(self.config())
    }

    pub fn state_with(&self, config: Config) -> web::Data<AppState> {
        web::Data::new(AppState::new(config, self.db.clone(), &MasterKey::from_bytes([42; 32])).unwrap())
    }
}

impl TestDb {
    /// Drops the PostgreSQL database now, under its live pools.
    pub fn drop_database(&self) {
        if let Some((admin, name)) = &self.postgres {
            let mut conn = diesel::PgConnection::establish(admin).unwrap();
            diesel::sql_query(format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
                .execute(&mut conn)
                .unwrap();
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = &self.postgres {
            // FORCE closes the pool's connections, which are still open at this point.
            if let Ok(mut conn) = diesel::PgConnection::establish(admin) {
                let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut conn);
            }
        }
    }
}

fn postgres_admin_url() -> Option<String> {
    match std::env::var("MAMBA_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let ci = std::env::var("CI")
                .map(|v| v == "true" || v == "1")
                .unwrap_or(false);
            assert!(
                !ci,
                "MAMBA_TEST_POSTGRES_URL is not set under CI: every database test must also run on PostgreSQL"
            );
            eprintln!(
                "\n!!! SKIPPING the PostgreSQL half of this test: MAMBA_TEST_POSTGRES_URL is not set.\n\
                 !!! Run `source scripts/panel-services.sh` (or scripts/test.sh) to start PostgreSQL.\n"
            );
            None
        }
    }
}

pub fn metrics() -> web::Data<Metrics> {
    web::Data::new(Metrics::new().unwrap())
}

/// Declares `name::sqlite` and `name::postgres` tests that each call the async fn `name`
/// with a fresh [`TestDb`] of their backend.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[actix_web::test]
                async fn sqlite() {
                    let db = $crate::common::TestDb::new($crate::common::Kind::Sqlite).unwrap();
                    super::$name(db).await;
                }

                #[actix_web::test]
                async fn postgres() {
                    if let Some(db) = $crate::common::TestDb::new($crate::common::Kind::Postgres) {
                        super::$name(db).await;
                    }
                }
            }
        )*
    };
}
