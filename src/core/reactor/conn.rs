//! `Conn`: a byte stream (TCP or Unix) on a bufferevent.
//!
//! The descriptor is owned by the `Conn` (an `OwnedFd`), never by the
//! bufferevent (`BEV_OPT_CLOSE_ON_FREE` is not used), so it can be taken
//! back with [`Conn::detach`] and passed to another process. Detaching
//! frees the bufferevent and the read event (which removes them from epoll
//! at once) and returns the unread input as the leftover.
//!
//! Memory: the bufferevent (with its two evbuffers, about 1 KiB) exists
//! only while the connection holds bytes: input not yet consumed, or
//! output the kernel has not taken yet. An idle connection between
//! requests has only its read event; a read lands in a per-thread scratch
//! buffer and only the bytes received are added to the input, so a
//! connection holding part of a request keeps those bytes, not a 64 KiB
//! reserved chain.
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::raw::{c_int, c_short, c_void};
use std::ptr::NonNull;
use std::rc::Rc;
use std::time::Duration;

use libevent_sys as ev;

use super::Base;

/// What happened on a [`Conn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnEvent {
    /// New bytes are in the input buffer.
    Read,
    /// The output buffer was written out completely.
    Drained,
    /// The peer closed its write side (no more input will come).
    Eof,
    /// A socket error (errno inside), e.g. a reset.
    Error(i32),
    /// The read or write timeout expired.
    Timeout,
}

type Handler = Rc<dyn Fn(ConnEvent)>;

/// A connected byte stream (TCP or Unix stream socket) on a libevent
/// bufferevent: input buffered up to a limit, output queued, and every
/// [`ConnEvent`] to one handler. Made by [`Conn::adopt`].
///
/// The `Conn` owns its descriptor: dropping it frees the bufferevent, then
/// closes the descriptor (unsent output is lost); [`Conn::detach`] gives
/// the descriptor back with the unread input instead, e.g. to pass the
/// connection to another process.
///
/// ```
/// use std::io::{Read, Write};
/// use std::os::fd::OwnedFd;
/// use std::os::unix::net::UnixStream;
/// use std::rc::Rc;
/// use handoff::core::reactor::{Base, Conn, ConnEvent};
///
/// let base = Base::new()?;
/// let (mut client, ours) = UnixStream::pair()?;
/// ours.set_nonblocking(true)?;
/// let b = base.clone();
/// let on_event = Rc::new(move |ev| {
///     if ev == ConnEvent::Read {
///         b.exit(None);
///     }
/// });
/// // "hel": bytes a previous owner already read from this connection.
/// let conn = Conn::adopt(&base, OwnedFd::from(ours), b"hel", 64 * 1024, on_event)?;
/// assert_eq!(conn.peek(3), b"hel"); // there at once, without a Read event
/// conn.resume_reading();
/// client.write_all(b"lo")?;
/// base.dispatch()?; // until the Read event
/// assert_eq!(conn.peek(5), b"hello");
/// assert!(conn.write_now(b"hi")?); // all in the kernel
/// let (fd, unread) = conn.detach();
/// assert_eq!(unread, b"hello");
/// let mut reply = [0u8; 2];
/// client.read_exact(&mut reply)?;
/// assert_eq!(&reply, b"hi");
/// # drop(fd);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Conn {
    /// Our own read event on the descriptor (see [`Reader`]).
    read_ev: Option<NonNull<ev::event>>,
    /// The bufferevent (made when needed), the read state and the
    /// handler; every libevent callback of this Conn gets a pointer to it
    /// as its argument.
    reading: Rc<Reader>,
    fd: Option<OwnedFd>,
    _base: Base,
}

/// The read side, and the bufferevent. A bufferevent reads with
/// `evbuffer_read`, which asks the kernel `ioctl(FIONREAD)` before every
/// `readv`: one syscall in three on a request/response connection. So a
/// `Conn` reads itself, with one `recv`, and the bufferevent only buffers
/// input and writes output; it is made when bytes must be kept and freed
/// once both of its buffers are empty again.
struct Reader {
    /// The bufferevent, or null while the connection holds no bytes.
    bev: Cell<*mut ev::bufferevent>,
    /// The base (the bufferevent is made on it, or taken from its spares).
    base: Base,
    fd: RawFd,
    limit: usize,
    /// The owner wants input ([`Conn::resume_reading`]).
    wanted: Cell<bool>,
    /// EOF or an error was seen: nothing more will be read.
    done: Cell<bool>,
    /// A write was queued and its `Drained` (or error) has not come yet.
    writing: Cell<bool>,
    /// The read timeout, as libevent takes it ([`Base::common_timeval`]).
    timeout: Cell<Option<ev::timeval>>,
    /// The read event itself (set once made; freed with the Conn).
    event: Cell<*mut ev::event>,
    /// Every [`ConnEvent`] goes here.
    handler: Handler,
}

