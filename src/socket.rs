//! Building zeromq sockets from [`Dsn`]s: binding, and connecting without ever blocking a caller.
//!
//! Facts about the zeromq crate (0.7) this module absorbs:
//! - `tcp://*:port` is not accepted: `*` is bound as `0.0.0.0` ([`Endpoint::zmq_address`]).
//! - ipc socket files are not removed on exit, so a re-bind fails with `AddrInUse`: a stale file
//!   (one nobody listens on) is removed first.
//! - `connect()` only returns once connected (or after its connect timeout): [`connect`] runs
//!   it with a short timeout in a retry loop that the caller's task owns and shutdown can stop.
//! - Only SUB sockets reconnect by themselves, with a backoff that reaches 30 s: every owner
//!   here rebuilds its socket instead, through [`connect`], as soon as a peer disconnects.
//! - The crate (0.7.0) reserved whatever length a peer announced, waited forever for a peer's
//!   handshake, never noticed a PUSH peer leave, and spun on accept errors. temma uses a
//!   patched copy (`vendor/zeromq/PATCHES.md`): every socket here gets a maximum message size
//!   and a handshake timeout from [`options`].
//! - A PUB socket kept every subscription a peer sent, and compared each with every message
//!   sent: the patched copy disconnects a peer past [`MAX_SUBSCRIPTIONS`].

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketOptions};

use crate::dsn::{Dsn, Endpoint, Host, Mode, SocketKind};

/// How long one connection attempt may take before the retry loop starts another.
pub const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
/// First pause between connection attempts; doubled after each failure up to the maximum.
pub const RETRY_MIN: Duration = Duration::from_millis(50);
/// Longest pause between connection attempts, so a returning broker is found within it.
pub const RETRY_MAX: Duration = Duration::from_millis(500);

/// How long a peer that connected to a bound socket may take to complete the ZMTP handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Subscriptions a PUB socket keeps for one peer (a prefix subscribed twice counts twice). A
/// web node subscribes once (`""`, as Temma's PHP subscribers do), a broker of a pair twice: a
/// peer past this is not a subscriber but a peer making the broker's memory and the cost of
/// each message it publishes grow (one subscription more for every message compared), and is
/// disconnected.
pub const MAX_SUBSCRIPTIONS: usize = 64;

/// Options for every socket temma makes: inbound messages over `max_message_bytes` disconnect
/// their peer before anything is allocated for them, a peer that does not complete its
/// handshake within [`HANDSHAKE_TIMEOUT`] is dropped, and one with more than
/// [`MAX_SUBSCRIPTIONS`] to a PUB socket too.
pub fn options(max_message_bytes: usize) -> SocketOptions {
    let mut options = SocketOptions::default();
    options
        .max_message_size(Some(max_message_bytes))
        .handshake_timeout(Some(HANDSHAKE_TIMEOUT))
        .max_subscriptions(Some(MAX_SUBSCRIPTIONS));
    options
}

/// Counts the peers of a bound socket from its monitor until the socket is gone: `peers` goes
/// up and down with handshakes and disconnections, `refused` counts peers dropped before or
/// during their handshake (timeouts, protocol errors).
pub async fn count_peers(
    mut events: impl futures_util::Stream<Item = zeromq::SocketEvent> + Unpin,
    peers: prometheus_client::metrics::gauge::Gauge,
    refused: prometheus_client::metrics::counter::Counter,
    shutdown: CancellationToken,
) {
    use futures_util::StreamExt;
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = events.next() => event,
        };
        let Some(event) = event else { return };
        match event {
            zeromq::SocketEvent::Accepted(..) => {
                peers.inc();
            }
            zeromq::SocketEvent::Disconnected(_) => {
                peers.dec();
            }
            zeromq::SocketEvent::AcceptFailed(error) => {
                refused.inc();
                tracing::debug!(%error, "ZeroMQ peer refused");
            }
            _ => {}
        }
    }
}

/// Binding or preparing a socket failed.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "cannot bind `{endpoint}` ({dsn}): {source}{}",
        if matches!(source, zeromq::ZmqError::Network(e) if e.kind() == std::io::ErrorKind::AddrInUse) {
            "; another process holds it (a `temma broker`, or a `temma serve` with `[broker] \
             embedded = true`): stop it, set `[broker] embedded = false` if a broker already \
             runs, or change the data source"
        } else {
            ""
        }
    )]
    Bind {
        dsn: String,
        endpoint: String,
        source: zeromq::ZmqError,
    },
    #[error("cannot bind `{endpoint}` ({dsn}): another process listens on this ipc socket")]
    IpcInUse { dsn: String, endpoint: String },
    #[error("`{dsn}` must bind (`zmq-bind://`) to be bound")]
    NotABind { dsn: String },
}

