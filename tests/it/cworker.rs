//! C workers (issue 11): clusters whose workers are the C programs of
//! `examples/c/` on libhandoff (`--worker-cmd`), built by `make` into
//! `build/`. They must serve the rpc protocol as the Rust workers do and
//! survive restarts, kills and stops the same way.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::cluster_support::*;
use crate::support::*;

// ------------------------------------------------------------------ helpers

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// `build/NAME`, made by `make`: fails (never skips) if it is missing or
/// older than one of `sources` (its prerequisites in the Makefile, so that
/// `make` always cures it; `make test` builds them first).
fn c_artifact(name: &str, sources: &[&str]) -> PathBuf {
    let path = root().join("build").join(name);
    let Some(built) = mtime(&path) else {
        panic!(
            "{} is missing: run `make` first (it builds libhandoff and the C workers into build/; `make test` does both)",
            path.display()
        )
    };
    for s in sources {
        if mtime(&root().join(s)).is_some_and(|t| t > built) {
            panic!("{} is older than {s}: run `make` first", path.display());
        }
    }
    path
}

fn rpc_worker() -> PathBuf {
    c_artifact("rpc_worker", &["examples/c/rpc_worker.c", "csrc/handoff.h"])
}

fn echo_worker() -> PathBuf {
    c_artifact("echo_worker", &["examples/c/echo_worker.c", "csrc/handoff.h"])
}

/// The echo worker linked against build/libhandoff.so.
fn echo_worker_so() -> PathBuf {
    c_artifact("echo_worker_so", &["examples/c/echo_worker.c", "csrc/handoff.h"])
}

/// `handoff cluster --port 0 --workers N --dir D --worker-cmd PROGRAM EXTRA...`
fn c_cluster(workers: usize, program: &Path, extra: &[&str]) -> Cluster {
    let p = program.display().to_string();
    let mut args = vec!["--worker-cmd", p.as_str()];
    args.extend_from_slice(extra);
    Cluster::start(workers, &args)
}

/// One reply frame's body, as raw bytes.
fn recv_raw(r: &mut Rpc) -> Vec<u8> {
    let mut hdr = [0u8; 4];
    r.s.read_exact(&mut hdr).unwrap_or_else(|e| panic!("read reply header: {e}"));
    let mut body = vec![0u8; u32::from_le_bytes(hdr) as usize];
    r.s.read_exact(&mut body).unwrap_or_else(|e| panic!("read reply body: {e}"));
    body
}

/// A whoami from a C worker: exactly `{"worker","pid","gen","lang":"c"}`.
#[track_caller]
fn c_whoami(r: &mut Rpc) -> (u64, i32, u64) {
    let who = r.whoami();
    assert_eq!(who["lang"], "c", "{who}");
    assert_eq!(who.as_object().map(|o| o.len()), Some(4), "whoami fields: {who}");
    let w = who["worker"].as_u64().unwrap_or_else(|| panic!("worker in {who}"));
    let pid = who["pid"].as_i64().unwrap_or_else(|| panic!("pid in {who}")) as i32;
    let gen = who["gen"].as_u64().unwrap_or_else(|| panic!("gen in {who}"));
    (w, pid, gen)
}

/// A line client (echo workers).
struct Lines {
    rd: BufReader<TcpStream>,
}

impl Lines {
    fn open(port: u16) -> Lines {
        let s =
            TcpStream::connect(SocketAddrV4::new(LOCALHOST, port)).unwrap_or_else(|e| panic!("connect {port}: {e}"));
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        Lines { rd: BufReader::new(s) }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.rd.get_mut().write_all(bytes).unwrap_or_else(|e| panic!("write: {e}"));
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        match self.rd.read_line(&mut l) {
            Ok(0) => panic!("EOF where a line was expected"),
            Ok(_) => l,
            Err(e) => panic!("read line: {e}"),
        }
    }

    #[track_caller]
    fn echo(&mut self, text: &str) {
        self.send(format!("{text}\n").as_bytes());
        assert_eq!(self.line(), format!("{text}\n"));
    }
}

