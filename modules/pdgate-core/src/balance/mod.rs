//! Load-balancing policies: pure functions over a snapshot of the peers,
//! and the shared-memory counters they read.
//!
//! The glue builds a [`PeerView`] per peer of an upstream (availability as
//! nginx's round robin judges it, weight, and the shared counters) and asks
//! a policy for an index; it then reserves the choice in the counters
//! ([`slots::SlotTable::acquire`]) before the next worker looks, and releases
//! it when the try ends.

pub mod fails;
pub mod ledger;
pub mod params;
pub mod pending;
pub mod policy;
pub mod prefix;
pub mod slots;

use params::ParamSpec;

pub use crate::engine::EngineView;

/// One peer as a policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerView {
    /// Not down, not failed, not at max_conns, not tried by this request.
    pub available: bool,
    /// `weight=` (1 by default).
    pub weight: u32,
    /// Requests in flight on this peer (all workers).
    pub requests: u64,
    /// Estimated tokens of the requests in flight on this peer.
    pub tokens: u64,
    /// Policy-defined cost in flight (see [`greedy_cost`]).
    pub cost: u64,
    /// Requests placed here, decayed (see [`length_balance`]).
    pub hist_requests: u64,
    /// Tokens placed here, decayed with `hist_requests`.
    pub hist_tokens: u64,
    /// What the engine reports (`pd_engine_metrics`; not fresh without).
    pub engine: EngineView,
}

/// Folds what the engine reports into a peer's in-flight counters, so that
/// every policy that reads them sees the engine's own queue: when the
/// engine has more requests (running, waiting, and pdgate's since the
/// scrape) than this nginx has in flight on it — another proxy's, or ones
/// it still queues after pdgate's try ended — the difference is added, each
/// extra request with the mean tokens of those in flight (or `tokens`).
/// Nothing changes without a fresh scrape.
pub fn blend_engine(v: &mut PeerView, tokens: u64) {
    if !v.engine.fresh || v.engine.requests <= v.requests {
        return;
    }
    let extra = v.engine.requests - v.requests;
    let mean = v.tokens.checked_div(v.requests).unwrap_or(tokens.max(1));
    v.requests = v.engine.requests;
    v.tokens = v.tokens.saturating_add(extra.saturating_mul(mean));
}

/// least_total_load: the peer whose queue of work would drain first, the
/// Global Proxy's "batched makespan" estimate `S · (⌈R/B⌉ + 1) / 2` with `S`
/// the tokens in flight, `R` the requests in flight and `B` the batch size,
/// computed with this request added to the peer and divided by its weight.
/// (The original ignored the request itself, so an idle peer and a peer
/// with one tiny request tied; adding it also makes the score grow with the
/// request's length.) Ties go to `tie % ties` among the tied peers, so a
/// caller passing a random number spreads them evenly.
pub fn least_total_load(peers: &[PeerView], tokens: u64, batch: u64, tie: u64) -> Option<usize> {
    let batch = batch.max(1);
    let score = |p: &PeerView| {
        let s = (p.tokens + tokens.max(1)) as u128;
        let r = (p.requests + 1) as u128;
        // Compare S·(⌈R/B⌉+1)/weight without floating point: scale by 2
        // (the /2 is common to all) and cross-multiply the weights below.
        s * (r.div_ceil(batch as u128) + 1)
    };
    pick_min(peers, tie, |a, b| {
        // a/wa < b/wb  <=>  a·wb < b·wa
        let (sa, sb) =
            (score(a) * u128::from(b.weight.max(1)), score(b) * u128::from(a.weight.max(1)));
        sa.cmp(&sb)
    })
}

/// weighted_least_active: the fewest requests in flight (per unit of
/// weight), then the fewest tokens in flight (per unit of weight), then the
/// heavier peer; remaining ties at random. (The original
/// kept a random candidate whenever the first one was minimal; this is the
/// plain lexicographic minimum.)
pub fn weighted_least_active(peers: &[PeerView], _tokens: u64, tie: u64) -> Option<usize> {
    pick_min(peers, tie, |a, b| {
        let (wa, wb) = (u128::from(a.weight.max(1)), u128::from(b.weight.max(1)));
        let ra = u128::from(a.requests) * wb;
        let rb = u128::from(b.requests) * wa;
        ra.cmp(&rb)
            .then((u128::from(a.tokens) * wb).cmp(&(u128::from(b.tokens) * wa)))
            .then(b.weight.cmp(&a.weight))
    })
}

