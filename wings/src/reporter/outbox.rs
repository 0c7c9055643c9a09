//! The on-disk outbox: what wings has to tell the panel, kept until the panel acknowledged
//! it (ADR 0011).
//!
//! Records (one JSON line each, with a stable id) are appended to segment files
//! `<dir>/<seq>.seg`, numbered in order. The sender reads the oldest segment from the
//! front, and a segment is deleted only once the panel acknowledged every record in it; the
//! active (newest) segment is sealed when it reaches `segment_bytes`. So records leave in the
//! order they were written, and a crash at any point re-sends at most the unacknowledged
//! part of the oldest segment, which the panel recognises (its ingest is idempotent).
//!
//! The total size never passes `max_bytes`: to make room, whole segments are dropped from
//! the oldest end, and the number of records lost is logged and counted.
//!
//! Blocking file I/O: call it from `spawn_blocking` or keep records small (they are).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One thing to deliver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Stable across re-deliveries and wings restarts (a UUIDv7).
    pub id: String,
    #[serde(flatten)]
    pub body: RecordBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RecordBody {
    Metrics {
        batch: mamba_shared::metrics::MetricsBatch,
    },
    Events {
        batch: mamba_shared::node_api::EventsBatch,
    },
    Activity {
        batch: mamba_shared::activity::ActivityBatch,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("a record of {0} bytes is larger than the outbox bound")]
    TooLarge(u64),
    #[error("cannot encode a record: {0}")]
    Encode(#[from] serde_json::Error),
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    bytes: u64,
    records: usize,
}

/// Figures for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    pub bytes: u64,
    pub segments: usize,
    pub records: usize,
    /// Records dropped to stay within the bound, since this process started.
    pub dropped: u64,
}

