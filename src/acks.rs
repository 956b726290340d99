//! Acknowledgements: how a web node learns what became of each message it sent.
//!
//! The node tags each message with a secret reference ([`Acks::register`]); the hub, which
//! reads everything the broker publishes, hands each reference it sees back
//! ([`Acks::resolve`]): published, refused by a script (with its reason and status), or
//! published already (a repeated idempotency key). A POST waits on its [`Registration`], and
//! dropping it (answered, timed out, client gone) forgets the reference.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::RngExt;
use tokio::sync::oneshot;

/// What became of a message a node sent, as reported back by the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ack {
    /// Published, with its id when the broker gave one.
    Published(Option<crate::wire::MsgId>),
    Rejected {
        reason: String,
        status: u16,
    },
}

/// Messages this node sent and still waits for, by reference. A reference is
/// `<node>-<secret>`: a random node id, so that each node recognises its own messages among
/// those every node receives, and 128 random bits per message, so that nobody can guess the
/// reference of another sender's next message and forge its outcome. References are never
/// sent to browsers.
pub struct Acks {
    node: String,
    pending: Mutex<HashMap<u128, oneshot::Sender<Ack>>>,
}

impl Default for Acks {
    fn default() -> Self {
        Acks {
            node: format!("{:016x}", rand::rng().random::<u64>()),
            pending: Mutex::new(HashMap::new()),
        }
    }
}

impl Acks {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A new reference to tag a message with, and where its outcome will arrive. Dropping the
    /// registration (the request answered, timed out, or its client went away) forgets it.
    pub fn register(self: &Arc<Self>) -> Registration {
        let (tx, rx) = oneshot::channel();
        let mut pending = self.lock();
        let secret = loop {
            let secret = rand::rng().random::<u128>();
            if !pending.contains_key(&secret) {
                break secret;
            }
        };
        pending.insert(secret, tx);
        drop(pending);
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
        let Some((node, secret)) = reference.rsplit_once('-') else {
            return;
        };
        if node != self.node || secret.len() != 32 {
            return;
        }
        let mut bytes = [0u8; 16];
        if hex::decode_to_slice(secret, &mut bytes).is_err() {
            return;
        }
        let secret = u128::from_be_bytes(bytes);
        if let Some(tx) = self.lock().remove(&secret) {
            let _ = tx.send(ack);
        }
    }

    fn forget(&self, secret: u128) {
        self.lock().remove(&secret);
    }

    /// Messages still waiting for their outcome.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u128, oneshot::Sender<Ack>>> {
        crate::error::lock(&self.pending)
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
        let mut registration = acks.register();
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
        let abandoned = acks.register();
        assert_eq!(acks.pending(), 1);
        drop(abandoned);
        assert_eq!(acks.pending(), 0);
        acks.resolve("garbage", Ack::Published(None));
    }

    #[tokio::test]
    async fn a_reference_is_the_node_and_32_hex_digits_and_only_its_own_resolves_it() {
        let acks = Acks::new();
        let mut registration = acks.register();
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
