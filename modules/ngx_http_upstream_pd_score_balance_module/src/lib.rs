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

use pdgate_glue::core::balance::{
    pd_score_decode, pd_score_prefill, PeerView, PD_SCORE_MAX_SEQS_DECODE,
    PD_SCORE_MAX_SEQS_PREFILL,
};
use pdgate_glue::ffi::NGX_CONF_TAKE1;
use pdgate_glue::upstream::{
    cmd_int, cmd_mode, cmd_shm_size, command, main_command, Balancer, Request, MODE_DECODE,
};

fn choose(peers: &[PeerView], r: &Request) -> Option<usize> {
    if r.params.mode == MODE_DECODE {
        let cap = r.params.int[0].unwrap_or(PD_SCORE_MAX_SEQS_DECODE);
        pd_score_decode(peers, r.tokens, r.pending, cap, r.tie)
    } else {
        let cap = r.params.int[0].unwrap_or(PD_SCORE_MAX_SEQS_PREFILL);
        pd_score_prefill(peers, cap, r.tie)
    }
}

static BALANCER: Balancer = Balancer {
    name: "pd_score_balance",
    zone: "pdgate_pd_score_balance",
    choose,
    cost: None,
    learn_usage: true,
    history: false,
    prefix: false,
    module: __pdgate_module,
};

pdgate_glue::balancer_module!(ngx_http_upstream_pd_score_balance_module, BALANCER, status: c"pd_score_balance_status", [
        main_command(c"pd_score_balance_shm_size", cmd_shm_size),
        command(c"pd_score_balance", NGX_CONF_TAKE1, cmd_mode, 0, &BALANCER),
        command(c"pd_score_balance_max_num_seqs", NGX_CONF_TAKE1, cmd_int, 0, &BALANCER),
    ]
);
