//! Unix-domain stream listeners: every stream plugin over `unix:` sockets with real clients
//! (Python's `socket.AF_UNIX`, socat, curl, `wharf client`), peer credentials (`allow_uids`,
//! UCSPI, the access log), the socket file's life (mode and group, stale files, removal at exit
//! and on reload), and systemd socket activation of a Unix socket.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

/// Python: connect to the Unix socket argv[1] (`@name`: abstract), send argv[2] and a newline,
/// half-close, print everything that comes back.
const PY_UNIX_CLIENT: &str = r"import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
a = sys.argv[1]
s.connect('\0' + a[1:] if a.startswith('@') else a)
s.sendall(sys.argv[2].encode() + b'\n')
s.shutdown(socket.SHUT_WR)
out = b''
while True:
    d = s.recv(65536)
    if not d:
        break
    out += d
sys.stdout.write(out.decode())
";

/// Runs [`PY_UNIX_CLIENT`]; `None` when python3 is missing (the caller skips that check).
fn python_unix(addr: &str, line: &str) -> Option<String> {
    if !have_tool("python3", "--version") {
        return None;
    }
    let out = Command::new("python3")
        .args(["-c", PY_UNIX_CLIENT, addr, line])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

/// `socat` with `input` on stdin to `UNIX-CONNECT:path`, as `uid` when given (via setpriv):
/// what came back.
fn socat(path: &Path, input: &str, uid: Option<u32>) -> String {
    let mut cmd = match uid {
        None => Command::new("socat"),
        Some(uid) => {
            let mut cmd = Command::new("setpriv");
            cmd.args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
                "socat".into(),
            ]);
            cmd
        }
    };
    cmd.args(["-t", "5", "-", &format!("UNIX-CONNECT:{}", path.display())]);
    let out = run_with_stdin(&mut cmd, input.as_bytes());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A connection to `path` that reads with a timeout.
fn connect_unix(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn echo_unix(s: &mut UnixStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).unwrap();
    got
}

