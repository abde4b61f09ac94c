//! The spool's error type.
//!
//! One enum for the whole spool. The variant that matters most is [`Error::Poisoned`]: after a
//! write or an fdatasync of the journal failed, the kernel may have dropped dirty pages and we
//! can no longer tell what is on disk, so the writer refuses every further append until the
//! process restarts and recovery re-reads the journal. The caller answers such an error with a
//! transient SMTP failure (`451 4.3.0`), never a 250.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the spool.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O call failed.
    Io {
        /// What we were doing ("write batch", "fdatasync", "open segment", ...).
        op: &'static str,
        /// The file or directory involved, when there is one.
        path: Option<PathBuf>,
        /// The error the kernel returned.
        source: io::Error,
    },
    /// An earlier write or fdatasync failed; this writer accepts nothing until restart.
    Poisoned,
    /// The file system (or the service user's quota) is full: the record was not written, and
    /// nothing on disk changed. Not poisoning: the writer refuses new messages while space is
    /// short (`452 4.3.1`), keeps writing `DONE`/`EXPIRE` records into its reserve, and takes
    /// new messages again once space returns.
    NoSpace {
        /// What needed the space ("create segment", "write batch", ...).
        op: &'static str,
    },
    /// The writer was closed (or dropped) before the append could be made durable.
    Closed,
    /// Bytes read back from disk do not match their checksum or cannot be decoded.
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the record (or of the body range) in the file.
        offset: u64,
        /// What exactly did not match.
        reason: &'static str,
    },
    /// A field does not fit the record format (a string longer than its length prefix).
    TooLarge {
        /// Which field.
        what: &'static str,
    },
    /// A [`Location`](super::Location) or body range that does not describe stored bytes.
    InvalidLocation {
        /// Why the request was refused.
        reason: &'static str,
    },
}

/// True when `e` says the file system or the quota is full (`ENOSPC`, `EDQUOT`).
pub(crate) fn out_of_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl Error {
    pub(crate) fn io(op: &'static str, path: Option<PathBuf>, source: io::Error) -> Self {
        Error::Io { op, path, source }
    }

    /// True for [`Error::NoSpace`]: the disk is full, answer `452 4.3.1`.
    pub fn is_no_space(&self) -> bool {
        matches!(self, Error::NoSpace { .. })
    }

    /// True when the stored copy itself is bad or gone: bytes that fail their checksum or do
    /// not decode, or a segment file that is missing. Retrying will not help; the part is
    /// quarantined for the operator.
    pub fn is_damage(&self) -> bool {
        match self {
            Error::Corrupt { .. } => true,
            Error::Io { source, .. } => source.kind() == io::ErrorKind::NotFound,
            _ => false,
        }
    }

    /// True when retrying later (after a restart, or once space is freed) may succeed: every
    /// variant except a caller's bad [`Location`](super::Location) or an oversize field. A
    /// transient spool error maps to `451 4.3.0`.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Error::TooLarge { .. } | Error::InvalidLocation { .. })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io {
                op,
                path: Some(p),
                source,
            } => {
                write!(
                    f,
                    "spool I/O error during {op} on {}: {source}",
                    p.display()
                )
            }
            Error::Io {
                op,
                path: None,
                source,
            } => write!(f, "spool I/O error during {op}: {source}"),
            Error::Poisoned => {
                f.write_str("journal writer is poisoned by an earlier failed write or fdatasync")
            }
            Error::Closed => f.write_str("journal writer is closed"),
            Error::NoSpace { op } => {
                write!(
                    f,
                    "no space left for the journal ({op}); nothing was written"
                )
            }
            Error::Corrupt {
                path,
                offset,
                reason,
            } => {
                write!(
                    f,
                    "corrupt journal data in {} at offset {offset}: {reason}",
                    path.display()
                )
            }
            Error::TooLarge { what } => write!(f, "{what} is too large for the journal format"),
            Error::InvalidLocation { reason } => write!(f, "invalid journal location: {reason}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
