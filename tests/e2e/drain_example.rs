//! The example third-party plugin (examples/custom_plugin.rs), the way its README runs it:
//! written the easy way (with `wharf_core::framing::Lines`), it must let a restart finish at
//! once rather than hold it for the grace period while a client is idle.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::harness::*;

/// The example's binary, built once (same target directory as the `wharf` under test).
fn example_binary() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        // WHARF is <target>/<profile>/wharf; examples land in <target>/<profile>/examples.
        let profile_dir = std::path::Path::new(WHARF).parent().unwrap();
        let target_dir = profile_dir.parent().unwrap();
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo
            .args(["build", "--example", "custom_plugin", "--target-dir"])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("running cargo build --example");
        assert!(
            status.success(),
            "cargo build --example custom_plugin failed"
        );
        profile_dir.join("examples").join("custom_plugin")
    })
}

#[test]
fn the_example_plugin_drains_an_idle_client_at_once_on_sigterm() {
    let example = example_binary();
    let config = "[server]\nworkers = 1\nshutdown_grace = \"60s\"\n\
                  [services.reverse]\nplugin = \"reverse\"\nlisten = \"127.0.0.1:0\"\n";
    for backend in backends() {
        // The harness runs `<wrapper...> <wharf> serve ...`: `sh -c 'exec <example> "$@"'`
        // takes the wharf path as $0 and runs the example with the same arguments, under the
        // same process id (signals reach the example).
        let script = format!("exec '{}' \"$@\"", example.display());
        let mut server = Server::start_wrapped(
            config,
            &["sh", "-c", &script],
            &["--backend", backend],
            &[],
            |_| {},
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut idle = connect(server.addr("reverse"));
        idle.write_all(b"hello\n").unwrap();
        let mut answer = [0u8; 6];
        idle.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"olleh\n");

        // The client now sits between lines; a stop must not wait for it.
        let stopped_at = Instant::now();
        server.signal(libc::SIGTERM);
        let status = server
            .wait(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("held the drain for an idle client ({backend})"));
        assert!(status.success(), "{status}\n{}", server.log());
        assert!(stopped_at.elapsed() < Duration::from_secs(20));
        assert!(
            closed_within(&mut idle, Duration::from_secs(5)),
            "the idle client was not disconnected"
        );
    }
}
