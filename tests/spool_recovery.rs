//! Corrupt-journal fixtures: a journal written by the real writer, then truncated at every
//! offset, flipped at every byte and followed by garbage. Recovery must never panic, never
//! return a half message, must return every record written completely before the damage, and
//! resynchronises after it: every record after a damaged one that proves itself (both
//! checksums) is recovered too. A message whose body alone is damaged is kept (it was
//! acknowledged) and reported for quarantine, unless it is the torn tail. A damaged DONE
//! brings its part back (at-least-once). A segment the manifest lists but that is gone is
//! reported with the parts it held.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};

use turnpike::spool::{
    recover, segment_path, DirRecovery, Error, HeldPart, IoKind, JournalConfig, JournalHandle,
    Location, Outcome, Reader,
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
            local: "s".into(),
            domain: "sender.example".into(),
        }),
        envid: Some("ENV1".into()),
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
                    orcpt: Some(format!("rfc822;{r}")),
                }
            })
            .collect(),
        ..Envelope::default()
    }
}

fn body(n: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| b'A' + ((i as u64 * 7 + n * 13) % 26) as u8)
        .collect()
}

/// What one record did, for the replay model.
#[derive(Clone)]
enum Effect {
    Msg {
        id: MessageId,
        env: Envelope,
        body: Vec<u8>,
    },
    Done {
        id: MessageId,
        domain: DomainName,
    },
    Expire {
        id: MessageId,
        domain: DomainName,
    },
}

/// A journal written by the real writer, with the location of every record.
struct Fixture {
    records: Vec<(Location, Effect)>,
}

impl Fixture {
    /// Writes the standard sequence of records into `dir` (segment size `seg`).
    fn build(dir: &Path, seg: u64) -> Fixture {
        run_local(async {
            let cfg = JournalConfig {
                segment_size: seg,
                preallocate: false,
                ..JournalConfig::new(dir, 0, IoKind::Epoll)
            };
            let j = JournalHandle::open(cfg, DirRecovery::empty(0))
                .await
                .unwrap();
            let mut records = Vec::new();
            let msgs: [(u64, &[&str], usize); 6] = [
                (1, &["a@x.example", "b@y.example"], 300),
                (2, &["c@x.example"], 200),
                (3, &["d@z.example", "e@[192.0.2.1]"], 5000),
                (4, &["e@y.example"], 10),
                (5, &["f@x.example"], 0),
                (6, &["g@x.example", "h@z.example", "i@x.example"], 700),
            ];
            let msg = |n: usize| {
                let (k, rcpts, len) = msgs[n];
                (
                    MessageId::new(1_700_000_000_000, 0, k),
                    envelope(rcpts),
                    body(k, len),
                )
            };
            let ids: Vec<MessageId> = (0..6).map(|n| msg(n).0).collect();
            Self::push_msg(&j, &mut records, msg(0)).await;
            Self::push_msg(&j, &mut records, msg(1)).await;
            let done = |i: usize, dom: &str| Effect::Done {
                id: ids[i],
                domain: d(dom),
            };
            let loc = j
                .append_done(ids[0], &d("x.example"), Outcome::Delivered)
                .await
                .unwrap();
            records.push((loc, done(0, "x.example")));
            Self::push_msg(&j, &mut records, msg(2)).await;
            let loc = j.append_expire(ids[1], &d("x.example")).await.unwrap();
            records.push((
                loc,
                Effect::Expire {
                    id: ids[1],
                    domain: d("x.example"),
                },
            ));
            Self::push_msg(&j, &mut records, msg(3)).await;
            let loc = j
                .append_done(ids[1], &d("x.example"), Outcome::ExpiredBounced)
                .await
                .unwrap();
            records.push((loc, done(1, "x.example")));
            Self::push_msg(&j, &mut records, msg(4)).await;
            Self::push_msg(&j, &mut records, msg(5)).await;
            let loc = j
                .append_done(ids[5], &d("z.example"), Outcome::Bounced)
                .await
                .unwrap();
            records.push((loc, done(5, "z.example")));
            j.close().await;
            Fixture { records }
        })
    }

