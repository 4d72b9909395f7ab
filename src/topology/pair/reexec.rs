//! A pair server's in-place restart (SIGHUP, SIGUSR2): the process
//! executes a binary again under the same pid, keeping its listeners and
//! every connection it holds.
//!
//! The old image writes a [`Handover`] into a memfd: the listeners'
//! descriptor numbers and, per connection, its descriptor number, client
//! address, unconsumed read-ahead, exported session state and EOF flag.
//! It clears close-on-exec on those descriptors and on the memfd, blocks
//! the signals a server handles (their handlers do not survive `execve`;
//! blocked, they wait for the new image instead of killing it), and
//! executes the binary with its own argv and environment plus
//! `HANDOFF_PAIR_STATE=<memfd>`. The new image reads the memfd
//! ([`Handover::from_env`]), takes the descriptors back (close-on-exec
//! again), adopts them instead of binding, and unblocks the signals.
//! When `execve` fails, [`exec`] undoes all of it and returns the error:
//! the old image serves on.
//!
//! The memfd (integers little-endian):
//!
//! ```text
//! "HOFFPAIR"  u32 version (1)  i32 signal  u64 restarts  u64 served  u64 handed
//! i32 tcp listener fd  i32 unix listener fd  u32 n + n i32: --listen listener fds
//! u32 n + n bytes: the start path
//! u32 connections, each:
//!   i32 fd  u32 flags (1: client sent EOF, 2: client address known)
//!   16 bytes client IPv6 address (an IPv4 one mapped: ::ffff:a.b.c.d)  u16 client port
//!   u32 n + n bytes state  u32 n + n bytes read-ahead
//! ```
use std::collections::HashSet;
use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// The environment variable naming the memfd, in the new image only.
pub const STATE_ENV: &str = "HANDOFF_PAIR_STATE";
const MAGIC: &[u8; 8] = b"HOFFPAIR";
const VERSION: u32 = 1;
const FLAG_EOF: u32 = 1;
const FLAG_CLIENT: u32 = 2;
/// Bounds on what a memfd may claim (a corrupt one is refused, not obeyed).
const MAX_BYTES: usize = crate::core::channel::wire::MAX_JOINED;
const MAX_CONNS: usize = 1 << 24;

/// The signals blocked across `execve`: every one a server catches.
pub fn caught_signals() -> Vec<i32> {
    let mut v = vec![libc::SIGHUP, libc::SIGINT, libc::SIGQUIT, libc::SIGTERM, libc::SIGUSR1, libc::SIGUSR2];
    v.extend(crate::core::signals::IGNORED);
    v
}

/// One connection carried across the `execve`, between requests.
#[derive(Debug)]
pub struct Carried {
    /// The connection (close-on-exec cleared only for the `execve`).
    pub fd: OwnedFd,
    /// The client's address, for the request log.
    pub client: Option<SocketAddr>,
    /// Bytes read and not consumed (a partial request, or requests that
    /// arrived during the restart): served first by the new image.
    pub leftover: Vec<u8>,
    /// What the session exported.
    pub state: Vec<u8>,
    /// The client had sent EOF.
    pub eof: bool,
}

/// What one image of a pair server hands the next.
#[derive(Debug)]
pub struct Handover {
    /// The signal that asked for the restart.
    pub signal: i32,
    /// In-place restarts of this process so far, this one included.
    pub restarts: u64,
    /// Requests served and connections handed by earlier images.
    pub served: u64,
    /// See `served`.
    pub handed: u64,
    /// The path the server was first started from (what USR2 executes).
    pub exe: PathBuf,
    /// The TCP listener's descriptor.
    pub tcp: RawFd,
    /// The Unix listener's (`D/P.sock`) descriptor.
    pub unix: RawFd,
    /// The `--listen` listeners' descriptors, in `--listen` order.
    pub extra: Vec<RawFd>,
    /// Every connection held.
    pub conns: Vec<Carried>,
}

/// What a new image takes over: the handover and its two listeners.
#[derive(Debug)]
pub struct Inherited {
    /// Everything else (`tcp` and `unix` in it are these two's numbers).
    pub handover: Handover,
    /// The TCP listener.
    pub tcp: OwnedFd,
    /// The Unix listener, `D/P.sock`.
    pub unix: OwnedFd,
    /// The `--listen` listeners.
    pub extra: Vec<OwnedFd>,
}

/// A handover as written: descriptor numbers, not yet owned.
#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    signal: i32,
    restarts: u64,
    served: u64,
    handed: u64,
    exe: PathBuf,
    tcp: RawFd,
    unix: RawFd,
    extra: Vec<RawFd>,
    conns: Vec<ParsedConn>,
}

