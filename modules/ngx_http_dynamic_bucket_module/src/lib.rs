//! ngx_http_dynamic_bucket_module: length buckets that follow the workload.
//!
//! ```nginx
//! http {
//!     dynamic_bucket $prefill_bucket zone=prefill_len:64k alpha=0.1 window=32
//!                    prefill_short prefill_long;
//!     upstream prefill_short { server 10.0.0.1:8000; }
//!     upstream prefill_long  { server 10.0.0.2:8000; }
//!     ...
//!     location /prefill_internal/ { internal; ...; proxy_pass http://$prefill_bucket; }
//! }
//! ```
//!
//! Evaluating the variable records the request's length (the client body's,
//! in tokens by the shared rule) in a histogram shared by all workers and
//! yields the name of the upstream whose bucket holds that length, the
//! buckets being cut so that each gets an equal share of the recent token
//! load (pdgate-core's `bucket` module has the algorithm). The variable is
//! indexed and cacheable: it is evaluated once per request, and a prefill
//! subrequest shares the value with its main request. Replaces Global
//! Proxy's Lua `dynamic_bucket` sample, whose state was per worker.
//!
//! `dynamic_bucket_status` (location) shows each set's boundaries and what
//! each bucket received.

use std::cell::Cell;
use std::ffi::{c_char, c_void};
use std::ptr::{addr_of, addr_of_mut, null_mut};

use pdgate_glue::core::bucket::{self, conf::BucketConf, BucketZone, Cut};
use pdgate_glue::core::tokens::tokens_for_bytes;
use pdgate_glue::ffi::{
    ngx_command_t, ngx_conf_t, ngx_http_discard_request_body, ngx_http_module_t,
    ngx_http_request_t, ngx_http_upstream_main_conf_t, ngx_http_upstream_module,
    ngx_http_upstream_srv_conf_t, ngx_http_variable_value_t, ngx_int_t, ngx_module_t,
    ngx_shm_zone_t, ngx_uint_t, NGX_CONF_2MORE, NGX_CONF_NOARGS, NGX_ERROR, NGX_HTTP_LOC_CONF,
    NGX_HTTP_MAIN_CONF, NGX_HTTP_MAIN_CONF_OFFSET, NGX_HTTP_MODULE, NGX_HTTP_UPSTREAM_CREATE,
    NGX_LOG_EMERG, NGX_OK,
};
use pdgate_glue::ngx::core::NGX_CONF_ERROR;
use pdgate_glue::ngx::http::{HttpModule, HttpModuleConfExt, HttpModuleMainConf};
use pdgate_glue::ngx::log::DebugMask;
use pdgate_glue::ngx::{ngx_log_debug, ngx_log_error};
use pdgate_glue::{conf, guard, length, response, upstream, variable, zone};

/// One `dynamic_bucket` directive.
struct BucketSet {
    conf: BucketConf,
    zone: *mut ngx_shm_zone_t,
    /// This worker's boundaries (workers are single-threaded).
    cut: Cell<Cut>,
    /// Where the directive is, for errors found in postconfiguration.
    place: String,
}

/// The http-level configuration: every bucket set.
#[derive(Default)]
struct MainConf {
    // Boxed: each variable keeps a pointer to its set while the vector grows.
    #[allow(clippy::vec_box)]
    sets: Vec<Box<BucketSet>>,
}

struct Module;

impl HttpModule for Module {
    fn module() -> &'static ngx_module_t {
        // SAFETY: the module static is only written by nginx while loading.
        unsafe { &*addr_of!(ngx_http_dynamic_bucket_module) }
    }

    unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        guard::catch("dynamic_bucket postconfiguration", NGX_ERROR as ngx_int_t, || {
            // SAFETY: nginx calls postconfiguration with the http conf.
            unsafe { check_upstreams(cf) }
        })
    }
}

// SAFETY: MainConf is the type create_main_conf allocates for this module.
unsafe impl HttpModuleMainConf for Module {
    type MainConf = MainConf;
}