/// The Reader behind a callback's `arg`, kept alive for the call (the
/// handler may drop the Conn).
///
/// # Safety
/// `arg` is `Rc::as_ptr` of a Reader whose Conn still exists (its events
/// are freed before its Rc is dropped).
unsafe fn reader_of(arg: *mut c_void) -> Rc<Reader> {
    let p = arg as *const Reader;
    // SAFETY: per the contract, the Rc is alive; one more strong count
    // for the Rc made here.
    unsafe {
        Rc::increment_strong_count(p);
        Rc::from_raw(p)
    }
}

unsafe extern "C" fn read_cb(_fd: c_int, what: c_short, arg: *mut c_void) {
    // SAFETY: arg is the Conn's Reader (set in `adopt`).
    let r = unsafe { reader_of(arg) };
    super::guard(|| {
        let e = if what & ev::EV_TIMEOUT as c_short != 0 { Some(ConnEvent::Timeout) } else { r.read() };
        let Some(e) = e else { return };
        if matches!(e, ConnEvent::Eof | ConnEvent::Error(_)) {
            r.done.set(true);
        }
        // Settle the event before the handler runs: it may drop the Conn.
        if !r.should_wait() {
            // SAFETY: the event is live (we run inside its callback).
            unsafe { ev::event_del(r.event.get()) };
        }
        (r.handler)(e)
    });
}

/// Largest single read.
const READ_CHUNK: usize = 64 * 1024;

thread_local! {
    /// Where every read lands first: only the bytes received go into the
    /// input buffer (no 64 KiB chain reserved per connection).
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_CHUNK].into_boxed_slice());
}

impl Reader {
    /// The bufferevent, made now if there is none (its callbacks set).
    fn bev(&self) -> io::Result<*mut ev::bufferevent> {
        let bev = self.bev.get();
        if !bev.is_null() {
            return Ok(bev);
        }
        let bev = match self.base.take_spare_bev() {
            Some(spare) => {
                // SAFETY: a spare is a live socket bufferevent of this base
                // with no descriptor; fd is a valid socket that the Conn keeps
                // owning (no BEV_OPT_CLOSE_ON_FREE). Nothing is enabled, so
                // setting the descriptor adds no event.
                unsafe { ev::bufferevent_setfd(spare.as_ptr(), self.fd) };
                spare.as_ptr()
            }
            // SAFETY: base is live (we hold a clone); fd as above.
            None => unsafe { ev::bufferevent_socket_new(self.base.as_ptr(), self.fd, 0) },
        };
        if bev.is_null() {
            return Err(io::Error::other("bufferevent_socket_new failed"));
        }
        let arg = self as *const Reader as *mut c_void;
        // SAFETY: bev is live; arg (this Reader, in the Conn's Rc) outlives
        // the callbacks: they are cleared by bufferevent_free (`free_bev`,
        // at the latest in the Conn's Drop/detach) before the Rc goes.
        unsafe { ev::bufferevent_setcb(bev, None, Some(write_cb), Some(event_cb), arg) };
        self.bev.set(bev);
        Ok(bev)
    }

    /// Lets the bufferevent go (unsent output is lost): kept as a spare
    /// of the base when it is empty, freed otherwise.
    fn free_bev(&self) {
        let bev = self.bev.replace(std::ptr::null_mut());
        let Some(bev) = NonNull::new(bev) else { return };
        // A write that owes its Drained leaves this bufferevent unfit for reuse.
        let owed = self.writing.replace(false);
        // SAFETY: bev is live and ours; disabling deletes its events from
        // the backend now (changelist off) and enables nothing again.
        let empty = unsafe {
            ev::bufferevent_disable(bev.as_ptr(), (ev::EV_READ | ev::EV_WRITE) as c_short);
            !owed
                && ev::evbuffer_get_length(ev::bufferevent_get_input(bev.as_ptr())) == 0
                && ev::evbuffer_get_length(ev::bufferevent_get_output(bev.as_ptr())) == 0
        };
        let spare = if empty {
            // SAFETY: bev is live; without callbacks nothing reaches this
            // Reader any more, without a descriptor no event can fire.
            unsafe {
                ev::bufferevent_setcb(bev.as_ptr(), None, None, None, std::ptr::null_mut());
                ev::bufferevent_setfd(bev.as_ptr(), -1);
            }
            self.base.keep_spare_bev(bev)
        } else {
            Some(bev)
        };
        if let Some(bev) = spare {
            // SAFETY: bev is live and ours; free clears the callbacks. Inside
            // one of its own callbacks libevent defers the release until that
            // callback returns.
            unsafe { ev::bufferevent_free(bev.as_ptr()) };
        }
    }

