//! A module's own shared zone of in-flight counters: a [`SlotTable`] that
//! every worker updates with atomics, keyed by [`peer_key`] so a reload that
//! reorders servers finds each server's slot again. The zone is a
//! [`SlotZone`] placed and kept across reloads by [`crate::zone`].
//!
//! [`peer_key`]: pdgate_core::balance::slots::peer_key

use std::ptr::NonNull;

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

/// A counters zone of the configuration, for module crates: attached by
/// directives ([`Zone::add`]) and kept in the location configuration (and,
/// by copy, in a request's state).
#[derive(Debug, Clone, Copy)]
pub struct Zone(NonNull<ngx_shm_zone_t>);

impl Zone {
    /// Adds (or finds: every call of a configuration cycle gets the same
    /// zone) the counters zone `name` of `module`.
    pub fn add(
        cf: &mut crate::http::Conf,
        name: &'static str,
        module: &ngx_module_t,
    ) -> Result<Zone, crate::NgxError> {
        // SAFETY: a Conf exists only during a configuration callback.
        let z = unsafe { add_zone(cf.as_ptr(), name, module) }?;
        NonNull::new(z).map(Zone).ok_or(crate::NgxError)
    }

    /// The zone's slot table, once nginx initialised the zone.
    pub fn table(&self) -> Option<SlotTable<'_>> {
        // SAFETY: the zone was returned by add_zone for the configuration
        // this handle belongs to, which outlives the requests using it.
        unsafe { table(self.0.as_ptr()) }
    }
}
