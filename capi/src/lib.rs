//! libhandoff: the C API in `csrc/handoff.h`, on the same worker machinery
//! as Rust workers ([`handoff::topology::cluster::worker::link::MasterLink`]).
//!
//! Every exported function catches panics and returns a code; callbacks
//! into C are made with no Rust borrow held, so C may call back into the
//! library from inside them.
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::os::fd::{FromRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::{Rc, Weak};
use std::time::Duration;

mod bev;

use handoff::core::reactor::{Base, Event, Interest, Listener, RawBase};
use handoff::topology::cluster::worker::link::{Handed, MasterLink, Order};
use handoff::topology::cluster::worker::WorkerEnv;

pub const HANDOFF_EINVAL: c_int = -1;
pub const HANDOFF_ENOENV: c_int = -2;
pub const HANDOFF_EIO: c_int = -3;
pub const HANDOFF_ESTATE: c_int = -4;
pub const HANDOFF_EPANIC: c_int = -5;

/// Draining: how soon a connection the master refused is offered again.
const RETRY_RELEASE: Duration = Duration::from_millis(100);

/// `handoff_callbacks` (csrc/handoff.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Callbacks {
    pub on_conn:
        Option<unsafe extern "C" fn(*mut Worker, u64, c_int, *const c_void, usize, *const c_void, usize, *mut c_void)>,
    pub on_drain: Option<unsafe extern "C" fn(*mut Worker, *mut c_void)>,
    pub on_shutdown: Option<unsafe extern "C" fn(*mut Worker, *mut c_void)>,
    pub on_lost: Option<unsafe extern "C" fn(*mut Worker, *mut c_void)>,
}

/// `handoff_worker`: boxed, handed to C as a pointer.
pub struct Worker {
    state: Rc<RefCell<State>>,
}

struct State {
    base: Base,
    /// The C side's handle (the `Worker` box), for callbacks.
    handle: *mut Worker,
    cb: Callbacks,
    arg: *mut c_void,
    index: usize,
    gen: u64,
    link: Option<MasterLink>,
    /// Our id -> the master's id (0: accepted here).
    conns: HashMap<u64, u64>,
    next_id: u64,
    served: u64,
    /// The shared policy's listening sockets (one per endpoint).
    listeners: Vec<Listener>,
    draining: bool,
    stopping: bool,
    lost: bool,
    timers: Vec<Event>,
    /// Draining: offers refused connections again (one timer at a time).
    retry: Option<Event>,
}

/// A call into C, made after every borrow is released.
enum Call {
    Conn { id: u64, fd: OwnedFd, leftover: Vec<u8>, state: Vec<u8> },
    Drain,
    Shutdown,
    Lost,
}

fn with(w: &Weak<RefCell<State>>, f: impl FnOnce(&mut State) -> Vec<Call>) {
    let Some(s) = w.upgrade() else { return };
    let calls = f(&mut s.borrow_mut());
    perform(&s, calls);
}

/// Makes the C calls. The descriptor of a connection goes to C here.
fn perform(s: &Rc<RefCell<State>>, calls: Vec<Call>) {
    for call in calls {
        let (cb, arg, handle) = {
            let st = s.borrow();
            (st.cb, st.arg, st.handle)
        };
        if handle.is_null() {
            // A callback freed the worker (handoff_worker_free): nothing
            // more goes to C. A connection not handed over closes here;
            // the master, which holds a copy, rescues it.
            continue;
        }
        // SAFETY: the callbacks are the C caller's, called with the
        // pointers it gave us and buffers valid for the call's duration.
        unsafe {
            match call {
                Call::Conn { id, fd, leftover, state } => {
                    if let Some(f) = cb.on_conn {
                        use std::os::fd::IntoRawFd;
                        let fd = fd.into_raw_fd();
                        f(
                            handle,
                            id,
                            fd,
                            leftover.as_ptr().cast(),
                            leftover.len(),
                            state.as_ptr().cast(),
                            state.len(),
                            arg,
                        )
                    }
                }
                Call::Drain => {
                    if let Some(f) = cb.on_drain {
                        f(handle, arg)
                    }
                }
                Call::Shutdown => {
                    if let Some(f) = cb.on_shutdown {
                        f(handle, arg)
                    }
                }
                Call::Lost => {
                    if let Some(f) = cb.on_lost {
                        f(handle, arg)
                    }
                }
            }
        }
    }
    // C may have released or closed its last connection.
    let mut st = s.borrow_mut();
    st.maybe_quit();
}

