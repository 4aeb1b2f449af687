//! The engine's timing model: continuous batching, one step at a time, as a
//! deterministic state machine with no clock of its own. The server runs
//! `step()` in a loop and sleeps for the duration each step reports.
//!
//! Per step (vLLM V1's scheduler, simplified): running sequences that are
//! decoding take one token each from the step's token budget
//! (`max_num_batched_tokens`); sequences still prefilling take the next
//! chunk of their prompt; then waiting sequences are admitted while there
//! are sequence slots (`max_num_seqs`), budget and KV blocks. A prompt's
//! leading blocks already in the prefix cache are not computed again.
//! Step time = base + per prefill token + per decode sequence + per context
//! token attended. A decode sequence that needs a block when none is free
//! preempts the most recently admitted sequence (which recomputes later).
//!
//! The prefix cache ([`PrefixCache`]) is keyed by vLLM's block hashes of the
//! prompt's token ids; a prompt's full blocks are cached once its prefill is
//! done, and with [`Engine::record_kv_events`] the engine records vLLM's KV
//! cache events, taken by [`Engine::take_kv_events`] after each step.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use pdgate_core::kv::events::Event as KvEvent;
use pdgate_core::kv::hash::Digest;

use crate::prefix::PrefixCache;
use crate::profile::Profile;

/// What a sequence is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSpec {
    pub id: u64,
    pub prompt_tokens: u64,
    /// vLLM's chained hashes of the prompt's full blocks (prefix caching);
    /// may be empty.
    pub blocks: Vec<Digest>,
    /// The prompt's token ids (the tokens of `blocks`, for the events); may
    /// be empty when events are not recorded.
    pub tokens: Arc<[u32]>,
    /// Tokens to generate (at least 1).
    pub max_new_tokens: u64,
    /// The prompt's KV arrived from a prefill engine: no prefill compute.
    pub kv_loaded: bool,
    /// Keep the KV blocks after finishing, until `release` (a prefill whose
    /// KV a decode engine will fetch).
    pub hold_kv: bool,
}

/// Something that happened to a sequence during a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The prompt is done and the first token was produced; `cached` prompt
    /// tokens came from the prefix cache.
    FirstToken { id: u64, cached: u64 },
    /// Another output token.
    Token { id: u64 },
    /// The last token was produced.
    Finished { id: u64 },
    /// The sequence can never fit (prompt longer than the KV capacity or
    /// the context window); it is dropped.
    Rejected { id: u64 },
}

/// One step's outcome.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Step {
    pub duration_us: f64,
    pub prefill_tokens: u64,
    pub decode_seqs: u64,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone)]
struct Seq {
    spec: SeqSpec,
    /// Prompt tokens still to compute.
    prefill_left: u64,
    /// Output tokens produced.
    generated: u64,
    /// Blocks held that are not shared prefix-cache blocks.
    own_blocks: u64,
    /// Prefix-cache blocks this sequence references: its prompt's first
    /// blocks.
    cached_refs: Vec<Digest>,
    cached_tokens: u64,
    admitted_at: u64,
}

impl Seq {
    fn context(&self) -> u64 {
        self.spec.prompt_tokens + self.generated
    }
}

enum Admit {
    Admitted,
    Blocked,
    Rejected(u64),
}

/// Counters, as vLLM exports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    pub preemptions: u64,
    pub steps: u64,
}

/// The engine.
#[derive(Debug)]
pub struct Engine {
    profile: Profile,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    held: HashMap<u64, Seq>,
    cache: PrefixCache,
    /// Blocks not used by anything (cached-but-unreferenced are counted
    /// in `cache`, not here).
    free_blocks: u64,
    tick: u64,
    pub stats: Stats,
}

