//! ngx_http_upstream_pd_score_balance_module: the joint P/D balancer.
//! Prefill and decode upstreams share one zone: a prefill upstream records
//! the length of every request while its prefill runs, and a decode
//! upstream places each request by simulating longest-processing-time-first
//! over those requests (they reach decode soon) and this one, each going to
//! the decode peer with room (`pd_score_balance_max_num_seqs`) and the
//! fewest tokens resident (learned from the answers' `usage`). On the
//! prefill side: among peers under the cap, the fewest tokens in flight.
//!
//! Fixed against Global Proxy's version: the choice is reserved in the same
//! step it is made (no herding of concurrent workers), the queue of
//! prefills is keyed by a per-request id instead of a per-process pointer,
//! decode tokens come from the decode answers (the original's filter added
//! prefill usage to decode slots), other upstreams keep their own balancer
//! (the original reset every other upstream to round robin), keepalive
//! works, retries go to untried peers and state survives reload.
//!
//! ```nginx
//! upstream prefill_servers {
//!     server 10.0.0.1:8000; server 10.0.0.2:8000;
//!     pd_score_balance prefill;
//!     pd_score_balance_max_num_seqs 16;
//! }
//! upstream decode_servers {
//!     server 10.0.1.1:8000; server 10.0.1.2:8000;
//!     pd_score_balance decode;
//!     pd_score_balance_max_num_seqs 32;
//! }
//! ```

#![forbid(unsafe_code)]

use pdgate_glue::balancer::{
    param, role, shm_size, Balancer, PeerView, PendingPrefills, Request, Role,
};
use pdgate_glue::core::balance::{
    pd_score_cap, pd_score_decode, pd_score_prefill, PD_SCORE_PARAMS,
};

fn choose(peers: &[PeerView], r: &Request) -> Option<usize> {
    let cap = pd_score_cap(r.params);
    if r.params.role == Role::Decode {
        pd_score_decode(peers, r.tokens, r.pending, cap, r.tie)
    } else {
        pd_score_prefill(peers, cap, r.tie)
    }
}

static BALANCER: Balancer = Balancer {
    name: "pd_score_balance",
    zone: "pdgate_pd_score_balance",
    params: &PD_SCORE_PARAMS,
    choose,
    cost: None,
    learn_usage: true,
    state: &PendingPrefills,
    module: __pdgate_module,
};

pdgate_glue::balancer_module!(ngx_http_upstream_pd_score_balance_module, BALANCER, status: c"pd_score_balance_status", [
        shm_size(c"pd_score_balance_shm_size"),
        role(c"pd_score_balance", &BALANCER),
        param(c"pd_score_balance_max_num_seqs", &BALANCER),
    ]
);
