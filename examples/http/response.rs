//! Responses, preformatted once per process: the `GET` hot path is one
//! copy of a finished response, an echo fills in only its length.
use handoff::service::Place;

/// What the connection does after a response, and what the response says
/// about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conn {
    /// HTTP/1.1 keep-alive (the default: no `Connection` header).
    KeepAlive,
    /// HTTP/1.0 keep-alive, asked for: `Connection: keep-alive`.
    KeepAlive10,
    /// Close after this response: `Connection: close`.
    Close,
}

impl Conn {
    const ALL: [Conn; 3] = [Conn::KeepAlive, Conn::KeepAlive10, Conn::Close];

    fn header(self) -> &'static str {
        match self {
            Conn::KeepAlive => "",
            Conn::KeepAlive10 => "Connection: keep-alive\r\n",
            Conn::Close => "Connection: close\r\n",
        }
    }
}

/// A request refused: its status; the connection closes after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: a malformed request line, header, body framing or chunk.
    BadRequest,
    /// 413: a body over `--max-body`.
    TooLarge,
    /// 431: a request head over 16 KiB (or with too many fields).
    HeadTooLarge,
    /// 501: a method other than GET, HEAD, POST, PUT (or a transfer
    /// coding other than chunked).
    NotImplemented,
}

impl Refusal {
    const ALL: [Refusal; 4] = [Refusal::BadRequest, Refusal::TooLarge, Refusal::HeadTooLarge, Refusal::NotImplemented];

    fn status(self) -> (&'static str, &'static str) {
        match self {
            Refusal::BadRequest => ("400 Bad Request", "bad request\n"),
            Refusal::TooLarge => ("413 Content Too Large", "request body too large\n"),
            Refusal::HeadTooLarge => ("431 Request Header Fields Too Large", "request head too large\n"),
            Refusal::NotImplemented => ("501 Not Implemented", "not implemented\n"),
        }
    }
}

/// The body of every GET.
pub const HELLO: &[u8] = b"hello\n";

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Every response of one process, X-Handoff included.
#[derive(Debug)]
pub struct Responses {
    /// GET's whole response, by [`Conn`]; HEAD's is the same minus the body.
    hello: [Vec<u8>; 3],
    /// An echo's head up to its Content-Length value, by [`Conn`].
    echo: [Vec<u8>; 3],
    /// Whole responses, by [`Refusal`].
    refusals: [Vec<u8>; 4],
}

impl Responses {
    /// `x_handoff` is the header's value (see [`x_handoff`]).
    pub fn new(x_handoff: &str) -> Responses {
        let head = |status: &str, ctype: &str, conn: Conn| {
            format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nX-Handoff: {x_handoff}\r\n{}", conn.header())
        };
        let hello = Conn::ALL.map(|c| {
            let mut v = head("200 OK", "text/plain", c).into_bytes();
            v.extend_from_slice(format!("Content-Length: {}\r\n\r\n", HELLO.len()).as_bytes());
            v.extend_from_slice(HELLO);
            v
        });
        let echo = Conn::ALL.map(|c| {
            let mut v = head("200 OK", "application/octet-stream", c).into_bytes();
            v.extend_from_slice(b"Content-Length: ");
            v
        });
        let refusals = Refusal::ALL.map(|r| {
            let (status, body) = r.status();
            let mut v = head(status, "text/plain", Conn::Close).into_bytes();
            v.extend_from_slice(format!("Content-Length: {}\r\n\r\n{body}", body.len()).as_bytes());
            v
        });
        Responses { hello, echo, refusals }
    }

    /// The whole response to a GET (`head_only`: to a HEAD).
    pub fn hello(&self, conn: Conn, head_only: bool) -> &[u8] {
        let r = &self.hello[conn as usize];
        if head_only {
            &r[..r.len() - HELLO.len()]
        } else {
            r
        }
    }

    /// Appends the head of an echo of `len` body bytes.
    pub fn echo_head(&self, conn: Conn, len: usize, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.echo[conn as usize]);
        push_decimal(len, out);
        out.extend_from_slice(b"\r\n\r\n");
    }

    /// The whole response refusing a request.
    pub fn refusal(&self, r: Refusal) -> &[u8] {
        &self.refusals[r as usize]
    }
}

/// X-Handoff's value: which process answered.
pub fn x_handoff(place: &Place) -> String {
    match place {
        Place::Worker { index, pid, gen, .. } => format!("worker={index} pid={pid} gen={gen}"),
        Place::Pair { port, pid } => format!("port={port} pid={pid}"),
        Place::Test => format!("test pid={}", std::process::id()),
    }
}

/// Appends `n` in decimal without allocating.
fn push_decimal(mut n: usize, out: &mut Vec<u8>) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal() {
        for n in [0, 7, 10, 99, 1 << 20, usize::MAX] {
            let mut v = Vec::new();
            push_decimal(n, &mut v);
            assert_eq!(v, n.to_string().as_bytes());
        }
    }

    #[test]
    fn x_handoff_by_place() {
        let w = Place::Worker { index: 1, pid: 42, gen: 3, node: Some("a".into()) };
        assert_eq!(x_handoff(&w), "worker=1 pid=42 gen=3");
        assert_eq!(x_handoff(&Place::Pair { port: 8080, pid: 7 }), "port=8080 pid=7");
        assert!(x_handoff(&Place::Test).starts_with("test pid="));
    }
}
