//! End-to-end tests: the real `wharf` binary, real sockets, real signals, both backends.
//!
//! One test binary (this file and its modules) so the workspace is built and linked once.

mod access_log;
mod bench;
mod cli;
mod clients;
mod deploy;
mod drain_example;
mod echo;
mod exec;
mod faults;
mod files;
mod harness;
mod hostile_config;
mod hostile_exec;
mod hostile_files;
mod hostile_metrics;
mod http;
mod lifecycle;
mod limits;
mod load;
mod metrics;
mod pki;
mod process;
mod proxy;
mod reload;
mod sources;
mod status;
mod tls;
mod tls_clients;
mod tls_config;
mod udp;
mod unix;
