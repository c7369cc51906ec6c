//! The sleeve datagram codec.
//!
//! Plain datagram: `[sender 6][frame entry]...`; encrypted datagram:
//! `[sender 6][seqAndDF u64 BE][secretbox: tag 16 | ciphertext of the frame entries]`.
//! A frame entry is `[src PeerName 6][dst PeerName 6][len u16 BE][Ethernet frame]`.
//!
//! [`frames`] walks a (decrypted) entry list without copying; [`DatagramBuilder`] appends
//! entries into one reusable buffer that already leaves room for the sealing header, so
//! a datagram is built, sealed in place ([`super::crypto::SleeveSealer`]) and sent
//! without an allocation per frame or per datagram.

use thiserror::Error;

use crate::mesh::PeerName;

/// Bytes of a peer name on the wire.
pub const NAME_LEN: usize = 6;
/// Bytes of one frame entry's header: src name, dst name, u16 length.
pub const ENTRY_HEADER_LEN: usize = 2 * NAME_LEN + 2;
/// Bytes of the sequence number (with the DF flag in its top bit) of an encrypted datagram.
pub const SEQ_LEN: usize = 8;
/// Bytes of the Poly1305 tag of an encrypted datagram.
pub const TAG_LEN: usize = weft_cipher::TAG_LEN;
/// Header bytes before the first frame entry of a plain datagram (the sender name).
pub const PLAIN_HEADER_LEN: usize = NAME_LEN;
/// Header bytes before the first frame entry of an encrypted datagram (sender, seq, tag).
pub const SEALED_HEADER_LEN: usize = NAME_LEN + SEQ_LEN + TAG_LEN;
/// Bytes of an Ethernet header (what MTUs leave out).
pub const ETH_HEADER_LEN: usize = 14;
/// IPv4 + UDP header bytes around a sleeve datagram.
pub const UDP_OVERHEAD: usize = 28;
/// Underlay bytes added to an overlay IP packet by plain sleeve: 28 + 6 + 14 + 14.
pub const OVERHEAD_PLAIN: usize =
    UDP_OVERHEAD + PLAIN_HEADER_LEN + ENTRY_HEADER_LEN + ETH_HEADER_LEN;
/// Underlay bytes added to an overlay IP packet by encrypted sleeve: 28 + 30 + 14 + 14.
pub const OVERHEAD_ENCRYPTED: usize =
    UDP_OVERHEAD + SEALED_HEADER_LEN + ENTRY_HEADER_LEN + ETH_HEADER_LEN;
/// Largest UDP datagram (payload) Weave sends or reads: 65535 - 28.
pub const MAX_DATAGRAM_LEN: usize = 65535 - UDP_OVERHEAD;
/// Most frames Weave batches into one datagram.
pub const MAX_FRAMES_PER_DATAGRAM: usize = 100;
/// Length of a heartbeat special frame: 14 zero bytes + ConnUID u64 BE.
pub const HEARTBEAT_LEN: usize = ETH_HEADER_LEN + 8;
/// Length of the all-zero fragmentation-test special frame (sent without DF).
pub const FRAG_TEST_LEN: usize = 60001;
/// Length of the all-zero DF special frame that provokes EMSGSIZE to learn the path MTU.
pub const PMTU_DISCOVERY_LEN: usize = 60000;

/// A datagram or frame list that does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    /// Fewer bytes than the sender name.
    #[error("sleeve datagram of {0} bytes has no sender name")]
    NoSender(usize),
    /// An encrypted datagram too short for its sequence number and tag.
    #[error("encrypted sleeve datagram of {0} bytes is too short")]
    TooShortSealed(usize),
    /// A frame entry whose length runs past the end of the datagram.
    #[error("sleeve frame truncated: length {expected}, {available} bytes left")]
    Truncated {
        /// The entry's length field.
        expected: usize,
        /// Bytes left after its header.
        available: usize,
    },
    /// Bytes after the last entry, too few for an entry header.
    #[error("{0} octets of trailing garbage after the sleeve frames")]
    TrailingGarbage(usize),
}

/// One frame entry of a datagram, borrowed from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SleeveFrame<'a> {
    /// The peer the frame came from (first hop of the overlay route).
    pub src: PeerName,
    /// The peer the frame is for (or the next hop of a broadcast).
    pub dst: PeerName,
    /// The Ethernet frame (or a special frame).
    pub frame: &'a [u8],
}

impl SleeveFrame<'_> {
    /// Whether this is a special frame (heartbeat, frag test, MTU probe): see [`is_special`].
    pub fn is_special(&self) -> bool {
        is_special(self.frame)
    }
}

/// Iterator over the frame entries of a (decrypted) frame list; see [`frames`].
///
/// Yields `Err` once for a truncated entry or trailing bytes, then stops. Entries before
/// the bad one are yielded as `Ok` (as Weave delivers them).
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    rest: &'a [u8],
}