    async fn push_msg(
        j: &JournalHandle,
        records: &mut Vec<(Location, Effect)>,
        (id, env, b): (MessageId, Envelope, Vec<u8>),
    ) {
        let at = 1_700_000_000 + (id.0 as u64 & 0xff);
        let loc = j.append_message(id, at, &env, &b).await.unwrap();
        records.push((loc, Effect::Msg { id, env, body: b }));
    }

    /// The live parts after replaying the records accepted by `keep`.
    fn expected(
        &self,
        keep: impl Fn(&Location) -> bool,
    ) -> BTreeMap<(MessageId, DomainName), HeldPart> {
        let mut live = BTreeMap::new();
        for (loc, e) in &self.records {
            if !keep(loc) {
                continue;
            }
            match e {
                Effect::Msg { id, env, .. } => {
                    let at = 1_700_000_000 + (id.0 as u64 & 0xff);
                    for p in HeldPart::for_message(*id, at, env, *loc) {
                        live.insert((p.id, p.domain.clone()), p);
                    }
                }
                Effect::Done { id, domain } => {
                    live.remove(&(*id, domain.clone()));
                }
                Effect::Expire { id, domain } => {
                    if let Some(p) = live.get_mut(&(*id, domain.clone())) {
                        p.expired = true;
                    }
                }
            }
        }
        live
    }

    fn body_of(&self, id: MessageId) -> &[u8] {
        self.records
            .iter()
            .find_map(|(_, e)| match e {
                Effect::Msg { id: i, body, .. } if *i == id => Some(&body[..]),
                _ => None,
            })
            .unwrap()
    }
}

/// Recovers `dir` and checks it against the model: exactly the expected parts, and every
/// returned part's body readable byte-identically from the (damaged) file.
fn check(dir: &Path, fx: &Fixture, keep: impl Fn(&Location) -> bool, what: &str) -> usize {
    check_damaged(dir, fx, keep, &[], what)
}

/// [`check`], where the messages `damaged` are held with a damaged body: reported for
/// quarantine, and their bodies not compared.
fn check_damaged(
    dir: &Path,
    fx: &Fixture,
    keep: impl Fn(&Location) -> bool,
    damaged: &[MessageId],
    what: &str,
) -> usize {
    let rec = recover(dir).unwrap_or_else(|e| panic!("{what}: recovery failed: {e}"));
    assert_eq!(rec.damaged, damaged, "{what}: messages reported damaged");
    let got: BTreeMap<_, _> = rec
        .parts
        .into_iter()
        .map(|p| ((p.id, p.domain.clone()), p))
        .collect();
    let want = fx.expected(keep);
    assert_eq!(got, want, "{what}");
    for p in got.values().filter(|p| !damaged.contains(&p.id)) {
        let path = segment_path(dir, 0, p.location.seq);
        let bytes = std::fs::read(&path).unwrap();
        let l = p.location;
        let b = &bytes[l.body_offset as usize..(l.body_offset + l.body_len) as usize];
        assert_eq!(
            b,
            fx.body_of(p.id),
            "{what}: half or wrong message returned"
        );
    }
    rec.damage.len()
}

