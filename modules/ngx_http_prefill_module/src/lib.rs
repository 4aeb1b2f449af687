//! ngx_http_prefill_module: the sequential (vLLM NIXL) P/D flow.
//!
//! In the precontent phase of a main request in a location with `prefill`:
//! 1. read the whole client body (`ngx_http_read_client_request_body`);
//! 2. check it is a JSON object and send a rewritten copy (one token, no
//!    stream, KV kept for a remote decode) as a waited, in-memory subrequest
//!    to `<prefix><uri>`, an internal location proxying to the prefill pool;
//! 3. when it finishes, either build the decode body (the client's body with
//!    the prefill's `kv_transfer_params`) and let the location's `proxy_pass`
//!    send it to the decode pool, or answer the client with the prefill's
//!    error or one of ours.
//!
//! The shape follows nginx's mirror (body, `preserve_body`, resume the phases)
//! and auth_request (waited subrequest, post handler records, re-entry acts).
//! Every decision comes from pdgate-core; this file only executes them.

use std::ffi::{c_char, c_void};
use std::mem::offset_of;
use std::ptr::{addr_of, addr_of_mut, null_mut};

use pdgate_glue::core::json::Object;
use pdgate_glue::core::pd::{classify_prefill, PrefillFailure, PrefillOutcome};
use pdgate_glue::core::rewrite::{
    decode_plan, kv_params_of, pd_refusal, prefill_plan, Endpoint, KvParams, PrefillOptions,
    StreamOps,
};
use pdgate_glue::ffi::{
    ngx_command_t, ngx_conf_set_flag_slot, ngx_conf_t, ngx_flag_t, ngx_http_core_module,
    ngx_http_core_run_phases, ngx_http_finalize_request, ngx_http_module_t,
    ngx_http_phases_NGX_HTTP_PRECONTENT_PHASE, ngx_http_read_client_request_body,
    ngx_http_request_t, ngx_int_t, ngx_module_t, ngx_uint_t, NGX_CONF_FLAG, NGX_CONF_TAKE1,
    NGX_DECLINED, NGX_DONE, NGX_ERROR, NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET,
    NGX_HTTP_MAIN_CONF, NGX_HTTP_MODULE, NGX_HTTP_SPECIAL_RESPONSE, NGX_HTTP_SRV_CONF, NGX_LOG_ERR,
    NGX_LOG_WARN, NGX_OK,
};
use pdgate_glue::ngx::http::{HttpModule, HttpModuleLocationConf, Merge, MergeConfigError};
use pdgate_glue::ngx::log::DebugMask;
use pdgate_glue::ngx::{ngx_log_debug, ngx_log_error, ngx_string};
use pdgate_glue::{body, conf, guard, phase, pool, response, subrequest};

// E/P/D: the encoder stage before the prefill (`prefill_encode`).
mod encode;
// Metrics and `$pd_*` log variables (`pd_metrics`, `pd_metrics_zone`).
mod metrics;

const NGX_CONF_UNSET: ngx_flag_t = -1;

/// Per-location configuration.
#[derive(Debug)]
pub struct LocConf {
    /// `prefill <prefix>`: `None` when not set at this level.
    prefix: Option<Option<Vec<u8>>>,
    /// `prefill_kv_transfer_params on|off`.
    kv_params: ngx_flag_t,
    /// `prefill_encode`, `prefill_encode_max_items` (encode.rs).
    encode: encode::Conf,
    /// `stream_ops off|add|set_opt`: `None` when not set at this level.
    stream_ops: Option<StreamOps>,
}

impl Default for LocConf {
    fn default() -> Self {
        LocConf {
            prefix: None,
            kv_params: NGX_CONF_UNSET,
            encode: encode::Conf::default(),
            stream_ops: None,
        }
    }
}

