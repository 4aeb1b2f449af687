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

#![forbid(unsafe_code)]

use std::borrow::Cow;

use pdgate_glue::core::balance::fails::{
    parse_duration_ms, FailWindow, DEFAULT_FAIL_TIMEOUT_MS, DEFAULT_MAX_FAILS,
};
use pdgate_glue::core::balance::slots::{peer_key, SlotTable};
use pdgate_glue::core::balance::{precise_affinity, uncached, PeerView, Policy, PCA_BATCH_SIZE};
use pdgate_glue::core::bootstrap::{
    self, bootstrap_members, bootstrap_port, bootstrap_port_of, check_ports, check_request,
    least_active, leg_plan, parse_backend, parse_distribution, parse_ports, parse_servers,
    server_of_peer, Distribution, Leg, Server,
};
use pdgate_glue::core::json::Object;
use pdgate_glue::core::pd::flow::{Legs, Shape, Spec};
use pdgate_glue::counters::Zone;
use pdgate_glue::driver::{self, Bodies, Body, Prepared, Protocol, Record, Refusal};
use pdgate_glue::ffi::{ngx_module_t, NGX_LOG_WARN};
use pdgate_glue::http::{Conf, ConfError, Request, RequestExt};
use pdgate_glue::ngx::http::{HttpModule, HttpModuleLocationConf, Merge, MergeConfigError};
use pdgate_glue::ngx::log::DebugMask;
use pdgate_glue::ngx::{ngx_log_debug, ngx_log_error};
use pdgate_glue::{conf, observe, random, NgxError};

/// The counters of `zone` (the shared zone of this configuration).
fn zone_table(zone: Option<&Zone>) -> Option<SlotTable<'_>> {
    zone?.table()
}

/// Per-location configuration; `None` means "not set at this level".
#[derive(Debug, Default)]
pub struct LocConf {
    /// `prefill_refactor <prefix> | off`.
    prefix: Option<Option<Vec<u8>>>,
    prefill: Option<Vec<Server>>,
    /// `prefill_servers_upstream <upstream> [bootstrap=<upstream>]`: the
    /// prefill servers are that upstream's peers as they are at each
    /// request (DNS with `resolve`, health with `pd_health_check`).
    prefill_upstream: Option<PrefillUpstream>,
    decode: Option<Vec<Server>>,
    ports: Option<Vec<u16>>,
    distribution: Option<Distribution>,
    backend: Option<()>,
    /// `prefill_refactor_balance <policy>`: `Some(None)` is least active.
    balance: Option<Option<Policy>>,
    /// `prefill_refactor_max_fails <n>`.
    max_fails: Option<u64>,
    /// `prefill_refactor_fail_timeout <time>` (ms).
    fail_timeout: Option<u64>,
    /// `prefill_refactor_health <upstream>`: the prefill servers' health is
    /// that of the same addresses in this health-checked upstream.
    health: Option<Vec<u8>>,
    /// The shared counters zone (`prefill_refactor`), attached by the
    /// directives that need it, per configuration cycle.
    zone: Option<Zone>,
    /// `prefill_refactor_hold …` (`pd_hold` of this module): requests wait
    /// in the proxy for room in the pools.
    hold: Option<pdgate_glue::hold::Hold>,
    /// `prefill_refactor_tokenizer …` (`pd_tokenizer` of this module).
    tokenizer: Option<pdgate_glue::tokenize::Tokenizer>,
}

/// `prefill_servers_upstream`'s upstreams.
#[derive(Debug, Clone, Default)]
struct PrefillUpstream {
    name: Vec<u8>,
    /// Each prefill pod's bootstrap port is that of its address here.
    bootstrap: Option<Vec<u8>>,
}

