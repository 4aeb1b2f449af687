//! ngx_http_prefill_refactor_module: SGLang's parallel ("bootstrap") P/D
//! flow, the original's `prefill_refactor` done right.
//!
//! In the precontent phase of a main request in a location with
//! `prefill_refactor <prefix>`:
//! 1. read the whole client body and check it is a JSON object one
//!    bootstrap room can carry (no `n > 1`, no batch prompt);
//! 2. choose the prefill server (least requests in flight, counted in the
//!    shared zone `prefill_refactor`) and, with `decode_servers_list`, the
//!    decode server the same way; they are `$prefill_server` and
//!    `$decode_server` (the prefill location proxies to the first, the
//!    decode location to the second or to an upstream with any balancer);
//! 3. build both bodies: the client's members minus those the proxy owns,
//!    plus `bootstrap_host`/`bootstrap_port` of the chosen prefill and a
//!    random 63-bit `bootstrap_room` (JSON numbers); the prefill gets
//!    `"stream":false`;
//! 4. `p_before_d`: a waited in-memory subrequest to `<prefix><uri>`, then
//!    the decode through the location's `proxy_pass` after a 2xx prefill,
//!    the prefill's own answer otherwise (as ngx_http_prefill_module);
//!    `pd_together`: a background in-memory subrequest for the prefill and
//!    the decode at once. If the prefill fails before the decode answered,
//!    the decode's upstream is closed and the client gets the prefill's
//!    error (or ours); if it fails later the request is terminated. If the
//!    decode answers an error first, the prefill's upstream is closed (a
//!    header filter watches the main request).
//!
//! Counters are released when each leg ends, and by the context's drop (a
//! request-pool cleanup) on every other path.

use std::ffi::{c_char, c_void};
use std::ptr::NonNull;
use std::ptr::{addr_of, addr_of_mut, null_mut};

use pdgate_glue::core::balance::slots::{peer_key, SlotTable};
use pdgate_glue::core::balance::{PeerView, Policy};
use pdgate_glue::core::bootstrap::{
    self, bootstrap_members, bootstrap_port, check_ports, check_request, least_active, leg_plan,
    parse_backend, parse_distribution, parse_ports, parse_servers, Distribution, Leg, Server,
};
use pdgate_glue::core::json::Object;
use pdgate_glue::core::pd::{classify_prefill, PrefillOutcome};
use pdgate_glue::core::tokens::tokens_for_bytes;
use pdgate_glue::ffi::{
    ngx_chain_t, ngx_command_t, ngx_conf_t, ngx_http_core_module, ngx_http_core_run_phases,
    ngx_http_finalize_request, ngx_http_module_t, ngx_http_output_header_filter_pt,
    ngx_http_phases_NGX_HTTP_PRECONTENT_PHASE, ngx_http_read_client_request_body,
    ngx_http_request_t, ngx_http_variable_value_t, ngx_int_t, ngx_module_t, ngx_shm_zone_t,
    ngx_uint_t, NGX_CONF_TAKE1, NGX_DECLINED, NGX_DONE, NGX_ERROR, NGX_HTTP_LOC_CONF,
    NGX_HTTP_LOC_CONF_OFFSET, NGX_HTTP_MAIN_CONF, NGX_HTTP_MODULE, NGX_HTTP_SERVICE_UNAVAILABLE,
    NGX_HTTP_SPECIAL_RESPONSE, NGX_HTTP_SRV_CONF, NGX_LOG_EMERG, NGX_LOG_ERR, NGX_LOG_WARN, NGX_OK,
};
use pdgate_glue::leg::{self, Mode};
use pdgate_glue::ngx::http::{HttpModule, HttpModuleLocationConf, Merge, MergeConfigError};
use pdgate_glue::ngx::log::DebugMask;
use pdgate_glue::ngx::{ngx_conf_log_error, ngx_log_debug, ngx_log_error, ngx_string};
use pdgate_glue::{body, conf, counters, guard, phase, pool, random, response, variable};

/// The counters of `zone` (the shared zone of this configuration).
fn zone_table<'a>(zone: Option<NonNull<ngx_shm_zone_t>>) -> Option<SlotTable<'a>> {
    // SAFETY: the zone comes from counters::add_zone for the configuration
    // the request runs under, which outlives the request.
    unsafe { counters::table(zone?.as_ptr()) }
}

/// The header filter after ours.
static mut NEXT_HEADER_FILTER: ngx_http_output_header_filter_pt = None;

/// Per-location configuration; `None` means "not set at this level".
#[derive(Debug, Default)]
pub struct LocConf {
    /// `prefill_refactor <prefix> | off`.
    prefix: Option<Option<Vec<u8>>>,
    prefill: Option<Vec<Server>>,
    decode: Option<Vec<Server>>,
    ports: Option<Vec<u16>>,
    distribution: Option<Distribution>,
    backend: Option<()>,
    /// `prefill_refactor_balance <policy>`: `Some(None)` is least active.
    balance: Option<Option<Policy>>,
    /// The shared counters zone (`prefill_refactor`), attached by the
    /// directives that need it, per configuration cycle.
    zone: Option<NonNull<ngx_shm_zone_t>>,
}

