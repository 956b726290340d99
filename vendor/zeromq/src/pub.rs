use crate::codec::*;
use crate::endpoint::Endpoint;
use crate::error::ZmqResult;
use crate::message::*;
use crate::transport::AcceptStopHandle;
use crate::util::PeerIdentity;
use crate::write_queue::WRITE_BATCH_LIMIT;
use crate::{async_rt, CaptureSocket, SocketOptions};
use crate::{MultiPeerBackend, Socket, SocketBackend, SocketEvent, SocketSend, SocketType};

use async_trait::async_trait;
use bytes::Bytes;
use futures::channel::{mpsc, oneshot};
use futures::{select, FutureExt, StreamExt};
use parking_lot::Mutex;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PUB_SEND_QUEUE_CAPACITY: usize = 100_000;
type PubSendQueue = mpsc::Sender<PubItem>;

// PATCH(temma): what a subscriber's writer takes from its queue: one message (`send`,
// `send_now`), or the messages of one `send_batch_now` in order (one queue item, one wake-up
// of the writer, for all of them).
#[derive(Debug)]
pub(crate) enum PubItem {
    One(ZmqMessage),
    Many(Vec<ZmqMessage>),
}

impl PubItem {
    fn len(&self) -> usize {
        match self {
            PubItem::One(_) => 1,
            PubItem::Many(messages) => messages.len(),
        }
    }
}

fn subscription_matches(subscriptions: &[Vec<u8>], first_frame: &Bytes) -> bool {
    // Single-subscription PUB fanout is common, so keep its comparison shape unchanged.
    // Only use first-byte filtering for multiple subscriptions, where it avoids extra scans.
    if subscriptions.len() <= 1 {
        return subscriptions.iter().any(|sub_filter| {
            // PATCH(temma): the empty prefix (subscribed to everything) matches without a
            // comparison: `memcmp` of zero bytes from an empty `Vec`'s dangling pointer made
            // glibc's AVX-512 variant do a masked load of an unmapped address, which the CPU
            // completes with a microcode assist: about 70 ns per message and subscriber, 8 %
            // of temma's broker when it only relays.
            sub_filter.is_empty()
                || (sub_filter.len() <= first_frame.len()
                    && sub_filter.as_slice() == &first_frame[0..sub_filter.len()])
        });
    }

    let first_byte = first_frame.first().copied();
    subscriptions
        .iter()
        .any(|sub_filter| match sub_filter.first().copied() {
            Some(prefix_first) if Some(prefix_first) != first_byte => false,
            _ => {
                // PATCH(temma): as above.
                sub_filter.is_empty()
                    || (sub_filter.len() <= first_frame.len()
                        && sub_filter.as_slice() == &first_frame[0..sub_filter.len()])
            }
        })
}

// PATCH(temma): the subscriber's own queue, not a clone of it (a clone allocated and was
// dropped for every message and subscriber).
// PATCH(temma): the message itself, not a reference to clone (see `fanout_message`).
// PATCH(temma): counted in the subscriber's `depth` (before the send: its writer may take the
// message at once).
// PATCH(temma): a queue item (see `PubItem`), counted as the messages it holds.
fn send_to_subscriber(send_queue: &mut PubSendQueue, depth: &QueueDepth, item: PubItem) {
    let count = item.len();
    depth.queued.fetch_add(count, Ordering::Relaxed);
    match send_queue.try_send(item) {
        Ok(()) => {}
        Err(error) if error.is_full() => {
            depth.queued.fetch_sub(count, Ordering::Relaxed);
            // PUB drops messages for slow subscribers so one full queue does not backpressure all publishers.
            drop(error.into_inner());
        }
        Err(error) => {
            depth.queued.fetch_sub(count, Ordering::Relaxed);
            // The writer task owns transport error detection and subscriber cleanup.
            // A closed local queue is treated as a dropped PUB message on this send path.
            drop(error.into_inner());
        }
    }
}

pub(crate) struct Subscriber {
    pub(crate) subscriptions: Vec<Vec<u8>>,
    pub(crate) send_queue: PubSendQueue,
    pub(crate) _subscription_coro_stop: oneshot::Sender<()>,
    // PATCH(temma): how far behind it is (`PubSocket::fullest_draining_queue`).
    pub(crate) depth: Arc<QueueDepth>,
}

// PATCH(temma): a subscriber's queue as its writer drains it.
#[derive(Debug, Default)]
pub(crate) struct QueueDepth {
    // Messages put in the queue, and taken from it by the writer (queued: the difference).
    queued: AtomicUsize,
    taken: AtomicU64,
    // What `fullest_draining_queue` last saw of `taken`, and when it last saw it move:
    // milliseconds since the socket was made, plus one (0: never).
    seen: AtomicU64,
    moved_at: AtomicU64,
}

