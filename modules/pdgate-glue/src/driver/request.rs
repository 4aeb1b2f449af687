//! The main request's precontent phase and its body handler: where a
//! P/D request starts and where it comes back to act on the flow.

use super::*;

// --- the precontent phase -------------------------------------------------------

pub(super) unsafe extern "C" fn handler<P: Protocol>(r: *mut ngx_http_request_t) -> ngx_int_t {
    guard::catch("pd handler", NGX_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls phase handlers with a live request.
        unsafe { precontent::<P>(r) }
    })
}

/// The precontent phase: entered once at the start, and again each time
/// the flow wakes the main request.
pub(super) unsafe fn precontent<P: Protocol>(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: r is live (caller); the ctx is this driver's.
    unsafe {
        if r != (*r).main {
            // A prefill leg cancelled before it started ends here, quietly.
            if let Some(ctx) = ctx_of::<P>((*r).main) {
                if ctx.prefill_sr == r && ctx.flow.is_done() {
                    return NGX_HTTP_SERVICE_UNAVAILABLE as ngx_int_t;
                }
            }
            return NGX_DECLINED as ngx_int_t;
        }
        let Some(ctx) = ctx_of::<P>(r) else {
            let Some(spec) = P::spec(view(r)) else { return NGX_DECLINED as ngx_int_t };
            let ctx = Ctx::<P> {
                flow: Flow::new(spec),
                resume: Resume::Wait,
                st: P::State::default(),
                m: Record::start(),
                main: r,
                src: &[],
                obj: None,
                encode_uri: Vec::new(),
                encoders: Vec::new(),
                prefill: None,
                decode: None,
                prefill_sr: null_mut(),
                answer: &[],
                content_type: &[],
                pending: None,
                grace: null_mut(),
                cached: None,
                _p: PhantomData,
            };
            let Some(ctx) = pool::alloc_value((*r).pool, ctx) else {
                return NGX_ERROR as ngx_int_t;
            };
            *(*r).ctx.add(P::module().ctx_index) = ctx as *mut c_void;
            let rc = ngx_http_read_client_request_body(r, Some(body_handler::<P>));
            if rc >= NGX_HTTP_SPECIAL_RESPONSE as ngx_int_t {
                return rc;
            }
            ngx_http_finalize_request(r, NGX_DONE as ngx_int_t);
            return NGX_DONE as ngx_int_t;
        };
        match std::mem::replace(&mut ctx.resume, Resume::Wait) {
            Resume::Wait => match ctx.pending.take() {
                Some(step) => ctx.execute(r, step, Wake::Return),
                None => NGX_DONE as ngx_int_t,
            },
            Resume::Proceed => {
                ctx.resume = Resume::Proceed;
                NGX_DECLINED as ngx_int_t
            }
            Resume::Error { status, message } => {
                response::finish_with_error(r, status, &message);
                NGX_DONE as ngx_int_t
            }
            Resume::PrefillAnswer { status } => {
                let ct: &[u8] = if ctx.content_type.is_empty() {
                    b"application/json"
                } else {
                    ctx.content_type
                };
                let rc = response::send(r, status, ct, ctx.answer);
                ngx_http_finalize_request(r, rc);
                NGX_DONE as ngx_int_t
            }
        }
    }
}

pub(super) unsafe extern "C" fn body_handler<P: Protocol>(r: *mut ngx_http_request_t) {
    guard::catch("pd body handler", (), || {
        // SAFETY: nginx calls the body handler with the live main request.
        unsafe { on_body::<P>(r) }
    })
}

/// The client body is in: prepare the legs and feed the flow.
pub(super) unsafe fn on_body<P: Protocol>(r: *mut ngx_http_request_t) {
    // SAFETY: r is the live main request; every allocation lives in its
    // pool, as does ctx.
    unsafe {
        let Some(ctx) = ctx_of::<P>(r) else { return };
        (*r).set_preserve_body(1);
        (*r).write_event_handler = Some(ngx_http_core_run_phases);
        let event = match body::bytes(r) {
            Err(e) => {
                ctx.resume_error(500, format!("cannot read the request body: {e:?}"));
                Event::Refused { status: 500 }
            }
            Ok(src) => {
                ctx.src = src;
                let bodies = Bodies { pool: (*r).pool, src };
                match P::prepare(view(r), &bodies, &mut ctx.st) {
                    Ok(p) if leg::decode_capacity(r) == Some(false) => {
                        // Never spend a prefill (and strand its KV) on a
                        // request whose decode cannot be placed.
                        ctx.flow.hold(p.hold);
                        let message = "no decode server can take the request now".to_owned();
                        ngx_log_error!(
                            NGX_LOG_ERR,
                            (*(*r).connection).log,
                            "{}: {}",
                            P::NAME,
                            message
                        );
                        ctx.resume_error(503, message);
                        Event::Refused { status: 503 }
                    }
                    Ok(p) => {
                        ctx.flow.hold(p.hold);
                        ctx.obj = p.obj;
                        ctx.encode_uri = p.encode_uri;
                        ctx.prefill = p.prefill;
                        ctx.decode = p.decode;
                        ctx.encoders = p
                            .media
                            .iter()
                            .map(|m| Encoder { kind: m.kind, sr: null_mut() })
                            .collect();
                        if !p.media.is_empty() {
                            // The encoder bodies, while the items are at hand.
                            if let Err(e) = ctx.start_encoders(r, &p.media) {
                                ctx.resume_error(e.status, e.message);
                                let step = ctx.flow.on(Event::Refused { status: e.status });
                                ctx.execute(r, step, Wake::RunPhases);
                                return;
                            }
                        }
                        Event::BodyReady { media: p.media.len() }
                    }
                    Err(e) => {
                        let level = if e.status >= 500 { NGX_LOG_ERR } else { NGX_LOG_WARN };
                        ngx_log_error!(level, (*(*r).connection).log, "{}: {}", P::NAME, e.message);
                        ctx.resume_error(e.status, e.message);
                        Event::Refused { status: e.status }
                    }
                }
            }
        };
        let step = ctx.flow.on(event);
        ctx.execute(r, step, Wake::RunPhases);
    }
}
