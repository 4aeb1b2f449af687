//! ngx_http_upstream_earliest_start_module: send each request to the engine
//! that can start it first, predicted from what the engines report of
//! themselves (`pd_engine_metrics`: their queues, KV pressure, and the
//! prefill and finishing rates learned while they were saturated) and what
//! pdgate has in flight on them.
//!
//! ```nginx
//! upstream prefill_servers {
//!     zone prefill_servers 64k;
//!     server 10.0.0.1:8000; server 10.0.0.2:8000;
//!     earliest_start prefill;
//!     pd_health_check;
//!     pd_engine_metrics interval=1s;
//! }
//! upstream decode_servers {
//!     zone decode_servers 64k;
//!     server 10.0.1.1:8000; server 10.0.1.2:8000;
//!     earliest_start decode;
//!     earliest_start_max_num_seqs 256;
//!     pd_engine_metrics interval=1s;
//! }
//! ```
//!
//! The policy is `pdgate_core::balance::earliest_start`; without engine
//! metrics it places prefills by the least tokens in flight and decodes by
//! the fewest requests.

#![forbid(unsafe_code)]

use pdgate_glue::balancer::{param, role, shm_size, Balancer, NoState, PeerView, Request, Role};
use pdgate_glue::core::balance::{earliest_start, EARLIEST_START_PARAMS};

fn choose(peers: &[PeerView], r: &Request) -> Option<usize> {
    let decode = r.params.role == Role::Decode;
    earliest_start(peers, r.tokens, decode, r.params.int("max_num_seqs"), r.tie)
}

static BALANCER: Balancer = Balancer {
    name: "earliest_start",
    zone: "pdgate_earliest_start",
    params: &EARLIEST_START_PARAMS,
    choose,
    cost: None,
    learn_usage: true,
    state: &NoState,
    module: __pdgate_module,
};

pdgate_glue::balancer_module!(ngx_http_upstream_earliest_start_module, BALANCER, status: c"earliest_start_status", [
        shm_size(c"earliest_start_shm_size"),
        role(c"earliest_start", &BALANCER),
        param(c"earliest_start_max_num_seqs", &BALANCER),
    ]
);
