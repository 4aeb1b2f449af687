//! What one engine's KV event batch does to the shared index.
//!
//! - `BlockStored`: pdgate's digests of the stored blocks are derived from
//!   the event's own `token_ids`, chained from the digest the map holds for
//!   the event's `parent_block_hash` (or the root for a first block); each
//!   is mapped from the engine's hash and its key gets the engine's bit.
//!   Blocks whose parent pdgate never saw (it joined late, or the map
//!   evicted it) cannot be keyed and are counted as orphans. Blocks of
//!   another size than pdgate hashes, of a LoRA adapter, with extra keys
//!   (a `cache_salt`, multimodal items), of a tier other
//!   than the GPU (`medium` `CPU`, ...) or of a KV cache group other than
//!   the first are not indexed: a prompt's keys never name them.
//! - `BlockRemoved`: the engine's hashes are looked up in the map and the
//!   engine's bit cleared from their keys.
//! - `AllBlocksCleared`: the engine's bit is cleared everywhere.

use super::events::{decode, Event};
use super::hash::{key64, BlockHasher, Digest};
use super::index::KvIndex;

/// What a batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub stored: u32,
    pub removed: u32,
    /// Stored blocks not indexed: unknown parent.
    pub orphans: u32,
    /// Stored blocks not indexed: LoRA, another tier or cache group.
    pub skipped: u32,
    pub cleared: bool,
    /// The block size of stored events when it is not pdgate's.
    pub foreign_block_size: Option<u32>,
}

/// Decodes `payload` (one msgpack batch) and applies it for engine `bit`.
pub fn apply_batch(
    index: &KvIndex,
    bit: usize,
    hasher: &BlockHasher,
    payload: &[u8],
) -> Result<Applied, String> {
    let batch = decode(payload).map_err(|e| e.to_string())?;
    Ok(apply_events(index, bit, hasher, &batch.events))
}

/// Applies decoded events for engine `bit`.
pub fn apply_events(
    index: &KvIndex,
    bit: usize,
    hasher: &BlockHasher,
    events: &[Event],
) -> Applied {
    let mut a = Applied::default();
    let mut digests: Vec<Digest> = Vec::new();
    let orphans = &index.header.engines[bit.min(super::index::MAX_ENGINES - 1)].orphans;
    for ev in events {
        match ev {
            Event::Stored(s) => {
                let n = s.hashes.len() as u32;
                if s.lora
                    || s.extra
                    || s.group_idx.unwrap_or(0) != 0
                    || !on_gpu(s.medium.as_deref())
                {
                    a.skipped += n;
                    continue;
                }
                if s.block_size as usize != hasher.block_size() {
                    a.foreign_block_size = Some(s.block_size);
                    a.skipped += n;
                    continue;
                }
                let parent = match &s.parent {
                    None => None,
                    Some(p) => match index.map_get(p.key) {
                        Some(d) => Some(d),
                        None => {
                            a.orphans += n;
                            orphans.fetch_add(u64::from(n), std::sync::atomic::Ordering::Relaxed);
                            continue;
                        }
                    },
                };
                digests.clear();
                hasher.chain(parent.as_ref(), &s.token_ids, &mut digests);
                for (h, d) in s.hashes.iter().zip(&digests) {
                    index.map_put(h.key, d);
                    index.store(bit, key64(d));
                    a.stored += 1;
                }
            }
            Event::Removed { hashes, medium, .. } => {
                if !on_gpu(medium.as_deref()) {
                    continue;
                }
                for h in hashes {
                    if let Some(d) = index.map_get(h.key) {
                        index.remove(bit, key64(&d));
                        a.removed += 1;
                    }
                }
            }
            Event::Cleared => {
                index.clear_engine(bit);
                a.cleared = true;
            }
        }
    }
    a
}

/// Blocks in GPU memory (vLLM's `medium`; absent in older versions).
fn on_gpu(medium: Option<&str>) -> bool {
    medium.is_none_or(|m| m.eq_ignore_ascii_case("gpu"))
}

#[cfg(test)]
mod tests {
    use super::super::events::{encode_batch, Batch, BlockRef, Shape, Stored};
    use super::super::hash::HashAlgo;
    use super::super::index::MAX_ENGINES;
    use super::*;

    fn owned() -> super::super::index::tests::Owned {
        super::super::index::tests::Owned::new(1024)
    }

    fn hasher() -> BlockHasher {
        BlockHasher::new(HashAlgo::Sha256Cbor, 4, "0")
    }