/// auto_balance_controller: among peers with fewer than `batch` requests in
/// flight, the fewest tokens in flight; when every peer has a full batch,
/// the fewest requests. Then the heavier peer; remaining ties at random.
pub fn auto_balance_controller(
    peers: &[PeerView],
    _tokens: u64,
    batch: u64,
    tie: u64,
) -> Option<usize> {
    let batch = batch.max(1);
    let has_room = peers.iter().any(|p| p.available && p.requests < batch);
    pick_min(peers, tie, |a, b| {
        if has_room {
            let full = |p: &PeerView| p.requests >= batch;
            full(a).cmp(&full(b)).then(a.tokens.cmp(&b.tokens))
        } else {
            a.requests.cmp(&b.requests)
        }
        .then(b.weight.cmp(&a.weight))
    })
}

/// prefill_score_balance: the peer where this request adds least to the
/// sum of completion times. A request of `L` tokens costs `c = a·L + b`
/// (a linear TTFT model, ms); a peer with `n` requests in flight costing
/// `T` in all gains `Δ = T + c·(n + 1)`. `T` is derived from the shared
/// counters as `a·S + b·n`. Ties at random.
pub fn prefill_score(peers: &[PeerView], tokens: u64, a: f64, b: f64, tie: u64) -> Option<usize> {
    let c = a * tokens as f64 + b;
    let delta = |p: &PeerView| {
        let t = a * p.tokens as f64 + b * p.requests as f64;
        (t + c * (p.requests + 1) as f64) / f64::from(p.weight.max(1))
    };
    pick_min(peers, tie, |x, y| delta(x).total_cmp(&delta(y)))
}

/// greedy_timeout's cost of a request: `warmup + tokens^exp` (work units;
/// the original used bytes, and never read its two directives).
pub fn greedy_cost(tokens: u64, warmup: f64, exp: f64) -> u64 {
    let c = warmup + (tokens as f64).powf(exp);
    if c.is_finite() && c > 0.0 {
        c.min(u64::MAX as f64 / 4.0) as u64
    } else {
        0
    }
}

/// greedy_timeout: the peer expected to finish its work in flight first
/// once this request is added (virtual finish time `C_i + c`, per unit of
/// weight). The original never took finished work off, so it degenerated
/// into a history count; here each request's cost is released when it
/// ends. Ties at random.
pub fn greedy_timeout(peers: &[PeerView], cost: u64, tie: u64) -> Option<usize> {
    pick_min(peers, tie, |a, b| {
        let fa = u128::from(a.cost) + u128::from(cost);
        let fb = u128::from(b.cost) + u128::from(cost);
        (fa * u128::from(b.weight.max(1))).cmp(&(fb * u128::from(a.weight.max(1))))
    })
}

/// length_balance: the peer that received the least recent work, scored
/// as the Global Proxy did, `R + S` with `R` the requests and `S` the
/// tokens placed on it (each request's tokens scaled by the request-length
/// weight), both divided by `decay` every `merge_threshold` placements
/// (see [`slots::SlotTable::decay`]) — here counted with this request added
/// (`1 + weighted_tokens`, the original's `L·w` term, which it added to
/// every peer alike so that it changed nothing) and divided by the weight,
/// so that weights share the history smoothly; then the heavier peer; ties
/// at random. Unlike the original the history is shared by all workers at
/// once (no per-worker batches merged with a lossy compare-and-set).
pub fn length_balance(peers: &[PeerView], weighted_tokens: u64, tie: u64) -> Option<usize> {
    let score = |p: &PeerView| {
        u128::from(p.hist_requests) + 1 + u128::from(p.hist_tokens) + u128::from(weighted_tokens)
    };
    pick_min(peers, tie, |a, b| {
        (score(a) * u128::from(b.weight.max(1)))
            .cmp(&(score(b) * u128::from(a.weight.max(1))))
            .then(b.weight.cmp(&a.weight))
    })
}

