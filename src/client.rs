//! `wharf client ...`: command-line clients for the built-in protocols: echo, and the
//! command-style protocols of exec and file-get.
//!
//! They speak exactly the wire protocol the tutorial's Python clients speak (command, size,
//! acknowledgement, result), with `\n`-terminated commands so the server never has to wait for
//! a pause. Plain blocking sockets: a client has one conversation at a time.
//!
//! With `--tls` the same conversations run inside TLS ([`transport`]); the flags and the
//! wording of TLS failures are `wharf_bench::tls`'s, shared with `wharf bench`.
//!
//! Each client checks that the answers have its protocol's shape (docs/protocols.md) and says
//! so when they do not (`WrongService`): pointed at the wrong port, `client list` would
//! otherwise print an exec refusal as a listing, and `client get` an echo as a refusal.

use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::time::Duration;

use wharf_bench::tls::ClientTls;
use wharf_plugin_exec::refusals;

mod pipeline;
mod transport;
use transport::{Socket, Transport};

/// Largest exec result or listing held in memory.
const MAX_RESULT: u64 = 256 * 1024 * 1024;

/// How long a client waits for the server before giving up.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A connection speaking command / size / ack / result.
pub struct CommandClient {
    stream: Transport,
}

/// What a framed reply turned out to be.
pub enum Reply {
    /// The server announced `size` bytes and is waiting for the acknowledgement.
    Size(u64),
    /// Anything that is not all digits (file-get's `ERR ...`), as text.
    Other(String),
}

impl CommandClient {
    /// Connects to `addr` (`host:port`, `unix:/path` or `unix:@name`), with a TLS handshake
    /// when `tls` is given.
    pub fn connect(addr: &str, tls: Option<&ClientTls>) -> io::Result<Self> {
        let stream = Socket::connect(addr)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        Ok(CommandClient {
            stream: Transport::new(stream, tls)?,
        })
    }

    /// Sends one command line and reads the size reply.
    pub fn send(&mut self, command: &str) -> io::Result<Reply> {
        self.stream.write_all(format!("{command}\n").as_bytes())?;
        let mut reply = Vec::with_capacity(64);
        let mut buf = [0u8; 1024];
        let n = self.stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        reply.extend_from_slice(&buf[..n]);
        if reply.starts_with(b"ERR") {
            // An error line ends with a newline: read it whole.
            while !reply.ends_with(b"\n") && reply.len() < 4096 {
                let n = self.stream.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                reply.extend_from_slice(&buf[..n]);
            }
        } else {
            // A size has no terminator and the server then waits for us: take whatever else
            // has already arrived (a size split over two segments), without waiting.
            self.stream.set_nonblocking(true)?;
            while let Ok(n) = self.stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                reply.extend_from_slice(&buf[..n]);
            }
            self.stream.set_nonblocking(false)?;
        }
        let text = String::from_utf8_lossy(&reply).trim_end().to_string();
        Ok(match text.parse::<u64>() {
            Ok(size) if text.bytes().all(|b| b.is_ascii_digit()) => Reply::Size(size),
            _ => Reply::Other(text),
        })
    }

    /// Acknowledges a size reply.
    pub fn ack(&mut self) -> io::Result<()> {
        self.stream.write_all(b"ok\n")
    }

    /// Sends a command and returns the whole framed result.
    pub fn request(&mut self, command: &str) -> io::Result<Vec<u8>> {
        match self.send(command)? {
            Reply::Size(size) => {
                if size > MAX_RESULT {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the server announced {size} bytes, more than this client accepts"),
                    ));
                }
                self.ack()?;
                let mut out = vec![0; size as usize];
                self.stream.read_exact(&mut out)?;
                Ok(out)
            }
            // Every exec answer, refusals included, is a size and a result.
            Reply::Other(text) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                WrongService::new("an exec", text.as_bytes()).to_string(),
            )),
        }
    }

    /// The underlying stream, for protocols that send more after the result.
    pub fn stream(&mut self) -> &mut Transport {
        &mut self.stream
    }
}

/// An answer that is not the shape of the protocol a client speaks: the address is another
/// kind of service (or not wharf at all).
struct WrongService {
    /// The service kind the client expected, with its article ("a file-get").
    expected: &'static str,
    /// The start of what the server answered, escaped and shortened.
    answer: String,
}

impl WrongService {
    fn new(expected: &'static str, answer: &[u8]) -> Self {
        WrongService {
            expected,
            answer: wharf_bench::tls::quoted(answer),
        }
    }
}

