//! The io_uring driver under the backend's ring path: the `io-uring` crate driven from inside a
//! tokio current-thread runtime, so `tokio::time`, `spawn_local` and tokio's reactor (UDP,
//! `sendfile` waits) keep working next to it. First built as the `uring-echo` benchmark peer
//! (issue 18), which now runs on this copy.
//!
//! Why not tokio-uring: it issues one plain `READ`/`WRITE` per operation on unregistered
//! descriptors and offers no multishot, no provided buffers and no DEFER_TASKRUN, which is
//! where io_uring's savings are (BENCHMARKS.md, "io_uring: what fewer operations buy").
//!
//! How it fits in the runtime: one driver task ([`Driver::run`], spawned with `spawn_local`)
//! owns the turn. Operations push their SQEs into the submission queue and ask for a flush,
//! which wakes the driver task; tokio runs it after the tasks already queued, so every SQE
//! pushed in one turn of the scheduler goes to the kernel in one `io_uring_enter`. That same
//! call reaps the completions, which are dispatched by `user_data` (a slab key) to the waiting
//! task's waker. When nothing is to be submitted the driver sleeps in tokio's epoll on the
//! ring's fd, or with DEFER_TASKRUN on an eventfd registered with the ring, which the kernel
//! signals when it queues deferred work (completions are then only posted inside an enter
//! with GETEVENTS). A task that must know *now* what has arrived ([`Driver::turn_now`]: a
//! non-blocking read, a drain-time accept) runs the same submit-and-reap itself; it costs a
//! syscall only when the kernel flags work pending.
//!
//! Receives pick their buffer from a provided-buffer ring ([`bufring`]). A completion's bytes
//! are copied, when it is reaped, into its operation's *stash* (a per-connection byte queue)
//! and the buffer goes straight back to the ring, so the ring never runs dry because some
//! connection's task is slow to read; a stash past [`STASH_LIMIT`] unread bytes cancels its
//! receive (TCP flow control then holds the client back) until the reader catches up.
//!
//! Cancellation (a dropped future or connection) never frees memory the kernel may still
//! write: every buffer an operation gives the kernel is owned by its slab slot, not by the
//! future, and the slot lives until the operation's final completion. Dropping an unfinished
//! operation marks its slot orphaned and submits `ASYNC_CANCEL`; the completions that still
//! come release what they carry (a provided buffer goes back to the ring, an accepted socket
//! is closed) and the final one frees the slot. When the driver itself goes (its runtime
//! shuts down), it first cancels every in-flight request synchronously
//! (`IORING_REGISTER_SYNC_CANCEL`), so no memory is freed under the kernel. A multishot
//! operation that ends without `IORING_CQE_F_MORE` is re-armed by its next caller.

pub mod bufring;

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

/// `user_data` of operations whose completion nobody waits for (cancels).
const UNTRACKED: u64 = u64::MAX;
/// `IORING_ENTER_GETEVENTS` (the crate keeps its sys module private).
const ENTER_GETEVENTS: u32 = 1;
/// Driver loop iterations before it yields to other tasks.
const TURN_BUDGET: usize = 8;
/// Unread bytes a receive's stash may hold before the receive is cancelled (re-armed when
/// its reader has taken them).
pub const STASH_LIMIT: usize = 256 * 1024;
/// A stash emptied with more capacity than this gives it back (idle connections hold none).
const STASH_KEEP: usize = 8 * 1024;

/// What the driver asks the kernel for.
#[derive(Debug, Clone)]
pub struct Features {
    /// SINGLE_ISSUER + DEFER_TASKRUN; without it (or when refused) COOP_TASKRUN +
    /// TASKRUN_FLAG, the ring fd watched by tokio's epoll.
    pub defer_taskrun: bool,
    /// Submission queue entries (the completion queue gets 4x).
    pub ring_entries: u32,
    /// Buffers in the provided-buffer ring (a power of two).
    pub buffers: u16,
    /// Bytes per provided buffer.
    pub buffer_size: usize,
}

impl Default for Features {
    fn default() -> Self {
        Features {
            defer_taskrun: true,
            ring_entries: 1024,
            buffers: 2048,
            buffer_size: 4096,
        }
    }
}

/// Counters of what the driver did, to put operations per request next to CPU per request.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// `io_uring_enter` calls.
    pub enters: u64,
    /// Submissions.
    pub sqes: u64,
    /// Completions reaped.
    pub cqes: u64,
    /// Times the driver was woken by the kernel.
    pub wakeups: u64,
    /// Multishot receives ended because the buffer ring was empty.
    pub enobufs: u64,
    /// Multishot operations armed again after the kernel ended them.
    pub multishot_rearms: u64,
    /// Completions of operations nobody waited for any more (cancelled).
    pub orphan_cqes: u64,
    /// Receives cancelled because their reader fell [`STASH_LIMIT`] bytes behind.
    pub stash_full: u64,
}

