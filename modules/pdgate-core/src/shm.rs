//! What every shared-zone layout of pdgate-core does the same way: a magic
//! word first, so that all-zero memory (a new zone) is claimed for the
//! layout and memory holding another layout (a zone kept over a reload by
//! an older build) is refused.

use std::sync::atomic::{AtomicU64, Ordering};

/// Claims all-zero `word` for `magic`, or recognises it; false when it
/// holds another layout.
pub fn attach(word: &AtomicU64, magic: u64) -> bool {
    match word.compare_exchange(0, magic, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => true,
        Err(m) => m == magic,
    }
}

/// Whether `word` holds `magic` (without claiming all-zero memory): for
/// readers that find a zone by name.
pub fn holds(word: &AtomicU64, magic: u64) -> bool {
    word.load(Ordering::Acquire) == magic
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_zero_refuses_others() {
        let w = AtomicU64::new(0);
        assert!(!holds(&w, 7));
        assert!(attach(&w, 7) && attach(&w, 7) && holds(&w, 7));
        assert!(!attach(&w, 8) && !holds(&w, 8));
    }
}
