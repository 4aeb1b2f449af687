//! Precise prefix-cache routing: vLLM's block hashes ([`hash`]), its KV
//! cache events ([`events`]) and the shared index of which engine holds
//! which blocks ([`index`]).

pub mod apply;
pub mod conf;
pub mod events;
pub mod hash;
pub mod index;
pub mod prompt;
