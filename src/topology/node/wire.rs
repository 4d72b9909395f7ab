//! The node protocol, spoken between workers and managers of different
//! nodes (seed 002). Every message is a fixed 16-byte header, then a JSON
//! body (integers little-endian):
//!
//! ```text
//! offset size field
//!      0    4 magic     "HNOD" (a client frame cannot start so: as a u32
//!                       length it is over 1 GiB)
//!      4    1 version   1
//!      5    1 command   see `Cmd`
//!      6    2 reserved  0
//!      8    4 seq       DATA/ACK/ERROR: the relay's sequence number
//!     12    4 body_len  <= MAX_BODY
//! ```
//! A link: worker A1 connects to B's manager and sends CONNECT_REQ
//! `{"node":"A","worker":1,"to":1}`; the manager answers CONNECT_RESP
//! `{"ok":true}` (or `{"ok":false,"reason":..}` and closes), then hands
//! the socket to its worker 1. A1 sends TELL_REQ `{"node":"A","worker":1,"pid":n}`,
//! B1 answers TELL_RESP `{"node":"B","worker":1,"pid":n}`; then DATA
//! `{"msg":X}` gets ACK `{"pid":n,"msg":X}` with the same seq, or ERROR
//! `{"reason":..}`.
//!
//! Heartbeats: an opener that sent `"hb":SECONDS` in TELL_REQ and got
//! `"hb":true` in TELL_RESP sends PING `{"hb":SECONDS}` on the link after
//! each `--heartbeat` interval in which it heard nothing, and the far
//! worker answers PONG `{}` (seq 0). The far worker drops a link silent
//! for 4 of those intervals. Old peers neither send nor announce them (an
//! opener pings only a worker that said `"hb":true`).
use serde_json::Value;

/// The first 4 bytes of every message.
pub const MAGIC: [u8; 4] = *b"HNOD";
/// The protocol version this code speaks; a message of any other is
/// malformed.
pub const VERSION: u8 = 1;
/// Header size in bytes; the body follows.
pub const HEADER_LEN: usize = 16;
/// Largest body in bytes (1 MiB).
pub const MAX_BODY: usize = 1 << 20;

/// A message's command (header byte 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Cmd {
    /// Link opener -> far node's manager, first message:
    /// `{"node","worker","to"}` (who opens, and the far worker wanted).
    ConnectReq = 1,
    /// Manager -> link opener: `{"ok":true}`, then the link is handed to
    /// worker `to`; or `{"ok":false,"reason"}`, then the link closes.
    ConnectResp = 2,
    /// Link opener -> far worker: `{"node","worker","pid"}`.
    TellReq = 3,
    /// Far worker -> link opener: `{"node","worker","pid"}`; the link is
    /// up.
    TellResp = 4,
    /// Link opener -> far worker: one relay, `{"msg":X}`, under its own
    /// sequence number.
    Data = 5,
    /// Far worker -> link opener: the answer to the DATA of the same seq,
    /// `{"pid","msg":X}`.
    Ack = 6,
    /// Far worker -> link opener: the DATA of the same seq failed,
    /// `{"reason"}` (understood by the opener; this implementation's
    /// workers answer every DATA with ACK).
    Error = 7,
    /// Link opener -> far worker, on a link silent for a heartbeat
    /// interval: `{"hb":SECONDS}` (the interval); answered by PONG.
    Ping = 8,
    /// Far worker -> link opener: `{}`, the answer to PING.
    Pong = 9,
}

impl Cmd {
    fn from_u8(b: u8) -> Option<Cmd> {
        Some(match b {
            1 => Cmd::ConnectReq,
            2 => Cmd::ConnectResp,
            3 => Cmd::TellReq,
            4 => Cmd::TellResp,
            5 => Cmd::Data,
            6 => Cmd::Ack,
            7 => Cmd::Error,
            8 => Cmd::Ping,
            9 => Cmd::Pong,
            _ => return None,
        })
    }
}

/// Whether the first bytes of a connection announce a node link.
pub fn is_node(head: &[u8]) -> bool {
    head.len() >= 4 && head[..4] == MAGIC
}

/// What is at the front of a buffer.
#[derive(Debug, PartialEq)]
pub enum Parsed<'a> {
    /// Not a whole message yet (and no sign of a bad one): read more.
    Incomplete,
    /// One message of `len` bytes in all; `body` is its JSON text, which
    /// the receiver parses into what the command carries ([`body`]).
    Message {
        /// The command.
        cmd: Cmd,
        /// DATA, ACK, ERROR: the relay's sequence number; 0 in the
        /// handshake.
        seq: u32,
        /// The body (JSON text), borrowed from the buffer.
        body: &'a [u8],
        /// Header and body: the bytes to consume.
        len: usize,
    },
    /// Malformed: close the link, with this reason in the log.
    Bad(String),
}

