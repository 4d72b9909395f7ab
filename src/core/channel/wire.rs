//! The handoff channel's message header (all integers little-endian):
//!
//! ```text
//! offset size field
//!      0    4 magic     "HOFF"
//!      4    2 version   1
//!      6    2 kind      1 = CONN (carries a descriptor), 2 = ACK,
//!                       3 = LISTENER (carries a descriptor), 4 = MORE (a
//!                       body chunk of the next message), 5 = NACK,
//!                       6 = CONNS (a batch of CONNs, one descriptor
//!                       each; see below), >= 16 mode-defined
//!      8    4 flags     CONN: bit 0 = the client already sent EOF,
//!                       bit 1 = a node link (node mode), bit 2 = released
//!                       (worker -> master: tag is the master's id for it),
//!                       bit 3 = the body starts with session state,
//!                       bit 4 = released to rebalance (with bit 2),
//!                       bit 5 = the body starts with the connection's
//!                       history (40 bytes, see [`History`]),
//!                       bit 6 = the client address is IPv6 (see tag),
//!                       bit 7 = node mode, not yet told apart: the
//!                       receiving master reads its first frame (restart)
//!     12    4 body_len  bytes after the header (<= MAX_BODY)
//!     16    8 id        CONN: sender's sequence number; ACK: every CONN up to
//!                       this id is taken; NACK: this CONN is refused (its
//!                       descriptor could not be received), the sender keeps it
//!     24    8 tag       CONN, pair mode: the client's address as the accepting
//!                       server saw it, so that receivers need no getpeername
//!                       (0: unknown): IPv4: address << 16 | port; IPv6
//!                       (flag bit 6): scope id << 16 | port, the 16 address
//!                       bytes end the body; CONN released: the master's id
//!                       for it
//!     32    - body      CONN: bytes already read from the connection (read-ahead);
//!                       with flag bit 3, first a u32 state length and that
//!                       much state the service's session exported; with
//!                       flag bit 5, before all that, the 40-byte history;
//!                       with flag bit 6, last the client's IPv6 address
//!                       (16 bytes, network order)
//! ```
//! One header + body + at most one descriptor = one SOCK_SEQPACKET message,
//! except CONNS: one header + body + `count` descriptors (1 to
//! [`MAX_BATCH`], 253 = the kernel's SCM_MAX_FD) in one SCM_RIGHTS
//! control message. A CONNS header has `id` = the id of its first CONN
//! (the others follow: `id + 1`, ...), `tag` = `count`, `flags` = 0; its
//! body is `count` entries, each a [`BATCH_ENTRY_LEN`]-byte prefix (u32
//! flags, u32 len, u64 tag: what a CONN's header would say) and `len`
//! bytes (what a CONN's body would be), in descriptor order. The receiver
//! handles each entry as the CONN it stands for (one cumulative ACK covers
//! them; a NACK names one id). Only a peer that said it reads CONNS gets
//! them (see [`super::Channel::set_batch`]).
//! A body longer than [`MAX_BODY`] (a large read-ahead) travels as MORE
//! messages carrying its first bytes, then the message itself with the
//! rest; the receiver joins them (at most [`MAX_JOINED`] bytes).
use std::io;

/// The first 4 bytes of every message.
pub const MAGIC: [u8; 4] = *b"HOFF";
/// The channel version this code speaks; [`version()`] is the one in use.
pub const VERSION: u16 = 1;

/// The version this process speaks: [`VERSION`], unless the environment
/// variable `HANDOFF_CHANNEL_VERSION` says otherwise (a test hook that
/// stands in for a newer binary).
pub fn version() -> u16 {
    static V: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("HANDOFF_CHANNEL_VERSION").ok().and_then(|v| v.parse().ok()).unwrap_or(VERSION))
}
/// Header size in bytes; the body starts at this offset.
pub const HEADER_LEN: usize = 32;
/// Largest body; a SEQPACKET message must fit the socket's send buffer.
pub const MAX_BODY: usize = 128 * 1024;
/// Largest body after joining MORE chunks.
pub const MAX_JOINED: usize = 64 << 20;