impl Merge for LocConf {
    fn merge(&mut self, prev: &Self) -> Result<(), MergeConfigError> {
        if self.prefix.is_none() {
            self.prefix = prev.prefix.clone();
        }
        if self.kv_params == NGX_CONF_UNSET {
            self.kv_params = if prev.kv_params == NGX_CONF_UNSET { 1 } else { prev.kv_params };
        }
        self.encode.merge(&prev.encode);
        if self.stream_ops.is_none() {
            self.stream_ops = prev.stream_ops;
        }
        Ok(())
    }
}

struct Module;

impl HttpModule for Module {
    fn module() -> &'static ngx_module_t {
        // SAFETY: the module static is only written by nginx while loading.
        unsafe { &*addr_of!(ngx_http_prefill_module) }
    }

    unsafe extern "C" fn preconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        guard::catch("prefill preconfiguration", NGX_ERROR as ngx_int_t, || {
            // SAFETY: nginx calls preconfiguration with a valid http conf.
            unsafe { metrics::preconfiguration(cf) }
        })
    }

    unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        guard::catch("prefill postconfiguration", NGX_ERROR as ngx_int_t, || {
            // SAFETY: as below (metrics.rs hooks its filter and log handler).
            if unsafe { metrics::postconfiguration(cf) } != NGX_OK as ngx_int_t {
                return NGX_ERROR as ngx_int_t;
            }
            // SAFETY: nginx calls postconfiguration with a valid http conf.
            let added = unsafe {
                phase::add_handler(
                    cf,
                    ngx_http_phases_NGX_HTTP_PRECONTENT_PHASE,
                    Some(ngx_http_prefill_handler),
                )
            };
            match added {
                Ok(()) => NGX_OK as ngx_int_t,
                Err(_) => NGX_ERROR as ngx_int_t,
            }
        })
    }
}

// SAFETY: LocationConf is the type create_loc_conf allocates for this module.
unsafe impl HttpModuleLocationConf for Module {
    type LocationConf = LocConf;
}

// SAFETY: MainConf is the type create_main_conf allocates for this module.
unsafe impl pdgate_glue::ngx::http::HttpModuleMainConf for Module {
    type MainConf = metrics::MainConf;
}

static NGX_HTTP_PREFILL_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: Some(Module::preconfiguration),
    postconfiguration: Some(Module::postconfiguration),
    create_main_conf: Some(Module::create_main_conf),
    init_main_conf: None,
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: Some(Module::create_loc_conf),
    merge_loc_conf: Some(Module::merge_loc_conf),
};

const ANY_LEVEL: u32 = NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF;

