//! What a profile predicts an engine can sustain for a workload, from the
//! timing model's step formula alone (no simulation): the analytic capacity
//! the benchmark scripts set their rates against and compare the measured
//! capacity with.
//!
//! A **prefill engine** is at capacity when every step is a full token budget
//! (`max_num_batched_tokens`) of prompt chunks: it computes
//! `B / (step_base + B × prefill_token)` prompt tokens per second, and a
//! request costs the prompt tokens its prefix cache does not hold.
//!
//! A **decode engine** is at capacity when its batch is as large as it can
//! be: `max_num_seqs` sequences, or fewer when their KV does not fit. Each
//! step gives every sequence one token and costs
//! `step_base + n × decode_seq + n × context × context_token`, where
//! `context` is the mean context of a running sequence. Weighted by the
//! steps each request spends decoding (its output length), a request of
//! prompt `i` and output `o` averages `i + o / 2` tokens of context, so the
//! batch's mean context is `Σ o(i + o/2) / Σ o` and its KV per sequence the
//! same. A request costs its output tokens (the one prompt token a decode
//! computes after a KV transfer, and the transfer itself, which does not
//! occupy a step, are left out).

use crate::profile::Profile;

/// The workload's means, in tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Demand {
    /// Prompt tokens per request.
    pub input: f64,
    /// Prompt tokens per request a perfect prefix cache would still compute
    /// (the system prompt and the conversation history cached).
    pub input_uncached: f64,
    /// Output tokens per request.
    pub output: f64,
    /// Mean context of a decoding sequence, weighted by decode steps.
    pub decode_context: f64,
}

impl Demand {
    /// Means of `(input, cacheable input, output)` samples.
    pub fn of(samples: impl IntoIterator<Item = (u64, u64, u64)>) -> Option<Demand> {
        let (mut n, mut i, mut c, mut o, mut w) = (0u64, 0f64, 0f64, 0f64, 0f64);
        for (input, cacheable, output) in samples {
            let (input, output) = (input as f64, output as f64);
            n += 1;
            i += input;
            c += cacheable.min(input as u64) as f64;
            o += output;
            w += output * (input + output / 2.0);
        }
        if n == 0 || o == 0.0 {
            return None;
        }
        let n = n as f64;
        Some(Demand {
            input: i / n,
            input_uncached: (i - c) / n,
            output: o / n,
            decode_context: w / o,
        })
    }
}

/// One engine's capacity for a demand, at real time (time scale 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    /// Prompt tokens per second with full steps.
    pub prefill_tokens_per_s: f64,
    /// Requests per second a prefill engine sustains, every prompt computed.
    pub prefill_rps: f64,
    /// The same with every shared prefix cached.
    pub prefill_rps_cached: f64,
    /// Sequences in a full decode batch.
    pub decode_batch: f64,
    /// Time per output token with that batch, ms.
    pub decode_tpot_ms: f64,
    /// Output tokens per second with that batch.
    pub decode_tokens_per_s: f64,
    /// Requests per second a decode engine sustains.
    pub decode_rps: f64,
}

impl Profile {
    /// One decode step with `seqs` sequences of `context` tokens each, µs.
    pub fn decode_step_us(&self, seqs: f64, context: f64) -> f64 {
        self.step_base_us + seqs * (self.decode_seq_us + context * self.context_token_us)
    }

    /// Prompt tokens per second when every step spends the whole budget.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        let b = self.max_num_batched_tokens as f64;
        b / (self.step_base_us + b * self.prefill_token_us) * 1e6
    }

    /// What one engine of this profile sustains for `d`.
    pub fn capacity(&self, d: &Demand) -> Capacity {
        let prefill = self.prefill_tokens_per_s();
        let kv_tokens = (self.num_gpu_blocks * self.block_size) as f64;
        let batch = (self.max_num_seqs as f64).min((kv_tokens / d.decode_context.max(1.0)).floor());
        let step = self.decode_step_us(batch, d.decode_context);
        let tokens = batch / step * 1e6;
        Capacity {
            prefill_tokens_per_s: prefill,
            prefill_rps: prefill / d.input.max(1.0),
            prefill_rps_cached: prefill / d.input_uncached.max(1.0),
            decode_batch: batch,
            decode_tpot_ms: step / 1e3,
            decode_tokens_per_s: tokens,
            decode_rps: tokens / d.output.max(1.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_means_and_step_weighted_context() {
        // Two requests: (100 in, 10 out) and (300 in, 30 out), 100 cacheable.
        let d = Demand::of([(100, 0, 10), (300, 100, 30)]).unwrap();
        assert_eq!((d.input, d.input_uncached, d.output), (200.0, 150.0, 20.0));
        // (10 × (100 + 5) + 30 × (300 + 15)) / 40 = (1050 + 9450) / 40.
        assert_eq!(d.decode_context, 262.5);
        assert_eq!(Demand::of([]), None);
        assert_eq!(Demand::of([(5, 9, 0)]), None);
    }

    #[test]
    fn default_profile_capacity_by_hand() {
        let p = Profile::h100_llama3_8b();
        let d =
            Demand { input: 500.0, input_uncached: 100.0, output: 200.0, decode_context: 600.0 };
        let c = p.capacity(&d);
        // 8192 tokens per 7 ms + 8192 × 30 µs = 252.76 ms.
        let tps = 8192.0 / 252_760.0 * 1e6;
        assert!((c.prefill_tokens_per_s - tps).abs() < 1e-6);
        assert!((c.prefill_rps - tps / 500.0).abs() < 1e-9);
        assert!((c.prefill_rps_cached - tps / 100.0).abs() < 1e-9);
        // 256 sequences fit (256 × 600 ≪ 396,800 tokens of KV):
        // 7,000 + 256 × (15 + 600 × 0.04) = 16,984 µs per step.
        assert_eq!(c.decode_batch, 256.0);
        assert!((c.decode_tpot_ms - 16.984).abs() < 1e-9);
        assert!((c.decode_rps - 256.0 / 0.016984 / 200.0).abs() < 1e-6);
    }

    #[test]
    fn kv_bounds_the_decode_batch() {
        let p = Profile::h100_llama3_8b();
        // 4,000 tokens of context each: 396,800 / 4,000 = 99 sequences.
        let d =
            Demand { input: 3800.0, input_uncached: 3800.0, output: 400.0, decode_context: 4000.0 };
        assert_eq!(p.capacity(&d).decode_batch, 99.0);
    }
}
