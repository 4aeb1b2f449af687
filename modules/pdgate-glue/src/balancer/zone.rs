//! A balancer's shared zone: one per balancer module, shared by every
//! upstream that uses the balancer. A header, then the slots (in-flight
//! counters per (upstream, peer)), the pending table, the ledger (what each
//! worker holds, so a dead worker's share is given back: see
//! [`crate::reclaim`]) and the prefix index, each an array of 8-byte
//! atomics (pdgate-core's layouts).

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use ngx::ffi::{
    ngx_conf_t, ngx_int_t, ngx_module_t, ngx_shared_memory_add, ngx_shm_zone_t, ngx_slab_calloc,
    ngx_slab_pool_t, ngx_str_t, NGX_ERROR, NGX_OK,
};
use pdgate_core::balance::ledger::{Ledger, Row, ROW_BYTES};
use pdgate_core::balance::pending::{Pending, PendingTable, PENDING_BYTES};
use pdgate_core::balance::policy::Shared;
use pdgate_core::balance::prefix::{self, PrefixIndex, ENTRY_BYTES};
use pdgate_core::balance::slots::{Slot, SlotTable, SLOT_BYTES};

/// Default (and least) size of a balancer's shared zone; `<name>_shm_size`
/// sets another, and a zone too small for the prefix index grows to fit.
pub const ZONE_SIZE: usize = 1 << 20;

/// Slots of a zone: (upstream, peer) identities, all upstreams together.
pub const SLOTS: usize = 2048;

/// Entries of a zone's table of requests in prefill (pd_score_balance).
pub const PENDING: usize = 1024;

/// Ledger rows of a zone: worker processes using it at once (during a
/// reload, the old ones still finishing too).
pub const LEDGER_ROWS: usize = 64;

/// The start of a balancer's zone; the slots, the pending table, the
/// ledger and the prefix index follow, in that order.
#[repr(C)]
pub(crate) struct TableHeader {
    magic: u64,
    slots: u64,
    pending: u64,
    ledger: u64,
    index: u64,
    /// The prefix index's LRU clock.
    clock: AtomicU64,
}

const MAGIC: u64 = 0x7064_6761_7465_0003;

/// Entries of the prefix index a new zone gets (set at postconfiguration;
/// each balancer module has its own copy of this crate's statics).
static INDEX_ENTRIES: AtomicUsize = AtomicUsize::new(0);

/// `<name>_shm_size`, or 0.
pub(super) static SHM_SIZE: AtomicUsize = AtomicUsize::new(0);

/// Forgets the sizes of the previous configuration.
pub(super) fn reset() {
    SHM_SIZE.store(0, Ordering::Relaxed);
    INDEX_ENTRIES.store(0, Ordering::Relaxed);
}

/// Bytes of the zone's layout with `index` prefix-index entries.
pub(super) fn layout_bytes(index: usize) -> usize {
    std::mem::size_of::<TableHeader>()
        + SLOTS * SLOT_BYTES
        + PENDING * PENDING_BYTES
        + LEDGER_ROWS * ROW_BYTES
        + index * ENTRY_BYTES
}

