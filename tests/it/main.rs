//! The integration tests, one binary (one link instead of one per file): the daemon
//! in-process and as real processes, against a fake platform over real HTTP, a real SMTP
//! server, and real SQLite and PostgreSQL databases.

mod helpers;

mod cli;
mod daemon;
mod email;
mod email_retries;
mod hardening;
mod replicas;
mod service;
mod store;
mod webhooks;
