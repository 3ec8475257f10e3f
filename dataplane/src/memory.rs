//! Memory for the flow table: huge pages asked of the kernel, the one `madvise` call.
//!
//! # Safety boundary
//! [`huge_page_slice`] advises the kernel (`madvise(MADV_HUGEPAGE)`) about the pages of an
//! allocation it has just made and not yet touched. The advice changes how the kernel backs
//! those pages, never their contents, and a refusal changes nothing. Nothing else may be
//! added to this module without review.

/// `n` items made by `make`, in memory the kernel is asked to back with 2 MiB pages before it
/// is first touched. Every flow lookup and insert lands on a random line of the table; with
/// 4 KiB pages each also missed the TLB (a table of a million entries spans 16 000 pages, the
/// TLB holds about 1 500) and paid for a page walk.
pub(crate) fn huge_page_slice<T>(n: usize, make: impl FnMut() -> T) -> Box<[T]> {
    let mut items = Vec::with_capacity(n);
    advise_huge_pages(items.as_ptr(), n * core::mem::size_of::<T>());
    items.extend(core::iter::repeat_with(make).take(n));
    items.into_boxed_slice()
}

/// Asks the kernel to back the whole 2 MiB pages within `bytes` from `start` with huge pages
/// (transparent huge pages in `madvise` mode, this machine's default, need the advice).
#[allow(
    unsafe_code,
    reason = "one system call on the allocation just made; see the module's safety boundary"
)]
fn advise_huge_pages<T>(start: *const T, bytes: usize) {
    const HUGE_PAGE: usize = 2 << 20;
    let from = (start as usize).next_multiple_of(HUGE_PAGE);
    let to = (start as usize + bytes) / HUGE_PAGE * HUGE_PAGE;
    if to > from {
        // SAFETY: [from, to) lies within the allocation `start` points to (its bounds rounded
        // inwards to huge-page boundaries), which the caller owns and has not touched yet;
        // MADV_HUGEPAGE changes how the kernel backs those pages, never their contents, and a
        // failure changes nothing.
        let _ = unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) };
    }
}
