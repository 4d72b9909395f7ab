//! Every raw socket syscall the project makes, each checked by `cvt`.
//! Descriptors come back as `OwnedFd` at once, so every failure path
//! closes them.
use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::core::reactor::Endpoint;

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

/// `addr` as a C socket address (`sockaddr_in` or `sockaddr_in6` in a
/// `sockaddr_storage`) and its length.
fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any
            // sockaddr type; this is the documented way to fill it.
            let sa = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage as *mut libc::sockaddr_in) };
            sa.sin_family = libc::AF_INET as _;
            sa.sin_port = a.port().to_be();
            sa.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sa = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage as *mut libc::sockaddr_in6) };
            sa.sin6_family = libc::AF_INET6 as _;
            sa.sin6_port = a.port().to_be();
            sa.sin6_flowinfo = a.flowinfo().to_be();
            sa.sin6_addr.s6_addr = a.ip().octets();
            sa.sin6_scope_id = a.scope_id();
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// The Rust form of a socket address the kernel filled in; `None` for a
/// family other than IPv4 and IPv6. An IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`, an IPv4 client of a dual-stack `::` listener) comes
/// back as the plain IPv4 address.
fn socket_addr_from(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sa = unsafe { &*(ss as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sa.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sa = unsafe { &*(ss as *const libc::sockaddr_storage as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
            let port = u16::from_be(sa.sin6_port);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, u32::from_be(sa.sin6_flowinfo), sa.sin6_scope_id)),
            })
        }
        _ => None,
    }
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

/// Resolves `host:port` for a server to bind or a client to connect to.
/// `host` is an IPv4 address (`127.0.0.1`, `0.0.0.0`), an IPv6 address
/// with or without brackets (`::1`, `[::1]`, `::`), or a name: a name
/// becomes its first IPv4 address, or its first IPv6 address when it has
/// no IPv4 one (so `localhost` stays `127.0.0.1`).
///
/// ```
/// use handoff::core::sock::resolve;
///
/// assert_eq!(resolve("127.0.0.1", 80)?.to_string(), "127.0.0.1:80");
/// assert_eq!(resolve("::1", 80)?.to_string(), "[::1]:80");
/// assert_eq!(resolve("[::]", 80)?.to_string(), "[::]:80");
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let all: Vec<SocketAddr> =
        (bare, port).to_socket_addrs().map_err(|e| io::Error::new(e.kind(), format!("resolve {host}: {e}")))?.collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or_else(|| all.first())
        .copied()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no address for {host}")))
}

/// A non-blocking TCP listener on `addr` (SO_REUSEADDR, backlog 4096).
/// IPv6: the unspecified address `::` is dual-stack (IPV6_V6ONLY off,
/// whatever the `net.ipv6.bindv6only` sysctl says): it takes IPv4 clients
/// too, as Node and Go do (nginx: `listen [::]:80 ipv6only=off`); any
/// other IPv6 address is IPv6 only.
pub fn tcp_listen(addr: SocketAddr) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let fd = socket(domain, libc::SOCK_STREAM)?;
    setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "setsockopt SO_REUSEADDR")?;
    if let SocketAddr::V6(a) = addr {
        let only = i32::from(!a.ip().is_unspecified());
        setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, only, "setsockopt IPV6_V6ONLY")?;
    }
    let (sa, len) = sockaddr_of(&addr);
    // SAFETY: sa is a valid socket address of length len.
    cvt(unsafe { libc::bind(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, len) }, &format!("bind {addr}"))?;
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 4096) }, "listen")?;
    Ok(fd)
}

/// A non-blocking TCP connect to `addr` (IPv4 or IPv6); usually returns
/// before the handshake ends (EINPROGRESS is not an error).
pub fn tcp_connect(addr: SocketAddr) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let fd = socket(domain, libc::SOCK_STREAM)?;
    let (sa, len) = sockaddr_of(&addr);
    // SAFETY: sa is a valid socket address of length len.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, len) };
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
pub fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: zeroed sockaddr_storage is valid; len matches it.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of_val(&ss) as libc::socklen_t;
    // SAFETY: ss/len are live out-parameters of the right size.
    cvt(unsafe { libc::getsockname(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) }, "getsockname")?;
    socket_addr_from(&ss)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "getsockname: not an IPv4 or IPv6 socket"))
}

