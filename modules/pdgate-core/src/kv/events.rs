//! vLLM's KV cache events: the batches an engine publishes on its ZMQ PUB
//! socket (`--kv-events-config`), decoded ([`decode`]) and encoded
//! ([`encode_batch`], for the engine simulator and tests).
//!
//! Wire format (`vllm/distributed/kv_events.py` @ `0181ea31` and, older,
//! @ `b4e69e0a`; msgspec structs encoded as msgpack):
//!
//! - A message is three frames: the topic, the sequence number (8 bytes
//!   big-endian, [`seq`]; from 0 per engine process, +1 per batch) and the
//!   payload, one batch. A replay reply (ROUTER socket) is `seq, payload`; it
//!   ends with seq `-1` (all 0xFF) and an empty payload ([`is_replay_end`]).
//! - A batch is `[ts, events, data_parallel_rank]` (positional; the rank is
//!   missing in old versions) or the map `{ts, events, data_parallel_rank}`.
//! - An event is positional with its tag first (`array_like`, older vLLM):
//!   `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
//!   lora_id, medium, lora_name, extra_keys, group_idx, ...]`,
//!   `["BlockRemoved", block_hashes, medium, group_idx]`, `["AllBlocksCleared"]`;
//!   or a map with the tag under `"type"` and the same names (since vLLM PR
//!   #42892; with `omit_defaults` a defaulted field may be missing). Releases
//!   have sent an array batch of map events, which decodes the same way.
//! - Read from `BlockStored`: the hashes, parent, tokens and block size,
//!   whether a LoRA adapter (`lora_id`/`lora_name`) or `extra_keys` entered
//!   the hashes, `medium` and `group_idx`; from `BlockRemoved`: the hashes,
//!   `medium` and `group_idx`. `kv_cache_spec_*` and the rest are ignored.
//! - A block hash is the raw digest (bin; see [`super::hash`]) or, with
//!   `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES` and in old versions, an int: the
//!   digest's low 64 bits, or a signed 64-bit Python `hash()`.
//!
//! The payload comes from an engine over the network: decoding never panics,
//! any field vLLM may have added is ignored, and everything is bounded. A
//! pass over the raw bytes ([`MAX_VALUES`], [`MAX_DEPTH`]) comes before
//! `rmpv` builds anything, then the counts of events, hashes and tokens are
//! checked. An event with an unknown tag is skipped and counted.

use super::hash::{key64, key64_bytes, Digest};
use rmpv::Value;
use std::fmt;

/// Events in one batch.
pub const MAX_EVENTS: usize = 4_096;
/// Block hashes in one event (a whole long prompt arriving at once, e.g. the
/// decode engine receiving a prefill's KV: 16,384 blocks of 16 tokens).
pub const MAX_HASHES: usize = 16_384;
/// Token ids in one `BlockStored`.
pub const MAX_TOKENS: usize = 262_144;
/// msgpack values (each array, map, key, scalar) in one payload: what the
/// decoded tree may hold, whatever the lengths in the headers claim.
pub const MAX_VALUES: usize = 1 << 20;
/// Nesting of arrays and maps (vLLM's deepest is 6, inside `extra_keys`).
pub const MAX_DEPTH: usize = 16;

/// The sequence number of the replay end marker (`-1` as 8 signed bytes).
pub const REPLAY_END: u64 = u64::MAX;

/// The sequence number in a message's second frame (8 bytes, big-endian).
pub fn seq(frame: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(frame).ok().map(u64::from_be_bytes)
}

/// Whether a replay reply (`seq`, `payload`) is the end marker.
pub fn is_replay_end(seq_frame: &[u8], payload: &[u8]) -> bool {
    seq(seq_frame) == Some(REPLAY_END) && payload.is_empty()
}

/// The one frame of a replay request: replay every kept batch from `start`.
pub fn replay_request(start: u64) -> [u8; 8] {
    start.to_be_bytes()
}

