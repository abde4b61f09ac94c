//! The journal writer through its public API: group commit, rotation, recovery after reopen,
//! reclaim and compaction, on the blocking-pool driver and (where available) on io_uring.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};

use turnpike::spool::{
    recover, DirRecovery, DomainIndex, HeldPart, IoKind, JournalConfig, JournalHandle, Location,
    Outcome, Reader,
};
use turnpike::types::{DomainName, Envelope, Mailbox, MessageId, Recipient};

fn run_local<F: Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f)
}

fn temp_dir(tag: &str) -> PathBuf {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).unwrap();
    let d = std::env::temp_dir().join(format!("turnpike-{tag}-{:016x}", u64::from_le_bytes(r)));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn d(s: &str) -> DomainName {
    DomainName::parse(s).unwrap()
}

fn envelope(rcpts: &[&str]) -> Envelope {
    Envelope {
        sender: Some(Mailbox {
            local: "from".into(),
            domain: "sender.example".into(),
        }),
        recipients: rcpts
            .iter()
            .map(|r| {
                let (l, dom) = r.split_once('@').unwrap();
                Recipient {
                    mailbox: Mailbox {
                        local: l.into(),
                        domain: dom.into(),
                    },
                    notify: None,
                    orcpt: None,
                }
            })
            .collect(),
        ..Envelope::default()
    }
}

/// A body whose bytes depend on `n`, so a mix-up between messages shows.
fn body(n: u64, len: usize) -> Vec<u8> {
    let mut b = format!("Subject: message {n}\r\n\r\n").into_bytes();
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while b.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.push(b'a' + (x % 26) as u8);
    }
    b.truncate(len.max(1));
    b
}

fn id(n: u64) -> MessageId {
    MessageId::new(1_700_000_000_000 + n, 0, n)
}

fn cfg(dir: &Path, io: IoKind, segment_size: u64) -> JournalConfig {
    JournalConfig {
        segment_size,
        ..JournalConfig::new(dir, 0, io)
    }
}

/// Recovered parts as a sorted map `(id, domain) -> part`.
fn recovered_parts(dir: &Path) -> BTreeMap<(MessageId, DomainName), HeldPart> {
    let r = recover(dir).unwrap();
    assert!(r.damage.is_empty(), "unexpected damage: {:?}", r.damage);
    r.parts
        .into_iter()
        .map(|p| ((p.id, p.domain.clone()), p))
        .collect()
}

async fn group_commit_and_reopen(dir: &Path, io: IoKind) {
    const N: u64 = 400;
    let j = JournalHandle::open(cfg(dir, io, 64 << 20), DirRecovery::empty(0))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for n in 0..N {
        let j = j.clone();
        tasks.push(tokio::task::spawn_local(async move {
            let rcpts: &[&str] = if n % 3 == 0 {
                &["a@x.example", "b@y.example"]
            } else {
                &["c@x.example"]
            };
            let env = envelope(rcpts);
            let loc = j
                .append_message(id(n), 1000 + n, &env, &body(n, 4096))
                .await
                .unwrap();
            (n, env, loc)
        }));
    }
    let mut appended = Vec::new();
    for t in tasks {
        appended.push(t.await.unwrap());
    }
    let st = j.stats();
    assert_eq!(st.records, N);
    assert_eq!(st.fsyncs, st.batches, "exactly one fdatasync per batch");
    assert!(
        st.batches * 4 < N,
        "{} batches for {N} concurrent appends: no group commit",
        st.batches
    );

    // Locations tile the segment: no overlap, record after record.
    let mut locs: Vec<Location> = appended.iter().map(|(_, _, l)| *l).collect();
    locs.sort_by_key(|l| (l.seq, l.offset));
    for w in locs.windows(2) {
        assert!(
            w[0].seq < w[1].seq || w[0].offset + w[0].len == w[1].offset,
            "{w:?}"
        );
    }

    // A reader sees every body byte-identically, whole and in chunks.
    let reader = Reader::new(dir, io);
    for (n, _, loc) in appended.iter().step_by(37) {
        assert_eq!(reader.read_body(loc).await.unwrap(), body(*n, 4096));
        let mut stream = reader.body_stream(*loc, 1000);
        let mut got = Vec::new();
        while let Some(chunk) = stream.next_chunk(Vec::new()).await.unwrap() {
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, body(*n, 4096));
        let mut stream = reader.body_stream(*loc, 1000).with_first_chunk(10);
        let mut sizes = Vec::new();
        got.clear();
        while let Some(chunk) = stream.next_chunk(Vec::new()).await.unwrap() {
            sizes.push(chunk.len());
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, body(*n, 4096));
        assert_eq!(sizes, [10, 1000, 1000, 1000, 1000, 86]);
        let meta = reader.read_message(loc).await.unwrap();
        assert_eq!((meta.id, meta.received_at), (id(*n), 1000 + n));
    }

    // Finish some parts, expire one.
    let x = d("x.example");
    for (n, _, _) in &appended {
        if n % 5 == 0 {
            j.append_done(id(*n), &x, Outcome::Delivered).await.unwrap();
        }
    }
    j.append_expire(id(3), &d("y.example")).await.unwrap();
    let old_segment = j.current_segment().unwrap();
    j.close().await;

    // Recovery returns exactly the appended parts minus the finished ones.
    let mut want = BTreeMap::new();
    for (n, env, loc) in &appended {
        for mut p in HeldPart::for_message(id(*n), 1000 + n, env, *loc) {
            if n % 5 == 0 && p.domain == x {
                continue;
            }
            p.expired = *n == 3 && p.domain.as_str() == "y.example";
            want.insert((p.id, p.domain.clone()), p);
        }
    }
    assert_eq!(recovered_parts(dir), want);

    // Reopen: the previous segment is sealed at its last record and a new one starts.
    let mut rec = recover(dir).unwrap();
    let dr = rec.take_dir(0);
    assert_eq!(dr.max_id(), Some(id(N - 1)));
    let valid_end = dr.segments().last().unwrap().written;
    let j = JournalHandle::open(cfg(dir, io, 64 << 20), dr)
        .await
        .unwrap();
    assert!(j.current_segment().unwrap() > old_segment);
    let seg = turnpike::spool::segment_path(dir, 0, old_segment);
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        valid_end,
        "torn tail sealed off"
    );
    let loc = j
        .append_message(id(N), 5, &envelope(&["z@x.example"]), b"after reopen")
        .await
        .unwrap();
    assert!(loc.seq > old_segment);
    j.close().await;
    let got = recovered_parts(dir);
    assert_eq!(got.len(), want.len() + 1);
    assert_eq!(got[&(id(N), x.clone())].location, loc);
}

