//! Operating a cluster (issue 13): the supervisor's stable pid, the pid
//! file, systemd notifications, socket activation, PID 1 in a pid
//! namespace, and HUP (same binary) against USR2 (the binary now at the
//! path).
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster_support::*;
use crate::support::*;
use handoff::topology::cluster::control_path;

fn read_pid_file(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[test]
fn pid_file_holds_the_service_pid_across_restarts_and_goes_at_a_clean_stop() {
    let tmp = TempDir::new("pidf");
    let pid_file = tmp.path().join("handoff.pid");
    let pf = pid_file.display().to_string();
    let mut c = Cluster::start(2, &["--pid-file", &pf]);
    let service = c.server.pid();
    assert_eq!(read_pid_file(&pid_file), Some(service), "the pid file names the process started");
    let mut kept = c.connect();
    kept.ping(&json!("before"));
    let gen1 = c.master_pid();

    c.server.signal(libc::SIGHUP);
    c.wait_status("generation 2 after HUP", Duration::from_secs(10), |v| {
        v["gen"] == json!(2) && v["restarting"] == json!(false)
    });
    assert!(poll_until(EXIT_TIMEOUT, || !pid_alive(gen1)), "generation 1's master still runs");
    assert_eq!(read_pid_file(&pid_file), Some(service), "after HUP");
    assert!(c.server.is_running());
    let (gen, _) = c.restart_ok();
    assert_eq!(gen, 3);
    assert_eq!(read_pid_file(&pid_file), Some(service), "after handoff restart");
    kept.ping(&json!("after two restarts"));
    assert_eq!(kept.whoami()["gen"], json!(3), "the live connection moved twice");

    c.server.signal(libc::SIGTERM);
    let st = c.server.wait_exit(EXIT_TIMEOUT);
    assert!(st.success(), "{st}");
    assert!(!pid_file.exists(), "the pid file is left after a clean stop");
}

/// Reads datagrams until one satisfies `want` (panics after 10 s with
/// everything seen).
fn expect_notify(sock: &UnixDatagram, seen: &mut Vec<String>, what: &str, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let m = String::from_utf8_lossy(&buf[..n]).to_string();
                seen.push(m.clone());
                if want(&m) {
                    return m;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
    panic!("no notification with {what} within 10 s; seen: {seen:#?}");
}

fn field<'a>(msg: &'a str, key: &str) -> Option<&'a str> {
    msg.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

#[test]
fn notify_socket_gets_ready_reloading_and_stopping() {
    let tmp = TempDir::new("ntfy");
    let path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let p = path.clone();
    let mut c = Cluster::start_with(2, &[], std::ffi::OsStr::new(bin()), move |cmd| {
        cmd.env("NOTIFY_SOCKET", &p);
    });
    let service = c.server.pid();
    let mut seen = Vec::new();
    let ready = expect_notify(&sock, &mut seen, "READY=1", |m| m.lines().any(|l| l == "READY=1"));
    assert_eq!(field(&ready, "MAINPID"), Some(service.to_string().as_str()), "MAINPID is the service's pid: {ready:?}");
    let status = field(&ready, "STATUS").unwrap_or_else(|| panic!("no STATUS= with READY=1: {ready:?}"));
    assert!(status.contains("generation 1"), "{status}");
    assert!(!ready.contains("HANDOFF_"), "private lines reach systemd: {ready:?}");

    c.server.signal(libc::SIGHUP);
    let reloading = expect_notify(&sock, &mut seen, "RELOADING=1", |m| m.lines().any(|l| l == "RELOADING=1"));
    let usec: u64 = field(&reloading, "MONOTONIC_USEC")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"));
    assert!(usec > 0);
    let ready2 = expect_notify(&sock, &mut seen, "READY=1 after the reload", |m| m.lines().any(|l| l == "READY=1"));
    assert!(field(&ready2, "STATUS").is_some_and(|s| s.contains("generation 2")), "{ready2:?}");
    assert_eq!(c.status()["gen"], json!(2));

    c.server.signal(libc::SIGTERM);
    expect_notify(&sock, &mut seen, "STOPPING=1", |m| m.lines().any(|l| l == "STOPPING=1"));
    assert!(c.server.wait_exit(EXIT_TIMEOUT).success());
}

#[test]
fn socket_activation_serves_on_the_inherited_socket() {
    if Command::new("systemd-socket-activate").arg("--help").output().is_err() {
        panic!("systemd-socket-activate is missing: `make deps` installs it (package systemd)");
    }
    let tmp = TempDir::new("sact");
    let dir = tmp.path().join("d");
    let port = free_pair();
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("-l").arg(format!("127.0.0.1:{port}")).arg(bin());
    cmd.args(["cluster", "--port", "0", "--workers", "2", "--dir"]).arg(&dir);
    let mut server = TestServer::spawn_cmd("activated", cmd);
    // systemd-socket-activate listens first and starts the service on the
    // first connection (which waits in the backlog meanwhile).
    let connected = poll_until(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert!(connected, "nothing listens on {port}:\n{}", server.stderr_text());
    let mut first = Rpc::connect(port);
    let ready = server.wait_ready().unwrap_or_else(|e| panic!("{e}\n{}", server.stderr_text()));
    assert_eq!(ready_field(&ready, "port").as_deref(), Some(port.to_string().as_str()), "{ready}");
    first.ping(&json!("activated"));
    assert!(server.stderr_text().contains("socket activation"), "{}", server.stderr_text());
    let v = handoff::topology::cluster::status::fetch(&dir, Duration::from_secs(5)).expect("status");
    assert_eq!(v["supervisor"], json!(server.pid()), "{v}");
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(EXIT_TIMEOUT).success());
}

/// The host pid of the one child of `pid`.
fn only_child(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

#[test]
fn pid_1_in_a_pid_namespace_survives_restart_with_its_connections() {
    let ok = Command::new("unshare").args(["--pid", "--fork", "--mount-proc", "true"]).status();
    if !ok.is_ok_and(|s| s.success()) {
        eprintln!("SKIP: pid namespaces are not allowed here (unshare --pid --fork --mount-proc true failed)");
        return;
    }
    let tmp = TempDir::new("pns");
    let dir = tmp.path().join("d");
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc"]).arg(bin());
    cmd.args(["cluster", "--port", "0", "--workers", "2", "--dir"]).arg(&dir);
    let mut server = TestServer::start_cmd("pid1", cmd);
    let port: u16 = ready_field(&server.ready, "port").and_then(|p| p.parse().ok()).expect("port");
    let status = || handoff::topology::cluster::status::fetch(&dir, Duration::from_secs(5)).expect("status");
    assert_eq!(status()["supervisor"], json!(1), "the supervisor is PID 1 in its namespace");
    let pid1 = only_child(server.pid()).expect("the namespace's init");
    let mut kept: Vec<Rpc> = (0..20).map(|_| Rpc::connect(port)).collect();
    for r in kept.iter_mut() {
        r.ping(&json!("before"));
    }

    let (st, out, err) = run_cmd(Command::new(bin()).arg("restart").arg("--dir").arg(&dir), RESTART_TIMEOUT);
    assert!(st.success(), "handoff restart: {st}\n{out}\n{err}\n{}", server.stderr_text());
    let v = status();
    assert_eq!((v["gen"].clone(), v["supervisor"].clone()), (json!(2), json!(1)), "{v}");
    for (i, r) in kept.iter_mut().enumerate() {
        r.ping(&json!({"after": i}));
        assert_eq!(r.whoami()["gen"], json!(2), "connection {i} moved to generation 2");
    }
    assert!(server.is_running(), "the namespace died with the restart");
    Rpc::connect(port).ping(&json!("fresh"));

    // SIGTERM to PID 1 from outside: it has a handler, so it is delivered.
    kill_pid(pid1, libc::SIGTERM);
    let st = server.wait_exit(EXIT_TIMEOUT);
    assert!(st.success(), "{st}\n{}", server.stderr_text());
}

fn exe_of(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe")).map(|p| p.display().to_string()).unwrap_or_default()
}

#[test]
fn hup_restarts_the_running_binary_and_usr2_the_one_now_at_the_path() {
    if std::env::var_os("HANDOFF_WRAP").is_some() {
        eprintln!("SKIP under HANDOFF_WRAP: /proc/PID/exe names the wrapper's tool");
        return;
    }
    let tmp = TempDir::new("upg");
    let copy = tmp.path().join("handoff-copy");
    std::fs::copy(bin(), &copy).unwrap();
    let c = Cluster::start_with(2, &[], copy.as_os_str(), |_| {});
    let mut kept = c.connect();
    kept.ping(&json!("before"));
    let gen1 = c.master_pid();
    assert_eq!(exe_of(gen1), copy.display().to_string());
    // A new build lands at the path (renamed over it, as installers do).
    let new = tmp.path().join("handoff-copy.new");
    std::fs::copy(bin(), &new).unwrap();
    std::fs::rename(&new, &copy).unwrap();

    c.server.signal(libc::SIGHUP);
    let v = c.wait_status("generation 2 after HUP", Duration::from_secs(10), |v| {
        v["gen"] == json!(2) && v["restarting"] == json!(false)
    });
    let exe = exe_of(v["pid"].as_i64().unwrap() as i32);
    assert!(exe.ends_with("(deleted)"), "HUP keeps the running binary; the new master runs {exe:?}");
    kept.ping(&json!("after HUP"));
    // The next signal goes to generation 2 once generation 1 has left.
    assert!(poll_until(EXIT_TIMEOUT, || !pid_alive(gen1)), "generation 1's master still runs");

    c.server.signal(libc::SIGUSR2);
    let v = c.wait_status("generation 3 after USR2", Duration::from_secs(10), |v| {
        v["gen"] == json!(3) && v["restarting"] == json!(false)
    });
    let exe = exe_of(v["pid"].as_i64().unwrap() as i32);
    assert_eq!(exe, copy.display().to_string(), "USR2 starts the binary now at the path");
    kept.ping(&json!("after USR2"));
    assert_eq!(kept.whoami()["gen"], json!(3));
}

#[test]
fn a_master_that_cannot_start_fails_the_service_and_removes_the_pid_file() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let tmp = TempDir::new("fail");
    let pid_file = tmp.path().join("p.pid");
    let mut cmd = Command::new(bin());
    cmd.args(["cluster", "--workers", "1", "--port", &port, "--dir"]).arg(tmp.path().join("d"));
    cmd.arg("--pid-file").arg(&pid_file);
    let (st, _, err) = run_cmd(&mut cmd, Duration::from_secs(10));
    assert_eq!(st.code(), Some(1), "{st}\n{err}");
    assert!(err.contains("Address already in use"), "{err}");
    assert!(!pid_file.exists());
}

#[test]
fn a_killed_supervisor_stops_its_master_and_workers() {
    let mut c = Cluster::start(2, &[]);
    let v: Value = c.status();
    let master = v["pid"].as_i64().unwrap() as i32;
    let workers = c.worker_pids();
    c.server.kill();
    let gone = poll_until(Duration::from_secs(10), || !pid_alive(master) && workers.iter().all(|&p| !pid_alive(p)));
    assert!(gone, "the master or its workers outlive the supervisor");
    assert!(!control_path(&c.dir).exists(), "the master did not stop cleanly (control.sock left)");
}

#[test]
fn make_install_puts_binary_header_libraries_and_units_under_prefix() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = TempDir::new("inst");
    let prefix = tmp.path().join("usr");
    let (st, out, err) = run_cmd(
        Command::new("make")
            .current_dir(root)
            .arg("-s")
            .arg("install-only")
            .arg(format!("PREFIX={}", prefix.display())),
        Duration::from_secs(60),
    );
    assert!(st.success(), "make install-only: {st}\n{out}\n{err}");
    for f in [
        "bin/handoff",
        "include/handoff.h",
        "lib/libhandoff.a",
        "lib/libhandoff.so",
        "lib/systemd/system/handoff.service",
        "lib/systemd/system/handoff.socket",
        "share/doc/handoff/handoff.toml.example",
    ] {
        assert!(prefix.join(f).is_file(), "{f} is not installed");
    }
    let (st, out, _) = run_cmd(Command::new(prefix.join("bin/handoff")).arg("--version"), Duration::from_secs(10));
    assert!(st.success() && out.starts_with("handoff "), "{st} {out}");
    let unit = std::fs::read_to_string(prefix.join("lib/systemd/system/handoff.service")).unwrap();
    let exec = format!("ExecStart={}/bin/handoff cluster ", prefix.display());
    assert!(unit.contains(&exec), "the unit does not start the installed binary:\n{unit}");
    for line in ["Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "PIDFile="] {
        assert!(unit.contains(line), "{line} missing from the unit");
    }
}

