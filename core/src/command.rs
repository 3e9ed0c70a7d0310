//! Command framing shared by the command-style protocols (exec, file-get).
//!
//! The tutorial's clients send a command with no terminator (`send(b"get a.txt")`), and TCP
//! keeps no message boundaries, so a command ends either at `\n` (`\r\n` too), or when the
//! bytes received so far hold no newline and nothing more arrives within a short grace: the
//! queue is checked without waiting, then once more after `grace` (a few milliseconds). A
//! command over [`MAX_COMMAND`] bytes is refused. The "acknowledgement" step of these protocols
//! consumes whatever the client sends next, up to [`MAX_ACK`] bytes.
//!
//! Bytes after a newline stay buffered for the next command. Clients should not send ahead
//! across an acknowledgement step, though: the ack consumes whatever comes next.
//!
//! Lines are split, and reads between commands made drain-aware, by the same code as
//! [`crate::framing::Lines`]; what this adds is the pause rule and the acknowledgement.

use std::io;
use std::time::Duration;

use crate::conn::Conn;
use crate::context::Context;
use crate::framing::{line_before_newline, read_into};

/// Longest command accepted, in bytes (without its line ending).
pub const MAX_COMMAND: usize = 4096;
/// Most bytes an acknowledgement consumes.
pub const MAX_ACK: usize = 1024;
/// How long an unterminated command may pause before it counts as complete.
pub const DEFAULT_GRACE: Duration = Duration::from_millis(3);

/// What the next command turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A command line, without its line ending.
    Command(String),
    /// Longer than [`MAX_COMMAND`]: answer with an error and close.
    TooLong,
    /// Not UTF-8: answer with an error (the connection may continue).
    NotUtf8,
    /// The client closed the connection between commands.
    Closed,
}

/// Reads commands and acknowledgements from one connection.
pub struct CommandReader {
    /// Received bytes not consumed yet.
    buf: Vec<u8>,
    grace: Duration,
}

impl Default for CommandReader {
    fn default() -> Self {
        Self::new(DEFAULT_GRACE)
    }
}

impl CommandReader {
    /// A reader treating a pause of `grace` after unterminated bytes as the end of a command.
    pub fn new(grace: Duration) -> Self {
        CommandReader {
            buf: Vec::new(),
            grace,
        }
    }

    /// Reads the next command. While no byte of it has arrived, a server stop ends the wait
    /// (see [`Context::read_idle`]): [`Frame::Closed`].
    pub async fn next<C: Conn>(&mut self, conn: &mut C, cx: &Context) -> io::Result<Frame> {
        // Leftover unterminated bytes get the same "pause ends it" treatment as new ones.
        let mut fresh = !self.buf.is_empty();
        loop {
            if let Some(line) = take_line(&mut self.buf) {
                return Ok(decode(line));
            }
            if self.buf.len() > MAX_COMMAND {
                return Ok(Frame::TooLong);
            }
            // Unterminated bytes from a read that just completed: a command, unless more
            // are already queued or arrive within the grace.
            if fresh && !self.buf.is_empty() {
                if !self.more_follows(conn).await? {
                    let line = std::mem::take(&mut self.buf);
                    return Ok(decode(line));
                }
                // More bytes came: look for a newline in them before waiting again.
                continue;
            }
            let between_commands = self.buf.is_empty();
            match self.read(conn, between_commands.then_some(cx)).await? {
                0 if self.buf.is_empty() => return Ok(Frame::Closed),
                0 => {
                    // The client closed right after an unterminated command.
                    let line = std::mem::take(&mut self.buf);
                    return Ok(decode(line));
                }
                _ => fresh = true,
            }
        }
    }

    /// Consumes an acknowledgement: whatever the client sends next, up to [`MAX_ACK`] bytes.
    /// Returns `false` at end of stream: the client half-closed (or closed) instead, so it can
    /// send nothing more, though it may still be reading.
    pub async fn ack<C: Conn>(&mut self, conn: &mut C) -> io::Result<bool> {
        if self.buf.is_empty() && self.read(conn, None).await? == 0 {
            return Ok(false);
        }
        let n = self.buf.len().min(MAX_ACK);
        self.buf.drain(..n);
        Ok(true)
    }

