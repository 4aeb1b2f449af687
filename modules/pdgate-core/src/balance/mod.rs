//! Load-balancing policies: pure functions over a snapshot of the peers,
//! and the shared-memory counters they read.
//!
//! The glue builds a [`PeerView`] per peer of an upstream (availability as
//! nginx's round robin judges it, weight, and the shared counters) and asks
//! a policy for an index; it then reserves the choice in the counters
//! ([`slots::SlotTable::acquire`]) before the next worker looks, and releases
//! it when the try ends.

pub mod slots;

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

/// The original's greedy_timeout defaults.
pub const GREEDY_WARMUP: f64 = 5.0;
pub const GREEDY_EXP: f64 = 1.8;

/// The original's prefill cost model: `c = 0.0345 · tokens + 120.0745` ms.
pub const PREFILL_SCORE_A: f64 = 0.0345;
pub const PREFILL_SCORE_B: f64 = 120.0745;

/// The last `"total_tokens": N` in a piece of an answer (vLLM's `usage`, in
/// every SSE chunk with `continuous_usage_stats`): how many tokens the
/// request holds on its engine now.
pub fn usage_total_tokens(chunk: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"total_tokens\":";
    let mut found = None;
    let mut rest = chunk;
    while let Some(pos) = rest.windows(KEY.len()).position(|w| w == KEY) {
        let after = &rest[pos + KEY.len()..];
        let digits: &[u8] = {
            let start = after.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(after.len());
            let s = &after[start..];
            &s[..s.iter().position(|c| !c.is_ascii_digit()).unwrap_or(s.len())]
        };
        if let Some(v) = std::str::from_utf8(digits).ok().and_then(|d| d.parse().ok()) {
            found = Some(v);
        }
        rest = after;
    }
    found
}

/// The available peer that is smallest by `cmp`; among equals, the
/// `tie % count`-th.
fn pick_min(
    peers: &[PeerView],
    tie: u64,
    cmp: impl Fn(&PeerView, &PeerView) -> std::cmp::Ordering,
) -> Option<usize> {
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
        PeerView { available: true, weight: 1, requests, tokens, cost: 0 }
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
    fn usage_is_read_from_answer_chunks() {
        let c = br#"data: {"choices":[],"usage":{"prompt_tokens":5,"total_tokens":12,"completion_tokens":7}}"#;
        assert_eq!(usage_total_tokens(c), Some(12));
        let two =
            b"data: {\"usage\":{\"total_tokens\": 3}}\n\ndata: {\"usage\":{\"total_tokens\":40}}";
        assert_eq!(usage_total_tokens(two), Some(40));
        assert_eq!(usage_total_tokens(b"data: [DONE]"), None);
        assert_eq!(usage_total_tokens(b"\"total_tokens\":x"), None);
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
}
