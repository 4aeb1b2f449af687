use super::*;
use crate::kv::hash::{BlockHasher, HashAlgo};
use rmpv::Value;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn mp(v: Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &v).unwrap();
    out
}

fn s(x: &str) -> Value {
    Value::from(x)
}

fn arr(v: Vec<Value>) -> Value {
    Value::Array(v)
}

fn map(v: Vec<(&str, Value)>) -> Value {
    Value::Map(v.into_iter().map(|(k, v)| (s(k), v)).collect())
}

fn err_of(payload: &[u8]) -> String {
    decode(payload).unwrap_err().to_string()
}

// `python3 scripts/vllm-block-hash.py --events`: msgspec 0.23.0 encodings of
// ts 1.5, [BlockStored(hashes [bytes 0..16], no parent, tokens [1, 2, 300,
// 70000], block size 4, medium "GPU"), BlockRemoved([7, 2**64-1]),
// AllBlocksCleared()], data_parallel_rank 0, in three struct layouts.
const MSGSPEC_ARRAY: &str = "93cb3ff80000000000009398ab426c6f636b53746f72656491c410000102030405060708090a0b0c0d0e0fc0940102cd012cce0001117004c0a3475055c093ac426c6f636b52656d6f7665649207cfffffffffffffffffc091b0416c6c426c6f636b73436c656172656400";
const MSGSPEC_ARRAY10: &str = "93cb3ff8000000000000939aab426c6f636b53746f72656491c410000102030405060708090a0b0c0d0e0fc0940102cd012cce0001117004c0a3475055c0c0c094ac426c6f636b52656d6f7665649207cfffffffffffffffffc0c091b0416c6c426c6f636b73436c656172656400";
const MSGSPEC_MAP: &str = "83a27473cb3ff8000000000000a66576656e74739388a474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391c410000102030405060708090a0b0c0d0e0fb1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f696473940102cd012cce00011170aa626c6f636b5f73697a6504a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65c083a474797065ac426c6f636b52656d6f766564ac626c6f636b5f6861736865739207cfffffffffffffffffa66d656469756dc081a474797065b0416c6c426c6f636b73436c6561726564b2646174615f706172616c6c656c5f72616e6b00";
// b4e69e0's layout: int hashes, no medium, no rank; BlockStored([11,
// 2**64-1], None, [1, 2, 300, 70000], 2, None), BlockRemoved([7]).
const MSGSPEC_V1: &str = "92cb3ff80000000000009396ab426c6f636b53746f726564920bcfffffffffffffffffc0940102cd012cce0001117002c092ac426c6f636b52656d6f766564910791b0416c6c426c6f636b73436c6561726564";

fn sample() -> Batch {
    let d: Vec<u8> = (0..16).collect();
    Batch {
        ts: 1.5,
        events: vec![
            Event::Stored(Stored {
                hashes: vec![BlockRef::from_bytes(&d).unwrap()],
                parent: None,
                token_ids: vec![1, 2, 300, 70000],
                block_size: 4,
                lora: false,
                medium: Some("GPU".into()),
                ..Stored::default()
            }),
            Event::Removed {
                hashes: vec![BlockRef::from_key(7), BlockRef::from_key(u64::MAX)],
                medium: None,
                group_idx: None,
            },
            Event::Cleared,
        ],
        dp_rank: Some(0),
        unknown: 0,
    }
}

#[test]
fn frames() {
    assert_eq!(seq(&[0, 0, 0, 0, 0, 0, 1, 2]), Some(258));
    assert_eq!(seq(&[1; 7]), None);
    assert_eq!(seq(&[1; 9]), None);
    assert!(is_replay_end(&[0xff; 8], b""));
    assert!(!is_replay_end(&[0xff; 8], b"\x90"));
    assert!(!is_replay_end(&[0, 0, 0, 0, 0, 0, 0, 1], b""));
    assert_eq!(seq(&replay_request(42)), Some(42));
}

