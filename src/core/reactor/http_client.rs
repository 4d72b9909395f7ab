//! `HttpClient`: libevent's own HTTP client (`evhttp_connection`) on the
//! process's [`Base`], for small JSON calls to a side service (etcd's v3
//! gateway) and one streaming response (a watch), without an async
//! runtime.
//!
//! Ownership (libevent's rules, and how this wrapper keeps them):
//! - libevent frees an outgoing request itself after its completion
//!   callback (we never call `evhttp_request_own`), so a request pointer is
//!   used only inside its callbacks;
//! - each request's Rust side (its closures) lives in a box owned by the
//!   client's table; the C callback argument points into that box. The
//!   completion callback takes the box out of the table (libevent calls it
//!   exactly once, with a NULL request on failure); the client's `Drop`
//!   frees the connection (which frees queued requests *without* calling
//!   their callbacks) and then the boxes left in the table;
//! - dropping the client from inside one of its own callbacks is allowed:
//!   libevent still uses the connection when a chunk callback returns, so
//!   the free is deferred to the next loop round (`event_base_once`), and
//!   callbacks of a dropped client do nothing meanwhile.
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::raw::c_void;
use std::ptr::NonNull;
use std::rc::{Rc, Weak};
use std::time::Duration;

use libevent_sys as ev;

use super::Base;

/// A finished request: its status code and whole body (empty for a
/// streamed one: its bytes went to the chunk callback).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    /// The response's status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

/// What a request's completion callback gets: the reply, or why there is
/// none (connection refused or reset, timeout...).
pub type HttpResult = Result<HttpReply, String>;

type Done = Box<dyn FnOnce(HttpResult)>;
/// A streamed request's chunk callback: gets the body's bytes as they come.
pub type Chunk = Box<dyn FnMut(&[u8])>;

/// One request's Rust side, boxed in the client's table.
struct Ctx {
    id: u64,
    shared: Weak<Shared>,
    done: Cell<Option<Done>>,
    chunk: RefCell<Option<Chunk>>,
    /// libevent's error code, from the error callback (before completion).
    error: Cell<Option<ev::evhttp_request_error>>,
}

/// State shared by the client and its requests' callbacks.
struct Shared {
    table: RefCell<HashMap<u64, Box<Ctx>>>,
    /// Callbacks of this client running now (a drop meanwhile is deferred).
    depth: Cell<u32>,
    /// The client was dropped: callbacks do nothing.
    dead: Cell<bool>,
    /// Inside `post`: libevent may fail a request at once (an immediate
    /// connect error), and its result waits here for the next loop round.
    in_post: Cell<bool>,
    late: RefCell<Vec<(Done, HttpResult)>>,
}

/// A connection to one HTTP server (`HOST:PORT`), reconnected by libevent
/// as requests need it; requests queue on it one at a time. Dropping it
/// closes the connection and drops every request's callbacks uncalled.
///
/// ```
/// use handoff::core::reactor::{Base, HttpClient};
///
/// let base = Base::new()?;
/// let mut c = HttpClient::new(&base, "127.0.0.1", 9, Some(std::time::Duration::from_secs(1)))?;
/// c.post("/v3/kv/range", br#"{"key":"YQ=="}"#, None, |r| assert!(r.is_err()))?;
/// base.dispatch()?; // nothing listens on port 9: the callback gets an error
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct HttpClient {
    raw: NonNull<ev::evhttp_connection>,
    host: String,
    shared: Rc<Shared>,
    next: u64,
    base: Base,
}

/// A client freed on the next loop round (dropped inside its callback).
struct Deferred {
    raw: NonNull<ev::evhttp_connection>,
    shared: Rc<Shared>,
    _base: Base,
}

impl Deferred {
    fn free(self) {
        // SAFETY: raw is live (its client is gone, this is its only
        // owner) and freed once; libevent calls no request callback while
        // freeing (queued requests are freed silently).
        unsafe { ev::evhttp_connection_free(self.raw.as_ptr()) };
        let left = std::mem::take(&mut *self.shared.table.borrow_mut());
        drop(left);
    }
}

unsafe extern "C" fn deferred_free(_fd: i32, _what: i16, arg: *mut c_void) {
    // SAFETY: arg is the Box<Deferred> leaked by HttpClient::drop for this
    // one-shot event, which libevent runs once.
    let d = unsafe { Box::from_raw(arg as *mut Deferred) };
    super::guard(move || d.free());
}

