//! An io_uring driver that lives inside a tokio current-thread runtime: the seed of wharf's
//! next io_uring backend (issue 18), measured first as the `uring-echo` peer.
//!
//! Why not tokio-uring: it issues one plain `READ`/`WRITE` per operation on unregistered
//! descriptors and offers no multishot, no provided buffers, no direct descriptors and no
//! DEFER_TASKRUN, which is where io_uring's savings are. This module uses the `io-uring` crate
//! directly and keeps tokio as the runtime, so `tokio::time` and `spawn_local` work unchanged.
//!
//! How it fits in the runtime: one driver task ([`Driver::run`], spawned with `spawn_local`)
//! owns the turn. Operations push their SQEs into the submission queue and ask for a flush,
//! which wakes the driver task; tokio runs it after the tasks already queued, so every SQE
//! pushed in one turn of the scheduler goes to the kernel in one `io_uring_enter`. That same
//! call reaps the completions, which are dispatched by `user_data` (a slab key) to the waiting
//! task's waker. When nothing is to be submitted the driver sleeps in tokio's epoll on the
//! ring's fd, or with DEFER_TASKRUN on an eventfd registered with the ring, which the kernel
//! signals when it queues deferred work (completions are then only posted inside an enter
//! with GETEVENTS, which tokio-uring's run loop never passes: it only calls `submit()`,
//! and waits on the ring fd; the likely reason DEFER_TASKRUN hung there).
//!
//! Features ([`Features`]) each fall back, logged on stderr, when the kernel refuses them:
//! SINGLE_ISSUER + DEFER_TASKRUN (else COOP_TASKRUN + TASKRUN_FLAG), a provided-buffer ring,
//! direct descriptors, multishot accept and receive.
//!
//! Cancellation (a dropped future or connection) never frees memory the kernel may still
//! write: every buffer an operation gives the kernel is owned by its slab slot, not by the
//! future, and the slot lives until the operation's final completion. Dropping an unfinished
//! operation marks its slot orphaned and submits `ASYNC_CANCEL`; the completions that still
//! come release what they carry (a provided buffer goes back to the ring, an accepted socket
//! is closed, a direct descriptor gets a `CLOSE`) and the final one frees the slot. When the
//! driver itself goes (its runtime shuts down), it first cancels every in-flight request
//! synchronously (`IORING_REGISTER_SYNC_CANCEL`), so no memory is freed under the kernel.
//! Running out of provided buffers ends a multishot receive with `ENOBUFS`: the receiver lets
//! the other tasks run (they give buffers back) and re-arms; any multishot operation that
//! ends without `IORING_CQE_F_MORE` is re-armed by its next caller; `EINTR`/`EAGAIN` retry.

pub mod bufring;
pub mod net;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;
use tokio::io::unix::AsyncFd;

use bufring::BufRing;

/// `user_data` of operations whose completion nobody waits for (cancels, closes).
const UNTRACKED: u64 = u64::MAX;
/// `IORING_ENTER_GETEVENTS` (the crate keeps its sys module private).
const ENTER_GETEVENTS: u32 = 1;
/// Driver loop iterations before it yields to other tasks.
const TURN_BUDGET: usize = 8;

/// What the driver asks the kernel for; each is measured on its own with the echo peer.
#[derive(Debug, Clone)]
pub struct Features {
    /// Multishot accept and multishot receive (receive also needs `buffer_ring`).
    pub multishot: bool,
    /// Accepted sockets as direct (registered) descriptors instead of fds.
    pub direct: bool,
    /// Receives pick a buffer from a provided-buffer ring; without it each receive owns one.
    pub buffer_ring: bool,
    /// SINGLE_ISSUER + DEFER_TASKRUN; without it COOP_TASKRUN + TASKRUN_FLAG.
    pub defer_taskrun: bool,
    /// Submission queue entries (the completion queue gets 4x).
    pub ring_entries: u32,
    /// Buffers in the provided-buffer ring (a power of two).
    pub buffers: u16,
    /// Bytes per provided buffer.
    pub buffer_size: usize,
    /// Direct descriptor slots (the most connections at once with `direct`).
    pub direct_slots: u32,
}

impl Default for Features {
    fn default() -> Self {
        Features {
            multishot: true,
            direct: true,
            buffer_ring: true,
            defer_taskrun: true,
            ring_entries: 1024,
            buffers: 2048,
            buffer_size: 4096,
            direct_slots: 16384,
        }
    }
}

