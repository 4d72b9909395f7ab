//! Framings spoken on client connections.
pub mod node;
pub mod pingpong;
pub mod rpc;
