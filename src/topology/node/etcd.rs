//! Node membership through etcd (`--etcd`): the manager registers its
//! node under `PREFIX + NAME` (value: its advertised address) with a lease
//! of `--etcd-ttl` seconds that it keeps alive, and watches the prefix.
//!
//! It talks to etcd's v3 JSON gateway with libevent's HTTP client
//! ([`HttpClient`]) on the master's loop. One round of registration:
//! keepalive of the lease it has (or a new grant, if none or it expired),
//! `kv/put` of the key on that lease, `kv/range` of the prefix (the
//! membership at revision R), then a `watch` from R+1 streaming every
//! change; a keepalive every TTL/3 after that. Any failure (refused,
//! timeout, error reply, the watch ending) makes etcd "unreachable": the
//! membership stays as last seen, the failure is logged (rate-limited),
//! and the round starts again after a backoff (100 ms doubling to 5 s)
//! on the next endpoint. A lease etcd no longer knows is granted anew and
//! the key put again.
//!
//! Leaving: [`Etcd::leave`] (a clean stop) deletes the key and revokes the
//! lease; [`Etcd::handover`] (a successor master took over, and put the key
//! on its own lease) stops the keepalives and leaves both alone.
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::core::reactor::{Base, Event, HttpClient, HttpResult, Interest};

/// Reconnect backoff: from 100 ms, doubling, up to 5 s.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The longest watch message taken (one response of many events).
const WATCH_BUF_MAX: usize = 16 << 20;
/// While etcd stays unreachable, one log line per this long.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// `--etcd`, `--etcd-prefix`, `--etcd-ttl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// The client URLs as given (`http://HOST:PORT`).
    pub urls: Vec<String>,
    /// Each URL's host and port.
    pub endpoints: Vec<(String, u16)>,
    /// Key prefix (`/handoff/nodes/`); a node's key is prefix + name.
    pub prefix: String,
    /// Lease TTL in seconds.
    pub ttl: u64,
}

/// The default `--etcd-prefix`.
pub const DEFAULT_PREFIX: &str = "/handoff/nodes/";
/// The default `--etcd-ttl`.
pub const DEFAULT_TTL: u64 = 10;

impl EtcdConfig {
    /// Parses `http://HOST:PORT[,http://HOST:PORT...]` (port 2379 when
    /// left out; an IPv6 HOST in brackets), a non-empty prefix and a TTL
    /// of 1 to 86400 seconds.
    pub fn parse(urls: &str, prefix: &str, ttl: u64) -> io::Result<EtcdConfig> {
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        let mut cfg = EtcdConfig { urls: Vec::new(), endpoints: Vec::new(), prefix: prefix.to_string(), ttl };
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let rest = url.strip_prefix("http://").ok_or_else(|| {
                bad(format!("--etcd {url:?}: expected http://HOST:PORT (etcd's client URL; https is not supported)"))
            })?;
            let hostport = rest.trim_end_matches('/');
            if hostport.is_empty() || hostport.contains('/') {
                return Err(bad(format!("--etcd {url:?}: expected http://HOST:PORT, without a path")));
            }
            let (host, port) = match hostport.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.ends_with(']')) => {
                    (h, p.parse::<u16>().map_err(|e| bad(format!("--etcd {url:?}: port: {e}")))?)
                }
                _ => (hostport, 2379),
            };
            if host.contains(':') && !host.starts_with('[') {
                return Err(bad(format!("--etcd {url:?}: write an IPv6 address in brackets")));
            }
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            if host.is_empty() || port == 0 {
                return Err(bad(format!("--etcd {url:?}: expected http://HOST:PORT")));
            }
            cfg.urls.push(url.to_string());
            cfg.endpoints.push((host, port));
        }
        if cfg.endpoints.is_empty() {
            return Err(bad("--etcd: no URL given".into()));
        }
        if prefix.is_empty() {
            return Err(bad("--etcd-prefix: empty".into()));
        }
        if !(1..=86_400).contains(&ttl) {
            return Err(bad(format!("--etcd-ttl {ttl}: expected 1 to 86400 seconds")));
        }
        Ok(cfg)
    }

    /// The first key after every key with the prefix (etcd's `range_end`).
    fn range_end(&self) -> Vec<u8> {
        let mut end = self.prefix.as_bytes().to_vec();
        while let Some(last) = end.pop() {
            if last < 0xff {
                end.push(last + 1);
                return end;
            }
        }
        vec![0]
    }
}