/// The positional batch written byte by byte from msgpack's spec, as
/// msgspec writes the `array_like` structs: it is what msgspec emitted.
#[test]
fn hand_built_positional_batch_is_msgspecs() {
    let mut b = vec![
        0x93, // batch: array of 3
        0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0,    // ts: float 64, 1.5
        0x93, // events: array of 3
        0x98, // BlockStored: array of 8
        0xab, // fixstr 11
    ];
    b.extend_from_slice(b"BlockStored");
    b.extend_from_slice(&[0x91, 0xc4, 0x10]); // block_hashes: [bin 8, 16 bytes]
    b.extend(0u8..16);
    b.extend_from_slice(&[
        0xc0, // parent_block_hash: nil
        0x94, 0x01, 0x02, // token_ids: [1, 2,
        0xcd, 0x01, 0x2c, // uint 16: 300,
        0xce, 0x00, 0x01, 0x11, 0x70, // uint 32: 70000]
        0x04, // block_size 4
        0xc0, // lora_id nil
        0xa3, b'G', b'P', b'U', // medium "GPU"
        0xc0, // lora_name nil
        0x93, 0xac, // BlockRemoved: array of 3, fixstr 12
    ]);
    b.extend_from_slice(b"BlockRemoved");
    b.extend_from_slice(&[0x92, 0x07, 0xcf]); // block_hashes: [7, uint 64 ...
    b.extend_from_slice(&[0xff; 8]);
    b.extend_from_slice(&[0xc0, 0x91, 0xb0]); // medium nil; AllBlocksCleared: [fixstr 16
    b.extend_from_slice(b"AllBlocksCleared");
    b.push(0x00); // data_parallel_rank 0
    assert_eq!(b, hex(MSGSPEC_ARRAY));
    assert_eq!(decode(&b).unwrap(), sample());
    assert_eq!(encode_batch(&sample(), Shape::Array), b);
}

#[test]
fn msgspec_layouts_decode() {
    for (name, h) in [("array", MSGSPEC_ARRAY), ("array10", MSGSPEC_ARRAY10), ("map", MSGSPEC_MAP)]
    {
        assert_eq!(decode(&hex(h)).unwrap(), sample(), "{name}");
    }
    assert_eq!(encode_batch(&sample(), Shape::Map), hex(MSGSPEC_MAP));
    let v1 = decode(&hex(MSGSPEC_V1)).unwrap();
    let want = Batch {
        ts: 1.5,
        events: vec![
            Event::Stored(Stored {
                hashes: vec![BlockRef::from_key(11), BlockRef::from_key(u64::MAX)],
                parent: None,
                token_ids: vec![1, 2, 300, 70000],
                block_size: 2,
                lora: false,
                medium: None,
                ..Stored::default()
            }),
            Event::Removed { hashes: vec![BlockRef::from_key(7)], medium: None, group_idx: None },
            Event::Cleared,
        ],
        dp_rank: None,
        unknown: 0,
    };
    assert_eq!(v1, want);
}

/// vLLM 0.26.0 as volcano-sh/kthena#1535 quotes it: an array batch of map
/// events, int hashes, fields newer than ours.
#[test]
fn array_batch_of_map_events() {
    let ev = map(vec![
        ("type", s("BlockStored")),
        ("block_hashes", arr(vec![Value::from(15760518052499183552u64)])),
        ("parent_block_hash", Value::Nil),
        ("token_ids", arr((0..16).map(Value::from).collect())),
        ("block_size", Value::from(16)),
        ("lora_id", Value::Nil),
        ("medium", s("GPU")),
        ("lora_name", Value::Nil),
        ("extra_keys", arr(vec![Value::Nil])),
        ("group_idx", Value::from(0)),
        ("kv_cache_spec_kind", s("full_attention")),
    ]);
    let b =
        decode(&mp(arr(vec![Value::F64(1789095808.8378847), arr(vec![ev]), 0.into()]))).unwrap();
    let Event::Stored(st) = &b.events[0] else { panic!("{b:?}") };
    assert_eq!(st.hashes, [BlockRef::from_key(15760518052499183552)]);
    assert_eq!((st.token_ids.len(), st.block_size, st.lora), (16, 16, false));
    assert_eq!((st.extra, st.group_idx), (false, Some(0)));
    assert_eq!(st.medium.as_deref(), Some("GPU"));
    assert_eq!(b.dp_rank, Some(0));
}

