//! The encoder stage of E/P/D disaggregation (`prefill_encode`).
//!
//! Runs in the prefill module's flow right after the client body is read:
//! when the location has `prefill_encode <prefix>` and the chat request's
//! messages hold media parts, one encoder request per item (the item alone
//! in a user message, one token, no stream; pdgate-core's `encode`) goes to
//! `<prefix><uri>`, an internal location proxying to the encoder pool. All
//! of them run at once as background in-memory subrequests, each with its
//! own body and `X-Request-Id: <id>-enc<k>`. The first failure, or the last
//! success, wakes the main request: a failure answers 502 naming the item
//! (no prefill or decode is sent; encoder requests still running finish on
//! their own and are ignored), success goes on to the prefill leg, or with
//! `prefill off` straight to the location's `proxy_pass` (a combined P/D
//! engine). A request without media skips the stage.
//!
//! Nothing of an encoder's answer is used: the engines share the encoded
//! item through their encoder cache, keyed by a hash of the item (vLLM's
//! EPD proxy behaves the same).

use std::ffi::{c_char, c_void};
use std::ptr::null_mut;

use pdgate_glue::core::encode::{
    classify, encode_plan, failure_message, item_request_id, media_items, too_many_message,
    Decision, EncodeFailure, EncodeOutcome, FanOut, DEFAULT_MAX_ITEMS, MAX_MAX_ITEMS,
};
use pdgate_glue::core::json::Object;
use pdgate_glue::ffi::{
    ngx_command_t, ngx_conf_t, ngx_http_request_t, ngx_int_t, ngx_uint_t, NGX_CONF_TAKE1,
    NGX_DECLINED, NGX_DONE, NGX_ERROR, NGX_HTTP_LOC_CONF_OFFSET, NGX_LOG_ALERT, NGX_LOG_ERR,
    NGX_OK,
};
use pdgate_glue::ngx::http::HttpModuleLocationConf;
use pdgate_glue::ngx::log::DebugMask;
use pdgate_glue::ngx::{ngx_log_debug, ngx_log_error, ngx_string};
use pdgate_glue::{body, conf, fanout, guard, headers, pool, response};

use crate::{start_prefill, Ctx, LocConf, Module, State, ANY_LEVEL};

/// The stage's part of the location configuration.
#[derive(Debug, Default)]
pub struct Conf {
    /// `prefill_encode <prefix> | off`: `None` when not set at this level.
    prefix: Option<Option<Vec<u8>>>,
    /// `prefill_encode_max_items <n>`: `None` when not set at this level.
    max_items: Option<usize>,
}

impl Conf {
    /// Inherits what this level does not set.
    pub fn merge(&mut self, prev: &Conf) {
        if self.prefix.is_none() {
            self.prefix = prev.prefix.clone();
        }
        if self.max_items.is_none() {
            self.max_items = prev.max_items;
        }
    }

    /// The encoder location's URI prefix, when the stage is on.
    pub fn prefix(&self) -> Option<&[u8]> {
        self.prefix.as_ref().and_then(|p| p.as_deref())
    }

    fn max_items(&self) -> usize {
        self.max_items.unwrap_or(DEFAULT_MAX_ITEMS)
    }
}

/// `prefill_encode <uri-prefix> | off;`
pub const CMD_PREFILL_ENCODE: ngx_command_t = ngx_command_t {
    name: ngx_string!("prefill_encode"),
    type_: (ANY_LEVEL | NGX_CONF_TAKE1) as ngx_uint_t,
    set: Some(cmd_prefill_encode),
    conf: NGX_HTTP_LOC_CONF_OFFSET as ngx_uint_t,
    offset: 0,
    post: null_mut(),
};

/// `prefill_encode_max_items <number>;`
pub const CMD_PREFILL_ENCODE_MAX_ITEMS: ngx_command_t = ngx_command_t {
    name: ngx_string!("prefill_encode_max_items"),
    type_: (ANY_LEVEL | NGX_CONF_TAKE1) as ngx_uint_t,
    set: Some(cmd_prefill_encode_max_items),
    conf: NGX_HTTP_LOC_CONF_OFFSET as ngx_uint_t,
    offset: 0,
    post: null_mut(),
};