impl Merge for LocConf {
    fn merge(&mut self, prev: &Self) -> Result<(), MergeConfigError> {
        if self.prefix.is_none() {
            self.prefix = prev.prefix.clone();
        }
        if self.prefill.is_none() && self.prefill_upstream.is_none() {
            self.prefill = prev.prefill.clone();
            self.prefill_upstream = prev.prefill_upstream.clone();
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
        if self.max_fails.is_none() {
            self.max_fails = prev.max_fails;
        }
        if self.tokenizer.is_none() {
            self.tokenizer = prev.tokenizer.clone();
        }
        if self.fail_timeout.is_none() {
            self.fail_timeout = prev.fail_timeout;
        }
        if self.health.is_none() {
            self.health = prev.health.clone();
        }
        if self.hold.is_none() {
            self.hold = prev.hold.clone();
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
        let servers = match (&self.prefill, &self.prefill_upstream) {
            (Some(_), Some(_)) => {
                return Err("\"prefill_servers_list\" and \"prefill_servers_upstream\" are both set".into())
            }
            (None, None) => {
                return Err("\"prefill_refactor\" needs \"prefill_servers_list\" or \"prefill_servers_upstream\"".into())
            }
            (Some(p), None) => p.len(),
            (None, Some(_)) => {
                if self.ports.as_ref().is_some_and(|p| p.len() > 1) {
                    return Err("\"bootstrap_ports_list\" takes one port (for every server) with \"prefill_servers_upstream\"".into());
                }
                1
            }
        };
        if let Some(ports) = &self.ports {
            check_ports(ports, servers).map_err(|e| format!("\"bootstrap_ports_list\" {e}"))?;
        }
        Ok(())
    }
}

pdgate_glue::http_module! {
    module: ngx_http_prefill_refactor_module,
    preconfiguration: preconfiguration,
    postconfiguration: postconfiguration,
    loc_conf: LocConf,
    merge_loc_conf: yes,
    // The cross-directive checks, reported as nginx reports a bad
    // configuration.
    check_loc_conf: check_loc_conf,
    commands: [
        conf::take1(c"prefill_refactor", Some(cmd_prefill_refactor)),
        conf::take1(c"prefill_servers_list", Some(cmd_prefill_servers_list)),
        conf::loc_command(
            c"prefill_servers_upstream",
            conf::ANY_LEVEL | pdgate_glue::ffi::NGX_CONF_TAKE12,
            Some(cmd_prefill_servers_upstream)
        ),
        conf::take1(c"decode_servers_list", Some(cmd_decode_servers_list)),
        conf::take1(c"bootstrap_ports_list", Some(cmd_bootstrap_ports_list)),
        conf::take1(c"pd_distribution", Some(cmd_pd_distribution)),
        conf::take1(c"pd_backend", Some(cmd_pd_backend)),
        conf::take1(c"prefill_refactor_balance", Some(cmd_balance)),
        conf::take1(c"prefill_refactor_max_fails", Some(cmd_max_fails)),
        conf::take1(c"prefill_refactor_fail_timeout", Some(cmd_fail_timeout)),
        conf::take1(c"prefill_refactor_health", Some(cmd_health)),
        // pd_hold's own name belongs to the prefill module (nginx gives a
        // directive to the first module that declares it).
        conf::loc_command(c"prefill_refactor_hold", conf::ANY_LEVEL | pdgate_glue::ffi::NGX_CONF_1MORE, Some(cmd_hold)),
        conf::loc_command(c"prefill_refactor_tokenizer", conf::ANY_LEVEL | pdgate_glue::ffi::NGX_CONF_1MORE, Some(cmd_tokenizer)),
    ],
}

/// Declares the `$pd_*` variables (the driver's) and this module's own.
fn preconfiguration(cf: &mut Conf) -> Result<(), NgxError> {
    driver::declare_variables::<Sglang>(cf)?;
    cf.add_volatile_variable(b"prefill_server", Some(ngx_http_choice_variable), &PREFILL_SERVER)?;
    cf.add_volatile_variable(b"decode_server", Some(ngx_http_choice_variable), &DECODE_SERVER)?;
    cf.add_volatile_variable(b"bootstrap_room", Some(ngx_http_choice_variable), &BOOTSTRAP_ROOM)?;
    cf.add_volatile_variable(
        b"prefill_refactor_counters",
        Some(ngx_http_prefill_refactor_counters_variable),
        &(),
    )
}

fn postconfiguration(cf: &mut Conf) -> Result<(), NgxError> {
    driver::install::<Sglang>(cf)
}

fn check_loc_conf(cf: &Conf, lcf: &LocConf) -> Result<(), String> {
    let blocks = cf.upstream_blocks();
    let named = [
        ("prefill_refactor_health", lcf.health.as_ref()),
        ("prefill_servers_upstream", lcf.prefill_upstream.as_ref().map(|u| &u.name)),
        (
            "prefill_servers_upstream",
            lcf.prefill_upstream.as_ref().and_then(|u| u.bootstrap.as_ref()),
        ),
    ];
    if let Some(h) = &lcf.hold {
        pdgate_glue::hold::check(cf, h)?;
    }
    for (directive, name) in named {
        if let Some(u) = name.filter(|u| !blocks.contains(&u.as_slice())) {
            return Err(format!(
                "\"{directive}\" names no upstream block \"{}\"",
                String::from_utf8_lossy(u)
            ));
        }
    }
    lcf.check()
}

pdgate_glue::directive!(cmd_tokenizer, LocConf, tokenizer);

/// `prefill_refactor_tokenizer <model dir> [block_size=N] [hash=…] [seed=S] [max_blocks=N];`
fn tokenizer(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    pdgate_glue::tokenize::directive(cf, &mut lcf.tokenizer)
}

pdgate_glue::directive!(cmd_hold, LocConf, hold);

/// `prefill_refactor_hold prefill=<upstream>[:N] decode=<upstream>[:N] [queue=N] [timeout=time] [status=429|503] [retry_after=N];`
fn hold(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    pdgate_glue::hold::directive(cf, &mut lcf.hold)
}

pdgate_glue::directive!(cmd_health, LocConf, health);

/// `prefill_refactor_health <upstream>;`
fn health(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    if lcf.health.is_some() {
        return Err(refuse("is duplicate"));
    }
    lcf.health = Some(arg(cf)?.to_vec());
    Ok(())
}

/// The directive's one argument (`NGX_CONF_TAKE1` guarantees it).
fn arg<'a>(cf: &'a Conf) -> Result<&'a [u8], ConfError> {
    cf.args().first().copied().ok_or_else(|| ConfError::Directive("needs an argument".into()))
}

