//! balance-bench: what one balancer decision costs, in ns per pick, at 8, 64
//! and 256 peers. A benchmark, not a test: it prints figures
//! (docs/benchmarks.md).
//!
//! Each pick does what the glue does per request
//! (`modules/pdgate-glue/src/balancer/hooks.rs`, `get` and `free`): the request's
//! cost (`Balancer::cost`), a fresh `[PeerView; MAX_PEERS]`, every peer's
//! counters loaded from its slot of the shared table (a `Vec<Slot>` as large
//! as the real zone's, the slots claimed by `peer_key` as the glue claims
//! them), a random number for ties, the policy, and `acquire` of the chosen
//! slot. The request is `release`d `4 × peers` picks later, so the counters
//! the policies read are those of a busy upstream rather than zeros.
//!
//! The baseline, measured in the same run over the same kind of table, is
//! round robin reduced to what it costs us: `i = (i + 1) % n` plus the same
//! acquire and release, no views. `views + round_robin` adds the views, to
//! separate the glue's share from the policy's.
//!
//! Rounds are interleaved (round 1 of every case, then round 2, ...) so that
//! a neighbour's load on a shared machine hits every case alike; each case's
//! figure is the median of its rounds.
//!
//! To benchmark a new policy, add one line to [`policies`].

use std::hint::black_box;
use std::sync::Barrier;
use std::time::Instant;

use pdgate_core::balance::slots::{peer_key, Slot, SlotTable};
use pdgate_core::balance::{self, PeerView};
use pdgate_core::request_id::Rng;

/// The glue's `MAX_PEERS` (the size of its stack array of views).
const MAX_PEERS: usize = 256;
/// Slots of a balancer zone (`pdgate_glue::balancer::zone::SLOTS`).
const SLOTS: usize = 2048;
/// Distinct requests replayed in a cycle.
const REQUESTS: usize = 4096;

const USAGE: &str = "\
balance-bench: ns per balancer decision (view build + policy + acquire/release)

usage: balance-bench [--peers 8,64,256] [--rounds N] [--threads T] [--quick]

  --peers LIST   peer counts to measure [8,64,256]
  --rounds N     timed rounds per case; the median is reported [21]
  --threads T    also run T threads picking on the same table at once [off]
  --quick        5 rounds of a tenth of the picks (a smoke run)
";

/// One request as a policy sees it.
#[derive(Debug, Clone, Copy)]
struct Req {
    /// Estimated tokens of its body.
    tokens: u64,
    /// A hash of its prompt's prefix (one of 256 groups), for policies that
    /// keep affinity.
    prefix: u64,
}

/// A policy as the glue calls it: the views, the request, its cost, and a
/// random number for ties. Boxed so a policy may keep state of its own.
type Pick = Box<dyn FnMut(&[PeerView], &Req, u64, u64) -> Option<usize>>;

struct Policy {
    name: &'static str,
    /// `Balancer::cost`: what the request adds to its peer's `cost` counter.
    cost: fn(&Req) -> u64,
    /// None: the round-robin baseline (no views built).
    pick: Option<Pick>,
}

fn no_cost(_: &Req) -> u64 {
    0
}

fn greedy_cost(r: &Req) -> u64 {
    balance::greedy_cost(r.tokens, balance::GREEDY_WARMUP, balance::GREEDY_EXP)
}

