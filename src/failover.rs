//! Two brokers, one active: the heartbeats they publish, and what each side makes of them
//! (the ZeroMQ guide's "Binary Star", with the backup a live copy of the active broker as in
//! "Clone").
//!
//! - Each broker of a pair (`broker.peer`) publishes a heartbeat on its PUB socket every
//!   [`BEAT_INTERVAL`]: `{"broker":{"state":"active","term":3,"run":"…","seq":41,"backup":true,
//!   "following":false}}`. It subscribes to its peer's PUB socket.
//! - The **active** broker sequences: it reads PULL, stamps, runs the scripts, publishes. It
//!   says `"backup":true` once its peer is a following backup whose heartbeat says it holds
//!   everything it had published (so a node may from then on deliver only what the backup
//!   holds). To get there under a steady load, it stops reading PULL for at most
//!   [`HOLD_AT_MOST`] while the backup catches up (once, when a backup joins); and a burst
//!   that leaves the backup more than [`MAX_BACKUP_LAG`] behind waits for it while it copies
//!   (its heartbeat comes every 4,096 messages too).
//! - The **backup** copies: every message the active one publishes goes into its archive and
//!   out on its own PUB socket, in order, unchanged (same id); a gap is fetched from the
//!   active broker's snapshot socket. It says `"following":true` once it holds the active
//!   broker's history.
//! - A backup becomes active (**takeover**) when a message reaches its PULL socket and no
//!   active peer was heard for [`DEAD_AFTER`]: web nodes push to it only when they no longer
//!   hear the active broker either, so a broker that merely lost sight of its peer does not
//!   take over (the Binary Star's "voter"). It starts a new run and a higher term.
//! - Two active brokers (a split brain healed): the one with the lower term (then run) steps
//!   down, forgets its history and copies the other's.
//!
//! A web node (`event.failover`) subscribes to both PUB sockets and reads the heartbeats
//! ([`Brokers`]): it pushes to the active broker, and delivers only the frames of one **source**:
//! the following backup while the active broker says it has one (so everything a browser is
//! shown, and every `200`, is held by both brokers), the active broker otherwise.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// How often a broker of a pair publishes its heartbeat.
pub const BEAT_INTERVAL: Duration = Duration::from_millis(100);
/// A broker not heard for this long is taken for gone (the default of `broker.peer_timeout_ms`;
/// each heartbeat says its broker's, and web nodes go by it).
pub const DEAD_AFTER: Duration = Duration::from_millis(1000);
/// The shortest `broker.peer_timeout_ms`: three heartbeats.
pub const MIN_DEAD_AFTER: Duration = Duration::from_millis(300);
/// How long an active broker stops reading PULL for a joining backup to catch up, at most
/// (then it reads again for [`DEAD_AFTER`] before it tries again).
pub const HOLD_AT_MOST: Duration = Duration::from_millis(500);
/// How far a confirmed backup may lag behind what the active broker published before the
/// active one stops reading PULL for it to catch up (while it does: see [`Pair::hold`]). Well
/// under what the active broker's PUB socket queues for a peer (100,000 messages), past which
/// the backup would miss messages and have to fetch them from the snapshot socket while the
/// burst goes on, and web nodes that deliver what it holds would wait for it.
pub const MAX_BACKUP_LAG: u64 = 20_000;
/// What every heartbeat frame starts with (a published message never does: the broker
/// publishes objects whose first key is a message's).
pub const BEAT_PREFIX: &[u8] = b"{\"broker\":";

/// What a broker of a pair is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Active,
    Backup,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Backup => "backup",
        }
    }
}

/// One heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    pub state: Role,
    /// Raised by one at each takeover: of two active brokers, the higher term wins.
    pub term: u64,
    /// The broker's run (the first part of the ids it stamps), as in ids.
    pub run: String,
    /// Active: the last sequence number it published. Backup: the last one it holds of the
    /// active broker's run.
    pub seq: u64,
    /// Active: a following backup holds everything it published.
    pub backup: bool,
    /// Backup: it holds the active broker's history and copies what it publishes.
    pub following: bool,
    /// After how long without a heartbeat this broker is to be taken for gone
    /// (`broker.peer_timeout_ms`).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    DEAD_AFTER.as_millis() as u64
}

