//! Fault tests: the daemon under a PostgreSQL restart and a full disk under SQLite. They
//! disturb every other test running beside them (a restart breaks every PostgreSQL test
//! in flight), so they are a binary of their own that `cargo test --all-targets` builds
//! but does not run: `cargo test --test faults -- --test-threads 1` (CI runs it after the
//! main suite). They need root (`mount`, `pg_ctlcluster`).

// The helpers of the main suite, shared; this binary uses only some of them.
#[allow(dead_code, unused_imports, unused_macros)]
#[path = "../it/helpers/mod.rs"]
mod helpers;

mod disk_full;
mod load;
mod postgres_restart;