/// A connection: its descriptor, and its read-ahead as the body. The
/// receiver answers with an ACK (or a NACK).
pub const KIND_CONN: u16 = 1;
/// Every CONN up to the header's `id` is taken (now the receiver's); no
/// body, no descriptor.
pub const KIND_ACK: u16 = 2;
/// A listening socket (descriptor attached); no acknowledgement.
pub const KIND_LISTENER: u16 = 3;
/// The first bytes of the next message's body.
pub const KIND_MORE: u16 = 4;
/// One CONN refused: its descriptor did not arrive (EMFILE).
pub const KIND_NACK: u16 = 5;
/// A batch of CONNs in one message (layout in the module docs); each is
/// acknowledged as the CONN it stands for.
pub const KIND_CONNS: u16 = 6;
/// First kind number left to the modes.
pub const KIND_USER: u16 = 16;

/// CONN: the client had already sent EOF (no more input will come).
pub const FLAG_EOF: u32 = 1;
/// CONN: the connection is a node link (node mode), not a client.
pub const FLAG_NODE_LINK: u32 = 2;
/// CONN worker -> master: a connection the master handed this worker,
/// given back between requests (restart); `tag` is the master's id for it.
pub const FLAG_RELEASED: u32 = 4;
/// CONN: the body is `u32 n, n bytes of session state, read-ahead`.
pub const FLAG_STATE: u32 = 8;
/// CONN worker -> master, with [`FLAG_RELEASED`]: given back to rebalance
/// the load (the master hands it to a colder worker), not for a restart;
/// master -> worker: such a connection (it stays there a while).
pub const FLAG_REBALANCED: u32 = 16;
/// CONN, pair mode: the client's address is IPv6: `tag` holds its scope
/// id << 16 | its port, and the body ends with its 16 address bytes
/// (an IPv4 client needs no flag: `tag` holds it whole). See
/// [`super::Msg::with_client`].
pub const FLAG_CLIENT_V6: u32 = 64;

/// CONN master -> master, node mode: a connection accepted but not yet
/// told apart (client or node link) when a restart began; the next
/// generation's manager reads its first frame (the body is what was read).
pub const FLAG_SNIFF: u32 = 128;

/// CONN: the body starts with the connection's [`History`]
/// ([`HISTORY_LEN`] bytes), before any state.
pub const FLAG_HISTORY: u32 = 32;

/// Bytes of a [`History`] on the wire.
pub const HISTORY_LEN: usize = 40;

/// What a connection has been through, carried with it when it moves
/// between workers (restart, rebalancing) so that the worker that finally
/// closes it can write one access-log line for its whole life. On the
/// wire (little-endian): u32 moves, u32 zero, u64 since, u64 requests,
/// u64 bytes_in, u64 bytes_out.
///
/// ```
/// use handoff::core::channel::wire::{join_history, split_history, History, FLAG_HISTORY};
///
/// let h = History { moves: 2, since_us: 1_700_000_000_000_000, requests: 5, bytes_in: 90, bytes_out: 120 };
/// let body = join_history(&h, b"read-ahead".to_vec());
/// assert_eq!(split_history(FLAG_HISTORY, body), (Some(h), b"read-ahead".to_vec()));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct History {
    /// Times it moved to another process (restart or rebalancing).
    pub moves: u32,
    /// When it was first served, in microseconds since the Unix epoch.
    pub since_us: u64,
    /// Requests answered so far.
    pub requests: u64,
    /// Bytes received from the client so far (consumed by requests).
    pub bytes_in: u64,
    /// Bytes sent to the client so far.
    pub bytes_out: u64,
}

