//! connwatch: watches customer connections on unified integration platforms.
//!
//! Modules in reading order: the vocabulary, the config, the pure judgement, then the
//! parts that do I/O, and finally the assembly.

pub mod domain;
pub mod config;
pub mod classify;
pub mod store;
pub mod metrics;
pub mod probe;