#[test]
fn a_killed_master_is_replaced_by_the_supervisor() {
    let tmp = TempDir::new("mkill");
    let pid_file = tmp.path().join("p.pid");
    let pf = pid_file.display().to_string();
    let c = Cluster::start(2, &["--pid-file", &pf]);
    let first = c.master_pid();
    let workers = c.worker_pids();
    c.connect().ping(&json!("before"));
    kill_pid(first, libc::SIGKILL);
    let v = c.wait_status("a new master", Duration::from_secs(10), |v| {
        v["pid"].as_i64().is_some_and(|p| p as i32 != first) && v["accepting"] == json!(true)
    });
    assert_eq!(v["supervisor"], json!(c.server.pid()), "{v}");
    assert_eq!(v["gen"], json!(2), "the replacement is the next generation: {v}");
    assert!(poll_until(EXIT_TIMEOUT, || workers.iter().all(|&p| !pid_alive(p))), "old workers outlive their master");
    let mut r = c.connect();
    r.ping(&json!("after"));
    assert_eq!(read_pid_file(&pid_file), Some(c.server.pid()));
    assert!(c.server.stderr_text().contains("starting a new one"), "{}", c.server.stderr_text());
}

/// `handoff cluster --port 0 --config F --dir D` with `text` (2 workers) in
/// F (no `--workers`: the command line would override the file).
fn cluster_with_config(tag: &str, text: &str) -> (Cluster, std::path::PathBuf) {
    let tmp = TempDir::new(tag);
    let conf = tmp.path().join("handoff.toml");
    std::fs::write(&conf, text).unwrap();
    let dir = tmp.path().join("d");
    let mut cmd = Command::new(bin());
    cmd.args(["cluster", "--port", "0", "--config"]).arg(&conf).arg("--dir").arg(&dir);
    (Cluster::adopt("cluster", tmp, dir, 2, TestServer::start_cmd("cluster", cmd)), conf)
}