// PATCH(temma): `write_message_queue`, counting what the writer takes in `depth`, and
// writing a `PubItem::Many`'s messages in order (a flush after `WRITE_BATCH_LIMIT` messages
// or fewer, as before).
async fn write_pub_queue(
    mut queue_receiver: mpsc::Receiver<PubItem>,
    mut send_queue: ZmqFramedWrite,
    depth: Arc<QueueDepth>,
) -> CodecResult<()> {
    use futures::SinkExt;
    let take = |depth: &QueueDepth, count: usize| {
        depth.queued.fetch_sub(count, Ordering::Relaxed);
        // This task alone writes it.
        let taken = depth.taken.load(Ordering::Relaxed);
        depth.taken.store(taken + count as u64, Ordering::Relaxed);
    };
    while let Some(mut item) = queue_receiver.next().await {
        let mut fed = 0;
        loop {
            let count = item.len();
            take(&depth, count);
            match item {
                PubItem::One(message) => send_queue.feed(Message::Message(message)).await?,
                PubItem::Many(messages) => {
                    for message in messages {
                        send_queue.feed(Message::Message(message)).await?;
                    }
                }
            }
            fed += count;
            if fed >= WRITE_BATCH_LIMIT {
                break;
            }
            let Ok(next) = queue_receiver.try_recv() else {
                break;
            };
            item = next;
        }
        send_queue.flush().await?;
    }
    Ok(())
}

pub(crate) struct PubSocketBackend {
    pub(crate) subscribers: scc::HashMap<PeerIdentity, Subscriber>,
    // PATCH(temma): when the socket was made (`QueueDepth::moved_at` counts from it).
    pub(crate) epoch: Instant,
    pub(crate) subscriber_count: AtomicUsize,
    pub(crate) socket_monitor: Mutex<Option<mpsc::Sender<SocketEvent>>>,
    pub(crate) socket_options: Arc<SocketOptions>,
}

impl PubSocketBackend {
    // PATCH(temma): called by `send` itself, and it does not wait: each subscriber's bucket
    // is locked in turn only to put the message in its queue (`try_send`, dropped when full,
    // as before). `send` used to push the message into a queue of 100,000 (a message was
    // dropped for every subscriber when it was full) for a task that walked the subscribers
    // with async iteration and a clone of each queue: a wake-up, a task and two allocations
    // per message, about a fifth of temma's broker when it only relays. Not `async`: it
    // waits for nothing (see `PubSocket::send_now`).
    //
    // PATCH(temma): with one subscriber (a broker and its web node), the message itself goes
    // to its queue, not a copy: a copy is a `VecDeque` allocated, and dropped by the writer,
    // per message. A subscriber that connects meanwhile has no subscription yet: it would
    // not have had this message.
    //
    // PATCH(temma): a subscriber that holds `queue_bound` messages misses it, whatever
    // `send_batch_now` queued (its items hold several messages each).
    pub(crate) fn fanout_message(&self, message: ZmqMessage) {
        let lone = self.subscriber_count.load(Ordering::Relaxed) == 1;
        let bound = self.queue_bound();
        let mut message = Some(message);
        self.subscribers.iter_mut_sync(|mut subscriber| {
            let Some(first_frame) = message.as_ref().and_then(|message| message.get(0)) else {
                // Given to the lone subscriber already.
                return false;
            };
            if subscription_matches(&subscriber.subscriptions, first_frame)
                && subscriber.depth.queued.load(Ordering::Relaxed) < bound
            {
                let message = if lone {
                    message.take()
                } else {
                    message.clone()
                };
                if let Some(message) = message {
                    let subscriber = &mut *subscriber;
                    send_to_subscriber(
                        &mut subscriber.send_queue,
                        &subscriber.depth,
                        PubItem::One(message),
                    );
                }
            }
            true
        });
    }

    // PATCH(temma): the most messages a subscriber's queue holds: the bound `try_send` keeps
    // for a queue of single messages (its capacity, plus the slot its sender is guaranteed),
    // counted in messages (`QueueDepth`) since `send_batch_now`'s items hold several.
    fn queue_bound(&self) -> usize {
        self.socket_options
            .send_queue_capacity
            .unwrap_or(PUB_SEND_QUEUE_CAPACITY)
            + 1
    }

    // PATCH(temma): `fanout_message` for several messages at once (`PubSocket::send_batch_now`):
    // the subscribers walked once, and each given one queue item holding the messages it
    // subscribed to, in order (the batch itself for a lone subscriber that takes them all),
    // as many as its queue has room for (the newest dropped past it, as `fanout_message`
    // drops a message that does not fit). Per message, `fanout_message` locks each
    // subscriber's bucket, counts, allocates a queue node and may wake the writer: a broker
    // relaying a million messages a second paid that for every one.
    pub(crate) fn fanout_batch(&self, messages: Vec<ZmqMessage>) {
        let lone = self.subscriber_count.load(Ordering::Relaxed) == 1;
        let bound = self.queue_bound();
        let mut messages = Some(messages);
        self.subscribers.iter_mut_sync(|mut subscriber| {
            let Some(all) = messages.as_ref() else {
                // Given to the lone subscriber already.
                return false;
            };
            let subscriber = &mut *subscriber;
            let room = bound.saturating_sub(subscriber.depth.queued.load(Ordering::Relaxed));
            if room == 0 {
                return true;
            }
            let everything = subscriber.subscriptions.iter().any(Vec::is_empty);
            let batch = if everything && lone {
                let mut batch = messages.take().unwrap_or_default();
                batch.truncate(room);
                batch
            } else {
                all.iter()
                    .filter(|message| {
                        everything
                            || message.get(0).is_some_and(|first| {
                                subscription_matches(&subscriber.subscriptions, first)
                            })
                    })
                    .take(room)
                    .cloned()
                    .collect()
            };
            if !batch.is_empty() {
                send_to_subscriber(
                    &mut subscriber.send_queue,
                    &subscriber.depth,
                    PubItem::Many(batch),
                );
            }
            true
        });
    }

