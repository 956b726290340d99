use futures::task::{waker_ref, ArcWake};
use futures::Stream;
use parking_lot::Mutex;

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

pub(crate) struct QueueInner<S, K: Clone> {
    counter: atomic::AtomicUsize,
    ready_queue: BinaryHeap<ReadyEvent<K>>,
    queued: HashSet<K>,
    streams: HashMap<K, Pin<Box<S>>>,
    waker: Option<Waker>,
    /// Callback invoked when a stream ends (peer disconnected).
    /// Wrapped in Arc so it can be cloned and called outside the lock.
    on_disconnect: Option<Arc<dyn Fn(K) + Send + Sync>>,
}

impl<S, K: Clone + Eq + Hash> QueueInner<S, K> {
    pub fn insert(&mut self, k: K, s: S) {
        self.streams.insert(k.clone(), Box::pin(s));
        self.push_ready(k);
        if let Some(w) = &self.waker {
            w.wake_by_ref();
        }
    }

    pub fn remove(&mut self, k: &K) {
        self.streams.remove(k);
        self.queued.remove(k);
    }

    /// Clear all streams and the ready queue.
    ///
    /// Used during shutdown to ensure TCP connections are closed even when
    /// other components (like reconnect tasks) hold Arc references to the inner.
    pub fn clear(&mut self) {
        self.streams.clear();
        self.ready_queue.clear();
        self.queued.clear();
        // Wake the waker so any pending poll_next returns
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn push_ready(&mut self, k: K) {
        if self.queued.insert(k.clone()) {
            self.ready_queue.push(ReadyEvent {
                priority: self.counter.fetch_add(1, atomic::Ordering::Relaxed),
                key: k,
            });
        }
    }
}

pub struct FairQueue<S: Stream, K: Clone> {
    block_on_no_clients: bool,
    inner: Arc<Mutex<QueueInner<S, K>>>,
    // PATCH(temma): what a stream's turn read beyond its first item, handed out in order
    // before any other stream is polled (see `TURN`).
    turn: VecDeque<TurnItem<K, S::Item>>,
}

/// PATCH(temma): the most items one stream's turn reads, when no other stream is ready.
///
/// Taking one item per turn costs three locks, two hash-map removals and insertions, a heap
/// push and pop and a waker allocation per message. When the stream that just gave an item
/// is the only one ready, the next turn would be its own anyway: reading on from it, up to
/// `TURN` items, gives the same order without that cost. When others are ready, turns stay
/// one item each, as before.
const TURN: usize = 64;

enum TurnItem<K, T> {
    Item(K, T),
    /// The stream ended after the items before this one: the disconnect callback runs when
    /// the consumer reaches it, so that it sees the peer's messages first, as before.
    End(K),
}

/// PATCH(temma): whether an item ends its stream's turn. An error does: the consumer drops
/// the peer on an error, and the stream must not be read on past it.
pub trait EndsTurn {
    fn ends_turn(&self) -> bool;
}

impl<T, E> EndsTurn for Result<T, E> {
    fn ends_turn(&self) -> bool {
        self.is_err()
    }
}

#[cfg(test)]
impl EndsTurn for &'static str {
    fn ends_turn(&self) -> bool {
        false
    }
}

#[derive(Clone)]
struct ReadyEvent<K: Clone> {
    priority: usize,
    key: K,
}

impl<K: Clone> PartialEq for ReadyEvent<K> {
    fn eq(&self, other: &Self) -> bool {
        self.priority.eq(&other.priority)
    }
}
impl<K: Clone> Eq for ReadyEvent<K> {}

impl<K: Clone> PartialOrd for ReadyEvent<K> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<K: Clone> Ord for ReadyEvent<K> {
    fn cmp(&self, other: &Self) -> Ordering {
        other.priority.cmp(&self.priority)
    }
}

struct StreamWaker<S, K: Clone> {
    inner: Arc<Mutex<QueueInner<S, K>>>,
    event: ReadyEvent<K>,
}

