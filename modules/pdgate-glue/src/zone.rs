//! A shared zone holding one fixed-size state shared by every worker, kept
//! across `nginx -s reload` while the zone's name and size are unchanged.
//!
//! The state is a pdgate-core type made of atomics only, for which all-zero
//! bytes are a valid empty state; it is placed by `ngx_slab_calloc` when the
//! zone is first created (the init callback runs in the master, before the
//! workers exist) and found again through `zone->data` on reload, as
//! nginx's `limit_req` and upstream zones do.

use std::ffi::c_void;

use ngx::ffi::{
    ngx_conf_t, ngx_int_t, ngx_module_t, ngx_shared_memory_add, ngx_shm_zone_t, ngx_slab_calloc,
    ngx_slab_pool_t, ngx_str_t, NGX_ERROR, NGX_LOG_EMERG, NGX_OK,
};

/// A state that can live in a shared zone.
///
/// # Safety
/// The type must be `#[repr(C)]`, `Sync`, without pointers or `Drop`, and
/// valid when all its bytes are zero; `attach` turns such memory into a live
/// state and says whether existing memory holds a compatible one.
pub unsafe trait ZoneState: Sync + Sized {
    fn attach(&self) -> bool;
}

// SAFETY: BucketZone is #[repr(C)], made of AtomicU64 only (zero = empty).
unsafe impl ZoneState for pdgate_core::bucket::BucketZone {
    fn attach(&self) -> bool {
        pdgate_core::bucket::BucketZone::attach(self)
    }
}

// SAFETY: MetricsZone is #[repr(C)], made of AtomicU64 only (zero = empty).
unsafe impl ZoneState for pdgate_core::metrics::MetricsZone {
    fn attach(&self) -> bool {
        pdgate_core::metrics::MetricsZone::attach(self)
    }
}

// SAFETY: SlotZone is #[repr(C)], made of AtomicU64 only (zero = empty).
unsafe impl ZoneState for pdgate_core::balance::slots::SlotZone {
    fn attach(&self) -> bool {
        pdgate_core::balance::slots::SlotZone::attach(self)
    }
}

// SAFETY: HealthZone is #[repr(C)], made of AtomicU64 only (zero = empty).
unsafe impl ZoneState for pdgate_core::health::HealthZone {
    fn attach(&self) -> bool {
        pdgate_core::health::HealthZone::attach(self)
    }
}

// SAFETY: HoldZone is #[repr(C)], made of AtomicU64 only (zero = empty).
unsafe impl ZoneState for pdgate_core::hold::HoldZone {
    fn attach(&self) -> bool {
        pdgate_core::hold::HoldZone::attach(self)
    }
}

/// Declares (or finds, when this configuration declared it already) the
/// zone `name` of `size` bytes for `module` with a `T` in it.
///
/// # Safety
/// `cf` must be a live configuration (directive handler or
/// postconfiguration).
pub unsafe fn find_or_add<T: ZoneState>(
    cf: *mut ngx_conf_t,
    name: &[u8],
    size: usize,
    module: &ngx_module_t,
) -> Result<*mut ngx_shm_zone_t, crate::NgxError> {
    // SAFETY: forwarded; a zone declared before has its init set already.
    unsafe {
        match add::<T>(cf, name, size, module)? {
            Some(zone) => Ok(zone),
            None => {
                let mut s = ngx_str_t { len: name.len(), data: name.as_ptr() as *mut u8 };
                let zone =
                    ngx_shared_memory_add(cf, &mut s, size, module as *const _ as *mut c_void);
                if zone.is_null() {
                    Err(crate::NgxError)
                } else {
                    Ok(zone)
                }
            }
        }
    }
}

/// Declares the zone `name` of `size` bytes for `module` with a `T` in it;
/// `Ok(None)` when this configuration already declared it (with this size),
/// which callers treat as a duplicate.
///
/// # Safety
/// `cf` must be a directive handler's conf.
pub unsafe fn add<T: ZoneState>(
    cf: *mut ngx_conf_t,
    name: &[u8],
    size: usize,
    module: &ngx_module_t,
) -> Result<Option<*mut ngx_shm_zone_t>, crate::NgxError> {
    let mut s = ngx_str_t { len: name.len(), data: name.as_ptr() as *mut u8 };
    // SAFETY: cf is live; nginx copies the name, logs its own errors (size
    // conflict, zone of another module) and returns NULL for them.
    unsafe {
        let zone = ngx_shared_memory_add(cf, &mut s, size, module as *const _ as *mut c_void);
        if zone.is_null() {
            return Err(crate::NgxError);
        }
        if (*zone).init.is_some() {
            return Ok(None);
        }
        (*zone).init = Some(init::<T>);
        Ok(Some(zone))
    }
}

