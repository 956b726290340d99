//! Acknowledgements: how a web node learns what became of each message it sent.
//!
//! The node tags each message with a secret reference ([`Acks::register`]); the hub, which
//! reads everything the broker publishes, hands each reference it sees back
//! ([`Acks::resolve`]): published, refused by a script (with its reason and status), or
//! published already (a repeated idempotency key). A POST waits on its [`Registration`], and
//! dropping it (answered, timed out, client gone) forgets the reference.
//!
//! Each registration has a deadline, and one task keeps them all ([`Acks::register`] starts
//! it): it answers [`Ack::Expired`] to a message the broker has not confirmed by then. A POST
//! thus waits on its outcome alone, without a timer of its own (one put into tokio's timer
//! wheel and taken out again for every message; BENCHMARKS.md, "What a POST's wait for its
//! confirmation costs").

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use rand::RngExt;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

/// What became of a message a node sent, as reported back by the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ack {
    /// Published, with its id when the broker gave one.
    Published(Option<crate::wire::MsgId>),
    Rejected {
        reason: String,
        status: u16,
    },
    /// No word from the broker by the registration's deadline (given by this node's deadline
    /// task, not by the broker): the message may still be published later.
    Expired,
}

/// Messages this node sent and still waits for, by reference. A reference is
/// `<node>-<secret>`: a random node id, so that each node recognises its own messages among
/// those every node receives, and 128 random bits per message, so that nobody can guess the
/// reference of another sender's next message and forge its outcome. References are never
/// sent to browsers.
pub struct Acks {
    node: String,
    pending: Mutex<Pending>,
    /// Wakes the deadline task: a deadline sooner than the one it sleeps until, or this
    /// dropped.
    queued: Arc<Notify>,
    /// Whether the deadline task was started (by the first registration).
    started: AtomicBool,
}

/// The messages waiting, and their deadlines.
#[derive(Default)]
struct Pending {
    /// By secret. Hashed with ahash (randomly keyed, as std's SipHash, about a tenth of its
    /// work for a `u128`: a message is looked up here four times).
    waiting: HashMap<u128, oneshot::Sender<Ack>, ahash::RandomState>,
    /// Each registration's deadline, earliest first. An entry whose message is no longer
    /// waiting (resolved, or its POST gone) is dropped when it comes first: by the next
    /// registration or the deadline task. Bounded by the messages registered within one
    /// `message.publish_timeout_ms`.
    deadlines: BinaryHeap<Reverse<(Instant, u128)>>,
    /// When the deadline task wakes next (`None`: it waits for a registration). A registration
    /// with an earlier deadline wakes it; the others wait for it to come round, so that a light
    /// load wakes it about once per `message.publish_timeout_ms`, not once per message.
    armed: Option<Instant>,
}

impl Pending {
    /// Drops the first deadlines of messages no longer waiting; expires, at `now`, those
    /// past; returns the first deadline still to come.
    fn expire(&mut self, now: Option<Instant>) -> Option<Instant> {
        while let Some(&Reverse((deadline, secret))) = self.deadlines.peek() {
            if self.waiting.contains_key(&secret) {
                if now.is_none_or(|now| deadline > now) {
                    return Some(deadline);
                }
                if let Some(waiter) = self.waiting.remove(&secret) {
                    let _ = waiter.send(Ack::Expired);
                }
            }
            self.deadlines.pop();
        }
        None
    }
}

impl Default for Acks {
    fn default() -> Self {
        Acks {
            node: format!("{:016x}", rand::rng().random::<u64>()),
            pending: Mutex::new(Pending::default()),
            queued: Arc::new(Notify::new()),
            started: AtomicBool::new(false),
        }
    }
}

impl Drop for Acks {
    fn drop(&mut self) {
        // The deadline task sees that this is gone, and ends.
        self.queued.notify_one();
    }
}