impl<S, K> ArcWake for StreamWaker<S, K>
where
    S: Send,
    K: Clone + Eq + Hash + Send + Sync,
{
    fn wake_by_ref(arc_self: &Arc<Self>) {
        let mut inner = arc_self.inner.lock();
        inner.push_ready(arc_self.event.key.clone());
        if let Some(waker) = inner.waker.take() {
            waker.wake_by_ref();
        }
    }
}

impl<S, T, K> Stream for FairQueue<S, K>
where
    T: Send + Unpin + EndsTurn,
    S: Stream<Item = T> + Send + 'static,
    K: Eq + Hash + Unpin + Clone + Send + Sync + 'static,
{
    type Item = (K, T);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // PATCH(temma): each message handed out spends a unit of tokio's cooperative budget,
        // as tokio's own channels and sockets do: a consumer whose peers always have a message
        // ready then yields when its budget is out, and the runtime runs its other tasks and
        // looks for other sockets' readiness (without it, one flooding peer was read to its
        // end before the others were heard, and on one CPU a PUB writer starved).
        #[cfg(feature = "tokio-runtime")]
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        let next = self.get_mut().poll_turns(cx);
        #[cfg(feature = "tokio-runtime")]
        if next.is_ready() {
            coop.made_progress();
        }
        next
    }
}

impl<S, T, K> FairQueue<S, K>
where
    T: Send + Unpin + EndsTurn,
    S: Stream<Item = T> + Send + 'static,
    K: Eq + Hash + Unpin + Clone + Send + Sync + 'static,
{
    #[allow(clippy::needless_continue)]
    fn poll_turns(&mut self, cx: &mut Context<'_>) -> Poll<Option<(K, T)>> {
        let fair_queue = self;
        // PATCH(temma): what the last turn read comes first.
        while let Some(turn_item) = fair_queue.turn.pop_front() {
            match turn_item {
                TurnItem::Item(key, item) => return Poll::Ready(Some((key, item))),
                TurnItem::End(key) => {
                    let callback = fair_queue.inner.lock().on_disconnect.clone();
                    if let Some(callback) = callback {
                        callback(key);
                    }
                }
            }
        }
        let mut remaining_ready = {
            let mut inner = fair_queue.inner.lock();
            inner.waker = Some(cx.waker().clone());
            inner.ready_queue.len()
        };

        while remaining_ready > 0 {
            remaining_ready -= 1;
            let (event, mut io_stream) = {
                let mut inner = fair_queue.inner.lock();
                inner.waker = Some(cx.waker().clone());
                let event = match inner.ready_queue.pop() {
                    Some(s) => s,
                    None => {
                        return if !inner.streams.is_empty() || fair_queue.block_on_no_clients {
                            Poll::Pending
                        } else {
                            Poll::Ready(None)
                        }
                    }
                };
                inner.queued.remove(&event.key);
                match inner.streams.remove(&event.key) {
                    Some(stream) => (event, stream),
                    None => continue,
                }
            };

            let waker = Arc::new(StreamWaker {
                inner: fair_queue.inner.clone(),
                event: event.clone(),
            });
            let waker_ref = waker_ref(&waker);
            let mut cx = Context::from_waker(&waker_ref);
            match io_stream.as_mut().poll_next(&mut cx) {
                Poll::Ready(Some(res)) => {
                    let key = event.key.clone();
                    // PATCH(temma): read on while this stream is the only one ready (`TURN`).
                    let mut ends_turn = res.ends_turn();
                    let item = Some((key.clone(), res));
                    let mut pending = false;
                    let mut ended = false;
                    let mut inner = fair_queue.inner.lock();
                    while !ends_turn
                        && fair_queue.turn.len() + 1 < TURN
                        && inner.ready_queue.is_empty()
                    {
                        // Unlocked while the stream is polled: its waker takes the lock.
                        drop(inner);
                        match io_stream.as_mut().poll_next(&mut cx) {
                            Poll::Ready(Some(more)) => {
                                ends_turn = more.ends_turn();
                                fair_queue.turn.push_back(TurnItem::Item(key.clone(), more));
                            }
                            Poll::Ready(None) => ended = true,
                            Poll::Pending => pending = true,
                        }
                        inner = fair_queue.inner.lock();
                        if ended || pending {
                            break;
                        }
                    }
                    if ended {
                        fair_queue.turn.push_back(TurnItem::End(key));
                    } else {
                        inner.streams.insert(event.key, io_stream);
                        if !pending {
                            inner.push_ready(key);
                        }
                    }
                    return Poll::Ready(item);
                }
                Poll::Ready(None) => {
                    // Peer disconnected. Don't put the stream back.
                    // Clone the callback Arc so we can call it outside the lock
                    // (to avoid deadlock if callback accesses inner)
                    let callback = {
                        let inner = fair_queue.inner.lock();
                        inner.on_disconnect.clone()
                    };
                    // Call callback outside the lock
                    if let Some(callback) = callback {
                        callback(event.key.clone());
                    }
                    // Continue to poll other streams instead of returning None immediately.
                    continue;
                }
                Poll::Pending => {
                    let mut inner = fair_queue.inner.lock();
                    inner.streams.insert(event.key, io_stream);
                    continue;
                }
            }
        }

        let mut inner = fair_queue.inner.lock();
        inner.waker = Some(cx.waker().clone());
        let should_wake = !inner.ready_queue.is_empty();
        let result = if !inner.streams.is_empty() || fair_queue.block_on_no_clients {
            Poll::Pending
        } else {
            Poll::Ready(None)
        };
        drop(inner);

        if should_wake {
            cx.waker().wake_by_ref();
        }
        result
    }
}

