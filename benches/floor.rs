//! `temma-floor`: the least an SSE fan-out server can spend per message and per delivery on
//! this machine, to measure temma and its peers against.
//!
//! No framework, no broker, no history, no queue, no slow-consumer policy: any `GET` is a
//! subscriber (the response head, then the connection is kept); a `POST` with a
//! `Content-Length` body is written as one `data:` line to every subscriber, one `send` each
//! (or all in one system call with `--io-uring`, as temma's writer shards do), from the task
//! that read it, then answered `200` on its keep-alive connection. A subscriber
//! whose socket does not take a frame whole is dropped (the floor does not queue). One thread
//! by default (`--threads N`: tokio's multi-threaded runtime with N workers); `--tasks`: each
//! subscriber's own task writes, woken through a broadcast channel. Loopback only.
//!
//! ```sh
//! cargo build --release --example temma-floor --example temma-load
//! target/release/examples/temma-floor --listen 127.0.0.1:8093 &
//! target/release/examples/temma-load --subscribe http://127.0.0.1:8093/sub \
//!   --publish http://127.0.0.1:8093/pub --pid $! --subscribers 10 --rate 50 --messages 500
//! ```
//!
//! `benches/workers.sh` runs it beside temma and Nchan (`FLOOR_SETTINGS`).

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
#[command(name = "temma-floor", about = "The least an SSE fan-out server can do")]
struct Args {
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:8093")]
    listen: SocketAddr,
    /// Worker threads: 1 is a single-threaded runtime; more is tokio's multi-threaded one.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Each subscriber's own task writes its frames, woken through a `tokio::sync::broadcast`
    /// channel (as temma's SSE connections are), instead of the publishing task writing to
    /// every subscriber in turn: what a task per connection costs.
    #[arg(long)]
    tasks: bool,
    /// The publishing task hands its writes to the kernel in one system call (io_uring, as
    /// temma's writer shards do with `event.io_uring`), instead of one `send` each.
    #[arg(long, conflicts_with = "tasks")]
    io_uring: bool,
}

/// The subscribers, by a number each: the publishing task writes to them all.
type Subscribers = Arc<Mutex<Vec<(u64, Arc<TcpStream>)>>>;

/// Where a POST's frame goes: written to every subscriber by the task that read it, or sent
/// on a channel every subscriber's task reads (`--tasks`).
#[derive(Clone)]
enum Fanout {
    /// The subscribers, and whether their writes go in one system call.
    Inline(Subscribers, bool),
    Tasks(tokio::sync::broadcast::Sender<Arc<[u8]>>),
}

const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
    cache-control: no-cache\r\n\r\n:ok\n\n";
const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
/// The largest head or body read; more is refused (the connection is closed).
const MAX_BYTES: usize = 64 * 1024;

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(async move {
        let listener = TcpListener::bind(args.listen).await?;
        eprintln!("temma-floor listening on {}", listener.local_addr()?);
        let fanout = if args.tasks {
            Fanout::Tasks(tokio::sync::broadcast::channel(1024).0)
        } else {
            Fanout::Inline(Subscribers::default(), args.io_uring)
        };
        let mut next = 0u64;
        loop {
            let (socket, _) = listener.accept().await?;
            socket.set_nodelay(true)?;
            next += 1;
            tokio::spawn(connection(socket, next, fanout.clone()));
        }
    })
}

/// Serves one connection: POSTs in turn until it closes or sends a `GET`, which makes it a
/// subscriber until it closes.
async fn connection(mut socket: TcpStream, number: u64, fanout: Fanout) {
    let mut buffer = Vec::with_capacity(4096);
    loop {
        let Some((head_len, is_get, body_len)) = read_head(&mut socket, &mut buffer).await else {
            return;
        };
        if is_get {
            if socket.write_all(SSE_HEAD).await.is_err() {
                return;
            }
            let socket = Arc::new(socket);
            // A subscriber sends nothing more: anything, or the end, closes it.
            let mut probe = [0u8; 64];
            let closed = std::future::poll_fn(|cx| {
                let mut read = tokio::io::ReadBuf::new(&mut probe);
                socket.poll_peek(cx, &mut read)
            });
            match &fanout {
                Fanout::Inline(subscribers, _) => {
                    lock(subscribers).push((number, socket.clone()));
                    let _ = closed.await;
                    lock(subscribers).retain(|(n, _)| *n != number);
                }
                Fanout::Tasks(sender) => {
                    let mut frames = sender.subscribe();
                    tokio::pin!(closed);
                    loop {
                        tokio::select! {
                            biased;
                            frame = frames.recv() => match frame {
                                Ok(frame) if matches!(socket.try_write(&frame), Ok(n) if n == frame.len()) => {}
                                _ => return,
                            },
                            _ = &mut closed => return,
                        }
                    }
                }
            }
            return;
        }
        while buffer.len() < head_len + body_len {
            if !read_more(&mut socket, &mut buffer).await {
                return;
            }
        }
        let mut frame = Vec::with_capacity(body_len + 8);
        frame.extend_from_slice(b"data: ");
        frame.extend_from_slice(&buffer[head_len..head_len + body_len]);
        frame.extend_from_slice(b"\n\n");
        buffer.drain(..head_len + body_len);
        match &fanout {
            Fanout::Inline(subscribers, batch) => {
                let mut subscribers = lock(subscribers);
                let sends: Vec<_> = subscribers
                    .iter()
                    .map(|(_, subscriber)| temma::uring::Send {
                        socket: subscriber.as_fd(),
                        bytes: &frame,
                    })
                    .collect();
                let mut results = Vec::with_capacity(sends.len());
                temma::uring::send_all(&sends, *batch, &mut results);
                let mut taken = results
                    .into_iter()
                    .map(|result| matches!(result, Ok(n) if n == frame.len()));
                subscribers.retain(|_| taken.next().unwrap_or(false));
            }
            Fanout::Tasks(sender) => {
                let _ = sender.send(frame.into());
            }
        }
        if socket.write_all(OK).await.is_err() {
            return;
        }
    }
}

fn lock(subscribers: &Subscribers) -> std::sync::MutexGuard<'_, Vec<(u64, Arc<TcpStream>)>> {
    subscribers
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads until `buffer` starts with a whole request head: its length, whether it is a `GET`,
/// and its body's length. `None` when the connection ends or sends something else.
async fn read_head(socket: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<(usize, bool, usize)> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(buffer) {
            Ok(httparse::Status::Complete(head_len)) => {
                let is_get = request.method == Some("GET");
                let body_len = request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                    .unwrap_or(0);
                return (body_len <= MAX_BYTES).then_some((head_len, is_get, body_len));
            }
            Ok(httparse::Status::Partial) if buffer.len() < MAX_BYTES => {
                if !read_more(socket, buffer).await {
                    return None;
                }
            }
            _ => return None,
        }
    }
}

async fn read_more(socket: &mut TcpStream, buffer: &mut Vec<u8>) -> bool {
    buffer.reserve(4096);
    matches!(socket.read_buf(buffer).await, Ok(n) if n > 0)
}
