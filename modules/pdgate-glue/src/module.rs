//! Declaring an nginx HTTP module from safe code.
//!
//! [`http_module!`](crate::http_module) writes the module static, its
//! context and its command table; the trampoline macros turn safe Rust
//! functions into the `extern "C"` callbacks nginx calls, each behind
//! [`guard::catch`](crate::guard::catch):
//!
//! | macro | nginx calls it as | the safe function |
//! |---|---|---|
//! | [`request_handler!`](crate::request_handler) | phase or content handler | `fn(&mut Request) -> ngx_int_t` |
//! | [`request_callback!`](crate::request_callback) | body-read handler | `fn(&mut Request)` |
//! | [`directive!`](crate::directive) | directive handler | `fn(&mut Conf, &'static mut T) -> Result<(), ConfError>` |
//! | [`variable_getter!`](crate::variable_getter) | variable get handler | `fn(&mut Request, &'d T) -> Option<&'d [u8]>` |
//!
//! The `unsafe` these need lives in the expansions, each with its
//! `// SAFETY:` line, so the module crate can `#![forbid(unsafe_code)]`
//! (the lint does not look into another crate's macros).
//!
//! ```ignore
//! pdgate_glue::http_module! {
//!     module: ngx_http_x_module,
//!     preconfiguration: preconfiguration,     // fn(&mut Conf) -> Result<(), NgxError>
//!     postconfiguration: postconfiguration,   // the same
//!     main_conf: MainConf,                    // Default
//!     srv_conf: SrvConf,                      // Default (also an `upstream {}` block's)
//!     loc_conf: LocConf,                      // Default
//!     merge_loc_conf: yes,                    // LocConf: Merge
//!     check_loc_conf: check,                  // optional, see below
//!     init_process: init,                     // fn() -> Result<(), NgxError>, in each worker
//!     commands: [ /* ngx_command_t, ... */ ],
//! }
//! ```
//!
//! `check_loc_conf: f` runs `f(&Conf, &LocConf) -> Result<(), String>` on
//! each location conf right after it is merged (a cross-directive check, as
//! a C module does at the end of its `merge_loc_conf`); an `Err` is logged
//! at `emerg` with nginx's ` in <file>:<line>` (`ngx_conf_log_error`) and
//! fails the configuration. It implies `merge_loc_conf`.

