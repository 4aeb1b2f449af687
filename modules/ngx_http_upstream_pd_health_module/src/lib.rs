//! ngx_http_upstream_pd_health_module: active health checks of the engines,
//! shared by every worker, with readiness.
//!
//! ```nginx
//! upstream prefill_servers {
//!     zone prefill_servers 64k;
//!     server 10.0.0.1:8000;
//!     server 10.0.0.2:8000;
//!     pd_score_balance prefill;
//!     pd_health_check interval=2s timeout=1s fails=2 passes=1 uri=/health;
//! }
//! location = /health { pd_health_ready prefill_servers decode_servers; }
//! location = /internal/health { pd_health_status; }
//! ```
//!
//! One worker probes every peer of every checked upstream (elected through
//! the shared zone, replaced when it dies); every worker keeps round
//! robin's `down` flag of each peer in line with the shared results, so
//! every balancer skips a peer that is not up. See `pdgate_glue::health`
//! and `pdgate_core::health`.

#![forbid(unsafe_code)]

pdgate_glue::health_module!(ngx_http_upstream_pd_health_module);
