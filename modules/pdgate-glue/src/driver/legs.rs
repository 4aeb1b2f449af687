//! The legs' callbacks: what a finished leg left, the prefill and
//! encoder post handlers, the decode's header and body filters, the
//! prefill grace timer.

use super::*;

// --- leg callbacks ----------------------------------------------------------------

/// What nginx reports of a finished in-memory leg.
pub(super) struct LegReport {
    rc: i64,
    status: u64,
    buffer_full: bool,
    complete: bool,
    answer: &'static [u8],
    content_type: &'static [u8],
}

/// Reads what a finished leg left: its status, whether its answer
/// overflowed the in-memory buffer or was cut off, and the answer.
///
/// # Safety
/// `sr` must be a live subrequest in its post handler.
pub(super) unsafe fn leg_report(sr: *mut ngx_http_request_t, rc: ngx_int_t) -> LegReport {
    // SAFETY: sr, its connection and upstream are live; `out` memory
    // belongs to the shared request pool.
    unsafe {
        let status = (*sr).headers_out.status as u64;
        let limit = fanout::output_buffer_size(sr) as u64;
        let cl = (*sr).headers_out.content_length_n;
        let c = (*sr).connection;
        // An answer that does not fit makes the postpone filter fail, and
        // ngx_http_output_filter then flags the (client) connection as
        // broken, although the in-memory subrequest never wrote to it.
        let buffer_full = (*c).error() != 0 && status != 0 && (cl < 0 || cl as u64 > limit);
        if buffer_full && rc != 499 && rc != 408 {
            (*c).set_error(0);
        }
        let answer: &'static [u8] = body::chain_bytes((*sr).pool, (*sr).out).unwrap_or(&[]);
        let ct = (*sr).headers_out.content_type;
        let content_type: &'static [u8] = if ct.len == 0 || ct.data.is_null() {
            &[]
        } else {
            std::slice::from_raw_parts(ct.data, ct.len)
        };
        // A header-only leg (a background prefill beside its decode) is
        // done with its header.
        let complete = (*sr).header_only() != 0
            || (leg::answer_complete(sr) && (cl < 0 || buffer_full || answer.len() as i64 >= cl));
        LegReport { rc: rc as i64, status, buffer_full, complete, answer, content_type }
    }
}

pub(super) unsafe extern "C" fn prefill_done<P: Protocol>(
    sr: *mut ngx_http_request_t,
    data: *mut c_void,
    rc: ngx_int_t,
) -> ngx_int_t {
    guard::catch("pd prefill done handler", rc, || {
        // SAFETY: data is the main request's pool-owned Ctx<P> (set in
        // start_prefill); sr is the live subrequest.
        unsafe { on_prefill_done::<P>(sr, &mut *(data as *mut Ctx<P>), rc) }
    })
}

/// # Safety
/// `sr` must be the live prefill subrequest of the request owning `ctx`.
pub(super) unsafe fn on_prefill_done<P: Protocol>(
    sr: *mut ngx_http_request_t,
    ctx: &mut Ctx<P>,
    rc: ngx_int_t,
) -> ngx_int_t {
    // SAFETY: as the caller's.
    unsafe {
        let rep = leg_report(sr, rc);
        let outcome = classify_prefill(rep.rc, rep.status, rep.buffer_full, rep.complete);
        ngx_log_debug!(
            mask: DebugMask::Http,
            (*(*sr).connection).log,
            "{}: prefill done, rc: {}, status: {}, complete: {}, outcome: {:?}",
            P::NAME,
            rc,
            rep.status,
            rep.complete,
            outcome
        );
        if !ctx.flow.is_done() {
            ctx.m.s.prefill_done = Some(observe::now_ms());
            ctx.m.s.prefill_ok = outcome == PrefillOutcome::Decode;
            ctx.m.s.prefill_status = observe::final_status(sr);
            ctx.m.prefill_addr = observe::upstream_addr(sr);
        }
        ctx.answer = rep.answer;
        ctx.content_type = rep.content_type;
        let gone = outcome == PrefillOutcome::ClientGone;
        if !gone {
            let answered = !matches!(outcome, PrefillOutcome::Fail(f) if f.is_retryable());
            P::prefill_ended(view(ctx.main), &mut ctx.st, answered);
        }
        let background = (*sr).background() != 0;
        let step = ctx.flow.on(Event::PrefillEnded(outcome));
        let main = ctx.main;
        if step.next != Next::RetryPrefill {
            ctx.prefill_room_back();
        }
        if step.next == Next::RetryPrefill {
            // The next try starts from the main request's phase handler,
            // which nginx runs when this (waited) subrequest is done.
            ctx.pending = Some(step);
            return NGX_OK as ngx_int_t;
        }
        let wake = if background { Wake::Post } else { Wake::Nginx };
        let next_rc = ctx.execute(main, step, wake);
        if gone {
            return rc;
        }
        if next_rc == NGX_ERROR as ngx_int_t {
            return NGX_ERROR as ngx_int_t;
        }
        // Keep nginx from making an error page of a failed subrequest or
        // terminating the main request: the main request answers.
        NGX_OK as ngx_int_t
    }
}

pub(super) unsafe extern "C" fn encoder_done<P: Protocol>(
    sr: *mut ngx_http_request_t,
    data: *mut c_void,
    rc: ngx_int_t,
) -> ngx_int_t {
    guard::catch("pd encoder done handler", rc, || {
        // SAFETY: data is the pool-owned slot set in start_encoders; the
        // pool lives while any subrequest of the request runs.
        unsafe {
            let slot = &*(data as *const EncoderSlot<P>);
            on_encoder_done::<P>(sr, &mut *slot.ctx, slot.index, rc)
        }
    })
}