/// A request's tokens times length_balance's request-length weight (what
/// its history records and its score adds), saturating; 0 for a weight
/// that is not a positive number.
pub fn weighted_tokens(tokens: u64, weight: f64) -> u64 {
    let w = tokens as f64 * weight;
    if w.is_finite() && w > 0.0 {
        w.min(u64::MAX as f64 / 4.0) as u64
    } else {
        0
    }
}

/// The length_balance defaults: merge (decay) every 32 placements, halve,
/// and count a request's tokens once.
pub const LENGTH_MERGE_THRESHOLD: u64 = 32;
pub const LENGTH_DECAY_FACTOR: u64 = 2;
pub const LENGTH_REQ_LEN_WEIGHT: f64 = 1.0;

/// The pd_score_balance per-instance concurrency caps (the original's
/// defaults: 16 on prefill, 32 on decode).
pub const PD_SCORE_MAX_SEQS_PREFILL: u64 = 16;
pub const PD_SCORE_MAX_SEQS_DECODE: u64 = 32;

/// Most requests in prefill the decode look-ahead simulates.
pub const PD_SCORE_LOOKAHEAD: usize = 64;

/// pd_score_balance on a prefill upstream (and each step of the decode
/// look-ahead): among peers running fewer than `cap` requests, the fewest
/// tokens in flight (the work queued before this request's prefill can
/// start); when every peer is at its cap, the fewest requests. Per unit of
/// weight, then the heavier peer; ties at random. (The original reserved
/// the choice outside its lock, so concurrent workers herded onto one peer.)
pub fn pd_score_prefill(peers: &[PeerView], cap: u64, tie: u64) -> Option<usize> {
    let cap = cap.max(1);
    let room = peers.iter().any(|p| p.available && p.requests < cap);
    pick_min(peers, tie, |a, b| {
        let (wa, wb) = (u128::from(a.weight.max(1)), u128::from(b.weight.max(1)));
        if room {
            let full = |p: &PeerView| p.requests >= cap;
            full(a)
                .cmp(&full(b))
                .then((u128::from(a.tokens) * wb).cmp(&(u128::from(b.tokens) * wa)))
        } else {
            (u128::from(a.requests) * wb).cmp(&(u128::from(b.requests) * wa))
        }
        .then(b.weight.cmp(&a.weight))
    })
}

/// pd_score_balance on a decode upstream: places this request (`tokens`
/// long) by simulating longest-processing-time-first over the requests now
/// in prefill (`pending`, their lengths in tokens: they reach decode soon)
/// and this one. Longest first, each simulated request goes to the peer
/// with room (fewer than `cap` requests, counting those simulated) and the
/// least tokens resident (in flight, plus simulated), per unit of weight;
/// when no peer has room, to the fewest requests. The answer is where this
/// request lands, placed before pending requests of equal length. With
/// nothing pending it is the least-loaded peer with room. (The original
/// used the simulated loads but the real counts for its cap, and fell back
/// to least active whenever counts differed by more than one.)
pub fn pd_score_decode(
    peers: &[PeerView],
    tokens: u64,
    pending: &[u64],
    cap: u64,
    tie: u64,
) -> Option<usize> {
    const MAX: usize = 256;
    if peers.len() > MAX {
        return weighted_least_active(peers, tokens, tie);
    }
    let mut sim = [PeerView::default(); MAX];
    sim[..peers.len()].copy_from_slice(peers);
    let sim = &mut sim[..peers.len()];
    // Longer pending requests are placed first; this one precedes equals.
    let mut longer = [0u64; PD_SCORE_LOOKAHEAD];
    let mut n = 0;
    for &x in pending.iter().filter(|&&x| x > tokens).take(PD_SCORE_LOOKAHEAD) {
        longer[n] = x;
        n += 1;
    }
    let longer = &mut longer[..n];
    longer.sort_unstable_by(|a, b| b.cmp(a));
    for &x in longer.iter() {
        let j = pd_score_prefill(sim, cap, 0)?;
        sim[j].tokens = sim[j].tokens.saturating_add(x);
        sim[j].requests += 1;
    }
    pd_score_prefill(sim, cap, tie)
}

