//! A module's own shared zone of in-flight counters: a [`SlotTable`] that
//! every worker updates with atomics, keyed by [`peer_key`] so a reload that
//! reorders servers finds each server's slot again. The zone is a
//! [`SlotZone`] placed and kept across reloads by [`crate::zone`].
//!
//! [`peer_key`]: pdgate_core::balance::slots::peer_key

use ngx::ffi::{ngx_conf_t, ngx_module_t, ngx_shm_zone_t};
use pdgate_core::balance::slots::{SlotTable, SlotZone};

/// Size of a counters zone (the slots plus slab overhead, at least the 8
/// pages nginx wants).
pub const ZONE_SIZE: usize = 256 << 10;

/// Adds (or finds) the zone `name` of `module`.
///
/// # Safety
/// `cf` must be a live configuration (directive handler or
/// postconfiguration).
pub unsafe fn add_zone(
    cf: *mut ngx_conf_t,
    name: &'static str,
    module: &ngx_module_t,
) -> Result<*mut ngx_shm_zone_t, crate::NgxError> {
    // SAFETY: forwarded.
    unsafe { crate::zone::find_or_add::<SlotZone>(cf, name.as_bytes(), ZONE_SIZE, module) }
}

/// The zone's slot table, once the zone is initialised.
///
/// # Safety
/// `zone` must be NULL or a zone returned by [`add_zone`] in the running
/// configuration cycle.
pub unsafe fn table<'a>(zone: *mut ngx_shm_zone_t) -> Option<SlotTable<'a>> {
    // SAFETY: forwarded.
    unsafe { crate::zone::state::<SlotZone>(zone).map(SlotZone::table) }
}