impl<S: Stream, K: Clone> FairQueue<S, K> {
    /// PATCH(temma): the next item the last turn read (see `TURN`), if it is one, without
    /// polling anything: what a consumer reading on after an item takes first. `None` when
    /// the turn is used up (or a stream's end is next): poll the queue then.
    pub fn next_of_turn(&mut self) -> Option<(K, S::Item)> {
        match self.turn.front() {
            Some(TurnItem::Item(..)) => match self.turn.pop_front() {
                Some(TurnItem::Item(key, item)) => Some((key, item)),
                _ => None,
            },
            _ => None,
        }
    }

    pub fn new(block_on_no_clients: bool) -> Self {
        Self {
            block_on_no_clients,
            turn: VecDeque::new(),
            inner: Arc::new(Mutex::new(QueueInner {
                counter: atomic::AtomicUsize::new(0),
                ready_queue: BinaryHeap::new(),
                queued: HashSet::new(),
                streams: HashMap::new(),
                waker: None,
                on_disconnect: None,
            })),
        }
    }

    /// Set a callback to be invoked when a stream ends (peer disconnected).
    ///
    /// The callback receives the key of the disconnected stream.
    pub fn set_on_disconnect<F>(&mut self, callback: F)
    where
        F: Fn(K) + Send + Sync + 'static,
    {
        self.inner.lock().on_disconnect = Some(Arc::new(callback));
    }

    pub(crate) fn inner(&self) -> Arc<Mutex<QueueInner<S, K>>> {
        self.inner.clone()
    }
}

#[cfg(test)]
mod test {
    use crate::async_rt;
    use crate::fair_queue::FairQueue;
    use futures::task::noop_waker;
    use futures::Future;
    use futures::{stream, Stream, StreamExt};
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    /// Test stream that yields Pending for the first N polls, then emits messages FIFO
    struct TestStream {
        pending_polls: usize,
        messages: VecDeque<&'static str>,
    }

    struct CountPendingStream {
        poll_count: usize,
    }

    struct WakePendingStream {
        poll_count: usize,
    }

    struct WakeThenReadyStream {
        poll_count: usize,
        message: Option<&'static str>,
    }