/// Declares an HTTP module: `struct Module` (ngx's `HttpModule`, with the
/// configuration types given), its `ngx_http_module_t`, its command table
/// (the terminating empty entry is added) and the exported module static.
#[macro_export]
macro_rules! http_module {
    (
        module: $module:ident,
        $(preconfiguration: $pre:path,)?
        $(postconfiguration: $post:path,)?
        $(main_conf: $main:ty,)?
        $(srv_conf: $srv:ty,)?
        $(loc_conf: $loc:ty,)?
        $(merge_loc_conf: $merge:ident,)?
        $(check_loc_conf: $check:path,)?
        $(init_process: $init:path,)?
        commands: [$($cmd:expr),* $(,)?] $(,)?
    ) => {
        struct Module;

        impl $crate::ngx::http::HttpModule for Module {
            fn module() -> &'static $crate::ffi::ngx_module_t {
                // SAFETY: the module static is only written by nginx while loading.
                unsafe { &*::std::ptr::addr_of!($module) }
            }
        }

        $(
            // SAFETY: MainConf is the type create_main_conf allocates here.
            unsafe impl $crate::ngx::http::HttpModuleMainConf for Module {
                type MainConf = $main;
            }
        )?

        $(
            // SAFETY: ServerConf is the type create_srv_conf allocates here.
            unsafe impl $crate::ngx::http::HttpModuleServerConf for Module {
                type ServerConf = $srv;
            }
        )?

        $(
            // SAFETY: LocationConf is the type create_loc_conf allocates here.
            unsafe impl $crate::ngx::http::HttpModuleLocationConf for Module {
                type LocationConf = $loc;
            }
        )?

        $(
            unsafe extern "C" fn __pdgate_init_process(
                _cycle: *mut $crate::ffi::ngx_cycle_t,
            ) -> $crate::ffi::ngx_int_t {
                $crate::guard::catch(
                    concat!(stringify!($module), " init_process"),
                    $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t,
                    || match $init() {
                        Ok(()) => $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t,
                        Err(_) => $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t,
                    },
                )
            }
        )?

        $(
            unsafe extern "C" fn __pdgate_preconfiguration(
                cf: *mut $crate::ffi::ngx_conf_t,
            ) -> $crate::ffi::ngx_int_t {
                $crate::guard::catch(
                    concat!(stringify!($module), " preconfiguration"),
                    $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t,
                    || {
                        // SAFETY: nginx calls preconfiguration with the http conf.
                        let mut conf = unsafe { $crate::http::Conf::from_ptr(cf) };
                        match $pre(&mut conf) {
                            Ok(()) => $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t,
                            Err(_) => $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t,
                        }
                    },
                )
            }
        )?

        $(
            unsafe extern "C" fn __pdgate_postconfiguration(
                cf: *mut $crate::ffi::ngx_conf_t,
            ) -> $crate::ffi::ngx_int_t {
                $crate::guard::catch(
                    concat!(stringify!($module), " postconfiguration"),
                    $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t,
                    || {
                        // SAFETY: nginx calls postconfiguration with the http conf.
                        let mut conf = unsafe { $crate::http::Conf::from_ptr(cf) };
                        match $post(&mut conf) {
                            Ok(()) => $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t,
                            Err(_) => $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t,
                        }
                    },
                )
            }
        )?

        $(
            unsafe extern "C" fn __pdgate_merge_loc_conf(
                cf: *mut $crate::ffi::ngx_conf_t,
                prev: *mut ::std::ffi::c_void,
                conf: *mut ::std::ffi::c_void,
            ) -> *mut ::std::ffi::c_char {
                type L = <Module as $crate::ngx::http::HttpModuleLocationConf>::LocationConf;
                $crate::guard::catch(
                    concat!(stringify!($module), " merge_loc_conf"),
                    $crate::ngx::core::NGX_CONF_ERROR,
                    || {
                        // SAFETY: nginx passes the parent's and the child's
                        // location confs of this module, two distinct L
                        // allocated by create_loc_conf.
                        let pair =
                            unsafe { ((prev as *const L).as_ref(), (conf as *mut L).as_mut()) };
                        let (Some(prev), Some(conf)) = pair else {
                            return $crate::ngx::core::NGX_CONF_ERROR;
                        };
                        if $crate::ngx::http::Merge::merge(conf, prev).is_err() {
                            return $crate::ngx::core::NGX_CONF_ERROR;
                        }
                        // SAFETY: nginx calls merge_loc_conf while reading `cf`.
                        let cf = unsafe { $crate::http::Conf::from_ptr(cf) };
                        match $check(&cf, conf) {
                            Ok(()) => $crate::conf::OK,
                            Err(msg) => {
                                cf.conf_emerg(&msg);
                                $crate::ngx::core::NGX_CONF_ERROR
                            }
                        }
                    },
                )
            }
        )?

        static __PDGATE_CTX: $crate::ffi::ngx_http_module_t = $crate::ffi::ngx_http_module_t {
            preconfiguration: $crate::__pdgate_if!(($($pre)?) Some(__pdgate_preconfiguration)),
            postconfiguration: $crate::__pdgate_if!(($($post)?) Some(__pdgate_postconfiguration)),
            create_main_conf: $crate::__pdgate_if!(($($main)?)
                Some(<Module as $crate::ngx::http::HttpModule>::create_main_conf)),
            init_main_conf: None,
            create_srv_conf: $crate::__pdgate_if!(($($srv)?)
                Some(<Module as $crate::ngx::http::HttpModule>::create_srv_conf)),
            // Upstream blocks are not merged; a module that needs server
            // blocks merged is not written with this macro yet.
            merge_srv_conf: None,
            create_loc_conf: $crate::__pdgate_if!(($($loc)?)
                Some(<Module as $crate::ngx::http::HttpModule>::create_loc_conf)),
            merge_loc_conf: $crate::__pdgate_either!(($($check)?)
                { Some(__pdgate_merge_loc_conf) }
                { $crate::__pdgate_if!(($($merge)?)
                    Some(<Module as $crate::ngx::http::HttpModule>::merge_loc_conf)) }),
        };

        static mut __PDGATE_COMMANDS: [$crate::ffi::ngx_command_t; [$(stringify!($cmd)),*].len() + 1] = [
            $($cmd,)*
            $crate::ffi::ngx_command_t::empty(),
        ];

        #[no_mangle]
        #[allow(non_upper_case_globals)]
        pub static mut $module: $crate::ffi::ngx_module_t = $crate::ffi::ngx_module_t {
            ctx: ::std::ptr::addr_of!(__PDGATE_CTX) as *mut ::std::ffi::c_void,
            commands: ::std::ptr::addr_of_mut!(__PDGATE_COMMANDS) as *mut $crate::ffi::ngx_command_t,
            type_: $crate::ffi::NGX_HTTP_MODULE as $crate::ffi::ngx_uint_t,
            init_process: $crate::__pdgate_if!(($($init)?) Some(__pdgate_init_process)),
            ..$crate::ffi::ngx_module_t::default()
        };

        $crate::ngx::ngx_modules!($module);
    };
}

/// `None` when the parenthesised tokens are empty, else the rest.
#[doc(hidden)]
#[macro_export]
macro_rules! __pdgate_if {
    (() $($then:tt)*) => { None };
    (($($x:tt)+) $($then:tt)*) => { $($then)* };
}

/// The first braced group when the parenthesised tokens are not empty,
/// else the second.
#[doc(hidden)]
#[macro_export]
macro_rules! __pdgate_either {
    (() { $($then:tt)* } { $($else:tt)* }) => { $($else)* };
    (($($x:tt)+) { $($then:tt)* } { $($else:tt)* }) => { $($then)* };
}

