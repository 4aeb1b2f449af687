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

use pdgate_glue::core::balance::{auto_balance_controller, PeerView};
use pdgate_glue::ffi::{NGX_CONF_FLAG, NGX_CONF_TAKE1};
use pdgate_glue::upstream::{
    cmd_flag, cmd_int, cmd_shm_size, command, main_command, Balancer, Request,
};

/// The batch size when none is configured (the original's default).
const DEFAULT_BATCH: u64 = 24;

fn choose(peers: &[PeerView], r: &Request) -> Option<usize> {
    let (tokens, p, tie) = (r.tokens, r.params, r.tie);
    auto_balance_controller(peers, tokens, p.int[0].unwrap_or(DEFAULT_BATCH), tie)
}

static BALANCER: Balancer = Balancer {
    name: "auto_balance_controller",
    zone: "pdgate_auto_balance_controller",
    choose,
    cost: None,
    learn_usage: false,
    history: false,
    prefix: false,
    module: __pdgate_module,
};

pdgate_glue::balancer_module!(ngx_http_upstream_auto_balance_controller_module, BALANCER, status: c"auto_balance_controller_status", [
        main_command(c"auto_balance_controller_shm_size", cmd_shm_size),
        command(c"auto_balance_controller", NGX_CONF_FLAG, cmd_flag, 0, &BALANCER),
        command(c"auto_balance_controller_batch_size", NGX_CONF_TAKE1, cmd_int, 0, &BALANCER),
    ]
);
