//! `HttpServer`: libevent's own small HTTP server (`evhttp`) on the
//! process's [`Base`], for side endpoints such as `/metrics`. One handler
//! answers every request from a method and a path; the server writes the
//! response (Content-Length included, keep-alive as the client asks).
use std::ffi::{CStr, CString};
use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd, OwnedFd};
use std::os::raw::c_void;
use std::ptr::NonNull;
use std::rc::Rc;

use libevent_sys as ev;

use super::Base;

/// How long an HTTP connection may sit idle (reading a request, or kept
/// alive between requests) before the server closes it.
const IDLE_SECS: i32 = 10;
/// Largest request head and body accepted (the server only answers GETs).
const MAX_HEADERS: isize = 8 << 10;
const MAX_BODY: isize = 4 << 10;

/// A request's method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`: answered like a GET, without the body.
    Head,
    /// Any other method (POST, PUT, DELETE, OPTIONS, ...).
    Other,
}

/// What the handler sees of a request.
#[derive(Debug)]
pub struct HttpRequest<'a> {
    /// The method.
    pub method: Method,
    /// The path of the request target, without the query (`/metrics` for
    /// `GET /metrics?x=1`), not percent-decoded.
    pub path: &'a str,
}

/// The handler's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code (200, 404...); the reason phrase is libevent's.
    pub status: u16,
    /// Extra headers (`Content-Length` is added for the body).
    pub headers: Vec<(String, String)>,
    /// The body (not sent in answer to HEAD; its length still is).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// A response with a `Content-Type` header and a body.
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> HttpResponse {
        HttpResponse { status, headers: vec![("Content-Type".into(), content_type.into())], body: body.into() }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> HttpResponse {
        self.headers.push((name.into(), value.into()));
        self
    }
}

