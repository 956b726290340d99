use crate::backend::GenericSocketBackend;
use crate::codec::*;
use crate::endpoint::Endpoint;
use crate::error::{ZmqError, ZmqResult};
use crate::fair_queue::FairQueue;
use crate::message::*;
use crate::transport::AcceptStopHandle;
use crate::util::PeerIdentity;
use crate::{MultiPeerBackend, SocketEvent, SocketOptions, SocketRecv, SocketSend, SocketType};
use crate::{Socket, SocketBackend};

use async_trait::async_trait;
use futures::channel::mpsc;
use futures::StreamExt;

use std::collections::HashMap;
use std::convert::TryInto;
use std::sync::Arc;

pub struct RouterSocket {
    backend: Arc<GenericSocketBackend>,
    binds: HashMap<Endpoint, AcceptStopHandle>,
    fair_queue: FairQueue<ZmqFramedRead, PeerIdentity>,
}

impl Drop for RouterSocket {
    fn drop(&mut self) {
        self.backend.shutdown();
    }
}

#[async_trait]
impl Socket for RouterSocket {
    fn with_options(options: SocketOptions) -> Self {
        let mut fair_queue = FairQueue::new(true);
        let backend = Arc::new(GenericSocketBackend::with_options(
            Some(fair_queue.inner()),
            SocketType::ROUTER,
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
            binds: HashMap::new(),
            fair_queue,
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

#[async_trait]
impl SocketRecv for RouterSocket {
    async fn recv(&mut self) -> ZmqResult<ZmqMessage> {
        loop {
            match self.fair_queue.next().await {
                Some((peer_id, Ok(Message::Message(mut message)))) => {
                    message.push_front(peer_id.into());
                    return Ok(message);
                }
                Some((_peer_id, Ok(_msg))) => {
                    // todo: Log or handle other message types if needed
                    // We could take an approach of using `tracing` and have that be an optional feature
                    // tracing::warn!("Received unimplemented message type: {:?}", msg);
                }
                Some((peer_id, Err(_e))) => {
                    self.backend.peer_disconnected(&peer_id);
                    // We could take an approach of using `tracing` and have that be an optional feature
                    // tracing::error!("Error receiving message from peer {}: {:?}", peer_id, e);
                }
                None => {
                    // The fair queue is empty, which shouldn't happen in normal operation
                    return Err(ZmqError::NoMessage);
                }
            };
        }
    }
}

#[async_trait]
impl SocketSend for RouterSocket {
    async fn send(&mut self, mut message: ZmqMessage) -> ZmqResult<()> {
        if message.len() <= 1 {
            return Err(ZmqError::Socket(
                "ROUTER send requires at least 2 frames: identity frame + message",
            ));
        }
        let peer_id: PeerIdentity = message.pop_front().unwrap().try_into()?;
        self.backend
            .send_to_peer(&peer_id, Message::Message(message))
            .await
    }
}

impl RouterSocket {
    /// PATCH(temma): sends without waiting (libzmq's `ZMQ_DONTWAIT`): the first frame names the
    /// peer, as for `send`. When the peer's send queue is full (see
    /// `SocketOptions::send_queue_capacity`) the message comes back in
    /// `ZmqError::ReturnToSender`, identity frame first, so that one slow peer need not hold
    /// up the sends to the others.
    pub fn try_send(&mut self, mut message: ZmqMessage) -> ZmqResult<()> {
        if message.len() <= 1 {
            return Err(ZmqError::Socket(
                "ROUTER send requires at least 2 frames: identity frame + message",
            ));
        }
        let identity = message.pop_front().unwrap();
        let peer_id: PeerIdentity = identity.clone().try_into()?;
        match self.backend.try_send_to_peer(&peer_id, message) {
            Err(ZmqError::ReturnToSender {
                reason,
                mut message,
            }) => {
                message.push_front(identity);
                Err(ZmqError::ReturnToSender { reason, message })
            }
            other => other,
        }
    }

    /// Splits the socket into separate send and recv halves, allowing concurrent
    /// sending and receiving from independent async tasks.
    ///
    /// The underlying socket stays alive until both halves are dropped.
    pub fn split(mut self) -> (RouterSendHalf, RouterRecvHalf) {
        let backend = std::mem::replace(
            &mut self.backend,
            Arc::new(GenericSocketBackend::with_options(
                None,
                SocketType::ROUTER,
                SocketOptions::default(),
            )),
        );
        let fair_queue = std::mem::replace(&mut self.fair_queue, FairQueue::new(true));
        let binds = std::mem::take(&mut self.binds);

        let inner = Arc::new(RouterSocketInner {
            backend,
            _binds: binds,
        });

        (
            RouterSendHalf {
                inner: inner.clone(),
            },
            RouterRecvHalf { inner, fair_queue },
        )
    }
}

struct RouterSocketInner {
    backend: Arc<GenericSocketBackend>,
    _binds: HashMap<Endpoint, AcceptStopHandle>,
}

impl Drop for RouterSocketInner {
    fn drop(&mut self) {
        self.backend.shutdown();
    }
}

/// The send half of a [`RouterSocket`] produced by [`RouterSocket::split`].
///
/// This half can be cloned to send from multiple async tasks concurrently.
#[derive(Clone)]
pub struct RouterSendHalf {
    inner: Arc<RouterSocketInner>,
}

/// The recv half of a [`RouterSocket`] produced by [`RouterSocket::split`].
pub struct RouterRecvHalf {
    inner: Arc<RouterSocketInner>,
    fair_queue: FairQueue<ZmqFramedRead, PeerIdentity>,
}

#[async_trait]
impl SocketSend for RouterSendHalf {
    async fn send(&mut self, mut message: ZmqMessage) -> ZmqResult<()> {
        if message.len() <= 1 {
            return Err(ZmqError::Socket(
                "ROUTER send requires at least 2 frames: identity frame + message",
            ));
        }
        let peer_id: PeerIdentity = message.pop_front().unwrap().try_into()?;
        self.inner
            .backend
            .send_to_peer(&peer_id, Message::Message(message))
            .await
    }
}

#[async_trait]
impl SocketRecv for RouterRecvHalf {
    async fn recv(&mut self) -> ZmqResult<ZmqMessage> {
        loop {
            match self.fair_queue.next().await {
                Some((peer_id, Ok(Message::Message(mut message)))) => {
                    message.push_front(peer_id.into());
                    return Ok(message);
                }
                Some((_peer_id, Ok(_))) => {}
                Some((peer_id, Err(_e))) => {
                    self.inner.backend.peer_disconnected(&peer_id);
                }
                None => {
                    return Err(ZmqError::NoMessage);
                }
            };
        }
    }
}

// PATCH(temma): the test below.
#[cfg(all(test, feature = "tokio-runtime"))]
mod tests {
    use super::*;
    use crate::{Socket, SocketOptions, SocketRecv, SocketSend};
    use std::io::Write;
    use std::time::Duration;

    /// A raw ZMTP 3.0 peer (NULL mechanism, DEALER) that sends one message and never reads.
    fn silent_dealer(port: u16) -> std::net::TcpStream {
        let mut bytes = vec![0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0x7f, 3, 0];
        bytes.extend_from_slice(b"NULL");
        bytes.resize(64, 0);
        let mut ready = vec![5];
        ready.extend_from_slice(b"READY");
        ready.push(11);
        ready.extend_from_slice(b"Socket-Type");
        ready.extend_from_slice(&6u32.to_be_bytes());
        ready.extend_from_slice(b"DEALER");
        bytes.extend_from_slice(&[0x04, ready.len() as u8]);
        bytes.extend_from_slice(&ready);
        bytes.extend_from_slice(&[0x00, 2, b'h', b'i']);
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(&bytes).unwrap();
        stream
    }

    /// How many 1 MB messages go to a peer that never reads before a send waits (at most 64).
    async fn sent_before_waiting(capacity: Option<usize>) -> usize {
        let mut options = SocketOptions::default();
        options.send_queue_capacity(capacity);
        let mut router = RouterSocket::with_options(options);
        let endpoint = router.bind("tcp://127.0.0.1:0").await.unwrap();
        let port = match endpoint {
            crate::Endpoint::Tcp(_, port) => port,
            other => panic!("{other:?}"),
        };
        let _peer = silent_dealer(port);
        let hello = router.recv().await.unwrap();
        let identity = hello.get(0).unwrap().clone();
        let big = bytes::Bytes::from(vec![7u8; 1 << 20]);
        for sent in 0..64 {
            let mut message = ZmqMessage::from(identity.clone());
            message.push_back(big.clone());
            let send = router.send(message);
            if tokio::time::timeout(Duration::from_secs(1), send)
                .await
                .is_err()
            {
                return sent;
            }
        }
        64
    }

    #[tokio::test]
    async fn a_peer_that_never_reads_holds_at_most_the_send_queue_capacity() {
        // Past a few messages (the capacity, the writer's buffer, the kernel's), sends wait.
        assert!(sent_before_waiting(Some(2)).await < 32);
        // Without the option, all 64 MB are queued for a peer that reads nothing.
        assert_eq!(sent_before_waiting(None).await, 64);
    }

    #[tokio::test]
    async fn try_send_gives_the_message_back_when_one_peer_is_full_and_reaches_the_others() {
        let mut options = SocketOptions::default();
        options.send_queue_capacity(Some(2));
        let mut router = RouterSocket::with_options(options);
        let endpoint = router.bind("tcp://127.0.0.1:0").await.unwrap();
        let crate::Endpoint::Tcp(_, port) = endpoint else {
            panic!("{endpoint:?}")
        };
        let _silent = silent_dealer(port);
        let silent = router.recv().await.unwrap().get(0).unwrap().clone();
        let mut reader = crate::DealerSocket::new();
        reader
            .connect(&format!("tcp://127.0.0.1:{port}"))
            .await
            .unwrap();
        reader.send(ZmqMessage::from("hello")).await.unwrap();
        let reading = router.recv().await.unwrap().get(0).unwrap().clone();

        // The silent peer's queue fills: its message comes back whole, identity first.
        let big = bytes::Bytes::from(vec![7u8; 1 << 20]);
        let mut returned = None;
        for _ in 0..64 {
            let mut message = ZmqMessage::from(silent.clone());
            message.push_back(big.clone());
            match router.try_send(message) {
                Ok(()) => {}
                Err(ZmqError::ReturnToSender { message, .. }) => {
                    returned = Some(message);
                    break;
                }
                Err(other) => panic!("{other:?}"),
            }
        }
        let returned = returned.expect("a full queue gives the message back");
        assert_eq!(returned.len(), 2);
        assert_eq!(returned.get(0), Some(&silent));
        assert_eq!(returned.get(1).map(|b| b.len()), Some(1 << 20));

        // The other peer is still sent to at once.
        let mut message = ZmqMessage::from(reading.clone());
        message.push_back(bytes::Bytes::from_static(b"for you"));
        router.try_send(message).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), reader.recv())
            .await
            .expect("the reading peer gets its message")
            .unwrap();
        assert_eq!(got.get(0).map(|b| b.as_ref()), Some(&b"for you"[..]));

        // A peer that is not there is an error, not a message to send again.
        let mut message = ZmqMessage::from(bytes::Bytes::from_static(b"nobody"));
        message.push_back(bytes::Bytes::from_static(b"x"));
        assert!(!matches!(
            router.try_send(message),
            Ok(()) | Err(ZmqError::ReturnToSender { .. })
        ));
    }
}
