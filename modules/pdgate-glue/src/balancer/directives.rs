//! A balancer module's directives and their command-table entries.
//!
//! - [`flag`]: `<name> on|off;` (and [`flag_or_bare`]: also `<name>;`);
//!   [`role`]: `<name> prefill|decode|off;`. Turning the balancer on
//!   attaches the module's zone to the upstream and warns `load balancing
//!   method redefined` when the block already has one.
//! - [`param`]: `<name>_<parameter> VALUE;`, looked up by name in the
//!   policy's [`ParamSpec`](pdgate_core::balance::params::ParamSpec) table.
//! - [`shm_size`]: `<name>_shm_size SIZE;` at http level.
//!
//! A bad value reads as nginx's own: `invalid value "x" in "name"
//! directive, it must be ...`.

use std::ffi::{c_char, c_void, CStr};
use std::ptr::null_mut;
use std::sync::atomic::Ordering;

use ngx::core::NGX_CONF_ERROR;
use ngx::ffi::{
    ngx_command_t, ngx_conf_t, ngx_http_upstream_init_round_robin, ngx_http_upstream_module,
    ngx_http_upstream_srv_conf_t, ngx_module_t, ngx_uint_t, NGX_CONF_FLAG, NGX_CONF_NOARGS,
    NGX_CONF_TAKE1, NGX_HTTP_UPSTREAM_BACKUP, NGX_HTTP_UPSTREAM_CREATE, NGX_HTTP_UPSTREAM_DOWN,
    NGX_HTTP_UPSTREAM_FAIL_TIMEOUT, NGX_HTTP_UPSTREAM_MAX_CONNS, NGX_HTTP_UPSTREAM_MAX_FAILS,
    NGX_HTTP_UPSTREAM_WEIGHT, NGX_LOG_WARN,
};
use ngx::http::HttpModuleConfExt;
use pdgate_core::balance::params::{ParamError, Role};

use super::{zone, Balancer, UpstreamConf};
use crate::conf::{self, str_bytes};

/// A directive handler.
type Handler =
    unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char;

/// An upstream-context directive of `balancer` (its handlers find the
/// balancer in `post`).
const fn upstream_command(
    name: &'static CStr,
    takes: u32,
    set: Handler,
    balancer: &'static Balancer,
) -> ngx_command_t {
    ngx_command_t {
        post: balancer as *const Balancer as *mut c_void,
        ..conf::upstream_command(name, takes, Some(set))
    }
}

/// `<name> on|off;`
pub const fn flag(name: &'static CStr, balancer: &'static Balancer) -> ngx_command_t {
    upstream_command(name, NGX_CONF_FLAG, cmd_flag, balancer)
}

/// `<name>;`, `<name> on;` or `<name> off;` (length_balance's form: the
/// bare directive turns it on, as in the original).
pub const fn flag_or_bare(name: &'static CStr, balancer: &'static Balancer) -> ngx_command_t {
    upstream_command(name, NGX_CONF_NOARGS | NGX_CONF_TAKE1, cmd_flag_or_bare, balancer)
}

/// `<name> prefill|decode|off;` (pd_score_balance's role word).
pub const fn role(name: &'static CStr, balancer: &'static Balancer) -> ngx_command_t {
    upstream_command(name, NGX_CONF_TAKE1, cmd_role, balancer)
}

/// `<balancer>_<parameter> VALUE;`: the directive's name, past the
/// balancer's name and `_`, names a parameter of the policy's table.
pub const fn param(name: &'static CStr, balancer: &'static Balancer) -> ngx_command_t {
    upstream_command(name, NGX_CONF_TAKE1, cmd_param, balancer)
}