/// One connection as written.
#[derive(Debug, PartialEq, Eq)]
struct ParsedConn {
    fd: RawFd,
    client: Option<SocketAddr>,
    state: Vec<u8>,
    leftover: Vec<u8>,
    eof: bool,
}

impl Handover {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.conns.len() * 32);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.signal.to_le_bytes());
        for v in [self.restarts, self.served, self.handed] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.tcp.to_le_bytes());
        b.extend_from_slice(&self.unix.to_le_bytes());
        b.extend_from_slice(&(self.extra.len() as u32).to_le_bytes());
        for fd in &self.extra {
            b.extend_from_slice(&fd.to_le_bytes());
        }
        put_bytes(&mut b, self.exe.as_os_str().as_bytes());
        b.extend_from_slice(&(self.conns.len() as u32).to_le_bytes());
        for c in &self.conns {
            let mut flags = if c.eof { FLAG_EOF } else { 0 };
            if c.client.is_some() {
                flags |= FLAG_CLIENT;
            }
            let (ip, port) = match c.client {
                Some(SocketAddr::V4(a)) => (a.ip().to_ipv6_mapped(), a.port()),
                Some(SocketAddr::V6(a)) => (*a.ip(), a.port()),
                None => (Ipv6Addr::UNSPECIFIED, 0),
            };
            b.extend_from_slice(&c.fd.as_raw_fd().to_le_bytes());
            b.extend_from_slice(&flags.to_le_bytes());
            b.extend_from_slice(&ip.octets());
            b.extend_from_slice(&port.to_le_bytes());
            put_bytes(&mut b, &c.state);
            put_bytes(&mut b, &c.leftover);
        }
        b
    }
}

impl Inherited {
    /// The handover this image was started with, if any: reads the memfd
    /// named by [`STATE_ENV`] and takes every descriptor in it (checked:
    /// open, distinct, sockets; close-on-exec set again). `Ok(None)` for
    /// a fresh start.
    pub fn from_env() -> io::Result<Option<Inherited>> {
        let Some(v) = std::env::var_os(STATE_ENV) else { return Ok(None) };
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, format!("{STATE_ENV}: {why}"));
        let raw: RawFd = v.to_str().and_then(|s| s.parse().ok()).ok_or_else(|| bad(format!("{v:?} is not a fd")))?;
        if raw <= 2 || !is_open(raw) {
            return Err(bad(format!("descriptor {raw} is not open")));
        }
        // SAFETY: `raw` is open (checked) and nobody else in this image
        // owns it: the old image handed it to us alone.
        let mut f = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        set_cloexec(f.as_raw_fd(), true)?;
        let mut bytes = Vec::new();
        f.rewind()?;
        f.read_to_end(&mut bytes)?;
        drop(f);
        let p = parse(&bytes).map_err(|e| bad(e.to_string()))?;
        let mut seen = HashSet::from([raw]);
        let mut take = |fd: RawFd| -> io::Result<OwnedFd> {
            if fd <= 2 || !seen.insert(fd) {
                return Err(bad(format!("descriptor {fd} given twice, or a standard stream")));
            }
            own_socket(fd).map_err(|e| bad(format!("descriptor {fd}: {e}")))
        };
        let (tcp, unix) = (take(p.tcp)?, take(p.unix)?);
        let extra = p.extra.iter().map(|&fd| take(fd)).collect::<io::Result<Vec<_>>>()?;
        let mut conns = Vec::with_capacity(p.conns.len());
        for c in p.conns {
            conns.push(Carried { fd: take(c.fd)?, client: c.client, leftover: c.leftover, state: c.state, eof: c.eof });
        }
        let handover = Handover {
            signal: p.signal,
            restarts: p.restarts,
            served: p.served,
            handed: p.handed,
            exe: p.exe,
            tcp: p.tcp,
            unix: p.unix,
            extra: p.extra,
            conns,
        };
        Ok(Some(Inherited { handover, tcp, unix, extra }))
    }
}

fn put_bytes(b: &mut Vec<u8>, s: &[u8]) {
    b.extend_from_slice(&(s.len() as u32).to_le_bytes());
    b.extend_from_slice(s);
}

/// A bounds-checked reader over the memfd's bytes.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u16(&mut self) -> io::Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn i32(&mut self) -> io::Result<i32> {
        Ok(i32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> io::Result<Vec<u8>> {
        let n = self.u32()? as usize;
        if n > MAX_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a length of {n} bytes")));
        }
        Ok(self.take(n)?.to_vec())
    }
}