/// One completion: the result (`-errno` on failure) and the CQE flags.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// The result, `-errno` on failure.
    pub result: i32,
    /// The CQE flags.
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
pub enum OpKind {
    /// An accept: a completion carries a new socket, closed if nobody takes it.
    Accept,
    /// A receive from the buffer ring: its bytes go to the slot's stash.
    Recv,
    /// A send (its buffer is held by the slot).
    Send,
}

struct Slot {
    kind: OpKind,
    waker: Option<Waker>,
    /// Completions not yet taken (for a receive: only the ones without bytes: its end), in
    /// order: `queue`, then `last`.
    queue: VecDeque<Completion>,
    /// The final completion when it came with nothing queued before it: a one-shot
    /// operation's only one needs no allocation.
    last: Option<Completion>,
    finished: bool,
    orphaned: bool,
    /// A cancel was submitted for it (the stash is full).
    cancelling: bool,
    /// Memory the kernel reads or writes; kept until the final completion.
    buf: Option<Vec<u8>>,
    /// A receive's bytes not yet taken: `stash[head..]`.
    stash: Vec<u8>,
    head: usize,
}

impl Slot {
    fn unread(&self) -> usize {
        self.stash.len() - self.head
    }

    /// Queues a completion for the operation's owner (after `finished` is updated).
    fn deliver(&mut self, c: Completion) {
        if self.finished && self.queue.is_empty() && self.last.is_none() {
            self.last = Some(c);
        } else {
            self.queue.push_back(c);
        }
    }

    /// The oldest completion not yet taken.
    fn take(&mut self) -> Option<Completion> {
        self.queue.pop_front().or_else(|| self.last.take())
    }

    fn has_queued(&self) -> bool {
        !self.queue.is_empty() || self.last.is_some()
    }
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
    buffers: RefCell<BufRing>,
    ops: RefCell<Slab<Slot>>,
    /// Completions taken off the ring in one reap, before dispatch (kept to reuse its memory).
    scratch: RefCell<Vec<(u64, Completion)>>,
    flush_requested: Cell<bool>,
    driver_waker: RefCell<Option<Waker>>,
    settings: Settings,
    stats: Cell<Stats>,
}

/// What the kernel granted.
#[derive(Debug, Clone)]
pub struct Settings {
    /// DEFER_TASKRUN is on (else COOP_TASKRUN).
    pub defer_taskrun: bool,
    /// The ring's setup flags, as logged.
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
        if let Ok(ring) = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(cq)
            .build(features.ring_entries)
        {
            return Ok((ring, true, "SINGLE_ISSUER+DEFER_TASKRUN+TASKRUN_FLAG"));
        }
    }
    if let Ok(ring) = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_cqsize(cq)
        .build(features.ring_entries)
    {
        return Ok((ring, false, "SINGLE_ISSUER+COOP_TASKRUN+TASKRUN_FLAG"));
    }
    Ok((
        IoUring::builder()
            .setup_cqsize(cq)
            .build(features.ring_entries)?,
        false,
        "none",
    ))
}

/// Whether this kernel gives the driver what it cannot do without: a ring, a provided-buffer
/// ring (Linux 5.19) and multishot receive (Linux 6.0, told by the kernel's version: the
/// kernel has no probe for an opcode's flags). The reason when not.
pub fn supported() -> Result<(), String> {
    let release = kernel_release();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version < (6, 0) {
        return Err(format!(
            "Linux {release} has no multishot receive (6.0 and later do)"
        ));
    }
    let features = Features::default();
    let (ring, _, _) = build_ring(&features).map_err(|e| format!("io_uring_setup: {e}"))?;
    let buffers = BufRing::register(&ring.submitter(), 16, 64, 0)
        .map_err(|e| format!("the kernel refused a provided-buffer ring ({e})"))?;
    // The ring goes first: closing it releases the buffer ring's registration.
    drop(ring);
    drop(buffers);
    Ok(())
}

fn kernel_release() -> String {
    // SAFETY: zeroed utsname is valid for uname to fill.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is ours; uname fills it with NUL-terminated strings.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return String::new();
    }
    // SAFETY: uname NUL-terminates `release`.
    unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

thread_local! {
    /// The driver of the ring runtime running on this thread ([`crate::ring::block_on`]).
    static CURRENT: RefCell<Option<Driver>> = const { RefCell::new(None) };
}

/// Makes `driver` this thread's current one until the guard is dropped.
pub(crate) struct CurrentGuard(());