/// `<balancer>_shm_size SIZE;` at http level.
pub const fn shm_size(name: &'static CStr) -> ngx_command_t {
    ngx_command_t {
        name: conf::name(name),
        type_: (ngx::ffi::NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(cmd_shm_size),
        conf: ngx::ffi::NGX_HTTP_MAIN_CONF_OFFSET as ngx_uint_t,
        offset: 0,
        post: null_mut(),
    }
}

/// A location-context, no-argument directive (a `_status` directive);
/// `set` installs the content handler.
pub const fn location_command(name: &'static CStr, set: Handler) -> ngx_command_t {
    ngx_command_t {
        name: conf::name(name),
        type_: (ngx::ffi::NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS) as ngx_uint_t,
        set: Some(set),
        conf: ngx::ffi::NGX_HTTP_LOC_CONF_OFFSET as ngx_uint_t,
        offset: 0,
        post: null_mut(),
    }
}

/// Forgets this module's http-level settings (preconfiguration: a reload
/// parses the configuration again in the same process).
pub fn reset_main_settings() {
    zone::reset();
}

/// The argument of a one-argument directive.
///
/// # Safety
/// `cf` must be a directive handler's conf.
unsafe fn arg<'a>(cf: *mut ngx_conf_t) -> &'a [u8] {
    // SAFETY: forwarded.
    unsafe { conf::args(cf).get(1).map(|a| str_bytes(a)).unwrap_or(&[]) }
}

/// The handler's srv conf and the balancer in `cmd->post`.
///
/// # Safety
/// nginx's directive handler contract, with `conf` this module's
/// [`UpstreamConf`] and `cmd` an entry made here.
unsafe fn parts<'a>(
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> Option<(&'a mut UpstreamConf, &'static Balancer)> {
    // SAFETY: as documented: `post` points at the module's static.
    unsafe {
        let b = ((*cmd).post as *const Balancer).as_ref()?;
        Some(((conf as *mut UpstreamConf).as_mut()?, b))
    }
}

unsafe extern "C" fn cmd_flag(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    crate::guard::catch("balancer directive", NGX_CONF_ERROR, || {
        // SAFETY: nginx's directive handler contract.
        unsafe {
            let v = arg(cf);
            match pdgate_core::conf::parse_flag(v) {
                Ok(on) => set_enabled(cf, cmd, conf, Role::Any, on),
                Err(_) => conf::invalid_value(cf, v, "\"on\" or \"off\""),
            }
        }
    })
}

unsafe extern "C" fn cmd_flag_or_bare(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    crate::guard::catch("balancer directive", NGX_CONF_ERROR, || {
        // SAFETY: nginx's directive handler contract.
        unsafe {
            if conf::args(cf).len() == 1 {
                return set_enabled(cf, cmd, conf, Role::Any, true);
            }
            cmd_flag(cf, cmd, conf)
        }
    })
}

unsafe extern "C" fn cmd_role(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    crate::guard::catch("balancer directive", NGX_CONF_ERROR, || {
        // SAFETY: nginx's directive handler contract.
        unsafe {
            match arg(cf) {
                b"prefill" => set_enabled(cf, cmd, conf, Role::Prefill, true),
                b"decode" => set_enabled(cf, cmd, conf, Role::Decode, true),
                b"off" => set_enabled(cf, cmd, conf, Role::Any, false),
                v => conf::invalid_value(cf, v, "\"prefill\", \"decode\" or \"off\""),
            }
        }
    })
}

/// Turns the balancer on or off for the upstream being parsed, once.
///
/// # Safety
/// As [`cmd_flag`].
unsafe fn set_enabled(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
    role: Role,
    on: bool,
) -> *mut c_char {
    // SAFETY: as documented.
    unsafe {
        let Some((c, b)) = parts(cmd, conf) else { return NGX_CONF_ERROR };
        if c.enabled != -1 {
            return conf::error(cf, "is duplicate");
        }
        c.enabled = isize::from(on);
        c.params_of(b).role = role;
        if on {
            if let Err(e) = enable(cf, c, (b.module)(), b.zone) {
                return conf::error(cf, e);
            }
        }
        conf::OK
    }
}

/// Attaches the balancer to the `upstream {}` being parsed: accepts the
/// usual `server` parameters, claims the block's balancing method and
/// attaches the module's shared zone.
///
/// # Safety
/// `cf` must be a directive handler's conf in `upstream {}` context.
unsafe fn enable(
    cf: *mut ngx_conf_t,
    conf: &mut UpstreamConf,
    module: &ngx_module_t,
    zone_name: &'static str,
) -> Result<(), &'static str> {
    // SAFETY: in upstream context the upstream module's srv conf exists.
    unsafe {
        let uscf = (*cf)
            .http_server_conf_unchecked::<ngx_http_upstream_srv_conf_t>(&*std::ptr::addr_of!(
                ngx_http_upstream_module
            ))
            .ok_or("is not allowed here")?
            .as_ptr();
        claim_method(cf, uscf);
        (*uscf).flags |= (NGX_HTTP_UPSTREAM_CREATE
            | NGX_HTTP_UPSTREAM_WEIGHT
            | NGX_HTTP_UPSTREAM_MAX_CONNS
            | NGX_HTTP_UPSTREAM_MAX_FAILS
            | NGX_HTTP_UPSTREAM_FAIL_TIMEOUT
            | NGX_HTTP_UPSTREAM_DOWN
            | NGX_HTTP_UPSTREAM_BACKUP) as ngx_uint_t;
        conf.zone = zone::add(cf, zone_name, module).ok_or("cannot create its shared zone")?;
        conf.upstream_name = str_bytes(&(*uscf).host).to_vec();
    }
    Ok(())
}

