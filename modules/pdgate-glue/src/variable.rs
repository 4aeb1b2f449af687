//! Registering variables and answering their evaluation (ngx-rust 0.5.1
//! only has macros for the handler signature).

use std::ffi::c_void;

use ngx::ffi::{
    ngx_conf_t, ngx_http_add_variable, ngx_http_get_variable_index, ngx_http_get_variable_pt,
    ngx_str_t, ngx_variable_value_t, NGX_HTTP_VAR_NOCACHEABLE, NGX_LOG_EMERG,
};

/// Declares `$name` (without the `$`) with `get` as its handler and `data`
/// passed to it, and indexes it, so that every lookup goes through nginx's
/// per-request cache: the handler then runs once per request, its value
/// being shared with the request's subrequests (`ngx_http_subrequest` gives
/// them the parent's variable array). Fails when the name is taken; nginx
/// has then logged `the duplicate "name" variable` (so do we, when an
/// earlier `map` or `set` declared it).
///
/// # Safety
/// `cf` must be a directive handler's conf in http context; `data` must stay
/// valid as long as the configuration.
pub unsafe fn add(
    cf: *mut ngx_conf_t,
    name: &[u8],
    get: ngx_http_get_variable_pt,
    data: *const c_void,
) -> Result<(), crate::NgxError> {
    // SAFETY: forwarded from the caller.
    unsafe { add_flags(cf, name, get, data, 0) }
}

/// As [`add`], for a value that changes during the request (a duration,
/// a status known only later): nginx evaluates it again on each script or
/// `log_format` use instead of keeping the first value.
///
/// # Safety
/// As [`add`].
pub unsafe fn add_volatile(
    cf: *mut ngx_conf_t,
    name: &[u8],
    get: ngx_http_get_variable_pt,
    data: *const c_void,
) -> Result<(), crate::NgxError> {
    // SAFETY: forwarded from the caller.
    unsafe { add_flags(cf, name, get, data, NGX_HTTP_VAR_NOCACHEABLE as usize) }
}

unsafe fn add_flags(
    cf: *mut ngx_conf_t,
    name: &[u8],
    get: ngx_http_get_variable_pt,
    data: *const c_void,
    flags: usize,
) -> Result<(), crate::NgxError> {
    // nginx copies the name into the configuration pool.
    let mut s = ngx_str_t { len: name.len(), data: name.as_ptr() as *mut u8 };
    // SAFETY: cf is live; ngx_http_add_variable returns NULL or a variable
    // of the main conf's table (neither changeable nor weak, so a `set` or
    // `map` of the same name is refused).
    unsafe {
        let v = ngx_http_add_variable(cf, &mut s, flags);
        if v.is_null() {
            return Err(crate::NgxError);
        }
        // A changeable variable declared earlier (`map`, `set`) is handed
        // back as is: refuse it as nginx refuses the other order.
        if (*v).get_handler.is_some() {
            ngx::ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "the duplicate \"{}\" variable",
                String::from_utf8_lossy(name)
            );
            return Err(crate::NgxError);
        }
        (*v).get_handler = get;
        (*v).data = data as usize;
        if ngx_http_get_variable_index(cf, &mut s) < 0 {
            return Err(crate::NgxError);
        }
    }
    Ok(())
}

/// Gives a variable the value `bytes`, cacheable for the request.
///
/// # Safety
/// `v` must be the value nginx passed to a get handler; `bytes` must live as
/// long as the request (configuration memory does).
pub unsafe fn set(v: *mut ngx_variable_value_t, bytes: &[u8]) {
    // SAFETY: v is valid per the caller; the length fits the 28-bit field
    // for any name nginx accepts as an argument.
    unsafe {
        (*v).set_len(bytes.len() as u32);
        (*v).set_valid(1);
        (*v).set_no_cacheable(0);
        (*v).set_not_found(0);
        (*v).data = bytes.as_ptr() as *mut u8;
    }
}

/// Marks a variable as not found (an empty value in scripts).
///
/// # Safety
/// As [`set`].
pub unsafe fn not_found(v: *mut ngx_variable_value_t) {
    // SAFETY: v is valid per the caller.
    unsafe {
        (*v).set_valid(0);
        (*v).set_not_found(1);
    }
}

