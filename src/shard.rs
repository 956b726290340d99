//! Writer shards: the SSE clients the front door streams itself (`direct`) are written to by a
//! few tasks per room, each owning up to `event.shard_size` ([`SHARD_SIZE`] by default)
//! clients, instead of one task woken per client per frame.
//!
//! A shard's task reads the room's broadcast ring once for all its clients, gathers what is
//! queued into one chunk (up to [`MAX_CHUNK_BYTES`]), and offers it to each client's
//! [`Outlet`] in turn: a client whose socket takes it whole costs one `write` and no wake-up. A
//! client whose socket is full keeps the rest in its outlet, in order, and its own task (woken
//! once) waits for the socket and writes it, under the write-stall deadline; until its outlet is
//! empty again, later chunks queue behind. Whoever writes to a client's socket holds its
//! outlet's lock, so bytes never interleave. A room's lone shard is written by the task that
//! broadcast the frame, when it last did so at least [`WRITE_GAP`] ago (see [`Shard`]); the
//! shards of a larger room are all woken, and the worker threads write them side by side.
//!
//! Policy: an outlet holds at most the room's queue (`event.queue`) of frames not yet written;
//! one more and the client is disconnected (it reconnects and replays), as a client further
//! behind the ring than that is. A shard whose own ring receiver falls that far behind (its
//! thread was starved) disconnects all its clients the same way.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::broadcast::{self, error::TryRecvError};

use crate::error::lock;
use crate::metrics::Metrics;
use crate::wire::MsgId;

/// Clients per shard by default (`event.shard_size`): a room of up to 256 clients has one
/// shard, which the task that brings a message writes itself at light loads (no wake-up, no
/// other thread woken) and its own task gathers bursts for; a larger room has two or more,
/// woken together, which the worker threads write side by side. On 2 CPUs shared with the
/// clients, 1,024 instead of 64 cut the CPU a delivery by 36 % at 100 clients and 15 % at
/// 1,000 (BENCHMARKS.md, "Shard size"), but a room written by one thread makes its last client
/// wait for all the others: at 1,000 clients two shards of 512 had a p99 0.65–1.05× Nchan's
/// where one of 1,024 had 0.75–1.28× (BENCHMARKS.md, "Shards of 512"), and at 500 clients two
/// of 256 had a p50 0.55–0.8× and a p99 0.6–0.95× what one of 512 had, for 23–50 % more CPU a
/// delivery, still 0.64–0.73× Nchan's (BENCHMARKS.md, "Shards of 256"). On many CPUs, a smaller
/// size spreads a large room's writes over more of them.
pub const SHARD_SIZE: usize = 256;

/// The most clients `event.shard_size` may give a shard.
pub const MAX_SHARD_SIZE: usize = 65_536;

/// The most bytes gathered for one write.
pub const MAX_CHUNK_BYTES: usize = 64 * 1024;

/// Most buffers given to one `writev`.
const MAX_SLICES: usize = 16;

/// Wakes the hub's sweep out of its quiet pace. While no client is behind, the sweep runs once
/// a second; a client left behind brings it back to every 200 ms, so that a client that stops
/// reading is found as soon as before. Who leaves a client behind rings: a shard's pass that
/// queues bytes in an outlet (its socket did not take them), and a room's broadcast when some
/// of its clients read the ring on their own tasks (streams served by hyper). A frame that every
/// client's socket took at once rings nothing: at a light load the sweep then wakes no thread
/// between two messages.
#[derive(Default)]
pub struct Bell {
    quiet: AtomicBool,
    ring: tokio::sync::Notify,
}

impl Bell {
    /// A client may be behind: one relaxed load, and a wake-up only when the sweep is quiet.
    pub fn ring(&self) {
        if self.quiet.load(Ordering::Relaxed) && self.quiet.swap(false, Ordering::Relaxed) {
            self.ring.notify_one();
        }
    }

    /// Whether the sweep is at its quiet pace.
    pub fn is_quiet(&self) -> bool {
        self.quiet.load(Ordering::Relaxed)
    }

    /// Puts the sweep at its quiet pace (it found every client caught up).
    pub fn quieten(&self) {
        self.quiet.store(true, Ordering::Relaxed);
    }