    /// Whether unconsumed bytes are buffered (a client that sent ahead).
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Drops buffered input (the rest of a refused, overlong command), so a following
    /// acknowledgement is read from what the client sends next.
    pub fn discard_buffered(&mut self) {
        self.buf.clear();
    }

    /// One read appended to the buffer, never past `MAX_COMMAND + 1` bytes in total.
    /// `idle`: the context when nothing of a command has arrived yet, so a shutdown may end
    /// the wait; `None` mid-exchange (an acknowledgement): a plain read.
    async fn read<C: Conn>(&mut self, conn: &mut C, idle: Option<&Context>) -> io::Result<usize> {
        let room = (MAX_COMMAND + 1).saturating_sub(self.buf.len()).max(1);
        self.buf.reserve_exact(room);
        read_into(conn, idle, &mut self.buf).await
    }

    /// Pulls in bytes already queued, or arriving within the grace; `false` if none did.
    async fn more_follows<C: Conn>(&mut self, conn: &mut C) -> io::Result<bool> {
        for wait in [Duration::ZERO, self.grace] {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            self.buf
                .reserve(MAX_COMMAND + 1 - self.buf.len().min(MAX_COMMAND));
            match conn.try_read(&mut self.buf)? {
                Some(n) if n > 0 => return Ok(true),
                // End of stream right after the command: it is complete.
                Some(_) => return Ok(false),
                None => {}
            }
        }
        Ok(false)
    }
}

/// Takes the first `\n`-terminated line out of `buf` (commands are short: the rest moves to
/// the front), without its line ending; `None` if `buf` holds no `\n`.
fn take_line(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let newline = buf.iter().position(|&b| b == b'\n')?;
    let line = line_before_newline(&buf[..newline]).to_vec();
    buf.drain(..=newline);
    Some(line)
}

fn decode(line: Vec<u8>) -> Frame {
    if line.len() > MAX_COMMAND {
        return Frame::TooLong;
    }
    match String::from_utf8(line) {
        Ok(s) => Frame::Command(s),
        Err(_) => Frame::NotUtf8,
    }
}

