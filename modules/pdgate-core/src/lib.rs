//! pdgate-core: everything pdgate decides, without nginx.
//!
//! No nginx types and no `unsafe` here: the glue crate executes what these
//! functions decide, and every algorithm is unit-tested in this crate.
#![forbid(unsafe_code)]

pub mod balance;
pub mod bootstrap;
pub mod bucket;
pub mod conf;
pub mod echo;
pub mod encode;
pub mod engine;
pub mod error;
pub mod fuzzcheck;
pub mod health;
pub mod hold;
pub mod json;
pub mod kv;
pub mod metrics;
pub mod pd;
pub mod prom;
pub mod request_id;
pub mod rewrite;
pub mod shm;
pub mod tokenize;
pub mod tokens;
pub mod usage;
