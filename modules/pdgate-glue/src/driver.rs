//! The one P/D request driver: runs pdgate-core's flow ([`Flow`]) for any
//! P/D module.
//!
//! A module gives a [`Protocol`]: whether a location runs the flow and how
//! (its [`Spec`]), how to check the client body and build each leg's body
//! ([`Protocol::prepare`]), the decode body after a sequential prefill, and
//! how to release what it reserved. The driver does everything else, the
//! same way for vLLM's sequential flow, SGLang's two flows and the encoder
//! stage before either:
//! - precontent phase of the main request: read the body, then re-enter
//!   and act on what the flow decided (wait, go on to `proxy_pass`, or
//!   answer the client);
//! - the encoder fan-out (background, in-memory subrequests, one per media
//!   item), the prefill leg (waited in-memory subrequest, or background
//!   beside the decode), their post handlers, cancelling legs;
//! - a header filter (the decode's status, for `pd_together`) and a body
//!   filter (the decode's first and last byte, `usage`, its end);
//! - the request's metrics [`Record`];
//! - a request-pool cleanup that releases every reservation still held
//!   when the request goes away by any path.
//!
//! The shape follows nginx's mirror (body, `preserve_body`, resume the
//! phases) and auth_request (waited subrequest, post handler records,
//! re-entry acts).

use std::ffi::c_void;
use std::marker::PhantomData;
use std::ptr::{addr_of, addr_of_mut, null_mut};

use ngx::ffi::{
    ngx_chain_t, ngx_event_t, ngx_http_core_run_phases, ngx_http_finalize_request,
    ngx_http_output_body_filter_pt, ngx_http_output_header_filter_pt,
    ngx_http_phases_NGX_HTTP_LOG_PHASE, ngx_http_phases_NGX_HTTP_PRECONTENT_PHASE,
    ngx_http_read_client_request_body, ngx_http_request_t, ngx_int_t, ngx_module_t, ngx_pool_t,
    ngx_variable_value_t, NGX_DECLINED, NGX_DONE, NGX_ERROR, NGX_HTTP_SERVICE_UNAVAILABLE,
    NGX_HTTP_SPECIAL_RESPONSE, NGX_LOG_ALERT, NGX_LOG_ERR, NGX_LOG_WARN, NGX_OK,
};
use ngx::http::Request;
use ngx::log::DebugMask;
use ngx::{ngx_log_debug, ngx_log_error};
use pdgate_core::encode::{self, classify as classify_encoder, MediaItem};
use pdgate_core::json::Object;
use pdgate_core::metrics::{MetricsZone, Sample, UsageScanner};
use pdgate_core::pd::flow::{Event, Failure, Flow, Legs, Next, Spec, Step};
use pdgate_core::pd::{classify_prefill, PrefillOutcome};
use pdgate_core::rewrite::Plan;
use pdgate_core::usage::{prefill_cached_tokens, CachedTokens};

use crate::{
    body, fanout, guard, headers, leg, observe, phase, pool, response, subrequest, timer, variable,
    zone,
};

/// A client's request refused before any leg: the status and the message of
/// its JSON error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

impl Refusal {
    pub fn new(status: u16, message: impl Into<String>) -> Refusal {
        Refusal { status, message: message.into() }
    }
}

/// A leg's request body, built in the request pool.
#[derive(Debug, Clone, Copy)]
pub struct Body {
    chain: *mut ngx_chain_t,
    len: usize,
}

impl Body {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Builds leg bodies from plans over the client body.
pub struct Bodies {
    pool: *mut ngx_pool_t,
    src: &'static [u8],
}

impl Bodies {
    /// The client body.
    pub fn src(&self) -> &'static [u8] {
        self.src
    }

    /// The body `plan` describes (source ranges referenced in place).
    pub fn build(&self, plan: &Plan<'_>) -> Result<Body, Refusal> {
        // SAFETY: the pool is the live request's, and `src` (the client
        // body) lives in it.
        match unsafe { body::chain_from_plan(self.pool, self.src, plan) } {
            Ok((chain, len)) => Ok(Body { chain, len }),
            Err(_) => Err(Refusal::new(500, "out of memory building a request body")),
        }
    }
}

/// `<prefix><uri>`: the URI of a leg's (internal) location.
pub fn leg_uri(prefix: &[u8], uri: &[u8]) -> Vec<u8> {
    let mut target = Vec::with_capacity(prefix.len() + uri.len());
    target.extend_from_slice(prefix);
    target.extend_from_slice(uri);
    target
}

