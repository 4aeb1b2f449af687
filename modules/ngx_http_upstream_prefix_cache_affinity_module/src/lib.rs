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

use pdgate_glue::core::balance::{prefix_cache_affinity, PeerView, PCA_BATCH_SIZE};
use pdgate_glue::ffi::{NGX_CONF_FLAG, NGX_CONF_TAKE1};
use pdgate_glue::upstream::{
    cmd_flag, cmd_int, cmd_shm_size, command, main_command, Balancer, Request,
};

fn choose(peers: &[PeerView], r: &Request) -> Option<usize> {
    let batch = r.params.int[0].unwrap_or(PCA_BATCH_SIZE);
    prefix_cache_affinity(peers, r.tokens, r.affinity, batch, r.tie)
}

static BALANCER: Balancer = Balancer {
    name: "prefix_cache_affinity",
    zone: "pdgate_prefix_cache_affinity",
    choose,
    cost: None,
    learn_usage: false,
    history: false,
    prefix: true,
    module: __pdgate_module,
};

pdgate_glue::balancer_module!(ngx_http_upstream_prefix_cache_affinity_module, BALANCER, status: c"prefix_cache_affinity_status", [
        main_command(c"prefix_cache_affinity_shm_size", cmd_shm_size),
        command(c"prefix_cache_affinity", NGX_CONF_FLAG, cmd_flag, 0, &BALANCER),
        command(c"prefix_cache_affinity_batch_size", NGX_CONF_TAKE1, cmd_int, 0, &BALANCER),
        command(c"prefix_cache_affinity_dict_size", NGX_CONF_TAKE1, cmd_int, 1, &BALANCER),
        command(c"prefix_cache_affinity_block_size", NGX_CONF_TAKE1, cmd_int, 2, &BALANCER),
    ]
);