/// A directive's error message, as nginx prints it after the directive.
fn refuse(msg: impl ToString) -> ConfError {
    ConfError::Directive(msg.to_string())
}

/// Attaches the shared counters zone of the configuration being parsed
/// (every call of a cycle gets the same zone).
fn attach_zone(cf: &mut Conf, lcf: &mut LocConf) -> Result<(), ConfError> {
    if lcf.zone.is_none() {
        let z = Zone::add(cf, "prefill_refactor", Module::module())
            .map_err(|_| refuse("cannot create its shared zone"))?;
        lcf.zone = Some(z);
    }
    Ok(())
}

fn dup<T>(v: &Option<T>) -> Result<(), ConfError> {
    if v.is_some() {
        Err(refuse("is duplicate"))
    } else {
        Ok(())
    }
}

pdgate_glue::directive!(cmd_prefill_refactor, LocConf, prefill_refactor);

/// `prefill_refactor <uri-prefix> | off;`
fn prefill_refactor(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    dup(&lcf.prefix)?;
    let p = pdgate_glue::core::conf::parse_prefix(arg(cf)?).map_err(refuse)?;
    attach_zone(cf, lcf)?;
    lcf.prefix = Some(p);
    Ok(())
}

pdgate_glue::directive!(cmd_prefill_servers_list, LocConf, prefill_servers_list);

/// `prefill_servers_list host:port[,host:port…];`
fn prefill_servers_list(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    dup(&lcf.prefill)?;
    lcf.prefill = Some(parse_servers(arg(cf)?).map_err(refuse)?);
    attach_zone(cf, lcf)
}

pdgate_glue::directive!(cmd_prefill_servers_upstream, LocConf, prefill_servers_upstream);

/// `prefill_servers_upstream <upstream> [bootstrap=<upstream>];`
fn prefill_servers_upstream(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    dup(&lcf.prefill_upstream)?;
    let args = cf.args();
    let name = args.first().ok_or_else(|| refuse("needs an upstream"))?.to_vec();
    let bootstrap = match args.get(1) {
        None => None,
        Some(a) => match a.strip_prefix(b"bootstrap=") {
            Some(b) if !b.is_empty() => Some(b.to_vec()),
            _ => {
                return Err(refuse(format!(
                    "invalid parameter \"{}\", it must be bootstrap=<upstream>",
                    String::from_utf8_lossy(a)
                )))
            }
        },
    };
    lcf.prefill_upstream = Some(PrefillUpstream { name, bootstrap });
    attach_zone(cf, lcf)
}

pdgate_glue::directive!(cmd_decode_servers_list, LocConf, decode_servers_list);

/// `decode_servers_list host:port[,host:port…];`
fn decode_servers_list(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    dup(&lcf.decode)?;
    lcf.decode = Some(parse_servers(arg(cf)?).map_err(refuse)?);
    attach_zone(cf, lcf)
}