#[derive(Serialize, Deserialize)]
struct Wrapped<T> {
    broker: T,
}

impl Beat {
    /// The frame published.
    pub fn frame(&self) -> Bytes {
        serde_json::to_vec(&Wrapped { broker: self })
            .expect("a heartbeat serializes")
            .into()
    }

    /// A heartbeat frame read back; `None` if it is not one.
    pub fn read(frame: &[u8]) -> Option<Beat> {
        if !frame.starts_with(BEAT_PREFIX) {
            return None;
        }
        serde_json::from_slice::<Wrapped<Beat>>(frame)
            .ok()
            .map(|wrapped| wrapped.broker)
    }

    /// How long this broker may stay silent before it is taken for gone.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms).max(MIN_DEAD_AFTER)
    }

    /// Orders two active brokers: the greater one stays active.
    fn rank(&self) -> (u64, &str) {
        (self.term, &self.run)
    }
}

/// What a broker knows of its peer, and what it is itself.
#[derive(Debug)]
pub struct Pair {
    pub role: Role,
    pub term: u64,
    /// `broker.peer_timeout_ms`: a peer silent this long is gone.
    dead_after: Duration,
    started: Instant,
    heard: Option<(Instant, Beat)>,
    /// Backup: it holds the active broker's history.
    pub following: bool,
    /// Active: the peer, following, said it holds everything up to [`Pair::seen`] ≥ what
    /// this broker had published.
    pub confirmed: bool,
    /// Active: the highest sequence number of this broker's run its peer said it holds.
    seen: u64,
    /// Active: when `seen` last rose.
    progress: Option<Instant>,
    /// Active: since when PULL is not read, for a joining backup to catch up.
    holding: Option<Instant>,
    /// Active: no new hold before this (the last one did not get the backup there).
    hold_again: Option<Instant>,
}

impl Pair {
    pub fn new(now: Instant, dead_after: Duration) -> Pair {
        Pair {
            role: Role::Backup,
            term: 0,
            dead_after,
            started: now,
            heard: None,
            following: false,
            confirmed: false,
            seen: 0,
            progress: None,
            holding: None,
            hold_again: None,
        }
    }

    /// The peer's last heartbeat, if it was heard within `broker.peer_timeout_ms`.
    pub fn peer(&self, now: Instant) -> Option<&Beat> {
        self.heard
            .as_ref()
            .filter(|(at, _)| now.duration_since(*at) < self.dead_after)
            .map(|(_, beat)| beat)
    }

    /// Whether an active peer was heard lately.
    pub fn peer_active(&self, now: Instant) -> bool {
        self.peer(now)
            .is_some_and(|beat| beat.state == Role::Active)
    }

    /// A backup may take over: no active peer heard for [`DEAD_AFTER`] (nor since it started).
    pub fn may_take_over(&self, now: Instant) -> bool {
        self.role == Role::Backup
            && !self.peer_active(now)
            && now.duration_since(self.started) >= self.dead_after
    }

    /// Becomes the active broker: the term after every term seen.
    pub fn take_over(&mut self) {
        let peer_term = self.heard.as_ref().map_or(0, |(_, beat)| beat.term);
        self.term = self.term.max(peer_term) + 1;
        self.role = Role::Active;
        self.following = false;
        self.confirmed = false;
        self.seen = 0;
        self.progress = None;
        self.holding = None;
    }

    /// Becomes the backup of the active peer (which outranks this broker).
    pub fn step_down(&mut self) {
        if let Some((_, beat)) = &self.heard {
            self.term = beat.term;
        }
        self.role = Role::Backup;
        self.following = false;
        self.confirmed = false;
    }