/// `request_handler!(name, fallback, f)`: `unsafe extern "C" fn name(r)`
/// calling `f(&mut Request) -> ngx_int_t`; `fallback` if `f` panics.
#[macro_export]
macro_rules! request_handler {
    ($name:ident, $fallback:expr, $f:path) => {
        unsafe extern "C" fn $name(
            r: *mut $crate::ffi::ngx_http_request_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch(stringify!($name), ($fallback) as $crate::ffi::ngx_int_t, || {
                // SAFETY: nginx calls request handlers with a live request.
                let r = unsafe { $crate::http::Request::from_ngx_http_request(r) };
                $f(r)
            })
        }
    };
}

/// `request_callback!(name, f)`: `unsafe extern "C" fn name(r)` (a body
/// read handler) calling `f(&mut Request)`.
#[macro_export]
macro_rules! request_callback {
    ($name:ident, $f:path) => {
        unsafe extern "C" fn $name(r: *mut $crate::ffi::ngx_http_request_t) {
            $crate::guard::catch(stringify!($name), (), || {
                // SAFETY: nginx calls it with a live request.
                let r = unsafe { $crate::http::Request::from_ngx_http_request(r) };
                $f(r)
            })
        }
    };
}

/// `directive!(name, T, f)`: a directive handler calling
/// `f(&mut Conf, &'static mut T) -> Result<(), ConfError>`, where `T` is
/// the configuration the command's `conf` offset selects (this module's
/// main, server or location conf); `directive!(name, f)` for a handler
/// that needs none (`f(&mut Conf)`).
#[macro_export]
macro_rules! directive {
    ($name:ident, $t:ty, $f:path) => {
        unsafe extern "C" fn $name(
            cf: *mut $crate::ffi::ngx_conf_t,
            _cmd: *mut $crate::ffi::ngx_command_t,
            conf: *mut ::std::ffi::c_void,
        ) -> *mut ::std::ffi::c_char {
            $crate::guard::catch(stringify!($name), $crate::ngx::core::NGX_CONF_ERROR, || {
                // SAFETY: nginx passes the configuration of the command's
                // conf offset, which the module allocated as a T; it lives
                // as long as the cycle.
                let Some(c) = (unsafe { (conf as *mut $t).as_mut() }) else {
                    return $crate::ngx::core::NGX_CONF_ERROR;
                };
                // SAFETY: nginx calls directive handlers while reading `cf`.
                let mut conf = unsafe { $crate::http::Conf::from_ptr(cf) };
                let res = $f(&mut conf, c);
                $crate::module::conf_result(&conf, res)
            })
        }
    };
    ($name:ident, $f:path) => {
        unsafe extern "C" fn $name(
            cf: *mut $crate::ffi::ngx_conf_t,
            _cmd: *mut $crate::ffi::ngx_command_t,
            _conf: *mut ::std::ffi::c_void,
        ) -> *mut ::std::ffi::c_char {
            $crate::guard::catch(stringify!($name), $crate::ngx::core::NGX_CONF_ERROR, || {
                // SAFETY: nginx calls directive handlers while reading `cf`.
                let mut conf = unsafe { $crate::http::Conf::from_ptr(cf) };
                let res = $f(&mut conf);
                $crate::module::conf_result(&conf, res)
            })
        }
    };
}

/// `variable_getter!(name, T, f)`: a variable get handler whose `data` is
/// the `&'static T` given to [`Conf::add_variable`](crate::http::Conf::add_variable),
/// calling `f(&mut Request, &T) -> Option<&[u8]>` (None: not found).
#[macro_export]
macro_rules! variable_getter {
    ($name:ident, $t:ty, $f:path) => {
        unsafe extern "C" fn $name(
            r: *mut $crate::ffi::ngx_http_request_t,
            v: *mut $crate::ffi::ngx_http_variable_value_t,
            data: usize,
        ) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch(
                stringify!($name),
                $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t,
                || {
                    // SAFETY: `data` is the &'static T registered with the
                    // variable (Conf::add_variable); r and v are nginx's, live.
                    unsafe {
                        let value = match (data as *const $t).as_ref() {
                            Some(d) => $f($crate::http::Request::from_ngx_http_request(r), d),
                            None => None,
                        };
                        match value {
                            Some(bytes) => $crate::variable::set(v, bytes),
                            None => $crate::variable::not_found(v),
                        }
                    }
                    $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t
                },
            )
        }
    };
}

/// What a directive handler returns to nginx for `res`.
pub fn conf_result(
    conf: &crate::http::Conf,
    res: Result<(), crate::http::ConfError>,
) -> *mut std::ffi::c_char {
    match res {
        Ok(()) => crate::conf::OK,
        // SAFETY: a Conf exists only during a configuration callback.
        Err(crate::http::ConfError::Directive(msg)) => unsafe {
            crate::conf::error(conf.as_ptr(), &msg)
        },
        Err(crate::http::ConfError::Logged) => ngx::core::NGX_CONF_ERROR,
    }
}