/// Counters of what the driver did, to put operations per request next to CPU per request.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub enters: u64,
    pub sqes: u64,
    pub cqes: u64,
    pub wakeups: u64,
    pub enobufs: u64,
    pub multishot_rearms: u64,
    pub orphan_cqes: u64,
}

/// One completion: the result (`-errno` on failure) and the CQE flags.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub result: i32,
    pub flags: u32,
}

impl Completion {
    /// The error of a failed completion.
    pub fn error(&self) -> Option<io::Error> {
        (self.result < 0).then(|| io::Error::from_raw_os_error(-self.result))
    }
}

/// What an operation holds that must be released if nobody takes its completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Accept { direct: bool },
    Recv,
    Send,
}

struct Slot {
    kind: OpKind,
    waker: Option<Waker>,
    queue: VecDeque<Completion>,
    finished: bool,
    orphaned: bool,
    /// Memory the kernel reads or writes; kept until the final completion.
    buf: Option<Vec<u8>>,
}

/// Handle on the driver; cheap to clone (all on one thread).
#[derive(Clone)]
pub struct Driver {
    inner: Rc<Inner>,
}

struct Inner {
    // Drop order matters: the AsyncFd first (deregisters), then the ring (releases the
    // buffer ring's registration), then the buffer memory.
    wake: AsyncFd<WakeFd>,
    ring: RefCell<IoUring>,
    buffers: RefCell<Option<BufRing>>,
    ops: RefCell<Slab<Slot>>,
    /// Completions taken off the ring in one reap, before dispatch (kept to reuse its memory).
    scratch: RefCell<Vec<(u64, Completion)>>,
    flush_requested: Cell<bool>,
    driver_waker: RefCell<Option<Waker>>,
    settings: Settings,
    stats: Cell<Stats>,
}

/// The features the kernel granted.
#[derive(Debug, Clone)]
pub struct Settings {
    pub defer_taskrun: bool,
    pub direct: bool,
    pub buffer_ring: bool,
    pub multishot_accept: bool,
    pub multishot_recv: bool,
    pub ring_flags: &'static str,
}

/// The fd the driver sleeps on: the ring fd (borrowed; the ring owns it) or an eventfd.
enum WakeFd {
    Ring(RawFd),
    Event(OwnedFd),
}

impl AsRawFd for WakeFd {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            WakeFd::Ring(fd) => *fd,
            WakeFd::Event(fd) => fd.as_raw_fd(),
        }
    }
}

fn build_ring(features: &Features) -> io::Result<(IoUring, bool, &'static str)> {
    let cq = features.ring_entries.saturating_mul(4);
    if features.defer_taskrun {
        match IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(cq)
            .build(features.ring_entries)
        {
            Ok(ring) => return Ok((ring, true, "SINGLE_ISSUER+DEFER_TASKRUN+TASKRUN_FLAG")),
            Err(e) => eprintln!("uring: DEFER_TASKRUN refused ({e}); falling back to COOP_TASKRUN"),
        }
    }
    match IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_cqsize(cq)
        .build(features.ring_entries)
    {
        Ok(ring) => return Ok((ring, false, "SINGLE_ISSUER+COOP_TASKRUN+TASKRUN_FLAG")),
        Err(e) => eprintln!("uring: SINGLE_ISSUER+COOP_TASKRUN refused ({e}); plain ring"),
    }
    Ok((
        IoUring::builder()
            .setup_cqsize(cq)
            .build(features.ring_entries)?,
        false,
        "none",
    ))
}

