//! The one token-count rule pdgate uses everywhere it cannot run the model's
//! tokenizer: the proxy's length estimates and the engine simulator's prompt
//! and output lengths.
//!
//! **Rule:** a text of `B` UTF-8 bytes is `ceil(B / 4)` tokens, and a
//! non-empty text is at least one token. Four bytes per token is the usual
//! figure for English with BPE tokenizers (OpenAI: "one token is about four
//! characters of English text"); being a pure function of the bytes, the
//! proxy and the simulator always agree.

/// Bytes per token of the rule.
pub const BYTES_PER_TOKEN: usize = 4;

/// Tokens in a text of `bytes` UTF-8 bytes.
pub fn tokens_for_bytes(bytes: usize) -> u64 {
    bytes.div_ceil(BYTES_PER_TOKEN) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule() {
        assert_eq!(tokens_for_bytes(0), 0);
        assert_eq!(tokens_for_bytes(1), 1);
        assert_eq!(tokens_for_bytes(4), 1);
        assert_eq!(tokens_for_bytes(5), 2);
        assert_eq!(tokens_for_bytes(4000), 1000);
    }
}
