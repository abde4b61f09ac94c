//! The per-core runtime: one pinned thread per core, each with its own io_uring (or epoll)
//! runtime, its own SO_REUSEPORT listeners and its own journal writer.
//!
//! This is the only layer that knows about io_uring. Above it, sessions see [`conn::Conn`]
//! (owned-buffer reads and writes, plain or TLS) and send cross-core work through
//! [`mesh::Mesh`]. Where io_uring is blocked the same shape runs on per-core tokio
//! current-thread runtimes (epoll): [`io::IoKind`] picks, never a panic.

pub mod conn;
pub mod deadline;
pub mod io;
pub mod limiter;
pub mod mesh;

use std::future::Future;
use std::thread::JoinHandle;

pub use io::IoKind;

/// Starts core thread `index` named `turnpike-core-<index>`, pinned to the `index`-th online
/// CPU when `pin` is set, running `main` under `kind` until it returns.
pub fn spawn_core<F, Fut>(
    index: usize,
    kind: IoKind,
    pin: bool,
    main: F,
) -> std::io::Result<JoinHandle<std::io::Result<()>>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    std::thread::Builder::new()
        .name(format!("turnpike-core-{index}"))
        .spawn(move || {
            if pin {
                let ids = core_affinity::get_core_ids().unwrap_or_default();
                if let Some(id) = ids.get(index % ids.len().max(1)) {
                    if !core_affinity::set_for_current(*id) {
                        tracing::warn!(core = index, "could not pin thread to its CPU");
                    }
                }
            }
            io::block_on(kind, main())
        })
}

/// Number of CPUs this process may run on.
pub fn online_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
