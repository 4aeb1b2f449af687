//! Dynamic length buckets: which of `k` upstreams (shortest prompts first) a
//! request of a given length goes to, so that each upstream receives an
//! equal share of the recent token load.
//!
//! # The algorithm
//!
//! * **Lengths** are tokens by the shared rule ([`crate::tokens`]), binned on
//!   a log scale: lengths 0–7 have a bin each, then every power of two is cut
//!   into 8 bins (bins are at most 12.5 % wide), up to 2³² − 1 tokens
//!   ([`BINS`] bins; longer lengths count in the last one).
//! * **Recent load** is a histogram of token *mass* (the sum of the lengths
//!   of the requests that fell in each bin). Requests add their length to the
//!   open window; every `window` recorded requests the window is folded into
//!   the smoothed histogram `H ← (1 − α)·H + α·W` and emptied. The newest
//!   window thus weighs `α`, the one before `α(1 − α)`, and so on: `α = 1`
//!   keeps only the last window, `α = 0.1` remembers about ten.
//! * **Boundaries** are recomputed from `H` after each fold: boundary `i`
//!   (`i = 1 … k−1`) is where the cumulative mass, shortest lengths first,
//!   reaches `i/k` of the total. A boundary usually falls inside a bin; it is
//!   kept as a *position* `bin·2³² + f·2³²`, `f` being the share of that
//!   bin's mass below it.
//! * **A request** of length `L` gets the position `bin(L)·2³² + u`, `u` a
//!   32-bit number spread evenly over requests (a Weyl sequence of the request
//!   number), and goes to bucket `1 + #{boundaries ≤ its position}`. So
//!   lengths in bins below a boundary go below it, and of the requests in the
//!   boundary's own bin a share `f` goes below: each bucket receives `1/k` of
//!   the smoothed mass even when many requests have the same length (a
//!   benchmark's fixed prompt), where a plain length threshold would send
//!   them all one way.
//! * **Before the first fold**, and for requests of unknown or zero length
//!   (not recorded), the answer is bucket 1.
//!
//! # Sharing
//!
//! [`BucketZone`] is `#[repr(C)]`, fixed-size and made of atomics only, with
//! all-zero bytes a valid empty state, so the glue places it in a shared zone
//! seen by every worker; no lock is taken on the request path. The fold is
//! done by the request that closes a window, under a one-word ownership flag
//! (taken over if its owner died mid-fold), and published with a sequence
//! counter (odd while folding) so that a worker reads a consistent `H`.
//! Each worker caches the boundaries ([`Cut`]) and recomputes them once per
//! fold, so a request costs three atomic additions and a few comparisons.

use std::sync::atomic::{fence, AtomicU64, Ordering};

pub mod conf;

/// Most buckets (upstreams) a set may have.
pub const MAX_BUCKETS: usize = 16;

/// Bins of the length histogram (see the module docs).
pub const BINS: usize = 8 + 29 * 8;

/// Layout version, in [`BucketZone::magic`].
pub const MAGIC: u64 = 0x7064_6275_636b_0001;

/// A fold whose owner has not finished after this many more requests were
/// recorded is taken over (the owner died; a fold takes microseconds).
const STALE_FOLD: u64 = 4096;

/// Bin of a length in tokens.
pub fn bin_of(tokens: u64) -> usize {
    let t = tokens.min(u64::from(u32::MAX));
    if t < 8 {
        return t as usize;
    }
    let e = 63 - t.leading_zeros() as usize; // 3 ..= 31
    let m = ((t >> (e - 3)) & 7) as usize;
    8 + (e - 3) * 8 + m
}

/// The lengths of a bin: `(first, width)`.
pub fn bin_range(bin: usize) -> (u64, u64) {
    if bin < 8 {
        return (bin as u64, 1);
    }
    let e = (bin - 8) / 8 + 3;
    let m = ((bin - 8) % 8) as u64;
    ((8 + m) << (e - 3), 1 << (e - 3))
}

