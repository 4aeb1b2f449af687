//! Keeping panics from crossing into nginx.
//!
//! Every `extern "C"` entry point of a module runs its Rust body through
//! [`catch`]: a panic (a bug) is logged at `alert` and turned into the given
//! fallback value, so a worker never unwinds into C.

use std::panic::{catch_unwind, AssertUnwindSafe};

use ngx::ffi::NGX_LOG_ALERT;

/// Runs `f`; on panic logs `what` at alert level and returns `fallback`.
pub fn catch<R>(what: &str, fallback: R, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(e) => {
            let msg = e
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| e.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("unknown panic");
            let log = ngx::log::ngx_cycle_log().as_ptr();
            ngx::ngx_log_error!(NGX_LOG_ALERT, log, "pdgate: internal error in {}: {}", what, msg);
            fallback
        }
    }
}