impl Acks {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A new reference to tag a message with, and where its outcome will arrive:
    /// [`Ack::Expired`] at `deadline` if the broker has not answered by then. Dropping the
    /// registration (the request answered, or its client went away) forgets it. Starts the
    /// deadline task on the first call made in a tokio runtime, in that runtime.
    pub fn register(self: &Arc<Self>, deadline: Instant) -> Registration {
        if !self.started.load(Ordering::Relaxed)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
            && !self.started.swap(true, Ordering::Relaxed)
        {
            runtime.spawn(keep_deadlines(Arc::downgrade(self), self.queued.clone()));
        }
        let (tx, rx) = oneshot::channel();
        let mut pending = self.lock();
        pending.expire(None);
        let secret = loop {
            let secret = rand::rng().random::<u128>();
            if !pending.waiting.contains_key(&secret) {
                break secret;
            }
        };
        pending.waiting.insert(secret, tx);
        pending.deadlines.push(Reverse((deadline, secret)));
        let sooner = pending.armed.is_none_or(|armed| deadline < armed);
        if sooner {
            pending.armed = Some(deadline);
        }
        drop(pending);
        if sooner {
            self.queued.notify_one();
        }
        // `<node>-<secret as 32 hex digits>`, without `fmt` (this is per message).
        let mut reference = String::with_capacity(self.node.len() + 33);
        reference.push_str(&self.node);
        reference.push('-');
        let mut digits = [0u8; 32];
        hex::encode_to_slice(secret.to_be_bytes(), &mut digits).expect("16 bytes, 32 digits");
        reference.push_str(std::str::from_utf8(&digits).expect("hex digits are ASCII"));
        Registration {
            reference,
            outcome: rx,
            acks: self.clone(),
            key: secret,
        }
    }

    /// Delivers the outcome of a message, if it is one of this node's.
    pub fn resolve(&self, reference: &str, ack: Ack) {
        let Some(dash) = memchr::memrchr(b'-', reference.as_bytes()) else {
            return;
        };
        let (node, secret) = (&reference[..dash], &reference[dash + 1..]);
        if node != self.node || secret.len() != 32 {
            return;
        }
        let mut bytes = [0u8; 16];
        if hex::decode_to_slice(secret, &mut bytes).is_err() {
            return;
        }
        let secret = u128::from_be_bytes(bytes);
        if let Some(tx) = self.lock().waiting.remove(&secret) {
            let _ = tx.send(ack);
        }
    }

    fn forget(&self, secret: u128) {
        self.lock().waiting.remove(&secret);
    }

    /// Messages still waiting for their outcome.
    pub fn pending(&self) -> usize {
        self.lock().waiting.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        crate::error::lock(&self.pending)
    }
}

/// The deadline task: expires the registrations whose deadline passed, sleeping until the
/// next one, or until a registration comes with a sooner deadline (or the first, when none
/// waits). Ends when the [`Acks`] is dropped.
async fn keep_deadlines(acks: Weak<Acks>, queued: Arc<Notify>) {
    loop {
        let next = match acks.upgrade() {
            Some(acks) => {
                let mut pending = acks.lock();
                let next = pending.expire(Some(Instant::now()));
                pending.armed = next;
                next
            }
            None => return,
        };
        match next {
            Some(deadline) => tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                () = queued.notified() => {}
            },
            None => queued.notified().await,
        }
    }
}