#[test]
fn round_trips_both_shapes_both_hash_forms() {
    let h = BlockHasher::new(HashAlgo::Sha256Cbor, 4, "0");
    let mut chain = Vec::new();
    h.chain(None, &[1, 2, 3, 4, 5, 6, 7, 8], &mut chain);
    let mut b = sample();
    b.ts = 1_789_095_808.837_884_7;
    b.dp_rank = Some(70_000);
    b.events.push(Event::Stored(Stored {
        hashes: vec![BlockRef::from_digest(chain[1])],
        parent: Some(BlockRef::from_digest(chain[0])),
        token_ids: vec![5, 6, 7, 8],
        block_size: 4,
        lora: true,
        medium: Some("x".repeat(40)),
        extra: true,
        group_idx: Some(1),
    }));
    b.events.push(Event::Stored(Stored {
        parent: Some(BlockRef::from_key(9)),
        token_ids: (0..300).collect(),
        group_idx: Some(2),
        ..Stored::default()
    }));
    b.events.push(Event::Stored(Stored { extra: true, ..Stored::default() }));
    b.events.push(Event::Removed {
        hashes: (0..20).map(BlockRef::from_key).collect(),
        medium: None,
        group_idx: Some(3),
    });
    for shape in [Shape::Array, Shape::Map] {
        assert_eq!(decode(&encode_batch(&b, shape)).unwrap(), b, "{shape:?}");
        let ints = decode(&encode_batch_with(&b, shape, HashForm::Int)).unwrap();
        let keys = |b: &Batch| -> Vec<Vec<u64>> {
            b.events
                .iter()
                .map(|e| match e {
                    Event::Stored(s) => s.hashes.iter().chain(&s.parent).map(|r| r.key).collect(),
                    Event::Removed { hashes, .. } => hashes.iter().map(|r| r.key).collect(),
                    Event::Cleared => vec![],
                })
                .collect()
        };
        assert_eq!(keys(&ints), keys(&b), "{shape:?} ints");
        assert!(ints.events.iter().all(|e| match e {
            Event::Stored(s) => s.hashes.iter().chain(&s.parent).all(|r| r.digest.is_none()),
            _ => true,
        }));
    }
    let empty = Batch::default();
    for shape in [Shape::Array, Shape::Map] {
        assert_eq!(decode(&encode_batch(&empty, shape)).unwrap(), empty);
    }
}

#[test]
fn event_digests_chain_like_the_hasher() {
    // An event carrying digests: its token_ids, chained from its parent's
    // digest, give back its hashes.
    let h = BlockHasher::new(HashAlgo::XxhashCbor, 2, "42");
    let tokens = [10, 20, 30, 40, 50, 60];
    let mut chain = Vec::new();
    h.chain(None, &tokens, &mut chain);
    let ev = Stored {
        hashes: chain[1..].iter().copied().map(BlockRef::from_digest).collect(),
        parent: Some(BlockRef::from_digest(chain[0])),
        token_ids: tokens[2..].to_vec(),
        block_size: 2,
        ..Stored::default()
    };
    let b = Batch { events: vec![Event::Stored(ev)], ..Batch::default() };
    let got = decode(&encode_batch(&b, Shape::Map)).unwrap();
    let Event::Stored(st) = &got.events[0] else { panic!() };
    let mut again = Vec::new();
    h.chain(st.parent.and_then(|p| p.digest).as_ref(), &st.token_ids, &mut again);
    let refs: Vec<_> = again.into_iter().map(BlockRef::from_digest).collect();
    assert_eq!(refs, st.hashes);
}

