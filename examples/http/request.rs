//! A request head, parsed by httparse, reduced to what the service needs:
//! what to answer, how the body is framed, what happens to the connection.
use std::mem::MaybeUninit;

use httparse::Status;

use crate::response::{Conn, Refusal};

/// Longest request head accepted (request line + fields + blank line).
pub const HEAD_MAX: usize = 16 * 1024;
/// Most header fields in a head (hyper's default too).
const MAX_FIELDS: usize = 100;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// GET (`head_only` false) or HEAD (true): `hello\n`.
    Hello { head_only: bool },
    /// POST or PUT: the body back.
    Echo,
}

/// How the body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `Content-Length: n` (none: 0).
    Sized(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A complete, acceptable request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Its length in bytes (where the body starts).
    pub len: usize,
    pub action: Action,
    pub body: Body,
    pub conn: Conn,
    /// `Expect: 100-continue` (HTTP/1.1).
    pub expect_continue: bool,
}

/// Parses the head at the front of `buf` (give it at most [`HEAD_MAX`]
/// bytes): `Ok(None)` while it is incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<Head>, Refusal> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut fields) {
        Ok(Status::Complete(n)) => n,
        Ok(Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
        Err(_) => return Err(Refusal::BadRequest),
    };
    let action = match req.method {
        Some("GET") => Action::Hello { head_only: false },
        Some("HEAD") => Action::Hello { head_only: true },
        Some("POST" | "PUT") => Action::Echo,
        _ => return Err(Refusal::NotImplemented),
    };
    let http10 = req.version == Some(0);
    let (mut length, mut chunked, mut close, mut keep_alive, mut expect_continue) = (None, false, false, false, false);
    for f in req.headers.iter() {
        let value = f.value.trim_ascii();
        if f.name.eq_ignore_ascii_case("content-length") {
            let n = content_length(value)?;
            if length.is_some_and(|m| m != n) {
                return Err(Refusal::BadRequest);
            }
            length = Some(n);
        } else if f.name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || http10 {
                return Err(Refusal::BadRequest);
            }
            if !value.eq_ignore_ascii_case(b"chunked") {
                return Err(Refusal::NotImplemented);
            }
            chunked = true;
        } else if f.name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if f.name.eq_ignore_ascii_case("expect") {
            expect_continue = !http10 && value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    let body = match (chunked, length) {
        // Both: a request smuggling vector; refuse rather than guess.
        (true, Some(_)) => return Err(Refusal::BadRequest),
        (true, None) => Body::Chunked,
        (false, n) => Body::Sized(n.unwrap_or(0)),
    };
    let conn = match (close, http10, keep_alive) {
        (true, _, _) | (false, true, false) => Conn::Close,
        (false, true, true) => Conn::KeepAlive10,
        (false, false, _) => Conn::KeepAlive,
    };
    Ok(Some(Head { len, action, body, conn, expect_continue }))
}

/// A Content-Length value: decimal digits only (saturating: any huge
/// value is over the limit anyway).
fn content_length(v: &[u8]) -> Result<u64, Refusal> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return Err(Refusal::BadRequest);
    }
    Ok(v.iter().fold(0u64, |n, &d| n.saturating_mul(10).saturating_add((d - b'0') as u64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Result<Option<Head>, Refusal> {
        parse(s.as_bytes())
    }

    fn ok(s: &str) -> Head {
        head(s).unwrap().unwrap_or_else(|| panic!("incomplete: {s:?}"))
    }

    #[test]
    fn get_and_head() {
        let h = ok("GET /x HTTP/1.1\r\nHost: a\r\n\r\nrest");
        assert_eq!(h.len, 28);
        assert_eq!(h.action, Action::Hello { head_only: false });
        assert_eq!(h.body, Body::Sized(0));
        assert_eq!(h.conn, Conn::KeepAlive);
        assert_eq!(ok("HEAD / HTTP/1.1\r\n\r\n").action, Action::Hello { head_only: true });
        assert_eq!(ok("POST / HTTP/1.1\r\n\r\n").action, Action::Echo);
        assert_eq!(ok("PUT / HTTP/1.1\r\n\r\n").action, Action::Echo);
    }

    #[test]
    fn partial() {
        for s in
            ["", "GET", "GET / HTTP/1.1", "GET / HTTP/1.1\r\n", "GET / HTTP/1.1\r\nHost: a\r\n", "GET / HTTP/1.1\r\n\r"]
        {
            assert_eq!(head(s), Ok(None), "{s:?}");
        }
    }

    #[test]
    fn framing() {
        assert_eq!(ok("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n").body, Body::Sized(12));
        assert_eq!(ok("POST / HTTP/1.1\r\ncontent-length:  7 \r\n\r\n").body, Body::Sized(7));
        assert_eq!(ok("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n").body, Body::Sized(3));
        assert_eq!(ok("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n").body, Body::Chunked);
        assert_eq!(
            ok("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n").body,
            Body::Sized(u64::MAX)
        );
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(head(bad), Err(Refusal::BadRequest), "{bad:?}");
        }
        assert_eq!(head("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"), Err(Refusal::NotImplemented));
    }

    #[test]
    fn connection() {
        assert_eq!(ok("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").conn, Conn::Close);
        assert_eq!(ok("GET / HTTP/1.1\r\nConnection: Keep-Alive, CLOSE\r\n\r\n").conn, Conn::Close);
        assert_eq!(ok("GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n").conn, Conn::KeepAlive);
        assert_eq!(ok("GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n").conn, Conn::KeepAlive);
        assert_eq!(ok("GET / HTTP/1.0\r\n\r\n").conn, Conn::Close);
        assert_eq!(ok("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").conn, Conn::KeepAlive10);
        assert_eq!(ok("GET / HTTP/1.0\r\nConnection: keep-alive,close\r\n\r\n").conn, Conn::Close);
    }

    #[test]
    fn expect() {
        assert!(ok("POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 5\r\n\r\n").expect_continue);
        assert!(!ok("POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n").expect_continue);
        assert!(!ok("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n").expect_continue);
    }

    #[test]
    fn refusals() {
        assert_eq!(head("DELETE / HTTP/1.1\r\n\r\n"), Err(Refusal::NotImplemented));
        assert_eq!(head("get / HTTP/1.1\r\n\r\n"), Err(Refusal::NotImplemented));
        assert_eq!(head("GET / HTTP/2.0\r\n\r\n"), Err(Refusal::BadRequest));
        assert_eq!(head("GET /\r\n\r\n"), Err(Refusal::BadRequest));
        assert_eq!(head("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"), Err(Refusal::BadRequest));
        assert_eq!(head("\x01GET / HTTP/1.1\r\n\r\n"), Err(Refusal::BadRequest));
        let many: String = (0..MAX_FIELDS + 1).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(head(&format!("GET / HTTP/1.1\r\n{many}\r\n")), Err(Refusal::HeadTooLarge));
    }
}