    /// Waits until the bell rings.
    pub async fn rung(&self) {
        self.ring.notified().await;
    }
}

/// One broadcast frame: a message (with its id, if the broker gave one) or a keep-alive.
#[derive(Debug, Clone)]
pub struct Item {
    pub id: Option<MsgId>,
    pub frame: Bytes,
    /// `true` for chat messages, `false` for keep-alives and notices.
    pub message: bool,
    /// Its number in its room (the room's count of frames broadcast, from 1), set as it is
    /// broadcast.
    pub seq: u64,
}

/// A streamed client's socket: its own (a connection that opened with its stream request), or
/// shared with the hyper connection it was taken over from.
pub enum Socket {
    Owned(TcpStream),
    Shared(Arc<TcpStream>),
}

impl std::ops::Deref for Socket {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        match self {
            Socket::Owned(socket) => socket,
            Socket::Shared(socket) => socket,
        }
    }
}

/// One streamed client's socket and what waits to be written to it.
///
/// Laid out for the shard's pass over a thousand clients whose state went cold since the last
/// message: what a delivery touches — the socket's descriptor (in the outlet itself when the
/// socket is its own), the count, the lock and the state — comes first and together, so that
/// it is a line or two of one allocation rather than a line here and another in the socket's
/// own. (Not aligned to a cache line: `align(64)` made each connection 0.6 KiB larger, the
/// allocator serving aligned blocks apart, for no measurable gain; BENCHMARKS.md.)
#[repr(C)]
pub struct Outlet {
    socket: Socket,
    /// Frames of the ring this client has been given whole (the sweep compares it with what
    /// its room sent).
    consumed: AtomicU64,
    state: Mutex<OutletState>,
    /// Wakes the client's task: bytes wait, or the stream ended.
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct OutletState {
    /// Bytes the socket has not taken, in order, each with the ring frames it holds.
    pending: VecDeque<(Bytes, u64)>,
    /// Ring frames in `pending`.
    frames_pending: u64,
    /// Frames up to this number came before the client joined (its replay has them).
    after: u64,
    /// Skip messages up to this id (the client has them already).
    skip_until: Option<MsgId>,
    end: Option<End>,
}

/// Why a client's stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The ring closed (shutdown, or no client left): end after what is pending.
    Finished,
    /// The client fell a whole queue behind.
    Overflowed,
    /// A write failed: the client is gone.
    Gone,
}

/// What [`Outlet::write_pending`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Nothing is pending: wait for the next wake-up.
    Empty,
    /// The socket is full: wait until it is writable, then write again.
    Blocked,
    /// The stream ends.
    Ended(End),
}