#[test]
fn hash_values() {
    let one = |h: Value| -> Result<BlockRef, String> {
        let ev = arr(vec![s("BlockRemoved"), arr(vec![h])]);
        match decode(&mp(arr(vec![1.0.into(), arr(vec![ev])]))) {
            Ok(b) => match &b.events[0] {
                Event::Removed { hashes, .. } => Ok(hashes[0]),
                e => panic!("{e:?}"),
            },
            Err(e) => Err(e.to_string()),
        }
    };
    assert_eq!(one(Value::from(-1i64)), Ok(BlockRef::from_key(u64::MAX)));
    assert_eq!(one(Value::from(i64::MIN)), Ok(BlockRef::from_key(1 << 63)));
    assert_eq!(one(Value::from(5u8)), Ok(BlockRef::from_key(5)));
    let short = one(Value::Binary(vec![1, 2, 3])).unwrap();
    assert_eq!((short.key, short.digest.map(|d| d.len())), (0x010203, Some(3)));
    let long: Vec<u8> = (0..40).collect();
    let r = one(Value::Binary(long)).unwrap();
    assert_eq!((r.key, r.digest), (0x2021_2223_2425_2627, None));
    let bad = "event 0: BlockRemoved block_hashes[0] is not bytes or an integer";
    assert_eq!(one(Value::Binary(vec![])).unwrap_err(), bad);
    assert_eq!(one(s("ab")).unwrap_err(), bad);
    assert_eq!(one(Value::F64(1.0)).unwrap_err(), bad);
}

#[test]
fn optional_fields_may_be_missing() {
    // Map events with only their required fields; a map batch without rank.
    let stored = map(vec![
        ("type", s("BlockStored")),
        ("block_hashes", arr(vec![1.into()])),
        ("token_ids", arr(vec![1.into(), 2.into()])),
        ("block_size", 2.into()),
    ]);
    let removed = map(vec![("type", s("BlockRemoved")), ("block_hashes", arr(vec![]))]);
    let b =
        decode(&mp(map(vec![("events", arr(vec![stored, removed])), ("ts", 2.into())]))).unwrap();
    assert_eq!((b.ts, b.dp_rank, b.unknown), (2.0, None, 0));
    let want = Stored {
        hashes: vec![BlockRef::from_key(1)],
        token_ids: vec![1, 2],
        block_size: 2,
        ..Stored::default()
    };
    assert_eq!(
        b.events,
        [Event::Stored(want), Event::Removed { hashes: vec![], medium: None, group_idx: None }]
    );
    // Positional: old BlockStored (5 fields), BlockRemoved without medium,
    // a nil rank; lora_name alone marks LoRA.
    let old =
        arr(vec![s("BlockStored"), arr(vec![]), Value::Nil, arr(vec![]), 16.into(), 3.into()]);
    let named = arr(vec![
        s("BlockStored"),
        arr(vec![]),
        Value::Nil,
        arr(vec![]),
        16.into(),
        Value::Nil,
        Value::Nil,
        s("adapter"),
    ]);
    let b = decode(&mp(arr(vec![Value::F32(0.5), arr(vec![old, named]), Value::Nil]))).unwrap();
    assert_eq!((b.ts, b.dp_rank), (0.5, None));
    for e in &b.events {
        let Event::Stored(st) = e else { panic!() };
        assert!(st.lora && st.medium.is_none());
    }
}

#[test]
fn extra_keys_mark_blocks_hashed_with_more_than_tokens() {
    let stored = |extra: Value| {
        let ev = map(vec![
            ("type", s("BlockStored")),
            ("block_hashes", arr(vec![1.into(), 2.into()])),
            ("token_ids", arr(vec![])),
            ("block_size", 16.into()),
            ("extra_keys", extra),
        ]);
        match decode(&mp(arr(vec![1.into(), arr(vec![ev])]))).unwrap().events.remove(0) {
            Event::Stored(s) => s.extra,
            e => panic!("{e:?}"),
        }
    };
    assert!(!stored(Value::Nil));
    assert!(!stored(arr(vec![Value::Nil, Value::Nil])));
    assert!(stored(arr(vec![arr(vec![s("salt")]), Value::Nil])));
    assert!(stored(arr(vec![Value::Nil, arr(vec![arr(vec![s("mm-hash"), 0.into()])])])));
}