impl Merge for LocConf {
    fn merge(&mut self, prev: &Self) -> Result<(), MergeConfigError> {
        if self.prefix.is_none() {
            self.prefix = prev.prefix.clone();
        }
        if self.prefill.is_none() {
            self.prefill = prev.prefill.clone();
        }
        if self.decode.is_none() {
            self.decode = prev.decode.clone();
        }
        if self.ports.is_none() {
            self.ports = prev.ports.clone();
        }
        if self.distribution.is_none() {
            self.distribution = prev.distribution;
        }
        if self.balance.is_none() {
            self.balance = prev.balance;
        }
        if self.backend.is_none() {
            self.backend = prev.backend;
        }
        if self.zone.is_none() {
            self.zone = prev.zone;
        }
        Ok(())
    }
}

impl LocConf {
    fn enabled(&self) -> bool {
        matches!(self.prefix, Some(Some(_)))
    }

    fn distribution(&self) -> Distribution {
        self.distribution.unwrap_or(Distribution::PBeforeD)
    }

    /// Cross-directive checks of a location where the module is on.
    fn check(&self) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        let Some(p) = &self.prefill else {
            return Err("\"prefill_refactor\" needs \"prefill_servers_list\"".into());
        };
        if let Some(ports) = &self.ports {
            check_ports(ports, p.len()).map_err(|e| format!("\"bootstrap_ports_list\" {e}"))?;
        }
        Ok(())
    }
}

struct Module;

impl HttpModule for Module {
    fn module() -> &'static ngx_module_t {
        // SAFETY: the module static is only written by nginx while loading.
        unsafe { &*addr_of!(ngx_http_prefill_refactor_module) }
    }

    unsafe extern "C" fn preconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        guard::catch("prefill_refactor preconfiguration", NGX_ERROR as ngx_int_t, || {
            // SAFETY: nginx calls preconfiguration with a valid http conf.
            let added = unsafe {
                variable::add_volatile(
                    cf,
                    b"prefill_server",
                    Some(ngx_http_prefill_server_variable),
                    std::ptr::null(),
                )
                .and_then(|()| {
                    variable::add_volatile(
                        cf,
                        b"decode_server",
                        Some(ngx_http_decode_server_variable),
                        std::ptr::null(),
                    )
                })
                .and_then(|()| {
                    variable::add_volatile(
                        cf,
                        b"bootstrap_room",
                        Some(ngx_http_bootstrap_room_variable),
                        std::ptr::null(),
                    )
                })
                .and_then(|()| {
                    variable::add_volatile(
                        cf,
                        b"prefill_refactor_counters",
                        Some(ngx_http_prefill_refactor_counters_variable),
                        std::ptr::null(),
                    )
                })
            };
            match added {
                Ok(()) => NGX_OK as ngx_int_t,
                Err(_) => NGX_ERROR as ngx_int_t,
            }
        })
    }

    unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        guard::catch("prefill_refactor postconfiguration", NGX_ERROR as ngx_int_t, || {
            // SAFETY: nginx calls postconfiguration with a valid http conf,
            // single-threaded, while the filter chain is built.
            unsafe {
                let added = phase::add_handler(
                    cf,
                    ngx_http_phases_NGX_HTTP_PRECONTENT_PHASE,
                    Some(ngx_http_prefill_refactor_handler),
                );
                if added.is_err() {
                    return NGX_ERROR as ngx_int_t;
                }
                *addr_of_mut!(NEXT_HEADER_FILTER) =
                    leg::push_header_filter(Some(ngx_http_prefill_refactor_header_filter));
                NGX_OK as ngx_int_t
            }
        })
    }
}

// SAFETY: LocationConf is the type create_loc_conf allocates for this module.
unsafe impl HttpModuleLocationConf for Module {
    type LocationConf = LocConf;
}

/// `merge_loc_conf` with the cross-directive checks, reported as nginx
/// reports a bad configuration.
unsafe extern "C" fn merge_loc_conf(
    cf: *mut ngx_conf_t,
    prev: *mut c_void,
    conf: *mut c_void,
) -> *mut c_char {
    guard::catch("prefill_refactor merge", pdgate_glue::ngx::core::NGX_CONF_ERROR, || {
        // SAFETY: nginx passes this module's parent and child location confs.
        unsafe {
            let prev = &*(prev as *const LocConf);
            let conf = &mut *(conf as *mut LocConf);
            let _ = conf.merge(prev);
            match conf.check() {
                Ok(()) => conf::OK,
                Err(e) => {
                    ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{}", e);
                    pdgate_glue::ngx::core::NGX_CONF_ERROR
                }
            }
        }
    })
}

static NGX_HTTP_PREFILL_REFACTOR_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: Some(Module::preconfiguration),
    postconfiguration: Some(Module::postconfiguration),
    create_main_conf: None,
    init_main_conf: None,
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: Some(Module::create_loc_conf),
    merge_loc_conf: Some(merge_loc_conf),
};

const ANY_LEVEL: u32 = NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF;

