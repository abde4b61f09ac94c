//! Held-mail journal and index (being written).

mod error;
mod file;
mod record;

pub use error::Error;
pub use file::{IoKind, SegmentFile};
pub use record::{parts_of, MsgMeta, Outcome, Part};
