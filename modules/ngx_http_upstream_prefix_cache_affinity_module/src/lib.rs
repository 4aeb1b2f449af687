//! ngx_http_upstream_prefix_cache_affinity_module: send a request to the
//! peer that last received the longest prefix of its prompt (its KV is
//! likely still in that engine's prefix cache), unless that peer runs more
//! than a batch of requests beyond the least busy one; then, as when
//! nothing matches, least_total_load decides.
//!
//! The prompt (the raw `messages` or `prompt` JSON text) is cut into
//! blocks of `prefix_cache_affinity_block_size` bytes whose keys chain the
//! whole prefix; they live in an index in the shared zone with
//! `prefix_cache_affinity_dict_size` entries per peer, least recently used
//! evicted (`pdgate_core::balance::prefix`).
//!
//! Fixed against Global Proxy's version: the whole prompt counts (it took
//! the first `content` anywhere, usually the system prompt, and gave up on
//! bodies of more than 128 JSON tokens); the fallback scores with the
//! configured batch size (the original's was an uninitialised 0); several
//! upstreams may use it; retries go to untried peers; keepalive works.
//!
//! ```nginx
//! upstream prefill_servers {
//!     server 10.0.0.1:8000; server 10.0.0.2:8000;
//!     prefix_cache_affinity on;
//!     prefix_cache_affinity_block_size 640;   # bytes of prompt per block
//!     prefix_cache_affinity_dict_size 10000;  # index entries per peer
//!     prefix_cache_affinity_batch_size 16;    # least_total_load's batch
//! }
//! ```

#![forbid(unsafe_code)]

use pdgate_glue::balancer::{flag, param, shm_size, Balancer, PeerView, PrefixAffinity, Request};
use pdgate_glue::core::balance::{
    precise_affinity, prefix_cache_affinity, PREFIX_CACHE_AFFINITY_PARAMS,
};

fn choose(peers: &[PeerView], r: &Request) -> Option<usize> {
    let batch = r.params.int("batch_size");
    if r.block_tokens > 0 {
        let mut cached = [0u64; 256];
        for (c, &blocks) in cached.iter_mut().zip(r.affinity) {
            *c = u64::from(blocks) * r.block_tokens;
        }
        let n = peers.len().min(cached.len());
        return precise_affinity(peers, r.tokens, &cached[..n], batch, r.tie);
    }
    prefix_cache_affinity(peers, r.tokens, r.affinity, batch, r.tie)
}

static BALANCER: Balancer = Balancer {
    name: "prefix_cache_affinity",
    zone: "pdgate_prefix_cache_affinity",
    params: &PREFIX_CACHE_AFFINITY_PARAMS,
    choose,
    cost: None,
    learn_usage: false,
    state: &PrefixAffinity,
    module: __pdgate_module,
};

pdgate_glue::balancer_module!(ngx_http_upstream_prefix_cache_affinity_module, BALANCER, status: c"prefix_cache_affinity_status", [
        shm_size(c"prefix_cache_affinity_shm_size"),
        flag(c"prefix_cache_affinity", &BALANCER),
        param(c"prefix_cache_affinity_batch_size", &BALANCER),
        param(c"prefix_cache_affinity_dict_size", &BALANCER),
        param(c"prefix_cache_affinity_block_size", &BALANCER),
    ]
);