impl Outlet {
    /// An outlet for `socket` whose first bytes are `first` (the response head); the client's
    /// task writes them, and the replay after them.
    pub fn new(socket: Socket, first: Bytes) -> Outlet {
        Outlet {
            socket,
            state: Mutex::new(OutletState {
                pending: VecDeque::from([(first, 0)]),
                ..OutletState::default()
            }),
            consumed: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, OutletState> {
        lock(&self.state)
    }

    /// Answers `answer` instead of what the outlet holds (a stream refused after its outlet
    /// was made), then ends the stream.
    pub fn answer_instead(&self, answer: Bytes) {
        let mut state = self.lock();
        state.pending = VecDeque::from([(answer, 0)]);
        state.frames_pending = 0;
        drop(state);
        self.end(End::Finished);
    }

    pub fn socket(&self) -> &TcpStream {
        &self.socket
    }

    /// Frames of the ring written (or skipped) for this client.
    pub fn consumed(&self) -> u64 {
        self.consumed.load(Ordering::Relaxed)
    }

    /// Where the client joins its room's ring: `sent` frames came before (`consumed` starts
    /// there, as the sweep counts), its `replay` is queued behind what the outlet holds, and
    /// messages up to `skip_until` are skipped. Before the outlet joins a shard.
    pub fn join_at(&self, sent: u64, replay: Vec<Bytes>, skip_until: Option<MsgId>) {
        let mut state = self.lock();
        state.after = sent;
        state.skip_until = skip_until;
        state.pending.extend(
            replay
                .into_iter()
                .filter(|bytes| !bytes.is_empty())
                .map(|bytes| (bytes, 0)),
        );
        self.consumed.store(sent, Ordering::Relaxed);
    }

    /// Ends the stream (after what is pending, for [`End::Finished`]) and wakes its task.
    pub fn end(&self, end: End) {
        let mut state = self.lock();
        if state.end.is_none() {
            state.end = Some(end);
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Waits until there is something for the client's task to do.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Writes what is pending, without waiting (the client's task).
    pub fn write_pending(&self) -> Flushed {
        let mut state = self.lock();
        loop {
            if state.end.is_some_and(|end| end != End::Finished) {
                return Flushed::Ended(state.end.unwrap_or(End::Gone));
            }
            if state.pending.is_empty() {
                // What an idle client holds does not keep the size of its last backlog.
                state.pending = VecDeque::new();
                return match state.end {
                    Some(end) => Flushed::Ended(end),
                    None => Flushed::Empty,
                };
            }
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut count = 0;
            for (slice, (bytes, _)) in slices.iter_mut().zip(&state.pending) {
                *slice = IoSlice::new(bytes);
                count += 1;
            }
            match self.socket.try_write_vectored(&slices[..count]) {
                Ok(0) => return Flushed::Ended(End::Gone),
                Ok(written) => self.advance(&mut state, written),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    return Flushed::Blocked;
                }
                Err(_) => return Flushed::Ended(End::Gone),
            }
        }
    }

    /// Counts `frames` more given whole to the client. Every writer of `consumed` holds the
    /// outlet's lock (`_locked` says so; the sweep only reads it), so a load and a store do
    /// what an atomic add would, without its locked instruction (this is per delivery).
    fn count_consumed(&self, _locked: &mut OutletState, frames: u64) {
        let consumed = self.consumed.load(Ordering::Relaxed);
        self.consumed.store(consumed + frames, Ordering::Relaxed);
    }

    /// Drops `written` bytes from the front of `pending`, counting the frames written whole.
    fn advance(&self, state: &mut OutletState, mut written: usize) {
        while written > 0 {
            let Some((front, frames)) = state.pending.front_mut() else {
                return;
            };
            if written >= front.len() {
                written -= front.len();
                let frames = *frames;
                state.pending.pop_front();
                state.frames_pending -= frames;
                self.count_consumed(state, frames);
            } else {
                bytes::Buf::advance(front, written);
                written = 0;
            }
        }
    }

    /// Takes a shard's chunk (`items`, gathered in `whole`, `messages` of them chat messages)
    /// for this client: what is to be sent to its socket now (nothing waits before it), or
    /// `None` once it is queued behind what waits (the client's task woken if that overflowed
    /// its queue) or there is nothing for it. `delivered` counts the messages queued.
    fn take<'a>(
        &'a self,
        items: &[Item],
        whole: &Bytes,
        messages: u64,
        queue: u64,
        tally: &mut Tally,
    ) -> Option<Offer<'a>> {
        let mut state = self.lock();
        if state.end.is_some() {
            return None;
        }
        // The shard's chunk as it is (not even its handle copied unless it is queued), or the
        // frames this client lacks.
        let (own, frames, messages) = if state.skip_until.is_none()
            && items.first().is_some_and(|item| item.seq > state.after)
        {
            (None, items.len() as u64, messages)
        } else {
            let (bytes, frames, messages) = filtered(items, &mut state);
            (Some(bytes), frames, messages)
        };
        if frames == 0 {
            return None;
        }
        let bytes = own.as_ref().unwrap_or(whole);
        if bytes.is_empty() {
            // Every frame was one the client has: taken, nothing to write.
            self.count_consumed(&mut state, frames);
            return None;
        }
        if state.pending.is_empty() {
            return Some(Offer {
                outlet: self,
                state,
                own,
                frames,
                messages,
            });
        }
        state.pending.push_back((bytes.clone(), frames));
        tally.queued(messages);
        self.queued(state, frames, false, queue);
        None
    }

