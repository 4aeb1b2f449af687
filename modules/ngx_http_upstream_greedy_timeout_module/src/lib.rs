//! ngx_http_upstream_greedy_timeout_module: the peer expected to finish its
//! work in flight first once this request is added — a virtual finish time
//! where a request of `L` estimated tokens costs `warmup + L^exp` (Global
//! Proxy's greedy_timeout, which parsed `greedy_timeout_warmup` and
//! `greedy_timeout_exp` but never used them, and never took finished work
//! off; both are fixed here).
//!
//! ```nginx
//! upstream prefill_servers {
//!     server 10.0.0.1:8000; server 10.0.0.2:8000;
//!     greedy_timeout on;
//!     greedy_timeout_warmup 5;
//!     greedy_timeout_exp 1.8;
//! }
//! ```

use pdgate_glue::core::balance::{
    greedy_cost, greedy_timeout, PeerView, GREEDY_EXP, GREEDY_WARMUP,
};
use pdgate_glue::ffi::{NGX_CONF_FLAG, NGX_CONF_TAKE1};
use pdgate_glue::upstream::{
    cmd_flag, cmd_float, cmd_shm_size, command, main_command, Balancer, Params, Request,
};

fn cost(tokens: u64, p: &Params) -> u64 {
    greedy_cost(tokens, p.float[0].unwrap_or(GREEDY_WARMUP), p.float[1].unwrap_or(GREEDY_EXP))
}

fn choose(peers: &[PeerView], r: &Request) -> Option<usize> {
    let (tokens, p, tie) = (r.tokens, r.params, r.tie);
    greedy_timeout(peers, cost(tokens, p), tie)
}

static BALANCER: Balancer = Balancer {
    name: "greedy_timeout",
    zone: "pdgate_greedy_timeout",
    choose,
    cost: Some(cost),
    learn_usage: false,
    history: false,
    prefix: false,
    module: __pdgate_module,
};

pdgate_glue::balancer_module!(ngx_http_upstream_greedy_timeout_module, BALANCER, status: c"greedy_timeout_status", [
        main_command(c"greedy_timeout_shm_size", cmd_shm_size),
        command(c"greedy_timeout", NGX_CONF_FLAG, cmd_flag, 0, &BALANCER),
        command(c"greedy_timeout_warmup", NGX_CONF_TAKE1, cmd_float, 0, &BALANCER),
        command(c"greedy_timeout_exp", NGX_CONF_TAKE1, cmd_float, 1, &BALANCER),
    ]
);
