use super::*;

/// An index over vectors, as the zone lays it out in shared memory.
pub(crate) struct Owned {
    pub header: Box<KvHeader>,
    pub slots: Vec<Slot>,
    pub map: Vec<MapSlot>,
}

impl Owned {
    pub fn new(capacity: usize) -> Owned {
        Owned {
            header: Box::default(),
            slots: (0..capacity).map(|_| Slot::default()).collect(),
            map: (0..capacity).map(|_| MapSlot::default()).collect(),
        }
    }

    pub fn view(&self) -> KvIndex<'_> {
        let v = KvIndex::new(&self.header, &self.slots, &self.map).expect("geometry");
        assert!(v.attach(7));
        v
    }
}

#[test]
fn geometry_is_checked() {
    let o = Owned::new(64);
    assert!(KvIndex::new(&o.header, &o.slots[..48], &o.map[..48]).is_none());
    assert!(KvIndex::new(&o.header, &o.slots, &o.map[..32]).is_none());
    let v = o.view();
    assert!(v.is_attached());
    // A zone of another capacity is refused.
    assert!(!KvIndex::new(&o.header, &o.slots[..32], &o.map[..32]).unwrap().attach(7));
    assert!(zone_bytes(64) > 64 * 56);
}

#[test]
fn store_lookup_remove_count_blocks() {
    let o = Owned::new(1024);
    let v = o.view();
    v.store(0, 11);
    v.store(3, 11);
    v.store(3, 12);
    v.store(3, 12); // again: no double count
    assert_eq!(v.lookup(11), 0b1001);
    assert_eq!(v.lookup(12), 0b1000);
    assert_eq!(v.lookup(13), 0);
    assert_eq!(v.header.engines[3].blocks.load(Ordering::Relaxed), 2);
    v.remove(3, 11);
    v.remove(3, 11);
    v.remove(5, 99);
    assert_eq!(v.lookup(11), 0b0001);
    assert_eq!(v.header.engines[3].blocks.load(Ordering::Relaxed), 1);
    v.clear_engine(0);
    assert_eq!(v.lookup(11), 0);
    assert_eq!(v.header.engines[0].blocks.load(Ordering::Relaxed), 0);
    // Key 0 is never stored.
    v.store(1, 0);
    assert_eq!(v.lookup(0), 0);
}

#[test]
fn emptied_slots_are_reused_and_full_windows_evict() {
    let o = Owned::new(64);
    let v = o.view();
    // More keys than slots: every lookup still answers, evictions counted.
    for k in 1..=200u64 {
        v.store(1, k);
        assert_eq!(v.lookup(k), 0b10, "key {k} just stored");
    }
    assert!(v.header.evicted.load(Ordering::Relaxed) > 0);
    let held = v.header.engines[1].blocks.load(Ordering::Relaxed);
    assert!(held <= 64, "{held} blocks counted in 64 slots");
    // Removed blocks free their slots for others without evictions.
    let o = Owned::new(64);
    let v = o.view();
    for k in 1..=64u64 {
        v.store(2, k);
    }
    for k in 1..=64u64 {
        v.remove(2, k);
    }
    let before = v.header.evicted.load(Ordering::Relaxed);
    for k in 65..=90u64 {
        v.store(2, k);
    }
    assert_eq!(v.header.evicted.load(Ordering::Relaxed), before);
    assert_eq!(v.header.engines[2].blocks.load(Ordering::Relaxed), 26);
}

#[test]
fn prefix_match_counts_leading_blocks_per_engine() {
    let o = Owned::new(1024);
    let v = o.view();
    // Engine 0 holds blocks 1..=4, engine 1 holds 1, 2 and 4 (not 3),
    // engine 2 holds only 2.
    for k in 1..=4 {
        v.store(0, k);
    }
    for k in [1, 2, 4] {
        v.store(1, k);
    }
    v.store(2, 2);
    let mut out = [0u32; MAX_ENGINES];
    assert_eq!(v.prefix_match(&[1, 2, 3, 4, 5], &mut out), 4);
    assert_eq!(&out[..3], &[4, 2, 0]);
    assert_eq!(v.prefix_match(&[1, 2], &mut out), 2);
    assert_eq!(&out[..3], &[2, 2, 0]);
    assert_eq!(v.prefix_match(&[9, 1], &mut out), 0);
    assert_eq!(out, [0; MAX_ENGINES]);
    assert_eq!(v.prefix_match(&[], &mut out), 0);
}