impl std::fmt::Display for WrongService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "this does not look like {} service: it answered `{}`; check the address",
            self.expected, self.answer
        )
    }
}

/// A file-get refusal (`ERR <reason>`) as a message, or, for any other text, that this is no
/// file-get service.
fn file_get_refusal(text: &str) -> String {
    if text.starts_with("ERR ") {
        format!("server refused: {}", text.trim_end())
    } else {
        WrongService::new("a file-get", text.as_bytes()).to_string()
    }
}

/// Whether `text` has the shape of a file-get listing: `<size>\t<name>` or `-\t<dir>/` lines,
/// and possibly a last `[more entries not shown]`.
fn is_listing(text: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(text) else {
        return false;
    };
    text.lines().all(|line| match line.split_once('\t') {
        Some(("-", name)) => name.ends_with('/'),
        Some((size, name)) => {
            !name.is_empty() && !size.is_empty() && size.bytes().all(|b| b.is_ascii_digit())
        }
        None => line == "[more entries not shown]",
    })
}

/// `wharf client exec`: runs `command` (or each line of stdin), prints results, returns the
/// exit status.
pub fn exec(addr: &str, tls: Option<&ClientTls>, token: Option<&str>, command: &[String]) -> i32 {
    let mut client = match CommandClient::connect(addr, tls) {
        Ok(c) => c,
        Err(e) => return fail(&format!("cannot connect to {addr}: {e}")),
    };
    if let Some(token) = token {
        match client.request(&format!("auth {token}")) {
            Ok(reply) if reply == b"ok" => {}
            Ok(reply) => {
                return fail(&format!(
                    "authentication refused: {}",
                    String::from_utf8_lossy(&reply)
                ))
            }
            Err(e) => return fail(&format!("authentication failed: {e}")),
        }
    }
    if !command.is_empty() {
        return run_one(&mut client, &command.join(" "));
    }
    let interactive = io::stdin().is_terminal();
    let mut status = 0;
    loop {
        if interactive {
            eprint!("wharf> ");
            let _ = io::stderr().flush();
        }
        let mut line = String::new();
        match io::stdin().lock().read_line(&mut line) {
            Ok(0) => return status,
            Ok(_) => {}
            Err(e) => return fail(&format!("reading stdin: {e}")),
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        status = run_one(&mut client, line);
        if status == 1 && !interactive {
            return status;
        }
    }
}

fn run_one(client: &mut CommandClient, line: &str) -> i32 {
    match client.request(line) {
        Ok(result) => {
            let mut out = io::stdout().lock();
            let _ = out.write_all(&result);
            if !result.ends_with(b"\n") {
                let _ = out.write_all(b"\n");
            }
            let _ = out.flush();
            exit_status(&result)
        }
        Err(e) => fail(&format!("{e}")),
    }
}

/// The exit status a result calls for: the command's own status, 128+signal, 124 for a
/// timeout (as timeout(1)), 126 for a refusal, else 0.
pub fn exit_status(result: &[u8]) -> i32 {
    let text = String::from_utf8_lossy(result);
    let last = text.trim_end().lines().last().unwrap_or("");
    if let Some(n) = last
        .strip_prefix("[exit status ")
        .and_then(|r| r.strip_suffix(']'))
    {
        return n.parse::<i32>().map_or(1, |n| n.clamp(1, 255));
    }
    if let Some(n) = last
        .strip_prefix("[killed by signal ")
        .and_then(|r| r.strip_suffix(']'))
    {
        return 128 + n.parse::<i32>().unwrap_or(0);
    }
    if last.starts_with("[timed out after ") {
        return 124;
    }
    if text.lines().count() == 1 && refusals::ALL.iter().any(|r| text.starts_with(r)) {
        return 126;
    }
    0
}

/// `wharf client list`: prints a file-get listing.
pub fn list(addr: &str, tls: Option<&ClientTls>, dir: Option<&str>) -> i32 {
    let mut client = match CommandClient::connect(addr, tls) {
        Ok(c) => c,
        Err(e) => return fail(&format!("cannot connect to {addr}: {e}")),
    };
    let command = match dir {
        Some(dir) => format!("list {dir}"),
        None => "list".to_string(),
    };
    match client.send(&command) {
        Ok(Reply::Size(size)) if size > MAX_RESULT => {
            fail(&format!("listing of {size} bytes is too large"))
        }
        Ok(Reply::Size(size)) => {
            let mut text = vec![0; size as usize];
            if let Err(e) = client
                .ack()
                .and_then(|()| client.stream().read_exact(&mut text))
            {
                return fail(&format!("listing interrupted: {e}"));
            }
            if !is_listing(&text) {
                return fail(&WrongService::new("a file-get", &text).to_string());
            }
            let _ = io::stdout().write_all(&text);
            0
        }
        Ok(Reply::Other(text)) => fail(&file_get_refusal(&text)),
        Err(e) => fail(&e.to_string()),
    }
}

/// `wharf client get`: downloads `path` to `out` (default: its file name) through `out.part`,
/// verifying the whole-file MD5 before the rename; `resume` continues a previous `.part`.
pub fn get(
    addr: &str,
    tls: Option<&ClientTls>,
    path: &str,
    out: Option<&std::path::Path>,
    resume: bool,
) -> i32 {
    match download(addr, tls, path, out, resume) {
        Ok(summary) => {
            eprintln!("{summary}");
            0
        }
        Err(message) => fail(&message),
    }
}

fn download(
    addr: &str,
    tls: Option<&ClientTls>,
    path: &str,
    out: Option<&std::path::Path>,
    resume: bool,
) -> Result<String, String> {
    use std::fs::OpenOptions;
    use std::path::PathBuf;
    use wharf_core::md5::{hex, Md5};

    let out: PathBuf = match out {
        Some(p) => p.to_path_buf(),
        None => PathBuf::from(
            std::path::Path::new(path)
                .file_name()
                .ok_or_else(|| format!("`{path}` has no file name; use -o"))?,
        ),
    };
    let part = PathBuf::from(format!("{}.part", out.display()));
    let mut md5 = Md5::new();
    let mut offset = 0u64;
    if !resume && part.exists() {
        // It may hold most of a large download: never thrown away silently.
        return Err(format!(
            "{} exists, left by an earlier download that did not finish: run again with \
             --resume to continue it, or delete it to start over",
            part.display()
        ));
    }
    if resume && part.exists() {
        let mut existing =
            std::fs::File::open(&part).map_err(|e| format!("{}: {e}", part.display()))?;
        offset =
            io::copy(&mut existing, &mut md5).map_err(|e| format!("{}: {e}", part.display()))?;
    }
    let mut client =
        CommandClient::connect(addr, tls).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let command = if offset > 0 {
        format!("get {path} {offset}")
    } else {
        format!("get {path}")
    };
    let size = match client.send(&command).map_err(|e| e.to_string())? {
        Reply::Size(size) => size,
        Reply::Other(text) => return Err(file_get_refusal(&text)),
    };
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(offset > 0)
        .truncate(offset == 0)
        .open(&part)
        .map_err(|e| format!("cannot create {}: {e}", part.display()))?;
    client.ack().map_err(|e| e.to_string())?;

    let bar = progress_bar(offset + size, offset);
    let received =
        match pipeline::receive(client.stream(), size, &mut file, md5, HEAD, |n| bar.inc(n)) {
            Ok(received) => received,
            Err(pipeline::Failed::Write(e)) => {
                bar.abandon();
                drop(file);
                let _ = std::fs::remove_file(&part);
                return Err(format!(
                    "cannot write {}: {e} (partial file removed)",
                    part.display()
                ));
            }
            Err(pipeline::Failed::Hasher(why)) => {
                bar.abandon();
                return Err(why);
            }
        };
    if let Some(why) = received.lost {
        bar.abandon();
        return Err(format!(
            "download interrupted after {} of {} bytes ({why}); {} kept: run again with --resume",
            offset + received.bytes,
            offset + size,
            part.display()
        ));
    }
    let (md5, head) = (received.md5, received.head);
    bar.finish_and_clear();
    let trailer =
        read_trailer(&mut client).map_err(|e| format!("no digest after the data: {e}"))?;
    let is_digest = trailer.len() == 32 && trailer.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_digest && !trailer.starts_with("ERR") {
        // An exec service answers `get x` with a sized result and nothing after it.
        drop(file);
        if offset == 0 {
            let _ = std::fs::remove_file(&part);
        }
        let mut answer = head;
        answer.extend_from_slice(trailer.as_bytes());
        return Err(format!(
            "{} (a size, then no MD5 after the data)",
            WrongService::new("a file-get", &answer)
        ));
    }
    let ours = hex(&md5.digest());
    if trailer != ours {
        drop(file);
        let _ = std::fs::remove_file(&part);
        return Err(if trailer.starts_with("ERR") {
            format!("{path} changed on the server during the download ({trailer}); partial file removed, try again")
        } else {
            format!("MD5 mismatch: server {trailer}, received data {ours}; partial file removed")
        });
    }
    if let Err(e) = file.sync_all() {
        // A full disk may only show here (delayed allocation): the data is not all on disk.
        drop(file);
        let _ = std::fs::remove_file(&part);
        return Err(format!(
            "cannot write {}: {e} (partial file removed)",
            part.display()
        ));
    }
    drop(file);
    std::fs::rename(&part, &out).map_err(|e| format!("cannot rename to {}: {e}", out.display()))?;
    Ok(format!(
        "saved {} ({} bytes, md5 {ours})",
        out.display(),
        offset + size
    ))
}

/// Bytes of a download kept to quote when no digest follows them.
const HEAD: usize = 128;

/// How long the digest may take to follow the data before this client half-closes: a file-get
/// server sends it at once, still answers after a half-close, and closes; a server of another
/// kind (exec) waits for the next command, and closes on the half-close with nothing sent.
const TRAILER_WAIT: Duration = Duration::from_secs(2);

/// The 32-digit MD5 after the data, or `ERR file changed`; anything else (an empty string when
/// nothing came) is not file-get.
fn read_trailer(client: &mut CommandClient) -> io::Result<String> {
    let mut trailer = Vec::with_capacity(32);
    let mut byte = [0u8; 32];
    client.stream().set_read_timeout(Some(TRAILER_WAIT))?;
    let mut half_closed = false;
    while trailer.len() < 32 {
        if trailer.starts_with(b"ERR") {
            // An error of unknown length: the server then waits for a command; say goodbye
            // and read what remains.
            client.stream().shutdown_write()?;
            client.stream().read_to_end(&mut trailer)?;
            break;
        }
        let want = if trailer.len() < 3 {
            3 - trailer.len()
        } else {
            32 - trailer.len()
        };
        let n = match client.stream().read(&mut byte[..want]) {
            Err(e)
                if !half_closed
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
            {
                client.stream().shutdown_write()?;
                client.stream().set_read_timeout(Some(TIMEOUT))?;
                half_closed = true;
                continue;
            }
            other => other?,
        };
        if n == 0 {
            break;
        }
        trailer.extend_from_slice(&byte[..n]);
    }
    Ok(String::from_utf8_lossy(&trailer).trim_end().to_string())
}

fn progress_bar(total: u64, done: u64) -> indicatif::ProgressBar {
    if !io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40.cyan/blue} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(done);
    bar
}