const fn command(
    name: pdgate_glue::ffi::ngx_str_t,
    set: unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char,
) -> ngx_command_t {
    ngx_command_t {
        name,
        type_: (ANY_LEVEL | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(set),
        conf: NGX_HTTP_LOC_CONF_OFFSET as ngx_uint_t,
        offset: 0,
        post: null_mut(),
    }
}

static mut NGX_HTTP_PREFILL_REFACTOR_COMMANDS: [ngx_command_t; 8] = [
    command(ngx_string!("prefill_refactor"), cmd_prefill_refactor),
    command(ngx_string!("prefill_servers_list"), cmd_prefill_servers_list),
    command(ngx_string!("decode_servers_list"), cmd_decode_servers_list),
    command(ngx_string!("bootstrap_ports_list"), cmd_bootstrap_ports_list),
    command(ngx_string!("pd_distribution"), cmd_pd_distribution),
    command(ngx_string!("pd_backend"), cmd_pd_backend),
    command(ngx_string!("prefill_refactor_balance"), cmd_balance),
    ngx_command_t::empty(),
];

#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_prefill_refactor_module: ngx_module_t = ngx_module_t {
    ctx: addr_of!(NGX_HTTP_PREFILL_REFACTOR_MODULE_CTX) as *mut c_void,
    commands: addr_of_mut!(NGX_HTTP_PREFILL_REFACTOR_COMMANDS) as *mut ngx_command_t,
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    ..ngx_module_t::default()
};

pdgate_glue::ngx::ngx_modules!(ngx_http_prefill_refactor_module);

/// Runs a directive handler body with this module's location conf and the
/// directive's one argument (`NGX_CONF_TAKE1` guarantees it).
unsafe fn directive(
    what: &str,
    cf: *mut ngx_conf_t,
    lcf: *mut c_void,
    f: impl FnOnce(&mut LocConf, &[u8]) -> Result<(), String>,
) -> *mut c_char {
    guard::catch(what, pdgate_glue::ngx::core::NGX_CONF_ERROR, || {
        // SAFETY: nginx passes this module's location conf and the parsed args.
        unsafe {
            let lcf = &mut *(lcf as *mut LocConf);
            let args = conf::args(cf);
            let Some(arg) = args.get(1) else { return conf::error(cf, "needs an argument") };
            match f(lcf, conf::str_bytes(arg)) {
                Ok(()) => conf::OK,
                Err(e) => conf::error(cf, &e),
            }
        }
    })
}

/// Attaches the shared counters zone of the configuration being parsed
/// (`ngx_shared_memory_add` returns the same zone for every call of a cycle).
///
/// # Safety
/// `cf` must be the conf of a directive handler.
unsafe fn attach_zone(cf: *mut ngx_conf_t, lcf: &mut LocConf) -> Result<(), String> {
    if lcf.zone.is_none() {
        // SAFETY: forwarded from the caller; the name is static.
        let z = unsafe { counters::add_zone(cf, "prefill_refactor", Module::module()) }
            .map_err(|_| "cannot create its shared zone".to_owned())?;
        lcf.zone = NonNull::new(z);
    }
    Ok(())
}

fn dup<T>(v: &Option<T>) -> Result<(), String> {
    if v.is_some() {
        Err("is duplicate".into())
    } else {
        Ok(())
    }
}

/// `prefill_refactor <uri-prefix> | off;`
unsafe extern "C" fn cmd_prefill_refactor(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    lcf: *mut c_void,
) -> *mut c_char {
    // SAFETY: directive handler contract (see `directive`).
    unsafe {
        directive("prefill_refactor directive", cf, lcf, |lcf, v| {
            dup(&lcf.prefix)?;
            let p = pdgate_glue::core::conf::parse_prefix(v).map_err(|e| e.to_string())?;
            attach_zone(cf, lcf)?;
            lcf.prefix = Some(p);
            Ok(())
        })
    }
}

/// `prefill_servers_list host:port[,host:port…];`
unsafe extern "C" fn cmd_prefill_servers_list(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    lcf: *mut c_void,
) -> *mut c_char {
    // SAFETY: directive handler contract (see `directive`).
    unsafe {
        directive("prefill_servers_list directive", cf, lcf, |lcf, v| {
            dup(&lcf.prefill)?;
            lcf.prefill = Some(parse_servers(v).map_err(|e| e.to_string())?);
            attach_zone(cf, lcf)?;
            Ok(())
        })
    }
}

/// `decode_servers_list host:port[,host:port…];`
unsafe extern "C" fn cmd_decode_servers_list(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    lcf: *mut c_void,
) -> *mut c_char {
    // SAFETY: directive handler contract (see `directive`).
    unsafe {
        directive("decode_servers_list directive", cf, lcf, |lcf, v| {
            dup(&lcf.decode)?;
            lcf.decode = Some(parse_servers(v).map_err(|e| e.to_string())?);
            attach_zone(cf, lcf)?;
            Ok(())
        })
    }
}