impl State {
    fn obey(&mut self, me: &Weak<RefCell<State>>, order: Order) -> Vec<Call> {
        match order {
            Order::Conn(h) => self.adopt(h).into_iter().collect(),
            Order::Refused(h) => {
                let call = self.adopt(h);
                if self.draining && !self.retry.as_ref().is_some_and(Event::pending) {
                    self.retry =
                        self.after(me, RETRY_RELEASE, |s| if s.draining { vec![Call::Drain] } else { Vec::new() });
                }
                call.into_iter().collect()
            }
            Order::Listener(fd) => {
                let w = me.clone();
                match Listener::adopt(&self.base, fd, move |c| {
                    set_nodelay(&c);
                    with(&w, |s| {
                        let h = Handed::accepted(c, false);
                        s.adopt(h).into_iter().collect()
                    })
                }) {
                    Ok(l) => self.listeners.push(l),
                    Err(e) => log::error!("worker {}: shared listener: {e}", self.index),
                }
                Vec::new()
            }
            Order::Shutdown => {
                if self.stopping || self.draining {
                    return Vec::new();
                }
                self.stopping = true;
                self.listeners.clear();
                vec![Call::Shutdown]
            }
            // The C API has no call to move some connections and keep
            // serving: a C worker stays as loaded as it is.
            Order::Rebalance(_) => Vec::new(),
            // A C worker keeps no access log (`--access-log` is refused
            // with `--worker-cmd`).
            Order::ReopenLogs => Vec::new(),
            // A C worker does not relay to other nodes.
            Order::Peers(_) => Vec::new(),
            Order::Drain => {
                if self.draining || self.stopping {
                    return Vec::new();
                }
                self.draining = true;
                self.listeners.clear();
                vec![Call::Drain]
            }
            Order::Orphaned => {
                let grace = self.link.as_ref().map_or(Duration::from_secs(5), |l| l.orphan_grace);
                let cut = self.after(me, grace, move |s| {
                    if s.conns.is_empty() {
                        return Vec::new();
                    }
                    log::warn!(
                        "worker {}: {} connection(s) could not move within {grace:?}; cutting them",
                        s.index,
                        s.conns.len()
                    );
                    s.conns.clear();
                    s.lost = true;
                    vec![Call::Lost]
                });
                self.timers.extend(cut);
                self.stopping = false;
                let first = !self.draining;
                self.draining = true;
                self.listeners.clear();
                if first {
                    vec![Call::Drain]
                } else {
                    Vec::new()
                }
            }
            Order::Lost => {
                self.lost = true;
                self.conns.clear();
                self.listeners.clear();
                vec![Call::Lost]
            }
        }
    }

    fn adopt(&mut self, h: Handed) -> Option<Call> {
        if self.stopping || self.lost {
            log::warn!("worker {}: connection arrived while stopping; closing it", self.index);
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.conns.insert(id, h.master_id);
        if let Some(l) = self.link.as_mut() {
            l.stats_changed();
        }
        Some(Call::Conn { id, fd: h.fd, leftover: h.leftover, state: h.state })
    }

    /// A timer that runs `f` after `d` (once), to keep.
    fn after(
        &mut self,
        me: &Weak<RefCell<State>>,
        d: Duration,
        f: impl Fn(&mut State) -> Vec<Call> + 'static,
    ) -> Option<Event> {
        let w = me.clone();
        match Event::new(&self.base, -1, Interest::Timer, move || with(&w, &f)).and_then(|t| t.add(Some(d)).map(|()| t))
        {
            Ok(t) => Some(t),
            Err(e) => {
                log::error!("worker {}: timer: {e}", self.index);
                None
            }
        }
    }

    /// Draining, stopping or lost, with no connection left: leave the loop
    /// once the channel is settled.
    fn maybe_quit(&mut self) {
        if !(self.draining || self.stopping || self.lost) || !self.conns.is_empty() {
            return;
        }
        let (open, served) = (self.conns.len(), self.served);
        if let Some(l) = self.link.as_mut() {
            if !l.is_quitting() {
                l.send_stats(open, served, None);
                l.quit();
            }
        }
    }
}

/// TCP_NODELAY on a connection accepted here, as the master sets it on the
/// ones it hands out (replies are small and go out at once).
fn set_nodelay(fd: &OwnedFd) {
    use std::os::fd::AsRawFd;
    let one: c_int = 1;
    // SAFETY: setsockopt on a descriptor we own, with an int of the right size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const c_int).cast(),
            std::mem::size_of::<c_int>() as libc::socklen_t,
        )
    };
}