/// One batch of events, as published in one message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    /// The engine's clock (seconds since the epoch) when the batch was made.
    pub ts: f64,
    pub events: Vec<Event>,
    /// `data_parallel_rank` (one publisher per rank, ports offset by it).
    pub dp_rank: Option<u32>,
    /// Events skipped for an unknown tag (not encoded).
    pub unknown: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `BlockStored`: blocks newly cached.
    Stored(Stored),
    /// `BlockRemoved`: blocks evicted (`medium` and `group_idx` as in
    /// [`Stored`]).
    Removed { hashes: Vec<BlockRef>, medium: Option<String>, group_idx: Option<u32> },
    /// `AllBlocksCleared`: the engine's prefix cache was reset.
    Cleared,
}

/// A `BlockStored` event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stored {
    /// The stored blocks, in chain order.
    pub hashes: Vec<BlockRef>,
    /// The block before the first one (`None`: the first is a prompt's first).
    pub parent: Option<BlockRef>,
    /// The tokens of all the blocks, `block_size` each.
    pub token_ids: Vec<u32>,
    pub block_size: u32,
    /// A `lora_id` or `lora_name` was given: the hashes include the adapter's
    /// name, so they differ from the hashes of the same tokens without it.
    pub lora: bool,
    /// Where the blocks live (`"GPU"`, `"CPU"`, ...), when given.
    pub medium: Option<String>,
    /// `extra_keys` names at least one block: its hash covers more than its
    /// tokens (multimodal items, a `cache_salt`, a LoRA name, prompt
    /// embeddings), so hashing `token_ids` alone does not give it.
    pub extra: bool,
    /// The KV cache group (hybrid models hash each group apart), when given.
    pub group_idx: Option<u32>,
}

/// A block hash from an event: its 64-bit key (the index's key) and, when
/// the event carried the digest's bytes (at most 32), the digest itself, to
/// chain from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockRef {
    pub key: u64,
    pub digest: Option<Digest>,
}

impl BlockRef {
    /// A digest and its key ([`key64`]).
    pub fn from_digest(d: Digest) -> Self {
        BlockRef { key: key64(&d), digest: Some(d) }
    }

    /// A key alone (an int hash).
    pub fn from_key(key: u64) -> Self {
        BlockRef { key, digest: None }
    }

    /// A hash sent as bytes: the key from the last 8, the digest when it is
    /// at most 32 bytes long; `None` when empty.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.is_empty() {
            return None;
        }
        Some(BlockRef { key: key64_bytes(b), digest: Digest::from_slice(b) })
    }
}

/// Why a payload was refused: the event's index (when one event is at
/// fault) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsError {
    pub event: Option<usize>,
    pub msg: String,
}

impl fmt::Display for EventsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.event {
            Some(i) => write!(f, "event {i}: {}", self.msg),
            None => f.write_str(&self.msg),
        }
    }
}

impl std::error::Error for EventsError {}

fn batch_err(msg: impl Into<String>) -> EventsError {
    EventsError { event: None, msg: msg.into() }
}

/// Decodes one payload (the third frame).
pub fn decode(payload: &[u8]) -> Result<Batch, EventsError> {
    prescan(payload)?;
    let mut rd = payload;
    // The prescan bounds the depth already; rmpv counts about two of its
    // levels per container.
    let v = rmpv::decode::read_value_with_max_depth(&mut rd, 4 * MAX_DEPTH + 8)
        .map_err(|e| batch_err(format!("payload is not msgpack: {e}")))?;
    let (ts, events, rank) = match &v {
        Value::Array(a) => (a.first(), a.get(1), a.get(2)),
        Value::Map(m) => (field(m, "ts"), field(m, "events"), field(m, "data_parallel_rank")),
        _ => return Err(batch_err("batch is neither an array nor a map")),
    };
    let ts = match ts {
        Some(Value::F64(x)) => *x,
        Some(Value::F32(x)) => f64::from(*x),
        Some(Value::Integer(i)) => i.as_f64().unwrap_or(0.0),
        Some(_) => return Err(batch_err("batch ts is not a number")),
        None => return Err(batch_err("batch has no ts")),
    };
    let dp_rank = match rank {
        None | Some(Value::Nil) => None,
        Some(v) => match v.as_u64().and_then(|r| u32::try_from(r).ok()) {
            Some(r) => Some(r),
            None => {
                return Err(batch_err("batch data_parallel_rank is not a 32-bit unsigned integer"))
            }
        },
    };
    let events = match events {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(batch_err("batch events is not a list")),
        None => return Err(batch_err("batch has no events")),
    };
    if events.len() > MAX_EVENTS {
        return Err(batch_err(format!("batch has more than {MAX_EVENTS} events")));
    }
    let mut b = Batch { ts, events: Vec::with_capacity(events.len()), dp_rank, unknown: 0 };
    for (i, e) in events.iter().enumerate() {
        match event(e).map_err(|msg| EventsError { event: Some(i), msg })? {
            Some(e) => b.events.push(e),
            None => b.unknown += 1,
        }
    }
    Ok(b)
}

