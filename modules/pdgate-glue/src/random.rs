//! The per-worker random generator behind request ids.
//!
//! nginx workers are single-threaded, so one generator per thread is one per
//! worker. It is seeded lazily (after fork) from the kernel's `getrandom`, so
//! workers never share a sequence.

use std::cell::RefCell;

use pdgate_core::request_id::Rng;

thread_local! {
    static RNG: RefCell<Option<Rng>> = const { RefCell::new(None) };
}

fn os_seed() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most `buf.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == buf.len() as isize {
        return u64::from_le_bytes(buf);
    }
    // No getrandom (very old kernels): mix time and pid, still distinct per worker.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

/// Runs `f` with this worker's generator.
pub fn with_rng<R>(f: impl FnOnce(&mut Rng) -> R) -> R {
    RNG.with(|cell| {
        let mut slot = cell.borrow_mut();
        let rng = slot.get_or_insert_with(|| Rng::new(os_seed()));
        f(rng)
    })
}