/// Waits until nothing is at `path` any more.
fn gone_within(path: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while path.exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// [`echo_config`] with the echo service's `listen` line replaced by `keys`.
fn echo_on(keys: &str) -> String {
    let listen = "listen = \"127.0.0.1:0\"\n\n[services.echo.options]";
    echo_config("").replace(listen, &format!("{keys}\n[services.echo.options]"))
}

fn running_as_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn toml_str(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn every_stream_plugin_serves_over_unix_sockets_and_the_files_go_at_exit() {
    let dir = TempDir::new();
    let root = TempDir::new();
    std::fs::write(root.0.join("hello.txt"), "hello over unix\n").unwrap();
    let sock = |name: &str| dir.0.join(name);
    let env_script = "import os\n\
        for k in ('PROTO', 'UNIXREMOTEUID', 'UNIXREMOTEGID', 'UNIXREMOTEPID', 'TCPREMOTEIP'):\n\
        \x20   print(k + '=' + os.environ.get(k, '-'))";
    for backend in backends() {
        let abstract_name = format!("wharf-e2e-{}-{backend}", std::process::id());
        let log = dir.0.join(format!("access-{backend}.log"));
        let config = format!(
            "[server]\nworkers = 2\nshutdown_grace = \"5s\"\n\
             [access_log]\npath = \"{log}\"\nformat = \"json\"\nbuffer_lines = 1000\n\
             [services.echo]\nplugin = \"echo\"\nlisten = \"unix:{echo}\"\n\
             [services.echo.options]\ntransform = \"upper\"\n\
             [services.web]\nplugin = \"http-hello\"\nlisten = \"unix:@{abstract_name}\"\n\
             [services.files]\nplugin = \"file-get\"\nlisten = \"unix:{files}\"\n\
             [services.files.options]\nroot = \"{root}\"\n\
             [services.exec]\nplugin = \"exec\"\nlisten = \"unix:{exec}\"\n\
             [services.exec.options]\ncwd = \"{root}\"\n\
             [services.exec.options.commands]\nhello = {{ argv = [\"echo\", \"hi from exec\"] }}\n\
             [services.env]\nplugin = \"process\"\nlisten = \"unix:{env}\"\n\
             [services.env.options]\nargv = [\"python3\", \"-c\", \"{script}\"]\n",
            log = toml_str(&log),
            echo = toml_str(&sock("echo.sock")),
            files = toml_str(&sock("files.sock")),
            exec = toml_str(&sock("exec.sock")),
            env = toml_str(&sock("env.sock")),
            root = toml_str(&root.0),
            script = env_script.replace('\n', "\\n"),
        );
        let mut server = Server::start(&config, backend);
        for name in ["echo.sock", "files.sock", "exec.sock", "env.sock"] {
            let meta = std::fs::symlink_metadata(sock(name)).unwrap();
            assert_eq!(
                meta.permissions().mode() & 0o777,
                0o660,
                "{name}: default mode"
            );
        }
        assert!(server
            .log()
            .contains(&format!("listen=unix:{}", sock("echo.sock").display())));

        // echo: a Rust client, Python's AF_UNIX, socat.
        let mut s = connect_unix(&sock("echo.sock"));
        assert_eq!(echo_unix(&mut s, b"rust\n"), b"RUST\n", "{backend}");
        if let Some(out) = python_unix(&toml_str(&sock("echo.sock")), "python") {
            assert_eq!(out, "PYTHON\n", "{backend}");
        }
        if have_tool("socat", "-V") {
            assert_eq!(socat(&sock("echo.sock"), "socat\n", None), "SOCAT\n");
        }
        // http-hello on an abstract name: curl.
        if have_tool("curl", "--version") {
            let out = Command::new("curl")
                .args(["-sS", "--abstract-unix-socket", &abstract_name])
                .arg("http://localhost/")
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "Hello, World",
                "{backend}"
            );
        }
        // file-get and exec: `wharf client` speaks unix: addresses.
        let files_addr = format!("unix:{}", sock("files.sock").display());
        let (code, _, err) = wharf_client(&dir.0, &["get", &files_addr, "hello.txt", "-o", "got"]);
        assert_eq!(code, 0, "{backend}: {err}");
        let got = std::fs::read_to_string(dir.0.join("got")).unwrap();
        assert_eq!(got, "hello over unix\n");
        std::fs::remove_file(dir.0.join("got")).unwrap();
        let exec_addr = format!("unix:{}", sock("exec.sock").display());
        let (code, out, err) = wharf_client(&dir.0, &["exec", &exec_addr, "--", "hello"]);
        assert_eq!(
            (code, out.as_str()),
            (0, "hi from exec\n"),
            "{backend}: {err}"
        );
        // process: the program learns its client's credentials (UCSPI's unixserver names).
        if let Some(out) = python_unix(&toml_str(&sock("env.sock")), "") {
            // SAFETY: no preconditions.
            let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines[0], "PROTO=UNIX", "{out}");
            assert_eq!(lines[1], format!("UNIXREMOTEUID={uid}"), "{out}");
            assert_eq!(lines[2], format!("UNIXREMOTEGID={gid}"), "{out}");
            let pid: u32 = lines[3]
                .strip_prefix("UNIXREMOTEPID=")
                .unwrap()
                .parse()
                .unwrap();
            assert!(pid > 1, "{out}");
            assert_eq!(lines[4], "TCPREMOTEIP=-", "{out}");
        }
        drop(s);

        // SIGTERM: every socket file goes, the abstract name with its socket.
        server.signal(libc::SIGTERM);
        assert!(server.wait(Duration::from_secs(20)).unwrap().success());
        for name in ["echo.sock", "files.sock", "exec.sock", "env.sock"] {
            assert!(!sock(name).exists(), "{backend}: {name} left behind");
        }
        // The access log names Unix clients by their credentials.
        let text = std::fs::read_to_string(&log).unwrap();
        // The connection of this process (Python's and socat's were others).
        let pid = format!("\"pid\":{},", std::process::id());
        let line = text
            .lines()
            .find(|l| l.contains("\"service\":\"echo\"") && l.contains(&pid))
            .unwrap_or_else(|| panic!("{text}"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["client"], "unix", "{line}");
        // SAFETY: no preconditions.
        assert_eq!(v["uid"], u64::from(unsafe { libc::geteuid() }), "{line}");
        assert_eq!(v["pid"], u64::from(std::process::id()), "{line}");
    }
}

#[test]
fn allow_uids_refuses_another_user_and_counts_it() {
    if !running_as_root() {
        return skip_or_fail("allow_uids test: needs root to connect as another uid");
    }
    if !have_tool("socat", "-V") || !have_tool("setpriv", "--version") {
        return;
    }
    let dir = TempDir::new();
    let path = dir.0.join("echo.sock");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The mode lets anyone connect: the refusal is wharf's, not the file system's.
    let keys = format!(
        "socket_mode = \"0666\"\nallow_uids = [0]\nallow_gids = [4242]\n\
         listen = \"unix:{}\"\n",
        path.display()
    );
    let config = echo_on(&keys);
    for backend in backends() {
        let server = Server::start(&config, backend);
        assert_eq!(socat(&path, "root\n", None), "ROOT\n", "{backend}");
        assert_eq!(
            socat(&path, "nobody\n", Some(65534)),
            "",
            "{backend}: refused"
        );
        let labels = [
            ("service", "echo"),
            ("plugin", "echo"),
            ("backend", backend),
        ];
        let mut rejected = labels.to_vec();
        rejected.push(("reason", "allow_uids"));
        server.wait_metric("wharf_connections_rejected_total", &rejected, 1.0);
        let accepted = server.metric("wharf_connections_accepted_total", &labels);
        assert_eq!(accepted, Some(1.0), "{backend}");
    }
}

#[test]
fn socket_mode_and_group_are_applied_to_the_file() {
    let dir = TempDir::new();
    let path = dir.0.join("echo.sock");
    // Root may give the file any group; anyone else, only one of their own.
    // SAFETY: no preconditions.
    let group = if running_as_root() {
        65534
    } else {
        unsafe { libc::getegid() }
    };
    let keys = format!(
        "socket_mode = \"0640\"\nsocket_group = \"{group}\"\nlisten = \"unix:{}\"\n",
        path.display()
    );
    let config = echo_on(&keys);
    let server = Server::start(&config, "epoll");
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    assert_eq!(meta.gid(), group);
    assert_eq!(echo_unix(&mut connect_unix(&path), b"mode\n"), b"MODE\n");
    drop(server);
}

#[test]
fn a_stale_socket_is_replaced_a_live_one_refused_and_a_file_never_deleted() {
    let dir = TempDir::new();
    let path = dir.0.join("echo.sock");
    let config = echo_on(&format!("listen = \"unix:{}\"\n", path.display()));
    // Stale: a socket file whose listener is gone (a server that was killed).
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = Server::start(&config, "epoll");
    assert_eq!(echo_unix(&mut connect_unix(&path), b"stale\n"), b"STALE\n");
    assert!(server.log().contains("removing a stale socket file"));

    // Live: a second server must not take the first one's socket.
    let err = Server::start_with(&config, &["--backend", "epoll"], &[])
        .err()
        .expect("the socket is in use");
    assert!(err.contains("exited early (exit status: 3)"), "{err}");
    assert!(
        err.contains(&format!(
            "services.echo.listen: cannot listen on unix:{}: a socket file is there and a \
             process answers on it",
            path.display()
        )),
        "{err}"
    );
    assert_eq!(echo_unix(&mut connect_unix(&path), b"still\n"), b"STILL\n");
    let mut server = server;
    server.signal(libc::SIGTERM);
    assert!(server.wait(Duration::from_secs(20)).unwrap().success());
    assert!(!path.exists(), "removed at exit");

    // Not a socket: never deleted.
    std::fs::write(&path, "precious").unwrap();
    let err = Server::start_with(&config, &["--backend", "epoll"], &[])
        .err()
        .expect("a regular file is in the way");
    assert!(err.contains("exited early (exit status: 1)"), "{err}");
    assert!(err.contains("is not a socket: not removing it"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[test]
fn a_reload_keeps_moves_and_removes_a_unix_socket() {
    let dir = TempDir::new();
    let (a, b) = (dir.0.join("a.sock"), dir.0.join("b.sock"));
    let listen = |p: &PathBuf| format!("listen = \"unix:{}\"\n", p.display());
    let config = echo_on(&listen(&a));
    for backend in backends() {
        let mut server = Server::start(&config, backend);
        let inode = std::fs::metadata(&a).unwrap().ino();
        let mut open = connect_unix(&a);
        assert_eq!(echo_unix(&mut open, b"one\n"), b"ONE\n");

        // Changed settings, same path: the same socket, no gap, open connections stay; a
        // new socket_mode applies to the file.
        assert_eq!(std::fs::metadata(&a).unwrap().mode() & 0o777, 0o660);
        let changed = config.replace("\"upper\"", "\"none\"").replace(
            &listen(&a),
            &format!("{}socket_mode = \"0600\"\n", listen(&a)),
        );
        server.rewrite_config(&changed);
        server.expect_reload("changed=echo");
        assert_eq!(std::fs::metadata(&a).unwrap().ino(), inode, "{backend}");
        assert_eq!(
            std::fs::metadata(&a).unwrap().mode() & 0o777,
            0o600,
            "{backend}"
        );
        assert_eq!(echo_unix(&mut connect_unix(&a), b"two\n"), b"two\n");
        assert_eq!(echo_unix(&mut open, b"old\n"), b"OLD\n");

        // Moved: the new file serves, the old one is gone.
        server.rewrite_config(&config.replace(&listen(&a), &listen(&b)));
        server.expect_reload("configuration reloaded");
        assert_eq!(echo_unix(&mut connect_unix(&b), b"moved\n"), b"MOVED\n");
        assert!(gone_within(&a, Duration::from_secs(5)), "{backend}");

        // Removed: its file goes too.
        let other = "[services.other]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n";
        let without = config.split("[services.echo]").next().unwrap().to_string() + other;
        server.rewrite_config(&without);
        server.expect_reload("configuration reloaded");
        assert!(gone_within(&b, Duration::from_secs(5)), "{backend}");
    }
}

#[test]
fn systemd_socket_activation_passes_a_unix_socket() {
    if !have_tool("systemd-socket-activate", "--version") {
        return;
    }
    let dir = TempDir::new();
    let path = dir.0.join("activated.sock");
    let config = echo_on(&format!("listen = \"unix:{}\"\n", path.display()));
    for backend in backends() {
        let wrapper = [
            "systemd-socket-activate".to_string(),
            format!("--listen={}", path.display()),
            "-E".into(),
            "WHARF_LOG".into(),
        ];
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        // systemd-socket-activate starts wharf on the first connection.
        let first = {
            let path = path.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    if let Ok(s) = UnixStream::connect(&path) {
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        return s;
                    }
                    assert!(Instant::now() < deadline, "nothing listens on {path:?}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let mut server =
            Server::start_wrapped(&config, &wrapper, &["--backend", backend], &[], |c| {
                c.stdout(Stdio::null());
            })
            .unwrap_or_else(|e| panic!("{backend}: {e}"));
        assert_eq!(
            echo_unix(&mut first.join().unwrap(), b"first\n"),
            b"FIRST\n"
        );
        assert_eq!(echo_unix(&mut connect_unix(&path), b"more\n"), b"MORE\n");
        assert!(!server.log().contains("removing a stale socket file"));
        // The file is systemd's: wharf leaves it when it stops.
        server.signal(libc::SIGTERM);
        assert!(server.wait(Duration::from_secs(20)).is_some());
        assert!(
            path.exists(),
            "{backend}: systemd's socket file was removed"
        );
        drop(server);
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn wharf_check_refuses_keys_that_cannot_apply_to_the_listen_kind() {
    let dir = TempDir::new();
    let check = |path: &Path| {
        let mut cmd = Command::new(WHARF);
        cmd.args(["check", "--config"]).arg(path).output().unwrap()
    };
    let cases = [
        (
            "listen = \"unix:/run/x.sock\"\nallow_from = [\"10.0.0.0/8\"]\n",
            "services.echo.allow_from",
            "a Unix-domain client has no IP address",
        ),
        (
            "listen = \"127.0.0.1:0\"\nallow_uids = [0]\n",
            "services.echo.allow_uids",
            "applies to Unix-domain listeners only",
        ),
        (
            "listen = \"unix:@x\"\nsocket_mode = \"0600\"\n",
            "services.echo.socket_mode",
            "an abstract socket (unix:@name) has no file",
        ),
        (
            "listen = \"unix:/run/x.sock\"\nsocket_mode = \"999\"\n",
            "services.echo.socket_mode",
            "is not a permission mode",
        ),
    ];
    for (keys, key, message) in cases {
        let config = format!("[services.echo]\nplugin = \"echo\"\n{keys}");
        let out = check(&dir.write("w.toml", &config));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{keys}");
        assert!(err.contains(key) && err.contains(message), "{keys}: {err}");
    }
    // A valid one: `wharf check` shows the socket's settings, relative to the config's directory.
    let config = "[services.echo]\nplugin = \"echo\"\nlisten = \"unix:run/echo.sock\"\n\
                  socket_mode = \"0640\"\nallow_uids = [0, 1000]\n";
    let out = check(&dir.write("w.toml", config));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let socket = dir.0.join("run/echo.sock");
    assert!(
        text.contains(&format!("listen = unix:{}", socket.display())),
        "{text}"
    );
    assert!(
        text.contains("unix socket: mode 0640, group (wharf's own); peers: allow_uids = 0, 1000"),
        "{text}"
    );
    let out = Command::new(WHARF).arg("plugins").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("listens on: TCP (IP:port), unix:/path, unix:@name"),
        "{text}"
    );
}