    /// What the socket did with an offer's bytes: taken whole, or the rest queued and the
    /// client's task woken to write it. Counts the messages delivered (or queued) in `tally`.
    fn sent(
        &self,
        offer: Offer<'_>,
        whole: &Bytes,
        result: std::io::Result<usize>,
        queue: u64,
        tally: &mut Tally,
    ) {
        let Offer {
            mut state,
            own,
            frames,
            messages,
            ..
        } = offer;
        let bytes = own.as_ref().unwrap_or(whole);
        match result {
            Ok(written) if written == bytes.len() => {
                self.count_consumed(&mut state, frames);
                tally.delivered += messages;
                return;
            }
            Ok(written) => state.pending.push_back((bytes.slice(written..), frames)),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                state.pending.push_back((bytes.clone(), frames));
            }
            Err(_) => {
                state.end = Some(End::Gone);
                drop(state);
                self.wake.notify_one();
                return;
            }
        }
        tally.queued(messages);
        self.queued(state, frames, true, queue);
    }

    /// `frames` more were queued in `pending` (`first`: it was empty, and the client's task is
    /// woken to write them): one more than the client's queue and it is disconnected.
    fn queued(&self, mut state: MutexGuard<'_, OutletState>, frames: u64, first: bool, queue: u64) {
        state.frames_pending += frames;
        let overflowed = state.frames_pending > queue;
        if overflowed {
            state.end = Some(End::Overflowed);
            state.pending.clear();
        }
        drop(state);
        if first || overflowed {
            self.wake.notify_one();
        }
    }
}

/// What a pass did, counted as its clients take their parts.
#[derive(Default)]
struct Tally {
    /// Messages delivered (written, or queued in an outlet).
    delivered: u64,
    /// Some client was left with bytes its socket did not take.
    behind: bool,
}

impl Tally {
    /// `messages` were queued in an outlet, behind what its socket did not take.
    fn queued(&mut self, messages: u64) {
        self.delivered += messages;
        self.behind = true;
    }
}

/// A client's part of a pass, to be sent to its socket: its outlet's lock is held from
/// [`Outlet::take`] to [`Outlet::sent`], so that nothing else writes to the socket between.
struct Offer<'a> {
    outlet: &'a Outlet,
    state: MutexGuard<'a, OutletState>,
    /// The frames this client lacks, when it lacks only some (else the shard's chunk).
    own: Option<Bytes>,
    frames: u64,
    messages: u64,
}

/// The frames of `items` this client lacks (after it joined, not skipped), in one buffer:
/// the bytes, the frames taken from the ring, the messages among them.
fn filtered(items: &[Item], state: &mut OutletState) -> (Bytes, u64, u64) {
    let mut out = BytesMut::new();
    let (mut frames, mut messages) = (0, 0);
    for item in items.iter().filter(|item| item.seq > state.after) {
        frames += 1;
        if let (Some(limit), Some(id)) = (state.skip_until, item.id) {
            // The client has this one already (same run, not after what it saw).
            if id.run == limit.run && !id.follows(&limit) {
                continue;
            }
            state.skip_until = None;
        }
        if item.message {
            messages += 1;
        }
        out.extend_from_slice(&item.frame);
    }
    if let Some(last) = items.last() {
        state.after = state.after.max(last.seq);
    }
    (out.freeze(), frames, messages)
}