impl Driver {
    /// Sets up the ring and what `features` asks for, inside a tokio runtime (for the
    /// AsyncFd). Spawn [`Driver::run`] with `spawn_local` before awaiting any operation.
    pub fn new(features: &Features) -> io::Result<Driver> {
        let (ring, defer_taskrun, ring_flags) = build_ring(features)?;
        let wake = if defer_taskrun {
            // SAFETY: plain syscall; the result is checked before it is wrapped.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a fresh fd that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            ring.submitter().register_eventfd(fd.as_raw_fd())?;
            WakeFd::Event(fd)
        } else {
            WakeFd::Ring(ring.as_raw_fd())
        };
        let mut direct = features.direct;
        if direct {
            if let Err(e) = ring
                .submitter()
                .register_files_sparse(features.direct_slots)
            {
                eprintln!("uring: direct descriptors refused ({e}); using plain fds");
                direct = false;
            }
        }
        let mut buffers = None;
        if features.buffer_ring {
            match BufRing::register(&ring.submitter(), features.buffers, features.buffer_size, 0) {
                Ok(ring) => buffers = Some(ring),
                Err(e) => {
                    eprintln!("uring: provided-buffer ring refused ({e}); one buffer per receive")
                }
            }
        }
        let buffer_ring = buffers.is_some();
        let settings = Settings {
            defer_taskrun,
            direct,
            buffer_ring,
            multishot_accept: features.multishot,
            multishot_recv: features.multishot && buffer_ring,
            ring_flags,
        };
        Ok(Driver {
            inner: Rc::new(Inner {
                // SAFETY: the eventfd is owned by the AsyncFd; the ring fd stays open as long
                // as the ring, which is dropped after the AsyncFd (field order of `Inner`).
                wake: unsafe {
                    AsyncFd::register_with_interest(wake, tokio::io::Interest::READABLE)
                }
                .map_err(|e| io::Error::other(e.to_string()))?,
                ring: RefCell::new(ring),
                buffers: RefCell::new(buffers),
                ops: RefCell::new(Slab::with_capacity(1024)),
                scratch: RefCell::new(Vec::with_capacity(256)),
                flush_requested: Cell::new(false),
                driver_waker: RefCell::new(None),
                settings,
                stats: Cell::new(Stats::default()),
            }),
        })
    }

    /// What the kernel granted.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.inner.stats.get()
    }

    /// The driver task: submits and reaps once per scheduler turn, forever (until the runtime
    /// stops or the ring fails).
    pub async fn run(self) -> io::Result<()> {
        poll_fn(|cx| self.inner.poll_turn(cx)).await
    }

    /// Submits `sqe` for a one-shot or multishot operation holding `buf` (if any) until its
    /// final completion. The SQE's pointers must point into `buf`'s heap memory.
    pub(crate) fn start(
        &self,
        kind: OpKind,
        sqe: squeue::Entry,
        buf: Option<Vec<u8>>,
    ) -> io::Result<Op> {
        let key = self.inner.ops.borrow_mut().insert(Slot {
            kind,
            waker: None,
            queue: VecDeque::new(),
            finished: false,
            orphaned: false,
            buf,
        });
        if let Err(e) = self.inner.push(sqe.user_data(key as u64)) {
            self.inner.ops.borrow_mut().remove(key);
            return Err(e);
        }
        Ok(Op {
            driver: self.clone(),
            key,
            done: false,
        })
    }

    /// The next completion of the multishot operation kept in `op`, arming it with the SQE
    /// `arm` builds first when there is none or the kernel has ended it (a re-arm, counted).
    /// `Ok(None)`: the kernel ended it just now; call again to re-arm.
    pub(crate) async fn next_multishot(
        &self,
        op: &mut Option<Op>,
        kind: OpKind,
        arm: impl FnOnce() -> squeue::Entry,
    ) -> io::Result<Option<Completion>> {
        if op.as_ref().is_none_or(Op::is_finished) {
            if op.take().is_some() {
                self.count(|s| s.multishot_rearms += 1);
            }
            *op = Some(self.start(kind, arm(), None)?);
        }
        match op.as_mut() {
            Some(op) => Ok(op.next().await),
            None => Ok(None),
        }
    }

    /// Submits an operation whose completion nobody waits for (a close, a cancel).
    pub(crate) fn fire_and_forget(&self, sqe: squeue::Entry) {
        if let Err(e) = self.inner.push(sqe.user_data(UNTRACKED)) {
            eprintln!("uring: could not submit a cleanup operation: {e}");
        }
    }

    /// Runs `f` on the buffer ring, if there is one.
    pub(crate) fn with_buffers<R>(&self, f: impl FnOnce(&mut BufRing) -> R) -> Option<R> {
        self.inner.buffers.borrow_mut().as_mut().map(f)
    }

    pub(crate) fn count(&self, f: impl FnOnce(&mut Stats)) {
        let mut s = self.inner.stats.get();
        f(&mut s);
        self.inner.stats.set(s);
    }
}