    /// A heartbeat from the peer. Returns whether this broker, active, must step down: the
    /// peer is active too and outranks it (`run`: this broker's).
    pub fn heard(&mut self, beat: Beat, run: u64, now: Instant) -> bool {
        let step_down = self.role == Role::Active
            && beat.state == Role::Active
            && beat.rank() > (self.term, &run.to_string());
        if self.role == Role::Backup && beat.state == Role::Active && beat.term > self.term {
            // A backup follows the active broker's term.
            self.term = beat.term;
        }
        if self.role == Role::Active && beat.state == Role::Backup && beat.term == self.term {
            // What a backup of this term holds of this broker's run.
            self.copied(beat.seq, now);
        }
        self.heard = Some((now, beat));
        step_down
    }

    /// Active: the peer holds this broker's messages up to `seq` (its heartbeat said so).
    fn copied(&mut self, seq: u64, now: Instant) {
        if self.role == Role::Active && seq > self.seen {
            self.seen = seq;
            self.progress = Some(now);
        }
    }

    /// Active: whether to stop reading PULL now (`published`: this broker's last sequence
    /// number): a following backup of this term not confirmed yet catches up meanwhile, for
    /// [`HOLD_AT_MOST`] at most; a confirmed one more than [`MAX_BACKUP_LAG`] behind (a burst
    /// faster than it copies), for as long as it makes progress (a backup that copied
    /// nothing for [`HOLD_AT_MOST`] is not waited for: it fetches what it missed).
    pub fn hold(&mut self, published: u64, now: Instant) -> bool {
        let term = self.term;
        if self.role == Role::Active
            && self.confirmed
            && published.saturating_sub(self.seen) > MAX_BACKUP_LAG
            && self
                .progress
                .is_some_and(|at| now.duration_since(at) < HOLD_AT_MOST)
            && self.peer(now).is_some_and(|beat| {
                beat.state == Role::Backup && beat.following && beat.term == term
            })
        {
            return true;
        }
        let joining = self.role == Role::Active
            && !self.confirmed
            && self.seen < published
            && self.peer(now).is_some_and(|beat| {
                beat.state == Role::Backup && beat.following && beat.term == term
            });
        if !joining {
            self.holding = None;
            return false;
        }
        match self.holding {
            Some(since) if now.duration_since(since) < HOLD_AT_MOST => true,
            Some(_) => {
                self.holding = None;
                self.hold_again = Some(now + self.dead_after);
                false
            }
            None if self.hold_again.is_none_or(|at| now >= at) => {
                self.holding = Some(now);
                true
            }
            None => false,
        }
    }

    /// Active: whether the peer is (still) a following backup holding all that was published
    /// (`published`: this broker's last sequence number). Returns `true` when this changes, so
    /// that the heartbeat saying it goes out at once.
    pub fn check_backup(&mut self, published: u64, now: Instant) -> bool {
        if self.role != Role::Active {
            return false;
        }
        let term = self.term;
        let following = self
            .peer(now)
            .is_some_and(|beat| beat.state == Role::Backup && beat.following && beat.term == term);
        let confirmed = if !following {
            false
        } else {
            // Once confirmed, it stays so while the peer follows: what it republishes lags by
            // what is in flight, and a node waits for it.
            self.confirmed || self.seen >= published
        };
        let changed = confirmed != self.confirmed;
        self.confirmed = confirmed;
        changed
    }

    /// This broker's heartbeat (`run`, `seq`: what it stamps, as active; what it holds of the
    /// active broker's run, as backup).
    pub fn beat(&self, run: u64, seq: u64) -> Beat {
        Beat {
            state: self.role,
            term: self.term,
            run: run.to_string(),
            seq,
            backup: self.role == Role::Active && self.confirmed,
            following: self.role == Role::Backup && self.following,
            timeout_ms: self.dead_after.as_millis() as u64,
        }
    }
}

/// What a broker's peer SUB socket brings.
#[derive(Debug)]
pub enum PeerFrame {
    /// (Re)connected: what was published meanwhile must be fetched.
    Connected,
    Frame(Bytes),
}