    /// Frees the bufferevent once it holds nothing and owes no event.
    fn release_if_idle(&self) {
        if !self.bev.get().is_null() && !self.writing.get() && self.input_len() == 0 && self.output_len() == 0 {
            self.free_bev();
        }
    }

    fn input(&self) -> *mut ev::evbuffer {
        let bev = self.bev.get();
        // SAFETY: bev, when not null, is live.
        if bev.is_null() {
            std::ptr::null_mut()
        } else {
            unsafe { ev::bufferevent_get_input(bev) }
        }
    }

    fn input_len(&self) -> usize {
        let input = self.input();
        // SAFETY: a live bufferevent's input evbuffer.
        if input.is_null() {
            0
        } else {
            unsafe { ev::evbuffer_get_length(input) }
        }
    }

    fn output_len(&self) -> usize {
        let bev = self.bev.get();
        // SAFETY: bev, when not null, is live.
        if bev.is_null() {
            0
        } else {
            unsafe { ev::evbuffer_get_length(ev::bufferevent_get_output(bev)) }
        }
    }

    /// Reads once. Returns the event for the handler, if any.
    fn read(&self) -> Option<ConnEvent> {
        let have = self.input_len();
        if have >= self.limit {
            return None;
        }
        let want = (self.limit - have).min(READ_CHUNK);
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            // SAFETY: the scratch buffer holds READ_CHUNK >= want bytes.
            let n = unsafe { libc::recv(self.fd, s.as_mut_ptr() as *mut c_void, want, 0) };
            let errno = if n < 0 { io::Error::last_os_error().raw_os_error().unwrap_or(0) } else { 0 };
            match n {
                n if n > 0 => Some(match self.append(&s[..n as usize]) {
                    Ok(()) => ConnEvent::Read,
                    Err(e) => ConnEvent::Error(e.raw_os_error().unwrap_or(libc::ENOMEM)),
                }),
                0 => Some(ConnEvent::Eof),
                _ if errno == libc::EAGAIN || errno == libc::EINTR => None,
                _ => Some(ConnEvent::Error(errno)),
            }
        })
    }

    /// Adds received bytes at the end of the input.
    fn append(&self, data: &[u8]) -> io::Result<()> {
        let bev = self.bev()?;
        // SAFETY: bev is live; data is a live slice, copied by libevent.
        // The input's end is frozen by the bufferevent (only its reads
        // append), so it is unfrozen for the append and frozen again.
        let rc = unsafe {
            let input = ev::bufferevent_get_input(bev);
            ev::evbuffer_unfreeze(input, 0);
            let rc = ev::evbuffer_add(input, data.as_ptr() as *const c_void, data.len());
            ev::evbuffer_freeze(input, 0);
            rc
        };
        super::check(rc, "evbuffer_add")
    }

    /// Whether the read event should be in the loop now.
    fn should_wait(&self) -> bool {
        self.wanted.get() && !self.done.get() && self.input_len() < self.limit
    }
}

unsafe extern "C" fn write_cb(_bev: *mut ev::bufferevent, arg: *mut c_void) {
    // SAFETY: arg is the Conn's Reader, alive while callbacks are set; the
    // Rc clone keeps it alive if the handler drops the Conn.
    let r = unsafe { reader_of(arg) };
    super::guard(|| {
        r.writing.set(false);
        (r.handler)(ConnEvent::Drained);
        // Nothing left to hold (a dropped Conn has freed it already).
        r.release_if_idle();
    });
}