/// `wharf client echo ADDR [TEXT...]`: sends the words (joined by spaces, plus a newline) or
/// stdin, half-closes, and prints everything the service sends back until it closes. Sending
/// runs on its own thread, so a long stdin never waits for the answer to be read (the way
/// `nc` works, minus its flags that differ between variants).
pub fn echo(addr: &str, tls: Option<&ClientTls>, text: &[String]) -> i32 {
    let words = (!text.is_empty()).then(|| format!("{}\n", text.join(" ")).into_bytes());
    let result = (|| -> io::Result<()> {
        let mut client = CommandClient::connect(addr, tls)?;
        let mut sending = client.stream.try_clone()?;
        let sender = std::thread::spawn(move || -> io::Result<()> {
            match words {
                Some(words) => sending.write_all(&words)?,
                None => {
                    io::copy(&mut io::stdin().lock(), &mut sending)?;
                }
            }
            sending.shutdown_write()
        });
        io::copy(&mut client.stream, &mut io::stdout().lock())?;
        sender
            .join()
            .map_err(|_| io::Error::other("the sending thread panicked"))?
    })();
    match result {
        Ok(()) => 0,
        Err(e) => fail(&format!("{addr}: {e}")),
    }
}

/// Prints `message` as wharf's one-line error; returns the clients' error status, 1.
pub fn fail(message: &str) -> i32 {
    eprintln!("wharf: error: {message}");
    1
}

#[cfg(test)]
mod tests {
    use super::exit_status;

    #[test]
    fn exit_status_follows_the_result() {
        assert_eq!(exit_status(b"hello\n"), 0);
        assert_eq!(exit_status(b"cmd has no output..."), 0);
        assert_eq!(exit_status(b"oops\n[exit status 2]\n"), 2);
        assert_eq!(exit_status(b"[killed by signal 9]\n"), 137);
        assert_eq!(exit_status(b"partial\n[timed out after 10s]\n"), 124);
        assert_eq!(exit_status(b"command not allowed: rm"), 126);
        assert_eq!(exit_status(b"auth required"), 126);
        // Output that merely mentions a refusal on one of many lines is output.
        assert_eq!(exit_status(b"line\ncommand not allowed: rm\n"), 0);
    }
}