/// `bootstrap_ports_list [port[,port…]];`
unsafe extern "C" fn cmd_bootstrap_ports_list(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    lcf: *mut c_void,
) -> *mut c_char {
    // SAFETY: directive handler contract (see `directive`).
    unsafe {
        directive("bootstrap_ports_list directive", cf, lcf, |lcf, v| {
            dup(&lcf.ports)?;
            lcf.ports = Some(parse_ports(v).map_err(|e| e.to_string())?);
            Ok(())
        })
    }
}

/// `pd_distribution p_before_d | pd_together;`
unsafe extern "C" fn cmd_pd_distribution(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    lcf: *mut c_void,
) -> *mut c_char {
    // SAFETY: directive handler contract (see `directive`).
    unsafe {
        directive("pd_distribution directive", cf, lcf, |lcf, v| {
            dup(&lcf.distribution)?;
            lcf.distribution = Some(parse_distribution(v).map_err(|e| e.to_string())?);
            Ok(())
        })
    }
}

/// `pd_backend sglang;`
unsafe extern "C" fn cmd_pd_backend(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    lcf: *mut c_void,
) -> *mut c_char {
    // SAFETY: directive handler contract (see `directive`).
    unsafe {
        directive("pd_backend directive", cf, lcf, |lcf, v| {
            dup(&lcf.backend)?;
            parse_backend(v).map_err(|e| e.to_string())?;
            lcf.backend = Some(());
            Ok(())
        })
    }
}

/// `prefill_refactor_balance least_active | <balancer policy>;`
unsafe extern "C" fn cmd_balance(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    lcf: *mut c_void,
) -> *mut c_char {
    // SAFETY: directive handler contract (see `directive`).
    unsafe {
        directive("prefill_refactor_balance directive", cf, lcf, |lcf, v| {
            dup(&lcf.balance)?;
            let p = Policy::parse(v).ok_or_else(|| {
                format!(
                    "invalid value \"{}\", it must be {}",
                    String::from_utf8_lossy(v),
                    Policy::NAMES
                )
            })?;
            lcf.balance = Some(p);
            Ok(())
        })
    }
}

/// Where the main request is in the flow.
enum State {
    /// Waiting for the client body.
    ReadingBody,
    /// p_before_d: the prefill subrequest is running.
    Prefilling,
    /// p_before_d: the prefill finished; re-entry acts on the outcome.
    PrefillDone { outcome: PrefillOutcome, answer: &'static [u8], content_type: &'static [u8] },
    /// We answer the client ourselves (bad body, internal failure).
    Reject { status: u16, message: String },
    /// The decode body is installed; the rest of the phases run normally.
    Passed,
}

/// The prefill leg of pd_together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefill {
    /// Not started, or p_before_d.
    Idle,
    Running,
    /// Cancelled (the decode failed first); it may not have started yet.
    Cancelled,
    Done,
}

/// A server chosen for one leg, with its counter slot.
struct Chosen {
    addr: String,
    slot: Option<usize>,
    /// Tokens counted on the slot (released with it).
    tokens: u64,
}

/// Per-request context, owned by the main request's pool; dropping it
/// releases the counters still held.
struct Ctx {
    state: State,
    prefill: Prefill,
    /// The prefill subrequest (pd_together).
    sr: *mut ngx_http_request_t,
    /// p_before_d: the decode body, installed after the prefill.
    decode_body: Option<(*mut ngx_chain_t, usize)>,
    p: Option<Chosen>,
    d: Option<Chosen>,
    room: String,
    zone: Option<NonNull<ngx_shm_zone_t>>,
}

impl Ctx {
    /// Releases the prefill's counter (its leg ended).
    fn release_prefill(&mut self) {
        if let Some(c) = self.p.as_mut() {
            if let Some(i) = c.slot.take() {
                release(self.zone, i, c.tokens);
            }
        }
    }
}

/// Takes one request of `tokens` off counter slot `i`.
fn release(zone: Option<NonNull<ngx_shm_zone_t>>, i: usize, tokens: u64) {
    if let Some(t) = zone_table(zone) {
        t.release(i, tokens, 0);
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        self.release_prefill();
        if let Some(c) = self.d.as_mut() {
            if let Some(i) = c.slot.take() {
                release(self.zone, i, c.tokens);
            }
        }
    }
}

/// The request's context, if this module has set one.
///
/// # Safety
/// `r` must be a live request.
unsafe fn ctx_of(r: *mut ngx_http_request_t) -> Option<&'static mut Ctx> {
    // SAFETY: ctx slots hold what this module stored there: a pool-owned Ctx.
    unsafe {
        let idx = (*addr_of!(ngx_http_prefill_refactor_module)).ctx_index;
        ((*(*r).ctx.add(idx)) as *mut Ctx).as_mut()
    }
}

unsafe extern "C" fn ngx_http_prefill_refactor_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    guard::catch("prefill_refactor handler", NGX_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls phase handlers with a live request.
        unsafe { handler(r) }
    })
}

