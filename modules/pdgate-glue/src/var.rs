//! Defining nginx variables (`ngx_http_add_variable`) and filling their
//! values from Rust.

use ngx::ffi::{
    ngx_conf_t, ngx_http_add_variable, ngx_http_get_variable_pt, ngx_http_variable_value_t,
    ngx_str_t, NGX_HTTP_VAR_NOCACHEABLE,
};

/// Adds the variable `name` (without `$`) with getter `get`, not cached, so
/// it may change during the request (read before and after a choice).
///
/// # Safety
/// `cf` must be the conf of an http preconfiguration callback; `name` must
/// be static.
pub unsafe fn add(
    cf: *mut ngx_conf_t,
    name: &'static str,
    get: ngx_http_get_variable_pt,
) -> Result<(), crate::NgxError> {
    // SAFETY: ngx_http_add_variable copies nothing but keeps `name`, which
    // is static; the returned variable lives in the conf pool.
    unsafe {
        let mut n = ngx_str_t { len: name.len(), data: name.as_ptr() as *mut u8 };
        let v = ngx_http_add_variable(cf, &mut n, NGX_HTTP_VAR_NOCACHEABLE as usize);
        if v.is_null() {
            return Err(crate::NgxError);
        }
        (*v).get_handler = get;
        (*v).data = 0;
    }
    Ok(())
}

/// Sets a variable's value to `bytes`, which must stay valid for the rest
/// of the request (request-pool or configuration memory).
pub fn set(v: &mut ngx_http_variable_value_t, bytes: &[u8]) {
    v.set_len(bytes.len() as u32);
    v.set_valid(1);
    v.set_no_cacheable(1);
    v.set_not_found(0);
    v.data = bytes.as_ptr() as *mut u8;
}

/// Marks a variable as not found (empty in logs, `""` in `if`).
pub fn not_found(v: &mut ngx_http_variable_value_t) {
    v.set_len(0);
    v.set_valid(0);
    v.set_not_found(1);
    v.data = std::ptr::null_mut();
}
