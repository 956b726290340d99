//! Sends to many sockets in one system call: a writer shard's pass hands the kernel every
//! client's `send` at once through io_uring, instead of one `send` each.
//!
//! Why: on a machine whose CPUs are shared with the clients, each `send` that wakes a reader
//! lets the scheduler switch to it when the call returns, and back: at 10 clients a message cost
//! about six such switches (BENCHMARKS.md, "io_uring"). One call for all of them returns once.
//!
//! Each worker thread has its own small ring (made on its first batch). Every send is
//! `MSG_DONTWAIT`: it completes in the call, as a plain non-blocking `send` would (bytes
//! taken, some of them, or `WouldBlock`), and the call returns only once every send of the
//! batch has its completion. Where the kernel has no io_uring, or refuses it (a container's
//! seccomp profile), or `event.io_uring = false`, each send is a plain `send`.
//!
//! This is the crate's one module with `unsafe` code: handing the kernel a pointer to bytes is
//! what io_uring is. The bytes are borrowed for the whole call, and the call does not return
//! while the kernel may still read them (see [`Ring::send`]).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// One send of a batch: the socket and the bytes.
#[derive(Debug, Clone, Copy)]
pub struct Send<'a> {
    pub socket: BorrowedFd<'a>,
    pub bytes: &'a [u8],
}

/// Submission entries of each thread's ring: a larger batch goes in several calls.
const ENTRIES: u32 = 128;

