//! Unit tests of the whole protocol through `wharf_core::testing`: no sockets.

use super::*;
use wharf_core::testing::{self, Client};

/// One parsed response.
#[derive(Debug, Clone, PartialEq)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Splits a byte stream into responses; `head_only[i]` says response i has no body.
fn parse_responses(mut bytes: &[u8], head_only: &[bool]) -> Vec<Response> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(bytes).expect("well-formed response") {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => {
                panic!("truncated response: {:?}", String::from_utf8_lossy(bytes))
            }
        };
        let status = resp.code.unwrap();
        let headers: Vec<(String, String)> = resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let r = Response {
            status,
            headers,
            body: Vec::new(),
        };
        let body_len: usize = if status == 100 || head_only.get(out.len()).copied().unwrap_or(false)
        {
            0
        } else {
            r.header("content-length").unwrap().parse().unwrap()
        };
        let body = bytes[len..len + body_len].to_vec();
        bytes = &bytes[len + body_len..];
        out.push(Response { body, ..r });
    }
    out
}

/// The service most tests use: a header timeout no stall of a busy machine reaches.
fn service() -> HttpHello {
    service_with_header_timeout(Duration::from_secs(10))
}

fn service_with_header_timeout(header_timeout: Duration) -> HttpHello {
    HttpHello::new(&HttpHelloOptions {
        max_body: 64,
        header_timeout,
        ..Default::default()
    })
}

/// Sends `pieces` one after another, closes the sending side, returns everything received.
async fn exchange(client: &Client, pieces: &[&[u8]]) -> Vec<u8> {
    let (_, out) = tokio::join!(
        async {
            for p in pieces {
                client.write_all(p).await.unwrap();
                testing::yield_now().await;
            }
            client.close_write();
        },
        client.read_to_end()
    );
    out
}

const MIXED: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n\
POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
PUT /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
GET /ten HTTP/1.0\r\nConnection: keep-alive\r\n\r\n\
GET /last HTTP/1.1\r\nHost: a\r\n\r\n";
const MIXED_HEAD_ONLY: &[bool] = &[false, true, false, false, false, false];

fn check_mixed(responses: &[Response]) {
    assert_eq!(responses.len(), 6, "{responses:#?}");
    for (i, r) in responses.iter().enumerate() {
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length"), Some("12"));
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!(r.header("server"), Some("wharf"));
        assert!(r
            .header("date")
            .is_some_and(|d| httpdate::parse_http_date(d).is_ok()));
        let expect_body: &[u8] = if i == 1 { b"" } else { b"Hello, World" };
        assert_eq!(r.body, expect_body, "response {i}");
    }
    assert_eq!(
        responses[4].header("connection"),
        Some("keep-alive"),
        "HTTP/1.0 keep-alive"
    );
    assert_eq!(responses[0].header("connection"), None);
}

#[test]
fn pipelined_requests_split_at_every_byte_boundary() {
    testing::block_on(async {
        for split in 0..=MIXED.len() {
            let (conn, client) = testing::pipe();
            let server = testing::spawn(service(), conn);
            let out = exchange(&client, &[&MIXED[..split], &MIXED[split..]]).await;
            check_mixed(&parse_responses(&out, MIXED_HEAD_ONLY));
            server.await.unwrap().unwrap();
            assert_eq!(client.recorded_requests(), vec![OK; 6], "split {split}");
        }
        // And one byte at a time.
        let (conn, client) = testing::pipe();
        let server = testing::spawn(service(), conn);
        let bytes: Vec<&[u8]> = MIXED.chunks(1).collect();
        check_mixed(&parse_responses(
            &exchange(&client, &bytes).await,
            MIXED_HEAD_ONLY,
        ));
        server.await.unwrap().unwrap();
    });
}

#[test]
fn one_read_of_pipelined_requests_is_answered_with_one_write() {
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        let server = testing::spawn(service(), conn);
        let sixteen = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".repeat(16);
        client.write_all(&sixteen).await.unwrap();
        let out = client.read_exact(1).await.unwrap();
        testing::yield_now().await;
        assert_eq!(client.writes_by_service(), 1);
        let mut all = out;
        client.close_write();
        all.extend(client.read_to_end().await);
        assert_eq!(parse_responses(&all, &[]).len(), 16);
        server.await.unwrap().unwrap();
    });
}

