//! Sealing and opening encrypted sleeve datagrams (NaCl secretbox, XSalsa20-Poly1305,
//! keyed with the connection's session key).
//!
//! Nonce (24 bytes): byte 0 = 0x80 if the *sender* is the TCP-outbound (dialling) side,
//! else 0 (bit 6, the TCP flag, stays clear); bytes 1..15 = 0; bytes 16..23 = seqAndDF,
//! the u64 carried in clear after the sender name. seqAndDF = sequence | (DF << 63), with
//! one sequence counter for DF datagrams and one for non-DF ones, each from 0.
//!
//! Both directions work in place on the datagram buffer: no allocation per datagram.

use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;
use weft_cipher::{NONCE_LEN, SecretBox};

use super::{
    frame::{NAME_LEN, SEALED_HEADER_LEN, SEQ_LEN, TAG_LEN},
    replay::ReplayWindow,
};
use crate::mesh::SessionKey;

/// The DF flag in seqAndDF.
pub const DF_FLAG: u64 = 1 << 63;

/// Why a datagram could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SealError {
    /// The buffer is shorter than the sealed header (sender, seq, tag).
    #[error("buffer of {0} bytes too short to seal")]
    TooShort(usize),
    /// The counter reached 2^63 (never in practice); the nonce would repeat.
    #[error("sleeve sequence numbers exhausted")]
    Exhausted,
    /// A plain builder given to a sealing sender, or the other way round.
    #[error("datagram builder does not match the connection's encryption")]
    BuilderMismatch,
}

/// Why an encrypted datagram was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum OpenError {
    /// Shorter than sender + seq + tag.
    #[error("encrypted UDP packet too short ({0} bytes)")]
    TooShort(usize),
    /// The authenticator did not check (wrong key, wrong polarity, tampering, stray).
    #[error("UDP packet decryption failed")]
    Decrypt,
    /// Authentic but already seen or too old: Weave drops these silently; count them.
    #[error("replayed or too old sleeve datagram (seq {seq}, df {df})")]
    Replay {
        /// The sequence number (DF flag removed).
        seq: u64,
        /// Whether it was on the DF stream.
        df: bool,
    },
}

fn nonce(sender_outbound: bool, seq_and_df: u64) -> [u8; NONCE_LEN] {
    let mut n = [0; NONCE_LEN];
    if sender_outbound {
        n[0] = 0x80;
    }
    n[16..24].copy_from_slice(&seq_and_df.to_be_bytes());
    n
}

/// Seals this side's datagrams. `Send + Sync`: the counters are atomics, so a TX thread
/// can own it or several can share it.
pub struct SleeveSealer {
    cipher: SecretBox,
    outbound: bool,
    seq: AtomicU64,
    seq_df: AtomicU64,
}

