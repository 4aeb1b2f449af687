//! What the health module shows: the status page, the proxy's readiness
//! (`pd_health_ready`, checked at postconfiguration), and the module macro.

use std::ffi::c_char;
use std::ptr::addr_of;

use ngx::ffi::{
    ngx_conf_t, ngx_http_conf_ctx_t, ngx_http_upstream_main_conf_t, ngx_http_upstream_module,
    ngx_http_upstream_srv_conf_t, ngx_int_t, ngx_module_t, ngx_uint_t, NGX_ERROR,
    NGX_HTTP_UPSTREAM_CREATE, NGX_OK,
};
use pdgate_core::health::Outcome;

use super::{prober_pid, snapshot, UpstreamHealth};
use crate::conf::str_bytes;

/// The text of a `pd_health_status` page: the prober, then one line per
/// checked peer.
pub fn status_text() -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "prober pid {}", prober_pid());
    for (u, p, snap) in snapshot() {
        let (u, p) = (String::from_utf8_lossy(&u), String::from_utf8_lossy(&p));
        match snap {
            None => {
                let _ = writeln!(s, "upstream {u} peer {p} down (configured)");
            }
            Some(x) => {
                let _ = writeln!(
                    s,
                    "upstream {u} peer {p} {} eligible={} probes={} bad={} last=\"{}\" checked_ago_ms={} latency_us={}",
                    x.status.name(),
                    u8::from(x.eligible),
                    x.probes,
                    x.bad,
                    x.last.map_or_else(|| "none".to_owned(), Outcome::describe),
                    x.checked_ago_ms.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                    x.latency_us
                );
            }
        }
    }
    s
}

/// Whether each upstream of `names` (all checked ones when empty) has a
/// peer that may take traffic; the first that has none, named, otherwise.
pub fn readiness(names: &[Vec<u8>]) -> Result<(), String> {
    let snap = snapshot();
    let mut wanted: Vec<Vec<u8>> = names.to_vec();
    if wanted.is_empty() {
        for (u, _, _) in &snap {
            if !wanted.contains(u) {
                wanted.push(u.clone());
            }
        }
    }
    for w in &wanted {
        let ok = snap.iter().any(|(u, _, s)| u == w && s.is_some_and(|s| s.eligible));
        if !ok {
            return Err(format!(
                "no healthy server in upstream \"{}\"",
                String::from_utf8_lossy(w)
            ));
        }
    }
    Ok(())
}

/// `pd_health_ready [upstream …]`'s location settings.
#[derive(Debug, Default)]
pub struct ReadyConf {
    pub upstreams: Vec<Vec<u8>>,
}

/// Upstreams named by `pd_health_ready` in this configuration, with where,
/// checked at postconfiguration (this module copy's own list).
static READY_NAMES: std::sync::Mutex<Vec<(Vec<u8>, String)>> = std::sync::Mutex::new(Vec::new());

/// Forgets the previous configuration's names (preconfiguration).
pub fn reset() {
    if let Ok(mut v) = READY_NAMES.lock() {
        v.clear();
    }
}

/// `pd_health_ready [upstream …];` in a location.
///
/// # Safety
/// nginx's directive handler contract; `conf` is this module's location
/// conf.
pub unsafe fn cmd_ready(cf: *mut ngx_conf_t, conf: *mut ReadyConf) -> *mut c_char {
    // SAFETY: as documented.
    unsafe {
        let Some(conf) = conf.as_mut() else { return ngx::core::NGX_CONF_ERROR };
        let place = crate::conf::place(cf);
        for a in crate::conf::args(cf).iter().skip(1) {
            let name = str_bytes(a).to_vec();
            if let Ok(mut v) = READY_NAMES.lock() {
                v.push((name.clone(), place.clone()));
            }
            conf.upstreams.push(name);
        }
    }
    crate::conf::OK
}

