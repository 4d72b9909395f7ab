//! Safe Rust over `csrc/fdpass.c`: one descriptor plus payload bytes per
//! message, descriptors in and out as `OwnedFd`, errors as `io::Error`.
//!
//! The handoff channel ([`crate::core::channel`]) is built on these two
//! calls; use them directly to pass a descriptor over any Unix-domain
//! socket. Moving a connection to another process:
//!
//! ```
//! use std::io::{Read, Write};
//! use std::os::fd::AsFd;
//! use std::os::unix::net::{UnixDatagram, UnixStream};
//! use handoff::core::fdpass;
//!
//! // Any AF_UNIX socket carries descriptors; the project uses
//! // SOCK_SEQPACKET (one call, one message), as datagrams are here.
//! let (a, b) = UnixDatagram::pair()?;
//! let (mut client, conn) = UnixStream::pair()?; // the connection to move
//!
//! fdpass::send(a.as_fd(), Some(conn.as_fd()), b"read-ahead")?;
//! drop(conn); // the message holds its own reference: closing ours is safe
//!
//! let mut buf = [0u8; 64];
//! let r = fdpass::recv(b.as_fd(), &mut buf)?;
//! assert_eq!(&buf[..r.len], b"read-ahead");
//! let mut moved = UnixStream::from(r.fd.expect("the message carried one"));
//! client.write_all(b"hi")?;
//! let mut got = [0u8; 2];
//! moved.read_exact(&mut got)?;
//! assert_eq!(&got, b"hi");
//! # Ok::<(), std::io::Error>(())
//! ```
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::core::sys;

