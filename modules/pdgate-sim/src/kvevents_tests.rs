//! The publisher on 127.0.0.1: what a SUB receives, what a replay returns.

use std::time::{Duration, Instant};

use pdgate_core::kv::events::{self, Event, Shape, REPLAY_END};
use pdgate_core::kv::hash::{key64, BlockHasher, HashAlgo};

use super::{Options, Publisher};
use crate::model::{Engine, SeqSpec};
use crate::profile::Profile;
use crate::prompt::Hashing;

const BS: usize = 4;

/// An engine recording events, and the events of two prompts sharing a
/// prefix (one batch per prompt) plus the digests the engine keyed them by.
fn engine_batches(seed: &str) -> (Vec<Vec<Event>>, Vec<Vec<pdgate_core::kv::hash::Digest>>) {
    let prof = Profile {
        block_size: BS,
        num_gpu_blocks: 64,
        enable_prefix_caching: true,
        ..Profile::instant()
    };
    let hashing = Hashing::new(HashAlgo::Sha256Cbor, BS, Some(seed));
    let mut e = Engine::new(prof);
    e.record_kv_events();
    let mut batches = Vec::new();
    let mut digests = Vec::new();
    let prompts: [Vec<u32>; 2] = [(0..14).collect(), (0..8).chain(500..510).collect()];
    for (id, t) in prompts.into_iter().enumerate() {
        let blocks = hashing.blocks(&t);
        digests.push(blocks.clone());
        e.add(SeqSpec {
            id: id as u64,
            prompt_tokens: t.len() as u64,
            blocks,
            tokens: t.into(),
            max_new_tokens: 1,
            kv_loaded: false,
            hold_kv: false,
        });
        while e.has_work() {
            e.step();
        }
        batches.push(e.take_kv_events());
    }
    (batches, digests)
}

fn sub(port: u16, topic: &str) -> (zmq::Context, zmq::Socket) {
    let ctx = zmq::Context::new();
    let s = ctx.socket(zmq::SUB).unwrap();
    s.set_linger(0).unwrap();
    s.set_rcvtimeo(5000).unwrap();
    s.set_subscribe(topic.as_bytes()).unwrap();
    s.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
    (ctx, s)
}

/// Publishes `AllBlocksCleared` probes until the SUB gets one (the slow
/// joiner), then drains the probes in flight; returns the last probe's seq.
fn join(p: &Publisher, s: &zmq::Socket) -> u64 {
    let t0 = Instant::now();
    let mut last = None;
    while last.is_none() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the SUB never joined");
        p.publish(vec![Event::Cleared]);
        if s.poll(zmq::POLLIN, 50).unwrap() > 0 {
            last = Some(s.recv_multipart(0).unwrap());
        }
    }
    while s.poll(zmq::POLLIN, 300).unwrap() > 0 {
        last = Some(s.recv_multipart(0).unwrap());
    }
    events::seq(&last.unwrap()[1]).unwrap()
}

