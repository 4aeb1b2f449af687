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

#![forbid(unsafe_code)]

use pdgate_glue::balancer::{flag, param, shm_size, Balancer, NoState, PeerView, Request};
use pdgate_glue::core::balance::{prefill_score, PREFILL_SCORE_PARAMS};

fn choose(peers: &[PeerView], r: &Request) -> Option<usize> {
    prefill_score(peers, r.tokens, r.params.float("a"), r.params.float("b"), r.tie)
}

static BALANCER: Balancer = Balancer {
    name: "prefill_score_balance",
    zone: "pdgate_prefill_score_balance",
    params: &PREFILL_SCORE_PARAMS,
    choose,
    cost: None,
    learn_usage: false,
    state: &NoState,
    module: __pdgate_module,
};

pdgate_glue::balancer_module!(ngx_http_upstream_prefill_score_balance_module, BALANCER, status: c"prefill_score_balance_status", [
        shm_size(c"prefill_score_balance_shm_size"),
        flag(c"prefill_score_balance", &BALANCER),
        param(c"prefill_score_balance_a", &BALANCER),
        param(c"prefill_score_balance_b", &BALANCER),
    ]
);