    // PATCH(temma): returns false when the peer went past `max_subscriptions` (to be
    // disconnected).
    fn message_received(&self, peer_id: &PeerIdentity, message: Message) -> bool {
        let data = match message {
            Message::Message(m) => {
                if m.len() != 1 {
                    log::warn!("Received message with unexpected length: {}", m.len());
                    return true;
                }
                m.into_vec().pop().unwrap_or_default()
            }
            _ => return true,
        };

        if data.is_empty() {
            return true;
        }

        match data.first() {
            Some(1) => {
                // Subscribe
                if let Some(mut entry) = self.subscribers.get_sync(peer_id) {
                    // PATCH(temma): every subscription is a copy kept until it is cancelled
                    // and compared with every message sent: without a bound, one peer
                    // subscribing in a loop grew memory and the cost of each send for ever.
                    if let Some(max) = self.socket_options.max_subscriptions {
                        if entry.subscriptions.len() >= max {
                            log::warn!(
                                "Subscriber {:?} went past {} subscriptions; disconnecting it",
                                peer_id,
                                max
                            );
                            return false;
                        }
                    }
                    entry.subscriptions.push(Vec::from(&data[1..]));
                }
            }
            Some(0) => {
                // Unsubscribe
                let sub = Vec::from(&data[1..]);
                if let Some(mut entry) = self.subscribers.get_sync(peer_id) {
                    if let Some(index) = entry.subscriptions.iter().position(|s| s == &sub) {
                        entry.subscriptions.remove(index);
                    }
                }
            }
            _ => log::warn!(
                "Received message with unexpected first byte: {:?}",
                data.first()
            ),
        }
        true
    }
}

impl SocketBackend for PubSocketBackend {
    fn socket_type(&self) -> SocketType {
        SocketType::PUB
    }

    fn socket_options(&self) -> &Arc<SocketOptions> {
        &self.socket_options
    }

    fn shutdown(&self) {
        self.subscribers.clear_sync();
        self.subscriber_count.store(0, Ordering::Relaxed);
    }

    fn monitor(&self) -> &Mutex<Option<mpsc::Sender<SocketEvent>>> {
        &self.socket_monitor
    }
}

#[async_trait]
impl MultiPeerBackend for PubSocketBackend {
    async fn peer_connected(self: Arc<Self>, peer_id: &PeerIdentity, io: FramedIo) {
        let (mut recv_queue, send_queue) = io.into_parts();
        // TODO provide handling for recv_queue
        // PATCH(temma): the capacity is the socket's option when set.
        let capacity = self
            .socket_options
            .send_queue_capacity
            .unwrap_or(PUB_SEND_QUEUE_CAPACITY);
        let (queue_sender, queue_receiver) = mpsc::channel(capacity);
        let (sender, stop_receiver) = oneshot::channel();
        let depth = Arc::new(QueueDepth::default());
        let old_subscriber = self
            .subscribers
            .upsert_async(
                peer_id.clone(),
                Subscriber {
                    subscriptions: vec![],
                    send_queue: queue_sender,
                    _subscription_coro_stop: sender,
                    depth: depth.clone(),
                },
            )
            .await;
        if old_subscriber.is_none() {
            self.subscriber_count.fetch_add(1, Ordering::Relaxed);
        }
        let writer_backend = self.clone();
        let writer_peer_id = peer_id.clone();
        async_rt::task::spawn(async move {
            if let Err(error) = write_pub_queue(queue_receiver, send_queue, depth).await {
                log::debug!(
                    "Error sending message to subscriber {:?}: {:?}",
                    writer_peer_id,
                    error
                );
                writer_backend.peer_disconnected(&writer_peer_id);
            }
        });
        let backend = self;
        let peer_id = peer_id.clone();
        async_rt::task::spawn(async move {
            let mut stop_receiver = stop_receiver.fuse();
            loop {
                // PATCH(temma): a peer that sends subscriptions faster than they are read
                // would keep this task from ever waiting; let the runtime run others meanwhile.
                async_rt::task::consume_budget().await;
                select! {
                     _ = stop_receiver => {
                         break;
                     },
                     message = recv_queue.next().fuse() => {
                        match message {
                            Some(Ok(m)) => {
                                if !backend.message_received(&peer_id, m) {
                                    backend.peer_disconnected(&peer_id);
                                    break;
                                }
                            }
                            Some(Err(e)) => {
                                log::debug!("Error receiving message: {:?}", e);
                                backend.peer_disconnected(&peer_id);
                                break;
                            }
                            None => {
                                backend.peer_disconnected(&peer_id);
                                break
                            }
                        }

                     }
                }
            }
        });
    }

