//! Every raw socket syscall the project makes, each checked by `cvt`.
//! Descriptors come back as `OwnedFd` at once, so every failure path
//! closes them.
use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// -1 becomes `errno` with the syscall's name in front.
fn cvt(rc: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(rc)
    }
}

fn socket(domain: libc::c_int, ty: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a fresh descriptor we own.
    let fd = cvt(unsafe { libc::socket(domain, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) }, "socket")?;
    // SAFETY: fd was just returned by socket() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, opt: libc::c_int, val: libc::c_int, what: &str) -> io::Result<()> {
    // SAFETY: val lives across the call; the length matches its type.
    cvt(
        unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                &val as *const _ as *const libc::c_void,
                mem::size_of::<libc::c_int>() as _,
            )
        },
        what,
    )
    .map(drop)
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    sa.sin_family = libc::AF_INET as _;
    sa.sin_port = addr.port().to_be();
    sa.sin_addr.s_addr = u32::from(*addr.ip()).to_be();
    sa
}

fn sockaddr_un(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_un = unsafe { mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as _;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= sa.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("socket path too long: {}", path.display())));
    }
    for (d, s) in sa.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((sa, len as libc::socklen_t))
}

/// Resolves `host:port` to an IPv4 address (the servers bind IPv4).
pub fn resolve_v4(host: &str, port: u16) -> io::Result<SocketAddrV4> {
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(SocketAddrV4::new(ip, port));
    }
    (host, port)
        .to_socket_addrs()?
        .find_map(|a| match a {
            SocketAddr::V4(v4) => Some(v4),
            _ => None,
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no IPv4 address for {host}")))
}

/// A non-blocking TCP listener on `addr` (SO_REUSEADDR, backlog 4096).
pub fn tcp_listen(addr: SocketAddrV4) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_INET, libc::SOCK_STREAM)?;
    setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "setsockopt SO_REUSEADDR")?;
    let sa = sockaddr_in(addr);
    // SAFETY: sa is a valid sockaddr_in of the given length.
    cvt(
        unsafe { libc::bind(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, mem::size_of_val(&sa) as _) },
        &format!("bind {addr}"),
    )?;
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 4096) }, "listen")?;
    Ok(fd)
}

/// A non-blocking TCP connect to `addr`; usually returns before the
/// handshake ends (EINPROGRESS is not an error).
pub fn tcp_connect(addr: SocketAddrV4) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_INET, libc::SOCK_STREAM)?;
    let sa = sockaddr_in(addr);
    // SAFETY: sa is a valid sockaddr_in of the given length.
    let rc =
        unsafe { libc::connect(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, mem::size_of_val(&sa) as _) };
    if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
        cvt(rc, &format!("connect {addr}"))?;
    }
    set_nodelay(fd.as_raw_fd())?;
    Ok(fd)
}

pub fn set_nodelay(fd: RawFd) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1, "setsockopt TCP_NODELAY")
}

/// The local address a socket is bound to (for `--port 0`).
pub fn local_addr(fd: RawFd) -> io::Result<SocketAddrV4> {
    // SAFETY: zeroed sockaddr_in is valid; len matches it.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    let mut len = mem::size_of_val(&sa) as libc::socklen_t;
    // SAFETY: sa/len are live out-parameters of the right size.
    cvt(unsafe { libc::getsockname(fd, &mut sa as *mut _ as *mut libc::sockaddr, &mut len) }, "getsockname")?;
    Ok(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)), u16::from_be(sa.sin_port)))
}

/// The remote address of a TCP socket, if it has one.
pub fn peer_addr(fd: RawFd) -> Option<SocketAddrV4> {
    // SAFETY: zeroed sockaddr_in is valid; len matches it.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    let mut len = mem::size_of_val(&sa) as libc::socklen_t;
    // SAFETY: sa/len are live out-parameters of the right size.
    let rc = unsafe { libc::getpeername(fd, &mut sa as *mut _ as *mut libc::sockaddr, &mut len) };
    (rc == 0 && sa.sin_family == libc::AF_INET as libc::sa_family_t)
        .then(|| SocketAddrV4::new(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)), u16::from_be(sa.sin_port)))
}

/// A non-blocking SOCK_SEQPACKET listener bound to `path`.
pub fn unix_listen(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_UNIX, libc::SOCK_SEQPACKET)?;
    let (sa, len) = sockaddr_un(path)?;
    // SAFETY: sa is a valid sockaddr_un of length len.
    cvt(
        unsafe { libc::bind(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, len) },
        &format!("bind {}", path.display()),
    )?;
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 128) }, "listen")?;
    Ok(fd)
}

/// A non-blocking SOCK_SEQPACKET connection to the listener at `path`.
pub fn unix_connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_UNIX, libc::SOCK_SEQPACKET)?;
    let (sa, len) = sockaddr_un(path)?;
    // SAFETY: sa is a valid sockaddr_un of length len.
    cvt(
        unsafe { libc::connect(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, len) },
        &format!("connect {}", path.display()),
    )?;
    Ok(fd)
}