/// The value of the last member named `name` (keys that are not strings are
/// ignored).
fn field<'a>(m: &'a [(Value, Value)], name: &str) -> Option<&'a Value> {
    m.iter().rev().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v)
}

/// An event's fields: positional after the tag, or named.
enum Fields<'a> {
    Pos(&'a [Value]),
    Named(&'a [(Value, Value)]),
}

impl<'a> Fields<'a> {
    /// Field `pos` (1-based: after the tag) or `name`; nil reads as absent.
    fn get(&self, pos: usize, name: &str) -> Option<&'a Value> {
        let v = match self {
            Fields::Pos(a) => a.get(pos),
            Fields::Named(m) => field(m, name),
        };
        v.filter(|v| !v.is_nil())
    }
}

/// One event; `Ok(None)` for an unknown tag.
fn event(v: &Value) -> Result<Option<Event>, String> {
    let (tag, f) = match v {
        Value::Array(a) => match a.first() {
            Some(t) => (t.as_str().ok_or("the tag is not a string")?, Fields::Pos(a)),
            None => return Err("is an empty array".into()),
        },
        Value::Map(m) => match field(m, "type") {
            Some(t) => (t.as_str().ok_or("type is not a string")?, Fields::Named(m)),
            None => return Err("has no type".into()),
        },
        _ => return Err("is neither an array nor a map".into()),
    };
    match tag {
        "BlockStored" => {
            let hashes = hash_list(tag, f.get(1, "block_hashes"))?;
            let parent = match f.get(2, "parent_block_hash") {
                None => None,
                Some(v) => Some(block_ref(v).ok_or_else(|| {
                    format!("{tag} parent_block_hash is not bytes or an integer")
                })?),
            };
            let token_ids = tokens(tag, f.get(3, "token_ids"))?;
            let block_size = f
                .get(4, "block_size")
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("{tag} block_size is not a 32-bit unsigned integer"))?;
            let lora = f.get(5, "lora_id").is_some() || f.get(7, "lora_name").is_some();
            let medium = medium(tag, f.get(6, "medium"))?;
            // One entry per block, nil for a block without extra keys.
            let extra = match f.get(8, "extra_keys") {
                None => false,
                Some(Value::Array(a)) => a.iter().any(|k| !k.is_nil()),
                Some(_) => true,
            };
            let group_idx = group(tag, f.get(9, "group_idx"))?;
            let s =
                Stored { hashes, parent, token_ids, block_size, lora, medium, extra, group_idx };
            Ok(Some(Event::Stored(s)))
        }
        "BlockRemoved" => {
            let hashes = hash_list(tag, f.get(1, "block_hashes"))?;
            let medium = medium(tag, f.get(2, "medium"))?;
            let group_idx = group(tag, f.get(3, "group_idx"))?;
            Ok(Some(Event::Removed { hashes, medium, group_idx }))
        }
        "AllBlocksCleared" => Ok(Some(Event::Cleared)),
        _ => Ok(None),
    }
}