/// Whether two bind endpoints would collide. `*:p` collides with any host on port `p`;
/// port 0 never collides (the system picks a free port each time).
pub fn overlaps(a: &Endpoint, b: &Endpoint) -> bool {
    match (a, b) {
        (Endpoint::Ipc(a), Endpoint::Ipc(b)) => a == b,
        (
            Endpoint::Tcp {
                host: host_a,
                port: port_a,
            },
            Endpoint::Tcp {
                host: host_b,
                port: port_b,
            },
        ) => {
            *port_a != 0
                && port_a == port_b
                && (host_a == host_b || *host_a == Host::Any || *host_b == Host::Any)
        }
        _ => false,
    }
}

/// The addresses actually bound for configured endpoints, so that a connect DSN naming port 0
/// in the same process follows the port the system picked.
#[derive(Debug, Clone, Default)]
pub struct Addresses {
    addresses: HashMap<(SocketKind, Endpoint), String>,
}

/// The socket type a connecting socket talks to.
pub fn peer_kind(kind: SocketKind) -> SocketKind {
    match kind {
        SocketKind::Push => SocketKind::Pull,
        SocketKind::Pull => SocketKind::Push,
        SocketKind::Pub => SocketKind::Sub,
        SocketKind::Sub => SocketKind::Pub,
        SocketKind::Req => SocketKind::Rep,
        SocketKind::Rep => SocketKind::Req,
        SocketKind::Router => SocketKind::Dealer,
        SocketKind::Dealer => SocketKind::Router,
    }
}

impl Addresses {
    /// Every address a DSN connects to. An endpoint with port 0 follows the port the system
    /// picked for the same endpoint bound in this process by a socket of the peer type (a PUSH
    /// follows the PULL, a SUB the PUB).
    pub fn targets(&self, dsn: &Dsn) -> Vec<String> {
        let peer = peer_kind(dsn.kind);
        dsn.endpoints
            .iter()
            .map(
                |endpoint| match self.addresses.get(&(peer, endpoint.clone())) {
                    Some(address) if endpoint.port() == Some(0) => address.clone(),
                    _ => endpoint.zmq_address(),
                },
            )
            .collect()
    }

    /// Where a bound DSN actually listens.
    pub fn listening(&self, dsn: &Dsn) -> Vec<String> {
        dsn.endpoints
            .iter()
            .filter_map(|endpoint| self.addresses.get(&(dsn.kind, endpoint.clone())).cloned())
            .collect()
    }

    fn record(&mut self, kind: SocketKind, endpoint: &Endpoint, bound: &zeromq::Endpoint) {
        self.addresses
            .insert((kind, endpoint.clone()), bound.to_string());
    }
}

/// Binds every endpoint of `dsn` on `socket`, recording the resolved addresses in `bound`.
pub async fn bind<S: Socket>(
    socket: &mut S,
    dsn: &Dsn,
    bound: &mut Addresses,
) -> Result<(), SocketError> {
    if dsn.mode != Mode::Bind {
        return Err(SocketError::NotABind {
            dsn: dsn.to_string(),
        });
    }
    for endpoint in &dsn.endpoints {
        if let Endpoint::Ipc(path) = endpoint {
            remove_stale_ipc(dsn, endpoint, path)?;
        }
        let resolved = socket
            .bind(&endpoint.zmq_address())
            .await
            .map_err(|source| SocketError::Bind {
                dsn: dsn.to_string(),
                endpoint: endpoint.to_string(),
                source,
            })?;
        tracing::info!(dsn = %dsn, endpoint = %resolved, "bound ZeroMQ socket");
        bound.record(dsn.kind, endpoint, &resolved);
    }
    Ok(())
}

/// Removes an ipc socket file left by a process that is gone; refuses one that is in use.
fn remove_stale_ipc(
    dsn: &Dsn,
    endpoint: &Endpoint,
    path: &std::path::Path,
) -> Result<(), SocketError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !metadata.file_type().is_socket() {
        return Ok(()); // Not ours to remove: let the bind report the problem.
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(SocketError::IpcInUse {
            dsn: dsn.to_string(),
            endpoint: endpoint.to_string(),
        });
    }
    tracing::info!(path = %path.display(), "removing stale ipc socket file");
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Socket options for sockets that connect: [`options`], and a short connect timeout, so that
/// [`connect`]'s own loop (not the crate's 30 s backoff) paces the retries.
pub fn connect_options(max_message_bytes: usize) -> SocketOptions {
    let mut options = options(max_message_bytes);
    options.connect_timeout(CONNECT_ATTEMPT_TIMEOUT);
    options
}

