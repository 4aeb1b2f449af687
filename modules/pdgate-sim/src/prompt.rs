//! A request's prompt as the engine sees it: its token ids (the model's
//! tokenizer and chat template with `--tokenizer`, otherwise the prompt
//! text's 4-byte chunks) and vLLM's chained hashes of its full blocks
//! (`--prefix-caching-hash-algo`, `PYTHONHASHSEED`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pdgate_core::kv::hash::{BlockHasher, Digest, HashAlgo};
use pdgate_core::tokenize::{Model, PromptError};

/// `--tokenizer`: a loaded model directory.
pub struct Tokenizer {
    pub dir: PathBuf,
    pub model: Model,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads `dir` (`tokenizer.json`, `tokenizer_config.json`, ...).
    pub fn load(dir: &Path) -> Result<Tokenizer, String> {
        let model = Model::load(dir).map_err(|e| e.to_string())?;
        Ok(Tokenizer { dir: dir.to_owned(), model })
    }
}

/// Token ids of a prompt text by the shared rule: each 4-byte chunk is one
/// token, its bytes read as a little-endian `u32` (a short last chunk
/// zero-padded), so equal text prefixes give equal token prefixes.
pub fn byte_tokens(text: &[u8]) -> Vec<u32> {
    text.chunks(pdgate_core::tokens::BYTES_PER_TOKEN)
        .map(|c| {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(b)
        })
        .collect()
}

/// The prompt's token ids: the model's for `body` when there is a
/// tokenizer, otherwise [`byte_tokens`] of `text` (also for what the
/// tokenizer cannot render as vLLM would, e.g. multimodal parts). `Err` is
/// the message of a 400 (the chat template refused the request, ...).
pub fn token_ids(tok: Option<&Tokenizer>, body: &[u8], text: &[u8]) -> Result<Vec<u32>, String> {
    match tok.map(|t| t.model.prompt_tokens(body)) {
        None | Some(Err(PromptError::Unsupported(_))) => Ok(byte_tokens(text)),
        Some(Ok(ids)) => Ok(ids),
        Some(Err(e)) => Err(e.to_string()),
    }
}

/// `PYTHONHASHSEED` as vLLM reads it: the value when set (even empty),
/// otherwise none, and then each process hashes from 32 random bytes.
pub fn env_hash_seed() -> Option<String> {
    std::env::var_os("PYTHONHASHSEED").map(|s| s.to_string_lossy().into_owned())
}

/// A seed nobody can guess: what vLLM does without `PYTHONHASHSEED`
/// (`NONE_HASH = os.urandom(32)`); here the root is the hash of 32 random
/// bytes in hex, just as unreproducible.
pub fn random_seed() -> String {
    let mut b = [0u8; 32];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if !ok {
        // No /dev/urandom: the clock and the process id.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let x = t ^ (u128::from(std::process::id()) << 96);
        b[..16].copy_from_slice(&x.to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The engine's block hashing: algorithm, block size and seed.
#[derive(Debug, Clone)]
pub struct Hashing {
    pub hasher: Arc<BlockHasher>,
    /// Whether the seed was given (else random, unreproducible).
    pub seeded: bool,
}

impl Hashing {
    /// The hashing of an engine with `block_size`-token blocks; `seed`
    /// `None` draws a random one.
    pub fn new(algo: HashAlgo, block_size: usize, seed: Option<&str>) -> Hashing {
        let (seed, seeded) = match seed {
            Some(s) => (s.to_owned(), true),
            None => (random_seed(), false),
        };
        Hashing { hasher: Arc::new(BlockHasher::new(algo, block_size, &seed)), seeded }
    }

    /// The digests of the full blocks of `tokens`.
    pub fn blocks(&self, tokens: &[u32]) -> Vec<Digest> {
        let mut out = Vec::with_capacity(tokens.len() / self.hasher.block_size().max(1));
        self.hasher.chain(None, tokens, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokens_are_le_chunks() {
        assert_eq!(byte_tokens(b""), Vec::<u32>::new());
        assert_eq!(byte_tokens(b"abcd"), vec![u32::from_le_bytes(*b"abcd")]);
        assert_eq!(byte_tokens(b"abcde"), vec![u32::from_le_bytes(*b"abcd"), u32::from(b'e')]);
        // The count is the shared bytes/4 rule.
        let t = vec![b'x'; 4 * 40 + 3];
        assert_eq!(byte_tokens(&t).len() as u64, pdgate_core::tokens::tokens_for_bytes(t.len()));
    }

    #[test]
    fn seeded_hashing_is_reproducible_and_random_is_not() {
        let a = Hashing::new(HashAlgo::Sha256Cbor, 4, Some("0"));
        let b = Hashing::new(HashAlgo::Sha256Cbor, 4, Some("0"));
        let toks: Vec<u32> = (0..9).collect();
        assert_eq!(a.blocks(&toks), b.blocks(&toks));
        assert_eq!(a.blocks(&toks).len(), 2);
        let mut keys = Vec::new();
        a.hasher.keys(&toks, usize::MAX, &mut keys);
        let k: Vec<u64> = a.blocks(&toks).iter().map(pdgate_core::kv::hash::key64).collect();
        assert_eq!(keys, k);
        let r1 = Hashing::new(HashAlgo::Sha256Cbor, 4, None);
        let r2 = Hashing::new(HashAlgo::Sha256Cbor, 4, None);
        assert!(!r1.seeded);
        assert_ne!(r1.blocks(&toks), r2.blocks(&toks));
        assert_ne!(r1.blocks(&toks), a.blocks(&toks));
    }

    #[test]
    fn tokenizer_renders_chat_and_falls_back_for_media() {
        let dir = std::env::temp_dir().join(format!("pdgate-sim-tok-{}", std::process::id()));
        pdgate_core::tokenize::testing::write_test_model(&dir).unwrap();
        let tok = Tokenizer::load(&dir).unwrap();
        let body = br#"{"messages":[{"role":"user","content":"hello there"}]}"#;
        let ids = token_ids(Some(&tok), body, b"user: hello there\n").unwrap();
        assert_eq!(ids, tok.model.prompt_tokens(body).unwrap());
        assert!(!ids.is_empty());
        // Multimodal parts: the byte rule.
        let media = br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#;
        assert_eq!(token_ids(Some(&tok), media, b"abcd").unwrap(), byte_tokens(b"abcd"));
        // Without a tokenizer: the byte rule.
        assert_eq!(token_ids(None, body, b"abcdefgh").unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