/// Up to `event.shard_size` clients of one room and the task that writes to them.
///
/// A pass (`Shard::pass`) reads what the room's ring holds for the shard and offers it to every
/// client. Its task makes one when woken (`Shard::kick`). A room's lone shard is written by the
/// task that broadcast the frame itself (`Shard::write`, after the hub's lock is released):
/// at a light load a message then costs no wake-up of the shard's task (and no second worker
/// thread woken to run it, which was a sixth of a message's CPU at 10 clients × 50 msg/s). A
/// shard written that way less than [`WRITE_GAP`] ago, or [`WRITE_SHARE`] times what that
/// write took, is left to its task, which gathers what comes meanwhile into one write per
/// client (bursts).
pub struct Shard {
    outlets: Mutex<Vec<Arc<Outlet>>>,
    /// The shard's place in the room's ring; held by whoever makes a pass.
    ring: Mutex<Ring>,
    kick: tokio::sync::Notify,
    /// Its room let it go (its last client left while the room had other shards): its task
    /// ends at its next wake-up.
    retired: AtomicBool,
    /// The number in its room of the last frame a pass took from the ring (the room compares
    /// it with what it sent: [`Shard::behind`]).
    taken: AtomicU64,
    /// The room's queue: frames a client may be behind.
    queue: u64,
    /// The most clients it takes (`event.shard_size`).
    size: usize,
    /// A pass's sends go in one system call where the kernel allows (`event.io_uring`).
    batch: bool,
    metrics: Arc<Metrics>,
    /// Rung by a pass that leaves a client behind.
    bell: Arc<Bell>,
    /// Called by every pass that has frames, before its sends.
    #[cfg(test)]
    on_pass: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

/// What a shard reads from its room's ring.
struct Ring {
    rx: broadcast::Receiver<Item>,
    /// A pass's chunk (kept for its capacity).
    items: Vec<Item>,
    /// The ring closed: the shard's task ends its clients' streams and stops.
    closed: bool,
    /// When the broadcaster last made a pass itself ([`Shard::write`]), and how long it took.
    written_at: Option<std::time::Instant>,
    write_took: std::time::Duration,
    /// What a pass's sends did (kept for its capacity).
    results: Vec<std::io::Result<usize>>,
}

/// What a pass left.
#[derive(Debug, PartialEq, Eq)]
enum Pass {
    /// Nothing more in the ring.
    Done,
    /// Another chunk waits.
    More,
    /// The ring closed.
    Closed,
}

/// A lone shard written by its broadcaster less than this long ago is left to its task.
pub const WRITE_GAP: std::time::Duration = std::time::Duration::from_millis(1);

/// A lone shard is left to its task unless its broadcaster's last pass took at most
/// `1 / WRITE_SHARE` of the time since it began: a broadcaster spends at most about a quarter
/// of its time writing a large shard (a thousand sends take milliseconds), and under a higher
/// rate the shard's task gathers what comes meanwhile into one write per client.
pub const WRITE_SHARE: u32 = 4;

impl Shard {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Outlet>>> {
        lock(&self.outlets)
    }

    /// Adds a client, if the shard has room for it.
    pub fn join(&self, outlet: &Arc<Outlet>) -> bool {
        let mut outlets = self.lock();
        if outlets.len() >= self.size {
            return false;
        }
        outlets.push(outlet.clone());
        true
    }

    /// Removes a client; whether it was one of this shard's.
    pub fn leave(&self, outlet: &Arc<Outlet>) -> bool {
        let mut outlets = self.lock();
        let before = outlets.len();
        outlets.retain(|known| !Arc::ptr_eq(known, outlet));
        outlets.len() < before
    }

    /// Its clients (for tests: the room counts them with [`Shard::try_len`]).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Its clients, unless a pass holds them now (the hub's lock is not held waiting for
    /// a pass's sends).
    fn try_len(&self) -> Option<usize> {
        match self.outlets.try_lock() {
            Ok(outlets) => Some(outlets.len()),
            Err(_) => None,
        }
    }

    /// Whether no client is left, known without waiting: `false` while a pass holds them.
    /// Clients join and move under the hub's lock: an empty shard seen under it stays empty
    /// until it is released.
    pub fn is_surely_empty(&self) -> bool {
        self.try_len() == Some(0)
    }

