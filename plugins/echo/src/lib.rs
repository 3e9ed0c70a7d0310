//! The echo plugin: RFC 862 echo over streams and datagrams, optionally uppercasing (the
//! tutorial's server).
//!
//! Over UDP (`listen = "udp:..."`) each datagram comes back to its sender as one datagram,
//! transformed the same way; the framework's reflection limits apply ([`wharf_core::udp`]).
//!
//! Over streams there is no framing: bytes are echoed as they arrive, so chunking cannot matter. The loop reads, then
//! writes everything it read before reading again, so a client that sends without reading
//! stalls the server after one buffer: backpressure reaches the client's TCP window and memory
//! stays bounded.

use std::io;

use serde::{Deserialize, Serialize};
use wharf_core::{
    buffer, datagram, Conn, Context, Datagram, DatagramService, OptionDoc, Plugin, PluginError,
    Replies, Service,
};

/// `[services.<name>.options]` of an echo service.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EchoOptions {
    /// What happens to the bytes on the way back.
    pub transform: Transform,
}

/// `transform` option.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transform {
    /// Bytes come back unchanged (RFC 862).
    #[default]
    None,
    /// ASCII letters are uppercased; every other byte (including >= 0x80) passes unchanged.
    Upper,
}

/// An echo service.
#[derive(Debug, Clone, Default)]
pub struct Echo {
    transform: Transform,
}

impl Echo {
    /// An echo service with the given transform.
    pub fn new(transform: Transform) -> Self {
        Echo { transform }
    }
}

#[wharf_core::async_trait(?Send)]
impl Service for Echo {
    async fn serve<C: Conn + 'static>(&self, mut conn: C, _cx: &Context) -> io::Result<()> {
        // Small while the client is quiet, large while it streams (see wharf_core::buffer).
        let mut buf = Vec::with_capacity(buffer::IDLE);
        loop {
            let room = buf.capacity();
            let (res, read) = conn.read(buf).await;
            let n = res?;
            if n == 0 {
                return conn.shutdown().await;
            }
            buf = read;
            if self.transform == Transform::Upper {
                buf.make_ascii_uppercase();
            }
            let (res, written) = conn.write_all(buf).await;
            res?;
            buf = written;
            buf.clear();
            buffer::size_for_next_read(&mut buf, n, room);
        }
    }
}

/// RFC 862's UDP echo: the datagram back to its sender.
impl DatagramService for Echo {
    fn answer(&self, datagram: Datagram<'_>, replies: &mut Replies<'_>) {
        // Same size as the datagram: within its reply budget, so never refused.
        if let Ok(reply) = replies.push(datagram.payload) {
            if self.transform == Transform::Upper {
                reply.make_ascii_uppercase();
            }
        }
    }
}