/// A CONN body with `h` in front of `rest` (state and read-ahead); send it
/// with [`FLAG_HISTORY`].
pub fn join_history(h: &History, rest: Vec<u8>) -> Vec<u8> {
    let mut body = Vec::with_capacity(HISTORY_LEN + rest.len());
    body.extend_from_slice(&h.moves.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    for v in [h.since_us, h.requests, h.bytes_in, h.bytes_out] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.extend_from_slice(&rest);
    body
}

/// Takes the [`History`] off the front of a CONN body when `flags` say
/// it is there ([`FLAG_HISTORY`]); returns it and the rest of the body. A
/// body too short for it is all rest, with no history.
pub fn split_history(flags: u32, mut body: Vec<u8>) -> (Option<History>, Vec<u8>) {
    if flags & FLAG_HISTORY == 0 || body.len() < HISTORY_LEN {
        return (None, body);
    }
    let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
    let h = History {
        moves: u32::from_le_bytes(body[0..4].try_into().expect("4 bytes")),
        since_us: u64_at(8),
        requests: u64_at(16),
        bytes_in: u64_at(24),
        bytes_out: u64_at(32),
    };
    body.drain(..HISTORY_LEN);
    (Some(h), body)
}

/// A CONN body without its history, if any: the state and read-ahead.
pub fn past_history(flags: u32, body: &[u8]) -> &[u8] {
    if flags & FLAG_HISTORY != 0 && body.len() >= HISTORY_LEN {
        &body[HISTORY_LEN..]
    } else {
        body
    }
}

/// A CONN body carrying `state` (if any) before the read-ahead.
pub fn join_state(state: &[u8], leftover: Vec<u8>) -> Vec<u8> {
    if state.is_empty() {
        return leftover;
    }
    let mut body = Vec::with_capacity(4 + state.len() + leftover.len());
    body.extend_from_slice(&(state.len() as u32).to_le_bytes());
    body.extend_from_slice(state);
    body.extend_from_slice(&leftover);
    body
}

/// Splits a [`FLAG_STATE`] CONN body into (state, read-ahead). A body too
/// short for its state length is all read-ahead with no state.
pub fn split_state(mut body: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    let n = match body.get(..4) {
        Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
        None => return (Vec::new(), body),
    };
    if body.len() < 4 + n {
        return (Vec::new(), body);
    }
    let rest = body.split_off(4 + n);
    body.drain(..4);
    (body, rest)
}

/// Whether messages of `kind` must carry a descriptor (others must not;
/// CONNS carries one per entry).
pub fn carries_fd(kind: u16) -> bool {
    kind == KIND_CONN || kind == KIND_LISTENER || kind == KIND_CONNS
}

/// Most CONNs in one CONNS message: the kernel's SCM_MAX_FD.
pub const MAX_BATCH: usize = 253;
/// Bytes before each entry's body in a CONNS body: u32 flags, u32 len,
/// u64 tag.
pub const BATCH_ENTRY_LEN: usize = 16;
/// Largest entry body the sender puts in a batch; a CONN with more
/// read-ahead travels alone.
pub const BATCH_ENTRY_MAX: usize = 16 * 1024;

/// Appends one CONNS entry (a CONN's flags, tag and body) to `out`, the
/// body of a CONNS message being built.
///
/// ```
/// use handoff::core::channel::wire::{decode_batch, encode_entry, FLAG_EOF};
///
/// let mut body = Vec::new();
/// encode_entry(FLAG_EOF, 7, b"GET /", &mut body);
/// encode_entry(0, 0, b"", &mut body);
/// let e = decode_batch(2, &body)?;
/// assert_eq!((e[0].flags, e[0].tag, &body[e[0].body.clone()]), (FLAG_EOF, 7, &b"GET /"[..]));
/// assert!(e[1].body.is_empty());
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn encode_entry(flags: u32, tag: u64, body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(body);
}

/// One entry of a CONNS body, decoded: its body is a range of that body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEntry {
    /// The CONN's `FLAG_*` bits.
    pub flags: u32,
    /// The CONN's tag.
    pub tag: u64,
    /// Where the CONN's body lies in the CONNS body.
    pub body: std::ops::Range<usize>,
}

