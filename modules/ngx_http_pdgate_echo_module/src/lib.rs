//! ngx_http_pdgate_echo_module: a test backend that answers with what it got.
//!
//! `pdgate_echo [prefill] [usage] [sse=N] [delay=MS] [interval=MS] [status=CODE];`
//! makes a location reply with a JSON description of the request (method,
//! uri, args, headers, body, body parsed as JSON). `prefill` adds top-level
//! `kv_transfer_params` embedding the request, like a vLLM prefill; a request
//! with `"stream": true` gets N (default 3) SSE `data:` events and `[DONE]`,
//! `interval` apart; `delay` holds the
//! answer back (timeouts); `status` sets the status. Used by the `.t` suite
//! and the samples, so P/D flows can be checked without engines.

use std::ffi::{c_char, c_void};
use std::ptr::{addr_of, addr_of_mut, null_mut};

use pdgate_glue::core::echo::{answer, EchoConf, EchoRequest};
use pdgate_glue::ffi::{
    ngx_alloc_chain_link, ngx_buf_t, ngx_command_t, ngx_conf_t, ngx_event_t,
    ngx_http_core_loc_conf_t, ngx_http_core_module, ngx_http_finalize_request, ngx_http_module_t,
    ngx_http_output_filter, ngx_http_read_client_request_body, ngx_http_request_t,
    ngx_http_run_posted_requests, ngx_http_send_header, ngx_int_t, ngx_module_t, ngx_pcalloc,
    ngx_uint_t, NGX_CONF_ANY, NGX_DONE, NGX_ERROR, NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET,
    NGX_HTTP_MODULE, NGX_HTTP_SPECIAL_RESPONSE, NGX_LOG_INFO, NGX_OK,
};
use pdgate_glue::ngx::http::{HttpModule, HttpModuleConfExt, HttpModuleLocationConf};
use pdgate_glue::ngx::{ngx_log_error, ngx_string};
use pdgate_glue::{conf, guard, headers, pool, response, timer};

/// Per-location configuration: the parsed `pdgate_echo` arguments.
type LocConf = EchoConf;

struct Module;

impl HttpModule for Module {
    fn module() -> &'static ngx_module_t {
        // SAFETY: the module static is only written by nginx while loading.
        unsafe { &*addr_of!(ngx_http_pdgate_echo_module) }
    }
}

// SAFETY: LocationConf is the type create_loc_conf allocates for this module.
unsafe impl HttpModuleLocationConf for Module {
    type LocationConf = LocConf;
}

static NGX_HTTP_PDGATE_ECHO_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: None,
    postconfiguration: None,
    create_main_conf: None,
    init_main_conf: None,
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: Some(Module::create_loc_conf),
    // Location-only directive: nothing to inherit.
    merge_loc_conf: None,
};

static mut NGX_HTTP_PDGATE_ECHO_COMMANDS: [ngx_command_t; 2] = [
    ngx_command_t {
        name: ngx_string!("pdgate_echo"),
        type_: (NGX_HTTP_LOC_CONF | NGX_CONF_ANY) as ngx_uint_t,
        set: Some(cmd_pdgate_echo),
        conf: NGX_HTTP_LOC_CONF_OFFSET as ngx_uint_t,
        offset: 0,
        post: null_mut(),
    },
    ngx_command_t::empty(),
];

#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_pdgate_echo_module: ngx_module_t = ngx_module_t {
    ctx: addr_of!(NGX_HTTP_PDGATE_ECHO_MODULE_CTX) as *mut c_void,
    commands: addr_of_mut!(NGX_HTTP_PDGATE_ECHO_COMMANDS) as *mut ngx_command_t,
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    ..ngx_module_t::default()
};

pdgate_glue::ngx::ngx_modules!(ngx_http_pdgate_echo_module);

unsafe extern "C" fn cmd_pdgate_echo(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    lcf: *mut c_void,
) -> *mut c_char {
    guard::catch("pdgate_echo directive", pdgate_glue::ngx::core::NGX_CONF_ERROR, || {
        // SAFETY: nginx passes this module's location conf; the core
        // module's location conf of the same block exists.
        unsafe {
            let lcf = &mut *(lcf as *mut LocConf);
            let args: Vec<&[u8]> =
                conf::args(cf).iter().skip(1).map(|s| conf::str_bytes(s)).collect();
            match EchoConf::parse(&args) {
                Ok(c) => *lcf = c,
                Err(e) => return conf::error(cf, &e),
            }
            let Some(clcf) = (*cf).http_location_conf_unchecked::<ngx_http_core_loc_conf_t>(
                &*addr_of!(ngx_http_core_module),
            ) else {
                return conf::error(cf, "has no location");
            };
            (*clcf.as_ptr()).handler = Some(ngx_http_pdgate_echo_handler);
            conf::OK
        }
    })
}

/// Per-request state: the chunks still to send.
struct Ctx {
    conf: LocConf,
    chunks: Vec<Vec<u8>>,
    sse: bool,
    next: usize,
    header_sent: bool,
    ev: *mut ngx_event_t,
}

unsafe extern "C" fn ngx_http_pdgate_echo_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    guard::catch("pdgate_echo handler", NGX_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls the content handler with a live request.
        unsafe {
            let rc = ngx_http_read_client_request_body(r, Some(echo_body_read));
            if rc >= NGX_HTTP_SPECIAL_RESPONSE as ngx_int_t {
                return rc;
            }
            NGX_DONE as ngx_int_t
        }
    })
}

