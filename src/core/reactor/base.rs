//! `Base`: the process's one `event_base`.
use std::cell::RefCell;
use std::io;
use std::ptr::NonNull;
use std::rc::Rc;
use std::time::Duration;

use libevent_sys as ev;

/// The base, whether it is ours to free, and spare bufferevents.
struct Inner(NonNull<ev::event_base>, bool, SpareBevs);

/// Idle connections' bufferevents kept for reuse (see `Conn`): a
/// connection has one only while it holds bytes, and making and freeing
/// one per request costs more than keeping a few.
#[derive(Default)]
struct SpareBevs(RefCell<Vec<NonNull<ev::bufferevent>>>);

/// Most spare bufferevents a base keeps.
const SPARE_BEVS: usize = 64;

impl Drop for Inner {
    fn drop(&mut self) {
        for bev in self.2 .0.get_mut().drain(..) {
            // SAFETY: a spare bufferevent is live, has no callbacks, no
            // descriptor and no events pending; nothing else points at it.
            unsafe { ev::bufferevent_free(bev.as_ptr()) };
        }
        if self.1 {
            // SAFETY: every Event/Conn/Listener holds a Base clone, so when
            // the last clone goes nothing is registered on the base any more.
            unsafe { ev::event_base_free(self.0.as_ptr()) };
        }
    }
}

/// The event loop. Cheap to clone (reference counted); the underlying
/// `event_base` is freed with the last clone.
#[derive(Clone)]
pub struct Base(Rc<Inner>);

impl Base {
    /// A new base on the best backend (epoll on Linux), with epoll's
    /// changelist off: a deleted event must leave the kernel's interest
    /// list at once, before its descriptor is passed away and closed.
    pub fn new() -> io::Result<Base> {
        // SAFETY: plain constructor; NULL means failure and is checked.
        let cfg = unsafe { ev::event_config_new() };
        if cfg.is_null() {
            return Err(io::Error::other("event_config_new failed"));
        }
        // SAFETY: cfg is a live config, freed right after use.
        let raw = unsafe {
            let b = ev::event_base_new_with_config(cfg);
            ev::event_config_free(cfg);
            b
        };
        NonNull::new(raw)
            .map(|p| Base(Rc::new(Inner(p, true, SpareBevs::default()))))
            .ok_or_else(|| io::Error::other("event_base_new_with_config failed"))
    }

    /// Wraps a base someone else created and frees (a C program's, for
    /// `libhandoff`). `None` for a null pointer.
    ///
    /// # Safety
    /// `raw` must be a live `event_base` that outlives every clone of the
    /// returned `Base` and everything registered through it.
    pub unsafe fn from_foreign(raw: *mut ev::event_base) -> Option<Base> {
        NonNull::new(raw).map(|p| Base(Rc::new(Inner(p, false, SpareBevs::default()))))
    }

    pub(crate) fn as_ptr(&self) -> *mut ev::event_base {
        self.0 .0.as_ptr()
    }

    /// A spare bufferevent of this base, if one is kept (no descriptor, no
    /// callbacks, empty buffers, nothing enabled).
    pub(super) fn take_spare_bev(&self) -> Option<NonNull<ev::bufferevent>> {
        self.0 .2 .0.borrow_mut().pop()
    }

    /// Keeps `bev` (made on this base, in the state `take_spare_bev`
    /// promises) for reuse; gives it back when enough are kept.
    pub(super) fn keep_spare_bev(&self, bev: NonNull<ev::bufferevent>) -> Option<NonNull<ev::bufferevent>> {
        let mut spare = self.0 .2 .0.borrow_mut();
        if spare.len() >= SPARE_BEVS {
            return Some(bev);
        }
        spare.push(bev);
        None
    }

    /// Runs the loop until no events remain or [`Base::exit`] is called.
    /// A panic raised inside a callback is resumed here.
    pub fn dispatch(&self) -> io::Result<()> {
        let prev = super::RUNNING.with(|b| b.replace(self.as_ptr()));
        // SAFETY: the base is live for as long as self.
        let rc = unsafe { ev::event_base_dispatch(self.as_ptr()) };
        super::RUNNING.with(|b| b.set(prev));
        super::resume_panic();
        super::check(rc, "event_base_dispatch")
    }

    /// Makes `dispatch` return after the current round of callbacks
    /// (or after `after`, if given).
    pub fn exit(&self, after: Option<Duration>) {
        let tv = after.map(super::timeval);
        let p = tv.as_ref().map_or(std::ptr::null(), |t| t as *const _);
        // SAFETY: the base is live; `p` is null or points to a live timeval.
        unsafe { ev::event_base_loopexit(self.as_ptr(), p) };
    }

    /// The timeval to give libevent for a timeout of `d` on this base:
    /// libevent's "common timeout" for that duration, which keeps every
    /// timeout of one duration in a queue (adding and removing one is
    /// O(1), where its min-heap is O(log n)); that is what many events
    /// with one duration want, such as 100 000 connections' idle timeouts.
    /// A zero duration, or one the base has no room for (it keeps 256), is
    /// a plain timeval.
    pub(crate) fn common_timeval(&self, d: Duration) -> ev::timeval {
        let tv = super::timeval(d);
        if d.is_zero() {
            return tv;
        }
        // SAFETY: the base is live and tv a live timeval (copied); the
        // returned pointer is null or points into the base, read at once.
        unsafe {
            let p = ev::event_base_init_common_timeout(self.as_ptr(), &tv);
            if p.is_null() {
                tv
            } else {
                *p
            }
        }
    }

    /// The name of the backend in use ("epoll").
    pub fn method(&self) -> String {
        // SAFETY: returns a static C string owned by libevent.
        let p = unsafe { ev::event_base_get_method(self.as_ptr()) };
        if p.is_null() {
            return String::new();
        }
        // SAFETY: non-null, NUL-terminated, static.
        unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}