#[test]
fn connection_close_and_http10_close_after_the_response() {
    testing::block_on(async {
        for request in [
            &b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /ignored HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/1.0\r\n\r\nGET /ignored HTTP/1.0\r\n\r\n",
        ] {
            let (conn, client) = testing::pipe();
            let server = testing::spawn(service(), conn);
            client.write_all(request).await.unwrap();
            // No close_write: the server must end the exchange itself.
            let out = client.read_to_end().await;
            let responses = parse_responses(&out, &[]);
            assert_eq!(responses.len(), 1, "{responses:#?}");
            assert_eq!(responses[0].header("connection"), Some("close"));
            drop(client);
            server.await.unwrap().unwrap();
        }
    });
}

/// Sends `request` (without closing) and returns the single error response; checks that the
/// server closed the connection and counted one 4xx request.
async fn error_for(request: &[u8]) -> Response {
    error_recorded_as(request, CLIENT_ERROR).await
}

/// [`error_for`], counted with `outcome`.
async fn error_recorded_as(request: &[u8], outcome: &str) -> Response {
    let (conn, client) = testing::pipe();
    let server = testing::spawn(service(), conn);
    client.write_all(request).await.unwrap();
    let out = client.read_to_end().await;
    let responses = parse_responses(&out, &[]);
    assert_eq!(client.recorded_requests(), [outcome]);
    drop(client);
    server.await.unwrap().unwrap();
    assert_eq!(responses.len(), 1, "{responses:#?}");
    let r = responses.into_iter().next().unwrap();
    assert_eq!(r.header("connection"), Some("close"));
    r
}

#[test]
fn every_error_status() {
    testing::block_on(async {
        let cases: &[(&[u8], u16)] = &[
            (b"GARBAGE\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 65\r\n\r\n",
                413,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n41\r\n",
                413,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                400,
            ),
        ];
        for (request, status) in cases {
            let r = error_for(request).await;
            assert_eq!(r.status, *status, "{:?}", String::from_utf8_lossy(request));
        }
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "a".repeat(9000)
        );
        assert_eq!(error_for(big.as_bytes()).await.status, 431);
        // A valid request before the bad one is still answered, in order.
        let (conn, client) = testing::pipe();
        let server = testing::spawn(service(), conn);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBAD\r\n\r\n")
            .await
            .unwrap();
        let responses = parse_responses(&client.read_to_end().await, &[]);
        assert_eq!(
            responses.iter().map(|r| r.status).collect::<Vec<_>>(),
            [200, 400]
        );
        assert_eq!(client.recorded_requests(), [OK, CLIENT_ERROR]);
        drop(client);
        server.await.unwrap().unwrap();
    });
}