/// Owns a broker's SUB socket to its peer's PUB socket: connects (again, a few hundred
/// milliseconds after the peer goes away) and hands every one-part frame to the broker's task.
/// The channel is bounded: while the broker is busy, frames wait in the socket (whose own
/// bound drops them; the broker fetches what it missed from the peer's snapshot).
///
/// `everything`: whether the broker wants every frame (a backup copies them) or only the
/// heartbeats (an active broker: its peer's copies of its own messages would only cost it).
pub async fn run_peer_sub(
    addresses: Vec<String>,
    max_message_bytes: usize,
    frames: tokio::sync::mpsc::Sender<PeerFrame>,
    mut everything: tokio::sync::watch::Receiver<bool>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use zeromq::{Socket, SocketEvent, SocketRecv, SubSocket};
    let what = format!("SUB {} (broker.peer)", addresses.join(";"));
    let heartbeats = std::str::from_utf8(BEAT_PREFIX).expect("ASCII");
    loop {
        let all = *everything.borrow_and_update();
        let make = || {
            let mut socket =
                SubSocket::with_options(crate::socket::connect_options(max_message_bytes));
            // Subscribed before connecting: the crate sends it on every connection.
            let topic = if all { "" } else { heartbeats };
            let _ = futures_util::FutureExt::now_or_never(socket.subscribe(topic));
            socket
        };
        let Some(mut sub) = crate::socket::connect(make, &addresses, &what, &shutdown).await else {
            return;
        };
        let mut events = sub.monitor();
        if frames.send(PeerFrame::Connected).await.is_err() {
            return;
        }
        let mut all = all;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                Ok(()) = everything.changed() => {
                    let now = *everything.borrow_and_update();
                    if now != all {
                        // The new subscription first: no heartbeat falls between the two.
                        let (new, old) = if now { ("", heartbeats) } else { (heartbeats, "") };
                        let _ = sub.subscribe(new).await;
                        let _ = sub.unsubscribe(old).await;
                        all = now;
                    }
                }
                event = futures_util::StreamExt::next(&mut events) => match event {
                    Some(SocketEvent::Disconnected(_)) | None => break,
                    Some(_) => {}
                },
                received = sub.recv() => match received {
                    Ok(message) if message.len() == 1 => {
                        let frame = message.into_vec().pop().expect("one frame");
                        if frames.send(PeerFrame::Frame(frame)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(socket = %what, %error, "peer SUB socket failed; reconnecting");
                        break;
                    }
                },
            }
        }
        tracing::warn!(socket = %what, "the peer broker went away; reconnecting");
    }
}

/// A web node's view of the two brokers (`event.failover`), by their place in the lists.
pub struct Brokers {
    views: Mutex<Vec<Option<(Instant, Beat)>>>,
    /// The broker whose frames the node delivers (`None`: none yet, or stalled).
    source: tokio::sync::watch::Sender<Option<usize>>,
    /// The broker the node pushes to.
    target: tokio::sync::watch::Sender<usize>,
    /// The active broker as last decided.
    active: Mutex<Option<(usize, u64)>>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// What a node makes of the heartbeats it heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub source: Option<usize>,
    pub active: Option<usize>,
    pub target: usize,
}

/// Decides where a node reads and pushes from what it heard (`views`, by place), what it did
/// so far (`source`, `target`).
pub fn decide(
    views: &[Option<(Instant, Beat)>],
    now: Instant,
    source: Option<usize>,
    target: usize,
) -> Decision {
    // Each broker is judged by the silence its own heartbeat allows.
    let alive = |i: usize| -> Option<&Beat> {
        views[i]
            .as_ref()
            .filter(|(at, beat)| now.duration_since(*at) < beat.timeout())
            .map(|(_, beat)| beat)
    };
    let active = (0..views.len())
        .filter_map(|i| alive(i).filter(|b| b.state == Role::Active).map(|b| (i, b)))
        .max_by(|(_, a), (_, b)| a.rank().cmp(&b.rank()))
        .map(|(i, _)| i);
    match active {
        Some(a) => {
            let beat = alive(a).expect("alive");
            let source = if beat.backup {
                // Only what the backup holds is delivered; a node that cannot hear it waits.
                (0..views.len()).find(|&i| {
                    i != a
                        && alive(i).is_some_and(|b| {
                            b.state == Role::Backup && b.following && b.term == beat.term
                        })
                })
            } else {
                Some(a)
            };
            Decision {
                source,
                active: Some(a),
                target: a,
            }
        }
        None => {
            // No active broker: push where a message can make a backup take over: one that
            // holds the history (a following backup), else the current one if heard, else any
            // heard (a broker restarted a moment ago must not win over the one that kept up).
            let target = (0..views.len())
                .find(|&i| alive(i).is_some_and(|b| b.following))
                .or_else(|| alive(target).is_some().then_some(target))
                .or_else(|| (0..views.len()).find(|&i| alive(i).is_some()))
                .unwrap_or(target);
            Decision {
                source,
                active: None,
                target,
            }
        }
    }
}

