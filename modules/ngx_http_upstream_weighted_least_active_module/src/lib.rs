//! ngx_http_upstream_weighted_least_active_module: the peer with the fewest
//! requests in flight (per unit of weight), then the fewest tokens in
//! flight (Global Proxy's weighted_least_active for decode pools, with real
//! on/off, failover, shared per-upstream counters and keepalive kept).
//!
//! ```nginx
//! upstream decode_servers { server 10.0.0.3:8000; server 10.0.0.4:8000; weighted_least_active on; keepalive 256; }
//! ```

#![forbid(unsafe_code)]

use pdgate_glue::balancer::{flag, shm_size, Balancer, NoState, PeerView, Request};
use pdgate_glue::core::balance::{weighted_least_active, WEIGHTED_LEAST_ACTIVE_PARAMS};

fn choose(peers: &[PeerView], r: &Request) -> Option<usize> {
    weighted_least_active(peers, r.tokens, r.tie)
}

static BALANCER: Balancer = Balancer {
    name: "weighted_least_active",
    zone: "pdgate_weighted_least_active",
    params: &WEIGHTED_LEAST_ACTIVE_PARAMS,
    choose,
    cost: None,
    learn_usage: true,
    state: &NoState,
    module: __pdgate_module,
};

pdgate_glue::balancer_module!(ngx_http_upstream_weighted_least_active_module, BALANCER, status: c"weighted_least_active_status", [
        shm_size(c"weighted_least_active_shm_size"),
        flag(c"weighted_least_active", &BALANCER),
    ]
);