impl Inner {
    fn push(&self, sqe: squeue::Entry) -> io::Result<()> {
        {
            let mut ring = self.ring.borrow_mut();
            // SAFETY: the memory an SQE points to is owned by its slab slot until the final
            // completion (see the module doc).
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                // Queue full: submit what is there now (still one enter per full queue).
                drop(ring);
                self.enter()?;
                let mut ring = self.ring.borrow_mut();
                // SAFETY: as above.
                unsafe { ring.submission().push(&sqe) }.map_err(|_| {
                    io::Error::new(io::ErrorKind::WouldBlock, "io_uring submission queue full")
                })?;
            }
        }
        self.request_flush();
        Ok(())
    }

    fn request_flush(&self) {
        if !self.flush_requested.replace(true) {
            if let Some(w) = self.driver_waker.borrow().as_ref() {
                w.wake_by_ref();
            }
        }
    }

    /// One `io_uring_enter` if there is anything to submit or deferred work to run (the
    /// kernel says so with TASKRUN_FLAG, which both ring setups ask for, so a wakeup alone
    /// costs no enter).
    fn enter(&self) -> io::Result<()> {
        let ring = self.ring.borrow();
        let mut sq = unsafe { ring.submission_shared() };
        sq.sync();
        let to_submit = sq.len();
        let run_work = sq.taskrun() || sq.cq_overflow();
        drop(sq);
        if to_submit == 0 && !run_work {
            return Ok(());
        }
        let flags = if run_work || self.settings.defer_taskrun {
            ENTER_GETEVENTS
        } else {
            0
        };
        loop {
            // SAFETY: no extended argument; plain submit / get-events.
            let r = unsafe {
                ring.submitter()
                    .enter::<libc::sigset_t>(to_submit as u32, 0, flags, None)
            };
            self.bump(|s| {
                s.enters += 1;
                s.sqes += to_submit as u64;
            });
            match r {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // Completion queue full (no NODROP): reap, then the next turn submits.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The kernel flagged task work that needs an enter (TASKRUN_FLAG) or the CQ overflowed.
    fn work_pending(&self) -> bool {
        let ring = self.ring.borrow();
        // SAFETY: only reads the shared flags word.
        let sq = unsafe { ring.submission_shared() };
        sq.taskrun() || sq.cq_overflow()
    }

    fn bump(&self, f: impl FnOnce(&mut Stats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Takes every completion off the ring and hands it to its operation.
    fn reap(&self) -> usize {
        let mut batch = std::mem::take(&mut *self.scratch.borrow_mut());
        {
            let mut ring = self.ring.borrow_mut();
            for cqe in ring.completion() {
                batch.push((
                    cqe.user_data(),
                    Completion {
                        result: cqe.result(),
                        flags: cqe.flags(),
                    },
                ));
            }
        }
        let n = batch.len();
        self.bump(|s| s.cqes += n as u64);
        for (user_data, c) in batch.drain(..) {
            self.dispatch(user_data, c);
        }
        *self.scratch.borrow_mut() = batch;
        n
    }

    fn dispatch(&self, user_data: u64, c: Completion) {
        if user_data == UNTRACKED {
            if c.result < 0 && !matches!(-c.result, libc::ENOENT | libc::EALREADY | libc::ECANCELED)
            {
                eprintln!(
                    "uring: cleanup operation failed: {}",
                    io::Error::from_raw_os_error(-c.result)
                );
            }
            return;
        }
        let key = user_data as usize;
        let final_cqe = !cqueue::more(c.flags);
        let mut ops = self.ops.borrow_mut();
        let Some(slot) = ops.get_mut(key) else {
            eprintln!("uring: completion for unknown operation {key}");
            return;
        };
        if slot.orphaned {
            let kind = slot.kind;
            if final_cqe {
                ops.remove(key);
            }
            drop(ops);
            self.bump(|s| s.orphan_cqes += 1);
            self.release(kind, c);
            return;
        }
        slot.queue.push_back(c);
        slot.finished |= final_cqe;
        if let Some(w) = slot.waker.take() {
            w.wake();
        }
    }

    /// Releases what a completion nobody will take carries.
    fn release(&self, kind: OpKind, c: Completion) {
        if let Some(bid) = cqueue::buffer_select(c.flags) {
            if let Some(Err(e)) = self.buffers.borrow_mut().as_mut().map(|b| b.discard(bid)) {
                eprintln!("uring: buffer ring bookkeeping: {e:?}");
            }
        }
        if let OpKind::Accept { direct } = kind {
            if c.result >= 0 {
                if direct {
                    let close = opcode::Close::new(types::Fixed(c.result as u32)).build();
                    if let Err(e) = self.push(close.user_data(UNTRACKED)) {
                        eprintln!("uring: could not close an orphaned connection: {e}");
                    }
                } else {
                    // SAFETY: the accept gave us this fd and nobody else has it.
                    drop(unsafe { OwnedFd::from_raw_fd(c.result) });
                }
            }
        }
    }

    fn poll_turn(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        {
            let mut w = self.driver_waker.borrow_mut();
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        for _ in 0..TURN_BUDGET {
            self.flush_requested.set(false);
            self.enter()?;
            self.reap();
            if self.work_pending() {
                // Deferred work the kernel did not finish in that enter: go round again.
                self.flush_requested.set(true);
            }
            match self.wake.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) => {
                    // The eventfd is not read: tokio registers it edge-triggered, and every
                    // signal from the kernel is a new edge whatever the counter holds (a
                    // 64-bit counter that cannot overflow here). Saves a read(2) per wakeup.
                    guard.clear_ready();
                    self.bump(|s| s.wakeups += 1);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if !self.flush_requested.get() {
                        return Poll::Pending;
                    }
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing a ring cancels its requests asynchronously, and the slots' buffers and the
        // buffer ring are freed right after this: cancel everything synchronously first, so
        // the kernel is done with that memory before it goes.
        let ring = self.ring.get_mut();
        let timeout = types::Timespec::new().sec(1);
        match ring
            .submitter()
            .register_sync_cancel(Some(timeout), types::CancelBuilder::any())
        {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => eprintln!("uring: cancelling in-flight operations at shutdown: {e}"),
        }
    }
}

/// A submitted operation. One-shot: await [`Op::completion`]. Multishot: call
/// [`Op::next`] until it returns `None` (the kernel ended it; re-arm if wanted). Dropping it
/// before its final completion cancels it without freeing anything the kernel still uses.
pub struct Op {
    driver: Driver,
    key: usize,
    done: bool,
}

impl Op {
    /// The next completion, or `None` once the final one has been taken.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Completion>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut ops = self.driver.inner.ops.borrow_mut();
        let slot = &mut ops[self.key];
        if let Some(c) = slot.queue.pop_front() {
            return Poll::Ready(Some(c));
        }
        if slot.finished {
            drop(ops);
            self.done = true;
            self.driver.inner.ops.borrow_mut().remove(self.key);
            return Poll::Ready(None);
        }
        if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            slot.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// The next completion of a multishot operation (see [`Op::poll_next`]).
    pub async fn next(&mut self) -> Option<Completion> {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    /// A completion already delivered, without waiting.
    pub fn try_next(&mut self) -> Option<Completion> {
        if self.done {
            return None;
        }
        self.driver.inner.ops.borrow_mut()[self.key]
            .queue
            .pop_front()
    }

    /// Puts a completion taken with [`Op::try_next`] back at the front, for the next taker.
    pub fn put_back(&mut self, c: Completion) {
        if !self.done {
            self.driver.inner.ops.borrow_mut()[self.key]
                .queue
                .push_front(c);
        }
    }

    /// Whether the kernel has ended this operation and all its completions were taken.
    pub fn is_finished(&self) -> bool {
        self.done || {
            let ops = self.driver.inner.ops.borrow();
            ops[self.key].finished && ops[self.key].queue.is_empty()
        }
    }

    /// The single completion of a one-shot operation, with the buffer it held.
    pub async fn completion(mut self) -> (Completion, Option<Vec<u8>>) {
        let c = poll_fn(|cx| self.poll_next(cx)).await;
        let c = c.unwrap_or(Completion {
            result: -libc::ECANCELED,
            flags: 0,
        });
        let buf = if self.done {
            None
        } else {
            self.done = true;
            self.driver.inner.ops.borrow_mut().remove(self.key).buf
        };
        (c, buf)
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let inner = &self.driver.inner;
        let mut ops = inner.ops.borrow_mut();
        let slot = &mut ops[self.key];
        let kind = slot.kind;
        let pending: Vec<Completion> = slot.queue.drain(..).collect();
        let finished = slot.finished;
        if finished {
            ops.remove(self.key);
        } else {
            slot.orphaned = true;
            slot.waker = None;
        }
        drop(ops);
        for c in pending {
            inner.release(kind, c);
        }
        if !finished {
            let cancel = opcode::AsyncCancel::new(self.key as u64).build();
            if let Err(e) = inner.push(cancel.user_data(UNTRACKED)) {
                eprintln!("uring: could not cancel a dropped operation: {e}");
            }
        }
    }
}