/// # Safety
/// `sr` must be the live encoder subrequest `index` of the request owning
/// `ctx`.
pub(super) unsafe fn on_encoder_done<P: Protocol>(
    sr: *mut ngx_http_request_t,
    ctx: &mut Ctx<P>,
    index: usize,
    rc: ngx_int_t,
) -> ngx_int_t {
    // SAFETY: as the caller's.
    unsafe {
        let rep = leg_report(sr, rc);
        let outcome = classify_encoder(rep.rc, rep.status, rep.buffer_full, rep.answer);
        ngx_log_debug!(
            mask: DebugMask::Http,
            (*(*sr).connection).log,
            "{}: encoder subrequest for item {} done, rc: {}, status: {}, outcome: {:?}",
            P::NAME,
            index,
            rc,
            rep.status,
            outcome
        );
        let gone = outcome == encode::EncodeOutcome::ClientGone;
        let step = ctx.flow.on(Event::EncoderEnded { index, outcome });
        let main = ctx.main;
        match step.next {
            // The next leg starts from the main request's phase handler.
            Next::StartPrefill | Next::StartTogether | Next::Decode | Next::DecodeAlone => {
                fanout::unwatch_client(main);
                ctx.pending = Some(step);
                if fanout::wake(main).is_err() {
                    ngx_log_error!(
                        NGX_LOG_ALERT,
                        (*(*sr).connection).log,
                        "{}: cannot wake the request after its encoder stage",
                        P::NAME
                    );
                    return NGX_ERROR as ngx_int_t;
                }
            }
            _ => {
                ctx.execute(main, step, Wake::Post);
            }
        }
        if gone {
            return rc;
        }
        NGX_OK as ngx_int_t
    }
}

// --- filters --------------------------------------------------------------------

pub(super) unsafe extern "C" fn header_filter<P: Protocol>(
    r: *mut ngx_http_request_t,
) -> ngx_int_t {
    guard::catch("pd header filter", (), || {
        // SAFETY: nginx calls header filters with a live request.
        unsafe {
            if r != (*r).main {
                return;
            }
            let Some(ctx) = ctx_of::<P>(r) else { return };
            if ctx.flow.is_done() {
                return;
            }
            let status = u16::try_from((*r).headers_out.status).unwrap_or(0);
            let step = ctx.flow.on(Event::DecodeHeader { status });
            if step.cancel.contains(Legs::PREFILL) {
                ngx_log_error!(
                    NGX_LOG_ERR,
                    (*(*r).connection).log,
                    "{}: decode answered {}, cancelling the prefill",
                    P::NAME,
                    status
                );
            }
            ctx.execute(r, step, Wake::Nginx);
        }
    });
    // SAFETY: the next filter was saved at postconfiguration.
    unsafe {
        match *addr_of!(NEXT_HEADER_FILTER) {
            Some(next) => next(r),
            None => NGX_ERROR as ngx_int_t,
        }
    }
}

pub(super) unsafe extern "C" fn body_filter<P: Protocol>(
    r: *mut ngx_http_request_t,
    in_: *mut ngx_chain_t,
) -> ngx_int_t {
    guard::catch("pd body filter", (), || {
        // SAFETY: nginx calls body filters with a live request and chain.
        unsafe {
            if r != (*r).main {
                return;
            }
            let Some(ctx) = ctx_of::<P>(r) else { return };
            if ctx.m.s.decode_sent.is_none() {
                return;
            }
            if let Some(c) = ctx.cached.as_mut() {
                observe::for_each_piece_mut(in_, |bytes| c.feed(bytes));
            }
            let now = observe::now_ms();
            let mut last = false;
            let m = &mut ctx.m;
            observe::for_each_piece(in_, |p| {
                if p.data {
                    m.s.first_byte.get_or_insert(now);
                    m.s.last_byte = Some(now);
                    m.usage.feed(p.bytes);
                }
                if p.last {
                    m.s.last_byte = Some(now);
                    m.s.complete = true;
                    last = true;
                }
            });
            if last && !ctx.flow.is_done() {
                let step = ctx.flow.on(Event::DecodeEnded);
                ctx.execute(r, step, Wake::Nginx);
            }
        }
    });
    // SAFETY: the next filter was saved at postconfiguration.
    unsafe {
        match *addr_of!(NEXT_BODY_FILTER) {
            Some(next) => next(r, in_),
            None => NGX_OK as ngx_int_t,
        }
    }
}

pub(super) unsafe extern "C" fn grace_expired<P: Protocol>(ev: *mut ngx_event_t) {
    guard::catch("pd prefill grace timer", (), || {
        // SAFETY: the timer's data is the main request (timer::arm), alive
        // while its pool is (the pool's cleanup deletes the timer). Stopping
        // the prefill may drop the request's last other reference: hold one
        // and finalize it after, as nginx's own handlers do.
        unsafe {
            let r = (*ev).data as *mut ngx_http_request_t;
            let Some(ctx) = ctx_of::<P>(r) else { return };
            ngx_log_error!(
                NGX_LOG_WARN,
                (*(*r).connection).log,
                "{}: prefill still running {} ms after its decode ended, stopping it",
                P::NAME,
                PREFILL_GRACE_MS
            );
            (*r).set_count((*r).count() + 1);
            let step = ctx.flow.on(Event::GraceExpired);
            ctx.execute(r, step, Wake::Nginx);
            ngx_http_finalize_request(r, NGX_DONE as ngx_int_t);
        }
    })
}
