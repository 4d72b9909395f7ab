//! A node link on the move: which worker serves it, and, for a link this
//! node opened, where it leads and the sequence number it is at.
//!
//! A link travels like a client connection (descriptor plus unread
//! bytes, see `core::channel::wire`), flagged `FLAG_NODE_LINK`, with this
//! state as the CONN's session state (`FLAG_STATE`), as JSON:
//!
//! ```text
//! {"worker":1}                                   a link another node opened to our worker 1
//! {"worker":0,"out":{"node":"B","worker":1,"seq":42}}   worker 0's link to B:1, next DATA is seq 42
//! {"worker":0,"out":{"node":"B","worker":1,"seq":42,"hb":true}}   the same, and it pings B:1
//! ```
//! A manager hands a new link to the worker it names; a restart moves each
//! link to the worker of the same index in the next generation (the far
//! side addressed it by index). An outgoing link moves only when no relay
//! waits on it, so its sequence numbers go on where they stopped.
use serde_json::{json, Value};

use crate::core::channel::{wire, Msg};
use crate::topology::node::links::Key;

/// Where a link goes and what it carries (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    /// The worker of this node that serves it.
    pub worker: usize,
    /// An outgoing link: its far end and its next DATA sequence number.
    pub out: Option<(Key, u32)>,
    /// An outgoing link that pings its far worker (`"hb":true` in `out`).
    pub pings: bool,
}

impl LinkState {
    /// The JSON bytes carried as the CONN's state.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = json!({"worker": self.worker});
        if let Some(((node, worker), seq)) = &self.out {
            v["out"] = json!({"node": node, "worker": worker, "seq": seq});
            if self.pings {
                v["out"]["hb"] = json!(true);
            }
        }
        v.to_string().into_bytes()
    }

    /// Reads what [`LinkState::encode`] wrote; `None` if it is not that.
    pub fn decode(state: &[u8]) -> Option<LinkState> {
        let v: Value = serde_json::from_slice(state).ok()?;
        let worker = usize::try_from(v["worker"].as_u64()?).ok()?;
        let out = match v.get("out") {
            None => None,
            Some(o) => {
                let key = (o["node"].as_str()?.to_string(), usize::try_from(o["worker"].as_u64()?).ok()?);
                Some((key, u32::try_from(o["seq"].as_u64()?).ok()?))
            }
        };
        let pings = v["out"]["hb"] == json!(true);
        Some(LinkState { worker, out, pings })
    }

    /// A link connection as a CONN message, with its unread bytes.
    pub fn conn(&self, fd: std::os::fd::OwnedFd, leftover: Vec<u8>) -> Msg {
        Msg::conn(fd, wire::join_state(&self.encode(), leftover), wire::FLAG_NODE_LINK | wire::FLAG_STATE)
    }

    /// The state a link CONN carries, read without taking the message
    /// apart (`None`: not a link, or a link without state).
    pub fn of(msg: &Msg) -> Option<LinkState> {
        if msg.flags & wire::FLAG_NODE_LINK == 0 || msg.flags & wire::FLAG_STATE == 0 {
            return None;
        }
        let body = wire::past_history(msg.flags, &msg.body);
        let n = u32::from_le_bytes(body.get(..4)?.try_into().ok()?) as usize;
        LinkState::decode(body.get(4..4 + n)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_in_and_out() {
        let inbound = LinkState { worker: 1, out: None, pings: false };
        assert_eq!(LinkState::decode(&inbound.encode()), Some(inbound.clone()));
        let outbound = LinkState { worker: 0, out: Some((("B".to_string(), 3), 42)), pings: false };
        assert_eq!(LinkState::decode(&outbound.encode()), Some(outbound.clone()));
        let pinging = LinkState { pings: true, ..outbound.clone() };
        assert_eq!(LinkState::decode(&pinging.encode()), Some(pinging));
        assert_eq!(LinkState::decode(b"{}"), None);
        assert_eq!(LinkState::decode(b"garbage"), None);
        assert_eq!(LinkState::decode(br#"{"worker":0,"out":{"node":"B"}}"#), None);
    }

    #[test]
    fn read_from_a_conn_message_without_taking_it_apart() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let st = LinkState { worker: 2, out: Some((("C".to_string(), 0), 7)), pings: true };
        let m = st.conn(a.into(), b"HNOD partial".to_vec());
        assert_eq!(LinkState::of(&m), Some(st));
        let (state, rest) = wire::split_state(m.body.clone());
        assert_eq!(rest, b"HNOD partial");
        assert!(LinkState::decode(&state).is_some());
        let plain = Msg::conn(std::os::unix::net::UnixStream::pair().unwrap().0.into(), Vec::new(), 0);
        assert_eq!(LinkState::of(&plain), None);
    }
}