/// Whether the node is registered and watching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Registering (the first round, or again after an outage).
    Connecting,
    /// Lease kept alive, key put, watching.
    Connected,
    /// The last round failed; retrying with backoff.
    Unreachable,
    /// Left (key deleted) or handed over: nothing more is sent.
    Stopped,
}

impl State {
    /// As `handoff status` shows it.
    pub fn name(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Connected => "connected",
            State::Unreachable => "unreachable",
            State::Stopped => "stopped",
        }
    }
}

/// Membership as etcd last said: name -> advertised address (this node's
/// own key left out).
pub type Members = BTreeMap<String, String>;

/// The etcd side of one node: owned by its manager, reporting membership
/// changes to `on_change`.
pub struct Etcd {
    me: Weak<RefCell<Etcd>>,
    base: Base,
    cfg: EtcdConfig,
    name: String,
    /// The value registered: the advertised address.
    value: String,
    on_change: Rc<dyn Fn(Members)>,
    /// The endpoint in use (the next one after a failure).
    endpoint: usize,
    unary: Option<HttpClient>,
    watch: Option<HttpClient>,
    /// Bytes of the watch stream not yet a whole message.
    watch_buf: Vec<u8>,
    lease: Option<i64>,
    members: Members,
    state: State,
    /// Bumped at each round: replies of an older round are ignored.
    round: u64,
    backoff: Duration,
    timer: Option<Event>,
    /// The first failure of this outage, and the last logged.
    down_since: Option<Instant>,
    logged: Option<Instant>,
    last_error: String,
    /// Requests of a leave still in flight.
    leaving: usize,
    /// Set once `changed` members are waiting for `on_change`.
    changed: bool,
}