type Handler = Rc<dyn Fn(&HttpRequest<'_>) -> HttpResponse>;

/// An `evhttp` serving one listening TCP socket on a [`Base`]. Dropping it
/// closes the listening socket and every open HTTP connection
/// (`evhttp_free`).
///
/// ```
/// use handoff::core::reactor::{Base, HttpResponse, HttpServer, Method};
///
/// let base = Base::new()?;
/// let server = HttpServer::bind(&base, "127.0.0.1:0", |req| match (req.method, req.path) {
///     (Method::Get | Method::Head, "/hello") => HttpResponse::new(200, "text/plain", "hi\n"),
///     _ => HttpResponse::new(404, "text/plain", "not found\n"),
/// })?;
/// let port = server.local_addr()?.port(); // the free port picked
/// assert_ne!(port, 0);
/// // base.dispatch() serves it, with everything else on the base.
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct HttpServer {
    raw: NonNull<ev::evhttp>,
    /// The listening socket, owned by `raw` (closed by `evhttp_free`).
    bound: NonNull<ev::evhttp_bound_socket>,
    _handler: Box<Handler>,
    /// Keeps the `event_base` alive for as long as the server.
    _base: Base,
}

/// The method of a libevent request.
fn method_of(cmd: ev::evhttp_cmd_type) -> Method {
    match cmd {
        ev::evhttp_cmd_type_EVHTTP_REQ_GET => Method::Get,
        ev::evhttp_cmd_type_EVHTTP_REQ_HEAD => Method::Head,
        _ => Method::Other,
    }
}

/// Every method libevent knows: all reach the handler (which answers 405
/// as it sees fit), instead of libevent's own 501 for the disallowed ones.
const ALL_METHODS: u16 = (ev::evhttp_cmd_type_EVHTTP_REQ_GET
    | ev::evhttp_cmd_type_EVHTTP_REQ_POST
    | ev::evhttp_cmd_type_EVHTTP_REQ_HEAD
    | ev::evhttp_cmd_type_EVHTTP_REQ_PUT
    | ev::evhttp_cmd_type_EVHTTP_REQ_DELETE
    | ev::evhttp_cmd_type_EVHTTP_REQ_OPTIONS
    | ev::evhttp_cmd_type_EVHTTP_REQ_TRACE
    | ev::evhttp_cmd_type_EVHTTP_REQ_CONNECT
    | ev::evhttp_cmd_type_EVHTTP_REQ_PATCH) as u16;

unsafe extern "C" fn on_request(req: *mut ev::evhttp_request, arg: *mut c_void) {
    if req.is_null() {
        return;
    }
    // SAFETY: `arg` is the Box<Handler> owned by the HttpServer, which
    // frees the evhttp (so no callback can come) before the Box; cloning
    // the Rc keeps the closure alive even if it drops the server.
    let handler: Handler = unsafe { (*(arg as *const Handler)).clone() };
    // SAFETY: `req` is the live request libevent hands its callback; the
    // strings it returns live as long as the request, longer than `path`.
    let (method, path) = unsafe {
        let method = method_of(ev::evhttp_request_get_command(req));
        let uri = ev::evhttp_request_get_evhttp_uri(req);
        let p = if uri.is_null() { std::ptr::null() } else { ev::evhttp_uri_get_path(uri) };
        let path = if p.is_null() { "" } else { CStr::from_ptr(p).to_str().unwrap_or("") };
        (method, path)
    };
    let mut reply = None;
    super::guard(|| reply = Some(handler(&HttpRequest { method, path })));
    // A panicking handler (the loop is broken; the panic resumes at
    // dispatch) still answers its client.
    let reply = reply.unwrap_or_else(|| HttpResponse::new(500, "text/plain", "internal error\n"));
    // SAFETY: `req` is still live: it is ours until evhttp_send_reply.
    unsafe { send(req, method, &reply) };
}

/// Writes `reply` to `req` (which libevent then frees).
///
/// # Safety
/// `req` must be a live incoming request not answered yet.
unsafe fn send(req: *mut ev::evhttp_request, method: Method, reply: &HttpResponse) {
    // SAFETY: req is live (caller); the header list and buffer are its own.
    unsafe {
        let headers = ev::evhttp_request_get_output_headers(req);
        let length = reply.body.len().to_string();
        let all = reply.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (k, v) in all.chain([("Content-Length", length.as_str())]) {
            // A header with NUL, CR or LF is left out (libevent refuses
            // CR/LF itself).
            if let (Ok(k), Ok(v)) = (CString::new(k), CString::new(v)) {
                ev::evhttp_add_header(headers, k.as_ptr(), v.as_ptr());
            }
        }
        if method != Method::Head && !reply.body.is_empty() {
            let buf = ev::evhttp_request_get_output_buffer(req);
            ev::evbuffer_add(buf, reply.body.as_ptr() as *const c_void, reply.body.len());
        }
        ev::evhttp_send_reply(req, i32::from(reply.status), std::ptr::null(), std::ptr::null_mut());
    }
}

impl HttpServer {
    /// Listens on `addr` (`HOST:PORT`: an IPv4 or bracketed IPv6 address,
    /// or a name; port 0 picks a free one) and serves `handler`. The error
    /// names the address (unresolvable, in use, not permitted...).
    pub fn bind(
        base: &Base,
        addr: &str,
        handler: impl Fn(&HttpRequest<'_>) -> HttpResponse + 'static,
    ) -> io::Result<HttpServer> {
        let named = |e: io::Error| io::Error::new(e.kind(), format!("{addr}: {e}"));
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(named)?.collect();
        let mut last = io::Error::new(io::ErrorKind::InvalidInput, "the name resolves to no address");
        for a in addrs {
            match TcpListener::bind(a) {
                Ok(l) => return HttpServer::adopt(base, OwnedFd::from(l), handler),
                Err(e) => last = e,
            }
        }
        Err(named(last))
    }

    /// Serves `handler` on an already listening TCP socket (one passed on
    /// by a previous generation); it is made non-blocking.
    pub fn adopt(
        base: &Base,
        listener: OwnedFd,
        handler: impl Fn(&HttpRequest<'_>) -> HttpResponse + 'static,
    ) -> io::Result<HttpServer> {
        let listener = TcpListener::from(listener);
        listener.set_nonblocking(true)?;
        // SAFETY: plain constructor; NULL means failure and is checked.
        let raw = NonNull::new(unsafe { ev::evhttp_new(base.as_ptr()) })
            .ok_or_else(|| io::Error::other("evhttp_new failed"))?;
        let handler: Box<Handler> = Box::new(Rc::new(handler));
        let arg = &*handler as *const Handler as *mut c_void;
        // SAFETY: raw is live; arg points into a Box that outlives the
        // evhttp (freed first in Drop, or just below on failure).
        unsafe {
            ev::evhttp_set_timeout(raw.as_ptr(), IDLE_SECS);
            ev::evhttp_set_max_headers_size(raw.as_ptr(), MAX_HEADERS);
            ev::evhttp_set_max_body_size(raw.as_ptr(), MAX_BODY);
            ev::evhttp_set_allowed_methods(raw.as_ptr(), ALL_METHODS);
            ev::evhttp_set_gencb(raw.as_ptr(), Some(on_request), arg);
        }
        let fd = listener.into_raw_fd();
        // SAFETY: raw is live; the evhttp takes the descriptor over (it
        // closes it when freed).
        let bound = unsafe { ev::evhttp_accept_socket_with_handle(raw.as_ptr(), fd) };
        let Some(bound) = NonNull::new(bound) else {
            // SAFETY: raw is live and unused elsewhere. The descriptor may
            // or may not have been closed by libevent on this (allocation)
            // failure, so it is left alone rather than closed twice.
            unsafe { ev::evhttp_free(raw.as_ptr()) };
            return Err(io::Error::other("evhttp_accept_socket failed"));
        };
        Ok(HttpServer { raw, bound, _handler: handler, _base: base.clone() })
    }

    fn listener_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the bound socket lives as long as the evhttp, i.e. as
        // long as self; the descriptor it returns stays open until then.
        unsafe { BorrowedFd::borrow_raw(ev::evhttp_bound_socket_get_fd(self.bound.as_ptr())) }
    }

    /// The address the server listens on (the real port after port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpListener::from(self.try_clone_listener()?).local_addr()
    }

    /// A duplicate of the listening socket (to pass on to a successor
    /// process, which serves it with [`HttpServer::adopt`]).
    pub fn try_clone_listener(&self) -> io::Result<OwnedFd> {
        self.listener_fd().try_clone_to_owned()
    }
}

impl AsRawFd for HttpServer {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.listener_fd().as_raw_fd()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        // SAFETY: raw is live and freed once; evhttp_free closes the
        // listening socket and every connection and deletes their events,
        // so the handler Box (dropped after this) is no longer referenced.
        unsafe { ev::evhttp_free(self.raw.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use crate::core::reactor::{Event, Interest};

    /// Runs `base` until `client` (on a thread) returns.
    fn serve_until<T: Send + 'static>(base: &Base, client: impl FnOnce() -> T + Send + 'static) -> T {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        let t = std::thread::spawn(move || {
            let r = client();
            d.store(true, std::sync::atomic::Ordering::SeqCst);
            r
        });
        let b = base.clone();
        let poll = Rc::new(std::cell::RefCell::new(None::<Event>));
        let p = poll.clone();
        let ev = Event::new(base, -1, Interest::Timer, move || {
            if done.load(std::sync::atomic::Ordering::SeqCst) {
                b.exit(None);
            } else if let Some(e) = p.borrow().as_ref() {
                let _ = e.add(Some(Duration::from_millis(5)));
            }
        })
        .unwrap();
        ev.add(Some(Duration::from_millis(5))).unwrap();
        *poll.borrow_mut() = Some(ev);
        base.dispatch().unwrap();
        poll.borrow_mut().take();
        t.join().unwrap()
    }

    fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn server(base: &Base) -> HttpServer {
        HttpServer::bind(base, "127.0.0.1:0", |r| match (r.method, r.path) {
            (Method::Get | Method::Head, "/x") => HttpResponse::new(200, "text/plain", "hello\n").header("X-A", "1"),
            (Method::Other, _) => HttpResponse::new(405, "text/plain", "no\n").header("Allow", "GET, HEAD"),
            _ => HttpResponse::new(404, "text/plain", "not found\n"),
        })
        .unwrap()
    }

    #[test]
    fn answers_get_head_404_and_405() {
        let base = Base::new().unwrap();
        let s = server(&base);
        let addr = s.local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        let replies = serve_until(&base, move || {
            [
                "GET /x?q=1 HTTP/1.0\r\n\r\n",
                "HEAD /x HTTP/1.0\r\n\r\n",
                "GET /y HTTP/1.0\r\n\r\n",
                "POST /x HTTP/1.0\r\nContent-Length: 2\r\n\r\nab",
                "PATCH /x HTTP/1.0\r\n\r\n",
            ]
            .map(|r| exchange(addr, r))
        });
        let [get, head, missing, post, patch] = replies;
        assert!(get.starts_with("HTTP/1.0 200 OK\r\n"), "{get}");
        assert!(get.contains("\r\nContent-Length: 6\r\n") && get.contains("\r\nX-A: 1\r\n"), "{get}");
        assert!(get.ends_with("\r\n\r\nhello\n"), "{get}");
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\nContent-Length: 6\r\n") && head.ends_with("\r\n\r\n"), "{head}");
        assert!(missing.starts_with("HTTP/1.0 404 "), "{missing}");
        assert!(post.starts_with("HTTP/1.0 405 ") && post.contains("\r\nAllow: GET, HEAD\r\n"), "{post}");
        assert!(patch.starts_with("HTTP/1.0 405 "), "{patch}");
    }

    #[test]
    fn keep_alive_serves_several_requests() {
        let base = Base::new().unwrap();
        let s = server(&base);
        let addr = s.local_addr().unwrap();
        let out = serve_until(&base, move || {
            exchange(addr, "GET /x HTTP/1.1\r\nHost: a\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        });
        assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{out}");
    }

    #[test]
    fn bind_errors_name_the_address() {
        let base = Base::new().unwrap();
        let s = server(&base);
        let taken = s.local_addr().unwrap().to_string();
        let e = HttpServer::bind(&base, &taken, |_| HttpResponse::new(200, "text/plain", "")).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(e.to_string().starts_with(&taken), "{e}");
        let e = HttpServer::bind(&base, "no-port", |_| HttpResponse::new(200, "text/plain", "")).err().unwrap();
        assert!(e.to_string().starts_with("no-port: "), "{e}");
    }

    #[test]
    fn a_passed_listener_is_served_and_closed_on_drop() {
        let base = Base::new().unwrap();
        let first = server(&base);
        let addr = first.local_addr().unwrap();
        let dup = first.try_clone_listener().unwrap();
        drop(first);
        let second = HttpServer::adopt(&base, dup, |_| HttpResponse::new(200, "text/plain", "second\n")).unwrap();
        let out = serve_until(&base, move || exchange(addr, "GET / HTTP/1.0\r\n\r\n"));
        assert!(out.ends_with("second\n"), "{out}");
        drop(second);
        assert!(TcpStream::connect(addr).is_err(), "the listening socket is closed with the server");
    }
}