/// Every case, in print order; built once per thread. The arguments are the
/// modules' defaults (`DEFAULT_BATCH` of least_total_load and
/// auto_balance_controller, the prefill_score_balance and greedy_timeout
/// constants).
fn policies() -> Vec<Policy> {
    fn p(
        name: &'static str,
        cost: fn(&Req) -> u64,
        pick: impl FnMut(&[PeerView], &Req, u64, u64) -> Option<usize> + 'static,
    ) -> Policy {
        Policy { name, cost, pick: Some(Box::new(pick)) }
    }
    let mut rr = 0usize;
    vec![
        Policy { name: "round_robin", cost: no_cost, pick: None },
        p("views + round_robin", no_cost, move |v, _, _, _| {
            rr = (rr + 1) % v.len();
            Some(rr)
        }),
        p("least_total_load", no_cost, |v, r, _, tie| {
            balance::least_total_load(v, r.tokens, 16, tie)
        }),
        p("weighted_least_active", no_cost, |v, r, _, tie| {
            balance::weighted_least_active(v, r.tokens, tie)
        }),
        p("auto_balance_controller", no_cost, |v, r, _, tie| {
            balance::auto_balance_controller(v, r.tokens, 24, tie)
        }),
        p("prefill_score_balance", no_cost, |v, r, _, tie| {
            balance::prefill_score(
                v,
                r.tokens,
                balance::PREFILL_SCORE_A,
                balance::PREFILL_SCORE_B,
                tie,
            )
        }),
        p("greedy_timeout", greedy_cost, |v, _, cost, tie| balance::greedy_timeout(v, cost, tie)),
        p("length_balance", no_cost, |v, r, _, tie| balance::length_balance(v, r.tokens, tie)),
        p("pd_score_balance prefill", no_cost, |v, _, _, tie| {
            balance::pd_score_prefill(v, balance::PD_SCORE_MAX_SEQS_PREFILL, tie)
        }),
        // The decode look-ahead over 8 requests in prefill (the glue reads
        // them from the shared pending table; that read is not included).
        p("pd_score_balance decode", no_cost, |v, r, _, tie| {
            let pending = [900, 50, 4000, 120, 700, 64, 2000, 300];
            balance::pd_score_decode(v, r.tokens, &pending, balance::PD_SCORE_MAX_SEQS_DECODE, tie)
        }),
        // Affinity as the glue passes it: the longest match on one peer
        // (the shared index lookup itself is not included).
        p("prefix_cache_affinity", no_cost, |v, r, _, tie| {
            let mut affinity = [0u32; 256];
            affinity[(r.prefix as usize) % v.len()] = 3;
            balance::prefix_cache_affinity(v, r.tokens, &affinity[..v.len()], 16, tie)
        }),
    ]
}

/// The requests replayed: ShareGPT-like prompt lengths (lognormal, median
/// 200 tokens, clamped to 4..4096, as pd-bench's `sharegpt`), prefixes from
/// 256 groups.
fn requests(seed: u64) -> Vec<Req> {
    let mut rng = Rng::new(seed);
    let mut unit = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    (0..REQUESTS)
        .map(|_| {
            // Box-Muller.
            let (u, v) = (unit().max(1e-12), unit());
            let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
            let tokens = (200.0 * z.exp()).clamp(4.0, 4096.0) as u64;
            let group = (unit() * 256.0) as u64;
            Req { tokens, prefix: peer_key(b"prefix", &group.to_le_bytes()) }
        })
        .collect()
}

/// A table as large as the glue's zone holds, with `n` peers of one
/// upstream claimed in it; their slot indices in peer order.
fn table(n: usize) -> (Vec<Slot>, Vec<usize>) {
    let slots: Vec<Slot> = (0..SLOTS).map(|_| Slot::default()).collect();
    let t = SlotTable::new(&slots);
    let slot_of = (0..n)
        .map(|i| {
            let name = format!("10.0.{}.{}:8200", i / 250, i % 250 + 1);
            t.find_or_claim(peer_key(b"decode_servers", name.as_bytes())).unwrap_or(usize::MAX)
        })
        .collect();
    (slots, slot_of)
}

/// One thread's picking state for one case.
struct Picker {
    policy: Policy,
    slot_of: Vec<usize>,
    reqs: Vec<Req>,
    next: usize,
    rng: Rng,
    rr: usize,
    /// Requests in flight: (slot, tokens, cost), released `len` picks later.
    ring: Vec<(usize, u64, u64)>,
    head: usize,
}

impl Picker {
    fn new(policy: Policy, slot_of: Vec<usize>, seed: u64) -> Picker {
        let depth = 4 * slot_of.len();
        Picker {
            policy,
            slot_of,
            reqs: requests(seed),
            next: 0,
            rng: Rng::new(seed ^ 0x5eed),
            rr: 0,
            ring: vec![(usize::MAX, 0, 0); depth],
            head: 0,
        }
    }

