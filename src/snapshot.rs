//! History that outlives a web node: the broker keeps the recent messages too, and web nodes
//! fetch them on their own ZeroMQ socket (the ZeroMQ guide's "Clone" pattern: snapshot, live
//! updates, sequence numbers).
//!
//! - The broker's [`Archive`] holds every message it published in this run, bounded per room
//!   (`broker.history_size`), in bytes (`broker.history_bytes`) and in age
//!   (`broker.history_ttl_secs`). [`serve`] owns the broker's ROUTER socket (`broker.snapshot`)
//!   and answers requests from it.
//! - A web node's [`run_client`] owns its DEALER socket (`event.snapshot`). The hub's SUB task
//!   subscribes first, then asks for everything after the newest id it holds, keeps the live
//!   frames that arrive meanwhile, takes the snapshot, then the kept frames (those it already
//!   has are dropped by id): nothing falls between the two.
//!
//! The protocol, both ends in this file. A request is one frame, one JSON object:
//! `{"after":["<run>-<seq>",…],"n":7}`: the newest id the node holds of each broker run it
//! knows (the broker reads the one of its own run; none of it: everything). The answer is a series of
//! multipart messages, in order: `["head", "7", <json>]` with
//! `{"run":"<run>","covered":true,"held":123}` (`covered`: every message of the run after
//! `after` is held — for another run's id or none, every message since the run began); then
//! `["batch", "7", <frame>, <frame>…]`, each frame a published frame exactly as PUB sent it,
//! oldest first, at most [`BATCH_BYTES`] per batch; then `["end", "7"]`. A published frame is
//! always one part, so no message can pose as these.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeromq::{DealerSocket, RouterSocket, Socket, SocketEvent, SocketRecv, SocketSend, ZmqMessage};

use crate::metrics::{Metrics, SnapshotResult};
use crate::socket;
use crate::wire::MsgId;

/// Frames per batch message, at most this many bytes (a single larger frame goes alone).
pub const BATCH_BYTES: usize = 256 * 1024;
/// How long a web node waits for a whole snapshot before it goes on without it.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// How long the broker gives a web node to take a whole answer (a peer that stops reading holds
/// the others' snapshots this long at most; a node gives up after [`TIMEOUT`] anyway).
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Answers on their way at once, to as many nodes; a request past it is refused (`Refused`:
/// the node asks again after its own [`TIMEOUT`]). Each holds the frames of its answer
/// (shared with the archive, not copied).
const MAX_ANSWERING: usize = 64;
/// How soon an answer whose node's queue was full is tried again, while nodes read; doubled
/// each time nothing could be sent, up to [`MAX_RETRY`].
const RETRY: Duration = Duration::from_millis(2);
const MAX_RETRY: Duration = Duration::from_millis(64);
/// Answer messages (head, batches of up to [`BATCH_BYTES`], end) queued for one web node, at
/// most: past it a send waits for the node to read. The zeromq crate queued 100,000 per peer,
/// so a peer that asked without reading made the broker hold its answers: 30,000 requests of
/// 20 bytes grew it by 1 GB (zeromq patch 7).
pub const SEND_QUEUE: usize = 16;
/// How long the requests of a peer that did not take its last answer are ignored.
const STUCK_FOR: Duration = Duration::from_secs(60);
/// Peers remembered as stuck, at most.
const MAX_STUCK: usize = 1024;
/// Ids read from a request, at most.
const MAX_MARKS: usize = 16;
/// The room key of messages that name none.
const NO_ROOM: &str = "";

/// How the archive is bounded (the `[broker]` keys).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Messages kept per room.
    pub per_room: usize,
    /// Bytes of frames kept over all rooms.
    pub bytes: usize,
    /// Age past which a message is dropped.
    pub ttl: Duration,
}