/// Issue 14, item 13: what RFC 9112 and nginx answer, where this server used to say 200.
#[test]
fn deviations_from_rfc_9112_get_nginx_answers() {
    testing::block_on(async {
        // CONNECT: never a 2xx with a body (RFC 9110 §9.3.6); nginx says 405, so do we.
        let r =
            error_for(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n").await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some(request::ALLOW));
        assert_eq!(
            error_for(b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n")
                .await
                .status,
            405
        );
        for host in ["a b", "a/b@c", "a, b"] {
            let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
            assert_eq!(error_for(req.as_bytes()).await.status, 400, "{host:?}");
        }
        let r = error_recorded_as(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
            SERVER_ERROR,
        )
        .await;
        assert_eq!(r.status, 501);
        assert_eq!(
            error_for(b"GET * HTTP/1.1\r\nHost: a\r\n\r\n").await.status,
            400
        );
        // RFC 9112 §3: a request line over the limit is 414; RFC 9110 §2.5: HTTP/2 over an
        // HTTP/1 connection is 505 (nginx answers both so).
        let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(8200));
        assert_eq!(error_for(long.as_bytes()).await.status, 414);
        let r = error_recorded_as(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", SERVER_ERROR).await;
        assert_eq!(r.status, 505);
        // Server-wide OPTIONS is what asterisk-form is for; an unknown HTTP/1 minor version is
        // answered as HTTP/1.1 (RFC 9110 §2.5, nginx too).
        let (conn, client) = testing::pipe();
        let server = testing::spawn(service(), conn);
        let out = exchange(
            &client,
            &[b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.2\r\nHost: a\r\n\r\n"],
        )
        .await;
        let responses = parse_responses(&out, &[]);
        assert_eq!(
            responses.iter().map(|r| r.status).collect::<Vec<_>>(),
            [200, 200]
        );
        assert_eq!(responses[1].header("connection"), None, "kept alive");
        server.await.unwrap().unwrap();
    });
}

#[test]
fn a_trickled_head_times_out_with_408() {
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        let server = testing::spawn(
            service_with_header_timeout(Duration::from_millis(200)),
            conn,
        );
        let started = Instant::now();
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        // Keep trickling, for up to 20 s: progress alone must not extend the head deadline.
        let answered = std::cell::Cell::new(None);
        let trickle = async {
            let bytes = b"Host: a\r\nX-Slow: "
                .iter()
                .chain(std::iter::repeat(&b'1'));
            for b in bytes.take(400) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if answered.get().is_some() || client.write_all(&[*b]).await.is_err() {
                    break;
                }
            }
        };
        let read = async {
            let out = client.read_to_end().await;
            answered.set(Some(started.elapsed()));
            out
        };
        let (_, out) = tokio::join!(trickle, read);
        let responses = parse_responses(&out, &[]);
        assert_eq!(responses[0].status, 408);
        // Not before the timeout; long before the trickle would have ended.
        let took = answered.get().unwrap();
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_secs(10),
            "{took:?}"
        );
        assert_eq!(client.recorded_requests(), [CLIENT_ERROR]);
        drop(client);
        server.await.unwrap().unwrap();
    });
}

#[test]
fn expect_continue_gets_an_interim_response() {
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        let server = testing::spawn(service(), conn);
        client
            .write_all(
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
            )
            .await
            .unwrap();
        let interim = client.read_exact(25).await.unwrap();
        assert_eq!(interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        client.write_all(b"body").await.unwrap();
        client.close_write();
        let responses = parse_responses(&client.read_to_end().await, &[]);
        assert_eq!(responses[0].status, 200);
        server.await.unwrap().unwrap();
    });
}

#[test]
fn options_are_validated_and_used() {
    let opts = HttpHelloOptions {
        body: "ok".into(),
        content_type: "application/json".into(),
        ..Default::default()
    };
    let svc = HttpHello::build(opts).unwrap();
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        let server = testing::spawn(svc, conn);
        let out = exchange(&client, &[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]).await;
        let r = &parse_responses(&out, &[])[0];
        assert_eq!(
            (r.body.as_slice(), r.header("content-type")),
            (&b"ok"[..], Some("application/json"))
        );
        server.await.unwrap().unwrap();
    });
    let bad = HttpHelloOptions {
        content_type: "text/plain\r\nX-Injected: 1".into(),
        ..Default::default()
    };
    assert_eq!(
        HttpHello::build(bad).err().unwrap().option.as_deref(),
        Some("content_type")
    );
}

/// A [`testing::MemConn`] that remembers the largest output buffer the service handed to one
/// write, and the capacity of the buffer of the last write: what the service holds.
struct Watched {
    inner: testing::MemConn,
    seen: std::rc::Rc<std::cell::Cell<(usize, usize)>>,
}

impl Conn for Watched {
    async fn read(&mut self, buf: Vec<u8>) -> wharf_core::BufResult<usize> {
        self.inner.read(buf).await
    }
    async fn write(&mut self, buf: Vec<u8>, from: usize) -> wharf_core::BufResult<usize> {
        let (largest, _) = self.seen.get();
        self.seen.set((largest.max(buf.len()), buf.capacity()));
        self.inner.write(buf, from).await
    }
    fn try_read(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
        self.inner.try_read(buf)
    }
    fn peer_closed(&self) -> bool {
        self.inner.peer_closed()
    }
    async fn shutdown(&mut self) -> io::Result<()> {
        self.inner.shutdown().await
    }
}

