//! ngx_http_upstream_prefill_score_balance_module: for prefill pools, the
//! peer where this request adds least to the sum of completion times, with
//! a linear prefill cost `c = a·tokens + b` (Global Proxy's
//! prefill_score_balance; `a` and `b` are directives here, defaulting to the
//! original's 0.0345 and 120.0745; keepalive is kept).
//!
//! ```nginx
//! upstream prefill_servers {
//!     server 10.0.0.1:8000; server 10.0.0.2:8000;
//!     prefill_score_balance on;
//!     prefill_score_balance_a 0.0345;
//!     prefill_score_balance_b 120.0745;
//! }
//! ```

use pdgate_glue::core::balance::{prefill_score, PeerView, PREFILL_SCORE_A, PREFILL_SCORE_B};
use pdgate_glue::ffi::{NGX_CONF_FLAG, NGX_CONF_TAKE1};
use pdgate_glue::upstream::{
    cmd_flag, cmd_float, cmd_shm_size, command, main_command, Balancer, Request,
};

fn choose(peers: &[PeerView], r: &Request) -> Option<usize> {
    let (tokens, p, tie) = (r.tokens, r.params, r.tie);
    let a = p.float[0].unwrap_or(PREFILL_SCORE_A);
    let b = p.float[1].unwrap_or(PREFILL_SCORE_B);
    prefill_score(peers, tokens, a, b, tie)
}

static BALANCER: Balancer = Balancer {
    name: "prefill_score_balance",
    zone: "pdgate_prefill_score_balance",
    choose,
    cost: None,
    learn_usage: false,
    history: false,
    prefix: false,
    module: __pdgate_module,
};

pdgate_glue::balancer_module!(ngx_http_upstream_prefill_score_balance_module, BALANCER, status: c"prefill_score_balance_status", [
        main_command(c"prefill_score_balance_shm_size", cmd_shm_size),
        command(c"prefill_score_balance", NGX_CONF_FLAG, cmd_flag, 0, &BALANCER),
        command(c"prefill_score_balance_a", NGX_CONF_TAKE1, cmd_float, 0, &BALANCER),
        command(c"prefill_score_balance_b", NGX_CONF_TAKE1, cmd_float, 1, &BALANCER),
    ]
);
