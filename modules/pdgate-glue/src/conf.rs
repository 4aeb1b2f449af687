//! Directive helpers: reading arguments and reporting errors the way nginx
//! does (`"<name>" directive <message> in <file>:<line>`).

use std::ffi::c_char;

use ngx::core::NGX_CONF_ERROR;
use ngx::ffi::{ngx_conf_t, ngx_pnalloc, ngx_str_t};

/// The arguments of the directive being parsed, the name first.
///
/// # Safety
/// `cf` must be the `ngx_conf_t` nginx passed to a directive handler.
pub unsafe fn args<'a>(cf: *mut ngx_conf_t) -> &'a [ngx_str_t] {
    // SAFETY: during a directive handler `cf->args` is an array of ngx_str_t
    // with `nelts` elements, alive until the handler returns.
    unsafe {
        let a = (*cf).args;
        if a.is_null() || (*a).nelts == 0 {
            return &[];
        }
        std::slice::from_raw_parts((*a).elts as *const ngx_str_t, (*a).nelts)
    }
}

/// The bytes of an `ngx_str_t`.
///
/// # Safety
/// `s` must point at `len` readable bytes (or have `len == 0`).
pub unsafe fn str_bytes<'a>(s: &ngx_str_t) -> &'a [u8] {
    if s.len == 0 || s.data.is_null() {
        return &[];
    }
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts(s.data, s.len) }
}

/// A NUL-terminated copy of `msg` in the configuration pool, returned from a
/// directive handler so that nginx prints `"<name>" directive <msg>`.
///
/// # Safety
/// `cf` must be the `ngx_conf_t` nginx passed to a directive handler.
pub unsafe fn error(cf: *mut ngx_conf_t, msg: &str) -> *mut c_char {
    // SAFETY: cf->pool is the live configuration pool; we write `len + 1`
    // bytes into a fresh allocation of that size.
    unsafe {
        let p = ngx_pnalloc((*cf).pool, msg.len() + 1) as *mut u8;
        if p.is_null() {
            return NGX_CONF_ERROR;
        }
        std::ptr::copy_nonoverlapping(msg.as_ptr(), p, msg.len());
        *p.add(msg.len()) = 0;
        p as *mut c_char
    }
}

/// The value nginx expects from a directive handler that succeeded.
pub const OK: *mut c_char = std::ptr::null_mut();

/// A directive name for a command table. nginx compares names with
/// `strcmp`, so the `ngx_str_t` must point at NUL-terminated bytes.
pub const fn name(s: &'static std::ffi::CStr) -> ngx_str_t {
    ngx_str_t { len: s.count_bytes(), data: s.as_ptr() as *mut u8 }
}

/// A command-table entry for a directive whose handler gets the location
/// configuration (`NGX_HTTP_LOC_CONF_OFFSET`): `type_` is its contexts and
/// arity (`NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1`, …).
pub const fn loc_command(
    name: &'static std::ffi::CStr,
    type_: u32,
    set: ngx::ffi::ngx_conf_handler_pt,
) -> ngx::ffi::ngx_command_t {
    ngx::ffi::ngx_command_t {
        name: self::name(name),
        type_: type_ as ngx::ffi::ngx_uint_t,
        set,
        conf: ngx::ffi::NGX_HTTP_LOC_CONF_OFFSET as ngx::ffi::ngx_uint_t,
        offset: 0,
        post: std::ptr::null_mut(),
    }
}

/// A command-table entry for a directive of `upstream {}` blocks, whose
/// handler gets the block's server configuration; `type_` adds the arity
/// (`NGX_CONF_ANY`, …).
pub const fn upstream_command(
    name: &'static std::ffi::CStr,
    type_: u32,
    set: ngx::ffi::ngx_conf_handler_pt,
) -> ngx::ffi::ngx_command_t {
    ngx::ffi::ngx_command_t {
        name: self::name(name),
        type_: (ngx::ffi::NGX_HTTP_UPS_CONF | type_) as ngx::ffi::ngx_uint_t,
        set,
        conf: ngx::ffi::NGX_HTTP_SRV_CONF_OFFSET as ngx::ffi::ngx_uint_t,
        offset: 0,
        post: std::ptr::null_mut(),
    }
}

/// Every http level: main, server and location.
pub const ANY_LEVEL: u32 =
    ngx::ffi::NGX_HTTP_MAIN_CONF | ngx::ffi::NGX_HTTP_SRV_CONF | ngx::ffi::NGX_HTTP_LOC_CONF;

