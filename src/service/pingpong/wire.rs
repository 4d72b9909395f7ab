//! Pingpong framing: encode requests, parse responses (the load clients use it too).

/// Total size (1 + N) of the request at the front of `buf`, or `None`
/// while it is incomplete. Every byte string is a valid prefix: there is
/// no malformed request, only a truncated one.
pub fn request_len(buf: &[u8]) -> Option<usize> {
    let n = *buf.first()? as usize;
    (buf.len() > n).then_some(n + 1)
}

/// Encodes one request with `payload` (at most 255 bytes).
pub fn request(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() <= 255, "pingpong payload is at most 255 bytes");
    let mut v = Vec::with_capacity(payload.len() + 1);
    v.push(payload.len() as u8);
    v.extend_from_slice(payload);
    v
}

/// The response a server on `port` sends.
pub fn response(port: u16) -> Vec<u8> {
    format!("rsp from port: {port}\n").into_bytes()
}

/// Parses one response line, its `\n` included: exactly
/// `rsp from port: <u16 in canonical decimal>\n`.
pub fn parse_response(line: &[u8]) -> Option<u16> {
    let digits = line.strip_prefix(b"rsp from port: ")?.strip_suffix(b"\n")?;
    if digits.is_empty()
        || digits.len() > 5
        || !digits.iter().all(u8::is_ascii_digit)
        || (digits.len() > 1 && digits[0] == b'0')
    {
        return None;
    }
    u16::try_from(digits.iter().fold(0u32, |a, &d| a * 10 + u32::from(d - b'0'))).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lengths() {
        assert_eq!(request_len(b""), None);
        assert_eq!(request_len(&[0]), Some(1));
        assert_eq!(request_len(&[3, b'a', b'b']), None);
        assert_eq!(request_len(&[3, b'a', b'b', b'c', 9]), Some(4));
        let big = request(&[7u8; 255]);
        assert_eq!(request_len(&big), Some(256));
        assert_eq!(request_len(&big[..255]), None);
    }

    #[test]
    fn responses() {
        assert_eq!(response(7001), b"rsp from port: 7001\n");
        assert_eq!(parse_response(b"rsp from port: 7001\n"), Some(7001));
        assert_eq!(parse_response(b"rsp from port: \n"), None);
        assert_eq!(parse_response(b"rsp from port: 70x1\n"), None);
        assert_eq!(parse_response(b"rsp from port: 99999\n"), None);
        assert_eq!(parse_response(b"rsp from port: 7001"), None);
        assert_eq!(parse_response(b"rsp from port: 07001\n"), None);
    }
}
