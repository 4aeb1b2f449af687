//! pdgate-sim: an engine simulator that speaks the vLLM/SGLang HTTP API
//! with a continuous-batching timing model, and the pieces pd-bench shares
//! with it. Nothing here touches nginx.

pub mod api;
pub mod bench;
pub mod capacity;
pub mod http;
pub mod metrics;
pub mod model;
pub mod profile;
pub mod server;
