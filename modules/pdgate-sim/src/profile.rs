//! Engine profiles: the numbers behind the timing model.
//!
//! A profile file is `key = value` lines (`#` starts a comment); keys are the
//! field names below. Unknown keys and bad values are errors that name the
//! line. The built-in default is [`Profile::h100_llama3_8b`].

use std::fmt;

/// The parameters of the continuous-batching timing model.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    /// Fixed cost of one engine step (reading the weights once), µs.
    pub step_base_us: f64,
    /// Cost per prefill token scheduled in a step, µs.
    pub prefill_token_us: f64,
    /// Cost per running decode sequence in a step, µs.
    pub decode_seq_us: f64,
    /// Cost per token of context attended by the decode sequences, µs.
    pub context_token_us: f64,
    /// Most sequences running at once (vLLM `max_num_seqs`).
    pub max_num_seqs: usize,
    /// Token budget of one step (vLLM `max_num_batched_tokens`); prompts
    /// longer than what is left are prefilled in chunks.
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV capacity in blocks.
    pub num_gpu_blocks: usize,
    /// Keep computed prompt blocks for reuse (vLLM automatic prefix caching).
    pub enable_prefix_caching: bool,
    /// KV transfer (prefill → decode): fixed cost, µs.
    pub kv_transfer_base_us: f64,
    /// KV transfer: cost per prompt token, µs.
    pub kv_transfer_token_us: f64,
    /// Context window: prompt + output tokens allowed.
    pub max_model_len: usize,
}

impl Profile {
    /// Llama-3.1-8B (BF16) on one H100 SXM 80 GB, vLLM defaults. Derived in
    /// docs/engine-sim.md from public figures: H100 SXM HBM3 3.35 TB/s and
    /// ~989 TFLOPS dense BF16 (NVIDIA datasheet); the model's 8.0 B
    /// parameters, 32 layers, 8 KV heads of dim 128 (Meta's model card),
    /// i.e. 16 GB of weights and 128 KiB of KV per token.
    pub fn h100_llama3_8b() -> Profile {
        Profile {
            name: "h100-llama3-8b".into(),
            // 16 GB of weights / 3.35 TB/s ≈ 4.8 ms at full bandwidth; vLLM
            // measures 7.0–7.5 ms per decode step at batch 1–10 (fidelity
            // table in docs/engine-sim.md).
            step_base_us: 7_000.0,
            // 2 × 8e9 FLOP per token at ~55 % of 989 TFLOPS ≈ 29 µs.
            prefill_token_us: 30.0,
            // Per-sequence sampling, logits (128k vocab) and scheduling;
            // fitted with step_base_us to the ~13 ms per step vLLM measures
            // at ~220–256 sequences of ~300 tokens (docs/engine-sim.md).
            decode_seq_us: 15.0,
            // 128 KiB of KV per context token / 3.35 TB/s ≈ 0.04 µs.
            context_token_us: 0.04,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            block_size: 16,
            // (0.9 × 80 GB − 16 GB weights − ~4 GB activations) / 128 KiB
            // per token ≈ 397k tokens ≈ 24,800 blocks of 16.
            num_gpu_blocks: 24_800,
            enable_prefix_caching: true,
            // NIXL over one 400 Gb/s NIC: ~50 GB/s → 2.6 µs per token of
            // 128 KiB, plus a millisecond of handshake.
            kv_transfer_base_us: 1_000.0,
            kv_transfer_token_us: 2.6,
            max_model_len: 131_072,
        }
    }

    /// A profile where every step is instant: for functional tests and for
    /// measuring the simulator's own overhead.
    pub fn instant() -> Profile {
        Profile {
            name: "instant".into(),
            step_base_us: 0.0,
            prefill_token_us: 0.0,
            decode_seq_us: 0.0,
            context_token_us: 0.0,
            kv_transfer_base_us: 0.0,
            kv_transfer_token_us: 0.0,
            ..Profile::h100_llama3_8b()
        }
    }

