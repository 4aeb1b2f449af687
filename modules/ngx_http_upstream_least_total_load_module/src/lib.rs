//! ngx_http_upstream_least_total_load_module: send each request to the peer
//! whose in-flight work would drain first (Global Proxy's least_total_load,
//! with its bugs fixed: real on/off, retries go to untried peers, counters
//! per upstream and peer identity, weights honoured, keepalive kept).
//!
//! ```nginx
//! upstream prefill_servers {
//!     server 10.0.0.1:8000;
//!     server 10.0.0.2:8000;
//!     least_total_load on;
//!     least_total_load_batch_size 16;
//!     keepalive 256;
//! }
//! ```
//!
//! The policy is `pdgate_core::balance::least_total_load`; the hooks are the
//! glue's (`pdgate_glue::balancer`).

#![forbid(unsafe_code)]

use pdgate_glue::balancer::{flag, param, shm_size, Balancer, NoState, PeerView, Request};
use pdgate_glue::core::balance::{least_total_load, LEAST_TOTAL_LOAD_PARAMS};

fn choose(peers: &[PeerView], r: &Request) -> Option<usize> {
    least_total_load(peers, r.tokens, r.params.int("batch_size"), r.tie)
}

static BALANCER: Balancer = Balancer {
    name: "least_total_load",
    zone: "pdgate_least_total_load",
    params: &LEAST_TOTAL_LOAD_PARAMS,
    choose,
    cost: None,
    learn_usage: false,
    state: &NoState,
    module: __pdgate_module,
};

pdgate_glue::balancer_module!(ngx_http_upstream_least_total_load_module, BALANCER, status: c"least_total_load_status", [
        shm_size(c"least_total_load_shm_size"),
        flag(c"least_total_load", &BALANCER),
        param(c"least_total_load_batch_size", &BALANCER),
    ]
);