/// What [`Protocol::prepare`] found and built.
#[derive(Default)]
pub struct Prepared {
    /// The parsed body, kept for [`Protocol::decode_after_prefill`].
    pub obj: Option<Object<'static>>,
    /// Media items to encode first (with the encoder location's URI).
    pub media: Vec<MediaItem>,
    pub encode_uri: Vec<u8>,
    /// The prefill leg: its URI and body.
    pub prefill: Option<(Vec<u8>, Body)>,
    /// The decode body, when known before the prefill (`None`: the client's
    /// body as it is, or the one [`Protocol::decode_after_prefill`] builds).
    pub decode: Option<Body>,
    /// Legs for which the protocol reserved counters (released through
    /// [`Protocol::release`]).
    pub hold: Legs,
}

/// What a P/D module gives the driver.
pub trait Protocol: Sized + 'static {
    /// The module's per-request state (its choices); dropped with the
    /// request.
    type State: Default;
    /// The prefix of the module's log lines.
    const NAME: &'static str;

    /// The module (its ctx slot holds the driver's context).
    fn module() -> &'static ngx_module_t;

    /// The location's flow, `None` when the module is off there.
    fn spec(r: &Request) -> Option<Spec>;

    /// The body is in: check it, choose, build the legs' bodies.
    fn prepare(r: &Request, bodies: &Bodies, st: &mut Self::State) -> Result<Prepared, Refusal>;

    /// After a 2xx prefill of a sequential flow whose decode body was not
    /// prepared: the decode body, from the prefill's `answer`.
    fn decode_after_prefill(
        r: &Request,
        bodies: &Bodies,
        obj: &Object<'static>,
        answer: &'static [u8],
        m: &mut Record,
    ) -> Result<Body, Refusal>;

    /// Releases what the module reserved for `legs`.
    fn release(st: &mut Self::State, legs: Legs);

    /// The prefill leg ended: `answered` is false when its server gave no
    /// answer (unreachable, timed out, cut off), which counts against it.
    fn prefill_ended(_r: &Request, _st: &mut Self::State, _answered: bool) {}

    /// The prefill gave no answer and the flow may try again
    /// ([`Spec::retries`]): the prefill (and decode) bodies for another
    /// server, or `None` when there is none to try.
    fn retry(
        _r: &Request,
        _bodies: &Bodies,
        _obj: Option<&Object<'static>>,
        _st: &mut Self::State,
    ) -> Option<Prepared> {
        None
    }
}

/// How long a prefill running beside its decode (SGLang `pd_together`) may
/// still take once the decode ended: its KV was handed over (the decode
/// could not have ended otherwise), so it should answer at once; a prefill
/// that does not is stopped then, and the request ends.
pub const PREFILL_GRACE_MS: usize = 5000;

/// What the driver records of one P/D request (metrics and `$pd_*`).
#[derive(Debug, Default)]
pub struct Record {
    pub s: Sample,
    pub usage: UsageScanner,
    pub prefill_addr: &'static [u8],
    /// Already added to the metrics zone.
    pub counted: bool,
}

impl Record {
    fn start() -> Record {
        Record { s: Sample { start: observe::now_ms(), ..Sample::default() }, ..Record::default() }
    }

    /// The prefill answer had no usable `kv_transfer_params`.
    pub fn kv_missing(&mut self) {
        self.s.kv_missing = true;
    }

    fn decode_sent(&mut self) {
        if self.s.decode_sent.is_none() {
            self.s.decode_sent = Some(observe::now_ms());
        }
    }

    /// The sample with the token counts seen in the answer.
    pub fn sample(&self) -> Sample {
        Sample {
            prompt_tokens: self.usage.prompt,
            completion_tokens: self.usage.completion,
            ..self.s
        }
    }
}

/// What the main request does when the phases reach it again.
enum Resume {
    /// A leg runs: wait.
    Wait,
    /// The decode body is installed: go on to `proxy_pass`.
    Proceed,
    /// Answer the client with our JSON error.
    Error { status: u16, message: String },
    /// Answer the client with the prefill's own answer.
    PrefillAnswer { status: u16 },
}

/// One encoder request.
struct Encoder {
    kind: &'static str,
    sr: *mut ngx_http_request_t,
}

