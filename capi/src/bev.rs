//! Helpers for C workers that serve connections on bufferevents (the
//! usual case): the two details every such worker must get right, done
//! once. A socket bufferevent keeps the end of its input buffer frozen, so
//! read-ahead must be added with the buffer unfrozen; and a bufferevent
//! must leave epoll (disable) before it is freed and its descriptor given
//! away or closed.
use std::ffi::{c_int, c_void};

use libevent_sys as ev;

use super::{guarded, handoff_closed, handoff_release, Worker, HANDOFF_EINVAL, HANDOFF_EIO};

/// `handoff_bufferevent_new` (csrc/handoff.h).
///
/// # Safety
/// `base` is a live event_base; `fd` an open socket the caller owns;
/// `readahead` points to `len` readable bytes (or is NULL with 0).
#[no_mangle]
pub unsafe extern "C" fn handoff_bufferevent_new(
    base: *mut ev::event_base,
    fd: c_int,
    readahead: *const c_void,
    len: usize,
) -> *mut ev::bufferevent {
    if base.is_null() || fd < 0 || (readahead.is_null() && len > 0) {
        return std::ptr::null_mut();
    }
    // SAFETY: per the contract; 0 options: the descriptor stays the caller's.
    let bev = unsafe { ev::bufferevent_socket_new(base, fd, 0) };
    if bev.is_null() || len == 0 {
        return bev;
    }
    // SAFETY: bev is live; its input buffer is unfrozen only for the add.
    let ok = unsafe {
        let input = ev::bufferevent_get_input(bev);
        ev::evbuffer_unfreeze(input, 0);
        let rc = ev::evbuffer_add(input, readahead, len);
        ev::evbuffer_freeze(input, 0);
        rc == 0
    };
    if !ok {
        // SAFETY: bev is live and unused by anyone else yet.
        unsafe { ev::bufferevent_free(bev) };
        return std::ptr::null_mut();
    }
    bev
}

/// Takes the bufferevent apart: its descriptor and unread input; the
/// bufferevent is disabled and freed.
///
/// # Safety
/// `bev` is a live socket bufferevent made without BEV_OPT_CLOSE_ON_FREE.
unsafe fn dismantle(bev: *mut ev::bufferevent) -> (c_int, Vec<u8>) {
    // SAFETY: per the contract.
    unsafe {
        let fd = ev::bufferevent_getfd(bev);
        let input = ev::bufferevent_get_input(bev);
        let mut rest = vec![0u8; ev::evbuffer_get_length(input)];
        let n = ev::evbuffer_copyout(input, rest.as_mut_ptr().cast(), rest.len());
        rest.truncate(n.max(0) as usize);
        ev::bufferevent_disable(bev, (ev::EV_READ | ev::EV_WRITE) as i16);
        ev::bufferevent_free(bev);
        (fd, rest)
    }
}

/// `handoff_release_bufferevent` (csrc/handoff.h).
///
/// # Safety
/// `w` is a live handle; `bev` a live socket bufferevent made without
/// BEV_OPT_CLOSE_ON_FREE, holding connection `id`; `state` points to
/// `state_len` readable bytes (or is NULL with 0).
#[no_mangle]
pub unsafe extern "C" fn handoff_release_bufferevent(
    w: *mut Worker,
    id: u64,
    bev: *mut ev::bufferevent,
    state: *const c_void,
    state_len: usize,
) -> c_int {
    if w.is_null() || bev.is_null() {
        return HANDOFF_EINVAL;
    }
    // SAFETY: per the contract.
    let (fd, rest) = unsafe { dismantle(bev) };
    if fd < 0 {
        return HANDOFF_EIO;
    }
    // SAFETY: the descriptor is ours to give; the buffers are live.
    unsafe { handoff_release(w, id, fd, rest.as_ptr().cast(), rest.len(), state, state_len) }
}

/// `handoff_close_bufferevent` (csrc/handoff.h).
///
/// # Safety
/// As `handoff_release_bufferevent`.
#[no_mangle]
pub unsafe extern "C" fn handoff_close_bufferevent(w: *mut Worker, id: u64, bev: *mut ev::bufferevent) -> c_int {
    if w.is_null() || bev.is_null() {
        return HANDOFF_EINVAL;
    }
    // SAFETY: per the contract.
    let (fd, _) = unsafe { dismantle(bev) };
    let rc = guarded(|| {
        if fd >= 0 {
            // The master keeps a copy of the connection until it hears of
            // the close: shut it down so the client sees the end now.
            // SAFETY: fd is ours (the bufferevent did not own it).
            unsafe {
                libc::shutdown(fd, libc::SHUT_RDWR);
                libc::close(fd);
            }
        }
        0
    });
    // SAFETY: w is a live handle.
    let closed = unsafe { handoff_closed(w, id) };
    if rc < 0 {
        rc
    } else {
        closed
    }
}