/// A block hash: bytes, or an int (signed ones as their two's complement).
fn block_ref(v: &Value) -> Option<BlockRef> {
    match v {
        Value::Binary(b) => BlockRef::from_bytes(b),
        Value::Integer(i) => {
            i.as_u64().or_else(|| i.as_i64().map(|x| x as u64)).map(BlockRef::from_key)
        }
        _ => None,
    }
}

fn hash_list(tag: &str, v: Option<&Value>) -> Result<Vec<BlockRef>, String> {
    let Some(v) = v else { return Err(format!("{tag} has no block_hashes")) };
    let a = v.as_array().ok_or_else(|| format!("{tag} block_hashes is not a list"))?;
    if a.len() > MAX_HASHES {
        return Err(format!("{tag} has more than {MAX_HASHES} block_hashes"));
    }
    a.iter()
        .enumerate()
        .map(|(i, h)| {
            block_ref(h)
                .ok_or_else(|| format!("{tag} block_hashes[{i}] is not bytes or an integer"))
        })
        .collect()
}

fn tokens(tag: &str, v: Option<&Value>) -> Result<Vec<u32>, String> {
    let Some(v) = v else { return Err(format!("{tag} has no token_ids")) };
    let not_list = || format!("{tag} token_ids is not a list of integers");
    let a = v.as_array().ok_or_else(not_list)?;
    if a.len() > MAX_TOKENS {
        return Err(format!("{tag} has more than {MAX_TOKENS} token_ids"));
    }
    a.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()).ok_or_else(not_list)).collect()
}

fn medium(tag: &str, v: Option<&Value>) -> Result<Option<String>, String> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) => match s.as_str() {
            Some(s) => Ok(Some(s.to_owned())),
            None => Err(format!("{tag} medium is not valid UTF-8")),
        },
        Some(_) => Err(format!("{tag} medium is not a string")),
    }
}

fn group(tag: &str, v: Option<&Value>) -> Result<Option<u32>, String> {
    match v {
        None => Ok(None),
        Some(v) => match v.as_u64().and_then(|g| u32::try_from(g).ok()) {
            Some(g) => Ok(Some(g)),
            None => Err(format!("{tag} group_idx is not a 32-bit unsigned integer")),
        },
    }
}

/// Checks, before anything is allocated, that `data` is exactly one msgpack
/// value of at most [`MAX_VALUES`] values nested at most [`MAX_DEPTH`] deep,
/// every length within the bytes at hand.
fn prescan(data: &[u8]) -> Result<(), EventsError> {
    // Values still to read at each open level; the payload itself is one.
    let mut pending = [0usize; MAX_DEPTH + 1];
    let mut depth = 0;
    pending[0] = 1;
    let mut at = 0;
    let mut values = 0;
    let truncated = || batch_err("payload is not msgpack: truncated");
    loop {
        while pending[depth] == 0 {
            if depth == 0 {
                return if at == data.len() {
                    Ok(())
                } else {
                    Err(batch_err("payload is not msgpack: bytes after the batch"))
                };
            }
            depth -= 1;
        }
        pending[depth] -= 1;
        values += 1;
        if values > MAX_VALUES {
            return Err(batch_err(format!("payload has more than {MAX_VALUES} msgpack values")));
        }
        let m = *data.get(at).ok_or_else(truncated)?;
        at += 1;
        // Big-endian length of n bytes at `at`.
        let len = |n: usize| -> Result<usize, EventsError> {
            let b = data.get(at..at + n).ok_or_else(truncated)?;
            Ok(b.iter().fold(0usize, |l, &x| (l << 8) | usize::from(x)))
        };
        // (bytes to skip, child values)
        let (skip, children) = match m {
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => (0, 0),
            0x80..=0x8f => (0, 2 * usize::from(m & 0x0f)),
            0x90..=0x9f => (0, usize::from(m & 0x0f)),
            0xa0..=0xbf => (usize::from(m & 0x1f), 0),
            0xc4 | 0xd9 => (1 + len(1)?, 0),
            0xc5 | 0xda => (2 + len(2)?, 0),
            0xc6 | 0xdb => (4 + len(4)?, 0),
            0xc7 => (2 + len(1)?, 0),
            0xc8 => (3 + len(2)?, 0),
            0xc9 => (5 + len(4)?, 0),
            0xca | 0xce | 0xd2 => (4, 0),
            0xcb | 0xcf | 0xd3 => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (2, len(2)?),
            0xdd => (4, len(4)?),
            0xde => (2, 2 * len(2)?),
            0xdf => (4, 2 * len(4)?),
            0xc1 => return Err(batch_err("payload is not msgpack: marker 0xc1")),
        };
        at = at.checked_add(skip).filter(|&e| e <= data.len()).ok_or_else(truncated)?;
        if children > 0 {
            // Each value takes at least one byte.
            if children > data.len() - at {
                return Err(truncated());
            }
            if depth == MAX_DEPTH {
                return Err(batch_err(format!("payload is nested deeper than {MAX_DEPTH}")));
            }
            depth += 1;
            pending[depth] = children;
        }
    }
}

