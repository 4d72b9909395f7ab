//! The session driven by hand, as the library drives it: every call sees
//! all the bytes not yet consumed.
use handoff::service::{Cx, Place, Service, Session};

use crate::request::HEAD_MAX;
use crate::service::{Exchange, Http, Opts, FRAMING_SLACK};

const MIB: usize = 1 << 20;

fn http(max_body: usize, place: &Place) -> Http {
    Http::new(&Opts { max_body }, place).expect("Http::new")
}

fn session(max_body: usize) -> Exchange {
    http(max_body, &Place::Test).open(&[])
}

/// What one `serve` call did.
#[derive(Debug)]
struct Served {
    used: usize,
    out: Vec<u8>,
    /// The session closed the connection (in a standalone context `more`
    /// is false only then).
    closed: bool,
}

fn serve(s: &mut Exchange, input: &[u8]) -> Served {
    let mut out = Vec::new();
    let mut cx = Cx::standalone(&mut out);
    let used = s.serve(input, &mut cx);
    let closed = !cx.more();
    assert!(used <= input.len(), "consumed {used} of {} bytes", input.len());
    Served { used, out, closed }
}

/// One response, parsed.
#[derive(Debug, PartialEq)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        let mut it = self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name));
        let v = it.next().map(|(_, v)| v.as_str());
        assert!(it.next().is_none(), "header {name} twice in {self:?}");
        v
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Splits `out` into responses; `head[i]` says response `i` answers a
/// HEAD (it has a Content-Length but no body).
fn responses(mut out: &[u8], head: &[bool]) -> Vec<Resp> {
    let mut v = Vec::new();
    while !out.is_empty() {
        let mut fields = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Response::new(&mut fields);
        let n = match r.parse(out) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("response {}: {other:?} in {:?}", v.len(), String::from_utf8_lossy(out)),
        };
        let headers: Vec<(String, String)> =
            r.headers.iter().map(|h| (h.name.to_string(), String::from_utf8(h.value.to_vec()).unwrap())).collect();
        let status = r.code.unwrap();
        let len: usize = if head.get(v.len()).copied().unwrap_or(false) || status == 100 {
            0
        } else {
            let cl = headers.iter().find(|(n, _)| n.eq_ignore_ascii_case("content-length"));
            cl.unwrap_or_else(|| panic!("no Content-Length: {headers:?}")).1.parse().unwrap()
        };
        assert!(out.len() >= n + len, "response {} cut short", v.len());
        v.push(Resp { status, headers, body: out[n..n + len].to_vec() });
        out = &out[n + len..];
    }
    v
}

fn one(out: &[u8]) -> Resp {
    let mut v = responses(out, &[]);
    assert_eq!(v.len(), 1, "responses: {v:?}");
    v.pop().unwrap()
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").into_bytes()
}

fn post(body: &[u8]) -> Vec<u8> {
    let mut v = format!("POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    v.extend_from_slice(body);
    v
}

/// `body` sent chunked, `chunk` bytes a chunk.
fn post_chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut v = b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for c in body.chunks(chunk) {
        v.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        v.extend_from_slice(c);
        v.extend_from_slice(b"\r\n");
    }
    v.extend_from_slice(b"0\r\n\r\n");
    v
}

fn x_handoff() -> String {
    format!("test pid={}", std::process::id())
}

/// A well-formed 200 with every header the contract names.
#[track_caller]
fn assert_ok(r: &Resp, body: &[u8]) {
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, body, "{r:?}");
    assert_eq!(r.header("Content-Length"), Some(body.len().to_string().as_str()), "{r:?}");
    assert_eq!(r.header("X-Handoff"), Some(x_handoff().as_str()), "{r:?}");
}

#[track_caller]
fn assert_refused(s: &Served, status: u16) {
    let r = one(&s.out);
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.header("Connection"), Some("close"), "{r:?}");
    assert_eq!(r.header("Content-Length"), Some(r.body.len().to_string().as_str()), "{r:?}");
    assert_eq!(r.header("X-Handoff"), Some(x_handoff().as_str()), "{r:?}");
    assert!(s.closed, "the connection stays open after {status}");
}