#[test]
fn unknown_tags_keys_and_trailing_fields_are_skipped() {
    let events = arr(vec![
        arr(vec![s("BlockMoved"), 1.into()]),
        map(vec![("type", s("SomethingNew")), ("x", 1.into())]),
        arr(vec![s("AllBlocksCleared"), s("future"), 3.into()]),
        map(vec![("type", s("AllBlocksCleared")), ("group_idx", 1.into())]),
        arr(vec![s("BlockRemoved"), arr(vec![4.into()]), s("CPU"), 0.into(), s("more")]),
    ]);
    let mut m = vec![("ts", 1.into()), ("events", events), ("data_parallel_rank", 2.into())];
    m.push(("new_field", arr(vec![])));
    let mut v = map(m);
    if let Value::Map(m) = &mut v {
        m.push((Value::from(7), Value::Nil)); // a key that is not a string
    }
    let b = decode(&mp(v)).unwrap();
    assert_eq!(b.unknown, 2);
    assert_eq!(b.dp_rank, Some(2));
    let removed = Event::Removed {
        hashes: vec![BlockRef::from_key(4)],
        medium: Some("CPU".into()),
        group_idx: Some(0),
    };
    assert_eq!(b.events, [Event::Cleared, Event::Cleared, removed]);
}

#[test]
fn refusals_name_the_problem() {
    let batch = |events: Vec<Value>| mp(arr(vec![1.0.into(), arr(events)]));
    let stored = |f: Vec<Value>| {
        let mut a = vec![s("BlockStored")];
        a.extend(f);
        batch(vec![arr(vec![s("AllBlocksCleared")]), arr(a)])
    };
    let ok = || vec![arr(vec![1.into()]), Value::Nil, arr(vec![1.into()]), 1.into()];
    let with = |i: usize, v: Value| {
        let mut f = ok();
        f[i] = v;
        stored(f)
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "payload is not msgpack: truncated"),
        (vec![0x93, 0x01], "payload is not msgpack: truncated"),
        (vec![0xc1], "payload is not msgpack: marker 0xc1"),
        (vec![0x90, 0x90], "payload is not msgpack: bytes after the batch"),
        (vec![0xdd, 0xff, 0xff, 0xff, 0xff, 0x00], "payload is not msgpack: truncated"),
        (vec![0xc6, 0xff, 0xff, 0xff, 0xff, 0x00], "payload is not msgpack: truncated"),
        (mp(s("x")), "batch is neither an array nor a map"),
        (mp(arr(vec![])), "batch has no ts"),
        (mp(arr(vec![s("1")])), "batch ts is not a number"),
        (mp(arr(vec![1.into()])), "batch has no events"),
        (mp(arr(vec![1.into(), 2.into()])), "batch events is not a list"),
        (
            mp(arr(vec![1.into(), arr(vec![]), (-1).into()])),
            "batch data_parallel_rank is not a 32-bit unsigned integer",
        ),
        (
            mp(arr(vec![1.into(), arr(vec![]), (1u64 << 32).into()])),
            "batch data_parallel_rank is not a 32-bit unsigned integer",
        ),
        (mp(map(vec![("ts", 1.into())])), "batch has no events"),
        (batch(vec![5.into()]), "event 0: is neither an array nor a map"),
        (batch(vec![arr(vec![])]), "event 0: is an empty array"),
        (batch(vec![arr(vec![1.into()])]), "event 0: the tag is not a string"),
        (batch(vec![map(vec![("x", 1.into())])]), "event 0: has no type"),
        (batch(vec![map(vec![("type", 1.into())])]), "event 0: type is not a string"),
        (stored(vec![]), "event 1: BlockStored has no block_hashes"),
        (with(0, 1.into()), "event 1: BlockStored block_hashes is not a list"),
        (with(1, s("p")), "event 1: BlockStored parent_block_hash is not bytes or an integer"),
        (with(2, Value::Nil), "event 1: BlockStored has no token_ids"),
        (with(2, arr(vec![s("a")])), "event 1: BlockStored token_ids is not a list of integers"),
        (
            with(2, arr(vec![(-1).into()])),
            "event 1: BlockStored token_ids is not a list of integers",
        ),
        (
            with(2, arr(vec![(1u64 << 32).into()])),
            "event 1: BlockStored token_ids is not a list of integers",
        ),
        (with(2, 3.into()), "event 1: BlockStored token_ids is not a list of integers"),
        (with(3, Value::Nil), "event 1: BlockStored block_size is not a 32-bit unsigned integer"),
        (with(3, (-4).into()), "event 1: BlockStored block_size is not a 32-bit unsigned integer"),
        (
            stored([ok(), vec![Value::Nil, 5.into()]].concat()),
            "event 1: BlockStored medium is not a string",
        ),
        (batch(vec![arr(vec![s("BlockRemoved")])]), "event 0: BlockRemoved has no block_hashes"),
    ];
    for (payload, want) in cases {
        assert_eq!(err_of(&payload), want, "{payload:02x?}");
    }
    // Invalid UTF-8 in medium.
    let mut f = ok();
    f.extend([Value::Nil, s("GP")]);
    let mut p = stored(f);
    let at = p.windows(2).rposition(|w| w == b"GP").unwrap();
    p[at] = 0xff;
    assert_eq!(err_of(&p), "event 1: BlockStored medium is not valid UTF-8");
}

