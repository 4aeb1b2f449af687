//! Registering phase handlers (ngx-rust 0.5.1 has no API for it).

use ngx::ffi::{
    ngx_array_push, ngx_conf_t, ngx_http_core_main_conf_t, ngx_http_core_module,
    ngx_http_handler_pt, ngx_http_phases,
};
use ngx::http::HttpModuleConfExt;

/// Appends `handler` to the handlers of `phase`, as a C module does in its
/// postconfiguration (`ngx_array_push(&cmcf->phases[phase].handlers)`).
///
/// # Safety
/// `cf` must be the `ngx_conf_t` of an http postconfiguration callback.
pub unsafe fn add_handler(
    cf: *mut ngx_conf_t,
    phase: ngx_http_phases,
    handler: ngx_http_handler_pt,
) -> Result<(), crate::NgxError> {
    // SAFETY: in postconfiguration the http main conf of the core module
    // exists, and its phase arrays were initialised by ngx_http_init_phases.
    unsafe {
        let cmcf = (*cf)
            .http_main_conf_unchecked::<ngx_http_core_main_conf_t>(&*std::ptr::addr_of!(
                ngx_http_core_module
            ))
            .ok_or(crate::NgxError)?
            .as_ptr();
        let slot = ngx_array_push(&mut (*cmcf).phases[phase as usize].handlers)
            as *mut ngx_http_handler_pt;
        if slot.is_null() {
            return Err(crate::NgxError);
        }
        *slot = handler;
    }
    Ok(())
}