impl std::fmt::Debug for SleeveSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SleeveSealer")
            .field("outbound", &self.outbound)
            .field("seq", &self.seq.load(Ordering::Relaxed))
            .field("seq_df", &self.seq_df.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SleeveSealer {
    /// A sealer for the side that dialled the TCP connection (`outbound`) or accepted it.
    pub fn new(key: &SessionKey, outbound: bool) -> Self {
        SleeveSealer {
            cipher: SecretBox::new(&key.0),
            outbound,
            seq: AtomicU64::new(0),
            seq_df: AtomicU64::new(0),
        }
    }

    /// Seals a datagram in place. `datagram` is laid out as a sealed
    /// [`super::frame::DatagramBuilder`] makes it: `[sender 6][seq 8][tag 16][frames]`.
    /// Writes seqAndDF and the tag, encrypts the frames, and returns seqAndDF.
    pub fn seal_datagram(&self, datagram: &mut [u8], df: bool) -> Result<u64, SealError> {
        if datagram.len() < SEALED_HEADER_LEN {
            return Err(SealError::TooShort(datagram.len()));
        }
        let counter = if df { &self.seq_df } else { &self.seq };
        let seq = counter.fetch_add(1, Ordering::Relaxed);
        if seq >= DF_FLAG {
            return Err(SealError::Exhausted);
        }
        let seq_and_df = seq | if df { DF_FLAG } else { 0 };
        let (head, body) = datagram.split_at_mut(SEALED_HEADER_LEN);
        head[NAME_LEN..NAME_LEN + SEQ_LEN].copy_from_slice(&seq_and_df.to_be_bytes());
        let tag = self
            .cipher
            .seal_in_place(&nonce(self.outbound, seq_and_df), body);
        head[NAME_LEN + SEQ_LEN..].copy_from_slice(&tag);
        Ok(seq_and_df)
    }

    /// The next sequence numbers (non-DF, DF) this sealer will use.
    pub fn next_seqs(&self) -> (u64, u64) {
        (
            self.seq.load(Ordering::Relaxed),
            self.seq_df.load(Ordering::Relaxed),
        )
    }
}

/// Opens the remote side's datagrams: decrypts in place, then checks replay per stream
/// (DF and non-DF).
pub struct SleeveOpener {
    cipher: SecretBox,
    remote_outbound: bool,
    replay: ReplayWindow,
    replay_df: ReplayWindow,
}

impl std::fmt::Debug for SleeveOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SleeveOpener")
            .field("remote_outbound", &self.remote_outbound)
            .finish_non_exhaustive()
    }
}

impl SleeveOpener {
    /// An opener for the side that dialled (`outbound`) or accepted: it expects the
    /// opposite polarity from its own sealer.
    pub fn new(key: &SessionKey, outbound: bool) -> Self {
        SleeveOpener {
            cipher: SecretBox::new(&key.0),
            remote_outbound: !outbound,
            replay: ReplayWindow::new(),
            replay_df: ReplayWindow::new(),
        }
    }

    /// Opens a whole datagram (`[sender 6][seqAndDF 8][tag 16][ciphertext]`) in place and
    /// returns the plaintext frame list (walk it with [`super::frame::frames`]) and
    /// whether it came on the DF stream. The replay state moves only for authentic
    /// datagrams.
    pub fn open_datagram<'a>(
        &mut self,
        datagram: &'a mut [u8],
    ) -> Result<(&'a [u8], bool), OpenError> {
        if datagram.len() < SEALED_HEADER_LEN {
            return Err(OpenError::TooShort(datagram.len()));
        }
        let (head, body) = datagram.split_at_mut(SEALED_HEADER_LEN);
        let mut seq = [0u8; SEQ_LEN];
        seq.copy_from_slice(&head[NAME_LEN..NAME_LEN + SEQ_LEN]);
        let seq_and_df = u64::from_be_bytes(seq);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&head[NAME_LEN + SEQ_LEN..NAME_LEN + SEQ_LEN + TAG_LEN]);
        self.cipher
            .open_in_place(&nonce(self.remote_outbound, seq_and_df), body, &tag)
            .map_err(|_| OpenError::Decrypt)?;
        let df = seq_and_df & DF_FLAG != 0;
        let window = if df {
            &mut self.replay_df
        } else {
            &mut self.replay
        };
        if !window.check_and_record(seq_and_df) {
            return Err(OpenError::Replay {
                seq: seq_and_df & !DF_FLAG,
                df,
            });
        }
        Ok((body, df))
    }
}

/// How fast one core seals and opens sleeve datagrams: what bounds the encrypted
/// sleeve's throughput (`weft cipher-speed`, and a figure of `cargo xtask bench`, which
/// reads these fields from `weft cipher-speed --json`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CipherSpeed {
    /// Datagram length measured, bytes (header, tag and frames).
    pub datagram_len: usize,
    /// Datagram bytes sealed per second.
    pub seal_bytes_per_sec: f64,
    /// Datagram bytes opened (authenticated, decrypted, replay-checked) per second.
    pub open_bytes_per_sec: f64,
}

