//! A server's console output: a bounded in-memory scrollback, a rotated log file on disk
//! (so scrollback survives a wings restart), a flood gate, and a broadcast to live
//! subscribers.
//!
//! Memory stays bounded whatever the game prints: the scrollback holds `buffer_lines` lines,
//! the broadcast holds `BROADCAST_CAPACITY` events shared by every subscriber, each line is
//! at most `max_line_bytes`, and lines beyond `lines_per_second` are dropped and counted.
//! A subscriber that falls behind loses the oldest events and learns how many it lost.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

/// Events kept for subscribers that are behind; past this they are told what they missed.
pub const BROADCAST_CAPACITY: usize = 1024;

/// How often clients hear about lines dropped by the flood gate.
const DROP_NOTICE_INTERVAL: Duration = Duration::from_secs(1);

/// Something to show in a server's console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// A line the game printed (`daemon` false) or wings' own message about the server.
    /// `seq` orders lines, so a subscriber joining with history sees each line once.
    Line {
        seq: u64,
        line: Arc<str>,
        daemon: bool,
    },
    InstallStarted,
    InstallOutput(Arc<str>),
    InstallCompleted {
        successful: bool,
    },
    /// The flood gate dropped this many lines since the last notice.
    Dropped(u64),
    /// A backup or restore event (`backup progress`, `backup completed`, `backup restore
    /// completed`) with its JSON argument; sockets show it to holders of `backup.read`.
    Backup {
        event: &'static str,
        data: Arc<serde_json::Value>,
    },
}

#[derive(Debug)]
pub struct Console {
    scrollback: Mutex<Scrollback>,
    log: Mutex<LogFile>,
    gate: Mutex<FloodGate>,
    events: broadcast::Sender<ConsoleEvent>,
}

#[derive(Debug)]
struct Scrollback {
    lines: VecDeque<(u64, Arc<str>)>,
    capacity: usize,
    next_seq: u64,
}

#[derive(Debug)]
struct LogFile {
    path: PathBuf,
    writer: Option<BufWriter<File>>,
    written: u64,
    max_bytes: u64,
}

/// A token bucket over lines: `rate` per second, bursts of up to one second's worth.
#[derive(Debug)]
struct FloodGate {
    rate: f64,
    tokens: f64,
    refilled: Instant,
    dropped: u64,
    noticed: Instant,
}

/// Prefix of wings' own lines in the console, so players can tell them from the game's.
pub const DAEMON_PREFIX: &str = "[Mamba Daemon]: ";

/// Limits of one server's console.
#[derive(Debug, Clone, Copy)]
pub struct ConsoleLimits {
    pub buffer_lines: usize,
    pub log_file_max_bytes: u64,
    pub lines_per_second: u32,
}

