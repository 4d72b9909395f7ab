//! `Event`: a plain libevent event on a descriptor, a timer or a signal.
use std::io;
use std::os::fd::RawFd;
use std::os::raw::{c_int, c_short, c_void};
use std::ptr::NonNull;
use std::rc::Rc;
use std::time::Duration;

use libevent_sys as ev;

use super::Base;

/// What an [`Event`] waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interest {
    /// The descriptor is readable. Persistent: fires at every readiness
    /// until [`Event::del`].
    Read,
    /// The descriptor is writable. One-shot: fires once per
    /// [`Event::add`].
    Write,
    /// A timer: no descriptor.
    Timer,
    /// A signal number.
    Signal,
}

type Callback = Rc<dyn Fn(c_short)>;

/// One registered libevent `event`. Freed (and so removed from the
/// backend) in `Drop`. Persistent unless it is a one-shot write event.
pub struct Event {
    raw: NonNull<ev::event>,
    _cb: Box<Callback>,
    /// Keeps the `event_base` alive for as long as the event.
    _base: Base,
}

unsafe extern "C" fn trampoline(_fd: c_int, what: c_short, arg: *mut c_void) {
    // SAFETY: `arg` is the Box<Callback> owned by the Event, alive while the
    // event is registered; cloning the Rc keeps the closure alive even if
    // the callback drops the Event.
    let cb: Callback = unsafe { (*(arg as *const Callback)).clone() };
    super::guard(|| cb(what));
}

impl Event {
    /// Creates an event; it does nothing until [`Event::add`].
    /// `Read` events persist; `Write` events fire once per `add`;
    /// `Signal` takes the signal number as `fd`; `Timer` ignores `fd`.
    pub fn new(base: &Base, fd: RawFd, interest: Interest, cb: impl Fn() + 'static) -> io::Result<Event> {
        let (fd, flags) = match interest {
            Interest::Read => (fd, ev::EV_READ | ev::EV_PERSIST),
            Interest::Write => (fd, ev::EV_WRITE),
            Interest::Timer => (-1, 0),
            Interest::Signal => (fd, ev::EV_SIGNAL | ev::EV_PERSIST),
        };
        let cb: Box<Callback> = Box::new(Rc::new(move |_what| cb()));
        let arg = &*cb as *const Callback as *mut c_void;
        // SAFETY: base is live; arg points into a Box that lives as long as
        // the returned Event, which frees the event before the Box.
        let raw = unsafe { ev::event_new(base.as_ptr(), fd, flags as c_short, Some(trampoline), arg) };
        let raw = NonNull::new(raw).ok_or_else(|| io::Error::other("event_new failed"))?;
        Ok(Event { raw, _cb: cb, _base: base.clone() })
    }

    /// Registers the event, with an optional timeout.
    pub fn add(&self, timeout: Option<Duration>) -> io::Result<()> {
        let tv = timeout.map(super::timeval);
        let p = tv.as_ref().map_or(std::ptr::null(), |t| t as *const _);
        // SAFETY: raw is a live event; p is null or a live timeval.
        super::check(unsafe { ev::event_add(self.raw.as_ptr(), p) }, "event_add")
    }

    /// Makes the event run in this loop round, after the callbacks already
    /// due (a way to batch work until the round's end).
    pub fn activate(&self) {
        // SAFETY: raw is a live event.
        unsafe { ev::event_active(self.raw.as_ptr(), ev::EV_TIMEOUT as c_int, 0) };
    }

    /// Unregisters the event (it stays allocated and can be added again).
    pub fn del(&self) {
        // SAFETY: raw is a live event.
        unsafe { ev::event_del(self.raw.as_ptr()) };
    }

    /// Whether the event is added (waiting).
    pub fn pending(&self) -> bool {
        let what = (ev::EV_READ | ev::EV_WRITE | ev::EV_TIMEOUT | ev::EV_SIGNAL) as c_short;
        // SAFETY: raw is a live event; tv out-pointer may be null.
        unsafe { ev::event_pending(self.raw.as_ptr(), what, std::ptr::null_mut()) != 0 }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: event_free deletes the event from the base, then frees it;
        // the callback Box is dropped after this, when no C code uses it.
        unsafe { ev::event_free(self.raw.as_ptr()) };
    }
}
