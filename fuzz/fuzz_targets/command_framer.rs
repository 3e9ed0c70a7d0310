//! The command framer of exec and file-get (`wharf_core::command`): arbitrary bytes, delivered
//! in arbitrary chunks, must frame into commands that never exceed the limit, never invent or
//! lose a byte of a newline-terminated command, and never panic.
//!
//! Input: the first byte picks the chunk size of the client's writes (1 to 64), the rest is
//! what the client sends; then it closes.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use wharf_core::command::{CommandReader, Frame, MAX_COMMAND};
use wharf_core::testing;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk % 64) + 1;
    testing::block_on(async {
        let (mut conn, client) = testing::pipe_with_capacity(256);
        let cx = conn.context();
        let writer = tokio::task::spawn_local({
            let input = input.to_vec();
            async move {
                for piece in input.chunks(chunk) {
                    if client.write_all(piece).await.is_err() {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                client.close_write();
            }
        });
        // No grace: a pause between chunks may end a command, which is allowed; what is
        // checked holds either way.
        let mut reader = CommandReader::new(Duration::ZERO);
        let mut frames = 0;
        loop {
            match reader.next(&mut conn, &cx).await {
                Ok(Frame::Closed) | Err(_) => break,
                Ok(Frame::TooLong) => break, // the services close the connection here
                Ok(Frame::Command(line)) => {
                    assert!(line.len() <= MAX_COMMAND, "a command over the limit got through");
                    assert!(!line.contains('\n'), "a command kept its line ending");
                    // Every command is made of bytes the client sent, in order.
                    assert!(
                        contains_subsequence(input, line.as_bytes()),
                        "a command holds bytes the client did not send"
                    );
                }
                Ok(Frame::NotUtf8) => {}
            }
            frames += 1;
            assert!(frames <= input.len() + 1, "more commands than bytes");
        }
        writer.await.unwrap();
    });
});

fn contains_subsequence(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}