    impl TestStream {
        fn new(pending_polls: usize, messages: &[&'static str]) -> Self {
            Self {
                pending_polls,
                messages: messages.iter().copied().collect(),
            }
        }

        fn ready(messages: &[&'static str]) -> Self {
            Self::new(0, messages)
        }

        fn pending_once(messages: &[&'static str]) -> Self {
            Self::new(1, messages)
        }
    }

    impl Stream for CountPendingStream {
        type Item = &'static str;

        fn poll_next(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.get_mut().poll_count += 1;
            Poll::Pending
        }
    }

    impl Stream for WakePendingStream {
        type Item = &'static str;

        fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.get_mut().poll_count += 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    impl Stream for WakeThenReadyStream {
        type Item = &'static str;

        fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            let this = self.get_mut();
            this.poll_count += 1;
            if this.poll_count == 1 {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(this.message.take())
            }
        }
    }

    impl Stream for TestStream {
        type Item = &'static str;

        fn poll_next(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            let this = self.get_mut();
            if this.pending_polls > 0 {
                this.pending_polls -= 1;
                return Poll::Pending;
            }
            Poll::Ready(this.messages.pop_front())
        }
    }

    enum UnifiedStream {
        Test(TestStream),
        CountPending(CountPendingStream),
        WakePending(WakePendingStream),
    }

    impl Stream for UnifiedStream {
        type Item = &'static str;

        fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            match self.get_mut() {
                UnifiedStream::Test(stream) => Pin::new(stream).poll_next(cx),
                UnifiedStream::CountPending(stream) => Pin::new(stream).poll_next(cx),
                UnifiedStream::WakePending(stream) => Pin::new(stream).poll_next(cx),
            }
        }
    }

    #[async_rt::test]
    async fn test_fair_queue_ready() {
        let a = stream::iter(vec!["a1", "a2", "a3"]);
        let b = stream::iter(vec!["b1", "b2", "b3"]);
        let c = stream::iter(vec!["c1", "c2", "c3"]);

        let mut f_queue: FairQueue<_, u64> = FairQueue::new(false);
        {
            let inner = f_queue.inner();
            let mut inner_lock = inner.lock();
            inner_lock.insert(1, a);
            inner_lock.insert(2, b);
            inner_lock.insert(3, c);
        }

        let mut results = Vec::new();
        while let Some(i) = f_queue.next().await {
            results.push(i);
        }

        assert_eq!(
            results,
            vec![
                (1, "a1"),
                (2, "b1"),
                (3, "c1"),
                (1, "a2"),
                (2, "b2"),
                (3, "c2"),
                (1, "a3"),
                (2, "b3"),
                (3, "c3")
            ]
        );
    }

    #[async_rt::test]
    async fn test_fair_queue_next_future_can_be_dropped_after_pending() {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);

        let mut fair_queue: FairQueue<WakeThenReadyStream, &str> = FairQueue::new(false);
        {
            let inner = fair_queue.inner();
            let mut lock = inner.lock();
            lock.insert(
                "peer",
                WakeThenReadyStream {
                    poll_count: 0,
                    message: Some("message"),
                },
            );
        }

        {
            let mut next = fair_queue.next();
            assert!(
                matches!(Pin::new(&mut next).poll(&mut cx), Poll::Pending),
                "first poll should park the recv future"
            );
        }

        assert_eq!(fair_queue.next().await, Some(("peer", "message")));
    }

    #[async_rt::test]
    async fn test_fair_queue_different_size() {
        let a = stream::iter(vec!["a1", "a2", "a3"]);
        let b = stream::iter(vec!["b1"]);
        let c = stream::iter(vec!["c1", "c2"]);

        let mut f_queue: FairQueue<_, u64> = FairQueue::new(false);
        {
            let inner = f_queue.inner();
            let mut inner_lock = inner.lock();
            inner_lock.insert(1, a);
            inner_lock.insert(2, b);
            inner_lock.insert(3, c);
        }

        let mut results = Vec::new();
        while let Some(i) = f_queue.next().await {
            results.push(i);
        }

        // FairQueue continues polling all streams until all are exhausted
        assert_eq!(
            results,
            vec![
                (1, "a1"),
                (2, "b1"),
                (3, "c1"),
                (1, "a2"),
                (3, "c2"),
                (1, "a3")
            ]
        );
    }

    #[test]
    fn test_fair_queue_continues_on_pending() {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);

        let mut fair_queue: FairQueue<UnifiedStream, &str> = FairQueue::new(false);
        {
            let inner = fair_queue.inner();
            let mut lock = inner.lock();
            lock.insert(
                "slow",
                UnifiedStream::Test(TestStream::pending_once(&["s1"])),
            );
            lock.insert(
                "fast",
                UnifiedStream::Test(TestStream::ready(&["f1", "f2"])),
            );
        }