/// Builds a socket with `make` and connects it to every address, retrying with a short backoff
/// until all are connected. Returns `None` if `shutdown` fires first.
///
/// `what` names the socket in logs. The first failure is logged at WARN, later ones at DEBUG,
/// and the recovery at INFO.
pub async fn connect<S, F>(
    make: F,
    addresses: &[String],
    what: &str,
    shutdown: &CancellationToken,
) -> Option<S>
where
    S: Socket,
    F: Fn() -> S,
{
    let mut delay = RETRY_MIN;
    let mut failures = 0u32;
    loop {
        let mut socket = make();
        let mut failed = None;
        for address in addresses {
            let attempt = tokio::select! {
                result = socket.connect(address) => result,
                () = shutdown.cancelled() => return None,
            };
            if let Err(error) = attempt {
                failed = Some((address, error));
                break;
            }
        }
        match failed {
            None => {
                if failures > 0 {
                    tracing::info!(socket = what, addresses = ?addresses, "ZeroMQ socket connected again");
                } else {
                    tracing::info!(socket = what, addresses = ?addresses, "ZeroMQ socket connected");
                }
                return Some(socket);
            }
            Some((address, error)) => {
                if failures == 0 {
                    tracing::warn!(socket = what, %address, %error, "cannot connect ZeroMQ socket; retrying (is the broker running? start it with `temma broker`, or set `[broker] embedded = true`)");
                } else {
                    tracing::debug!(socket = what, %address, %error, "ZeroMQ connect retry failed");
                }
                failures += 1;
            }
        }
        drop(socket);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return None,
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeromq::{PullSocket, PushSocket, SocketRecv, SocketSend, ZmqMessage};

    fn tcp(host: Host, port: u16) -> Endpoint {
        Endpoint::Tcp { host, port }
    }

    #[test]
    fn overlapping_binds() {
        let local = Host::V4(std::net::Ipv4Addr::LOCALHOST);
        assert!(overlaps(
            &tcp(local.clone(), 5000),
            &tcp(local.clone(), 5000)
        ));
        assert!(overlaps(&tcp(Host::Any, 5000), &tcp(local.clone(), 5000)));
        assert!(!overlaps(
            &tcp(local.clone(), 5000),
            &tcp(local.clone(), 5001)
        ));
        assert!(!overlaps(&tcp(local.clone(), 0), &tcp(local.clone(), 0)));
        assert!(overlaps(
            &Endpoint::Ipc("/a".into()),
            &Endpoint::Ipc("/a".into())
        ));
        assert!(!overlaps(&Endpoint::Ipc("/a".into()), &tcp(local, 5000)));
    }

    #[tokio::test]
    async fn bind_port_zero_then_connect_follows_it() {
        let dsn: Dsn = "zmq-bind://PULL@127.0.0.1:0".parse().unwrap();
        let mut bound = Addresses::default();
        let mut pull = PullSocket::new();
        bind(&mut pull, &dsn, &mut bound).await.unwrap();
        let target: Dsn = "zmq://PUSH@127.0.0.1:0".parse().unwrap();
        let addresses = bound.targets(&target);
        assert_ne!(addresses[0], "tcp://127.0.0.1:0");
        let shutdown = CancellationToken::new();
        let mut push: PushSocket = connect(
            || PushSocket::with_options(connect_options(1024)),
            &addresses,
            "test",
            &shutdown,
        )
        .await
        .unwrap();
        push.send(ZmqMessage::from("hello")).await.unwrap();
        let got = pull.recv().await.unwrap();
        assert_eq!(got.get(0).unwrap().as_ref(), b"hello");
    }

    #[tokio::test]
    async fn connect_waits_for_a_late_bind_and_stops_on_shutdown() {
        // A free port: bind, read it, release it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("tcp://127.0.0.1:{port}");
        let shutdown = CancellationToken::new();
        let addresses = vec![address.clone()];
        let connecting = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                connect(
                    || PushSocket::with_options(connect_options(1024)),
                    &addresses,
                    "test",
                    &shutdown,
                )
                .await
                .is_some()
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut pull = PullSocket::new();
        pull.bind(&address).await.unwrap();
        assert!(connecting.await.unwrap(), "connect found the late bind");

        let unreachable = vec!["tcp://127.0.0.1:1".to_owned()];
        let stopper = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            stopper.cancel();
        });
        let socket: Option<PushSocket> = connect(
            || PushSocket::with_options(connect_options(1024)),
            &unreachable,
            "test",
            &shutdown,
        )
        .await;
        assert!(socket.is_none(), "shutdown ends the retry loop");
    }

    #[tokio::test]
    async fn stale_ipc_file_is_replaced_and_live_one_refused() {
        let dir = std::env::temp_dir().join(format!("temma-ipc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stale.sock");
        let _ = std::fs::remove_file(&path);
        // A socket file nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let dsn: Dsn = format!("zmq-bind://PULL@ipc://{}", path.display())
            .parse()
            .unwrap();
        let mut pull = PullSocket::new();
        bind(&mut pull, &dsn, &mut Addresses::default())
            .await
            .unwrap();
        // Now it is live: a second bind is refused with a clear error.
        let mut second = PullSocket::new();
        let error = bind(&mut second, &dsn, &mut Addresses::default())
            .await
            .unwrap_err();
        assert!(matches!(error, SocketError::IpcInUse { .. }), "{error}");
        drop(pull);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
