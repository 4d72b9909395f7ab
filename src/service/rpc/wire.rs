//! Rpc framing: frames, the fast ping/whoami path, requests and replies
//! (the load clients use it too).
use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

/// Default `--max-frame`.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// What is at the front of an input buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// Not enough bytes yet.
    Incomplete,
    /// A whole frame: `4 + body` bytes; the body starts at offset 4.
    Complete {
        /// The body's length in bytes (the JSON after the length prefix).
        body: usize,
    },
    /// The announced length exceeds the limit: close the connection.
    TooLarge {
        /// The body length the frame announced, in bytes.
        len: usize,
    },
}

/// Looks at the front of the input: `head` is its first bytes (at least
/// 4, when that many are buffered), `avail` how many are buffered in all,
/// `max` the largest body allowed (`--max-frame`).
///
/// ```
/// use handoff::service::rpc::wire::{encode, frame, Frame};
/// use serde_json::json;
///
/// let f = encode(&json!({"in": "ping", "params": 1}));
/// assert_eq!(frame(&f, f.len(), 1 << 20), Frame::Complete { body: f.len() - 4 });
/// assert_eq!(frame(&f[..4], 4, 1 << 20), Frame::Incomplete);
/// assert_eq!(frame(&f, f.len(), 8), Frame::TooLarge { len: f.len() - 4 });
/// ```
pub fn frame(head: &[u8], avail: usize, max: usize) -> Frame {
    if head.len() < 4 {
        return Frame::Incomplete;
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > max {
        Frame::TooLarge { len }
    } else if avail >= 4 + len {
        Frame::Complete { body: len }
    } else {
        Frame::Incomplete
    }
}

/// Encodes a JSON value as one frame.
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(v, &mut out);
    out
}

/// Appends one frame holding `v` to `out`.
pub fn encode_into(v: &Value, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut *out, v).expect("a Value always serialises");
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// The shape of every valid request, borrowed from the frame: `params`
/// stays raw text, so a ping is echoed without building a `Value`.
#[derive(Deserialize)]
struct Request<'a> {
    #[serde(rename = "in", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    params: Option<&'a RawValue>,
}

