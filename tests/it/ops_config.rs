//! Operations (issue 13): `--config FILE` and `handoff check`, the
//! connection limit (`--max-conns`), `--idle-timeout` and `--access-log`.
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster_support::*;
use crate::support::{bin, poll_until, run_cmd, TempDir};

/// Writes a config file.
fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    p
}

/// `BIN ARGS...` to completion: (exit code, stdout, stderr).
fn run(program: &std::ffi::OsStr, args: &[&str]) -> (i32, String, String) {
    let (st, out, err) = run_cmd(Command::new(program).args(args), Duration::from_secs(20));
    (st.code().unwrap_or(-1), out, err)
}

/// A cluster started from a config file (`handoff cluster --config F
/// EXTRA...`); the file must give port, dir and the workers.
fn launch_with_config(tmp: TempDir, dir: PathBuf, workers: usize, config: &Path, extra: &[&str]) -> Cluster {
    let mut args = vec!["cluster".to_string(), "--config".into(), config.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    Cluster::launch("cluster", tmp, dir, workers, args)
}

#[test]
fn config_file_gives_the_settings_and_flags_override_it() {
    let tmp = TempDir::new("cfg");
    let dir = tmp.path().join("d");
    let text =
        format!("port = 0\nworkers = 3\ndir = \"{}\"\npolicy = \"least-conn\"\nrebalance = true\n", dir.display());
    let cfg = write_config(tmp.path(), "c.toml", &text);
    {
        let c = launch_with_config(TempDir::new("cfg-a"), dir.clone(), 3, &cfg, &[]);
        let v: Value = serde_json::from_str(&c.status_cli(true)).expect("status --json");
        assert_eq!(v["workers"].as_array().map(Vec::len), Some(3), "workers from the file: {v}");
        assert_eq!(v["policy"], "least-conn", "policy from the file: {v}");
        assert_eq!(v["rebalance"], true, "a true switch is the flag: {v}");
        c.connect().ping(&json!("from the file"));
    }
    // The same file with flags: the flags win, the rest still comes from it.
    let c = launch_with_config(tmp, dir, 2, &cfg, &["--workers", "2", "--policy", "round-robin"]);
    let v = c.status();
    assert_eq!(v["workers"].as_array().map(Vec::len), Some(2), "--workers overrides the file: {v}");
    assert_eq!(v["policy"], "round-robin", "--policy overrides the file: {v}");
    assert_eq!(v["rebalance"], true, "untouched settings stay: {v}");
}

#[test]
fn config_file_errors_name_the_file_line_and_key() {
    let tmp = TempDir::new("cfg-bad");
    let dir = tmp.path().join("d");
    let d = dir.display();
    let cases = [
        ("unknown.toml", format!("port = 0\ndir = \"{d}\"\nworkerz = 3\n"), "line 3: unknown setting `workerz`"),
        ("syntax.toml", format!("port = 0\ndir = \"{d}\"\nworkers = \n"), "bad TOML at line 3"),
        ("value.toml", format!("port = 0\ndir = \"{d}\"\nworkers = 0\n"), "line 3: workers = 0"),
        ("table.toml", "[cluster]\nport = 0\n".to_string(), "line 1: [cluster] is a table"),
    ];
    for (name, text, want) in cases {
        let cfg = write_config(tmp.path(), name, &text);
        let (code, out, err) = run(bin().as_ref(), &["cluster", "--config", cfg.to_str().unwrap()]);
        assert_ne!(code, 0, "{name}: must not start; stdout {out}");
        assert!(!out.contains("ready"), "{name}: started: {out}");
        assert!(err.contains(&cfg.display().to_string()), "{name}: the file is named: {err}");
        assert!(err.contains(want), "{name}: want {want:?} in: {err}");
    }
    // A missing file.
    let (code, _, err) = run(bin().as_ref(), &["cluster", "--config", "/nonexistent/handoff.toml"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("config /nonexistent/handoff.toml: No such file"), "{err}");
    assert!(!dir.exists(), "nothing was started");
}

#[test]
fn check_validates_without_starting_anything() {
    let tmp = TempDir::new("cfg-check");
    let dir = tmp.path().join("d");
    let d = dir.display();
    let good = write_config(
        tmp.path(),
        "good.toml",
        &format!("port = 7100\nworkers = 2\ndir = \"{d}\"\nmax_frame = 4096\nmax_conns = 1000\nidle_timeout = 30\n"),
    );
    let (code, out, err) = run(bin().as_ref(), &["check", "--config", good.to_str().unwrap()]);
    assert_eq!(code, 0, "stdout {out}\nstderr {err}");
    assert_eq!(out.trim(), format!("handoff: config {} is ok", good.display()));
    assert!(!dir.exists(), "check creates nothing");
    // Valid for a cluster, not for a node (no --name; --policy is no node flag).
    let (code, _, err) = run(bin().as_ref(), &["check", "--config", good.to_str().unwrap(), "--mode", "node"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--name"), "node needs a name: {err}");

    let not_exec = tmp.path().join("worker.sh");
    std::fs::write(&not_exec, "#!/bin/sh\n").unwrap();
    let base = format!("port = 7100\ndir = \"{d}\"\n");
    let cases = [
        ("workers = 2000\n".to_string(), "2000 workers: give 1 to 1024"),
        (format!("worker_cmd = \"{}\"\n", not_exec.display()), "cannot be run"),
        ("policy = \"shared\"\nmax_conns = 10\n".to_string(), "--max-conns needs the master"),
        ("policy = \"fastest\"\n".to_string(), "invalid value 'fastest'"),
        ("host = \"no-such-host.invalid\"\n".to_string(), "--host no-such-host.invalid"),
        ("access_log = \"/nonexistent/dir/access.log\"\n".to_string(), "--access-log /nonexistent/dir/access.log"),
        ("max_frame = -1\n".to_string(), "max-frame"),
    ];
    for (extra, want) in cases {
        let cfg = write_config(tmp.path(), "bad.toml", &format!("{base}{extra}"));
        let (code, out, err) = run(bin().as_ref(), &["check", "--config", cfg.to_str().unwrap()]);
        assert_eq!(code, 1, "{extra:?}: stdout {out} stderr {err}");
        assert!(err.contains(&cfg.display().to_string()) && err.contains(want), "{extra:?}: want {want:?} in: {err}");
    }
    // A --dir open to other users is refused at start; check says so too.
    let open_dir = tmp.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = write_config(tmp.path(), "dir.toml", &format!("port = 1\ndir = \"{}\"\n", open_dir.display()));
    let (code, _, err) = run(bin().as_ref(), &["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("open to other users"), "{err}");
}

#[test]
fn service_options_come_from_the_config_too() {
    let tmp = TempDir::new("cfg-svc");
    let dir = tmp.path().join("d");
    let cfg = write_config(
        tmp.path(),
        "c.toml",
        &format!("port = 0\nworkers = 1\ndir = \"{}\"\nmax_frame = 64\n", dir.display()),
    );
    let c = launch_with_config(TempDir::new("cfg-svc2"), dir, 1, &cfg, &[]);
    let mut ok = c.connect();
    ok.ping(&json!("short"));
    // A frame over max_frame = 64 closes the connection (the default is 1 MiB).
    let mut big = c.connect();
    big.send(&json!({"in": "ping", "params": "x".repeat(100)}));
    big.expect_closed(Duration::from_secs(5)).expect("a frame over max_frame closes the connection");
    ok.ping(&json!("still fine"));

    // Another service binary checks its own options: the http example's
    // max_body is a setting there, and not for handoff.
    let http = crate::http::http_bin();
    let hcfg = write_config(
        tmp.path(),
        "h.toml",
        &format!("port = 8080\ndir = \"{}\"\nmax_body = 100\n", tmp.path().join("h").display()),
    );
    let (code, out, err) = run(http.as_os_str(), &["check", "--config", hcfg.to_str().unwrap()]);
    assert_eq!(code, 0, "http check: {out} {err}");
    assert!(out.starts_with("http: config "), "{out}");
    let (code, _, err) = run(bin().as_ref(), &["check", "--config", hcfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unknown setting `max_body`"), "{err}");
}

/// Whether a reply waits on the connection (a byte can be peeked at once).
fn has_reply(r: &Rpc) -> bool {
    r.s.set_nonblocking(true).unwrap();
    let got = r.s.peek(&mut [0u8; 1]).map(|n| n > 0).unwrap_or(false);
    r.s.set_nonblocking(false).unwrap();
    got
}

#[test]
fn max_conns_leaves_the_rest_in_the_backlog_until_connections_close() {
    const MAX: u64 = 100;
    const CLIENTS: usize = 300;
    let c = Cluster::start(2, &["--max-conns", &MAX.to_string()]);
    // Every client connects (the kernel's backlog takes them) and asks.
    let mut conns: Vec<Option<Rpc>> = (0..CLIENTS)
        .map(|i| {
            let mut r = c.connect();
            r.send(&json!({"in": "ping", "params": i}));
            Some(r)
        })
        .collect();
    let v = c.wait_status("the limit reached", STATS_TIMEOUT, |v| v["at_limit"] == true);
    assert_eq!(v["open"], json!(MAX), "{v}");
    assert_eq!(v["max_conns"], json!(MAX), "{v}");
    let mut replies = 0;
    let mut seen: HashSet<usize> = HashSet::new();
    let started = Instant::now();
    while replies < CLIENTS {
        // The ones with a reply get it, then close; the master then
        // accepts as many from the backlog.
        let v = c.status();
        let have: Vec<usize> =
            conns.iter().enumerate().filter(|(_, r)| r.as_ref().is_some_and(has_reply)).map(|(i, _)| i).collect();
        let open = v["open"].as_u64().unwrap();
        assert!(open <= MAX, "{open} open connections over --max-conns {MAX}: {v}");
        let open_workers = sum_field(&v, "open");
        assert!(open_workers <= MAX, "{v}");
        // Never more served than the limit: clients we have not closed
        // that have an answer are at most MAX.
        assert!(have.len() as u64 <= MAX, "{} clients answered at once", have.len());
        for i in have {
            let mut r = conns[i].take().unwrap();
            assert_eq!(r.recv(), json!({"out": "pong", "result": i}), "client {i}");
            assert!(seen.insert(i));
            replies += 1;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{replies} of {CLIENTS} answered in 60 s: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(seen.len(), CLIENTS);
    c.wait_status("every connection closed", STATS_TIMEOUT, |v| v["open"] == 0 && v["at_limit"] == false);
    // Accepting normally again.
    c.connect().ping(&json!("after"));
}

#[test]
fn max_conns_refused_with_the_shared_policy() {
    let tmp = TempDir::new("maxc");
    let (code, out, err) = run(
        bin().as_ref(),
        &[
            "cluster",
            "--port",
            "0",
            "--dir",
            tmp.path().join("d").to_str().unwrap(),
            "--policy",
            "shared",
            "--max-conns",
            "5",
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("--max-conns") && err.contains("--policy shared"), "{err}");
}

/// The access log's lines, parsed: one map of `key=value` fields (and
/// `time`) per line.
fn access_lines(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let mut f = std::collections::HashMap::new();
            let mut words = l.split(' ');
            f.insert("time".to_string(), words.next().unwrap_or("").to_string());
            for w in words {
                let (k, v) = w.split_once('=').unwrap_or_else(|| panic!("bad field {w:?} in {l:?}"));
                f.insert(k.to_string(), v.to_string());
            }
            f
        })
        .collect()
}

#[track_caller]
fn wait_lines(path: &Path, n: usize) -> Vec<std::collections::HashMap<String, String>> {
    let mut lines = Vec::new();
    let ok = poll_until(Duration::from_secs(5), || {
        lines = access_lines(path);
        lines.len() >= n
    });
    assert!(
        ok,
        "{} has {} of {n} lines:\n{}",
        path.display(),
        lines.len(),
        std::fs::read_to_string(path).unwrap_or_default()
    );
    lines
}

#[test]
fn idle_timeout_closes_idle_connections_only() {
    let tmp = TempDir::new("idle");
    let log = tmp.path().join("access.log");
    let c = Cluster::start(2, &["--idle-timeout", "1", "--access-log", log.to_str().unwrap()]);
    let mut idle = c.connect();
    idle.ping(&json!(1));
    let mut partial = c.connect();
    partial.send_raw(&[10, 0]); // half a frame header, then nothing
    let mut active = c.connect();
    let t = Instant::now();
    // The active one pings every 300 ms for 2.5 s: never idle for 1 s.
    while t.elapsed() < Duration::from_millis(2500) {
        active.ping(&json!(t.elapsed().as_millis() as u64));
        std::thread::sleep(Duration::from_millis(300));
    }
    idle.expect_closed(Duration::from_millis(100)).expect("the idle connection is closed by then");
    partial.expect_closed(Duration::from_millis(100)).expect("a stalled partial request is idle too");
    active.ping(&json!("still open"));
    let lines = wait_lines(&log, 2);
    let ends: Vec<&str> = lines.iter().map(|l| l["end"].as_str()).collect();
    assert_eq!(ends, ["idle_timeout", "idle_timeout"], "{lines:?}");
    for l in &lines {
        let secs: f64 = l["duration"].parse().unwrap();
        assert!((0.9..2.5).contains(&secs), "closed after {secs} s, not about 1: {l:?}");
    }
    let idle_line = lines.iter().find(|l| l["requests"] == "1").expect("the idle connection's line");
    assert_eq!(idle_line["client"], idle.s.local_addr().unwrap().to_string());
}

#[test]
fn access_log_has_a_line_per_connection_and_reopens_on_usr1() {
    const N: usize = 10;
    let tmp = TempDir::new("alog");
    let log = tmp.path().join("access.log");
    let c = Cluster::start(2, &["--access-log", log.to_str().unwrap()]);
    let mut expect = std::collections::HashMap::new();
    for i in 0..N {
        let mut r = c.connect();
        let mut sent = 0;
        let mut got = 0;
        for k in 0..(i % 3 + 1) {
            let req = json!({"in": "ping", "params": [i, k]});
            sent += frame(&req).len();
            let reply = r.call(&req);
            got += frame(&reply).len();
        }
        let who = r.call(&json!({"in": "whoami"}));
        sent += frame(&json!({"in": "whoami"})).len();
        got += frame(&who).len();
        let worker = who["result"]["worker"].as_u64().unwrap() as usize;
        expect.insert(r.s.local_addr().unwrap().to_string(), (i % 3 + 2, sent, got, worker));
        r.s.shutdown(std::net::Shutdown::Write).unwrap();
        r.expect_closed(Duration::from_secs(5)).unwrap();
    }
    let lines = wait_lines(&log, N);
    assert_eq!(lines.len(), N, "one line per connection");
    for l in &lines {
        let (requests, sent, got, worker) = expect[&l["client"]];
        assert_eq!(l["requests"], requests.to_string(), "{l:?}");
        assert_eq!(l["in"], sent.to_string(), "{l:?}");
        assert_eq!(l["out"], got.to_string(), "{l:?}");
        assert_eq!(l["worker"], worker.to_string(), "{l:?}");
        assert_eq!(l["gen"], "1");
        assert_eq!(l["end"], "client_eof", "{l:?}");
        assert_eq!(l["moves"], "0", "{l:?}");
        assert!(l["time"].ends_with('Z') && l["time"].len() == 27, "{l:?}");
        let secs: f64 = l["duration"].parse().unwrap();
        assert!((0.0..5.0).contains(&secs), "{l:?}");
    }

    // Log rotation: rename, USR1 to the master; new lines go to a new file.
    let rotated = tmp.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    kill_pid(c.master_pid(), libc::SIGUSR1);
    let mut after = 0;
    // Each worker reopens when it reads the order: pairs of connections
    // (one per worker, round-robin) until both workers write to the new file.
    let reopened = poll_until(Duration::from_secs(5), || {
        for _ in 0..2 {
            c.connect().ping(&json!("after"));
            after += 1;
        }
        // Every line lands in one file or the other.
        let landed =
            poll_until(Duration::from_secs(5), || access_lines(&rotated).len() + access_lines(&log).len() == N + after);
        assert!(
            landed,
            "lines lost: {} connections, {} + {} lines",
            N + after,
            access_lines(&rotated).len(),
            access_lines(&log).len()
        );
        access_lines(&log).iter().map(|l| l["worker"].clone()).collect::<HashSet<_>>().len() == 2
    });
    assert!(reopened, "the workers never wrote to the new file after USR1");
    let old = access_lines(&rotated);
    assert!(old.len() >= N && old.len() < N + after, "the lines before USR1 stay in the renamed file: {}", old.len());
    // From now on everything goes to the new file.
    let before = access_lines(&log).len();
    for _ in 0..4 {
        c.connect().ping(&json!("later"));
    }
    wait_lines(&log, before + 4);
    assert_eq!(access_lines(&rotated).len(), old.len(), "nothing more in the renamed file");
}

#[test]
fn access_log_counts_a_connection_across_a_restart() {
    let tmp = TempDir::new("alog-r");
    let log = tmp.path().join("access.log");
    let c = Cluster::start(2, &["--access-log", log.to_str().unwrap()]);
    let mut r = c.connect();
    r.ping(&json!("before"));
    c.restart_ok();
    assert_eq!(r.whoami()["gen"], json!(2), "the connection moved to generation 2");
    r.ping(&json!("after"));
    let me = r.s.local_addr().unwrap().to_string();
    r.s.shutdown(std::net::Shutdown::Write).unwrap();
    r.expect_closed(Duration::from_secs(5)).unwrap();
    // (`handoff restart` probes the port with a connection of its own.)
    let mut lines = Vec::new();
    poll_until(Duration::from_secs(5), || {
        lines = access_lines(&log);
        lines.iter().any(|l| l["client"] == me)
    });
    let mine: Vec<_> = lines.iter().filter(|l| l["client"] == me).collect();
    assert_eq!(mine.len(), 1, "one line for the whole life, none at the move: {lines:?}");
    let l = mine[0];
    assert_eq!(l["moves"], "1", "{l:?}");
    assert_eq!(l["gen"], "2", "{l:?}");
    assert_eq!(l["requests"], "3", "both generations' requests: {l:?}");
    assert_eq!(l["end"], "client_eof", "{l:?}");
}
