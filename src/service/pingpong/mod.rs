//! The pingpong service (pair mode's built-in protocol, seed 000).
//!
//! Request: 1 byte unsigned length N (0..=255), then N bytes. Response:
//! ASCII `rsp from port: P\n`, P the answering server's port (0 outside
//! pair mode). Every byte string is a valid prefix: there is no malformed
//! request, only a truncated one.
use super::{Cx, NoOptions, Place, Service, Session};

pub mod wire;

/// The pingpong protocol.
pub struct PingPong {
    response: std::rc::Rc<[u8]>,
}

/// One pingpong connection (stateless between requests).
pub struct PingPongSession {
    response: std::rc::Rc<[u8]>,
}

impl Service for PingPong {
    type Options = NoOptions;
    type Session = PingPongSession;

    fn new(_: &NoOptions, place: &Place) -> std::io::Result<PingPong> {
        let port = match place {
            Place::Pair { port, .. } => *port,
            _ => 0,
        };
        Ok(PingPong { response: wire::response(port).into() })
    }

    fn open(&mut self, _state: &[u8]) -> PingPongSession {
        PingPongSession { response: self.response.clone() }
    }

    fn read_limit(&self) -> usize {
        512
    }
}

impl Session for PingPongSession {
    fn serve(&mut self, input: &[u8], cx: &mut Cx<'_>) -> usize {
        let mut used = 0;
        while cx.more() {
            let Some(n) = wire::request_len(&input[used..]) else { break };
            cx.write(&self.response);
            cx.answered(n - 1);
            used += n;
        }
        if cx.eof() && used < input.len() && wire::request_len(&input[used..]).is_none() && cx.more() {
            log::info!("pingpong: truncated request ({} bytes) before EOF; closing", input.len() - used);
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_each_whole_request() {
        let place = Place::Pair { port: 7001, pid: 1 };
        let mut s = PingPong::new(&NoOptions {}, &place).unwrap().open(&[]);
        let mut out = Vec::new();
        let mut input = wire::request(b"ab");
        input.extend(wire::request(b""));
        input.push(5);
        assert_eq!(s.serve(&input, &mut Cx::standalone(&mut out)), 4);
        assert_eq!(out, b"rsp from port: 7001\nrsp from port: 7001\n");
    }
}