/// The two encodings vLLM has used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `array_like`: a positional batch of positional events, tag first.
    Array,
    /// A map batch of map events tagged under `"type"` (vLLM @ `0181ea31`).
    Map,
}

/// How [`encode_batch_with`] writes block hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashForm {
    /// The digest's bytes (vLLM's default); a hash known only by its key is
    /// written as an int.
    #[default]
    Bytes,
    /// Ints (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`): the keys alone.
    Int,
}

/// A batch as vLLM's msgspec encodes it, hashes as bytes: the layout of
/// `BlockStored` is `block_hashes, parent_block_hash, token_ids, block_size,
/// lora_id, medium, lora_name` (`lora` is written as `lora_id` 1), then
/// `extra_keys` (when `extra`: a salt on the first block) and `group_idx`
/// when given; that of `BlockRemoved` is `block_hashes, medium`, then
/// `group_idx` when given; `data_parallel_rank` is written when known.
/// [`decode`] gives the batch back (less `unknown`) as long as every
/// [`BlockRef`]'s key is its digest's key.
pub fn encode_batch(b: &Batch, shape: Shape) -> Vec<u8> {
    encode_batch_with(b, shape, HashForm::Bytes)
}

/// [`encode_batch`], with the block hashes written as `hashes` says.
pub fn encode_batch_with(b: &Batch, shape: Shape, hashes: HashForm) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64));
    let map = shape == Shape::Map;
    let n = 2 + usize::from(b.dp_rank.is_some());
    if map {
        w.map(n);
        w.str("ts");
    } else {
        w.array(n);
    }
    w.f64(b.ts);
    w.key(map, "events");
    w.array(b.events.len());
    for e in &b.events {
        // Positional fields end at the last one given; map fields that
        // are not given are left out (`omit_defaults`).
        let (tag, n) = match e {
            Event::Stored(s) if map => {
                ("BlockStored", 8 + usize::from(s.extra) + usize::from(s.group_idx.is_some()))
            }
            Event::Stored(s) if s.group_idx.is_some() => ("BlockStored", 10),
            Event::Stored(s) => ("BlockStored", 8 + usize::from(s.extra)),
            Event::Removed { group_idx, .. } => {
                ("BlockRemoved", 3 + usize::from(group_idx.is_some()))
            }
            Event::Cleared => ("AllBlocksCleared", 1),
        };
        if map {
            w.map(n);
            w.str("type");
        } else {
            w.array(n);
        }
        w.str(tag);
        match e {
            Event::Stored(s) => {
                w.key(map, "block_hashes");
                w.hashes(&s.hashes, hashes);
                w.key(map, "parent_block_hash");
                match &s.parent {
                    Some(p) => w.hash(p, hashes),
                    None => w.nil(),
                }
                w.key(map, "token_ids");
                w.array(s.token_ids.len());
                for &t in &s.token_ids {
                    w.uint(u64::from(t));
                }
                w.key(map, "block_size");
                w.uint(u64::from(s.block_size));
                w.key(map, "lora_id");
                if s.lora {
                    w.uint(1);
                } else {
                    w.nil();
                }
                w.key(map, "medium");
                w.opt_str(s.medium.as_deref());
                w.key(map, "lora_name");
                w.nil();
                if s.extra {
                    // One block's keys: a cache_salt.
                    w.key(map, "extra_keys");
                    w.array(1);
                    w.array(1);
                    w.str("salt");
                } else if s.group_idx.is_some() && !map {
                    w.nil();
                }
                if let Some(g) = s.group_idx {
                    w.key(map, "group_idx");
                    w.uint(u64::from(g));
                }
            }
            Event::Removed { hashes: h, medium, group_idx } => {
                w.key(map, "block_hashes");
                w.hashes(h, hashes);
                w.key(map, "medium");
                w.opt_str(medium.as_deref());
                if let Some(g) = group_idx {
                    w.key(map, "group_idx");
                    w.uint(u64::from(*g));
                }
            }
            Event::Cleared => {}
        }
    }
    if let Some(r) = b.dp_rank {
        w.key(map, "data_parallel_rank");
        w.uint(u64::from(r));
    }
    w.0
}