/// The remote address of a TCP socket, if it has one (an IPv4 client of
/// a dual-stack listener as plain IPv4).
pub fn peer_addr(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: zeroed sockaddr_storage is valid; len matches it.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of_val(&ss) as libc::socklen_t;
    // SAFETY: ss/len are live out-parameters of the right size.
    let rc = unsafe { libc::getpeername(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) };
    if rc == 0 {
        socket_addr_from(&ss)
    } else {
        None
    }
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

/// A non-blocking SOCK_STREAM listener bound to `path` (a Unix endpoint
/// clients connect to, `--listen unix:PATH`), its file made `mode`
/// (`--listen-mode`, 0600 by default) before anyone can connect: the
/// socket is bound under a private umask, then chmod-ed. Backlog 4096.
pub fn unix_stream_listen(path: &Path, mode: u32) -> io::Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    let fd = socket(libc::AF_UNIX, libc::SOCK_STREAM)?;
    let (sa, len) = sockaddr_un(path)?;
    // SAFETY: umask only changes this process's file mode mask; it is put
    // back right after the bind (no other thread creates files meanwhile
    // in a server that is starting).
    let old = unsafe { libc::umask(0o177) };
    // SAFETY: sa is a valid sockaddr_un of length len.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, len) };
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    cvt(rc, &format!("bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o777))
        .map_err(|e| io::Error::new(e.kind(), format!("chmod {:o} {}: {e}", mode & 0o777, path.display())))?;
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 4096) }, "listen")?;
    Ok(fd)
}

/// A non-blocking SOCK_STREAM connection to the Unix listener at `path`
/// (a node link to a manager's `unix:PATH`). A Unix connect completes at
/// once or fails (EAGAIN: the listener's backlog is full).
pub fn unix_stream_connect(path: &Path) -> io::Result<OwnedFd> {
    unix_connect_as(path, libc::SOCK_STREAM)
}

/// A non-blocking connection to `ep`, TCP (TCP_NODELAY set; the handshake
/// may still be under way) or Unix stream.
pub fn connect_endpoint(ep: &Endpoint) -> io::Result<OwnedFd> {
    match ep {
        Endpoint::Tcp(a) => tcp_connect(*a),
        Endpoint::Unix(p) => unix_stream_connect(p),
        Endpoint::Seqpacket(p) => unix_connect(p),
    }
}

/// A listening socket on `ep` (a Unix stream socket's file made `mode`).
/// A Unix path is claimed first ([`claim_unix_path`]).
pub fn listen_endpoint(ep: &Endpoint, mode: u32) -> io::Result<OwnedFd> {
    match ep {
        Endpoint::Tcp(a) => tcp_listen(*a),
        Endpoint::Unix(p) => {
            claim_unix_path(p)?;
            unix_stream_listen(p, mode)
        }
        Endpoint::Seqpacket(p) => {
            claim_unix_path(p)?;
            unix_listen(p)
        }
    }
}

/// Where a listening socket listens: its TCP address, or its Unix path
/// (a stream socket as [`Endpoint::Unix`], a seqpacket one as
/// [`Endpoint::Seqpacket`]).
pub fn local_endpoint(fd: RawFd) -> io::Result<Endpoint> {
    // SAFETY: zeroed sockaddr_storage is valid; len matches it.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of_val(&ss) as libc::socklen_t;
    // SAFETY: ss/len are live out-parameters of the right size.
    cvt(unsafe { libc::getsockname(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) }, "getsockname")?;
    if ss.ss_family as libc::c_int == libc::AF_UNIX {
        // SAFETY: the family says the storage holds a sockaddr_un.
        let sa = unsafe { &*(&ss as *const libc::sockaddr_storage as *const libc::sockaddr_un) };
        let n = (len as usize).saturating_sub(mem::size_of::<libc::sa_family_t>()).min(sa.sun_path.len());
        let bytes: Vec<u8> = sa.sun_path[..n].iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
        if bytes.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "an unnamed Unix socket has no endpoint"));
        }
        let path = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(&bytes));
        return Ok(if is_stream_socket(fd) { Endpoint::Unix(path) } else { Endpoint::Seqpacket(path) });
    }
    socket_addr_from(&ss)
        .map(Endpoint::Tcp)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "getsockname: not an IP or Unix socket"))
}

/// The client at the other end of an accepted connection, as logs show
/// it: `IP:PORT` over TCP (`[V6]:PORT`), `unix:PID` over a Unix socket
/// (the peer's pid from SO_PEERCRED); `None` if unknown.
pub fn peer_name(fd: RawFd) -> Option<String> {
    if let Some(a) = peer_addr(fd) {
        return Some(a.to_string());
    }
    peer_cred(fd).ok().map(|(pid, _)| format!("unix:{pid}"))
}

