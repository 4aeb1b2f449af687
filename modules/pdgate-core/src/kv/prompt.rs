//! A request's prompt as the balancers see it with `pd_tokenizer`: its
//! token count and the keys of its whole blocks, and the bytes that carry
//! them from the P/D module to the balancers (other nginx modules) in the
//! variable `$pd_tokenized`.
//!
//! **Wire form:** little-endian 64-bit words: the hashing's fingerprint
//! ([`Hashing::fingerprint`]), the token count, the block size, then one key
//! per block.

use super::conf::Hashing;
use super::hash::BlockHasher;
use crate::tokenize::{Model, PromptError};

/// A prompt's tokens and block keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptKeys {
    pub head: Head,
    /// Keys of the prompt's whole blocks, chained.
    pub keys: Vec<u64>,
}

/// What precedes the keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Head {
    /// The fingerprint of the hashing the keys were made with.
    pub hashing: u64,
    pub tokens: u64,
    /// Tokens per block.
    pub block_size: u64,
}

const HEAD_BYTES: usize = 24;

impl PromptKeys {
    /// Tokenizes and keys `body` (an OpenAI request): `Ok(None)` for what
    /// the proxy does not render as vLLM would (multimodal parts, a
    /// request's own template), sized by bytes / 4 then; the error is the
    /// client's (a 400).
    pub fn of(
        model: &Model,
        hashing: &Hashing,
        hasher: &BlockHasher,
        max_blocks: usize,
        body: &[u8],
    ) -> Result<Option<PromptKeys>, String> {
        let ids = match model.prompt_tokens(body) {
            Ok(ids) => ids,
            Err(PromptError::Unsupported(_)) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let mut keys = Vec::with_capacity((ids.len() / hashing.block_size.max(1)).min(max_blocks));
        hasher.keys(&ids, max_blocks, &mut keys);
        let head = Head {
            hashing: hashing.fingerprint(),
            tokens: ids.len() as u64,
            block_size: hashing.block_size as u64,
        };
        Ok(Some(PromptKeys { head, keys }))
    }

    /// The wire form (see the module doc).
    pub fn encode(&self) -> Vec<u8> {
        let h = &self.head;
        let mut out = Vec::with_capacity(HEAD_BYTES + 8 * self.keys.len());
        for w in [h.hashing, h.tokens, h.block_size].iter().chain(&self.keys) {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// The head and keys of the wire form `b` (`None`: not its form).
    pub fn decode(b: &[u8]) -> Option<(Head, impl ExactSizeIterator<Item = u64> + '_)> {
        if b.len() < HEAD_BYTES || !b.len().is_multiple_of(8) {
            return None;
        }
        let word = |c: &[u8]| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        };
        let head =
            Head { hashing: word(&b[..8]), tokens: word(&b[8..16]), block_size: word(&b[16..24]) };
        Some((head, b[HEAD_BYTES..].chunks_exact(8).map(word)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::hash::HashAlgo;

    /// The test model, from a directory of the test's own (`tag`).
    fn model(tag: &str) -> Model {
        let dir =
            std::env::temp_dir().join(format!("pdgate-prompt-keys-{tag}-{}", std::process::id()));
        crate::tokenize::testing::write_test_model(&dir).unwrap();
        let m = Model::load(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        m
    }

    #[test]
    fn keys_a_prompt_and_round_trips_the_wire_form() {
        let m = model("wire");
        let h = Hashing { block_size: 4, ..Hashing::default() };
        let hasher = BlockHasher::new(HashAlgo::Sha256Cbor, 4, &h.seed);
        let ids: Vec<u32> = (1..=11).collect();
        let body = format!(r#"{{"prompt":{:?}}}"#, ids);
        let p = PromptKeys::of(&m, &h, &hasher, 64, body.as_bytes()).unwrap().unwrap();
        let mut want = Vec::new();
        hasher.keys(&ids, 64, &mut want);
        assert_eq!(p.head, Head { hashing: h.fingerprint(), tokens: 11, block_size: 4 });
        assert_eq!((p.keys.len(), &p.keys), (2, &want), "whole blocks only");
        // At most max_blocks keys.
        assert_eq!(
            PromptKeys::of(&m, &h, &hasher, 1, body.as_bytes()).unwrap().unwrap().keys.len(),
            1
        );
        let wire = p.encode();
        let (head, keys) = PromptKeys::decode(&wire).unwrap();
        assert_eq!((head, keys.collect::<Vec<_>>()), (p.head, p.keys.clone()));
        // Not its form: too short, or not whole words.
        assert!(PromptKeys::decode(&wire[..16]).is_none());
        assert!(PromptKeys::decode(&wire[..wire.len() - 3]).is_none());
    }

    #[test]
    fn multimodal_is_not_keyed_and_bad_bodies_are_errors() {
        let m = model("errors");
        let h = Hashing::default();
        let hasher = BlockHasher::new(h.algo, h.block_size, &h.seed);
        let mm = br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#;
        assert_eq!(PromptKeys::of(&m, &h, &hasher, 8, mm), Ok(None));
        let e =
            PromptKeys::of(&m, &h, &hasher, 8, br#"{"messages":[{"content":"hi"}]}"#).unwrap_err();
        assert!(e.contains("role"), "{e}");
    }
}