#[test]
fn sub_receives_batches_whose_hashes_rederive() {
    let (batches, digests) = engine_batches("42");
    for (shape, int_hashes) in [(Shape::Array, false), (Shape::Map, true)] {
        let opts = Options { topic: "kv@sim".into(), shape, int_hashes, ..Options::new(0) };
        let p = Publisher::start("127.0.0.1", &opts).unwrap();
        assert_ne!(p.port, 0);
        let (_ctx, s) = sub(p.port, "kv@sim");
        let probe = join(&p, &s);
        for b in &batches {
            p.publish(b.clone());
        }
        let hasher = BlockHasher::new(HashAlgo::Sha256Cbor, BS, "42");
        for (i, b) in batches.iter().enumerate() {
            let f = s.recv_multipart(0).unwrap();
            assert_eq!(f.len(), 3);
            assert_eq!(f[0], b"kv@sim");
            assert_eq!(events::seq(&f[1]), Some(probe + 1 + i as u64));
            let got = events::decode(&f[2]).unwrap();
            assert_eq!(got.dp_rank, Some(0));
            assert_eq!(got.events.len(), b.len());
            let Event::Stored(st) = &got.events[0] else { panic!("{got:?}") };
            assert_eq!(st.block_size, BS as u32);
            assert_eq!(st.medium.as_deref(), Some("GPU"));
            // What a subscriber derives from the token ids is what the
            // engine keyed the blocks by.
            let mut derived = Vec::new();
            let parent = match (i, int_hashes) {
                (0, _) => None,
                (_, false) => st.parent.and_then(|r| r.digest),
                // Int hashes carry no digest: chain from the engine's.
                (_, true) => {
                    assert_eq!(st.parent.map(|r| r.key), Some(key64(&digests[0][1])));
                    Some(digests[0][1])
                }
            };
            hasher.chain(parent.as_ref(), &st.token_ids, &mut derived);
            let keys: Vec<u64> = st.hashes.iter().map(|r| r.key).collect();
            assert_eq!(keys, derived.iter().map(key64).collect::<Vec<_>>());
            // The first prompt stores its 3 blocks, the second the 2 after the
            // shared prefix.
            let want = if i == 0 { &digests[0][..] } else { &digests[1][2..] };
            assert_eq!(derived, want);
            if !int_hashes {
                let ds: Vec<_> = st.hashes.iter().map(|r| r.digest.unwrap()).collect();
                assert_eq!(ds, want);
            } else {
                assert!(st.hashes.iter().all(|r| r.digest.is_none()));
            }
        }
        let c = p.counts();
        assert_eq!((c.batches, c.dropped), (probe + 1 + 2, 0));
    }
}

#[test]
fn another_seed_gives_other_hashes() {
    let (a, _) = engine_batches("0");
    let (b, _) = engine_batches("1");
    assert_ne!(a, b);
    let (c, _) = engine_batches("0");
    assert_eq!(a, c);
}

#[test]
fn replay_returns_kept_batches_then_the_end_marker() {
    let opts = Options { replay_port: Some(0), ..Options::new(0) };
    let p = Publisher::start("127.0.0.1", &opts).unwrap();
    let rport = p.replay_port.unwrap();
    assert_ne!(rport, 0);
    let (batches, _) = engine_batches("0");
    p.publish(batches[0].clone());
    p.publish(batches[1].clone());
    p.publish(vec![Event::Cleared]);
    // The publisher thread keeps them once sent.
    let t0 = Instant::now();
    while p.counts().batches < 3 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
    let ctx = zmq::Context::new();
    let d = ctx.socket(zmq::DEALER).unwrap();
    d.set_linger(0).unwrap();
    d.set_rcvtimeo(5000).unwrap();
    d.connect(&format!("tcp://127.0.0.1:{rport}")).unwrap();
    let replay = |start: u64| -> Vec<(u64, Vec<u8>)> {
        d.send_multipart([&b""[..], &events::replay_request(start)[..]], 0).unwrap();
        let mut out = Vec::new();
        loop {
            let f = d.recv_multipart(0).unwrap();
            assert_eq!(f.len(), 3, "{f:?}");
            assert!(f[0].is_empty());
            if events::is_replay_end(&f[1], &f[2]) {
                assert_eq!(events::seq(&f[1]), Some(REPLAY_END));
                return out;
            }
            out.push((events::seq(&f[1]).unwrap(), f[2].clone()));
        }
    };
    let all = replay(0);
    assert_eq!(all.iter().map(|r| r.0).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(events::decode(&all[0].1).unwrap().events, batches[0]);
    assert_eq!(events::decode(&all[1].1).unwrap().events, batches[1]);
    assert_eq!(events::decode(&all[2].1).unwrap().events, [Event::Cleared]);
    let tail = replay(2);
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0], all[2]);
    assert!(replay(3).is_empty());
    // A malformed request is ignored: the next good one is answered.
    d.send_multipart([&b""[..], &[1u8; 9][..]], 0).unwrap();
    assert_eq!(replay(1).len(), 2);
    assert_eq!(p.counts().replays, 4);
}