/// Issue 14: 16 KiB of pipelined requests used to be answered into one ~80 KiB buffer (~700 KiB
/// with a 1 KiB body), kept at that capacity while the connection idled.
#[test]
fn pipelined_output_is_bounded_per_write_and_shrinks_when_idle() {
    for body in ["Hello, World".to_string(), "b".repeat(1024)] {
        testing::block_on(async {
            let svc = HttpHello::new(&HttpHelloOptions {
                body: body.clone(),
                ..Default::default()
            });
            let response_len = svc.responses.max_len() - "Connection: keep-alive\r\n".len();
            let (conn, client) = testing::pipe();
            let seen = std::rc::Rc::new(std::cell::Cell::new((0, 0)));
            let cx = conn.context();
            let watched = Watched {
                inner: conn,
                seen: seen.clone(),
            };
            let server = tokio::task::spawn_local(async move { svc.serve(watched, &cx).await });
            let requests = b"GET / HTTP/1.1\r\nHost:a\r\n\r\n".repeat(615);
            let (_, out) = tokio::join!(
                client.write_all(&requests),
                client.read_exact(615 * response_len)
            );
            let responses = parse_responses(&out.unwrap(), &[]);
            assert_eq!(responses.len(), 615);
            assert!(responses
                .iter()
                .all(|r| r.status == 200 && r.body == body.as_bytes()));
            let (largest, _) = seen.get();
            assert!(
                largest <= OUT_BATCH,
                "one write of {largest} bytes (body {})",
                body.len()
            );
            // The burst is over: the next exchange finds a small output buffer.
            client
                .write_all(b"GET / HTTP/1.1\r\nHost:a\r\n\r\n")
                .await
                .unwrap();
            client.read_exact(response_len).await.unwrap();
            let (_, capacity) = seen.get();
            assert!(capacity <= OUT_IDLE, "{capacity} bytes held while idle");
            client.close_write();
            assert_eq!(client.read_to_end().await, b"");
            server.await.unwrap().unwrap();
            assert_eq!(client.recorded_requests().len(), 616);
        });
    }
}

/// Batches cut at OUT_BATCH keep pipelining exact: order, HEAD, bodies, the final close.
#[test]
fn pipelining_across_batch_limits_keeps_order_and_close() {
    testing::block_on(async {
        let (conn, client) = testing::pipe();
        let server = testing::spawn(service(), conn);
        let mut requests = MIXED.repeat(60);
        requests.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        requests.extend_from_slice(b"GET /ignored HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(requests.len() < testing::DEFAULT_CAPACITY);
        client.write_all(&requests).await.unwrap();
        let out = client.read_to_end().await;
        assert!(out.len() > 2 * OUT_BATCH, "the batch limit is crossed");
        let head_only: Vec<bool> = MIXED_HEAD_ONLY.repeat(60);
        let responses = parse_responses(&out, &head_only);
        assert_eq!(responses.len(), 361);
        for group in responses[..360].chunks(6) {
            check_mixed(group);
        }
        assert_eq!(responses[360].header("connection"), Some("close"));
        assert_eq!(client.recorded_requests(), vec![OK; 361]);
        drop(client);
        server.await.unwrap().unwrap();
    });
}

#[test]
fn the_access_log_keeps_only_the_path_of_a_target() {
    use super::loggable_path;
    assert_eq!(loggable_path(b"/a/b?token=secret"), b"/a/b");
    assert_eq!(loggable_path(b"/a;jsessionid=SECRET"), b"/a");
    assert_eq!(loggable_path(b"/a#frag"), b"/a");
    assert_eq!(loggable_path(b"http://user:pw@host:80/p?q=1"), b"/p");
    assert_eq!(loggable_path(b"http://user:pw@host"), b"/");
    assert_eq!(loggable_path(b"*"), b"*");
}
