//! The former home of the balancer framework, kept as a path for callers
//! outside the balancer crates (the P/D module's metrics page); new code
//! uses [`crate::balancer`].

pub use crate::balancer::for_each_peer_gauge;
pub use crate::conf::set_content_handler;