// -------------------------------------------------------------------- tests

#[test]
fn c_workers_answer_whoami_with_lang_c_from_distinct_workers() {
    let c = c_cluster(2, &rpc_worker(), &[]);
    let pids = c.worker_pids();
    let mut seen: BTreeMap<u64, i32> = BTreeMap::new();
    for _ in 0..6 {
        let mut r = c.connect();
        let (w, pid, gen) = c_whoami(&mut r);
        assert_eq!(gen, 1);
        assert_eq!(pids.get(w as usize), Some(&pid), "worker {w} answers with its pid (status: {pids:?})");
        seen.insert(w, pid);
        r.ping(&json!({"from": w}));
    }
    assert_eq!(seen.len(), 2, "round robin reaches both C workers: {seen:?}");
    assert_ne!(seen[&0], seen[&1], "two processes");
    let v = c.wait_status("served counts", STATS_TIMEOUT, |v| sum_field(v, "served") >= 12);
    assert!(worker_field(&v, "served").iter().all(|&n| n >= 6), "both workers count what they serve: {v}");
    let table = c.status_cli(false);
    assert!(table.contains("served"), "handoff status:\n{table}");
}

#[test]
fn c_worker_ping_echoes_the_exact_bytes_and_answers_bad_requests_with_errors() {
    let c = c_cluster(2, &rpc_worker(), &[]);
    // Values as JSON (what a client compares)...
    check_ping_echoes(|| c.connect(), &ping_values());
    let mut conn = c.connect();
    // ...and as bytes: params come back exactly as sent.
    for (req, params) in [
        (&br#"{"in":"ping","params": [1, 2.50, {"a" : "\u00fc"}] }"#[..], &br#"[1, 2.50, {"a" : "\u00fc"}]"#[..]),
        (br#"{"params":1e+05,"in":"ping"}"#, b"1e+05"),
        (br#"{"in":"p\u0069ng","params":"\ud83e\udd80"}"#, br#""\ud83e\udd80""#),
        (b"\t{ \"in\" : \"ping\" , \"params\" :\r\n-0 }\n", b"-0"),
        (br#"{"in":"ping","params":null}"#, b"null"),
    ] {
        conn.send_raw(&raw_frame(req));
        let mut want = br#"{"out":"pong","result":"#.to_vec();
        want.extend_from_slice(params);
        want.push(b'}');
        let got = recv_raw(&mut conn);
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want), "{}", String::from_utf8_lossy(req));
    }
    check_bad_requests_get_errors(|| c.connect(), &mut conn);
    assert_eq!(
        conn.call(&json!({"in": "dance"})),
        json!({"out": "error", "result": "unknown \"in\": \"dance\""}),
        "the unknown name is quoted back"
    );
}

#[test]
fn c_worker_takes_max_frame_from_the_environment_and_closes_an_oversize_frame() {
    const MAX: usize = 1024;
    let c = c_cluster(2, &rpc_worker(), &["--max-frame", &MAX.to_string()]);
    let mut bystander = c.connect();
    bystander.ping(&json!("before"));
    let pad = |len: usize| {
        let base = serde_json::to_vec(&ping_req(&json!(""))).unwrap().len();
        json!("p".repeat(len - base))
    };
    // Exactly --max-frame bytes is fine, on both workers.
    let x = pad(MAX);
    assert_eq!(serde_json::to_vec(&ping_req(&x)).unwrap().len(), MAX);
    for _ in 0..2 {
        c.connect().ping(&x);
    }
    // One byte more closes the connection, without an answer.
    let mut victim = c.connect();
    victim.ping(&json!(1));
    victim.send(&ping_req(&pad(MAX + 1)));
    victim.expect_closed(Duration::from_secs(5)).expect("a frame over --max-frame closes the connection");
    // A huge announced length, header only.
    let mut victim2 = c.connect();
    victim2.send_raw(&0xffff_fff0u32.to_le_bytes());
    victim2.expect_closed(Duration::from_secs(5)).expect("a 4 GiB length closes the connection");
    bystander.ping(&json!("after"));
    c.connect().ping(&json!("new"));
    let v = c.wait_status("the closes reported", STATS_TIMEOUT, |v| sum_field(v, "open") == 1);
    assert_eq!(worker_field(&v, "respawns"), vec![0, 0], "no worker died: {v}");
}

#[test]
fn c_worker_own_max_frame_flag_overrides_the_environment() {
    let tmp = TempDir::new("cmf");
    let wrapper = tmp.path().join("rpc_worker_64.sh");
    script(&wrapper, &format!("#!/bin/sh\nexec {} --max-frame 64 \"$@\"\n", rpc_worker().display()));
    // The master's default (1 MiB) reaches HANDOFF_OPT_MAX_FRAME; the flag wins.
    let c = c_cluster(1, &wrapper, &[]);
    let mut ok = c.connect();
    ok.send_raw(&raw_frame(&[b' '; 64]));
    assert_eq!(ok.recv()["out"], "error", "64 bytes of blanks: a bad request, answered");
    let mut victim = c.connect();
    victim.send_raw(&raw_frame(&[b' '; 65]));
    victim.expect_closed(Duration::from_secs(5)).expect("65 bytes > --max-frame 64 closes the connection");
    ok.ping(&json!(1));
}

/// Keep-alive load (the library form of `handoff client rpc --conns 50
/// --requests N`) across three restarts: no error, and the load still runs
/// when they are done.
#[test]
fn c_workers_restart_under_load_with_zero_errors() {
    const RESTARTS: u64 = 3;
    let c = c_cluster(2, &rpc_worker(), &[]);
    let old_workers = c.worker_pids();
    let mut kept = c.connect();
    assert_eq!(c_whoami(&mut kept).2, 1);
    let opts = c.rpc_opts(50, 10_000, false);
    let load = std::thread::spawn(move || handoff::client::rpc(&opts));
    c.wait_status("the load under way", Duration::from_secs(20), |v| sum_field(v, "served") >= 2000);
    let mut during = 0;
    for k in 1..=RESTARTS {
        let (gen, _pid) = c.restart_ok();
        assert_eq!(gen, k + 1);
        if !load.is_finished() {
            during += 1;
        }
        kept.ping(&json!(k));
        let (_, _, g) = c_whoami(&mut kept);
        assert_eq!(g, k + 1, "the kept connection moved to generation {}", k + 1);
    }
    let s = load.join().expect("load thread");
    assert!(s.passed() && s.errors == 0, "requests failed across the restarts: {s}");
    assert!(during >= 1, "the load ended before the first restart did; make it longer ({s})");
    eprintln!("C workers: {s} across {RESTARTS} restarts ({during} while it ran)");
    let mut fresh = c.connect();
    let (_, _, g) = c_whoami(&mut fresh);
    assert_eq!(g, RESTARTS + 1);
    let v = c.wait_status("served counts", STATS_TIMEOUT, |v| sum_field(v, "served") > 0);
    assert_eq!(v["gen"], json!(RESTARTS + 1));
    let table = c.status_cli(false);
    assert!(table.contains("served") && table.contains(&format!("generation {}", RESTARTS + 1)), "status:\n{table}");
    let ok = poll_until(EXIT_TIMEOUT, || old_workers.iter().all(|&p| !pid_alive(p)));
    assert!(ok, "generation 1 C workers still alive: {old_workers:?}");
}

/// Pipelined batches written in two pieces split at a random byte (often
/// mid-frame) while restarts run: every reply once, in order; partial
/// frames move with their connection (read-ahead through handoff_release).
#[test]
fn c_workers_move_partial_frames_across_restarts_in_order() {
    const RESTARTS: u64 = 3;
    let c = c_cluster(2, &rpc_worker(), &[]);
    let results = pipelined_restarts(&c, 20, 20, RESTARTS, true);
    assert_pipelined_ok(&results, RESTARTS + 1);
    for r in &results {
        let who = &r.as_ref().expect("checked").1;
        assert_eq!(who["result"]["lang"], "c", "{who}");
    }
    let v = c.status();
    assert!(sum_field(&v, "handed") > 0, "{v}");
}

#[test]
fn killed_c_worker_is_respawned_and_its_connections_rescued() {
    let c = c_cluster(2, &rpc_worker(), &[]);
    let before = c.worker_pids();
    // Idle connections held by worker 0 (round robin: every other one).
    let mut on0: Vec<Rpc> = Vec::new();
    for _ in 0..8 {
        let mut r = c.connect();
        if c_whoami(&mut r).0 == 0 {
            on0.push(r);
        }
    }
    assert!(on0.len() >= 2, "connections on worker 0: {}", on0.len());
    let opts = c.rpc_opts(4, 1500, true);
    let load = std::thread::spawn(move || handoff::client::rpc(&opts));
    c.wait_status("the load under way", Duration::from_secs(20), |v| sum_field(v, "served") >= 500);
    kill_pid(before[0], libc::SIGKILL);
    assert!(poll_until(EXIT_TIMEOUT, || !pid_alive(before[0])), "worker {} survived SIGKILL", before[0]);
    let v = c.wait_status("worker 0 respawned", Duration::from_secs(10), |v| {
        v["workers"][0]["respawns"] == json!(1)
            && v["workers"][0]["pid"].as_i64().is_some_and(|p| p as i32 != before[0])
    });
    assert!(!load.is_finished(), "the load ended before the kill took effect; make it longer");
    let s = load.join().expect("load thread");
    assert_worker_kill_lost_at_most_one(&s, "C worker 0");
    let new0 = v["workers"][0]["pid"].as_i64().unwrap() as i32;
    assert!(pid_alive(new0));
    assert_eq!(v["workers"][1]["pid"], json!(before[1]), "worker 1 untouched: {v}");
    // The dead worker's idle connections were rescued: they answer, from a live C worker.
    for (i, r) in on0.iter_mut().enumerate() {
        r.ping(&json!({"rescued": i}));
        let (w, pid, _) = c_whoami(r);
        assert!(pid != before[0] && [new0, before[1]].contains(&pid), "rescued connection {i} on worker {w} pid {pid}");
    }
    // The new worker 0 serves, in its slot.
    let served_by_new0 = (0..4).any(|_| {
        let mut r = c.connect();
        c_whoami(&mut r) == (0, new0, 1)
    });
    assert!(served_by_new0, "the respawned worker 0 (pid {new0}) takes new connections");
}

#[test]
fn c_workers_stop_on_sigterm_finishing_the_request_in_progress() {
    let mut c = c_cluster(2, &rpc_worker(), &["--grace", "5"]);
    check_sigterm_finishes_the_request_in_progress(&mut c);
}

#[test]
fn echo_worker_serves_and_moves_partial_lines_across_a_restart() {
    let c = c_cluster(2, &echo_worker(), &[]);
    let old = c.worker_pids();
    let mut conns: Vec<Lines> = (0..6).map(|_| Lines::open(c.port)).collect();
    for (i, l) in conns.iter_mut().enumerate() {
        l.echo(&format!("hello {i}"));
        l.send(format!("par{i}").as_bytes()); // half a line, then the restart
    }
    let mut piped = Lines::open(c.port);
    piped.send(b"one\ntwo\nthree\n");
    for want in ["one\n", "two\n", "three\n"] {
        assert_eq!(piped.line(), want);
    }
    let (gen, _) = c.restart_ok();
    assert_eq!(gen, 2);
    for (i, l) in conns.iter_mut().enumerate() {
        l.send(b"tial\n");
        assert_eq!(l.line(), format!("par{i}tial\n"), "connection {i}: the partial line moved with it");
        l.echo("after");
    }
    piped.echo("still here");
    Lines::open(c.port).echo("new");
    let ok = poll_until(EXIT_TIMEOUT, || old.iter().all(|&p| !pid_alive(p)));
    assert!(ok, "generation 1 echo workers still alive: {old:?}");
    let v = c.wait_status("served by generation 2", STATS_TIMEOUT, |v| sum_field(v, "served") >= 14);
    assert_eq!(v["gen"], json!(2));
    assert_eq!(worker_field(&v, "respawns"), vec![0, 0], "{v}");
}

#[test]
fn echo_worker_linked_against_the_shared_library_serves() {
    let c = c_cluster(1, &echo_worker_so(), &[]);
    let mut l = Lines::open(c.port);
    l.echo("shared");
    l.send(b"half");
    assert_eq!(c.restart_ok().0, 2);
    l.send(b" a line\n");
    assert_eq!(l.line(), "half a line\n");
}

/// `build/rpc_worker` under valgrind (memcheck), in a cluster that serves,
/// restarts twice under load and stops: every worker process exits 0 with
/// no memcheck error. Slow (valgrind); run it with
/// `cargo test --release --test it cworker -- --ignored` (needs valgrind).
#[test]
#[ignore = "slow, needs valgrind: cargo test --release --test it cworker -- --ignored"]
fn rpc_worker_under_valgrind_has_no_memcheck_error() {
    let worker = rpc_worker();
    let vg = std::process::Command::new("valgrind").arg("--version").output();
    assert!(vg.is_ok_and(|o| o.status.success()), "valgrind is not installed: `make memcheck-deps` installs it");
    let tmp = TempDir::new("cvg");
    let logs = tmp.path().join("vg");
    std::fs::create_dir_all(&logs).unwrap();
    let wrapper = tmp.path().join("rpc_worker_vg.sh");
    script(
        &wrapper,
        &format!(
            "#!/bin/sh\nexec valgrind -q --error-exitcode=99 --leak-check=full --show-leak-kinds=definite,indirect,possible \
             --errors-for-leak-kinds=definite,indirect,possible \
             --track-fds=no --log-file={}/w.%p.log {} \"$@\"\n",
            logs.display(),
            worker.display()
        ),
    );
    let mut c = c_cluster(2, &wrapper, &["--max-frame", "4096"]);
    let start = Instant::now();
    let mut kept = c.connect();
    c_whoami(&mut kept);
    kept.send_raw(&raw_frame(b"{\"in\":\"ping\",\"params\":\"\xff\"}"));
    assert_eq!(kept.recv()["out"], "error");
    let opts = c.rpc_opts(8, 400, false);
    let load = std::thread::spawn(move || handoff::client::rpc(&opts));
    for k in 1..=2 {
        assert_eq!(c.restart_ok().0, k + 1);
    }
    let s = load.join().expect("load thread");
    assert!(s.passed(), "load under valgrind: {s}");
    kept.ping(&json!("after"));
    let mut victim = c.connect();
    victim.send_raw(&0x10000u32.to_le_bytes());
    victim.expect_closed(Duration::from_secs(10)).expect("oversize frame closes");
    c.server.signal(libc::SIGTERM);
    let st = c.server.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "master exit after SIGTERM: {st}");
    // Every master reaps its workers before it exits: each of the 6
    // workers (3 generations of 2) has finished and written its log (-q:
    // empty unless memcheck found something).
    let n = std::fs::read_dir(&logs).map_or(0, |d| d.count());
    assert!(n >= 6, "{n} valgrind logs, expected one per worker (6)");
    let mut errors = String::new();
    for e in std::fs::read_dir(&logs).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        if !text.trim().is_empty() {
            errors.push_str(&format!("--- {} ---\n{text}\n", e.path().display()));
        }
    }
    let log = c.server.stderr_text();
    assert!(errors.is_empty(), "memcheck reports:\n{errors}");
    assert!(!log.contains("exited unexpectedly"), "a worker under valgrind failed:\n{log}");
    eprintln!("rpc_worker under valgrind: clean ({s}; {:?})", start.elapsed());
}