    /// Parses a profile file over the default profile.
    pub fn parse(text: &str) -> Result<Profile, ProfileError> {
        let mut p = Profile::h100_llama3_8b();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let err = |msg: String| ProfileError { line: n + 1, msg };
            let (k, v) = line
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| err(format!("expected \"key = value\", got \"{line}\"")))?;
            let f =
                || v.parse::<f64>().map_err(|_| err(format!("\"{k}\": \"{v}\" is not a number")));
            let u = || {
                v.parse::<usize>()
                    .map_err(|_| err(format!("\"{k}\": \"{v}\" is not a whole number")))
            };
            match k {
                "name" => p.name = v.to_owned(),
                "step_base_us" => p.step_base_us = f()?,
                "prefill_token_us" => p.prefill_token_us = f()?,
                "decode_seq_us" => p.decode_seq_us = f()?,
                "context_token_us" => p.context_token_us = f()?,
                "max_num_seqs" => p.max_num_seqs = u()?,
                "max_num_batched_tokens" => p.max_num_batched_tokens = u()?,
                "block_size" => p.block_size = u()?,
                "num_gpu_blocks" => p.num_gpu_blocks = u()?,
                "enable_prefix_caching" => {
                    p.enable_prefix_caching = match v {
                        "true" | "on" | "1" => true,
                        "false" | "off" | "0" => false,
                        _ => return Err(err(format!("\"{k}\": \"{v}\" is not true or false"))),
                    }
                }
                "kv_transfer_base_us" => p.kv_transfer_base_us = f()?,
                "kv_transfer_token_us" => p.kv_transfer_token_us = f()?,
                "max_model_len" => p.max_model_len = u()?,
                _ => return Err(err(format!("unknown key \"{k}\""))),
            }
        }
        if p.block_size == 0 || p.max_num_seqs == 0 || p.max_num_batched_tokens == 0 {
            return Err(ProfileError {
                line: 0,
                msg: "block_size, max_num_seqs and max_num_batched_tokens must be positive".into(),
            });
        }
        Ok(p)
    }

    /// Time to prefill `tokens` alone on an idle engine, µs: the ideal TTFT
    /// (chunked like the engine would, one step per chunk).
    pub fn ideal_prefill_us(&self, tokens: u64) -> f64 {
        let chunks = tokens.div_ceil(self.max_num_batched_tokens as u64).max(1);
        chunks as f64 * self.step_base_us + tokens as f64 * self.prefill_token_us
    }

    /// Time to move the KV of `tokens` prompt tokens to a decode engine, µs.
    pub fn kv_transfer_us(&self, tokens: u64) -> f64 {
        self.kv_transfer_base_us + tokens as f64 * self.kv_transfer_token_us
    }
}

/// A profile file that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileError {
    pub line: usize,
    pub msg: String,
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "profile line {}: {}", self.line, self.msg)
    }
}

impl std::error::Error for ProfileError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_overrides_defaults() {
        let p = Profile::parse("# test\nname = t\nstep_base_us = 100 # fixed\nmax_num_seqs=4\n\nenable_prefix_caching = off\n").unwrap();
        assert_eq!(p.name, "t");
        assert_eq!(p.step_base_us, 100.0);
        assert_eq!(p.max_num_seqs, 4);
        assert!(!p.enable_prefix_caching);
        assert_eq!(p.block_size, 16);
    }

    #[test]
    fn parse_errors_name_the_line() {
        assert_eq!(Profile::parse("a\n").unwrap_err().line, 1);
        let e = Profile::parse("\nmax_num_seqs = many").unwrap_err();
        assert_eq!(
            e.to_string(),
            "profile line 2: \"max_num_seqs\": \"many\" is not a whole number"
        );
        assert!(Profile::parse("bogus = 1").unwrap_err().msg.contains("unknown key"));
        assert!(Profile::parse("block_size = 0").is_err());
    }

    #[test]
    fn ideal_prefill() {
        let p = Profile::h100_llama3_8b();
        // 1,000 tokens: one step, 7 ms + 30 ms.
        assert_eq!(p.ideal_prefill_us(1000), 37_000.0);
        // 10,000 tokens: two chunks of at most 8,192.
        assert_eq!(p.ideal_prefill_us(10_000), 2.0 * 7_000.0 + 300_000.0);
        assert_eq!(Profile::instant().ideal_prefill_us(5000), 0.0);
    }
}