unsafe extern "C" fn deliver_late(_fd: i32, _what: i16, arg: *mut c_void) {
    // SAFETY: arg is the Box<Weak<Shared>> leaked by HttpClient::post for
    // this one-shot event, which libevent runs once.
    let weak = unsafe { Box::from_raw(arg as *mut Weak<Shared>) };
    let Some(shared) = weak.upgrade() else { return };
    let late = std::mem::take(&mut *shared.late.borrow_mut());
    for (done, result) in late {
        if shared.dead.get() {
            return;
        }
        shared.depth.set(shared.depth.get() + 1);
        super::guard(move || done(result));
        shared.depth.set(shared.depth.get() - 1);
    }
}

unsafe extern "C" fn on_error(err: ev::evhttp_request_error, arg: *mut c_void) {
    // SAFETY: arg points to a Ctx boxed in its client's table, which stays
    // until the completion callback (after this one) or the connection's
    // free (after which libevent calls nothing).
    let ctx = unsafe { &*(arg as *const Ctx) };
    ctx.error.set(Some(err));
}

fn error_name(e: Option<ev::evhttp_request_error>) -> String {
    let why = match e {
        Some(ev::evhttp_request_error_EVREQ_HTTP_TIMEOUT) => "timed out",
        Some(ev::evhttp_request_error_EVREQ_HTTP_EOF) => "connection closed",
        Some(ev::evhttp_request_error_EVREQ_HTTP_INVALID_HEADER) => "bad response header",
        Some(ev::evhttp_request_error_EVREQ_HTTP_BUFFER_ERROR) => "connection failed",
        Some(ev::evhttp_request_error_EVREQ_HTTP_REQUEST_CANCEL) => "cancelled",
        Some(ev::evhttp_request_error_EVREQ_HTTP_DATA_TOO_LONG) => "response too long",
        _ => "connection failed",
    };
    why.to_string()
}

/// The bytes waiting in the request's input buffer.
///
/// # Safety
/// `req` must be a live request inside one of its callbacks.
unsafe fn input(req: *mut ev::evhttp_request) -> Vec<u8> {
    // SAFETY: req is live (caller); pullup makes the buffer contiguous and
    // returns a pointer valid until the buffer changes (copied at once).
    unsafe {
        let buf = ev::evhttp_request_get_input_buffer(req);
        let len = ev::evbuffer_get_length(buf);
        if len == 0 {
            return Vec::new();
        }
        let p = ev::evbuffer_pullup(buf, len as isize);
        if p.is_null() {
            return Vec::new();
        }
        std::slice::from_raw_parts(p, len).to_vec()
    }
}

unsafe extern "C" fn on_chunk(req: *mut ev::evhttp_request, arg: *mut c_void) {
    // SAFETY: as in on_error: the Ctx is live during the request's callbacks.
    let ctx = unsafe { &*(arg as *const Ctx) };
    let Some(shared) = ctx.shared.upgrade() else { return };
    if shared.dead.get() || req.is_null() {
        return;
    }
    // SAFETY: req is live inside its chunk callback; libevent drains the
    // buffer after we return.
    let bytes = unsafe { input(req) };
    let Some(mut f) = ctx.chunk.borrow_mut().take() else { return };
    shared.depth.set(shared.depth.get() + 1);
    super::guard(|| f(&bytes));
    shared.depth.set(shared.depth.get() - 1);
    // The box stays in the table while depth > 0, even if the client was
    // dropped by f (its free is deferred): putting f back is safe.
    if !shared.dead.get() {
        *ctx.chunk.borrow_mut() = Some(f);
    }
}

unsafe extern "C" fn on_done(req: *mut ev::evhttp_request, arg: *mut c_void) {
    // SAFETY: as in on_error; read before the box is taken out below.
    let (id, weak) = unsafe {
        let ctx = &*(arg as *const Ctx);
        (ctx.id, ctx.shared.clone())
    };
    let Some(shared) = weak.upgrade() else { return };
    let Some(ctx) = shared.table.borrow_mut().remove(&id) else { return };
    if shared.dead.get() {
        return;
    }
    let result = if req.is_null() {
        Err(error_name(ctx.error.get()))
    } else {
        // SAFETY: req is live inside its completion callback (libevent
        // frees it after we return).
        let (status, body) = unsafe { (ev::evhttp_request_get_response_code(req), input(req)) };
        if status == 0 {
            Err(error_name(ctx.error.get()))
        } else {
            Ok(HttpReply { status: status as u16, body })
        }
    };
    let Some(done) = ctx.done.take() else { return };
    drop(ctx);
    if shared.in_post.get() {
        shared.late.borrow_mut().push((done, result));
        return;
    }
    shared.depth.set(shared.depth.get() + 1);
    super::guard(move || done(result));
    shared.depth.set(shared.depth.get() - 1);
}