// ---------------------------------------------------------------- answers

#[test]
fn get_is_hello_and_keeps_the_connection() {
    let mut s = session(MIB);
    let req = get("/any/path?q=1");
    let r = serve(&mut s, &req);
    let want = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Handoff: {}\r\nContent-Length: 6\r\n\r\nhello\n",
        x_handoff()
    );
    assert_eq!(String::from_utf8_lossy(&r.out), want);
    assert_eq!(r.used, req.len());
    assert!(!r.closed);
    // The same again on the same session.
    assert_eq!(serve(&mut s, &req).out, want.as_bytes());
}

#[test]
fn head_has_get_headers_and_no_body() {
    let mut s = session(MIB);
    let r = serve(&mut s, b"HEAD / HTTP/1.1\r\n\r\n");
    let got = responses(&r.out, &[true]);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].status, 200);
    assert_eq!(got[0].header("Content-Length"), Some("6"));
    assert_eq!(got[0].header("Content-Type"), Some("text/plain"));
    assert_eq!(got[0].header("X-Handoff"), Some(x_handoff().as_str()));
    assert!(r.out.ends_with(b"\r\n\r\n"), "a body after HEAD's head: {:?}", String::from_utf8_lossy(&r.out));
    assert!(!r.closed);
}

#[test]
fn post_and_put_echo_a_sized_body() {
    let mut s = session(MIB);
    for body in [&b""[..], b"x", b"hello world\r\n\r\nGET / HTTP/1.1\r\n\r\n", &[0u8, 255, 10, 13][..]] {
        let req = post(body);
        let r = serve(&mut s, &req);
        assert_ok(&one(&r.out), body);
        assert_eq!(r.used, req.len());
    }
    let r = serve(&mut s, b"PUT /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
    assert_ok(&one(&r.out), b"abc");
    // No Content-Length, no Transfer-Encoding: no body.
    let r = serve(&mut s, b"POST / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n");
    let v = responses(&r.out, &[]);
    assert_ok(&v[0], b"");
    assert_ok(&v[1], b"hello\n");
}

#[test]
fn post_echoes_a_chunked_body_with_content_length() {
    let mut s = session(MIB);
    let body: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    for chunk in [1, 7, 100, 4096, 5000] {
        let req = post_chunked(&body, chunk);
        let r = serve(&mut s, &req);
        let resp = one(&r.out);
        assert_ok(&resp, &body);
        assert_eq!(resp.header("Transfer-Encoding"), None);
        assert_eq!(r.used, req.len());
    }
    let req = b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\n";
    let r = serve(&mut s, req);
    assert_ok(&one(&r.out), b"abc");
    assert_eq!(r.used, req.len());
}

#[test]
fn get_with_a_body_skips_it() {
    let mut s = session(MIB);
    let mut req = b"GET / HTTP/1.1\r\nContent-Length: 4\r\n\r\nGET ".to_vec();
    req.extend(get("/2"));
    let r = serve(&mut s, &req);
    let v = responses(&r.out, &[]);
    assert_eq!(v.len(), 2);
    assert_ok(&v[0], b"hello\n");
    assert_ok(&v[1], b"hello\n");
    assert_eq!(r.used, req.len());
}

// ------------------------------------------------------- partial requests

/// Feeds `req` as the library would: for every cut, a fresh session sees
/// the first `cut` bytes (nothing consumed, nothing written but maybe a
/// 100 Continue), then all of them.
#[track_caller]
fn every_cut(req: &[u8], max_body: usize, want: &[u8]) {
    for cut in 0..req.len() {
        let mut s = session(max_body);
        let r = serve(&mut s, &req[..cut]);
        assert_eq!(r.used, 0, "cut {cut}: consumed part of a request");
        assert!(r.out.is_empty(), "cut {cut}: wrote {:?}", String::from_utf8_lossy(&r.out));
        assert!(!r.closed, "cut {cut}: closed");
        let r = serve(&mut s, req);
        assert_eq!(r.used, req.len(), "cut {cut}");
        assert_ok(&one(&r.out), want);
    }
}

/// Feeds `req` one byte more per call, on one session (its remembered
/// progress must stay right).
#[track_caller]
fn byte_by_byte(req: &[u8], max_body: usize, want: &[u8]) {
    let mut s = session(max_body);
    for end in 0..req.len() {
        let r = serve(&mut s, &req[..end]);
        assert_eq!((r.used, r.out.len(), r.closed), (0, 0, false), "after {end} bytes");
    }
    let r = serve(&mut s, req);
    assert_eq!(r.used, req.len());
    assert_ok(&one(&r.out), want);
}

#[test]
fn partial_get_is_left_unconsumed() {
    every_cut(&get("/"), MIB, b"hello\n");
    byte_by_byte(&get("/"), MIB, b"hello\n");
}

#[test]
fn partial_sized_post_is_left_unconsumed() {
    let req = post(b"0123456789");
    every_cut(&req, MIB, b"0123456789");
    byte_by_byte(&req, MIB, b"0123456789");
}

#[test]
fn chunked_post_split_at_every_byte() {
    let mut req = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    req.extend_from_slice(b"4\r\nWiki\r\n5;e=\"x\"\r\npedia\r\n1\r\n\n\r\n00\r\nTrailer: t\r\n\r\n");
    every_cut(&req, MIB, b"Wikipedia\n");
    byte_by_byte(&req, MIB, b"Wikipedia\n");
    let body: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    byte_by_byte(&post_chunked(&body, 64), MIB, &body);
}

#[test]
fn a_partial_request_after_complete_ones_stays() {
    let mut s = session(MIB);
    let mut input = get("/1");
    input.extend(post(b"ab"));
    let done = input.len();
    let next = post(b"0123456789");
    input.extend_from_slice(&next[..next.len() - 3]);
    let r = serve(&mut s, &input);
    assert_eq!(r.used, done);
    let v = responses(&r.out, &[]);
    assert_eq!(v.len(), 2);
    assert_ok(&v[1], b"ab");
    // The library keeps the rest and calls again with more.
    let r = serve(&mut s, &next);
    assert_eq!(r.used, next.len());
    assert_ok(&one(&r.out), b"0123456789");
}

#[test]
fn remembers_the_head_while_the_body_arrives() {
    // White box: once the head is parsed, a shorter input is not parsed
    // again (a 1 MiB body arriving in many reads costs O(n), not O(n^2)).
    let mut s = session(MIB);
    let req = post(&vec![b'x'; 1000]);
    let head = req.len() - 1000;
    assert_eq!(serve(&mut s, &req[..head + 10]).used, 0);
    let mut garbled = req[..head + 500].to_vec();
    garbled[0] = b'\x01';
    let r = serve(&mut s, &garbled);
    assert_eq!((r.used, r.out.len(), r.closed), (0, 0, false), "the head was parsed again");
    let r = serve(&mut s, &req);
    assert_ok(&one(&r.out), &[b'x'; 1000]);
}

#[test]
fn a_large_body_in_many_reads() {
    let body: Vec<u8> = (0..MIB as u32).map(|i| (i % 251) as u8).collect();
    for req in [post(&body), post_chunked(&body, 16 * 1024)] {
        let mut s = session(MIB);
        let mut end = 0;
        while end < req.len() {
            let r = serve(&mut s, &req[..end]);
            assert_eq!((r.used, r.out.len()), (0, 0));
            end += 1500;
        }
        let r = serve(&mut s, &req);
        assert_eq!(r.used, req.len());
        assert_ok(&one(&r.out), &body);
    }
}

// ------------------------------------------------------------- pipelining

#[test]
fn pipelined_mix_is_answered_in_order() {
    let mut s = session(MIB);
    let mut input = Vec::new();
    input.extend(get("/1"));
    input.extend_from_slice(b"HEAD /2 HTTP/1.1\r\n\r\n");
    input.extend(post(b"three"));
    input.extend(post_chunked(b"four, chunked", 5));
    input.extend_from_slice(b"PUT /5 HTTP/1.1\r\nContent-Length: 4\r\n\r\nfive");
    input.extend(get("/6"));
    input.extend_from_slice(b"GET /7 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let r = serve(&mut s, &input);
    assert_eq!(r.used, input.len());
    assert!(!r.closed);
    let v = responses(&r.out, &[false, true]);
    let bodies: Vec<String> = v.iter().map(Resp::text).collect();
    assert_eq!(bodies, ["hello\n", "", "three", "four, chunked", "five", "hello\n", "hello\n"]);
    assert!(v.iter().all(|r| r.status == 200));
    assert_eq!(v[6].header("Connection"), Some("keep-alive"));
}

#[test]
fn pipelined_requests_split_anywhere() {
    let mut input = get("/1");
    input.extend(post_chunked(b"abcdef", 4));
    input.extend(post(b"xyz"));
    for cut in 0..input.len() {
        let mut s = session(MIB);
        let first = serve(&mut s, &input[..cut]);
        let second = serve(&mut s, &input[first.used..]);
        assert_eq!(first.used + second.used, input.len(), "cut {cut}");
        let mut out = first.out;
        out.extend(second.out);
        let bodies: Vec<String> = responses(&out, &[]).iter().map(Resp::text).collect();
        assert_eq!(bodies, ["hello\n", "abcdef", "xyz"], "cut {cut}");
    }
}

// ------------------------------------------------------------- connection

#[test]
fn connection_close_closes_after_the_response() {
    let mut s = session(MIB);
    let mut input = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec();
    let first = input.len();
    input.extend(get("/never"));
    let r = serve(&mut s, &input);
    assert_eq!(r.used, first, "a request after Connection: close was consumed");
    let resp = one(&r.out);
    assert_ok(&resp, b"hello\n");
    assert_eq!(resp.header("Connection"), Some("close"));
    assert!(r.closed);

    let mut s = session(MIB);
    let r = serve(&mut s, b"POST / HTTP/1.1\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi");
    let resp = one(&r.out);
    assert_ok(&resp, b"hi");
    assert_eq!(resp.header("Connection"), Some("close"));
    assert!(r.closed);
}

#[test]
fn http10_closes_unless_keep_alive() {
    let mut s = session(MIB);
    let r = serve(&mut s, b"GET / HTTP/1.0\r\n\r\n");
    let resp = one(&r.out);
    assert_ok(&resp, b"hello\n");
    assert_eq!(resp.header("Connection"), Some("close"));
    assert!(r.closed);

    let mut s = session(MIB);
    let req = b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n";
    for _ in 0..3 {
        let r = serve(&mut s, req);
        let resp = one(&r.out);
        assert_ok(&resp, b"hello\n");
        assert_eq!(resp.header("Connection"), Some("keep-alive"));
        assert!(!r.closed);
    }
    let r = serve(&mut s, b"POST / HTTP/1.0\r\nContent-Length: 1\r\n\r\nz");
    assert_ok(&one(&r.out), b"z");
    assert!(r.closed);
}

#[test]
fn http11_keep_alive_has_no_connection_header() {
    let mut s = session(MIB);
    for req in [get("/"), post(b"b"), b"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n".to_vec()] {
        let r = serve(&mut s, &req);
        assert_eq!(one(&r.out).header("Connection"), None);
        assert!(!r.closed);
    }
}

#[test]
fn expect_100_continue_is_answered_once() {
    let mut s = session(MIB);
    let req = b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello";
    let head = req.len() - 5;
    let r = serve(&mut s, &req[..head]);
    assert_eq!(r.out, b"HTTP/1.1 100 Continue\r\n\r\n");
    assert_eq!(r.used, 0);
    assert!(serve(&mut s, &req[..head + 2]).out.is_empty(), "a second 100 Continue");
    let r = serve(&mut s, req);
    assert_ok(&one(&r.out), b"hello");
    // The whole request at once: no interim response.
    let r = serve(&mut s, req);
    assert_ok(&one(&r.out), b"hello");
    // Too large: 413 straight away.
    let mut s = session(4);
    assert_refused(&serve(&mut s, &req[..head]), 413);
}

// ---------------------------------------------------------------- refusals

#[test]
fn malformed_requests_get_400_and_close() {
    for bad in [
        &b"GET / HTTP/1.1 extra\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET / FTP/1.0\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"GET / HTTP/1.1\r\nNo-Colon\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: v\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
    ] {
        let mut s = session(MIB);
        let r = serve(&mut s, bad);
        assert_refused(&r, 400);
        assert_eq!(r.used, bad.len());
    }
}

#[test]
fn a_bad_request_after_good_ones() {
    let mut s = session(MIB);
    let mut input = get("/");
    input.extend_from_slice(b"GET / HTTP/1.1\r\n:\r\n\r\n");
    input.extend(get("/never"));
    let r = serve(&mut s, &input);
    let v = responses(&r.out, &[]);
    assert_eq!(v.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 400]);
    assert!(r.closed);
}

#[test]
fn other_methods_get_501() {
    for m in ["DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE", "BREW", "get"] {
        let mut s = session(MIB);
        let r = serve(&mut s, format!("{m} / HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        assert_refused(&r, 501);
    }
    let mut s = session(MIB);
    assert_refused(&serve(&mut s, b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"), 501);
}

#[test]
fn body_over_max_body_gets_413() {
    let max = 100;
    let at = vec![b'a'; max];
    let over = vec![b'a'; max + 1];
    let mut s = session(max);
    assert_ok(&one(&serve(&mut s, &post(&at)).out), &at);
    assert_ok(&one(&serve(&mut s, &post_chunked(&at, 30)).out), &at);
    // Refused on the head alone, before the body comes.
    let req = post(&over);
    let r = serve(&mut s, &req[..req.len() - over.len()]);
    assert_refused(&r, 413);
    let mut s = session(max);
    assert_refused(&serve(&mut s, &post(&over)), 413);
    let mut s = session(max);
    let req = post_chunked(&over, 30);
    assert_refused(&serve(&mut s, &req), 413);
    // ... and as soon as the chunk size says so.
    let mut s = session(max);
    let cut = req.len() - 14;
    assert!(req[..cut].ends_with(b"b\r\naaaa"), "{:?}", String::from_utf8_lossy(&req[..cut]));
    assert_refused(&serve(&mut s, &req[..cut]), 413);
}

#[test]
fn the_default_max_body_is_one_mib() {
    let at = vec![b'x'; MIB];
    let mut s = session(Opts::default().max_body);
    assert_ok(&one(&serve(&mut s, &post(&at)).out), &at);
    let over = post(&vec![b'x'; MIB + 1]);
    assert_refused(&serve(&mut s, &over), 413);
}

#[test]
fn chunk_framing_up_to_the_read_limit_gets_413() {
    // A body within --max-body whose framing never ends: at the read
    // limit the session must answer, or the connection would stall.
    let mut h = http(10, &Place::Test);
    let limit = h.read_limit();
    assert_eq!(limit, HEAD_MAX + 10 + FRAMING_SLACK);
    let mut req = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;".to_vec();
    req.resize(limit - 1, b'e');
    let mut s = h.open(&[]);
    let r = serve(&mut s, &req);
    assert_eq!((r.used, r.out.len()), (0, 0));
    req.push(b'e');
    assert_refused(&serve(&mut s, &req), 413);
}

#[test]
fn read_limit_fits_the_largest_acceptable_request() {
    for max in [0, 10, MIB] {
        let mut h = http(max, &Place::Test);
        let mut head = b"POST / HTTP/1.1\r\nContent-Length: ".to_vec();
        head.extend_from_slice(format!("{max}\r\nX: ").as_bytes());
        head.resize(HEAD_MAX - 4, b'p');
        head.extend_from_slice(b"\r\n\r\n");
        let mut req = head;
        req.resize(HEAD_MAX + max, b'b');
        assert!(req.len() < h.read_limit());
        let mut s = h.open(&[]);
        assert_ok(&one(&serve(&mut s, &req).out), &vec![b'b'; max]);
    }
}

#[test]
fn head_over_16k_gets_431() {
    // A head of exactly 16 KiB is fine.
    let mut req = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
    req.resize(HEAD_MAX - 4, b'v');
    req.extend_from_slice(b"\r\n\r\n");
    assert_eq!(req.len(), HEAD_MAX);
    let mut s = session(MIB);
    assert_ok(&one(&serve(&mut s, &req).out), b"hello\n");
    // One byte more, complete or not: 431.
    let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
    big.resize(HEAD_MAX - 3, b'v');
    big.extend_from_slice(b"\r\n\r\n");
    assert_refused(&serve(&mut session(MIB), &big), 431);
    assert_refused(&serve(&mut session(MIB), &big[..HEAD_MAX]), 431);
    // Growing a line at a time, then without a newline.
    let mut s = session(MIB);
    let mut input = b"GET / HTTP/1.1\r\n".to_vec();
    while input.len() < HEAD_MAX - 100 {
        input.extend_from_slice(format!("X-Filler: {}\r\n", "f".repeat(200)).as_bytes());
        assert_eq!(serve(&mut s, &input).used, 0);
    }
    input.resize(HEAD_MAX - 1, b'x');
    let r = serve(&mut s, &input);
    assert_eq!((r.used, r.out.len()), (0, 0));
    input.push(b'x');
    assert_refused(&serve(&mut s, &input), 431);
    // Too many fields.
    let many: String = (0..200).map(|i| format!("F{i}: v\r\n")).collect();
    assert_refused(&serve(&mut session(MIB), format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()), 431);
}

#[test]
fn a_garbage_line_without_newline_is_refused_at_the_limit() {
    let mut s = session(MIB);
    let mut input = b"GET / HTTP/1.1\r\n".to_vec();
    assert_eq!(serve(&mut s, &input).used, 0);
    input.resize(HEAD_MAX, b'\x01');
    let r = serve(&mut s, &input);
    assert_eq!(one(&r.out).status, 400, "an invalid head is 400 even at the limit");
    assert!(r.closed);
}

// ------------------------------------------------------------------ places

#[test]
fn x_handoff_names_the_worker_or_the_pair_server() {
    let worker = Place::Worker { index: 3, pid: 4242, gen: 7, node: None };
    let pair = Place::Pair { port: 8081, pid: 99 };
    for (place, want) in [(worker, "worker=3 pid=4242 gen=7"), (pair, "port=8081 pid=99")] {
        let mut s = http(MIB, &place).open(&[]);
        let mut input = get("/");
        input.extend_from_slice(b"HEAD / HTTP/1.1\r\n\r\n");
        input.extend(post(b"e"));
        input.extend_from_slice(b"DELETE / HTTP/1.1\r\n\r\n");
        let r = serve(&mut s, &input);
        let v = responses(&r.out, &[false, true]);
        assert_eq!(v.len(), 4);
        for resp in &v {
            assert_eq!(resp.header("X-Handoff"), Some(want), "{resp:?}");
        }
        assert_eq!(v[3].status, 501);
    }
}

#[test]
fn a_session_opened_with_moved_state_serves_the_same() {
    let mut h = http(MIB, &Place::Test);
    let mut s = h.open(&[]);
    assert!(s.export().is_empty());
    let mut moved = h.open(&s.export());
    assert_ok(&one(&serve(&mut moved, &get("/")).out), b"hello\n");
    assert_ok(&one(&serve(&mut s, &get("/")).out), b"hello\n");
}

// ----------------------------------------------------------------- options

#[test]
fn options_parse_with_clap_and_travel_as_json() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: Opts,
    }
    assert_eq!(Cli::try_parse_from(["http"]).unwrap().opts, Opts::default());
    assert_eq!(Opts::default().max_body, 1_048_576);
    assert_eq!(Cli::try_parse_from(["http", "--max-body", "10"]).unwrap().opts.max_body, 10);
    assert!(Cli::try_parse_from(["http", "--max-body", "-1"]).is_err());
    let o = Opts { max_body: 77 };
    let json = serde_json::to_string(&o).unwrap();
    assert_eq!(serde_json::from_str::<Opts>(&json).unwrap(), o);
}