#[test]
fn bounds() {
    let events = |n: usize| mp(arr(vec![1.into(), arr(vec![arr(vec![s("AllBlocksCleared")]); n])]));
    assert_eq!(decode(&events(MAX_EVENTS)).unwrap().events.len(), MAX_EVENTS);
    assert_eq!(err_of(&events(MAX_EVENTS + 1)), format!("batch has more than {MAX_EVENTS} events"));
    let removed = |n: usize| {
        let ev = arr(vec![s("BlockRemoved"), arr(vec![1.into(); n])]);
        mp(arr(vec![1.into(), arr(vec![ev])]))
    };
    assert!(decode(&removed(MAX_HASHES)).is_ok());
    assert_eq!(
        err_of(&removed(MAX_HASHES + 1)),
        format!("event 0: BlockRemoved has more than {MAX_HASHES} block_hashes")
    );
    let stored = |n: usize| {
        let ev =
            arr(vec![s("BlockStored"), arr(vec![]), Value::Nil, arr(vec![7.into(); n]), 16.into()]);
        mp(arr(vec![1.into(), arr(vec![ev])]))
    };
    assert!(decode(&stored(MAX_TOKENS)).is_ok());
    assert_eq!(
        err_of(&stored(MAX_TOKENS + 1)),
        format!("event 0: BlockStored has more than {MAX_TOKENS} token_ids")
    );
    // Values: counted before anything is built, whatever the shape.
    let flat = mp(arr(vec![Value::Nil; MAX_VALUES]));
    assert_eq!(err_of(&flat), format!("payload has more than {MAX_VALUES} msgpack values"));
    // Nesting: MAX_DEPTH arrays are fine (the batch is refused for its shape).
    let nest = |n: usize| [vec![0x91; n], vec![0xc0]].concat();
    assert_eq!(err_of(&nest(MAX_DEPTH)), "batch ts is not a number");
    assert_eq!(err_of(&nest(MAX_DEPTH + 1)), format!("payload is nested deeper than {MAX_DEPTH}"));
    assert_eq!(err_of(&nest(100_000)), format!("payload is nested deeper than {MAX_DEPTH}"));
}

#[test]
fn garbage_never_panics() {
    // Every prefix and a few byte flips of valid payloads.
    let mut inputs = vec![hex(MSGSPEC_ARRAY), hex(MSGSPEC_MAP), hex(MSGSPEC_V1)];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for base in inputs.clone() {
        for cut in 0..base.len() {
            let _ = decode(&base[..cut]);
        }
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut m = base.clone();
            let at = (x as usize) % m.len();
            m[at] = (x >> 32) as u8;
            inputs.push(m);
        }
    }
    for i in &inputs {
        if let Ok(b) = decode(i) {
            let again = decode(&encode_batch(&b, Shape::Map)).unwrap();
            assert_eq!(again.events, b.events);
        }
    }
}