/// HUP reads the config file again: 2 workers become 3 under load
/// (keep-alive and short connections), nothing lost.
#[test]
fn hup_with_a_changed_config_changes_workers_under_load_losing_nothing() {
    let (c, conf) = cluster_with_config("hupc", "workers = 2\npolicy = \"round-robin\"\n");
    assert_eq!(c.status()["workers"].as_array().map(Vec::len), Some(2));
    let mut kept: Vec<Rpc> = (0..50).map(|_| c.connect()).collect();
    for r in kept.iter_mut() {
        r.ping(&json!("before"));
    }
    let ka = c.rpc_opts(8, 4000, false);
    let short = c.rpc_opts(4, 1500, true);
    let load_ka = std::thread::spawn(move || handoff::client::rpc(&ka));
    let load_short = std::thread::spawn(move || handoff::client::rpc(&short));
    c.wait_status("the load under way", Duration::from_secs(20), |v| {
        v["workers"].as_array().map_or(0, |w| w.iter().map(|w| w["served"].as_u64().unwrap_or(0)).sum::<u64>()) >= 500
    });
    std::fs::write(&conf, "workers = 3\npolicy = \"least-conn\"\n").unwrap();
    c.server.signal(libc::SIGHUP);
    let v = c.wait_status("generation 2 with 3 workers", Duration::from_secs(20), |v| {
        v["gen"] == json!(2) && v["restarting"] == json!(false) && v["workers"].as_array().map(Vec::len) == Some(3)
    });
    assert_eq!(v["policy"], json!("least-conn"), "{v}");
    let running = !load_ka.is_finished() && !load_short.is_finished();
    let (ka, short) = (load_ka.join().unwrap(), load_short.join().unwrap());
    assert!(ka.passed() && ka.errors == 0, "keep-alive load across the reload: {ka}");
    assert!(short.passed() && short.errors == 0, "short-connection load across the reload: {short}");
    assert!(running, "the load ended before the reload did; make it longer");
    for (i, r) in kept.iter_mut().enumerate() {
        r.ping(&json!({"after": i}));
        assert_eq!(r.whoami()["gen"], json!(2), "connection {i}");
    }
    let served: Vec<u64> = worker_field(&c.status(), "handed");
    assert_eq!(served.len(), 3);
}

/// A config file broken before a HUP: the new generation cannot start,
/// the restart aborts, the old generation serves on with its connections.
#[test]
fn hup_with_a_broken_config_keeps_the_running_generation() {
    let (c, conf) = cluster_with_config("hupb", "workers = 2\n");
    let gen1 = c.master_pid();
    let mut kept = c.connect();
    kept.ping(&json!("before"));
    std::fs::write(&conf, "workers = 2\nno_such_setting = 1\n").unwrap();
    c.server.signal(libc::SIGHUP);
    let ok = poll_until(Duration::from_secs(10), || c.server.stderr_text().contains("restart aborted"));
    assert!(ok, "no abort logged:\n{}", c.server.stderr_text());
    assert!(c.server.stderr_text().contains("no_such_setting"), "the reason is not logged");
    let v = c.status();
    assert_eq!((v["gen"].clone(), v["pid"].clone()), (json!(1), json!(gen1)), "{v}");
    kept.ping(&json!("after"));
    assert_eq!(kept.whoami()["gen"], json!(1));
}