/// [`loc_command`] of a directive taking one argument at any level.
pub const fn take1(
    name: &'static std::ffi::CStr,
    set: ngx::ffi::ngx_conf_handler_pt,
) -> ngx::ffi::ngx_command_t {
    loc_command(name, ANY_LEVEL | ngx::ffi::NGX_CONF_TAKE1, set)
}

/// An `on|off` directive at any level stored by nginx's own flag slot at
/// `offset` of the location configuration.
pub const fn flag(name: &'static std::ffi::CStr, offset: usize) -> ngx::ffi::ngx_command_t {
    ngx::ffi::ngx_command_t {
        name: self::name(name),
        type_: (ANY_LEVEL | ngx::ffi::NGX_CONF_FLAG) as ngx::ffi::ngx_uint_t,
        set: Some(ngx::ffi::ngx_conf_set_flag_slot),
        conf: ngx::ffi::NGX_HTTP_LOC_CONF_OFFSET as ngx::ffi::ngx_uint_t,
        offset,
        post: std::ptr::null_mut(),
    }
}

/// `file:line` of the directive being parsed, for errors reported later
/// (in postconfiguration), in nginx's `in file:line` form.
///
/// # Safety
/// `cf` must be the `ngx_conf_t` nginx passed to a directive handler.
pub unsafe fn place(cf: *mut ngx_conf_t) -> String {
    // SAFETY: while parsing, cf->conf_file is the file being read.
    unsafe {
        match (*cf).conf_file.as_ref() {
            Some(f) => format!("{}:{}", String::from_utf8_lossy(str_bytes(&f.file.name)), f.line),
            None => String::new(),
        }
    }
}

/// Reports a bad value in nginx's own words (as `ngx_conf_set_flag_slot`
/// does): `invalid value "<value>" in "<directive>" directive, it must be
/// <expects>`, and returns what the handler returns.
///
/// # Safety
/// `cf` must be the `ngx_conf_t` nginx passed to a directive handler.
pub unsafe fn invalid_value(cf: *mut ngx_conf_t, value: &[u8], expects: &str) -> *mut c_char {
    // SAFETY: forwarded; the arguments live until the handler returns.
    unsafe {
        let name = args(cf).first().map(|a| str_bytes(a)).unwrap_or(&[]);
        ngx::ngx_conf_log_error!(
            ngx::ffi::NGX_LOG_EMERG,
            cf,
            "invalid value \"{}\" in \"{}\" directive, it must be {}",
            String::from_utf8_lossy(value),
            String::from_utf8_lossy(name),
            expects
        );
    }
    NGX_CONF_ERROR
}

/// Sets the content handler of the location being parsed.
///
/// # Safety
/// `cf` must be a location-context directive handler's conf.
pub unsafe fn set_content_handler(
    cf: *mut ngx_conf_t,
    handler: ngx::ffi::ngx_http_handler_pt,
) -> *mut c_char {
    use ngx::http::HttpModuleConfExt;
    // SAFETY: in location context the core module's loc conf exists.
    unsafe {
        match (*cf).http_location_conf_unchecked::<ngx::ffi::ngx_http_core_loc_conf_t>(
            &*std::ptr::addr_of!(ngx::ffi::ngx_http_core_module),
        ) {
            Some(clcf) => {
                (*clcf.as_ptr()).handler = handler;
                OK
            }
            None => NGX_CONF_ERROR,
        }
    }
}

/// A size as nginx's own zone directives read it (`ngx_parse_size`:
/// bytes, or with a `k`, `m` or `g` suffix); None when invalid.
pub fn parse_size(value: &[u8]) -> Option<usize> {
    let mut s = ngx_str_t { len: value.len(), data: value.as_ptr() as *mut u8 };
    // SAFETY: ngx_parse_size only reads the `len` bytes at `data` (none
    // when `len` is 0).
    let n = unsafe { ngx::ffi::ngx_parse_size(&mut s) };
    usize::try_from(n).ok()
}

/// The memory page size (`ngx_pagesize`), e.g. for the 8-page minimum of a
/// shared zone.
pub fn pagesize() -> usize {
    // SAFETY: ngx_os_init sets ngx_pagesize once, before any configuration
    // is read; it is only read afterwards.
    unsafe { *std::ptr::addr_of!(ngx::ffi::ngx_pagesize) }
}