/// The broker's copy of the recent history: per broker run (its own, and with `broker.peer`
/// the runs it copied from its peer), per room, the frames published, oldest first. The bounds
/// hold over all runs: the oldest run gives way first.
pub struct Archive {
    limits: Limits,
    /// Oldest run first; at most [`MAX_RUNS`] (runs emptied by the bounds are kept, to say
    /// what they forgot).
    runs: VecDeque<RunArchive>,
}

/// Runs an archive keeps track of.
const MAX_RUNS: usize = 8;

/// One run's messages.
struct RunArchive {
    run: u64,
    /// The highest sequence number pushed.
    last: u64,
    limits: Limits,
    rooms: HashMap<Arc<str>, RoomEntries>,
    /// Every message held, oldest first, by sequence number, room and arrival (entries a room
    /// dropped on its own are skipped, and compacted away when they pile up).
    order: VecDeque<(u64, Arc<str>, Instant)>,
    held: usize,
    bytes: usize,
    /// The highest sequence number dropped: every message after it is held.
    forgotten: u64,
}

struct Entry {
    seq: u64,
    frame: Bytes,
}

/// One room's messages, oldest first, and its name (shared with the order index).
struct RoomEntries {
    name: Arc<str>,
    entries: VecDeque<Entry>,
}

/// What the archive holds after an id: the head of an answer and its frames.
pub struct Found {
    pub head: Head,
    pub frames: Vec<Bytes>,
}

/// The first part of an answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Head {
    /// The broker's run, as in ids.
    pub run: String,
    /// Whether every message after the requested id (of another run: since this run began) is
    /// in the answer.
    pub covered: bool,
    /// Messages in the answer.
    pub held: usize,
}

/// A request, as sent on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The newest id the node holds of each broker run it knows (the broker reads the one of
    /// its own run); empty or none of this run: everything.
    pub after: Vec<String>,
    /// The request's number, repeated in every part of the answer.
    pub n: u64,
}

impl Archive {
    pub fn new(limits: Limits) -> Archive {
        Archive {
            limits,
            runs: VecDeque::new(),
        }
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.runs.iter().map(|run| run.held).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of frames held.
    pub fn bytes(&self) -> usize {
        self.runs.iter().map(|run| run.bytes).sum()
    }

    /// Forgets everything (a broker that steps down copies its peer's history afresh).
    pub fn clear(&mut self) {
        self.runs.clear();
    }

    /// The newest id of each run (held or since dropped), newest run first: what a backup asks
    /// its peer for what follows.
    pub fn marks(&self) -> Vec<MsgId> {
        self.runs
            .iter()
            .rev()
            .map(|held| MsgId {
                run: held.run,
                seq: held.last,
            })
            .collect()
    }

    /// The highest sequence number of `run` pushed (held or since dropped).
    pub fn mark(&self, run: u64) -> Option<u64> {
        self.runs
            .iter()
            .rev()
            .find(|held| held.run == run)
            .map(|held| held.last)
    }

    /// Keeps a published message (`room` as the frame names it, `None` for the default room).
    /// A message of a run not seen before starts that run's part.
    pub fn push(&mut self, id: MsgId, room: Option<&str>, frame: Bytes, now: Instant) {
        if self.runs.back().is_none_or(|held| held.run != id.run) {
            // Back to a run seen before (rare: a peer's): its part is kept where it is.
            if let Some(at) = self.runs.iter().position(|held| held.run == id.run) {
                let held = self.runs.remove(at).expect("found");
                self.runs.push_back(held);
            } else {
                self.runs.push_back(RunArchive::new(id.run, self.limits));
                if self.runs.len() > MAX_RUNS {
                    self.runs.pop_front();
                }
            }
        }
        let held = self.runs.back_mut().expect("pushed");
        held.push(id.seq, room, frame, now);
        // The byte bound over all runs: older runs give way first.
        while self.bytes() > self.limits.bytes {
            let Some(oldest) = self.runs.iter_mut().find(|held| held.held > 0) else {
                break;
            };
            oldest.pop_oldest();
        }
        for held in self.runs.iter_mut() {
            held.expire(now);
        }
    }

    /// Drops messages past their age.
    pub fn expire(&mut self, now: Instant) {
        for held in self.runs.iter_mut() {
            held.expire(now);
        }
    }

    /// Every message held after `marks` (the newest id a node holds of each run it knows),
    /// oldest first (frames shared, not copied).
    pub fn after(&mut self, marks: &[MsgId], now: Instant) -> Found {
        self.gather(marks, now).sorted()
    }

    /// [`Archive::after`] in two steps: what is held, gathered run by run and room by room
    /// (under the lock the broker shares, O(n)), then put in order ([`Gathered::sorted`],
    /// outside it).
    pub fn gather(&mut self, marks: &[MsgId], now: Instant) -> Gathered {
        let mut gathered = Gathered {
            run: self.runs.back().map_or(0, |held| held.run),
            covered: true,
            found: Vec::new(),
        };
        // The last run the node knows: an earlier run it knows nothing of is one that ended
        // before it started (or was reset for it), not one to replay.
        let known = self
            .runs
            .iter()
            .rposition(|held| marks.iter().any(|id| id.run == held.run));
        for (index, held) in self.runs.iter_mut().enumerate() {
            held.expire(now);
            let after = marks.iter().find(|id| id.run == held.run).map(|id| id.seq);
            if after.is_none() && known.is_some_and(|known| index < known) {
                continue;
            }
            held.gather_into(index, after, &mut gathered);
        }
        gathered
    }
}

impl RunArchive {
    fn new(run: u64, limits: Limits) -> RunArchive {
        RunArchive {
            run,
            last: 0,
            limits,
            rooms: HashMap::new(),
            order: VecDeque::new(),
            held: 0,
            bytes: 0,
            forgotten: 0,
        }
    }

