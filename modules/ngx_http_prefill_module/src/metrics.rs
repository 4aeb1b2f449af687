//! Metrics and log variables of the P/D flow (`pd_metrics`,
//! `pd_metrics_zone`, `enable_internal_metrics`, `$pd_*`).
//!
//! Each P/D request's context carries a [`Record`]: the flow (lib.rs,
//! encode.rs) stamps its stages, a body filter stamps the decode answer's
//! first and last byte and scans it for `usage` token counts in place, and
//! a log-phase handler adds the finished request to the shared
//! [`MetricsZone`] exactly once (every request that reaches the log phase:
//! answered, failed, or closed by the client). The `$pd_*` variables read
//! the same record, so they are right in `log_format`. A `pd_metrics`
//! location serves the zone as Prometheus text, with the in-flight
//! counters of every pdgate balancer.

use std::ffi::{c_char, c_void};
use std::ptr::null_mut;

use pdgate_glue::core::metrics::{render, MetricsZone, PeerGauge};
use pdgate_glue::driver::{self};
use pdgate_glue::ffi::{
    ngx_command_t, ngx_conf_t, ngx_http_discard_request_body, ngx_http_request_t, ngx_int_t,
    ngx_pagesize, ngx_parse_size, ngx_shm_zone_t, ngx_uint_t, NGX_CONF_NOARGS, NGX_CONF_TAKE1,
    NGX_DECLINED, NGX_ERROR, NGX_HTTP_GET, NGX_HTTP_HEAD, NGX_HTTP_LOC_CONF,
    NGX_HTTP_LOC_CONF_OFFSET, NGX_HTTP_MAIN_CONF, NGX_HTTP_NOT_ALLOWED, NGX_OK,
};
use pdgate_glue::ngx::http::HttpModuleMainConf;
use pdgate_glue::{conf, guard, response, upstream, zone};

use crate::{Module, ANY_LEVEL};

/// The shared zone's name.
const ZONE_NAME: &[u8] = driver::METRICS_ZONE;

/// The zone's size when `pd_metrics` is used without `pd_metrics_zone`.
const DEFAULT_ZONE_SIZE: usize = 64 << 10;

/// The module's main configuration (metrics part).
#[derive(Debug)]
pub struct MainConf {
    /// `pd_metrics_zone` / `enable_internal_metrics`: the size asked for.
    size: Option<usize>,
    /// Some location has `pd_metrics`.
    served: bool,
    zone: *mut ngx_shm_zone_t,
}

impl Default for MainConf {
    fn default() -> Self {
        MainConf { size: None, served: false, zone: null_mut() }
    }
}

// --- directives -------------------------------------------------------------

/// `pd_metrics;` (location): serve the metrics here.
pub const CMD_PD_METRICS: ngx_command_t = ngx_command_t {
    name: conf::name(c"pd_metrics"),
    type_: (NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS) as ngx_uint_t,
    set: Some(cmd_pd_metrics),
    conf: NGX_HTTP_LOC_CONF_OFFSET as ngx_uint_t,
    offset: 0,
    post: null_mut(),
};

/// `pd_metrics_zone <size>;` (http): collect metrics in a zone of this size.
pub const CMD_PD_METRICS_ZONE: ngx_command_t = ngx_command_t {
    name: conf::name(c"pd_metrics_zone"),
    type_: (NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
    set: Some(cmd_pd_metrics_zone),
    conf: NGX_HTTP_LOC_CONF_OFFSET as ngx_uint_t,
    offset: 0,
    post: null_mut(),
};

/// `enable_internal_metrics <size>;` (any level): the original's name for
/// `pd_metrics_zone`.
pub const CMD_ENABLE_INTERNAL_METRICS: ngx_command_t = ngx_command_t {
    name: conf::name(c"enable_internal_metrics"),
    type_: (ANY_LEVEL | NGX_CONF_TAKE1) as ngx_uint_t,
    set: Some(cmd_pd_metrics_zone),
    conf: NGX_HTTP_LOC_CONF_OFFSET as ngx_uint_t,
    offset: 0,
    post: null_mut(),
};

/// The module's main conf while parsing.
///
/// # Safety
/// `cf` must be a directive handler's conf in http context.
unsafe fn main_conf(cf: *mut ngx_conf_t) -> Option<&'static mut MainConf> {
    // SAFETY: cf is live (caller); the main conf is this module's MainConf.
    unsafe { Module::main_conf_mut(&*cf) }
}

