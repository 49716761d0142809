//! The fuzz binary's global allocator: the system's, with a budget of live
//! bytes. An input that would make lift allocate past the budget gets a
//! null pointer, which Rust turns into an abort; before that the allocator
//! writes `oom N` on stdout, so the supervisor that reads the worker's
//! output knows the abort was an allocation of N bytes and which input
//! asked for it. Without a budget (the supervisor itself) it is the system
//! allocator plus two atomic adds.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub struct Bounded;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Refuse allocations that would take the live total past `bytes`.
pub fn set_limit(bytes: usize) {
    LIMIT.store(bytes, Relaxed);
}

/// Counts `n` more live bytes, or refuses them (and says so on stdout).
fn admit(n: usize) -> bool {
    let live = LIVE.fetch_add(n, Relaxed).saturating_add(n);
    if live <= LIMIT.load(Relaxed) {
        return true;
    }
    LIVE.fetch_sub(n, Relaxed);
    report(n);
    false
}

unsafe extern "C" {
    /// POSIX write(2), from the C library std already links.
    fn write(fd: i32, buf: *const u8, count: usize) -> isize;
}

/// Writes "oom N\n" to stdout without allocating (this runs inside the allocator).
fn report(n: usize) {
    let mut buf = [0u8; 32];
    let mut digits = [0u8; 20];
    let (mut len, mut x) = (0, n);
    loop {
        digits[len] = b'0' + (x % 10) as u8;
        len += 1;
        x /= 10;
        if x == 0 {
            break;
        }
    }
    buf[..4].copy_from_slice(b"oom ");
    for i in 0..len {
        buf[4 + i] = digits[len - 1 - i];
    }
    buf[4 + len] = b'\n';
    // SAFETY: buf outlives the call and holds 5 + len initialized bytes.
    unsafe {
        write(1, buf.as_ptr(), 5 + len);
    }
}

// SAFETY: every method forwards to `System` with the same layout; the
// counters only decide whether to forward, never what is returned.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old && !admit(new_size - old) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        match (p.is_null(), new_size > old) {
            (true, true) => {
                LIVE.fetch_sub(new_size - old, Relaxed);
            }
            (false, false) => {
                LIVE.fetch_sub(old - new_size, Relaxed);
            }
            _ => {}
        }
        p
    }
}
