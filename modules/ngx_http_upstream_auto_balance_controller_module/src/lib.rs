//! ngx_http_upstream_auto_balance_controller_module: fill every peer up to
//! a batch, least tokens first; past that, the fewest requests (Global
//! Proxy's auto_balance_controller, with a per-upstream batch size instead
//! of the original's process-wide one).
//!
//! ```nginx
//! upstream decode_servers {
//!     server 10.0.0.3:8000; server 10.0.0.4:8000;
//!     auto_balance_controller on;
//!     auto_balance_controller_batch_size 32;
//! }
//! ```

#![forbid(unsafe_code)]

use pdgate_glue::balancer::{flag, param, shm_size, Balancer, NoState, PeerView, Request};
use pdgate_glue::core::balance::{auto_balance_controller, AUTO_BALANCE_CONTROLLER_PARAMS};

fn choose(peers: &[PeerView], r: &Request) -> Option<usize> {
    auto_balance_controller(peers, r.tokens, r.params.int("batch_size"), r.tie)
}

static BALANCER: Balancer = Balancer {
    name: "auto_balance_controller",
    zone: "pdgate_auto_balance_controller",
    params: &AUTO_BALANCE_CONTROLLER_PARAMS,
    choose,
    cost: None,
    learn_usage: false,
    state: &NoState,
    module: __pdgate_module,
};

pdgate_glue::balancer_module!(ngx_http_upstream_auto_balance_controller_module, BALANCER, status: c"auto_balance_controller_status", [
        shm_size(c"auto_balance_controller_shm_size"),
        flag(c"auto_balance_controller", &BALANCER),
        param(c"auto_balance_controller_batch_size", &BALANCER),
    ]
);