/// A message this node waits for; see [`Acks::register`].
pub struct Registration {
    /// The `ref` to send with the message.
    pub reference: String,
    /// Where its outcome arrives.
    pub outcome: oneshot::Receiver<Ack>,
    acks: Arc<Acks>,
    key: u128,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.acks.forget(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn acks_resolve_only_this_nodes_messages() {
        let acks = Acks::new();
        let mut registration = acks.register(Instant::now() + std::time::Duration::from_secs(60));
        acks.resolve("0000000000000000-1", Ack::Published(None));
        assert_eq!(acks.pending(), 1, "another node's reference is ignored");
        let rejected = Ack::Rejected {
            reason: "no".into(),
            status: 429,
        };
        acks.resolve(&registration.reference, rejected.clone());
        assert_eq!(acks.pending(), 0);
        assert_eq!((&mut registration.outcome).await.unwrap(), rejected);
        // A request that gives up (or whose client goes away) leaves nothing behind.
        let abandoned = acks.register(Instant::now() + std::time::Duration::from_secs(60));
        assert_eq!(acks.pending(), 1);
        drop(abandoned);
        assert_eq!(acks.pending(), 0);
        acks.resolve("garbage", Ack::Published(None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_not_confirmed_by_its_deadline_is_told_so_by_the_deadline_task() {
        use std::time::Duration;
        let acks = Acks::new();
        let start = Instant::now();
        let mut late = acks.register(start + Duration::from_secs(10));
        assert_eq!(acks.lock().armed, Some(start + Duration::from_secs(10)));
        // A sooner deadline wakes the task, which sleeps until it instead.
        let mut soon = acks.register(start + Duration::from_secs(1));
        assert_eq!(acks.lock().armed, Some(start + Duration::from_secs(1)));
        tokio::time::sleep_until(start + Duration::from_millis(999)).await;
        assert!(soon.outcome.try_recv().is_err(), "not before its deadline");
        assert_eq!(
            tokio::time::timeout_at(start + Duration::from_secs(2), &mut soon.outcome)
                .await
                .expect("expired at its deadline"),
            Ok(Ack::Expired)
        );
        assert_eq!(Instant::now(), start + Duration::from_secs(1));
        assert_eq!(acks.pending(), 1, "the other still waits");
        assert_eq!(acks.lock().armed, Some(start + Duration::from_secs(10)));
        // Confirmed in time: the broker's answer, and no `Expired` after it.
        acks.resolve(&late.reference, Ack::Published(None));
        assert_eq!((&mut late.outcome).await, Ok(Ack::Published(None)));
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(acks.pending(), 0);
        assert_eq!(acks.lock().armed, None, "nothing left to wait for");
        // The task ends with the acks.
        let queued = acks.queued.clone();
        drop((late, soon, acks));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(Arc::strong_count(&queued), 1, "the deadline task ended");
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_of_answered_messages_do_not_pile_up_nor_wake_the_task() {
        use std::time::Duration;
        let acks = Acks::new();
        let start = Instant::now();
        for n in 0..1000u64 {
            let registration = acks.register(start + Duration::from_millis(5_000 + n));
            acks.resolve(&registration.reference, Ack::Published(None));
            assert!(acks.lock().deadlines.len() <= 1, "message {n}");
            // Later deadlines leave the task asleep until the first one it was given.
            assert_eq!(
                acks.lock().armed,
                Some(start + Duration::from_millis(5_000))
            );
        }
        // A POST that gave up (its client gone) leaves nothing either.
        drop(acks.register(start + Duration::from_secs(6)));
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert_eq!(acks.pending(), 0);
        assert_eq!(acks.lock().deadlines.len(), 0);
        assert_eq!(acks.lock().armed, None);
    }

    #[tokio::test]
    async fn a_reference_is_the_node_and_32_hex_digits_and_only_its_own_resolves_it() {
        let acks = Acks::new();
        let mut registration = acks.register(Instant::now() + std::time::Duration::from_secs(60));
        let reference = registration.reference.clone();
        let (node, secret) = reference.rsplit_once('-').unwrap();
        assert_eq!(node, acks.node);
        assert_eq!(secret.len(), 32);
        assert!(
            secret
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(u128::from_str_radix(secret, 16).unwrap(), registration.key);
        // One digit changed, one digit short, or not hex: not this message.
        let mut other = secret.to_owned().into_bytes();
        other[31] = if other[31] == b'0' { b'1' } else { b'0' };
        for forged in [
            String::from_utf8(other).unwrap(),
            secret[1..].to_owned(),
            format!("{}g", &secret[1..]),
        ] {
            acks.resolve(&format!("{node}-{forged}"), Ack::Published(None));
        }
        assert_eq!(acks.pending(), 1, "only the exact reference resolves it");
        acks.resolve(&reference, Ack::Published(None));
        assert_eq!(
            (&mut registration.outcome).await.unwrap(),
            Ack::Published(None)
        );
    }
}
