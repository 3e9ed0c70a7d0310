//! The deployment files shipped in `configs/`: they must be valid for their tools and agree
//! with the default config they deploy.

use std::process::Command;

use crate::harness::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap()
}

/// Every `listen` address of configs/default.toml (services and metrics).
fn default_listen_addresses() -> Vec<String> {
    let config: toml::Value = toml::from_str(&read("configs/default.toml")).unwrap();
    let mut addrs: Vec<String> = config["services"]
        .as_table()
        .unwrap()
        .values()
        .map(|s| s["listen"].as_str().unwrap().to_string())
        .collect();
    addrs.push(config["metrics"]["listen"].as_str().unwrap().to_string());
    addrs.sort();
    addrs
}

#[test]
fn systemd_socket_unit_listens_where_the_default_config_does() {
    let mut listens: Vec<String> = read("configs/systemd/wharf.socket")
        .lines()
        .filter_map(|l| l.strip_prefix("ListenStream="))
        .map(str::to_string)
        .collect();
    listens.sort();
    assert_eq!(listens, default_listen_addresses());
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if !have_tool("systemd-analyze", "--version") {
        return;
    }
    let dir = TempDir::new();
    // The units name the installed binary; verify them against this build's.
    let service = read("configs/systemd/wharf.service").replace("/usr/local/bin/wharf", WHARF);
    dir.write("wharf.service", &service);
    dir.write("wharf.socket", &read("configs/systemd/wharf.socket"));
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "./wharf.socket", "./wharf.service"])
        .current_dir(&dir.0)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
    for hardening in ["DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes"] {
        assert!(service.contains(hardening), "{hardening} missing");
    }
}
