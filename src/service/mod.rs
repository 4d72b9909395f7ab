//! The service API: your protocol on handoff's topologies.
//!
//! A [`Service`] is made once per serving process (a pair server, a
//! cluster worker, a node worker) and opens a [`Session`] per connection.
//! A session sees the bytes received and not yet consumed, answers the
//! complete requests at their front, and says how many bytes those took.
//! It leaves a partial request unconsumed: the library reads more, or
//! moves the connection to another process with those bytes (and the
//! state the session [exports](Session::export)).
//!
//! The library moves a connection only **between requests**: when every
//! byte consumed has been answered (no [relay](Cx::relay) outstanding) and
//! the output is flushed. Pair mode moves a connection after each request,
//! a restart moves every connection, and a rebalance moves idle ones. A
//! service never sees any of it.
//!
//! ```
//! use handoff::service::{Cx, NoOptions, Place, Service, Session};
//!
//! /// Upper-cases every line.
//! struct Shout;
//! struct Line;
//!
//! impl Service for Shout {
//!     type Options = NoOptions;
//!     type Session = Line;
//!     fn new(_: &NoOptions, _: &Place) -> std::io::Result<Shout> {
//!         Ok(Shout)
//!     }
//!     fn open(&mut self, _state: &[u8]) -> Line {
//!         Line
//!     }
//! }
//!
//! impl Session for Line {
//!     fn serve(&mut self, input: &[u8], cx: &mut Cx<'_>) -> usize {
//!         let mut used = 0;
//!         while cx.more() {
//!             let Some(n) = input[used..].iter().position(|&b| b == b'\n') else { break };
//!             let line = &input[used..used + n + 1];
//!             cx.write(&line.to_ascii_uppercase());
//!             cx.answered(line.len());
//!             used += n + 1;
//!         }
//!         used
//!     }
//! }
//!
//! // Drive one session by hand, as the library does.
//! let mut s = Shout::new(&NoOptions {}, &Place::Test).unwrap().open(&[]);
//! let mut out = Vec::new();
//! let mut cx = Cx::standalone(&mut out);
//! assert_eq!(s.serve(b"hi\nthere\npart", &mut cx), 9);
//! assert_eq!(out, b"HI\nTHERE\n");
//! ```
//!
//! [`crate::cli::main`] gives such a service handoff's whole command line.
use std::io;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub(crate) mod cx;
pub mod pingpong;
pub mod rpc;

pub use cx::{Cx, Ticket};

/// A protocol. One value per serving process, made by [`Service::new`]
/// once the process knows its [`Place`].
pub trait Service: Sized + 'static {
    /// The service's own command-line flags (e.g. `--max-frame`), given to
    /// `cluster`, `node`, `server` and `pair`. They reach every worker (and
    /// a restart's new generation) as JSON, and C workers as environment
    /// variables `HANDOFF_OPT_<FIELD>` (upper case). [`NoOptions`] for none.
    type Options: clap::Args + Serialize + DeserializeOwned + Clone + std::fmt::Debug + 'static;
    /// One connection's state.
    type Session: Session;

    /// Makes the service for one serving process.
    fn new(options: &Self::Options, place: &Place) -> io::Result<Self>;

    /// Starts a connection. `state` is what [`Session::export`] returned
    /// in the process that served it before (empty for a new connection).
    fn open(&mut self, state: &[u8]) -> Self::Session;

    /// Most unconsumed bytes buffered per connection: reading pauses at
    /// this size, so a session must answer (or refuse) any request that
    /// can reach it. Default 64 KiB.
    fn read_limit(&self) -> usize {
        64 * 1024
    }
}

/// One connection's protocol state.
pub trait Session: 'static {
    /// Answers the complete requests at the front of `input` (every byte
    /// received and not yet consumed) and returns how many bytes they
    /// took. Responses go to [`Cx::write`], in request order. Check
    /// [`Cx::more`] before each request: when it is false, stop and return
    /// (the library wants the connection between requests). A partial
    /// request is left unconsumed. Called again when more bytes arrive.
    fn serve(&mut self, input: &[u8], cx: &mut Cx<'_>) -> usize;

    /// State that travels with the connection when it moves, handed to
    /// [`Service::open`] in the next process. Called only between
    /// requests. Keep it small; default: nothing.
    ///
    /// ```
    /// use handoff::service::{Cx, NoOptions, Place, Service, Session};
    ///
    /// /// Numbers the lines of a connection, wherever it is served.
    /// struct Counter;
    /// struct Count(u64);
    ///
    /// impl Service for Counter {
    ///     type Options = NoOptions;
    ///     type Session = Count;
    ///     fn new(_: &NoOptions, _: &Place) -> std::io::Result<Counter> {
    ///         Ok(Counter)
    ///     }
    ///     fn open(&mut self, state: &[u8]) -> Count {
    ///         Count(state.try_into().map_or(0, u64::from_le_bytes))
    ///     }
    /// }
    ///
    /// impl Session for Count {
    ///     fn serve(&mut self, input: &[u8], cx: &mut Cx<'_>) -> usize {
    ///         let mut used = 0;
    ///         while cx.more() {
    ///             let Some(n) = input[used..].iter().position(|&b| b == b'\n') else { break };
    ///             self.0 += 1;
    ///             cx.write(format!("{}\n", self.0).as_bytes());
    ///             cx.answered(n + 1);
    ///             used += n + 1;
    ///         }
    ///         used
    ///     }
    ///     fn export(&self) -> Vec<u8> {
    ///         self.0.to_le_bytes().to_vec()
    ///     }
    /// }
    ///
    /// let mut out = Vec::new();
    /// let mut here = Counter.open(&[]); // a new connection
    /// here.serve(b"a\nb\n", &mut Cx::standalone(&mut out));
    /// let state = here.export(); // the connection moves, between requests
    /// let mut there = Counter.open(&state); // in the next process
    /// there.serve(b"c\n", &mut Cx::standalone(&mut out));
    /// assert_eq!(out, b"1\n2\n3\n");
    /// ```
    fn export(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Node mode: the answer to a [`Cx::relay`] (the far worker's reply,
    /// or why the relay failed). Write the response for that request to
    /// `out`; it is sent in request order.
    fn relayed(&mut self, ticket: Ticket, answer: Result<RelayAnswer<'_>, &str>, out: &mut Vec<u8>) {
        let _ = (ticket, answer, out);
    }
}

/// A relayed message's answer from the far worker.
#[derive(Debug, Clone, Copy)]
pub struct RelayAnswer<'a> {
    /// The far worker's pid.
    pub pid: u64,
    /// The message it echoed (JSON text).
    pub msg: &'a str,
}

/// Where a service runs: shown to clients so they can see which process
/// answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A pair server listening on `port`.
    Pair {
        /// The TCP port clients connect to (the real one with `--port 0`).
        port: u16,
        /// This server's process id.
        pid: u32,
    },
    /// Cluster (or node) worker `index` of generation `gen`.
    Worker {
        /// The worker's slot, 0 to `--workers` - 1; a respawned worker
        /// keeps its slot.
        index: usize,
        /// This worker's process id (a respawned worker has a new one).
        pid: u32,
        /// The cluster's generation: 1, then +1 at each restart.
        gen: u64,
        /// Node mode: this node's name (`--name`); `None` in a cluster.
        node: Option<String>,
    },
    /// Neither: a session driven by hand (doctests, unit tests).
    Test,
}

/// [`Service::Options`] of a service without flags.
#[derive(Debug, Clone, Default, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct NoOptions {}
