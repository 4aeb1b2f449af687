//! ngx_http_upstream_length_balance_module: send each request to the peer
//! that received the least recent work — requests plus estimated tokens
//! placed on it, a history divided by `length_balance_decay_factor` every
//! `length_balance_merge_threshold` placements (Global Proxy's
//! length_balance, one of its "development templates", with its bugs
//! fixed: the history is shared by every worker at once instead of merged
//! from per-worker batches with a compare-and-set that lost updates, the
//! request-length weight means something, retries go to untried peers and
//! nothing is read after it is freed).
//!
//! ```nginx
//! upstream prefill_servers {
//!     server 10.0.0.1:8000; server 10.0.0.2:8000;
//!     length_balance;                       # or: length_balance on|off;
//!     length_balance_merge_threshold 32;    # placements between decays
//!     length_balance_decay_factor 2;        # divisor at each decay
//!     length_balance_req_len_weight 1.0;    # weight of a request's tokens
//! }
//! ```

#![forbid(unsafe_code)]

use pdgate_glue::balancer::{flag_or_bare, param, shm_size, Balancer, History, PeerView, Request};
use pdgate_glue::core::balance::{length_balance, weighted_tokens, LENGTH_BALANCE_PARAMS};

fn choose(peers: &[PeerView], r: &Request) -> Option<usize> {
    let w = r.params.float("req_len_weight");
    length_balance(peers, weighted_tokens(r.tokens, w), r.tie)
}

static BALANCER: Balancer = Balancer {
    name: "length_balance",
    zone: "pdgate_length_balance",
    params: &LENGTH_BALANCE_PARAMS,
    choose,
    cost: None,
    learn_usage: false,
    state: &History,
    module: __pdgate_module,
};

pdgate_glue::balancer_module!(ngx_http_upstream_length_balance_module, BALANCER, status: c"length_balance_status", [
        shm_size(c"length_balance_shm_size"),
        flag_or_bare(c"length_balance", &BALANCER),
        param(c"length_balance_merge_threshold", &BALANCER),
        param(c"length_balance_decay_factor", &BALANCER),
        param(c"length_balance_req_len_weight", &BALANCER),
    ]
);
