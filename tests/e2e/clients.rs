//! `wharf client` pointed at the wrong kind of service says so and exits 1, instead of printing
//! another protocol's answer as its own; and `client get` never discards a partial download.

use std::process::Command;

use crate::harness::*;

/// Every built-in plugin on one server; exec allows `date`, `get` and `list` are not allowed.
fn start(root: &std::path::Path) -> Server {
    let exec = format!(
        "[services.exec.options]\ncwd = \"{}\"\n\
         [services.exec.options.commands]\ndate = {{ argv = [\"date\"] }}\n",
        root.display()
    );
    Server::start(&all_plugins_config(root, &exec), "epoll")
}

#[test]
fn each_client_notices_another_kind_of_service() {
    let files = TempDir::new();
    std::fs::write(files.0.join("hello.txt"), b"hello\n").unwrap();
    let work = TempDir::new();
    let server = start(&files.0);
    let [echo, exec, file_get] = ["echo", "exec", "files"].map(|s| server.addr(s).to_string());
    let wrong = |kind: &str, answer: &str| {
        format!("wharf: error: this does not look like {kind} service: it answered `{answer}`")
    };

    // The right service still works, and its refusals are refusals.
    let (code, out, err) = wharf_client(&work.0, &["list", &file_get]);
    assert_eq!((code, out.as_str()), (0, "6\thello.txt\n"), "{err}");
    let (code, _, err) = wharf_client(&work.0, &["get", &file_get, "nope.txt"]);
    assert_eq!(code, 1);
    assert!(err.contains("server refused: ERR no such file"), "{err}");

    // file-get clients at exec (a sized result, but not a listing / no digest) and echo.
    let (code, out, err) = wharf_client(&work.0, &["list", &exec]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(
        err.contains(&wrong("a file-get", "command not allowed: list")),
        "{err}"
    );
    let (code, _, err) = wharf_client(&work.0, &["list", &echo]);
    assert_eq!(code, 1);
    assert!(err.contains(&wrong("a file-get", "LIST")), "{err}");
    let (code, _, err) = wharf_client(&work.0, &["get", &exec, "hello.txt"]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&wrong("a file-get", "command not allowed: get")),
        "{err}"
    );
    let (code, _, err) = wharf_client(&work.0, &["get", &echo, "hello.txt"]);
    assert_eq!(code, 1);
    assert!(err.contains(&wrong("a file-get", "GET HELLO.TXT")), "{err}");
    assert_eq!(
        std::fs::read_dir(&work.0).unwrap().count(),
        0,
        "a wrong service's answer was saved"
    );

    // The exec client at file-get and echo.
    let (code, out, err) = wharf_client(&work.0, &["exec", &file_get, "--", "date"]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    let refusal = "this does not look like an exec service: it answered `ERR bad request";
    assert!(err.contains(refusal), "{err}");
    let (code, _, err) = wharf_client(&work.0, &["exec", &echo, "--", "date"]);
    assert_eq!(code, 1);
    assert!(err.contains(&wrong("an exec", "DATE")), "{err}");
}

#[test]
fn get_keeps_an_existing_part_file_unless_told_to_resume() {
    let files = TempDir::new();
    let data = payload(100_000, 3);
    std::fs::write(files.0.join("data.bin"), &data).unwrap();
    let work = TempDir::new();
    let server = start(&files.0);
    let addr = server.addr("files").to_string();
    let part = work.0.join("data.bin.part");
    std::fs::write(&part, &data[..1000]).unwrap();

    // Without --resume: refused, the partial download untouched, the way on named.
    let (code, _, err) = wharf_client(&work.0, &["get", &addr, "data.bin"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("data.bin.part exists") && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(std::fs::read(&part).unwrap(), &data[..1000]);
    assert!(!work.0.join("data.bin").exists());

    // With it: continued and verified.
    let (code, _, err) = wharf_client(&work.0, &["get", &addr, "data.bin", "--resume"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(work.0.join("data.bin")).unwrap(), data);
    assert!(!part.exists());
}

/// A server that dies in the middle of a file: the client says how far it got and keeps
/// exactly the bytes that arrived (more than one of its buffers' worth, sent in two bursts),
/// and `--resume` against a real file-get server completes and verifies them.
#[test]
fn get_keeps_what_arrived_when_the_server_dies_mid_file() {
    use std::io::{Read, Write};
    let files = TempDir::new();
    let data = payload(3_000_000, 9);
    std::fs::write(files.0.join("data.bin"), &data).unwrap();
    let work = TempDir::new();
    let (total, cut, pause_at) = (data.len(), 2_300_000, 1_500_000);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dying_addr = listener.local_addr().unwrap().to_string();
    let sent = data[..cut].to_vec();
    let dying = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut line = [0u8; 64];
        let n = s.read(&mut line).unwrap();
        assert_eq!(&line[..n], b"get data.bin\n");
        s.write_all(total.to_string().as_bytes()).unwrap();
        let n = s.read(&mut line).unwrap();
        assert_eq!(&line[..n], b"ok\n");
        s.write_all(&sent[..pause_at]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        s.write_all(&sent[pause_at..]).unwrap();
        // Then the connection closes, with no digest.
    });
    let (code, _, err) = wharf_client(&work.0, &["get", &dying_addr, "data.bin"]);
    dying.join().unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "download interrupted after {cut} of {total} bytes (the server closed the connection)"
        )) && err.contains("--resume"),
        "{err}"
    );
    let part = work.0.join("data.bin.part");
    assert!(
        std::fs::read(&part).unwrap() == data[..cut],
        "the part file is not what arrived"
    );

    let server = start(&files.0);
    let addr = server.addr("files").to_string();
    let (code, _, err) = wharf_client(&work.0, &["get", &addr, "data.bin", "--resume"]);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read(work.0.join("data.bin")).unwrap() == data);
    assert!(!part.exists());
}

/// `wharf client echo` is the README's way to try the echo service (no `nc`, whose flags differ
/// between variants): the words as one line, or stdin streamed whole, larger than the socket
/// buffers so sending and receiving must overlap.
#[test]
fn client_echo_sends_words_or_stdin_and_prints_the_answer() {
    let files = TempDir::new();
    let server = start(&files.0);
    let echo = server.addr("echo").to_string();
    let (code, out, err) = wharf_client(&files.0, &["echo", &echo, "hello", "wharf"]);
    assert_eq!((code, out.as_str()), (0, "HELLO WHARF\n"), "{err}");

    let input: Vec<u8> = (0..8 * 1024 * 1024).map(|i| b"abcdefgh\n"[i % 9]).collect();
    let mut child = Command::new(WHARF)
        .args(["client", "echo", &echo])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feed = {
        let input = input.clone();
        std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input))
    };
    let out = child.wait_with_output().unwrap();
    feed.join().unwrap().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), input.len());
    assert_eq!(out.stdout, input.to_ascii_uppercase());

    // Nothing listening: a clear error, exit 1.
    let (code, _, err) = wharf_client(&files.0, &["echo", "127.0.0.1:1", "x"]);
    assert_eq!(code, 1);
    assert!(err.starts_with("wharf: error: 127.0.0.1:1: "), "{err}");
}