/// Parses a message body into `T` (a `Value`, or a borrowed struct that
/// keeps relayed values raw); malformed JSON is a protocol error.
pub fn body<'a, T: serde::Deserialize<'a>>(cmd: Cmd, body: &'a [u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("bad {cmd:?} body: {e}"))
}

/// Parses the message at the front of `buf` (the whole buffered input).
pub fn parse(buf: &[u8]) -> Parsed<'_> {
    if buf.len() < HEADER_LEN {
        if buf.len() >= 4 && !is_node(buf) {
            return Parsed::Bad("bad magic".into());
        }
        return Parsed::Incomplete;
    }
    if !is_node(buf) {
        return Parsed::Bad("bad magic".into());
    }
    if buf[4] != VERSION {
        return Parsed::Bad(format!("node protocol v{}, this side v{VERSION}", buf[4]));
    }
    let Some(cmd) = Cmd::from_u8(buf[5]) else { return Parsed::Bad(format!("unknown command {}", buf[5])) };
    let seq = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes")) as usize;
    if len > MAX_BODY {
        return Parsed::Bad(format!("body of {len} bytes exceeds {MAX_BODY}"));
    }
    if buf.len() < HEADER_LEN + len {
        return Parsed::Incomplete;
    }
    Parsed::Message { cmd, seq, body: &buf[HEADER_LEN..HEADER_LEN + len], len: HEADER_LEN + len }
}

/// Appends one message to `out`.
pub fn encode_into(cmd: Cmd, seq: u32, body: &Value, out: &mut Vec<u8>) {
    encode_raw_into(cmd, seq, serde_json::to_string(body).expect("a Value always serialises").as_bytes(), out)
}

/// Appends one message whose body is the JSON text `body` to `out`.
pub fn encode_raw_into(cmd: Cmd, seq: u32, body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[VERSION, cmd as u8, 0, 0]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

/// One message in a new buffer (see [`encode_into`]).
///
/// ```
/// use handoff::topology::node::wire::{encode, parse, Cmd, Parsed};
/// use serde_json::json;
///
/// let m = encode(Cmd::Data, 7, &json!({"msg": [1, 2]}));
/// assert_eq!(parse(&m[..10]), Parsed::Incomplete);
/// let Parsed::Message { cmd, seq, body, len } = parse(&m) else { panic!("whole") };
/// assert_eq!((cmd, seq, body, len), (Cmd::Data, 7, &br#"{"msg":[1,2]}"#[..], m.len()));
/// ```
pub fn encode(cmd: Cmd, seq: u32, body: &Value) -> Vec<u8> {
    let mut v = Vec::new();
    encode_into(cmd, seq, body, &mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_and_partial() {
        let m = encode(Cmd::Data, 7, &json!({"msg": [1, 2]}));
        assert_eq!(parse(&m[..10]), Parsed::Incomplete);
        assert_eq!(parse(&m[..m.len() - 1]), Parsed::Incomplete);
        let mut two = m.clone();
        two.extend_from_slice(&m);
        match parse(&two) {
            Parsed::Message { cmd, seq, body: b, len } => {
                assert_eq!((cmd, seq, len), (Cmd::Data, 7, m.len()));
                assert_eq!(body::<Value>(cmd, b).unwrap(), json!({"msg": [1, 2]}));
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn heartbeats_parse() {
        for cmd in [Cmd::Ping, Cmd::Pong] {
            let m = encode(cmd, 0, &json!({}));
            assert_eq!(parse(&m), Parsed::Message { cmd, seq: 0, body: b"{}", len: HEADER_LEN + 2 });
        }
        let mut v = encode(Cmd::Ping, 0, &json!({}));
        v[5] = 10;
        assert!(matches!(parse(&v), Parsed::Bad(r) if r.contains("unknown command 10")));
    }

    #[test]
    fn malformed() {
        let m = encode(Cmd::Ack, 1, &json!({}));
        let mut v = m.clone();
        v[4] = 9;
        assert!(matches!(parse(&v), Parsed::Bad(r) if r.contains("v9")));
        let mut v = m.clone();
        v[5] = 99;
        assert!(matches!(parse(&v), Parsed::Bad(_)));
        let mut v = m.clone();
        v[12..16].copy_from_slice(&(MAX_BODY as u32 + 1).to_le_bytes());
        assert!(matches!(parse(&v), Parsed::Bad(_)));
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n"), Parsed::Bad(_)));
        let mut v = m.clone();
        v.truncate(HEADER_LEN);
        v[12..16].copy_from_slice(&2u32.to_le_bytes());
        v.extend_from_slice(b"{x");
        let Parsed::Message { cmd, body: b, .. } = parse(&v) else { panic!("a whole message") };
        assert!(body::<Value>(cmd, b).is_err());
        // A client frame never looks like a node link.
        assert!(!is_node(&1_000_000u32.to_le_bytes()));
    }
}
