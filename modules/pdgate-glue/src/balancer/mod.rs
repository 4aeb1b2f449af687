//! Upstream balancers on top of nginx's round robin, with their counters in
//! a shared zone.
//!
//! A balancer module crate declares a [`Balancer`] static (its policy from
//! pdgate-core: parameters, `choose`, state) and its directives, and
//! [`balancer_module!`](crate::balancer_module) generates the rest: the
//! nginx module, its srv conf ([`UpstreamConf`]), the hooks and the status
//! page. `docs/balancers.md` shows the steps.
//!
//! The pieces, one concern per file:
//! - [`zone`]: the shared zone's layout, attaching it, sizing it.
//! - [`directives`]: the on/off (or role) directive, parameters by name,
//!   `_shm_size`, and the command-table constructors.
//! - [`hooks`]: wrapping `peer.init` and the per-request get/free.
//! - [`usage`]: learning tokens in flight from answers' `usage`.
//! - [`status`]: the `<balancer>_status` page.
//! - [`gauges`]: every balancer's counters, for other modules' metrics.
//!
//! The balancer turns itself on per `upstream {}` and, in its
//! postconfiguration, wraps each enabled upstream's `peer.init` — whatever
//! it is by then: round robin, or the keepalive module's hook around it —
//! so the order of `keepalive` and the balancer directive does not matter
//! and keepalive keeps working.
//!
//! Per try, `get` builds a view of the primary peers (availability judged as
//! `ngx_http_upstream_get_peer` does: tried by this request, `down`,
//! `max_fails`/`fail_timeout`, `max_conns`), asks the policy, and lets the
//! wrapped `get` (round robin, possibly under keepalive, which then reuses a
//! cached connection) take exactly that peer by marking every other one as
//! tried for the duration of the call. The choice is reserved in the shared
//! counters before returning; `free` releases it, once per try, and calls
//! the wrapped `free`, so round robin keeps its failure accounting and a
//! retry never gets a peer already tried.

use std::cell::RefCell;
use std::ptr::null_mut;

use ngx::ffi::{ngx_http_upstream_init_peer_pt, ngx_module_t, ngx_shm_zone_t};

pub use pdgate_core::balance::params::{ParamSpec, Params, Role};
pub use pdgate_core::balance::policy::{
    Choose, History, NoState, PendingPrefills, PolicyState, PrefixAffinity, Request,
};
pub use pdgate_core::balance::PeerView;

pub mod directives;
pub mod gauges;
pub mod hooks;
mod macros;
pub mod status;
pub mod usage;
pub mod zone;

pub use crate::conf::set_content_handler;
pub use directives::{
    flag, flag_or_bare, location_command, param, reset_main_settings, role, shm_size,
};
pub use gauges::for_each_peer_gauge;
pub use hooks::{init_peer, install};
pub use status::status_text;
pub use usage::learn_usage;

/// Most primary peers a balancer chooses among; larger upstreams fall back
/// to round robin (with a warning at startup).
pub const MAX_PEERS: usize = 256;

/// What a balancer module gives the glue.
#[derive(Debug)]
pub struct Balancer {
    /// The on/off directive's name; parameter directives are
    /// `<name>_<parameter>`.
    pub name: &'static str,
    /// The shared zone's name (`pdgate_<name>`: [`gauges`] finds zones by
    /// that prefix).
    pub zone: &'static str,
    /// The policy's parameters (pdgate-core's table for it).
    pub params: &'static [ParamSpec],
    pub choose: Choose,
    /// The cost a request adds to its peer's `cost` counter (None: 0).
    pub cost: Option<fn(u64, &Params) -> u64>,
    /// Follow answers' `usage.total_tokens` (see [`usage::learn_usage`]).
    pub learn_usage: bool,
    /// The policy's own state in the zone ([`NoState`] if none).
    pub state: &'static dyn PolicyState,
    /// The module (for its shared zone).
    pub module: fn() -> &'static ngx_module_t,
}

/// The per-`upstream {}` configuration of a balancer module (its srv conf).
#[derive(Debug)]
pub struct UpstreamConf {
    /// `NGX_CONF_UNSET` (-1), 0 or 1.
    pub enabled: isize,
    pub params: Params,
    zone: *mut ngx_shm_zone_t,
    upstream_name: Vec<u8>,
    saved_init_peer: ngx_http_upstream_init_peer_pt,
    /// Per worker: the slot of each primary peer, built on first use and
    /// again whenever the peer list changed (see `hooks::get`).
    slot_of: RefCell<Vec<usize>>,
    /// The peer list's generation `slot_of` was built for.
    slot_gen: std::cell::Cell<usize>,
    /// Per worker: each primary peer's engine row (`pd_engine_metrics`;
    /// null: none, or never scraped yet), rebuilt with `slot_of` and, while
    /// one is missing, once a second (see `hooks::engine_rows`).
    engine_of: RefCell<Vec<*const pdgate_core::engine::EngineRow>>,
    engine_gen: std::cell::Cell<usize>,
    engine_retry_ms: std::cell::Cell<u64>,
}

impl Default for UpstreamConf {
    fn default() -> Self {
        UpstreamConf {
            enabled: -1,
            params: Params::new(&[]),
            zone: null_mut(),
            upstream_name: Vec::new(),
            saved_init_peer: None,
            slot_of: RefCell::new(Vec::new()),
            slot_gen: std::cell::Cell::new(0),
            engine_of: RefCell::new(Vec::new()),
            engine_gen: std::cell::Cell::new(0),
            engine_retry_ms: std::cell::Cell::new(0),
        }
    }
}

impl UpstreamConf {
    /// The parameters, over `b`'s table (installed on first use: the srv
    /// conf is created before the module knows its balancer).
    fn params_of(&mut self, b: &Balancer) -> &mut Params {
        if self.params.specs().is_empty() && !b.params.is_empty() {
            let role = self.params.role;
            self.params = Params::new(b.params);
            self.params.role = role;
        }
        &mut self.params
    }
}