impl HttpClient {
    /// A client of `host:port` (an address or a name libevent resolves
    /// when connecting). `timeout` bounds each request's connect, write
    /// and every read (`None`: a day, for long streams).
    pub fn new(base: &Base, host: &str, port: u16, timeout: Option<Duration>) -> io::Result<HttpClient> {
        let c_host = CString::new(host).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in host"))?;
        // SAFETY: the base is live; libevent copies the host; NULL means
        // failure and is checked.
        let raw = unsafe { ev::evhttp_connection_base_new(base.as_ptr(), std::ptr::null_mut(), c_host.as_ptr(), port) };
        let raw = NonNull::new(raw).ok_or_else(|| io::Error::other("evhttp_connection_base_new failed"))?;
        let t = super::timeval(timeout.unwrap_or(Duration::from_secs(86_400)));
        // SAFETY: raw is live; the timeval is copied.
        unsafe { ev::evhttp_connection_set_timeout_tv(raw.as_ptr(), &t) };
        let shared = Rc::new(Shared {
            table: RefCell::default(),
            depth: Cell::new(0),
            dead: Cell::new(false),
            in_post: Cell::new(false),
            late: RefCell::default(),
        });
        let host = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        Ok(HttpClient { raw, host, shared, next: 1, base: base.clone() })
    }

    /// Sends `POST path` with a JSON `body`. `chunk`, if given, gets the
    /// response body as it arrives (a stream); `done` gets the end of the
    /// request: its reply, or the error. Neither is called from inside
    /// `post`, nor after the client is dropped.
    pub fn post(
        &mut self,
        path: &str,
        body: &[u8],
        chunk: Option<Chunk>,
        done: impl FnOnce(HttpResult) + 'static,
    ) -> io::Result<()> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("NUL in {what}"));
        let c_path = CString::new(path).map_err(|_| bad("path"))?;
        let c_host = CString::new(self.host.as_str()).map_err(|_| bad("host"))?;
        let id = self.next;
        self.next += 1;
        let streamed = chunk.is_some();
        let ctx = Box::new(Ctx {
            id,
            shared: Rc::downgrade(&self.shared),
            done: Cell::new(Some(Box::new(done))),
            chunk: RefCell::new(chunk),
            error: Cell::new(None),
        });
        let arg = &*ctx as *const Ctx as *mut c_void;
        // SAFETY: arg points into a box the table keeps until the
        // completion callback or the connection's free, whichever is first.
        let req = unsafe { ev::evhttp_request_new(Some(on_done), arg) };
        if req.is_null() {
            return Err(io::Error::other("evhttp_request_new failed"));
        }
        // SAFETY: req is live and not yet handed to libevent; the header
        // strings are copied; the body is copied into its buffer.
        unsafe {
            ev::evhttp_request_set_error_cb(req, Some(on_error));
            if streamed {
                ev::evhttp_request_set_chunked_cb(req, Some(on_chunk));
            }
            let headers = ev::evhttp_request_get_output_headers(req);
            let length = CString::new(body.len().to_string()).expect("digits");
            for (k, v) in
                [(c"Host", c_host.as_c_str()), (c"Content-Type", c"application/json"), (c"Content-Length", &length)]
            {
                ev::evhttp_add_header(headers, k.as_ptr(), v.as_ptr());
            }
            ev::evbuffer_add(ev::evhttp_request_get_output_buffer(req), body.as_ptr() as *const c_void, body.len());
        }
        self.shared.table.borrow_mut().insert(id, ctx);
        self.shared.in_post.set(true);
        // SAFETY: raw and req are live; libevent owns req from here on.
        let rc = unsafe {
            ev::evhttp_make_request(self.raw.as_ptr(), req, ev::evhttp_cmd_type_EVHTTP_REQ_POST, c_path.as_ptr())
        };
        self.shared.in_post.set(false);
        if !self.shared.late.borrow().is_empty() {
            let zero = super::timeval(Duration::ZERO);
            let arg = Box::into_raw(Box::new(Rc::downgrade(&self.shared))) as *mut c_void;
            // SAFETY: the base is live; arg is a leaked box that
            // deliver_late takes back exactly once.
            let rc = unsafe {
                ev::event_base_once(self.base.as_ptr(), -1, ev::EV_TIMEOUT as i16, Some(deliver_late), arg, &zero)
            };
            if rc != 0 {
                log::error!("http client: cannot schedule a failed request's callback");
            }
        }
        if rc != 0 {
            self.shared.table.borrow_mut().remove(&id);
            return Err(io::Error::other(format!("POST {path}: cannot start the request")));
        }
        Ok(())
    }

    /// Requests started and not finished yet.
    pub fn in_flight(&self) -> usize {
        self.shared.table.borrow().len()
    }
}

