//! `Conn`: a byte stream (TCP or Unix) on two libevent events of its own.
//!
//! The descriptor is owned by the `Conn` (an `OwnedFd`), so it can be
//! taken back with [`Conn::detach`] and passed to another process.
//! Detaching frees the events (which removes them from epoll at once) and
//! returns the unread input as the leftover.
//!
//! Memory: an idle connection costs its read event and two small structs,
//! no buffer. Input and output are plain `Vec`s that hold heap memory only
//! while they hold bytes; a read lands in a per-thread scratch buffer and
//! only the bytes received are kept; the write event is made the first
//! time output has to wait. (A libevent bufferevent, which this replaced,
//! cost about 1 KiB per connection: itself, two evbuffers and a callback
//! entry, plus a 64 KiB chain for a partial request.)
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

/// A connected byte stream (TCP or Unix stream socket) on libevent
/// events: input buffered up to a limit, output queued, and every
/// [`ConnEvent`] to one handler. Made by [`Conn::adopt`].
///
/// The `Conn` owns its descriptor: dropping it frees its events, then
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
    /// Our read event on the descriptor (see [`Reader`]).
    read_ev: Option<NonNull<ev::event>>,
    /// The buffers, the read state and the handler; every libevent
    /// callback of this Conn gets a pointer to it as its argument.
    reading: Rc<Reader>,
    fd: Option<OwnedFd>,
    _base: Base,
}

/// Everything the callbacks need. The `Conn` reads itself with one `recv`
/// per readable event (libevent's `evbuffer_read` asks `ioctl(FIONREAD)`
/// first: one syscall in three on a request/response connection), and
/// writes queued output itself when the socket is writable.
struct Reader {
    fd: RawFd,
    limit: usize,
    /// The owner wants input ([`Conn::resume_reading`]).
    wanted: Cell<bool>,
    /// EOF or an error was seen: nothing more will be read.
    done: Cell<bool>,
    /// The read timeout, as libevent takes it ([`Base::common_timeval`]).
    timeout: Cell<Option<ev::timeval>>,
    /// The read event itself (set once made; freed with the Conn).
    event: Cell<*mut ev::event>,
    /// The write event: null until output first has to wait; freed with
    /// the Conn.
    write_ev: Cell<*mut ev::event>,
    /// Bytes received and not consumed (no heap while empty).
    input: RefCell<Vec<u8>>,
    /// Bytes queued and not yet in the kernel (no heap while empty).
    output: RefCell<Output>,
    /// Every [`ConnEvent`] goes here.
    handler: Handler,
}

/// Queued output: `buf[sent..]` waits for the kernel.
#[derive(Default)]
struct Output {
    buf: Vec<u8>,
    sent: usize,
}

impl Output {
    fn len(&self) -> usize {
        self.buf.len() - self.sent
    }