/// earliest_start's prefill rate (prompt tokens per second) for an engine
/// whose rate is not learned when no engine of the pool has one: the
/// prefill_score cost model's slope.
pub const EARLIEST_DEFAULT_RATE_TPS: u64 = (1000.0 / PREFILL_SCORE_A) as u64;
/// earliest_start's batch limit of a decode engine when none is set
/// (vLLM's default `max_num_seqs`).
pub const EARLIEST_MAX_NUM_SEQS: u64 = 256;

/// earliest_start: the peer that can start this request first, from what
/// the engines report (`pd_engine_metrics`) and what pdgate has in flight.
///
/// On a prefill upstream (and without a role) the work queued ahead of the
/// request is the tokens in flight (with the engine's own queue blended in,
/// see [`blend_engine`]); an engine starts the request once that work is
/// done at its learned prefill rate, and its first token follows once the
/// request's own tokens are: the least `(ahead + tokens) / rate` wins.
/// An engine whose rate is not learned yet takes the mean of the pool's
/// learned rates (the default rate when none is), times its weight.
///
/// On a decode upstream an engine starts a request at once while it runs
/// fewer than `max_num_seqs`; beyond that, after `requests − cap + 1`
/// finish, at its learned finishing rate: the earliest start wins, then the
/// fewest requests per unit of weight (the smaller batch decodes faster).
/// Engines whose KV cache is under pressure come after the others (see
/// [`EngineView::pressured`]). Ties at random.
pub fn earliest_start(
    peers: &[PeerView],
    tokens: u64,
    decode: bool,
    max_num_seqs: u64,
    tie: u64,
) -> Option<usize> {
    let learned = |f: fn(&EngineView) -> u64| {
        let (sum, n) = peers
            .iter()
            .filter(|p| p.engine.fresh && f(&p.engine) > 0)
            .fold((0u128, 0u128), |(s, n), p| (s + u128::from(f(&p.engine)), n + 1));
        (n > 0).then(|| (sum / n) as u64)
    };
    if decode {
        let cap = max_num_seqs.max(1);
        let mean_finish = learned(|e| e.finish_mps).unwrap_or(1000);
        // Start in µs: queued requests beyond the batch over the rate.
        let start = |p: &PeerView| -> u128 {
            if p.requests < cap {
                return 0;
            }
            let rate = match p.engine.finish_mps {
                0 => mean_finish.saturating_mul(u64::from(p.weight.max(1))),
                r => r,
            };
            u128::from(p.requests - cap + 1) * 1_000_000_000 / u128::from(rate.max(1))
        };
        return pick_min(peers, tie, |a, b| {
            let (wa, wb) = (u128::from(a.weight.max(1)), u128::from(b.weight.max(1)));
            start(a)
                .cmp(&start(b))
                .then((u128::from(a.requests) * wb).cmp(&(u128::from(b.requests) * wa)))
                .then(b.weight.cmp(&a.weight))
        });
    }
    let mean_rate = learned(|e| e.rate_tps);
    let first_token = |p: &PeerView| -> u128 {
        let rate = match (p.engine.rate_tps, mean_rate) {
            (0, Some(m)) => m.saturating_mul(u64::from(p.weight.max(1))),
            (0, None) => EARLIEST_DEFAULT_RATE_TPS.saturating_mul(u64::from(p.weight.max(1))),
            (r, _) => r,
        };
        // µs, with the work in tokens scaled up to keep precision.
        (u128::from(p.tokens) + u128::from(tokens.max(1))) * 1_000_000 / u128::from(rate.max(1))
    };
    pick_min(peers, tie, |a, b| {
        first_token(a).cmp(&first_token(b)).then(a.requests.cmp(&b.requests))
    })
}

/// The prefix_cache_affinity defaults: 10000 index entries per peer,
/// 640-byte prompt blocks, and the least_total_load batch size of 16 for
/// scoring and for deciding that loads diverge.
pub const PCA_DICT_SIZE: u64 = 10_000;
pub const PCA_BLOCK_SIZE: u64 = 640;
pub const PCA_BATCH_SIZE: u64 = 16;

