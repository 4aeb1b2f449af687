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
                held: Held::No,
                retry_after: None,
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
                if let Some(s) = ctx.retry_after {
                    let _ = headers::push_out(r, "Retry-After", s.to_string().as_bytes());
                }
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
            Ok(src) if !tokenize::<P>(r, ctx, src) => Event::Refused { status: 400 },
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
                        match admit::<P>(r, ctx, p.media) {
                            Some(Ok(media)) => ctx.go(r, media),
                            // Held: the poll timer resumes it.
                            None => return,
                            Some(Err(e)) => {
                                ctx.resume_error(e.status, e.message);
                                Event::Refused { status: e.status }
                            }
                        }
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

/// With `pd_tokenizer`: the prompt's tokens and block keys, into the
/// record (`$pd_input_tokens`, `$pd_tokenized`); false (and the 400 set)
/// when the model cannot take the body.
///
/// # Safety
/// `r` must be the live main request owning ctx.
unsafe fn tokenize<P: Protocol>(r: *mut ngx_http_request_t, ctx: &mut Ctx<P>, src: &[u8]) -> bool {
    // SAFETY: as the caller's; the variable's bytes live in the pool.
    unsafe {
        let Some(t) = P::tokenizer(view(r)) else { return true };
        match t.keys(src) {
            Ok(None) => true,
            Ok(Some(tk)) => {
                ctx.m.input_tokens = Some(tk.head.tokens);
                ctx.m.tokenized = observe::pool_bytes(r, &tk.encode()).unwrap_or(&[]);
                true
            }
            Err(e) => {
                let message = format!("the prompt cannot be tokenized: {e}");
                ngx_log_error!(NGX_LOG_WARN, (*(*r).connection).log, "{}: {}", P::NAME, message);
                ctx.resume_error(400, message);
                false
            }
        }
    }
}

// --- holding (pd_hold) ----------------------------------------------------------------

/// Admits the request to its location's `pd_hold` gate: `Some(Ok(media))`
/// to go on now (also without `pd_hold`), `None` when it waits (the poll
/// timer resumes it, [`resume_held`]), `Some(Err)` when the queue is full.
///
/// # Safety
/// `r` must be the live main request owning ctx.
unsafe fn admit<P: Protocol>(
    r: *mut ngx_http_request_t,
    ctx: &mut Ctx<P>,
    media: Vec<MediaItem>,
) -> Option<Result<Vec<MediaItem>, Refusal>> {
    // SAFETY: as the caller's.
    unsafe {
        let Some(hold) = P::hold(view(r)) else { return Some(Ok(media)) };
        let Some(gate) = crate::hold::gate(hold) else {
            // Once per worker: every request of these pools would say it.
            static TOLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !TOLD.swap(true, std::sync::atomic::Ordering::Relaxed) {
                ngx_log_error!(
                    NGX_LOG_ALERT,
                    (*(*r).connection).log,
                    "{}: pd_hold: every gate of zone \"pdgate_hold\" is taken (16 pairs of pools), requests to \"{}\" are not held",
                    P::NAME,
                    String::from_utf8_lossy(&hold.conf.prefill_upstream)
                );
            }
            return Some(Ok(media));
        };
        let log = (*(*r).connection).log;
        let tokens = ctx.m.request_tokens(ctx.src.len());
        match crate::hold::admit(hold, gate, tokens) {
            Admission::Now => {
                ctx.held = Held::Admitted { hold, gate, room: Room { prefill: 1, decode: 1 } };
                ctx.m.s.held_ms = Some(0);
                Some(Ok(media))
            }
            Admission::Queued(seq) => {
                ngx_log_debug!(mask: DebugMask::Http, log, "{}: pd_hold: held, ticket {}", P::NAME, seq);
                let since = observe::now_ms();
                ctx.held = Held::Queued { hold, gate, seq, since, media };
                crate::hold::wait(r, hold, gate, seq, resume_held::<P>);
                // The client may leave while it waits: nginx finalizes the
                // request then, and its context's drop gives the ticket up.
                (*r).read_event_handler = Some(ngx::ffi::ngx_http_test_reading);
                None
            }
            Admission::Full => {
                ngx_log_error!(
                    NGX_LOG_WARN,
                    log,
                    "{}: pd_hold: the queue of \"{}\" is full ({} requests), answering {}",
                    P::NAME,
                    String::from_utf8_lossy(&gate.name()),
                    hold.conf.queue,
                    hold.conf.status
                );
                ctx.retry_after = Some(hold.conf.retry_after_s);
                Some(Err(Refusal::new(
                    hold.conf.status,
                    "the proxy's queue for the engines is full, retry later",
                )))
            }
        }
    }
}

/// The poll timer's resume of a held request.
///
/// # Safety
/// `r` must be the live main request the ticket was taken for.
unsafe fn resume_held<P: Protocol>(r: *mut ngx_http_request_t, wake: crate::hold::Wake) {
    guard::catch("pd_hold resume", (), || {
        // SAFETY: as documented; ctx is the request's pool-owned context.
        unsafe {
            let Some(ctx) = ctx_of::<P>(r) else { return };
            let Held::Queued { hold, gate, since, media, seq } =
                std::mem::replace(&mut ctx.held, Held::No)
            else {
                return;
            };
            (*r).read_event_handler = Some(ngx::ffi::ngx_http_block_reading);
            let waited = observe::now_ms().saturating_sub(since);
            ctx.m.s.held_ms = Some(waited);
            let event = match wake {
                crate::hold::Wake::Released => {
                    gate.woke(seq, observe::now_ms());
                    ctx.held = Held::Admitted { hold, gate, room: Room { prefill: 1, decode: 1 } };
                    ctx.go(r, media)
                }
                crate::hold::Wake::TimedOut => {
                    let message = format!(
                        "no engine could take the request within {} ms, retry later",
                        hold.conf.timeout_ms
                    );
                    ngx_log_error!(
                        NGX_LOG_WARN,
                        (*(*r).connection).log,
                        "{}: pd_hold: {} (held in \"{}\")",
                        P::NAME,
                        message,
                        String::from_utf8_lossy(&gate.name())
                    );
                    ctx.retry_after = Some(hold.conf.retry_after_s);
                    ctx.resume_error(hold.conf.status, message);
                    Event::Refused { status: hold.conf.status }
                }
            };
            let step = ctx.flow.on(event);
            ctx.execute(r, step, Wake::RunPhases);
        }
    })
}

impl<P: Protocol> Ctx<P> {
    /// The request may go on: starts its encoders (when it has media
    /// items) and says what the flow is told.
    ///
    /// # Safety
    /// `r` must be the live main request owning self.
    unsafe fn go(&mut self, r: *mut ngx_http_request_t, media: Vec<MediaItem>) -> Event {
        // SAFETY: as documented.
        unsafe {
            if !media.is_empty() {
                // The encoder bodies, while the items are at hand.
                if let Err(e) = self.start_encoders(r, &media) {
                    self.resume_error(e.status, e.message);
                    return Event::Refused { status: e.status };
                }
            }
            Event::BodyReady { media: media.len() }
        }
    }
}
