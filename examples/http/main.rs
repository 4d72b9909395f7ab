//! An HTTP/1.1 service on handoff: `hello\n` to GET and HEAD, the body
//! back to POST and PUT, with an `X-Handoff` header naming the process
//! that answered. Keep-alive, pipelining, chunked bodies; 400, 413, 431
//! and 501 for what it refuses.
//!
//! ```text
//! http cluster --port 8080 --workers 2 --dir /tmp/h [--max-body N]
//! curl -i http://127.0.0.1:8080/
//! http restart --dir /tmp/h
//! ```
mod chunked;
mod request;
mod response;
mod service;
#[cfg(test)]
mod tests;

use service::Http;

fn main() -> std::process::ExitCode {
    handoff::cli::main::<Http>("http")
}
