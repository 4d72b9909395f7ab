//! `Transfer-Encoding: chunked` bodies: scanned as they arrive (resuming
//! where the last scan stopped), decoded once complete.
use httparse::Status;

/// How far a chunked body has been checked, counted from its first byte.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Where the next chunk-size line (or, after the last chunk, the
    /// trailer section) starts.
    at: usize,
    /// Decoded bytes before `at`.
    len: usize,
    /// The last (zero-size) chunk was seen.
    last: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// More bytes needed.
    Partial,
    /// The body takes `end` bytes and decodes to `len`.
    Done { end: usize, len: usize },
    /// Malformed framing.
    Invalid,
    /// Decodes to more than the limit.
    TooLarge,
}

/// Scans `buf` (the body's bytes so far) from `p` on, at most `max`
/// decoded bytes allowed; `p` keeps what was checked.
pub fn scan(buf: &[u8], p: &mut Progress, max: usize) -> Scan {
    while !p.last {
        let rest = &buf[p.at..];
        let (line, size) = match chunk_size(rest) {
            Ok(Some(x)) => x,
            Ok(None) => return Scan::Partial,
            Err(()) => return Scan::Invalid,
        };
        if size == 0 {
            p.at += line;
            p.last = true;
            break;
        }
        if size > (max - p.len) as u64 {
            return Scan::TooLarge;
        }
        let size = size as usize;
        let Some(chunk) = rest.get(line..(line + 2).saturating_add(size)) else { return Scan::Partial };
        if !chunk.ends_with(b"\r\n") {
            return Scan::Invalid;
        }
        p.at += line + size + 2;
        p.len += size;
    }
    // Trailer fields, ignored, then a blank line.
    let mut fields = [httparse::EMPTY_HEADER; 32];
    match httparse::parse_headers(&buf[p.at..], &mut fields) {
        Ok(Status::Complete((n, _))) => Scan::Done { end: p.at + n, len: p.len },
        Ok(Status::Partial) => Scan::Partial,
        Err(_) => Scan::Invalid,
    }
}

/// Appends the data of the complete chunked body `buf` (as [`scan`]
/// found it) to `out`.
pub fn decode(mut buf: &[u8], out: &mut Vec<u8>) {
    while let Ok(Some((line, size))) = chunk_size(buf) {
        let Some(data) = buf.get(line..line.saturating_add(size as usize)) else { return };
        if data.is_empty() {
            return;
        }
        out.extend_from_slice(data);
        let Some(next) = buf.get(line + data.len() + 2..) else { return };
        buf = next;
    }
}

/// A chunk-size line (with any extension): its length and the size.
fn chunk_size(buf: &[u8]) -> Result<Option<(usize, u64)>, ()> {
    // httparse takes an empty size ("\r\n") for 0.
    if buf.first().is_some_and(|b| !b.is_ascii_hexdigit()) {
        return Err(());
    }
    match httparse::parse_chunk_size(buf) {
        Ok(Status::Complete((n, size))) => Ok(Some((n, size))),
        Ok(Status::Partial) => Ok(None),
        Err(_) => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(buf: &[u8], max: usize) -> Scan {
        scan(buf, &mut Progress::default(), max)
    }

    fn decoded(buf: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        decode(buf, &mut v);
        v
    }

    #[test]
    fn complete_bodies() {
        let b = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\n\r\nNEXT";
        assert_eq!(scan_all(b, 100), Scan::Done { end: b.len() - 4, len: 23 });
        assert_eq!(decoded(b), b"Wikipedia in\r\n\r\nchunks.");
        assert_eq!(scan_all(b"0\r\n\r\n", 0), Scan::Done { end: 5, len: 0 });
        let t = b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-B: 2\r\n\r\n";
        assert_eq!(scan_all(t, 3), Scan::Done { end: t.len(), len: 3 });
        assert_eq!(decoded(t), b"abc");
        assert_eq!(scan_all(b"00000a\r\n0123456789\r\n0\r\n\r\n", 10), Scan::Done { end: 25, len: 10 });
    }

    #[test]
    fn every_prefix_is_partial() {
        let b = b"4\r\nWiki\r\n0\r\nT: 1\r\n\r\n";
        for cut in 0..b.len() {
            assert_eq!(scan_all(&b[..cut], 100), Scan::Partial, "cut {cut}");
        }
    }

    #[test]
    fn progress_resumes() {
        let b = b"4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n";
        let mut p = Progress::default();
        assert_eq!(scan(&b[..12], &mut p, 100), Scan::Partial);
        assert_eq!(p, Progress { at: 9, len: 4, last: false });
        assert_eq!(scan(&b[..23], &mut p, 100), Scan::Partial);
        assert_eq!(p, Progress { at: 22, len: 9, last: true });
        assert_eq!(scan(b, &mut p, 100), Scan::Done { end: b.len(), len: 9 });
    }

    #[test]
    fn limits() {
        assert_eq!(scan_all(b"4\r\nWiki\r\n0\r\n\r\n", 4), Scan::Done { end: 14, len: 4 });
        assert_eq!(scan_all(b"4\r\nWiki\r\n0\r\n\r\n", 3), Scan::TooLarge);
        // Refused as soon as the size line says so, before the data.
        assert_eq!(scan_all(b"4\r\nWi", 3), Scan::TooLarge);
        assert_eq!(scan_all(b"2\r\nab\r\n2\r\n", 3), Scan::TooLarge);
        assert_eq!(scan_all(b"ffffffffffffffff\r\n", usize::MAX), Scan::Partial);
    }

    #[test]
    fn invalid() {
        for b in [
            &b"\r\n\r\n"[..],
            b"x\r\n",
            b" 4\r\nWiki\r\n",
            b"4\r\nWikiXY0\r\n\r\n",
            b"4\nWiki\r\n0\r\n\r\n",
            b"4\r\nWiki\r\n0\r\nBad Field: 1\r\n\r\n",
            b"11111111111111111\r\n",
        ] {
            assert_eq!(scan_all(b, usize::MAX), Scan::Invalid, "{:?}", String::from_utf8_lossy(b));
        }
    }
}
