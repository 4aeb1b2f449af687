//! The macros that make a balancer module crate: [`balancer_hooks!`]
//! (init_peer, the usage body filter, postconfiguration) and
//! [`balancer_module!`] (the whole nginx module).

/// Declares a balancer module's `init_peer` and postconfiguration hooks:
/// `balancer_hooks!(init_peer_fn, postconf_fn, ngx_module_static, BALANCER)`.
#[macro_export]
macro_rules! balancer_hooks {
    ($init_peer:ident, $postconf:ident, $module:ident, $balancer:expr) => {
        unsafe fn __pdgate_conf_of(
            us: *mut $crate::ffi::ngx_http_upstream_srv_conf_t,
        ) -> *mut $crate::balancer::UpstreamConf {
            // SAFETY: srv_conf of an `upstream {}` block has a slot per HTTP
            // module, this module's holding an UpstreamConf; implicit
            // upstreams (`proxy_pass http://address`) have none.
            unsafe {
                if us.is_null() || (*us).srv_conf.is_null() {
                    return ::std::ptr::null_mut();
                }
                let idx = (*::std::ptr::addr_of!($module)).ctx_index;
                *(*us).srv_conf.add(idx) as *mut $crate::balancer::UpstreamConf
            }
        }

        unsafe extern "C" fn $init_peer(
            r: *mut $crate::ffi::ngx_http_request_t,
            us: *mut $crate::ffi::ngx_http_upstream_srv_conf_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch(
                "balancer init",
                $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t,
                || {
                    // SAFETY: nginx's init_peer contract.
                    unsafe { $crate::balancer::init_peer(r, us, __pdgate_conf_of(us), &$balancer) }
                },
            )
        }

        static mut __PDGATE_NEXT_BODY_FILTER: $crate::ffi::ngx_http_output_body_filter_pt = None;

        unsafe extern "C" fn __pdgate_body_filter(
            r: *mut $crate::ffi::ngx_http_request_t,
            in_: *mut $crate::ffi::ngx_chain_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch("balancer body filter", (), || {
                // SAFETY: nginx's body filter contract.
                unsafe { $crate::balancer::learn_usage(r, in_, &$balancer) }
            });
            // SAFETY: the next filter was saved at postconfiguration.
            unsafe {
                match *::std::ptr::addr_of!(__PDGATE_NEXT_BODY_FILTER) {
                    Some(next) => next(r, in_),
                    None => $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t,
                }
            }
        }

        unsafe extern "C" fn $postconf(cf: *mut $crate::ffi::ngx_conf_t) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch(
                "balancer postconfiguration",
                $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t,
                || {
                    // SAFETY: nginx's postconfiguration contract; the body
                    // filter chain is only changed here, single-threaded.
                    unsafe {
                        if $balancer.learn_usage {
                            *::std::ptr::addr_of_mut!(__PDGATE_NEXT_BODY_FILTER) =
                                $crate::ffi::ngx_http_top_body_filter;
                            $crate::ffi::ngx_http_top_body_filter = Some(__pdgate_body_filter);
                        }
                        $crate::balancer::install(
                            cf,
                            &$balancer,
                            |us| __pdgate_conf_of(us),
                            Some($init_peer),
                        )
                    }
                },
            )
        }
    };
}