#[test]
fn truncation_at_every_offset_keeps_exactly_the_complete_records() {
    let src = temp_dir("spool-fx-src");
    let fx = Fixture::build(&src, 1 << 20);
    let seq = fx.records[0].0.seq;
    assert!(fx.records.iter().all(|(l, _)| l.seq == seq), "one segment");
    let orig = std::fs::read(segment_path(&src, 0, seq)).unwrap();
    let end = fx.records.last().unwrap().0;
    assert_eq!(orig.len() as u64, end.offset + end.len);

    let dir = temp_dir("spool-fx-trunc");
    std::fs::create_dir_all(segment_path(&dir, 0, seq).parent().unwrap()).unwrap();
    let mut boundaries = 0;
    for t in 0..=orig.len() {
        std::fs::write(segment_path(&dir, 0, seq), &orig[..t]).unwrap();
        let t = t as u64;
        let damage = check(
            &dir,
            &fx,
            |l| l.offset + l.len <= t,
            &format!("truncated at {t}"),
        );
        let at_boundary = t == 32 || fx.records.iter().any(|(l, _)| l.offset + l.len == t);
        if at_boundary {
            boundaries += 1;
            assert_eq!(damage, 0, "a cut at a record boundary is a clean end ({t})");
        } else {
            assert_eq!(damage, 1, "a torn record is reported ({t})");
        }
    }
    assert_eq!(boundaries, fx.records.len() + 1);
    std::fs::remove_dir_all(src).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_flipped_byte_anywhere_costs_that_record_only() {
    let src = temp_dir("spool-fx-src");
    let fx = Fixture::build(&src, 1 << 20);
    let seq = fx.records[0].0.seq;
    let orig = std::fs::read(segment_path(&src, 0, seq)).unwrap();
    let dir = temp_dir("spool-fx-flip");
    std::fs::create_dir_all(segment_path(&dir, 0, seq).parent().unwrap()).unwrap();
    let last = fx.records.last().unwrap().0;
    for i in 0..orig.len() {
        for mask in [0x01u8, 0xff] {
            let mut bad = orig.clone();
            bad[i] ^= mask;
            std::fs::write(segment_path(&dir, 0, seq), &bad).unwrap();
            let i = i as u64;
            let what = format!("flip {mask:#x} at {i}");
            // The record the byte belongs to (none: the segment header).
            let hit = fx
                .records
                .iter()
                .find(|(l, _)| l.offset <= i && i < l.offset + l.len);
            let damage = match hit {
                // A damaged segment header: every record proves itself and is kept.
                None => check(&dir, &fx, |_| true, &what),
                // In a message body: the message is held (its head is intact) and, while it
                // is live, reported damaged, since intact records follow it.
                Some((l, Effect::Msg { id, .. })) if i >= l.body_offset => {
                    assert_ne!(*l, last, "the fixture ends with a DONE");
                    let live = fx.expected(|_| true).keys().any(|(m, _)| m == id);
                    let damaged: &[MessageId] = if live { &[*id] } else { &[] };
                    check_damaged(&dir, &fx, |_| true, damaged, &what)
                }
                // In a record head: that record alone is lost (a DONE's part is held again).
                Some((l, e)) => {
                    let rec = recover(&dir).unwrap();
                    if matches!(e, Effect::Done { .. }) && i > l.offset {
                        assert_eq!(rec.damage[0].kind, Some("DONE"), "{what}");
                    }
                    let l = *l;
                    check(&dir, &fx, |x| *x != l, &what)
                }
            };
            assert_eq!(damage, 1, "{what}: reported once");
        }
    }
    std::fs::remove_dir_all(src).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_torn_last_message_is_dropped_but_a_damaged_earlier_one_is_kept() {
    let dir = temp_dir("spool-fx-torn");
    let (ids, locs) = run_local(async {
        let cfg = JournalConfig {
            preallocate: false,
            ..JournalConfig::new(&dir, 0, IoKind::Epoll)
        };
        let j = JournalHandle::open(cfg, DirRecovery::empty(0))
            .await
            .unwrap();
        let mut ids = Vec::new();
        let mut locs = Vec::new();
        for k in 1..=3u64 {
            let id = MessageId::new(1_700_000_000_000, 0, k);
            let loc = j
                .append_message(id, 1, &envelope(&["a@x.example"]), &body(k, 400))
                .await
                .unwrap();
            ids.push(id);
            locs.push(loc);
        }
        j.close().await;
        (ids, locs)
    });
    let path = segment_path(&dir, 0, locs[0].seq);
    let orig = std::fs::read(&path).unwrap();
    // The last message's body, as a crash mid-write leaves it: never acknowledged.
    let mut bad = orig.clone();
    bad[locs[2].body_offset as usize + 5] ^= 0x01;
    std::fs::write(&path, &bad).unwrap();
    let rec = recover(&dir).unwrap();
    let mut held: Vec<MessageId> = rec.parts.iter().map(|p| p.id).collect();
    held.sort();
    assert_eq!(held, ids[..2], "the torn tail is not held");
    assert!(rec.damaged.is_empty());
    assert_eq!(rec.damage.len(), 1);
    assert_eq!(rec.damage[0].offset, locs[2].offset);
    // The same damage in the middle: the message was written whole once, then rotted.
    let mut bad = orig.clone();
    bad[locs[1].body_offset as usize + 5] ^= 0x01;
    std::fs::write(&path, &bad).unwrap();
    let rec = recover(&dir).unwrap();
    let mut held: Vec<MessageId> = rec.parts.iter().map(|p| p.id).collect();
    held.sort();
    assert_eq!(held, ids, "kept");
    assert_eq!(rec.damaged, [ids[1]], "and reported for quarantine");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_missing_segment_is_reported_with_the_parts_it_held() {
    let src = temp_dir("spool-fx-missing");
    let fx = Fixture::build(&src, 2048);
    let seqs: Vec<u64> = {
        let mut s: Vec<u64> = fx.records.iter().map(|(l, _)| l.seq).collect();
        s.dedup();
        s
    };
    assert!(seqs.len() >= 3, "{seqs:?}");
    let before = recover(&src).unwrap();
    assert!(before.missing.is_empty());
    let gone = seqs[1];
    let live_there = before
        .parts
        .iter()
        .filter(|p| p.location.seq == gone)
        .count() as u64;
    assert!(live_there > 0);
    std::fs::remove_file(segment_path(&src, 0, gone)).unwrap();
    let rec = recover(&src).unwrap();
    assert_eq!(rec.missing.len(), 1, "{:?}", rec.missing);
    assert_eq!(rec.missing[0].seq, gone);
    assert!(
        rec.missing[0].live_parts >= live_there,
        "{:?} vs {live_there}",
        rec.missing[0]
    );
    assert!(rec.parts.iter().all(|p| p.location.seq != gone));
    // Its number is never used again.
    let mut rec = rec;
    assert!(rec.take_dir(0).next_seq() > *seqs.last().unwrap());
    std::fs::remove_dir_all(src).unwrap();
}

#[test]
fn garbage_or_zeros_after_the_last_record_are_ignored() {
    let src = temp_dir("spool-fx-garbage");
    let fx = Fixture::build(&src, 1 << 20);
    let seq = fx.records[0].0.seq;
    let path = segment_path(&src, 0, seq);
    let orig = std::fs::read(&path).unwrap();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for len in [1usize, 5, 23, 24, 25, 100, 4096] {
        for zeros in [false, true] {
            let mut f = orig.clone();
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                f.push(if zeros { 0 } else { (x as u8) | 1 });
            }
            std::fs::write(&path, &f).unwrap();
            let damage = check(
                &src,
                &fx,
                |_| true,
                &format!("{len} bytes of garbage (zeros: {zeros})"),
            );
            assert_eq!(damage, usize::from(!zeros));
        }
    }
    // A garbage tail is sealed off by the next writer, and later recoveries are clean.
    run_local(async {
        let mut rec = recover(&src).unwrap();
        let cfg = JournalConfig::new(&src, 0, IoKind::Epoll);
        let j = JournalHandle::open(cfg, rec.take_dir(0)).await.unwrap();
        let env = envelope(&["new@x.example"]);
        j.append_message(MessageId(77), 1, &env, b"new")
            .await
            .unwrap();
        j.close().await;
    });
    assert_eq!(std::fs::read(&path).unwrap(), orig);
    let rec = recover(&src).unwrap();
    assert!(rec.damage.is_empty(), "{:?}", rec.damage);
    assert_eq!(rec.parts.len(), fx.expected(|_| true).len() + 1);
    std::fs::remove_dir_all(src).unwrap();
}

#[test]
fn damage_in_an_older_segment_spares_the_newer_ones() {
    let src = temp_dir("spool-fx-multi");
    // Small segments: the 5000-byte message and its neighbours land in different segments.
    let fx = Fixture::build(&src, 2048);
    let seqs: Vec<u64> = {
        let mut s: Vec<u64> = fx.records.iter().map(|(l, _)| l.seq).collect();
        s.dedup();
        s
    };
    assert!(seqs.len() >= 3, "{seqs:?}");
    check(&src, &fx, |_| true, "undamaged");

    // Cut the first segment inside its second record: its later records are lost, the
    // other segments are read in full.
    let first = seqs[0];
    let in_first: Vec<Location> = fx
        .records
        .iter()
        .map(|(l, _)| *l)
        .filter(|l| l.seq == first)
        .collect();
    assert!(in_first.len() >= 2);
    let path = segment_path(&src, 0, first);
    let orig = std::fs::read(&path).unwrap();
    let cut = in_first[1].offset + 10;
    std::fs::write(&path, &orig[..cut as usize]).unwrap();
    let damage = check(
        &src,
        &fx,
        |l| l.seq != first || l.offset + l.len <= cut,
        "older segment cut",
    );
    assert_eq!(damage, 1);

    // A broken header of an older segment costs nothing that can be proven intact: its
    // records pass both checksums and are kept; the damage is reported.
    let mut bad = orig.clone();
    bad[3] ^= 0xff;
    std::fs::write(&path, &bad).unwrap();
    let damage = check(&src, &fx, |_| true, "older segment header");
    assert_eq!(damage, 1);
    assert!(path.exists());
    // A damaged record head in an older segment: that record is lost, recovery resyncs and
    // keeps every later record of the segment.
    let mut bad = orig.clone();
    let hit = in_first[0];
    bad[(hit.offset + 30) as usize] ^= 0x01;
    std::fs::write(&path, &bad).unwrap();
    let damage = check(&src, &fx, |l| *l != hit, "older segment record head");
    assert_eq!(damage, 1);
    std::fs::write(&path, &orig).unwrap();

    // Bodies of older segments are not read by recovery; the reader's checksum catches a
    // flipped body byte when the message is streamed.
    let (loc, id) = fx
        .records
        .iter()
        .find_map(|(l, e)| match e {
            Effect::Msg { id, .. } if l.seq != *seqs.last().unwrap() && l.body_len > 0 => {
                Some((*l, *id))
            }
            _ => None,
        })
        .unwrap();
    let p = segment_path(&src, 0, loc.seq);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[loc.body_offset as usize] ^= 0x20;
    std::fs::write(&p, &bytes).unwrap();
    let rec = recover(&src).unwrap();
    assert!(rec.parts.iter().any(|h| h.id == id));
    run_local(async {
        let r = Reader::new(&src, IoKind::Epoll);
        let e = r.read_body(&loc).await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::Corrupt {
                    reason: "body checksum mismatch",
                    ..
                }
            ),
            "{e}"
        );
        let mut s = r.body_stream(loc, 64);
        let mut last = Ok(None);
        for _ in 0..=loc.body_len / 64 {
            last = s.next_chunk(Vec::new()).await;
            if last.is_err() {
                break;
            }
        }
        assert!(
            matches!(last, Err(Error::Corrupt { .. })),
            "the stream reports it at the end"
        );
    });
    std::fs::remove_dir_all(src).unwrap();
}

#[test]
fn unexpected_files_and_an_empty_spool_are_fine() {
    let dir = temp_dir("spool-fx-empty");
    let rec = recover(&dir).unwrap();
    assert!(rec.parts.is_empty() && rec.dirs.is_empty());
    std::fs::create_dir_all(dir.join("journal/core-0")).unwrap();
    std::fs::create_dir_all(dir.join("journal/not-a-core")).unwrap();
    std::fs::write(dir.join("journal/core-0/README"), "hi").unwrap();
    std::fs::write(dir.join("journal/core-0/0000000000000001.seg"), b"").unwrap();
    let mut rec = recover(&dir).unwrap();
    assert!(rec.parts.is_empty());
    assert_eq!(
        rec.damage.len(),
        1,
        "an empty newest segment is a torn creation"
    );
    let dr = rec.take_dir(0);
    assert_eq!(dr.next_seq(), 2);
    assert_eq!(rec.take_dir(5).core(), 5);
    std::fs::remove_dir_all(dir).unwrap();
}
