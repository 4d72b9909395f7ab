//! The rpc service (cluster and node mode's built-in protocol, seed 001):
//! u32 little-endian length, then that many bytes of JSON.
//!
//! ```text
//! {"in":"ping","params":X}  -> {"out":"pong","result":X}
//! {"in":"whoami"}           -> {"out":"whoami","result":{"worker":I,"pid":N,"gen":G,...}}
//! {"in":"work","params":{"us":N}}  -> {"out":"work","result":N}  (busy N µs, 0..=1000000)
//! {"in":"relay","params":{"node":B,"worker":W,"msg":X}}   (node mode)
//!                           -> {"out":"relayed","result":{"node":B,"worker":W,"pid":N,"msg":X}}
//! anything else             -> {"out":"error","result":"<reason>"}
//! ```
//! A frame announcing more than `--max-frame` bytes closes the connection.
use std::collections::HashMap;
use std::rc::Rc;

use serde_json::{json, Map, Value};

use super::{Cx, Place, RelayAnswer, Service, Session, Ticket};

pub mod wire;

use wire::Frame;

/// The rpc service's flags.
#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct RpcOptions {
    /// Largest request frame; a larger one closes that connection.
    #[arg(long, default_value_t = wire::DEFAULT_MAX_FRAME)]
    pub max_frame: usize,
}

impl Default for RpcOptions {
    fn default() -> Self {
        RpcOptions { max_frame: wire::DEFAULT_MAX_FRAME }
    }
}

/// What every session of a process shares.
struct Shared {
    max_frame: usize,
    /// The whoami result.
    identity: Map<String, Value>,
    /// The whoami reply's JSON, made once.
    whoami: Vec<u8>,
}

/// The rpc protocol.
pub struct Rpc(Rc<Shared>);

/// One rpc connection: relays waiting for their answer.
pub struct RpcSession {
    shared: Rc<Shared>,
    relays: HashMap<Ticket, (String, usize)>,
}

/// The whoami result for a place.
pub fn identity(place: &Place) -> Map<String, Value> {
    let v = match place {
        Place::Worker { index, pid, gen, node: None } => json!({"worker": index, "pid": pid, "gen": gen}),
        Place::Worker { index, pid, gen, node: Some(n) } => {
            json!({"worker": index, "pid": pid, "gen": gen, "node": n})
        }
        Place::Pair { port, pid } => json!({"port": port, "pid": pid}),
        Place::Test => json!({"pid": std::process::id()}),
    };
    v.as_object().cloned().unwrap_or_default()
}

impl Service for Rpc {
    type Options = RpcOptions;
    type Session = RpcSession;

    fn new(options: &RpcOptions, place: &Place) -> std::io::Result<Rpc> {
        let identity = identity(place);
        let whoami = serde_json::to_vec(&wire::respond(Ok(("whoami".into(), Map::new())), &identity))
            .expect("a Value always serialises");
        Ok(Rpc(Rc::new(Shared { max_frame: options.max_frame, identity, whoami })))
    }

    fn open(&mut self, _state: &[u8]) -> RpcSession {
        RpcSession { shared: self.0.clone(), relays: HashMap::new() }
    }

    fn read_limit(&self) -> usize {
        self.0.max_frame + 4 + 64 * 1024
    }
}

impl Session for RpcSession {
    fn serve(&mut self, input: &[u8], cx: &mut Cx<'_>) -> usize {
        let sh = &*self.shared;
        let mut used = 0;
        while cx.more() {
            let rest = &input[used..];
            match wire::frame(rest, rest.len(), sh.max_frame) {
                Frame::Complete { body } => {
                    let frame = &rest[4..4 + body];
                    used += 4 + body;
                    cx.answered(body);
                    if cx.can_relay() {
                        if let Some(r) = wire::parse_relay(frame) {
                            if let Some(t) = cx.relay(&r.node, r.worker, r.msg.get()) {
                                self.relays.insert(t, (r.node.into_owned(), r.worker));
                            }
                            continue;
                        }
                    }
                    if wire::answer_fast(frame, &sh.whoami, cx.output()) {
                        continue;
                    }
                    let reply = match wire::parse(frame) {
                        Ok((kind, _)) if kind == "relay" && cx.can_relay() => {
                            wire::error("relay: params must be {\"node\":name,\"worker\":index,\"msg\":value}")
                        }
                        Ok((kind, obj)) if kind == "work" => match wire::work_us(&obj) {
                            Ok(us) => {
                                spin(std::time::Duration::from_micros(us));
                                serde_json::json!({"out": "work", "result": us})
                            }
                            Err(why) => wire::error(&why),
                        },
                        req => wire::respond(req, &sh.identity),
                    };
                    wire::encode_into(&reply, cx.output());
                }
                Frame::TooLarge { len } => {
                    log::info!("rpc: frame of {len} bytes exceeds --max-frame {}; closing", sh.max_frame);
                    cx.abort();
                    break;
                }
                Frame::Incomplete => {
                    if cx.eof() && !rest.is_empty() {
                        log::info!("rpc: truncated frame ({} bytes) before EOF; closing", rest.len());
                    }
                    break;
                }
            }
        }
        used
    }

