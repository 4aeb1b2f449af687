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

use pdgate_glue::core::metrics::MetricsZone;
use pdgate_glue::driver;
use pdgate_glue::ffi::{
    ngx_command_t, ngx_int_t, ngx_uint_t, NGX_CONF_NOARGS, NGX_CONF_TAKE1, NGX_DECLINED, NGX_ERROR,
    NGX_HTTP_GET, NGX_HTTP_HEAD, NGX_HTTP_LOC_CONF, NGX_HTTP_MAIN_CONF, NGX_HTTP_NOT_ALLOWED,
    NGX_OK,
};
use pdgate_glue::http::{Conf, ConfError, Request, RequestExt, Zone};
use pdgate_glue::ngx::http::{HttpModule, HttpModuleMainConf};
use pdgate_glue::{conf, pdmetrics, NgxError};

use crate::{arg, Module, ANY_LEVEL};

/// The shared zone's name.
const ZONE_NAME: &[u8] = driver::METRICS_ZONE;

/// The zone's size when `pd_metrics` is used without `pd_metrics_zone`.
const DEFAULT_ZONE_SIZE: usize = 64 << 10;

/// The module's main configuration (metrics part).
#[derive(Debug, Default)]
pub struct MainConf {
    /// `pd_metrics_zone` / `enable_internal_metrics`: the size asked for.
    size: Option<usize>,
    /// Some location has `pd_metrics`.
    served: bool,
    zone: Option<Zone<MetricsZone>>,
}

// --- directives -------------------------------------------------------------

/// `pd_metrics;` (location): serve the metrics here.
pub const CMD_PD_METRICS: ngx_command_t =
    conf::loc_command(c"pd_metrics", NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS, Some(cmd_pd_metrics));

/// `pd_metrics_zone <size>;` (http): collect metrics in a zone of this size.
pub const CMD_PD_METRICS_ZONE: ngx_command_t = conf::loc_command(
    c"pd_metrics_zone",
    NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
    Some(cmd_pd_metrics_zone),
);

/// `enable_internal_metrics <size>;` (any level): the original's name for
/// `pd_metrics_zone`.
pub const CMD_ENABLE_INTERNAL_METRICS: ngx_command_t = conf::loc_command(
    c"enable_internal_metrics",
    ANY_LEVEL | NGX_CONF_TAKE1,
    Some(cmd_pd_metrics_zone),
);

pdgate_glue::directive!(cmd_pd_metrics, pd_metrics);

fn pd_metrics(cf: &mut Conf) -> Result<(), ConfError> {
    let mcf = Module::main_conf_mut(cf.get()).ok_or(ConfError::Logged)?;
    mcf.served = true;
    cf.set_content_handler(Some(ngx_http_pd_metrics_handler))?;
    Ok(())
}

pdgate_glue::directive!(cmd_pd_metrics_zone, pd_metrics_zone);

/// `pd_metrics_zone <size>;`, `enable_internal_metrics <size>;`
fn pd_metrics_zone(cf: &mut Conf) -> Result<(), ConfError> {
    let mcf = Module::main_conf_mut(cf.get()).ok_or(ConfError::Logged)?;
    if mcf.size.is_some() {
        return Err(ConfError::Directive("is duplicate".into()));
    }
    let v = arg(cf)?;
    let size = conf::parse_size(v).ok_or_else(|| {
        ConfError::Directive(format!("invalid zone size \"{}\"", String::from_utf8_lossy(v)))
    })?;
    let least = 8 * conf::pagesize();
    if size < least {
        return Err(ConfError::Directive(format!(
            "zone \"{}\" is too small (at least {least} bytes)",
            String::from_utf8_lossy(ZONE_NAME)
        )));
    }
    mcf.size = Some(size);
    Ok(())
}

// --- configuration hooks ----------------------------------------------------

/// Creates the zone when metrics are asked for (the body filter and the
/// log handler are the driver's, installed always: the variables need them).
pub(crate) fn postconfiguration(cf: &mut Conf) -> Result<(), NgxError> {
    let Some(mcf) = Module::main_conf_mut(cf.get()) else { return Err(NgxError) };
    if mcf.served || mcf.size.is_some() {
        let size = mcf.size.unwrap_or(DEFAULT_ZONE_SIZE);
        if let Some(z) = cf.add_zone::<MetricsZone>(ZONE_NAME, size, Module::module())? {
            mcf.zone = Some(z);
        }
    }
    Ok(())
}

// --- the metrics location ---------------------------------------------------

pdgate_glue::request_handler!(ngx_http_pd_metrics_handler, NGX_ERROR, metrics_page);

fn metrics_page(r: &mut Request) -> ngx_int_t {
    let method = r.as_ref().method;
    if method != NGX_HTTP_GET as ngx_uint_t && method != NGX_HTTP_HEAD as ngx_uint_t {
        return NGX_HTTP_NOT_ALLOWED as ngx_int_t;
    }
    let rc = r.discard_request_body().0;
    if rc != NGX_OK as ngx_int_t {
        return rc;
    }
    let Some(mcf) = Module::main_conf(r) else { return NGX_DECLINED as ngx_int_t };
    let text = pdmetrics::page(r, mcf.zone.as_ref().and_then(Zone::state));
    r.send(200, b"text/plain; version=0.0.4; charset=utf-8", text.as_bytes())
}
