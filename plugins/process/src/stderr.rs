//! A child's stderr, into wharf's log line by line, never to the client.
//!
//! A program's stderr is for its operator (xinetd's classic bug was to hand it to the client,
//! error messages and all). Whatever the program writes there must cost bounded memory and
//! never hold its session up, so:
//!
//! - the pipe is always drained, in chunks, as it fills;
//! - a line longer than [`MAX_LINE`] bytes is logged cut at that length, the rest of it
//!   dropped; at most one partial line is held;
//! - lines are logged at most [`LINES_PER_SECOND`] a second after a burst of [`BURST`]; the
//!   lines over that are dropped and counted, and the count is logged at most once every
//!   [`DROPPED_REPORT_EVERY`] (and when the session ends), so the warning adds at most one
//!   line a second to the budget;
//! - while the rate allows no line, a chunk is not split into lines at all: its newlines are
//!   counted (with `memchr`, which scans a word at a time) and everything up to the last one
//!   dropped, so a program writing nothing but newlines costs a scan per chunk, not work per
//!   line.

use std::time::Duration;

use tokio::time::Instant;

/// Longest line logged, in bytes; longer ones are cut.
pub const MAX_LINE: usize = 1024;
/// Sustained lines per second logged per session.
pub const LINES_PER_SECOND: u32 = 50;
/// Lines a session may log at once before the rate applies.
pub const BURST: u32 = 200;
/// Shortest time between two "lines dropped" warnings of one session.
pub const DROPPED_REPORT_EVERY: Duration = Duration::from_secs(1);

/// Splits one child's stderr into log lines.
pub struct StderrLog {
    service: String,
    pid: i32,
    /// The line being collected (at most [`MAX_LINE`] bytes).
    line: Vec<u8>,
    /// The current line went past [`MAX_LINE`]: the rest of it is skipped.
    cut: bool,
    /// Lines that may be logged now (a token bucket).
    tokens: f64,
    refilled: Instant,
    /// Lines dropped by the rate limit and not reported yet.
    dropped: u64,
    /// When the last "lines dropped" warning was logged.
    reported: Option<Instant>,
}

impl StderrLog {
    /// The log of child `pid` of `service`.
    pub fn new(service: &str, pid: i32) -> Self {
        StderrLog {
            service: service.to_owned(),
            pid,
            line: Vec::new(),
            cut: false,
            tokens: f64::from(BURST),
            refilled: Instant::now(),
            dropped: 0,
            reported: None,
        }
    }

    /// Takes a chunk read from the pipe.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let Some(newline) = memchr::memchr(b'\n', bytes) else {
                self.collect(bytes);
                break;
            };
            if !self.refill() {
                // No line may be logged now: the current line and every whole line of the
                // chunk are dropped uncollected; only what follows the last newline is kept.
                let last = memchr::memrchr(b'\n', bytes).unwrap_or(newline);
                self.dropped += memchr::memchr_iter(b'\n', &bytes[..=last]).count() as u64;
                self.line.clear();
                self.cut = false;
                bytes = &bytes[last + 1..];
                continue;
            }
            self.collect(&bytes[..newline]);
            self.emit();
            bytes = &bytes[newline + 1..];
        }
    }

    /// Adds `part` (holding no newline) to the current line, up to [`MAX_LINE`] bytes.
    fn collect(&mut self, part: &[u8]) {
        if !self.cut {
            let room = MAX_LINE - self.line.len();
            if part.len() > room {
                self.line.extend_from_slice(&part[..room]);
                self.cut = true;
            } else {
                self.line.extend_from_slice(part);
            }
        }
    }

    /// Logs what is left (a last line without a newline) and the count of dropped lines.
    pub fn finish(&mut self) {
        if !self.line.is_empty() || self.cut {
            self.emit();
        }
        self.report_dropped(true);
    }

    /// Logs the collected line, if the rate allows.
    fn emit(&mut self) {
        let cut = std::mem::take(&mut self.cut);
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if !self.take_token() {
            self.dropped += 1;
            return;
        }
        self.report_dropped(false);
        let (service, pid) = (&self.service, self.pid);
        // `{:?}`: the line is the program's output, control characters and all.
        if cut {
            tracing::info!(service, pid, line = ?line, "process stderr (line cut at {MAX_LINE} bytes)");
        } else {
            tracing::info!(service, pid, line = ?line, "process stderr");
        }
    }

    /// Logs the count of dropped lines, if any, at most once per [`DROPPED_REPORT_EVERY`]
    /// unless `now_anyway` (the session ended).
    fn report_dropped(&mut self, now_anyway: bool) {
        let now = Instant::now();
        let due = self
            .reported
            .is_none_or(|at| now.duration_since(at) >= DROPPED_REPORT_EVERY);
        if self.dropped > 0 && (due || now_anyway) {
            self.reported = Some(now);
            let (service, pid, dropped) = (&self.service, self.pid, self.dropped);
            tracing::warn!(
                service,
                pid,
                dropped,
                "process stderr: lines dropped (more than {LINES_PER_SECOND}/s)"
            );
            self.dropped = 0;
        }
    }

    /// Takes a token for one line; `false` (and nothing taken) if the rate allows none now.
    fn take_token(&mut self) -> bool {
        if self.refill() {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Adds the tokens earned since the last refill; whether one is available.
    fn refill(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now
            .duration_since(self.refilled)
            .min(Duration::from_secs(60));
        self.refilled = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * f64::from(LINES_PER_SECOND))
            .min(f64::from(BURST));
        self.tokens >= 1.0
    }

    /// Lines dropped and not reported yet (for tests).
    #[cfg(test)]
    fn pending_dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_cut_and_memory_stays_bounded() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut log = StderrLog::new("t", 1);
            log.feed(&vec![b'x'; 10 * MAX_LINE]);
            assert_eq!(log.line.len(), MAX_LINE);
            assert!(log.cut);
            log.feed(b"yyy\nnext");
            assert!(!log.cut);
            assert_eq!(log.line, b"next");
            log.finish();
            assert!(log.line.is_empty());
        });
    }

    #[test]
    fn a_flood_of_lines_is_rate_limited_and_counted() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut log = StderrLog::new("t", 1);
            log.feed(&b"line\n".repeat(BURST as usize + 1000));
            // Roughly the burst is logged (plus what the clock refilled meanwhile).
            assert!(log.pending_dropped() >= 900, "{}", log.pending_dropped());
            log.finish();
            assert_eq!(log.pending_dropped(), 0);
        });
    }

    #[test]
    fn blank_lines_past_the_budget_are_counted_without_being_collected() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut log = StderrLog::new("t", 1);
            log.feed(&b"\n".repeat(BURST as usize));
            assert_eq!(log.pending_dropped(), 0, "the burst is logged");
            log.tokens = 0.0;
            let started = std::time::Instant::now();
            for _ in 0..200 {
                log.feed(&[b'\n'; 65536]);
            }
            log.feed(b"\npartial");
            // A few tokens may have been earned meanwhile; nearly every line is dropped.
            assert!(log.pending_dropped() >= 200 * 65536 - 1000);
            assert_eq!(
                log.line, b"partial",
                "the line after the last newline is kept"
            );
            // 13 million lines: a word-at-a-time scan, not a line at a time.
            assert!(started.elapsed() < std::time::Duration::from_secs(2));
            log.finish();
            assert_eq!(log.pending_dropped(), 0);
        });
    }
}