#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    /// The newest segment, open for appending; `None` once sealed.
    active: Option<File>,
    /// Records of the oldest segment the panel acknowledged (in this process).
    acked: usize,
    dropped: u64,
    /// Never reused, even once the outbox is empty, so a stale acknowledgement cannot land on
    /// a newer segment.
    next_seq: u64,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.seg"))
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`, finding the segments a previous run left. The
    /// last of them is sealed: new records go to a new segment.
    pub fn open(dir: &Path, max_bytes: u64, segment_bytes: u64) -> Result<Outbox, OutboxError> {
        fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let bytes = entry.metadata()?.len();
            let records = count_lines(&entry.path())?;
            found.push(Segment { seq, bytes, records });
        }
        found.sort_by_key(|s| s.seq);
        let next_seq = found.last().map_or(1, |s| s.seq + 1);
        let mut outbox = Outbox {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes: segment_bytes.clamp(1, max_bytes.max(1)),
            segments: found.into(),
            active: None,
            acked: 0,
            dropped: 0,
            next_seq,
        };
        // A bound lowered since the last run applies at once.
        outbox.make_room(0)?;
        Ok(outbox)
    }

    pub fn stats(&self) -> OutboxStats {
        OutboxStats {
            bytes: self.total_bytes(),
            segments: self.segments.len(),
            records: self
                .segments
                .iter()
                .map(|s| s.records)
                .sum::<usize>()
                .saturating_sub(self.acked),
            dropped: self.dropped,
        }
    }

    fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Appends a record, durably (fsync) before returning. Drops the oldest segments first if
    /// the bound requires it.
    pub fn append(&mut self, record: &Record) -> Result<(), OutboxError> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        let len = line.len() as u64;
        if len > self.max_bytes {
            return Err(OutboxError::TooLarge(len));
        }
        let fits_active = self.active.is_some()
            && self
                .segments
                .back()
                .is_some_and(|s| s.bytes + len <= self.segment_bytes);
        if !fits_active {
            self.active = None;
        }
        self.make_room(len)?;
        if self.active.is_none() {
            let seq = self.next_seq;
            self.next_seq += 1;
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(segment_path(&self.dir, seq))?;
            // The new file's name must survive a crash too.
            File::open(&self.dir)?.sync_all()?;
            self.segments.push_back(Segment {
                seq,
                bytes: 0,
                records: 0,
            });
            self.active = Some(file);
        }
        if let (Some(file), Some(segment)) = (self.active.as_mut(), self.segments.back_mut()) {
            file.write_all(&line)?;
            file.sync_data()?;
            segment.bytes += len;
            segment.records += 1;
        }
        Ok(())
    }

    /// Drops whole segments from the oldest end until `incoming` more bytes fit.
    fn make_room(&mut self, incoming: u64) -> Result<(), OutboxError> {
        while self.total_bytes() + incoming > self.max_bytes {
            let Some(oldest) = self.segments.pop_front() else {
                break;
            };
            if self.segments.is_empty() {
                // It was the active segment too.
                self.active = None;
            }
            let lost = oldest.records.saturating_sub(self.acked) as u64;
            self.acked = 0;
            self.dropped += lost;
            remove(&segment_path(&self.dir, oldest.seq))?;
            tracing::warn!(
                records = lost,
                bytes = oldest.bytes,
                max_bytes = self.max_bytes,
                "outbox full: dropped the oldest undelivered records"
            );
        }
        Ok(())
    }

    /// The records of the oldest segment not acknowledged yet, in order (at most `limit`),
    /// with that segment's number for [`Outbox::ack`]. Lines that do not parse (a write torn
    /// by a crash) are returned as `None` so their place can still be acknowledged.
    pub fn pending(&self, limit: usize) -> Result<(u64, Vec<Option<Record>>), OutboxError> {
        let Some(oldest) = self.segments.front() else {
            return Ok((0, Vec::new()));
        };
        let seq = oldest.seq;
        let file = match File::open(segment_path(&self.dir, oldest.seq)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((seq, Vec::new())),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for line in BufReader::new(file).split(b'\n').skip(self.acked).take(limit) {
            let line = line?;
            out.push(serde_json::from_slice(&line).ok());
        }
        Ok((seq, out))
    }

    /// The panel acknowledged the next record of segment `seq`, the oldest when it was read.
    /// A fully acknowledged segment is deleted (sealing it first if it was the active one).
    /// If the bound dropped that segment meanwhile, there is nothing left to acknowledge.
    pub fn ack(&mut self, seq: u64) -> Result<(), OutboxError> {
        let Some(oldest) = self.segments.front().filter(|s| s.seq == seq) else {
            return Ok(());
        };
        self.acked += 1;
        if self.acked >= oldest.records {
            let seq = oldest.seq;
            if self.segments.len() == 1 {
                self.active = None;
            }
            self.segments.pop_front();
            self.acked = 0;
            remove(&segment_path(&self.dir, seq))?;
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.segments.iter().map(|s| s.records).sum::<usize>() <= self.acked
    }
}

fn remove(path: &Path) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn count_lines(path: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for line in BufReader::new(File::open(path)?).split(b'\n') {
        line?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use mamba_shared::metrics::{MetricSample, MetricsBatch};

    use super::*;

    fn record(n: i64) -> Record {
        Record {
            id: format!("r{n}"),
            body: RecordBody::Metrics {
                batch: MetricsBatch {
                    samples: vec![MetricSample {
                        server_id: "s".into(),
                        sampled_at_ms: n,
                        cpu_millicores: 1,
                        memory_mb: 2,
                        egress_bytes: 3,
                        disk_bytes: 4,
                        uptime_s: 5,
                    }],
                },
            },
        }
    }

    fn drain(outbox: &mut Outbox) -> Vec<String> {
        let mut ids = Vec::new();
        loop {
            let (seq, pending) = outbox.pending(3).unwrap();
            if pending.is_empty() {
                break;
            }
            for r in pending {
                ids.push(r.unwrap().id);
                outbox.ack(seq).unwrap();
            }
        }
        ids
    }

    #[test]
    fn records_leave_in_order_once_and_segments_go_when_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), 1 << 20, 600).unwrap();
        for n in 0..20 {
            outbox.append(&record(n)).unwrap();
        }
        assert!(outbox.stats().segments > 1);
        let ids = drain(&mut outbox);
        assert_eq!(ids, (0..20).map(|n| format!("r{n}")).collect::<Vec<_>>());
        assert!(outbox.is_empty());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        // Appending after a full drain starts a new segment.
        outbox.append(&record(99)).unwrap();
        assert_eq!(drain(&mut outbox), vec!["r99".to_string()]);
    }

    #[test]
    fn a_reopened_outbox_resends_the_unacknowledged_part_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), 1 << 20, 1 << 16).unwrap();
        for n in 0..5 {
            outbox.append(&record(n)).unwrap();
        }
        let (seq, _) = outbox.pending(2).unwrap();
        outbox.ack(seq).unwrap();
        outbox.ack(seq).unwrap();
        drop(outbox);
        let mut outbox = Outbox::open(dir.path(), 1 << 20, 1 << 16).unwrap();
        outbox.append(&record(5)).unwrap();
        // The oldest segment is sent again from its start (the panel dedupes), then the rest.
        let ids = drain(&mut outbox);
        assert_eq!(ids, ["r0", "r1", "r2", "r3", "r4", "r5"]);
    }

    #[test]
    fn the_bound_holds_by_dropping_the_oldest_segments() {
        let dir = tempfile::tempdir().unwrap();
        let one = serde_json::to_vec(&record(0)).unwrap().len() as u64 + 1;
        let max = one * 10;
        let mut outbox = Outbox::open(dir.path(), max, one * 2).unwrap();
        for n in 0..100 {
            outbox.append(&record(n)).unwrap();
            let on_disk: u64 = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().metadata().unwrap().len())
                .sum();
            assert!(on_disk <= max, "{on_disk} > {max}");
        }
        assert!(outbox.stats().dropped >= 90);
        let ids = drain(&mut outbox);
        // What is left is the newest, still in order.
        assert_eq!(ids.last().unwrap(), "r99");
        let nums: Vec<i64> = ids.iter().map(|i| i[1..].parse().unwrap()).collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1));
        assert!(matches!(
            outbox.append(&Record {
                id: "x".repeat(max as usize),
                body: record(0).body
            }),
            Err(OutboxError::TooLarge(_))
        ));
    }

    #[test]
    fn a_torn_last_line_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), 1 << 20, 1 << 16).unwrap();
        outbox.append(&record(0)).unwrap();
        drop(outbox);
        let seg = fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"{\"id\":\"tor").unwrap();
        drop(f);
        let mut outbox = Outbox::open(dir.path(), 1 << 20, 1 << 16).unwrap();
        let (seq, pending) = outbox.pending(10).unwrap();
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0].as_ref().unwrap().id, "r0");
        assert!(pending[1].is_none());
        outbox.ack(seq).unwrap();
        outbox.ack(seq).unwrap();
        assert!(outbox.is_empty());
        // A stale acknowledgement (its segment is gone) changes nothing.
        outbox.append(&record(1)).unwrap();
        outbox.ack(seq).unwrap();
        assert_eq!(outbox.stats().records, 1);
    }
}