unsafe extern "C" fn echo_body_read(r: *mut ngx_http_request_t) {
    guard::catch("pdgate_echo body handler", (), || {
        // SAFETY: r is live; everything is allocated from its pool.
        unsafe {
            let Some(lcf) = <Module as HttpModuleLocationConf>::location_conf(&*r) else {
                ngx_http_finalize_request(r, NGX_ERROR as ngx_int_t);
                return;
            };
            let Ok(body) = pdgate_glue::body::bytes(r) else {
                ngx_http_finalize_request(r, NGX_ERROR as ngx_int_t);
                return;
            };
            let req = EchoRequest {
                method: response::str_of(&(*r).method_name),
                uri: response::str_of(&(*r).uri),
                args: response::str_of(&(*r).args),
                headers: headers::all_in(r),
                body,
                connection_requests: (*(*r).connection).requests as u64,
            };
            ngx_log_error!(
                NGX_LOG_INFO,
                (*(*r).connection).log,
                "pdgate_echo: {} {} ({} body bytes)",
                String::from_utf8_lossy(req.method),
                String::from_utf8_lossy(req.uri),
                body.len()
            );
            let ans = answer(&req, lcf.opts);
            let ctx = Ctx {
                conf: lcf.clone(),
                chunks: ans.chunks,
                sse: ans.sse,
                next: 0,
                header_sent: false,
                ev: null_mut(),
            };
            let Some(ctx) = pool::alloc_value((*r).pool, ctx) else {
                ngx_http_finalize_request(r, NGX_ERROR as ngx_int_t);
                return;
            };
            let idx = (*addr_of!(ngx_http_pdgate_echo_module)).ctx_index;
            *(*r).ctx.add(idx) = ctx as *mut c_void;
            if lcf.delay_ms > 0 {
                wait(r, &mut *ctx, lcf.delay_ms);
            } else {
                step(r, &mut *ctx);
            }
        }
    })
}

/// Defers the next step; the request reference the body handler holds is
/// handed to the timer.
///
/// # Safety
/// `r` must be live and own `ctx`.
unsafe fn wait(r: *mut ngx_http_request_t, ctx: &mut Ctx, ms: usize) {
    // SAFETY: r is live.
    unsafe {
        if timer::arm(r, &mut ctx.ev, ms, Some(echo_timer)).is_err() {
            ngx_http_finalize_request(r, NGX_ERROR as ngx_int_t);
        }
    }
}

unsafe extern "C" fn echo_timer(ev: *mut ngx_event_t) {
    guard::catch("pdgate_echo timer", (), || {
        // SAFETY: the timer was armed with data = a live request whose pool
        // owns ctx (the pool cleanup cancels the timer otherwise).
        unsafe {
            let r = (*ev).data as *mut ngx_http_request_t;
            let c = (*r).connection;
            let idx = (*addr_of!(ngx_http_pdgate_echo_module)).ctx_index;
            let ctx = *(*r).ctx.add(idx) as *mut Ctx;
            if !ctx.is_null() {
                step(r, &mut *ctx);
            }
            ngx_http_run_posted_requests(c);
        }
    })
}

/// Sends the header if needed, then chunks: all of them, or one and a timer
/// for the next when an interval is set. Finalizes after the last.
///
/// # Safety
/// `r` must be live and own `ctx`.
unsafe fn step(r: *mut ngx_http_request_t, ctx: &mut Ctx) {
    // SAFETY: r is live; buffers are pool allocations pointing at chunk
    // memory owned by ctx, which the pool keeps until the request ends.
    unsafe {
        if !ctx.header_sent {
            ctx.header_sent = true;
            let ho = &mut (*r).headers_out;
            ho.status = usize::from(if ctx.conf.status == 0 { 200 } else { ctx.conf.status });
            let ct: &'static str = if ctx.sse { "text/event-stream" } else { "application/json" };
            ho.content_type.len = ct.len();
            ho.content_type.data = ct.as_ptr() as *mut u8;
            ho.content_type_len = ct.len();
            ho.content_length_n =
                if ctx.sse { -1 } else { ctx.chunks.iter().map(Vec::len).sum::<usize>() as i64 };
            let rc = ngx_http_send_header(r);
            if rc == NGX_ERROR as ngx_int_t || rc > NGX_OK as ngx_int_t || (*r).header_only() != 0 {
                ngx_http_finalize_request(r, rc);
                return;
            }
        }
        let stream_one = ctx.conf.interval_ms > 0 && ctx.sse;
        loop {
            let i = ctx.next;
            let Some(chunk) = ctx.chunks.get(i) else { break };
            ctx.next += 1;
            let last = ctx.next == ctx.chunks.len();
            let b = ngx_pcalloc((*r).pool, std::mem::size_of::<ngx_buf_t>()) as *mut ngx_buf_t;
            let cl = ngx_alloc_chain_link((*r).pool);
            if b.is_null() || cl.is_null() {
                ngx_http_finalize_request(r, NGX_ERROR as ngx_int_t);
                return;
            }
            let p = chunk.as_ptr() as *mut u8;
            (*b).start = p;
            (*b).pos = p;
            (*b).last = p.add(chunk.len());
            (*b).end = (*b).last;
            (*b).set_memory(1);
            (*b).set_flush(1);
            (*b).set_last_buf(u32::from(last));
            (*b).set_last_in_chain(1);
            (*cl).buf = b;
            (*cl).next = null_mut();
            let rc = ngx_http_output_filter(r, cl);
            if rc == NGX_ERROR as ngx_int_t {
                ngx_http_finalize_request(r, rc);
                return;
            }
            if last {
                ngx_http_finalize_request(r, rc);
                return;
            }
            if stream_one {
                let ms = ctx.conf.interval_ms;
                wait(r, ctx, ms);
                return;
            }
        }
        ngx_http_finalize_request(r, NGX_OK as ngx_int_t);
    }
}
