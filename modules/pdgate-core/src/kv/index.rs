//! Shared KV index.
