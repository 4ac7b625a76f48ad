//! The global allocator: mimalloc, called the way the standard library calls
//! the system allocator.
//!
//! The `mimalloc` crate sends every allocation through `mi_malloc_aligned`,
//! whatever its alignment. That function's fast path only serves blocks of at
//! most 1 KiB that happen to be aligned already; anything larger (pingora's
//! read buffers, the ~10 KiB future of each request) goes through mimalloc's
//! generic aligned path, which over-allocates and adjusts. Here an alignment
//! mimalloc guarantees anyway (16 bytes, and no more than the size) goes to
//! plain `mi_malloc`/`mi_realloc`/`mi_zalloc`, as `std::alloc::System` does
//! with `malloc`; only larger alignments take the aligned calls. What it
//! saves: docs/benchmarks.md, "Allocator".

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every mimalloc block has (`MI_MAX_ALIGN_SIZE`, 16 on 64-bit).
const GUARANTEED_ALIGN: usize = 16;

/// mimalloc as the global allocator; see the module docs.
pub struct MiMalloc;

fn plain(align: usize, size: usize) -> bool {
    align <= GUARANTEED_ALIGN && align <= size
}

// SAFETY: every call forwards a layout the caller guarantees valid to
// mimalloc, which returns null on failure (as `GlobalAlloc` requires) and
// blocks aligned to at least `GUARANTEED_ALIGN`, or to `layout.align()`
// through the aligned calls. `mi_free` and `mi_realloc*` accept any block
// from any of these calls.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi::mi_malloc(layout.size()) as *mut u8
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi::mi_zalloc(layout.size()) as *mut u8
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr as *mut c_void);
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align(), new_size) {
            mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
        } else {
            mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_have_their_alignment_and_keep_their_bytes() {
        let a = MiMalloc;
        for (size, align) in [(1, 1), (24, 8), (100, 16), (4096, 16), (200, 64), (64, 128)] {
            let layout = Layout::from_size_align(size, align).unwrap();
            unsafe {
                let p = a.alloc_zeroed(layout);
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "{size}/{align}");
                assert!((0..size).all(|i| *p.add(i) == 0));
                for i in 0..size {
                    *p.add(i) = i as u8;
                }
                let q = a.realloc(p, layout, size * 3);
                assert_eq!(q as usize % align, 0, "{size}/{align} after realloc");
                assert!((0..size).all(|i| *q.add(i) == i as u8));
                a.dealloc(q, Layout::from_size_align(size * 3, align).unwrap());
            }
        }
    }
}