unsafe extern "C" fn cmd_pd_metrics(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    guard::catch("pd_metrics directive", pdgate_glue::ngx::core::NGX_CONF_ERROR, || {
        // SAFETY: nginx's directive handler contract (location context).
        unsafe {
            let Some(mcf) = main_conf(cf) else { return pdgate_glue::ngx::core::NGX_CONF_ERROR };
            mcf.served = true;
            upstream::set_content_handler(cf, Some(ngx_http_pd_metrics_handler))
        }
    })
}

unsafe extern "C" fn cmd_pd_metrics_zone(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    guard::catch("pd_metrics_zone directive", pdgate_glue::ngx::core::NGX_CONF_ERROR, || {
        // SAFETY: nginx's directive handler contract; NGX_CONF_TAKE1
        // guarantees args[1].
        unsafe {
            let Some(mcf) = main_conf(cf) else { return pdgate_glue::ngx::core::NGX_CONF_ERROR };
            if mcf.size.is_some() {
                return conf::error(cf, "is duplicate");
            }
            let args = conf::args(cf);
            let Some(arg) = args.get(1) else { return conf::error(cf, "needs an argument") };
            let mut a = *arg;
            let size = ngx_parse_size(&mut a);
            if size < 0 {
                return conf::error(
                    cf,
                    &format!(
                        "invalid zone size \"{}\"",
                        String::from_utf8_lossy(conf::str_bytes(arg))
                    ),
                );
            }
            let least = 8 * ngx_pagesize;
            if (size as usize) < least {
                return conf::error(
                    cf,
                    &format!(
                        "zone \"{}\" is too small (at least {least} bytes)",
                        String::from_utf8_lossy(ZONE_NAME)
                    ),
                );
            }
            mcf.size = Some(size as usize);
            conf::OK
        }
    })
}

// --- configuration hooks ----------------------------------------------------

/// Creates the zone when metrics are asked for, and hooks the body filter
/// and the log handler (always: the variables need them).
///
/// # Safety
/// `cf` must be the conf of an http postconfiguration callback.
pub(crate) unsafe fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: postconfiguration is single-threaded; cf is live (caller).
    unsafe {
        let Some(mcf) = main_conf(cf) else { return NGX_ERROR as ngx_int_t };
        if mcf.served || mcf.size.is_some() {
            let size = mcf.size.unwrap_or(DEFAULT_ZONE_SIZE);
            match zone::add::<MetricsZone>(cf, ZONE_NAME, size, Module::module()) {
                Ok(Some(z)) => mcf.zone = z,
                Ok(None) => {}
                Err(_) => return NGX_ERROR as ngx_int_t,
            }
        }
    }
    NGX_OK as ngx_int_t
}

use pdgate_glue::ngx::http::HttpModule;

// --- the metrics location ---------------------------------------------------

/// A balancer gauge copied out of the walk over the zones.
type OwnedGauge = (String, Vec<u8>, Vec<u8>, u64, u64);

unsafe extern "C" fn ngx_http_pd_metrics_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    guard::catch("pd_metrics handler", NGX_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls content handlers with a live request.
        unsafe {
            let method = (*r).method;
            if method != NGX_HTTP_GET as ngx_uint_t && method != NGX_HTTP_HEAD as ngx_uint_t {
                return NGX_HTTP_NOT_ALLOWED as ngx_int_t;
            }
            let rc = ngx_http_discard_request_body(r);
            if rc != NGX_OK as ngx_int_t {
                return rc;
            }
            let Some(mcf) = Module::main_conf(&*r) else { return NGX_DECLINED as ngx_int_t };
            let empty = MetricsZone::default();
            let z = zone::state::<MetricsZone>(mcf.zone).unwrap_or(&empty);
            let mut owned: Vec<OwnedGauge> = Vec::new();
            upstream::for_each_peer_gauge(r, |b, u, p, requests, tokens| {
                owned.push((b.to_owned(), u.to_vec(), p.to_vec(), requests, tokens));
            });
            let gauges: Vec<PeerGauge<'_>> = owned
                .iter()
                .map(|(b, u, p, requests, tokens)| PeerGauge {
                    balancer: b,
                    upstream: u,
                    peer: p,
                    requests: *requests,
                    tokens: *tokens,
                })
                .collect();
            let text = render(z, &gauges);
            response::send(r, 200, b"text/plain; version=0.0.4; charset=utf-8", text.as_bytes())
        }
    })
}