    fn push(&mut self, seq: u64, room: Option<&str>, frame: Bytes, now: Instant) {
        self.last = self.last.max(seq);
        if self.limits.per_room == 0 {
            self.forgotten = seq;
            return;
        }
        let room = room.unwrap_or(NO_ROOM);
        // One lookup for a room that exists (most messages).
        let held = match self.rooms.get_mut(room) {
            Some(held) => held,
            None => {
                let name: Arc<str> = Arc::from(room);
                self.rooms.entry(name.clone()).or_insert(RoomEntries {
                    name,
                    entries: VecDeque::new(),
                })
            }
        };
        if held.entries.len() >= self.limits.per_room
            && let Some(old) = held.entries.pop_front()
        {
            self.held -= 1;
            self.bytes -= old.frame.len();
            self.forgotten = self.forgotten.max(old.seq);
            // Usually also the oldest of all (one busy room): its order entry goes now.
            if self
                .order
                .front()
                .is_some_and(|(seq, name, _)| *seq == old.seq && Arc::ptr_eq(name, &held.name))
            {
                self.order.pop_front();
            }
        }
        self.bytes += frame.len();
        self.held += 1;
        held.entries.push_back(Entry { seq, frame });
        self.order.push_back((seq, held.name.clone(), now));
        if self.order.len() > 2 * self.held + 1024 {
            let rooms = &self.rooms;
            self.order.retain(|(seq, room, _)| {
                rooms
                    .get(room)
                    .is_some_and(|held| live(&held.entries, *seq))
            });
        }
    }

