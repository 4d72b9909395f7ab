//! The keep-alive rpc load on the project's own reactor: one thread, one
//! libevent loop, every connection a `Conn`. A thread per connection spends
//! more CPU on context switches than the servers it measures spend on the
//! requests; on a 2-core machine that caps what a load test can show.
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use super::rpc::{check_relayed, check_reply, params, ping_frame, relay_frame, RpcError, MAX_REPLY};
use super::stats::{ErrLog, Latency};
use super::{Stream, Target, IO_TIMEOUT};
use crate::core::reactor::{Base, Conn, ConnEvent};
use crate::service::rpc::wire::{self, Frame};

/// What the run produced.
pub struct Outcome {
    /// Replies that passed the check.
    pub ok: u64,
    /// Requests without a correct reply: one per wrong reply, all of a
    /// connection's when it could not connect, the rest when it broke.
    pub errors: u64,
    /// Round trip of each correct reply, from the request's write to the
    /// whole reply.
    pub lat: Latency,
    /// Seconds from the first request sent (every connection is made
    /// before) to the last reply.
    pub secs: f64,
}

struct Client {
    conn: Option<Conn>,
    /// Requests answered so far (ok or not) = index of the one in flight.
    done: usize,
    sent_at: Instant,
}

struct Run {
    clients: Vec<Client>,
    requests: usize,
    relay: Option<(String, usize)>,
    ok: u64,
    errors: u64,
    lat: Latency,
    finished: usize,
    base: Base,
}

impl Run {
    fn request(&self, c: usize, i: usize) -> Vec<u8> {
        match &self.relay {
            Some((node, worker)) => relay_frame(node, *worker, &params(c, i)),
            None => ping_frame(&params(c, i)),
        }
    }

    fn check(&self, c: usize, i: usize, body: &[u8]) -> Result<(), RpcError> {
        match &self.relay {
            Some((node, worker)) => check_relayed(body, node, *worker, &params(c, i)),
            None => check_reply(body, &params(c, i)),
        }
    }

    /// Connection `c` is over; `lost` requests never got an answer.
    fn finish(&mut self, c: usize, lost: usize) {
        if self.clients[c].conn.take().is_some() {
            self.errors += lost as u64;
            self.finished += 1;
            if self.finished == self.clients.len() {
                self.base.exit(None);
            }
        }
    }

    fn on_event(&mut self, c: usize, ev: ConnEvent, errlog: &ErrLog) {
        let requests = self.requests;
        match ev {
            ConnEvent::Read => {}
            ConnEvent::Drained => return,
            ConnEvent::Eof | ConnEvent::Error(_) | ConnEvent::Timeout => {
                let left = requests - self.clients[c].done;
                if left > 0 {
                    errlog.report(format_args!("conn {c} request {}/{requests}: {ev:?}", self.clients[c].done));
                }
                self.finish(c, left);
                return;
            }
        }
        loop {
            let Some(conn) = self.clients[c].conn.as_ref() else { return };
            let avail = conn.input_len();
            let len = match wire::frame(conn.peek(avail.min(4)), avail, MAX_REPLY) {
                Frame::Incomplete => return,
                Frame::TooLarge { len } => {
                    errlog.report(format_args!("conn {c}: reply frame of {len} bytes exceeds {MAX_REPLY}"));
                    let left = requests - self.clients[c].done;
                    self.finish(c, left);
                    return;
                }
                Frame::Complete { body } => body,
            };
            let i = self.clients[c].done;
            let verdict = self.check(c, i, &conn.peek(4 + len)[4..]);
            if let Some(conn) = self.clients[c].conn.as_mut() {
                conn.consume(4 + len);
            }
            match verdict {
                Ok(()) => {
                    self.ok += 1;
                    let t = self.clients[c].sent_at.elapsed();
                    self.lat.record(t);
                }
                Err(e) => {
                    errlog.report(format_args!("conn {c} request {i}/{requests}: {e}"));
                    self.errors += 1;
                }
            }
            self.clients[c].done += 1;
            if self.clients[c].done == requests {
                self.finish(c, 0);
                return;
            }
            let next = self.request(c, i + 1);
            let client = &mut self.clients[c];
            client.sent_at = Instant::now();
            if let Err(e) = client.conn.as_ref().expect("checked above").write_now(&next) {
                errlog.report(format_args!("conn {c}: write: {e}"));
                let left = requests - self.clients[c].done;
                self.finish(c, left);
                return;
            }
        }
    }
}

/// `conns` keep-alive connections to `target` (TCP or Unix: past the
/// connect, a `Conn` is the same for both), each sending `requests`
/// requests one at a time.
pub fn keepalive(
    target: &Target,
    conns: usize,
    requests: usize,
    relay: Option<(String, usize)>,
    errlog: Arc<ErrLog>,
) -> Outcome {
    let base = match Base::new() {
        Ok(b) => b,
        Err(e) => {
            errlog.report(format_args!("rpc: event base: {e}"));
            return Outcome { ok: 0, errors: (conns * requests) as u64, lat: Latency::new(), secs: 0.0 };
        }
    };
    let run = Rc::new(RefCell::new(Run {
        clients: Vec::with_capacity(conns),
        requests,
        relay,
        ok: 0,
        errors: 0,
        lat: Latency::new(),
        finished: 0,
        base: base.clone(),
    }));
    // Connect everything first (the clock starts afterwards).
    for c in 0..conns {
        let conn = Stream::open(target).and_then(Stream::into_nonblocking_fd).and_then(|fd| {
            let (w, log) = (Rc::downgrade(&run), errlog.clone());
            Conn::adopt(
                &base,
                fd,
                &[],
                MAX_REPLY + 4,
                Rc::new(move |ev| {
                    if let Some(r) = w.upgrade() {
                        r.borrow_mut().on_event(c, ev, &log);
                    }
                }),
            )
        });
        let mut r = run.borrow_mut();
        match conn {
            Ok(conn) => r.clients.push(Client { conn: Some(conn), done: 0, sent_at: Instant::now() }),
            Err(e) => {
                errlog.report(format_args!("conn {c}: connect {target}: {e}"));
                r.clients.push(Client { conn: None, done: 0, sent_at: Instant::now() });
                r.errors += requests as u64;
                r.finished += 1;
            }
        }
    }
    let start = Instant::now();
    {
        let mut r = run.borrow_mut();
        for c in 0..conns {
            if requests == 0 {
                r.finish(c, 0);
                continue;
            }
            let first = r.request(c, 0);
            let client = &mut r.clients[c];
            let Some(conn) = client.conn.as_ref() else { continue };
            conn.set_read_timeout(Some(IO_TIMEOUT));
            conn.resume_reading();
            client.sent_at = Instant::now();
            if let Err(e) = conn.write_now(&first) {
                errlog.report(format_args!("conn {c}: write: {e}"));
                r.finish(c, requests);
            }
        }
    }
    if run.borrow().finished < conns {
        if let Err(e) = base.dispatch() {
            errlog.report(format_args!("rpc: event loop: {e}"));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let mut r = run.borrow_mut();
    r.clients.clear();
    Outcome { ok: r.ok, errors: r.errors, lat: std::mem::take(&mut r.lat), secs }
}