unsafe extern "C" fn cmd_prefill_encode(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    lcf: *mut c_void,
) -> *mut c_char {
    guard::catch("prefill_encode directive", pdgate_glue::ngx::core::NGX_CONF_ERROR, || {
        // SAFETY: nginx passes this module's location conf and the parsed
        // args; NGX_CONF_TAKE1 guarantees args[1].
        unsafe {
            let enc = &mut (*(lcf as *mut LocConf)).encode;
            if enc.prefix.is_some() {
                return conf::error(cf, "is duplicate");
            }
            let args = conf::args(cf);
            let Some(arg) = args.get(1) else { return conf::error(cf, "needs an argument") };
            match pdgate_glue::core::conf::parse_prefix(conf::str_bytes(arg)) {
                Ok(p) => {
                    enc.prefix = Some(p);
                    conf::OK
                }
                Err(e) => conf::error(cf, &e.to_string()),
            }
        }
    })
}

unsafe extern "C" fn cmd_prefill_encode_max_items(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    lcf: *mut c_void,
) -> *mut c_char {
    guard::catch(
        "prefill_encode_max_items directive",
        pdgate_glue::ngx::core::NGX_CONF_ERROR,
        || {
            // SAFETY: as for cmd_prefill_encode.
            unsafe {
                let enc = &mut (*(lcf as *mut LocConf)).encode;
                if enc.max_items.is_some() {
                    return conf::error(cf, "is duplicate");
                }
                let args = conf::args(cf);
                let Some(arg) = args.get(1) else { return conf::error(cf, "needs an argument") };
                let raw = conf::str_bytes(arg);
                match std::str::from_utf8(raw).ok().and_then(|s| s.parse::<usize>().ok()) {
                    Some(n) if (1..=MAX_MAX_ITEMS).contains(&n) => {
                        enc.max_items = Some(n);
                        conf::OK
                    }
                    _ => conf::error(
                        cf,
                        &format!(
                            "invalid value \"{}\", it must be a number from 1 to {MAX_MAX_ITEMS}",
                            String::from_utf8_lossy(raw)
                        ),
                    ),
                }
            }
        },
    )
}

/// One running fan-out, owned by the main request's pool.
pub(crate) struct Stage {
    fan: FanOut,
    /// Each item's content-part type, for the error message.
    kinds: Vec<&'static str>,
    /// Each item's subrequest (null until started).
    requests: Vec<*mut ngx_http_request_t>,
    /// Set when the stage is decided; the main request acts on it.
    result: Option<Result<(), (usize, EncodeFailure)>>,
}

/// What an encoder subrequest's post handler gets: its stage and item.
struct Slot {
    stage: *mut Stage,
    index: usize,
}

