//! Positional file I/O for segment files, over io_uring or a blocking-thread fallback.
//!
//! [`SegmentFile`] is the only place in the spool that touches file descriptors from async
//! code. The `Uring` variant submits reads, writes, `fdatasync` and `fallocate` to the core's
//! io_uring (it must run inside a tokio-uring runtime); the `Std` variant runs the same calls
//! on tokio's blocking pool with `spawn_blocking`, so a core thread on a plain tokio runtime
//! (hosts where io_uring is blocked) never blocks on the disk either.
//!
//! Buffers are owned and handed back (the tokio-uring rent model), so callers can recycle them.
//! Invariant: the file is never extended or shrunk behind the journal writer's back; every
//! write is positional, never an append-mode write.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use tokio_uring::buf::BoundedBuf;

/// Mode of every file the spool creates: the service user only.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory the spool creates.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` (and missing parents) with mode 0700 whatever the umask, and sets 0700 on an
/// existing `dir` that is open to anyone else (with a warning): held mail is for the service
/// user only.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode != DIR_MODE {
        tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), "directory was open to other users; setting 0700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// Bytes free for an unprivileged user on the file system holding `path` (statvfs
/// `f_bavail`): what the operator sees as "free" for the spool.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs fills the zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
}

/// Which I/O driver the spool uses on this core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// io_uring through tokio-uring; only valid inside a tokio-uring runtime.
    Uring,
    /// Blocking syscalls on tokio's blocking pool; works in any tokio runtime.
    Epoll,
}

/// An open segment file.
#[derive(Clone)]
pub enum SegmentFile {
    /// Driven by the core's io_uring.
    Uring(Rc<tokio_uring::fs::File>),
    /// Driven by `spawn_blocking` with positional std calls.
    Std(Arc<std::fs::File>),
}

impl std::fmt::Debug for SegmentFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SegmentFile::Uring(file) => write!(f, "SegmentFile::Uring(fd {})", file.as_raw_fd()),
            SegmentFile::Std(file) => write!(f, "SegmentFile::Std(fd {})", file.as_raw_fd()),
        }
    }
}

async fn blocking<T, F>(f: F) -> io::Result<T>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("blocking I/O task failed: {e}"))))
}

impl SegmentFile {
    /// Creates a new file for reading and writing, mode 0600 whatever the umask (held mail is
    /// for the service user only); fails if `path` exists.
    pub async fn create_new(path: &Path, io: IoKind) -> io::Result<Self> {
        match io {
            IoKind::Uring => {
                let f = tokio_uring::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(FILE_MODE)
                    .open(path)
                    .await?;
                Ok(SegmentFile::Uring(Rc::new(f)))
            }
            IoKind::Epoll => {
                let path = path.to_owned();
                let f = blocking(move || {
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .mode(FILE_MODE)
                        .open(path)
                })
                .await?;
                Ok(SegmentFile::Std(Arc::new(f)))
            }
        }
    }

    /// Opens an existing file read-only.
    pub async fn open_read(path: &Path, io: IoKind) -> io::Result<Self> {
        match io {
            IoKind::Uring => {
                let f = tokio_uring::fs::File::open(path).await?;
                Ok(SegmentFile::Uring(Rc::new(f)))
            }
            IoKind::Epoll => {
                let path = path.to_owned();
                let f = blocking(move || std::fs::File::open(path)).await?;
                Ok(SegmentFile::Std(Arc::new(f)))
            }
        }
    }

    /// Writes all of `buf` at `pos` and hands the buffer back.
    pub async fn write_all_at(&self, buf: Vec<u8>, pos: u64) -> (io::Result<()>, Vec<u8>) {
        match self {
            SegmentFile::Uring(f) => f.write_all_at(buf, pos).await,
            SegmentFile::Std(f) => {
                let f = Arc::clone(f);
                let r = tokio::task::spawn_blocking(move || {
                    let r = f.write_all_at(&buf, pos);
                    (r, buf)
                })
                .await;
                match r {
                    Ok(r) => r,
                    Err(e) => (
                        Err(io::Error::other(format!("write task failed: {e}"))),
                        Vec::new(),
                    ),
                }
            }
        }
    }

    /// Reads exactly `len` bytes at `pos` into `buf` (cleared first) and hands it back. A read
    /// past the end of the file is an `UnexpectedEof` error.
    pub async fn read_exact_at(
        &self,
        mut buf: Vec<u8>,
        pos: u64,
        len: usize,
    ) -> (io::Result<()>, Vec<u8>) {
        buf.clear();
        if len == 0 {
            return (Ok(()), buf);
        }
        match self {
            SegmentFile::Uring(f) => {
                buf.reserve(len);
                let (r, slice) = f.read_exact_at(buf.slice(0..len), pos).await;
                (r, slice.into_inner())
            }
            SegmentFile::Std(f) => {
                let f = Arc::clone(f);
                let r = tokio::task::spawn_blocking(move || {
                    buf.resize(len, 0);
                    let r = f.read_exact_at(&mut buf, pos);
                    (r, buf)
                })
                .await;
                match r {
                    Ok(r) => r,
                    Err(e) => (
                        Err(io::Error::other(format!("read task failed: {e}"))),
                        Vec::new(),
                    ),
                }
            }
        }
    }

