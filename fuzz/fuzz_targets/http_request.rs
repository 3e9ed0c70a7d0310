//! http-hello's request handling (head parsing with httparse, Content-Length and chunked body
//! discarding, pipelining, error statuses) on arbitrary client bytes in arbitrary chunks. The
//! service must never panic, must end once the client has closed, and everything it writes
//! must be a sequence of well-formed HTTP/1.1 responses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf_core::testing;
use wharf_plugin_http_hello::{HttpHello, HttpHelloOptions};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk) + 1;
    let service = HttpHello::new(&HttpHelloOptions::default());
    let output = run(service, input, chunk);
    check_responses(&output);
});

/// Sends `input` in `chunk`-sized writes, closes, returns everything the service wrote. Time
/// is paused, so the header timeout and the lingering close cost nothing.
fn run(service: HttpHello, input: &[u8], chunk: usize) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async {
        let (conn, client) = testing::pipe_with_capacity(64 * 1024);
        let server = testing::spawn(service, conn);
        let input = input.to_vec();
        let reader = client.read_to_end();
        let writer = async {
            for piece in input.chunks(chunk) {
                if client.write_all(piece).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            client.close_write();
        };
        let (out, ()) = tokio::join!(reader, writer);
        let _ = server.await.expect("the service task panicked");
        out
    })
}

fn check_responses(mut out: &[u8]) {
    while !out.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        let head = match response.parse(out) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("malformed response ({other:?}): {:?}", String::from_utf8_lossy(out)),
        };
        assert_eq!(response.version, Some(1), "not HTTP/1.1");
        let code = response.code.unwrap();
        let length = response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| std::str::from_utf8(h.value).unwrap().parse::<usize>().unwrap());
        let body = match (code, length) {
            (100, _) => 0,
            (_, Some(n)) => n,
            (_, None) => panic!("response {code} without Content-Length"),
        };
        // A HEAD answer carries a Content-Length but no body: the next response follows the
        // head at once (the body, `Hello, World`, never starts like a status line). A body cut
        // short is accepted only at the very end (the lingering close may stop reading).
        let rest = &out[head..];
        let body = if rest.starts_with(b"HTTP/1.1 ") { 0 } else { body };
        let end = (head + body).min(out.len());
        out = &out[end..];
    }
}