/// Walks the frame entries of `list` (a plain datagram without its sender name, or the
/// plaintext of an encrypted one). No copies, no allocation.
pub fn frames(list: &[u8]) -> Frames<'_> {
    Frames { rest: list }
}

fn name_at(b: &[u8]) -> PeerName {
    let mut n = [0u8; NAME_LEN];
    n.copy_from_slice(&b[..NAME_LEN]);
    PeerName(n)
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<SleeveFrame<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.rest;
        if rest.is_empty() {
            return None;
        }
        if rest.len() < ENTRY_HEADER_LEN {
            self.rest = &[];
            return Some(Err(FrameError::TrailingGarbage(rest.len())));
        }
        let len = usize::from(u16::from_be_bytes([rest[12], rest[13]]));
        let body = &rest[ENTRY_HEADER_LEN..];
        if body.len() < len {
            self.rest = &[];
            return Some(Err(FrameError::Truncated {
                expected: len,
                available: body.len(),
            }));
        }
        let (frame, after) = body.split_at(len);
        self.rest = after;
        Some(Ok(SleeveFrame {
            src: name_at(rest),
            dst: name_at(&rest[NAME_LEN..]),
            frame,
        }))
    }
}

impl std::iter::FusedIterator for Frames<'_> {}

/// The sender name of a datagram (its first 6 bytes), which routes it to a forwarder.
pub fn datagram_sender(datagram: &[u8]) -> Result<PeerName, FrameError> {
    if datagram.len() < NAME_LEN {
        return Err(FrameError::NoSender(datagram.len()));
    }
    Ok(name_at(datagram))
}

/// Splits a plain datagram into its sender and its frame entries.
pub fn parse_plain(datagram: &[u8]) -> Result<(PeerName, Frames<'_>), FrameError> {
    let sender = datagram_sender(datagram)?;
    Ok((sender, frames(&datagram[NAME_LEN..])))
}

/// The clear parts of an encrypted datagram: sender, seqAndDF, and the secretbox (tag +
/// ciphertext).
pub fn parse_sealed_header(datagram: &[u8]) -> Result<(PeerName, u64, &[u8]), FrameError> {
    let sender = datagram_sender(datagram)?;
    if datagram.len() < SEALED_HEADER_LEN {
        return Err(FrameError::TooShortSealed(datagram.len()));
    }
    let mut seq = [0u8; SEQ_LEN];
    seq.copy_from_slice(&datagram[NAME_LEN..NAME_LEN + SEQ_LEN]);
    Ok((
        sender,
        u64::from_be_bytes(seq),
        &datagram[NAME_LEN + SEQ_LEN..],
    ))
}

/// Whether `frame` is a special frame: its Ethernet header is 14 zero bytes (both MACs
/// zero, type/length 0). Weave tells the kinds apart by length only ([`SpecialKind`]).
pub fn is_special(frame: &[u8]) -> bool {
    frame.len() >= ETH_HEADER_LEN && frame[..ETH_HEADER_LEN].iter().all(|&b| b == 0)
}

/// The kind of a special frame, by its length as Weave decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialKind {
    /// 22 bytes: a heartbeat carrying this ConnUID.
    Heartbeat(u64),
    /// 60001 bytes: the fragmentation test (answered only if all zero).
    FragTest,
    /// Any other length: an MTU probe; the reply carries `len - 14`.
    MtuProbe(usize),
}

/// Classifies a special frame (the caller checked [`is_special`]).
pub fn special_kind(frame: &[u8]) -> SpecialKind {
    match frame.len() {
        HEARTBEAT_LEN => SpecialKind::Heartbeat(parse_heartbeat(frame).unwrap_or_default()),
        FRAG_TEST_LEN => SpecialKind::FragTest,
        n => SpecialKind::MtuProbe(n.saturating_sub(ETH_HEADER_LEN)),
    }
}

/// A heartbeat special frame: 14 zero bytes then `conn_uid` big-endian.
pub fn heartbeat(conn_uid: u64) -> [u8; HEARTBEAT_LEN] {
    let mut f = [0u8; HEARTBEAT_LEN];
    f[ETH_HEADER_LEN..].copy_from_slice(&conn_uid.to_be_bytes());
    f
}

/// The ConnUID of a heartbeat special frame, or `None` if `frame` is not one.
pub fn parse_heartbeat(frame: &[u8]) -> Option<u64> {
    if frame.len() != HEARTBEAT_LEN || !is_special(frame) {
        return None;
    }
    let mut uid = [0u8; 8];
    uid.copy_from_slice(&frame[ETH_HEADER_LEN..]);
    Some(u64::from_be_bytes(uid))
}