    /// Drops messages past their age (the order index says when each arrived: no lookup
    /// unless one is due).
    fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(_, _, at)| now.duration_since(*at) > self.limits.ttl)
        {
            self.pop_oldest();
        }
    }

    /// Drops the oldest message held (order entries of messages a room dropped already are
    /// skipped); `false` if there is none.
    fn pop_oldest(&mut self) -> bool {
        while let Some((seq, room, _)) = self.order.pop_front() {
            let Some(held) = self.rooms.get_mut(&room) else {
                continue;
            };
            if held.entries.front().is_none_or(|entry| entry.seq != seq) {
                continue;
            }
            if let Some(old) = held.entries.pop_front() {
                self.held -= 1;
                self.bytes -= old.frame.len();
                self.forgotten = self.forgotten.max(seq);
            }
            if held.entries.is_empty() {
                self.rooms.remove(&room);
            }
            return true;
        }
        false
    }

    /// Adds what is held after `after` (none: the whole run) to `gathered`.
    fn gather_into(&self, index: usize, after: Option<u64>, gathered: &mut Gathered) {
        let from = after.unwrap_or(0);
        for held in self.rooms.values() {
            let entries = &held.entries;
            let start = entries.partition_point(|entry| entry.seq <= from);
            gathered.found.extend(
                entries
                    .range(start..)
                    .map(|entry| ((index, entry.seq), entry.frame.clone())),
            );
        }
        gathered.covered &= from >= self.forgotten;
    }
}

/// What [`Archive::gather`] found, not in order yet.
pub struct Gathered {
    run: u64,
    covered: bool,
    /// By (run's place in the archive, sequence number).
    found: Vec<((usize, u64), Bytes)>,
}

impl Gathered {
    /// Oldest first.
    pub fn sorted(mut self) -> Found {
        self.found.sort_unstable_by_key(|(at, _)| *at);
        Found {
            head: Head {
                run: self.run.to_string(),
                covered: self.covered,
                held: self.found.len(),
            },
            frames: self.found.into_iter().map(|(_, frame)| frame).collect(),
        }
    }
}

/// Whether the message `seq` of a room is still held (a room drops its oldest first).
fn live(entries: &VecDeque<Entry>, seq: u64) -> bool {
    entries.front().is_some_and(|front| front.seq <= seq)
}

/// Answers snapshot requests on the broker's ROUTER socket until shutdown. Answers to several
/// nodes are sent side by side, each as fast as its node reads, without waiting on a node
/// (`RouterSocket::try_send`, zeromq patch 8): at most [`MAX_ANSWERING`] at a time, each given
/// [`SEND_TIMEOUT`]. A node that does not take its answer in that time holds nobody else up; its
/// requests are then ignored for [`STUCK_FOR`] (its queue is still full of what it did not
/// take).
pub async fn serve(
    mut router: RouterSocket,
    archive: Arc<Mutex<Archive>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut stuck = Stuck::default();
    let mut answering: VecDeque<Answer> = VecDeque::new();
    let mut retry = RETRY;
    loop {
        let (waiting, progressed) =
            send_what_fits(&mut router, &mut answering, &mut stuck, &metrics);
        // Tried again soon while nodes read, less and less often while none does.
        retry = if progressed {
            RETRY
        } else {
            (retry * 2).min(MAX_RETRY)
        };
        let message = tokio::select! {
            () = shutdown.cancelled() => return,
            // A node's queue was full: try again (the crate has no readiness to await).
            () = tokio::time::sleep(retry), if waiting => continue,
            received = router.recv() => match received {
                Ok(message) => message,
                Err(error) => {
                    tracing::debug!(%error, "snapshot socket: peer dropped");
                    continue;
                }
            },
        };
        let parts = message.into_vec();
        let request = match parts.as_slice() {
            [identity, frame] => serde_json::from_slice::<Request>(frame)
                .ok()
                .map(|request| (identity.clone(), request)),
            _ => None,
        };
        let Some((identity, request)) = request else {
            metrics.snapshot_served(SnapshotResult::Malformed);
            crate::throttled!(
                tracing::Level::WARN,
                parts = parts.len(),
                "snapshot socket: dropped a request that is not one JSON request"
            );
            continue;
        };
        if stuck.holds(&identity, Instant::now()) {
            metrics.snapshot_served(SnapshotResult::Refused);
            crate::throttled!(
                tracing::Level::WARN,
                "snapshot socket: ignored a request of a web node that did not take its last answer"
            );
            continue;
        }
        let Ok(marks) = request
            .after
            .iter()
            .take(MAX_MARKS)
            .map(|id| id.parse::<MsgId>())
            .collect::<Result<Vec<MsgId>, ()>>()
        else {
            metrics.snapshot_served(SnapshotResult::Malformed);
            continue;
        };
        // A node asks again only when it gave up on its last answer: while that one is still on
        // its way (it times out, at the latest, as the node gives up), a request costs no
        // gathering, so that a peer asking without end and reading nothing costs next to nothing.
        if answering.iter().any(|answer| answer.identity == identity) {
            metrics.snapshot_served(SnapshotResult::Refused);
            crate::throttled!(
                tracing::Level::WARN,
                "snapshot socket: refused a request of a web node whose last answer is still on its way"
            );
            continue;
        }
        if answering.len() >= MAX_ANSWERING {
            metrics.snapshot_served(SnapshotResult::Refused);
            crate::throttled!(
                tracing::Level::WARN,
                answering = MAX_ANSWERING,
                "snapshot socket: refused a request, as many answers are on their way as allowed"
            );
            continue;
        }
        let gathered = {
            // The broker appends under this lock: hold it only to gather, sort after.
            let mut archive = crate::error::lock(&archive);
            archive.gather(&marks, Instant::now())
        };
        answering.push_back(Answer::new(identity, request.n, gathered.sorted()));
    }
}

