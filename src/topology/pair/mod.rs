//! Pair mode (seed 000): two servers hand every connection to each other
//! after each request.
pub mod launcher;
mod reexec;
mod reqlog;
pub mod server;