fn parse(b: &[u8]) -> io::Result<Parsed> {
    let mut c = Cursor(b);
    if c.take(8)? != MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a pair server's handover"));
    }
    let version = c.u32()?;
    if version != VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("handover v{version}, this binary reads v{VERSION}"),
        ));
    }
    let signal = c.i32()?;
    let (restarts, served, handed) = (c.u64()?, c.u64()?, c.u64()?);
    let (tcp, unix) = (c.i32()?, c.i32()?);
    let n = c.u32()? as usize;
    if n > 64 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{n} --listen listeners")));
    }
    let extra = (0..n).map(|_| c.i32()).collect::<io::Result<Vec<_>>>()?;
    let exe = PathBuf::from(OsString::from_vec(c.bytes()?));
    let n = c.u32()? as usize;
    if n > MAX_CONNS {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{n} connections")));
    }
    let mut conns = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let fd = c.i32()?;
        let flags = c.u32()?;
        let octets: [u8; 16] = c.take(16)?.try_into().expect("16 bytes");
        let port = c.u16()?;
        let ip = Ipv6Addr::from(octets);
        let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
        let client = (flags & FLAG_CLIENT != 0).then(|| SocketAddr::new(ip, port));
        let state = c.bytes()?;
        let leftover = c.bytes()?;
        conns.push(ParsedConn { fd, client, state, leftover, eof: flags & FLAG_EOF != 0 });
    }
    if !c.0.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "trailing bytes"));
    }
    Ok(Parsed { signal, restarts, served, handed, exe, tcp, unix, extra, conns })
}

/// Whether `fd` is an open descriptor.
fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags; any number is allowed.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Takes an inherited socket: open, a socket, close-on-exec set again.
fn own_socket(fd: RawFd) -> io::Result<OwnedFd> {
    if !is_open(fd) {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: stat is plain old data, filled by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open; st is a live out-parameter.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a socket"));
    }
    // SAFETY: fd is open (checked), and the handover names it once
    // (checked by the caller): this OwnedFd is its only owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(fd, true)?;
    Ok(owned)
}

/// Sets or clears close-on-exec.
fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flags = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD changes only the descriptor's flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Blocks (`true`) or unblocks the signals a server catches. A new image
/// unblocks them once its handlers are in place: what arrived during the
/// `execve` is delivered then.
pub fn block_caught_signals(block: bool) -> io::Result<()> {
    // SAFETY: sigset_t is plain old data, initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a live sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in caught_signals() {
            libc::sigaddset(&mut set, s);
        }
    }
    let how = if block { libc::SIG_BLOCK } else { libc::SIG_UNBLOCK };
    // SAFETY: set is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Executes `exe` in this process with our own argv and environment plus
/// the handover. Returns only on failure, having undone everything (the
/// descriptors in `h` are close-on-exec again and still ours, signals
/// unblocked): the caller serves on.
pub fn exec(exe: &Path, h: &Handover) -> io::Error {
    let memfd = match write_memfd(&h.encode()) {
        Ok(f) => f,
        Err(e) => return io::Error::new(e.kind(), format!("memfd: {e}")),
    };
    let (argv, envp) = match exec_args(memfd.as_raw_fd()) {
        Ok(a) => a,
        Err(e) => return e,
    };
    let path = match CString::new(exe.as_os_str().as_bytes()) {
        Ok(p) => p,
        Err(e) => return io::Error::new(io::ErrorKind::InvalidInput, e),
    };
    let fds: Vec<RawFd> = [h.tcp, h.unix, memfd.as_raw_fd()]
        .into_iter()
        .chain(h.extra.iter().copied())
        .chain(h.conns.iter().map(|c| c.fd.as_raw_fd()))
        .collect();
    let undo = |e: io::Error| -> io::Error {
        for &fd in &fds {
            let _ = set_cloexec(fd, true);
        }
        let _ = block_caught_signals(false);
        e
    };
    for &fd in &fds {
        if let Err(e) = set_cloexec(fd, false) {
            return undo(e);
        }
    }
    if let Err(e) = block_caught_signals(true) {
        return undo(e);
    }
    let argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
    let envp_p: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
    // SAFETY: path, argv and envp are NUL-terminated strings that outlive
    // the call, in null-terminated pointer arrays. On success the image is
    // replaced (nothing here runs again); on failure nothing has changed.
    unsafe { libc::execve(path.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr()) };
    let e = io::Error::last_os_error();
    undo(e)
}