/// Postconfiguration: every upstream `pd_health_ready` names must exist and
/// have `pd_health_check`.
///
/// # Safety
/// nginx's postconfiguration contract; `module` is the health module.
pub unsafe fn check_ready_names(cf: *mut ngx_conf_t, module: &ngx_module_t) -> ngx_int_t {
    let names = READY_NAMES.lock().map(|v| v.clone()).unwrap_or_default();
    if names.is_empty() {
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: as documented; the upstream main conf and its blocks live as
    // long as the configuration.
    unsafe {
        let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
        let umcf = *(*ctx).main_conf.add((*addr_of!(ngx_http_upstream_module)).ctx_index)
            as *mut ngx_http_upstream_main_conf_t;
        let mut checked: Vec<&[u8]> = Vec::new();
        if let Some(umcf) = umcf.as_ref() {
            let ups = std::slice::from_raw_parts(
                umcf.upstreams.elts as *const *mut ngx_http_upstream_srv_conf_t,
                umcf.upstreams.nelts,
            );
            for &us in ups {
                let Some(u) = us.as_ref() else { continue };
                if u.flags & NGX_HTTP_UPSTREAM_CREATE as ngx_uint_t == 0 || u.srv_conf.is_null() {
                    continue;
                }
                let hc = *u.srv_conf.add(module.ctx_index) as *const UpstreamHealth;
                if hc.as_ref().is_some_and(|h| h.check.is_some()) {
                    checked.push(str_bytes(&u.host));
                }
            }
        }
        for (name, place) in names {
            if !checked.contains(&name.as_slice()) {
                ngx::ngx_log_error!(
                    ngx::ffi::NGX_LOG_EMERG,
                    (*cf).log,
                    "pd_health_ready: upstream \"{}\" has no pd_health_check in {}",
                    String::from_utf8_lossy(&name),
                    place
                );
                return NGX_ERROR as ngx_int_t;
            }
        }
    }
    NGX_OK as ngx_int_t
}

/// The health module: `pd_health_check` (upstream), `pd_health_status` and
/// `pd_health_ready` (location), its `init_process`. The expansion holds
/// the `unsafe`, so the module crate can `#![forbid(unsafe_code)]`.
#[macro_export]
macro_rules! health_module {
    ($module:ident) => {
        struct Module;

        impl $crate::ngx::http::HttpModule for Module {
            fn module() -> &'static $crate::ffi::ngx_module_t {
                // SAFETY: the module static is only written by nginx while loading.
                unsafe { &*::std::ptr::addr_of!($module) }
            }
        }

        // SAFETY: ServerConf is the type create_srv_conf allocates here.
        unsafe impl $crate::ngx::http::HttpModuleServerConf for Module {
            type ServerConf = $crate::health::UpstreamHealth;
        }

        // SAFETY: LocationConf is the type create_loc_conf allocates here.
        unsafe impl $crate::ngx::http::HttpModuleLocationConf for Module {
            type LocationConf = $crate::health::ReadyConf;
        }

        unsafe extern "C" fn __pdgate_preconfiguration(
            _cf: *mut $crate::ffi::ngx_conf_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::health::reset();
            $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t
        }

        unsafe extern "C" fn __pdgate_postconfiguration(
            cf: *mut $crate::ffi::ngx_conf_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch(
                "pd_health postconfiguration",
                $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t,
                || {
                    // SAFETY: nginx's postconfiguration contract.
                    unsafe {
                        $crate::health::check_ready_names(
                            cf,
                            <Module as $crate::ngx::http::HttpModule>::module(),
                        )
                    }
                },
            )
        }

        static __PDGATE_CTX: $crate::ffi::ngx_http_module_t = $crate::ffi::ngx_http_module_t {
            preconfiguration: Some(__pdgate_preconfiguration),
            postconfiguration: Some(__pdgate_postconfiguration),
            create_main_conf: None,
            init_main_conf: None,
            create_srv_conf: Some(<Module as $crate::ngx::http::HttpModule>::create_srv_conf),
            merge_srv_conf: None,
            create_loc_conf: Some(<Module as $crate::ngx::http::HttpModule>::create_loc_conf),
            merge_loc_conf: None,
        };

        unsafe extern "C" fn __pdgate_cmd_check(
            cf: *mut $crate::ffi::ngx_conf_t,
            _cmd: *mut $crate::ffi::ngx_command_t,
            conf: *mut ::std::ffi::c_void,
        ) -> *mut ::std::ffi::c_char {
            $crate::guard::catch("pd_health_check", $crate::ngx::core::NGX_CONF_ERROR, || {
                // SAFETY: nginx's directive handler contract; the server
                // conf offset selects this module's UpstreamHealth.
                unsafe {
                    $crate::health::cmd_check(
                        cf,
                        conf as *mut $crate::health::UpstreamHealth,
                        <Module as $crate::ngx::http::HttpModule>::module(),
                    )
                }
            })
        }

        unsafe extern "C" fn __pdgate_cmd_ready(
            cf: *mut $crate::ffi::ngx_conf_t,
            _cmd: *mut $crate::ffi::ngx_command_t,
            conf: *mut ::std::ffi::c_void,
        ) -> *mut ::std::ffi::c_char {
            $crate::guard::catch("pd_health_ready", $crate::ngx::core::NGX_CONF_ERROR, || {
                // SAFETY: nginx's directive handler contract (location conf).
                unsafe {
                    let rc = $crate::health::cmd_ready(cf, conf as *mut $crate::health::ReadyConf);
                    if !rc.is_null() {
                        return rc;
                    }
                    $crate::conf::set_content_handler(cf, Some(__pdgate_ready_handler))
                }
            })
        }

        unsafe extern "C" fn __pdgate_cmd_status(
            cf: *mut $crate::ffi::ngx_conf_t,
            _cmd: *mut $crate::ffi::ngx_command_t,
            _conf: *mut ::std::ffi::c_void,
        ) -> *mut ::std::ffi::c_char {
            // SAFETY: nginx's directive handler contract (location context).
            unsafe { $crate::conf::set_content_handler(cf, Some(__pdgate_status_handler)) }
        }

        unsafe extern "C" fn __pdgate_status_handler(
            r: *mut $crate::ffi::ngx_http_request_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch(
                "pd_health_status",
                $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t,
                || {
                    // SAFETY: nginx calls content handlers with a live request.
                    unsafe {
                        let rc = $crate::ffi::ngx_http_discard_request_body(r);
                        if rc != $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t {
                            return rc;
                        }
                        let text = $crate::health::status_text();
                        $crate::response::send(r, 200, b"text/plain", text.as_bytes())
                    }
                },
            )
        }

        unsafe extern "C" fn __pdgate_ready_handler(
            r: *mut $crate::ffi::ngx_http_request_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch(
                "pd_health_ready",
                $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t,
                || {
                    // SAFETY: nginx calls content handlers with a live request;
                    // its loc_conf has this module's ReadyConf at ctx_index.
                    unsafe {
                        let rc = $crate::ffi::ngx_http_discard_request_body(r);
                        if rc != $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t {
                            return rc;
                        }
                        let idx = <Module as $crate::ngx::http::HttpModule>::module().ctx_index;
                        let lc = *(*r).loc_conf.add(idx) as *const $crate::health::ReadyConf;
                        let names = lc.as_ref().map(|c| c.upstreams.as_slice()).unwrap_or(&[]);
                        match $crate::health::readiness(names) {
                            Ok(()) => $crate::response::send(
                                r,
                                200,
                                b"application/json",
                                b"{\"status\":\"ready\"}\n",
                            ),
                            Err(msg) => {
                                let body = $crate::core::error::error_body(503, &msg);
                                $crate::response::send(r, 503, b"application/json", &body)
                            }
                        }
                    }
                },
            )
        }

        unsafe extern "C" fn __pdgate_init_process(
            cycle: *mut $crate::ffi::ngx_cycle_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch(
                "pd_health init_process",
                $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t,
                || {
                    // SAFETY: nginx's init_process contract.
                    unsafe {
                        $crate::health::init_process(
                            cycle,
                            <Module as $crate::ngx::http::HttpModule>::module(),
                        )
                    }
                },
            )
        }

        static mut __PDGATE_COMMANDS: [$crate::ffi::ngx_command_t; 4] = [
            $crate::ffi::ngx_command_t {
                name: $crate::conf::name(c"pd_health_check"),
                type_: ($crate::ffi::NGX_HTTP_UPS_CONF | $crate::ffi::NGX_CONF_ANY)
                    as $crate::ffi::ngx_uint_t,
                set: Some(__pdgate_cmd_check),
                conf: $crate::ffi::NGX_HTTP_SRV_CONF_OFFSET as $crate::ffi::ngx_uint_t,
                offset: 0,
                post: ::std::ptr::null_mut(),
            },
            $crate::ffi::ngx_command_t {
                name: $crate::conf::name(c"pd_health_status"),
                type_: ($crate::ffi::NGX_HTTP_LOC_CONF | $crate::ffi::NGX_CONF_NOARGS)
                    as $crate::ffi::ngx_uint_t,
                set: Some(__pdgate_cmd_status),
                conf: $crate::ffi::NGX_HTTP_LOC_CONF_OFFSET as $crate::ffi::ngx_uint_t,
                offset: 0,
                post: ::std::ptr::null_mut(),
            },
            $crate::ffi::ngx_command_t {
                name: $crate::conf::name(c"pd_health_ready"),
                type_: ($crate::ffi::NGX_HTTP_LOC_CONF | $crate::ffi::NGX_CONF_ANY)
                    as $crate::ffi::ngx_uint_t,
                set: Some(__pdgate_cmd_ready),
                conf: $crate::ffi::NGX_HTTP_LOC_CONF_OFFSET as $crate::ffi::ngx_uint_t,
                offset: 0,
                post: ::std::ptr::null_mut(),
            },
            $crate::ffi::ngx_command_t::empty(),
        ];

        #[no_mangle]
        #[allow(non_upper_case_globals)]
        pub static mut $module: $crate::ffi::ngx_module_t = $crate::ffi::ngx_module_t {
            ctx: ::std::ptr::addr_of!(__PDGATE_CTX) as *mut ::std::ffi::c_void,
            commands: ::std::ptr::addr_of_mut!(__PDGATE_COMMANDS)
                as *mut $crate::ffi::ngx_command_t,
            type_: $crate::ffi::NGX_HTTP_MODULE as $crate::ffi::ngx_uint_t,
            init_process: Some(__pdgate_init_process),
            ..$crate::ffi::ngx_module_t::default()
        };

        $crate::ngx::ngx_modules!($module);
    };
}