impl Console {
    /// Opens the console of a server whose state folder is `dir`, loading the last lines of
    /// the previous log as scrollback.
    pub fn open(dir: &Path, limits: ConsoleLimits) -> Console {
        let path = dir.join("console.log");
        let lines: VecDeque<(u64, Arc<str>)> = tail_lines(&path, limits.buffer_lines)
            .into_iter()
            .zip(1..)
            .map(|(line, seq)| (seq, line))
            .collect();
        let next_seq = lines.len() as u64 + 1;
        let written = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let rate = f64::from(limits.lines_per_second);
        let now = Instant::now();
        Console {
            scrollback: Mutex::new(Scrollback {
                lines,
                capacity: limits.buffer_lines,
                next_seq,
            }),
            log: Mutex::new(LogFile {
                path,
                writer: None,
                written,
                max_bytes: limits.log_file_max_bytes,
            }),
            gate: Mutex::new(FloodGate {
                rate,
                tokens: rate,
                refilled: now,
                dropped: 0,
                noticed: now,
            }),
            events,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ConsoleEvent> {
        self.events.subscribe()
    }

    /// Subscribes and takes the last `n` lines in one step: every line is either in the
    /// history or received later, never both and never neither.
    pub fn subscribe_with_history(&self, n: usize) -> (broadcast::Receiver<ConsoleEvent>, Vec<Arc<str>>) {
        let scrollback = self.scrollback();
        let receiver = self.events.subscribe();
        let skip = scrollback.lines.len().saturating_sub(n);
        let history = scrollback
            .lines
            .iter()
            .skip(skip)
            .map(|(_, l)| l.clone())
            .collect();
        (receiver, history)
    }

    fn scrollback(&self) -> MutexGuard<'_, Scrollback> {
        self.scrollback.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records game output lines (those the flood gate lets through) and flushes the log
    /// once for the batch.
    pub fn push_output(&self, lines: &[Arc<str>]) {
        if lines.is_empty() {
            return;
        }
        let admitted = {
            let mut gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
            gate.admit(lines.len())
        };
        self.record(&lines[..admitted], false);
        self.notice_drops(false);
    }

    /// Tells subscribers how many lines the flood gate dropped, at most once a second unless
    /// `now` (the output went quiet).
    pub fn notice_drops(&self, now: bool) {
        let dropped = {
            let mut gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
            if gate.dropped == 0 || (!now && gate.noticed.elapsed() < DROP_NOTICE_INTERVAL) {
                return;
            }
            gate.noticed = Instant::now();
            std::mem::take(&mut gate.dropped)
        };
        self.daemon(&format!("Console flood: {dropped} lines were dropped"));
        let _ = self.events.send(ConsoleEvent::Dropped(dropped));
    }

    /// A message from wings about the server, shown in the console and kept in scrollback.
    pub fn daemon(&self, message: &str) {
        let line: Arc<str> = format!("{DAEMON_PREFIX}{message}").into();
        self.record(std::slice::from_ref(&line), true);
    }

    fn record(&self, lines: &[Arc<str>], daemon: bool) {
        if lines.is_empty() {
            return;
        }
        {
            // Sent under the scrollback lock, so `subscribe_with_history` sees a clean cut.
            let mut scrollback = self.scrollback();
            for line in lines {
                let seq = scrollback.next_seq;
                scrollback.next_seq += 1;
                if scrollback.lines.len() == scrollback.capacity {
                    scrollback.lines.pop_front();
                }
                scrollback.lines.push_back((seq, line.clone()));
                // No subscribers is normal.
                let _ = self.events.send(ConsoleEvent::Line {
                    seq,
                    line: line.clone(),
                    daemon,
                });
            }
        }
        if let Ok(mut log) = self.log.lock() {
            log.append(lines);
        }
    }

    pub fn install_event(&self, event: ConsoleEvent) {
        let _ = self.events.send(event);
    }

    /// Sends an event to live sockets only (not to the scrollback or the log).
    pub fn broadcast(&self, event: ConsoleEvent) {
        let _ = self.events.send(event);
    }

    /// The last `n` lines of scrollback, oldest first.
    pub fn recent(&self, n: usize) -> Vec<String> {
        let scrollback = self.scrollback();
        let skip = scrollback.lines.len().saturating_sub(n);
        scrollback
            .lines
            .iter()
            .skip(skip)
            .map(|(_, l)| l.to_string())
            .collect()
    }
}

impl FloodGate {
    /// How many of `n` new lines may pass; the rest are counted as dropped.
    fn admit(&mut self, n: usize) -> usize {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        let admitted = (self.tokens.floor().max(0.0) as usize).min(n);
        self.tokens -= admitted as f64;
        self.dropped += (n - admitted) as u64;
        admitted
    }
}

impl LogFile {
    fn append(&mut self, lines: &[Arc<str>]) {
        if let Err(e) = self.try_append(lines) {
            tracing::warn!(path = %self.path.display(), "cannot write the console log: {e}");
            self.writer = None;
        }
    }

    fn try_append(&mut self, lines: &[Arc<str>]) -> std::io::Result<()> {
        if self.written >= self.max_bytes {
            self.writer = None;
            let rotated = self.path.with_extension("log.1");
            std::fs::rename(&self.path, rotated)?;
            self.written = 0;
        }
        let writer = match &mut self.writer {
            Some(w) => w,
            None => {
                let file = OpenOptions::new().create(true).append(true).open(&self.path)?;
                self.writer.insert(BufWriter::with_capacity(16 * 1024, file))
            }
        };
        for line in lines {
            writer.write_all(line.as_bytes())?;
            writer.write_all(b"\n")?;
            self.written += line.len() as u64 + 1;
        }
        writer.flush()
    }
}

/// The last `n` lines of a log file, reading only its end.
fn tail_lines(path: &Path, n: usize) -> VecDeque<Arc<str>> {
    let read = || -> std::io::Result<VecDeque<Arc<str>>> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let window = (n as u64).saturating_mul(512).min(len).max(64 * 1024).min(len);
        file.seek(SeekFrom::Start(len - window))?;
        let mut bytes = Vec::with_capacity(window as usize);
        file.read_to_end(&mut bytes)?;
        let text = String::from_utf8_lossy(&bytes);
        let mut lines: Vec<&str> = text.lines().collect();
        if window < len && !lines.is_empty() {
            lines.remove(0); // probably a partial line
        }
        let start = lines.len().saturating_sub(n);
        Ok(lines[start..].iter().map(|l| Arc::from(*l)).collect())
    };
    read().unwrap_or_default()
}

/// Splits a byte stream into lines: `\n` ends a line, a trailing `\r` is dropped, invalid
/// UTF-8 is replaced, and lines longer than the limit are truncated. Escape sequences are
/// kept as data.
#[derive(Debug)]
pub struct LineSplitter {
    partial: Vec<u8>,
    max_line_bytes: usize,
    truncated: bool,
}

impl LineSplitter {
    pub fn new(max_line_bytes: usize) -> LineSplitter {
        LineSplitter {
            partial: Vec::new(),
            max_line_bytes,
            truncated: false,
        }
    }

    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<Arc<str>>) {
        while let Some(pos) = bytes.iter().position(|&b| b == b'\n') {
            self.take(&bytes[..pos]);
            out.push(self.finish());
            bytes = &bytes[pos + 1..];
        }
        self.take(bytes);
    }