impl Brokers {
    /// Nothing heard yet, `count` brokers: push to the first.
    pub fn new(count: usize, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Brokers {
        metrics.active_broker.set(-1);
        Brokers {
            views: Mutex::new(vec![None; count]),
            source: tokio::sync::watch::Sender::new(None),
            target: tokio::sync::watch::Sender::new(0),
            active: Mutex::new(None),
            metrics,
        }
    }

    /// Decides again every [`BEAT_INTERVAL`] (a broker that goes silent sends nothing to say
    /// so) until shutdown.
    pub async fn run(self: std::sync::Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut ticks = tokio::time::interval(BEAT_INTERVAL);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {
                    self.tick();
                }
            }
        }
    }

    /// The broker whose frames are delivered, and its changes.
    pub fn source(&self) -> tokio::sync::watch::Receiver<Option<usize>> {
        self.source.subscribe()
    }

    /// The broker to push to, and its changes.
    pub fn target(&self) -> tokio::sync::watch::Receiver<usize> {
        self.target.subscribe()
    }

    /// Whether `index` is the source now.
    pub fn is_source(&self, index: usize) -> bool {
        *self.source.borrow() == Some(index)
    }

    /// A heartbeat frame from the broker at `index`. Returns whether the active broker changed
    /// (a failover).
    pub fn heard(&self, index: usize, frame: &[u8]) -> bool {
        let Some(beat) = Beat::read(frame) else {
            return false;
        };
        let now = Instant::now();
        let mut views = crate::error::lock(&self.views);
        if let Some(view) = views.get_mut(index) {
            *view = Some((now, beat));
        }
        self.apply(&views, now)
    }

    /// Decides again (a broker may have gone silent). Returns whether the active broker changed.
    pub fn tick(&self) -> bool {
        let views = crate::error::lock(&self.views);
        self.apply(&views, Instant::now())
    }

    fn apply(&self, views: &[Option<(Instant, Beat)>], now: Instant) -> bool {
        let decision = decide(views, now, *self.source.borrow(), *self.target.borrow());
        self.source.send_if_modified(|source| {
            let changed = *source != decision.source;
            *source = decision.source;
            changed
        });
        self.target.send_if_modified(|target| {
            let changed = *target != decision.target;
            *target = decision.target;
            changed
        });
        let Some(active) = decision.active else {
            self.metrics.active_broker.set(-1);
            return false;
        };
        self.metrics.active_broker.set(active as i64);
        let term = views[active].as_ref().map_or(0, |(_, beat)| beat.term);
        let mut last = crate::error::lock(&self.active);
        let changed = last.is_some_and(|(index, old)| index != active || old != term);
        *last = Some((active, term));
        if changed {
            self.metrics.failovers.inc();
            tracing::warn!(active, term, "the active broker changed");
        }
        changed
    }

    /// The active broker's place, if one is heard.
    pub fn active(&self) -> Option<usize> {
        let views = crate::error::lock(&self.views);
        decide(&views, Instant::now(), None, 0).active
    }

    /// Each broker's last heartbeat and how long ago it came, by place.
    pub fn views(&self) -> Vec<Option<(Duration, Beat)>> {
        let now = Instant::now();
        crate::error::lock(&self.views)
            .iter()
            .map(|view| {
                view.as_ref()
                    .map(|(at, beat)| (now.duration_since(*at), beat.clone()))
            })
            .collect()
    }

    /// Each broker as `/health` and the console show it: its address (from `addresses`, in
    /// the same order), its state (`active`, `backup`, or `silent` when its heartbeat is late)
    /// and term, and how long ago it was heard.
    pub fn describe(&self, addresses: &[String]) -> serde_json::Value {
        self.views()
            .into_iter()
            .zip(addresses)
            .map(|(view, address)| match view {
                Some((ago, beat)) if ago < beat.timeout() => serde_json::json!({
                    "address": address,
                    "state": beat.state.as_str(),
                    "term": beat.term,
                    "heard_ms_ago": ago.as_millis() as u64,
                }),
                _ => serde_json::json!({ "address": address, "state": "silent" }),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(state: Role, term: u64, backup: bool, following: bool) -> Beat {
        Beat {
            state,
            term,
            run: "1".into(),
            seq: 0,
            backup,
            following,
            timeout_ms: 1000,
        }
    }

    #[test]
    fn heartbeats_read_back() {
        let b = beat(Role::Active, 3, true, false);
        let frame = b.frame();
        assert!(frame.starts_with(BEAT_PREFIX));
        assert_eq!(Beat::read(&frame), Some(b));
        assert_eq!(Beat::read(b"{\"from\":\"a\"}"), None);
        assert_eq!(Beat::read(b"{\"broker\":42}"), None);
    }

    #[test]
    fn a_node_reads_the_backup_only_while_the_active_broker_says_it_holds_everything() {
        let now = Instant::now();
        let heard = |b: Beat| Some((now, b));
        // Active without a confirmed backup: read and push the active one.
        let views = [
            heard(beat(Role::Active, 1, false, false)),
            heard(beat(Role::Backup, 1, false, true)),
        ];
        let d = decide(&views, now, None, 0);
        assert_eq!((d.source, d.active, d.target), (Some(0), Some(0), 0));
        // Confirmed: read the backup, push the active one.
        let views = [
            heard(beat(Role::Active, 1, true, false)),
            heard(beat(Role::Backup, 1, false, true)),
        ];
        let d = decide(&views, now, Some(0), 0);
        assert_eq!((d.source, d.active, d.target), (Some(1), Some(0), 0));
        // Confirmed but the backup is not heard here: nothing is delivered (it would not be
        // on the backup).
        let views = [heard(beat(Role::Active, 1, true, false)), None];
        let d = decide(&views, now, Some(1), 0);
        assert_eq!(d.source, None);
        // The active one gone silent: the source stays, pushes go to the one still heard.
        let old = now - DEAD_AFTER;
        let views = [
            Some((old, beat(Role::Active, 1, true, false))),
            heard(beat(Role::Backup, 1, false, true)),
        ];
        let d = decide(&views, now, Some(1), 0);
        assert_eq!((d.source, d.active, d.target), (Some(1), None, 1));
        // No active one, a fresh broker (the current target) and a following backup: the
        // vote goes to the one that holds the history.
        let views = [
            heard(beat(Role::Backup, 1, false, false)),
            heard(beat(Role::Backup, 1, false, true)),
        ];
        let d = decide(&views, now, Some(1), 0);
        assert_eq!((d.active, d.target), (None, 1));
        // Two active (a split brain): the higher term.
        let views = [
            heard(beat(Role::Active, 1, false, false)),
            heard(beat(Role::Active, 2, false, false)),
        ];
        let d = decide(&views, now, Some(0), 0);
        assert_eq!((d.source, d.active, d.target), (Some(1), Some(1), 1));
    }

    #[test]
    fn a_backup_takes_over_only_without_an_active_peer_and_the_lower_term_steps_down() {
        let start = Instant::now();
        let mut pair = Pair::new(start, DEAD_AFTER);
        assert!(!pair.may_take_over(start), "not before DEAD_AFTER");
        let later = start + DEAD_AFTER;
        assert!(pair.may_take_over(later));
        assert!(!pair.heard(beat(Role::Active, 4, false, false), 1, later));
        assert_eq!(pair.term, 4, "a backup follows the active term");
        assert!(!pair.may_take_over(later));
        let silent = later + DEAD_AFTER;
        assert!(pair.may_take_over(silent));
        pair.take_over();
        assert_eq!((pair.role, pair.term), (Role::Active, 5));
        // The old active one comes back with its lower term: it is the one to step down.
        assert!(!pair.heard(beat(Role::Active, 4, false, false), 1, silent));
        // A higher term heard: this one steps down.
        assert!(pair.heard(beat(Role::Active, 6, false, false), 1, silent));
        pair.step_down();
        assert_eq!((pair.role, pair.term), (Role::Backup, 6));
    }

    #[test]
    fn the_backup_is_confirmed_once_it_holds_everything() {
        let now = Instant::now();
        let mut pair = Pair::new(now - DEAD_AFTER, DEAD_AFTER);
        pair.take_over();
        let term = pair.term;
        pair.heard(beat(Role::Backup, term, false, true), 7, now);
        assert!(!pair.check_backup(5, now), "it holds nothing yet");
        // PULL waits for it, at most HOLD_AT_MOST, then not again for a while.
        assert!(pair.hold(5, now));
        assert!(pair.hold(5, now + HOLD_AT_MOST / 2));
        assert!(!pair.hold(5, now + HOLD_AT_MOST));
        assert!(!pair.hold(5, now + HOLD_AT_MOST + DEAD_AFTER / 2));
        let mut holds = beat(Role::Backup, term, false, true);
        holds.seq = 5;
        pair.heard(holds, 7, now);
        assert!(pair.check_backup(5, now));
        assert!(!pair.hold(5, now), "confirmed: nothing to wait for");
        assert!(pair.beat(7, 5).backup);
        // It stays confirmed while it follows, even while it lags.
        assert!(!pair.check_backup(9, now));
        // Silent: not a backup any more.
        assert!(pair.check_backup(9, now + DEAD_AFTER));
        assert!(!pair.beat(7, 9).backup);
    }

    #[test]
    fn a_confirmed_backup_far_behind_is_waited_for_while_it_copies() {
        let now = Instant::now();
        let mut pair = Pair::new(now - DEAD_AFTER, DEAD_AFTER);
        pair.take_over();
        let term = pair.term;
        let mut holds = beat(Role::Backup, term, false, true);
        holds.seq = 10;
        pair.heard(holds, 7, now);
        assert!(pair.check_backup(10, now), "confirmed");
        // Within the lag PULL is read; past it, it waits while the backup copies.
        assert!(!pair.hold(10 + MAX_BACKUP_LAG, now));
        let far = 11 + MAX_BACKUP_LAG;
        assert!(pair.hold(far, now));
        let later = now + HOLD_AT_MOST / 2;
        pair.copied(20, later);
        assert!(pair.hold(far + 10, later + HOLD_AT_MOST / 2));
        // Caught up to within the lag: read again.
        pair.copied(far + 10 - MAX_BACKUP_LAG, later + HOLD_AT_MOST / 2);
        assert!(!pair.hold(far + 10, later + HOLD_AT_MOST / 2));
        // A backup that copies nothing for HOLD_AT_MOST (heard all the same) is not waited
        // for: it fetches what it misses.
        let stuck = later + HOLD_AT_MOST / 2 + HOLD_AT_MOST;
        pair.heard(beat(Role::Backup, term, false, true), 7, stuck);
        assert!(!pair.hold(far + 10 + MAX_BACKUP_LAG + 1, stuck));
        // Once it copies again, it is.
        pair.copied(far + 11, stuck);
        assert!(pair.hold(far + 12 + MAX_BACKUP_LAG, stuck));
        // Not a copy of a broker that is not active.
        pair.step_down();
        pair.copied(far + 100, stuck);
        assert!(!pair.hold(far + 100 + 2 * MAX_BACKUP_LAG, stuck));
    }
}