        // First poll should return fast stream (regression test: no starvation)
        let result = Pin::new(&mut fair_queue).poll_next(&mut cx);
        match result {
            Poll::Ready(Some((key, value))) => {
                assert_eq!(key, "fast");
                assert_eq!(value, "f1");
            }
            other => panic!("Expected fast stream first, got: {:#?}", other),
        }

        // Second poll: fast stream still ready, slow stream pending
        let result = Pin::new(&mut fair_queue).poll_next(&mut cx);
        match result {
            Poll::Ready(Some((key, value))) => {
                assert_eq!(key, "fast");
                assert_eq!(value, "f2");
            }
            other => panic!("Expected fast stream second, got: {:#?}", other),
        }

        // Third poll: With noop_waker, slow stream hasn't been re-polled
        let result = Pin::new(&mut fair_queue).poll_next(&mut cx);
        match result {
            Poll::Pending => {} // Expected with noop_waker
            other @ Poll::Ready(_) => panic!("Expected Pending, got: {:#?}", other),
        }
    }

    #[test]
    fn test_fair_queue_multiple_clients_fairness() {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);

        let mut fair_queue: FairQueue<UnifiedStream, &str> = FairQueue::new(false);
        {
            let inner = fair_queue.inner();
            let mut lock = inner.lock();
            lock.insert(
                "fast",
                UnifiedStream::Test(TestStream::ready(&["f1", "f2", "f3"])),
            );
            lock.insert("slow", UnifiedStream::Test(TestStream::new(2, &["s1"])));
            lock.insert(
                "mid",
                UnifiedStream::Test(TestStream::new(1, &["m1", "m2"])),
            );
        }

        let mut messages = Vec::new();
        const MAX_ITERATIONS: usize = 20; // Upper bound - 3 for fast, 2 for mid, 1 for slow.

        for _ in 0..MAX_ITERATIONS {
            match Pin::new(&mut fair_queue).poll_next(&mut cx) {
                Poll::Ready(Some((key, value))) => {
                    messages.push(format!("{}:{}", key, value));

                    let has_slow = messages.iter().any(|m| m.starts_with("slow:"));
                    let fast_count = messages.iter().filter(|m| m.starts_with("fast:")).count();
                    let mid_count = messages.iter().filter(|m| m.starts_with("mid:")).count();

                    if has_slow && fast_count == 3 && mid_count == 2 {
                        break;
                    }
                }
                Poll::Ready(None) => break,
                Poll::Pending => {}
            }
        }