/// The step after the client body is read: starts the encoder stage when
/// the request has media items, otherwise goes on to the prefill (or lets
/// the request pass to the location's `proxy_pass` when prefill is off).
/// Returns the main request's new state; `Err` is the client's error.
///
/// # Safety
/// `r` must be the live main request owning `ctx`, its body read.
pub(crate) unsafe fn start(
    r: *mut ngx_http_request_t,
    ctx: &mut Ctx,
) -> Result<State, (u16, String)> {
    // SAFETY: r is live (caller); body bytes, ctx and every allocation live
    // in the request pool, so the 'static lifetimes never outlive them.
    unsafe {
        let lcf = Module::location_conf(&*r).ok_or((500, "no prefill configuration".to_owned()))?;
        let Some(prefix) = lcf.encode.prefix() else { return next(r, ctx) };
        let src: &'static [u8] =
            body::bytes(r).map_err(|e| (500, format!("cannot read the request body: {e:?}")))?;
        let log = (*(*r).connection).log;
        let obj = match Object::parse(src) {
            Ok(obj) => obj,
            // The prefill leg rewrites the body, so it must be an object...
            Err(e) if prefill_on(r) => {
                return Err((400, format!("request body is not a JSON object: {e}")))
            }
            // ...but a combined P/D engine gets it as it is, and judges it.
            Err(e) => {
                ngx_log_debug!(mask: DebugMask::Http, log, "prefill: not JSON ({}), no encoder stage", e);
                return Ok(State::Passed);
            }
        };
        let items = media_items(&obj);
        if items.is_empty() {
            ctx.body = src;
            ctx.obj = Some(obj);
            ngx_log_debug!(mask: DebugMask::Http, log, "prefill: no media items, no encoder stage");
            return next(r, ctx);
        }
        if items.len() > lcf.encode.max_items() {
            return Err((400, too_many_message(items.len(), lcf.encode.max_items())));
        }
        let uri = response::str_of(&(*r).uri);
        let mut target = Vec::with_capacity(prefix.len() + uri.len());
        target.extend_from_slice(prefix);
        target.extend_from_slice(uri);
        let id: Option<Vec<u8>> = headers::find_in(r, b"x-request-id").map(<[u8]>::to_vec);
        let oom = || (500, "out of memory starting the encoder stage".to_owned());
        let stage = Stage {
            fan: FanOut::new(items.len()),
            kinds: items.iter().map(|it| it.kind).collect(),
            requests: vec![null_mut(); items.len()],
            result: None,
        };
        let stage = pool::alloc_value((*r).pool, stage).ok_or_else(oom)?;
        for (k, item) in items.iter().enumerate() {
            let started = (|| {
                let plan = encode_plan(&obj, item);
                let (chain, len) = body::chain_from_plan((*r).pool, src, &plan).ok()?;
                let slot = pool::alloc_value((*r).pool, Slot { stage, index: k })?;
                let sr = fanout::start_background(
                    r,
                    &target,
                    chain,
                    len,
                    Some(ngx_http_prefill_encode_done),
                    slot as *mut c_void,
                )
                .ok()?;
                let requests: &mut Vec<_> = &mut (*stage).requests;
                if let Some(r) = requests.get_mut(k) {
                    *r = sr;
                }
                if let Some(id) = &id {
                    fanout::own_header_in(
                        sr,
                        "X-Request-Id",
                        "x-request-id",
                        &item_request_id(id, k),
                    )
                    .ok()?;
                }
                ngx_log_debug!(
                    mask: DebugMask::Http,
                    log,
                    "prefill: encoder subrequest \"{}\" for item {} ({}), body {} bytes",
                    String::from_utf8_lossy(&target),
                    k,
                    item.kind,
                    len
                );
                Some(())
            })();
            if started.is_none() {
                // Items already started run on, but must not wake anyone.
                (*stage).fan.cancel();
                return Err((500, "cannot create the encoder subrequests".to_owned()));
            }
        }
        ctx.body = src;
        ctx.obj = Some(obj);
        fanout::watch_client(r);
        Ok(State::Encoding(stage))
    }
}

/// After the stage (or without one): the prefill, or straight on.
///
/// # Safety
/// As for [`start`].
unsafe fn next(r: *mut ngx_http_request_t, ctx: &mut Ctx) -> Result<State, (u16, String)> {
    // SAFETY: forwarded from the caller.
    unsafe {
        if prefill_on(r) {
            start_prefill(r, ctx).map(|()| State::Prefilling)
        } else {
            Ok(State::Passed)
        }
    }
}

/// True when the location runs a prefill leg (`prefill <prefix>`).
///
/// # Safety
/// `r` must be a live request.
unsafe fn prefill_on(r: *mut ngx_http_request_t) -> bool {
    // SAFETY: r is live; the conf is this module's.
    unsafe { Module::location_conf(&*r).is_some_and(|l| matches!(l.prefix, Some(Some(_)))) }
}