static NGX_HTTP_DYNAMIC_BUCKET_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: None,
    postconfiguration: Some(Module::postconfiguration),
    create_main_conf: Some(Module::create_main_conf),
    init_main_conf: None,
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: None,
    merge_loc_conf: None,
};

static mut NGX_HTTP_DYNAMIC_BUCKET_COMMANDS: [ngx_command_t; 3] = [
    ngx_command_t {
        // nginx compares directive names with strcmp: keep the NUL.
        name: conf::name(c"dynamic_bucket"),
        // At least `$var zone=… a b`: counted by the parser.
        type_: (NGX_HTTP_MAIN_CONF | NGX_CONF_2MORE) as ngx_uint_t,
        set: Some(cmd_dynamic_bucket),
        conf: NGX_HTTP_MAIN_CONF_OFFSET as ngx_uint_t,
        offset: 0,
        post: null_mut(),
    },
    ngx_command_t {
        name: conf::name(c"dynamic_bucket_status"),
        type_: (NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS) as ngx_uint_t,
        set: Some(cmd_dynamic_bucket_status),
        conf: 0,
        offset: 0,
        post: null_mut(),
    },
    ngx_command_t::empty(),
];

#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_dynamic_bucket_module: ngx_module_t = ngx_module_t {
    ctx: addr_of!(NGX_HTTP_DYNAMIC_BUCKET_MODULE_CTX) as *mut c_void,
    commands: addr_of_mut!(NGX_HTTP_DYNAMIC_BUCKET_COMMANDS) as *mut ngx_command_t,
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    ..ngx_module_t::default()
};

pdgate_glue::ngx::ngx_modules!(ngx_http_dynamic_bucket_module);

/// `dynamic_bucket $var zone=name:size [alpha=a] [window=n] upstream...;`
unsafe extern "C" fn cmd_dynamic_bucket(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    main: *mut c_void,
) -> *mut c_char {
    guard::catch("dynamic_bucket directive", NGX_CONF_ERROR, || {
        // SAFETY: nginx's directive handler contract; `main` is our main
        // conf (NGX_HTTP_MAIN_CONF_OFFSET).
        unsafe {
            let Some(main) = (main as *mut MainConf).as_mut() else { return NGX_CONF_ERROR };
            let args: Vec<&[u8]> =
                conf::args(cf).iter().skip(1).map(|a| conf::str_bytes(a)).collect();
            let c = match bucket::conf::parse(&args) {
                Ok(c) => c,
                Err(e) => return conf::error(cf, &e.to_string()),
            };
            let zone = match zone::add::<BucketZone>(cf, &c.zone, c.zone_size, Module::module()) {
                Ok(Some(z)) => z,
                Ok(None) => {
                    return conf::error(
                        cf,
                        &format!(
                            "zone \"{}\" is already used by another dynamic_bucket",
                            String::from_utf8_lossy(&c.zone)
                        ),
                    )
                }
                Err(_) => return NGX_CONF_ERROR,
            };
            let place = conf::place(cf);
            main.sets.push(Box::new(BucketSet {
                conf: c,
                zone,
                cut: Cell::new(Cut::default()),
                place,
            }));
            let Some(set) = main.sets.last() else { return NGX_CONF_ERROR };
            // The box keeps its address while the conf lives.
            let data = &**set as *const BucketSet as *const c_void;
            if variable::add(cf, &set.conf.variable, Some(ngx_http_dynamic_bucket_variable), data)
                .is_err()
            {
                return NGX_CONF_ERROR;
            }
            conf::OK
        }
    })
}