/// The hot path: answers `ping` and `whoami` by appending one reply frame
/// to `out` (`whoami_reply` is the whoami reply's JSON, made once).
/// Returns false, appending nothing, for anything else (other requests,
/// errors, and `"params":null`, which serde reads as absent), which the
/// caller hands to [`parse`] and [`respond`].
pub fn answer_fast(body: &[u8], whoami_reply: &[u8], out: &mut Vec<u8>) -> bool {
    let Ok(req) = serde_json::from_slice::<Request>(body) else { return false };
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    match (req.kind.as_ref(), req.params) {
        // Deeper than serde_json (and the C worker) parse a value: the
        // general path answers with the error.
        ("ping", Some(p)) if !nesting_within(p.get().as_bytes(), MAX_NESTING) => {
            out.truncate(start);
            return false;
        }
        ("ping", Some(p)) => {
            out.extend_from_slice(br#"{"out":"pong","result":"#);
            out.extend_from_slice(p.get().as_bytes());
            out.push(b'}');
        }
        ("whoami", _) => out.extend_from_slice(whoami_reply),
        _ => {
            out.truncate(start);
            return false;
        }
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    true
}

/// Deepest nesting of arrays and objects a request may have (serde_json's
/// own limit when it builds a value; the C worker applies the same).
pub const MAX_NESTING: usize = 128;

/// Whether the JSON text `raw` nests arrays and objects at most `max` deep
/// (strings, with their escapes, are skipped).
fn nesting_within(raw: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in raw {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// A relay request (node mode), borrowed from its frame; `msg` stays raw.
#[derive(Deserialize)]
pub struct Relay<'a> {
    /// The far node's name.
    #[serde(borrow)]
    pub node: Cow<'a, str>,
    /// The far worker's index on that node.
    pub worker: usize,
    /// The message to relay, any JSON value, as its raw text.
    #[serde(borrow)]
    pub msg: &'a RawValue,
}

#[derive(Deserialize)]
struct RelayRequest<'a> {
    #[serde(rename = "in", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    params: Relay<'a>,
}

/// `Some` for a well-formed `{"in":"relay","params":{"node","worker","msg"}}`.
pub fn parse_relay(body: &[u8]) -> Option<Relay<'_>> {
    serde_json::from_slice::<RelayRequest>(body).ok().filter(|r| r.kind == "relay").map(|r| r.params)
}

/// Appends one frame holding the JSON text `json` to `out`.
pub fn frame_raw(json: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(json);
}

/// Answers one request body. `identity` is the whoami result (an object).
pub fn answer(body: &[u8], identity: &Map<String, Value>) -> Value {
    respond(parse(body), identity)
}

/// Answers a request already parsed by [`parse`] (modes that add their
/// own requests parse first, then fall back here).
pub fn respond(req: Result<(String, Map<String, Value>), String>, identity: &Map<String, Value>) -> Value {
    let result = req.and_then(|(kind, obj)| match kind.as_str() {
        "ping" => match obj.get("params") {
            Some(x) => Ok(json!({"out": "pong", "result": x})),
            None => Err("ping: missing \"params\"".to_string()),
        },
        "whoami" => Ok(json!({"out": "whoami", "result": identity})),
        other => Err(format!("unknown \"in\": {other:?}")),
    });
    result.unwrap_or_else(|reason| error(&reason))
}

/// Longest `work` request, in microseconds.
pub const MAX_WORK_US: u64 = 1_000_000;

/// The `us` of a `{"in":"work","params":{"us":N}}` request (0 to
/// [`MAX_WORK_US`]), or why it is refused.
pub fn work_us(req: &Map<String, Value>) -> Result<u64, String> {
    match req.get("params").and_then(|p| p.get("us")).and_then(Value::as_u64) {
        Some(us) if us <= MAX_WORK_US => Ok(us),
        _ => Err(format!("work: params must be {{\"us\":N}} with N from 0 to {MAX_WORK_US}")),
    }
}

/// `{"out":"error","result":reason}`
pub fn error(reason: &str) -> Value {
    json!({"out": "error", "result": reason})
}

/// Parses a request: its `"in"` and the whole object, or an error reason.
pub fn parse(body: &[u8]) -> Result<(String, Map<String, Value>), String> {
    let req: Value = serde_json::from_slice(body).map_err(|e| format!("bad JSON: {e}"))?;
    let Value::Object(obj) = req else { return Err("request is not a JSON object".into()) };
    match obj.get("in") {
        Some(Value::String(s)) => Ok((s.clone(), obj)),
        Some(_) => Err("\"in\" is not a string".into()),
        None => Err("missing \"in\"".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Map<String, Value> {
        json!({"worker": 1, "pid": 42}).as_object().unwrap().clone()
    }

    #[test]
    fn frames() {
        let f = encode(&json!({"a": 1}));
        assert_eq!(frame(&f, f.len(), 100), Frame::Complete { body: f.len() - 4 });
        assert_eq!(frame(&f[..3], 3, 100), Frame::Incomplete);
        assert_eq!(frame(&f, f.len() - 1, 100), Frame::Incomplete);
        assert_eq!(frame(&f, f.len(), 4), Frame::TooLarge { len: f.len() - 4 });
    }

    #[test]
    fn ping_echoes_any_value_exactly() {
        for x in [json!(null), json!(0), json!(-1.5), json!("ü"), json!([1, [2, {}]]), json!({"k": {"z": [true]}})] {
            let req = serde_json::to_vec(&json!({"in": "ping", "params": x})).unwrap();
            assert_eq!(answer(&req, &id()), json!({"out": "pong", "result": x}));
        }
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_an_error_on_both_paths() {
        let who = serde_json::to_vec(&answer(br#"{"in":"whoami"}"#, &id())).unwrap();
        let ok = format!(
            r#"{{"in":"ping","params":{}"[[[\\"{}}}"#,
            "[".repeat(MAX_NESTING - 1),
            "]".repeat(MAX_NESTING - 1)
        );
        let mut out = Vec::new();
        assert!(answer_fast(ok.as_bytes(), &who, &mut out), "{MAX_NESTING} deep, brackets in a string");
        let deep =
            format!(r#"{{"in":"ping","params":{}{}}}"#, "[".repeat(MAX_NESTING + 1), "]".repeat(MAX_NESTING + 1));
        out.clear();
        assert!(!answer_fast(deep.as_bytes(), &who, &mut out));
        assert!(out.is_empty());
        assert_eq!(answer(deep.as_bytes(), &id())["out"], "error");
    }

    #[test]
    fn fast_path_matches_the_general_one() {
        let who = serde_json::to_vec(&answer(br#"{"in":"whoami"}"#, &id())).unwrap();
        for req in [
            &br#"{"in":"ping","params":{"c":1,"i":[1,2.5,"\u00fc"]}}"#[..],
            br#"{"params":[null],"in":"ping"}"#,
            br#"{"in":"whoami"}"#,
            br#"{"in":"p\u0069ng","params":7}"#,
        ] {
            let mut fast = Vec::new();
            assert!(answer_fast(req, &who, &mut fast), "{}", String::from_utf8_lossy(req));
            let slow: Value = answer(req, &id());
            let got: Value = serde_json::from_slice(&fast[4..]).unwrap();
            assert_eq!(got, slow);
            assert_eq!(u32::from_le_bytes(fast[..4].try_into().unwrap()) as usize, fast.len() - 4);
        }
        for other in [&b"{bad"[..], br#"{"in":"ping"}"#, br#"{"in":"relay","params":1}"#, br#"[1]"#, br#"{"in":3}"#] {
            let mut out = vec![9];
            assert!(!answer_fast(other, &who, &mut out));
            assert_eq!(out, [9]);
        }
    }

    #[test]
    fn whoami_and_errors() {
        assert_eq!(answer(br#"{"in":"whoami"}"#, &id()), json!({"out":"whoami","result":{"worker":1,"pid":42}}));
        for bad in [&b"{"[..], b"[]", br#"{"in":"dance"}"#, br#"{"params":1}"#, br#"{"in":"ping"}"#, br#"{"in":5}"#] {
            let v = answer(bad, &id());
            assert_eq!(v["out"], "error", "{}", String::from_utf8_lossy(bad));
            assert!(v["result"].is_string());
        }
    }
}