/// The length (tokens, fractional) a boundary position stands for.
pub fn position_length(pos: u64) -> f64 {
    let (first, width) = bin_range((pos >> 32) as usize);
    first as f64 + width as f64 * (pos & 0xffff_ffff) as f64 / 4_294_967_296.0
}

/// An even spread of 32-bit numbers over consecutive request numbers.
fn weyl(seq: u64) -> u64 {
    seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32
}

/// Computes the `buckets − 1` boundary positions of a mass histogram into
/// `out`; `false` (and nothing written) when the histogram is empty.
pub fn boundaries(mass: &[f64; BINS], buckets: usize, out: &mut [u64; MAX_BUCKETS - 1]) -> bool {
    let n = buckets.clamp(1, MAX_BUCKETS) - 1;
    let total: f64 = mass.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        return false;
    }
    let mut i = 0;
    let mut cum = 0.0;
    let mut last = 0;
    for (bin, &m) in mass.iter().enumerate() {
        if m.is_nan() || m <= 0.0 {
            continue;
        }
        last = bin;
        while i < n {
            let target = total * (i + 1) as f64 / buckets as f64;
            if target > cum + m {
                break;
            }
            let f = ((target - cum) / m).clamp(0.0, 1.0);
            out[i] = ((bin as u64) << 32) + (f * 4_294_967_296.0).round() as u64;
            i += 1;
        }
        cum += m;
    }
    // Rounding may leave the last targets just above the sum: they are at
    // the end of the last bin with mass.
    while i < n {
        out[i] = ((last as u64) + 1) << 32;
        i += 1;
    }
    true
}

/// The boundaries a worker uses, as of one fold of the shared histogram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cut {
    /// The fold generation they were computed from (0: none yet).
    pub generation: u64,
    /// How many boundaries are valid: 0 (no data yet) or `buckets − 1`.
    pub len: usize,
    pub positions: [u64; MAX_BUCKETS - 1],
}

impl Default for Cut {
    fn default() -> Self {
        Cut { generation: 0, len: 0, positions: [0; MAX_BUCKETS - 1] }
    }
}

impl Cut {
    /// The valid boundary positions.
    pub fn positions(&self) -> &[u64] {
        &self.positions[..self.len.min(MAX_BUCKETS - 1)]
    }

    /// 0-based bucket of a request position.
    pub fn bucket(&self, pos: u64) -> usize {
        self.positions().iter().filter(|&&b| pos >= b).count()
    }

    /// The boundaries as lengths in tokens, rounded.
    pub fn lengths(&self) -> impl Iterator<Item = u64> + '_ {
        self.positions().iter().map(|&p| position_length(p).round() as u64)
    }
}

/// A bucket set's parameters (from its directive).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Number of buckets, 2 ..= [`MAX_BUCKETS`].
    pub buckets: usize,
    /// Weight of the newest window, in (0, 1].
    pub alpha: f64,
    /// Requests per window, ≥ 1.
    pub window: u64,
}

/// One decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// 0-based bucket.
    pub bucket: usize,
    /// The request's length in tokens, when known and recorded.
    pub tokens: Option<u64>,
}

/// The shared state of a bucket set (see the module docs).
#[repr(C)]
#[derive(Debug)]
pub struct BucketZone {
    /// [`MAGIC`] once initialised.
    magic: AtomicU64,
    /// Requests recorded since the zone was created.
    recorded: AtomicU64,
    /// Folds published × 2; odd while a fold is being written.
    generation: AtomicU64,
    /// 0 when no fold runs, else the request number of the folding request.
    fold_owner: AtomicU64,
    /// Requests and tokens sent to each bucket since the zone was created.
    routed_requests: [AtomicU64; MAX_BUCKETS],
    routed_tokens: [AtomicU64; MAX_BUCKETS],
    /// Token mass of the open window, per bin.
    window: [AtomicU64; BINS],
    /// The smoothed mass `H`, per bin (`f64` bits).
    smoothed: [AtomicU64; BINS],
}