    /// `count` picks on `table`; returns how many found no peer (always 0
    /// here: every peer is available).
    #[inline(never)]
    fn run(&mut self, table: SlotTable<'_>, count: usize) -> u64 {
        let n = self.slot_of.len();
        let mut none = 0;
        for _ in 0..count {
            let req = self.reqs[self.next];
            self.next = (self.next + 1) % self.reqs.len();
            let cost = (self.policy.cost)(black_box(&req));
            let chosen = match self.policy.pick.as_mut() {
                None => {
                    self.rr = (self.rr + 1) % n;
                    Some(self.rr)
                }
                Some(pick) => {
                    // As the glue's `get`: a fresh array (16 entries for
                    // pools of up to 16 peers, 256 beyond), every peer's
                    // counters from its slot.
                    let tie = self.rng.next_u64();
                    if n <= SMALL_POOL {
                        let mut views = [PeerView::default(); SMALL_POOL];
                        fill(&mut views[..n], &table, &self.slot_of);
                        pick(black_box(&views[..n]), &req, cost, tie)
                    } else {
                        let mut views = [PeerView::default(); MAX_PEERS];
                        fill(&mut views[..n], &table, &self.slot_of);
                        pick(black_box(&views[..n]), &req, cost, tie)
                    }
                }
            };
            let Some(c) = black_box(chosen) else {
                none += 1;
                continue;
            };
            let slot = self.slot_of.get(c).copied().unwrap_or(usize::MAX);
            table.acquire(slot, req.tokens, cost);
            // `free` of the request placed `depth` picks ago.
            let (s, t, k) = std::mem::replace(&mut self.ring[self.head], (slot, req.tokens, cost));
            table.release(s, t, k);
            self.head = (self.head + 1) % self.ring.len();
        }
        none
    }
}

/// Picks per timed round: about 2–10 ms of work at any peer count.
fn picks_per_round(peers: usize, quick: bool) -> usize {
    let n = 2_000_000 / (peers + 8);
    if quick {
        n / 10
    } else {
        n
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        l if l % 2 == 1 => v[l / 2],
        l => (v[l / 2 - 1] + v[l / 2]) / 2.0,
    }
}

