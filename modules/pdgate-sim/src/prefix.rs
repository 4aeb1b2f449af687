//! The engine's prefix cache: full prompt blocks kept for reuse, keyed by
//! vLLM's chained block hash ([`pdgate_core::kv::hash`]), and, when asked
//! for, the KV cache events vLLM publishes about them
//! ([`pdgate_core::kv::events`]).
//!
//! Per block the cache records its digest, its parent's digest (none for a
//! prompt's first block) and its token ids; a block can be evicted once no
//! sequence references it, in the order vLLM's free queue gives: the block
//! freed longest ago first and, among blocks freed together, the deepest
//! first (vLLM frees a request's blocks tail first, so a prefix outlives
//! its continuations).
//!
//! Events, in the order things happen: `BlockStored` for blocks newly
//! cached (consecutive blocks of one chain share one event, `parent` the
//! block before the first), `BlockRemoved` for evicted blocks (consecutive
//! evictions share one event) and `AllBlocksCleared` for a reset.

use std::collections::HashMap;

use pdgate_core::kv::events::{BlockRef, Event, Stored, MAX_HASHES, MAX_TOKENS};
use pdgate_core::kv::hash::{key64, Digest};

/// What vLLM's events call the GPU's KV cache.
pub const MEDIUM: &str = "GPU";

#[derive(Debug)]
struct Entry {
    /// Sequences using the block.
    refs: u32,
    /// When the last sequence using it let it go.
    freed_at: u64,
    /// The block's index in its prompt.
    depth: usize,
    parent: Option<Digest>,
    /// Its tokens (kept only when events are recorded).
    tokens: Box<[u32]>,
}

/// The cached blocks and the events not yet taken.
#[derive(Debug)]
pub struct PrefixCache {
    entries: HashMap<Digest, Entry>,
    block_size: u32,
    /// `Some` when events are recorded.
    events: Option<Vec<Event>>,
}

impl PrefixCache {
    /// An empty cache of `block_size`-token blocks, recording events when
    /// `record`.
    pub fn new(block_size: usize, record: bool) -> Self {
        PrefixCache {
            entries: HashMap::new(),
            block_size: u32::try_from(block_size).unwrap_or(u32::MAX),
            events: record.then(Vec::new),
        }
    }

    /// Blocks cached, referenced or not.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.entries.contains_key(d)
    }

    /// Blocks no sequence references (free for vLLM's usage gauge).
    pub fn evictable(&self) -> usize {
        self.entries.values().filter(|e| e.refs == 0).count()
    }

    /// Whether events are recorded.
    pub fn records(&self) -> bool {
        self.events.is_some()
    }

    /// A sequence starts using a cached block; false when it is not cached.
    pub fn acquire(&mut self, d: &Digest) -> bool {
        match self.entries.get_mut(d) {
            Some(e) => {
                e.refs += 1;
                true
            }
            None => false,
        }
    }

    /// A sequence stops using a block; the last one to do so at `tick`
    /// makes it evictable from then on (`None`: undoes an [`acquire`]
    /// without changing its place).
    ///
    /// [`acquire`]: PrefixCache::acquire
    pub fn release(&mut self, d: &Digest, tick: Option<u64>) {
        if let Some(e) = self.entries.get_mut(d) {
            e.refs = e.refs.saturating_sub(1);
            if let (0, Some(t)) = (e.refs, tick) {
                e.freed_at = t;
            }
        }
    }

    /// Caches block `depth` of a prompt (its digest, its parent's, its
    /// tokens), referenced once, and records it as stored.
    pub fn insert(&mut self, d: Digest, parent: Option<Digest>, depth: usize, tokens: &[u32]) {
        let kept: Box<[u32]> = if self.events.is_some() { tokens.into() } else { Box::new([]) };
        let bs = self.block_size;
        if let Some(ev) = self.events.as_mut() {
            // Continue the last event when this block follows its last one.
            let joined = match ev.last_mut() {
                Some(Event::Stored(s))
                    if parent.is_some()
                        && s.hashes.last().and_then(|r| r.digest) == parent
                        && s.hashes.len() < MAX_HASHES
                        && s.token_ids.len() + tokens.len() <= MAX_TOKENS =>
                {
                    s.hashes.push(BlockRef::from_digest(d));
                    s.token_ids.extend_from_slice(tokens);
                    true
                }
                _ => false,
            };
            if !joined {
                ev.push(Event::Stored(Stored {
                    hashes: vec![BlockRef::from_digest(d)],
                    parent: parent.map(BlockRef::from_digest),
                    token_ids: tokens.to_vec(),
                    block_size: bs,
                    medium: Some(MEDIUM.into()),
                    ..Stored::default()
                }));
            }
        }
        let e = Entry { refs: 1, freed_at: 0, depth, parent, tokens: kept };
        self.entries.insert(d, e);
    }

    /// Evicts the unreferenced block freed longest ago (the deepest of
    /// those freed together); false when every block is referenced.
    pub fn evict_one(&mut self) -> bool {
        let victim = self
            .entries
            .iter()
            .filter(|(_, e)| e.refs == 0)
            .min_by_key(|(d, e)| (e.freed_at, std::cmp::Reverse(e.depth), key64(d)))
            .map(|(d, _)| *d);
        let Some(d) = victim else { return false };
        self.entries.remove(&d);
        if let Some(ev) = self.events.as_mut() {
            let r = BlockRef::from_digest(d);
            match ev.last_mut() {
                Some(Event::Removed { hashes, .. }) if hashes.len() < MAX_HASHES => hashes.push(r),
                _ => ev.push(Event::Removed {
                    hashes: vec![r],
                    medium: Some(MEDIUM.into()),
                    group_idx: None,
                }),
            }
        }
        true
    }

    /// Forgets every block (vLLM's `reset_prefix_cache`) and records
    /// `AllBlocksCleared`. Returns how many were unreferenced (now free):
    /// the referenced ones stay with their sequences, uncached.
    pub fn clear(&mut self) -> usize {
        let free = self.evictable();
        self.entries.clear();
        if let Some(ev) = self.events.as_mut() {
            ev.push(Event::Cleared);
        }
        free
    }

    /// The events recorded since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Whether events wait to be taken.
    pub fn has_events(&self) -> bool {
        self.events.as_ref().is_some_and(|e| !e.is_empty())
    }

    /// A cached block's parent digest and tokens (tokens are empty unless
    /// events are recorded).
    pub fn block(&self, d: &Digest) -> Option<(Option<Digest>, &[u32])> {
        self.entries.get(d).map(|e| (e.parent, &*e.tokens))
    }
}

#[cfg(test)]
#[path = "prefix_tests.rs"]
mod tests;
