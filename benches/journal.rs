//! Journal append throughput: 4 KiB messages, group-committed, in a temp dir.
//!
//! Each measured unit is one message made durable. `c1` appends one message at a time (one
//! fdatasync each); `c64` keeps 64 sessions appending concurrently so group commit shares
//! each fdatasync. Variants: the blocking-pool driver (`std`) and io_uring (`uring`, skipped
//! where io_uring is unavailable), with segments preallocated by fallocate or also zero-filled.
//!
//! Run: `cargo bench --bench journal`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use turnpike::spool::{DirRecovery, IoKind, JournalConfig, JournalHandle};
use turnpike::types::{Envelope, Mailbox, MessageId, Recipient};

const BODY: usize = 4096;

fn temp_dir() -> PathBuf {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).expect("getrandom");
    let d = std::env::temp_dir().join(format!("turnpike-bench-{:016x}", u64::from_le_bytes(r)));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn envelope() -> Envelope {
    Envelope {
        sender: Some(Mailbox {
            local: "sender".into(),
            domain: "example.org".into(),
        }),
        recipients: vec![Recipient {
            mailbox: Mailbox {
                local: "user".into(),
                domain: "customer.example".into(),
            },
            notify: None,
            orcpt: None,
        }],
        ..Envelope::default()
    }
}

/// Appends `n` messages with `concurrency` sessions and returns the elapsed time.
async fn append_n(j: &JournalHandle, next: &mut u64, n: u64, concurrency: u64) -> Duration {
    let start = Instant::now();
    let per_task = n.div_ceil(concurrency);
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let j = j.clone();
        let first = *next + t * per_task;
        let count = per_task.min(n.saturating_sub(t * per_task));
        tasks.push(tokio::task::spawn_local(async move {
            let env = envelope();
            let body = vec![b'x'; BODY];
            for k in first..first + count {
                j.append_message(MessageId(u128::from(k)), 0, &env, &body)
                    .await
                    .expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("appender task");
    }
    *next += n;
    start.elapsed()
}

/// A driver that can run the journal: a tokio current-thread runtime with a `LocalSet`, or a
/// tokio-uring runtime.
enum Driver {
    Tokio(tokio::runtime::Runtime, tokio::task::LocalSet),
    Uring(tokio_uring::Runtime),
}

impl Driver {
    fn new(io: IoKind) -> Option<Driver> {
        match io {
            IoKind::Epoll => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                Some(Driver::Tokio(rt, tokio::task::LocalSet::new()))
            }
            IoKind::Uring => tokio_uring::Runtime::new(&tokio_uring::builder())
                .ok()
                .map(Driver::Uring),
        }
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        match self {
            Driver::Tokio(rt, local) => local.block_on(rt, f),
            Driver::Uring(rt) => rt.block_on(f),
        }
    }
}

fn bench_appends(c: &mut Criterion) {
    let mut group = c.benchmark_group("journal_append_4k");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    group.throughput(Throughput::Elements(1));
    for io in [IoKind::Epoll, IoKind::Uring] {
        let Some(driver) = Driver::new(io) else {
            eprintln!("skipping {io:?}: io_uring runtime unavailable here");
            continue;
        };
        for zero_fill in [false, true] {
            for concurrency in [1u64, 64] {
                let dir = temp_dir();
                let cfg = JournalConfig {
                    zero_fill,
                    ..JournalConfig::new(&dir, 0, io)
                };
                let j = driver
                    .block_on(JournalHandle::open(cfg, DirRecovery::empty(0)))
                    .expect("open journal");
                let name = format!(
                    "{}/{}/c{concurrency}",
                    if io == IoKind::Uring { "uring" } else { "std" },
                    if zero_fill { "zerofill" } else { "fallocate" },
                );
                let mut next = 0;
                group.bench_function(name, |b| {
                    b.iter_custom(|iters| {
                        driver.block_on(append_n(&j, &mut next, iters, concurrency))
                    })
                });
                let st = j.stats();
                eprintln!(
                    "  {} records in {} batches ({:.1} per fdatasync), {} segments",
                    st.records,
                    st.batches,
                    st.records as f64 / st.batches.max(1) as f64,
                    st.segments_created
                );
                driver.block_on(j.close());
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench_appends);
criterion_main!(benches);
