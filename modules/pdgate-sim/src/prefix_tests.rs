//! The prefix cache's events as the engine produces them.

use pdgate_core::kv::events::{BlockRef, Event, Stored};
use pdgate_core::kv::hash::{BlockHasher, Digest, HashAlgo};

use super::{PrefixCache, MEDIUM};
use crate::model::{Engine, SeqSpec};
use crate::profile::Profile;
use crate::prompt::Hashing;

const BS: usize = 4;

fn prof(blocks: usize) -> Profile {
    Profile {
        block_size: BS,
        num_gpu_blocks: blocks,
        max_num_batched_tokens: 64,
        max_num_seqs: 4,
        enable_prefix_caching: true,
        ..Profile::instant()
    }
}

fn hashing() -> Hashing {
    Hashing::new(HashAlgo::Sha256Cbor, BS, Some("0"))
}

fn spec(id: u64, tokens: Vec<u32>, out: u64) -> SeqSpec {
    SeqSpec {
        id,
        prompt_tokens: tokens.len() as u64,
        blocks: hashing().blocks(&tokens),
        tokens: tokens.into(),
        max_new_tokens: out,
        kv_loaded: false,
        hold_kv: false,
    }
}

fn run(e: &mut Engine) {
    for _ in 0..1000 {
        if !e.has_work() {
            return;
        }
        e.step();
    }
    panic!("the engine does not finish");
}

fn stored(hashes: &[Digest], parent: Option<Digest>, token_ids: Vec<u32>) -> Event {
    Event::Stored(Stored {
        hashes: hashes.iter().copied().map(BlockRef::from_digest).collect(),
        parent: parent.map(BlockRef::from_digest),
        token_ids,
        block_size: BS as u32,
        medium: Some(MEDIUM.into()),
        ..Stored::default()
    })
}

fn removed(hashes: &[Digest]) -> Event {
    Event::Removed {
        hashes: hashes.iter().copied().map(BlockRef::from_digest).collect(),
        medium: Some(MEDIUM.into()),
        group_idx: None,
    }
}

/// The digests a subscriber derives from a `BlockStored`: its token ids
/// chained from its parent with the engine's algorithm, block size and seed.
fn rederive(s: &Stored) -> Vec<Digest> {
    let h = BlockHasher::new(HashAlgo::Sha256Cbor, BS, "0");
    let mut out = Vec::new();
    h.chain(s.parent.and_then(|p| p.digest).as_ref(), &s.token_ids, &mut out);
    out
}

#[test]
fn three_blocks_then_a_shared_prefix_then_an_eviction() {
    let mut e = Engine::new(prof(8));
    e.record_kv_events();
    // 14 tokens: 3 full blocks and 2 tokens; 4 blocks while it runs.
    let a = spec(1, (0..14).collect(), 2);
    let ab = a.blocks.clone();
    assert_eq!(ab.len(), 3);
    e.add(a);
    run(&mut e);
    let ev = e.take_kv_events();
    assert_eq!(ev, vec![stored(&ab, None, (0..12).collect())]);
    let Event::Stored(s) = &ev[0] else { unreachable!() };
    assert_eq!(rederive(s), ab);
    assert!(e.take_kv_events().is_empty(), "taken once");
    assert_eq!(e.cached_blocks(), 3);

    // The same first two blocks, another third: only the third is new,
    // chained from the second.
    let mut t: Vec<u32> = (0..8).collect();
    t.extend(100..106);
    let b = spec(2, t, 1);
    let bb = b.blocks.clone();
    assert_eq!(bb[..2], ab[..2]);
    e.add(b);
    run(&mut e);
    let ev = e.take_kv_events();
    assert_eq!(ev, vec![stored(&bb[2..], Some(ab[1]), (100..104).collect())]);
    let Event::Stored(s) = &ev[0] else { unreachable!() };
    assert_eq!(rederive(s), bb[2..]);
    assert_eq!(e.cached_blocks(), 4);

    // 22 new tokens need 6 of the 8 blocks: 4 are free, so two cached
    // blocks go, as vLLM's free queue orders them: A's third (freed when A
    // finished), then the deepest of those B freed (its own third; the
    // shared first two stay).
    let c = spec(3, (200..222).collect(), 1);
    let cb = c.blocks.clone();
    e.add(c);
    e.step();
    let ev = e.take_kv_events();
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert_eq!(ev[0], removed(&[ab[2], bb[2]]));
    assert_eq!(ev[1], stored(&cb, None, (200..220).collect()));
    run(&mut e);
    assert_eq!(e.cached_blocks(), 2 + 5);
}