/// What an encoder subrequest's post handler gets.
struct EncoderSlot<P: Protocol> {
    ctx: *mut Ctx<P>,
    index: usize,
}

/// The driver's per-request context, owned by the main request's pool.
pub struct Ctx<P: Protocol> {
    flow: Flow,
    resume: Resume,
    pub st: P::State,
    pub m: Record,
    main: *mut ngx_http_request_t,
    src: &'static [u8],
    obj: Option<Object<'static>>,
    encode_uri: Vec<u8>,
    encoders: Vec<Encoder>,
    prefill: Option<(Vec<u8>, Body)>,
    decode: Option<Body>,
    prefill_sr: *mut ngx_http_request_t,
    answer: &'static [u8],
    content_type: &'static [u8],
    /// A step decided in a subrequest's post handler, for the main
    /// request's phase handler to execute.
    pending: Option<Step>,
    /// The grace timer of a prefill still running after its decode ended.
    grace: *mut ngx_event_t,
    /// The prefill's cached tokens, written over the decode's in its answer.
    cached: Option<CachedTokens>,
    _p: PhantomData<P>,
}

impl<P: Protocol> Drop for Ctx<P> {
    fn drop(&mut self) {
        // The request is going away (the pool cleanup runs): whatever is
        // still held is released.
        let step = self.flow.on(Event::ClientGone);
        P::release(&mut self.st, step.release.with(self.flow.held()));
    }
}

/// The driver's context of main request `r`, if it has one.
///
/// # Safety
/// `r` must be a live request.
unsafe fn ctx_of<'a, P: Protocol>(r: *mut ngx_http_request_t) -> Option<&'a mut Ctx<P>> {
    // SAFETY: the module's ctx slot holds what this driver stored there: a
    // pool-owned Ctx<P>.
    unsafe { ((*(*r).ctx.add(P::module().ctx_index)) as *mut Ctx<P>).as_mut() }
}

/// The metrics record of `r`'s main request, when it runs a P/D flow.
///
/// # Safety
/// `r` must be a live request.
pub unsafe fn record<'a, P: Protocol>(r: *mut ngx_http_request_t) -> Option<&'a mut Record> {
    // SAFETY: r is live (caller).
    unsafe { ctx_of::<P>((*r).main).map(|c| &mut c.m) }
}

/// The module's state for `r`'s main request, when it runs a P/D flow.
pub fn state<P: Protocol>(r: &Request) -> Option<&P::State> {
    let r = r as *const Request as *mut ngx_http_request_t;
    // SAFETY: a Request is a live ngx_http_request_t (ngx's own cast).
    unsafe { ctx_of::<P>((*r).main).map(|c| &c.st) }
}

/// A live nginx request as ngx's safe view.
///
/// # Safety
/// `r` must be a live request.
unsafe fn view<'a>(r: *mut ngx_http_request_t) -> &'a Request {
    // SAFETY: forwarded.
    unsafe { Request::from_ngx_http_request(r) }
}

// --- configuration ------------------------------------------------------------

static mut NEXT_HEADER_FILTER: ngx_http_output_header_filter_pt = None;
static mut NEXT_BODY_FILTER: ngx_http_output_body_filter_pt = None;

/// Installs the driver for `P`: the precontent handler and the filters.
/// Call once from the module's postconfiguration.
///
/// # Safety
/// `cf` must be the conf of an http postconfiguration callback.
pub unsafe fn postconfiguration<P: Protocol>(cf: *mut ngx::ffi::ngx_conf_t) -> ngx_int_t {
    // SAFETY: postconfiguration is single-threaded; the filter statics are
    // only written here.
    unsafe {
        if phase::add_handler(cf, ngx_http_phases_NGX_HTTP_PRECONTENT_PHASE, Some(handler::<P>))
            .is_err()
        {
            return NGX_ERROR as ngx_int_t;
        }
        leg::find_proxy_module(cf);
        *addr_of_mut!(NEXT_HEADER_FILTER) = leg::push_header_filter(Some(header_filter::<P>));
        *addr_of_mut!(NEXT_BODY_FILTER) = observe::push_body_filter(Some(body_filter::<P>));
        if phase::add_handler(cf, ngx_http_phases_NGX_HTTP_LOG_PHASE, Some(log_handler::<P>))
            .is_err()
        {
            return NGX_ERROR as ngx_int_t;
        }
    }
    NGX_OK as ngx_int_t
}

