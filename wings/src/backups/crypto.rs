//! Optional encryption of a backup: AES-256-GCM over fixed-size chunks (ring), so a stream of
//! any length is authenticated piece by piece without holding it in memory.
//!
//! Layout: a 20-byte header, then chunks. Every chunk but the last holds exactly `chunk_size`
//! bytes of plaintext; the last holds 0 to `chunk_size` bytes. Each chunk is its ciphertext
//! followed by a 16-byte tag.
//!
//! ```text
//! header = "MAMBAENC" | version (1) | chunk_size (u32 BE) | nonce prefix (7 random bytes)
//! nonce  = nonce prefix (7) | chunk counter (u32 BE) | 1 if last chunk else 0
//! aad    = header
//! ```
//!
//! The counter in the nonce stops chunks being reordered or dropped from the middle, the
//! last-chunk flag stops the stream being cut at a chunk boundary, and the header as AAD stops
//! the chunk size being changed. The key is the caller's (one per backup); the random prefix
//! makes nonces unique even if a key were reused.

use std::io::{self, Read, Write};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

pub const KEY_LEN: usize = 32;
const MAGIC: &[u8; 8] = b"MAMBAENC";
const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 8 + 1 + 4 + PREFIX_LEN;
const PREFIX_LEN: usize = 7;
const TAG_LEN: usize = 16;
/// Plaintext bytes per chunk written by this version.
pub const DEFAULT_CHUNK: usize = 1 << 20;
/// Largest chunk a reader accepts, so a hostile header cannot make it allocate much.
const MAX_CHUNK: usize = 16 << 20;

/// A backup's 256-bit key. Never logged, never stored by wings.
#[derive(Clone)]
pub struct BackupKey([u8; KEY_LEN]);

impl std::fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackupKey(<hidden>)")
    }
}

impl BackupKey {
    pub fn from_bytes(bytes: &[u8]) -> Option<BackupKey> {
        <[u8; KEY_LEN]>::try_from(bytes).ok().map(BackupKey)
    }

