//! `pd_tokenizer <model dir> [block_size=16] [hash=sha256_cbor] [seed=0]
//! [max_blocks=…]`: the model's tokenizer and chat template in the proxy
//! (pdgate-core's [`tokenize`](pdgate_core::tokenize)), loaded once at
//! configuration time, shared by every location naming the same directory.
//!
//! Per request, the P/D driver turns the body into the prompt's token ids,
//! counts them (the request's length for every balancer, `pd_hold` and the
//! buckets, instead of bytes / 4) and keys its whole blocks as vLLM's prefix
//! cache does (for `prefix_cache_affinity` and the engines' KV index). The
//! result ([`PromptKeys`]) reaches the balancers (other modules) through the
//! binary variable `$pd_tokenized`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pdgate_core::conf::{invalid_value, number, parameters};
use pdgate_core::kv::conf::Hashing;
use pdgate_core::kv::hash::BlockHasher;
pub use pdgate_core::kv::prompt::PromptKeys;
use pdgate_core::tokenize::Model;

use crate::http::{Conf, ConfError};

/// A location's `pd_tokenizer`.
#[derive(Clone)]
pub struct Tokenizer {
    pub dir: PathBuf,
    pub model: Arc<Model>,
    pub hashing: Hashing,
    pub hasher: Arc<BlockHasher>,
    /// Blocks of a prompt keyed at most.
    pub max_blocks: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("dir", &self.dir).field("hashing", &self.hashing).finish()
    }
}

/// Models loaded by this configuration (by directory): a reload loads
/// them again, locations naming the same directory share one.
static LOADED: Mutex<Vec<(PathBuf, Arc<Model>)>> = Mutex::new(Vec::new());

/// Default of `max_blocks=`: 8,192 blocks (131,072 tokens of 16).
pub const MAX_BLOCKS: usize = 8192;

/// Forgets the models of the previous configuration (preconfiguration).
pub fn reset() {
    if let Ok(mut l) = LOADED.lock() {
        l.clear();
    }
}

/// Whether this configuration has a `pd_tokenizer` (of this module).
pub fn used() -> bool {
    LOADED.lock().is_ok_and(|l| !l.is_empty())
}

/// Parses `pd_tokenizer` into `slot`, loading the model.
pub fn directive(cf: &mut Conf, slot: &mut Option<Tokenizer>) -> Result<(), ConfError> {
    if slot.is_some() {
        return Err(ConfError::Directive("is duplicate".into()));
    }
    let args = cf.args();
    let Some((dir, rest)) = args.split_first() else {
        return Err(ConfError::Directive("needs a model directory".into()));
    };
    let mut hashing = Hashing::default();
    let mut max_blocks = MAX_BLOCKS;
    parameters(rest, |name, value| {
        if hashing.set(name, value)? {
            return Ok(true);
        }
        match name {
            b"max_blocks" => {
                max_blocks = number(value, 1, 1 << 20).ok_or_else(|| {
                    invalid_value(name, value, ", it must be a number from 1 to 1048576")
                })? as usize;
            }
            _ => return Ok(false),
        }
        Ok(true)
    })
    .map_err(ConfError::Directive)?;
    let dir = PathBuf::from(String::from_utf8_lossy(dir).into_owned());
    let model = {
        let mut loaded = LOADED.lock().map_err(|_| ConfError::Directive("cannot load".into()))?;
        match loaded.iter().find(|(d, _)| *d == dir) {
            Some((_, m)) => m.clone(),
            None => {
                let m =
                    Arc::new(Model::load(&dir).map_err(|e| ConfError::Directive(e.to_string()))?);
                loaded.push((dir.clone(), m.clone()));
                m
            }
        }
    };
    let hasher = Arc::new(BlockHasher::new(hashing.algo, hashing.block_size, &hashing.seed));
    *slot = Some(Tokenizer { dir, model, hashing, hasher, max_blocks });
    Ok(())
}

/// The variable carrying a prompt's [`PromptKeys`] (their wire form) from
/// the P/D module to the balancers.
pub const VARIABLE: &[u8] = b"pd_tokenized";

/// The raw `$pd_tokenized` of `r` (see [`PromptKeys::decode`]), when a
/// location tokenized the request.
///
/// # Safety
/// `r` must be a live request.
pub unsafe fn variable_of<'a>(r: *mut ngx::ffi::ngx_http_request_t) -> Option<&'a [u8]> {
    let index = crate::variable::running_index(VARIABLE)?;
    // SAFETY: as documented.
    unsafe { crate::variable::indexed_value(r, index) }
}

/// The prompt's tokens by the model's tokenizer, when a location's
/// `pd_tokenizer` counted them (for modules that size requests).
pub fn tokens_of(r: &ngx::http::Request) -> Option<u64> {
    let r = r as *const ngx::http::Request as *mut ngx::ffi::ngx_http_request_t;
    // SAFETY: a Request is a live ngx_http_request_t (ngx's own cast).
    let raw = unsafe { variable_of(r) }?;
    PromptKeys::decode(raw).map(|(head, _)| head.tokens)
}

impl Tokenizer {
    /// `body`'s prompt keys (see [`PromptKeys::of`]).
    pub fn keys(&self, body: &[u8]) -> Result<Option<PromptKeys>, String> {
        PromptKeys::of(&self.model, &self.hashing, &self.hasher, self.max_blocks, body)
    }
}
