//! The workload: what each request of the sequence asks for (prompt and
//! output lengths, shared system prompts, conversations), when it arrives,
//! and its JSON body.
//!
//! Request `n` is a pure function of `(seed, n)`: its lengths and words come
//! from a generator seeded with both, so the same seed always gives the same
//! sequence, whatever the server, the timing or the number of threads. A
//! prompt of `N` tokens is `4N` bytes of words (three letters and a space,
//! one token each by the shared rule of `pdgate_core::tokens`).

use pdgate_core::request_id::Rng;
use pdgate_core::tokens::{tokens_for_bytes, BYTES_PER_TOKEN};
use serde_json::{json, Map, Value};

/// The ShareGPT-like mix: input and output lengths are independent
/// lognormals, `exp(N(ln median, sigma²))`, rounded and clamped. The medians
/// and spreads approximate the ShareGPT v3 conversations vLLM's benchmarks
/// replay (after its filter of prompts ≤ 1,024 and prompt + output ≤ 2,048
/// tokens): most turns are short, a long tail is not.
pub const SHAREGPT_INPUT_MEDIAN: u64 = 200;
pub const SHAREGPT_INPUT_SIGMA: f64 = 1.0;
pub const SHAREGPT_OUTPUT_MEDIAN: u64 = 150;
pub const SHAREGPT_OUTPUT_SIGMA: f64 = 0.8;
/// Clamps of the mix, tokens.
pub const SHAREGPT_INPUT_RANGE: (u64, u64) = (4, 4096);
pub const SHAREGPT_OUTPUT_RANGE: (u64, u64) = (4, 2048);

// Domain tags, so the streams drawn for different purposes never coincide.
const TAG_REQUEST: u64 = 1;
const TAG_SYSTEM: u64 = 2;
const TAG_TURN: u64 = 3;
const TAG_ORDER: u64 = 4;
const TAG_ARRIVALS: u64 = 5;
const TAG_WARMUP: u64 = 6;
const TAG_SYSTEM_LEN: u64 = 7;

/// One 64-bit seed from several (splitmix64's finaliser after each part).
pub fn mix(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x243F_6A88_85A3_08D3;
    for &p in parts {
        h = (h ^ p).wrapping_add(0x9E37_79B9_7F4A_7C15);
        h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^= h >> 31;
    }
    h
}

/// The seed of the warmup requests: a stream of their own, so the measured
/// sequence is the same with or without a warmup.
pub fn warmup_seed(seed: u64) -> u64 {
    mix(&[seed, TAG_WARMUP])
}