    /// Moves every client of `self` into `into`, filling each shard in turn, when they have
    /// room for all of them and the move can lose or repeat nothing: none of these shards is
    /// making a pass (each one's ring is free) and each has taken all `sent` frames of the
    /// room. Every client has then been offered each frame once, and its new shard offers it
    /// the next. Called under the hub's lock, which new frames and joins wait for. Returns
    /// whether it moved them (else nothing moved). Holding every ring, it waits for no pass
    /// when it takes the clients' list.
    pub fn move_clients_into(&self, into: &[Arc<Shard>], sent: u64) -> bool {
        // Counted without waiting for a pass (a busy shard: the next sweep tries again).
        // Under the hub's lock counts only fall (leaves), so the room found stays.
        let mut room = 0;
        for shard in into {
            let Some(len) = shard.try_len() else {
                return false;
            };
            room += shard.size.saturating_sub(len);
        }
        if self.try_len().is_none_or(|len| len > room) {
            return false;
        }
        let mut held = Vec::with_capacity(into.len() + 1);
        for shard in std::iter::once(self).chain(into.iter().map(|shard| &**shard)) {
            let Ok(ring) = shard.ring.try_lock() else {
                return false;
            };
            held.push(ring);
            if shard.taken.load(Ordering::Relaxed) != sent {
                return false;
            }
        }
        let mut moving = std::mem::take(&mut *self.lock()).into_iter();
        for shard in into {
            let mut outlets = shard.lock();
            let free = shard.size.saturating_sub(outlets.len());
            outlets.extend(moving.by_ref().take(free));
        }
        debug_assert!(moving.next().is_none(), "counted room for every client");
        true
    }

    /// Ends the shard's task: its room no longer has it.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.kick();
    }

    /// Starts a shard's task on the room's ring, which `sent` frames went through before `rx`
    /// was subscribed; `queue` is the room's queue (frames a client may be behind); `size`, the
    /// most clients it takes; `batch`: a pass's sends go in one system call where the kernel
    /// allows ([`crate::uring`]); `bell`, rung when a pass leaves a client behind.
    pub fn spawn(
        rx: broadcast::Receiver<Item>,
        sent: u64,
        queue: u64,
        size: usize,
        batch: bool,
        metrics: Arc<Metrics>,
        bell: Arc<Bell>,
    ) -> Arc<Shard> {
        let shard = Arc::new(Shard {
            outlets: Mutex::new(Vec::new()),
            ring: Mutex::new(Ring {
                rx,
                items: Vec::new(),
                closed: false,
                written_at: None,
                write_took: std::time::Duration::ZERO,
                results: Vec::new(),
            }),
            kick: tokio::sync::Notify::new(),
            retired: AtomicBool::new(false),
            taken: AtomicU64::new(sent),
            queue,
            size,
            batch,
            metrics,
            bell,
            #[cfg(test)]
            on_pass: Mutex::new(None),
        });
        tokio::spawn(shard.clone().run());
        shard
    }