static mut NGX_HTTP_PREFILL_COMMANDS: [ngx_command_t; 9] = [
    ngx_command_t {
        name: ngx_string!("prefill"),
        type_: (ANY_LEVEL | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(cmd_prefill),
        conf: NGX_HTTP_LOC_CONF_OFFSET as ngx_uint_t,
        offset: 0,
        post: null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("prefill_kv_transfer_params"),
        type_: (ANY_LEVEL | NGX_CONF_FLAG) as ngx_uint_t,
        set: Some(ngx_conf_set_flag_slot),
        conf: NGX_HTTP_LOC_CONF_OFFSET as ngx_uint_t,
        offset: offset_of!(LocConf, kv_params),
        post: null_mut(),
    },
    encode::CMD_PREFILL_ENCODE,
    encode::CMD_PREFILL_ENCODE_MAX_ITEMS,
    ngx_command_t {
        name: ngx_string!("stream_ops"),
        type_: (ANY_LEVEL | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(cmd_stream_ops),
        conf: NGX_HTTP_LOC_CONF_OFFSET as ngx_uint_t,
        offset: 0,
        post: null_mut(),
    },
    metrics::CMD_PD_METRICS,
    metrics::CMD_PD_METRICS_ZONE,
    metrics::CMD_ENABLE_INTERNAL_METRICS,
    ngx_command_t::empty(),
];

#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_prefill_module: ngx_module_t = ngx_module_t {
    ctx: addr_of!(NGX_HTTP_PREFILL_MODULE_CTX) as *mut c_void,
    commands: addr_of_mut!(NGX_HTTP_PREFILL_COMMANDS) as *mut ngx_command_t,
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    ..ngx_module_t::default()
};

pdgate_glue::ngx::ngx_modules!(ngx_http_prefill_module);

/// `stream_ops off | add | set_opt;`
unsafe extern "C" fn cmd_stream_ops(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    lcf: *mut c_void,
) -> *mut c_char {
    guard::catch("stream_ops directive", pdgate_glue::ngx::core::NGX_CONF_ERROR, || {
        // SAFETY: nginx passes this module's location conf and the parsed args.
        unsafe {
            let lcf = &mut *(lcf as *mut LocConf);
            if lcf.stream_ops.is_some() {
                return conf::error(cf, "is duplicate");
            }
            let v = conf::args(cf).get(1).map(|a| conf::str_bytes(a)).unwrap_or(&[]);
            match StreamOps::parse(v) {
                Some(ops) => {
                    lcf.stream_ops = Some(ops);
                    conf::OK
                }
                None => conf::error(
                    cf,
                    &format!(
                        "invalid value \"{}\", it must be \"off\", \"add\" or \"set_opt\"",
                        String::from_utf8_lossy(v)
                    ),
                ),
            }
        }
    })
}

/// `prefill <uri-prefix> | off;`
unsafe extern "C" fn cmd_prefill(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    lcf: *mut c_void,
) -> *mut c_char {
    guard::catch("prefill directive", pdgate_glue::ngx::core::NGX_CONF_ERROR, || {
        // SAFETY: nginx passes this module's location conf and the parsed args.
        unsafe {
            let lcf = &mut *(lcf as *mut LocConf);
            if lcf.prefix.is_some() {
                return conf::error(cf, "is duplicate");
            }
            let args = conf::args(cf);
            let Some(arg) = args.get(1) else { return conf::error(cf, "needs an argument") };
            match pdgate_glue::core::conf::parse_prefix(conf::str_bytes(arg)) {
                Ok(p) => {
                    lcf.prefix = Some(p);
                    conf::OK
                }
                Err(e) => conf::error(cf, &e.to_string()),
            }
        }
    })
}

/// Where a request is in the flow.
enum State {
    /// Waiting for the client body.
    ReadingBody,
    /// The encoder requests are running (encode.rs).
    Encoding(*mut encode::Stage),
    /// The prefill subrequest is running.
    Prefilling,
    /// The prefill finished; re-entry acts on the outcome.
    PrefillDone { outcome: PrefillOutcome, answer: &'static [u8], content_type: &'static [u8] },
    /// We answer the client ourselves (bad body, internal failure).
    Reject { status: u16, message: String },
    /// Decode body installed; the rest of the phases run normally.
    Passed,
}

/// Per-request context, owned by the request pool.
struct Ctx {
    state: State,
    /// The client body (request-pool memory) and its top-level members.
    body: &'static [u8],
    obj: Option<Object<'static>>,
    /// What metrics.rs records of the request.
    m: metrics::Record,
}

/// The request's context, if this module has set one.
///
/// # Safety
/// `r` must be a live request.
unsafe fn ctx_of(r: *mut ngx_http_request_t) -> Option<&'static mut Ctx> {
    // SAFETY: ctx slots hold what this module stored there: a pool-owned Ctx.
    unsafe {
        let idx = (*addr_of!(ngx_http_prefill_module)).ctx_index;
        ((*(*r).ctx.add(idx)) as *mut Ctx).as_mut()
    }
}

unsafe extern "C" fn ngx_http_prefill_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    guard::catch("prefill handler", NGX_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls phase handlers with a live request.
        unsafe { handler(r) }
    })
}