impl Default for BucketZone {
    fn default() -> Self {
        BucketZone {
            magic: AtomicU64::new(MAGIC),
            recorded: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            fold_owner: AtomicU64::new(0),
            routed_requests: std::array::from_fn(|_| AtomicU64::new(0)),
            routed_tokens: std::array::from_fn(|_| AtomicU64::new(0)),
            window: std::array::from_fn(|_| AtomicU64::new(0)),
            smoothed: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// A snapshot of a zone for status pages.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub recorded: u64,
    pub folds: u64,
    pub routed_requests: [u64; MAX_BUCKETS],
    pub routed_tokens: [u64; MAX_BUCKETS],
}

impl BucketZone {
    /// Makes all-zero memory (a fresh slab allocation) a live zone; `false`
    /// when the memory holds something else (another layout version).
    pub fn attach(&self) -> bool {
        crate::shm::attach(&self.magic, MAGIC)
    }

    /// Records a request of `tokens` (None: unknown length) and chooses its
    /// bucket; `cut` is the calling worker's cache of the boundaries.
    pub fn decide(&self, tokens: Option<u64>, p: &Params, cut: &mut Cut) -> Decision {
        let Some(t) = tokens.filter(|&t| t > 0) else {
            self.route(0, 0);
            return Decision { bucket: 0, tokens: None };
        };
        let bin = bin_of(t);
        if let Some(w) = self.window.get(bin) {
            w.fetch_add(t, Ordering::Relaxed);
        }
        let seq = self.recorded.fetch_add(1, Ordering::Relaxed) + 1;
        if seq.checked_rem(p.window) == Some(0) {
            self.fold(p.alpha, seq);
        }
        self.refresh(cut, p.buckets);
        let bucket = cut.bucket(((bin as u64) << 32) | weyl(seq)).min(p.buckets.max(1) - 1);
        self.route(bucket, t);
        Decision { bucket, tokens: Some(t) }
    }

    fn route(&self, bucket: usize, tokens: u64) {
        if let (Some(r), Some(t)) =
            (self.routed_requests.get(bucket), self.routed_tokens.get(bucket))
        {
            r.fetch_add(1, Ordering::Relaxed);
            t.fetch_add(tokens, Ordering::Relaxed);
        }
    }

    /// Folds the open window into `H` (see the module docs). Only one
    /// request folds at a time; a request closing a window while another
    /// fold runs leaves its window's mass for the next fold.
    fn fold(&self, alpha: f64, seq: u64) {
        let owner = self.fold_owner.load(Ordering::Acquire);
        if owner != 0 && seq.wrapping_sub(owner) < STALE_FOLD {
            return;
        }
        if self
            .fold_owner
            .compare_exchange(owner, seq, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        // Odd while writing. A dead owner may have left it odd already.
        let mut g = self.generation.load(Ordering::Relaxed);
        if g & 1 == 0 {
            g += 1;
            self.generation.store(g, Ordering::Relaxed);
        }
        fence(Ordering::Release);
        let alpha = if alpha > 0.0 && alpha <= 1.0 { alpha } else { 1.0 };
        for (w, h) in self.window.iter().zip(self.smoothed.iter()) {
            // Most bins are empty: read before paying for a locked swap.
            let w = match w.load(Ordering::Relaxed) {
                0 => 0.0,
                _ => w.swap(0, Ordering::Relaxed) as f64,
            };
            let old = f64::from_bits(h.load(Ordering::Relaxed));
            if old == 0.0 && w == 0.0 {
                continue;
            }
            let mut new = (1.0 - alpha) * old + alpha * w;
            if !(new.is_finite() && new >= 1e-9) {
                new = 0.0; // long forgotten (or never seen)
            }
            h.store(new.to_bits(), Ordering::Relaxed);
        }
        self.generation.store(g + 1, Ordering::Release);
        let _ = self.fold_owner.compare_exchange(seq, 0, Ordering::Release, Ordering::Relaxed);
    }

    /// Recomputes `cut` if a fold was published since it was computed and
    /// `H` can be read consistently now (otherwise the old cut stays).
    pub fn refresh(&self, cut: &mut Cut, buckets: usize) {
        let g1 = self.generation.load(Ordering::Acquire);
        if g1 == cut.generation || g1 & 1 == 1 {
            return;
        }
        let mut mass = [0.0f64; BINS];
        for (m, h) in mass.iter_mut().zip(self.smoothed.iter()) {
            *m = f64::from_bits(h.load(Ordering::Relaxed));
        }
        fence(Ordering::Acquire);
        if self.generation.load(Ordering::Relaxed) != g1 {
            return;
        }
        let mut next = Cut { generation: g1, ..Cut::default() };
        if boundaries(&mass, buckets, &mut next.positions) {
            next.len = buckets.clamp(1, MAX_BUCKETS) - 1;
        }
        *cut = next;
    }

    /// Counters for a status page.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            recorded: self.recorded.load(Ordering::Relaxed),
            folds: self.generation.load(Ordering::Relaxed) / 2,
            routed_requests: std::array::from_fn(|i| {
                self.routed_requests[i].load(Ordering::Relaxed)
            }),
            routed_tokens: std::array::from_fn(|i| self.routed_tokens[i].load(Ordering::Relaxed)),
        }
    }

    /// The smoothed mass of one bin.
    pub fn smoothed(&self, bin: usize) -> f64 {
        self.smoothed.get(bin).map_or(0.0, |h| f64::from_bits(h.load(Ordering::Relaxed)))
    }
}

/// One bucket set's part of a status page:
///
/// ```text
/// dynamic_bucket $prefill_bucket zone=prefill_len alpha=0.1 window=32
/// requests 1200 folds 37
/// boundaries 1843
/// bucket 1 prefill_short requests 640 tokens 301233 share 0.497
/// bucket 2 prefill_long requests 560 tokens 304530 share 0.503
/// ```
///
/// `requests` counts recorded requests (known, non-zero length) and `folds`
/// the windows folded; `boundaries` are in tokens (`-` before the first
/// fold); per bucket, the requests (unknown lengths included) and tokens
/// sent to it since the zone was created, and its share of those tokens.
pub fn status_text(out: &mut String, c: &conf::BucketConf, s: &Snapshot, cut: &Cut) {
    use std::fmt::Write;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let _ = writeln!(
        out,
        "dynamic_bucket ${} zone={} alpha={} window={}",
        text(&c.variable),
        text(&c.zone),
        c.params.alpha,
        c.params.window
    );
    let _ = writeln!(out, "requests {} folds {}", s.recorded, s.folds);
    let lengths: Vec<String> = cut.lengths().map(|l| l.to_string()).collect();
    let lengths = if lengths.is_empty() { "-".to_string() } else { lengths.join(" ") };
    let _ = writeln!(out, "boundaries {lengths}");
    let total: u64 = s.routed_tokens.iter().take(c.upstreams.len()).sum();
    for (i, name) in c.upstreams.iter().enumerate() {
        let (r, t) = (s.routed_requests.get(i).copied(), s.routed_tokens.get(i).copied());
        let (r, t) = (r.unwrap_or(0), t.unwrap_or(0));
        let share = if total > 0 { t as f64 / total as f64 } else { 0.0 };
        let _ = writeln!(
            out,
            "bucket {} {} requests {r} tokens {t} share {share:.3}",
            i + 1,
            text(name)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small seeded generator (SplitMix64) for reproducible workloads.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }

        /// A long-tailed prompt length (log-uniform over 16 … 32768 tokens).
        fn prompt(&mut self) -> u64 {
            (16.0 * 2048f64.powf(self.unit())) as u64
        }
    }

    fn params(buckets: usize, alpha: f64, window: u64) -> Params {
        Params { buckets, alpha, window }
    }

    #[test]
    fn bins_cover_every_length_in_order() {
        let mut prev = 0;
        for t in (0..70_000u64).chain([1 << 31, u64::from(u32::MAX), u64::MAX]) {
            let b = bin_of(t);
            assert!(b >= prev && b < BINS, "length {t} in bin {b}");
            prev = b;
            let (first, width) = bin_range(b);
            if t <= u64::from(u32::MAX) {
                assert!(first <= t && t < first + width, "length {t} outside bin {b}");
            }
            assert!(width * 8 <= first.max(8), "bin {b} wider than 12.5 %");
        }
        assert_eq!(bin_of(u64::MAX), BINS - 1);
        assert_eq!(bin_range(8), (8, 1));
        assert_eq!(bin_range(16), (16, 2));
        assert_eq!(bin_of(12000 / 4), bin_of(3000));
    }

    #[test]
    fn boundaries_split_mass_equally() {
        // Mass at lengths 1 (100), 2 (100), 3 (200): halves at the end of
        // bin 2; quarters at the end of bin 1, of bin 2 and halfway into bin 3.
        let mut mass = [0.0; BINS];
        mass[1] = 100.0;
        mass[2] = 100.0;
        mass[3] = 200.0;
        let mut out = [0; MAX_BUCKETS - 1];
        assert!(boundaries(&mass, 2, &mut out));
        assert_eq!(out[0], 3 << 32);
        assert!(boundaries(&mass, 4, &mut out));
        assert_eq!(&out[..3], &[2 << 32, 3 << 32, (3 << 32) + (1 << 31)]);
        assert!(!boundaries(&[0.0; BINS], 2, &mut out));
    }

    /// Each bucket's share of a histogram's mass, splitting the boundary
    /// bins by their fraction.
    fn shares(mass: &[f64; BINS], cut: &[u64]) -> Vec<f64> {
        let mut s = vec![0.0; cut.len() + 1];
        for (bin, &m) in mass.iter().enumerate() {
            // The fraction of this bin below each boundary.
            let mut below_prev = 0.0;
            for (i, &b) in cut.iter().enumerate() {
                let below = match (b >> 32).cmp(&(bin as u64)) {
                    std::cmp::Ordering::Greater => 1.0,
                    std::cmp::Ordering::Less => 0.0,
                    std::cmp::Ordering::Equal => (b & 0xffff_ffff) as f64 / 4_294_967_296.0,
                };
                s[i] += m * (below - below_prev).max(0.0);
                below_prev = below_prev.max(below);
            }
            s[cut.len()] += m * (1.0 - below_prev);
        }
        s
    }

    #[test]
    fn boundaries_are_monotonic_and_equal_mass_on_random_histograms() {
        let mut rng = Rng(7);
        for case in 0..500 {
            let mut mass = [0.0; BINS];
            let used = 1 + rng.next() as usize % 40;
            for _ in 0..used {
                mass[rng.next() as usize % BINS] += (rng.next() % 100_000) as f64 + 1.0;
            }
            let total: f64 = mass.iter().sum();
            for k in 2..=MAX_BUCKETS {
                let mut out = [0; MAX_BUCKETS - 1];
                assert!(boundaries(&mass, k, &mut out));
                let cut = &out[..k - 1];
                assert!(cut.windows(2).all(|w| w[0] <= w[1]), "case {case} k {k}: {cut:?}");
                for (i, s) in shares(&mass, cut).iter().enumerate() {
                    let want = total / k as f64;
                    assert!(
                        (s - want).abs() <= want * 1e-6,
                        "case {case} k {k} bucket {i}: {s} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn nothing_known_goes_to_the_first_bucket() {
        let z = BucketZone::default();
        let mut cut = Cut::default();
        let p = params(3, 0.5, 4);
        assert_eq!(z.decide(None, &p, &mut cut), Decision { bucket: 0, tokens: None });
        assert_eq!(z.decide(Some(0), &p, &mut cut), Decision { bucket: 0, tokens: None });
        // The first window: no boundaries yet.
        for t in [10_000, 20_000, 30_000] {
            assert_eq!(z.decide(Some(t), &p, &mut cut).bucket, 0);
        }
        assert_eq!(z.snapshot().recorded, 3);
        assert_eq!(z.snapshot().folds, 0);
        assert_eq!(z.snapshot().routed_requests[0], 5);
    }

    #[test]
    fn decay_weights_the_newest_window_by_alpha() {
        let z = BucketZone::default();
        let mut cut = Cut::default();
        let p = params(2, 0.25, 2);
        let b = bin_of(100);
        z.decide(Some(100), &p, &mut cut);
        assert_eq!(z.smoothed(b), 0.0, "no fold before the window is full");
        z.decide(Some(100), &p, &mut cut);
        assert_eq!(z.smoothed(b), 0.25 * 200.0);
        let b2 = bin_of(1000);
        z.decide(Some(1000), &p, &mut cut);
        z.decide(Some(1000), &p, &mut cut);
        assert_eq!(z.smoothed(b), 0.75 * 50.0);
        assert_eq!(z.smoothed(b2), 0.25 * 2000.0);
        assert_eq!(z.snapshot().folds, 2);
        // alpha = 1: only the last window counts.
        let z = BucketZone::default();
        let p = params(2, 1.0, 1);
        z.decide(Some(100), &p, &mut cut);
        z.decide(Some(1000), &p, &mut cut);
        assert_eq!((z.smoothed(b), z.smoothed(b2)), (0.0, 1000.0));
    }

    #[test]
    fn short_and_long_requests_part_after_the_first_window() {
        let z = BucketZone::default();
        let mut cut = Cut::default();
        let p = params(2, 0.5, 8);
        // Equal token mass at 500 and at 5000 tokens (10 short per long).
        for i in 0..88 {
            z.decide(Some(if i % 11 == 10 { 5000 } else { 500 }), &p, &mut cut);
        }
        assert_eq!(cut.len, 1);
        let b = cut.lengths().next().unwrap();
        assert!((480..=5120).contains(&b), "boundary {b}");
        assert_eq!(z.decide(Some(100), &p, &mut cut).bucket, 0);
        assert_eq!(z.decide(Some(400), &p, &mut cut).bucket, 0);
        assert_eq!(z.decide(Some(6000), &p, &mut cut).bucket, 1);
        assert_eq!(z.decide(Some(100_000), &p, &mut cut).bucket, 1);
    }

    #[test]
    fn one_length_only_is_split_evenly() {
        // A benchmark with a fixed prompt: a threshold would send every
        // request the same way; the boundary bin is shared instead.
        let z = BucketZone::default();
        let mut cut = Cut::default();
        let p = params(4, 0.2, 16);
        let mut n = [0u32; 4];
        for _ in 0..16_000 {
            n[z.decide(Some(1024), &p, &mut cut).bucket] += 1;
        }
        for c in n {
            assert!((3900..=4100).contains(&c), "{n:?}");
        }
    }

    #[test]
    fn mixed_workload_gives_each_bucket_its_share_of_tokens() {
        for k in [2, 3, 4, 8] {
            let z = BucketZone::default();
            let mut cut = Cut::default();
            let p = params(k, 0.1, 32);
            let mut rng = Rng(42 + k as u64);
            for _ in 0..2000 {
                z.decide(Some(rng.prompt()), &p, &mut cut);
            }
            let before = z.snapshot().routed_tokens;
            for _ in 0..20_000 {
                z.decide(Some(rng.prompt()), &p, &mut cut);
            }
            let after = z.snapshot().routed_tokens;
            let got: Vec<u64> = (0..k).map(|i| after[i] - before[i]).collect();
            let total: u64 = got.iter().sum();
            for g in &got {
                let share = *g as f64 / total as f64;
                assert!((share - 1.0 / k as f64).abs() < 0.15 / k as f64, "k {k}: {got:?}");
            }
            // Shortest first: bucket i's lengths are below bucket i+1's.
            let lengths: Vec<u64> = cut.lengths().collect();
            assert!(lengths.windows(2).all(|w| w[0] <= w[1]), "{lengths:?}");
        }
    }

    #[test]
    fn boundaries_follow_a_shift_in_the_workload() {
        let z = BucketZone::default();
        let mut cut = Cut::default();
        let p = params(2, 0.3, 16);
        let mut rng = Rng(3);
        for _ in 0..1600 {
            z.decide(Some(100 + rng.next() % 100), &p, &mut cut);
        }
        let short = cut.lengths().next().unwrap();
        assert!((100..200).contains(&short), "{short}");
        for _ in 0..1600 {
            z.decide(Some(10_000 + rng.next() % 10_000), &p, &mut cut);
        }
        let long = cut.lengths().next().unwrap();
        assert!((10_000..20_000).contains(&long), "{long}");
    }

    #[test]
    fn a_fold_left_behind_by_a_dead_worker_is_taken_over() {
        let z = BucketZone::default();
        let mut cut = Cut::default();
        let p = params(2, 0.5, 1);
        z.decide(Some(100), &p, &mut cut);
        assert_eq!(z.snapshot().folds, 1);
        // A worker died while folding at request 2.
        z.fold_owner.store(2, Ordering::Relaxed);
        z.generation.store(3, Ordering::Relaxed);
        z.recorded.store(2, Ordering::Relaxed);
        for _ in 0..100 {
            z.decide(Some(100), &p, &mut cut);
        }
        assert_eq!(z.snapshot().folds, 1, "a recent fold is not taken over");
        z.recorded.store(2 + STALE_FOLD, Ordering::Relaxed);
        z.decide(Some(100), &p, &mut cut);
        assert_eq!(z.snapshot().folds, 2);
        assert_eq!(z.fold_owner.load(Ordering::Relaxed), 0);
        assert_eq!(cut.generation, 4);
    }

    #[test]
    fn status_page() {
        let args: Vec<&[u8]> =
            "$b zone=z:64k alpha=0.5 window=2 s l".split(' ').map(str::as_bytes).collect();
        let c = conf::parse(&args).unwrap();
        let z = BucketZone::default();
        let mut cut = Cut::default();
        let mut out = String::new();
        status_text(&mut out, &c, &z.snapshot(), &cut);
        assert_eq!(
            out,
            "dynamic_bucket $b zone=z alpha=0.5 window=2\nrequests 0 folds 0\nboundaries -\n\
             bucket 1 s requests 0 tokens 0 share 0.000\nbucket 2 l requests 0 tokens 0 share 0.000\n"
        );
        for t in [100, 100, 100, 100] {
            z.decide(Some(t), &c.params, &mut cut);
        }
        out.clear();
        status_text(&mut out, &c, &z.snapshot(), &cut);
        assert!(out.contains("requests 4 folds 2\nboundaries 100\n"), "{out}");
        assert!(out.contains("bucket 1 s requests 3 tokens 300 share 0.750\n"), "{out}");
    }

    #[test]
    fn attach_accepts_zeroes_and_itself_only() {
        let z = BucketZone::default();
        assert!(z.attach());
        z.magic.store(0, Ordering::Relaxed);
        assert!(z.attach());
        assert_eq!(z.magic.load(Ordering::Relaxed), MAGIC);
        z.magic.store(1, Ordering::Relaxed);
        assert!(!z.attach());
    }

    #[test]
    fn workers_sharing_a_zone_agree() {
        let z = std::sync::Arc::new(BucketZone::default());
        let p = params(3, 0.2, 8);
        let threads: Vec<_> = (0..4)
            .map(|w| {
                let z = z.clone();
                std::thread::spawn(move || {
                    let mut cut = Cut::default();
                    let mut rng = Rng(w);
                    for _ in 0..20_000 {
                        let d = z.decide(Some(rng.prompt()), &p, &mut cut);
                        assert!(d.bucket < 3);
                        assert!(cut.positions().windows(2).all(|w| w[0] <= w[1]));
                    }
                    cut
                })
            })
            .collect();
        let cuts: Vec<Cut> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let s = z.snapshot();
        assert_eq!(s.recorded, 80_000);
        assert_eq!(s.routed_requests.iter().sum::<u64>(), 80_000);
        assert!(s.folds > 0 && s.folds <= 10_000);
        // Every worker refreshes to the latest published fold.
        let mut last = Cut::default();
        z.refresh(&mut last, 3);
        for mut c in cuts {
            z.refresh(&mut c, 3);
            assert_eq!(c, last);
        }
    }
}