impl Plugin for Echo {
    const NAME: &'static str = "echo";
    const DESCRIPTION: &'static str =
        "RFC 862 stream echo and UDP echo; `transform = \"upper\"` uppercases ASCII";
    const DATAGRAMS: Option<datagram::Erase<Self>> = Some(datagram::erase::<Self>);
    const OPTIONS: &'static [OptionDoc] = &[OptionDoc {
        name: "transform",
        kind: r#""none" | "upper""#,
        help: "\"none\" echoes bytes unchanged; \"upper\" uppercases ASCII letters",
    }];
    type Options = EchoOptions;

    fn build(options: EchoOptions) -> Result<Self, PluginError> {
        Ok(Echo::new(options.transform))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_core::testing::{self, Client};

    fn spawn(echo: Echo, conn: testing::MemConn) -> testing::JoinHandle<io::Result<()>> {
        testing::spawn(echo, conn)
    }

    /// Sends `input` in chunks of `chunk` bytes, then reads the whole reply.
    async fn exchange(client: &Client, input: &[u8], chunk: usize) -> Vec<u8> {
        for piece in input.chunks(chunk) {
            client.write_all(piece).await.unwrap();
            testing::yield_now().await;
        }
        client.close_write();
        client.read_to_end().await
    }

    #[test]
    fn upper_transforms_ascii_only_and_none_is_identity() {
        testing::block_on(async {
            let input = b"hello, World! \xc3\xa9\xff z09";
            let (conn, client) = testing::pipe();
            let server = spawn(Echo::new(Transform::Upper), conn);
            assert_eq!(
                exchange(&client, input, 64).await,
                b"HELLO, WORLD! \xc3\xa9\xff Z09"
            );
            server.await.unwrap().unwrap();

            let (conn, client) = testing::pipe();
            let server = spawn(Echo::new(Transform::None), conn);
            assert_eq!(exchange(&client, input, 64).await, input);
            server.await.unwrap().unwrap();
        });
    }

    #[test]
    fn chunking_does_not_matter() {
        testing::block_on(async {
            let input: Vec<u8> = (0..5000usize).map(|i| b"abcXYZ\n\0\xe9"[i % 9]).collect();
            let expected = input.to_ascii_uppercase();
            for chunk in [1, 2, 3, 7, 64, 4096, 5000] {
                for capacity in [1, 13, 64 * 1024] {
                    // Small pipes force the server's own reads and writes to split as well.
                    let (conn, client) = testing::pipe_with_capacity(capacity);
                    let server = spawn(Echo::new(Transform::Upper), conn);
                    let (_, out) = tokio::join!(
                        async {
                            for piece in input.chunks(chunk) {
                                client.write_all(piece).await.unwrap();
                            }
                            client.close_write();
                        },
                        client.read_to_end()
                    );
                    assert!(out == expected, "chunk {chunk}, capacity {capacity}");
                    server.await.unwrap().unwrap();
                }
            }
        });
    }

    #[test]
    fn backpressure_stops_reading_when_the_client_does_not_read() {
        testing::block_on(async {
            let capacity = 1024;
            let (conn, client) = testing::pipe_with_capacity(capacity);
            let server = spawn(Echo::new(Transform::None), conn);
            let mut accepted = 0;
            for _ in 0..200 {
                accepted += client.try_write(&[b'x'; 512]).unwrap();
                testing::yield_now().await;
            }
            // The server holds at most one buffer in flight plus the output pipe's capacity;
            // everything else stays unread in the input pipe, where the client feels it.
            assert!(
                accepted <= 2 * capacity + buffer::ACTIVE,
                "server swallowed {accepted} bytes without anyone reading"
            );
            assert_eq!(client.unread_by_client(), capacity);
            assert_eq!(
                client.try_write(b"more").unwrap(),
                0,
                "input should be full"
            );
            // Reading unblocks it: everything comes back.
            client.close_write();
            let out = client.read_to_end().await;
            assert_eq!(out.len(), accepted);
            server.await.unwrap().unwrap();
        });
    }

    #[test]
    fn datagrams_come_back_to_their_sender_transformed() {
        let peer = "127.0.0.1:40000".parse().unwrap();
        let upper = testing::answer_datagram(&Echo::new(Transform::Upper), b"hi \xff z", peer);
        assert_eq!(upper, [(b"HI \xff Z".to_vec(), peer)]);
        let same = testing::answer_datagram(&Echo::new(Transform::None), b"hi", peer);
        assert_eq!(same, [(b"hi".to_vec(), peer)]);
        assert_eq!(
            testing::answer_datagram(&Echo::default(), b"", peer),
            [(Vec::new(), peer)],
            "an empty datagram gets an empty one back"
        );
    }

    #[test]
    fn vanished_client_ends_the_session_with_an_error_not_a_panic() {
        testing::block_on(async {
            let (conn, client) = testing::pipe_with_capacity(8);
            let server = spawn(Echo::new(Transform::Upper), conn);
            client.write_all(b"0123456789abcdef").await.unwrap();
            drop(client);
            let res = server.await.unwrap();
            assert_eq!(res.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        });
    }
}