/// The handler and data a variable had before [`add_chained`] took it.
pub type Previous = (ngx_http_get_variable_pt, usize);

/// Declares `$name` for a value that changes during the request, shared
/// between modules: when another module (the other P/D module) declared it
/// the same way, `get` takes its place and gets back the earlier handler,
/// to call for the requests that are not its own. Both must use this.
///
/// # Safety
/// As [`add`].
pub unsafe fn add_chained(
    cf: *mut ngx_conf_t,
    name: &[u8],
    get: ngx_http_get_variable_pt,
    data: usize,
) -> Result<Previous, crate::NgxError> {
    let mut s = ngx_str_t { len: name.len(), data: name.as_ptr() as *mut u8 };
    // SAFETY: cf is live; nginx returns NULL (and logs) when the name is
    // taken by a variable that is not changeable.
    unsafe {
        let flags = (NGX_HTTP_VAR_NOCACHEABLE | ngx::ffi::NGX_HTTP_VAR_CHANGEABLE) as usize;
        let v = ngx_http_add_variable(cf, &mut s, flags);
        if v.is_null() {
            return Err(crate::NgxError);
        }
        let prev = ((*v).get_handler, (*v).data);
        (*v).get_handler = get;
        (*v).data = data;
        if ngx_http_get_variable_index(cf, &mut s) < 0 {
            return Err(crate::NgxError);
        }
        Ok(prev)
    }
}

/// The index of the indexed variable `name` in the running cycle (`None`:
/// no module indexed it), looked up once per cycle for each name.
pub fn running_index(name: &'static [u8]) -> Option<usize> {
    use std::cell::RefCell;
    use std::ptr::addr_of;
    /// (name, cycle, index) of each name looked up.
    type Found = Vec<(&'static [u8], usize, Option<usize>)>;
    thread_local! {
        static FOUND: RefCell<Found> = const { RefCell::new(Vec::new()) };
    }
    // SAFETY: ngx_cycle is the running cycle of this worker; its http
    // configuration (core main conf and its array of indexed variables)
    // lives as long as it.
    unsafe {
        let cycle = *addr_of!(ngx::ffi::ngx_cycle);
        let at = cycle as usize;
        if let Some(hit) =
            FOUND.with(|f| f.borrow().iter().find(|e| e.0 == name && e.1 == at).map(|e| e.2))
        {
            return hit;
        }
        let found = (|| {
            let c = cycle.as_ref()?;
            let ctx = (*c.conf_ctx.add((*addr_of!(ngx::ffi::ngx_http_module)).index)
                as *const ngx::ffi::ngx_http_conf_ctx_t)
                .as_ref()?;
            let cmcf = (*ctx.main_conf.add((*addr_of!(ngx::ffi::ngx_http_core_module)).ctx_index)
                as *const ngx::ffi::ngx_http_core_main_conf_t)
                .as_ref()?;
            let vars = std::slice::from_raw_parts(
                cmcf.variables.elts as *const ngx::ffi::ngx_http_variable_t,
                cmcf.variables.nelts,
            );
            vars.iter().position(|v| crate::conf::str_bytes(&v.name) == name)
        })();
        FOUND.with(|f| {
            let mut f = f.borrow_mut();
            f.retain(|e| e.1 == at);
            f.push((name, at, found));
        });
        found
    }
}

/// The value of indexed variable `index` for `r` (`None`: not found).
///
/// # Safety
/// `r` must be a live request of the running cycle, `index` from
/// [`running_index`].
pub unsafe fn indexed_value<'a>(
    r: *mut ngx::ffi::ngx_http_request_t,
    index: usize,
) -> Option<&'a [u8]> {
    // SAFETY: as documented; the value lives in the request's pool.
    unsafe {
        let v = ngx::ffi::ngx_http_get_indexed_variable(r, index).as_ref()?;
        if v.not_found() != 0 || v.valid() == 0 || v.data.is_null() {
            return None;
        }
        Some(std::slice::from_raw_parts(v.data, v.len() as usize))
    }
}
