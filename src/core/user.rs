//! Running workers as another user (`--user NAME`): a master started as
//! root binds its port, then starts every worker as NAME. The account is
//! looked up in the master (`getpwnam_r`, its groups with `getgrouplist`,
//! as `initgroups` would set them); the switch happens in the forked child
//! before exec, in the order that drops root last: supplementary groups
//! (`setgroups`), then the group (`setgid`), then the user (`setuid`).
//! Those are single syscalls on data prepared before the fork, so they are
//! safe between fork and exec.
//!
//! ```no_run
//! use std::process::Command;
//! use handoff::core::user::RunAs;
//!
//! let nobody = RunAs::lookup("nobody")?; // an error for an unknown user, or when we may not switch
//! let mut cmd = Command::new("/usr/bin/id");
//! nobody.apply(&mut cmd);
//! cmd.status()?; // uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)
//! # Ok::<(), std::io::Error>(())
//! ```
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

/// An account to run child processes as, looked up and checked.
#[derive(Debug, Clone)]
pub struct RunAs {
    /// The user's name, as given.
    pub name: String,
    /// Its uid.
    pub uid: libc::uid_t,
    /// Its primary group.
    pub gid: libc::gid_t,
    /// Its supplementary groups (the primary one included), as
    /// `initgroups` would set them.
    pub groups: Vec<libc::gid_t>,
    /// Its home directory (the children's `HOME`).
    pub home: PathBuf,
    /// We already run as this user (not root): nothing to switch.
    pub already: bool,
}

impl RunAs {
    /// Looks `name` up and checks that this process can start children as
    /// it: only root can, unless `name` is the user we already run as
    /// (then [`RunAs::apply`] changes nothing).
    pub fn lookup(name: &str) -> io::Result<RunAs> {
        let bad = |kind: io::ErrorKind, why: String| io::Error::new(kind, format!("--user {name}: {why}"));
        let c_name = CString::new(name).map_err(|_| bad(io::ErrorKind::InvalidInput, "contains a NUL byte".into()))?;
        let (uid, gid, home) = getpwnam(&c_name).map_err(|e| bad(e.kind(), e.to_string()))?;
        // SAFETY: geteuid and getuid cannot fail.
        let (euid, ruid) = unsafe { (libc::geteuid(), libc::getuid()) };
        let already = euid != 0 && uid == euid && ruid == euid;
        if euid != 0 && !already {
            return Err(bad(
                io::ErrorKind::PermissionDenied,
                format!(
                    "only a master started as root can run its workers as another user (this one runs as uid {euid}; \
                     {name} is uid {uid})"
                ),
            ));
        }
        let groups =
            if already { Vec::new() } else { grouplist(&c_name, gid).map_err(|e| bad(e.kind(), e.to_string()))? };
        Ok(RunAs { name: name.to_string(), uid, gid, groups, home, already })
    }

    /// Makes `cmd` run as this user: `USER`, `LOGNAME` and `HOME` set to
    /// its own, and, in the child before exec, its groups, gid and uid (in
    /// that order). A failing switch fails the spawn with that errno.
    /// Nothing changes when we already run as this user.
    pub fn apply(&self, cmd: &mut Command) {
        if self.already {
            return;
        }
        cmd.env("USER", &self.name).env("LOGNAME", &self.name).env("HOME", &self.home);
        let (uid, gid, groups) = (self.uid, self.gid, self.groups.clone());
        // SAFETY: the closure runs in the forked child before exec and only
        // makes the setgroups, setgid and setuid syscalls on memory prepared
        // before the fork (no allocation: last_os_error is an errno).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// (uid, gid, home) of the user `name`.
fn getpwnam(name: &CStr) -> io::Result<(libc::uid_t, libc::gid_t, PathBuf)> {
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: passwd is plain old data; all-zero is a valid value.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is live for the call and buf's length is
        // the one given; the strings pw points to live in buf.
        let rc = unsafe { libc::getpwnam_r(name.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if found.is_null() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such user"));
        }
        let home = if pw.pw_dir.is_null() {
            PathBuf::from("/")
        } else {
            // SAFETY: pw_dir points to a NUL-terminated string inside buf,
            // which is alive here.
            PathBuf::from(OsStr::from_bytes(unsafe { CStr::from_ptr(pw.pw_dir) }.to_bytes()))
        };
        return Ok((pw.pw_uid, pw.pw_gid, home));
    }
}

/// Every group of user `name` whose primary group is `gid`.
fn grouplist(name: &CStr, gid: libc::gid_t) -> io::Result<Vec<libc::gid_t>> {
    let mut n: libc::c_int = 32;
    loop {
        let mut groups: Vec<libc::gid_t> = vec![0; n as usize];
        let mut got = n;
        // SAFETY: groups has room for `got` entries; getgrouplist writes at
        // most that many and sets `got` to the number it needs.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut got) };
        if rc >= 0 {
            groups.truncate(got.max(0) as usize);
            return Ok(groups);
        }
        if got <= n {
            if n >= 1 << 16 {
                return Err(io::Error::other("getgrouplist failed"));
            }
            got = n * 2;
        }
        n = got;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_user_is_a_clear_error() {
        let e = RunAs::lookup("handoff-no-such-user").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(e.to_string(), "--user handoff-no-such-user: no such user");
        assert!(RunAs::lookup("a\0b").is_err());
    }

    #[test]
    fn root_is_found_and_only_root_may_switch() {
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        match RunAs::lookup("root") {
            Ok(r) => {
                assert_eq!((r.uid, r.gid), (0, 0));
                assert_eq!(euid, 0, "a non-root process may not become root");
                assert!(r.groups.contains(&0), "{:?}", r.groups);
            }
            Err(e) => {
                assert_ne!(euid, 0, "{e}");
                assert!(e.to_string().contains("only a master started as root"), "{e}");
            }
        }
    }
}
