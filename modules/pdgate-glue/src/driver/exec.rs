//! Executing the flow's steps: starting legs, cancelling them, waking
//! the main request, answering it.

use super::*;

/// How to get the main request to act on a new `resume`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Wake {
    /// We are in its body handler: run its phases now.
    RunPhases,
    /// We are in its phase handler: return what it should.
    Return,
    /// We are in a waited subrequest's post handler: nginx wakes it.
    Nginx,
    /// We are in a background subrequest's post handler: post it.
    Post,
}

impl<P: Protocol> Ctx<P> {
    pub(super) fn resume_error(&mut self, status: u16, message: String) {
        self.resume = Resume::Error { status, message };
    }

    /// Starts the encoder subrequests (the flow says when: they are created
    /// here, in the body handler, while the items are at hand, and the flow
    /// is told right after). Items already started when one fails run on
    /// and are ignored.
    ///
    /// # Safety
    /// `r` must be the live main request owning self.
    pub(super) unsafe fn start_encoders(
        &mut self,
        r: *mut ngx_http_request_t,
        media: &[MediaItem],
    ) -> Result<(), Refusal> {
        // SAFETY: as the caller's; the slots live in the request pool.
        unsafe {
            let me = self as *mut Ctx<P>;
            let Some(obj) = self.obj.as_ref() else {
                return Err(Refusal::new(500, "encoder stage without a parsed body"));
            };
            let id: Option<Vec<u8>> = headers::find_in(r, b"x-request-id").map(<[u8]>::to_vec);
            let bodies = Bodies { pool: (*r).pool, src: self.src };
            let oom = || Refusal::new(500, "cannot create the encoder subrequests");
            for (k, item) in media.iter().enumerate() {
                let b = bodies.build(&encode::encode_plan(obj, item))?;
                let slot = pool::alloc_value((*r).pool, EncoderSlot::<P> { ctx: me, index: k })
                    .ok_or_else(oom)?;
                let sr = subrequest::start(
                    r,
                    &self.encode_uri,
                    b.chain,
                    b.len,
                    subrequest::Mode::Fanout,
                    Some(encoder_done::<P>),
                    slot as *mut c_void,
                )
                .map_err(|_| oom())?;
                if let Some(e) = self.encoders.get_mut(k) {
                    e.sr = sr;
                }
                if let Some(id) = &id {
                    fanout::own_header_in(
                        sr,
                        "X-Request-Id",
                        "x-request-id",
                        &encode::item_request_id(id, k),
                    )
                    .map_err(|_| oom())?;
                }
                ngx_log_debug!(
                    mask: DebugMask::Http,
                    (*(*r).connection).log,
                    "{}: encoder subrequest \"{}\" for item {} ({}), body {} bytes",
                    P::NAME,
                    String::from_utf8_lossy(&self.encode_uri),
                    k,
                    item.kind,
                    b.len
                );
            }
            fanout::watch_client(r);
            self.m.s.encode_sent = Some(observe::now_ms());
            Ok(())
        }
    }