    /// Wakes the shard's task to make a pass (something was broadcast, or the ring closed).
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// Makes a pass on the caller's task (the room's broadcaster, once a frame is in the
    /// ring), unless one was made that way less than [`WRITE_GAP`] (or [`WRITE_SHARE`] times
    /// what that pass took) ago or the shard's task is making one: its task is woken then (as
    /// it is when more than a chunk waits, or the ring closed).
    pub fn write(&self) {
        let mut ring = match self.ring.try_lock() {
            Ok(ring) => ring,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                self.kick();
                return;
            }
        };
        let now = std::time::Instant::now();
        let gap = WRITE_GAP.max(ring.write_took * WRITE_SHARE);
        if ring
            .written_at
            .is_some_and(|last| now.duration_since(last) < gap)
        {
            drop(ring);
            self.kick();
            return;
        }
        ring.written_at = Some(now);
        let pass = self.pass(&mut ring);
        ring.write_took = now.elapsed();
        if pass != Pass::Done {
            drop(ring);
            self.kick();
        }
    }

    /// Has every pass that has frames call `hook` first.
    #[cfg(test)]
    pub fn on_pass(&self, hook: impl Fn() + Send + Sync + 'static) {
        *lock(&self.on_pass) = Some(Box::new(hook));
    }

    /// As if the broadcaster's last pass had taken `took`.
    #[cfg(test)]
    pub fn pretend_the_last_write_took(&self, took: std::time::Duration) {
        lock(&self.ring).write_took = took;
    }

    /// Frames of the `sent` its room broadcast that no pass took yet.
    pub fn behind(&self, sent: u64) -> u64 {
        sent.saturating_sub(self.taken.load(Ordering::Relaxed))
    }

    /// Makes passes on the caller's task (the room's broadcaster) until the ring holds
    /// nothing more for the shard, waiting for a pass its task is making to end: for a shard
    /// whose task fell half a ring behind, a burst's broadcaster would otherwise lap it in
    /// the ring (its thread not run in time), and all its clients be cut as slow consumers.
    /// The broadcaster then goes at the pace of the shard's writes (a chunk at a time), and
    /// whatever it reads from (a PULL or SUB socket) waits, as it would for any slow reader.
    pub fn catch_up(&self) {
        let mut ring = lock(&self.ring);
        ring.written_at = Some(std::time::Instant::now());
        loop {
            match self.pass(&mut ring) {
                Pass::Done => return,
                Pass::More => {}
                Pass::Closed => {
                    drop(ring);
                    self.kick();
                    return;
                }
            }
        }
    }

    /// Makes passes when woken, until the ring closes or the room lets the shard go.
    async fn run(self: Arc<Self>) {
        loop {
            self.kick.notified().await;
            if self.retired.load(Ordering::Acquire) {
                return;
            }
            loop {
                let pass = self.pass(&mut lock(&self.ring));
                match pass {
                    Pass::Done => break,
                    // Another chunk waits: after the other tasks had their turn.
                    Pass::More => tokio::task::yield_now().await,
                    Pass::Closed => {
                        self.end_all(End::Finished);
                        return;
                    }
                }
            }
        }
    }

    /// Offers what the ring holds for this shard, up to a chunk ([`MAX_CHUNK_BYTES`]), to
    /// every client.
    fn pass(&self, ring: &mut Ring) -> Pass {
        let mut bytes = 0;
        while bytes < MAX_CHUNK_BYTES && !ring.closed {
            match ring.rx.try_recv() {
                Ok(item) => {
                    bytes += item.frame.len();
                    ring.items.push(item);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Lagged(_)) => {
                    // This shard fell behind the ring: its clients miss frames. Each is
                    // disconnected and replays, as a client further behind than the ring is.
                    self.end_all(End::Overflowed);
                    ring.items.clear();
                }
                Err(TryRecvError::Closed) => ring.closed = true,
            }
        }
        if let Some(last) = ring.items.last() {
            self.taken.store(last.seq, Ordering::Relaxed);
        }
        if !ring.items.is_empty() {
            #[cfg(test)]
            if let Some(hook) = &*lock(&self.on_pass) {
                hook();
            }
            let whole = gather(&ring.items);
            let messages = ring.items.iter().filter(|item| item.message).count() as u64;
            let mut tally = Tally::default();
            let outlets = self.lock();
            // Room for every client at once: collected from a `filter_map`, the vector would
            // grow from 4 by doubling, copying what it holds each time (eight times for 512).
            let mut offers: Vec<Offer> = Vec::with_capacity(outlets.len());
            offers.extend(outlets.iter().filter_map(|outlet| {
                outlet.take(&ring.items, &whole, messages, self.queue, &mut tally)
            }));
            let sends: Vec<crate::uring::Send> = offers
                .iter()
                .map(|offer| crate::uring::Send {
                    socket: offer.outlet.socket.as_fd(),
                    bytes: offer.own.as_ref().unwrap_or(&whole),
                })
                .collect();
            crate::uring::send_all(&sends, self.batch, &mut ring.results);
            drop(sends);
            for (offer, result) in offers.into_iter().zip(ring.results.drain(..)) {
                offer
                    .outlet
                    .sent(offer, &whole, result, self.queue, &mut tally);
            }
            drop(outlets);
            if tally.delivered > 0 {
                self.metrics.delivered.inc_by(tally.delivered);
            }
            if tally.behind {
                self.bell.ring();
            }
            ring.items.clear();
        }
        if ring.closed {
            Pass::Closed
        } else if bytes >= MAX_CHUNK_BYTES {
            Pass::More
        } else {
            Pass::Done
        }
    }

    fn end_all(&self, end: End) {
        for outlet in self.lock().iter() {
            outlet.end(end);
        }
    }
}

/// The frames of `items` in one buffer (the first frame shared as is when it is alone).
fn gather(items: &[Item]) -> Bytes {
    match items {
        [one] => one.frame.clone(),
        _ => {
            let mut out = BytesMut::with_capacity(items.iter().map(|item| item.frame.len()).sum());
            for item in items {
                out.extend_from_slice(&item.frame);
            }
            out.freeze()
        }
    }
}