    /// `fdatasync(2)`: the written data and the metadata needed to read it back are durable.
    pub async fn sync_data(&self) -> io::Result<()> {
        match self {
            SegmentFile::Uring(f) => f.sync_data().await,
            SegmentFile::Std(f) => {
                let f = Arc::clone(f);
                blocking(move || f.sync_data()).await
            }
        }
    }

    /// Reserves `len` bytes from offset 0 with `fallocate(2)` (mode 0: the file size becomes
    /// `len`, the new range reads as zeros). With `zero_fill` the range is then overwritten
    /// with zeros, so later writes hit already-written blocks and an fdatasync does not have
    /// to convert unwritten extents.
    pub async fn preallocate(&self, from: u64, len: u64, zero_fill: bool) -> io::Result<()> {
        if len <= from {
            return Ok(());
        }
        match self {
            SegmentFile::Uring(f) => f.fallocate(from, len - from, 0).await?,
            SegmentFile::Std(f) => {
                let f = Arc::clone(f);
                blocking(move || fallocate(&f, from, len - from)).await?
            }
        }
        if zero_fill {
            const CHUNK: u64 = 1 << 20;
            let mut zeros = vec![0u8; CHUNK as usize];
            let mut pos = from;
            while pos < len {
                let n = CHUNK.min(len - pos) as usize;
                zeros.resize(n, 0);
                let (r, z) = self.write_all_at(zeros, pos).await;
                r?;
                zeros = z;
                pos += n as u64;
            }
        }
        Ok(())
    }

    /// Truncates or extends the file to `len` bytes (`ftruncate(2)`).
    pub async fn set_len(&self, len: u64) -> io::Result<()> {
        // tokio-uring has no ftruncate op, so both variants use the blocking pool, on a
        // duplicate of the descriptor (an `Rc` cannot cross threads).
        let f = match self {
            SegmentFile::Std(f) => Arc::clone(f),
            SegmentFile::Uring(f) => {
                // SAFETY: the fd is open for as long as `f` lives, which spans this call.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(f.as_raw_fd()) };
                Arc::new(std::fs::File::from(fd.try_clone_to_owned()?))
            }
        };
        blocking(move || f.set_len(len)).await
    }
}

fn fallocate(f: &std::fs::File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an fd we own; no memory is passed.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, offset as libc::off_t, len as libc::off_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `fsync(2)` on a directory, so that file creations and deletions in it are durable.
pub(crate) async fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = dir.to_owned();
    blocking(move || std::fs::File::open(dir)?.sync_all()).await
}

/// Removes a file and makes the removal durable.
pub(crate) async fn remove_durably(path: &Path) -> io::Result<()> {
    let path = path.to_owned();
    blocking(move || {
        std::fs::remove_file(&path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::testutil::temp_dir;

    async fn exercise(io: IoKind, dir: &Path) {
        let path = dir.join(format!("{io:?}.seg"));
        let f = SegmentFile::create_new(&path, io).await.unwrap();
        assert!(
            SegmentFile::create_new(&path, io).await.is_err(),
            "create_new must not reopen"
        );
        f.preallocate(0, 1 << 16, false).await.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 16);
        let (r, buf) = f.write_all_at(b"hello, journal".to_vec(), 100).await;
        r.unwrap();
        f.sync_data().await.unwrap();
        let (r, buf) = f.read_exact_at(buf, 107, 7).await;
        r.unwrap();
        assert_eq!(buf, b"journal");
        let (r, buf) = f.read_exact_at(buf, 0, 4).await;
        r.unwrap();
        assert_eq!(buf, [0, 0, 0, 0], "preallocated range reads as zeros");
        let (r, _) = f.read_exact_at(buf, (1 << 16) - 2, 4).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        f.preallocate(1 << 16, 1 << 17, true).await.unwrap();
        f.set_len(114).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap()[100..], *b"hello, journal");
        let r = SegmentFile::open_read(&path, io).await.unwrap();
        let (res, buf) = r.read_exact_at(Vec::new(), 100, 5).await;
        res.unwrap();
        assert_eq!(buf, b"hello");
        sync_dir(dir).await.unwrap();
        remove_durably(&path).await.unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn std_variant_reads_writes_and_preallocates() {
        let dir = temp_dir("file-std");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(exercise(IoKind::Epoll, &dir));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn uring_variant_reads_writes_and_preallocates() {
        let rt = match tokio_uring::Runtime::new(&tokio_uring::builder()) {
            Ok(rt) => rt,
            Err(e) => {
                println!("skipping: io_uring runtime unavailable here: {e}");
                return;
            }
        };
        let dir = temp_dir("file-uring");
        rt.block_on(exercise(IoKind::Uring, &dir));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
