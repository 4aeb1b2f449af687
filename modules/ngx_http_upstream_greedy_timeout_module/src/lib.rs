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

#![forbid(unsafe_code)]

use pdgate_glue::balancer::{flag, param, shm_size, Balancer, NoState, Params, PeerView, Request};
use pdgate_glue::core::balance::{greedy_cost, greedy_timeout, GREEDY_TIMEOUT_PARAMS};

fn cost(tokens: u64, p: &Params) -> u64 {
    greedy_cost(tokens, p.float("warmup"), p.float("exp"))
}

fn choose(peers: &[PeerView], r: &Request) -> Option<usize> {
    greedy_timeout(peers, cost(r.tokens, r.params), r.tie)
}

static BALANCER: Balancer = Balancer {
    name: "greedy_timeout",
    zone: "pdgate_greedy_timeout",
    params: &GREEDY_TIMEOUT_PARAMS,
    choose,
    cost: Some(cost),
    learn_usage: false,
    state: &NoState,
    module: __pdgate_module,
};

pdgate_glue::balancer_module!(ngx_http_upstream_greedy_timeout_module, BALANCER, status: c"greedy_timeout_status", [
        shm_size(c"greedy_timeout_shm_size"),
        flag(c"greedy_timeout", &BALANCER),
        param(c"greedy_timeout_warmup", &BALANCER),
        param(c"greedy_timeout_exp", &BALANCER),
    ]
);