/// Sends each of `sends` once, without waiting, in as few system calls as the thread's ring
/// allows (`batch`: false for one plain `send` each); `results` gets what each did, in order
/// (bytes taken, or the error: `WouldBlock` for a full socket).
pub fn send_all(sends: &[Send<'_>], batch: bool, results: &mut Vec<io::Result<usize>>) {
    results.clear();
    // A single send gains nothing from the ring.
    if batch && sends.len() > 1 {
        #[cfg(target_os = "linux")]
        if linux::send_all(sends, results) {
            return;
        }
        results.clear();
    }
    results.extend(sends.iter().map(send_one));
}

/// One plain non-blocking `send` (`MSG_NOSIGNAL`: a closed peer is an error, not a signal).
pub fn send_one(send: &Send<'_>) -> io::Result<usize> {
    socket2::SockRef::from(&send.socket).send(send.bytes)
}

/// Whether this thread sends batches through io_uring (its ring is made if need be): false
/// where the kernel lacks it or refuses it.
pub fn available() -> bool {
    #[cfg(target_os = "linux")]
    return linux::available();
    #[cfg(not(target_os = "linux"))]
    false
}

#[cfg(target_os = "linux")]
mod linux {
    use super::*;
    use io_uring::{IoUring, opcode, types};
    use std::cell::RefCell;

    /// This thread's ring, made on first use.
    enum Ring {
        Untried,
        Ready(Box<IoUring>),
        /// No io_uring here, or it failed once: plain sends from now on.
        Unavailable,
    }

    thread_local! {
        static RING: RefCell<Ring> = const { RefCell::new(Ring::Untried) };
    }

    pub(super) fn available() -> bool {
        RING.with(|ring| ring.borrow_mut().get().is_some())
    }

    /// `false` when this thread has no ring (the caller sends plainly); otherwise every send
    /// has its result.
    pub(super) fn send_all(sends: &[Send<'_>], results: &mut Vec<io::Result<usize>>) -> bool {
        RING.with(|cell| {
            let mut cell = cell.borrow_mut();
            let Some(ring) = cell.get() else {
                return false;
            };
            for chunk in sends.chunks(ENTRIES as usize) {
                if let Err(error) = Ring::send(ring, chunk, results) {
                    // Not expected (a full ring, a kernel out of memory): this thread stops
                    // using it. What the chunk's sends did is not known: each is an error
                    // (the client is disconnected and resumes from its last id), never a
                    // guess that could repeat or lose bytes in its stream.
                    tracing::warn!(%error, "io_uring failed; this thread sends one by one from now on");
                    *cell = Ring::Unavailable;
                    let failed = sends.len() - results.len();
                    results.extend((0..failed).map(|_| Err(io::Error::other("io_uring failed"))));
                    return true;
                }
            }
            true
        })
    }

    impl Ring {
        fn get(&mut self) -> Option<&mut IoUring> {
            if let Ring::Untried = self {
                *self = match make() {
                    Ok(ring) => Ring::Ready(Box::new(ring)),
                    Err(error) => {
                        tracing::debug!(%error, "no io_uring: one send per client");
                        Ring::Unavailable
                    }
                };
            }
            match self {
                Ring::Ready(ring) => Some(ring),
                _ => None,
            }
        }

        /// Sends `chunk` (at most [`ENTRIES`]) and appends each result to `results`.
        ///
        /// Safety of the bytes handed over: the submission queue is empty on entry (every
        /// earlier call left it so, or dropped the ring); the entries point into `chunk`'s
        /// slices, borrowed until this returns; every entry is `MSG_DONTWAIT`, so the kernel
        /// completes it while it is submitted (never parks it waiting for room), and this
        /// returns only once each has its completion. On an error, the caller drops the ring
        /// without another submission: nothing left in its queue is ever read.
        fn send(
            ring: &mut IoUring,
            chunk: &[Send<'_>],
            results: &mut Vec<io::Result<usize>>,
        ) -> io::Result<()> {
            let first = results.len();
            {
                let mut queue = ring.submission();
                for (index, send) in chunk.iter().enumerate() {
                    let len = u32::try_from(send.bytes.len()).unwrap_or(u32::MAX);
                    let entry = opcode::Send::new(
                        types::Fd(send.socket.as_raw_fd()),
                        send.bytes.as_ptr(),
                        len,
                    )
                    .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(index as u64);
                    // SAFETY: the bytes and the socket outlive the entry's completion, which
                    // this function waits for (see above).
                    unsafe { queue.push(&entry) }
                        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                }
            }
            results.extend(chunk.iter().map(|_| Ok(0)));
            let mut reaped = 0;
            while reaped < chunk.len() {
                match ring.submit_and_wait(chunk.len() - reaped) {
                    Ok(_) => {}
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(error) => {
                        results.truncate(first);
                        return Err(error);
                    }
                }
                for completion in ring.completion() {
                    let result = completion.result();
                    results[first + completion.user_data() as usize] = if result >= 0 {
                        Ok(result as usize)
                    } else {
                        Err(io::Error::from_raw_os_error(-result))
                    };
                    reaped += 1;
                }
            }
            Ok(())
        }
    }

    /// A ring for sends, if this kernel has one with `IORING_OP_SEND`.
    fn make() -> io::Result<IoUring> {
        // Submit every entry even if one fails to start (5.18+), and run completions' work
        // only when this thread asks (5.19+): older kernels refuse the flags, then plain.
        let ring = IoUring::builder()
            .setup_submit_all()
            .setup_coop_taskrun()
            .setup_single_issuer()
            .build(ENTRIES)
            .or_else(|_| IoUring::new(ENTRIES))?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(opcode::Send::CODE) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring without IORING_OP_SEND",
            ));
        }
        Ok(ring)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    /// Connected pairs: (the side written, the side read).
    fn pairs(n: usize) -> Vec<(TcpStream, TcpStream)> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        (0..n)
            .map(|_| {
                let out = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                let (inp, _) = listener.accept().unwrap();
                out.set_nonblocking(true).unwrap();
                (out, inp)
            })
            .collect()
    }

    fn sends<'a>(pairs: &'a [(TcpStream, TcpStream)], bytes: &'a [u8]) -> Vec<Send<'a>> {
        use std::os::fd::AsFd;
        pairs
            .iter()
            .map(|(out, _)| Send {
                socket: out.as_fd(),
                bytes,
            })
            .collect()
    }

    #[test]
    fn every_socket_of_a_batch_gets_its_bytes_batched_or_not() {
        for batch in [true, false] {
            // More than a ring's entries: several calls.
            let pairs = pairs(ENTRIES as usize + 3);
            let mut results = Vec::new();
            send_all(&sends(&pairs, b"data: hi\n\n"), batch, &mut results);
            assert_eq!(results.len(), pairs.len());
            for ((_, inp), result) in pairs.iter().zip(&results) {
                assert_eq!(result.as_ref().unwrap(), &10);
                let mut got = [0; 10];
                (&*inp).read_exact(&mut got).unwrap();
                assert_eq!(&got, b"data: hi\n\n");
            }
        }
    }

    #[test]
    fn a_full_socket_answers_would_block_and_the_others_still_get_theirs() {
        let pairs = pairs(3);
        let big = vec![b'x'; 64 * 1024];
        // Fill the middle socket (nobody reads it).
        let mut full = [sends(&pairs, &big)[1]];
        let mut results = Vec::new();
        loop {
            send_all(&full, false, &mut results);
            if results[0].is_err() {
                break;
            }
        }
        full[0].bytes = b"more";
        for batch in [true, false] {
            let mut batch_sends = sends(&pairs, b"data: hi\n\n");
            batch_sends[1] = full[0];
            send_all(&batch_sends, batch, &mut results);
            assert_eq!(results[0].as_ref().unwrap(), &10);
            assert_eq!(
                results[1].as_ref().unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
            assert_eq!(results[2].as_ref().unwrap(), &10);
        }
    }

    /// Where the kernel allows io_uring (`kernel.io_uring_disabled` is 0, as on the project's
    /// machines), batches go through it: the tests above then cover both paths.
    #[test]
    fn batches_use_the_ring_where_the_kernel_allows_it() {
        #[cfg(target_os = "linux")]
        if std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .is_ok_and(|allowed| allowed.trim() == "0")
        {
            assert!(available());
        }
    }
}