/// Parses a listening or connecting address: `HOST:PORT` (IPv4 or a
/// name, resolved now), `[V6]:PORT`, or `unix:PATH` (a Unix stream
/// socket; a relative PATH is made absolute, since servers and their
/// successors may run elsewhere).
///
/// ```
/// use handoff::core::sock::parse_endpoint;
///
/// assert_eq!(parse_endpoint("127.0.0.1:80")?.to_string(), "127.0.0.1:80");
/// assert_eq!(parse_endpoint("[::1]:80")?.to_string(), "[::1]:80");
/// assert_eq!(parse_endpoint("unix:/run/h.sock")?.to_string(), "unix:/run/h.sock");
/// assert!(parse_endpoint("::1:80").is_err());
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn parse_endpoint(s: &str) -> io::Result<Endpoint> {
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad(format!("'{s}': give a path after unix:")));
        }
        let path = std::path::absolute(path).map_err(|e| bad(format!("'{s}': {e}")))?;
        sockaddr_un(&path)?;
        return Ok(Endpoint::Unix(path));
    }
    let (host, port) =
        s.rsplit_once(':').ok_or_else(|| bad(format!("'{s}': give HOST:PORT, [V6]:PORT or unix:PATH")))?;
    let port: u16 = port.parse().map_err(|_| bad(format!("'{s}': '{port}' is not a port (0 to 65535)")))?;
    if host.is_empty() {
        return Err(bad(format!("'{s}': the host is missing (e.g. 127.0.0.1:{port})")));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(bad(format!("'{s}': write an IPv6 address in brackets, e.g. [::1]:{port}")));
    }
    Ok(Endpoint::Tcp(resolve(host, port)?))
}

/// A non-blocking SOCK_SEQPACKET connection to the listener at `path`.
pub fn unix_connect(path: &Path) -> io::Result<OwnedFd> {
    unix_connect_as(path, libc::SOCK_SEQPACKET)
}

/// A non-blocking connection of socket type `ty` to the Unix listener at
/// `path`.
fn unix_connect_as(path: &Path, ty: libc::c_int) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_UNIX, ty)?;
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
/// by a dead process; refuses one a live process still listens on
/// (seqpacket or stream: a connect of either type that is not refused).
pub fn claim_unix_path(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(md) = std::fs::symlink_metadata(path) else { return Ok(()) };
    if !md.file_type().is_socket() {
        // Never remove what is not a socket (a mistyped --listen path).
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket: not removing it", path.display()),
        ));
    }
    let live = |r: io::Result<OwnedFd>| match r {
        Ok(_) => true,
        // A listener of the other type answers EPROTOTYPE; a full backlog
        // EAGAIN: both are alive.
        Err(e) => matches!(e.raw_os_error(), Some(libc::EPROTOTYPE) | Some(libc::EAGAIN)),
    };
    match live(unix_connect(path)) || live(unix_stream_connect(path)) {
        true => Err(io::Error::new(io::ErrorKind::AddrInUse, format!("{} is owned by a live process", path.display()))),
        false => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;
    use std::time::Duration;

    fn accept_one(l: &OwnedFd) -> OwnedFd {
        wait_readable(l, Duration::from_secs(5)).expect("a connection to accept");
        accept(l.as_raw_fd()).expect("accept").expect("one waiting")
    }

    #[test]
    fn any_ipv6_address_is_dual_stack_and_reports_ipv4_clients_plainly() {
        let Ok(l) = tcp_listen(resolve("::", 0).unwrap()) else {
            eprintln!("SKIPPED: no IPv6 on this machine");
            return;
        };
        let local = local_addr(l.as_raw_fd()).unwrap();
        assert!(local.is_ipv6() && local.ip().is_unspecified(), "{local}");
        let v4 = TcpStream::connect((Ipv4Addr::LOCALHOST, local.port())).unwrap();
        let c = accept_one(&l);
        assert_eq!(peer_addr(c.as_raw_fd()), Some(v4.local_addr().unwrap()), "not ::ffff:127.0.0.1");
        let v6 = TcpStream::connect((Ipv6Addr::LOCALHOST, local.port())).unwrap();
        let c = accept_one(&l);
        assert_eq!(peer_addr(c.as_raw_fd()), Some(v6.local_addr().unwrap()));
        // The non-blocking connect speaks IPv6 too.
        let out = tcp_connect(SocketAddr::from((Ipv6Addr::LOCALHOST, local.port()))).unwrap();
        let c = accept_one(&l);
        assert_eq!(peer_addr(c.as_raw_fd()), local_addr(out.as_raw_fd()).ok());
    }

    #[test]
    fn names_prefer_ipv4_and_brackets_are_optional() {
        assert_eq!(resolve("localhost", 1).unwrap(), SocketAddr::from((Ipv4Addr::LOCALHOST, 1)));
        assert_eq!(resolve("[::1]", 2).unwrap(), SocketAddr::from((Ipv6Addr::LOCALHOST, 2)));
        assert!(resolve("[::1", 2).is_err());
    }
}