/// Uniform in [0, 1).
fn unit(rng: &mut Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Standard normal (Box–Muller).
fn normal(rng: &mut Rng) -> f64 {
    let u1 = 1.0 - unit(rng); // (0, 1]
    let u2 = unit(rng);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Uniform in [lo, hi] (the modulo bias is below 2⁻⁴⁰ for any sane range).
fn between(rng: &mut Rng, lo: u64, hi: u64) -> u64 {
    lo + rng.next_u64() % (hi - lo + 1)
}

fn lognormal(rng: &mut Rng, median: u64, sigma: f64, (lo, hi): (u64, u64)) -> u64 {
    let x = (median as f64).ln() + sigma * normal(rng);
    (x.exp().round() as u64).clamp(lo, hi)
}

/// How long prompts (or, in conversations, each new user message) and
/// answers are, in tokens.
#[derive(Debug, Clone, PartialEq)]
pub enum Lengths {
    Fixed {
        input: u64,
        output: u64,
    },
    /// Inclusive ranges.
    Uniform {
        input: (u64, u64),
        output: (u64, u64),
    },
    /// The ShareGPT-like lognormal mix around these medians, clamped to
    /// `SHAREGPT_*_RANGE` below and to these maxima above; with `long`, a
    /// share of the prompts replaced by long ones (a long-tailed mix).
    ShareGpt {
        input_median: u64,
        output_median: u64,
        input_max: u64,
        output_max: u64,
        long: Option<LongPrompts>,
    },
}

/// Long prompts mixed into the ShareGPT-like lengths: each prompt is, with
/// probability `share`, uniform in `range` instead (RAG contexts, pasted
/// documents).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LongPrompts {
    pub share: f64,
    pub range: (u64, u64),
}

/// `--lengths longtail`'s defaults: a tenth of the prompts 8k–16k tokens.
pub const LONG_SHARE: f64 = 0.1;
pub const LONG_RANGE: (u64, u64) = (8192, 16384);

impl Lengths {
    /// (input, output) tokens.
    pub fn sample(&self, rng: &mut Rng) -> (u64, u64) {
        match *self {
            Lengths::Fixed { input, output } => (input, output),
            Lengths::Uniform { input, output } => {
                let i = between(rng, input.0, input.1);
                (i, between(rng, output.0, output.1))
            }
            Lengths::ShareGpt { input_median, output_median, input_max, output_max, long } => {
                let in_range = (SHAREGPT_INPUT_RANGE.0, input_max);
                let out_range = (SHAREGPT_OUTPUT_RANGE.0, output_max);
                let i = lognormal(rng, input_median, SHAREGPT_INPUT_SIGMA, in_range);
                let o = lognormal(rng, output_median, SHAREGPT_OUTPUT_SIGMA, out_range);
                match long {
                    Some(l) if unit(rng) < l.share => (between(rng, l.range.0, l.range.1), o),
                    _ => (i, o),
                }
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Lengths::Fixed { input, output } => format!("fixed {input} in / {output} out"),
            Lengths::Uniform { input, output } => {
                format!("uniform {}..{} in / {}..{} out", input.0, input.1, output.0, output.1)
            }
            Lengths::ShareGpt { input_median, output_median, long, .. } => {
                let mut d =
                    format!("sharegpt-like, medians {input_median} in / {output_median} out");
                if let Some(l) = long {
                    let pct = l.share * 100.0;
                    d += &format!("; {pct} % of prompts {}..{} tokens", l.range.0, l.range.1);
                }
                d
            }
        }
    }

    pub fn to_json(&self) -> Value {
        match self {
            Lengths::Fixed { input, output } => {
                json!({"kind": "fixed", "input": input, "output": output})
            }
            Lengths::Uniform { input, output } => json!({
                "kind": "uniform", "input": [input.0, input.1], "output": [output.0, output.1],
            }),
            Lengths::ShareGpt { input_median, output_median, input_max, output_max, long } => {
                json!({
                    "kind": if long.is_some() { "longtail" } else { "sharegpt" },
                    "input": {"median": input_median, "sigma": SHAREGPT_INPUT_SIGMA,
                              "range": [SHAREGPT_INPUT_RANGE.0, input_max]},
                    "output": {"median": output_median, "sigma": SHAREGPT_OUTPUT_SIGMA,
                               "range": [SHAREGPT_OUTPUT_RANGE.0, output_max]},
                    "long": long.map(|l| json!({"share": l.share, "range": [l.range.0, l.range.1]})),
                })
            }
        }
    }
}

/// Shared-prefix conversations: `groups` system prompts of `tokens` tokens
/// (each uniform in `tokens..=tokens_max`, drawn per group, when that is
/// larger), `users` users on each, `turns` turns per conversation, each turn
/// sending the whole history again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub groups: u64,
    pub users: u64,
    pub turns: u32,
    pub tokens: u64,
    pub tokens_max: u64,
}

impl Prefix {
    fn conversations(&self) -> u64 {
        self.groups * self.users
    }

    /// Requests in one round of every conversation.
    pub fn epoch(&self) -> u64 {
        self.conversations() * u64::from(self.turns)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub seed: u64,
    pub lengths: Lengths,
    pub prefix: Option<Prefix>,
}

/// A text of `tokens` tokens of words drawn from `seed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Text {
    pub seed: u64,
    pub tokens: u64,
}

/// One request of the sequence, before rendering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSpec {
    pub n: u64,
    /// Conversation and turn (shared-prefix workloads).
    pub conv: Option<(u64, u32)>,
    pub system: Option<Text>,
    /// User and assistant messages alternating, ending with the user's.
    pub messages: Vec<Text>,
    pub max_tokens: u64,
}