/// Sends `payload` and, if given, a duplicate reference to `fd` in one
/// message. The caller keeps its `fd` (close it once the receiver owns
/// its copy). `WouldBlock` when the socket buffer is full.
pub fn send(sock: BorrowedFd<'_>, fd: Option<BorrowedFd<'_>>, payload: &[u8]) -> io::Result<usize> {
    let raw = fd.map_or(-1, |f| f.as_raw_fd());
    // SAFETY: sock and fd are live descriptors for the duration of the
    // call; payload is a live slice of the given length.
    let n = unsafe { sys::fdpass_send(sock.as_raw_fd(), raw, payload.as_ptr() as *const _, payload.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One received message.
#[derive(Debug)]
pub struct Received {
    /// Payload length in the caller's buffer; 0 with `fd: None` is EOF.
    pub len: usize,
    /// The descriptor the message carried, now installed in this process
    /// (close-on-exec set) and owned by the caller. `None` when the message
    /// carried none, or when the kernel dropped it (see `fd_dropped`).
    pub fd: Option<OwnedFd>,
    /// The message carried a descriptor that the kernel could not install
    /// here (MSG_CTRUNC, e.g. EMFILE): the payload is valid, the sender
    /// still holds the descriptor.
    pub fd_dropped: bool,
}

/// Receives one message into `buf`. Errors: `WouldBlock`; `EMSGSIZE`
/// (payload larger than `buf`); `EBADMSG` (more than one descriptor). A
/// descriptor the kernel dropped (MSG_CTRUNC) is reported by
/// `fd_dropped`, not as an error. On every error no descriptor is leaked.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut fd: libc::c_int = -1;
    // SAFETY: buf is a live writable slice of the given length; fd is a
    // live out-parameter.
    let n = unsafe { sys::fdpass_recv(sock.as_raw_fd(), &mut fd, buf.as_mut_ptr() as *mut _, buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let dropped = fd == sys::FDPASS_DROPPED;
    // SAFETY: a non-negative fd was just installed in our table by recvmsg
    // and belongs to nobody else.
    let fd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(Received { len: n as usize, fd, fd_dropped: dropped })
}

/// The most descriptors one message carries (the kernel's SCM_MAX_FD).
pub const MAX_FDS: usize = sys::FDPASS_MAX_FDS as usize;

/// Sends `payload` and duplicate references to every descriptor of `fds`
/// (at most [`MAX_FDS`]) in one message: they arrive together, in order,
/// or not at all. The caller keeps its descriptors. `WouldBlock` when the
/// socket buffer is full.
pub fn send_many(sock: BorrowedFd<'_>, fds: &[BorrowedFd<'_>], payload: &[u8]) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} descriptors in one message", fds.len())));
    }
    let raw: Vec<libc::c_int> = fds.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: sock and every fd are live for the duration of the call; raw
    // and payload are live slices of the given lengths.
    let n = unsafe {
        sys::fdpass_send_many(sock.as_raw_fd(), raw.as_ptr(), raw.len(), payload.as_ptr() as *const _, payload.len())
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One received message with any number of descriptors.
#[derive(Debug)]
pub struct ReceivedMany {
    /// Payload length in the caller's buffer; 0 with no descriptors is EOF.
    pub len: usize,
    /// The descriptors the message carried, in the order sent, installed
    /// here (close-on-exec set) and owned by the caller.
    pub fds: Vec<OwnedFd>,
    /// The message carried descriptors that the kernel could not all
    /// install (MSG_CTRUNC, e.g. EMFILE): `fds` holds the first ones, those
    /// it installed; the payload is valid; the sender still holds them all.
    pub fds_dropped: bool,
}

/// Receives one message into `buf`, with up to [`MAX_FDS`] descriptors.
/// Errors as [`recv`]. On every error no descriptor is leaked.
pub fn recv_many(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<ReceivedMany> {
    let mut raw = [-1 as libc::c_int; MAX_FDS];
    let mut count: usize = 0;
    let mut dropped: libc::c_int = 0;
    // SAFETY: raw holds MAX_FDS ints; count, dropped are live
    // out-parameters; buf is a live writable slice of the given length.
    let n = unsafe {
        sys::fdpass_recv_many(
            sock.as_raw_fd(),
            raw.as_mut_ptr(),
            MAX_FDS,
            &mut count,
            &mut dropped,
            buf.as_mut_ptr() as *mut _,
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the first `count` entries were just installed in our table by
    // recvmsg and belong to nobody else.
    let fds = raw[..count.min(MAX_FDS)].iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
    Ok(ReceivedMany { len: n as usize, fds, fds_dropped: dropped != 0 })
}

/// The most messages one [`recv_batch`] call reads.
pub const MAX_SLOTS: usize = sys::FDPASS_MAX_SLOTS as usize;

/// The room [`recv_batch`] needs for one message's descriptors (reused
/// from call to call).
#[repr(transparent)]
pub struct RecvSlot(sys::fdpass_slot);

impl RecvSlot {
    /// An empty slot.
    pub fn new() -> RecvSlot {
        RecvSlot(sys::fdpass_slot {
            buf: std::ptr::null_mut(),
            len: 0,
            fds: [-1; MAX_FDS],
            nfds: 0,
            dropped: 0,
            error: 0,
        })
    }
}

impl Default for RecvSlot {
    fn default() -> RecvSlot {
        RecvSlot::new()
    }
}

/// Receives every message waiting on `sock`, up to `slots.len()` (at most
/// [`MAX_SLOTS`]), with one `recvmmsg` call that never blocks: message `i`
/// goes to `buf[i * slot_len..(i + 1) * slot_len]`, and its result (as
/// [`recv_many`] would give it; an error is that one message's) is the
/// `i`-th of the returned list. Fewer results than slots: nothing more was
/// waiting. `WouldBlock` when nothing was. No descriptor is ever leaked.
pub fn recv_batch(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    slot_len: usize,
    slots: &mut [RecvSlot],
) -> io::Result<Vec<io::Result<ReceivedMany>>> {
    if slots.is_empty() || slots.len() > MAX_SLOTS || slot_len.checked_mul(slots.len()).is_none_or(|n| n > buf.len()) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "recv_batch: bad slots"));
    }
    for (i, s) in slots.iter_mut().enumerate() {
        s.0.buf = buf[i * slot_len..].as_mut_ptr() as *mut _;
        s.0.len = slot_len;
        s.0.nfds = 0;
    }
    // SAFETY: RecvSlot is repr(transparent) over fdpass_slot, so the
    // slice is laid out as a C fdpass_slot[slots.len()]; each
    // slot's buf points at slot_len writable bytes of `buf`, which
    // outlives the call.
    let n =
        unsafe { sys::fdpass_recv_batch(sock.as_raw_fd(), slots.as_mut_ptr() as *mut sys::fdpass_slot, slots.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let out = slots[..n as usize]
        .iter()
        .map(|s| {
            let s = &s.0;
            if s.error != 0 {
                return Err(io::Error::from_raw_os_error(s.error));
            }
            // SAFETY: the first `nfds` entries were just installed in our
            // table by recvmmsg and belong to nobody else.
            let fds = s.fds[..s.nfds.min(MAX_FDS)].iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
            Ok(ReceivedMany { len: s.len, fds, fds_dropped: s.dropped != 0 })
        })
        .collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::sock;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn passed_descriptor_works_from_the_other_side() {
        let (a, b) = sock::seqpacket_pair().unwrap();
        let (mut x, y) = UnixStream::pair().unwrap();
        let n = send(a.as_fd(), Some(y.as_fd()), b"hello").unwrap();
        assert_eq!(n, 5);
        drop(y);
        let mut buf = [0u8; 16];
        let r = recv(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..r.len], b"hello");
        let mut y2 = UnixStream::from(r.fd.expect("descriptor received"));
        x.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        y2.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        // close-on-exec is set on the received copy
        // SAFETY: fcntl on a live descriptor.
        let flags = unsafe { libc::fcntl(y2.as_raw_fd(), libc::F_GETFD) };
        assert!(flags & libc::FD_CLOEXEC != 0);
    }

    #[test]
    fn payload_without_descriptor_and_eof() {
        let (a, b) = sock::seqpacket_pair().unwrap();
        send(a.as_fd(), None, b"x").unwrap();
        let mut buf = [0u8; 4];
        let r = recv(b.as_fd(), &mut buf).unwrap();
        assert_eq!((r.len, r.fd.is_none()), (1, true));
        drop(a);
        let r = recv(b.as_fd(), &mut buf).unwrap();
        assert_eq!((r.len, r.fd.is_none()), (0, true));
    }

    #[test]
    fn truncated_payload_is_an_error_and_leaks_nothing() {
        let (a, b) = sock::seqpacket_pair().unwrap();
        let (_x, y) = UnixStream::pair().unwrap();
        send(a.as_fd(), Some(y.as_fd()), &[7u8; 64]).unwrap();
        let mut small = [0u8; 8];
        let e = recv(b.as_fd(), &mut small).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE));
    }

    #[test]
    fn bad_descriptor_is_refused_by_the_sender() {
        let (a, _b) = sock::seqpacket_pair().unwrap();
        // SAFETY: a descriptor number that is surely not open; only borrowed
        // for the duration of the call, never closed.
        let bad = unsafe { BorrowedFd::borrow_raw(1_000_000) };
        let e = send(a.as_fd(), Some(bad), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn a_full_batch_of_descriptors_travels_in_order() {
        let (a, b) = sock::seqpacket_pair().unwrap();
        let pairs: Vec<(UnixStream, UnixStream)> = (0..MAX_FDS).map(|_| UnixStream::pair().unwrap()).collect();
        let fds: Vec<BorrowedFd<'_>> = pairs.iter().map(|p| p.1.as_fd()).collect();
        send_many(a.as_fd(), &fds, b"batch").unwrap();
        let mut buf = [0u8; 16];
        let r = recv_many(b.as_fd(), &mut buf).unwrap();
        assert_eq!((&buf[..r.len], r.fds.len(), r.fds_dropped), (&b"batch"[..], MAX_FDS, false));
        for (i, ((x, _), fd)) in pairs.into_iter().zip(r.fds).enumerate() {
            let mut x = x;
            x.write_all(&[i as u8]).unwrap();
            let mut got = [0u8; 1];
            UnixStream::from(fd).read_exact(&mut got).unwrap();
            assert_eq!(got[0], i as u8, "descriptor {i} arrived in its place");
        }
        let too_many: Vec<BorrowedFd<'_>> = (0..=MAX_FDS).map(|_| a.as_fd()).collect();
        assert_eq!(send_many(a.as_fd(), &too_many, b"x").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        // A single-descriptor message reads the same way.
        let (_x, y) = UnixStream::pair().unwrap();
        send(a.as_fd(), Some(y.as_fd()), b"one").unwrap();
        let r = recv_many(b.as_fd(), &mut buf).unwrap();
        assert_eq!((r.len, r.fds.len()), (3, 1));
    }

    #[test]
    fn would_block_when_empty() {
        let (_a, b) = sock::seqpacket_pair().unwrap();
        let mut buf = [0u8; 4];
        let e = recv(b.as_fd(), &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn recv_batch_reads_every_waiting_message_in_one_call() {
        let (a, b) = sock::seqpacket_pair().unwrap();
        let (mut x1, y1) = UnixStream::pair().unwrap();
        let (_x2, y2) = UnixStream::pair().unwrap();
        send_many(a.as_fd(), &[y1.as_fd(), y2.as_fd()], b"two").unwrap();
        send(a.as_fd(), None, b"none").unwrap();
        send(a.as_fd(), Some(y1.as_fd()), &[9u8; 40]).unwrap(); // too long for its slot
        send(a.as_fd(), None, b"last").unwrap();
        const SLOT: usize = 16;
        let mut buf = vec![0u8; 8 * SLOT];
        let mut slots: Vec<RecvSlot> = (0..8).map(|_| RecvSlot::new()).collect();
        let got = recv_batch(b.as_fd(), &mut buf, SLOT, &mut slots).unwrap();
        assert_eq!(got.len(), 4, "fewer than the slots: all that waited");
        let mut got = got.into_iter();
        let r = got.next().unwrap().unwrap();
        assert_eq!((&buf[..r.len], r.fds.len(), r.fds_dropped), (&b"two"[..], 2, false));
        let mut moved = UnixStream::from(r.fds.into_iter().next().unwrap());
        moved.write_all(b"k").unwrap();
        let mut one = [0u8; 1];
        x1.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"k");
        let r = got.next().unwrap().unwrap();
        assert_eq!((&buf[SLOT..SLOT + r.len], r.fds.len()), (&b"none"[..], 0));
        assert_eq!(got.next().unwrap().unwrap_err().raw_os_error(), Some(libc::EMSGSIZE));
        let r = got.next().unwrap().unwrap();
        assert_eq!(&buf[3 * SLOT..3 * SLOT + r.len], b"last");
        let e = recv_batch(b.as_fd(), &mut buf, SLOT, &mut slots).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(
            recv_batch(b.as_fd(), &mut buf, SLOT * 2, &mut slots).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
