//! A module's own shared zone of in-flight counters: a [`SlotTable`] that
//! every worker updates with atomics, keyed by [`peer_key`] so a reload that
//! reorders servers finds each server's slot again.
//!
//! [`peer_key`]: pdgate_core::balance::slots::peer_key

use std::ffi::c_void;

use ngx::ffi::{
    ngx_conf_t, ngx_int_t, ngx_module_t, ngx_shared_memory_add, ngx_shm_zone_t, ngx_slab_calloc,
    ngx_slab_pool_t, ngx_str_t, NGX_ERROR, NGX_OK,
};
use pdgate_core::balance::slots::{Slot, SlotTable, SLOT_BYTES};

/// Slots of a counters zone.
pub const SLOTS: usize = 1024;

/// Size of a counters zone (the slots plus slab overhead, at least the 8
/// pages nginx wants).
pub const ZONE_SIZE: usize = 256 << 10;

#[repr(C)]
struct Header {
    magic: u64,
    slots: u64,
}

const MAGIC: u64 = 0x7064_6761_7465_0c01;

unsafe extern "C" fn zone_init(zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx calls this with the zone it created (its slab pool at
    // shm.addr) and the previous cycle's `data` on reload.
    unsafe {
        if !data.is_null() {
            (*zone).data = data;
            return NGX_OK as ngx_int_t;
        }
        let shpool = (*zone).shm.addr as *mut ngx_slab_pool_t;
        if (*zone).shm.exists != 0 && !(*shpool).data.is_null() {
            (*zone).data = (*shpool).data;
            return NGX_OK as ngx_int_t;
        }
        let bytes = std::mem::size_of::<Header>() + SLOTS * SLOT_BYTES;
        let h = ngx_slab_calloc(shpool, bytes) as *mut Header;
        if h.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        (*h).magic = MAGIC;
        (*h).slots = SLOTS as u64;
        (*shpool).data = h as *mut c_void;
        (*zone).data = h as *mut c_void;
    }
    NGX_OK as ngx_int_t
}

/// Adds (or finds) the zone `name` of `module`.
///
/// # Safety
/// `cf` must be a live configuration (directive handler or
/// postconfiguration); `name` must be static.
pub unsafe fn add_zone(
    cf: *mut ngx_conf_t,
    name: &'static str,
    module: &ngx_module_t,
) -> Result<*mut ngx_shm_zone_t, crate::NgxError> {
    // SAFETY: ngx_shared_memory_add copies nothing from `name` but keeps
    // the pointer, which is static.
    unsafe {
        let mut n = ngx_str_t { len: name.len(), data: name.as_ptr() as *mut u8 };
        let zone = ngx_shared_memory_add(cf, &mut n, ZONE_SIZE, module as *const _ as *mut _);
        if zone.is_null() {
            return Err(crate::NgxError);
        }
        (*zone).init = Some(zone_init);
        Ok(zone)
    }
}

/// The zone's slot table, once the zone is initialised.
///
/// # Safety
/// `zone` must be NULL or a zone returned by [`add_zone`] in the running
/// configuration cycle.
pub unsafe fn table<'a>(zone: *mut ngx_shm_zone_t) -> Option<SlotTable<'a>> {
    // SAFETY: zone->data is the header zone_init placed in the shared zone
    // (checked by its magic), followed by `slots` 8-byte aligned slots of
    // atomics; the zone lives as long as the cycle.
    unsafe {
        let h = (zone.as_ref()?.data as *const Header).as_ref()?;
        if h.magic != MAGIC {
            return None;
        }
        let slots = (h as *const Header).add(1) as *const Slot;
        Some(SlotTable::new(std::slice::from_raw_parts(slots, h.slots as usize)))
    }
}
