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
    assert_eq!((p.int("batch_size"), p.int("dict_size"), p.int("block_size")), (16, 10_000, 640));
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
    // In flight: requests, and the prompt tokens still to compute (cost).
    let busy = |requests: u64, uncached: u64| PeerView { cost: uncached, ..peer(requests, 0) };
    // 2,000 of 2,400 prompt tokens cached on peer 1, which computes 3,000
    // more: the idle peer 2 is done first (2,400 < 3,400).
    let p = [busy(2, 3000), busy(2, 3000), busy(0, 0)];
    assert_eq!(precise_prefix(&p, 2400, &[0, 2000, 0], 16, 0), Some(2));
    // Requests in flight whose prompts were cached cost little: the holder
    // keeps the conversation (400 + 400 < 2,400).
    let p = [busy(3, 6000), busy(3, 400), busy(0, 0)];
    assert_eq!(precise_prefix(&p, 2400, &[0, 2000, 0], 16, 0), Some(1));
    // Nothing cached: the least work.
    assert_eq!(precise_prefix(&p, 2400, &[0, 0, 0], 16, 0), Some(2));
    // Whole prompts in flight do not count, what they compute does.
    let p = [PeerView { tokens: 50_000, ..busy(1, 100) }, busy(0, 0)];
    assert_eq!(precise_prefix(&p, 8000, &[8000, 0], 16, 0), Some(0));
    // The hot-engine guard: a holder more than `batch` requests beyond
    // the least busy peer is not taken, however much it holds.
    let p = [busy(5, 100), busy(0, 4000)];
    assert_eq!(precise_prefix(&p, 8000, &[8000, 0], 16, 0), Some(0));
    assert_eq!(precise_prefix(&p, 8000, &[8000, 0], 4, 0), Some(1));
    // Unavailable peers never; none available: none.
    let mut q = [peer(0, 0), peer(0, 0)];
    q[0].available = false;
    assert_eq!(precise_prefix(&q, 100, &[100, 0], 16, 0), Some(1));
    q[1].available = false;
    assert_eq!(precise_prefix(&q, 100, &[100, 0], 16, 0), None);
    assert_eq!((uncached(100, 30), uncached(100, 300)), (70, 0));
}

#[test]
fn policies_by_name() {
    assert_eq!(Policy::parse(b"least_active"), Some(None));
    assert_eq!(Policy::parse(b"prefill_score_balance"), Some(Some(Policy::PrefillScore)));
    assert_eq!(Policy::parse(b"round_robin"), None);
    // Fewer tokens in flight wins for the token-aware policies.
    let p = [peer(1, 5000), peer(1, 10)];
    for pol in
        [Policy::LeastTotalLoad, Policy::WeightedLeastActive, Policy::PrefillScore, Policy::PdScore]
    {
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

#[test]
fn precise_affinity_keeps_the_longest_holding_until_loads_diverge() {
    let busy = |requests: u64, uncached: u64| PeerView { cost: uncached, ..peer(requests, 0) };
    // Peer 1 holds the whole prompt (160 tokens): it keeps it although
    // its queue costs more than the idle peer's whole prompt would.
    let p = [busy(0, 0), busy(6, 3000), busy(0, 0)];
    assert_eq!(precise_affinity(&p, 160, &[0, 160, 0], 16, 0), Some(1));
    // Two hold it: the one with less to compute.
    let p = [busy(2, 900), busy(2, 300), busy(0, 0)];
    assert_eq!(precise_affinity(&p, 160, &[160, 160, 0], 16, 0), Some(1));
    // The holder runs more than `batch` requests beyond the least busy
    // peer: the cost over all decides, shorter holdings counting.
    let p = [busy(20, 100), busy(3, 100), busy(0, 150)];
    assert_eq!(precise_affinity(&p, 160, &[160, 144, 0], 16, 0), Some(1));
    // Nothing held: the least work.
    let p = [busy(1, 500), busy(0, 100), busy(0, 0)];
    assert_eq!(precise_affinity(&p, 160, &[0, 0, 0], 16, 0), Some(2));
}
