//! The exit statuses of the `wharf` command, in one place: scripts, `systemd` and
//! `wharf bench swap` (which starts servers and must tell "port taken" from "crashed")
//! depend on them.

/// Success.
pub const OK: i32 = 0;
/// A runtime failure (a worker could not start, an IO error while serving).
pub const FAILURE: i32 = 1;
/// The configuration (file, environment override or command-line flag) is invalid; nothing was
/// bound.
pub const CONFIG_ERROR: i32 = 2;
/// A listen address was already taken by another socket; nothing else was wrong.
pub const ADDRESS_IN_USE: i32 = 3;
