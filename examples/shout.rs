//! The smallest service: each line comes back upper-cased and numbered,
//! with the process that answered. The count is session state: it moves
//! with the connection. handoff supplies pair, cluster, node and restart:
//! `shout cluster --port 9000 --dir /tmp/shout`, `shout restart --dir /tmp/shout`.
use handoff::service::{Cx, NoOptions, Place, Service, Session};

struct Shout(String);
struct Lines {
    count: u64,
    who: String,
}

impl Service for Shout {
    type Options = NoOptions;
    type Session = Lines;
    fn new(_: &NoOptions, place: &Place) -> std::io::Result<Shout> {
        Ok(Shout(format!("{place:?}")))
    }
    fn open(&mut self, state: &[u8]) -> Lines {
        let count = state.try_into().map_or(0, u64::from_le_bytes);
        Lines { count, who: self.0.clone() }
    }
}

impl Session for Lines {
    fn serve(&mut self, input: &[u8], cx: &mut Cx<'_>) -> usize {
        let mut used = 0;
        while cx.more() {
            let Some(n) = input[used..].iter().position(|&b| b == b'\n') else { break };
            self.count += 1;
            let line = String::from_utf8_lossy(&input[used..used + n]).to_uppercase();
            cx.write(format!("{line} #{} {}\n", self.count, self.who).as_bytes());
            cx.answered(n + 1);
            used += n + 1; // a partial line stays unconsumed: it moves with the connection
        }
        used
    }
    fn export(&self) -> Vec<u8> {
        self.count.to_le_bytes().to_vec()
    }
}

fn main() -> std::process::ExitCode {
    handoff::cli::main::<Shout>("shout")
}