pdgate_glue::directive!(cmd_bootstrap_ports_list, LocConf, bootstrap_ports_list);

/// `bootstrap_ports_list [port[,port…]];`
fn bootstrap_ports_list(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    dup(&lcf.ports)?;
    lcf.ports = Some(parse_ports(arg(cf)?).map_err(refuse)?);
    Ok(())
}

pdgate_glue::directive!(cmd_pd_distribution, LocConf, pd_distribution);

/// `pd_distribution p_before_d | pd_together;`
fn pd_distribution(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    dup(&lcf.distribution)?;
    lcf.distribution = Some(parse_distribution(arg(cf)?).map_err(refuse)?);
    Ok(())
}

pdgate_glue::directive!(cmd_pd_backend, LocConf, pd_backend);

/// `pd_backend sglang;`
fn pd_backend(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    dup(&lcf.backend)?;
    parse_backend(arg(cf)?).map_err(refuse)?;
    lcf.backend = Some(());
    Ok(())
}

pdgate_glue::directive!(cmd_max_fails, LocConf, max_fails);

/// `prefill_refactor_max_fails <number>;` (default 1; 0: never left out)
fn max_fails(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    dup(&lcf.max_fails)?;
    let v = arg(cf)?;
    let n = std::str::from_utf8(v).ok().and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| {
        refuse(format!("invalid value \"{}\", it must be a number", String::from_utf8_lossy(v)))
    })?;
    lcf.max_fails = Some(n);
    Ok(())
}

pdgate_glue::directive!(cmd_fail_timeout, LocConf, fail_timeout);

/// `prefill_refactor_fail_timeout <time>;` (default 10s)
fn fail_timeout(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    dup(&lcf.fail_timeout)?;
    let v = arg(cf)?;
    let ms = parse_duration_ms(v).ok_or_else(|| {
        refuse(format!("invalid value \"{}\", it must be a time", String::from_utf8_lossy(v)))
    })?;
    lcf.fail_timeout = Some(ms);
    Ok(())
}

pdgate_glue::directive!(cmd_balance, LocConf, balance);

/// `prefill_refactor_balance least_active | <balancer policy>;`
fn balance(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    dup(&lcf.balance)?;
    let v = arg(cf)?;
    let p = Policy::parse(v).ok_or_else(|| {
        refuse(format!(
            "invalid value \"{}\", it must be {}",
            String::from_utf8_lossy(v),
            Policy::NAMES
        ))
    })?;
    lcf.balance = Some(p);
    Ok(())
}

/// A server chosen for one leg, with its counter slot.
struct Chosen {
    addr: String,
    slot: Option<usize>,
    /// Tokens counted on the slot (released with it).
    tokens: u64,
    /// Its cost there: the tokens the engine computes (precise choice).
    cost: u64,
}

/// The module's per-request state: its choices. The driver releases the
/// counters through [`Protocol::release`] when each leg ends, and on every
/// other path when the request goes away.
#[derive(Default)]
pub struct Choices {
    p: Option<Chosen>,
    d: Option<Chosen>,
    room: String,
    zone: Option<Zone>,
    /// Prefill servers tried (by address), the last one running.
    tried: Vec<String>,
}

impl Choices {
    fn release(&mut self, leg: Legs) {
        let c = if leg == Legs::PREFILL { self.p.as_mut() } else { self.d.as_mut() };
        if let Some(c) = c {
            if let (Some(i), Some(t)) = (c.slot.take(), zone_table(self.zone.as_ref())) {
                t.release(i, c.tokens, c.cost);
            }
        }
    }
}

/// SGLang's bootstrap protocol (`p_before_d` and `pd_together`).
struct Sglang;

impl Protocol for Sglang {
    type State = Choices;
    const NAME: &'static str = "prefill_refactor";