/// prefix_cache_affinity: `affinity[i]` is how many leading blocks of this
/// request's prompt were last placed on peer `i` (0: none; see
/// [`prefix::PrefixIndex`]). The peer with the longest match wins (the
/// least total load among equals), unless it runs more than `batch`
/// requests beyond the least busy available peer: then, as when nothing
/// matches, [`least_total_load`] decides. (The original fell back only
/// when the whole pool's spread exceeded 15, and its fallback scored with
/// an uninitialised batch size of 0.)
pub fn prefix_cache_affinity(
    peers: &[PeerView],
    tokens: u64,
    affinity: &[u32],
    batch: u64,
    tie: u64,
) -> Option<usize> {
    let aff = |i: usize| affinity.get(i).copied().unwrap_or(0);
    let best = peers
        .iter()
        .enumerate()
        .filter(|(_, p)| p.available)
        .map(|(i, _)| aff(i))
        .max()
        .unwrap_or(0);
    if best == 0 {
        return least_total_load(peers, tokens, batch, tie);
    }
    let mut only = [PeerView::default(); 256];
    if peers.len() > only.len() {
        return least_total_load(peers, tokens, batch, tie);
    }
    for (i, p) in peers.iter().enumerate() {
        only[i] = PeerView { available: p.available && aff(i) == best, ..*p };
    }
    let c = least_total_load(&only[..peers.len()], tokens, batch, tie)?;
    let least = peers.iter().filter(|p| p.available).map(|p| p.requests).min().unwrap_or(0);
    if peers[c].requests > least + batch.max(1) {
        return least_total_load(peers, tokens, batch, tie);
    }
    Some(c)
}

/// prefix_cache_affinity fed by the engines' KV events (`pd_kv_events`
/// and `pd_tokenizer`): `cached[i]` tokens of this prompt are in peer `i`'s
/// prefix cache, as its own events say. The peer that would be done with
/// the prompt first wins: the prompt tokens its engine still has to compute
/// for the requests in flight there (each placed request counts its tokens
/// that were not cached where it went: its `cost`, see [`uncached`]) plus
/// this prompt's tokens it does not hold, per unit of weight; fewer
/// requests, then chance, break ties. Peers more than `batch` requests
/// beyond the least busy one (with the engines' own queues, see
/// [`blend_engine`]) are left out: the guard against the "hot engine"
/// spiral of cache-aware routing, where a popular prefix draws every
/// request to the one engine that holds it. (Counting whole prompts in
/// flight instead made one request on the engine holding a long prefix
/// outweigh the prefix, and the policy spread like least-load:
/// docs/prefix-routing.md.)
pub fn precise_prefix(
    peers: &[PeerView],
    tokens: u64,
    cached: &[u64],
    batch: u64,
    tie: u64,
) -> Option<usize> {
    let mut v = [PeerView::default(); 256];
    if peers.len() > v.len() {
        return least_total_load(peers, tokens, batch, tie);
    }
    let least = peers.iter().filter(|p| p.available).map(|p| p.requests).min()?;
    for (i, p) in peers.iter().enumerate() {
        let hit = cached.get(i).copied().unwrap_or(0);
        v[i] = PeerView {
            available: p.available && p.requests <= least + batch.max(1),
            cost: p.cost.saturating_add(uncached(tokens, hit)),
            ..*p
        };
    }
    pick_min(&v[..peers.len()], tie, |a, b| {
        let (ca, cb) = (
            u128::from(a.cost) * u128::from(b.weight.max(1)),
            u128::from(b.cost) * u128::from(a.weight.max(1)),
        );
        ca.cmp(&cb).then(a.requests.cmp(&b.requests))
    })
}

