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

use pdgate_glue::core::balance::{
    length_balance, weighted_tokens, PeerView, LENGTH_REQ_LEN_WEIGHT,
};
use pdgate_glue::ffi::{NGX_CONF_NOARGS, NGX_CONF_TAKE1};
use pdgate_glue::upstream::{
    cmd_flag_or_bare, cmd_float, cmd_int, cmd_shm_size, command, main_command, Balancer, Request,
};

fn choose(peers: &[PeerView], r: &Request) -> Option<usize> {
    let w = r.params.float[0].unwrap_or(LENGTH_REQ_LEN_WEIGHT);
    length_balance(peers, weighted_tokens(r.tokens, w), r.tie)
}

static BALANCER: Balancer = Balancer {
    name: "length_balance",
    zone: "pdgate_length_balance",
    choose,
    cost: None,
    learn_usage: false,
    history: true,
    prefix: false,
    module: __pdgate_module,
};

pdgate_glue::balancer_module!(ngx_http_upstream_length_balance_module, BALANCER, status: c"length_balance_status", [
        main_command(c"length_balance_shm_size", cmd_shm_size),
        command(c"length_balance", NGX_CONF_NOARGS | NGX_CONF_TAKE1, cmd_flag_or_bare, 0, &BALANCER),
        command(c"length_balance_merge_threshold", NGX_CONF_TAKE1, cmd_int, 0, &BALANCER),
        command(c"length_balance_decay_factor", NGX_CONF_TAKE1, cmd_int, 1, &BALANCER),
        command(c"length_balance_req_len_weight", NGX_CONF_TAKE1, cmd_float, 0, &BALANCER),
    ]
);