/// Our argv, and our environment with `STATE_ENV=memfd` (any older value
/// replaced).
fn exec_args(memfd: RawFd) -> io::Result<(Vec<CString>, Vec<CString>)> {
    let nul = |e| io::Error::new(io::ErrorKind::InvalidInput, e);
    let argv = std::env::args_os().map(|a| CString::new(a.into_vec()).map_err(nul)).collect::<io::Result<Vec<_>>>()?;
    let mut envp = Vec::new();
    for (k, v) in std::env::vars_os() {
        if k == STATE_ENV {
            continue;
        }
        let mut kv = k.into_vec();
        kv.push(b'=');
        kv.extend(v.into_vec());
        envp.push(CString::new(kv).map_err(nul)?);
    }
    envp.push(CString::new(format!("{STATE_ENV}={memfd}")).map_err(nul)?);
    Ok((argv, envp))
}

fn write_memfd(bytes: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: the name is a NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"handoff-pair-state".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let mut f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.write_all(bytes)?;
    Ok(f.into())
}

/// The absolute path this binary was started from, as its argv[0] names
/// it (a symlink is kept, not resolved: USR2 executes whatever the path
/// names then), searched in PATH when it has no slash; else
/// `/proc/self/exe`'s target.
pub fn start_path() -> PathBuf {
    let from_argv = std::env::args_os().next().and_then(|a| {
        let p = PathBuf::from(&a);
        if a.as_bytes().contains(&b'/') {
            return std::path::absolute(&p).ok();
        }
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join(&p))
            .find(|c| is_executable(c))
            .and_then(|c| std::path::absolute(c).ok())
    });
    from_argv.or_else(|| std::env::current_exe().ok()).unwrap_or_else(|| PathBuf::from("/proc/self/exe"))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    fn sample() -> (Handover, Vec<RawFd>) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (a, b) = (OwnedFd::from(a), OwnedFd::from(b));
        let raws = vec![a.as_raw_fd(), b.as_raw_fd()];
        let h = Handover {
            signal: libc::SIGHUP,
            restarts: 3,
            served: 1234,
            handed: 567,
            exe: PathBuf::from("/opt/handoff/bin/handoff"),
            tcp: 7,
            unix: 8,
            extra: vec![9, 10],
            conns: vec![
                Carried {
                    fd: a,
                    client: Some("10.1.2.3:45678".parse().unwrap()),
                    leftover: vec![200, 1, 2],
                    state: b"count=2".to_vec(),
                    eof: false,
                },
                Carried { fd: b, client: None, leftover: Vec::new(), state: Vec::new(), eof: true },
            ],
        };
        (h, raws)
    }

    #[test]
    fn handover_round_trip() {
        let (h, raws) = sample();
        let p = parse(&h.encode()).unwrap();
        assert_eq!((p.signal, p.restarts, p.served, p.handed), (libc::SIGHUP, 3, 1234, 567));
        assert_eq!((p.tcp, p.unix, p.exe.as_path()), (7, 8, Path::new("/opt/handoff/bin/handoff")));
        assert_eq!(p.extra, vec![9, 10]);
        assert_eq!(p.conns.len(), 2);
        let first = ParsedConn {
            fd: raws[0],
            client: Some("10.1.2.3:45678".parse().unwrap()),
            state: b"count=2".to_vec(),
            leftover: vec![200, 1, 2],
            eof: false,
        };
        assert_eq!(p.conns[0], first);
        let second = ParsedConn { fd: raws[1], client: None, state: Vec::new(), leftover: Vec::new(), eof: true };
        assert_eq!(p.conns[1], second);
    }

    #[test]
    fn corrupt_handovers_are_refused() {
        let (h, _) = sample();
        let good = h.encode();
        for cut in [0, 7, 12, 40, good.len() - 1] {
            assert!(parse(&good[..cut]).is_err(), "truncated at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(parse(&long).is_err(), "trailing byte");
        let mut other = good.clone();
        other[8] = 2;
        assert!(parse(&other).unwrap_err().to_string().contains("v2"));
        let mut magic = good;
        magic[0] = b'X';
        assert!(parse(&magic).is_err());
    }

    #[test]
    fn memfd_holds_the_bytes_and_is_close_on_exec() {
        let fd = write_memfd(b"hello").unwrap();
        // SAFETY: F_GETFD on our open descriptor.
        assert_ne!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) } & libc::FD_CLOEXEC, 0);
        let mut f = File::from(fd);
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
    }

    #[test]
    fn own_socket_checks_the_descriptor() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let raw = a.into_raw_fd();
        set_cloexec(raw, false).unwrap();
        let owned = own_socket(raw).unwrap();
        // SAFETY: F_GETFD on our open descriptor.
        assert_ne!(unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_GETFD) } & libc::FD_CLOEXEC, 0);
        let file = File::open("/proc/self/exe").unwrap();
        assert!(own_socket(file.as_raw_fd()).is_err(), "a file is not a socket");
    }

    #[test]
    fn start_path_is_absolute() {
        assert!(start_path().is_absolute());
    }
}