/// prefix_cache_affinity's choice with the engines' KV events: the
/// longest-match rule of [`prefix_cache_affinity`] on what each engine
/// holds (`cached[i]` tokens of the prompt), with the load
/// measured as [`precise_prefix`] measures it. Among the peers holding the
/// longest prefix the one with the least work to compute wins, unless it
/// runs more than `batch` requests beyond the least busy peer: then, as
/// when nothing is held anywhere, [`precise_prefix`] decides over all
/// (where shorter holdings still count as cached tokens). The sticky rule
/// keeps a conversation on the engine that holds it, which a pure cost
/// comparison gave up too early (docs/prefix-routing.md).
pub fn precise_affinity(
    peers: &[PeerView],
    tokens: u64,
    cached: &[u64],
    batch: u64,
    tie: u64,
) -> Option<usize> {
    let held = |i: usize| cached.get(i).copied().unwrap_or(0);
    let best = (0..peers.len()).filter(|&i| peers[i].available).map(held).max().unwrap_or(0);
    let mut only = [PeerView::default(); 256];
    if best == 0 || peers.len() > only.len() {
        return precise_prefix(peers, tokens, cached, batch, tie);
    }
    for (i, p) in peers.iter().enumerate() {
        only[i] = PeerView { available: p.available && held(i) == best, ..*p };
    }
    let c = precise_prefix(&only[..peers.len()], tokens, cached, u64::MAX / 2, tie)?;
    let least = peers.iter().filter(|p| p.available).map(|p| p.requests).min().unwrap_or(0);
    if peers[c].requests > least + batch.max(1) {
        return precise_prefix(peers, tokens, cached, batch, tie);
    }
    Some(c)
}

/// The tokens of a prompt of `tokens` an engine holding `cached` of them
/// computes: what a precise placement counts as its cost in flight.
pub fn uncached(tokens: u64, cached: u64) -> u64 {
    tokens - cached.min(tokens)
}

/// A policy chosen by name where a module balances its own server list
/// (the SGLang mode's prefill and decode lists): the balancers' policies
/// with their default parameters, over requests and tokens in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    LeastTotalLoad,
    WeightedLeastActive,
    AutoBalanceController,
    PrefillScore,
    PdScore,
}

impl Policy {
    /// The policy of a balancer's directive name (`None`: not one);
    /// `least_active` (the fewest requests in flight) is `Some(None)`.
    pub fn parse(name: &[u8]) -> Option<Option<Policy>> {
        Some(Some(match name {
            b"least_active" => return Some(None),
            b"least_total_load" => Policy::LeastTotalLoad,
            b"weighted_least_active" => Policy::WeightedLeastActive,
            b"auto_balance_controller" => Policy::AutoBalanceController,
            b"prefill_score_balance" => Policy::PrefillScore,
            b"pd_score_balance" => Policy::PdScore,
            _ => return None,
        }))
    }

    /// The names [`parse`](Self::parse) takes, for error messages.
    pub const NAMES: &'static str = "least_active, least_total_load, weighted_least_active, auto_balance_controller, prefill_score_balance or pd_score_balance";

    /// The chosen index among `peers` for a request of `tokens`.
    pub fn choose(self, peers: &[PeerView], tokens: u64, tie: u64) -> Option<usize> {
        match self {
            Policy::LeastTotalLoad => least_total_load(peers, tokens, LEAST_TOTAL_LOAD_BATCH, tie),
            Policy::WeightedLeastActive => weighted_least_active(peers, tokens, tie),
            Policy::AutoBalanceController => {
                auto_balance_controller(peers, tokens, AUTO_BALANCE_BATCH, tie)
            }
            Policy::PrefillScore => {
                prefill_score(peers, tokens, PREFILL_SCORE_A, PREFILL_SCORE_B, tie)
            }
            Policy::PdScore => pd_score_prefill(peers, PD_SCORE_MAX_SEQS_PREFILL, tie),
        }
    }
}

/// least_total_load's batch size when none is configured (the original's).
pub const LEAST_TOTAL_LOAD_BATCH: u64 = 16;
/// auto_balance_controller's batch size when none is configured.
pub const AUTO_BALANCE_BATCH: u64 = 24;

// Each policy's parameters, declared once: the directive is
// `<balancer>_<name>` (see [`params`]). The defaults are the constants
// above and below, which the SGLang mode's [`Policy`] also uses.

/// least_total_load: `batch_size`.
pub static LEAST_TOTAL_LOAD_PARAMS: [ParamSpec; 1] =
    [ParamSpec::int("batch_size", LEAST_TOTAL_LOAD_BATCH)];
/// weighted_least_active: none.
pub static WEIGHTED_LEAST_ACTIVE_PARAMS: [ParamSpec; 0] = [];
/// auto_balance_controller: `batch_size`.
pub static AUTO_BALANCE_CONTROLLER_PARAMS: [ParamSpec; 1] =
    [ParamSpec::int("batch_size", AUTO_BALANCE_BATCH)];