/// msgpack in the shortest forms, as msgspec writes them.
struct Writer(Vec<u8>);

impl Writer {
    fn head(&mut self, fix: u8, fix_max: usize, wide: [u8; 3], n: usize) {
        if n <= fix_max {
            self.0.push(fix | n as u8);
        } else if wide[0] != 0 && n <= 0xff {
            self.0.extend_from_slice(&[wide[0], n as u8]);
        } else if n <= 0xffff {
            self.0.push(wide[1]);
            self.0.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            self.0.push(wide[2]);
            self.0.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }

    fn array(&mut self, n: usize) {
        self.head(0x90, 15, [0, 0xdc, 0xdd], n);
    }

    fn map(&mut self, n: usize) {
        self.head(0x80, 15, [0, 0xde, 0xdf], n);
    }

    fn str(&mut self, s: &str) {
        self.head(0xa0, 31, [0xd9, 0xda, 0xdb], s.len());
        self.0.extend_from_slice(s.as_bytes());
    }

    /// A map key (nothing in an array).
    fn key(&mut self, map: bool, name: &str) {
        if map {
            self.str(name);
        }
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.str(s),
            None => self.nil(),
        }
    }

    fn nil(&mut self) {
        self.0.push(0xc0);
    }

    fn uint(&mut self, v: u64) {
        if v <= 0x7f {
            self.0.push(v as u8);
        } else if v <= 0xff {
            self.0.extend_from_slice(&[0xcc, v as u8]);
        } else if v <= 0xffff {
            self.0.push(0xcd);
            self.0.extend_from_slice(&(v as u16).to_be_bytes());
        } else if v <= 0xffff_ffff {
            self.0.push(0xce);
            self.0.extend_from_slice(&(v as u32).to_be_bytes());
        } else {
            self.0.push(0xcf);
            self.0.extend_from_slice(&v.to_be_bytes());
        }
    }

    fn f64(&mut self, x: f64) {
        self.0.push(0xcb);
        self.0.extend_from_slice(&x.to_bits().to_be_bytes());
    }

    fn hash(&mut self, r: &BlockRef, form: HashForm) {
        match (form, &r.digest) {
            (HashForm::Bytes, Some(d)) => {
                // bin 8 (a digest is at most 32 bytes)
                self.0.extend_from_slice(&[0xc4, d.len() as u8]);
                self.0.extend_from_slice(d.as_bytes());
            }
            _ => self.uint(r.key),
        }
    }

    fn hashes(&mut self, hs: &[BlockRef], form: HashForm) {
        self.array(hs.len());
        for h in hs {
            self.hash(h, form);
        }
    }
}

#[cfg(test)]
#[path = "events_tests.rs"]
mod tests;