unsafe extern "C" fn zone_init(zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx calls this with the zone it created (its slab pool at
    // shm.addr) and the previous cycle's `data` on reload.
    unsafe {
        if !data.is_null() {
            // Reload: keep the counters (slots are found again by key).
            (*zone).data = data;
            return NGX_OK as ngx_int_t;
        }
        let shpool = (*zone).shm.addr as *mut ngx_slab_pool_t;
        if (*zone).shm.exists != 0 && !(*shpool).data.is_null() {
            (*zone).data = (*shpool).data;
            return NGX_OK as ngx_int_t;
        }
        let index = INDEX_ENTRIES.load(Ordering::Relaxed);
        let h = ngx_slab_calloc(shpool, layout_bytes(index)) as *mut TableHeader;
        if h.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        (*h).magic = MAGIC;
        (*h).slots = SLOTS as u64;
        (*h).pending = PENDING as u64;
        (*h).ledger = LEDGER_ROWS as u64;
        (*h).index = index as u64;
        (*shpool).data = h as *mut c_void;
        (*zone).data = h as *mut c_void;
    }
    NGX_OK as ngx_int_t
}

/// Adds (or finds) the module's zone named `name`.
///
/// # Safety
/// `cf` must be a directive handler's conf.
pub(super) unsafe fn add(
    cf: *mut ngx_conf_t,
    name: &'static str,
    module: &ngx_module_t,
) -> Option<*mut ngx_shm_zone_t> {
    let mut name = ngx_str_t { len: name.len(), data: name.as_ptr() as *mut u8 };
    // SAFETY: nginx copies nothing from `name` it does not keep alive (a
    // static string); `module` is the module's static.
    unsafe {
        let zone = ngx_shared_memory_add(cf, &mut name, ZONE_SIZE, module as *const _ as *mut _);
        let z = zone.as_mut()?;
        z.init = Some(zone_init);
        Some(zone)
    }
}

/// Sets the zone's size for `index` prefix-index entries; `Err(need)`
/// when `<name>_shm_size` set one smaller than the `need` bytes.
///
/// # Safety
/// `zone` must be the zone [`add`] returned, before the cycle maps it.
pub(super) unsafe fn size(zone: *mut ngx_shm_zone_t, index: usize) -> Result<(), usize> {
    let layout = layout_bytes(index);
    let need = layout + layout / 8 + (64 << 10);
    let size = match SHM_SIZE.load(Ordering::Relaxed) {
        0 => need.max(ZONE_SIZE),
        set if set >= need => set,
        _ => return Err(need),
    };
    INDEX_ENTRIES.store(index, Ordering::Relaxed);
    // SAFETY: as documented; nginx maps the zone with this size later.
    unsafe {
        if let Some(z) = zone.as_mut() {
            z.shm.size = size;
        }
    }
    Ok(())
}

/// The zone's structures, or None before its init (or for a zone that is
/// not a balancer's).
pub(crate) fn shared<'a>(zone: *mut ngx_shm_zone_t) -> Option<Shared<'a>> {
    // SAFETY: zone->data is the header zone_init placed in the shared zone
    // (checked by its magic), followed by the arrays it counts, each of
    // 8-byte aligned atomics; the zone lives as long as the cycle.
    unsafe {
        let h = zone.as_ref()?.data as *const TableHeader;
        let h = h.as_ref()?;
        if h.magic != MAGIC {
            return None;
        }
        let slots = (h as *const TableHeader).add(1) as *const Slot;
        let pending = slots.add(h.slots as usize) as *const Pending;
        let rows = pending.add(h.pending as usize) as *const Row;
        let index = rows.add(h.ledger as usize) as *const prefix::Entry;
        let ledger = Ledger::new(std::slice::from_raw_parts(rows, h.ledger as usize));
        crate::reclaim::ensure_named();
        Some(Shared {
            slots: SlotTable::with_ledger(
                std::slice::from_raw_parts(slots, h.slots as usize),
                ledger,
            ),
            pending: PendingTable::new(std::slice::from_raw_parts(pending, h.pending as usize)),
            index: PrefixIndex::new(std::slice::from_raw_parts(index, h.index as usize), &h.clock),
        })
    }
}

/// The zone's slot table.
pub(crate) fn table<'a>(z: *mut ngx_shm_zone_t) -> Option<SlotTable<'a>> {
    shared(z).map(|z| z.slots)
}

/// Whether `z` (any zone of the cycle) holds a balancer zone's header and
/// the whole layout it announces within its mapping.
///
/// # Safety
/// `z` must be a zone of the running cycle.
pub(crate) unsafe fn is_balancer_zone(z: *const ngx_shm_zone_t) -> bool {
    // SAFETY: the header is only read once it is known to lie inside the
    // zone's mapping.
    unsafe {
        let Some(z) = z.as_ref() else { return false };
        let h = z.data as *const TableHeader;
        let shm_start = z.shm.addr as usize;
        let shm_end = shm_start.saturating_add(z.shm.size);
        let h_at = h as usize;
        if h.is_null()
            || h_at < shm_start
            || h_at.saturating_add(std::mem::size_of::<TableHeader>()) > shm_end
            || (*h).magic != MAGIC
        {
            return false;
        }
        let bytes = std::mem::size_of::<TableHeader>()
            + ((*h).slots as usize).saturating_mul(SLOT_BYTES)
            + ((*h).pending as usize).saturating_mul(PENDING_BYTES)
            + ((*h).ledger as usize).saturating_mul(ROW_BYTES)
            + ((*h).index as usize).saturating_mul(ENTRY_BYTES);
        h_at.saturating_add(bytes) <= shm_end
    }
}
