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
use pdgate_core::hold::{Admission, Gate, Room};
use pdgate_core::json::Object;
use pdgate_core::metrics::{MetricsZone, Sample, UsageScanner};
use pdgate_core::pd::flow::{Event, Failure, Flow, Legs, Next, Spec, Step};
use pdgate_core::pd::{classify_prefill, PrefillOutcome};
use pdgate_core::rewrite::Plan;
use pdgate_core::usage::{prefill_cached_tokens, CachedTokens};

mod exec;
mod legs;
mod metrics;
mod request;

use exec::Wake;
use legs::{body_filter, encoder_done, grace_expired, header_filter, prefill_done};
use metrics::{log_handler, pd_variable, PREVIOUS, VARS};
use request::{handler, precontent};

pub use metrics::METRICS_ZONE;

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

    /// After a failed prefill, with `prefill_fallback decode`: the decode
    /// body without prefill results (the decode computes the prompt).
    /// `None` when the module cannot send the decode alone.
    fn decode_alone(
        _r: &Request,
        _bodies: &Bodies,
        _obj: &Object<'static>,
    ) -> Option<Result<Body, Refusal>> {
        None
    }

    /// Releases what the module reserved for `legs`.
    fn release(st: &mut Self::State, legs: Legs);

    /// The location's `pd_hold`, when requests wait for room there.
    fn hold(_r: &Request) -> Option<&'static crate::hold::Hold> {
        None
    }

    /// The location's `pd_tokenizer`, when prompts are counted and keyed
    /// with the model's own tokenizer.
    fn tokenizer(_r: &Request) -> Option<&'static crate::tokenize::Tokenizer> {
        None
    }

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
    /// The prompt's tokens by the model's tokenizer (`pd_tokenizer`).
    pub input_tokens: Option<u64>,
    /// `$pd_tokenized` (see [`crate::tokenize::PromptKeys::encode`]), in
    /// the request pool; empty without `pd_tokenizer`.
    pub tokenized: &'static [u8],
}

impl Record {
    fn start() -> Record {
        Record { s: Sample { start: observe::now_ms(), ..Sample::default() }, ..Record::default() }
    }

    /// The prefill answer had no usable `kv_transfer_params`.
    pub fn kv_missing(&mut self) {
        self.s.kv_missing = true;
    }

    /// The prefill failed and the decode runs alone.
    pub fn fell_back(&mut self) {
        self.s.fallback = true;
    }

    fn decode_sent(&mut self) {
        if self.s.decode_sent.is_none() {
            self.s.decode_sent = Some(observe::now_ms());
        }
    }

    /// The request's length in tokens: the tokenizer's count, or the
    /// bytes / 4 estimate of a body of `bytes`.
    pub fn request_tokens(&self, bytes: usize) -> u64 {
        self.input_tokens.unwrap_or_else(|| pdgate_core::tokens::tokens_for_bytes(bytes))
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

/// What a request holds of its location's `pd_hold` gate.
enum Held {
    /// No `pd_hold` (or its room all given back).
    No,
    /// Admitted: the room it still holds.
    Admitted { hold: &'static crate::hold::Hold, gate: &'static Gate, room: Room },
    /// Waiting with a ticket since `since` (ms), its media items kept for
    /// the encoder stage.
    Queued {
        hold: &'static crate::hold::Hold,
        gate: &'static Gate,
        seq: u64,
        since: u64,
        media: Vec<MediaItem>,
    },
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
    /// Its `pd_hold` admission or ticket.
    held: Held,
    /// `Retry-After` of the error answer (seconds).
    retry_after: Option<u64>,
    _p: PhantomData<P>,
}

impl<P: Protocol> Drop for Ctx<P> {
    fn drop(&mut self) {
        // The request is going away (the pool cleanup runs): whatever is
        // still held is released.
        let step = self.flow.on(Event::ClientGone);
        P::release(&mut self.st, step.release.with(self.flow.held()));
        match std::mem::replace(&mut self.held, Held::No) {
            Held::No => {}
            Held::Admitted { hold, gate, room } => crate::hold::give_back(hold, gate, room),
            Held::Queued { hold, gate, seq, .. } => {
                crate::hold::forget(self.main);
                // Released meanwhile: the room it got goes back.
                if !gate.cancel(seq, false) {
                    crate::hold::give_back(hold, gate, Room { prefill: 1, decode: 1 });
                }
            }
        }
    }
}

impl<P: Protocol> Ctx<P> {
    /// The prefill is over (no retry follows): its room goes back.
    pub(super) fn prefill_room_back(&mut self) {
        if let Held::Admitted { hold, gate, room } = &mut self.held {
            if room.prefill > 0 {
                room.prefill = 0;
                crate::hold::give_back(hold, gate, Room { prefill: 1, decode: 0 });
            }
        }
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
    unsafe { ctx_of::<P>((*r).main).filter(|c| c.flow.is_pd()).map(|c| &mut c.m) }
}

/// Whether `r` may carry a JSON body an engine would parse: a POST, PUT
/// or PATCH whose body is not a multipart form (`pd_strip_reserved` reads
/// and checks those).
pub fn may_carry_json(r: &Request) -> bool {
    let req: &ngx::ffi::ngx_http_request_t = r.as_ref();
    let m = req.method as u32;
    if m & (ngx::ffi::NGX_HTTP_POST | ngx::ffi::NGX_HTTP_PUT | ngx::ffi::NGX_HTTP_PATCH) == 0 {
        return false;
    }
    // SAFETY: headers_in.content_type is NULL or a header of the live
    // request, its value in the request pool.
    let ct = unsafe { req.headers_in.content_type.as_ref().map(|h| response::str_of(&h.value)) };
    !ct.is_some_and(|v| v.len() >= 10 && v[..10].eq_ignore_ascii_case(b"multipart/"))
}

/// The prompt's length in tokens for `r`'s main request: its
/// `pd_tokenizer` count, else the bytes / 4 estimate of `body`.
pub fn request_tokens<P: Protocol>(r: &Request, body: &[u8]) -> u64 {
    let r = r as *const Request as *mut ngx_http_request_t;
    // SAFETY: a Request is a live ngx_http_request_t (ngx's own cast).
    let counted = unsafe { ctx_of::<P>((*r).main).and_then(|c| c.m.input_tokens) };
    counted.unwrap_or_else(|| pdgate_core::tokens::tokens_for_bytes(body.len()))
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
        if crate::tokenize::used() {
            return declare::<P>(cf, |i| i == TOKENIZED_VAR);
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
    crate::tokenize::reset();
    // SAFETY: as documented.
    unsafe { declare::<P>(cf, |i| i != TOKENIZED_VAR) }
}

/// `$pd_tokenized`'s place in [`VARS`]: declared at postconfiguration, and
/// only when a location has `pd_tokenizer` (balancers read it per request
/// when it exists).
const TOKENIZED_VAR: usize = 13;

/// Declares the variables of [`VARS`] that `which` selects.
///
/// # Safety
/// `cf` must be the conf of an http configuration callback.
unsafe fn declare<P: Protocol>(
    cf: *mut ngx::ffi::ngx_conf_t,
    which: impl Fn(usize) -> bool,
) -> ngx_int_t {
    for (i, name) in VARS.iter().enumerate().filter(|(i, _)| which(*i)) {
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