/// Declares the `$pd_*` variables for `P`'s requests (shared with the
/// other P/D module when both are loaded: each answers for its own).
/// Call once from the module's preconfiguration.
///
/// # Safety
/// `cf` must be the conf of an http preconfiguration callback.
pub unsafe fn preconfiguration<P: Protocol>(cf: *mut ngx::ffi::ngx_conf_t) -> ngx_int_t {
    for (i, name) in VARS.iter().enumerate() {
        // SAFETY: cf is live (caller); `data` is an index; the previous
        // handlers static is only written during configuration.
        unsafe {
            match variable::add_chained(cf, name.as_bytes(), Some(pd_variable::<P>), i) {
                Ok(prev) => {
                    if let Some(slot) = (*addr_of_mut!(PREVIOUS)).get_mut(i) {
                        *slot = prev;
                    }
                }
                Err(_) => return NGX_ERROR as ngx_int_t,
            }
        }
    }
    NGX_OK as ngx_int_t
}

// --- metrics and log variables ------------------------------------------------------

/// The metrics zone's name (declared by `pd_metrics_zone`, in the prefill
/// module; every P/D module records into it).
pub const METRICS_ZONE: &[u8] = b"pdgate_metrics";

/// The `$pd_*` variables, in their `data` order.
const VARS: [&str; 11] = [
    "pd_prefill_status",
    "pd_prefill_addr",
    "pd_prefill_time",
    "pd_gap_time",
    "pd_ttft",
    "pd_tpot",
    "pd_e2e",
    "pd_prompt_tokens",
    "pd_completion_tokens",
    "pd_outcome",
    "pd_failed_stage",
];

/// The handlers the variables had before this module took them.
static mut PREVIOUS: [variable::Previous; 11] = [(None, 0); 11];

unsafe extern "C" fn log_handler<P: Protocol>(r: *mut ngx_http_request_t) -> ngx_int_t {
    guard::catch("pd log handler", NGX_OK as ngx_int_t, || {
        // SAFETY: nginx runs log handlers with the live request; the zone
        // found by name holds a MetricsZone (zone::add placed it).
        unsafe {
            if r != (*r).main {
                return NGX_OK as ngx_int_t;
            }
            let Some(ctx) = ctx_of::<P>(r) else { return NGX_OK as ngx_int_t };
            let m = &mut ctx.m;
            if m.counted {
                return NGX_OK as ngx_int_t;
            }
            m.counted = true;
            let z = zone::find_in_cycle(METRICS_ZONE).unwrap_or(null_mut());
            if let Some(z) = zone::state::<MetricsZone>(z) {
                z.record(&m.sample(), observe::final_status(r), observe::connection_broken(r));
            }
            NGX_OK as ngx_int_t
        }
    })
}

/// `ms` milliseconds as seconds with three decimals (`$request_time`'s form).
fn secs(ms: u64) -> String {
    format!("{}.{:03}", ms / 1000, ms % 1000)
}

unsafe extern "C" fn pd_variable<P: Protocol>(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    data: usize,
) -> ngx_int_t {
    guard::catch("pd variable", NGX_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls variable getters with a live request and value.
        unsafe {
            let main = (*r).main;
            let Some(m) = record::<P>(main) else {
                // Not ours: the other P/D module's, if it declared it too.
                if let Some(&(Some(prev), pdata)) = (*addr_of!(PREVIOUS)).get(data) {
                    return prev(r, v, pdata);
                }
                variable::not_found(v);
                return NGX_OK as ngx_int_t;
            };
            let s = m.sample();
            let (status, closed) = (observe::final_status(main), observe::connection_broken(main));
            let text: Option<String> = match data {
                0 => (s.prefill_status != 0).then(|| s.prefill_status.to_string()),
                1 => {
                    if !m.prefill_addr.is_empty() {
                        variable::set(v, m.prefill_addr);
                        return NGX_OK as ngx_int_t;
                    }
                    None
                }
                2 => s.prefill_ms().map(secs),
                3 => s.gap_ms().map(secs),
                4 => s.ttft_ms().map(secs),
                5 => s.tpot_us().map(|us| secs(us / 1000)),
                6 => s.e2e_ms().map(secs),
                7 => s.prompt_tokens.map(|n| n.to_string()),
                8 => s.completion_tokens.map(|n| n.to_string()),
                9 => Some(s.outcome(status, closed).label().to_owned()),
                10 => s.failed_stage(status, closed).map(|st| st.label().to_owned()),
                _ => None,
            };
            match text.and_then(|t| observe::pool_bytes(r, t.as_bytes())) {
                Some(b) => variable::set(v, b),
                None => variable::not_found(v),
            }
            NGX_OK as ngx_int_t
        }
    })
}