    fn push(&mut self, data: &[u8]) {
        if self.sent > 0 && self.sent >= self.buf.len() / 2 {
            self.buf.drain(..self.sent);
            self.sent = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Marks `n` more bytes as sent; an empty queue gives its heap back.
    fn advance(&mut self, n: usize) {
        self.sent += n;
        if self.sent >= self.buf.len() {
            *self = Output::default();
        }
    }
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

unsafe extern "C" fn write_cb(_fd: c_int, _what: c_short, arg: *mut c_void) {
    // SAFETY: arg is the Conn's Reader (set in `arm_writer`).
    let r = unsafe { reader_of(arg) };
    super::guard(|| {
        let e = {
            let mut out = r.output.borrow_mut();
            match crate::core::sock::send_now(r.fd, &out.buf[out.sent..]) {
                Ok(n) => {
                    out.advance(n);
                    (out.len() == 0).then_some(ConnEvent::Drained)
                }
                Err(e) => Some(ConnEvent::Error(e.raw_os_error().unwrap_or(0))),
            }
        };
        let Some(e) = e else { return };
        // Drained, or failed: no more writing until the next `write`.
        // SAFETY: the event is live (we run inside its callback).
        unsafe { ev::event_del(r.write_ev.get()) };
        (r.handler)(e)
    });
}

/// Largest single read.
const READ_CHUNK: usize = 64 * 1024;

thread_local! {
    /// Where a read lands when the input has no room: only the bytes
    /// received are then copied into the input, so an idle connection
    /// holding part of a request keeps a few bytes, not a read chunk.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_CHUNK].into_boxed_slice());
}

impl Reader {
    /// Reads once. Returns the event for the handler, if any.
    fn read(&self) -> Option<ConnEvent> {
        let mut input = self.input.borrow_mut();
        let have = input.len();
        if have >= self.limit {
            return None;
        }
        let want = (self.limit - have).min(READ_CHUNK);
        let n = if input.capacity() - have >= want {
            // A large request under way: straight into its buffer.
            // SAFETY: the spare capacity holds `want` writable bytes; only
            // the `n` the kernel wrote are then counted as initialised.
            unsafe {
                let n = libc::recv(self.fd, input.as_mut_ptr().add(have) as *mut c_void, want, 0);
                if n > 0 {
                    input.set_len(have + n as usize);
                }
                n
            }
        } else {
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                // SAFETY: the scratch buffer holds READ_CHUNK >= want bytes.
                let n = unsafe { libc::recv(self.fd, s.as_mut_ptr() as *mut c_void, want, 0) };
                if n > 0 {
                    input.extend_from_slice(&s[..n as usize]);
                }
                n
            })
        };
        let errno = if n < 0 { io::Error::last_os_error().raw_os_error().unwrap_or(0) } else { 0 };
        match n {
            n if n > 0 => Some(ConnEvent::Read),
            0 => Some(ConnEvent::Eof),
            _ if errno == libc::EAGAIN || errno == libc::EINTR => None,
            _ => Some(ConnEvent::Error(errno)),
        }
    }

    /// Whether the read event should be in the loop now.
    fn should_wait(&self) -> bool {
        self.wanted.get() && !self.done.get() && self.input.borrow().len() < self.limit
    }
}

impl Conn {
    /// Wraps a connected, non-blocking socket. `leftover` (bytes already
    /// read from it by a previous owner) is put in the input buffer first;
    /// the caller processes it (no `Read` event is raised for it), then
    /// calls [`Conn::resume_reading`] if it keeps the connection: one that
    /// is served from its leftover and passed on never enters epoll.
    /// Reading buffers at most `read_limit` bytes. Writing waits for the
    /// socket only when the kernel does not take a write at once.
    pub fn adopt(
        base: &Base,
        fd: OwnedFd,
        leftover: &[u8],
        read_limit: usize,
        handler: Rc<dyn Fn(ConnEvent)>,
    ) -> io::Result<Conn> {
        let reading = Rc::new(Reader {
            fd: fd.as_raw_fd(),
            limit: read_limit.max(1),
            wanted: Cell::new(false),
            done: Cell::new(false),
            timeout: Cell::new(None),
            event: Cell::new(std::ptr::null_mut()),
            write_ev: Cell::new(std::ptr::null_mut()),
            input: RefCell::new(leftover.to_vec()),
            output: RefCell::new(Output::default()),
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
        Ok(Conn { read_ev: Some(read_ev), reading, fd: Some(fd), _base: base.clone() })
    }

    /// The descriptor's number, for syscalls that only look at it
    /// (`getpeername`, `setsockopt`). The `Conn` keeps owning it: never
    /// close it or use it after the `Conn` is gone.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    /// Bytes waiting in the input buffer.
    pub fn input_len(&self) -> usize {
        self.reading.input.borrow().len()
    }

    /// Bytes not yet written to the kernel.
    pub fn output_len(&self) -> usize {
        self.reading.output.borrow().len()
    }

    /// The first `n` input bytes (`n` <= `input_len`). The slice borrows
    /// the `Conn`; [`Conn::consume`] takes `&mut self`, so no slice can
    /// outlive the bytes it points at.
    pub fn peek(&self, n: usize) -> &[u8] {
        let input = self.reading.input.borrow();
        let n = n.min(input.len());
        // SAFETY: the slice points into the input Vec's heap, valid until
        // the Vec is next modified. Only `consume` (&mut self), `detach`
        // (self) and the read event's appends (which run from the loop,
        // never while a Rust borrow is live) modify it, so the shared
        // borrow of self outlives every use of the slice.
        unsafe { std::slice::from_raw_parts(input.as_ptr(), n) }
    }

    /// Copies up to `buf.len()` input bytes without removing them.
    pub fn copy_out(&self, buf: &mut [u8]) -> usize {
        let input = self.reading.input.borrow();
        let n = buf.len().min(input.len());
        buf[..n].copy_from_slice(&input[..n]);
        n
    }

    /// Removes `n` bytes from the front of the input. Takes `&mut self` so
    /// that no slice from [`Conn::peek`] can be used afterwards.
    pub fn consume(&mut self, n: usize) {
        {
            let mut input = self.reading.input.borrow_mut();
            if n >= input.len() {
                // Idle again: no heap held.
                *input = Vec::new();
            } else if n > 0 {
                input.drain(..n);
                if input.capacity() > 4096 && input.len() * 4 < input.capacity() {
                    input.shrink_to_fit();
                }
            }
        }
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
        if self.read_ev.is_none() {
            return; // detached (never: detach takes self)
        }
        self.reading.output.borrow_mut().push(data);
        let mut e = self.reading.write_ev.get();
        if e.is_null() {
            let arg = Rc::as_ptr(&self.reading) as *mut c_void;
            // SAFETY: the base is live; arg stays valid while the event
            // exists (the Conn frees it before its Rc<Reader>).
            e = unsafe {
                ev::event_new(
                    self._base.as_ptr(),
                    self.raw_fd(),
                    (ev::EV_WRITE | ev::EV_PERSIST) as c_short,
                    Some(write_cb),
                    arg,
                )
            };
            if e.is_null() {
                log::error!("connection {}: event_new for writing failed; output dropped", self.raw_fd());
                return;
            }
            self.reading.write_ev.set(e);
        }
        // SAFETY: the event is live until free_events; no timeout.
        unsafe { ev::event_add(e, std::ptr::null()) };
    }

    /// Writes `data` to the kernel at once when nothing is queued before
    /// it (saving the EV_WRITE round trip); queues what the socket does
    /// not take. Returns true when everything is in the kernel.
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

    /// Takes the descriptor and the unread input back, freeing the events
    /// first (they leave epoll before the fd can move). Output not yet
    /// flushed is lost: call when `output_len() == 0`.
    pub fn detach(mut self) -> (OwnedFd, Vec<u8>) {
        self.free_events();
        let leftover = std::mem::take(&mut *self.reading.input.borrow_mut());
        (self.fd.take().expect("fd present until detach"), leftover)
    }

    /// Heap bytes the input and output buffers hold (tests: an idle
    /// connection holds none, a partial request only its own bytes).
    #[cfg(test)]
    pub(super) fn buffer_capacity(&self) -> usize {
        self.reading.input.borrow().capacity() + self.reading.output.borrow().buf.capacity()
    }

    fn free_events(&mut self) {
        // The events leave epoll at once (changelist off); nothing calls
        // back afterwards, so the Reader their argument points to may be
        // dropped.
        if let Some(e) = self.read_ev.take() {
            // SAFETY: the event is live and ours; nothing uses it afterwards.
            unsafe { ev::event_free(e.as_ptr()) };
        }
        let w = self.reading.write_ev.replace(std::ptr::null_mut());
        if !w.is_null() {
            // SAFETY: as above.
            unsafe { ev::event_free(w) };
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.free_events();
        // self.fd closes after the events are gone.
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
