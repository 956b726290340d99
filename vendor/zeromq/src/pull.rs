use crate::backend::GenericSocketBackend;
use crate::codec::{Message, ZmqFramedRead};
use crate::fair_queue::FairQueue;
use crate::transport::AcceptStopHandle;
use crate::util::PeerIdentity;
use crate::{
    Endpoint, MultiPeerBackend, Socket, SocketEvent, SocketOptions, SocketRecv, SocketType,
    ZmqError, ZmqMessage, ZmqResult,
};

use async_trait::async_trait;
use futures::channel::mpsc;
use futures::StreamExt;

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::sync::Arc;

pub struct PullSocket {
    backend: Arc<GenericSocketBackend>,
    fair_queue: FairQueue<ZmqFramedRead, PeerIdentity>,
    binds: HashMap<Endpoint, AcceptStopHandle>,
}

#[async_trait]
impl Socket for PullSocket {
    fn with_options(options: SocketOptions) -> Self {
        let mut fair_queue = FairQueue::new(true);
        let backend = Arc::new(GenericSocketBackend::with_options(
            Some(fair_queue.inner()),
            SocketType::PULL,
            options,
        ));

        let backend_weak = Arc::downgrade(&backend);
        fair_queue.set_on_disconnect(move |peer_id: PeerIdentity| {
            if let Some(backend) = backend_weak.upgrade() {
                backend.peer_disconnected(&peer_id);
            }
        });

        Self {
            backend,
            fair_queue,
            binds: HashMap::new(),
        }
    }

    fn backend(&self) -> Arc<dyn MultiPeerBackend> {
        self.backend.clone()
    }

    fn binds(&mut self) -> &mut HashMap<Endpoint, AcceptStopHandle, RandomState> {
        &mut self.binds
    }

    fn monitor(&mut self) -> mpsc::Receiver<SocketEvent> {
        let (sender, receiver) = mpsc::channel(1024);
        self.backend.socket_monitor.lock().replace(sender);
        receiver
    }
}

impl PullSocket {
    /// PATCH(temma): a message that is ready now, without waiting and without a future:
    /// `None` when none is (then `recv` waits for one). What a consumer reading on after a
    /// `recv` calls: the messages the fair queue's turn already read come out of memory,
    /// where `recv().now_or_never()` boxed a future (`async_trait`) and polled the queue for
    /// each. Like `recv`, it spends a unit of tokio's cooperative budget a message (and says
    /// `None` when the budget is out, so that the consumer's next `recv` yields).
    pub fn try_recv(&mut self) -> Option<ZmqResult<ZmqMessage>> {
        #[cfg(feature = "tokio-runtime")]
        let coop = {
            let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
            match tokio::task::coop::poll_proceed(&mut cx) {
                std::task::Poll::Ready(coop) => coop,
                std::task::Poll::Pending => return None,
            }
        };
        while let Some((peer_id, item)) = self.fair_queue.next_of_turn() {
            #[cfg(feature = "tokio-runtime")]
            coop.made_progress();
            match item {
                Ok(Message::Message(message)) => return Some(Ok(message)),
                // Not a message (a command): ignored, as `recv` does.
                Ok(_) => {}
                Err(e) => {
                    self.backend.peer_disconnected(&peer_id);
                    return Some(Err(e.into()));
                }
            }
        }
        futures::FutureExt::now_or_never(self.recv())
    }
}

#[async_trait]
impl SocketRecv for PullSocket {
    #[inline]
    async fn recv(&mut self) -> ZmqResult<ZmqMessage> {
        loop {
            match self.fair_queue.next().await {
                Some((_peer_id, Ok(Message::Message(message)))) => {
                    return Ok(message);
                }
                Some((_peer_id, Ok(_msg))) => {
                    // Ignore non-message frames (Command, Greeting) as PULL sockets are designed to only receive actual messages, not internal protocol frames.
                }
                Some((peer_id, Err(e))) => {
                    self.backend.peer_disconnected(&peer_id);
                    // Handle potential errors from the fair queue
                    return Err(e.into());
                }
                None => {
                    // The fair queue is empty, which shouldn't happen in normal operation
                    return Err(ZmqError::NoMessage);
                }
            };
        }
    }
}

// PATCH(temma): the tests below.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PushSocket, SocketSend};

    /// Over TCP: messages taken with `try_recv` after a `recv` come in the order sent, none
    /// lost or repeated, and `try_recv` says `None` (it does not wait) once nothing is read.
    #[tokio::test]
    async fn try_recv_takes_what_is_ready_in_order_and_does_not_wait() {
        let mut pull = PullSocket::new();
        let endpoint = pull.bind("tcp://127.0.0.1:0").await.unwrap();
        let mut push = PushSocket::new();
        push.connect(&endpoint.to_string()).await.unwrap();
        assert!(pull.try_recv().is_none(), "nothing sent yet");
        const COUNT: usize = 1000;
        for i in 0..COUNT {
            push.send(ZmqMessage::from(i.to_string())).await.unwrap();
        }
        let mut received = Vec::new();
        let mut taken_without_waiting = 0;
        while received.len() < COUNT {
            let message = tokio::time::timeout(std::time::Duration::from_secs(10), pull.recv())
                .await
                .expect("the messages arrive")
                .unwrap();
            received.push(String::try_from(message).unwrap());
            while let Some(message) = pull.try_recv() {
                received.push(String::try_from(message.unwrap()).unwrap());
                taken_without_waiting += 1;
            }
        }
        let expected: Vec<String> = (0..COUNT).map(|i| i.to_string()).collect();
        assert_eq!(received, expected);
        assert!(
            taken_without_waiting > 0,
            "a thousand messages sent at once: some were ready after a recv"
        );
        assert!(pull.try_recv().is_none(), "all taken");
    }
}