/// prefill_score_balance: the cost model's `a` and `b`.
pub static PREFILL_SCORE_PARAMS: [ParamSpec; 2] =
    [ParamSpec::float("a", PREFILL_SCORE_A), ParamSpec::float("b", PREFILL_SCORE_B)];
/// greedy_timeout: the cost's `warmup` and `exp`.
pub static GREEDY_TIMEOUT_PARAMS: [ParamSpec; 2] =
    [ParamSpec::float("warmup", GREEDY_WARMUP), ParamSpec::float("exp", GREEDY_EXP)];
/// length_balance: placements between decays, the divisor, and the
/// weight of a request's tokens.
pub static LENGTH_BALANCE_PARAMS: [ParamSpec; 3] = [
    ParamSpec::int("merge_threshold", LENGTH_MERGE_THRESHOLD),
    ParamSpec::int("decay_factor", LENGTH_DECAY_FACTOR),
    ParamSpec::float("req_len_weight", LENGTH_REQ_LEN_WEIGHT),
];
/// pd_score_balance: the per-peer cap; its default depends on the role
/// (see [`pd_score_cap`]), the table's is the prefill one.
pub static PD_SCORE_PARAMS: [ParamSpec; 1] =
    [ParamSpec::int("max_num_seqs", PD_SCORE_MAX_SEQS_PREFILL)];
/// earliest_start: the decode batch limit.
pub static EARLIEST_START_PARAMS: [ParamSpec; 1] =
    [ParamSpec::int("max_num_seqs", EARLIEST_MAX_NUM_SEQS)];
/// prefix_cache_affinity: the batch size of its least_total_load, index
/// entries per peer, and bytes of prompt per block.
pub static PREFIX_CACHE_AFFINITY_PARAMS: [ParamSpec; 3] = [
    ParamSpec::int("batch_size", PCA_BATCH_SIZE),
    ParamSpec::int("dict_size", PCA_DICT_SIZE),
    ParamSpec::int("block_size", PCA_BLOCK_SIZE),
];

/// pd_score_balance's cap on an upstream: `max_num_seqs` if set, else the
/// role's default (16 on prefill, 32 on decode).
pub fn pd_score_cap(p: &params::Params) -> u64 {
    match p.role {
        _ if p.is_set("max_num_seqs") => p.int("max_num_seqs"),
        params::Role::Decode => PD_SCORE_MAX_SEQS_DECODE,
        _ => PD_SCORE_MAX_SEQS_PREFILL,
    }
}

/// The original's greedy_timeout defaults.
pub const GREEDY_WARMUP: f64 = 5.0;
pub const GREEDY_EXP: f64 = 1.8;

/// The original's prefill cost model: `c = 0.0345 · tokens + 120.0745` ms.
pub const PREFILL_SCORE_A: f64 = 0.0345;
pub const PREFILL_SCORE_B: f64 = 120.0745;

/// The available peer that is smallest by `cmp`; among equals, the
/// `tie % count`-th.
fn pick_min(
    peers: &[PeerView],
    tie: u64,
    cmp: impl Fn(&PeerView, &PeerView) -> std::cmp::Ordering,
) -> Option<usize> {
    // An engine whose KV cache is nearly full comes after every other.
    let cmp = |a: &PeerView, b: &PeerView| {
        a.engine.pressured.cmp(&b.engine.pressured).then_with(|| cmp(a, b))
    };
    let mut best: Option<usize> = None;
    let mut ties = 0u64;
    for (i, p) in peers.iter().enumerate().filter(|(_, p)| p.available) {
        match best.map(|b| cmp(p, &peers[b])) {
            None | Some(std::cmp::Ordering::Less) => {
                best = Some(i);
                ties = 1;
            }
            Some(std::cmp::Ordering::Equal) => ties += 1,
            Some(std::cmp::Ordering::Greater) => {}
        }
    }
    let b = best?;
    let mut k = tie % ties;
    for (i, p) in peers.iter().enumerate().filter(|(_, p)| p.available) {
        if cmp(p, &peers[b]) == std::cmp::Ordering::Equal {
            if k == 0 {
                return Some(i);
            }
            k -= 1;
        }
    }
    Some(b)
}

#[cfg(test)]
mod tests;
