//! Integration tests: they run the real `handoff` binary.
//! One crate, one module per mode; `support` and `cluster_support` hold
//! the fixtures.
mod cluster_support;
mod support;

mod cluster;
mod cworker;
mod etcd;
mod faults;
mod hosts;
mod http;
mod limits;
mod metrics;
mod node;
mod node_deadlines;
mod node_restart;
mod ops_config;
mod ops_master;
mod ops_net;
mod pair;
mod pair_ops;
mod readme;
mod rebalance;
mod rebalance_client;
mod restart;
mod restart_faults;
mod service;
mod unix_clients;
mod unix_listen;
