//! pdgate-glue: the one crate of pdgate that talks to nginx through FFI.
//!
//! Module crates call these helpers instead of touching raw pointers. Each
//! helper mirrors a small piece of nginx C practice (named in its docs) and
//! keeps its `unsafe` next to a `// SAFETY:` line saying why it holds.
//! Nothing here decides policy: that is pdgate-core's job.

pub use ngx;
pub use pdgate_core as core;

pub mod balancer;
pub mod body;
pub mod conf;
pub mod counters;
pub mod driver;
pub mod fanout;
pub mod guard;
pub mod headers;
pub mod health;
pub mod hold;
pub mod http;
pub mod kv;
pub mod leg;
pub mod length;
pub mod module;
pub mod observe;
pub mod paced;
pub mod pdmetrics;
pub mod phase;
pub mod pool;
pub mod random;
pub mod reclaim;
pub mod response;
pub mod subrequest;
pub mod timer;
pub mod tokenize;
pub mod upstream;
pub mod variable;
pub mod zone;

pub use ngx::ffi;

/// An nginx call failed (an allocation, in practice). nginx itself logs
/// allocation failures, so callers only need to fail the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NgxError;