/// Why [`measure_cipher_speed`] could not measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CipherSpeedError {
    /// Sealing failed.
    #[error("sealing: {0}")]
    Seal(#[from] SealError),
    /// A datagram just sealed did not open, or opened to other bytes.
    #[error("opening: {0}")]
    Open(#[from] OpenError),
    /// The clock did not advance while a whole ring of datagrams was sealed or opened.
    #[error("the clock is too coarse to time the cipher")]
    ClockTooCoarse,
}

/// Seals datagrams of `datagram_len` bytes (at least [`SEALED_HEADER_LEN`]) for about
/// `duration` on the calling thread, with a throwaway key; then opens freshly sealed
/// ones until opening alone has taken about `duration` (re-sealing between rounds,
/// untimed, so the whole takes about three times `duration`). Every opened datagram
/// must authenticate and decrypt to what was sealed, so a broken cipher fails here
/// rather than measuring fast.
pub fn measure_cipher_speed(
    datagram_len: usize,
    duration: std::time::Duration,
) -> Result<CipherSpeed, CipherSpeedError> {
    use std::time::Instant;
    const FILL: u8 = 0x42;
    // A ring of datagrams, so opening reads ciphertexts in sequence order.
    const RING: usize = 64;
    let len = datagram_len.clamp(SEALED_HEADER_LEN, super::frame::MAX_DATAGRAM_LEN);
    let key = SessionKey([0x5a; 32]);
    let sealer = SleeveSealer::new(&key, true);
    let mut opener = SleeveOpener::new(&key, false);
    let mut ring = vec![vec![FILL; len]; RING];
    // Sealing: the cipher's cost does not depend on the data, so each round seals the
    // previous round's ciphertext in place.
    let mut sealed = 0u64;
    let start = Instant::now();
    while start.elapsed() < duration || sealed == 0 {
        for d in &mut ring {
            sealer.seal_datagram(d, false)?;
        }
        sealed += RING as u64;
    }
    let seal_secs = start.elapsed().as_secs_f64();
    // Opening: seal plaintext (untimed), open it (timed), check it (untimed).
    let mut opened = 0u64;
    let mut open_secs = 0.0;
    while open_secs < duration.as_secs_f64() || opened == 0 {
        for d in &mut ring {
            d[SEALED_HEADER_LEN..].fill(FILL);
            sealer.seal_datagram(d, false)?;
        }
        let start = Instant::now();
        for d in &mut ring {
            std::hint::black_box(opener.open_datagram(d)?);
        }
        open_secs += start.elapsed().as_secs_f64();
        opened += RING as u64;
        if ring
            .iter()
            .any(|d| d[SEALED_HEADER_LEN..].iter().any(|&b| b != FILL))
        {
            return Err(CipherSpeedError::Open(OpenError::Decrypt));
        }
    }
    let rate = |n: u64, secs: f64| {
        // A clock too coarse to time a whole ring: no figure rather than infinity.
        if secs > 0.0 {
            Ok(n as f64 * len as f64 / secs)
        } else {
            Err(CipherSpeedError::ClockTooCoarse)
        }
    };
    Ok(CipherSpeed {
        datagram_len: len,
        seal_bytes_per_sec: rate(sealed, seal_secs)?,
        open_bytes_per_sec: rate(opened, open_secs)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        mesh::PeerName,
        sleeve::frame::{DatagramBuilder, frames, heartbeat},
    };

    const A: PeerName = PeerName([0xaa, 0, 0, 0, 0, 1]);
    const B: PeerName = PeerName([0xaa, 0, 0, 0, 0, 2]);
    const KEY: SessionKey = SessionKey([7; 32]);

    fn sealed(sealer: &SleeveSealer, df: bool, payload: &[u8]) -> Vec<u8> {
        let mut b = DatagramBuilder::new(A, true);
        b.try_push(A, B, payload).unwrap();
        sealer.seal_datagram(b.datagram_mut(), df).unwrap();
        b.datagram_mut().to_vec()
    }

    #[test]
    fn seal_open_roundtrip_with_counters_and_polarity() {
        let tx = SleeveSealer::new(&KEY, true);
        let mut rx = SleeveOpener::new(&KEY, false);
        let mut wrong = SleeveOpener::new(&KEY, true);
        for (i, df) in [(0u64, true), (0, false), (1, true), (1, false), (2, true)] {
            let mut d = sealed(&tx, df, &heartbeat(99));
            assert_eq!(d.len(), 66);
            let seq = u64::from_be_bytes(d[6..14].try_into().unwrap());
            assert_eq!(seq, i | if df { DF_FLAG } else { 0 });
            assert_eq!(wrong.open_datagram(&mut d.clone()), Err(OpenError::Decrypt));
            let (plain, got_df) = rx.open_datagram(&mut d).unwrap();
            assert_eq!(got_df, df);
            let f: Vec<_> = frames(plain).collect();
            assert_eq!(f.len(), 1);
            assert_eq!(f[0].unwrap().frame, &heartbeat(99));
        }
        assert_eq!(tx.next_seqs(), (2, 3));
    }

    #[test]
    fn replay_and_tamper() {
        let tx = SleeveSealer::new(&KEY, false);
        let mut rx = SleeveOpener::new(&KEY, true);
        let d = sealed(&tx, true, &[1, 2, 3]);
        assert!(rx.open_datagram(&mut d.clone()).is_ok());
        assert_eq!(
            rx.open_datagram(&mut d.clone()),
            Err(OpenError::Replay { seq: 0, df: true })
        );
        // The same sequence on the other stream is a different datagram (and nonce).
        let nd = sealed(&tx, false, &[1, 2, 3]);
        assert!(rx.open_datagram(&mut nd.clone()).is_ok());
        for i in 6..d.len() {
            let mut t = sealed(&tx, true, &[1, 2, 3]);
            t[i] ^= 1;
            assert_eq!(
                rx.open_datagram(&mut t),
                Err(OpenError::Decrypt),
                "byte {i}"
            );
        }
        // A forged far-future sequence number does not move the window.
        let mut forged = sealed(&tx, true, &[1]);
        forged[6..14].copy_from_slice(&(DF_FLAG | (1 << 40)).to_be_bytes());
        assert_eq!(rx.open_datagram(&mut forged), Err(OpenError::Decrypt));
        let mut next = sealed(&tx, true, &[4]);
        assert!(rx.open_datagram(&mut next).is_ok());
        assert_eq!(rx.open_datagram(&mut [0; 29]), Err(OpenError::TooShort(29)));
        assert_eq!(
            tx.seal_datagram(&mut [0; 10], true),
            Err(SealError::TooShort(10))
        );
    }

    #[test]
    fn cipher_speed_measures_authentic_round_trips() {
        let s = measure_cipher_speed(1472, std::time::Duration::from_millis(20)).unwrap();
        assert_eq!(s.datagram_len, 1472);
        assert!(
            s.seal_bytes_per_sec > 0.0 && s.open_bytes_per_sec > 0.0,
            "{s:?}"
        );
        // Shorter than a sealed header, longer than a UDP datagram: clamped.
        let s = measure_cipher_speed(0, std::time::Duration::ZERO).unwrap();
        assert_eq!(s.datagram_len, SEALED_HEADER_LEN);
        let s = measure_cipher_speed(usize::MAX, std::time::Duration::ZERO).unwrap();
        assert_eq!(s.datagram_len, crate::sleeve::frame::MAX_DATAGRAM_LEN);
    }

    #[test]
    fn debug_hides_key() {
        let tx = SleeveSealer::new(&KEY, false);
        let rx = SleeveOpener::new(&KEY, false);
        let s = format!("{tx:?} {rx:?}");
        assert!(!s.contains("7, 7"), "{s}");
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<SleeveSealer>();
        assert_send_sync::<SleeveOpener>();
    }
}