/// Runs `f`, turning a panic into `HANDOFF_EPANIC`.
fn guarded(f: impl FnOnce() -> c_int) -> c_int {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        log::error!("libhandoff: internal error (caught)");
        HANDOFF_EPANIC
    })
}

fn logging_from_env() {
    let level = std::env::var("HANDOFF_LOG_LEVEL").ok().and_then(|l| l.parse().ok());
    handoff::core::logging::init(0, level.or(Some(log::LevelFilter::Info)));
}

/// # Safety
/// `base` is a live event_base for the worker's lifetime; `cb` points to a
/// `handoff_callbacks`; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn handoff_worker_new(
    base: *mut RawBase,
    cb: *const Callbacks,
    arg: *mut c_void,
    out: *mut *mut Worker,
) -> c_int {
    guarded(|| {
        if cb.is_null() || out.is_null() {
            return HANDOFF_EINVAL;
        }
        // SAFETY: checked non-null; the caller promises a valid struct.
        let cb = unsafe { *cb };
        if cb.on_conn.is_none() || cb.on_drain.is_none() || cb.on_shutdown.is_none() {
            return HANDOFF_EINVAL;
        }
        // SAFETY: the caller promises `base` outlives the worker.
        let Some(base) = (unsafe { Base::from_foreign(base) }) else { return HANDOFF_EINVAL };
        logging_from_env();
        let env = match WorkerEnv::read() {
            Ok(e) => e,
            Err(e) => {
                log::error!("libhandoff: {e}");
                return if e.kind() == std::io::ErrorKind::NotFound { HANDOFF_ENOENV } else { HANDOFF_EIO };
            }
        };
        if let Err(e) = handoff::topology::cluster::worker::prepare_process() {
            log::error!("libhandoff: {e}");
            return HANDOFF_EIO;
        }
        let (index, gen, channel, dir) = (env.index, env.gen, env.channel, env.dir);
        let state = Rc::new(RefCell::new(State {
            base: base.clone(),
            handle: std::ptr::null_mut(),
            cb,
            arg,
            index,
            gen,
            link: None,
            conns: HashMap::new(),
            next_id: 1,
            served: 0,
            listeners: Vec::new(),
            draining: false,
            stopping: false,
            lost: false,
            timers: Vec::new(),
            retry: None,
        }));
        let (w, ws) = (Rc::downgrade(&state), Rc::downgrade(&state));
        let link = MasterLink::new(
            &base,
            channel,
            index,
            dir,
            move |ev| {
                let w2 = w.clone();
                with(&w, |s| match s.link.as_mut().and_then(|l| l.on_event(ev)) {
                    Some(order) => s.obey(&w2, order),
                    None => Vec::new(),
                })
            },
            move || {
                with(&ws, |s| {
                    let (open, served) = (s.conns.len(), s.served);
                    if let Some(l) = s.link.as_mut() {
                        l.send_stats(open, served, None);
                    }
                    Vec::new()
                })
            },
        );
        let link = match link {
            Ok(l) => l,
            Err(e) => {
                log::error!("libhandoff: master channel: {e}");
                return HANDOFF_EIO;
            }
        };
        state.borrow_mut().link = Some(link);
        let handle = Box::into_raw(Box::new(Worker { state: state.clone() }));
        state.borrow_mut().handle = handle;
        log::debug!("worker {index} (pid {}, C) up", std::process::id());
        // SAFETY: checked non-null above.
        unsafe { *out = handle };
        0
    })
}

/// The state behind a handle, or `None` for NULL.
///
/// # Safety
/// `w` is NULL or a live handle from `handoff_worker_new`.
unsafe fn state_of(w: *const Worker) -> Option<Rc<RefCell<State>>> {
    // SAFETY: per the contract above.
    unsafe { w.as_ref() }.map(|w| w.state.clone())
}

