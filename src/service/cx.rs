//! `Cx`: what a session's `serve` call can do (write, close, relay) and
//! learn (may it serve another request, did the client send EOF).

/// Names one [`Cx::relay`] of a connection; handed back to
/// [`super::Session::relayed`] with its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// A relay the session asked for: its answer goes at `at` in the output.
#[derive(Debug)]
pub(crate) struct RelayReq {
    pub at: usize,
    pub ticket: Ticket,
    pub node: String,
    pub worker: usize,
    pub msg: String,
}

/// The context of one [`super::Session::serve`] call.
pub struct Cx<'a> {
    out: &'a mut Vec<u8>,
    /// Requests still allowed in this call (pair mode: one per hop).
    budget: Option<usize>,
    /// Output bytes already queued on the socket before this call.
    pending: usize,
    output_limit: usize,
    eof: bool,
    relays_allowed: bool,
    next_ticket: u64,
    pub(crate) answered: usize,
    /// Request lengths, for the pair request log (kept only when asked:
    /// workers have no request log).
    pub(crate) lengths: Vec<usize>,
    log_lengths: bool,
    pub(crate) close: bool,
    pub(crate) abort: bool,
    pub(crate) relays: Vec<RelayReq>,
}

impl<'a> Cx<'a> {
    /// The library's context for one call.
    pub(crate) fn new(out: &'a mut Vec<u8>, pending: usize, output_limit: usize) -> Cx<'a> {
        Cx {
            out,
            budget: None,
            pending,
            output_limit,
            eof: false,
            relays_allowed: false,
            next_ticket: 0,
            answered: 0,
            lengths: Vec::new(),
            log_lengths: false,
            close: false,
            abort: false,
            relays: Vec::new(),
        }
    }

    /// A context writing to `out`, with no limits, no EOF and no relays:
    /// for driving a session by hand in tests.
    pub fn standalone(out: &'a mut Vec<u8>) -> Cx<'a> {
        Cx::new(out, 0, usize::MAX)
    }

    pub(crate) fn with_budget(mut self, n: Option<usize>) -> Self {
        self.budget = n;
        self
    }

    /// Keeps each answered request's length (the pair request log).
    pub(crate) fn with_lengths(mut self) -> Self {
        self.log_lengths = true;
        self
    }

    pub(crate) fn with_eof(mut self, eof: bool) -> Self {
        self.eof = eof;
        self
    }

    pub(crate) fn with_relays(mut self, first_ticket: u64) -> Self {
        self.relays_allowed = true;
        self.next_ticket = first_ticket;
        self
    }

    /// May the session serve another request now? False once the
    /// connection is closing, once this call's request budget is spent
    /// (pair mode moves a connection after each request; a restart wants
    /// it between requests), or while too much output is unsent (the
    /// client does not read).
    pub fn more(&self) -> bool {
        !self.close
            && !self.abort
            && self.budget.is_none_or(|b| self.answered < b)
            && self.pending + self.out.len() < self.output_limit
    }

    /// Queues response bytes, after everything written before.
    pub fn write(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// The output buffer itself, for encoders that append in place.
    pub fn output(&mut self) -> &mut Vec<u8> {
        self.out
    }

    /// Records one request answered, `len` being its size as the request
    /// log should show it. Counts toward `status`'s "served" and the
    /// request budget.
    pub fn answered(&mut self, len: usize) {
        self.answered += 1;
        if self.log_lengths {
            self.lengths.push(len);
        }
    }

    /// Closes the connection once what was written is flushed. Nothing
    /// more is read or served.
    pub fn close(&mut self) {
        self.close = true;
    }

    /// Closes the connection at once, dropping unsent output (a protocol
    /// violation, e.g. a frame over the limit).
    pub fn abort(&mut self) {
        self.abort = true;
    }

    /// The client sent EOF: no more bytes will follow what `input` holds.
    pub fn eof(&self) -> bool {
        self.eof
    }

    /// Node mode: sends `msg` (JSON text) to worker `worker` of node
    /// `node`; its answer reaches [`super::Session::relayed`] with the
    /// returned ticket, and whatever that writes goes out in this
    /// request's place. `None` when this process is not a node worker.
    /// Until the answer comes, the connection is not between requests.
    pub fn relay(&mut self, node: &str, worker: usize, msg: &str) -> Option<Ticket> {
        if !self.relays_allowed {
            return None;
        }
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.relays.push(RelayReq { at: self.out.len(), ticket, node: node.to_string(), worker, msg: msg.to_string() });
        Some(ticket)
    }

    /// Whether [`Cx::relay`] can work here (node mode).
    pub fn can_relay(&self) -> bool {
        self.relays_allowed
    }
}