/// The precontent phase handler.
unsafe fn handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: r is live (caller); conf and ctx accessors return this
    // module's own data.
    unsafe {
        if r != (*r).main {
            // A prefill leg cancelled before it started ends here, quietly
            // (the post handler ignores it).
            if let Some(ctx) = ctx_of((*r).main) {
                if ctx.sr == r && ctx.prefill == Prefill::Cancelled {
                    return NGX_HTTP_SERVICE_UNAVAILABLE as ngx_int_t;
                }
            }
            return NGX_DECLINED as ngx_int_t;
        }
        let Some(lcf) = Module::location_conf(&*r) else { return NGX_DECLINED as ngx_int_t };
        if !lcf.enabled() {
            return NGX_DECLINED as ngx_int_t;
        }

        let Some(ctx) = ctx_of(r) else {
            let ctx = Ctx {
                state: State::ReadingBody,
                prefill: Prefill::Idle,
                sr: null_mut(),
                decode_body: None,
                p: None,
                d: None,
                room: String::new(),
                zone: lcf.zone,
            };
            let Some(ctx) = pool::alloc_value((*r).pool, ctx) else {
                return NGX_ERROR as ngx_int_t;
            };
            let idx = (*addr_of!(ngx_http_prefill_refactor_module)).ctx_index;
            *(*r).ctx.add(idx) = ctx as *mut c_void;
            let rc = ngx_http_read_client_request_body(r, Some(ngx_http_prefill_refactor_body));
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
            State::Passed => NGX_DECLINED as ngx_int_t,
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

/// p_before_d: acts on a finished prefill in the main request's context.
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
    // SAFETY: r is live and has not sent a header; the decode chain lives
    // in its pool.
    unsafe {
        match outcome {
            PrefillOutcome::Decode => {
                let (Some((chain, len)), rb) = (ctx.decode_body, (*r).request_body) else {
                    response::finish_with_error(r, 500, "prefill_refactor state lost");
                    return NGX_DONE as ngx_int_t;
                };
                if rb.is_null() {
                    return NGX_ERROR as ngx_int_t;
                }
                (*rb).bufs = chain;
                (*r).headers_in.content_length_n = len as i64;
                NGX_DECLINED as ngx_int_t
            }
            PrefillOutcome::PassThrough { status } => {
                pass_prefill_answer(r, status, answer, content_type);
                NGX_DONE as ngx_int_t
            }
            PrefillOutcome::Fail(f) => {
                response::finish_with_error(r, f.http_status(), &f.to_string());
                NGX_DONE as ngx_int_t
            }
            PrefillOutcome::ClientGone => NGX_ERROR as ngx_int_t,
        }
    }
}

/// Answers the client with the prefill's own error answer and finalizes.
///
/// # Safety
/// `r` must be the live main request, header not sent.
unsafe fn pass_prefill_answer(
    r: *mut ngx_http_request_t,
    status: u16,
    answer: &[u8],
    content_type: &[u8],
) {
    let ct: &[u8] = if content_type.is_empty() { b"application/json" } else { content_type };
    // SAFETY: forwarded from the caller.
    unsafe {
        let rc = response::send(r, status, ct, answer);
        ngx_http_finalize_request(r, rc);
    }
}

unsafe extern "C" fn ngx_http_prefill_refactor_body(r: *mut ngx_http_request_t) {
    guard::catch("prefill_refactor body handler", (), || {
        // SAFETY: nginx calls the body handler with the live main request.
        unsafe { on_body(r) }
    })
}

/// The client body is in: choose, build and start the legs, or arrange a
/// rejection.
unsafe fn on_body(r: *mut ngx_http_request_t) {
    // SAFETY: r is the live main request; ctx and conf are this module's.
    unsafe {
        let Some(ctx) = ctx_of(r) else { return };
        (*r).set_preserve_body(1);
        (*r).write_event_handler = Some(ngx_http_core_run_phases);
        match start(r, ctx) {
            Ok(Distribution::PBeforeD) => ctx.state = State::Prefilling,
            Ok(Distribution::PdTogether) => {
                ctx.state = State::Passed;
                ngx_http_core_run_phases(r);
            }
            Err((status, message)) => {
                let level = if status >= 500 { NGX_LOG_ERR } else { NGX_LOG_WARN };
                ngx_log_error!(level, (*(*r).connection).log, "prefill_refactor: {}", message);
                ctx.state = State::Reject { status, message };
                ngx_http_core_run_phases(r);
            }
        }
    }
}

/// The server of `list` (counted under `role`) that `policy` picks — the
/// fewest requests in flight when it is `None` — now holding one more
/// request of `tokens`.
fn choose(
    zone: Option<NonNull<ngx_shm_zone_t>>,
    list: &[Server],
    role: &[u8],
    policy: Option<Policy>,
    tokens: u64,
    tie: u64,
) -> Option<(usize, Chosen)> {
    let table: Option<SlotTable<'_>> = zone_table(zone);
    let slots: Vec<Option<usize>> = list
        .iter()
        .map(|s| table.and_then(|t| t.find_or_claim(peer_key(role, s.addr.as_bytes()))))
        .collect();
    let load: Vec<(u64, u64)> = slots
        .iter()
        .map(|s| match (table, s) {
            (Some(t), Some(i)) => {
                let (requests, tokens, _) = t.load(*i);
                (requests, tokens)
            }
            _ => (0, 0),
        })
        .collect();
    let i = match policy {
        None => least_active(&load.iter().map(|l| l.0).collect::<Vec<_>>(), tie)?,
        Some(p) => {
            let views: Vec<PeerView> = load
                .iter()
                .map(|&(requests, tokens)| PeerView {
                    available: true,
                    weight: 1,
                    requests,
                    tokens,
                    ..PeerView::default()
                })
                .collect();
            p.choose(&views, tokens, tie)?
        }
    };
    let slot = slots.get(i).copied().flatten();
    if let (Some(t), Some(s)) = (table, slot) {
        t.acquire(s, tokens, 0);
    }
    Some((i, Chosen { addr: list.get(i)?.addr.clone(), slot, tokens }))
}

/// Checks the body, chooses the servers, builds both bodies and starts the
/// prefill leg. Returns the mode.
///
/// # Safety
/// `r` must be the live main request owning `ctx`, its body read.
unsafe fn start(r: *mut ngx_http_request_t, ctx: &mut Ctx) -> Result<Distribution, (u16, String)> {
    // SAFETY: r is live; the body slice and the chains live in the request
    // pool, which also owns ctx.
    unsafe {
        let lcf = Module::location_conf(&*r).ok_or((500, "no configuration".to_owned()))?;
        let (Some(Some(prefix)), Some(plist)) = (&lcf.prefix, &lcf.prefill) else {
            return Err((500, "no configuration".to_owned()));
        };
        let dist = lcf.distribution();
        let src: &'static [u8] =
            body::bytes(r).map_err(|e| (500, format!("cannot read the request body: {e:?}")))?;
        let obj = Object::parse(src)
            .map_err(|e| (400, format!("request body is not a JSON object: {e}")))?;
        check_request(&obj).map_err(|e| (400, e.to_string()))?;

        let (tie, room) = random::with_rng(|g| (g.next_u64(), bootstrap::room(g.next_u64())));
        let policy = lcf.balance.flatten();
        let tokens = tokens_for_bytes(src.len());
        let (pi, p) = choose(lcf.zone, plist, b"prefill_refactor:prefill", policy, tokens, tie)
            .ok_or((500, "no prefill server".to_owned()))?;
        let server = plist.get(pi).ok_or((500, "no prefill server".to_owned()))?;
        ctx.p = Some(p);
        if let Some(dlist) = &lcf.decode {
            ctx.d = choose(lcf.zone, dlist, b"prefill_refactor:decode", policy, tokens, tie >> 17)
                .map(|(_, c)| c);
        }
        ctx.room = room.to_string();
        let port = bootstrap_port(lcf.ports.as_deref().unwrap_or(&[]), pi);
        let members = bootstrap_members(&server.host, port, room);

        let pool = (*r).pool;
        let oom = |_| (500, "out of memory building the request bodies".to_owned());
        let pplan = leg_plan(&obj, members.as_bytes(), Leg::Prefill);
        let (pchain, plen) = body::chain_from_plan(pool, src, &pplan).map_err(oom)?;
        let dplan = leg_plan(&obj, members.as_bytes(), Leg::Decode);
        let (dchain, dlen) = body::chain_from_plan(pool, src, &dplan).map_err(oom)?;

        let uri = response::str_of(&(*r).uri);
        let mut target = Vec::with_capacity(prefix.len() + uri.len());
        target.extend_from_slice(prefix);
        target.extend_from_slice(uri);
        let log = (*(*r).connection).log;
        ngx_log_debug!(
            mask: DebugMask::Http,
            log,
            "prefill_refactor: {} prefill {} (bootstrap port {}), decode {}, room {}, bodies {}/{} bytes",
            dist.name(),
            server.addr,
            port,
            ctx.d.as_ref().map_or("(upstream)", |c| c.addr.as_str()),
            room,
            plen,
            dlen
        );

        let data = ctx as *mut Ctx as *mut c_void;
        let done = Some(ngx_http_prefill_refactor_done as PostHandler);
        match dist {
            Distribution::PBeforeD => {
                ctx.decode_body = Some((dchain, dlen));
                leg::start(r, &target, pchain, plen, Mode::Waited, done, data)
                    .map_err(|_| (500, "cannot create the prefill subrequest".to_owned()))?;
            }
            Distribution::PdTogether => {
                let rb = (*r).request_body;
                if rb.is_null() {
                    return Err((500, "no request body".to_owned()));
                }
                let sr = leg::start(r, &target, pchain, plen, Mode::Background, done, data)
                    .map_err(|_| (500, "cannot create the prefill subrequest".to_owned()))?;
                ctx.sr = sr;
                ctx.prefill = Prefill::Running;
                (*rb).bufs = dchain;
                (*r).headers_in.content_length_n = dlen as i64;
            }
        }
        Ok(dist)
    }
}

type PostHandler =
    unsafe extern "C" fn(*mut ngx_http_request_t, *mut c_void, ngx_int_t) -> ngx_int_t;

/// Post-subrequest handler of the prefill leg (both modes).
unsafe extern "C" fn ngx_http_prefill_refactor_done(
    sr: *mut ngx_http_request_t,
    data: *mut c_void,
    rc: ngx_int_t,
) -> ngx_int_t {
    guard::catch("prefill_refactor done handler", rc, || {
        // SAFETY: data is the main request's pool-owned Ctx (set in
        // `start`); sr is the live subrequest.
        unsafe { prefill_done(sr, &mut *(data as *mut Ctx), rc) }
    })
}

/// # Safety
/// `sr` must be the live prefill subrequest of the request owning `ctx`.
unsafe fn prefill_done(sr: *mut ngx_http_request_t, ctx: &mut Ctx, rc: ngx_int_t) -> ngx_int_t {
    // SAFETY: sr, its connection and its core location conf are live; the
    // answer memory belongs to the shared request pool.
    unsafe {
        ctx.release_prefill();
        let c = (*sr).connection;
        let log = (*c).log;
        if ctx.prefill == Prefill::Cancelled {
            ngx_log_debug!(mask: DebugMask::Http, log, "prefill_refactor: cancelled prefill ended");
            ctx.prefill = Prefill::Done;
            return NGX_OK as ngx_int_t;
        }
        let status = (*sr).headers_out.status as u64;
        let clcf = *(*sr).loc_conf.add((*addr_of!(ngx_http_core_module)).ctx_index)
            as *const pdgate_glue::ffi::ngx_http_core_loc_conf_t;
        let limit = if clcf.is_null() { 0 } else { (*clcf).subrequest_output_buffer_size };
        let cl = (*sr).headers_out.content_length_n;
        // An answer that does not fit makes the in-memory capture fail and
        // flags the shared client connection as broken; the prefill's
        // answer is only checked, so a 2xx that overflowed still counts.
        let buffer_full = (*c).error() != 0 && status != 0 && (cl < 0 || cl as u64 > limit as u64);
        let mut outcome = classify_prefill(rc as i64, status, buffer_full, true);
        if buffer_full {
            (*c).set_error(0);
            if (200..300).contains(&status) {
                outcome = PrefillOutcome::Decode;
            }
        }
        ngx_log_debug!(
            mask: DebugMask::Http,
            log,
            "prefill_refactor: prefill done, rc: {}, status: {}, outcome: {:?}",
            rc,
            status,
            outcome
        );
        let answer: &'static [u8] = body::chain_bytes((*sr).pool, (*sr).out).unwrap_or(&[]);
        let ct = (*sr).headers_out.content_type;
        let content_type: &'static [u8] = if ct.len == 0 || ct.data.is_null() {
            &[]
        } else {
            std::slice::from_raw_parts(ct.data, ct.len)
        };

        if ctx.prefill == Prefill::Idle {
            // p_before_d: the main request acts when it is woken.
            if outcome == PrefillOutcome::ClientGone {
                ctx.state = State::Passed;
                return rc;
            }
            match outcome {
                PrefillOutcome::PassThrough { status } => {
                    ngx_log_error!(
                        NGX_LOG_WARN,
                        log,
                        "prefill_refactor: prefill answered {}, passing its answer to the client",
                        status
                    );
                }
                PrefillOutcome::Fail(f) => {
                    ngx_log_error!(NGX_LOG_ERR, log, "prefill_refactor: {}", f);
                }
                _ => {}
            }
            ctx.state = State::PrefillDone { outcome, answer, content_type };
            return NGX_OK as ngx_int_t;
        }

        // pd_together.
        ctx.prefill = Prefill::Done;
        let failure = match outcome {
            PrefillOutcome::Decode => return NGX_OK as ngx_int_t,
            PrefillOutcome::ClientGone => return rc,
            PrefillOutcome::PassThrough { status } => {
                ngx_log_error!(
                    NGX_LOG_ERR,
                    log,
                    "prefill_refactor: prefill answered {}, cancelling the decode",
                    status
                );
                Err(status)
            }
            PrefillOutcome::Fail(f) => {
                ngx_log_error!(NGX_LOG_ERR, log, "prefill_refactor: {}, cancelling the decode", f);
                Ok(f)
            }
        };
        let main = (*sr).main;
        match leg::upstream_state(main) {
            Some(false) => {
                // The decode has not answered: close it and answer with the
                // prefill's error. Hold a reference for our own answer, as
                // the cancelled upstream drops one.
                (*main).set_count((*main).count() + 1);
                leg::cancel_upstream(main);
                match failure {
                    Err(status) => response::finish_with_error(
                        main,
                        status,
                        &format!("prefill server answered {status}"),
                    ),
                    Ok(f) => response::finish_with_error(main, f.http_status(), &f.to_string()),
                }
                NGX_OK as ngx_int_t
            }
            // The decode is already streaming: nothing clean can be said any
            // more; terminate the request (nginx closes both upstreams).
            Some(true) => NGX_ERROR as ngx_int_t,
            // The decode already ended.
            None => NGX_OK as ngx_int_t,
        }
    }
}