    /// Parses the standard base64 form the API takes.
    pub fn from_base64(text: &str) -> Option<BackupKey> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .ok()?;
        Self::from_bytes(&bytes)
    }

    /// A short public fingerprint, so a restore with the wrong key is refused before any
    /// download. It is a hash of a 256-bit random key and reveals nothing useful about it.
    pub fn fingerprint(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"mamba backup key fingerprint v1\0");
        ctx.update(&self.0);
        hex::encode(&ctx.finish().as_ref()[..8])
    }

    fn aead(&self) -> io::Result<LessSafeKey> {
        let key = UnboundKey::new(&AES_256_GCM, &self.0).map_err(|_| invalid("bad key"))?;
        Ok(LessSafeKey::new(key))
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

fn nonce(prefix: &[u8; PREFIX_LEN], counter: u32, last: bool) -> Nonce {
    let mut bytes = [0u8; NONCE_LEN];
    bytes[..PREFIX_LEN].copy_from_slice(prefix);
    bytes[PREFIX_LEN..PREFIX_LEN + 4].copy_from_slice(&counter.to_be_bytes());
    bytes[NONCE_LEN - 1] = u8::from(last);
    Nonce::assume_unique_for_key(bytes)
}

/// Encrypts everything written to it into `inner`. [`SealWriter::finish`] must be called:
/// without the last chunk, a reader refuses the stream as truncated.
pub struct SealWriter<W: Write> {
    inner: W,
    key: LessSafeKey,
    header: [u8; HEADER_LEN],
    prefix: [u8; PREFIX_LEN],
    counter: u32,
    chunk: usize,
    buf: Vec<u8>,
    header_written: bool,
}

impl<W: Write> SealWriter<W> {
    pub fn new(inner: W, key: &BackupKey) -> io::Result<SealWriter<W>> {
        Self::with_chunk(inner, key, DEFAULT_CHUNK)
    }

    pub fn with_chunk(inner: W, key: &BackupKey, chunk: usize) -> io::Result<SealWriter<W>> {
        if chunk == 0 || chunk > MAX_CHUNK {
            return Err(invalid("chunk size out of range"));
        }
        let mut prefix = [0u8; PREFIX_LEN];
        SystemRandom::new()
            .fill(&mut prefix)
            .map_err(|_| io::Error::other("no randomness"))?;
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8] = VERSION;
        header[9..13].copy_from_slice(&u32::try_from(chunk).unwrap_or(u32::MAX).to_be_bytes());
        header[13..].copy_from_slice(&prefix);
        Ok(SealWriter {
            inner,
            key: key.aead()?,
            header,
            prefix,
            counter: 0,
            chunk,
            buf: Vec::with_capacity(chunk + TAG_LEN),
            header_written: false,
        })
    }

    fn seal(&mut self, last: bool) -> io::Result<()> {
        if !self.header_written {
            self.inner.write_all(&self.header)?;
            self.header_written = true;
        }
        let tag = self
            .key
            .seal_in_place_separate_tag(
                nonce(&self.prefix, self.counter, last),
                Aad::from(&self.header),
                &mut self.buf,
            )
            .map_err(|_| io::Error::other("encryption failed"))?;
        self.inner.write_all(&self.buf)?;
        self.inner.write_all(tag.as_ref())?;
        self.buf.clear();
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| io::Error::other("stream too long for one key and prefix"))?;
        Ok(())
    }

    /// Seals the last chunk and answers the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.seal(true)?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for SealWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        // A full chunk is sealed only once more data arrives: until then it may be the last.
        if self.buf.len() == self.chunk {
            self.seal(false)?;
        }
        let n = data.len().min(self.chunk - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Decrypts and authenticates a stream written by [`SealWriter`]. Any change, reordering or
/// truncation makes a read fail with `InvalidData`; no unauthenticated byte is ever returned.
pub struct OpenReader<R: Read> {
    inner: R,
    key: LessSafeKey,
    header: [u8; HEADER_LEN],
    prefix: [u8; PREFIX_LEN],
    counter: u32,
    chunk: usize,
    /// Ciphertext read ahead: one chunk plus one byte tells whether the chunk is the last.
    input: Vec<u8>,
    /// Decrypted bytes not yet handed out: `plain[pos..]`.
    plain: Vec<u8>,
    pos: usize,
    done: bool,
}

impl<R: Read> OpenReader<R> {
    pub fn new(mut inner: R, key: &BackupKey) -> io::Result<OpenReader<R>> {
        let mut header = [0u8; HEADER_LEN];
        inner
            .read_exact(&mut header)
            .map_err(|_| invalid("not an encrypted backup (header too short)"))?;
        if &header[..8] != MAGIC || header[8] != VERSION {
            return Err(invalid("not an encrypted backup, or an unknown version"));
        }
        let chunk = u32::from_be_bytes([header[9], header[10], header[11], header[12]]) as usize;
        if chunk == 0 || chunk > MAX_CHUNK {
            return Err(invalid("encrypted backup header: bad chunk size"));
        }
        let mut prefix = [0u8; PREFIX_LEN];
        prefix.copy_from_slice(&header[13..]);
        Ok(OpenReader {
            inner,
            key: key.aead()?,
            header,
            prefix,
            counter: 0,
            chunk,
            input: Vec::with_capacity(chunk + TAG_LEN + 1),
            plain: Vec::new(),
            pos: 0,
            done: false,
        })
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Whether the stream is encrypted: it starts with the magic bytes.
    pub fn is_encrypted(prefix: &[u8]) -> bool {
        prefix.starts_with(MAGIC)
    }

    fn next_chunk(&mut self) -> io::Result<()> {
        let want = self.chunk + TAG_LEN + 1;
        while self.input.len() < want {
            let start = self.input.len();
            self.input.resize(want, 0);
            let n = match self.inner.read(&mut self.input[start..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    self.input.truncate(start);
                    return Err(e);
                }
            };
            self.input.truncate(start + n);
            if n == 0 {
                break;
            }
        }
        let last = self.input.len() < want;
        if self.input.len() < TAG_LEN {
            return Err(invalid("encrypted backup is truncated"));
        }
        let take = if last { self.input.len() } else { want - 1 };
        let carry = self.input.split_off(take);
        let mut sealed = std::mem::replace(&mut self.input, carry);
        let plain_len = self
            .key
            .open_in_place(
                nonce(&self.prefix, self.counter, last),
                Aad::from(&self.header),
                &mut sealed,
            )
            .map_err(|_| {
                invalid("encrypted backup failed authentication (tampered, truncated or wrong key)")
            })?
            .len();
        sealed.truncate(plain_len);
        self.plain = sealed;
        self.pos = 0;
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| invalid("encrypted backup has too many chunks"))?;
        self.done = last;
        Ok(())
    }
}

impl<R: Read> Read for OpenReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.plain.len() {
            if self.done || out.is_empty() {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let n = out.len().min(self.plain.len() - self.pos);
        out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> BackupKey {
        BackupKey([byte; KEY_LEN])
    }

    fn seal(data: &[u8], chunk: usize) -> Vec<u8> {
        let mut w = SealWriter::with_chunk(Vec::new(), &key(7), chunk).unwrap();
        // Odd write sizes, so chunk boundaries fall inside writes.
        for piece in data.chunks(13) {
            w.write_all(piece).unwrap();
        }
        w.finish().unwrap()
    }

    fn open(sealed: &[u8], key_byte: u8) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        OpenReader::new(sealed, &key(key_byte))?.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trips_every_length_around_chunk_boundaries() {
        for len in [0usize, 1, 63, 64, 65, 128, 129, 1000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let sealed = seal(&data, 64);
            assert_eq!(open(&sealed, 7).unwrap(), data, "length {len}");
            let chunks = len.div_ceil(64).max(1);
            assert_eq!(sealed.len(), HEADER_LEN + len + TAG_LEN * chunks, "length {len}");
        }
    }

    #[test]
    fn any_change_truncation_or_wrong_key_is_refused() {
        let data: Vec<u8> = (0..500u32).map(|i| i as u8).collect();
        let sealed = seal(&data, 64);
        assert!(open(&sealed, 8).is_err(), "wrong key");
        for at in [0, 9, 12, 15, HEADER_LEN, HEADER_LEN + 70, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert!(open(&bad, 7).is_err(), "flipped byte {at}");
        }
        // Cut at a chunk boundary (the stream would otherwise look complete) and elsewhere.
        for cut in [
            HEADER_LEN + 80,
            HEADER_LEN + 80 * 2,
            sealed.len() - 1,
            HEADER_LEN,
            5,
        ] {
            assert!(open(&sealed[..cut], 7).is_err(), "cut at {cut}");
        }
        // Two chunks swapped.
        let mut swapped = sealed[..HEADER_LEN].to_vec();
        swapped.extend_from_slice(&sealed[HEADER_LEN + 80..HEADER_LEN + 160]);
        swapped.extend_from_slice(&sealed[HEADER_LEN..HEADER_LEN + 80]);
        swapped.extend_from_slice(&sealed[HEADER_LEN + 160..]);
        assert!(open(&swapped, 7).is_err());
        // Extra data after the last chunk.
        let mut longer = sealed.clone();
        longer.extend_from_slice(&[0; 16]);
        assert!(open(&longer, 7).is_err());
    }

    #[test]
    fn keys_parse_from_base64_and_hide_in_debug() {
        let k = BackupKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        assert_eq!(format!("{k:?}"), "BackupKey(<hidden>)");
        assert_eq!(k.fingerprint().len(), 16);
        assert_ne!(k.fingerprint(), key(1).fingerprint());
        assert!(BackupKey::from_base64("AAEC").is_none());
        assert!(BackupKey::from_base64("not base64!").is_none());
    }
}