impl Engine {
    pub fn new(profile: Profile) -> Engine {
        let free_blocks = profile.num_gpu_blocks as u64;
        let block_size = profile.block_size;
        Engine {
            profile,
            waiting: VecDeque::new(),
            running: Vec::new(),
            held: HashMap::new(),
            cache: PrefixCache::new(block_size, false),
            free_blocks,
            tick: 0,
            stats: Stats::default(),
        }
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Records vLLM's KV cache events from now on (an empty cache only: the
    /// events must describe every cached block).
    pub fn record_kv_events(&mut self) {
        if !self.cache.records() && self.cache.is_empty() {
            self.cache = PrefixCache::new(self.profile.block_size, true);
        }
    }

    /// The KV cache events recorded since the last call, oldest first.
    pub fn take_kv_events(&mut self) -> Vec<KvEvent> {
        self.cache.take_events()
    }

    /// Whether KV cache events wait to be taken.
    pub fn has_kv_events(&self) -> bool {
        self.cache.has_events()
    }

    /// Blocks in the prefix cache (referenced or not).
    pub fn cached_blocks(&self) -> usize {
        self.cache.len()
    }

    /// vLLM's `reset_prefix_cache`: forgets every cached block (recording
    /// `AllBlocksCleared`). Unreferenced blocks become free; blocks that
    /// sequences use stay theirs, no longer shared. Returns the blocks freed.
    pub fn reset_prefix_cache(&mut self) -> u64 {
        for s in
            self.running.iter_mut().chain(self.waiting.iter_mut()).chain(self.held.values_mut())
        {
            s.own_blocks += s.cached_refs.len() as u64;
            s.cached_refs.clear();
        }
        let freed = self.cache.clear() as u64;
        self.free_blocks += freed;
        freed
    }

    /// Queues a sequence.
    pub fn add(&mut self, mut spec: SeqSpec) {
        spec.max_new_tokens = spec.max_new_tokens.max(1);
        let prefill_left = if spec.kv_loaded { 0 } else { spec.prompt_tokens };
        self.waiting.push_back(Seq {
            spec,
            prefill_left,
            generated: 0,
            own_blocks: 0,
            cached_refs: Vec::new(),
            cached_tokens: 0,
            admitted_at: 0,
        });
    }

    /// Drops a sequence wherever it is (client gone). Returns whether it was
    /// found.
    pub fn abort(&mut self, id: u64) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.spec.id == id) {
            if let Some(s) = self.waiting.remove(i) {
                self.free_seq(s);
            }
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.spec.id == id) {
            let s = self.running.remove(i);
            self.free_seq(s);
            return true;
        }
        self.release(id)
    }

    /// Frees the KV a finished `hold_kv` sequence kept.
    pub fn release(&mut self, id: u64) -> bool {
        match self.held.remove(&id) {
            Some(s) => {
                self.free_seq(s);
                true
            }
            None => false,
        }
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Tokens the engine holds for its requests: the context of every running
    /// sequence plus the prompt of every waiting one (SGLang's `num_tokens`).
    pub fn num_tokens(&self) -> u64 {
        let running: u64 = self.running.iter().map(|s| s.context()).sum();
        let waiting: u64 = self.waiting.iter().map(|s| s.spec.prompt_tokens).sum();
        running + waiting
    }

    pub fn num_held(&self) -> usize {
        self.held.len()
    }

    /// True when a step would do something.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Fraction of KV blocks in use by sequences (cached but unreferenced
    /// blocks count as free, as in vLLM's gauge).
    pub fn kv_usage(&self) -> f64 {
        let total = self.profile.num_gpu_blocks as f64;
        let evictable = self.cache.evictable() as f64;
        if total == 0.0 {
            return 0.0;
        }
        ((total - self.free_blocks as f64 - evictable) / total).clamp(0.0, 1.0)
    }

    fn blocks_for(&self, tokens: u64) -> u64 {
        tokens.div_ceil(self.profile.block_size as u64)
    }

    /// Makes `n` blocks free, evicting unreferenced cached blocks (freed
    /// longest ago first, as vLLM's free queue).
    fn reserve(&mut self, n: u64) -> bool {
        while self.free_blocks < n {
            if !self.cache.evict_one() {
                return false;
            }
            self.free_blocks += 1;
        }
        true
    }

    fn free_seq(&mut self, s: Seq) {
        self.free_blocks += s.own_blocks;
        self.tick += 1;
        for h in s.cached_refs.iter().rev() {
            self.cache.release(h, Some(self.tick));
        }
    }

    /// Tries to admit the next waiting sequence.
    fn admit(&mut self, budget: u64) -> Admit {
        let bs = self.profile.block_size as u64;
        let Some(seq) = self.waiting.front() else { return Admit::Blocked };
        if self.blocks_for(seq.spec.prompt_tokens + 1) > self.profile.num_gpu_blocks as u64
            || seq.spec.prompt_tokens >= self.profile.max_model_len as u64
        {
            return match self.waiting.pop_front() {
                Some(s) => Admit::Rejected(s.spec.id),
                None => Admit::Blocked,
            };
        }
        // Leading prompt blocks already cached (not for KV that arrived).
        let mut hits = Vec::new();
        if self.profile.enable_prefix_caching && !seq.spec.kv_loaded {
            // Keep at least one prompt token to compute, as vLLM does.
            let max_hit_blocks = seq.spec.prompt_tokens.saturating_sub(1) / bs;
            for h in seq.spec.blocks.iter().take(max_hit_blocks as usize) {
                if self.cache.contains(h) {
                    hits.push(*h);
                } else {
                    break;
                }
            }
        }
        let cached_tokens = hits.len() as u64 * bs;
        let compute = if seq.spec.kv_loaded { 0 } else { seq.spec.prompt_tokens - cached_tokens };
        if compute > 0 && budget == 0 {
            return Admit::Blocked;
        }
        let needed = self.blocks_for(seq.spec.prompt_tokens + 1) - hits.len() as u64;
        // Referenced hits must not be evicted to make room for this seq.
        for h in &hits {
            self.cache.acquire(h);
        }
        if !self.reserve(needed) {
            for h in &hits {
                self.cache.release(h, None);
            }
            return Admit::Blocked;
        }
        self.free_blocks -= needed;
        self.tick += 1;
        let Some(mut s) = self.waiting.pop_front() else { return Admit::Blocked };
        if !s.spec.kv_loaded {
            self.stats.prefix_queries += s.spec.prompt_tokens;
            self.stats.prefix_hits += cached_tokens;
        }
        s.prefill_left = compute;
        s.own_blocks = needed;
        s.cached_refs = hits;
        // What usage reports as cached: the prefix-cache hits, or for KV
        // that arrived from a prefill every prompt token but the last, as
        // vLLM with NIXL reports it (the connector loads prompt - 1 tokens
        // and the decode computes the last one to sample from it).
        s.cached_tokens =
            if s.spec.kv_loaded { s.spec.prompt_tokens.saturating_sub(1) } else { cached_tokens };
        s.admitted_at = self.tick;
        self.running.push(s);
        Admit::Admitted
    }

    /// Runs one engine step.
    pub fn step(&mut self) -> Step {
        let p = self.profile.clone();
        let bs = p.block_size as u64;
        let mut budget = p.max_num_batched_tokens as u64;
        let mut out = Step::default();

        // Decode sequences first, one token each; a sequence crossing into a
        // new block needs one, preempting the newest sequence if none is free.
        let mut i = 0;
        let mut decoding: Vec<usize> = Vec::new();
        while i < self.running.len() {
            if self.running[i].prefill_left > 0 || budget == 0 {
                i += 1;
                continue;
            }
            let ctx = self.running[i].context();
            if ctx + 1
                > self.running[i].own_blocks * bs + self.running[i].cached_refs.len() as u64 * bs
            {
                if !self.reserve(1) {
                    // Preempt the most recently admitted other sequence.
                    let victim = (0..self.running.len())
                        .filter(|&j| j != i)
                        .max_by_key(|&j| self.running[j].admitted_at);
                    match victim {
                        Some(j) => {
                            let mut v = self.running.remove(j);
                            self.stats.preemptions += 1;
                            self.free_blocks += v.own_blocks;
                            self.tick += 1;
                            for h in v.cached_refs.drain(..).rev() {
                                self.cache.release(&h, Some(self.tick));
                            }
                            // Recompute the prompt and what it generated.
                            v.prefill_left = v.spec.prompt_tokens + v.generated;
                            v.own_blocks = 0;
                            v.cached_tokens = 0;
                            self.waiting.push_front(v);
                            decoding.retain(|&d| d != j);
                            for d in decoding.iter_mut() {
                                if *d > j {
                                    *d -= 1;
                                }
                            }
                            if j < i {
                                i -= 1;
                            }
                            continue;
                        }
                        None => {
                            i += 1;
                            continue;
                        }
                    }
                }
                self.free_blocks -= 1;
                self.running[i].own_blocks += 1;
            }
            decoding.push(i);
            budget -= 1;
            i += 1;
        }

        // Prefill chunks of admitted sequences.
        let mut prefilled: Vec<usize> = Vec::new();
        for (idx, s) in self.running.iter_mut().enumerate() {
            if s.prefill_left == 0 || budget == 0 {
                continue;
            }
            let n = s.prefill_left.min(budget);
            s.prefill_left -= n;
            budget -= n;
            out.prefill_tokens += n;
            if s.prefill_left == 0 {
                prefilled.push(idx);
            }
        }

        // Admit waiting sequences.
        while self.running.len() < p.max_num_seqs {
            match self.admit(budget) {
                Admit::Blocked => break,
                Admit::Admitted => {
                    let idx = self.running.len() - 1;
                    let s = &mut self.running[idx];
                    let n = s.prefill_left.min(budget);
                    s.prefill_left -= n;
                    budget -= n;
                    out.prefill_tokens += n;
                    if s.prefill_left == 0 {
                        prefilled.push(idx);
                    }
                }
                Admit::Rejected(id) => out.events.push(Event::Rejected { id }),
            }
        }

        // Cost of the step.
        let context: u64 = decoding.iter().map(|&d| self.running[d].context()).sum();
        out.decode_seqs = decoding.len() as u64;
        let busy = out.prefill_tokens > 0 || out.decode_seqs > 0;
        out.duration_us = if busy {
            p.step_base_us
                + out.prefill_tokens as f64 * p.prefill_token_us
                + out.decode_seqs as f64 * p.decode_seq_us
                + context as f64 * p.context_token_us
        } else {
            0.0
        };
        self.stats.prompt_tokens += out.prefill_tokens;
        if busy {
            self.stats.steps += 1;
        }

        // Tokens produced by this step.
        let mut finished: Vec<usize> = Vec::new();
        for &d in &decoding {
            let s = &mut self.running[d];
            s.generated += 1;
            out.events.push(Event::Token { id: s.spec.id });
            if s.generated >= s.spec.max_new_tokens {
                finished.push(d);
            }
        }
        for &d in &prefilled {
            let s = &mut self.running[d];
            // A recomputed (preempted) sequence resumes without a new first token.
            if s.generated == 0 {
                s.generated = 1;
                out.events.push(Event::FirstToken { id: s.spec.id, cached: s.cached_tokens });
            }
            // Its full prompt blocks are now cached for others.
            if p.enable_prefix_caching && !s.spec.kv_loaded {
                let full = (s.spec.prompt_tokens / bs) as usize;
                let have = s.cached_refs.len();
                for (i, h) in s.spec.blocks.iter().enumerate().take(full).skip(have) {
                    if !self.cache.acquire(h) {
                        let bsz = bs as usize;
                        let tokens = s.spec.tokens.get(i * bsz..(i + 1) * bsz).unwrap_or(&[]);
                        let parent = i.checked_sub(1).and_then(|j| s.spec.blocks.get(j)).copied();
                        self.cache.insert(*h, parent, i, tokens);
                    } else {
                        // Another sequence cached it meanwhile: share theirs.
                        self.free_blocks += 1;
                    }
                    s.own_blocks = s.own_blocks.saturating_sub(1);
                    s.cached_refs.push(*h);
                }
            }
            if s.generated >= s.spec.max_new_tokens && !finished.contains(&d) {
                finished.push(d);
            }
        }
        self.stats.generation_tokens += out
            .events
            .iter()
            .filter(|e| matches!(e, Event::Token { .. } | Event::FirstToken { .. }))
            .count() as u64;
        finished.sort_unstable();
        for &d in finished.iter().rev() {
            let s = self.running.remove(d);
            out.events.push(Event::Finished { id: s.spec.id });
            if s.spec.hold_kv {
                self.held.insert(s.spec.id, s);
            } else {
                self.free_seq(s);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdgate_core::kv::hash::HashAlgo;

    fn prof() -> Profile {
        Profile {
            name: "test".into(),
            step_base_us: 1000.0,
            prefill_token_us: 10.0,
            decode_seq_us: 100.0,
            context_token_us: 0.0,
            max_num_seqs: 4,
            max_num_batched_tokens: 64,
            block_size: 16,
            num_gpu_blocks: 100,
            enable_prefix_caching: true,
            kv_transfer_base_us: 0.0,
            kv_transfer_token_us: 0.0,
            max_model_len: 4096,
        }
    }

    fn spec(id: u64, prompt: u64, out: u64) -> SeqSpec {
        SeqSpec {
            id,
            prompt_tokens: prompt,
            blocks: Vec::new(),
            tokens: Arc::new([]),
            max_new_tokens: out,
            kv_loaded: false,
            hold_kv: false,
        }
    }

    /// A spec whose prompt is `text` by the 4-byte rule, hashed with seed 0.
    fn spec_text(id: u64, text: &[u8], out: u64) -> SeqSpec {
        let tokens = crate::prompt::byte_tokens(text);
        let h = crate::prompt::Hashing::new(HashAlgo::Sha256Cbor, 16, Some("0"));
        SeqSpec {
            blocks: h.blocks(&tokens),
            prompt_tokens: tokens.len() as u64,
            tokens: tokens.into(),
            ..spec(id, 0, out)
        }
    }

    fn run(e: &mut Engine) -> Vec<Step> {
        let mut steps = Vec::new();
        while e.has_work() {
            steps.push(e.step());
            assert!(steps.len() < 10_000);
        }
        steps
    }

    #[test]
    fn single_request_timing() {
        let mut e = Engine::new(prof());
        e.add(spec(1, 40, 3));
        let steps = run(&mut e);
        // Prefill 40 tokens (first token), then two decode steps.
        assert_eq!(steps.len(), 3);
        assert_eq!(steps[0].duration_us, 1000.0 + 400.0);
        assert_eq!(steps[0].events, vec![Event::FirstToken { id: 1, cached: 0 }]);
        assert_eq!(steps[1].duration_us, 1100.0);
        assert_eq!(steps[2].events, vec![Event::Token { id: 1 }, Event::Finished { id: 1 }]);
        assert_eq!(e.stats.generation_tokens, 3);
        assert_eq!(e.stats.prompt_tokens, 40);
        assert_eq!(e.free_blocks, 100);
    }

    #[test]
    fn chunked_prefill_respects_budget() {
        let mut e = Engine::new(prof());
        e.add(spec(1, 150, 1));
        let steps = run(&mut e);
        let chunks: Vec<u64> = steps.iter().map(|s| s.prefill_tokens).collect();
        assert_eq!(chunks, vec![64, 64, 22]);
        assert!(matches!(steps[2].events[0], Event::FirstToken { id: 1, .. }));
        assert_eq!(steps[2].events[1], Event::Finished { id: 1 });
    }

    #[test]
    fn decode_shares_the_step_with_prefill() {
        let mut e = Engine::new(prof());
        e.add(spec(1, 10, 5));
        e.step(); // prefill of 1
        e.add(spec(2, 30, 1));
        let s = e.step();
        assert_eq!(s.decode_seqs, 1);
        assert_eq!(s.prefill_tokens, 30);
        assert_eq!(s.duration_us, 1000.0 + 300.0 + 100.0);
    }

    #[test]
    fn num_tokens_counts_running_context_and_waiting_prompts() {
        let mut e = Engine::new(prof());
        assert_eq!(e.num_tokens(), 0);
        for id in 0..6 {
            e.add(spec(id, 8, 3));
        }
        // All six wait with their prompts.
        assert_eq!(e.num_tokens(), 6 * 8);
        e.step();
        // Four run (prompt plus what they generated), two still wait.
        assert_eq!((e.num_running(), e.num_waiting()), (4, 2));
        assert!(e.num_tokens() >= 6 * 8 && e.num_tokens() <= 4 * (8 + 3) + 2 * 8);
        while e.has_work() {
            e.step();
        }
        assert_eq!(e.num_tokens(), 0);
    }

    #[test]
    fn max_num_seqs_queues_the_rest() {
        let mut e = Engine::new(prof());
        for id in 0..6 {
            e.add(spec(id, 8, 2));
        }
        e.step();
        assert_eq!(e.num_running(), 4);
        assert_eq!(e.num_waiting(), 2);
        run(&mut e);
        assert_eq!(e.free_blocks, 100);
    }

    #[test]
    fn kv_capacity_makes_requests_wait() {
        let mut p = prof();
        p.num_gpu_blocks = 10; // 160 tokens
        p.enable_prefix_caching = false;
        let mut e = Engine::new(p);
        e.add(spec(1, 100, 2)); // 7 blocks
        e.add(spec(2, 100, 2)); // does not fit beside it
        e.step();
        assert_eq!(e.num_running(), 1);
        assert_eq!(e.num_waiting(), 1);
        run(&mut e);
        assert_eq!(e.free_blocks, 10);
    }

    #[test]
    fn prefix_cache_hits_skip_compute() {
        let mut e = Engine::new(prof());
        let text = vec![b'a'; 64 * 4 + 8]; // 66 tokens: 4 full blocks
        let a = spec_text(1, &text, 1);
        assert_eq!((a.blocks.len(), a.prompt_tokens), (4, 66));
        e.add(a);
        run(&mut e);
        e.add(spec_text(2, &text, 1));
        let s = e.step();
        assert_eq!(s.prefill_tokens, 2);
        assert!(s.events.contains(&Event::FirstToken { id: 2, cached: 64 }));
        assert_eq!(e.stats.prefix_queries, 132);
        assert_eq!(e.stats.prefix_hits, 64);
        // Cached blocks survive (unreferenced), and usage counts them free.
        assert_eq!(e.kv_usage(), 0.0);
    }

    #[test]
    fn lru_evicts_unreferenced_cached_blocks() {
        let mut p = prof();
        p.num_gpu_blocks = 8;
        let mut e = Engine::new(p);
        e.add(spec_text(1, &[b'x'; 64 * 4], 1));
        run(&mut e);
        assert_eq!(e.cache.len(), 4);
        e.add(spec_text(2, &[b'y'; 96 * 4], 1));
        run(&mut e);
        // 7 blocks needed: 3 of the 4 cached x blocks had to go.
        assert!(e.cache.len() <= 8);
        assert_eq!(e.free_blocks + e.cache.len() as u64, 8);
    }

    #[test]
    fn held_kv_is_kept_until_released() {
        let mut e = Engine::new(prof());
        let mut s = spec(7, 40, 1);
        s.hold_kv = true;
        e.add(s);
        run(&mut e);
        assert_eq!(e.num_held(), 1);
        assert!(e.free_blocks < 100);
        assert!(e.release(7));
        assert!(!e.release(7));
        assert_eq!(e.free_blocks, 100);
    }

    #[test]
    fn loaded_kv_skips_prefill() {
        let mut e = Engine::new(prof());
        let mut s = spec(3, 1000, 2);
        s.kv_loaded = true;
        e.add(s);
        let steps = run(&mut e);
        assert_eq!(steps[0].prefill_tokens, 0);
        assert_eq!(steps.iter().map(|s| s.prefill_tokens).sum::<u64>(), 0);
        // Usage counts the KV that arrived as cached: all but the last token.
        assert!(steps[0].events.contains(&Event::FirstToken { id: 3, cached: 999 }));
    }

    #[test]
    fn cached_tokens_are_remote_kv_or_local_hits() {
        // (prompt tokens, KV loaded, cached reported on a fresh engine)
        let table: &[(u64, bool, u64)] =
            &[(1000, true, 999), (17, true, 16), (1, true, 0), (1000, false, 0), (1, false, 0)];
        for (i, &(prompt, loaded, cached)) in table.iter().enumerate() {
            let mut e = Engine::new(prof());
            let mut s = spec(i as u64, prompt, 1);
            s.kv_loaded = loaded;
            e.add(s);
            let first = run(&mut e).into_iter().flat_map(|s| s.events).find_map(|ev| match ev {
                Event::FirstToken { cached, .. } => Some(cached),
                _ => None,
            });
            assert_eq!(first, Some(cached), "prompt {prompt}, kv loaded {loaded}");
        }
    }

    #[test]
    fn preemption_frees_blocks_and_recomputes() {
        let mut p = prof();
        p.num_gpu_blocks = 6;
        p.enable_prefix_caching = false;
        let mut e = Engine::new(p);
        e.add(spec(1, 31, 40)); // 2 blocks, grows
        e.add(spec(2, 31, 40));
        let steps = run(&mut e);
        assert!(e.stats.preemptions > 0);
        let finished: Vec<_> = steps
            .iter()
            .flat_map(|s| s.events.iter())
            .filter(|e| matches!(e, Event::Finished { .. }))
            .collect();
        assert_eq!(finished.len(), 2);
        assert_eq!(e.free_blocks, 6);
    }

    #[test]
    fn too_long_prompt_is_rejected() {
        let mut p = prof();
        p.num_gpu_blocks = 2;
        let mut e = Engine::new(p);
        e.add(spec(9, 100, 1));
        let s = e.step();
        assert_eq!(s.events, vec![Event::Rejected { id: 9 }]);
        assert!(!e.has_work());
    }

    #[test]
    fn abort_frees_everything() {
        let mut e = Engine::new(prof());
        e.add(spec(1, 40, 100));
        e.step();
        e.add(spec(2, 40, 100));
        assert!(e.abort(2));
        assert!(e.abort(1));
        assert!(!e.abort(1));
        assert_eq!(e.free_blocks, 100);
    }
}