/// Sends what each answer in progress can send now: until it is done or its node's queue is
/// full. Finished answers are counted and dropped, and so are those past their
/// [`SEND_TIMEOUT`] (their node is then ignored for a while). Whether some node's queue was
/// full, and whether anything was sent.
fn send_what_fits(
    router: &mut RouterSocket,
    answering: &mut VecDeque<Answer>,
    stuck: &mut Stuck,
    metrics: &Metrics,
) -> (bool, bool) {
    let now = Instant::now();
    let mut waiting = false;
    let mut progressed = false;
    answering.retain_mut(|answer| {
        while let Some(message) = answer.messages.pop_front() {
            match router.try_send(message) {
                Ok(()) => progressed = true,
                Err(zeromq::ZmqError::ReturnToSender { message, .. }) => {
                    answer.messages.push_front(message);
                    break;
                }
                Err(error) => {
                    metrics.snapshot_served(SnapshotResult::Failed);
                    crate::throttled!(tracing::Level::WARN, %error, "snapshot socket: could not answer a request");
                    return false;
                }
            }
        }
        if answer.messages.is_empty() {
            metrics.snapshot_served(SnapshotResult::Served);
            tracing::debug!(held = answer.held, "snapshot served");
            return false;
        }
        if now >= answer.deadline {
            metrics.snapshot_served(SnapshotResult::Failed);
            crate::throttled!(
                tracing::Level::WARN,
                "snapshot socket: a web node did not take its snapshot in time"
            );
            stuck.add(answer.identity.clone(), now);
            return false;
        }
        waiting = true;
        true
    });
    (waiting, progressed)
}

/// The peers (by identity) whose last answer timed out, and until when their requests are
/// ignored; at most [`MAX_STUCK`], the oldest forgotten first.
#[derive(Debug, Default)]
struct Stuck(VecDeque<(Bytes, Instant)>);

impl Stuck {
    fn holds(&mut self, identity: &Bytes, now: Instant) -> bool {
        self.0.retain(|(_, until)| *until > now);
        self.0.iter().any(|(stuck, _)| stuck == identity)
    }

    fn add(&mut self, identity: Bytes, now: Instant) {
        if self.0.len() == MAX_STUCK {
            self.0.pop_front();
        }
        self.0.push_back((identity, now + STUCK_FOR));
    }
}

/// One answer on its way: the messages not sent yet (head, batches, end), each starting with the
/// node's identity, and when the node must have taken them all.
struct Answer {
    identity: Bytes,
    messages: VecDeque<ZmqMessage>,
    held: usize,
    deadline: Instant,
}

