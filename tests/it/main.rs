//! Integration tests: they run the real `handoff` binary.
//! One crate, one module per mode; `support` holds the fixtures.
mod support;

mod pair;
