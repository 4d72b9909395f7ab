//! The descriptor budget (issue 16): the master raises RLIMIT_NOFILE as far
//! as it may, shows how many connections its limit holds (`capacity` in
//! `status`), and refuses a `--max-conns` beyond that before binding.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::cluster_support::*;
use crate::support::{bin, run_cmd, TempDir};

/// What the master needs besides one descriptor per connection, as
/// `src/core/limits.rs` counts it: 64 fixed, 2 per worker, 1 per listener.
fn overhead(workers: u64, listeners: u64) -> u64 {
    64 + 2 * workers + listeners
}

/// The soft "Max open files" of a running process (/proc/PID/limits).
fn soft_nofile(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read /proc/PID/limits");
    let line = text.lines().find(|l| l.starts_with("Max open files")).expect("a Max open files line");
    line.split_whitespace().nth(3).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line:?}"))
}

/// linux/capability.h
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process has CAP_SYS_RESOURCE (may raise a hard limit).
fn may_raise_hard() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).expect("a CapEff line");
    u64::from_str_radix(eff.trim(), 16).unwrap() & (1 << CAP_SYS_RESOURCE) != 0
}

/// This process's hard descriptor limit.
fn own_hard() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: lim is a live out-parameter of the right type.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_max
}

fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open").unwrap().trim().parse().unwrap()
}

/// A script running the binary with the descriptor limit at `n` (soft and
/// hard), unable to raise it: as root, without CAP_SYS_RESOURCE (setpriv).
fn limited(dir: &Path, n: u64) -> PathBuf {
    let path = dir.join("limited.sh");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let drop_cap = if root { "setpriv --inh-caps=-sys_resource --bounding-set=-sys_resource " } else { "" };
    script(&path, &format!("#!/bin/sh\nexec prlimit --nofile={n}:{n} {drop_cap}{} \"$@\"\n", bin()));
    path
}

#[test]
fn status_shows_the_capacity_the_descriptor_limit_allows() {
    let c = Cluster::start(2, &[]);
    let v = c.status();
    let soft = soft_nofile(c.master_pid());
    assert_eq!(v["nofile"].as_u64(), Some(soft), "{v}");
    assert_eq!(v["capacity"].as_u64(), Some(soft - overhead(2, 1)), "{v}");
    // With CAP_SYS_RESOURCE (root, mostly) the limit goes up to
    // fs.nr_open; without, the soft limit up to the hard one we have.
    let want = if may_raise_hard() { nr_open() } else { own_hard().min(nr_open()) };
    assert_eq!(soft, want, "the master's descriptor limit");
    for w in c.worker_pids() {
        assert_eq!(soft_nofile(w), soft, "worker {w} runs with the same limit");
    }
    let text = c.status_cli(false);
    assert!(text.contains(&format!("capacity {} connections", soft - overhead(2, 1))), "{text}");
}

#[test]
fn a_lowered_limit_lowers_the_capacity_and_refuses_max_conns_beyond_it() {
    let tmp = TempDir::new("nofile");
    let wrapper = limited(tmp.path(), 300);
    let cap = 300 - overhead(2, 1);

    // Within the budget: it runs, and says how much it can hold.
    let c = Cluster::start_with(2, &["--max-conns", &cap.to_string()], wrapper.as_os_str(), |_| {});
    let v = c.status();
    assert_eq!(soft_nofile(c.master_pid()), 300, "the limit could not be raised");
    assert_eq!(v["nofile"].as_u64(), Some(300), "{v}");
    assert_eq!(v["capacity"].as_u64(), Some(cap), "{v}");
    drop(c);

    // Beyond it: refused before anything is bound or created.
    let dir = tmp.path().join("d");
    let want = cap + 1;
    let (st, out, err) = run_cmd(
        Command::new(&wrapper).args([
            "cluster",
            "--port",
            "0",
            "--workers",
            "2",
            "--dir",
            dir.to_str().unwrap(),
            "--max-conns",
            &want.to_string(),
        ]),
        Duration::from_secs(20),
    );
    assert_eq!(st.code(), Some(1), "stdout {out:?} stderr {err:?}");
    assert!(!out.contains("ready"), "{out}");
    assert!(
        err.contains(&format!("--max-conns {want} exceeds what the descriptor limit allows"))
            && err.contains(&format!("room for {cap} connections")),
        "{err}"
    );
    assert!(!dir.exists(), "refused, yet {} was created", dir.display());
}
