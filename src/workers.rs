//! The moderation chain on several threads (`broker.script_workers`), for when the chain is
//! the broker's bottleneck.
//!
//! Each worker is an OS thread with its own copy of the chain: its own compiled scripts and
//! their own `this`. A message goes to the worker its sender hashes to (its `client`, the
//! address the web node saw, else its `from`), so one sender's messages are moderated in the
//! order they came, by the same copy of each script: per-sender state such as a rate limit is
//! exact. State shared by all senders (a global counter) is kept per worker.
//!
//! The broker task parses and queues; the worker runs the chain and hands the verdict back;
//! the broker task stamps the id (ids stay dense in publishing order) and publishes. Messages
//! of different senders may be published in another order than they came, as if they had
//! come a little later or sooner; one sender's never are.
//!
//! # Queues
//!
//! Each worker's queue holds [`QUEUE`] messages; when it is full the broker task waits, and so
//! stops reading PULL: the web nodes' PUSH queues fill, then their `publish_timeout_ms`
//! answers 503 (nothing is dropped silently). The verdicts' queue is unbounded in type but
//! bounded by what is in flight: at most `workers × QUEUE` messages. Reloads travel on the
//! same queues, so each worker swaps between two messages, as the single chain does.

use std::hash::BuildHasher;

use rhai::Map;
use tokio::sync::mpsc;

use crate::script::{Chain, Reload, Verdict};

/// Messages waiting for one worker.
pub const QUEUE: usize = 256;
/// The most worker threads `broker.script_workers` may ask for.
pub const MAX_WORKERS: usize = 64;

/// A message for the chain, and what the broker needs back with its verdict.
pub struct Job {
    pub map: Map,
    /// Its idempotency key, committed (or found a duplicate) when it is published.
    pub key: Option<String>,
    /// Its sender's reference (`ref`), to answer a duplicate found after the chain.
    pub reference: Option<String>,
}

/// What the chain made of a [`Job`].
pub struct Done {
    pub verdict: Verdict,
    pub key: Option<String>,
    pub reference: Option<String>,
}

enum Task {
    Message(Job),
    Reload(Reload),
}

/// The worker threads and their queues. Dropping it stops the threads once their queues are
/// empty.
pub struct Workers {
    queues: Vec<mpsc::Sender<Task>>,
    hasher: std::collections::hash_map::RandomState,
}

impl Workers {
    /// Starts one thread per chain (each a copy of the same chain); verdicts come on the
    /// returned receiver.
    pub fn start(chains: Vec<Chain>) -> (Workers, mpsc::UnboundedReceiver<Done>) {
        let (done_tx, done) = mpsc::unbounded_channel();
        let queues = chains
            .into_iter()
            .enumerate()
            .map(|(index, mut chain)| {
                let (tx, mut rx) = mpsc::channel::<Task>(QUEUE);
                let done_tx = done_tx.clone();
                std::thread::Builder::new()
                    .name(format!("temma-script-{index}"))
                    .spawn(move || {
                        while let Some(task) = rx.blocking_recv() {
                            match task {
                                Task::Message(Job {
                                    map,
                                    key,
                                    reference,
                                }) => {
                                    let verdict = chain.run(map);
                                    let done = Done {
                                        verdict,
                                        key,
                                        reference,
                                    };
                                    if done_tx.send(done).is_err() {
                                        return;
                                    }
                                }
                                Task::Reload(reload) => chain.apply(reload),
                            }
                        }
                    })
                    .expect("a script worker thread starts");
                tx
            })
            .collect();
        (
            Workers {
                queues,
                hasher: std::collections::hash_map::RandomState::new(),
            },
            done,
        )
    }

    pub fn len(&self) -> usize {
        self.queues.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// The worker a message goes to: by its sender, so that one sender's stay in order.
    fn worker_of(&self, map: &Map) -> usize {
        let sender = map
            .get(crate::wire::CLIENT)
            .or_else(|| map.get("from"))
            .and_then(|value| value.read_lock::<rhai::ImmutableString>())
            .map(|name| self.hasher.hash_one(name.as_str()))
            .unwrap_or(0);
        (sender % self.queues.len() as u64) as usize
    }

    /// Queues a message for its sender's worker; waits while that worker's queue is full.
    pub async fn submit(&self, job: Job) {
        let worker = self.worker_of(&job.map);
        // A worker only stops when the queues are dropped: sending cannot fail before.
        let _ = self.queues[worker].send(Task::Message(job)).await;
    }

    /// Hands each worker its copy of a reload, after the messages queued before it.
    pub async fn reload(&self, reload: Reload) {
        for (queue, reload) in self.queues.iter().zip(reload.split()) {
            let _ = queue.send(Task::Reload(reload)).await;
        }
    }
}
