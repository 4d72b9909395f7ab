//! The topologies a service runs on, each apart from any protocol:
//! - [`pair`]: two servers that hand each connection to each other after
//!   every request;
//! - [`cluster`]: a master that accepts and hands connections to prefork
//!   workers, respawns them, and reports status;
//! - [`node`]: clusters whose workers reach other nodes' workers through
//!   links the remote manager hands over;
//! - [`restart`]: a new generation of master and workers takes over the
//!   listener and every live connection.
pub mod cluster;
pub mod node;
pub mod pair;
pub mod restart;
pub mod supervisor;
