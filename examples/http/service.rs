//! The service: [`Http`] per process, [`Exchange`] per connection.
use std::io;
use std::sync::Arc;

use handoff::service::{Cx, Place, Service, Session};

use crate::chunked::{self, Progress, Scan};
use crate::request::{self, Action, Body, Head, HEAD_MAX};
use crate::response::{Refusal, Responses, CONTINUE};

/// Room for chunk-size lines and trailers on top of `--max-body` in the
/// read limit: a chunked body framed more heavily than this gets 413.
pub const FRAMING_SLACK: usize = 64 * 1024;

/// The service's flags.
#[derive(clap::Args, serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Opts {
    /// Largest request body accepted (bytes); a larger one gets 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts { max_body: 1 << 20 }
    }
}

/// HTTP/1.1: `hello\n` to GET and HEAD, the body back to POST and PUT.
#[derive(Debug)]
pub struct Http {
    shared: Arc<Shared>,
}

/// What every connection of a process reads.
#[derive(Debug)]
struct Shared {
    responses: Responses,
    max_body: usize,
    read_limit: usize,
}

impl Service for Http {
    type Options = Opts;
    type Session = Exchange;

    fn new(options: &Opts, place: &Place) -> io::Result<Http> {
        let max_body = options.max_body;
        let read_limit = HEAD_MAX.saturating_add(max_body).saturating_add(FRAMING_SLACK);
        let responses = Responses::new(&crate::response::x_handoff(place));
        Ok(Http { shared: Arc::new(Shared { responses, max_body, read_limit }) })
    }

    fn open(&mut self, _state: &[u8]) -> Exchange {
        Exchange { shared: self.shared.clone(), front: Front::Head { scanned: 0 } }
    }

    fn read_limit(&self) -> usize {
        self.shared.read_limit
    }
}

/// One connection. Between requests it holds nothing that must travel
/// (no `export`); while a request is partial it remembers how far it got,
/// so that a large body arriving in many reads is not parsed again each
/// time.
pub struct Exchange {
    shared: Arc<Shared>,
    /// The request at the front of the input.
    front: Front,
}

/// What is known of the request at the front of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Front {
    /// Its head is incomplete: the first `scanned` bytes hold no head end.
    Head { scanned: usize },
    /// Its head is parsed; it is complete at `end` bytes.
    Sized { head: Head, end: usize, continued: bool },
    /// Its head is parsed; its chunked body is scanned up to `progress`.
    Chunked { head: Head, progress: Progress, continued: bool },
}

/// One step at the front of the input.
enum Step {
    /// A request of this many bytes was answered.
    Answered(usize),
    /// The request is incomplete.
    Partial,
    /// The request was refused and the connection closes.
    Refused,
}

impl Session for Exchange {
    fn serve(&mut self, input: &[u8], cx: &mut Cx<'_>) -> usize {
        let mut used = 0;
        while used < input.len() {
            if !cx.more() {
                return used;
            }
            match self.step(&input[used..], cx) {
                Step::Answered(n) => used += n,
                Step::Partial => break,
                Step::Refused => return input.len(),
            }
        }
        let rest = input.len() - used;
        if rest > 0 && rest >= self.shared.read_limit {
            // Reading has paused and the request is still incomplete.
            let why = match self.front {
                Front::Head { .. } => Refusal::HeadTooLarge,
                _ => Refusal::TooLarge,
            };
            self.refuse(why, rest, cx);
            return input.len();
        }
        if cx.eof() {
            // Nothing more will come: a partial request never completes.
            if rest > 0 {
                self.refuse(Refusal::BadRequest, rest, cx);
                return input.len();
            }
            cx.close();
        }
        used
    }
}

impl Exchange {
    /// Answers or refuses the request at the front of `buf`, if complete.
    fn step(&mut self, buf: &[u8], cx: &mut Cx<'_>) -> Step {
        if let Front::Head { scanned } = self.front {
            // A head ends with '\n': none among the new bytes, still partial.
            let fresh = buf.get(scanned..).filter(|_| scanned > 0 && buf.len() < HEAD_MAX);
            if fresh.is_some_and(|b| !b.contains(&b'\n')) {
                self.front = Front::Head { scanned: buf.len() };
                return Step::Partial;
            }
            let head = match request::parse(&buf[..buf.len().min(HEAD_MAX)]) {
                Ok(Some(h)) => h,
                Ok(None) if buf.len() >= HEAD_MAX => return self.refuse(Refusal::HeadTooLarge, buf.len(), cx),
                Ok(None) => {
                    self.front = Front::Head { scanned: buf.len() };
                    return Step::Partial;
                }
                Err(why) => return self.refuse(why, buf.len(), cx),
            };
            self.front = match head.body {
                Body::Sized(n) if n > self.shared.max_body as u64 => {
                    return self.refuse(Refusal::TooLarge, buf.len(), cx)
                }
                Body::Sized(n) => Front::Sized { head, end: head.len + n as usize, continued: false },
                Body::Chunked => Front::Chunked { head, progress: Progress::default(), continued: false },
            };
        }
        match &mut self.front {
            Front::Head { .. } => unreachable!("the head was parsed above"),
            Front::Sized { head, end, continued } => {
                let (head, end) = (*head, *end);
                if buf.len() < end {
                    continue_once(&head, continued, cx);
                    return Step::Partial;
                }
                let body = &buf[head.len..end];
                self.answer(head, end, cx, |out| out.extend_from_slice(body), body.len());
                Step::Answered(end)
            }
            Front::Chunked { head, progress, continued } => {
                let head = *head;
                match chunked::scan(&buf[head.len..], progress, self.shared.max_body) {
                    Scan::Partial => {
                        continue_once(&head, continued, cx);
                        Step::Partial
                    }
                    Scan::Done { end, len } => {
                        let (body, end) = (&buf[head.len..head.len + end], head.len + end);
                        self.answer(head, end, cx, |out| chunked::decode(body, out), len);
                        Step::Answered(end)
                    }
                    Scan::Invalid => self.refuse(Refusal::BadRequest, buf.len(), cx),
                    Scan::TooLarge => self.refuse(Refusal::TooLarge, buf.len(), cx),
                }
            }
        }
    }

    /// Writes the response to a complete request of `size` bytes whose
    /// body (`len` bytes once decoded) `body` appends.
    fn answer(&mut self, head: Head, size: usize, cx: &mut Cx<'_>, body: impl FnOnce(&mut Vec<u8>), len: usize) {
        let r = &self.shared.responses;
        match head.action {
            Action::Hello { head_only } => cx.write(r.hello(head.conn, head_only)),
            Action::Echo => {
                let out = cx.output();
                out.reserve(len + 256);
                r.echo_head(head.conn, len, out);
                body(out);
            }
        }
        cx.answered(size);
        if head.conn == crate::response::Conn::Close {
            cx.close();
        }
        self.front = Front::Head { scanned: 0 };
    }

    /// Writes a refusal of the request at the front (`size` bytes seen)
    /// and closes.
    fn refuse(&mut self, why: Refusal, size: usize, cx: &mut Cx<'_>) -> Step {
        cx.write(self.shared.responses.refusal(why));
        cx.answered(size);
        cx.close();
        self.front = Front::Head { scanned: 0 };
        Step::Refused
    }
}

/// `Expect: 100-continue`: says 100 Continue once while the body is due.
fn continue_once(head: &Head, continued: &mut bool, cx: &mut Cx<'_>) {
    if head.expect_continue && !*continued {
        cx.write(CONTINUE);
        *continued = true;
    }
}
