//! A module's own shared zone of in-flight counters: a [`SlotTable`] that
//! every worker updates with atomics, keyed by [`peer_key`] so a reload that
//! reorders servers finds each server's slot again. The zone is a
//! [`SlotZone`] placed and kept across reloads by [`crate::zone`].
//!
//! The zone records per worker what each holds (pdgate-core's ledger); a
//! worker's first [`table`] names it, and [`table`] gives back what dead
//! workers held at most once a second per worker ([`crate::reclaim`]), so
//! a module needs no `init_process` of its own for that.
//!
//! [`peer_key`]: pdgate_core::balance::slots::peer_key

use std::ptr::NonNull;

use ngx::ffi::{ngx_conf_t, ngx_module_t, ngx_shm_zone_t};
use pdgate_core::balance::slots::{SlotTable, SlotZone};

/// Size of a counters zone (the slots and the ledger plus slab overhead,
/// at least the 8 pages nginx wants).
pub const ZONE_SIZE: usize = 256 << 10;

// The state and the slab pool's own pages fit.
const _: () = assert!(std::mem::size_of::<SlotZone>() + (16 << 12) <= ZONE_SIZE);

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
    // SAFETY: forwarded; the zone's name lives as long as the zone.
    unsafe {
        let t = crate::zone::state::<SlotZone>(zone).map(SlotZone::table)?;
        crate::reclaim::ensure_named();
        if crate::reclaim::due() {
            let name = crate::conf::str_bytes(&(*zone).shm.name);
            crate::reclaim::sweep(name, &t, None, ngx::log::ngx_cycle_log().as_ptr());
        }
        Some(t)
    }
}

/// The [`SlotZone`] of any zone of the cycle that holds one (recognised by
/// its magic, within the zone's mapping), e.g. to sweep it.
///
/// # Safety
/// `z` must be a zone of the running cycle.
pub(crate) unsafe fn slot_zone<'a>(z: *const ngx_shm_zone_t) -> Option<&'a SlotZone> {
    // SAFETY: the state is only read once it is known to lie inside the
    // zone's mapping (and 8-byte aligned, as the slab allocates it).
    unsafe {
        let z = z.as_ref()?;
        let at = z.data as usize;
        let start = z.shm.addr as usize;
        let end = start.saturating_add(z.shm.size);
        if at == 0
            || at < start
            || at.saturating_add(std::mem::size_of::<SlotZone>()) > end
            || !at.is_multiple_of(8)
        {
            return None;
        }
        let sz = &*(at as *const SlotZone);
        sz.is_attached().then_some(sz)
    }
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