// --- the precontent phase -------------------------------------------------------

unsafe extern "C" fn handler<P: Protocol>(r: *mut ngx_http_request_t) -> ngx_int_t {
    guard::catch("pd handler", NGX_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls phase handlers with a live request.
        unsafe { precontent::<P>(r) }
    })
}

/// The precontent phase: entered once at the start, and again each time
/// the flow wakes the main request.
unsafe fn precontent<P: Protocol>(r: *mut ngx_http_request_t) -> ngx_int_t {
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

unsafe extern "C" fn body_handler<P: Protocol>(r: *mut ngx_http_request_t) {
    guard::catch("pd body handler", (), || {
        // SAFETY: nginx calls the body handler with the live main request.
        unsafe { on_body::<P>(r) }
    })
}

/// The client body is in: prepare the legs and feed the flow.
unsafe fn on_body<P: Protocol>(r: *mut ngx_http_request_t) {
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

/// How to get the main request to act on a new `resume`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
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
    fn resume_error(&mut self, status: u16, message: String) {
        self.resume = Resume::Error { status, message };
    }

    /// Starts the encoder subrequests (the flow says when: they are created
    /// here, in the body handler, while the items are at hand, and the flow
    /// is told right after). Items already started when one fails run on
    /// and are ignored.
    ///
    /// # Safety
    /// `r` must be the live main request owning self.
    unsafe fn start_encoders(
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
    unsafe fn execute(&mut self, r: *mut ngx_http_request_t, step: Step, wake: Wake) -> ngx_int_t {
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
    unsafe fn wake(
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
    unsafe fn proceed(&mut self, r: *mut ngx_http_request_t) -> ngx_int_t {
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
    unsafe fn start_failed(
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
    unsafe fn start_prefill(
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

    fn failure_message(&self, f: &Failure) -> String {
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

// --- leg callbacks ----------------------------------------------------------------

/// What nginx reports of a finished in-memory leg.
struct LegReport {
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
unsafe fn leg_report(sr: *mut ngx_http_request_t, rc: ngx_int_t) -> LegReport {
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

unsafe extern "C" fn prefill_done<P: Protocol>(
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
unsafe fn on_prefill_done<P: Protocol>(
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

unsafe extern "C" fn encoder_done<P: Protocol>(
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
unsafe fn on_encoder_done<P: Protocol>(
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
            Next::StartPrefill | Next::StartTogether | Next::Decode => {
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

unsafe extern "C" fn header_filter<P: Protocol>(r: *mut ngx_http_request_t) -> ngx_int_t {
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

unsafe extern "C" fn body_filter<P: Protocol>(
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

unsafe extern "C" fn grace_expired<P: Protocol>(ev: *mut ngx_event_t) {
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

// --- safe entry points for module crates ----------------------------------------

/// [`preconfiguration`] for a module crate without `unsafe`: declares the
/// `$pd_*` variables for `P`'s requests. Call from the module's
/// preconfiguration (`http_module!`'s).
pub fn declare_variables<P: Protocol>(cf: &mut crate::http::Conf) -> Result<(), crate::NgxError> {
    // SAFETY: a Conf exists only during a configuration callback: here the
    // module's preconfiguration.
    match unsafe { preconfiguration::<P>(cf.as_ptr()) } {
        rc if rc == NGX_OK as ngx_int_t => Ok(()),
        _ => Err(crate::NgxError),
    }
}

/// [`postconfiguration`] for a module crate without `unsafe`: installs the
/// driver for `P` (precontent and log handlers, header and body filters).
/// Call once from the module's postconfiguration (`http_module!`'s).
pub fn install<P: Protocol>(cf: &mut crate::http::Conf) -> Result<(), crate::NgxError> {
    // SAFETY: a Conf exists only during a configuration callback: here the
    // module's postconfiguration.
    match unsafe { postconfiguration::<P>(cf.as_ptr()) } {
        rc if rc == NGX_OK as ngx_int_t => Ok(()),
        _ => Err(crate::NgxError),
    }
}
