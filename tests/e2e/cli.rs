//! The command line: check, plugins, and every startup failure a user can cause ending in a
//! clear one-line error and a non-zero exit, never a panic.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use crate::harness::*;

fn wharf(args: &[&str]) -> Output {
    Command::new(WHARF).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_no_panic(o: &Output) {
    let err = stderr(o);
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

#[test]
fn check_accepts_the_embedded_default_and_prints_services() {
    let out = wharf(&["check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("service echo: plugin = echo, listen = 127.0.0.1:6969"),
        "{text}"
    );
    assert!(text.contains("transform = \"upper\""), "{text}");
    assert!(
        text.contains("metrics: http://127.0.0.1:9898/metrics"),
        "{text}"
    );
}

/// The embedded default works from any directory: outside the repository (no `files/` there)
/// its file-get service is left out with a warning saying why, the others are valid. A config
/// given with `--config` gets no such leniency: a missing root stays an error.
#[test]
fn the_embedded_default_works_outside_the_repository() {
    let dir = TempDir::new();
    let check = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(WHARF);
        cmd.arg("check").current_dir(&dir.0);
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("WHARF_")) {
            cmd.env_remove(name);
        }
        cmd.envs(env.iter().copied()).output().unwrap()
    };
    let out = check(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    // No override set: none claimed. Each service's blocking threads shown.
    assert!(
        text.starts_with("config: embedded configs/default.toml\n"),
        "{text}"
    );
    assert!(text.contains("service echo: plugin = echo"), "{text}");
    assert!(text.contains("max_blocking = 8"), "{text}");
    let out = check(&[("WHARF_SERVER__WORKERS", "2")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(
            "config: embedded configs/default.toml (overridden by WHARF_SERVER__WORKERS)\n"
        ),
        "{text}"
    );
    assert!(!text.contains("service files:"), "{text}");
    assert!(text.contains("ok: 3 service(s) valid"), "{text}");
    let err = stderr(&out);
    assert!(
        err.contains("left out of the embedded default config")
            && err.contains("services.files.options.root"),
        "{err}"
    );

    let path = dir.write(
        "own.toml",
        "[services.files]\nplugin = \"file-get\"\nlisten = \"127.0.0.1:0\"\n\
         [services.files.options]\nroot = \"files\"\n",
    );
    let out = Command::new(WHARF)
        .args(["check", "--config", &path.display().to_string()])
        .current_dir(&dir.0)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("services.files.options.root"));
}

#[test]
fn check_reports_every_error_with_file_key_and_choices() {
    let dir = TempDir::new();
    let path = dir.write(
        "bad.toml",
        "[server]\nbackend = \"kqueue\"\n\
         [services.web]\nplugin = \"http\"\nlisten = \"127.0.0.1:0\"\n\
         [services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n\
         [services.echo.options]\ntransfrom = \"upper\"\n",
    );
    let file = path.display().to_string();
    let out = wharf(&["check", "--config", &file]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_no_panic(&out);
    for needle in [
        format!("{file}: server.backend = \"kqueue\": unknown value `kqueue`; valid choices: auto, epoll, io_uring"),
        format!("{file}: services.web.plugin = \"http\": unknown plugin `http`; valid choices: echo"),
        format!("{file}: services.echo.options.transfrom = \"upper\": unknown key `transfrom`; valid keys: transform"),
    ] {
        assert!(err.contains(&needle), "missing {needle:?} in:\n{err}");
    }
}

#[test]
fn check_reports_every_bad_key_of_every_service_quoting_the_value() {
    // Three errors in one service (framework keys and a plugin option) and one in another,
    // plus a secret of the wrong type: all reported in one run, each with file, key and the
    // value as written (the secret's hidden), in words a user knows.
    let dir = TempDir::new();
    let path = dir.write(
        "bad.toml",
        "[services.one]\nplugin = \"echo\"\nlisten = \"nowhere\"\nmax_connections = \"lots\"\n\
         [services.one.options]\ntransform = \"shout\"\n\
         [services.two]\nplugin = \"exec\"\nlisten = \"127.0.0.1:0\"\n\
         [services.two.options]\ntimeout = \"soon\"\ntoken = 4815162342\n",
    );
    let file = path.display().to_string();
    for command in ["check", "serve"] {
        let out = wharf(&[command, "--config", &file]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert_no_panic(&out);
        let err = stderr(&out);
        for needle in [
            format!("{file}: services.one.listen = \"nowhere\": expected an IP address with port"),
            format!(
                "{file}: services.one.max_connections = \"lots\": expected a non-negative integer"
            ),
            format!("{file}: services.one.options.transform = \"shout\": unknown value"),
            format!(
                "{file}: services.two.options.timeout = \"soon\": expected a duration like \"30s\""
            ),
            format!("{file}: services.two.options.token = (value hidden): expected a string"),
        ] {
            assert!(
                err.contains(&needle),
                "{command}: missing {needle:?} in:\n{err}"
            );
        }
        assert!(err.contains("5 configuration errors"), "{command}: {err}");
        assert!(
            !err.contains("4815162342"),
            "{command} shows the secret: {err}"
        );
        assert!(!err.contains("listening"), "{err}");
    }
}

#[test]
fn config_prints_the_effective_config_which_serve_accepts_back() {
    let dir = TempDir::new();
    let path = dir.write(
        "w.toml",
        "[services.echo]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n\
         [services.exec]\nplugin = \"exec\"\nlisten = \"127.0.0.1:0\"\n\
         [services.exec.options]\ntoken = \"s3cret-token-1\"\n\
         [services.exec.options.commands]\nhi = { argv = [\"/bin/echo\", \"hi\"] }\n",
    );
    let config = |path: &std::path::Path, env: &[(&str, &str)]| {
        let out = Command::new(WHARF)
            .args(["config", "--config", path.to_str().unwrap()])
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr(&out),
        )
    };
    let (code, dump, err) = config(&path, &[("WHARF_SERVICES__ECHO__IDLE_TIMEOUT", "7s")]);
    assert_eq!(code, Some(0), "{err}");
    // Where each layer came from; every default filled in, plugin options included.
    assert!(
        dump.contains(&format!("# Base: {}", path.display())),
        "{dump}"
    );
    assert!(
        dump.contains("overridden by WHARF_SERVICES__ECHO__IDLE_TIMEOUT"),
        "{dump}"
    );
    for needle in [
        "idle_timeout = \"7s\"",
        "max_connections = 10000",
        "shutdown_grace = \"30s\"",
        "transform = \"none\"",
        "max_concurrent = 16",
        "argv = [\"/bin/echo\", \"hi\"]",
        "token = \"<redacted>\"",
    ] {
        assert!(dump.contains(needle), "missing {needle:?} in:\n{dump}");
    }
    assert!(!dump.contains("s3cret-token-1") && !err.contains("s3cret-token-1"));

    // The dump is a config: with the placeholder it is refused, naming the secret...
    let again = dir.write("dump.toml", &dump);
    let out = wharf(&["serve", "--config", again.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "services.exec.options.token = (value hidden): `<redacted>` stands for a secret"
        ),
        "{}",
        stderr(&out)
    );
    // ...and with the secret filled back in it runs, and prints itself unchanged.
    let filled = dump.replace("<redacted>", "s3cret-token-1");
    let again = dir.write("filled.toml", &filled);
    let (code, redump, err) = config(&again, &[]);
    assert_eq!(code, Some(0), "{err}");
    let body = |text: &str| {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(body(&redump), body(&dump));
    let server = Server::start(&filled, "epoll");
    let mut s = connect(server.addr("echo"));
    assert_eq!(echo_once(&mut s, b"round trip"), b"round trip");

    // An invalid config: the errors, exit 2, nothing printed.
    let bad = dir.write(
        "bad.toml",
        "[services.e]\nplugin = \"echo\"\nlisten = \"x\"\n",
    );
    let (code, dump, err) = config(&bad, &[]);
    assert_eq!(code, Some(2));
    assert!(dump.is_empty(), "{dump}");
    assert!(err.contains("services.e.listen = \"x\""), "{err}");
}

#[test]
fn syntax_errors_and_missing_files_are_reported() {
    let dir = TempDir::new();
    let path = dir.write("broken.toml", "[services.echo\nplugin = \n");
    let out = wharf(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("broken.toml"), "{}", stderr(&out));
    assert_no_panic(&out);

    let out = wharf(&["serve", "--config", "/nonexistent/wharf.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/wharf.toml: config file not found"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn serve_with_a_bad_config_exits_before_binding() {
    let port = free_addr().port();
    let config = format!(
        "[services.good]\nplugin = \"echo\"\nlisten = \"127.0.0.1:{port}\"\n\
         [services.bad]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\nidle_timeout = \"soon\"\n"
    );
    let dir = TempDir::new();
    let path = dir.write("w.toml", &config);
    let out = wharf(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("services.bad.idle_timeout"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("listening"), "{}", stderr(&out));
}

#[test]
fn address_in_use_is_a_one_line_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    for backend in ["epoll", "auto"] {
        let config = format!("[services.echo]\nplugin = \"echo\"\nlisten = \"{addr}\"\n");
        let err = Server::start_with(&config, &["--backend", backend], &[])
            .err()
            .unwrap();
        assert!(err.contains("exited early (exit status: 3)"), "{err}");
        assert!(
            err.contains(&format!("services.echo.listen: cannot listen on {addr}")),
            "{err}"
        );
        assert!(err.contains("Address already in use"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn plugins_lists_names_descriptions_and_options() {
    let out = wharf(&["plugins"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("echo: RFC 862 stream echo"), "{text}");
    assert!(
        text.contains("transform = \"none\" | \"upper\" (default \"none\")"),
        "{text}"
    );
}

#[test]
fn unknown_backend_flag_is_rejected_with_choices() {
    let out = wharf(&["serve", "--backend", "kqueue"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("epoll") && err.contains("io_uring"), "{err}");
}

/// Runs `wharf` under a real seccomp filter that refuses io_uring_setup with EPERM, the way
/// Docker's default profile does.
#[test]
fn io_uring_refused_by_seccomp_explicit_fails_clearly_and_auto_serves_on_epoll() {
    let dir = TempDir::new();
    let path = dir.write("w.toml", &echo_config(""));
    let run = |backend: &str| {
        let mut cmd = Command::new(WHARF);
        cmd.args([
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--backend",
            backend,
        ]);
        // SAFETY: only async-signal-safe calls (prctl) between fork and exec.
        unsafe { cmd.pre_exec(deny_io_uring_setup) };
        cmd
    };

    // Explicit io_uring: a clear startup error naming the cause.
    let out = run("io_uring").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("io_uring") && err.contains("EPERM") && err.contains("seccomp"),
        "{err}"
    );
    assert_no_panic(&out);

    // auto: serves on epoll, saying why.
    let mut child = run("auto")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut reader = std::io::BufReader::new(child.stderr.take().unwrap());
    while !log.contains("wharf ready") {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut reader, &mut line).unwrap() == 0 {
            break;
        }
        log.push_str(&line);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(log.contains("backend auto: epoll measures better"), "{log}");
    assert!(log.contains("backend=epoll"), "{log}");
}

/// Installs a seccomp filter: io_uring_setup(2) fails with EPERM, everything else is allowed.
fn deny_io_uring_setup() -> std::io::Result<()> {
    const SYS_IO_URING_SETUP: u32 = 425; // same number on every architecture
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let mut filter = [
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0), // A = seccomp_data.nr
        jump(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            SYS_IO_URING_SETUP,
            0,
            1,
        ),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: plain prctl calls with a valid, live filter program.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
