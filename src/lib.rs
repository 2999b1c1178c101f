//! connwatch: watches customer connections on unified integration platforms.
//!
//! Modules in reading order: the vocabulary, the config, the pure judgement, then the
//! parts that do I/O, and finally the assembly.

pub mod alert;
pub mod app;
pub mod classify;
pub mod clock;
pub mod commands;
pub mod config;
pub mod demo;
pub mod domain;
pub mod events;
pub mod gauges;
pub mod jobs;
pub mod leader;
pub mod metrics;
pub mod poll;
pub mod probe;
pub mod relay;
pub mod reload;
pub mod schedule;
pub mod server;
pub mod service;
pub mod store;
pub mod webhook;
pub mod worker;