/// The all-zero 60001-byte fragmentation-test frame.
pub fn frag_test() -> Vec<u8> {
    vec![0; FRAG_TEST_LEN]
}

/// An all-zero MTU probe testing sleeve MTU `mtu` (a frame of `mtu + 14` bytes).
pub fn mtu_probe(mtu: usize) -> Vec<u8> {
    vec![0; mtu + ETH_HEADER_LEN]
}

/// Why a frame could not be added to a [`DatagramBuilder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PushError {
    /// The datagram is full (size limit or 100 frames): send it, clear, then push again.
    #[error("sleeve datagram full")]
    Full,
    /// The frame would not fit even in an empty datagram under the current limit.
    #[error("frame of {len} bytes exceeds the sleeve datagram limit of {limit} bytes")]
    TooBig {
        /// The frame's length.
        len: usize,
        /// The datagram limit in force.
        limit: usize,
    },
}

/// Builds one datagram at a time in a buffer allocated once (65535 bytes).
///
/// Usage: `try_push` frames until [`PushError::Full`], then either send
/// [`DatagramBuilder::as_plain`] or seal in place with
/// [`super::crypto::SleeveSealer::seal_datagram`], send, and [`DatagramBuilder::clear`].
/// The limit (UDP payload bytes) is the path's for DF datagrams
/// (`SleeveForwarder::max_df_payload`) and [`MAX_DATAGRAM_LEN`] otherwise.
#[derive(Debug, Clone)]
pub struct DatagramBuilder {
    buf: Vec<u8>,
    header: usize,
    count: usize,
    limit: usize,
}

impl DatagramBuilder {
    /// An empty builder for datagrams from `sender`; `sealed` leaves room for the seq and
    /// tag of an encrypted datagram.
    pub fn new(sender: PeerName, sealed: bool) -> Self {
        let header = if sealed {
            SEALED_HEADER_LEN
        } else {
            PLAIN_HEADER_LEN
        };
        let mut buf = Vec::with_capacity(MAX_DATAGRAM_LEN);
        buf.extend_from_slice(&sender.0);
        buf.resize(header, 0);
        DatagramBuilder {
            buf,
            header,
            count: 0,
            limit: MAX_DATAGRAM_LEN,
        }
    }

    /// Whether datagrams are built for sealing.
    pub fn is_sealed(&self) -> bool {
        self.header == SEALED_HEADER_LEN
    }

