//! A server's console output: a bounded in-memory scrollback, a rotated log file on disk
//! (so scrollback survives a wings restart), and a broadcast to live subscribers.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

/// A line of console output, or wings' own message about the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    Output(Arc<str>),
    Install(Arc<str>),
    Daemon(Arc<str>),
}

#[derive(Debug)]
pub struct Console {
    buffer: Mutex<VecDeque<Arc<str>>>,
    capacity: usize,
    log: Mutex<LogFile>,
    events: broadcast::Sender<ConsoleEvent>,
}

#[derive(Debug)]
struct LogFile {
    path: PathBuf,
    writer: Option<BufWriter<File>>,
    written: u64,
    max_bytes: u64,
}

/// Prefix of wings' own lines in the console, so players can tell them from the game's.
pub const DAEMON_PREFIX: &str = "[Mamba Daemon]: ";

impl Console {
    /// Opens the console of a server whose state folder is `dir`, loading the last lines of
    /// the previous log as scrollback.
    pub fn open(dir: &Path, capacity: usize, max_bytes: u64) -> Console {
        let path = dir.join("console.log");
        let buffer = tail_lines(&path, capacity);
        let written = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let (events, _) = broadcast::channel(1024);
        Console {
            buffer: Mutex::new(buffer),
            capacity,
            log: Mutex::new(LogFile {
                path,
                writer: None,
                written,
                max_bytes,
            }),
            events,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ConsoleEvent> {
        self.events.subscribe()
    }

    /// Records game output lines and flushes the log once for the batch.
    pub fn push_output(&self, lines: &[Arc<str>]) {
        if lines.is_empty() {
            return;
        }
        if let Ok(mut buffer) = self.buffer.lock() {
            for line in lines {
                if buffer.len() == self.capacity {
                    buffer.pop_front();
                }
                buffer.push_back(line.clone());
            }
        }
        if let Ok(mut log) = self.log.lock() {
            log.append(lines);
        }
        for line in lines {
            // No subscribers is normal.
            let _ = self.events.send(ConsoleEvent::Output(line.clone()));
        }
    }

    /// A message from wings about the server, shown in the console and kept in scrollback.
    pub fn daemon(&self, message: &str) {
        let line: Arc<str> = format!("{DAEMON_PREFIX}{message}").into();
        if let Ok(mut buffer) = self.buffer.lock() {
            if buffer.len() == self.capacity {
                buffer.pop_front();
            }
            buffer.push_back(line.clone());
        }
        if let Ok(mut log) = self.log.lock() {
            log.append(std::slice::from_ref(&line));
        }
        let _ = self.events.send(ConsoleEvent::Daemon(line));
    }

    pub fn install_output(&self, line: Arc<str>) {
        let _ = self.events.send(ConsoleEvent::Install(line));
    }

    /// The last `n` lines of scrollback, oldest first.
    pub fn recent(&self, n: usize) -> Vec<String> {
        let Ok(buffer) = self.buffer.lock() else {
            return Vec::new();
        };
        buffer
            .iter()
            .skip(buffer.len().saturating_sub(n))
            .map(|l| l.to_string())
            .collect()
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
        let console = Console::open(dir.path(), 3, 1 << 20);
        let lines: Vec<Arc<str>> = (0..5).map(|i| Arc::from(format!("line {i}"))).collect();
        console.push_output(&lines);
        console.daemon("stopped");
        assert_eq!(
            console.recent(10),
            vec!["line 3", "line 4", "[Mamba Daemon]: stopped"]
        );
        drop(console);
        let again = Console::open(dir.path(), 3, 1 << 20);
        assert_eq!(again.recent(2), vec!["line 4", "[Mamba Daemon]: stopped"]);
    }

    #[test]
    fn log_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let console = Console::open(dir.path(), 10, 20);
        for i in 0..10 {
            console.push_output(&[Arc::from(format!("line number {i}"))]);
        }
        assert!(dir.path().join("console.log.1").exists());
        assert!(std::fs::metadata(dir.path().join("console.log")).unwrap().len() < 40);
    }
}