/// # Safety
/// `w` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn handoff_worker_index(w: *const Worker) -> c_int {
    // SAFETY: per the contract.
    guarded(|| unsafe { state_of(w) }.map_or(HANDOFF_EINVAL, |s| s.borrow().index as c_int))
}

/// # Safety
/// `w` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn handoff_worker_gen(w: *const Worker) -> u64 {
    // SAFETY: per the contract.
    catch_unwind(AssertUnwindSafe(|| unsafe { state_of(w) }.map_or(0, |s| s.borrow().gen))).unwrap_or(0)
}

/// # Safety
/// `w` is NULL or a live handle; `unconsumed`/`state` point to `len` /
/// `state_len` readable bytes (or are NULL with length 0); `fd` is the
/// caller's to give.
#[no_mangle]
pub unsafe extern "C" fn handoff_release(
    w: *mut Worker,
    id: u64,
    fd: c_int,
    unconsumed: *const c_void,
    len: usize,
    state: *const c_void,
    state_len: usize,
) -> c_int {
    guarded(|| {
        if fd < 0 {
            return HANDOFF_EINVAL;
        }
        // SAFETY: the caller gives us `fd` (on success and error alike).
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: per the contract.
        let Some(s) = (unsafe { state_of(w) }) else { return HANDOFF_EINVAL };
        let bytes = |p: *const c_void, n: usize| -> Option<Vec<u8>> {
            match (p.is_null(), n) {
                (_, 0) => Some(Vec::new()),
                (true, _) => None,
                // SAFETY: non-null with `n` readable bytes, per the contract.
                (false, n) => Some(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), n) }.to_vec()),
            }
        };
        let (Some(leftover), Some(st)) = (bytes(unconsumed, len), bytes(state, state_len)) else {
            return HANDOFF_EINVAL;
        };
        let mut g = s.borrow_mut();
        let Some(master_id) = g.conns.remove(&id) else { return HANDOFF_EINVAL };
        match g.link.as_mut() {
            Some(l) => l.release(fd, leftover, &st, master_id, false),
            None => return HANDOFF_ESTATE,
        }
        if g.conns.is_empty() {
            g.maybe_quit();
        }
        0
    })
}

/// # Safety
/// `w` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn handoff_closed(w: *mut Worker, id: u64) -> c_int {
    guarded(|| {
        // SAFETY: per the contract.
        let Some(s) = (unsafe { state_of(w) }) else { return HANDOFF_EINVAL };
        let mut g = s.borrow_mut();
        let Some(master_id) = g.conns.remove(&id) else { return HANDOFF_EINVAL };
        if let Some(l) = g.link.as_mut() {
            l.closed(master_id);
        }
        if g.conns.is_empty() {
            g.maybe_quit();
        }
        0
    })
}

/// # Safety
/// `w` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn handoff_served(w: *mut Worker, n: u64) -> c_int {
    guarded(|| {
        // SAFETY: per the contract.
        let Some(s) = (unsafe { state_of(w) }) else { return HANDOFF_EINVAL };
        let mut g = s.borrow_mut();
        g.served += n;
        if let Some(l) = g.link.as_mut() {
            l.stats_changed();
        }
        0
    })
}

/// # Safety
/// `w` is NULL or a live handle, not used again.
#[no_mangle]
pub unsafe extern "C" fn handoff_worker_free(w: *mut Worker) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if w.is_null() {
            return;
        }
        // SAFETY: a handle from handoff_worker_new, given back once.
        let w = unsafe { Box::from_raw(w) };
        let mut g = w.state.borrow_mut();
        // Inside a callback, `perform` may still hold the state: it must
        // not pass the freed handle on.
        g.handle = std::ptr::null_mut();
        g.timers.clear();
        g.retry = None;
        g.listeners.clear();
        g.link = None;
    }));
}

/// Static, NUL-terminated descriptions.
#[no_mangle]
pub extern "C" fn handoff_strerror(code: c_int) -> *const c_char {
    let s: &'static [u8] = match code {
        0 => b"success\0",
        HANDOFF_EINVAL => b"invalid argument\0",
        HANDOFF_ENOENV => b"not started by a handoff master (no HANDOFF_* environment)\0",
        HANDOFF_EIO => b"system call failed\0",
        HANDOFF_ESTATE => b"the worker is stopping\0",
        HANDOFF_EPANIC => b"internal error\0",
        _ => b"unknown error\0",
    };
    s.as_ptr().cast()
}