/// The precontent phase handler; entered once at the start and once again
/// after the body was read and the prefill finished.
unsafe fn handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: r is live (caller); conf and ctx accessors return this
    // module's own data.
    unsafe {
        if r != (*r).main {
            return NGX_DECLINED as ngx_int_t;
        }
        let Some(lcf) = Module::location_conf(&*r) else { return NGX_DECLINED as ngx_int_t };
        if !matches!(&lcf.prefix, Some(Some(_))) && lcf.encode.prefix().is_none() {
            return NGX_DECLINED as ngx_int_t;
        }

        let Some(ctx) = ctx_of(r) else {
            let ctx = Ctx {
                state: State::ReadingBody,
                body: &[],
                obj: None,
                m: metrics::Record::start(),
            };
            let Some(ctx) = pool::alloc_value((*r).pool, ctx) else {
                return NGX_ERROR as ngx_int_t;
            };
            let idx = (*addr_of!(ngx_http_prefill_module)).ctx_index;
            *(*r).ctx.add(idx) = ctx as *mut c_void;
            let rc = ngx_http_read_client_request_body(r, Some(ngx_http_prefill_body_handler));
            if rc >= NGX_HTTP_SPECIAL_RESPONSE as ngx_int_t {
                return rc;
            }
            ngx_http_finalize_request(r, NGX_DONE as ngx_int_t);
            return NGX_DONE as ngx_int_t;
        };

        match std::mem::replace(&mut ctx.state, State::Passed) {
            s @ (State::ReadingBody | State::Prefilling) => {
                ctx.state = s;
                NGX_DONE as ngx_int_t
            }
            State::Encoding(stage) => encode::resume(r, ctx, stage),
            State::Passed => {
                ctx.m.decode_sent();
                NGX_DECLINED as ngx_int_t
            }
            State::Reject { status, message } => {
                response::finish_with_error(r, status, &message);
                NGX_DONE as ngx_int_t
            }
            State::PrefillDone { outcome, answer, content_type } => {
                after_prefill(r, ctx, outcome, answer, content_type)
            }
        }
    }
}

/// Acts on a finished prefill in the main request's context.
///
/// # Safety
/// `r` must be the live main request owning `ctx`.
unsafe fn after_prefill(
    r: *mut ngx_http_request_t,
    ctx: &mut Ctx,
    outcome: PrefillOutcome,
    answer: &'static [u8],
    content_type: &'static [u8],
) -> ngx_int_t {
    // SAFETY: r is live; the action is a static C string nginx only reads.
    let log = unsafe {
        let log = (*(*r).connection).log;
        (*log).action = c"processing the prefill answer".as_ptr() as *mut c_char;
        log
    };
    let log = || log;
    match outcome {
        PrefillOutcome::Decode => {
            let Some(obj) = ctx.obj.as_ref() else {
                // SAFETY: r is live and has not sent a header.
                unsafe { response::finish_with_error(r, 500, "prefill state lost") };
                return NGX_DONE as ngx_int_t;
            };
            let kv = match kv_params_of(answer) {
                KvParams::Found(kv) => Some(kv),
                KvParams::Missing => {
                    ctx.m.kv_missing();
                    ngx_log_error!(
                        NGX_LOG_WARN,
                        log(),
                        "prefill answer has no \"kv_transfer_params\", decode will recompute the prompt"
                    );
                    None
                }
                KvParams::Invalid(e) => {
                    ctx.m.kv_missing();
                    ngx_log_error!(
                        NGX_LOG_WARN,
                        log(),
                        "prefill answer is not a JSON object ({}), decode will recompute the prompt",
                        e
                    );
                    None
                }
            };
            // SAFETY: r is live; its location conf outlives it.
            let ops = unsafe { Module::location_conf(&*r) }
                .and_then(|c| c.stream_ops)
                .unwrap_or_default();
            let plan = decode_plan(obj, kv, ops);
            // SAFETY: the body and answer live in the request pool, as does
            // the chain; r's request_body exists since the body was read.
            unsafe {
                let Ok((chain, len)) = body::chain_from_plan((*r).pool, ctx.body, &plan) else {
                    return NGX_ERROR as ngx_int_t;
                };
                let rb = (*r).request_body;
                if rb.is_null() {
                    return NGX_ERROR as ngx_int_t;
                }
                (*rb).bufs = chain;
                (*r).headers_in.content_length_n = len as i64;
                ngx_log_debug!(
                    mask: DebugMask::Http,
                    log(),
                    "prefill: decode body {} bytes in {} pieces, kv_transfer_params {} bytes",
                    len,
                    plan.pieces.len(),
                    kv.map_or(0, <[u8]>::len)
                );
            }
            ctx.state = State::Passed;
            ctx.m.decode_sent();
            NGX_DECLINED as ngx_int_t
        }
        PrefillOutcome::PassThrough { status } => {
            ngx_log_error!(
                NGX_LOG_WARN,
                log(),
                "prefill answered {}, passing its answer to the client",
                status
            );
            let ct: &[u8] =
                if content_type.is_empty() { b"application/json" } else { content_type };
            // SAFETY: r is live and has not sent a header; we stop touching it.
            unsafe {
                let rc = response::send(r, status, ct, answer);
                ngx_http_finalize_request(r, rc);
            }
            NGX_DONE as ngx_int_t
        }
        PrefillOutcome::Fail(f) => {
            ngx_log_error!(NGX_LOG_ERR, log(), "{}", f);
            // SAFETY: r is live and has not sent a header.
            unsafe { response::finish_with_error(r, f.http_status(), &f.to_string()) };
            NGX_DONE as ngx_int_t
        }
        // The post handler let nginx terminate the request; never reached.
        PrefillOutcome::ClientGone => NGX_ERROR as ngx_int_t,
    }
}