impl Answer {
    fn new(identity: Bytes, n: u64, found: Found) -> Answer {
        let n = Bytes::from(n.to_string());
        let message = |kind: &'static str| {
            let mut message = ZmqMessage::from(identity.clone());
            message.push_back(Bytes::from_static(kind.as_bytes()));
            message.push_back(n.clone());
            message
        };
        let mut messages = VecDeque::new();
        let mut head = message("head");
        head.push_back(Bytes::from(
            serde_json::to_vec(&found.head).expect("a head serializes"),
        ));
        messages.push_back(head);
        let mut frames = found.frames.into_iter().peekable();
        while frames.peek().is_some() {
            let mut batch = message("batch");
            let mut bytes = 0;
            while let Some(frame) =
                frames.next_if(|frame| bytes == 0 || bytes + frame.len() <= BATCH_BYTES)
            {
                bytes += frame.len();
                batch.push_back(frame);
            }
            messages.push_back(batch);
        }
        messages.push_back(message("end"));
        Answer {
            identity,
            messages,
            held: found.head.held,
            deadline: Instant::now() + SEND_TIMEOUT,
        }
    }
}

/// One part of an answer, as the web node's client reads it.
#[derive(Debug)]
pub enum Reply {
    Head(u64, Head),
    Batch(u64, Vec<Bytes>),
    End(u64),
}

impl Reply {
    /// The request this answers.
    pub fn n(&self) -> u64 {
        match self {
            Reply::Head(n, _) | Reply::Batch(n, _) | Reply::End(n) => *n,
        }
    }

    fn read(message: ZmqMessage) -> Option<Reply> {
        let mut parts = message.into_vec().into_iter();
        let kind = parts.next()?;
        let n = std::str::from_utf8(&parts.next()?).ok()?.parse().ok()?;
        match kind.as_ref() {
            b"head" => {
                let head = serde_json::from_slice(&parts.next()?).ok()?;
                Some(Reply::Head(n, head))
            }
            b"batch" => Some(Reply::Batch(n, parts.collect())),
            b"end" => Some(Reply::End(n)),
            _ => None,
        }
    }
}

/// The web node's side: requests go in, the parts of the answers come out.
pub struct Client {
    pub requests: mpsc::Sender<Request>,
    pub replies: mpsc::Receiver<Reply>,
}

/// Owns the web node's DEALER socket: connects (again after the broker goes away), sends each
/// request, and hands every part of the answers to the hub's SUB task.
pub async fn run_client(
    mut targets: tokio::sync::watch::Receiver<Vec<String>>,
    max_message_bytes: usize,
    mut requests: mpsc::Receiver<Request>,
    replies: mpsc::Sender<Reply>,
    shutdown: CancellationToken,
) {
    // A batch holds up to BATCH_BYTES of frames, and one frame may be as large as PUB allows.
    let limit = BATCH_BYTES + max_message_bytes + 1024;
    // The request not answered yet: sent again after a reconnection (the answer to the lost
    // one will not come).
    let mut unanswered: Option<Request> = None;
    loop {
        let addresses = targets.borrow_and_update().clone();
        let what = format!("DEALER {}", addresses.join(";"));
        let make = || DealerSocket::with_options(socket::connect_options(limit));
        let connected = tokio::select! {
            connected = socket::connect(make, &addresses, &what, &shutdown) => connected,
            // (A closed channel: no rewiring will come; the branch is disabled.)
            Ok(()) = targets.changed() => continue,
        };
        let Some(mut dealer) = connected else {
            return;
        };
        let mut events = dealer.monitor();
        if let Some(request) = &unanswered {
            let frame = serde_json::to_vec(request).expect("a request serializes");
            let _ = dealer.send(ZmqMessage::from(frame)).await;
        }
        let mut rewired = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                Ok(()) = targets.changed() => {
                    tracing::info!(addresses = ?*targets.borrow(), "snapshot socket rewired");
                    rewired = true;
                    break;
                }
                event = futures_util::StreamExt::next(&mut events) => match event {
                    Some(SocketEvent::Disconnected(_)) | None => break,
                    Some(_) => {}
                },
                request = requests.recv() => {
                    let Some(request) = request else { return };
                    let frame = serde_json::to_vec(&request).expect("a request serializes");
                    unanswered = Some(request);
                    if let Err(error) = dealer.send(ZmqMessage::from(frame)).await {
                        tracing::warn!(socket = %what, %error, "could not ask for a snapshot");
                        break;
                    }
                }
                received = dealer.recv() => match received {
                    Ok(message) => match Reply::read(message) {
                        Some(reply) => {
                            if let Reply::End(n) = reply
                                && unanswered.as_ref().is_some_and(|request| request.n == n)
                            {
                                unanswered = None;
                            }
                            if replies.send(reply).await.is_err() {
                                return;
                            }
                        }
                        None => crate::throttled!(tracing::Level::WARN, socket = %what, "dropped an unreadable snapshot answer"),
                    },
                    Err(error) => {
                        tracing::warn!(socket = %what, %error, "snapshot socket failed; reconnecting");
                        break;
                    }
                },
            }
        }
        if !rewired {
            tracing::warn!(socket = %what, "broker went away; reconnecting the snapshot socket");
        }
    }
}