/// Sends `result` framed as these protocols do: its length in ASCII decimal (no terminator),
/// then, once the client acknowledges, the bytes themselves. A client that reaches end of
/// stream instead of acknowledging has half-closed (it can no longer send, but may still be
/// reading, like `printf 'cmd' | nc -q5`): it gets the result anyway. Returns `false` in that
/// case, so the caller ends the connection after this result.
pub async fn send_framed<C: Conn>(
    conn: &mut C,
    reader: &mut CommandReader,
    result: Vec<u8>,
) -> io::Result<bool> {
    let (res, _) = conn.write_all(result.len().to_string().into_bytes()).await;
    res?;
    let acked = reader.ack(conn).await?;
    let (res, _) = conn.write_all(result).await;
    res?;
    Ok(acked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn newline_terminated_commands_pipeline_and_strip_cr() {
        testing::block_on(async {
            let (mut conn, client) = testing::pipe();
            let cx = conn.context();
            client.write_all(b"get a\r\nlist\nget b").await.unwrap();
            client.close_write();
            let mut r = CommandReader::default();
            assert_eq!(
                r.next(&mut conn, &cx).await.unwrap(),
                Frame::Command("get a".into())
            );
            assert_eq!(
                r.next(&mut conn, &cx).await.unwrap(),
                Frame::Command("list".into())
            );
            assert_eq!(
                r.next(&mut conn, &cx).await.unwrap(),
                Frame::Command("get b".into())
            );
            assert_eq!(r.next(&mut conn, &cx).await.unwrap(), Frame::Closed);
        });
    }

    #[test]
    fn an_unterminated_command_ends_when_the_client_pauses() {
        testing::block_on(async {
            let (mut conn, client) = testing::pipe();
            let cx = conn.context();
            let mut r = CommandReader::new(Duration::from_millis(20));
            client.write_all(b"uptime").await.unwrap();
            let started = tokio::time::Instant::now();
            assert_eq!(
                r.next(&mut conn, &cx).await.unwrap(),
                Frame::Command("uptime".into())
            );
            // Soon after the 20 ms pause (without it, next() would wait for more bytes).
            assert!(started.elapsed() < Duration::from_secs(5));
            // The ack that follows is consumed whole, whatever it says, up to MAX_ACK.
            client.write_all(&[b'k'; 1500]).await.unwrap();
            assert!(r.ack(&mut conn).await.unwrap());
            assert!(
                r.has_buffered(),
                "bytes beyond MAX_ACK stay for the next command"
            );
        });
    }

    #[test]
    fn a_command_split_within_the_grace_is_one_command() {
        testing::block_on(async {
            let (mut conn, client) = testing::pipe();
            let cx = conn.context();
            // A grace far beyond the 20 ms pause, even if this busy machine stalls.
            let mut r = CommandReader::new(Duration::from_secs(2));
            let send = async {
                client.write_all(b"get lo").await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                client.write_all(b"ng-name.txt").await.unwrap();
            };
            let (_, frame) = tokio::join!(send, r.next(&mut conn, &cx));
            assert_eq!(frame.unwrap(), Frame::Command("get long-name.txt".into()));
        });
    }

    #[test]
    fn overlong_and_invalid_commands() {
        testing::block_on(async {
            let (mut conn, client) = testing::pipe();
            let cx = conn.context();
            let mut r = CommandReader::default();
            client
                .write_all(&vec![b'a'; MAX_COMMAND + 10])
                .await
                .unwrap();
            assert_eq!(r.next(&mut conn, &cx).await.unwrap(), Frame::TooLong);

            let (mut conn, client) = testing::pipe();
            let cx = conn.context();
            let mut r = CommandReader::default();
            client.write_all(b"\xff\xfe\nok\n").await.unwrap();
            assert_eq!(r.next(&mut conn, &cx).await.unwrap(), Frame::NotUtf8);
            assert_eq!(
                r.next(&mut conn, &cx).await.unwrap(),
                Frame::Command("ok".into())
            );
            // Exactly MAX_COMMAND is fine.
            let line = format!("{}\n", "b".repeat(MAX_COMMAND));
            client.write_all(line.as_bytes()).await.unwrap();
            assert_eq!(
                r.next(&mut conn, &cx).await.unwrap(),
                Frame::Command("b".repeat(MAX_COMMAND))
            );
        });
    }

    #[test]
    fn framed_results_wait_for_the_ack() {
        testing::block_on(async {
            let (mut conn, client) = testing::pipe();
            let mut r = CommandReader::default();
            let server = async {
                send_framed(&mut conn, &mut r, b"hello result".to_vec())
                    .await
                    .unwrap()
            };
            let talk = async {
                assert_eq!(client.read_exact(2).await.unwrap(), b"12");
                client.write_all(b"ack").await.unwrap();
                client.read_exact(12).await.unwrap()
            };
            let (sent, got) = tokio::join!(server, talk);
            assert!(sent);
            assert_eq!(got, b"hello result");
        });
    }

    #[test]
    fn a_half_closed_client_still_gets_its_result() {
        testing::block_on(async {
            let (mut conn, client) = testing::pipe();
            let cx = conn.context();
            let mut r = CommandReader::default();
            client.write_all(b"cmd\n").await.unwrap();
            client.close_write();
            assert_eq!(
                r.next(&mut conn, &cx).await.unwrap(),
                Frame::Command("cmd".into())
            );
            let sent = send_framed(&mut conn, &mut r, b"the result".to_vec())
                .await
                .unwrap();
            assert!(!sent, "no ack came: the connection ends after this result");
            conn.shutdown().await.unwrap();
            assert_eq!(client.read_to_end().await, b"10the result");
        });
    }
}