impl Drop for HttpClient {
    fn drop(&mut self) {
        self.shared.dead.set(true);
        let d = Deferred { raw: self.raw, shared: self.shared.clone(), _base: self.base.clone() };
        if self.shared.depth.get() == 0 {
            return d.free();
        }
        // Inside one of our callbacks: libevent still uses the connection
        // when it returns; free it on the next round.
        let zero = super::timeval(Duration::ZERO);
        let arg = Box::into_raw(Box::new(d)) as *mut c_void;
        // SAFETY: the base is live; arg is a leaked box that deferred_free
        // takes back exactly once.
        let rc = unsafe {
            ev::event_base_once(self.base.as_ptr(), -1, ev::EV_TIMEOUT as i16, Some(deferred_free), arg, &zero)
        };
        if rc != 0 {
            // Leaked rather than freed under libevent's feet.
            log::error!("http client: cannot schedule its free; leaking one connection");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// A one-shot server thread answering one request with `reply`; gives
    /// back the request it read.
    fn serve_once(reply: &'static [u8]) -> (u16, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains("\r\n\r\n{}") {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            for part in reply.split(|&b| b == b'|') {
                s.write_all(part).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            String::from_utf8_lossy(&got).into_owned()
        });
        (port, t)
    }

    #[test]
    fn posts_and_reads_the_reply() {
        let (port, t) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"a\":1}");
        let base = Base::new().unwrap();
        let got = Rc::new(RefCell::new(None));
        let mut c = HttpClient::new(&base, "127.0.0.1", port, Some(Duration::from_secs(5))).unwrap();
        let g = got.clone();
        c.post("/v3/x", b"{}", None, move |r| *g.borrow_mut() = Some(r)).unwrap();
        assert_eq!(c.in_flight(), 1);
        base.dispatch().unwrap();
        let r = got.borrow_mut().take().expect("done called").unwrap();
        assert_eq!(r, HttpReply { status: 200, body: b"{\"a\":1}".to_vec() });
        let req = t.join().unwrap();
        assert!(req.starts_with("POST /v3/x HTTP/1.1\r\n"), "{req}");
        assert!(req.contains(&format!("Host: 127.0.0.1:{port}\r\n")), "{req}");
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn streams_chunks_and_may_drop_itself_in_a_chunk() {
        let (port, t) =
            serve_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n|2\r\nde\r\n|0\r\n\r\n");
        let base = Base::new().unwrap();
        let chunks = Rc::new(RefCell::new(Vec::<u8>::new()));
        let client = Rc::new(RefCell::new(None::<HttpClient>));
        let mut c = HttpClient::new(&base, "127.0.0.1", port, None).unwrap();
        let (ch, cl) = (chunks.clone(), client.clone());
        let b = base.clone();
        let on_chunk = Box::new(move |bytes: &[u8]| {
            ch.borrow_mut().extend_from_slice(bytes);
            if ch.borrow().len() >= 5 {
                // Dropping the client inside its own chunk callback.
                cl.borrow_mut().take();
                b.exit(Some(Duration::from_millis(50)));
            }
        });
        c.post("/v3/watch", b"{}", Some(on_chunk), |_| panic!("a dropped client calls nothing")).unwrap();
        *client.borrow_mut() = Some(c);
        base.dispatch().unwrap();
        assert_eq!(&*chunks.borrow(), b"abcde");
        assert!(client.borrow().is_none());
        t.join().unwrap();
    }

    #[test]
    fn refused_connection_is_an_error() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let base = Base::new().unwrap();
        let got = Rc::new(RefCell::new(None));
        let mut c = HttpClient::new(&base, "127.0.0.1", port, Some(Duration::from_secs(2))).unwrap();
        let g = got.clone();
        c.post("/x", b"{}", None, move |r| *g.borrow_mut() = Some(r)).unwrap();
        base.dispatch().unwrap();
        assert!(got.borrow().as_ref().expect("done called").is_err());
    }

    #[test]
    fn drop_with_a_request_in_flight_frees_it_uncalled() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let base = Base::new().unwrap();
        let mut c = HttpClient::new(&base, "127.0.0.1", port, None).unwrap();
        c.post("/x", b"{}", None, |_| panic!("not called")).unwrap();
        drop(c);
        base.dispatch().unwrap();
    }
}