impl RequestSpec {
    /// Prompt tokens by the shared rule.
    pub fn input_tokens(&self) -> u64 {
        self.system.iter().chain(&self.messages).map(|t| t.tokens).sum()
    }
}

/// Produces the request sequence of a workload (caching the order of the
/// current round of conversations).
#[derive(Debug, Clone)]
pub struct Generator {
    w: Workload,
    order: Option<((u64, u32), Vec<u64>)>,
}

impl Generator {
    pub fn new(w: Workload) -> Generator {
        Generator { w, order: None }
    }

    pub fn workload(&self) -> &Workload {
        &self.w
    }

    /// Request `n` of the sequence.
    pub fn spec(&mut self, n: u64) -> RequestSpec {
        let seed = self.w.seed;
        let Some(p) = self.w.prefix else {
            let mut rng = Rng::new(mix(&[seed, TAG_REQUEST, n]));
            let (input, output) = self.w.lengths.sample(&mut rng);
            let text = Text { seed: rng.next_u64(), tokens: input };
            return RequestSpec {
                n,
                conv: None,
                system: None,
                messages: vec![text],
                max_tokens: output,
            };
        };
        // Turn-major rounds: every conversation's first turn (in a shuffled
        // order), then every second turn, ...; round `epoch` starts new
        // conversations (new users) on the same system prompts.
        let convs = p.conversations();
        let (epoch, r) = (n / p.epoch(), n % p.epoch());
        let turn = (r / convs) as u32;
        let local = self.order_of(epoch, turn, convs)[(r % convs) as usize];
        let conv = epoch * convs + local;
        let group = local % p.groups;
        let system_tokens = if p.tokens_max > p.tokens {
            between(&mut Rng::new(mix(&[seed, TAG_SYSTEM_LEN, group])), p.tokens, p.tokens_max)
        } else {
            p.tokens
        };
        let system = (system_tokens > 0)
            .then(|| Text { seed: mix(&[seed, TAG_SYSTEM, group]), tokens: system_tokens });
        let mut messages = Vec::with_capacity(2 * turn as usize + 1);
        let mut max_tokens = 0;
        for t in 0..=turn {
            let mut rng = Rng::new(mix(&[seed, TAG_TURN, conv, u64::from(t)]));
            let (input, output) = self.w.lengths.sample(&mut rng);
            let (user, answer) = (rng.next_u64(), rng.next_u64());
            messages.push(Text { seed: user, tokens: input });
            if t < turn {
                // The history carries a synthetic answer of the length that
                // turn asked for, not the server's, so the sequence does not
                // depend on the server.
                messages.push(Text { seed: answer, tokens: output });
            }
            max_tokens = output;
        }
        RequestSpec { n, conv: Some((conv, turn)), system, messages, max_tokens }
    }

    fn order_of(&mut self, epoch: u64, turn: u32, convs: u64) -> &[u64] {
        let key = (epoch, turn);
        if self.order.as_ref().map(|(k, _)| *k) != Some(key) {
            let mut rng = Rng::new(mix(&[self.w.seed, TAG_ORDER, epoch, u64::from(turn)]));
            let mut v: Vec<u64> = (0..convs).collect();
            for i in (1..v.len()).rev() {
                v.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            self.order = Some((key, v));
        }
        self.order.as_ref().map_or(&[], |(_, v)| v)
    }
}

/// 64 three-letter words; a word and a space are one token (4 bytes).
const WORDS: [&str; 64] = [
    "the", "and", "for", "are", "but", "not", "you", "all", "any", "can", "had", "her", "was",
    "one", "our", "out", "day", "get", "has", "him", "his", "how", "man", "new", "now", "old",
    "see", "two", "way", "who", "boy", "did", "its", "let", "put", "say", "she", "too", "use",
    "sky", "sea", "sun", "red", "big", "top", "ask", "run", "end", "cat", "dog", "car", "map",
    "box", "cup", "key", "pen", "art", "air", "law", "age", "oil", "war", "job", "tea",
];

/// Appends the words of `text`: exactly `4 × tokens` bytes.
pub fn push_words(out: &mut String, text: Text) {
    out.reserve(text.tokens as usize * BYTES_PER_TOKEN);
    let mut rng = Rng::new(text.seed);
    let (mut bits, mut left) = (0u64, 0);
    for _ in 0..text.tokens {
        if left == 0 {
            (bits, left) = (rng.next_u64(), 10);
        }
        out.push_str(WORDS[(bits & 63) as usize]);
        out.push(' ');
        bits >>= 6;
        left -= 1;
    }
}

pub fn words(text: Text) -> String {
    let mut s = String::new();
    push_words(&mut s, text);
    s
}

/// The OpenAI API a run talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
        }
    }
}