/// base64 (standard alphabet, padded), as etcd's gateway wants bytes.
pub fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes base64 (standard alphabet, padding optional); `None` if bad.
pub fn unb64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for ch in s.bytes().filter(|&c| c != b'=') {
        let v = match ch {
            b'A'..=b'Z' => ch - b'A',
            b'a'..=b'z' => ch - b'a' + 26,
            b'0'..=b'9' => ch - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// An int64 of the gateway's JSON (a string) or a number.
fn int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// Runs `f` on the client behind `w`, then reports changed members with
/// the client no longer borrowed.
fn with(w: &Weak<RefCell<Etcd>>, f: impl FnOnce(&mut Etcd)) {
    let Some(e) = w.upgrade() else { return };
    let report = {
        let mut e = e.borrow_mut();
        f(&mut e);
        std::mem::take(&mut e.changed).then(|| (e.on_change.clone(), e.members.clone()))
    };
    if let Some((on_change, members)) = report {
        on_change(members);
    }
}

impl Etcd {
    /// Starts registering `name` at `value` (its advertised address);
    /// `on_change` gets the whole membership (other nodes) at each change.
    pub fn start(
        base: &Base,
        cfg: EtcdConfig,
        name: &str,
        value: &str,
        on_change: impl Fn(Members) + 'static,
    ) -> Rc<RefCell<Etcd>> {
        let e = Rc::new_cyclic(|me| {
            RefCell::new(Etcd {
                me: me.clone(),
                base: base.clone(),
                cfg,
                name: name.to_string(),
                value: value.to_string(),
                on_change: Rc::new(on_change),
                endpoint: 0,
                unary: None,
                watch: None,
                watch_buf: Vec::new(),
                lease: None,
                members: Members::new(),
                state: State::Connecting,
                round: 0,
                backoff: BACKOFF_MIN,
                timer: None,
                down_since: None,
                logged: None,
                last_error: String::new(),
                leaving: 0,
                changed: false,
            })
        });
        log::info!(
            "etcd {}: registering node {name} at {value} under {} (lease {} s)",
            e.borrow().cfg.urls.join(","),
            e.borrow().cfg.prefix,
            e.borrow().cfg.ttl
        );
        e.borrow_mut().begin_round();
        e
    }

    /// The node's key.
    fn key(&self) -> String {
        format!("{}{}", self.cfg.prefix, self.name)
    }

    /// Each request's deadline: a third of the TTL, 0.5 to 2 s.
    fn timeout(&self) -> Duration {
        Duration::from_secs_f64((self.cfg.ttl as f64 / 3.0).clamp(0.5, 2.0))
    }

    fn url(&self) -> &str {
        &self.cfg.urls[self.endpoint]
    }

    /// The membership etcd last showed (other nodes).
    pub fn members(&self) -> &Members {
        &self.members
    }

    /// The status JSON's `"etcd"` object.
    pub fn status(&self) -> Value {
        json!({
            "endpoints": self.cfg.urls,
            "endpoint": self.url(),
            "state": self.state.name(),
            "lease": self.lease,
            "prefix": self.cfg.prefix,
            "key": self.key(),
            "ttl": self.cfg.ttl,
            "advertise": self.value,
            "error": if self.state == State::Connected || self.last_error.is_empty() {
                Value::Null
            } else {
                json!(self.last_error)
            },
        })
    }

    /// POSTs `body` to `path` on the unary connection; `then` gets the
    /// reply's JSON if this round is still current.
    fn call(&mut self, path: &'static str, body: Value, then: impl FnOnce(&mut Etcd, Result<Value, String>) + 'static) {
        if self.unary.is_none() {
            let (host, port) = self.cfg.endpoints[self.endpoint].clone();
            match HttpClient::new(&self.base, &host, port, Some(self.timeout())) {
                Ok(c) => self.unary = Some(c),
                Err(e) => return self.fail(&format!("{path}: {e}")),
            }
        }
        let (w, round) = (self.me.clone(), self.round);
        let done = move |r: HttpResult| {
            with(&w, |e| {
                if e.round != round {
                    return;
                }
                then(e, reply_json(path, r))
            })
        };
        let body = body.to_string().into_bytes();
        if let Err(err) = self.unary.as_mut().expect("made above").post(path, &body, None, done) {
            self.fail(&format!("{path}: {err}"));
        }
    }

    /// A new round: keep the lease alive (or grant one), put the key,
    /// read the prefix, watch it.
    fn begin_round(&mut self) {
        self.round += 1;
        self.watch = None;
        self.watch_buf.clear();
        self.timer = None;
        if self.state == State::Stopped {
            return;
        }
        match self.lease {
            Some(id) => self.call("/v3/lease/keepalive", json!({"ID": id.to_string()}), move |e, r| match r {
                Ok(v) if int(&v["result"]["TTL"]).unwrap_or(0) > 0 => e.put(),
                Ok(_) => {
                    log::warn!("etcd {}: lease {id:x} expired; granting a new one", e.url());
                    e.lease = None;
                    e.grant();
                }
                Err(why) => e.fail(&why),
            }),
            None => self.grant(),
        }
    }

    fn grant(&mut self) {
        self.call("/v3/lease/grant", json!({"TTL": self.cfg.ttl.to_string()}), |e, r| match r {
            Ok(v) => match int(&v["ID"]) {
                Some(id) => {
                    e.lease = Some(id);
                    e.put();
                }
                None => e.fail(&format!("lease/grant: no ID in {v}")),
            },
            Err(why) => e.fail(&why),
        });
    }

    fn put(&mut self) {
        let Some(lease) = self.lease else { return self.grant() };
        let body =
            json!({"key": b64(self.key().as_bytes()), "value": b64(self.value.as_bytes()), "lease": lease.to_string()});
        self.call("/v3/kv/put", body, |e, r| match r {
            Ok(_) => {
                // Keepalives from now on, whatever the watch does.
                e.arm_keepalive();
                e.range()
            }
            Err(why) if why.contains("lease not found") => {
                e.lease = None;
                e.grant();
            }
            Err(why) => e.fail(&why),
        });
    }

    fn range(&mut self) {
        let body = json!({"key": b64(self.cfg.prefix.as_bytes()), "range_end": b64(&self.cfg.range_end())});
        self.call("/v3/kv/range", body, |e, r| match r {
            Ok(v) => {
                let mut members = Members::new();
                for kv in v["kvs"].as_array().into_iter().flatten() {
                    if let Some((name, addr)) = e.entry(kv) {
                        members.insert(name, addr);
                    }
                }
                e.set_members(members);
                let rev = int(&v["header"]["revision"]).unwrap_or(0);
                e.start_watch(rev + 1);
            }
            Err(why) => e.fail(&why),
        });
    }

    /// A key-value of the prefix as (name, address); `None` for our own
    /// key and for keys not of the prefix.
    fn entry(&self, kv: &Value) -> Option<(String, String)> {
        let key = String::from_utf8(unb64(kv["key"].as_str()?)?).ok()?;
        let name = key.strip_prefix(&self.cfg.prefix)?;
        if name.is_empty() || name == self.name {
            return None;
        }
        let value = kv["value"].as_str().map_or(Some(Vec::new()), unb64)?;
        Some((name.to_string(), String::from_utf8(value).ok()?))
    }

    fn set_members(&mut self, members: Members) {
        if members != self.members {
            self.members = members;
            self.changed = true;
        }
    }

    fn start_watch(&mut self, from: i64) {
        let (host, port) = self.cfg.endpoints[self.endpoint].clone();
        let mut c = match HttpClient::new(&self.base, &host, port, None) {
            Ok(c) => c,
            Err(e) => return self.fail(&format!("watch: {e}")),
        };
        let body = json!({"create_request": {
            "key": b64(self.cfg.prefix.as_bytes()),
            "range_end": b64(&self.cfg.range_end()),
            "start_revision": from.to_string(),
        }});
        let (w, round) = (self.me.clone(), self.round);
        let w2 = w.clone();
        let chunk = Box::new(move |bytes: &[u8]| {
            let bytes = bytes.to_vec();
            with(&w, |e| {
                if e.round == round {
                    e.on_watch_bytes(&bytes);
                }
            })
        });
        let done = move |r: HttpResult| {
            with(&w2, |e| {
                if e.round == round {
                    let why = match r {
                        Ok(rep) => format!("watch ended (HTTP {})", rep.status),
                        Err(why) => format!("watch: {why}"),
                    };
                    e.fail(&why);
                }
            })
        };
        match c.post("/v3/watch", body.to_string().as_bytes(), Some(chunk), done) {
            Ok(()) => self.watch = Some(c),
            Err(e) => self.fail(&format!("watch: {e}")),
        }
    }

    fn on_watch_bytes(&mut self, bytes: &[u8]) {
        self.watch_buf.extend_from_slice(bytes);
        let buf = std::mem::take(&mut self.watch_buf);
        let mut stream = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
        let mut used = 0;
        let mut msgs = Vec::new();
        loop {
            match stream.next() {
                Some(Ok(v)) => {
                    used = stream.byte_offset();
                    msgs.push(v);
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => return self.fail(&format!("watch: bad message: {e}")),
                None => break,
            }
        }
        self.watch_buf = buf[used..].to_vec();
        if self.watch_buf.len() > WATCH_BUF_MAX {
            return self.fail(&format!("watch: a message over {WATCH_BUF_MAX} bytes"));
        }
        for v in msgs {
            self.on_watch_msg(&v);
            if self.state == State::Stopped || self.watch.is_none() {
                return;
            }
        }
    }

    fn on_watch_msg(&mut self, v: &Value) {
        let r = &v["result"];
        if !v["error"].is_null() {
            return self.fail(&format!("watch: {}", v["error"]));
        }
        if r["created"] == json!(true) {
            self.connected();
        }
        if r["canceled"] == json!(true) {
            let why = r["cancel_reason"].as_str().unwrap_or("canceled");
            return self.fail(&format!("watch canceled: {why} (compacted to {})", r["compact_revision"]));
        }
        let mut members = self.members.clone();
        let mut lost_own = false;
        for ev in r["events"].as_array().into_iter().flatten() {
            let kv = &ev["kv"];
            let delete = ev["type"] == "DELETE";
            let own = kv["key"].as_str() == Some(b64(self.key().as_bytes()).as_str());
            if own && delete {
                lost_own = true;
                continue;
            }
            let Some(key) = kv["key"].as_str().and_then(unb64).and_then(|k| String::from_utf8(k).ok()) else {
                continue;
            };
            let Some(name) = key.strip_prefix(&self.cfg.prefix) else { continue };
            if delete {
                if members.remove(name).is_some() {
                    log::info!("etcd: node {name} left");
                }
            } else if let Some((name, addr)) = self.entry(kv) {
                if members.get(&name) != Some(&addr) {
                    log::info!("etcd: node {name} at {addr}");
                }
                members.insert(name, addr);
            }
        }
        self.set_members(members);
        if lost_own {
            log::warn!("etcd: our key {} was deleted; registering again", self.key());
            self.begin_round();
        }
    }

    /// Registered and watching: keepalives from now on.
    fn connected(&mut self) {
        if self.state != State::Connected {
            match self.down_since.take() {
                Some(t) => log::warn!(
                    "etcd {}: connected again after {:.1} s; lease {:x}, {} other node(s)",
                    self.url(),
                    t.elapsed().as_secs_f64(),
                    self.lease.unwrap_or(0),
                    self.members.len()
                ),
                None => log::info!(
                    "etcd {}: registered {} (lease {:x}), {} other node(s)",
                    self.url(),
                    self.key(),
                    self.lease.unwrap_or(0),
                    self.members.len()
                ),
            }
        }
        self.state = State::Connected;
        self.backoff = BACKOFF_MIN;
        self.logged = None;
    }

    /// The next keepalive in a third of the TTL.
    fn arm_keepalive(&mut self) {
        self.arm(Duration::from_secs_f64((self.cfg.ttl as f64 / 3.0).max(0.3)), |e| e.keepalive());
    }

    fn keepalive(&mut self) {
        let Some(id) = self.lease else { return self.begin_round() };
        self.call("/v3/lease/keepalive", json!({"ID": id.to_string()}), move |e, r| match r {
            Ok(v) if int(&v["result"]["TTL"]).unwrap_or(0) > 0 => e.arm_keepalive(),
            Ok(_) => {
                log::warn!("etcd {}: lease {id:x} expired; registering again", e.url());
                e.lease = None;
                e.begin_round();
            }
            Err(why) => e.fail(&why),
        });
    }

    /// Runs `f` after `after` (replacing the pending timer).
    fn arm(&mut self, after: Duration, f: impl Fn(&mut Etcd) + 'static) {
        let w = self.me.clone();
        let t = Event::new(&self.base, -1, Interest::Timer, move || with(&w, &f));
        match t.and_then(|t| t.add(Some(after)).map(|()| t)) {
            Ok(t) => self.timer = Some(t),
            Err(e) => log::error!("etcd timer: {e}"),
        }
    }

    /// This round failed: keep the membership, retry after the backoff on
    /// the next endpoint.
    fn fail(&mut self, why: &str) {
        if self.state == State::Stopped {
            return;
        }
        self.round += 1;
        self.unary = None;
        self.watch = None;
        self.last_error = why.to_string();
        let first = self.down_since.is_none();
        let since = *self.down_since.get_or_insert_with(Instant::now);
        if first || self.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            let how_long = if first { String::new() } else { format!(" for {:.0} s", since.elapsed().as_secs_f64()) };
            log::warn!(
                "etcd {} unreachable{how_long} ({why}); serving with the last membership ({} other node(s)), retrying",
                self.url(),
                self.members.len()
            );
            self.logged = Some(Instant::now());
        }
        self.state = State::Unreachable;
        self.endpoint = (self.endpoint + 1) % self.cfg.endpoints.len();
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.arm(delay, |e| e.begin_round());
    }

    /// A clean stop: deletes the key and revokes the lease (both sent
    /// now; [`Etcd::busy`] says when they are done).
    pub fn leave(&mut self) {
        if self.state == State::Stopped {
            return;
        }
        let was = self.state;
        self.state = State::Stopped;
        self.round += 1;
        self.timer = None;
        self.watch = None;
        if was == State::Unreachable && self.lease.is_none() {
            return;
        }
        log::info!("etcd {}: leaving: deleting {}", self.url(), self.key());
        self.unary = None; // a fresh connection: requests of the old round are dropped
        let (host, port) = self.cfg.endpoints[self.endpoint].clone();
        let Ok(mut c) = HttpClient::new(&self.base, &host, port, Some(self.timeout())) else { return };
        let mut reqs = vec![("/v3/kv/deleterange", json!({"key": b64(self.key().as_bytes())}))];
        if let Some(id) = self.lease.take() {
            reqs.push(("/v3/lease/revoke", json!({"ID": id.to_string()})));
        }
        for (path, body) in reqs {
            let w = self.me.clone();
            let done = move |r: HttpResult| {
                with(&w, |e| {
                    e.leaving -= 1;
                    if let Err(why) = reply_json(path, r) {
                        log::warn!("etcd: leaving: {why}");
                    }
                })
            };
            if c.post(path, body.to_string().as_bytes(), None, done).is_ok() {
                self.leaving += 1;
            }
        }
        self.unary = Some(c);
    }

    /// A successor master took over (and registered the key on its own
    /// lease): stop talking to etcd, delete nothing. Our lease, if the
    /// successor did not reuse it, expires by itself.
    pub fn handover(&mut self) {
        if self.state != State::Stopped {
            log::info!("etcd: handing {} over to the new master (not deleted)", self.key());
        }
        self.state = State::Stopped;
        self.round += 1;
        self.timer = None;
        self.watch = None;
        self.unary = None;
    }

    /// Requests of a leave still in flight.
    pub fn busy(&self) -> bool {
        self.leaving > 0
    }
}

/// The JSON of a gateway reply; an HTTP error, or an `"error"` in the
/// body, is an error naming `path`.
fn reply_json(path: &str, r: HttpResult) -> Result<Value, String> {
    let rep = r.map_err(|why| format!("{path}: {why}"))?;
    let v: Value = serde_json::from_slice(&rep.body).unwrap_or(Value::Null);
    if rep.status != 200 || !v["error"].is_null() {
        let msg = v["error"]
            .as_str()
            .or(v["message"].as_str())
            .map_or_else(|| String::from_utf8_lossy(&rep.body[..rep.body.len().min(200)]).into_owned(), str::to_string);
        return Err(format!("{path}: HTTP {}: {msg}", rep.status));
    }
    Ok(v)
}

/// Runs the loop until a leave's requests are done, `limit` at most (after
/// the master's loop ended: the stop must not cut them off).
pub fn finish_leave(base: &Base, etcd: &Rc<RefCell<Etcd>>, limit: Duration) {
    if !etcd.borrow().busy() {
        return;
    }
    let start = Instant::now();
    let (b, e) = (base.clone(), Rc::downgrade(etcd));
    let poll = Rc::new(RefCell::new(None::<Event>));
    let p = poll.clone();
    let tick = move || {
        let done = e.upgrade().is_none_or(|e| !e.borrow().busy());
        if done || start.elapsed() >= limit {
            b.exit(None);
        } else if let Some(t) = p.borrow().as_ref() {
            let _ = t.add(Some(Duration::from_millis(5)));
        }
    };
    let Ok(t) = Event::new(base, -1, Interest::Timer, tick) else { return };
    if t.add(Some(Duration::from_millis(1))).is_err() {
        return;
    }
    *poll.borrow_mut() = Some(t);
    if let Err(e) = base.dispatch() {
        log::warn!("etcd: finishing the leave: {e}");
    }
    poll.borrow_mut().take();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for s in ["", "f", "fo", "foo", "foob", "fooba", "foobar", "/handoff/nodes/A"] {
            assert_eq!(unb64(&b64(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert_eq!(b64(b"foobar"), "Zm9vYmFy");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert_eq!(unb64("L2gvQQ==").unwrap(), b"/h/A");
        assert!(unb64("***").is_none());
    }

    #[test]
    fn urls_parse_with_clear_errors() {
        let c = EtcdConfig::parse("http://127.0.0.1:2379, http://[::1]:23790/,http://etcd", "/p/", 10).unwrap();
        assert_eq!(c.endpoints, vec![("127.0.0.1".into(), 2379), ("::1".into(), 23790), ("etcd".into(), 2379)]);
        assert_eq!(c.range_end(), b"/p0");
        for (bad, says) in [
            ("https://h:1", "https is not supported"),
            ("h:1", "expected http://HOST:PORT"),
            ("http://h:x", "port"),
            ("http://h:1/v3", "without a path"),
            ("", "no URL"),
        ] {
            let e = EtcdConfig::parse(bad, "/p/", 10).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(EtcdConfig::parse("http://h:1", "", 10).is_err());
        assert!(EtcdConfig::parse("http://h:1", "/p/", 0).is_err());
    }
}