unsafe extern "C" fn ngx_http_prefill_refactor_header_filter(
    r: *mut ngx_http_request_t,
) -> ngx_int_t {
    guard::catch("prefill_refactor header filter", NGX_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls header filters with a live request; the next
        // filter was saved in postconfiguration.
        unsafe {
            if r == (*r).main {
                if let Some(ctx) = ctx_of(r) {
                    decode_header(r, ctx);
                }
            }
            match *addr_of!(NEXT_HEADER_FILTER) {
                Some(next) => next(r),
                None => NGX_ERROR as ngx_int_t,
            }
        }
    })
}

/// pd_together: the main request is answering while the prefill runs. An
/// error status means the decode failed (or nginx failed to reach it):
/// cancel the prefill.
///
/// # Safety
/// `r` must be the live main request owning `ctx`.
unsafe fn decode_header(r: *mut ngx_http_request_t, ctx: &mut Ctx) {
    // SAFETY: r is live; ctx.sr is the prefill subrequest, live while
    // ctx.prefill is Running (it is set to Done by its post handler).
    unsafe {
        let status = (*r).headers_out.status;
        if ctx.prefill != Prefill::Running || status < 400 {
            return;
        }
        ngx_log_error!(
            NGX_LOG_ERR,
            (*(*r).connection).log,
            "prefill_refactor: decode answered {}, cancelling the prefill",
            status
        );
        ctx.prefill = Prefill::Cancelled;
        ctx.release_prefill();
        if leg::upstream_state(ctx.sr).is_some() {
            // Drops the subrequest's reference; its post handler does not
            // run (nginx finalizes it with NGX_DONE).
            leg::cancel_upstream(ctx.sr);
            ctx.prefill = Prefill::Done;
        }
    }
}