/// What, besides the spec, goes into every body.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyOptions {
    pub endpoint: Endpoint,
    pub model: String,
    pub stream: bool,
    /// Top-level fields added to (or replacing fields of) every body.
    pub extra: Map<String, Value>,
}

/// The JSON body of a request. Chat: a system message (shared prefix), then
/// the user and assistant messages; completions: all of them concatenated
/// into `prompt`. `max_tokens` with `ignore_eos` (vLLM, SGLang) so the
/// answer has the asked length; streams ask for the final `usage`.
pub fn body(spec: &RequestSpec, o: &BodyOptions) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("model".into(), o.model.clone().into());
    match o.endpoint {
        Endpoint::Chat => {
            let mut msgs = Vec::with_capacity(spec.messages.len() + 1);
            if let Some(s) = spec.system {
                msgs.push(json!({"role": "system", "content": words(s)}));
            }
            for (i, t) in spec.messages.iter().enumerate() {
                let role = if i % 2 == 0 { "user" } else { "assistant" };
                msgs.push(json!({"role": role, "content": words(*t)}));
            }
            m.insert("messages".into(), msgs.into());
        }
        Endpoint::Completions => {
            let mut prompt = String::new();
            for t in spec.system.iter().chain(&spec.messages) {
                push_words(&mut prompt, *t);
            }
            m.insert("prompt".into(), prompt.into());
        }
    }
    m.insert("max_tokens".into(), spec.max_tokens.into());
    m.insert("ignore_eos".into(), true.into());
    m.insert("stream".into(), o.stream.into());
    if o.stream {
        m.insert("stream_options".into(), json!({"include_usage": true}));
    }
    for (k, v) in &o.extra {
        m.insert(k.clone(), v.clone());
    }
    serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
}

/// When requests arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// Exponential gaps at `rate` requests/s, the first at 0.
    Poisson { rate: f64 },
    /// `size` requests at once every `interval_s`, the first burst at 0.
    Burst { size: u64, interval_s: f64 },
    /// On/off: Poisson arrivals during `on_s` seconds, none for `off_s`,
    /// repeated, at `rate` requests/s on average (so `rate × (on + off) /
    /// on` while on), the first window on at 0.
    OnOff { rate: f64, on_s: f64, off_s: f64 },
    /// Closed loop: each connection sends its next request when its last
    /// one is answered.
    Closed,
}

impl Arrivals {
    pub fn describe(&self) -> String {
        match self {
            Arrivals::Poisson { rate } => format!("poisson {rate} req/s"),
            Arrivals::Burst { size, interval_s } => {
                format!("bursts of {size} every {interval_s} s")
            }
            Arrivals::OnOff { rate, on_s, off_s } => {
                format!("on/off poisson {rate} req/s on average, {on_s} s on, {off_s} s off")
            }
            Arrivals::Closed => "closed loop".into(),
        }
    }
}

/// The arrival times (s from the start) of an open-loop run, seeded apart
/// from the requests.
#[derive(Debug, Clone)]
pub struct ArrivalClock {
    kind: Arrivals,
    rng: Rng,
    k: u64,
    t: f64,
}

impl ArrivalClock {
    pub fn new(kind: Arrivals, seed: u64) -> ArrivalClock {
        ArrivalClock { kind, rng: Rng::new(mix(&[seed, TAG_ARRIVALS])), k: 0, t: 0.0 }
    }