/// Warns, as nginx's balancers do, when the block already has a balancing
/// method, and marks it as having one. nginx's methods (`least_conn`,
/// `hash`, `ip_hash`, `random`) set `peer.init_upstream`; so does this
/// function, to round robin's init, which nginx calls for a NULL one
/// anyway — so a pdgate balancer is seen by the next one, and by nginx's
/// methods after it. `keepalive` also sets `peer.init_upstream` (to its
/// wrapper); when it was given first, a method before it cannot be told
/// from it, and nothing is said.
///
/// # Safety
/// `uscf` must be the srv conf of the `upstream {}` being parsed.
unsafe fn claim_method(cf: *mut ngx_conf_t, uscf: *mut ngx_http_upstream_srv_conf_t) {
    // SAFETY: as documented.
    unsafe {
        let rr = ngx_http_upstream_init_round_robin as *const () as usize;
        match (*uscf).peer.init_upstream {
            None => (*uscf).peer.init_upstream = Some(ngx_http_upstream_init_round_robin),
            Some(init) if init as *const () as usize == rr || !keepalive_set(uscf) => {
                ngx::ngx_conf_log_error!(NGX_LOG_WARN, cf, "load balancing method redefined");
            }
            Some(_) => {}
        }
    }
}

/// Whether `keepalive` was given in the block (its srv conf's first field,
/// `max_cached`, is non-zero once it is). The keepalive module is found by
/// its symbol, so nginx built without it is no problem.
///
/// # Safety
/// As [`claim_method`].
unsafe fn keepalive_set(uscf: *mut ngx_http_upstream_srv_conf_t) -> bool {
    // SAFETY: dlsym with a NUL-terminated name; the symbol, when nginx
    // exports it, is the keepalive module's ngx_module_t, whose srv conf
    // (allocated for every upstream block before its directives are read)
    // starts with `ngx_uint_t max_cached` (since nginx 1.1.4).
    unsafe {
        let m = libc::dlsym(libc::RTLD_DEFAULT, c"ngx_http_upstream_keepalive_module".as_ptr())
            as *const ngx_module_t;
        let (Some(m), Some(us)) = (m.as_ref(), uscf.as_ref()) else { return false };
        if us.srv_conf.is_null() {
            return false;
        }
        let kcf = *us.srv_conf.add(m.ctx_index) as *const ngx_uint_t;
        kcf.as_ref().is_some_and(|&max_cached| max_cached != 0)
    }
}

unsafe extern "C" fn cmd_param(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    crate::guard::catch("balancer directive", NGX_CONF_ERROR, || {
        // SAFETY: nginx's directive handler contract.
        unsafe {
            let Some((c, b)) = parts(cmd, conf) else { return NGX_CONF_ERROR };
            let directive = String::from_utf8_lossy(str_bytes(&(*cmd).name));
            let name = directive
                .strip_prefix(b.name)
                .and_then(|s| s.strip_prefix('_'))
                .unwrap_or(&directive);
            let v = arg(cf);
            match c.params_of(b).set(name, v) {
                Ok(()) => conf::OK,
                Err(ParamError::Invalid { expects, .. }) => conf::invalid_value(cf, v, &expects),
                Err(e) => conf::error(cf, &e.to_string()),
            }
        }
    })
}

unsafe extern "C" fn cmd_shm_size(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    crate::guard::catch("balancer directive", NGX_CONF_ERROR, || {
        // SAFETY: nginx's directive handler contract.
        unsafe {
            if zone::SHM_SIZE.load(Ordering::Relaxed) != 0 {
                return conf::error(cf, "is duplicate");
            }
            let v = arg(cf);
            match pdgate_core::conf::parse_size(v) {
                Some(n) if n >= 64 << 10 => {
                    zone::SHM_SIZE.store(n, Ordering::Relaxed);
                    conf::OK
                }
                _ => conf::invalid_value(cf, v, "a size of at least 64k"),
            }
        }
    })
}