unsafe extern "C" fn ngx_http_prefill_body_handler(r: *mut ngx_http_request_t) {
    guard::catch("prefill body handler", (), || {
        // SAFETY: nginx calls the body handler with the live main request.
        unsafe { on_body(r) }
    })
}

/// The client body is in: validate it and start the prefill, or arrange a
/// rejection. Either way the phases resume on the next wake-up.
unsafe fn on_body(r: *mut ngx_http_request_t) {
    // SAFETY: r is the live main request; ctx and conf are this module's.
    unsafe {
        let Some(ctx) = ctx_of(r) else { return };
        (*r).set_preserve_body(1);
        (*r).write_event_handler = Some(ngx_http_core_run_phases);
        let log = (*(*r).connection).log;
        // The encoder stage (encode.rs) when configured, then the prefill.
        match encode::start(r, ctx) {
            Ok(state) => {
                if matches!(state, State::Encoding(_)) {
                    ctx.m.encode_sent();
                }
                let pass = matches!(state, State::Passed);
                ctx.state = state;
                if pass {
                    ngx_http_core_run_phases(r);
                }
            }
            Err((status, message)) => {
                ngx_log_error!(NGX_LOG_ERR, log, "{}", message);
                ctx.state = State::Reject { status, message };
                ngx_http_core_run_phases(r);
            }
        }
    }
}

/// Builds the prefill body and sends the subrequest.
///
/// # Safety
/// `r` must be the live main request owning `ctx`, its body read.
unsafe fn start_prefill(r: *mut ngx_http_request_t, ctx: &mut Ctx) -> Result<(), (u16, String)> {
    // SAFETY: r is live; the body slice lives in the request pool, which
    // also owns ctx, so the 'static lifetimes never outlive their memory.
    unsafe {
        let lcf = Module::location_conf(&*r).ok_or((500, "no prefill configuration".to_owned()))?;
        let Some(Some(prefix)) = &lcf.prefix else {
            return Err((500, "no prefill configuration".to_owned()));
        };
        // The encoder stage may have parsed the body already.
        let (src, obj): (&'static [u8], _) = match ctx.obj.take() {
            Some(obj) => (ctx.body, obj),
            None => {
                let src = body::bytes(r)
                    .map_err(|e| (500, format!("cannot read the request body: {e:?}")))?;
                let obj = Object::parse(src)
                    .map_err(|e| (400, format!("request body is not a JSON object: {e}")))?;
                (src, obj)
            }
        };
        if let Some(why) = pd_refusal(&obj) {
            return Err((400, why));
        }
        let uri = response::str_of(&(*r).uri);
        let opts = PrefillOptions {
            endpoint: Endpoint::from_uri(uri),
            kv_transfer_params: lcf.kv_params != 0,
        };
        let plan = prefill_plan(&obj, opts);
        let (chain, len) = body::chain_from_plan((*r).pool, src, &plan)
            .map_err(|_| (500, "out of memory building the prefill body".to_owned()))?;
        let mut target = Vec::with_capacity(prefix.len() + uri.len());
        target.extend_from_slice(prefix);
        target.extend_from_slice(uri);
        ctx.body = src;
        ctx.obj = Some(obj);
        ngx_log_debug!(
            mask: DebugMask::Http,
            (*(*r).connection).log,
            "prefill: subrequest \"{}\", body {} bytes (client body {} bytes)",
            String::from_utf8_lossy(&target),
            len,
            src.len()
        );
        let data = ctx as *mut Ctx as *mut c_void;
        subrequest::start(r, &target, chain, len, Some(ngx_http_prefill_done), data)
            .map_err(|_| (500, "cannot create the prefill subrequest".to_owned()))?;
        ctx.m.prefill_sent();
        Ok(())
    }
}