#[test]
fn group_commit_with_many_appenders_and_recovery_after_reopen() {
    let dir = temp_dir("spool-gc");
    run_local(group_commit_and_reopen(&dir, IoKind::Epoll));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn group_commit_on_io_uring() {
    let rt = match tokio_uring::Runtime::new(&tokio_uring::builder()) {
        Ok(rt) => rt,
        Err(e) => {
            println!("skipping: io_uring runtime unavailable here: {e}");
            return;
        }
    };
    let dir = temp_dir("spool-gc-uring");
    rt.block_on(group_commit_and_reopen(&dir, IoKind::Uring));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn rotation_keeps_batches_in_one_segment_and_gives_big_records_their_own() {
    let dir = temp_dir("spool-rotate");
    run_local(async {
        let j = JournalHandle::open(cfg(&dir, IoKind::Epoll, 8192), DirRecovery::empty(0))
            .await
            .unwrap();
        let env = envelope(&["a@x.example"]);
        let mut tasks = Vec::new();
        for n in 0..40u64 {
            let (j, env) = (j.clone(), env.clone());
            // Every tenth message is bigger than a whole segment.
            let len = if n % 10 == 9 { 20_000 } else { 900 };
            tasks.push(tokio::task::spawn_local(async move {
                (
                    n,
                    len,
                    j.append_message(id(n), n, &env, &body(n, len))
                        .await
                        .unwrap(),
                )
            }));
        }
        let mut locs = Vec::new();
        for t in tasks {
            locs.push(t.await.unwrap());
        }
        let reader = Reader::new(&dir, IoKind::Epoll);
        for (n, len, loc) in &locs {
            if *len == 20_000 {
                assert_eq!(loc.offset, 32, "an oversize record starts its own segment");
                assert!(
                    locs.iter().all(|(_, _, l)| l.seq != loc.seq || l == loc),
                    "and is alone in it"
                );
            } else {
                assert!(
                    loc.offset + loc.len <= 8192,
                    "{loc:?} crosses the segment size"
                );
            }
            assert_eq!(reader.read_body(loc).await.unwrap(), body(*n, *len));
        }
        // Batched whole-message reads: runs of back-to-back records, split at segment ends and
        // at max_read; a location that does not match its record fails alone.
        let mut sorted = locs.clone();
        sorted.sort_by_key(|(_, _, l)| (l.seq, l.offset));
        let mut wanted: Vec<Location> = sorted.iter().map(|(_, _, l)| *l).collect();
        let mut bad = wanted[3];
        bad.body_len += 1;
        wanted.insert(4, bad);
        let got = reader.read_messages(&wanted, 5000).await;
        assert_eq!(got.len(), wanted.len());
        let mut k = 0;
        for (i, r) in got.into_iter().enumerate() {
            if i == 4 {
                assert!(r.is_err(), "the mismatched location must fail");
                continue;
            }
            let (n, len, _) = sorted[k];
            k += 1;
            let (meta, got_body) = r.unwrap();
            assert_eq!((meta.id, got_body), (id(n), body(n, len)));
        }
        assert!(j.segments().len() >= 8, "{:?}", j.segments());
        j.close().await;
        assert_eq!(recovered_parts(&dir).len(), 40);
    });
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn reclaim_deletes_dead_segments_in_dependency_order() {
    let dir = temp_dir("spool-reclaim");
    run_local(async {
        let j = JournalHandle::open(
            JournalConfig {
                compact_below: 0.0,
                ..cfg(&dir, IoKind::Epoll, 4096)
            },
            DirRecovery::empty(0),
        )
        .await
        .unwrap();
        let x = d("x.example");
        let env = envelope(&["a@x.example"]);
        let mut locs = Vec::new();
        for n in 0..12u64 {
            locs.push(
                j.append_message(id(n), n, &env, &body(n, 1500))
                    .await
                    .unwrap(),
            );
        }
        let first = locs[0].seq;
        let in_first: Vec<u64> = (0..12).filter(|n| locs[*n as usize].seq == first).collect();
        assert!(in_first.len() >= 2);
        // Finish everything in the first segment but one message.
        for n in &in_first[..in_first.len() - 1] {
            j.append_done(id(*n), &x, Outcome::Delivered).await.unwrap();
        }
        let r = j.reclaim().await.unwrap();
        assert!(
            !r.deleted.contains(&first),
            "one message is still live there"
        );
        let last = *in_first.last().unwrap();
        j.append_done(id(last), &x, Outcome::Bounced).await.unwrap();
        // Fill a few more segments so the DONEs' segment is not the current one.
        for n in 100..106u64 {
            j.append_message(id(n), n, &env, &body(n, 1500))
                .await
                .unwrap();
        }
        let r = j.reclaim().await.unwrap();
        assert_eq!(r.deleted.first(), Some(&first), "{r:?}");
        assert!(r.relocated.is_empty());
        assert!(!turnpike::spool::segment_path(&dir, 0, first).exists());
        let remaining = j.segments();
        j.close().await;
        // Nothing finished comes back, nothing live is lost.
        let got = recovered_parts(&dir);
        let want: Vec<MessageId> = (0..12)
            .chain(100..106)
            .filter(|n| !in_first.contains(n))
            .map(id)
            .collect();
        assert_eq!(got.keys().map(|(i, _)| *i).collect::<Vec<_>>(), want);
        let rec = recover(&dir).unwrap();
        let on_disk: Vec<u64> = rec.dirs[&0].segments().iter().map(|s| s.seq).collect();
        assert_eq!(on_disk, remaining);
    });
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn compaction_copies_live_parts_forward_byte_identically() {
    let dir = temp_dir("spool-compact");
    run_local(async {
        let j = JournalHandle::open(cfg(&dir, IoKind::Epoll, 16 << 10), DirRecovery::empty(0))
            .await
            .unwrap();
        let (x, y) = (d("x.example"), d("y.example"));
        let env = envelope(&["a@x.example", "b@y.example"]);
        let mut locs = Vec::new();
        for n in 0..30u64 {
            locs.push(
                j.append_message(id(n), n, &env, &body(n, 2000))
                    .await
                    .unwrap(),
            );
        }
        let first = locs[0].seq;
        let firsts: Vec<u64> = (0..30).filter(|n| locs[*n as usize].seq == first).collect();
        assert!(firsts.len() >= 4);
        // Keep one part of one message and both parts of another; finish the rest.
        let (keep_one, keep_both) = (firsts[1], firsts[2]);
        for n in &firsts {
            if *n != keep_both {
                j.append_done(id(*n), &x, Outcome::Delivered).await.unwrap();
            }
            if *n != keep_both && *n != keep_one {
                j.append_done(id(*n), &y, Outcome::Delivered).await.unwrap();
            }
        }
        j.append_expire(id(keep_one), &y).await.unwrap();

        let mut index = DomainIndex::new();
        for p in recover(&dir).unwrap().parts {
            index.insert(p);
        }
        let r = j.reclaim().await.unwrap();
        assert_eq!(r.compacted, Some(first));
        assert!(r.deleted.contains(&first));
        assert!(!turnpike::spool::segment_path(&dir, 0, first).exists());
        let mut moved: Vec<_> = r
            .relocated
            .iter()
            .map(|m| (m.id, m.domains.clone()))
            .collect();
        moved.sort();
        assert_eq!(
            moved,
            vec![
                (id(keep_one), vec![y.clone()]),
                (id(keep_both), vec![x.clone(), y.clone()])
            ]
        );
        let reader = Reader::new(&dir, IoKind::Epoll);
        for m in &r.relocated {
            assert!(m.location.seq > first);
            let n = (m.id.0 & 0xffff_ffff) as u64;
            assert_eq!(reader.read_body(&m.location).await.unwrap(), body(n, 2000));
            for dom in &m.domains {
                assert!(index.relocate(m.id, dom, m.location));
            }
        }
        j.close().await;

        // After a restart the copies win and nothing finished is resurrected.
        let got = recovered_parts(&dir);
        let surviving: Vec<_> = got
            .keys()
            .filter(|(i, _)| firsts.contains(&((i.0 & 0xffff_ffff) as u64)))
            .cloned()
            .collect();
        assert_eq!(
            surviving,
            vec![
                (id(keep_one), y.clone()),
                (id(keep_both), x.clone()),
                (id(keep_both), y.clone())
            ]
        );
        let p = &got[&(id(keep_one), y.clone())];
        assert!(p.expired, "the expired flag survives compaction");
        assert_eq!(p.recipients[0].mailbox.local, "b");
        for ((i, dom), p) in &got {
            assert_eq!(
                index.get(*i, dom).map(|q| q.location),
                Some(p.location),
                "index agrees with disk"
            );
        }
    });
    std::fs::remove_dir_all(dir).unwrap();
}

/// A SETTLE finishes some recipients of a part: recovery leaves them out, a compaction copy
/// leaves them out (so the SETTLE's segment may go with the old copy), and the DONE for the
/// rest ends the part.
#[test]
fn settled_recipients_stay_finished_through_recovery_and_compaction() {
    let dir = temp_dir("spool-settle");
    run_local(async {
        let j = JournalHandle::open(cfg(&dir, IoKind::Epoll, 16 << 10), DirRecovery::empty(0))
            .await
            .unwrap();
        let x = d("x.example");
        let mixed = envelope(&["a@x.example", "b@x.example", "c@x.example"]);
        let m = id(0);
        let loc = j
            .append_message(m, 1, &mixed, &body(0, 2000))
            .await
            .unwrap();
        // Fillers in the same segment, finished, so that it is worth compacting.
        let filler = envelope(&["f@x.example"]);
        let mut n = 1;
        while j.current_segment() == Some(loc.seq) {
            j.append_message(id(n), n, &filler, &body(n, 2000))
                .await
                .unwrap();
            n += 1;
        }
        for k in 1..n {
            j.append_done(id(k), &x, Outcome::Delivered).await.unwrap();
        }
        j.append_settle(m, &x, &[(0, Outcome::Delivered), (2, Outcome::Bounced)])
            .await
            .unwrap();
        let still = |dir: &Path| {
            let got = recovered_parts(dir);
            let p = &got[&(m, x.clone())];
            let locals: Vec<String> = p
                .recipients
                .iter()
                .map(|r| r.mailbox.local.clone())
                .collect();
            (locals, p.indices.clone(), got.len())
        };
        assert_eq!(still(&dir), (vec!["b".to_string()], vec![1], 1));

        // Move past the SETTLE's segment, then compact the first one.
        for k in 100..110u64 {
            let l = j
                .append_message(id(k), k, &filler, &body(k, 2000))
                .await
                .unwrap();
            j.append_done(id(k), &x, Outcome::Delivered).await.unwrap();
            assert!(l.seq > loc.seq);
        }
        let r = j.reclaim().await.unwrap();
        assert_eq!(r.compacted, Some(loc.seq), "{r:?}");
        let copy = r.relocated.iter().find(|c| c.id == m).expect("copied");
        let reader = Reader::new(&dir, IoKind::Epoll);
        let meta = reader.read_message(&copy.location).await.unwrap();
        assert_eq!(meta.parts[0].recipients, [1], "the copy is narrowed");
        assert_eq!(meta.envelope, mixed, "the envelope is kept whole");
        assert_eq!(
            reader.read_body(&copy.location).await.unwrap(),
            body(0, 2000)
        );
        let _ = j.reclaim().await.unwrap();
        assert_eq!(still(&dir), (vec!["b".to_string()], vec![1], 1));

        j.append_done(m, &x, Outcome::Delivered).await.unwrap();
        j.close().await;
        assert!(recovered_parts(&dir).is_empty());
    });
    std::fs::remove_dir_all(dir).unwrap();
}