        // Ensure fast stream isn't starved by pending streams
        let fast_messages = messages.iter().filter(|m| m.starts_with("fast:")).count();
        assert!(
            fast_messages >= 1,
            "Fast stream was starved: {:?}",
            messages
        );
    }

    #[test]
    fn test_fair_queue_polls_ready_set_before_yielding_pending() {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);

        let mut fair_queue: FairQueue<UnifiedStream, &str> = FairQueue::new(false);
        {
            let inner = fair_queue.inner();
            let mut lock = inner.lock();
            lock.insert(
                "pending-1",
                UnifiedStream::CountPending(CountPendingStream { poll_count: 0 }),
            );
            lock.insert(
                "pending-2",
                UnifiedStream::CountPending(CountPendingStream { poll_count: 0 }),
            );
            lock.insert(
                "pending-3",
                UnifiedStream::CountPending(CountPendingStream { poll_count: 0 }),
            );
        }

        let result = Pin::new(&mut fair_queue).poll_next(&mut cx);
        assert!(
            matches!(result, Poll::Pending),
            "expected FairQueue to yield Pending, got {result:?}"
        );

        let inner = fair_queue.inner();
        let mut lock = inner.lock();
        let poll_count: usize = lock
            .streams
            .values_mut()
            .map(|stream| {
                let UnifiedStream::CountPending(stream) = stream.as_mut().get_mut() else {
                    panic!("unexpected stream type");
                };
                stream.poll_count
            })
            .sum();
        assert_eq!(
            poll_count, 3,
            "FairQueue should poll all initially ready streams before yielding Pending"
        );
    }

    #[test]
    fn test_fair_queue_defers_ready_events_generated_during_poll() {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);

        let mut fair_queue: FairQueue<UnifiedStream, &str> = FairQueue::new(false);
        {
            let inner = fair_queue.inner();
            let mut lock = inner.lock();
            lock.insert(
                "pending",
                UnifiedStream::WakePending(WakePendingStream { poll_count: 0 }),
            );
        }

        let result = Pin::new(&mut fair_queue).poll_next(&mut cx);
        assert!(
            matches!(result, Poll::Pending),
            "expected FairQueue to yield Pending, got {result:?}"
        );

        let inner = fair_queue.inner();
        let mut lock = inner.lock();
        assert_eq!(
            lock.ready_queue.len(),
            1,
            "wake generated during poll should remain queued for a later poll"
        );
        assert_eq!(
            lock.queued.len(),
            1,
            "wake generated during poll should be tracked as queued"
        );
        let stream = lock.streams.get_mut("pending").unwrap();
        let UnifiedStream::WakePending(stream) = stream.as_mut().get_mut() else {
            panic!("unexpected stream type");
        };
        assert_eq!(
            stream.poll_count, 1,
            "FairQueue should not consume same-poll wake events immediately"
        );
    }

    // PATCH(temma): the turn of a lone stream.

    /// Counts its polls; gives `items` in order, then ends.
    struct Counted<T> {
        polls: Arc<AtomicUsize>,
        items: VecDeque<T>,
    }

    impl<T: Unpin> Stream for Counted<T> {
        type Item = T;

        fn poll_next(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<T>> {
            let this = self.get_mut();
            this.polls.fetch_add(1, AtomicOrdering::SeqCst);
            Poll::Ready(this.items.pop_front())
        }
    }

    fn counted<T>(items: Vec<T>) -> (Counted<T>, Arc<AtomicUsize>) {
        let polls = Arc::new(AtomicUsize::new(0));
        let stream = Counted {
            polls: polls.clone(),
            items: items.into(),
        };
        (stream, polls)
    }

    #[test]
    fn a_lone_stream_is_read_on_in_order_up_to_a_turn() {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let items: Vec<Result<usize, ()>> = (0..super::TURN * 2 + 5).map(Ok).collect();
        let (stream, polls) = counted(items);
        let mut fair_queue: FairQueue<Counted<Result<usize, ()>>, &str> = FairQueue::new(false);
        fair_queue.inner().lock().insert("lone", stream);

        let first = Pin::new(&mut fair_queue).poll_next(&mut cx);
        assert!(
            matches!(first, Poll::Ready(Some(("lone", Ok(0))))),
            "{first:?}"
        );
        assert_eq!(
            polls.load(AtomicOrdering::SeqCst),
            super::TURN,
            "one turn reads TURN items from a lone stream"
        );
        let mut next = 1;
        loop {
            match Pin::new(&mut fair_queue).poll_next(&mut cx) {
                Poll::Ready(Some((_, Ok(n)))) => {
                    assert_eq!(n, next, "items come in the stream's order");
                    next += 1;
                }
                Poll::Ready(None) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(next, super::TURN * 2 + 5, "every item came out once");
    }

    #[test]
    fn next_of_turn_gives_what_the_turn_read_and_nothing_more() {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let items: Vec<Result<usize, ()>> = (0..super::TURN * 2).map(Ok).collect();
        let (stream, polls) = counted(items);
        let mut fair_queue: FairQueue<Counted<Result<usize, ()>>, &str> = FairQueue::new(false);
        assert!(fair_queue.next_of_turn().is_none(), "no turn yet");
        fair_queue.inner().lock().insert("lone", stream);
        let first = Pin::new(&mut fair_queue).poll_next(&mut cx);
        assert!(
            matches!(first, Poll::Ready(Some(("lone", Ok(0))))),
            "{first:?}"
        );
        let mut next = 1;
        while let Some((_, item)) = fair_queue.next_of_turn() {
            assert_eq!(item, Ok(next), "in the stream's order");
            next += 1;
        }
        assert_eq!(next, super::TURN, "the turn's items, no more");
        assert_eq!(
            polls.load(AtomicOrdering::SeqCst),
            super::TURN,
            "the stream was not polled for them"
        );
        let after = Pin::new(&mut fair_queue).poll_next(&mut cx);
        assert!(
            matches!(after, Poll::Ready(Some(("lone", Ok(n)))) if n == super::TURN),
            "the next turn goes on where it stopped: {after:?}"
        );
    }

    #[test]
    fn an_error_ends_the_turn() {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let (stream, polls) = counted(vec![Ok(1), Ok(2), Err("bad frame"), Ok(3)]);
        let mut fair_queue: FairQueue<Counted<Result<u8, &str>>, &str> = FairQueue::new(false);
        fair_queue.inner().lock().insert("peer", stream);

        let first = Pin::new(&mut fair_queue).poll_next(&mut cx);
        assert!(
            matches!(first, Poll::Ready(Some(("peer", Ok(1))))),
            "{first:?}"
        );
        assert_eq!(
            polls.load(AtomicOrdering::SeqCst),
            3,
            "the stream is not read past its error within a turn"
        );
        let second = Pin::new(&mut fair_queue).poll_next(&mut cx);
        assert!(
            matches!(second, Poll::Ready(Some(("peer", Ok(2))))),
            "{second:?}"
        );
        let third = Pin::new(&mut fair_queue).poll_next(&mut cx);
        assert!(
            matches!(third, Poll::Ready(Some(("peer", Err("bad frame"))))),
            "{third:?}"
        );
        assert_eq!(polls.load(AtomicOrdering::SeqCst), 3);
    }

    #[test]
    fn the_disconnect_callback_runs_after_the_turns_items() {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let (stream, _) = counted(vec![Ok::<u8, ()>(1), Ok(2), Ok(3)]);
        let ended = Arc::new(AtomicUsize::new(0));
        let mut fair_queue: FairQueue<Counted<Result<u8, ()>>, &str> = FairQueue::new(false);
        {
            let ended = ended.clone();
            fair_queue.set_on_disconnect(move |_| {
                ended.fetch_add(1, AtomicOrdering::SeqCst);
            });
        }
        fair_queue.inner().lock().insert("peer", stream);

        for expected in 1..=3 {
            let item = Pin::new(&mut fair_queue).poll_next(&mut cx);
            assert!(
                matches!(item, Poll::Ready(Some(("peer", Ok(n)))) if n == expected),
                "{item:?}"
            );
            assert_eq!(
                ended.load(AtomicOrdering::SeqCst),
                0,
                "the peer is not reported gone before its last message is handed out"
            );
        }
        assert!(matches!(
            Pin::new(&mut fair_queue).poll_next(&mut cx),
            Poll::Ready(None)
        ));
        assert_eq!(ended.load(AtomicOrdering::SeqCst), 1, "reported gone once");
    }

    #[test]
    fn turns_are_one_item_each_while_another_stream_is_ready() {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let (a, a_polls) = counted(vec![Ok::<&str, ()>("a1"), Ok("a2"), Ok("a3")]);
        let (b, _) = counted(vec![Ok::<&str, ()>("b1"), Ok("b2")]);
        let mut fair_queue: FairQueue<Counted<Result<&str, ()>>, &str> = FairQueue::new(false);
        {
            let inner = fair_queue.inner();
            let mut lock = inner.lock();
            lock.insert("a", a);
            lock.insert("b", b);
        }
        let first = Pin::new(&mut fair_queue).poll_next(&mut cx);
        assert!(
            matches!(first, Poll::Ready(Some(("a", Ok("a1"))))),
            "{first:?}"
        );
        assert_eq!(
            a_polls.load(AtomicOrdering::SeqCst),
            1,
            "b was ready: a's turn was one item"
        );
        let mut order = Vec::new();
        while let Poll::Ready(Some((_, Ok(item)))) = Pin::new(&mut fair_queue).poll_next(&mut cx) {
            order.push(item);
        }
        assert_eq!(order, ["b1", "a2", "b2", "a3"]);
    }
}
