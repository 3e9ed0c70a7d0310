//! TLS files as configuration: `wharf check` and `wharf serve` refuse broken ones (bad or
//! unreadable files, a key that is not the certificate's, an expired certificate, settings
//! that need a `client_ca`) naming the config file, the key and the TLS file, before anything
//! binds; relative paths are relative to the config file; and rotated files (certbot,
//! cert-manager: the config unchanged) are picked up by SIGHUP and `--watch-config`, a broken
//! rotation being rejected like any invalid config while the old certificate stays.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::harness::*;
use crate::pki::{CertFiles, Pki};

fn check(config: &Path, cwd: &Path) -> Output {
    Command::new(WHARF)
        .args(["check", "--config"])
        .arg(config)
        .current_dir(cwd)
        .env_remove("WHARF_LOG")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An echo service named `name` on a free port with `tls` lines under its `.tls` table and
/// `extra` service keys.
fn echo_tls(name: &str, extra: &str, tls: &str) -> String {
    format!(
        "[services.{name}]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n{extra}\n\
         [services.{name}.tls]\n{tls}\n"
    )
}

fn files(files: &CertFiles) -> String {
    format!(
        "cert = {:?}\nkey = {:?}\n",
        files.cert.display().to_string(),
        files.key.display().to_string()
    )
}

/// Replaces `path` the way certbot and cert-manager do: a new file renamed over the old one.
fn replace(path: &Path, from: &Path) {
    let tmp = path.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn check_names_the_config_file_the_key_and_the_tls_file_of_every_problem() {
    let dir = TempDir::new();
    let pki = Pki::new(&dir.0, "main");
    let good = pki.server("good");
    let other = pki.server("other");
    let expired = pki.expired_server("expired");
    let missing = dir.0.join("missing.pem");
    let config = [
        echo_tls(
            "mismatch",
            "",
            &format!("cert = {:?}\nkey = {:?}", good.cert, other.key),
        ),
        echo_tls("expired", "", &files(&expired)),
        echo_tls(
            "noca",
            "allow_identities = [\"ops\"]",
            &format!("{}client_auth = \"optional\"", files(&good)),
        ),
        echo_tls(
            "missing",
            "",
            &format!("{}client_ca = {missing:?}\nalpn = [\"\"]", files(&good)),
        ),
    ]
    .concat();
    let path = dir.write("wharf.toml", &config);
    let out = check(&path, &dir.0);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let file = path.display();
    for needle in [
        format!(
            "{file}: services.mismatch.tls.key: key in {} does not match the certificate in {}",
            other.key.display(),
            good.cert.display()
        ),
        format!(
            "{file}: services.expired.tls.cert: certificate in {} expired on 2020-01-01 00:00:00 UTC",
            expired.cert.display()
        ),
        format!(
            "{file}: services.noca.allow_identities: needs tls.client_ca: identities come from \
             client certificates signed by it"
        ),
        format!("{file}: services.noca.tls.client_auth: needs tls.client_ca"),
        format!(
            "{file}: services.missing.tls.client_ca: cannot read {}: No such file",
            missing.display()
        ),
        format!("{file}: services.missing.tls.alpn.0 = \"\": an ALPN protocol name is 1 to 255 bytes"),
        "6 configuration errors; nothing was started".to_string(),
    ] {
        assert!(err.contains(&needle), "missing {needle:?} in:\n{err}");
    }
    let key = std::fs::read_to_string(&other.key).unwrap();
    let secret = key.lines().nth(1).unwrap();
    assert!(!err.contains(secret), "a key line was printed:\n{err}");
}

#[test]
fn serve_refuses_a_broken_tls_file_before_binding_anything() {
    let dir = TempDir::new();
    let pki = Pki::new(&dir.0, "main");
    let good = pki.server("good");
    let addr = free_addr();
    // A plaintext service first: not even it may start.
    let config = format!(
        "[services.plain]\nplugin = \"echo\"\nlisten = \"{addr}\"\n{}",
        echo_tls(
            "secure",
            "",
            &format!("cert = {:?}\nkey = {:?}", good.cert, good.cert)
        )
    );
    let err = match Server::start_with(&config, &[], &[]) {
        Ok(_) => panic!("wharf served a config whose TLS key file holds a certificate"),
        Err(e) => e,
    };
    assert!(
        err.contains(&format!(
            "services.secure.tls.key: no private key in {} (it holds a certificate: is it the \
             `cert` file?)",
            good.cert.display()
        )),
        "{err}"
    );
    assert!(
        err.starts_with("wharf exited early (exit status: 2)"),
        "{err}"
    );
    assert!(!err.contains("listening"), "{err}");
    std::net::TcpListener::bind(addr).expect("the plaintext service's address stayed free");
}

#[test]
fn relative_tls_paths_are_relative_to_the_config_file() {
    let dir = TempDir::new();
    let tls_dir = dir.0.join("tls");
    std::fs::create_dir(&tls_dir).unwrap();
    let pki = Pki::new(&tls_dir, "main");
    pki.server("server");
    let path = dir.write(
        "wharf.toml",
        &echo_tls(
            "e",
            "",
            "cert = \"tls/server.pem\"\nkey = \"tls/server.key\"",
        ),
    );
    // Run from elsewhere: the working directory has no `tls/`.
    let elsewhere = TempDir::new();
    let out = check(&path, &elsewhere.0);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains(&format!("cert = {}", tls_dir.join("server.pem").display())),
        "{shown}"
    );
}

/// A TLS echo service `e` with metrics.
fn tls_server(files: &CertFiles, args: &[&str]) -> Server {
    let config = format!(
        "[server]\nworkers = 1\nshutdown_grace = \"5s\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n{}",
        echo_tls("e", "", &self::files(files))
    );
    Server::start_with(&config, args, &[]).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn sighup_reloads_rotated_tls_files_and_rejects_a_broken_rotation() {
    let dir = TempDir::new();
    let pki = Pki::new(&dir.0, "main");
    let live = pki.server("live");
    let renewed = pki.server("renewed");
    let mut server = tls_server(&live, &[]);
    let reloads = |s: &Server, result: &str| {
        s.metric("wharf_config_reloads_total", &[("result", result)])
            .unwrap_or(0.0)
    };

    // Nothing changed: nothing to do.
    server.expect_reload("no changes");
    // Renewed files under the same names, the config untouched: a new generation.
    replace(&live.cert, &renewed.cert);
    replace(&live.key, &renewed.key);
    server.expect_reload("changed=e");
    assert_eq!(reloads(&server, "success"), 2.0);

    // Half a rotation (the new certificate, the old key): rejected, naming the file; the
    // running service is untouched.
    let next = pki.server("next");
    replace(&live.cert, &next.cert);
    server.expect_reload("reload rejected");
    let needle = format!(
        "services.e.tls.key: key in {} does not match the certificate in {}",
        live.key.display(),
        live.cert.display()
    );
    assert_eq!(server.log_count(&needle), 1, "{}", server.log());
    assert_eq!(reloads(&server, "invalid"), 1.0);
    // The rotation completed: accepted.
    replace(&live.key, &next.key);
    server.expect_reload("changed=e");
    assert_eq!(reloads(&server, "success"), 3.0);
}

#[test]
fn watch_config_notices_tls_files_changing_alone() {
    let dir = TempDir::new();
    let pki = Pki::new(&dir.0, "main");
    let live = pki.server("live");
    let renewed = pki.server("renewed");
    let server = tls_server(&live, &["--watch-config"]);
    assert!(server.log().contains("watching the config file"));

    replace(&live.cert, &renewed.cert);
    replace(&live.key, &renewed.key);
    server.wait_log("configuration reloaded", 1, Duration::from_secs(10));
    let trigger = format!("trigger=\"{} changed\"", live.cert.display());
    assert_eq!(server.log_count(&trigger), 1, "{}", server.log());

    // A broken file is rejected once, not at every poll.
    std::fs::write(dir.0.join("broken.pem"), "not a certificate\n").unwrap();
    replace(&live.cert, &dir.0.join("broken.pem"));
    server.wait_log("reload rejected", 1, Duration::from_secs(10));
    server.wait_log(
        &format!(
            "services.e.tls.cert: no certificate in {}",
            live.cert.display()
        ),
        1,
        Duration::from_secs(1),
    );
    // Three more polls (every 500 ms) see the same broken file.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(server.log_count("reload rejected"), 1, "{}", server.log());

    // Fixed: reloaded again.
    replace(&live.cert, &renewed.cert);
    server.wait_log("configuration reloaded", 2, Duration::from_secs(10));
}
