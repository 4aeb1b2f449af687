//! ngx_http_upstream_weighted_least_active_module: the peer with the fewest
//! requests in flight (per unit of weight), then the fewest tokens in
//! flight (Global Proxy's weighted_least_active for decode pools, with real
//! on/off, failover, shared per-upstream counters and keepalive kept).
//!
//! ```nginx
//! upstream decode_servers { server 10.0.0.3:8000; server 10.0.0.4:8000; weighted_least_active on; keepalive 256; }
//! ```

use pdgate_glue::core::balance::{weighted_least_active, PeerView};
use pdgate_glue::ffi::NGX_CONF_FLAG;
use pdgate_glue::upstream::{cmd_flag, cmd_shm_size, command, main_command, Balancer, Request};

fn choose(peers: &[PeerView], r: &Request) -> Option<usize> {
    let (tokens, tie) = (r.tokens, r.tie);
    weighted_least_active(peers, tokens, tie)
}

static BALANCER: Balancer = Balancer {
    name: "weighted_least_active",
    zone: "pdgate_weighted_least_active",
    choose,
    cost: None,
    learn_usage: true,
    history: false,
    prefix: false,
    module: __pdgate_module,
};

pdgate_glue::balancer_module!(ngx_http_upstream_weighted_least_active_module, BALANCER, status: c"weighted_least_active_status", [
        main_command(c"weighted_least_active_shm_size", cmd_shm_size),
        command(c"weighted_least_active", NGX_CONF_FLAG, cmd_flag, 0, &BALANCER),
    ]
);
