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
/// the prompt first wins: the tokens in flight there (with the engine's own
/// queue, see [`blend_engine`]) plus the prompt's tokens it does not hold,
/// per unit of weight; fewer requests, then chance, break ties. Peers more
/// than `batch` requests beyond the least busy one are left out: the guard
/// against the "hot engine" spiral of cache-aware routing, where a popular
/// prefix draws every request to the one engine that holds it.
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
        let hit = cached.get(i).copied().unwrap_or(0).min(tokens);
        v[i] = PeerView {
            available: p.available && p.requests <= least + batch.max(1),
            cost: p.tokens.saturating_add(tokens - hit),
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
mod tests {
    use super::*;

    fn peer(requests: u64, tokens: u64) -> PeerView {
        PeerView { available: true, weight: 1, requests, tokens, ..Default::default() }
    }

    #[test]
    fn least_total_load_prefers_less_work() {
        let peers = [peer(4, 4000), peer(1, 100), peer(2, 3000)];
        assert_eq!(least_total_load(&peers, 100, 16, 0), Some(1));
        // Batch size 1: requests count fully.
        let peers = [peer(3, 300), peer(1, 500)];
        assert_eq!(least_total_load(&peers, 100, 1, 0), Some(1)); // 400·5 vs 600·3
        assert_eq!(least_total_load(&peers, 100, 16, 0), Some(0)); // 400·2 vs 600·2
    }

    #[test]
    fn unavailable_peers_are_never_chosen() {
        let mut peers = [peer(0, 0), peer(9, 9000)];
        peers[0].available = false;
        assert_eq!(least_total_load(&peers, 10, 16, 0), Some(1));
        peers[1].available = false;
        assert_eq!(least_total_load(&peers, 10, 16, 0), None);
        assert_eq!(least_total_load(&[], 10, 16, 0), None);
    }

    #[test]
    fn weights_scale_the_score() {
        let mut peers = [peer(2, 2000), peer(1, 1000)];
        peers[0].weight = 3; // 3000·2/3 = 2000 vs 1100·2 = 2200
        assert_eq!(least_total_load(&peers, 100, 16, 0), Some(0));
    }

    #[test]
    fn weighted_least_active_orders_by_requests_then_tokens() {
        let peers = [peer(2, 10), peer(1, 9000), peer(1, 500)];
        assert_eq!(weighted_least_active(&peers, 1, 0), Some(2));
        let mut peers = [peer(2, 10), peer(1, 10)];
        peers[0].weight = 4; // 2/4 < 1/1
        assert_eq!(weighted_least_active(&peers, 1, 0), Some(0));
        // Idle: the heavier peer.
        let mut peers = [peer(0, 0), peer(0, 0)];
        peers[1].weight = 2;
        assert_eq!(weighted_least_active(&peers, 1, 0), Some(1));
        assert_eq!(auto_balance_controller(&peers, 1, 4, 0), Some(1));
    }

    #[test]
    fn auto_balance_controller_fills_batches_by_tokens() {
        // Room on 1 and 2: fewest tokens among them.
        let peers = [peer(4, 10), peer(3, 900), peer(1, 800)];
        assert_eq!(auto_balance_controller(&peers, 1, 4, 0), Some(2));
        // All full: fewest requests.
        let peers = [peer(6, 10), peer(5, 9000), peer(7, 1)];
        assert_eq!(auto_balance_controller(&peers, 1, 4, 0), Some(1));
    }

    #[test]
    fn prefill_score_is_the_marginal_waiting_time() {
        // c = 0.0345·1000 + 120.0745 = 154.5745
        // peer 0: n=2, S=4000 → T = 138 + 240.149 = 378.149; Δ = 378.149 + 3c = 841.87
        // peer 1: n=0, S=0 → Δ = c = 154.57
        // peer 2: n=1, S=100 → T = 3.45 + 120.07; Δ = 123.52 + 2c = 432.67
        let peers = [peer(2, 4000), peer(0, 0), peer(1, 100)];
        assert_eq!(prefill_score(&peers, 1000, PREFILL_SCORE_A, PREFILL_SCORE_B, 0), Some(1));
        let peers = [peer(2, 4000), peer(1, 100)];
        assert_eq!(prefill_score(&peers, 1000, PREFILL_SCORE_A, PREFILL_SCORE_B, 0), Some(1));
    }

    #[test]
    fn greedy_timeout_takes_the_earliest_finish() {
        assert_eq!(greedy_cost(0, 5.0, 1.8), 5);
        assert_eq!(greedy_cost(100, 5.0, 2.0), 10_005);
        let mut peers = [peer(3, 0), peer(1, 0), peer(9, 0)];
        peers[0].cost = 500;
        peers[1].cost = 900;
        peers[2].cost = 100;
        assert_eq!(greedy_timeout(&peers, 50, 0), Some(2));
        peers[0].weight = 8; // 550/8 beats 150/1
        assert_eq!(greedy_timeout(&peers, 50, 0), Some(0));
    }

    #[test]
    fn parameter_tables_are_valid_and_hold_the_defaults() {
        use params::{check_specs, Params, Role};
        for t in [
            &LEAST_TOTAL_LOAD_PARAMS[..],
            &WEIGHTED_LEAST_ACTIVE_PARAMS,
            &AUTO_BALANCE_CONTROLLER_PARAMS,
            &PREFILL_SCORE_PARAMS,
            &GREEDY_TIMEOUT_PARAMS,
            &LENGTH_BALANCE_PARAMS,
            &PD_SCORE_PARAMS,
            &PREFIX_CACHE_AFFINITY_PARAMS,
        ] {
            assert_eq!(check_specs(t), Ok(()), "{t:?}");
        }
        assert_eq!(Params::new(&LEAST_TOTAL_LOAD_PARAMS).int("batch_size"), 16);
        assert_eq!(Params::new(&AUTO_BALANCE_CONTROLLER_PARAMS).int("batch_size"), 24);
        let p = Params::new(&PREFILL_SCORE_PARAMS);
        assert_eq!((p.float("a"), p.float("b")), (0.0345, 120.0745));
        let p = Params::new(&GREEDY_TIMEOUT_PARAMS);
        assert_eq!((p.float("warmup"), p.float("exp")), (5.0, 1.8));
        let p = Params::new(&LENGTH_BALANCE_PARAMS);
        assert_eq!(
            (p.int("merge_threshold"), p.int("decay_factor"), p.float("req_len_weight")),
            (32, 2, 1.0)
        );
        let p = Params::new(&PREFIX_CACHE_AFFINITY_PARAMS);
        assert_eq!(
            (p.int("batch_size"), p.int("dict_size"), p.int("block_size")),
            (16, 10_000, 640)
        );
        let mut p = Params::new(&PD_SCORE_PARAMS);
        assert_eq!(pd_score_cap(&p), 16);
        p.role = Role::Decode;
        assert_eq!(pd_score_cap(&p), 32);
        p.set("max_num_seqs", b"5").unwrap();
        assert_eq!(pd_score_cap(&p), 5);
    }

    #[test]
    fn ties_spread_evenly() {
        let peers = [peer(0, 0); 4];
        let mut counts = [0u32; 4];
        let mut rng = crate::request_id::Rng::new(3);
        for _ in 0..40_000 {
            counts[least_total_load(&peers, 10, 16, rng.next_u64()).unwrap()] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn length_balance_takes_the_least_recent_work() {
        let hist = |r, t| PeerView { hist_requests: r, hist_tokens: t, ..peer(0, 0) };
        assert_eq!(length_balance(&[hist(3, 300), hist(2, 100), hist(9, 0)], 10, 0), Some(2));
        assert_eq!(length_balance(&[hist(3, 300), hist(2, 100)], 10, 0), Some(1));
        // Weight 4 makes 400 (+1 +10 for this request) look like ~103.
        let heavy = PeerView { weight: 4, ..hist(0, 400) };
        assert_eq!(length_balance(&[hist(0, 150), heavy], 10, 0), Some(1));
        // Counting the request itself: weight 3 takes 3 of 4 equal requests.
        let mut p = [PeerView { weight: 3, ..hist(0, 0) }, hist(0, 0)];
        let mut got = Vec::new();
        for _ in 0..8 {
            let c = length_balance(&p, 0, 1).unwrap();
            p[c].hist_requests += 1;
            got.push(c);
        }
        assert_eq!(got, [0, 0, 0, 1, 0, 0, 0, 1]);
        let mut gone = hist(0, 0);
        gone.available = false;
        assert_eq!(length_balance(&[gone, hist(5, 5)], 10, 0), Some(1));
    }

    #[test]
    fn pd_score_prefill_respects_the_cap_then_tokens() {
        // Fewest tokens among peers under the cap of 2.
        let p = [peer(2, 10), peer(1, 500), peer(0, 900)];
        assert_eq!(pd_score_prefill(&p, 2, 0), Some(1));
        // All at the cap: fewest requests.
        let p = [peer(3, 10), peer(2, 500), peer(2, 900)];
        assert_eq!(pd_score_prefill(&p, 2, 0), Some(1));
        assert_eq!(pd_score_prefill(&p, 2, 1), Some(2));
    }

    #[test]
    fn pd_score_decode_looks_ahead_over_prefills() {
        let idle = [peer(0, 0), peer(0, 0)];
        // Nothing pending: the tie decides between idle peers.
        assert_eq!(pd_score_decode(&idle, 100, &[], 32, 0), Some(0));
        assert_eq!(pd_score_decode(&idle, 100, &[], 32, 1), Some(1));
        // A longer request in prefill will take one idle peer (the first,
        // deterministically in the simulation); this one goes to the other
        // whatever the tie.
        for tie in 0..4 {
            assert_eq!(pd_score_decode(&idle, 100, &[5000], 32, tie), Some(1));
        }
        // Shorter pending requests are placed after this one: no effect.
        assert_eq!(pd_score_decode(&idle, 100, &[50, 60], 32, 1), Some(1));
        // LPT: peer 0 is idle, peer 1 holds 500 tokens, and a 900-token
        // request is in prefill. Least tokens now would pick peer 0; the
        // look-ahead places the 900 there first, so this one takes peer 1.
        let p = [peer(0, 0), peer(1, 500)];
        assert_eq!(pd_score_decode(&p, 100, &[900], 32, 0), Some(1));
        assert_eq!(pd_score_decode(&p, 100, &[], 32, 0), Some(0));
        // Peers at the cap are skipped while another has room, counting
        // the simulated placements: cap 1, the pending request fills peer
        // 1, so this one goes to the fullest-by-tokens but open peer 2.
        let p = [peer(1, 0), peer(0, 0), peer(0, 9000)];
        assert_eq!(pd_score_decode(&p, 100, &[200], 1, 0), Some(2));
        // Everything full: fewest requests.
        let p = [peer(3, 0), peer(2, 9000)];
        assert_eq!(pd_score_decode(&p, 100, &[], 2, 0), Some(1));
        let mut gone = peer(0, 0);
        gone.available = false;
        assert_eq!(pd_score_decode(&[gone], 100, &[], 2, 0), None);
    }

    #[test]
    fn prefix_cache_affinity_follows_the_cache_until_loads_diverge() {
        let p = [peer(2, 400), peer(0, 0), peer(1, 100)];
        // No match: least total load (the idle peer).
        assert_eq!(prefix_cache_affinity(&p, 10, &[0, 0, 0], 16, 0), Some(1));
        // Longest match wins even when busier.
        assert_eq!(prefix_cache_affinity(&p, 10, &[3, 0, 1], 16, 0), Some(0));
        // Equal matches: least total load among them.
        assert_eq!(prefix_cache_affinity(&p, 10, &[2, 0, 2], 16, 0), Some(2));
        // More than `batch` requests beyond the least busy: load wins.
        assert_eq!(prefix_cache_affinity(&p, 10, &[3, 0, 1], 1, 0), Some(1));
        // An unavailable peer's match does not count.
        let mut q = p;
        q[0].available = false;
        assert_eq!(prefix_cache_affinity(&q, 10, &[3, 0, 1], 16, 0), Some(2));
    }

    #[test]
    fn precise_prefix_weighs_cached_tokens_against_load() {
        let p = [peer(2, 3000), peer(2, 3000), peer(0, 0)];
        // 2,000 of 2,400 prompt tokens cached on peer 1: it wins over the
        // idle peer 2 (3,000 + 400 < 0 + 2,400 is false, so 2 wins)...
        assert_eq!(precise_prefix(&p, 2400, &[0, 2000, 0], 16, 0), Some(2));
        // ...unless peer 1's queue is short enough to pay for the rest.
        let p = [peer(1, 500), peer(1, 500), peer(0, 0)];
        assert_eq!(precise_prefix(&p, 2400, &[0, 2000, 0], 16, 0), Some(1));
        // Nothing cached: the least work.
        assert_eq!(precise_prefix(&p, 2400, &[0, 0, 0], 16, 0), Some(2));
        // The hot-engine guard: a holder more than `batch` requests beyond
        // the least busy peer is not taken, however much it holds.
        let p = [peer(5, 100), peer(0, 4000)];
        assert_eq!(precise_prefix(&p, 8000, &[8000, 0], 16, 0), Some(0));
        assert_eq!(precise_prefix(&p, 8000, &[8000, 0], 4, 0), Some(1));
        // Unavailable peers never; none available: none.
        let mut q = [peer(0, 0), peer(0, 0)];
        q[0].available = false;
        assert_eq!(precise_prefix(&q, 100, &[100, 0], 16, 0), Some(1));
        q[1].available = false;
        assert_eq!(precise_prefix(&q, 100, &[100, 0], 16, 0), None);
    }

    #[test]
    fn policies_by_name() {
        assert_eq!(Policy::parse(b"least_active"), Some(None));
        assert_eq!(Policy::parse(b"prefill_score_balance"), Some(Some(Policy::PrefillScore)));
        assert_eq!(Policy::parse(b"round_robin"), None);
        // Fewer tokens in flight wins for the token-aware policies.
        let p = [peer(1, 5000), peer(1, 10)];
        for pol in [
            Policy::LeastTotalLoad,
            Policy::WeightedLeastActive,
            Policy::PrefillScore,
            Policy::PdScore,
        ] {
            assert_eq!(pol.choose(&p, 100, 0), Some(1), "{pol:?}");
        }
        assert_eq!(Policy::AutoBalanceController.choose(&p, 100, 0), Some(1));
    }

    fn engine(requests: u64, rate_tps: u64, finish_mps: u64) -> EngineView {
        EngineView { fresh: true, requests, waiting: 0, pressured: false, rate_tps, finish_mps }
    }

    #[test]
    fn blend_adds_the_engines_own_queue() {
        let mut v = peer(2, 200);
        v.engine = engine(5, 0, 0);
        blend_engine(&mut v, 40);
        assert_eq!((v.requests, v.tokens), (5, 500), "three more at the mean of 100");
        let mut idle = peer(0, 0);
        idle.engine = engine(3, 0, 0);
        blend_engine(&mut idle, 40);
        assert_eq!((idle.requests, idle.tokens), (3, 120), "at this request's length");
        let mut fewer = peer(4, 400);
        fewer.engine = engine(1, 0, 0);
        blend_engine(&mut fewer, 40);
        assert_eq!((fewer.requests, fewer.tokens), (4, 400), "pdgate's own count stays");
        let mut stale = peer(1, 10);
        stale.engine = EngineView { fresh: false, ..engine(50, 0, 0) };
        blend_engine(&mut stale, 40);
        assert_eq!((stale.requests, stale.tokens), (1, 10));
        // Another proxy's load steers least_total_load away.
        let mut p = [peer(1, 100), peer(1, 100)];
        p[0].engine = engine(9, 0, 0);
        for v in &mut p {
            blend_engine(v, 100);
        }
        for tie in 0..4 {
            assert_eq!(least_total_load(&p, 100, 16, tie), Some(1));
            assert_eq!(weighted_least_active(&p, 100, tie), Some(1));
        }
    }

    #[test]
    fn kv_pressure_comes_last() {
        let mut p = [peer(0, 0), peer(5, 5000)];
        p[0].engine = EngineView { pressured: true, ..engine(0, 0, 0) };
        for tie in 0..4 {
            assert_eq!(least_total_load(&p, 10, 16, tie), Some(1));
            assert_eq!(weighted_least_active(&p, 10, tie), Some(1));
            assert_eq!(earliest_start(&p, 10, false, 256, tie), Some(1));
        }
        p[1].engine.pressured = true;
        assert_eq!(least_total_load(&p, 10, 16, 0), Some(0), "all under pressure: load decides");
    }

    #[test]
    fn earliest_start_prefill_weighs_learned_rates() {
        // A slow engine (1000 tok/s) with less queued, a fast one (4000
        // tok/s) with more: 1500/1000 = 1.5 s against 2500/4000 = 0.6 s.
        let mut p = [peer(1, 1000), peer(2, 2000)];
        p[0].engine = engine(1, 1000, 0);
        p[1].engine = engine(2, 4000, 0);
        assert_eq!(earliest_start(&p, 500, false, 256, 0), Some(1));
        // Without rates it is the least work in flight.
        let q = [peer(1, 1000), peer(2, 2000)];
        assert_eq!(earliest_start(&q, 500, false, 256, 0), Some(0));
        // An engine not learned yet takes the pool's mean (2500): 1500/2500
        // = 0.6 s < 2500/4000 + ... (equal work elsewhere is slower).
        let mut r = [peer(1, 1000), peer(1, 1000), peer(1, 1000)];
        r[0].engine = engine(1, 1000, 0);
        r[1].engine = engine(1, 4000, 0);
        assert_eq!(earliest_start(&r, 500, false, 256, 0), Some(1));
        r[1].tokens = 9000;
        assert_eq!(earliest_start(&r, 500, false, 256, 0), Some(2), "the mean rate, 2500");
        // Idle engines: the faster one finishes the request first.
        let mut s = [peer(0, 0), peer(0, 0)];
        s[0].engine = engine(0, 1000, 0);
        s[1].engine = engine(0, 3000, 0);
        for tie in 0..4 {
            assert_eq!(earliest_start(&s, 100, false, 256, tie), Some(1));
        }
        // Weight scales an unknown rate.
        let mut w = [peer(1, 1000), peer(1, 1500)];
        w[1].weight = 2;
        assert_eq!(earliest_start(&w, 100, false, 256, 0), Some(1));
    }

    #[test]
    fn earliest_start_decode_waits_for_a_batch_slot() {
        // Below the cap: starts at once, the smaller batch wins.
        let p = [peer(3, 0), peer(1, 0)];
        assert_eq!(earliest_start(&p, 10, true, 4, 0), Some(1));
        // Both full: the one finishing faster frees a slot first.
        let mut q = [peer(4, 0), peer(6, 0)];
        q[0].engine = engine(4, 0, 500); // 1 ahead at 0.5/s: 2 s
        q[1].engine = engine(6, 0, 4000); // 3 ahead at 4/s: 0.75 s
        assert_eq!(earliest_start(&q, 10, true, 4, 0), Some(1));
        // One with room beats any full one.
        q[0].requests = 3;
        assert_eq!(earliest_start(&q, 10, true, 4, 0), Some(0));
        // Unavailable peers are never chosen.
        let mut r = [peer(0, 0), peer(9, 0)];
        r[0].available = false;
        assert_eq!(earliest_start(&r, 10, true, 4, 0), Some(1));
        r[1].available = false;
        assert_eq!(earliest_start(&r, 10, true, 4, 0), None);
    }
}