/// Splits a CONNS body into its `count` entries ([`encode_entry`]).
/// Refuses a count of 0 or over [`MAX_BATCH`], an entry running past the
/// end, and bytes left over.
pub fn decode_batch(count: u64, body: &[u8]) -> io::Result<Vec<BatchEntry>> {
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    if count == 0 || count > MAX_BATCH as u64 {
        return Err(bad(format!("a batch of {count} connections")));
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut at = 0;
    for k in 0..count {
        let Some(p) = body.get(at..at + BATCH_ENTRY_LEN) else {
            return Err(bad(format!("batch entry {k} of {count} cut short")));
        };
        let flags = u32::from_le_bytes(p[0..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(p[4..8].try_into().expect("4 bytes")) as usize;
        let tag = u64::from_le_bytes(p[8..16].try_into().expect("8 bytes"));
        let start = at + BATCH_ENTRY_LEN;
        if body.len() - start < len {
            return Err(bad(format!("batch entry {k} of {count} runs past the message")));
        }
        out.push(BatchEntry { flags, tag, body: start..start + len });
        at = start + len;
    }
    if at != body.len() {
        return Err(bad(format!("{} bytes after the last batch entry", body.len() - at)));
    }
    Ok(out)
}

/// The [`HEADER_LEN`]-byte header of every channel message, decoded (the
/// layout is in the module docs). [`super::Channel`] writes and reads it;
/// so does the blocking control-socket client (`handoff status`,
/// `handoff restart`, a new master taking over).
///
/// ```
/// use handoff::core::channel::wire::{version, Header, HEADER_LEN, KIND_USER};
///
/// let h = Header { version: version(), kind: KIND_USER, flags: 0, body_len: 2, id: 0, tag: 0 };
/// let mut msg = Vec::new();
/// h.encode(&mut msg);
/// msg.extend_from_slice(b"{}");
/// assert_eq!(msg.len(), HEADER_LEN + 2);
/// assert_eq!(Header::decode(&msg)?, h);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The sender's channel version ([`version()`]); the receiver refuses
    /// any other than its own.
    pub version: u16,
    /// `KIND_*`: what the message is.
    pub kind: u16,
    /// CONN: `FLAG_*` bits; 0 otherwise.
    pub flags: u32,
    /// Body bytes after the header, at most [`MAX_BODY`].
    pub body_len: u32,
    /// CONN: the sender's sequence number; ACK: every CONN up to this one
    /// is taken; NACK: the one CONN refused; 0 otherwise.
    pub id: u64,
    /// CONN: the client's address in pair mode, or the master's id for a
    /// released connection ([`FLAG_RELEASED`]); 0 otherwise.
    pub tag: u64,
}

impl Header {
    /// Appends the header's [`HEADER_LEN`] bytes to `out`; the caller
    /// appends the `body_len` body bytes after them. Nothing is checked.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.kind.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.body_len.to_le_bytes());
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.tag.to_le_bytes());
    }

    /// Parses and validates a whole message (header + body).
    pub fn decode(msg: &[u8]) -> io::Result<Header> {
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        if msg.len() < HEADER_LEN {
            return Err(bad(format!("short message: {} bytes", msg.len())));
        }
        if msg[0..4] != MAGIC {
            return Err(bad("bad magic".into()));
        }
        let u16_at = |i: usize| u16::from_le_bytes([msg[i], msg[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(msg[i..i + 4].try_into().expect("4 bytes"));
        let h = Header {
            version: u16_at(4),
            kind: u16_at(6),
            flags: u32_at(8),
            body_len: u32_at(12),
            id: u64::from_le_bytes(msg[16..24].try_into().expect("8 bytes")),
            tag: u64::from_le_bytes(msg[24..32].try_into().expect("8 bytes")),
        };
        if h.version != version() {
            return Err(bad(format!("peer speaks handoff channel v{}, this side v{}", h.version, version())));
        }
        if h.body_len as usize != msg.len() - HEADER_LEN || h.body_len as usize > MAX_BODY {
            return Err(bad(format!("body length {} does not match message ({} bytes)", h.body_len, msg.len())));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_travels_before_the_read_ahead() {
        assert_eq!(join_state(b"", b"abc".to_vec()), b"abc");
        let body = join_state(b"st", b"abc".to_vec());
        assert_eq!(split_state(body), (b"st".to_vec(), b"abc".to_vec()));
        assert_eq!(split_state(join_state(b"st", Vec::new())), (b"st".to_vec(), Vec::new()));
        // Garbage: no state, everything read-ahead.
        assert_eq!(split_state(vec![9, 0, 0, 0, 1]), (Vec::new(), vec![9, 0, 0, 0, 1]));
        assert_eq!(split_state(vec![1]), (Vec::new(), vec![1]));
    }

    fn msg(h: Header, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        h.encode(&mut v);
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn round_trip() {
        let h = Header { version: VERSION, kind: KIND_CONN, flags: FLAG_EOF, body_len: 3, id: 42, tag: 7 << 16 | 9 };
        let m = msg(h, b"abc");
        assert_eq!(m.len(), HEADER_LEN + 3);
        assert_eq!(Header::decode(&m).unwrap(), h);
    }

    #[test]
    fn batch_round_trip_of_every_size() {
        // Read-ahead of different sizes, 0 included, up to a full batch.
        let bodies: Vec<Vec<u8>> = (0..MAX_BATCH).map(|i| vec![i as u8; (i * 37) % 300]).collect();
        let mut body = Vec::new();
        for (i, b) in bodies.iter().enumerate() {
            encode_entry(i as u32 & 0x7f, (i as u64) << 16 | 80, b, &mut body);
        }
        let h = Header {
            version: VERSION,
            kind: KIND_CONNS,
            flags: 0,
            body_len: body.len() as u32,
            id: 1000,
            tag: MAX_BATCH as u64,
        };
        let m = msg(h, &body);
        let got = Header::decode(&m).unwrap();
        assert_eq!(got, h);
        let e = decode_batch(got.tag, &m[HEADER_LEN..]).unwrap();
        assert_eq!(e.len(), MAX_BATCH);
        for (i, (e, b)) in e.iter().zip(&bodies).enumerate() {
            assert_eq!((e.flags, e.tag), (i as u32 & 0x7f, (i as u64) << 16 | 80));
            assert_eq!(&m[HEADER_LEN..][e.body.clone()], &b[..], "entry {i}");
        }
        assert!(carries_fd(KIND_CONNS));
    }

    #[test]
    fn bad_batches_are_refused() {
        let mut body = Vec::new();
        encode_entry(0, 0, b"abc", &mut body);
        assert!(decode_batch(1, &body).is_ok());
        assert!(decode_batch(0, &[]).is_err());
        assert!(decode_batch(MAX_BATCH as u64 + 1, &body).is_err());
        assert!(decode_batch(2, &body).is_err(), "fewer entries than the count");
        assert!(decode_batch(1, &body[..body.len() - 1]).is_err(), "an entry cut short");
        let mut extra = body.clone();
        extra.push(0);
        assert!(decode_batch(1, &extra).is_err(), "bytes left over");
        let mut huge = body.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_batch(1, &huge).is_err(), "a length past the end");
    }

    #[test]
    fn rejects_bad_input() {
        let h = Header { version: VERSION, kind: KIND_ACK, flags: 0, body_len: 0, id: 1, tag: 0 };
        let good = msg(h, b"");
        assert!(Header::decode(&good[..10]).is_err());
        let mut m = good.clone();
        m[0] = b'X';
        assert!(Header::decode(&m).is_err());
        let e = Header::decode(&msg(Header { version: 2, ..h }, b"")).unwrap_err();
        assert!(e.to_string().contains("v2"), "{e}");
        assert!(Header::decode(&msg(Header { body_len: 5, ..h }, b"ab")).is_err());
    }
}
