//! ngx_http_upstream_least_total_load_module: send each request to the peer
//! whose in-flight work would drain first (Global Proxy's least_total_load,
//! with its bugs fixed: real on/off, retries go to untried peers, counters
//! per upstream and peer identity, weights honoured, keepalive kept).
//!
//! ```nginx
//! upstream prefill_servers {
//!     server 10.0.0.1:8000;
//!     server 10.0.0.2:8000;
//!     least_total_load on;
//!     least_total_load_batch_size 16;
//!     keepalive 256;
//! }
//! ```
//!
//! The policy is `pdgate_core::balance::least_total_load`; the hooks are the
//! glue's (`pdgate_glue::upstream`).

use std::ffi::{c_char, c_void};
use std::ptr::{addr_of, addr_of_mut, null_mut};

use pdgate_glue::core::balance::{least_total_load, PeerView};
use pdgate_glue::core::conf::parse_flag;
use pdgate_glue::ffi::{
    ngx_command_t, ngx_conf_t, ngx_http_module_t, ngx_module_t, ngx_uint_t, NGX_CONF_FLAG,
    NGX_CONF_TAKE1, NGX_HTTP_MODULE, NGX_HTTP_SRV_CONF_OFFSET, NGX_HTTP_UPS_CONF,
};
use pdgate_glue::ngx::core::NGX_CONF_ERROR;
use pdgate_glue::ngx::http::{HttpModule, HttpModuleServerConf};
use pdgate_glue::ngx::ngx_string;
use pdgate_glue::upstream::{enable, Balancer, UpstreamConf};
use pdgate_glue::{balancer_hooks, conf, guard};

/// The batch size when none is configured (the original's default).
const DEFAULT_BATCH: u64 = 16;

fn choose(peers: &[PeerView], tokens: u64, batch: u64, tie: u64) -> Option<usize> {
    least_total_load(peers, tokens, if batch == 0 { DEFAULT_BATCH } else { batch }, tie)
}

static BALANCER: Balancer = Balancer { name: "least_total_load", choose };

struct Module;

impl HttpModule for Module {
    fn module() -> &'static ngx_module_t {
        // SAFETY: the module static is only written by nginx while loading.
        unsafe { &*addr_of!(ngx_http_upstream_least_total_load_module) }
    }
}

// SAFETY: ServerConf is the type create_srv_conf allocates for this module.
unsafe impl HttpModuleServerConf for Module {
    type ServerConf = UpstreamConf;
}

balancer_hooks!(init_peer, postconfiguration, ngx_http_upstream_least_total_load_module, BALANCER);

static NGX_HTTP_UPSTREAM_LEAST_TOTAL_LOAD_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: None,
    postconfiguration: Some(postconfiguration),
    create_main_conf: None,
    init_main_conf: None,
    create_srv_conf: Some(Module::create_srv_conf),
    // Upstream blocks are not merged.
    merge_srv_conf: None,
    create_loc_conf: None,
    merge_loc_conf: None,
};

static mut NGX_HTTP_UPSTREAM_LEAST_TOTAL_LOAD_COMMANDS: [ngx_command_t; 3] = [
    ngx_command_t {
        name: ngx_string!("least_total_load"),
        type_: (NGX_HTTP_UPS_CONF | NGX_CONF_FLAG) as ngx_uint_t,
        set: Some(cmd_least_total_load),
        conf: NGX_HTTP_SRV_CONF_OFFSET as ngx_uint_t,
        offset: 0,
        post: null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("least_total_load_batch_size"),
        type_: (NGX_HTTP_UPS_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(cmd_batch_size),
        conf: NGX_HTTP_SRV_CONF_OFFSET as ngx_uint_t,
        offset: 0,
        post: null_mut(),
    },
    ngx_command_t::empty(),
];

#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_upstream_least_total_load_module: ngx_module_t = ngx_module_t {
    ctx: addr_of!(NGX_HTTP_UPSTREAM_LEAST_TOTAL_LOAD_MODULE_CTX) as *mut c_void,
    commands: addr_of_mut!(NGX_HTTP_UPSTREAM_LEAST_TOTAL_LOAD_COMMANDS) as *mut ngx_command_t,
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    ..ngx_module_t::default()
};

pdgate_glue::ngx::ngx_modules!(ngx_http_upstream_least_total_load_module);

/// `least_total_load on|off;`
unsafe extern "C" fn cmd_least_total_load(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    c: *mut c_void,
) -> *mut c_char {
    guard::catch("least_total_load directive", NGX_CONF_ERROR, || {
        // SAFETY: nginx passes this module's srv conf of the upstream block.
        unsafe {
            let c = &mut *(c as *mut UpstreamConf);
            if c.enabled != -1 {
                return conf::error(cf, "is duplicate");
            }
            let Some(arg) = conf::args(cf).get(1) else {
                return conf::error(cf, "needs on or off");
            };
            let on = match parse_flag(conf::str_bytes(arg)) {
                Ok(on) => on,
                Err(e) => return conf::error(cf, &e.to_string()),
            };
            c.enabled = isize::from(on);
            if on {
                if let Err(e) = enable(cf, c, Module::module(), "pdgate_least_total_load") {
                    return conf::error(cf, e);
                }
            }
            conf::OK
        }
    })
}

/// `least_total_load_batch_size N;` (N > 0)
unsafe extern "C" fn cmd_batch_size(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    c: *mut c_void,
) -> *mut c_char {
    guard::catch("least_total_load_batch_size directive", NGX_CONF_ERROR, || {
        // SAFETY: as above.
        unsafe {
            let c = &mut *(c as *mut UpstreamConf);
            if c.param != -1 {
                return conf::error(cf, "is duplicate");
            }
            let Some(arg) = conf::args(cf).get(1) else { return conf::error(cf, "needs a value") };
            let v = conf::str_bytes(arg);
            match std::str::from_utf8(v).ok().and_then(|s| s.parse::<isize>().ok()) {
                Some(n) if n > 0 => {
                    c.param = n;
                    conf::OK
                }
                _ => conf::error(
                    cf,
                    &format!(
                        "invalid value \"{}\", it must be a positive number",
                        String::from_utf8_lossy(v)
                    ),
                ),
            }
        }
    })
}
