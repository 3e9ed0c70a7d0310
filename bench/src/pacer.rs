//! Microsecond-precise send times for the open loop.
//!
//! tokio's timer wheel has a resolution of one millisecond. In the open loop latency is
//! measured from each request's intended send time, so a request woken up to a millisecond late
//! would carry up to a millisecond of latency made by the client itself: at 100 000 requests
//! per second against a server answering in 50 us, the p99 would read ~1.7 ms. One `timerfd`
//! per client thread, armed for the earliest pending send time, wakes connections within
//! microseconds instead.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Instant;

use tokio::io::unix::AsyncFd;

/// The send times a client thread waits for, and the timer that fires at the earliest.
pub struct Pacer {
    timer: AsyncFd<OwnedFd>,
    state: RefCell<State>,
}

struct State {
    /// (due, connection slot), earliest first.
    queue: BinaryHeap<Reverse<(Instant, usize)>>,
    /// The waker of each connection waiting for its send time, by slot.
    wakers: Vec<Option<Waker>>,
    /// What the timer is armed for.
    armed: Option<Instant>,
}

impl Pacer {
    /// A pacer for `slots` connections; must be created inside a tokio runtime.
    pub fn new(slots: usize) -> io::Result<Rc<Pacer>> {
        // SAFETY: timerfd_create has no memory preconditions; the fd is owned from here on.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `fd` is an open timerfd owned by the OwnedFd, which returns that same fd
        // from as_raw_fd for as long as the AsyncFd holds it.
        let timer = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Rc::new(Pacer {
            timer,
            state: RefCell::new(State {
                queue: BinaryHeap::new(),
                wakers: vec![None; slots],
                armed: None,
            }),
        }))
    }

    /// Completes at `due` (at once if it has passed).
    pub async fn sleep_until(&self, slot: usize, due: Instant) {
        let mut queued = false;
        poll_fn(|cx| {
            if Instant::now() >= due {
                return Poll::Ready(());
            }
            let mut state = self.state.borrow_mut();
            state.wakers[slot] = Some(cx.waker().clone());
            if !queued {
                queued = true;
                state.queue.push(Reverse((due, slot)));
                if state.armed.is_none_or(|armed| due < armed) {
                    self.arm(&mut state, due);
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Wakes connections as their send times come; runs for as long as the thread's load.
    pub async fn run(&self) {
        loop {
            let Ok(mut ready) = self.timer.readable().await else {
                return;
            };
            let mut expirations = [0u8; 8];
            // SAFETY: reading 8 bytes (the expiration count) into a local buffer.
            unsafe {
                libc::read(
                    self.timer.get_ref().as_raw_fd(),
                    expirations.as_mut_ptr().cast(),
                    expirations.len(),
                )
            };
            ready.clear_ready();
            let mut state = self.state.borrow_mut();
            state.armed = None;
            let now = Instant::now();
            while let Some(&Reverse((due, slot))) = state.queue.peek() {
                if due > now {
                    self.arm(&mut state, due);
                    break;
                }
                state.queue.pop();
                if let Some(waker) = state.wakers[slot].take() {
                    waker.wake();
                }
            }
        }
    }

    fn arm(&self, state: &mut State, due: Instant) {
        // At least 1 ns: an all-zero value would disarm the timer.
        let wait = due
            .saturating_duration_since(Instant::now())
            .max(std::time::Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: wait.as_secs() as libc::time_t,
                tv_nsec: wait.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: arms our own timerfd with a valid relative itimerspec.
        unsafe {
            libc::timerfd_settime(
                self.timer.get_ref().as_raw_fd(),
                0,
                &spec,
                std::ptr::null_mut(),
            )
        };
        state.armed = Some(due);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn wakes_each_connection_at_its_time_and_never_early() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let pacer = Pacer::new(4).unwrap();
            let driver = pacer.clone();
            tokio::task::spawn_local(async move { driver.run().await });
            let start = Instant::now();
            // Out of order, sub-millisecond apart, and one already due.
            let dues = [
                start + Duration::from_micros(2300),
                start + Duration::from_micros(1100),
                start,
                start + Duration::from_micros(1400),
            ];
            // How late each was woken (precision itself is measured, not asserted: see
            // BENCHMARKS.md; a loaded test machine may wake anything late).
            for (late, due) in join(&pacer, &dues).await.iter().zip(dues) {
                assert!(
                    *late < Duration::from_secs(1),
                    "woken {late:?} after {due:?}"
                );
            }
        });
    }

    /// Waits for every due time concurrently; returns how late each was woken (a wake before
    /// the due time would underflow and panic).
    async fn join(pacer: &Rc<Pacer>, dues: &[Instant]) -> Vec<Duration> {
        let handles: Vec<_> = dues
            .iter()
            .enumerate()
            .map(|(slot, &due)| {
                let pacer = pacer.clone();
                tokio::task::spawn_local(async move {
                    pacer.sleep_until(slot, due).await;
                    Instant::now() - due
                })
            })
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    }
}
