//! A small safe layer over libevent: one [`Base`] per process, [`Event`]s
//! for descriptors, timers and signals, [`Listener`]s for TCP and Unix
//! endpoints, and [`Conn`], one bufferevent-backed byte stream type for
//! TCP and Unix sockets alike, and [`HttpServer`] (libevent's evhttp) for
//! side endpoints such as `/metrics`.
//!
//! Ownership rules, shared by every type here:
//! - each wrapper owns exactly one C object and frees it in `Drop`;
//! - each wrapper holds a clone of [`Base`], so the `event_base` is freed
//!   only after everything registered on it;
//! - callbacks are `Rc<dyn Fn>`; the trampoline clones the `Rc` before the
//!   call, so a callback may drop the very object that invoked it;
//! - a panic in a callback never unwinds into C: it is caught, the loop is
//!   broken, and the panic resumes when [`Base::dispatch`] returns.
//!
//! A timer that ends the loop:
//!
//! ```
//! use std::time::Duration;
//! use handoff::core::reactor::{Base, Event, Interest};
//!
//! let base = Base::new()?;
//! let b = base.clone();
//! let timer = Event::new(&base, -1, Interest::Timer, move || b.exit(None))?;
//! timer.add(Some(Duration::from_millis(10)))?;
//! assert!(timer.pending());
//! base.dispatch()?; // returns once the timer has fired
//! assert!(!timer.pending());
//! # Ok::<(), std::io::Error>(())
//! ```

mod base;
mod conn;
mod event;
mod http;
mod http_client;
mod listener;

pub use base::Base;
pub use conn::{Conn, ConnEvent};
pub use event::{Event, Interest};
pub use http::{HttpRequest, HttpResponse, HttpServer, Method};
pub use http_client::{Chunk, HttpClient, HttpReply, HttpResult};
pub use listener::{Endpoint, Listener};

/// libevent's `struct event_base`, for [`Base::from_foreign`].
pub type RawBase = ev::event_base;

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};

use libevent_sys as ev;

thread_local! {
    static PANIC: RefCell<Option<Box<dyn Any + Send>>> = const { RefCell::new(None) };
    /// The base being dispatched on this thread (one per process here).
    static RUNNING: Cell<*mut ev::event_base> = const { Cell::new(std::ptr::null_mut()) };
    /// Time spent in callbacks on this thread, in nanoseconds.
    static BUSY_NS: Cell<u64> = const { Cell::new(0) };
}

/// How long this thread's callbacks have run in all: the event loop's busy
/// time (the rest it spends waiting in epoll). A worker reports its share
/// over time; rebalancing compares workers by it.
pub fn busy_time() -> std::time::Duration {
    std::time::Duration::from_nanos(BUSY_NS.with(Cell::get))
}

/// Runs `f` from a C callback: a panic is stored and the running loop
/// broken instead of unwinding through libevent.
fn guard(f: impl FnOnce()) {
    let start = std::time::Instant::now();
    let r = catch_unwind(AssertUnwindSafe(f));
    let spent = start.elapsed().as_nanos() as u64;
    BUSY_NS.with(|b| b.set(b.get().wrapping_add(spent)));
    if let Err(payload) = r {
        PANIC.with(|p| {
            p.borrow_mut().get_or_insert(payload);
        });
        let base = RUNNING.with(|b| b.get());
        if base.is_null() {
            // A foreign loop (libhandoff's C caller): nothing will resume
            // the panic, so say it here.
            log::error!("internal error in a handoff callback (caught; see the log above)");
        } else {
            // SAFETY: RUNNING is set only while Base::dispatch runs this base.
            unsafe { ev::event_base_loopbreak(base) };
        }
    }
}

/// Re-raises a panic caught by [`guard`], if any.
fn resume_panic() {
    if let Some(payload) = PANIC.with(|p| p.borrow_mut().take()) {
        std::panic::resume_unwind(payload);
    }
}

/// Turns a libevent `-1` into the current `errno` as an `io::Error`.
fn check(rc: i32, what: &str) -> std::io::Result<()> {
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        Err(std::io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(())
    }
}

fn timeval(d: std::time::Duration) -> ev::timeval {
    ev::timeval { tv_sec: d.as_secs() as _, tv_usec: d.subsec_micros() as _ }
}

#[cfg(test)]
mod tests;