    /// The next arrival; `None` for a closed loop.
    pub fn next_s(&mut self) -> Option<f64> {
        let at = match self.kind {
            Arrivals::Poisson { rate } => {
                let at = self.t;
                self.t += -(1.0 - unit(&mut self.rng)).ln() / rate;
                at
            }
            Arrivals::Burst { size, interval_s } => (self.k / size) as f64 * interval_s,
            Arrivals::OnOff { rate, on_s, off_s } => {
                // `t` runs on the "on" clock only; each window of it is
                // placed after the off gaps before it.
                let on_time = self.t;
                self.t += -(1.0 - unit(&mut self.rng)).ln() / (rate * (on_s + off_s) / on_s);
                let window = (on_time / on_s).floor();
                window * (on_s + off_s) + (on_time - window * on_s)
            }
            Arrivals::Closed => return None,
        };
        self.k += 1;
        Some(at)
    }
}

/// Tokens of a text by the shared rule (for answers without `usage`).
pub fn text_tokens(s: &str) -> u64 {
    tokens_for_bytes(s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sharegpt() -> Lengths {
        Lengths::ShareGpt {
            input_median: 200,
            output_median: 150,
            input_max: SHAREGPT_INPUT_RANGE.1,
            output_max: SHAREGPT_OUTPUT_RANGE.1,
            long: None,
        }
    }

    fn gen(seed: u64, lengths: Lengths, prefix: Option<Prefix>) -> Generator {
        Generator::new(Workload { seed, lengths, prefix })
    }

    fn opts(endpoint: Endpoint) -> BodyOptions {
        BodyOptions { endpoint, model: "m".into(), stream: true, extra: Map::new() }
    }

    #[test]
    fn same_seed_same_sequence() {
        let l = sharegpt();
        let (mut a, mut b) = (gen(7, l.clone(), None), gen(7, l.clone(), None));
        let o = opts(Endpoint::Chat);
        let first: Vec<Vec<u8>> = (0..50).map(|n| body(&a.spec(n), &o)).collect();
        let again: Vec<Vec<u8>> = (0..50).map(|n| body(&b.spec(n), &o)).collect();
        assert_eq!(first, again);
        // Out of order too: request n does not depend on the ones before.
        assert_eq!(body(&gen(7, l.clone(), None).spec(42), &o), first[42]);
        let other: Vec<Vec<u8>> =
            (0..50).map(|n| body(&gen(8, l.clone(), None).spec(n), &o)).collect();
        assert_ne!(first, other);
        // Different requests have different words.
        assert_ne!(a.spec(1).messages[0].seed, a.spec(2).messages[0].seed);
        assert_ne!(warmup_seed(7), 7);
    }

    #[test]
    fn words_are_four_bytes_a_token() {
        for tokens in [0, 1, 9, 10, 11, 1000] {
            let s = words(Text { seed: 3, tokens });
            assert_eq!(s.len() as u64, 4 * tokens);
            assert_eq!(text_tokens(&s), tokens);
            assert!(s.bytes().all(|b| b == b' ' || b.is_ascii_lowercase()));
        }
        assert_ne!(words(Text { seed: 1, tokens: 20 }), words(Text { seed: 2, tokens: 20 }));
    }

    #[test]
    fn lengths_stay_within_bounds() {
        let l = Lengths::Uniform { input: (10, 20), output: (1, 3) };
        let mut g = gen(1, l, None);
        let (mut seen_lo, mut seen_hi) = (false, false);
        for n in 0..2000 {
            let s = g.spec(n);
            let i = s.input_tokens();
            assert!((10..=20).contains(&i), "{i}");
            assert!((1..=3).contains(&s.max_tokens));
            seen_lo |= i == 10;
            seen_hi |= i == 20;
        }
        assert!(seen_lo && seen_hi);
        let mut f = gen(1, Lengths::Fixed { input: 5, output: 6 }, None);
        assert_eq!((f.spec(9).input_tokens(), f.spec(9).max_tokens), (5, 6));
    }

    #[test]
    fn sharegpt_medians_are_roughly_right() {
        let mut g = gen(11, sharegpt(), None);
        let n = 20_000;
        let (mut ins, mut outs): (Vec<u64>, Vec<u64>) =
            (0..n).map(|i| g.spec(i)).map(|s| (s.input_tokens(), s.max_tokens)).unzip();
        ins.sort_unstable();
        outs.sort_unstable();
        let (mi, mo) = (ins[n as usize / 2], outs[n as usize / 2]);
        assert!((185..=215).contains(&mi), "input median {mi}");
        assert!((140..=160).contains(&mo), "output median {mo}");
        assert!(ins[0] >= 4 && *ins.last().unwrap() <= 4096);
        // A long tail: p90 of the input ≈ 200 × e^1.28 ≈ 720.
        let p90 = ins[n as usize * 9 / 10];
        assert!((600..=850).contains(&p90), "input p90 {p90}");
    }

    #[test]
    fn prefix_groups_share_system_prompts_and_grow_history() {
        let p = Prefix { groups: 3, users: 2, turns: 3, tokens: 100, tokens_max: 100 };
        let mut g = gen(5, Lengths::Fixed { input: 10, output: 7 }, Some(p));
        assert_eq!(p.epoch(), 18);
        let specs: Vec<RequestSpec> = (0..36).map(|n| g.spec(n)).collect();
        // Round 0 covers the 6 conversations once per turn, turn-major.
        let mut first: Vec<u64> = specs[..6].iter().map(|s| s.conv.unwrap().0).collect();
        first.sort_unstable();
        assert_eq!(first, [0, 1, 2, 3, 4, 5]);
        for (i, s) in specs.iter().enumerate() {
            let (conv, turn) = s.conv.unwrap();
            assert_eq!(turn as usize, (i % 18) / 6);
            assert_eq!(conv / 6, i as u64 / 18, "round {i}");
            assert_eq!(s.messages.len(), 2 * turn as usize + 1);
            assert_eq!(s.input_tokens(), 100 + 10 * (turn as u64 + 1) + 7 * turn as u64);
            assert_eq!(s.max_tokens, 7);
        }
        // Three distinct system prompts, the same in every round.
        let mut sys: Vec<u64> = specs.iter().map(|s| s.system.unwrap().seed).collect();
        sys.sort_unstable();
        sys.dedup();
        assert_eq!(sys.len(), 3);
        // A later turn re-sends its conversation's earlier messages.
        let t0 = specs.iter().find(|s| s.conv == Some((4, 0))).unwrap();
        let t2 = specs.iter().find(|s| s.conv == Some((4, 2))).unwrap();
        assert_eq!(t2.messages[0], t0.messages[0]);
        assert_eq!(t2.system, t0.system);
        let o = opts(Endpoint::Completions);
        let (b0, b2) = (body(t0, &o), body(t2, &o));
        let v0: Value = serde_json::from_slice(&b0).unwrap();
        let v2: Value = serde_json::from_slice(&b2).unwrap();
        assert!(v2["prompt"].as_str().unwrap().starts_with(v0["prompt"].as_str().unwrap()));
    }

    #[test]
    fn bodies() {
        let mut g = gen(2, Lengths::Fixed { input: 3, output: 4 }, None);
        let s = g.spec(0);
        let mut o = opts(Endpoint::Chat);
        o.extra.insert("temperature".into(), json!(0));
        let v: Value = serde_json::from_slice(&body(&s, &o)).unwrap();
        assert_eq!(v["model"], "m");
        assert_eq!(v["messages"][0]["role"], "user");
        assert_eq!(v["messages"][0]["content"].as_str().unwrap().len(), 12);
        assert_eq!(v["max_tokens"], 4);
        assert_eq!(v["ignore_eos"], true);
        assert_eq!(v["stream"], true);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["temperature"], 0);
        o.stream = false;
        o.endpoint = Endpoint::Completions;
        let v: Value = serde_json::from_slice(&body(&s, &o)).unwrap();
        assert_eq!(v["prompt"].as_str().unwrap().len(), 12);
        assert_eq!(v["stream"], false);
        assert!(v.get("stream_options").is_none());
    }

    #[test]
    fn arrivals() {
        let mut c = ArrivalClock::new(Arrivals::Burst { size: 3, interval_s: 2.0 }, 0);
        let t: Vec<f64> = (0..7).filter_map(|_| c.next_s()).collect();
        assert_eq!(t, [0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 4.0]);
        let mut p = ArrivalClock::new(Arrivals::Poisson { rate: 100.0 }, 9);
        let t: Vec<f64> = (0..10_001).filter_map(|_| p.next_s()).collect();
        assert_eq!(t[0], 0.0);
        assert!(t.windows(2).all(|w| w[1] >= w[0]));
        // 10,000 gaps of mean 10 ms: within 3 % of 100 s.
        assert!((t[10_000] - 100.0).abs() < 3.0, "{}", t[10_000]);
        let mut q = ArrivalClock::new(Arrivals::Poisson { rate: 100.0 }, 9);
        assert_eq!(q.next_s(), Some(0.0));
        assert_eq!(q.next_s(), Some(t[1]));
        assert_eq!(ArrivalClock::new(Arrivals::Closed, 0).next_s(), None);
    }

    #[test]
    fn longtail_replaces_a_share_of_prompts_and_clamps_hold() {
        let long = LongPrompts { share: 0.1, range: (8192, 16384) };
        let l = Lengths::ShareGpt {
            input_median: 200,
            output_median: 100,
            input_max: 1000,
            output_max: 300,
            long: Some(long),
        };
        let mut g = gen(5, l, None);
        let specs: Vec<RequestSpec> = (0..20_000).map(|n| g.spec(n)).collect();
        let n_long = specs.iter().filter(|s| s.input_tokens() >= 8192).count();
        // 10 % ± 1 % of 20,000.
        assert!((1800..=2200).contains(&n_long), "{n_long}");
        for s in &specs {
            let i = s.input_tokens();
            assert!((4..=1000).contains(&i) || (8192..=16384).contains(&i), "{i}");
            assert!((4..=300).contains(&s.max_tokens));
        }
        // A mix without long prompts draws the same outputs.
        let no_long = Lengths::ShareGpt {
            input_median: 200,
            output_median: 100,
            input_max: 1000,
            output_max: 300,
            long: None,
        };
        let mut plain = gen(5, no_long, None);
        assert!((0..100).all(|n| plain.spec(n).max_tokens == specs[n as usize].max_tokens));
    }

    #[test]
    fn system_prompt_lengths_drawn_per_group() {
        let p = Prefix { groups: 4, users: 3, turns: 2, tokens: 1000, tokens_max: 4000 };
        let mut g = gen(3, Lengths::Fixed { input: 10, output: 5 }, Some(p));
        let mut by_group = std::collections::HashMap::new();
        for n in 0..p.epoch() {
            let s = g.spec(n);
            let sys = s.system.unwrap();
            assert!((1000..=4000).contains(&sys.tokens));
            // Same text seed, same length: one prompt per group.
            assert_eq!(*by_group.entry(sys.seed).or_insert(sys.tokens), sys.tokens);
        }
        assert_eq!(by_group.len(), 4);
        let lens: std::collections::HashSet<u64> = by_group.values().copied().collect();
        assert!(lens.len() > 1, "{lens:?}");
    }

    #[test]
    fn on_off_arrivals_keep_the_mean_rate_and_the_gaps() {
        let mut c = ArrivalClock::new(Arrivals::OnOff { rate: 50.0, on_s: 2.0, off_s: 3.0 }, 4);
        let t: Vec<f64> = (0..10_000).filter_map(|_| c.next_s()).collect();
        assert_eq!(t[0], 0.0);
        assert!(t.windows(2).all(|w| w[1] >= w[0]));
        // Nothing arrives in an off window: [2, 5), [7, 10), ...
        assert!(t.iter().all(|x| x % 5.0 < 2.0), "an arrival while off");
        // 10,000 arrivals at 50/s on average: about 200 s.
        let end = t[9_999];
        assert!((end - 200.0).abs() < 8.0, "{end}");
    }
}
