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

use std::ffi::c_void;
use std::mem::offset_of;
use std::ptr::{addr_of, addr_of_mut, null_mut};

use pdgate_glue::core::request_id::{traceparent, uuid_v4};
use pdgate_glue::ffi::{
    ngx_command_t, ngx_conf_set_flag_slot, ngx_conf_t, ngx_flag_t, ngx_http_module_t,
    ngx_http_phases_NGX_HTTP_REWRITE_PHASE, ngx_http_request_t, ngx_int_t, ngx_module_t,
    ngx_uint_t, NGX_CONF_FLAG, NGX_DECLINED, NGX_ERROR, NGX_HTTP_INTERNAL_SERVER_ERROR,
    NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET, NGX_HTTP_MAIN_CONF, NGX_HTTP_MODULE,
    NGX_HTTP_SRV_CONF, NGX_LOG_INFO, NGX_OK,
};
use pdgate_glue::ngx::http::{HttpModule, HttpModuleLocationConf, Merge, MergeConfigError};
use pdgate_glue::ngx::{ngx_log_error, ngx_string};
use pdgate_glue::{guard, headers, phase, random};

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

struct Module;

impl HttpModule for Module {
    fn module() -> &'static ngx_module_t {
        // SAFETY: the module static is only written by nginx while loading.
        unsafe { &*addr_of!(ngx_http_set_request_id_module) }
    }

    unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        guard::catch("set_request_id postconfiguration", NGX_ERROR as ngx_int_t, || {
            // SAFETY: nginx calls postconfiguration with a valid http conf.
            let added = unsafe {
                phase::add_handler(
                    cf,
                    ngx_http_phases_NGX_HTTP_REWRITE_PHASE,
                    Some(ngx_http_set_request_id_handler),
                )
            };
            if added.is_ok() {
                NGX_OK as ngx_int_t
            } else {
                NGX_ERROR as ngx_int_t
            }
        })
    }
}

// SAFETY: LocationConf is the type create_loc_conf allocates for this module.
unsafe impl HttpModuleLocationConf for Module {
    type LocationConf = LocConf;
}

static NGX_HTTP_SET_REQUEST_ID_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: None,
    postconfiguration: Some(Module::postconfiguration),
    create_main_conf: None,
    init_main_conf: None,
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: Some(Module::create_loc_conf),
    merge_loc_conf: Some(Module::merge_loc_conf),
};

const ANY_LEVEL_FLAG: u32 =
    NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_FLAG;

static mut NGX_HTTP_SET_REQUEST_ID_COMMANDS: [ngx_command_t; 3] = [
    ngx_command_t {
        name: ngx_string!("set_request_id"),
        type_: ANY_LEVEL_FLAG as ngx_uint_t,
        set: Some(ngx_conf_set_flag_slot),
        conf: NGX_HTTP_LOC_CONF_OFFSET as ngx_uint_t,
        offset: offset_of!(LocConf, enabled),
        post: null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("set_trace_headers_force"),
        type_: ANY_LEVEL_FLAG as ngx_uint_t,
        set: Some(ngx_conf_set_flag_slot),
        conf: NGX_HTTP_LOC_CONF_OFFSET as ngx_uint_t,
        offset: offset_of!(LocConf, trace_force),
        post: null_mut(),
    },
    ngx_command_t::empty(),
];

#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_set_request_id_module: ngx_module_t = ngx_module_t {
    ctx: addr_of!(NGX_HTTP_SET_REQUEST_ID_MODULE_CTX) as *mut c_void,
    commands: addr_of_mut!(NGX_HTTP_SET_REQUEST_ID_COMMANDS) as *mut ngx_command_t,
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    ..ngx_module_t::default()
};

pdgate_glue::ngx::ngx_modules!(ngx_http_set_request_id_module);

unsafe extern "C" fn ngx_http_set_request_id_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    guard::catch("set_request_id handler", NGX_DECLINED as ngx_int_t, || {
        // SAFETY: nginx calls phase handlers with a live request.
        match unsafe { handler(r) } {
            Ok(()) => NGX_DECLINED as ngx_int_t,
            Err(_) => NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t,
        }
    })
}

/// Adds the missing headers; `Err` only when out of memory.
///
/// # Safety
/// `r` must be a live request.
unsafe fn handler(r: *mut ngx_http_request_t) -> Result<(), pdgate_glue::NgxError> {
    // SAFETY: r is live; header helpers copy values into its pool.
    unsafe {
        if r != (*r).main {
            return Ok(());
        }
        let Some(lcf) = Module::location_conf(&*r) else { return Ok(()) };
        if lcf.enabled == 1 && headers::find_in(r, b"x-request-id").is_none() {
            let id = random::with_rng(uuid_v4);
            headers::push_in(r, "X-Request-Id", "x-request-id", &id)?;
            let log = (*(*r).connection).log;
            ngx_log_error!(
                NGX_LOG_INFO,
                log,
                "set_request_id: X-Request-Id {}",
                std::str::from_utf8(&id).unwrap_or("")
            );
        }
        if lcf.enabled != 1 && lcf.trace_force != 1 {
            return Ok(());
        }
        let tp: Vec<u8> = match headers::find_in(r, b"traceparent") {
            Some(v) => v.to_vec(),
            None if lcf.trace_force == 1 => {
                let tp = random::with_rng(traceparent);
                headers::push_in(r, "traceparent", "traceparent", &tp)?;
                tp.to_vec()
            }
            None => return Ok(()),
        };
        if headers::find_in(r, b"ttft_traceparent").is_none() {
            headers::push_in(r, "TTFT_traceparent", "ttft_traceparent", &tp)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() * 1000)
                .unwrap_or(0)
                .to_string();
            headers::push_in(r, "Start_time_ns", "start_time_ns", now.as_bytes())?;
            headers::push_in(r, "TTFT_Start_time", "ttft_start_time", now.as_bytes())?;
        }
        Ok(())
    }
}
