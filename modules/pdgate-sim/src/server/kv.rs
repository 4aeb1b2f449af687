//! The prompt's token ids and block hashes, the KV cache events of each
//! engine step, and vLLM's `POST /reset_prefix_cache`.

use super::*;
use crate::prompt;
use pdgate_core::kv::events::Event as KvEvent;
use pdgate_core::kv::hash::Digest;

/// Binds the KV event sockets `cfg.kv_events` asks for on `cfg.host`, and
/// writes the bound ports back (for port 0).
pub(super) fn start_publisher(cfg: &mut Config) -> std::io::Result<Option<Publisher>> {
    let Some(opts) = cfg.kv_events.as_mut() else { return Ok(None) };
    let p = Publisher::start(&cfg.host, opts)?;
    opts.port = p.port;
    opts.replay_port = p.replay_port;
    Ok(Some(p))
}

impl Sim {
    /// The prompt's token ids (the tokenizer's, or 4-byte chunks of the
    /// prompt text) and the digests of its full blocks; `areq.prompt_tokens`
    /// becomes their count. `Err` is the message of a 400.
    pub(super) fn prompt(
        &self,
        body: &[u8],
        areq: &mut ApiRequest,
    ) -> Result<(Vec<Digest>, Arc<[u32]>), String> {
        let ids = prompt::token_ids(self.cfg.tokenizer.as_deref(), body, &areq.prompt_text)?;
        areq.prompt_tokens = (ids.len() as u64).max(1);
        let blocks = if self.cfg.profile.enable_prefix_caching {
            self.hashing.blocks(&ids)
        } else {
            Vec::new()
        };
        // The engine needs the tokens only for the events.
        let tokens: Arc<[u32]> = if self.kv.is_some() { ids.into() } else { Arc::new([]) };
        Ok((blocks, tokens))
    }

    /// Hands a step's KV cache events to the publisher (nothing when there
    /// are none, as vLLM).
    pub(super) fn publish_kv(&self, events: Vec<KvEvent>) {
        if let (Some(p), false) = (&self.kv, events.is_empty()) {
            p.publish(events);
        }
    }

    /// `POST /reset_prefix_cache`: forgets every cached block; the engine
    /// loop publishes `AllBlocksCleared` after the events before it. 200
    /// with an empty body, as vLLM.
    pub(super) fn reset_prefix_cache(&self, w: &mut TcpStream, ka: bool) -> std::io::Result<After> {
        let freed = {
            let mut e = self.engine.lock();
            let freed = e.reset_prefix_cache();
            self.work.notify_one();
            freed
        };
        if !self.cfg.quiet {
            self.log(format_args!("prefix cache reset, {freed} blocks freed"));
        }
        http::write_response(w, 200, "application/json", b"", ka, &[]).map(|_| After::KeepAlive)
    }

    /// The block hasher requests are keyed with.
    pub fn hashing(&self) -> &Hashing {
        &self.hashing
    }
}