/// A client, the task that owns its socket (to spawn), and where to send new addresses.
pub fn client(
    addresses: Vec<String>,
    max_message_bytes: usize,
    shutdown: CancellationToken,
) -> (
    Client,
    impl std::future::Future<Output = ()> + Send,
    tokio::sync::watch::Sender<Vec<String>>,
) {
    let (request_tx, request_rx) = mpsc::channel(4);
    let (reply_tx, reply_rx) = mpsc::channel(16);
    let targets = tokio::sync::watch::Sender::new(addresses);
    let task = run_client(
        targets.subscribe(),
        max_message_bytes,
        request_rx,
        reply_tx,
        shutdown,
    );
    (
        Client {
            requests: request_tx,
            replies: reply_rx,
        },
        task,
        targets,
    )
}

/// The broker's ROUTER socket, bound (its task is [`serve`]). At most [`SEND_QUEUE`] answer
/// messages wait for one web node to read them.
pub fn router(max_frame_bytes: usize) -> RouterSocket {
    let mut options = socket::options(max_frame_bytes);
    options.send_queue_capacity(Some(SEND_QUEUE));
    RouterSocket::with_options(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stuck_peer_is_ignored_for_a_while_and_at_most_so_many_are_kept() {
        let now = Instant::now();
        let mut stuck = Stuck::default();
        let peer = Bytes::from_static(b"peer");
        assert!(!stuck.holds(&peer, now));
        stuck.add(peer.clone(), now);
        assert!(stuck.holds(&peer, now + STUCK_FOR / 2));
        assert!(!stuck.holds(&peer, now + STUCK_FOR));
        for i in 0..=MAX_STUCK {
            stuck.add(Bytes::from(i.to_string()), now);
        }
        assert_eq!(stuck.0.len(), MAX_STUCK);
        assert!(
            !stuck.holds(&Bytes::from("0"), now),
            "the oldest is forgotten"
        );
        assert!(stuck.holds(&Bytes::from(MAX_STUCK.to_string()), now));
    }

    fn limits(per_room: usize, bytes: usize) -> Limits {
        Limits {
            per_room,
            bytes,
            ttl: Duration::from_secs(60),
        }
    }

    fn frame(seq: u64) -> Bytes {
        Bytes::from(format!("{{\"id\":\"1-{seq}\"}}"))
    }

    fn seqs(found: &Found) -> Vec<u64> {
        found
            .frames
            .iter()
            .map(|f| {
                let text = std::str::from_utf8(f).unwrap();
                text.trim_start_matches("{\"id\":\"1-")
                    .trim_end_matches("\"}")
                    .parse()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn answers_in_order_over_rooms_and_says_what_it_covers() {
        let now = Instant::now();
        let mut archive = Archive::new(limits(2, 1 << 20));
        for (seq, room) in [
            (1, None),
            (2, Some("a")),
            (3, None),
            (4, Some("a")),
            (5, None),
        ] {
            archive.push(MsgId { run: 1, seq }, room, frame(seq), now);
        }
        // The default room keeps 3 and 5, room a keeps 2 and 4: 1 was dropped.
        assert_eq!(archive.len(), 4);
        let all = archive.after(&[], now);
        assert_eq!(seqs(&all), [2, 3, 4, 5]);
        assert!(!all.head.covered, "message 1 is gone");
        let after_1 = archive.after(&[MsgId { run: 1, seq: 1 }], now);
        assert_eq!(seqs(&after_1), [2, 3, 4, 5]);
        assert!(after_1.head.covered);
        let after_4 = archive.after(&[MsgId { run: 1, seq: 4 }], now);
        assert_eq!(seqs(&after_4), [5]);
        // Another run's id: everything held, and it does not reach back to this run's start.
        let other = archive.after(&[MsgId { run: 9, seq: 4 }], now);
        assert_eq!(seqs(&other), [2, 3, 4, 5]);
        assert!(!other.head.covered);
    }

    #[test]
    fn bytes_and_age_bound_it_and_stale_order_entries_are_compacted() {
        let now = Instant::now();
        let size = frame(1).len();
        let mut archive = Archive::new(limits(1, 3 * size));
        // One busy room with a cap of one: the order index must not grow with it.
        for seq in 1..=10_000 {
            archive.push(MsgId { run: 1, seq }, Some("busy"), frame(seq), now);
        }
        assert_eq!(archive.len(), 1);
        assert!(archive.runs[0].order.len() <= 2 * archive.len() + 1024);
        let mut archive = Archive::new(limits(100, 3 * size));
        for seq in 1..=5 {
            archive.push(
                MsgId { run: 1, seq },
                Some(&format!("r{seq}")),
                frame(seq),
                now,
            );
        }
        assert_eq!(seqs(&archive.after(&[], now)), [3, 4, 5]);
        assert!(archive.bytes() <= 3 * size);
        let later = now + Duration::from_secs(61);
        assert!(archive.after(&[], later).frames.is_empty());
        assert!(archive.is_empty());
    }

    #[test]
    fn runs_follow_each_other_and_a_node_gets_only_what_it_lacks() {
        let now = Instant::now();
        let mut archive = Archive::new(limits(100, 1 << 20));
        let run_frame = |run: u64, seq: u64| Bytes::from(format!("{{\"id\":\"{run}-{seq}\"}}"));
        for seq in 1..=3 {
            archive.push(MsgId { run: 1, seq }, None, run_frame(1, seq), now);
        }
        for seq in 1..=2 {
            archive.push(MsgId { run: 2, seq }, None, run_frame(2, seq), now);
        }
        let text = |found: &Found| -> Vec<String> {
            found
                .frames
                .iter()
                .map(|f| String::from_utf8(f.to_vec()).unwrap())
                .collect()
        };
        // Nothing known: both runs, the older first.
        assert_eq!(archive.after(&[], now).frames.len(), 5);
        assert_eq!(archive.mark(1), Some(3));
        assert_eq!(archive.mark(2), Some(2));
        // The tail of run 1 and all of run 2.
        let found = archive.after(&[MsgId { run: 1, seq: 2 }], now);
        assert_eq!(
            text(&found),
            ["{\"id\":\"1-3\"}", "{\"id\":\"2-1\"}", "{\"id\":\"2-2\"}"]
        );
        assert!(found.head.covered);
        assert_eq!(found.head.run, "2");
        // A node that knows only run 2 is not sent run 1 (it ended before that node began).
        let found = archive.after(&[MsgId { run: 2, seq: 1 }], now);
        assert_eq!(text(&found), ["{\"id\":\"2-2\"}"]);
        archive.clear();
        assert!(archive.is_empty());
        assert_eq!(archive.mark(1), None);
    }
}
