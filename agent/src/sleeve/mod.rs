//! Weave's sleeve overlay (UDP 6783): frames between peers in UDP datagrams, plain or
//! sealed with the connection's session key, with heartbeats and path-MTU discovery.
//!
//! - [`frame`]: the datagram codec (zero-copy frame walk, reusable datagram builder,
//!   special frames).
//! - [`crypto`]: sealing/opening in place (NaCl secretbox), DF and non-DF streams.
//! - [`replay`]: Weave's replay window.
//! - [`forwarder`]: the per-connection control state machine (heartbeats, acks, timeout,
//!   path-MTU discovery), fed bytes and time, returning actions.
//! - [`icmp`]: ICMP frag-needed for DF frames over the sleeve MTU.
//!
//! [`SleeveTx`] and [`SleeveRx`] bundle the plain and sealed cases for the I/O layer:
//!
//! ```text
//! rx:  sender = frame::datagram_sender(buf)?  -> find the connection
//!      for f in conn.rx.open(buf)? { special -> forwarder.on_special_frame, else deliver }
//! tx:  builder.try_push(src, dst, frame) until Full; conn.tx.finish(&mut builder, df)
//!      -> send to forwarder.remote_addr(); builder.clear()
//! ```

pub mod crypto;
pub mod forwarder;
pub mod frame;
pub mod icmp;
pub mod replay;

use crypto::{OpenError, SealError, SleeveOpener, SleeveSealer};
pub use forwarder::{SleeveAction, SleeveFailure, SleeveForwarder};
use frame::{DatagramBuilder, FrameError, Frames};
use thiserror::Error;

use crate::mesh::SessionKey;

/// A datagram that was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SleeveError {
    /// It does not parse.
    #[error("Failed to decode packet: {0}")]
    Frame(#[from] FrameError),
    /// It does not decrypt, or it is a replay (count [`OpenError::Replay`] apart).
    #[error("Failed to decode packet: {0}")]
    Open(#[from] OpenError),
}

impl SleeveError {
    /// Whether this is a replay drop (Weave drops these silently).
    pub fn is_replay(&self) -> bool {
        matches!(self, SleeveError::Open(OpenError::Replay { .. }))
    }
}

/// The sending side of one connection's datagrams.
#[derive(Debug)]
pub enum SleeveTx {
    /// Plain sleeve (no password, or a trusted connection).
    Plain,
    /// Sealed with the session key.
    Sealed(SleeveSealer),
}

impl SleeveTx {
    /// Plain if `key` is `None`, else sealed with this side's polarity.
    pub fn new(key: Option<&SessionKey>, outbound: bool) -> Self {
        match key {
            None => SleeveTx::Plain,
            Some(k) => SleeveTx::Sealed(SleeveSealer::new(k, outbound)),
        }
    }

    /// Whether datagrams are sealed (the builder must be made with `sealed = true`).
    pub fn is_sealed(&self) -> bool {
        matches!(self, SleeveTx::Sealed(_))
    }

    /// Finishes the builder's datagram (sealing it in place on the DF or non-DF stream)
    /// and returns the bytes to send. Clear the builder after sending.
    pub fn finish<'a>(
        &self,
        builder: &'a mut DatagramBuilder,
        df: bool,
    ) -> Result<&'a [u8], SealError> {
        match self {
            SleeveTx::Plain if !builder.is_sealed() => Ok(builder.as_plain()),
            SleeveTx::Sealed(s) if builder.is_sealed() => {
                s.seal_datagram(builder.datagram_mut(), df)?;
                Ok(builder.datagram_mut())
            }
            _ => Err(SealError::BuilderMismatch),
        }
    }
}

/// The receiving side of one connection's datagrams.
#[derive(Debug)]
pub enum SleeveRx {
    /// Plain sleeve.
    Plain,
    /// Sealed with the session key, with replay state.
    Sealed(SleeveOpener),
}

impl SleeveRx {
    /// Plain if `key` is `None`, else expecting the remote's polarity.
    pub fn new(key: Option<&SessionKey>, outbound: bool) -> Self {
        match key {
            None => SleeveRx::Plain,
            Some(k) => SleeveRx::Sealed(SleeveOpener::new(k, outbound)),
        }
    }

    /// Opens a whole received datagram (sender name included) in place and walks its
    /// frames.
    pub fn open<'a>(&mut self, datagram: &'a mut [u8]) -> Result<Frames<'a>, SleeveError> {
        match self {
            SleeveRx::Plain => Ok(frame::parse_plain(datagram)?.1),
            SleeveRx::Sealed(o) => {
                frame::datagram_sender(datagram)?;
                let (plain, _df) = o.open_datagram(datagram)?;
                Ok(frame::frames(plain))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::PeerName;

    const A: PeerName = PeerName([0xaa, 0, 0, 0, 0, 1]);
    const B: PeerName = PeerName([0xaa, 0, 0, 0, 0, 2]);

    /// Hot-path sanity (no timing): build, seal, open and walk many datagrams in reused
    /// buffers; the buffers never move (no reallocation) and the frames are views into
    /// the receive buffer (no copies).
    #[test]
    fn hot_path_reuses_buffers() {
        let key = SessionKey([3; 32]);
        for k in [None, Some(&key)] {
            let tx = SleeveTx::new(k, true);
            let mut rx = SleeveRx::new(k, false);
            let mut b = DatagramBuilder::new(A, k.is_some());
            b.set_limit(1472);
            let mut rbuf = vec![0u8; frame::MAX_DATAGRAM_LEN];
            let tx_ptr = b.datagram_mut().as_ptr();
            let payload = [0x5au8; 400];
            let mut frames_seen = 0usize;
            for i in 0..1000usize {
                b.clear();
                while b.try_push(A, B, &payload[..100 + i % 300]).is_ok() {}
                let n = {
                    let out = tx.finish(&mut b, i % 2 == 0).unwrap();
                    rbuf[..out.len()].copy_from_slice(out);
                    out.len()
                };
                assert!(n <= 1472);
                assert_eq!(b.datagram_mut().as_ptr(), tx_ptr);
                let range = rbuf.as_ptr_range();
                for f in rx.open(&mut rbuf[..n]).unwrap() {
                    let f = f.unwrap();
                    assert!(range.contains(&f.frame.as_ptr()));
                    assert_eq!((f.src, f.dst), (A, B));
                    assert!(f.frame.iter().all(|&x| x == 0x5a));
                    frames_seen += 1;
                }
            }
            assert!(frames_seen > 1000 * 3);
        }
    }

    #[test]
    fn mismatched_builder_is_an_error() {
        let key = SessionKey([3; 32]);
        let mut plain = DatagramBuilder::new(A, false);
        assert_eq!(
            SleeveTx::new(Some(&key), true).finish(&mut plain, true),
            Err(SealError::BuilderMismatch)
        );
        let mut rx = SleeveRx::new(Some(&key), false);
        assert!(matches!(
            rx.open(&mut [1, 2, 3]),
            Err(SleeveError::Frame(FrameError::NoSender(3)))
        ));
        let e = rx.open(&mut [0; 40]).unwrap_err();
        assert!(!e.is_replay());
    }
}