    /// Sets the largest datagram (UDP payload bytes) to build, capped at
    /// [`MAX_DATAGRAM_LEN`]. Affects later pushes only.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.min(MAX_DATAGRAM_LEN);
    }

    /// The datagram size limit in force.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether a frame of `len` bytes fits in the datagram as it is now.
    pub fn fits(&self, len: usize) -> bool {
        self.count < MAX_FRAMES_PER_DATAGRAM
            && len <= usize::from(u16::MAX)
            && self.buf.len() + ENTRY_HEADER_LEN + len <= self.limit
    }

    /// Appends one frame entry (copying `frame` once, into the datagram).
    pub fn try_push(
        &mut self,
        src: PeerName,
        dst: PeerName,
        frame: &[u8],
    ) -> Result<(), PushError> {
        if !self.fits(frame.len()) {
            if self.header + ENTRY_HEADER_LEN + frame.len() > self.limit
                || frame.len() > usize::from(u16::MAX)
            {
                return Err(PushError::TooBig {
                    len: frame.len(),
                    limit: self.limit,
                });
            }
            return Err(PushError::Full);
        }
        self.buf.extend_from_slice(&src.0);
        self.buf.extend_from_slice(&dst.0);
        // fits() checked len <= u16::MAX.
        self.buf
            .extend_from_slice(&u16::try_from(frame.len()).unwrap_or(u16::MAX).to_be_bytes());
        self.buf.extend_from_slice(frame);
        self.count += 1;
        Ok(())
    }

    /// Number of frames in the datagram.
    pub fn frame_count(&self) -> usize {
        self.count
    }

    /// Whether the datagram holds no frame.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the datagram so far (header included).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// The plain datagram, ready to send (only for a builder made with `sealed = false`).
    pub fn as_plain(&self) -> &[u8] {
        &self.buf
    }

    /// The whole datagram buffer, header included, for sealing in place.
    pub fn datagram_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// Empties the datagram (keeps the sender name and the allocation).
    pub fn clear(&mut self) {
        self.buf.truncate(self.header);
        self.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: PeerName = PeerName([0xaa, 0, 0, 0, 0, 1]);
    const B: PeerName = PeerName([0xaa, 0, 0, 0, 0, 2]);

    #[test]
    fn overheads_match_weave() {
        assert_eq!(OVERHEAD_PLAIN, 62);
        assert_eq!(OVERHEAD_ENCRYPTED, 86);
        assert_eq!(1500 - OVERHEAD_PLAIN, 1438);
        assert_eq!(1500 - OVERHEAD_ENCRYPTED, 1414);
    }

    #[test]
    fn build_then_parse_roundtrip() {
        let mut b = DatagramBuilder::new(A, false);
        b.try_push(A, B, &[1, 2, 3]).unwrap();
        b.try_push(B, A, &[]).unwrap();
        b.try_push(A, B, &heartbeat(0xc350c9d61fdf9916)).unwrap();
        assert_eq!(b.frame_count(), 3);
        let (sender, it) = parse_plain(b.as_plain()).unwrap();
        assert_eq!(sender, A);
        let got: Vec<_> = it.collect::<Result<_, _>>().unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(
            (got[0].src, got[0].dst, got[0].frame),
            (A, B, &[1u8, 2, 3][..])
        );
        assert_eq!((got[1].src, got[1].dst, got[1].frame.len()), (B, A, 0));
        assert!(got[2].is_special());
        assert_eq!(
            special_kind(got[2].frame),
            SpecialKind::Heartbeat(0xc350c9d61fdf9916)
        );
        b.clear();
        assert_eq!(b.as_plain(), &A.0);
    }

    #[test]
    fn truncated_and_trailing_are_errors() {
        let mut b = DatagramBuilder::new(A, false);
        b.try_push(A, B, &[9; 10]).unwrap();
        let d = b.as_plain();
        // Cut inside the frame body.
        let mut it = frames(&d[6..d.len() - 1]);
        assert_eq!(
            it.next(),
            Some(Err(FrameError::Truncated {
                expected: 10,
                available: 9
            }))
        );
        assert_eq!(it.next(), None);
        // One good entry, then 5 stray bytes.
        let mut list = d[6..].to_vec();
        list.extend_from_slice(&[0; 5]);
        let v: Vec<_> = frames(&list).collect();
        assert!(v[0].is_ok());
        assert_eq!(v[1], Err(FrameError::TrailingGarbage(5)));
        assert_eq!(v.len(), 2);
        assert_eq!(parse_plain(&[1, 2]).err(), Some(FrameError::NoSender(2)));
        assert_eq!(
            parse_sealed_header(&[0; 29]).err(),
            Some(FrameError::TooShortSealed(29))
        );
    }

    #[test]
    fn every_prefix_of_a_datagram_parses_without_panic() {
        let mut b = DatagramBuilder::new(A, false);
        for n in [0usize, 1, 60, 1400] {
            b.try_push(A, B, &vec![7; n]).unwrap();
        }
        let d = b.as_plain().to_vec();
        for cut in 0..=d.len() {
            if let Ok((_, it)) = parse_plain(&d[..cut]) {
                let n = it.count();
                assert!(n <= 5);
            }
        }
    }

    #[test]
    fn limits_size_and_count() {
        let mut b = DatagramBuilder::new(A, false);
        b.set_limit(6 + 14 + 100);
        assert_eq!(
            b.try_push(A, B, &[0; 101]),
            Err(PushError::TooBig {
                len: 101,
                limit: 120
            })
        );
        b.try_push(A, B, &[0; 50]).unwrap();
        assert_eq!(b.try_push(A, B, &[0; 50]), Err(PushError::Full));
        b.try_push(A, B, &[0; 36]).unwrap();
        assert_eq!(b.len(), 120);

        let mut b = DatagramBuilder::new(A, true);
        assert!(b.is_sealed());
        for _ in 0..MAX_FRAMES_PER_DATAGRAM {
            b.try_push(A, B, &[1]).unwrap();
        }
        assert_eq!(b.try_push(A, B, &[1]), Err(PushError::Full));
        assert_eq!(b.len(), SEALED_HEADER_LEN + 100 * 15);
        let mut b = DatagramBuilder::new(A, false);
        assert!(matches!(
            b.try_push(A, B, &vec![0; 65536]),
            Err(PushError::TooBig { .. })
        ));
    }

    #[test]
    fn special_frames() {
        assert!(!is_special(&[0; 13]));
        let mut f = [0u8; 14];
        assert!(is_special(&f));
        f[13] = 1;
        assert!(!is_special(&f));
        assert_eq!(parse_heartbeat(&heartbeat(42)), Some(42));
        assert_eq!(parse_heartbeat(&[0; 21]), None);
        let mut hb = heartbeat(42);
        hb[0] = 1;
        assert_eq!(parse_heartbeat(&hb), None);
        assert_eq!(special_kind(&frag_test()), SpecialKind::FragTest);
        assert_eq!(special_kind(&mtu_probe(1438)), SpecialKind::MtuProbe(1438));
        assert_eq!(mtu_probe(1438).len(), 1452);
    }
}