    /// Executes one step of the flow. Returns what a phase handler returns
    /// (for [`Wake::Return`]); the post handlers' own return is theirs.
    ///
    /// # Safety
    /// `r` must be the live main request owning self.
    pub(super) unsafe fn execute(
        &mut self,
        r: *mut ngx_http_request_t,
        step: Step,
        wake: Wake,
    ) -> ngx_int_t {
        // SAFETY: r is live (caller); legs are this request's subrequests.
        unsafe {
            let log = (*(*r).connection).log;
            P::release(&mut self.st, step.release);
            if step.cancel.contains(Legs::ENCODERS) {
                fanout::unwatch_client(r);
                let mut stopped = 0;
                for e in &self.encoders {
                    if !e.sr.is_null() && fanout::abort(e.sr) {
                        stopped += 1;
                    }
                }
                ngx_log_debug!(mask: DebugMask::Http, log, "{}: {} encoder requests stopped", P::NAME, stopped);
            }
            if step.cancel.contains(Legs::PREFILL)
                && !self.prefill_sr.is_null()
                && leg::upstream_state(self.prefill_sr).is_some()
            {
                // Drops the subrequest's reference; its post handler does
                // not run (nginx finalizes it with NGX_DONE).
                leg::cancel_upstream(self.prefill_sr);
            }
            if step.cancel.contains(Legs::DECODE) {
                if let Next::Fail(f) = &step.next {
                    // The decode runs beside a prefill that failed: close
                    // it and answer with the prefill's error, at once.
                    let message = self.failure_message(f);
                    let why = match f {
                        Failure::PrefillStatus(s) => format!("prefill answered {s}"),
                        _ => message.clone(),
                    };
                    ngx_log_error!(NGX_LOG_ERR, log, "{}: {}, cancelling the decode", P::NAME, why);
                    return match leg::upstream_state(r) {
                        Some(false) => {
                            // Hold a reference for our own answer, as the
                            // cancelled upstream drops one.
                            (*r).set_count((*r).count() + 1);
                            leg::cancel_upstream(r);
                            response::finish_with_error(r, f.http_status(), &message);
                            NGX_OK as ngx_int_t
                        }
                        // Streaming already: nothing clean can be said.
                        Some(true) => NGX_ERROR as ngx_int_t,
                        None => NGX_OK as ngx_int_t,
                    };
                }
            }
            // Whether the main request has something new to act on.
            let acts = matches!(
                step.next,
                Next::Decode
                    | Next::DecodeAlone
                    | Next::StartTogether
                    | Next::PassThrough { .. }
                    | Next::Refuse { .. }
                    | Next::Fail(_)
            );
            let rc = match step.next {
                Next::Wait | Next::Ignore => NGX_DONE as ngx_int_t,
                Next::RetryPrefill => {
                    let bodies = Bodies { pool: (*r).pool, src: self.src };
                    let again = P::retry(view(r), &bodies, self.obj.as_ref(), &mut self.st);
                    if let Some(p) = &again {
                        self.flow.hold(p.hold);
                    }
                    let ready = again.is_some();
                    if let Some(p) = again {
                        self.prefill = p.prefill;
                        if p.decode.is_some() {
                            self.decode = p.decode;
                        }
                        ngx_log_error!(
                            NGX_LOG_WARN,
                            log,
                            "{}: prefill gave no answer, trying another prefill server",
                            P::NAME
                        );
                    }
                    let next = self.flow.on(Event::Retry { ready });
                    return self.execute(r, next, wake);
                }
                Next::StartEncoders => NGX_DONE as ngx_int_t,
                Next::StartPrefill => match self.start_prefill(r, subrequest::Mode::Waited) {
                    Ok(()) => NGX_DONE as ngx_int_t,
                    Err(e) => return self.start_failed(r, e, wake),
                },
                Next::StartTogether => {
                    if let Err(e) = self.start_prefill(r, subrequest::Mode::Background) {
                        return self.start_failed(r, e, wake);
                    }
                    self.proceed(r)
                }
                Next::Decode => {
                    if !self.answer.is_empty() {
                        self.cached = prefill_cached_tokens(self.answer).map(CachedTokens::new);
                    }
                    if self.decode.is_none() && self.prefill.is_some() {
                        let built = match self.obj.as_ref() {
                            Some(obj) => {
                                let bodies = Bodies { pool: (*r).pool, src: self.src };
                                P::decode_after_prefill(
                                    view(r),
                                    &bodies,
                                    obj,
                                    self.answer,
                                    &mut self.m,
                                )
                            }
                            None => Err(Refusal::new(500, "prefill state lost")),
                        };
                        match built {
                            Ok(b) => self.decode = Some(b),
                            Err(e) => return self.start_failed(r, e, wake),
                        }
                    }
                    self.proceed(r)
                }
                Next::DecodeAlone => {
                    let built = self.obj.as_ref().and_then(|obj| {
                        let bodies = Bodies { pool: (*r).pool, src: self.src };
                        P::decode_alone(view(r), &bodies, obj)
                    });
                    match built {
                        Some(Ok(b)) => {
                            ngx_log_error!(
                                NGX_LOG_WARN,
                                log,
                                "{}: the prefill failed (status {}), prefill_fallback: the decode runs alone and computes the prompt",
                                P::NAME,
                                self.m.s.prefill_status
                            );
                            self.m.fell_back();
                            self.decode = Some(b);
                        }
                        Some(Err(e)) => return self.start_failed(r, e, wake),
                        None => {
                            let e = Refusal::new(
                                502,
                                "the prefill failed and this flow cannot decode alone",
                            );
                            return self.start_failed(r, e, wake);
                        }
                    }
                    self.proceed(r)
                }
                Next::PassThrough { status } => {
                    ngx_log_error!(
                        NGX_LOG_WARN,
                        log,
                        "{}: prefill answered {}, passing its answer to the client",
                        P::NAME,
                        status
                    );
                    self.resume = Resume::PrefillAnswer { status };
                    NGX_DONE as ngx_int_t
                }
                Next::Refuse { .. } => NGX_DONE as ngx_int_t,
                Next::Fail(f) => {
                    let message = self.failure_message(&f);
                    ngx_log_error!(NGX_LOG_ERR, log, "{}: {}", P::NAME, message);
                    self.resume_error(f.http_status(), message);
                    NGX_DONE as ngx_int_t
                }
                Next::Terminate => return NGX_ERROR as ngx_int_t,
                Next::Linger => {
                    if timer::arm(r, &mut self.grace, PREFILL_GRACE_MS, Some(grace_expired::<P>))
                        .is_err()
                    {
                        // Without the timer the prefill's own timeout ends it.
                        ngx_log_error!(
                            NGX_LOG_WARN,
                            log,
                            "{}: cannot arm the prefill grace timer",
                            P::NAME
                        );
                    }
                    NGX_DONE as ngx_int_t
                }
            };
            self.wake(r, wake, rc, acts)
        }
    }