/// A connected pair of SOCK_SEQPACKET sockets (master <-> worker).
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a live array of two ints.
    cvt(
        unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        },
        "socketpair",
    )?;
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Accepts one connection (non-blocking, close-on-exec). `Ok(None)` when
/// none is waiting.
pub fn accept(fd: RawFd) -> io::Result<Option<OwnedFd>> {
    // SAFETY: null address pointers are allowed by accept4.
    let rc = unsafe {
        libc::accept4(fd, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ECONNABORTED) => Ok(None),
            _ => Err(io::Error::new(e.kind(), format!("accept4: {e}"))),
        };
    }
    // SAFETY: rc is a fresh descriptor from accept4.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(rc) }))
}

/// An integer socket option of `fd` (`SOL_SOCKET` level), or `None`.
fn sockopt_int(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v/len are live out-parameters of the right size.
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, opt, &mut v as *mut libc::c_int as *mut libc::c_void, &mut len)
    };
    (rc == 0).then_some(v)
}

/// Whether `fd` is a socket of type SOCK_STREAM (TCP or Unix stream).
pub fn is_stream_socket(fd: RawFd) -> bool {
    sockopt_int(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}

/// Whether `fd` is a listening stream socket (socket activation).
pub fn is_listening_stream(fd: RawFd) -> bool {
    is_stream_socket(fd) && sockopt_int(fd, libc::SO_ACCEPTCONN) == Some(1)
}

/// The (pid, uid) of the process at the other end of a Unix socket.
pub fn peer_cred(fd: RawFd) -> io::Result<(i32, u32)> {
    // SAFETY: ucred is plain old data; len matches it.
    let mut cred: libc::ucred = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred/len are live out-parameters of the right size.
    cvt(
        unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                &mut cred as *mut _ as *mut libc::c_void,
                &mut len,
            )
        },
        "getsockopt SO_PEERCRED",
    )?;
    Ok((cred.pid, cred.uid))
}

/// Accepts a Unix-socket peer only when it runs as our uid (the trust
/// rule for every handoff channel and control socket).
pub fn check_same_uid(fd: RawFd) -> io::Result<()> {
    let (pid, uid) = peer_cred(fd)?;
    if uid != euid() {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("pid {pid} runs as uid {uid}, not ours")));
    }
    Ok(())
}

/// Our effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Shuts a socket down both ways now: the peer sees the close even while
/// another process still holds a descriptor to the same socket.
pub fn shutdown_both(fd: RawFd) {
    // SAFETY: plain syscall; failure (peer already gone) is harmless here.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// Sets SO_SNDBUF (best effort; the kernel caps it).
pub fn set_sndbuf(fd: RawFd, bytes: i32) {
    let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, bytes, "setsockopt SO_SNDBUF");
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new limit.
pub fn raise_nofile() -> io::Result<u64> {
    // SAFETY: rlimit is plain old data, filled by getrlimit.
    let mut lim: libc::rlimit = unsafe { mem::zeroed() };
    // SAFETY: lim is a live out-parameter.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, "getrlimit")?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: lim is a valid rlimit.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, "setrlimit")?;
    }
    Ok(lim.rlim_cur as u64)
}

/// `mkdir -m 0700` when missing. An existing one is never changed: it
/// must be a directory of ours that nobody else can enter, or it is
/// refused with the reason and the fix.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let d = dir.display();
    let md = match std::fs::metadata(dir) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(dir)
                .map_err(|e| io::Error::new(e.kind(), format!("--dir {d}: cannot create it: {e}")))?;
            std::fs::metadata(dir)?
        }
        Err(e) => return Err(io::Error::new(e.kind(), format!("--dir {d}: {e}"))),
    };
    let bad = |why: String| Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
    if !md.is_dir() {
        return bad(format!("--dir {d} exists and is not a directory"));
    }
    if md.uid() != euid() {
        return bad(format!(
            "--dir {d} belongs to uid {}, not to us (uid {}); use a directory of our own",
            md.uid(),
            euid()
        ));
    }
    if md.mode() & 0o077 != 0 {
        return bad(format!(
            "--dir {d} is open to other users (mode {:o}), who could reach the handoff sockets in it; \
             give a directory of your own, for example {}, which is created 0700",
            md.mode() & 0o777,
            dir.join("handoff").display()
        ));
    }
    Ok(())
}

/// Makes `path` free for a Unix listener: removes a stale socket file left
/// by a dead process; refuses one a live process still listens on.
pub fn claim_unix_path(path: &Path) -> io::Result<()> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    match unix_connect(path) {
        Ok(_) => {
            Err(io::Error::new(io::ErrorKind::AddrInUse, format!("{} is owned by a live process", path.display())))
        }
        Err(_) => {
            log::info!("removing stale {}", path.display());
            std::fs::remove_file(path).map_err(|e| io::Error::new(e.kind(), format!("remove {}: {e}", path.display())))
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes (for blocking-style
/// tools such as `handoff status`).
pub fn wait_readable(fd: &impl AsRawFd, timeout: std::time::Duration) -> io::Result<()> {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: p is one live pollfd.
    let n = cvt(unsafe { libc::poll(&mut p, 1, ms) }, "poll")?;
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
    }
    Ok(())
}

/// One non-blocking `send` (no SIGPIPE). `Ok(0)` when the socket buffer
/// is full.
pub fn send_now(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: data is a live slice of the given length.
        let n = unsafe {
            libc::send(fd, data.as_ptr() as *const libc::c_void, data.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(0),
            _ => return Err(e),
        }
    }
}