/// `$prefill_server`, `$decode_server`, `$bootstrap_room`: the choices of
/// the main request (also read from the prefill subrequest).
///
/// # Safety
/// `r` must be a live request and `v` its variable value.
unsafe fn variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_http_variable_value_t,
    pick: fn(&Ctx) -> Option<&str>,
) -> ngx_int_t {
    // SAFETY: r and v are live (caller); the value points into the
    // pool-owned ctx, which lives as long as the request.
    unsafe {
        let v = &mut *v;
        match ctx_of((*r).main).and_then(|c| pick(c)) {
            Some(s) if !s.is_empty() => variable::set(v, s.as_bytes()),
            _ => variable::not_found(v),
        }
    }
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn ngx_http_prefill_server_variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_http_variable_value_t,
    _data: usize,
) -> ngx_int_t {
    guard::catch("$prefill_server", NGX_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls variable getters with a live request and value.
        unsafe { variable(r, v, |c| c.p.as_ref().map(|p| p.addr.as_str())) }
    })
}

unsafe extern "C" fn ngx_http_decode_server_variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_http_variable_value_t,
    _data: usize,
) -> ngx_int_t {
    guard::catch("$decode_server", NGX_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls variable getters with a live request and value.
        unsafe { variable(r, v, |c| c.d.as_ref().map(|d| d.addr.as_str())) }
    })
}