    fn module() -> &'static ngx_module_t {
        Module::module()
    }

    fn spec(r: &Request) -> Option<Spec> {
        let lcf = Module::location_conf(r)?;
        if !lcf.enabled() {
            return None;
        }
        let shape = match lcf.distribution() {
            Distribution::PBeforeD => Shape::Sequential,
            Distribution::PdTogether => Shape::Together,
        };
        // A prefill that gave no answer is tried again on other servers
        // (before anything reached the client: p_before_d only).
        // An upstream's list may grow: as many retries as a list allows.
        let others = match (&lcf.prefill, &lcf.prefill_upstream) {
            (Some(p), _) => p.len().saturating_sub(1),
            (None, Some(_)) => MAX_RETRIES,
            (None, None) => 0,
        };
        let retries = match shape {
            Shape::Sequential => others.min(MAX_RETRIES) as u8,
            _ => 0,
        };
        Some(Spec { encode: false, shape, retries, fallback: false })
    }

    /// Checks the body, chooses the servers, builds both bodies.
    fn prepare(r: &Request, bodies: &Bodies, st: &mut Choices) -> Result<Prepared, Refusal> {
        let lcf = Module::location_conf(r).ok_or(Refusal::new(500, "no configuration"))?;
        let obj = Object::parse(bodies.src()).map_err(|e| {
            Refusal::new(e.status(), format!("request body is not a JSON object: {e}"))
        })?;
        check_request(&obj).map_err(|e| Refusal::new(400, e.to_string()))?;
        st.zone = lcf.zone;
        let mut p = legs(r, lcf, bodies, &obj, st, true)?;
        p.obj = Some(obj);
        Ok(p)
    }

    fn prefill_ended(r: &Request, st: &mut Choices, answered: bool) {
        let Some(lcf) = Module::location_conf(r) else { return };
        let Some(addr) = st.tried.last() else { return };
        let Some(w) = fail_window(lcf.zone.as_ref(), addr) else { return };
        if answered {
            w.succeeded();
        } else {
            let max = lcf.max_fails.unwrap_or(DEFAULT_MAX_FAILS);
            let timeout = lcf.fail_timeout.unwrap_or(DEFAULT_FAIL_TIMEOUT_MS);
            if w.failed(observe::now_ms(), max, timeout) {
                ngx_log_error!(
                    NGX_LOG_WARN,
                    r.log(),
                    "prefill_refactor: prefill server {} left out for {} ms after {} failure(s)",
                    addr,
                    timeout,
                    max
                );
            }
        }
    }

    fn retry(
        r: &Request,
        bodies: &Bodies,
        obj: Option<&Object<'static>>,
        st: &mut Choices,
    ) -> Option<Prepared> {
        let lcf = Module::location_conf(r)?;
        legs(r, lcf, bodies, obj?, st, false).ok()
    }

    fn decode_after_prefill(
        _: &Request,
        _: &Bodies,
        _: &Object<'static>,
        _: &'static [u8],
        _: &mut Record,
    ) -> Result<Body, Refusal> {
        // Both bodies are built before the prefill starts.
        Err(Refusal::new(500, "no decode body prepared"))
    }

    fn hold(r: &Request) -> Option<&'static pdgate_glue::hold::Hold> {
        Module::location_conf(r)?.hold.as_ref()
    }

    fn tokenizer(r: &Request) -> Option<&'static pdgate_glue::tokenize::Tokenizer> {
        Module::location_conf(r)?.tokenizer.as_ref()
    }

    fn release(st: &mut Choices, legs: Legs) {
        for leg in [Legs::PREFILL, Legs::DECODE] {
            if legs.contains(leg) {
                st.release(leg);
            }
        }
    }
}

/// Most prefill servers one request tries (after the first).
const MAX_RETRIES: usize = 2;

/// The failure state of prefill server `addr` (nginx's max_fails/fail_timeout).
fn fail_window<'a>(zone: Option<&'a Zone>, addr: &str) -> Option<FailWindow<'a>> {
    let t = zone_table(zone)?;
    let i = t.find_or_claim(peer_key(b"prefill_refactor:fails", addr.as_bytes()))?;
    FailWindow::in_slot(&t, i)
}

/// The prefill servers of a location now: its list, or its upstream's peers
/// that are not down (with the bootstrap upstream's peers); `None` without
/// either, or when the upstream has no server up.
fn prefill_servers(lcf: &LocConf) -> Option<(Cow<'_, [Server]>, Vec<Server>)> {
    if let Some(p) = &lcf.prefill {
        return Some((Cow::Borrowed(p.as_slice()), Vec::new()));
    }
    let u = lcf.prefill_upstream.as_ref()?;
    let up: Vec<Server> = pdgate_glue::upstream::peer_names(&u.name)?
        .into_iter()
        .filter(|p| !p.down)
        .filter_map(|p| server_of_peer(&p.addr))
        .collect();
    let boot = u
        .bootstrap
        .as_ref()
        .and_then(|b| pdgate_glue::upstream::peer_names(b))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| server_of_peer(&p.addr))
        .collect();
    (!up.is_empty()).then_some((Cow::Owned(up), boot))
}