/// Post-subrequest handler: records the outcome and wakes the main request.
unsafe extern "C" fn ngx_http_prefill_done(
    sr: *mut ngx_http_request_t,
    data: *mut c_void,
    rc: ngx_int_t,
) -> ngx_int_t {
    guard::catch("prefill done handler", rc, || {
        // SAFETY: data is the main request's pool-owned Ctx (set in
        // start_prefill); sr is the live subrequest.
        unsafe { prefill_done(sr, &mut *(data as *mut Ctx), rc) }
    })
}

/// # Safety
/// `sr` must be the live prefill subrequest of the request owning `ctx`.
unsafe fn prefill_done(sr: *mut ngx_http_request_t, ctx: &mut Ctx, rc: ngx_int_t) -> ngx_int_t {
    // SAFETY: sr and its core location conf are live; `out` memory belongs
    // to the shared request pool.
    unsafe {
        if !matches!(ctx.state, State::Prefilling) {
            return rc;
        }
        let status = (*sr).headers_out.status as u64;
        let clcf = *(*sr).loc_conf.add((*addr_of!(ngx_http_core_module)).ctx_index)
            as *const pdgate_glue::ffi::ngx_http_core_loc_conf_t;
        let limit = if clcf.is_null() { 0 } else { (*clcf).subrequest_output_buffer_size };
        let cl = (*sr).headers_out.content_length_n;
        // An answer that does not fit makes the postpone filter fail, and
        // ngx_http_output_filter then flags the (client) connection as
        // broken, although the in-memory subrequest never wrote to it.
        let c = (*sr).connection;
        let buffer_full = (*c).error() != 0 && status != 0 && (cl < 0 || cl as u64 > limit as u64);
        let outcome = classify_prefill(rc as i64, status, buffer_full);
        if outcome == PrefillOutcome::Fail(PrefillFailure::BufferTooSmall) {
            (*c).set_error(0);
        }
        ngx_log_debug!(
            mask: DebugMask::Http,
            (*c).log,
            "prefill: subrequest done, rc: {}, status: {}, content length: {}, outcome: {:?}",
            rc,
            status,
            cl,
            outcome
        );
        ctx.m.prefill_done(sr, outcome == PrefillOutcome::Decode);
        if outcome == PrefillOutcome::ClientGone {
            ctx.state = State::Passed;
            return rc;
        }
        let answer: &'static [u8] = body::chain_bytes((*sr).pool, (*sr).out).unwrap_or(&[]);
        let ct = (*sr).headers_out.content_type;
        let content_type: &'static [u8] = if ct.len == 0 || ct.data.is_null() {
            &[]
        } else {
            std::slice::from_raw_parts(ct.data, ct.len)
        };
        ctx.state = State::PrefillDone { outcome, answer, content_type };
        // Keep nginx from turning a failed subrequest into an error page or
        // terminating the main request: the main request answers instead.
        NGX_OK as ngx_int_t
    }
}