/// Re-entry of the main request while the stage runs: wait, fail with 502,
/// or go on. Returns the phase handler's result.
///
/// # Safety
/// `r` must be the live main request owning `ctx` and `stage`.
pub(crate) unsafe fn resume(
    r: *mut ngx_http_request_t,
    ctx: &mut Ctx,
    stage: *mut Stage,
) -> ngx_int_t {
    // SAFETY: stage is the pool-owned Stage this request created; r is live
    // and has sent nothing yet.
    unsafe {
        let log = (*(*r).connection).log;
        (*log).action = c"processing the encoder answers".as_ptr() as *mut c_char;
        let st = &mut *stage;
        match st.result.take() {
            None => {
                ctx.state = State::Encoding(stage);
                NGX_DONE as ngx_int_t
            }
            Some(Err((index, failure))) => {
                fanout::unwatch_client(r);
                let kind = st.kinds.get(index).copied().unwrap_or("media");
                let message = failure_message(index, kind, &failure);
                ngx_log_error!(NGX_LOG_ERR, log, "{}", message);
                // The other items are of no use now: stop their encoder
                // requests, so that neither the encoders nor the client's
                // connection wait for them.
                let pending: Vec<usize> = st.fan.unanswered().collect();
                let mut aborted = 0;
                for k in pending {
                    if let Some(&sr) = st.requests.get(k) {
                        if !sr.is_null() && fanout::abort(sr) {
                            aborted += 1;
                        }
                    }
                }
                ngx_log_debug!(
                    mask: DebugMask::Http,
                    log,
                    "prefill: {} encoder requests stopped",
                    aborted
                );
                response::finish_with_error(r, 502, &message);
                NGX_DONE as ngx_int_t
            }
            Some(Ok(())) => {
                fanout::unwatch_client(r);
                ngx_log_debug!(
                    mask: DebugMask::Http,
                    log,
                    "prefill: {} media items encoded",
                    st.kinds.len()
                );
                match next(r, ctx) {
                    Ok(State::Passed) => {
                        ctx.m.decode_sent();
                        NGX_DECLINED as ngx_int_t
                    }
                    Ok(s) => {
                        ctx.state = s;
                        NGX_DONE as ngx_int_t
                    }
                    Err((status, message)) => {
                        ngx_log_error!(NGX_LOG_ERR, log, "{}", message);
                        response::finish_with_error(r, status, &message);
                        NGX_DONE as ngx_int_t
                    }
                }
            }
        }
    }
}

/// Post-subrequest handler of an encoder request.
unsafe extern "C" fn ngx_http_prefill_encode_done(
    sr: *mut ngx_http_request_t,
    data: *mut c_void,
    rc: ngx_int_t,
) -> ngx_int_t {
    guard::catch("prefill encode done handler", rc, || {
        // SAFETY: data is the pool-owned Slot set in `start`; the pool lives
        // while any subrequest of the request runs; sr is live.
        unsafe { encode_done(sr, &*(data as *const Slot), rc) }
    })
}

/// # Safety
/// `sr` must be the live encoder subrequest `slot` was made for.
unsafe fn encode_done(sr: *mut ngx_http_request_t, slot: &Slot, rc: ngx_int_t) -> ngx_int_t {
    // SAFETY: sr, its connection and the stage are live; `out` memory
    // belongs to the shared request pool.
    unsafe {
        let stage = &mut *slot.stage;
        let status = (*sr).headers_out.status as u64;
        let cl = (*sr).headers_out.content_length_n;
        let limit = fanout::output_buffer_size(sr) as u64;
        let c = (*sr).connection;
        // An answer larger than subrequest_output_buffer_size makes the
        // postpone filter fail, and nginx then flags the client connection
        // as broken although the subrequest never wrote to it (as for the
        // prefill leg).
        let buffer_full = (*c).error() != 0 && status != 0 && (cl < 0 || cl as u64 > limit);
        let answer: &[u8] = body::chain_bytes((*sr).pool, (*sr).out).unwrap_or(&[]);
        let outcome = classify(rc as i64, status, buffer_full, answer);
        if buffer_full && outcome != EncodeOutcome::ClientGone {
            (*c).set_error(0);
        }
        let decision = stage.fan.record(slot.index, &outcome);
        ngx_log_debug!(
            mask: DebugMask::Http,
            (*c).log,
            "prefill: encoder subrequest for item {} done, rc: {}, status: {}, outcome: {:?}, {:?}",
            slot.index,
            rc,
            status,
            outcome,
            decision
        );
        let wake = match decision {
            Decision::Wait | Decision::Ignore => false,
            Decision::Proceed => {
                stage.result = Some(Ok(()));
                true
            }
            Decision::Fail { index, failure } => {
                stage.result = Some(Err((index, failure)));
                true
            }
        };
        if wake && fanout::wake((*sr).main).is_err() {
            ngx_log_error!(
                NGX_LOG_ALERT,
                (*c).log,
                "cannot wake the request after its encoder stage"
            );
            return NGX_ERROR as ngx_int_t;
        }
        if outcome == EncodeOutcome::ClientGone {
            return rc;
        }
        // Keep nginx from making an error page of a failed subrequest: the
        // main request answers.
        NGX_OK as ngx_int_t
    }
}