    fn peer_disconnected(&self, peer_id: &PeerIdentity) {
        log::info!("Client disconnected {:?}", peer_id);
        if let Some(monitor) = self.monitor().lock().as_mut() {
            let _ = monitor.try_send(SocketEvent::Disconnected(peer_id.clone()));
        }
        if self.subscribers.remove_sync(peer_id).is_some() {
            self.subscriber_count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

pub struct PubSocket {
    pub(crate) backend: Arc<PubSocketBackend>,
    binds: HashMap<Endpoint, AcceptStopHandle>,
}

impl PubSocket {
    /// PATCH(temma): `send` without a future. A PUB send never waits (a subscriber whose
    /// queue is full misses the message), so it needs none: `send` boxes one per message
    /// (`async_trait`), which a broker relaying a million messages a second pays for in
    /// allocations and polls. Same outcome as `send`, message for message.
    pub fn send_now(&mut self, message: ZmqMessage) -> ZmqResult<()> {
        if message.get(0).is_none() || self.backend.subscriber_count.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        self.backend.fanout_message(message);
        Ok(())
    }

    /// PATCH(temma): `send_now` for several messages, in order: what `send_now` of each in
    /// turn would give each subscriber (a subscriber whose queue fills part way misses the
    /// rest), in one queue item per subscriber instead of one per message (see
    /// `PubSocketBackend::fanout_batch`).
    pub fn send_batch_now(&mut self, mut messages: Vec<ZmqMessage>) -> ZmqResult<()> {
        messages.retain(|message| message.get(0).is_some());
        if messages.is_empty() || self.backend.subscriber_count.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        self.backend.fanout_batch(messages);
        Ok(())
    }

    /// PATCH(temma): the most messages queued for one subscriber whose writer took some
    /// within `within` (as far as the calls to this can tell: a subscriber is seen to take
    /// messages by comparing what it took with the last call's figure), 0 if none: a
    /// publisher that can wait may hold off while a subscriber that reads is far behind,
    /// rather than have its queue overflow (its messages dropped); one that takes nothing
    /// (gone, or stuck) is not counted.
    pub fn fullest_draining_queue(&self, within: Duration) -> usize {
        let now = self.backend.epoch.elapsed().as_millis() as u64 + 1;
        let within = within.as_millis() as u64;
        let mut fullest = 0;
        self.backend.subscribers.iter_sync(|_, subscriber| {
            let depth = &subscriber.depth;
            let taken = depth.taken.load(Ordering::Relaxed);
            if taken > 0 && depth.seen.swap(taken, Ordering::Relaxed) != taken {
                depth.moved_at.store(now, Ordering::Relaxed);
            }
            let moved_at = depth.moved_at.load(Ordering::Relaxed);
            if moved_at > 0 && now.saturating_sub(moved_at) <= within {
                fullest = fullest.max(depth.queued.load(Ordering::Relaxed));
            }
            true
        });
        fullest
    }
}

impl Drop for PubSocket {
    fn drop(&mut self) {
        self.backend.shutdown();
    }
}

#[async_trait]
impl SocketSend for PubSocket {
    async fn send(&mut self, message: ZmqMessage) -> ZmqResult<()> {
        // PATCH(temma): fanned out here (see `fanout_message`), not queued for a task.
        self.send_now(message)
    }
}

impl CaptureSocket for PubSocket {}

#[async_trait]
impl Socket for PubSocket {
    fn with_options(options: SocketOptions) -> Self {
        let backend = Arc::new(PubSocketBackend {
            subscribers: scc::HashMap::new(),
            epoch: Instant::now(),
            subscriber_count: AtomicUsize::new(0),
            socket_monitor: Mutex::new(None),
            socket_options: Arc::new(options),
        });
        Self {
            backend,
            binds: HashMap::new(),
        }
    }

    fn backend(&self) -> Arc<dyn MultiPeerBackend> {
        self.backend.clone()
    }

    fn binds(&mut self) -> &mut HashMap<Endpoint, AcceptStopHandle> {
        &mut self.binds
    }

    fn monitor(&mut self) -> mpsc::Receiver<SocketEvent> {
        let (sender, receiver) = mpsc::channel(1024);
        self.backend.socket_monitor.lock().replace(sender);
        receiver
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::tests::{
        test_bind_to_any_port_helper, test_bind_to_unspecified_interface_helper,
    };
    use crate::ZmqResult;
    use std::net::IpAddr;

    fn test_backend() -> PubSocketBackend {
        PubSocketBackend {
            subscribers: scc::HashMap::new(),
            epoch: Instant::now(),
            subscriber_count: AtomicUsize::new(0),
            socket_monitor: Mutex::new(None),
            socket_options: Arc::new(SocketOptions::default()),
        }
    }

    async fn insert_test_subscriber(
        backend: &PubSocketBackend,
        peer_id: PeerIdentity,
        subscriptions: Vec<Vec<u8>>,
        queue_sender: PubSendQueue,
    ) {
        let (stop_sender, _stop_receiver) = oneshot::channel();
        let old_subscriber = backend
            .subscribers
            .upsert_async(
                peer_id,
                Subscriber {
                    subscriptions,
                    send_queue: queue_sender,
                    _subscription_coro_stop: stop_sender,
                    depth: Arc::default(),
                },
            )
            .await;
        if old_subscriber.is_none() {
            backend.subscriber_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    // PATCH(temma): the fan-out happens in `send`, a full subscriber queue drops the message
    // for that subscriber only, and nothing is queued elsewhere.
    #[async_rt::test]
    async fn send_fans_out_at_once_and_a_full_queue_drops_for_its_subscriber_only() {
        let mut socket = PubSocket::new();
        socket
            .send(ZmqMessage::from("dropped without subscribers"))
            .await
            .expect("send without subscribers");

        let (full_sender, mut full_receiver) = mpsc::channel(0);
        let (live_sender, mut live_receiver) = mpsc::channel(8);
        insert_test_subscriber(&socket.backend, PeerIdentity::new(), vec![vec![]], full_sender)
            .await;
        insert_test_subscriber(&socket.backend, PeerIdentity::new(), vec![vec![]], live_sender)
            .await;
        for text in ["one", "two", "three"] {
            socket
                .send(ZmqMessage::from(text))
                .await
                .expect("send to subscribers");
        }
        let take = |receiver: &mut mpsc::Receiver<PubItem>| {
            let mut texts = Vec::new();
            while let Ok(PubItem::One(message)) = receiver.try_recv() {
                texts.push(String::try_from(message).unwrap());
            }
            texts
        };
        assert_eq!(take(&mut live_receiver), vec!["one", "two", "three"]);
        // A queue of capacity 0 holds the one message its sender is guaranteed.
        assert_eq!(take(&mut full_receiver), vec!["one"]);
    }

    // PATCH(temma): `send_now` is `send` without a future: the same fan-out.
    #[async_rt::test]
    async fn send_now_fans_out_as_send_does() {
        let mut socket = PubSocket::new();
        socket
            .send_now(ZmqMessage::from("dropped without subscribers"))
            .expect("send_now without subscribers");
        let (full_sender, mut full_receiver) = mpsc::channel(0);
        let (live_sender, mut live_receiver) = mpsc::channel(8);
        let (other_sender, mut other_receiver) = mpsc::channel(8);
        insert_test_subscriber(
            &socket.backend,
            PeerIdentity::new(),
            vec![vec![]],
            full_sender,
        )
        .await;
        insert_test_subscriber(
            &socket.backend,
            PeerIdentity::new(),
            vec![vec![]],
            live_sender,
        )
        .await;
        insert_test_subscriber(
            &socket.backend,
            PeerIdentity::new(),
            vec![b"other".to_vec()],
            other_sender,
        )
        .await;
        for text in ["one", "two", "three"] {
            socket
                .send_now(ZmqMessage::from(text))
                .expect("send_now to subscribers");
        }
        let take = |receiver: &mut mpsc::Receiver<PubItem>| {
            let mut texts = Vec::new();
            while let Ok(PubItem::One(message)) = receiver.try_recv() {
                texts.push(String::try_from(message).unwrap());
            }
            texts
        };
        assert_eq!(take(&mut live_receiver), vec!["one", "two", "three"]);
        assert_eq!(take(&mut full_receiver), vec!["one"]);
        assert!(
            take(&mut other_receiver).is_empty(),
            "subscribed to another prefix"
        );

        // PATCH(temma): a lone subscriber is given the message itself (`fanout_message`):
        // each one, whole, in order; one it did not subscribe to is not given.
        let mut socket = PubSocket::new();
        let (lone_sender, mut lone_receiver) = mpsc::channel(8);
        insert_test_subscriber(
            &socket.backend,
            PeerIdentity::new(),
            vec![b"o".to_vec()],
            lone_sender,
        )
        .await;
        let mut two = ZmqMessage::from("one");
        two.push_back(Bytes::from_static(b"second frame"));
        for message in [two, ZmqMessage::from("skipped"), ZmqMessage::from("only")] {
            socket.send_now(message).expect("send_now to a lone subscriber");
        }
        let mut given = Vec::new();
        while let Ok(PubItem::One(message)) = lone_receiver.try_recv() {
            given.push(message.into_vec());
        }
        assert_eq!(
            given,
            vec![
                vec![Bytes::from_static(b"one"), Bytes::from_static(b"second frame")],
                vec![Bytes::from_static(b"only")],
            ]
        );
    }

    // PATCH(temma): `send_batch_now` gives each subscriber what `send_now` of each message
    // would, in order, in one queue item, up to its queue's bound.
    #[async_rt::test]
    async fn send_batch_now_gives_each_subscriber_its_messages_in_one_item_up_to_its_bound() {
        let mut options = SocketOptions::default();
        options.send_queue_capacity(Some(3));
        let mut socket = PubSocket::with_options(options);
        socket
            .send_batch_now(vec![ZmqMessage::from("dropped without subscribers")])
            .expect("send_batch_now without subscribers");
        let (all_sender, mut all_receiver) = mpsc::channel(100);
        let (some_sender, mut some_receiver) = mpsc::channel(100);
        let (none_sender, mut none_receiver) = mpsc::channel(100);
        for (subscriptions, sender) in [
            (vec![vec![]], all_sender),
            (vec![b"o".to_vec(), b"tw".to_vec()], some_sender),
            (vec![b"x".to_vec()], none_sender),
        ] {
            insert_test_subscriber(&socket.backend, PeerIdentity::new(), subscriptions, sender)
                .await;
        }
        let batch = |texts: &[&str]| texts.iter().map(|t| ZmqMessage::from(*t)).collect();
        socket
            .send_batch_now(batch(&["one", "two", "three"]))
            .expect("send_batch_now");
        // Room for one more message each (3, plus the sender's slot): the rest is dropped.
        socket
            .send_batch_now(batch(&["four", "once", "six"]))
            .expect("send_batch_now");
        // Each item's messages; a single message's item is `["(one)", text]`.
        let items = |receiver: &mut mpsc::Receiver<PubItem>| {
            let mut items = Vec::new();
            while let Ok(item) = receiver.try_recv() {
                let text = |message: ZmqMessage| String::try_from(message).unwrap();
                items.push(match item {
                    PubItem::Many(messages) => messages.into_iter().map(text).collect(),
                    PubItem::One(message) => vec!["(one)".to_owned(), text(message)],
                });
            }
            items
        };
        assert_eq!(
            items(&mut all_receiver),
            vec![vec!["one", "two", "three"], vec!["four"]]
        );
        assert_eq!(items(&mut some_receiver), vec![vec!["one", "two"], vec!["once"]]);
        assert!(items(&mut none_receiver).is_empty(), "subscribed to another prefix");
        // Full now, for batches and single messages alike, until their writers take some.
        socket.send_batch_now(batch(&["seven"])).unwrap();
        socket.send_now(ZmqMessage::from("eight")).unwrap();
        assert!(items(&mut all_receiver).is_empty());
        // A single message to a subscriber with room is one item, as before.
        socket.send_now(ZmqMessage::from("tw9")).unwrap();
        assert_eq!(items(&mut some_receiver), vec![vec!["(one)", "tw9"]]);

        // A lone subscriber that takes everything is given the batch itself (up to its
        // bound: 1, plus the sender's slot).
        let mut options = SocketOptions::default();
        options.send_queue_capacity(Some(1));
        let mut socket = PubSocket::with_options(options);
        let (lone_sender, mut lone_receiver) = mpsc::channel(8);
        insert_test_subscriber(&socket.backend, PeerIdentity::new(), vec![vec![]], lone_sender)
            .await;
        let mut two = ZmqMessage::from("one");
        two.push_back(Bytes::from_static(b"second frame"));
        socket
            .send_batch_now(vec![two, ZmqMessage::from("two"), ZmqMessage::from("three")])
            .expect("send_batch_now to a lone subscriber");
        let Ok(PubItem::Many(given)) = lone_receiver.try_recv() else {
            panic!("one item for the batch");
        };
        let given: Vec<_> = given.into_iter().map(ZmqMessage::into_vec).collect();
        assert_eq!(
            given,
            vec![
                vec![Bytes::from_static(b"one"), Bytes::from_static(b"second frame")],
                vec![Bytes::from_static(b"two")],
            ]
        );
    }

    // PATCH(temma): batches and single messages, over TCP, reach a subscriber in the order
    // they were sent, each message whole.
    #[async_rt::test]
    async fn batches_and_single_messages_arrive_in_order_over_tcp() {
        use crate::{SocketRecv, SubSocket};
        let mut publisher = PubSocket::new();
        let endpoint = publisher.bind("tcp://127.0.0.1:0").await.unwrap();
        let mut subscriber = SubSocket::new();
        subscriber.connect(&endpoint.to_string()).await.unwrap();
        subscriber.subscribe("").await.unwrap();
        // Subscribed once a message comes through.
        loop {
            publisher.send_now(ZmqMessage::from("hello")).unwrap();
            let got = async_rt::task::timeout(Duration::from_millis(20), subscriber.recv()).await;
            if got.is_ok() {
                break;
            }
        }
        // Batches larger than a writer's flush (`WRITE_BATCH_LIMIT`), and lone messages.
        let mut sent = 0u32;
        for round in 0..50 {
            if round % 3 == 0 {
                publisher.send_now(ZmqMessage::from(format!("m{sent}"))).unwrap();
                sent += 1;
            } else {
                let size = if round % 3 == 1 { 200 } else { 7 };
                let mut batch = Vec::new();
                for _ in 0..size {
                    let mut message = ZmqMessage::from(format!("m{sent}"));
                    message.push_back(Bytes::from(format!("part of m{sent}")));
                    batch.push(message);
                    sent += 1;
                }
                publisher.send_batch_now(batch).unwrap();
            }
        }
        let mut next = 0u32;
        while next < sent {
            let message = async_rt::task::timeout(Duration::from_secs(5), subscriber.recv())
                .await
                .expect("every message comes")
                .unwrap();
            let first = String::from_utf8(message.get(0).unwrap().to_vec()).unwrap();
            if first == "hello" {
                continue;
            }
            assert_eq!(first, format!("m{next}"));
            if message.len() == 2 {
                assert_eq!(message.get(1).unwrap().as_ref(), format!("part of m{next}").as_bytes());
            }
            next += 1;
        }
    }

    // PATCH(temma): the test below.
    #[test]
    fn an_empty_prefix_matches_every_message_alone_or_among_others() {
        let frame = Bytes::from_static(b"topic payload");
        let empty = Bytes::new();
        assert!(subscription_matches(&[vec![]], &frame));
        assert!(subscription_matches(&[vec![]], &empty));
        assert!(subscription_matches(&[b"other".to_vec(), vec![]], &frame));
        assert!(subscription_matches(&[b"other".to_vec(), vec![]], &empty));
        assert!(subscription_matches(&[b"topic".to_vec()], &frame));
        assert!(!subscription_matches(&[b"topic".to_vec()], &empty));
        assert!(!subscription_matches(&[b"other".to_vec(), b"topics".to_vec()], &frame));
        assert!(!subscription_matches(&[], &frame));
    }

    #[async_rt::test]
    async fn test_replacing_subscriber_does_not_increment_subscriber_count() {
        let backend = test_backend();
        let peer_id = PeerIdentity::new();
        let (first_sender, _first_receiver) = mpsc::channel(8);
        let (second_sender, _second_receiver) = mpsc::channel(8);

        insert_test_subscriber(&backend, peer_id.clone(), vec![vec![]], first_sender).await;
        insert_test_subscriber(
            &backend,
            peer_id.clone(),
            vec![b"topic".to_vec()],
            second_sender,
        )
        .await;

        assert_eq!(backend.subscriber_count.load(Ordering::Relaxed), 1);
        assert_eq!(backend.subscribers.len(), 1);
    }

    // PATCH(temma): the test below.
    #[async_rt::test]
    async fn subscriptions_past_the_limit_disconnect_the_peer() {
        let mut options = SocketOptions::default();
        options.max_subscriptions(Some(2));
        let backend = PubSocketBackend {
            socket_options: Arc::new(options),
            ..test_backend()
        };
        let peer_id = PeerIdentity::new();
        let (sender, _receiver) = mpsc::channel(8);
        insert_test_subscriber(&backend, peer_id.clone(), vec![], sender).await;
        let frame = |data: &[u8]| Message::Message(ZmqMessage::from(data.to_vec()));
        let subscriptions = |backend: &PubSocketBackend| {
            backend
                .subscribers
                .read_sync(&peer_id, |_, s| s.subscriptions.clone())
                .unwrap()
        };

        // A prefix subscribed twice counts twice, as it must be cancelled twice.
        assert!(backend.message_received(&peer_id, frame(b"\x01a")));
        assert!(backend.message_received(&peer_id, frame(b"\x01a")));
        assert_eq!(subscriptions(&backend), vec![b"a".to_vec(), b"a".to_vec()]);
        // Cancelling makes room again.
        assert!(backend.message_received(&peer_id, frame(b"\x00a")));
        assert!(backend.message_received(&peer_id, frame(b"\x01b")));
        assert_eq!(subscriptions(&backend), vec![b"a".to_vec(), b"b".to_vec()]);
        // One more is refused, and not kept: the caller disconnects the peer.
        assert!(!backend.message_received(&peer_id, frame(b"\x01c")));
        assert_eq!(subscriptions(&backend), vec![b"a".to_vec(), b"b".to_vec()]);
        // Without the option, there is no limit.
        let unlimited = test_backend();
        let (sender, _receiver) = mpsc::channel(8);
        insert_test_subscriber(&unlimited, peer_id.clone(), vec![], sender).await;
        for _ in 0..100 {
            assert!(unlimited.message_received(&peer_id, frame(b"\x01a")));
        }
        assert_eq!(subscriptions(&unlimited).len(), 100);
    }

    #[async_rt::test]
    async fn test_shutdown_clears_subscriber_count() {
        let backend = test_backend();
        let (sender, _receiver) = mpsc::channel(8);

        insert_test_subscriber(&backend, PeerIdentity::new(), vec![vec![]], sender).await;

        assert_eq!(backend.subscriber_count.load(Ordering::Relaxed), 1);

        backend.shutdown();

        assert_eq!(backend.subscriber_count.load(Ordering::Relaxed), 0);
        assert!(backend.subscribers.is_empty());
    }

    #[async_rt::test]
    async fn test_fanout_message_delivers_only_matching_subscribers() {
        let backend = test_backend();
        let matching_peer = PeerIdentity::new();
        let non_matching_peer = PeerIdentity::new();
        let (matching_sender, mut matching_receiver) = mpsc::channel(8);
        let (non_matching_sender, mut non_matching_receiver) = mpsc::channel(8);

        insert_test_subscriber(
            &backend,
            matching_peer,
            vec![b"topic.a".to_vec()],
            matching_sender,
        )
        .await;
        insert_test_subscriber(
            &backend,
            non_matching_peer,
            vec![b"topic.b".to_vec()],
            non_matching_sender,
        )
        .await;

        backend.fanout_message(ZmqMessage::from(Bytes::from_static(b"topic.a payload")));

        let matched = matching_receiver.try_recv().expect("matching subscriber");
        let PubItem::One(matched) = matched else {
            panic!("unexpected queued message type");
        };
        assert_eq!(
            matched.get(0),
            Some(&Bytes::from_static(b"topic.a payload"))
        );
        assert!(non_matching_receiver.try_recv().is_err());
    }

    #[async_rt::test]
    async fn test_closed_subscriber_queue_does_not_interrupt_fanout_to_matching_peer() {
        let backend = test_backend();
        let stale_peer = PeerIdentity::new();
        let live_peer = PeerIdentity::new();
        let (stale_sender, stale_receiver) = mpsc::channel(1);
        let (live_sender, mut live_receiver) = mpsc::channel(8);
        drop(stale_receiver);

        insert_test_subscriber(&backend, stale_peer.clone(), vec![vec![]], stale_sender).await;
        insert_test_subscriber(&backend, live_peer.clone(), vec![vec![]], live_sender).await;

        backend.fanout_message(ZmqMessage::from(Bytes::from_static(b"payload")));

        let queued = live_receiver.try_recv().expect("live subscriber message");
        let PubItem::One(message) = queued else {
            panic!("unexpected queued message type");
        };
        assert_eq!(message.get(0), Some(&Bytes::from_static(b"payload")));

        assert!(backend.subscribers.get_sync(&stale_peer).is_some());
        assert!(backend.subscribers.get_sync(&live_peer).is_some());
        assert_eq!(backend.subscriber_count.load(Ordering::Relaxed), 2);
    }

    #[async_rt::test]
    async fn test_full_subscriber_queue_drops_message_without_disconnect() {
        let backend = test_backend();
        let peer_id = PeerIdentity::new();
        let (mut queue_sender, mut queue_receiver) = mpsc::channel(1);

        insert_test_subscriber(
            &backend,
            peer_id.clone(),
            vec![vec![]],
            queue_sender.clone(),
        )
        .await;

        let mut prefilled_count = 0;
        loop {
            let message = PubItem::One(ZmqMessage::from(format!(
                "already queued {prefilled_count}"
            )));
            match queue_sender.try_send(message) {
                Ok(()) => prefilled_count += 1,
                Err(error) if error.is_full() => {
                    drop(error.into_inner());
                    break;
                }
                Err(error) => panic!("unexpected queue prefill error: {error:?}"),
            }
        }
        assert!(prefilled_count > 0);

        send_to_subscriber(&mut queue_sender, &QueueDepth::default(), PubItem::One(ZmqMessage::from("dropped payload")));

        assert!(backend.subscribers.get_sync(&peer_id).is_some());
        assert_eq!(backend.subscriber_count.load(Ordering::Relaxed), 1);

        let mut queued_messages = Vec::new();
        while let Ok(queued) = queue_receiver.try_recv() {
            let PubItem::One(message) = queued else {
                panic!("unexpected queued message type");
            };
            queued_messages.push(String::try_from(message).unwrap());
        }

        assert_eq!(queued_messages.len(), prefilled_count);
        assert!(queued_messages
            .iter()
            .all(|message| message.starts_with("already queued ")));
        assert!(!queued_messages
            .iter()
            .any(|message| message == "dropped payload"));
    }

    #[async_rt::test]
    async fn test_send_to_subscriber_drops_closed_queue_without_disconnect() {
        let backend = test_backend();
        let peer_id = PeerIdentity::new();
        let (mut queue_sender, queue_receiver) = mpsc::channel(1);
        drop(queue_receiver);

        insert_test_subscriber(
            &backend,
            peer_id.clone(),
            vec![vec![]],
            queue_sender.clone(),
        )
        .await;

        send_to_subscriber(&mut queue_sender, &QueueDepth::default(), PubItem::One(ZmqMessage::from("payload")));

        assert!(backend.subscribers.get_sync(&peer_id).is_some());
        assert_eq!(backend.subscriber_count.load(Ordering::Relaxed), 1);
    }

    #[async_rt::test]
    async fn test_bind_to_any_port() -> ZmqResult<()> {
        let s = PubSocket::new();
        test_bind_to_any_port_helper(s).await
    }

    #[async_rt::test]
    async fn test_bind_to_any_ipv4_interface() -> ZmqResult<()> {
        let any_ipv4: IpAddr = "0.0.0.0".parse().unwrap();
        let s = PubSocket::new();
        test_bind_to_unspecified_interface_helper(any_ipv4, s, 4000).await
    }

    #[async_rt::test]
    async fn test_bind_to_any_ipv6_interface() -> ZmqResult<()> {
        let any_ipv6: IpAddr = "::".parse().unwrap();
        let s = PubSocket::new();
        test_bind_to_unspecified_interface_helper(any_ipv6, s, 4010).await
    }

    // PATCH(temma): `fullest_draining_queue` counts a subscriber that reads, however far
    // behind, and not one that takes nothing.
    #[async_rt::test]
    async fn the_fullest_draining_queue_is_that_of_a_subscriber_that_reads() {
        use crate::{SocketRecv, SubSocket};
        // More than the socket's and the subscriber's buffers hold (thousands of messages),
        // so that the queue is not emptied as soon as the subscriber reads again.
        const FULL: usize = 10_000;
        let mut options = SocketOptions::default();
        options.send_queue_capacity(Some(FULL));
        let mut publisher = PubSocket::with_options(options);
        let endpoint = publisher.bind("tcp://127.0.0.1:0").await.unwrap();
        let mut subscriber = SubSocket::new();
        subscriber.connect(&endpoint.to_string()).await.unwrap();
        subscriber.subscribe("").await.unwrap();
        // Subscribed once a message comes through.
        loop {
            publisher.send_now(ZmqMessage::from("hello")).unwrap();
            let got = async_rt::task::timeout(Duration::from_millis(20), subscriber.recv()).await;
            if got.is_ok() {
                break;
            }
        }
        // Nothing read: the socket's buffers and the subscriber's fill, then the queue, until
        // it stays full (the writer takes nothing more).
        let big = vec![b'x'; 1024];
        let mut sent = 0;
        for round in 0.. {
            assert!(round < 100, "the queue never stayed full");
            while publisher.fullest_draining_queue(Duration::from_secs(60)) < FULL {
                publisher.send_now(ZmqMessage::from(big.clone())).unwrap();
                sent += 1;
                if sent % 1000 == 0 {
                    async_rt::task::sleep(Duration::from_millis(1)).await;
                }
            }
            // A subscriber that takes nothing for a while is not counted.
            async_rt::task::sleep(Duration::from_millis(300)).await;
            if publisher.fullest_draining_queue(Duration::from_secs(60)) >= FULL {
                break;
            }
        }
        async_rt::task::sleep(Duration::from_millis(300)).await;
        assert_eq!(publisher.fullest_draining_queue(Duration::from_millis(100)), 0);
        // Once it reads again, it is.
        let mut read = 0;
        let draining = loop {
            subscriber.recv().await.unwrap();
            read += 1;
            let fullest = publisher.fullest_draining_queue(Duration::from_millis(100));
            if fullest > 0 {
                break fullest;
            }
            assert!(read < sent, "the writer never took more");
        };
        assert!(draining < FULL, "{draining}");
        // Read all: nothing left queued.
        while publisher.fullest_draining_queue(Duration::from_secs(60)) > 0 {
            async_rt::task::timeout(Duration::from_secs(5), subscriber.recv())
                .await
                .expect("the queued messages come")
                .unwrap();
        }
    }
}