#[test]
fn engines_claim_release_and_sequence() {
    let o = Owned::new(64);
    let v = o.view();
    let a = v.claim_engine(100).unwrap();
    let b = v.claim_engine(200).unwrap();
    assert_ne!(a, b);
    assert_eq!(v.claim_engine(100), Some(a));
    assert_eq!(v.engine_bit(200), Some(b));
    assert_eq!(v.engine_bit(0), None);
    assert_eq!(v.check_seq(a, 5), SeqCheck::First);
    assert_eq!(v.check_seq(a, 6), SeqCheck::InOrder);
    assert_eq!(v.check_seq(a, 9), SeqCheck::Gap { from: 7 });
    assert_eq!(v.check_seq(a, 10), SeqCheck::InOrder);
    assert_eq!(v.check_seq(a, 0), SeqCheck::Restart);
    assert_eq!(v.check_seq(a, 1), SeqCheck::InOrder);
    v.store(b, 42);
    v.release_engines_except(&[100]);
    assert_eq!(v.engine_bit(200), None);
    assert_eq!(v.lookup(42), 0);
    for p in 1..=(MAX_ENGINES as u64) {
        v.claim_engine(1000 + p);
    }
    assert_eq!(v.claim_engine(5000), None, "all bits taken");
}

#[test]
fn another_hashing_empties_the_zone() {
    let o = Owned::new(64);
    let v = o.view();
    v.store(0, 5);
    assert!(v.attach(7));
    assert_eq!(v.lookup(5), 1);
    assert!(v.attach(8));
    assert_eq!(v.lookup(5), 0);
    assert_ne!(
        hashing_fingerprint("sha256_cbor", "0", 16),
        hashing_fingerprint("sha256_cbor", "0", 32)
    );
    assert_ne!(
        hashing_fingerprint("sha256_cbor", "0", 16),
        hashing_fingerprint("sha256_cbor", "1", 16)
    );
}

#[test]
fn map_round_trips_digests() {
    let o = Owned::new(64);
    let v = o.view();
    let d = Digest::from_slice(&[7u8; 32]).unwrap();
    let e = Digest::from_slice(&[9u8; 16]).unwrap();
    v.map_put(1234, &d);
    v.map_put(99, &e);
    assert_eq!(v.map_get(1234), Some(d));
    assert_eq!(v.map_get(99), Some(e));
    assert_eq!(v.map_get(5), None);
    // Overwrite in place.
    v.map_put(1234, &e);
    assert_eq!(v.map_get(1234), Some(e));
    // Many more than fit: the newest is always found.
    for k in 1..500u64 {
        v.map_put(k * 7919, &d);
        assert_eq!(v.map_get(k * 7919), Some(d));
    }
}

#[test]
fn readers_race_a_writer_without_wrong_engines() {
    let o = Owned::new(256);
    let v = o.view();
    std::thread::scope(|s| {
        s.spawn(|| {
            for round in 0..200u64 {
                for k in 1..=300u64 {
                    v.store((k % 3) as usize, k + round * 1000);
                }
                for k in 1..=300u64 {
                    v.remove((k % 3) as usize, k + round * 1000);
                }
            }
        });
        s.spawn(|| {
            for _ in 0..200 {
                for k in 1..=300u64 {
                    for round in [0u64, 50, 199] {
                        let m = v.lookup(k + round * 1000);
                        assert!(m == 0 || m == 1 << (k % 3), "key {k}: mask {m:b}");
                    }
                }
            }
        });
    });
}
