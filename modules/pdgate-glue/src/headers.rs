//! Request header lookup and insertion.

use ngx::ffi::{ngx_http_request_t, ngx_list_push, ngx_pnalloc, ngx_str_t, ngx_table_elt_t};

use ngx::ffi::ngx_list_part_t;

/// Calls `f(name, value)` for every live request header in arrival order
/// (including ones modules added) until it returns `Some`.
///
/// # Safety
/// `r` must be a live request.
unsafe fn scan_in<'a, T>(
    r: *mut ngx_http_request_t,
    mut f: impl FnMut(&'a [u8], &'a [u8]) -> Option<T>,
) -> Option<T> {
    // SAFETY: headers_in.headers is an ngx_list_t of ngx_table_elt_t whose
    // parts and strings live in the request pool.
    unsafe {
        let mut part = &(*r).headers_in.headers.part as *const ngx_list_part_t;
        while !part.is_null() {
            let elts = (*part).elts as *const ngx_table_elt_t;
            for i in 0..(*part).nelts {
                let h = &*elts.add(i);
                if h.hash != 0 {
                    let found = f(crate::conf::str_bytes(&h.key), crate::conf::str_bytes(&h.value));
                    if found.is_some() {
                        return found;
                    }
                }
            }
            part = (*part).next;
        }
    }
    None
}

/// The value of the first request header named `name` (any case).
///
/// # Safety
/// `r` must be a live request.
pub unsafe fn find_in<'a>(r: *mut ngx_http_request_t, name: &[u8]) -> Option<&'a [u8]> {
    // SAFETY: forwarded from the caller.
    unsafe { scan_in(r, |k, v| k.eq_ignore_ascii_case(name).then_some(v)) }
}

/// Copies `bytes` into the request pool.
///
/// # Safety
/// `r` must be a live request.
pub unsafe fn pool_str(r: *mut ngx_http_request_t, bytes: &[u8]) -> Option<ngx_str_t> {
    // SAFETY: a fresh pool allocation of `len` bytes receives `len` bytes.
    unsafe {
        let p = ngx_pnalloc((*r).pool, bytes.len().max(1)) as *mut u8;
        if p.is_null() {
            return None;
        }
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        Some(ngx_str_t { len: bytes.len(), data: p })
    }
}

/// Appends a request header (as if the client had sent it), so every
/// upstream leg, subrequests included, forwards it and `$http_<name>` sees it.
/// `name` must be given in the case it is sent, `lowcase` in lowercase.
///
/// # Safety
/// `r` must be a live request.
pub unsafe fn push_in(
    r: *mut ngx_http_request_t,
    name: &'static str,
    lowcase: &'static str,
    value: &[u8],
) -> Result<(), crate::NgxError> {
    // SAFETY: r is live (caller); its header list is the request's.
    unsafe { push(r, &mut (*r).headers_in.headers, name, lowcase.as_ptr() as *mut u8, value) }
}

/// Appends `name: value` to `list`, one of `r`'s header lists.
///
/// # Safety
/// `r` must be a live request and `list` one of its header lists.
unsafe fn push(
    r: *mut ngx_http_request_t,
    list: *mut ngx::ffi::ngx_list_t,
    name: &'static str,
    lowcase: *mut u8,
    value: &[u8],
) -> Result<(), crate::NgxError> {
    // SAFETY: ngx_list_push returns space for one ngx_table_elt_t in the
    // list (or NULL); we initialise every field before nginx can read it.
    // Static strings outlive the request; the value is copied into the pool.
    unsafe {
        let value = pool_str(r, value).ok_or(crate::NgxError)?;
        let h = ngx_list_push(list) as *mut ngx_table_elt_t;
        if h.is_null() {
            return Err(crate::NgxError);
        }
        std::ptr::write_bytes(h, 0, 1);
        (*h).hash = 1;
        (*h).key = ngx_str_t { len: name.len(), data: name.as_ptr() as *mut u8 };
        (*h).value = value;
        (*h).lowcase_key = lowcase;
    }
    Ok(())
}

/// Every request header, in arrival order (including ones modules added).
///
/// # Safety
/// `r` must be a live request.
pub unsafe fn all_in<'a>(r: *mut ngx_http_request_t) -> Vec<(&'a [u8], &'a [u8])> {
    let mut out = Vec::new();
    // SAFETY: forwarded from the caller.
    unsafe {
        scan_in::<()>(r, |k, v| {
            out.push((k, v));
            None
        })
    };
    out
}

/// Appends a response header of `r` (before its header is sent), such as
/// `Retry-After`.
///
/// # Safety
/// `r` must be a live request that has not sent its header yet.
pub unsafe fn push_out(
    r: *mut ngx_http_request_t,
    name: &'static str,
    value: &[u8],
) -> Result<(), crate::NgxError> {
    // SAFETY: r is live and has not sent its header (caller).
    unsafe { push(r, &mut (*r).headers_out.headers, name, std::ptr::null_mut(), value) }
}
