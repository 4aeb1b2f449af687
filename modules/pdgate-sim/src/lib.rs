//! pdgate-sim: an engine simulator that speaks the vLLM/SGLang HTTP API
//! with a continuous-batching timing model, and the pieces pd-bench shares
//! with it. Nothing here touches nginx.
//!
//! # The engine's view of prompts and its prefix cache
//!
//! So that the proxy's precise prefix routing is tested against what the
//! engines themselves hold, engine-sim computes prompts, block hashes and
//! KV cache events as vLLM does:
//!
//! - `--tokenizer DIR`: prompts become the model's token ids
//!   ([`pdgate_core::tokenize`]; chat requests rendered with its template),
//!   and their count is the prompt length. Without it, each 4 bytes of the
//!   prompt text are one token whose id is those bytes read little-endian
//!   ([`prompt::byte_tokens`]). Requests the tokenizer cannot render as vLLM
//!   would (multimodal parts) fall back to that rule; other tokenizer errors
//!   are 400s.
//! - `--prefix-caching-hash-algo sha256_cbor|xxhash_cbor` and `--hash-seed S`
//!   (else the `PYTHONHASHSEED` variable, else a random seed per process, as
//!   vLLM): the prefix cache ([`prefix`]) is keyed by vLLM's chained hash of
//!   each full block of token ids ([`pdgate_core::kv::hash`]).
//! - `--kv-events-port N` (PUB on `--host`), `--kv-replay-port N` (ROUTER),
//!   `--kv-events-topic T`, `--kv-events-shape array|map`,
//!   `--kv-events-int-hashes`: after each engine step the blocks it cached
//!   (`BlockStored`, with parent hash, token ids, block size, medium `GPU`)
//!   and evicted (`BlockRemoved`) go out as one batch ([`kvevents`]), and
//!   `POST /reset_prefix_cache` publishes `AllBlocksCleared`. Counters in
//!   `/metrics`: `engine_sim:kv_events_batches_total`,
//!   `engine_sim:kv_events_total`, `engine_sim:kv_events_dropped_total`,
//!   `engine_sim:kv_events_replays_total`.
//! - `--write-test-tokenizer DIR` writes a small test model
//!   ([`pdgate_core::tokenize::testing`]) and exits, for scripts without a
//!   model hub.

pub mod api;
pub mod bench;
pub mod capacity;
pub mod http;
pub mod kvevents;
pub mod metrics;
pub mod model;
pub mod prefix;
pub mod profile;
pub mod prompt;
pub mod server;