unsafe extern "C" fn ngx_http_bootstrap_room_variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_http_variable_value_t,
    _data: usize,
) -> ngx_int_t {
    guard::catch("$bootstrap_room", NGX_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls variable getters with a live request and value.
        unsafe { variable(r, v, |c| Some(c.room.as_str())) }
    })
}

/// The counters of the servers of `list` under `role`, as JSON:
/// `{"host:port":{"active":N,"total":M},…}`.
fn counters_json(
    out: &mut String,
    zone: Option<NonNull<ngx_shm_zone_t>>,
    list: &[Server],
    role: &[u8],
) {
    let table = zone_table(zone);
    out.push('{');
    for (k, s) in list.iter().enumerate() {
        let slot = table.and_then(|t| t.find(peer_key(role, s.addr.as_bytes())).map(|i| (t, i)));
        let (active, total) = slot.map_or((0, 0), |(t, i)| (t.load(i).0, t.total(i)));
        if k > 0 {
            out.push(',');
        }
        out.push_str(&format!("\"{}\":{{\"active\":{active},\"total\":{total}}}", s.addr));
    }
    out.push('}');
}

unsafe extern "C" fn ngx_http_prefill_refactor_counters_variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_http_variable_value_t,
    _data: usize,
) -> ngx_int_t {
    guard::catch("$prefill_refactor_counters", NGX_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls variable getters with a live request and
        // value; the text is copied into the request pool.
        unsafe {
            let v = &mut *v;
            let Some(lcf) = Module::location_conf(&*r) else {
                variable::not_found(v);
                return NGX_OK as ngx_int_t;
            };
            let mut out = String::from("{\"prefill\":");
            counters_json(
                &mut out,
                lcf.zone,
                lcf.prefill.as_deref().unwrap_or(&[]),
                b"prefill_refactor:prefill",
            );
            out.push_str(",\"decode\":");
            counters_json(
                &mut out,
                lcf.zone,
                lcf.decode.as_deref().unwrap_or(&[]),
                b"prefill_refactor:decode",
            );
            out.push('}');
            match pdgate_glue::headers::pool_str(r, out.as_bytes()) {
                Some(s) => variable::set(v, pdgate_glue::response::str_of(&s)),
                None => return NGX_ERROR as ngx_int_t,
            }
            NGX_OK as ngx_int_t
        }
    })
}
