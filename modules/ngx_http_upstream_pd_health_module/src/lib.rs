//! ngx_http_upstream_pd_health_module: active health checks of the engines,
//! shared by every worker, with readiness.
//!
//! ```nginx
//! upstream prefill_servers {
//!     zone prefill_servers 64k;
//!     server 10.0.0.1:8000;
//!     server 10.0.0.2:8000;
//!     pd_score_balance prefill;
//!     pd_health_check interval=2s timeout=1s fails=2 passes=1 uri=/health;
//!     pd_engine_metrics interval=1s uri=/metrics;
//! }
//! location = /health { pd_health_ready prefill_servers decode_servers; }
//! location = /internal/health { pd_health_status; }
//! ```
//!
//! One worker probes every peer of every checked upstream (elected through
//! the shared zone, replaced when it dies); every worker keeps round
//! robin's `down` flag of each peer in line with the shared results, so
//! every balancer skips a peer that is not up. With `pd_engine_metrics` the
//! same worker scrapes each engine's `/metrics` into the zone, and every
//! balancer adds the engine's own queue and KV pressure to what it counts
//! (`earliest_start` predicts from it). The prober and the pages are
//! `pdgate_glue::health`; the settings, the table and what a probe means
//! are `pdgate_core::health`.

#![forbid(unsafe_code)]

use pdgate_glue::conf;
use pdgate_glue::ffi::{
    ngx_int_t, NGX_CONF_ANY, NGX_CONF_NOARGS, NGX_ERROR, NGX_HTTP_LOC_CONF, NGX_OK,
};
use pdgate_glue::health::{self, ReadyConf, UpstreamHealth};
use pdgate_glue::http::{Conf, ConfError, Request, RequestExt};
use pdgate_glue::ngx::http::{HttpModule, HttpModuleLocationConf};
use pdgate_glue::NgxError;

pdgate_glue::http_module! {
    module: ngx_http_upstream_pd_health_module,
    preconfiguration: preconfiguration,
    postconfiguration: postconfiguration,
    srv_conf: UpstreamHealth,
    loc_conf: ReadyConf,
    init_process: init_process,
    commands: [
        conf::upstream_command(c"pd_health_check", NGX_CONF_ANY, Some(cmd_check)),
        conf::upstream_command(c"pd_engine_metrics", NGX_CONF_ANY, Some(cmd_metrics)),
        conf::upstream_command(c"pd_kv_events", NGX_CONF_ANY, Some(cmd_kv_events)),
        conf::loc_command(c"pd_health_status", NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS, Some(cmd_status)),
        conf::loc_command(c"pd_health_ready", NGX_HTTP_LOC_CONF | NGX_CONF_ANY, Some(cmd_ready)),
    ],
}

/// Forgets the previous configuration's `pd_health_ready` names.
fn preconfiguration(_: &mut Conf) -> Result<(), NgxError> {
    health::reset();
    Ok(())
}

/// Every upstream `pd_health_ready` names has `pd_health_check`.
fn postconfiguration(cf: &mut Conf) -> Result<(), NgxError> {
    health::check_ready_names(cf, Module::module())
}

/// Each worker: the prober's timer.
fn init_process() -> Result<(), NgxError> {
    health::init_process(Module::module())
}

pdgate_glue::directive!(cmd_check, UpstreamHealth, check);

/// `pd_health_check [interval=…] [timeout=…] [fails=…] [passes=…] [uri=…] [port=…];`
fn check(cf: &mut Conf, h: &'static mut UpstreamHealth) -> Result<(), ConfError> {
    health::check_directive(cf, h, Module::module())
}

pdgate_glue::directive!(cmd_metrics, UpstreamHealth, metrics);

/// `pd_engine_metrics [interval=…] [timeout=…] [uri=…] [port=…] [model=…] [kv_high=…];`
fn metrics(cf: &mut Conf, h: &'static mut UpstreamHealth) -> Result<(), ConfError> {
    health::metrics_directive(cf, h, Module::module())
}

pdgate_glue::directive!(cmd_kv_events, UpstreamHealth, kv_events);

/// `pd_kv_events [port=…] [replay_port=…] [topic=…] [blocks=…] [block_size=…] [hash=…] [seed=…];`
fn kv_events(cf: &mut Conf, h: &'static mut UpstreamHealth) -> Result<(), ConfError> {
    health::kv_directive(cf, h, Module::module())
}

pdgate_glue::directive!(cmd_status, status);

/// `pd_health_status;`
fn status(cf: &mut Conf) -> Result<(), ConfError> {
    cf.set_content_handler(Some(status_handler)).map_err(|_| ConfError::Logged)
}

pdgate_glue::directive!(cmd_ready, ReadyConf, ready);

/// `pd_health_ready [upstream …];`
fn ready(cf: &mut Conf, rc: &'static mut ReadyConf) -> Result<(), ConfError> {
    health::ready_directive(cf, rc)?;
    cf.set_content_handler(Some(ready_handler)).map_err(|_| ConfError::Logged)
}

pdgate_glue::request_handler!(status_handler, NGX_ERROR, status_page);

/// Each checked peer's health and the prober, as text.
fn status_page(r: &mut Request) -> ngx_int_t {
    let rc = r.discard_request_body().0;
    if rc != NGX_OK as ngx_int_t {
        return rc;
    }
    r.send(200, b"text/plain", health::status_text().as_bytes())
}

pdgate_glue::request_handler!(ready_handler, NGX_ERROR, ready_page);

/// 200 while each named pool has a peer that may take traffic, else 503
/// JSON naming the first that has none.
fn ready_page(r: &mut Request) -> ngx_int_t {
    let rc = r.discard_request_body().0;
    if rc != NGX_OK as ngx_int_t {
        return rc;
    }
    let names = Module::location_conf(r).map_or(&[][..], |c| c.upstreams.as_slice());
    match health::readiness(names) {
        Ok(()) => r.send(200, b"application/json", b"{\"status\":\"ready\"}\n"),
        Err(msg) => {
            let body = pdgate_glue::core::error::error_body(503, &msg);
            r.send(503, b"application/json", &body)
        }
    }
}