    /// Makes the main request act on `resume` as `wake` says.
    ///
    /// # Safety
    /// `r` must be the live main request owning self.
    pub(super) unsafe fn wake(
        &mut self,
        r: *mut ngx_http_request_t,
        wake: Wake,
        rc: ngx_int_t,
        acts: bool,
    ) -> ngx_int_t {
        // SAFETY: r is live (caller).
        unsafe {
            match wake {
                Wake::Return => {
                    if let Resume::Error { .. } | Resume::PrefillAnswer { .. } = self.resume {
                        return precontent::<P>(r);
                    }
                    rc
                }
                Wake::RunPhases => {
                    if acts {
                        ngx_http_core_run_phases(r);
                    }
                    rc
                }
                Wake::Nginx => rc,
                Wake::Post => {
                    if acts && fanout::wake(r).is_err() {
                        ngx_log_error!(
                            NGX_LOG_ALERT,
                            (*(*r).connection).log,
                            "{}: cannot wake the request",
                            P::NAME
                        );
                    }
                    rc
                }
            }
        }
    }

    /// Installs the decode body (if any) and lets the request go on.
    ///
    /// # Safety
    /// `r` must be the live main request owning self.
    pub(super) unsafe fn proceed(&mut self, r: *mut ngx_http_request_t) -> ngx_int_t {
        // SAFETY: r is live and its body was read (request_body exists).
        unsafe {
            if let Some(b) = self.decode {
                let rb = (*r).request_body;
                if rb.is_null() {
                    self.resume_error(500, "no request body".into());
                    return NGX_DONE as ngx_int_t;
                }
                (*rb).bufs = b.chain;
                (*r).headers_in.content_length_n = b.len as i64;
                ngx_log_debug!(
                    mask: DebugMask::Http,
                    (*(*r).connection).log,
                    "{}: decode body {} bytes",
                    P::NAME,
                    b.len
                );
            }
            self.m.decode_sent();
            self.resume = Resume::Proceed;
            NGX_DECLINED as ngx_int_t
        }
    }

    /// A leg could not be started: tell the flow, answer the client.
    ///
    /// # Safety
    /// `r` must be the live main request owning self.
    pub(super) unsafe fn start_failed(
        &mut self,
        r: *mut ngx_http_request_t,
        e: Refusal,
        wake: Wake,
    ) -> ngx_int_t {
        // SAFETY: forwarded.
        unsafe {
            ngx_log_error!(NGX_LOG_ERR, (*(*r).connection).log, "{}: {}", P::NAME, e.message);
            let step = self.flow.on(Event::StartFailed);
            P::release(&mut self.st, step.release);
            if step.next == Next::Terminate {
                return NGX_ERROR as ngx_int_t;
            }
            self.resume_error(e.status, e.message);
            self.wake(r, wake, NGX_DONE as ngx_int_t, true)
        }
    }

    /// Starts the prefill subrequest.
    ///
    /// # Safety
    /// `r` must be the live main request owning self.
    pub(super) unsafe fn start_prefill(
        &mut self,
        r: *mut ngx_http_request_t,
        mode: subrequest::Mode,
    ) -> Result<(), Refusal> {
        // SAFETY: the chain and self live in the request pool.
        unsafe {
            let data = self as *mut Ctx<P> as *mut c_void;
            let Some((uri, b)) = self.prefill.as_ref() else {
                return Err(Refusal::new(500, "no prefill leg prepared"));
            };
            ngx_log_debug!(
                mask: DebugMask::Http,
                (*(*r).connection).log,
                "{}: prefill subrequest \"{}\", body {} bytes (client body {} bytes)",
                P::NAME,
                String::from_utf8_lossy(uri),
                b.len,
                self.src.len()
            );
            let sr = subrequest::start(r, uri, b.chain, b.len, mode, Some(prefill_done::<P>), data)
                .map_err(|_| Refusal::new(500, "cannot create the prefill subrequest"))?;
            self.prefill_sr = sr;
            self.m.s.prefill_sent = Some(observe::now_ms());
            Ok(())
        }
    }

    pub(super) fn failure_message(&self, f: &Failure) -> String {
        match f {
            Failure::Encoder { index, failure } => {
                let kind = self.encoders.get(*index).map_or("media", |e| e.kind);
                encode::failure_message(*index, kind, failure)
            }
            Failure::Prefill(p) => p.to_string(),
            Failure::PrefillStatus(s) => format!("prefill server answered {s}"),
            Failure::Internal => "internal error".to_owned(),
        }
    }
}