/// Chooses the prefill (and, the first time, the decode) server and builds
/// both bodies for them. A retry (`first` false) leaves out the servers
/// tried; a server inside its fail window is left out while another is not.
fn legs(
    r: &Request,
    lcf: &LocConf,
    bodies: &Bodies,
    obj: &Object<'_>,
    st: &mut Choices,
    first: bool,
) -> Result<Prepared, Refusal> {
    let Some(Some(prefix)) = &lcf.prefix else {
        return Err(Refusal::new(500, "no configuration"));
    };
    let Some((plist, boot)) = prefill_servers(lcf) else {
        return Err(Refusal::new(502, "no prefill server is up"));
    };
    let plist = &*plist;
    let (tie, room) = random::with_rng(|g| (g.next_u64(), bootstrap::room(g.next_u64())));
    let policy = lcf.balance.flatten();
    let tokens = driver::request_tokens::<Sglang>(r, bodies.src());
    let now = observe::now_ms();
    let usable: Vec<bool> = plist
        .iter()
        .map(|s| {
            !st.tried.contains(&s.addr)
                && fail_window(lcf.zone.as_ref(), &s.addr).is_none_or(|w| w.available(now))
                && lcf.health.as_ref().is_none_or(|u| {
                    pdgate_glue::health::peer_eligible(u, s.addr.as_bytes()).unwrap_or(true)
                })
        })
        .collect();
    let untried: Vec<bool> = plist.iter().map(|s| !st.tried.contains(&s.addr)).collect();
    let eligible = if usable.contains(&true) { usable } else { untried };
    if !eligible.contains(&true) {
        return Err(Refusal::new(502, "no prefill server left to try"));
    }
    let mut hold = Legs::NONE;
    // With the engines' KV events and the prompt's keys: where its prefix
    // is cached, weighed against load.
    let cached = lcf.prefill_upstream.as_ref().and_then(|u| {
        let addrs: Vec<&[u8]> = plist.iter().map(|s| s.addr.as_bytes()).collect();
        pdgate_glue::kv::cached_tokens(r, &u.name, &addrs)
    });
    let (pi, p) = choose(
        lcf.zone.as_ref(),
        plist,
        b"prefill_refactor:prefill",
        Choice { policy, cached: cached.as_deref() },
        tokens,
        tie,
        &eligible,
    )
    .ok_or(Refusal::new(500, "no prefill server"))?;
    let server = plist.get(pi).ok_or(Refusal::new(500, "no prefill server"))?;
    st.p = Some(p);
    st.tried.push(server.addr.clone());
    hold = hold.with(Legs::PREFILL);
    if first {
        if let Some(dlist) = &lcf.decode {
            let all = vec![true; dlist.len()];
            st.d = choose(
                lcf.zone.as_ref(),
                dlist,
                b"prefill_refactor:decode",
                Choice { policy, cached: None },
                tokens,
                tie >> 17,
                &all,
            )
            .map(|(_, c)| c);
            hold = hold.with(Legs::DECODE);
        }
    }
    st.room = room.to_string();
    let ports = lcf.ports.as_deref().unwrap_or(&[]);
    let port = if lcf.prefill_upstream.is_some() {
        bootstrap_port_of(&server.host, &boot, ports)
    } else {
        bootstrap_port(ports, pi)
    };
    let members = bootstrap_members(&server.host, port, room);
    let pbody = bodies.build(&leg_plan(obj, members.as_bytes(), Leg::Prefill))?;
    let dbody = bodies.build(&leg_plan(obj, members.as_bytes(), Leg::Decode))?;

    let target = driver::leg_uri(prefix, r.path().as_bytes());
    ngx_log_debug!(
        mask: DebugMask::Http,
        r.log(),
        "prefill_refactor: {} prefill {} (bootstrap port {}), decode {}, room {}, bodies {}/{} bytes",
        lcf.distribution().name(),
        server.addr,
        port,
        st.d.as_ref().map_or("(upstream)", |c| c.addr.as_str()),
        room,
        pbody.len(),
        dbody.len()
    );
    Ok(Prepared {
        prefill: Some((target, pbody)),
        decode: Some(dbody),
        hold,
        ..Prepared::default()
    })
}

