//! The two I/O drivers behind one small surface: io_uring (tokio-uring) and epoll (tokio).
//!
//! Everything above this module sees [`Listener`] and [`Stream`], which read into and write
//! from caller-owned `Vec<u8>` buffers. io_uring needs owned buffers (the kernel writes into
//! them while the future is pending), so the buffer is moved into the operation and handed back;
//! under epoll the same calls borrow it. Reads always *append* into spare capacity, so the
//! command framer can scan the session's input buffer in place (no copy between socket and
//! parser).
//!
//! Invariant: a read future that is dropped before it completes (a timeout) leaves the caller's
//! buffer empty under io_uring, because the buffer belongs to the cancelled operation. Callers
//! only drop reads on their way to closing the connection.

use std::io;
use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio_uring::buf::BoundedBuf;

/// Which driver a core runs; the spool's file I/O follows the same choice.
pub use crate::spool::IoKind;

impl IoKind {
    /// Short name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            IoKind::Uring => "io_uring",
            IoKind::Epoll => "epoll",
        }
    }

    /// Resolves `auto` by probing: creates (and drops) an io_uring runtime. Seccomp profiles
    /// and hardened kernels refuse `io_uring_setup`; then epoll it is.
    pub fn detect() -> Result<IoKind, io::Error> {
        match tokio_uring::Runtime::new(&tokio_uring::builder()) {
            Ok(rt) => {
                drop(rt);
                Ok(IoKind::Uring)
            }
            Err(e) => Err(e),
        }
    }
}

/// Runs `main` to completion on the current thread under the chosen driver. Tasks are spawned
/// with `tokio::task::spawn_local`, which works under both (tokio-uring runs a `LocalSet`).
pub fn block_on<F: std::future::Future>(kind: IoKind, main: F) -> io::Result<F::Output> {
    match kind {
        IoKind::Uring => {
            let rt = tokio_uring::Runtime::new(&tokio_uring::builder())?;
            Ok(rt.block_on(main))
        }
        IoKind::Epoll => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            Ok(local.block_on(&rt, main))
        }
    }
}

/// A bound, listening socket with `SO_REUSEPORT`, created before the core threads start so
/// that a bad address fails the start-up, not a thread.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// A listener owned by one core.
pub enum Listener {
    /// io_uring accept.
    Uring(tokio_uring::net::TcpListener),
    /// epoll accept.
    Epoll(tokio::net::TcpListener),
}

impl Listener {
    /// Wraps a std listener for the given driver. Must run inside that driver's runtime.
    pub fn from_std(kind: IoKind, l: std::net::TcpListener) -> io::Result<Listener> {
        Ok(match kind {
            IoKind::Uring => Listener::Uring(tokio_uring::net::TcpListener::from_std(l)),
            IoKind::Epoll => {
                l.set_nonblocking(true)?;
                Listener::Epoll(tokio::net::TcpListener::from_std(l)?)
            }
        })
    }

    /// Accepts one connection, with `TCP_NODELAY` set (SMTP replies are small and latency
    /// bound; pipelined batches are already coalesced by the sessions).
    pub async fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
        match self {
            Listener::Uring(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok((Stream::Uring(s), peer))
            }
            Listener::Epoll(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok((Stream::Epoll(s), peer))
            }
        }
    }
}

/// A connected TCP stream under one of the drivers.
pub enum Stream {
    /// io_uring reads and writes.
    Uring(tokio_uring::net::TcpStream),
    /// epoll readiness plus non-blocking syscalls.
    Epoll(tokio::net::TcpStream),
}

impl Stream {
    /// Connects (used by test customers and, later, the outbound relay).
    pub async fn connect(kind: IoKind, addr: SocketAddr) -> io::Result<Stream> {
        Ok(match kind {
            IoKind::Uring => {
                let s = tokio_uring::net::TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                Stream::Uring(s)
            }
            IoKind::Epoll => {
                let s = tokio::net::TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                Stream::Epoll(s)
            }
        })
    }

    /// Reads at least one byte into the spare capacity of `buf` (reserving `want` bytes if
    /// less is spare). Returns the number of bytes appended; 0 means the peer closed.
    pub async fn read_append(&mut self, buf: &mut Vec<u8>, want: usize) -> io::Result<usize> {
        if buf.capacity() - buf.len() < want {
            buf.reserve(want);
        }
        let n = match self {
            Stream::Uring(s) => {
                let owned = std::mem::take(buf);
                let filled = owned.len();
                let (res, slice) = s.read(owned.slice(filled..)).await;
                *buf = slice.into_inner();
                res?
            }
            Stream::Epoll(s) => loop {
                s.readable().await?;
                match s.try_read_buf(buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            },
        };
        if n > 0 {
            self.ack_now();
        }
        Ok(n)
    }

    /// Re-arms TCP_QUICKACK, which also sends any delayed ACK at once. Without it a client
    /// that does not set TCP_NODELAY (smtp-source, many MTAs) writes the message body, then
    /// the small final ".\r\n": Nagle holds that segment until our ACK, and Linux delays
    /// the ACK (we have nothing to send yet), costing ~40 ms per message. The kernel clears
    /// quickack mode by itself, hence once per read.
    fn ack_now(&self) {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Stream::Uring(s) => s.as_raw_fd(),
            Stream::Epoll(s) => s.as_raw_fd(),
        };
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a valid int option value.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }

    /// Writes all of `buf` and hands it back (cleared is the caller's choice).
    pub async fn write_all_owned(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        match self {
            Stream::Uring(s) => {
                if buf.is_empty() {
                    return (Ok(()), buf);
                }
                s.write_all(buf).await
            }
            Stream::Epoll(s) => {
                let r = s.write_all(&buf).await;
                (r, buf)
            }
        }
    }

    /// Half-closes the write side, so the peer sees EOF after our last reply.
    pub fn shutdown_write(&self) {
        let _ = match self {
            Stream::Uring(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Epoll(s) => socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write),
        };
    }
}