/// Every upstream named by a `dynamic_bucket` must be an `upstream {}`
/// block: `proxy_pass http://$var` then finds it by name, with no resolver.
///
/// # Safety
/// `cf` must be the conf of the http postconfiguration.
unsafe fn check_upstreams(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: in postconfiguration both main confs exist and the upstream
    // list is complete.
    unsafe {
        let Some(main) = Module::main_conf(&*cf) else { return NGX_OK as ngx_int_t };
        let blocks: Vec<&[u8]> = match (*cf)
            .http_main_conf_unchecked::<ngx_http_upstream_main_conf_t>(&*addr_of!(
                ngx_http_upstream_module
            )) {
            Some(umcf) => umcf
                .as_ref()
                .upstreams
                .as_slice::<*mut ngx_http_upstream_srv_conf_t>()
                .iter()
                .filter_map(|&us| us.as_ref())
                .filter(|us| us.flags & NGX_HTTP_UPSTREAM_CREATE as ngx_uint_t != 0)
                .map(|us| conf::str_bytes(&us.host))
                .collect(),
            None => Vec::new(),
        };
        for set in &main.sets {
            for name in &set.conf.upstreams {
                if !blocks.iter().any(|b| b.eq_ignore_ascii_case(name)) {
                    ngx_log_error!(
                        NGX_LOG_EMERG,
                        (*cf).log,
                        "dynamic_bucket ${}: no upstream \"{}\" block in {}",
                        String::from_utf8_lossy(&set.conf.variable),
                        String::from_utf8_lossy(name),
                        set.place
                    );
                    return NGX_ERROR as ngx_int_t;
                }
            }
        }
    }
    NGX_OK as ngx_int_t
}

/// The variable's get handler: records the request and names its upstream.
unsafe extern "C" fn ngx_http_dynamic_bucket_variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_http_variable_value_t,
    data: usize,
) -> ngx_int_t {
    guard::catch("dynamic_bucket variable", NGX_ERROR as ngx_int_t, || {
        // SAFETY: `data` is the BucketSet registered with the variable (it
        // lives with the configuration); r and v are nginx's.
        unsafe {
            let Some(set) = (data as *const BucketSet).as_ref() else {
                variable::not_found(v);
                return NGX_OK as ngx_int_t;
            };
            let bytes = length::client_body_bytes(r);
            let tokens = bytes.map(tokens_for_bytes);
            let bucket = match zone::state::<BucketZone>(set.zone) {
                Some(z) => {
                    let mut cut = set.cut.get();
                    let d = z.decide(tokens, &set.conf.params, &mut cut);
                    set.cut.set(cut);
                    d.bucket
                }
                None => 0,
            };
            let Some(name) = set.conf.upstreams.get(bucket).or(set.conf.upstreams.first()) else {
                variable::not_found(v);
                return NGX_OK as ngx_int_t;
            };
            ngx_log_debug!(
                mask: DebugMask::Http,
                (*(*r).connection).log,
                "dynamic_bucket: ${} length {}, boundaries [{}], bucket {} \"{}\"",
                String::from_utf8_lossy(&set.conf.variable),
                tokens.map_or("unknown".to_string(), |t| format!("{t} tokens")),
                set.cut.get().lengths().map(|l| l.to_string()).collect::<Vec<_>>().join(" "),
                bucket + 1,
                String::from_utf8_lossy(name)
            );
            variable::set(v, name);
            NGX_OK as ngx_int_t
        }
    })
}

unsafe extern "C" fn cmd_dynamic_bucket_status(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    guard::catch("dynamic_bucket_status directive", NGX_CONF_ERROR, || {
        // SAFETY: nginx's directive handler contract (location context).
        unsafe { upstream::set_content_handler(cf, Some(ngx_http_dynamic_bucket_status_handler)) }
    })
}

unsafe extern "C" fn ngx_http_dynamic_bucket_status_handler(
    r: *mut ngx_http_request_t,
) -> ngx_int_t {
    guard::catch("dynamic_bucket status", NGX_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls content handlers with a live request.
        unsafe {
            let rc = ngx_http_discard_request_body(r);
            if rc != NGX_OK as ngx_int_t {
                return rc;
            }
            let mut text = String::new();
            if let Some(main) = Module::main_conf(&*r) {
                for set in &main.sets {
                    let Some(z) = zone::state::<BucketZone>(set.zone) else { continue };
                    // The latest boundaries, whatever this worker cached.
                    let mut cut = Cut::default();
                    z.refresh(&mut cut, set.conf.params.buckets);
                    bucket::status_text(&mut text, &set.conf, &z.snapshot(), &cut);
                }
            }
            response::send(r, 200, b"text/plain", text.as_bytes())
        }
    })
}
