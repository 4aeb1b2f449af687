//! ngx_http_set_request_id_module: one `X-Request-Id` on every leg.
//!
//! In the rewrite phase of a main request, adds an `X-Request-Id` request
//! header (a lowercase UUID v4) when the client sent none, so `proxy_pass`
//! forwards the same id to the prefill subrequest and to the decode leg —
//! vLLM uses it as its request id. A client's id is never replaced.
//!
//! With `set_trace_headers_force on`, a W3C `traceparent` is generated when
//! the client sent none; where trace handling is on (either directive on),
//! the Global Proxy timing headers `TTFT_traceparent`, `Start_time_ns` and
//! `TTFT_Start_time` are added as the original module did.

#![forbid(unsafe_code)]

use std::mem::offset_of;

use pdgate_glue::core::request_id::{check_client_id, traceparent, uuid_v4};
use pdgate_glue::ffi::{
    ngx_command_t, ngx_conf_set_flag_slot, ngx_flag_t, ngx_http_phases_NGX_HTTP_REWRITE_PHASE,
    ngx_int_t, ngx_uint_t, NGX_CONF_FLAG, NGX_DECLINED, NGX_HTTP_INTERNAL_SERVER_ERROR,
    NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET, NGX_HTTP_MAIN_CONF, NGX_HTTP_SRV_CONF,
    NGX_LOG_INFO, NGX_LOG_WARN,
};
use pdgate_glue::http::{Conf, Request, RequestExt};
use pdgate_glue::ngx::http::{HttpModuleLocationConf, Merge, MergeConfigError};
use pdgate_glue::ngx::ngx_log_error;
use pdgate_glue::{conf, random, NgxError};

const NGX_CONF_UNSET: ngx_flag_t = -1;

/// Per-location configuration.
#[derive(Debug)]
pub struct LocConf {
    /// `set_request_id on|off`
    enabled: ngx_flag_t,
    /// `set_trace_headers_force on|off`
    trace_force: ngx_flag_t,
}

impl Default for LocConf {
    fn default() -> Self {
        LocConf { enabled: NGX_CONF_UNSET, trace_force: NGX_CONF_UNSET }
    }
}

fn merge_flag(v: &mut ngx_flag_t, prev: ngx_flag_t, default: ngx_flag_t) {
    if *v == NGX_CONF_UNSET {
        *v = if prev == NGX_CONF_UNSET { default } else { prev };
    }
}

impl Merge for LocConf {
    fn merge(&mut self, prev: &Self) -> Result<(), MergeConfigError> {
        merge_flag(&mut self.enabled, prev.enabled, 0);
        merge_flag(&mut self.trace_force, prev.trace_force, 0);
        Ok(())
    }
}

const ANY_LEVEL_FLAG: u32 =
    NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_FLAG;

/// An `on|off` directive stored by nginx's own flag slot at `offset`.
const fn flag(name: &'static std::ffi::CStr, offset: usize) -> ngx_command_t {
    ngx_command_t {
        name: conf::name(name),
        type_: ANY_LEVEL_FLAG as ngx_uint_t,
        set: Some(ngx_conf_set_flag_slot),
        conf: NGX_HTTP_LOC_CONF_OFFSET as ngx_uint_t,
        offset,
        post: std::ptr::null_mut(),
    }
}

pdgate_glue::http_module! {
    module: ngx_http_set_request_id_module,
    postconfiguration: postconfiguration,
    loc_conf: LocConf,
    merge_loc_conf: yes,
    commands: [
        flag(c"set_request_id", offset_of!(LocConf, enabled)),
        flag(c"set_trace_headers_force", offset_of!(LocConf, trace_force)),
    ],
}

fn postconfiguration(cf: &mut Conf) -> Result<(), NgxError> {
    cf.add_phase_handler(
        ngx_http_phases_NGX_HTTP_REWRITE_PHASE,
        Some(ngx_http_set_request_id_handler),
    )
}

pdgate_glue::request_handler!(ngx_http_set_request_id_handler, NGX_DECLINED, phase_handler);

fn phase_handler(r: &mut Request) -> ngx_int_t {
    match handler(r) {
        Ok(()) => NGX_DECLINED as ngx_int_t,
        Err(_) => NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t,
    }
}

/// Adds the missing headers; `Err` only when out of memory.
fn handler(r: &mut Request) -> Result<(), NgxError> {
    if !r.is_main() {
        return Ok(());
    }
    let Some(lcf) = Module::location_conf(r) else { return Ok(()) };
    if lcf.enabled == 1 {
        // A client's id goes to every leg and into the engines' logs: only a
        // short one of a safe alphabet is kept, otherwise it is replaced.
        let sent: Vec<Vec<u8>> = r
            .headers_in_all()
            .into_iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(b"x-request-id"))
            .map(|(_, v)| v.to_vec())
            .collect();
        let values: Vec<&[u8]> = sent.iter().map(Vec::as_slice).collect();
        if let Err(why) = check_client_id(&values) {
            let id = random::with_rng(uuid_v4);
            r.replace_header_in("X-Request-Id", "x-request-id", &id)?;
            ngx_log_error!(
                NGX_LOG_WARN,
                r.log(),
                "set_request_id: client X-Request-Id replaced by {} ({})",
                std::str::from_utf8(&id).unwrap_or(""),
                why
            );
        }
    }
    if lcf.enabled == 1 && r.header_in(b"x-request-id").is_none() {
        let id = random::with_rng(uuid_v4);
        r.push_header_in("X-Request-Id", "x-request-id", &id)?;
        ngx_log_error!(
            NGX_LOG_INFO,
            r.log(),
            "set_request_id: X-Request-Id {}",
            std::str::from_utf8(&id).unwrap_or("")
        );
    }
    if lcf.enabled != 1 && lcf.trace_force != 1 {
        return Ok(());
    }
    let tp: Vec<u8> = match r.header_in(b"traceparent") {
        Some(v) => v.to_vec(),
        None if lcf.trace_force == 1 => {
            let tp = random::with_rng(traceparent);
            r.push_header_in("traceparent", "traceparent", &tp)?;
            tp.to_vec()
        }
        None => return Ok(()),
    };
    if r.header_in(b"ttft_traceparent").is_none() {
        r.push_header_in("TTFT_traceparent", "ttft_traceparent", &tp)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() * 1000)
            .unwrap_or(0)
            .to_string();
        r.push_header_in("Start_time_ns", "start_time_ns", now.as_bytes())?;
        r.push_header_in("TTFT_Start_time", "ttft_start_time", now.as_bytes())?;
    }
    Ok(())
}