unsafe extern "C" fn event_cb(_bev: *mut ev::bufferevent, what: c_short, arg: *mut c_void) {
    let what = what as u32;
    let e = if what & ev::BEV_EVENT_TIMEOUT != 0 {
        ConnEvent::Timeout
    } else if what & ev::BEV_EVENT_ERROR != 0 {
        ConnEvent::Error(io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else if what & ev::BEV_EVENT_EOF != 0 {
        ConnEvent::Eof
    } else {
        return;
    };
    // SAFETY: as in write_cb.
    let r = unsafe { reader_of(arg) };
    super::guard(|| {
        if what & ev::BEV_EVENT_WRITING != 0 {
            r.writing.set(false);
        }
        (r.handler)(e)
    });
}

impl Conn {
    /// Wraps a connected, non-blocking socket. `leftover` (bytes already
    /// read from it by a previous owner) is put in the input buffer first;
    /// the caller processes it (no `Read` event is raised for it), then
    /// calls [`Conn::resume_reading`] if it keeps the connection: one that
    /// is served from its leftover and passed on never enters epoll.
    /// Reading buffers at most `read_limit` bytes. Writing is enabled by the
    /// first buffered write (enabling it on an empty output costs an
    /// EPOLLOUT wake-up per connection).
    pub fn adopt(
        base: &Base,
        fd: OwnedFd,
        leftover: &[u8],
        read_limit: usize,
        handler: Rc<dyn Fn(ConnEvent)>,
    ) -> io::Result<Conn> {
        let reading = Rc::new(Reader {
            bev: Cell::new(std::ptr::null_mut()),
            base: base.clone(),
            fd: fd.as_raw_fd(),
            limit: read_limit.max(1),
            wanted: Cell::new(false),
            done: Cell::new(false),
            writing: Cell::new(false),
            timeout: Cell::new(None),
            event: Cell::new(std::ptr::null_mut()),
            handler,
        });
        let arg = Rc::as_ptr(&reading) as *mut c_void;
        // SAFETY: base is live; arg stays valid while the event exists (the
        // Conn frees the event before its Rc<Reader>).
        let read_ev = unsafe {
            ev::event_new(base.as_ptr(), fd.as_raw_fd(), (ev::EV_READ | ev::EV_PERSIST) as c_short, Some(read_cb), arg)
        };
        let read_ev = NonNull::new(read_ev).ok_or_else(|| io::Error::other("event_new failed"))?;
        reading.event.set(read_ev.as_ptr());
        // From here the Conn frees what it holds on any error.
        let conn = Conn { read_ev: Some(read_ev), reading, fd: Some(fd), _base: base.clone() };
        if !leftover.is_empty() {
            conn.reading.append(leftover)?;
        }
        Ok(conn)
    }

    /// The bufferevent, made now if there is none.
    fn bev(&self) -> io::Result<*mut ev::bufferevent> {
        if self.read_ev.is_none() {
            return Err(io::Error::other("connection detached"));
        }
        self.reading.bev()
    }

    /// The descriptor's number, for syscalls that only look at it
    /// (`getpeername`, `setsockopt`). The `Conn` keeps owning it: never
    /// close it or use it after the `Conn` is gone.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    /// Bytes waiting in the input buffer.
    pub fn input_len(&self) -> usize {
        self.reading.input_len()
    }

    /// Bytes not yet written to the kernel.
    pub fn output_len(&self) -> usize {
        self.reading.output_len()
    }

    /// The first `n` input bytes, made contiguous (`n` <= `input_len`).
    /// The slice borrows the `Conn`; [`Conn::consume`] takes `&mut self`,
    /// so no slice can outlive the bytes it points at.
    pub fn peek(&self, n: usize) -> &[u8] {
        let n = n.min(self.input_len());
        if n == 0 {
            return &[];
        }
        // SAFETY: n > 0, so the bufferevent exists; pullup makes n bytes
        // contiguous and returns a pointer into the buffer, valid until the
        // buffer is next modified. Only `consume` (&mut self), `detach`
        // (self) and the read event's appends (which run from the loop,
        // never while a Rust borrow is live) modify the input buffer, or
        // free the bufferevent, so the shared borrow of self outlives every
        // use of the slice.
        unsafe {
            let p = ev::evbuffer_pullup(self.reading.input(), n as isize);
            std::slice::from_raw_parts(p, n)
        }
    }

    /// Copies up to `buf.len()` input bytes without removing them.
    pub fn copy_out(&self, buf: &mut [u8]) -> usize {
        let input = self.reading.input();
        if input.is_null() {
            return 0;
        }
        // SAFETY: input is live; buf is a live, writable slice of the given length.
        let n = unsafe { ev::evbuffer_copyout(input, buf.as_mut_ptr() as *mut c_void, buf.len()) };
        n.max(0) as usize
    }

    /// Removes `n` bytes from the front of the input. Takes `&mut self` so
    /// that no slice from [`Conn::peek`] can be used afterwards. Once
    /// nothing is held, the bufferevent is freed.
    pub fn consume(&mut self, n: usize) {
        let input = self.reading.input();
        if !input.is_null() && n > 0 {
            // SAFETY: the input evbuffer belongs to a live bev.
            unsafe { ev::evbuffer_drain(input, n) };
        }
        self.reading.release_if_idle();
        // Below the read limit again: reading goes on.
        self.arm_reader();
    }

    /// Puts the read event in the loop, or takes it out, as the reader's
    /// state says.
    fn arm_reader(&self) {
        let Some(e) = self.read_ev else { return };
        if self.reading.should_wait() {
            if !read_pending(e) {
                add_read(e, self.reading.timeout.get());
            }
        } else {
            // SAFETY: the event is live until free_events.
            unsafe { ev::event_del(e.as_ptr()) };
        }
    }

    /// Queues bytes for writing (a `Drained` event follows when they are out).
    pub fn write(&self, data: &[u8]) {
        let bev = match self.bev() {
            Ok(b) => b,
            Err(e) => {
                log::error!("connection {}: {e}; output dropped", self.raw_fd());
                return;
            }
        };
        self.reading.writing.set(true);
        // SAFETY: bev is live; data is a live slice, copied by libevent.
        unsafe {
            ev::bufferevent_enable(bev, ev::EV_WRITE as c_short);
            ev::bufferevent_write(bev, data.as_ptr() as *const c_void, data.len());
        }
    }

    /// Writes `data` to the kernel at once when nothing is queued before
    /// it (saving the bufferevent's EV_WRITE round trip); queues what the
    /// socket does not take. Returns true when everything is in the kernel.
    pub fn write_now(&self, data: &[u8]) -> io::Result<bool> {
        let mut sent = 0;
        if self.output_len() == 0 {
            sent = crate::core::sock::send_now(self.raw_fd(), data)?;
        }
        if sent < data.len() {
            self.write(&data[sent..]);
            return Ok(false);
        }
        Ok(true)
    }

    /// Stops reading: new bytes wait in the kernel and no `Read` event
    /// comes until [`Conn::resume_reading`] (back-pressure on a client
    /// that does not read its responses; a connection about to move).
    pub fn pause_reading(&self) {
        self.reading.wanted.set(false);
        self.arm_reader();
    }

    /// Starts (or restarts) reading into the input buffer, up to the
    /// `read_limit` given to [`Conn::adopt`]; a `Read` event follows each
    /// arrival. A new `Conn` reads nothing until this is called.
    pub fn resume_reading(&self) {
        self.reading.wanted.set(true);
        self.arm_reader();
    }

    /// Read timeout: a `Timeout` event when no byte arrives for `d` (and
    /// again every `d` while none does), counted only while reading is
    /// on. Timeouts of one duration share a queue in libevent (O(1) each,
    /// libevent's "common timeouts"), so every connection may have one.
    pub fn set_read_timeout(&self, d: Option<Duration>) {
        let tv = d.map(|d| self._base.common_timeval(d));
        self.reading.timeout.set(tv);
        if let Some(e) = self.read_ev {
            if read_pending(e) {
                add_read(e, tv);
            }
        }
    }

    /// Takes the descriptor and the unread input back, freeing the
    /// bufferevent first (its events leave epoll before the fd can move).
    /// Output not yet flushed is lost: call when `output_len() == 0`.
    pub fn detach(mut self) -> (OwnedFd, Vec<u8>) {
        let mut leftover = vec![0u8; self.input_len()];
        let n = self.copy_out(&mut leftover);
        leftover.truncate(n);
        self.free_events();
        (self.fd.take().expect("fd present until detach"), leftover)
    }

    /// Whether the bufferevent exists now (tests: an idle connection has none).
    #[cfg(test)]
    pub(super) fn has_bufferevent(&self) -> bool {
        !self.reading.bev.get().is_null()
    }

    fn free_events(&mut self) {
        // Our read event leaves epoll first (changelist off: at once).
        if let Some(e) = self.read_ev.take() {
            // SAFETY: the event is live and ours; nothing uses it afterwards.
            unsafe { ev::event_free(e.as_ptr()) };
        }
        self.reading.free_bev();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.free_events();
        // self.fd closes after the bufferevent is gone.
    }
}

/// Whether a read event is in the loop.
fn read_pending(e: NonNull<ev::event>) -> bool {
    // SAFETY: a Conn's read event is live until free_bev.
    unsafe { ev::event_pending(e.as_ptr(), (ev::EV_READ | ev::EV_TIMEOUT) as c_short, std::ptr::null_mut()) != 0 }
}

/// Puts a read event in the loop, with a timeout if given.
fn add_read(e: NonNull<ev::event>, timeout: Option<ev::timeval>) {
    let p = timeout.as_ref().map_or(std::ptr::null(), |t| t as *const _);
    // SAFETY: the event is live; p is null or a live timeval (copied).
    unsafe { ev::event_add(e.as_ptr(), p) };
}