unsafe extern "C" fn init<T: ZoneState>(zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    crate::guard::catch("shared zone init", NGX_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls this with the zone it mapped (a slab pool at
        // shm.addr) and, on reload of an unchanged zone, the previous
        // cycle's `data`: our state in that same mapping.
        unsafe {
            let log = (*zone).shm.log;
            if let Some(old) = (data as *const T).as_ref() {
                if old.attach() {
                    (*zone).data = data;
                    return NGX_OK as ngx_int_t;
                }
            }
            let shpool = (*zone).shm.addr as *mut ngx_slab_pool_t;
            if (*zone).shm.exists != 0 {
                if let Some(old) = ((*shpool).data as *const T).as_ref() {
                    if old.attach() {
                        (*zone).data = (*shpool).data;
                        return NGX_OK as ngx_int_t;
                    }
                }
            }
            let p = ngx_slab_calloc(shpool, std::mem::size_of::<T>()) as *const T;
            match p.as_ref() {
                Some(state) if state.attach() => {
                    (*shpool).data = p as *mut c_void;
                    (*zone).data = p as *mut c_void;
                    NGX_OK as ngx_int_t
                }
                _ => {
                    ngx::ngx_log_error!(
                        NGX_LOG_EMERG,
                        log,
                        "zone \"{}\" is too small",
                        String::from_utf8_lossy(crate::conf::str_bytes(&(*zone).shm.name))
                    );
                    NGX_ERROR as ngx_int_t
                }
            }
        }
    })
}

/// The state of a zone declared with [`add`], once nginx initialised it.
///
/// # Safety
/// `zone` must be NULL or a zone [`add`] returned for this `T`.
pub unsafe fn state<'a, T: ZoneState>(zone: *const ngx_shm_zone_t) -> Option<&'a T> {
    // SAFETY: zone->data is NULL or the T placed by `init` in the shared
    // mapping, which lives as long as the cycle (and beyond, on reload).
    unsafe { (zone.as_ref()?.data as *const T).as_ref() }
}

/// The shared zone named `name` in the running cycle, whoever declared it
/// (a zone one module declares and another one reads or records into).
/// Looked up once per cycle and name, and remembered.
pub fn find_in_cycle(name: &'static [u8]) -> Option<*mut ngx_shm_zone_t> {
    use std::cell::RefCell;
    thread_local! {
        /// (name, cycle, zone) of each name looked up: workers are
        /// single-threaded, and a reload brings a new cycle (new workers, in
        /// fact). One entry per name, so lookups of different zones from one
        /// module (the P/D metrics and the health table) do not evict each
        /// other.
        static FOUND: RefCell<Vec<(&'static [u8], usize, usize)>> = const { RefCell::new(Vec::new()) };
    }
    // SAFETY: ngx_cycle is the running cycle in a worker; its shared memory
    // list and zones live as long as it.
    unsafe {
        let cycle = *std::ptr::addr_of!(ngx::ffi::ngx_cycle);
        cycle.as_ref()?;
        let cached = FOUND.with(|f| {
            f.borrow().iter().find(|(n, at, _)| *n == name && *at == cycle as usize).map(|e| e.2)
        });
        if let Some(z) = cached {
            return (z != 0).then_some(z as *mut ngx_shm_zone_t);
        }
        let found = find_named(name).map_or(0, |z| z as usize);
        FOUND.with(|f| {
            let mut f = f.borrow_mut();
            f.retain(|(n, at, _)| *n != name && *at == cycle as usize);
            f.push((name, cycle as usize, found));
        });
        (found != 0).then_some(found as *mut ngx_shm_zone_t)
    }
}

/// The running cycle's shared zone `name`, walking the cycle's list (no
/// cache: [`find_in_cycle`] caches static names).
pub fn find_named(name: &[u8]) -> Option<*mut ngx_shm_zone_t> {
    // SAFETY: ngx_cycle is the running cycle in a worker; its shared memory
    // list and zones live as long as it.
    unsafe {
        let c = (*std::ptr::addr_of!(ngx::ffi::ngx_cycle)).as_ref()?;
        let mut part: *const ngx::ffi::ngx_list_part_t = &c.shared_memory.part;
        while let Some(p) = part.as_ref() {
            let zones = p.elts as *mut ngx_shm_zone_t;
            for i in 0..p.nelts {
                let z = zones.add(i);
                if crate::conf::str_bytes(&(*z).shm.name) == name {
                    return Some(z);
                }
            }
            part = p.next;
        }
        None
    }
}
