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
//! glue's (`pdgate_glue::upstream`).

use pdgate_glue::core::balance::{least_total_load, PeerView};
use pdgate_glue::ffi::{NGX_CONF_FLAG, NGX_CONF_TAKE1};
use pdgate_glue::upstream::{
    cmd_flag, cmd_int, cmd_shm_size, command, main_command, Balancer, Request,
};

/// The batch size when none is configured (the original's default).
const DEFAULT_BATCH: u64 = 16;

fn choose(peers: &[PeerView], r: &Request) -> Option<usize> {
    let (tokens, p, tie) = (r.tokens, r.params, r.tie);
    least_total_load(peers, tokens, p.int[0].unwrap_or(DEFAULT_BATCH), tie)
}

static BALANCER: Balancer = Balancer {
    name: "least_total_load",
    zone: "pdgate_least_total_load",
    choose,
    cost: None,
    learn_usage: false,
    history: false,
    prefix: false,
    module: __pdgate_module,
};

pdgate_glue::balancer_module!(ngx_http_upstream_least_total_load_module, BALANCER, status: c"least_total_load_status", [
        main_command(c"least_total_load_shm_size", cmd_shm_size),
        command(c"least_total_load", NGX_CONF_FLAG, cmd_flag, 0, &BALANCER),
        command(c"least_total_load_batch_size", NGX_CONF_TAKE1, cmd_int, 0, &BALANCER),
    ]
);