    fn relayed(&mut self, ticket: Ticket, answer: Result<RelayAnswer<'_>, &str>, out: &mut Vec<u8>) {
        let (node, worker) = self.relays.remove(&ticket).unwrap_or_default();
        match answer {
            Ok(a) => {
                let node = serde_json::to_string(&node).expect("a string serialises");
                let reply = format!(
                    r#"{{"out":"relayed","result":{{"node":{node},"worker":{worker},"pid":{},"msg":{}}}}}"#,
                    a.pid, a.msg
                );
                wire::frame_raw(reply.as_bytes(), out);
            }
            Err(why) => wire::encode_into(&wire::error(why), out),
        }
    }
}

/// Keeps the CPU busy for `d` (the `work` request: load that is CPU, not
/// waiting, for rebalancing tests and benches).
fn spin(d: std::time::Duration) {
    let start = std::time::Instant::now();
    while start.elapsed() < d {
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(input: &[u8]) -> (usize, Vec<u8>) {
        let place = Place::Worker { index: 1, pid: 7, gen: 2, node: None };
        let mut s = Rpc::new(&RpcOptions { max_frame: 64 }, &place).unwrap().open(&[]);
        let mut out = Vec::new();
        let n = s.serve(input, &mut Cx::standalone(&mut out));
        (n, out)
    }

    #[test]
    fn answers_whole_frames_and_leaves_a_partial_one() {
        let mut input = wire::encode(&json!({"in": "ping", "params": [1]}));
        input.extend(wire::encode(&json!({"in": "whoami"})));
        let whole = input.len();
        input.extend(&wire::encode(&json!({"in": "ping", "params": 2}))[..5]);
        let (n, out) = serve(&input);
        assert_eq!(n, whole);
        let replies: Vec<Value> = split(&out);
        assert_eq!(replies[0], json!({"out": "pong", "result": [1]}));
        assert_eq!(replies[1], json!({"out": "whoami", "result": {"worker": 1, "pid": 7, "gen": 2}}));
    }

    #[test]
    fn work_spins_then_answers_and_refuses_out_of_range() {
        let mut input = Vec::new();
        for p in [json!({"us": 200}), json!({"us": 1_000_001}), json!({"us": -1}), json!({"us": 1.5}), json!({})] {
            input.extend(wire::encode(&json!({"in": "work", "params": p})));
        }
        let t = std::time::Instant::now();
        let (n, out) = serve(&input);
        assert_eq!(n, input.len());
        assert!(t.elapsed() >= std::time::Duration::from_micros(200));
        let replies = split(&out);
        assert_eq!(replies[0], json!({"out": "work", "result": 200}));
        for r in &replies[1..] {
            assert_eq!(r["out"], "error", "{r}");
        }
    }

    #[test]
    fn a_frame_over_the_limit_aborts() {
        let mut input = 1000u32.to_le_bytes().to_vec();
        input.extend([0; 10]);
        let place = Place::Test;
        let mut s = Rpc::new(&RpcOptions { max_frame: 64 }, &place).unwrap().open(&[]);
        let mut out = Vec::new();
        let mut cx = Cx::standalone(&mut out);
        assert_eq!(s.serve(&input, &mut cx), 0);
        assert!(cx.abort);
    }

    fn split(mut b: &[u8]) -> Vec<Value> {
        let mut v = Vec::new();
        while b.len() >= 4 {
            let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
            v.push(serde_json::from_slice(&b[4..4 + n]).unwrap());
            b = &b[4 + n..];
        }
        v
    }
}