/// Everything a balancer module crate exports, from its
/// [`Balancer`](crate::balancer::Balancer) static and its directives (see
/// [`directives`](crate::balancer::directives)); the `_status` location
/// directive is added:
///
/// ```ignore
/// pdgate_glue::balancer_module!(ngx_http_upstream_x_module, BALANCER, status: c"x_status", [
///     shm_size(c"x_shm_size"),
///     flag(c"x", &BALANCER),
///     param(c"x_batch_size", &BALANCER),
/// ]);
/// ```
///
/// The expansion holds the module's `unsafe` (the module static, the
/// `extern "C"` hooks), each with its `// SAFETY:` line, so the module
/// crate itself can `#![forbid(unsafe_code)]`.
#[macro_export]
macro_rules! balancer_module {
    ($module:ident, $balancer:ident, status: $status:literal, [$($cmd:expr),* $(,)?]) => {
        struct Module;

        impl $crate::ngx::http::HttpModule for Module {
            fn module() -> &'static $crate::ffi::ngx_module_t {
                // SAFETY: the module static is only written by nginx while loading.
                unsafe { &*::std::ptr::addr_of!($module) }
            }
        }

        // SAFETY: ServerConf is the type create_srv_conf allocates here.
        unsafe impl $crate::ngx::http::HttpModuleServerConf for Module {
            type ServerConf = $crate::balancer::UpstreamConf;
        }

        fn __pdgate_module() -> &'static $crate::ffi::ngx_module_t {
            <Module as $crate::ngx::http::HttpModule>::module()
        }

        $crate::balancer_hooks!(__pdgate_init_peer, __pdgate_postconfiguration, $module, $balancer);

        unsafe extern "C" fn __pdgate_preconfiguration(
            _cf: *mut $crate::ffi::ngx_conf_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::balancer::reset_main_settings();
            $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t
        }

        static __PDGATE_CTX: $crate::ffi::ngx_http_module_t = $crate::ffi::ngx_http_module_t {
            preconfiguration: Some(__pdgate_preconfiguration),
            postconfiguration: Some(__pdgate_postconfiguration),
            create_main_conf: None,
            init_main_conf: None,
            create_srv_conf: Some(<Module as $crate::ngx::http::HttpModule>::create_srv_conf),
            // Upstream blocks are not merged.
            merge_srv_conf: None,
            create_loc_conf: None,
            merge_loc_conf: None,
        };

        unsafe extern "C" fn __pdgate_status_handler(
            r: *mut $crate::ffi::ngx_http_request_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch("balancer status", $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t, || {
                // SAFETY: nginx calls content handlers with a live request.
                unsafe {
                    let rc = $crate::ffi::ngx_http_discard_request_body(r);
                    if rc != $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t {
                        return rc;
                    }
                    let text = $crate::balancer::status_text(r, &$balancer, |us| __pdgate_conf_of(us));
                    $crate::response::send(r, 200, b"text/plain", text.as_bytes())
                }
            })
        }

        unsafe extern "C" fn __pdgate_cmd_status(
            cf: *mut $crate::ffi::ngx_conf_t,
            _cmd: *mut $crate::ffi::ngx_command_t,
            _conf: *mut ::std::ffi::c_void,
        ) -> *mut ::std::ffi::c_char {
            // SAFETY: nginx's directive handler contract (location context).
            unsafe { $crate::balancer::set_content_handler(cf, Some(__pdgate_status_handler)) }
        }

        static mut __PDGATE_COMMANDS: [$crate::ffi::ngx_command_t; [$(stringify!($cmd)),*].len() + 2] = [
            $($cmd,)*
            $crate::balancer::location_command($status, __pdgate_cmd_status),
            $crate::ffi::ngx_command_t::empty(),
        ];

        unsafe extern "C" fn __pdgate_init_process(
            cycle: *mut $crate::ffi::ngx_cycle_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch("balancer init_process", $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t, || {
                // SAFETY: nginx's init_process contract; the module static
                // is only written by nginx while loading.
                unsafe { $crate::reclaim::init_process(cycle, ::std::ptr::addr_of!($module)) }
            })
        }

        #[no_mangle]
        #[allow(non_upper_case_globals)]
        pub static mut $module: $crate::ffi::ngx_module_t = $crate::ffi::ngx_module_t {
            ctx: ::std::ptr::addr_of!(__PDGATE_CTX) as *mut ::std::ffi::c_void,
            commands: ::std::ptr::addr_of_mut!(__PDGATE_COMMANDS) as *mut $crate::ffi::ngx_command_t,
            type_: $crate::ffi::NGX_HTTP_MODULE as $crate::ffi::ngx_uint_t,
            init_process: Some(__pdgate_init_process),
            ..$crate::ffi::ngx_module_t::default()
        };

        $crate::ngx::ngx_modules!($module);
    };
}
