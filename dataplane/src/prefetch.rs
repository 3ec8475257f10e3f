//! Cache prefetch hints for batches: the one unsafe call outside `xsk`.
//!
//! # Safety boundary
//! [`prefetch_read`] issues the x86-64 `PREFETCHT0` instruction through `_mm_prefetch`, which
//! Rust marks unsafe only because it is a target-feature intrinsic (SSE). Every x86-64 CPU
//! has SSE (it is part of the baseline target), and a prefetch reads nothing architecturally
//! and never faults, whatever the address; here the address even comes from a live
//! reference. Nothing else may be added to this module without review.
//!
//! Why not a plain load: measured in `bench/benches/path.rs`, a load used as a prefetch holds
//! up retirement until its cache miss completes, so a batch's misses barely overlap; a
//! prefetch instruction retires at once.

/// Asks the CPU to bring the cache line holding `item` closer; a no-op elsewhere than x86-64.
#[inline(always)]
#[allow(
    unsafe_code,
    reason = "a target-feature intrinsic; see the module's safety boundary"
)]
pub(crate) fn prefetch_read<T>(item: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        let ptr = core::ptr::from_ref(item).cast::<i8>();
        // SAFETY: SSE is in the x86-64 baseline, so the intrinsic's target feature is present;
        // a prefetch never faults and reads nothing architecturally, and `ptr` is derived
        // from a live reference.
        unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(ptr) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = item;
}