    /// An engine that hashes with a secret seed: its block hashes are not
    /// pdgate's, only its token ids tell what the blocks hold.
    fn engine_hashes(tokens: &[u32], parent: Option<&Digest>) -> Vec<Digest> {
        let mut out = Vec::new();
        BlockHasher::new(HashAlgo::Sha256Cbor, 4, "engine's own seed")
            .chain(parent, tokens, &mut out);
        out
    }

    fn stored(hashes: &[Digest], parent: Option<&Digest>, tokens: &[u32]) -> Event {
        let r = |d: &Digest| BlockRef { key: key64(d), digest: Some(*d) };
        Event::Stored(Stored {
            hashes: hashes.iter().map(r).collect(),
            parent: parent.map(r),
            token_ids: tokens.to_vec(),
            block_size: 4,
            ..Stored::default()
        })
    }

    #[test]
    fn stored_blocks_are_keyed_as_requests_are_then_removed() {
        let o = owned();
        let v = o.view();
        let h = hasher();
        let prompt: Vec<u32> = (100..112).collect(); // 3 blocks of 4
        let mut keys = Vec::new();
        h.keys(&prompt, 64, &mut keys);
        assert_eq!(keys.len(), 3);
        // The engine stores the first two blocks, then the third (chained
        // to the second through its own hash), in two events.
        let e = engine_hashes(&prompt, None);
        let a = apply_events(&v, 5, &h, &[stored(&e[..2], None, &prompt[..8])]);
        assert_eq!(a.stored, 2);
        let a = apply_events(&v, 5, &h, &[stored(&e[2..], Some(&e[1]), &prompt[8..])]);
        assert_eq!((a.stored, a.orphans), (1, 0));
        let mut m = [0u32; MAX_ENGINES];
        assert_eq!(v.prefix_match(&keys, &mut m), 3);
        assert_eq!(m[5], 3);
        // The engine evicts the middle block: the match stops before it.
        let removed = Event::Removed {
            hashes: vec![BlockRef { key: key64(&e[1]), digest: None }],
            medium: None,
            group_idx: None,
        };
        let a = apply_events(&v, 5, &h, &[removed]);
        assert_eq!(a.removed, 1);
        v.prefix_match(&keys, &mut m);
        assert_eq!(m[5], 1);
        // And forgets everything.
        assert!(apply_events(&v, 5, &h, &[Event::Cleared]).cleared);
        assert_eq!(v.prefix_match(&keys, &mut m), 0);
    }

    #[test]
    fn orphans_other_sizes_tiers_and_adapters_are_not_indexed() {
        let o = owned();
        let v = o.view();
        let h = hasher();
        let prompt: Vec<u32> = (1..=8).collect();
        let e = engine_hashes(&prompt, None);
        // Parent never seen.
        let a = apply_events(&v, 0, &h, &[stored(&e[1..], Some(&e[0]), &prompt[4..])]);
        assert_eq!((a.stored, a.orphans), (0, 1));
        assert_eq!(o.header.engines[0].orphans.load(std::sync::atomic::Ordering::Relaxed), 1);
        let mut ev = stored(&e[..1], None, &prompt[..4]);
        if let Event::Stored(s) = &mut ev {
            s.block_size = 16;
        }
        let a = apply_events(&v, 0, &h, &[ev]);
        assert_eq!((a.stored, a.foreign_block_size), (0, Some(16)));
        for tweak in 0..4 {
            let mut ev = stored(&e[..1], None, &prompt[..4]);
            if let Event::Stored(s) = &mut ev {
                match tweak {
                    0 => s.medium = Some("CPU".into()),
                    1 => s.lora = true,
                    2 => s.extra = true,
                    _ => s.group_idx = Some(1),
                }
            }
            assert_eq!(apply_events(&v, 0, &h, &[ev]).skipped, 1);
        }
        let mut keys = Vec::new();
        h.keys(&prompt, 64, &mut keys);
        let mut m = [0u32; MAX_ENGINES];
        assert_eq!(v.prefix_match(&keys, &mut m), 0);
    }

    #[test]
    fn a_wire_batch_applies_and_garbage_is_an_error() {
        let o = owned();
        let v = o.view();
        let h = hasher();
        let prompt: Vec<u32> = (7..15).collect();
        let e = engine_hashes(&prompt, None);
        let batch = Batch {
            ts: 1.5,
            events: vec![stored(&e, None, &prompt)],
            dp_rank: Some(0),
            unknown: 0,
        };
        for shape in [Shape::Array, Shape::Map] {
            let bytes = encode_batch(&batch, shape);
            assert_eq!(apply_batch(&v, 2, &h, &bytes).unwrap().stored, 2);
        }
        assert!(apply_batch(&v, 2, &h, b"\xc1garbage").is_err());
    }
}