    /// Whatever is left when the stream ends.
    pub fn flush(&mut self, out: &mut Vec<Arc<str>>) {
        if !self.partial.is_empty() || self.truncated {
            out.push(self.finish());
        }
    }

    fn take(&mut self, bytes: &[u8]) {
        let room = self.max_line_bytes.saturating_sub(self.partial.len());
        if bytes.len() > room {
            self.partial.extend_from_slice(&bytes[..room]);
            self.truncated = true;
        } else {
            self.partial.extend_from_slice(bytes);
        }
    }

    fn finish(&mut self) -> Arc<str> {
        if self.partial.last() == Some(&b'\r') {
            self.partial.pop();
        }
        let mut line = String::from_utf8_lossy(&self.partial).into_owned();
        if self.truncated {
            line.push_str(" [line truncated]");
        }
        self.partial.clear();
        self.truncated = false;
        Arc::from(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(buffer_lines: usize, log_file_max_bytes: u64) -> ConsoleLimits {
        ConsoleLimits {
            buffer_lines,
            log_file_max_bytes,
            lines_per_second: 1_000_000,
        }
    }

    #[test]
    fn history_and_live_lines_never_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let console = Console::open(dir.path(), limits(10, 1 << 20));
        console.push_output(&[Arc::from("a"), Arc::from("b")]);
        let (mut rx, history) = console.subscribe_with_history(1);
        console.push_output(&[Arc::from("c")]);
        assert_eq!(history, vec![Arc::<str>::from("b")]);
        match rx.try_recv().unwrap() {
            ConsoleEvent::Line { line, daemon, .. } => assert_eq!((&*line, daemon), ("c", false)),
            other => panic!("unexpected {other:?}"),
        }
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn flood_gate_drops_and_reports_the_excess() {
        let dir = tempfile::tempdir().unwrap();
        let console = Console::open(
            dir.path(),
            ConsoleLimits {
                buffer_lines: 100,
                log_file_max_bytes: 1 << 20,
                lines_per_second: 10,
            },
        );
        let mut rx = console.subscribe();
        let lines: Vec<Arc<str>> = (0..25).map(|i| Arc::from(format!("line {i}"))).collect();
        console.push_output(&lines);
        console.notice_drops(true);
        let mut passed = 0;
        let mut dropped = 0;
        while let Ok(event) = rx.try_recv() {
            match event {
                ConsoleEvent::Line { daemon: false, .. } => passed += 1,
                ConsoleEvent::Dropped(n) => dropped += n,
                _ => {}
            }
        }
        assert_eq!((passed, dropped), (10, 15));
        assert!(console.recent(1)[0].contains("15 lines were dropped"));
    }

    #[test]
    fn splits_truncates_and_keeps_escapes() {
        let mut s = LineSplitter::new(8);
        let mut out = Vec::new();
        s.push(b"ab\r\ncd", &mut out);
        s.push(b"ef\n\x1b[31mred\n0123456789abc\npart", &mut out);
        s.flush(&mut out);
        let out: Vec<&str> = out.iter().map(|l| &**l).collect();
        assert_eq!(
            out,
            vec!["ab", "cdef", "\x1b[31mred", "01234567 [line truncated]", "part"]
        );
    }

    #[test]
    fn scrollback_is_bounded_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let console = Console::open(dir.path(), limits(3, 1 << 20));
        let lines: Vec<Arc<str>> = (0..5).map(|i| Arc::from(format!("line {i}"))).collect();
        console.push_output(&lines);
        console.daemon("stopped");
        assert_eq!(
            console.recent(10),
            vec!["line 3", "line 4", "[Mamba Daemon]: stopped"]
        );
        drop(console);
        let again = Console::open(dir.path(), limits(3, 1 << 20));
        assert_eq!(again.recent(2), vec!["line 4", "[Mamba Daemon]: stopped"]);
    }

    #[test]
    fn log_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let console = Console::open(dir.path(), limits(10, 20));
        for i in 0..10 {
            console.push_output(&[Arc::from(format!("line number {i}"))]);
        }
        assert!(dir.path().join("console.log.1").exists());
        assert!(std::fs::metadata(dir.path().join("console.log")).unwrap().len() < 40);
    }
}