/// One row per case: name, median ns/pick, min ns/pick.
type Rows = Vec<(&'static str, f64, f64)>;

/// Single thread: every case at `peers`, rounds interleaved.
fn measure(peers: usize, rounds: usize, quick: bool) -> Rows {
    let count = picks_per_round(peers, quick);
    let mut cases: Vec<(Vec<Slot>, Picker)> = policies()
        .into_iter()
        .enumerate()
        .map(|(k, pol)| {
            let (slots, slot_of) = table(peers);
            (slots, Picker::new(pol, slot_of, 7 + k as u64))
        })
        .collect();
    let mut times = vec![Vec::with_capacity(rounds); cases.len()];
    // Warmup: fills the in-flight rings and the caches.
    for (slots, picker) in &mut cases {
        picker.run(SlotTable::new(slots), count);
    }
    for _ in 0..rounds {
        for (k, (slots, picker)) in cases.iter_mut().enumerate() {
            let t = Instant::now();
            black_box(picker.run(SlotTable::new(slots), count));
            times[k].push(t.elapsed().as_nanos() as f64 / count as f64);
        }
    }
    cases
        .iter()
        .zip(times.iter_mut())
        .map(|((_, p), t)| {
            let min = t.iter().copied().fold(f64::INFINITY, f64::min);
            (p.policy.name, median(t), min)
        })
        .collect()
}

/// `threads` threads picking on one shared table at once (the slots' cache
/// lines bounce between cores, as between nginx workers); per case, the
/// median over rounds of the slowest thread's ns/pick.
fn measure_threads(peers: usize, rounds: usize, threads: usize, quick: bool) -> Rows {
    let count = picks_per_round(peers, quick);
    let names: Vec<&'static str> = policies().iter().map(|p| p.name).collect();
    let mut rows = Vec::new();
    for (k, name) in names.into_iter().enumerate() {
        let (slots, slot_of) = table(peers);
        let slots = &slots;
        let barrier = Barrier::new(threads);
        let per_thread: Vec<Vec<f64>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|th| {
                    let slot_of = slot_of.clone();
                    let barrier = &barrier;
                    s.spawn(move || {
                        let Some(pol) = policies().into_iter().nth(k) else { return Vec::new() };
                        let mut picker = Picker::new(pol, slot_of, 100 * th as u64 + k as u64);
                        let table = SlotTable::new(slots);
                        picker.run(table, count);
                        (0..rounds)
                            .map(|_| {
                                barrier.wait();
                                let t = Instant::now();
                                black_box(picker.run(table, count));
                                t.elapsed().as_nanos() as f64 / count as f64
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let mut slowest: Vec<f64> = (0..rounds)
            .map(|r| per_thread.iter().filter_map(|t| t.get(r)).copied().fold(0.0, f64::max))
            .collect();
        let min = slowest.iter().copied().fold(f64::INFINITY, f64::min);
        rows.push((name, median(&mut slowest), min));
    }
    rows
}

fn print(peers: usize, rows: &Rows) {
    let base = rows.iter().find(|r| r.0 == "round_robin").map_or(f64::NAN, |r| r.1);
    for (name, med, min) in rows {
        println!("{name:<26} {peers:>5} {med:>10.1} {min:>10.1} {:>8.2}", med / base);
    }
}

fn header() {
    println!("{:<26} {:>5} {:>10} {:>10} {:>8}", "policy", "peers", "ns/pick", "min", "x rr");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut peers = vec![8, 64, 256];
    let mut rounds = 21;
    let mut threads = 0;
    let mut quick = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| match it.next() {
            Some(v) => v.clone(),
            None => fail(&format!("{flag} needs a value")),
        };
        match a.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return;
            }
            "--peers" => {
                let v = value("--peers");
                peers = v
                    .split(',')
                    .map(|p| match p.parse::<usize>() {
                        Ok(n) if (1..=MAX_PEERS).contains(&n) => n,
                        _ => fail(&format!("--peers: \"{p}\" is not a number in 1..256")),
                    })
                    .collect();
            }
            "--rounds" => {
                let v = value("--rounds");
                rounds = match v.parse::<usize>() {
                    Ok(n) if n > 0 => n,
                    _ => fail(&format!("--rounds: \"{v}\" is not a positive number")),
                };
            }
            "--threads" => {
                let v = value("--threads");
                threads = match v.parse::<usize>() {
                    Ok(n) if n > 0 => n,
                    _ => fail(&format!("--threads: \"{v}\" is not a positive number")),
                };
            }
            "--quick" => quick = true,
            other => fail(&format!("unknown argument \"{other}\" (see --help)")),
        }
    }
    if quick {
        rounds = rounds.min(5);
    }

    println!(
        "balance-bench: 1 thread, median of {rounds} rounds of {} picks, {} slots in the table",
        if quick { "~0.2M/(peers+8)" } else { "2M/(peers+8)" },
        SLOTS
    );
    header();
    for &n in &peers {
        print(n, &measure(n, rounds, quick));
    }
    if threads > 0 {
        println!();
        println!("{threads} threads on one table at once (ns/pick of the slowest thread)");
        header();
        for &n in &peers {
            print(n, &measure_threads(n, rounds, threads, quick));
        }
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("balance-bench: {msg}");
    std::process::exit(2);
}

/// The glue's small-pool array size (`pdgate_glue::upstream`).
const SMALL_POOL: usize = 16;

/// Each peer's view from its slot, as the glue builds them.
fn fill(views: &mut [PeerView], table: &SlotTable, slot_of: &[usize]) {
    for (i, v) in views.iter_mut().enumerate() {
        let (requests, tokens, cost) = table.load(slot_of.get(i).copied().unwrap_or(usize::MAX));
        *v = PeerView {
            available: true,
            weight: 1,
            requests,
            tokens,
            cost,
            hist_requests: requests * 7,
            hist_tokens: tokens * 7,
            engine: Default::default(),
        };
    }
}