#[test]
fn reset_clears_and_keeps_what_sequences_use() {
    let mut e = Engine::new(prof(16));
    e.record_kv_events();
    e.add(spec(1, (0..9).collect(), 1));
    run(&mut e);
    // A long answer keeps its 2 prompt blocks referenced.
    e.add(spec(2, (50..58).collect(), 20));
    e.step();
    assert_eq!(e.cached_blocks(), 4);
    e.take_kv_events();
    // The unreferenced two are freed; the two in use stay with their sequence.
    assert_eq!(e.reset_prefix_cache(), 2);
    assert_eq!(e.cached_blocks(), 0);
    assert!(e.has_kv_events());
    assert_eq!(e.take_kv_events(), vec![Event::Cleared]);
    run(&mut e);
    assert!(e.take_kv_events().is_empty(), "blocks used through the reset are not cached again");
    assert_eq!(e.kv_usage(), 0.0);
    // Every block is free again: a prompt needing all 16 is admitted.
    e.add(spec(3, (300..363).collect(), 1));
    let s = e.step();
    assert_eq!(s.prefill_tokens, 63);
}

#[test]
fn concurrent_equal_prompts_store_once() {
    let mut e = Engine::new(prof(32));
    e.record_kv_events();
    let t: Vec<u32> = (0..9).collect();
    e.add(spec(1, t.clone(), 1));
    e.add(spec(2, t, 1));
    run(&mut e);
    let ev = e.take_kv_events();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(e.cached_blocks(), 2);
}

#[test]
fn nothing_is_recorded_unless_asked() {
    let mut e = Engine::new(prof(8));
    e.add(spec(1, (0..14).collect(), 1));
    run(&mut e);
    assert_eq!(e.cached_blocks(), 3);
    assert!(!e.has_kv_events());
    assert!(e.take_kv_events().is_empty());
    // Tokens are not kept either.
    let d = hashing().blocks(&(0..14).collect::<Vec<_>>())[1];
    assert_eq!(e.reset_prefix_cache(), 3);
    let mut c = PrefixCache::new(BS, false);
    c.insert(d, None, 0, &[1, 2, 3, 4]);
    assert_eq!(c.block(&d), Some((None, &[][..])));
    assert!(c.take_events().is_empty());
}

#[test]
fn cache_records_parents_tokens_and_merges_runs() {
    let h = hashing();
    let toks: Vec<u32> = (0..12).collect();
    let d = h.blocks(&toks);
    let mut c = PrefixCache::new(BS, true);
    for (i, x) in d.iter().enumerate() {
        let parent = i.checked_sub(1).map(|j| d[j]);
        c.insert(*x, parent, i, &toks[i * BS..(i + 1) * BS]);
    }
    assert_eq!(c.block(&d[2]), Some((Some(d[1]), &toks[8..12])));
    assert_eq!(c.take_events(), vec![stored(&d, None, toks.clone())]);
    // Nothing referenced once released: evicted deepest first, one event.
    for x in &d {
        c.release(x, Some(5));
    }
    assert_eq!(c.evictable(), 3);
    assert!(c.evict_one() && c.evict_one());
    assert_eq!(c.take_events(), vec![removed(&[d[2], d[1]])]);
    assert!(c.acquire(&d[0]));
    assert!(!c.evict_one(), "a referenced block stays");
    assert_eq!(c.clear(), 0);
    assert_eq!(c.take_events(), vec![Event::Cleared]);
}