/// The server of `list` (counted under `role`) that `policy` picks among
/// the `eligible` ones — the fewest requests in flight when it is `None` —
/// now holding one more request of `tokens`.
/// How a list's server is chosen: the location's policy, or with the
/// tokens of the prompt each server holds in its prefix cache
/// (`pd_kv_events`), `precise_prefix` (cached tokens against load).
struct Choice<'a> {
    policy: Option<Policy>,
    cached: Option<&'a [u64]>,
}

fn choose(
    zone: Option<&Zone>,
    list: &[Server],
    role: &[u8],
    how: Choice<'_>,
    tokens: u64,
    tie: u64,
    eligible: &[bool],
) -> Option<(usize, Chosen)> {
    let table: Option<SlotTable<'_>> = zone_table(zone);
    let slots: Vec<Option<usize>> = list
        .iter()
        .map(|s| table.and_then(|t| t.find_or_claim(peer_key(role, s.addr.as_bytes()))))
        .collect();
    let load: Vec<(u64, u64, u64)> = slots
        .iter()
        .map(|s| match (table, s) {
            (Some(t), Some(i)) => t.load(*i),
            _ => (0, 0, 0),
        })
        .collect();
    let ok = |i: usize| eligible.get(i).copied().unwrap_or(false);
    let views = || -> Vec<PeerView> {
        load.iter()
            .enumerate()
            .map(|(i, &(requests, tokens, cost))| PeerView {
                available: ok(i),
                weight: 1,
                requests,
                tokens,
                cost,
                ..PeerView::default()
            })
            .collect()
    };
    let i = match (how.cached, how.policy) {
        (Some(cached), _) => precise_affinity(&views(), tokens, cached, PCA_BATCH_SIZE, tie)?,
        (None, None) => {
            let active: Vec<u64> =
                load.iter().enumerate().map(|(i, l)| if ok(i) { l.0 } else { u64::MAX }).collect();
            least_active(&active, tie).filter(|&i| ok(i))?
        }
        (None, Some(p)) => p.choose(&views(), tokens, tie)?,
    };
    let slot = slots.get(i).copied().flatten();
    let cost = how.cached.map_or(0, |c| uncached(tokens, c.get(i).copied().unwrap_or(0)));
    if let (Some(t), Some(s)) = (table, slot) {
        t.acquire(s, tokens, cost);
    }
    Some((i, Chosen { addr: list.get(i)?.addr.clone(), slot, tokens, cost }))
}

/// Which of a request's choices a variable shows.
type Pick = fn(&Choices) -> Option<&str>;

static PREFILL_SERVER: Pick = |c| c.p.as_ref().map(|p| p.addr.as_str());
static DECODE_SERVER: Pick = |c| c.d.as_ref().map(|d| d.addr.as_str());
static BOOTSTRAP_ROOM: Pick = |c| Some(c.room.as_str());

pdgate_glue::variable_getter!(ngx_http_choice_variable, Pick, choice);

/// `$prefill_server`, `$decode_server`, `$bootstrap_room`: the choices of
/// the main request (also read from the prefill subrequest); the value
/// lives in the pool-owned context, as long as the request.
fn choice<'r>(r: &'r mut Request, pick: &'r Pick) -> Option<&'r [u8]> {
    let s = pick(driver::state::<Sglang>(r)?)?;
    (!s.is_empty()).then_some(s.as_bytes())
}

/// The counters of the servers of `list` under `role`, as JSON:
/// `{"host:port":{"active":N,"total":M},…}`.
fn counters_json(out: &mut String, zone: Option<&Zone>, list: &[Server], role: &[u8]) {
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

pdgate_glue::variable_getter!(ngx_http_prefill_refactor_counters_variable, (), counters);

/// `$prefill_refactor_counters`: the location's servers and their
/// counters, copied into the request pool.
fn counters<'r>(r: &'r mut Request, _: &'r ()) -> Option<&'r [u8]> {
    let lcf = Module::location_conf(r)?;
    let mut out = String::from("{\"prefill\":");
    let prefill = prefill_servers(lcf).map(|(p, _)| p).unwrap_or_default();
    counters_json(&mut out, lcf.zone.as_ref(), &prefill, b"prefill_refactor:prefill");
    out.push_str(",\"decode\":");
    counters_json(
        &mut out,
        lcf.zone.as_ref(),
        lcf.decode.as_deref().unwrap_or(&[]),
        b"prefill_refactor:decode",
    );
    out.push('}');
    r.pool_copy(out.as_bytes())
}