impl CurrentGuard {
    pub(crate) fn set(driver: &Driver) -> CurrentGuard {
        CURRENT.with(|c| *c.borrow_mut() = Some(driver.clone()));
        CurrentGuard(())
    }
}

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.borrow_mut().take());
    }
}

impl Driver {
    /// Sets up the ring and the buffer ring, inside a tokio runtime (for the AsyncFd). Spawn
    /// [`Driver::run`] with `spawn_local` before awaiting any operation.
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
        let buffers =
            BufRing::register(&ring.submitter(), features.buffers, features.buffer_size, 0)?;
        let settings = Settings {
            defer_taskrun,
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

    /// The driver of the ring runtime running on this thread.
    pub fn current() -> io::Result<Driver> {
        CURRENT.with(|c| c.borrow().clone()).ok_or_else(|| {
            io::Error::other("no io_uring driver on this thread (outside the ring runtime)")
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

    /// Operations in flight or not yet taken (0 when nothing leaks), and provided buffers out
    /// of the ring (0 between turns: every buffer goes back when its completion is reaped).
    pub fn in_use(&self) -> (usize, usize) {
        (
            self.inner.ops.borrow().len(),
            self.inner.buffers.borrow().outstanding(),
        )
    }

    /// The driver task: submits and reaps once per scheduler turn, forever (until the runtime
    /// stops or the ring fails).
    pub async fn run(self) -> io::Result<()> {
        poll_fn(|cx| self.inner.poll_turn(cx)).await
    }

    /// Submits what is queued and takes every completion the kernel has (running deferred
    /// work first), now, from the calling task: for a caller that must see what has already
    /// arrived without waiting for the driver's next turn. No syscall when there is nothing
    /// to submit and the kernel flags no work.
    pub fn turn_now(&self) -> io::Result<()> {
        self.inner.enter()?;
        self.inner.reap();
        Ok(())
    }

    /// Submits what is queued now, without taking completions.
    pub fn submit_now(&self) -> io::Result<()> {
        self.inner.enter()
    }

    /// Submits `sqe` for a one-shot or multishot operation holding `buf` (if any) until its
    /// final completion. The SQE's pointers must point into `buf`'s heap memory.
    pub fn start(&self, kind: OpKind, sqe: squeue::Entry, buf: Option<Vec<u8>>) -> io::Result<Op> {
        let key = self.inner.ops.borrow_mut().insert(Slot {
            kind,
            waker: None,
            queue: VecDeque::new(),
            last: None,
            finished: false,
            orphaned: false,
            cancelling: false,
            buf,
            stash: Vec::new(),
            head: 0,
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

    /// The buffer group receives pick from.
    pub fn buffer_group(&self) -> u16 {
        self.inner.buffers.borrow().group()
    }

    pub(crate) fn count(&self, f: impl FnOnce(&mut Stats)) {
        self.inner.bump(f);
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
                tracing::debug!(
                    error = %io::Error::from_raw_os_error(-c.result),
                    "io_uring: a cancel failed"
                );
            }
            return;
        }
        let key = user_data as usize;
        let final_cqe = !cqueue::more(c.flags);
        let mut ops = self.ops.borrow_mut();
        let Some(slot) = ops.get_mut(key) else {
            tracing::warn!(key, "io_uring: completion for an unknown operation");
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
        slot.finished |= final_cqe;
        let mut cancel = false;
        match cqueue::buffer_select(c.flags) {
            Some(bid) if slot.kind == OpKind::Recv && c.result > 0 => {
                // Bytes: into the stash, and the buffer straight back to the ring.
                if slot.head > 0 && slot.head >= slot.stash.len() / 2 {
                    slot.stash.drain(..slot.head);
                    slot.head = 0;
                }
                let stash = &mut slot.stash;
                let copied = self
                    .buffers
                    .borrow_mut()
                    .consume(bid, c.result as usize, |b| stash.extend_from_slice(b));
                if let Err(e) = copied {
                    // Never expected: the kernel named a buffer the book says it holds.
                    tracing::error!("io_uring buffer ring bookkeeping: {e:?}");
                    slot.deliver(Completion {
                        result: -libc::EIO,
                        flags: 0,
                    });
                }
                if slot.unread() >= STASH_LIMIT && !slot.finished && !slot.cancelling {
                    slot.cancelling = true;
                    cancel = true;
                }
            }
            Some(bid) => {
                // An end or error carries no buffer; give one back if it does.
                if let Err(e) = self.buffers.borrow_mut().discard(bid) {
                    tracing::error!("io_uring buffer ring bookkeeping: {e:?}");
                }
                slot.deliver(c);
            }
            None => slot.deliver(c),
        }
        if let Some(w) = slot.waker.take() {
            w.wake();
        }
        drop(ops);
        if cancel {
            self.bump(|s| s.stash_full += 1);
            let cancel = opcode::AsyncCancel::new(key as u64).build();
            if let Err(e) = self.push(cancel.user_data(UNTRACKED)) {
                tracing::warn!("io_uring: could not pause a receive: {e}");
            }
        }
    }

    /// Releases what a completion nobody will take carries.
    fn release(&self, kind: OpKind, c: Completion) {
        if let Some(bid) = cqueue::buffer_select(c.flags) {
            if let Err(e) = self.buffers.borrow_mut().discard(bid) {
                tracing::error!("io_uring buffer ring bookkeeping: {e:?}");
            }
        }
        if kind == OpKind::Accept && c.result >= 0 {
            // SAFETY: the accept gave us this fd and nobody else has it.
            drop(unsafe { OwnedFd::from_raw_fd(c.result) });
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
        // buffer ring are freed right after this: submit what is queued (so nothing is left
        // to start later), then cancel everything synchronously, so the kernel is done with
        // that memory before it goes.
        if let Err(e) = self.enter() {
            tracing::warn!("io_uring: submitting at shutdown: {e}");
        }
        let timeout = types::Timespec::new().sec(1);
        match self
            .ring
            .get_mut()
            .submitter()
            .register_sync_cancel(Some(timeout), types::CancelBuilder::any())
        {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => tracing::warn!("io_uring: cancelling in-flight operations at shutdown: {e}"),
        }
        // Every operation is orphaned by now (each holds the driver): what their last
        // completions carry (accepted sockets) is released, not leaked.
        let _ = self.enter();
        self.reap();
    }
}

/// A submitted operation. One-shot: await [`Op::completion`]. Multishot: take completions
/// with [`Op::try_next`] (and a receive's bytes with [`Op::take_bytes`]), waiting with
/// [`Op::register`]; once [`Op::is_finished`], arm a new one if wanted. Dropping it before its
/// final completion cancels it without freeing anything the kernel still uses.
pub struct Op {
    driver: Driver,
    key: usize,
    done: bool,
}

impl Op {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Completion>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut ops = self.driver.inner.ops.borrow_mut();
        let slot = &mut ops[self.key];
        if let Some(c) = slot.take() {
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

    /// Wakes the task of `cx` at this operation's next completion.
    pub fn register(&self, cx: &mut Context<'_>) {
        if self.done {
            cx.waker().wake_by_ref();
            return;
        }
        let slot = &mut self.driver.inner.ops.borrow_mut()[self.key];
        if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            slot.waker = Some(cx.waker().clone());
        }
    }

    /// A completion already delivered, without waiting.
    pub fn try_next(&mut self) -> Option<Completion> {
        if self.done {
            return None;
        }
        self.driver.inner.ops.borrow_mut()[self.key].take()
    }

    /// Moves a receive's stashed bytes into the spare capacity of `dst`, as many as fit
    /// (never growing it); returns how many.
    pub fn take_bytes(&mut self, dst: &mut Vec<u8>) -> usize {
        if self.done {
            return 0;
        }
        let mut ops = self.driver.inner.ops.borrow_mut();
        let slot = &mut ops[self.key];
        let n = slot.unread().min(dst.capacity() - dst.len());
        if n == 0 {
            return 0;
        }
        dst.extend_from_slice(&slot.stash[slot.head..slot.head + n]);
        slot.head += n;
        if slot.head == slot.stash.len() {
            slot.head = 0;
            if slot.stash.capacity() > STASH_KEEP {
                slot.stash = Vec::new();
            } else {
                slot.stash.clear();
            }
        }
        n
    }

    /// Whether bytes or a completion are there to take without waiting.
    pub fn has_ready(&self) -> bool {
        !self.done && {
            let ops = self.driver.inner.ops.borrow();
            ops[self.key].unread() > 0 || ops[self.key].has_queued()
        }
    }

    /// Whether the kernel has ended this operation and everything it delivered was taken.
    pub fn is_finished(&self) -> bool {
        self.done || {
            let ops = self.driver.inner.ops.borrow();
            let slot = &ops[self.key];
            slot.finished && !slot.has_queued() && slot.unread() == 0
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
        let pending: Vec<Completion> = slot.queue.drain(..).chain(slot.last.take()).collect();
        let finished = slot.finished;
        if finished {
            ops.remove(self.key);
        } else {
            slot.orphaned = true;
            slot.waker = None;
            slot.stash = Vec::new();
            slot.head = 0;
        }
        drop(ops);
        for c in pending {
            inner.release(kind, c);
        }
        if !finished {
            let cancel = opcode::AsyncCancel::new(self.key as u64).build();
            if let Err(e) = inner.push(cancel.user_data(UNTRACKED)) {
                tracing::warn!("io_uring: could not cancel a dropped operation: {e}");
            }
        }
    }
}
