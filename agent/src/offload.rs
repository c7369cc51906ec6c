//! Offloads in software for the sleeve's TAP device: the `virtio_net_hdr` that
//! precedes every frame, segmentation of the TAP's GSO super-packets into frames the
//! sleeve can carry, and the opposite on receive: coalescing in-order TCP segments of a
//! flow into one super-packet for one TAP write.
//!
//! The TAP is opened with `IFF_VNET_HDR` and TSO/checksum offloads, so a pod's TCP
//! send reaches the agent as one up-to-64 KB frame with a partial checksum
//! ([`VirtioNetHdr::F_NEEDS_CSUM`]). [`Segmenter`] cuts it into frames of at most the
//! sleeve's frame size, each with complete IP and TCP checksums (the receiving host
//! needs nothing from the sender's offload state). [`TcpCoalescer`] merges what
//! arrives from peers back into super-packets whose partial checksum the kernel
//! completes, or never computes at all when the packet is delivered locally.
//!
//! Only untagged Ethernet carrying IPv4 (no fragments) or IPv6 (no extension header
//! before TCP/UDP) is segmented or coalesced. Anything else with a GSO type is an
//! [`OffloadError`] (the caller drops and counts it); without a GSO type it passes
//! through untouched, its partial checksum (if any) completed generically from
//! `csum_start`/`csum_offset`.
//!
//! All integers of the header are little-endian: the TAP is put in little-endian
//! vnet-header mode (`TUNSETVNETLE`), which is the native legacy order on the
//! little-endian hosts weft runs on and is explicit on others.

/// Size of the `virtio_net_hdr` weft uses on its TAP (the legacy 10-byte header,
/// without `num_buffers`, which only mergeable receive buffers of virtio devices use).
pub const VIRTIO_NET_HDR_LEN: usize = 10;

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_CWR: u8 = 0x80;
/// Largest IPv4 total length / IPv6 payload length.
const MAX_IP_LEN: usize = 65535;

/// Why a frame could not be segmented or parsed. The caller drops the frame and counts
/// the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// Fewer bytes than a `virtio_net_hdr`.
    #[error("shorter than a virtio_net_hdr")]
    ShortVnetHeader,
    /// The frame ends inside a header, or a length field points past its end.
    #[error("frame truncated or inconsistent length field")]
    Truncated,
    /// A GSO frame that is not untagged Ethernet with IPv4 or IPv6.
    #[error("GSO frame with ethertype {0:#06x} (only untagged IPv4/IPv6)")]
    UnsupportedEthertype(u16),
    /// An IP header weft does not segment: a fragment, a bad version/IHL, or an IPv6
    /// extension header before the transport header.
    #[error("unsupported IP header for GSO")]
    UnsupportedIp,
    /// A GSO type weft does not implement (UFO) or does not know.
    #[error("unsupported GSO type {0:#04x}")]
    UnsupportedGso(u8),
    /// The GSO type does not match the transport protocol of the packet.
    #[error("GSO type does not match the packet's transport protocol")]
    GsoMismatch,
    /// A GSO frame with `gso_size` 0.
    #[error("GSO frame with gso_size 0")]
    ZeroGsoSize,
    /// `csum_start`/`csum_offset` point outside the frame.
    #[error("checksum start/offset outside the frame")]
    BadChecksumOffset,
    /// The frame limit leaves no room for payload after the headers.
    #[error("frame limit {0} leaves no room after the headers")]
    FrameLimitTooSmall(usize),
    /// A UDP GSO frame whose datagrams are larger than the frame limit (datagram
    /// boundaries cannot be moved).
    #[error("UDP GSO segment of {0} bytes exceeds the frame limit {1}")]
    DatagramTooBig(usize, usize),
}

/// The `virtio_net_hdr` (legacy, 10 bytes) that precedes each frame on a TAP opened
/// with `IFF_VNET_HDR`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    /// `F_NEEDS_CSUM`, `F_DATA_VALID`.
    pub flags: u8,
    /// `GSO_*`, possibly with `GSO_ECN`.
    pub gso_type: u8,
    /// Length of the headers (Ethernet + IP + transport) of a GSO frame. The kernel's
    /// value on read is not reliable (it is the linear part of the skb); weft computes
    /// it from the packet.
    pub hdr_len: u16,
    /// Payload bytes per segment of a GSO frame.
    pub gso_size: u16,
    /// Offset of the transport header (where checksumming starts) in the frame.
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// The checksum from `csum_start` is partial: the field holds the pseudo-header sum.
    pub const F_NEEDS_CSUM: u8 = 1;
    /// The checksums are known to be good.
    pub const F_DATA_VALID: u8 = 2;
    /// Not a GSO frame.
    pub const GSO_NONE: u8 = 0;
    /// TCP over IPv4 (TSO).
    pub const GSO_TCPV4: u8 = 1;
    /// UDP fragmentation offload (not supported by weft).
    pub const GSO_UDP: u8 = 3;
    /// TCP over IPv6 (TSO).
    pub const GSO_TCPV6: u8 = 4;
    /// UDP segmentation (USO), IPv4 or IPv6.
    pub const GSO_UDP_L4: u8 = 5;
    /// Flag on the GSO type: the TCP super-packet has CWR set (first segment only).
    pub const GSO_ECN: u8 = 0x80;

    /// Parses the header at the start of `b`.
    pub fn decode(b: &[u8]) -> Result<Self, OffloadError> {
        let b: &[u8; VIRTIO_NET_HDR_LEN] = b
            .get(..VIRTIO_NET_HDR_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(OffloadError::ShortVnetHeader)?;
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; VIRTIO_NET_HDR_LEN] {
        let mut b = [0u8; VIRTIO_NET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// Whether the frame is a GSO super-packet.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !Self::GSO_ECN != Self::GSO_NONE
    }
}

// ---------------------------------------------------------------------------------
// Internet checksum.

/// Ones'-complement sum of `data` read as big-endian 16-bit words (an odd last byte
/// padded with zero), folded to 16 bits, not inverted. Sums of regions that start at
/// even offsets of the checksummed whole combine with [`csum_combine`].
pub fn csum_partial(data: &[u8]) -> u16 {
    // The sum is independent of byte order up to a final swap (RFC 1071), so sum
    // native 64-bit words with end-around carry and swap at the end.
    let mut acc: u64 = 0;
    let (words, tail) = data.as_chunks::<8>();
    for w in words {
        let (s, carry) = acc.overflowing_add(u64::from_ne_bytes(*w));
        acc = s + u64::from(carry);
    }
    if !tail.is_empty() {
        let mut w = [0u8; 8];
        w[..tail.len()].copy_from_slice(tail);
        let (s, carry) = acc.overflowing_add(u64::from_ne_bytes(w));
        acc = s + u64::from(carry);
    }
    let folded = fold64(acc);
    if cfg!(target_endian = "little") {
        folded.swap_bytes()
    } else {
        folded
    }
}

fn fold64(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Ones'-complement sum of two partial sums.
pub fn csum_combine(a: u16, b: u16) -> u16 {
    let s = u32::from(a) + u32::from(b);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// Partial sum of the IPv4 or IPv6 pseudo-header (addresses from the IP header at
/// `ip`, transport protocol, transport length).
fn pseudo_sum(ip: &[u8], v6: bool, proto: u8, l4_len: usize) -> u16 {
    let addrs = if v6 { &ip[8..40] } else { &ip[12..20] };
    let mut s = csum_partial(addrs);
    s = csum_combine(s, u16::from(proto));
    // An IPv6 jumbo length does not occur here (at most 64 KB).
    s = csum_combine(s, (l4_len >> 16) as u16);
    csum_combine(s, l4_len as u16)
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn set_ipv4_checksum(ip: &mut [u8], ihl: usize) {
    put16(ip, 10, 0);
    let c = !csum_partial(&ip[..ihl]);
    put16(ip, 10, c);
}

// ---------------------------------------------------------------------------------
// Parsing.

/// Where the headers of an untagged IPv4/IPv6 frame are.
#[derive(Clone, Copy, Debug)]
struct IpInfo {
    v6: bool,
    /// Offset of the transport header (= Ethernet + IP header length).
    l4_off: usize,
    /// Transport protocol.
    proto: u8,
    /// End of the IP packet in the frame (Ethernet padding excluded).
    end: usize,
}

fn parse_ip(frame: &[u8]) -> Result<IpInfo, OffloadError> {
    if frame.len() < ETH_HLEN {
        return Err(OffloadError::Truncated);
    }
    match get16(frame, 12) {
        ETHERTYPE_IPV4 => {
            let ip = &frame[ETH_HLEN..];
            if ip.len() < 20 {
                return Err(OffloadError::Truncated);
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ip[0] >> 4 != 4 || ihl < 20 {
                return Err(OffloadError::UnsupportedIp);
            }
            // MF set or a fragment offset: a fragment.
            if get16(ip, 6) & 0x3fff != 0 {
                return Err(OffloadError::UnsupportedIp);
            }
            let total = usize::from(get16(ip, 2));
            if total < ihl || total > ip.len() {
                return Err(OffloadError::Truncated);
            }
            Ok(IpInfo {
                v6: false,
                l4_off: ETH_HLEN + ihl,
                proto: ip[9],
                end: ETH_HLEN + total,
            })
        }
        ETHERTYPE_IPV6 => {
            let ip = &frame[ETH_HLEN..];
            if ip.len() < 40 {
                return Err(OffloadError::Truncated);
            }
            if ip[0] >> 4 != 6 {
                return Err(OffloadError::UnsupportedIp);
            }
            let proto = ip[6];
            if proto != PROTO_TCP && proto != PROTO_UDP {
                return Err(OffloadError::UnsupportedIp);
            }
            let payload = usize::from(get16(ip, 4));
            if 40 + payload > ip.len() {
                return Err(OffloadError::Truncated);
            }
            Ok(IpInfo {
                v6: true,
                l4_off: ETH_HLEN + 40,
                proto,
                end: ETH_HLEN + 40 + payload,
            })
        }
        other => Err(OffloadError::UnsupportedEthertype(other)),
    }
}

/// Length of the TCP header at `l4_off`, checked against `end`.
fn tcp_header_len(frame: &[u8], l4_off: usize, end: usize) -> Result<usize, OffloadError> {
    if l4_off + 20 > end {
        return Err(OffloadError::Truncated);
    }
    let thl = usize::from(frame[l4_off + 12] >> 4) * 4;
    if thl < 20 || l4_off + thl > end {
        return Err(OffloadError::Truncated);
    }
    Ok(thl)
}

/// Completes a partial checksum the generic way: sums from `csum_start` to the end of
/// `frame` (the field holds the pseudo-header sum) and stores the complement at
/// `csum_start + csum_offset`. A result of 0 is stored as 0xffff, as the kernel does.
pub fn complete_checksum(
    frame: &mut [u8],
    csum_start: usize,
    csum_offset: usize,
) -> Result<(), OffloadError> {
    let at = csum_start
        .checked_add(csum_offset)
        .ok_or(OffloadError::BadChecksumOffset)?;
    if at + 2 > frame.len() {
        return Err(OffloadError::BadChecksumOffset);
    }
    let c = !csum_partial(&frame[csum_start..]);
    put16(frame, at, if c == 0 { 0xffff } else { c });
    Ok(())
}

// ---------------------------------------------------------------------------------
// Segmentation (transmit: TAP -> sleeve).

/// Cuts the TAP's super-packets into frames of at most a given size with complete
/// checksums. Keeps one reusable buffer; no allocation per frame once warm.
#[derive(Debug, Default)]
pub struct Segmenter {
    buf: Vec<u8>,
}

impl Segmenter {
    /// A segmenter with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Turns the frame read from the TAP (`hdr` then `frame`) into frames for the
    /// wire, each handed to `out`, and returns how many.
    ///
    /// - No GSO: the frame as is, with its partial checksum completed if
    ///   `F_NEEDS_CSUM` (any protocol, from `csum_start`/`csum_offset`). A frame
    ///   larger than `max_frame` is *not* cut; the caller handles it like any
    ///   oversized frame.
    /// - TCP (v4/v6): segments of `min(gso_size, max_frame - headers)` payload bytes,
    ///   IPv4 id incremented per segment, lengths, sequence numbers, FIN/PSH only on
    ///   the last segment, CWR only on the first, IPv4 and TCP checksums computed.
    /// - UDP L4 (USO): datagrams of `gso_size` payload bytes with lengths, ids and
    ///   checksums; [`OffloadError::DatagramTooBig`] if they do not fit `max_frame`.
    pub fn segment(
        &mut self,
        hdr: &VirtioNetHdr,
        frame: &[u8],
        max_frame: usize,
        out: &mut impl FnMut(&[u8]),
    ) -> Result<usize, OffloadError> {
        let gso = hdr.gso_type & !VirtioNetHdr::GSO_ECN;
        if gso == VirtioNetHdr::GSO_NONE {
            if hdr.flags & VirtioNetHdr::F_NEEDS_CSUM != 0 {
                self.buf.clear();
                self.buf.extend_from_slice(frame);
                complete_checksum(
                    &mut self.buf,
                    usize::from(hdr.csum_start),
                    usize::from(hdr.csum_offset),
                )?;
                out(&self.buf);
            } else {
                out(frame);
            }
            return Ok(1);
        }
        if hdr.gso_size == 0 {
            return Err(OffloadError::ZeroGsoSize);
        }
        let info = parse_ip(frame)?;
        match gso {
            VirtioNetHdr::GSO_TCPV4 | VirtioNetHdr::GSO_TCPV6 => {
                if info.proto != PROTO_TCP || info.v6 != (gso == VirtioNetHdr::GSO_TCPV6) {
                    return Err(OffloadError::GsoMismatch);
                }
                let thl = tcp_header_len(frame, info.l4_off, info.end)?;
                let hlen = info.l4_off + thl;
                if max_frame <= hlen {
                    return Err(OffloadError::FrameLimitTooSmall(max_frame));
                }
                let mss = usize::from(hdr.gso_size).min(max_frame - hlen);
                Ok(self.segment_tcp(frame, info, hlen, mss, out))
            }
            VirtioNetHdr::GSO_UDP_L4 => {
                if info.proto != PROTO_UDP {
                    return Err(OffloadError::GsoMismatch);
                }
                let hlen = info.l4_off + 8;
                if hlen > info.end {
                    return Err(OffloadError::Truncated);
                }
                let mss = usize::from(hdr.gso_size);
                if hlen + mss > max_frame {
                    return Err(OffloadError::DatagramTooBig(hlen + mss, max_frame));
                }
                Ok(self.segment_udp(frame, info, hlen, mss, out))
            }
            other => Err(OffloadError::UnsupportedGso(other)),
        }
    }

    /// Starts segment `i` in the buffer: the headers then `payload`, with the IP
    /// lengths (and IPv4 id and checksum) set.
    fn start_segment(&mut self, frame: &[u8], info: IpInfo, hlen: usize, i: usize, payload: &[u8]) {
        self.buf.clear();
        self.buf.extend_from_slice(&frame[..hlen]);
        self.buf.extend_from_slice(payload);
        let ip = &mut self.buf[ETH_HLEN..];
        if info.v6 {
            put16(ip, 4, (hlen - ETH_HLEN - 40 + payload.len()) as u16);
        } else {
            put16(ip, 2, (hlen - ETH_HLEN + payload.len()) as u16);
            let id = get16(ip, 4).wrapping_add(i as u16);
            put16(ip, 4, id);
            set_ipv4_checksum(ip, info.l4_off - ETH_HLEN);
        }
    }

    fn segment_tcp(
        &mut self,
        frame: &[u8],
        info: IpInfo,
        hlen: usize,
        mss: usize,
        out: &mut impl FnMut(&[u8]),
    ) -> usize {
        let payload = &frame[hlen..info.end];
        let seq0 = get32(frame, info.l4_off + 4);
        let flags0 = frame[info.l4_off + 13];
        let n = payload.len().div_ceil(mss).max(1);
        for i in 0..n {
            let p = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
            self.start_segment(frame, info, hlen, i, p);
            let l4 = info.l4_off;
            let b = &mut self.buf;
            b[l4 + 4..l4 + 8].copy_from_slice(&seq0.wrapping_add((i * mss) as u32).to_be_bytes());
            let mut flags = flags0;
            if i + 1 != n {
                flags &= !(TCP_FIN | TCP_PSH);
            }
            if i != 0 {
                flags &= !TCP_CWR;
            }
            b[l4 + 13] = flags;
            put16(b, l4 + 16, 0);
            let l4_len = b.len() - l4;
            let sum = csum_combine(
                pseudo_sum(&b[ETH_HLEN..], info.v6, PROTO_TCP, l4_len),
                csum_partial(&b[l4..]),
            );
            put16(b, l4 + 16, !sum);
            out(b);
        }
        n
    }

    fn segment_udp(
        &mut self,
        frame: &[u8],
        info: IpInfo,
        hlen: usize,
        mss: usize,
        out: &mut impl FnMut(&[u8]),
    ) -> usize {
        let payload = &frame[hlen..info.end];
        let n = payload.len().div_ceil(mss).max(1);
        for i in 0..n {
            let p = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
            self.start_segment(frame, info, hlen, i, p);
            let l4 = info.l4_off;
            let b = &mut self.buf;
            let l4_len = b.len() - l4;
            put16(b, l4 + 4, l4_len as u16);
            put16(b, l4 + 6, 0);
            let sum = csum_combine(
                pseudo_sum(&b[ETH_HLEN..], info.v6, PROTO_UDP, l4_len),
                csum_partial(&b[l4..]),
            );
            let c = !sum;
            put16(b, l4 + 6, if c == 0 { 0xffff } else { c });
            out(b);
        }
        n
    }
}

// ---------------------------------------------------------------------------------
// Coalescing (receive: sleeve -> TAP).

/// Counters of a [`TcpCoalescer`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoalesceStats {
    /// Frames fed.
    pub frames_in: u64,
    /// Frames handed out (super-packets and single frames).
    pub frames_out: u64,
    /// Segments that were appended to a super-packet.
    pub merged: u64,
    /// TCP segments with a bad checksum, passed through unmerged (the kernel drops
    /// them, as it would have without weft).
    pub bad_checksum: u64,
}

/// One flow being coalesced.
#[derive(Debug, Default)]
struct Slot {
    active: bool,
    /// The first frame (trimmed to its IP length), then the appended payloads.
    buf: Vec<u8>,
    v6: bool,
    l4_off: usize,
    /// Ethernet + IP + TCP header length.
    hlen: usize,
    /// Payload length of the first segment: the super-packet's `gso_size`.
    gso_size: usize,
    segs: u16,
    next_seq: u32,
    /// IPv4 id the next segment must have.
    next_id: u16,
    /// No more segments may be appended (after a short segment or PSH).
    closed: bool,
    /// Insertion order, for evicting the oldest flow.
    age: u64,
}

/// What the coalescer needs from a fed TCP segment.
#[derive(Clone, Copy, Debug)]
struct Seg {
    v6: bool,
    l4_off: usize,
    hlen: usize,
    end: usize,
    mergeable: bool,
}

/// Merges in-order TCP segments of a flow into super-packets for one TAP write each,
/// with the rules of Linux GRO, simply: same Ethernet header, same IP header except
/// length, id (which must increase by one per segment) and checksum, no IPv4 options
/// or IPv6 extension headers, same TCP header (options included: timestamps must be
/// equal) except sequence number (which must be contiguous), checksum and PSH (which
/// may be set on the last segment only), flags ACK or ACK|PSH only (no SYN, FIN, RST,
/// URG, CWR), every segment but the last of the same payload size, at most 64 KB.
///
/// Checksums are verified (the merged packet is marked as needing only its checksum
/// computed, so a corrupted segment would otherwise be accepted by the receiving pod);
/// a segment with a bad checksum is passed through unmerged for the kernel to drop.
///
/// Feed the frames of a receive batch with [`push`](Self::push), then call
/// [`flush`](Self::flush). Frames of one flow keep their order; frames of different
/// flows may be reordered among themselves.
#[derive(Debug)]
pub struct TcpCoalescer {
    slots: Vec<Slot>,
    clock: u64,
    stats: CoalesceStats,
}

impl Default for TcpCoalescer {
    fn default() -> Self {
        Self::new()
    }
}

impl TcpCoalescer {
    /// Number of flows merged at the same time by [`new`](Self::new).
    pub const DEFAULT_FLOWS: usize = 8;

    /// A coalescer for up to [`DEFAULT_FLOWS`](Self::DEFAULT_FLOWS) flows at a time.
    pub fn new() -> Self {
        Self::with_flows(Self::DEFAULT_FLOWS)
    }

    /// A coalescer for up to `flows` (at least 1) flows at a time.
    pub fn with_flows(flows: usize) -> Self {
        Self {
            slots: (0..flows.max(1)).map(|_| Slot::default()).collect(),
            clock: 0,
            stats: CoalesceStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> CoalesceStats {
        self.stats
    }

    /// Feeds one Ethernet frame received from a peer. Frames that are handed out
    /// (immediately or from earlier pushes) go to `out` with the header to write
    /// before them.
    pub fn push(&mut self, frame: &[u8], out: &mut impl FnMut(&VirtioNetHdr, &[u8])) {
        self.stats.frames_in += 1;
        let seg = match self.classify(frame) {
            Some(seg) => seg,
            None => {
                self.emit_raw(frame, out);
                return;
            }
        };
        let found = self
            .slots
            .iter()
            .position(|s| s.active && same_flow(s, frame, &seg));
        if !seg.mergeable {
            if let Some(i) = found {
                self.emit_slot(i, out);
            }
            self.emit_raw(frame, out);
            return;
        }
        let i = match found {
            Some(i) if can_append(&self.slots[i], frame, &seg) => {
                self.append(i, frame, &seg);
                return;
            }
            Some(i) => {
                self.emit_slot(i, out);
                i
            }
            None => match self.slots.iter().position(|s| !s.active) {
                Some(i) => i,
                None => {
                    let i = self
                        .slots
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, s)| s.age)
                        .map_or(0, |(i, _)| i);
                    self.emit_slot(i, out);
                    i
                }
            },
        };
        self.start(i, frame, &seg);
    }

    /// Hands out every flow being merged (at the end of a receive batch).
    pub fn flush(&mut self, out: &mut impl FnMut(&VirtioNetHdr, &[u8])) {
        // Oldest first, without allocating (a handful of slots).
        while let Some(i) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active)
            .min_by_key(|(_, s)| s.age)
            .map(|(i, _)| i)
        {
            self.emit_slot(i, out);
        }
    }

    fn emit_raw(&mut self, frame: &[u8], out: &mut impl FnMut(&VirtioNetHdr, &[u8])) {
        self.stats.frames_out += 1;
        out(&VirtioNetHdr::default(), frame);
    }

    /// `None`: not TCP over untagged IPv4/IPv6 (passed through as is).
    fn classify(&mut self, frame: &[u8]) -> Option<Seg> {
        let info = parse_ip(frame).ok()?;
        if info.proto != PROTO_TCP {
            return None;
        }
        let thl = tcp_header_len(frame, info.l4_off, info.end).ok()?;
        let hlen = info.l4_off + thl;
        let flags = frame[info.l4_off + 13];
        let mut mergeable = hlen < info.end
            && flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG | TCP_CWR) == 0
            && flags & TCP_ACK != 0
            && (info.v6 || info.l4_off == ETH_HLEN + 20);
        if mergeable {
            let l4 = &frame[info.l4_off..info.end];
            let sum = csum_combine(
                pseudo_sum(&frame[ETH_HLEN..], info.v6, PROTO_TCP, l4.len()),
                csum_partial(l4),
            );
            if sum != 0xffff {
                self.stats.bad_checksum += 1;
                mergeable = false;
            }
        }
        Some(Seg {
            v6: info.v6,
            l4_off: info.l4_off,
            hlen,
            end: info.end,
            mergeable,
        })
    }

    fn start(&mut self, i: usize, frame: &[u8], seg: &Seg) {
        self.clock += 1;
        let s = &mut self.slots[i];
        s.active = true;
        s.buf.clear();
        s.buf.extend_from_slice(&frame[..seg.end]);
        s.v6 = seg.v6;
        s.l4_off = seg.l4_off;
        s.hlen = seg.hlen;
        s.gso_size = seg.end - seg.hlen;
        s.segs = 1;
        s.next_seq = get32(frame, seg.l4_off + 4).wrapping_add(s.gso_size as u32);
        s.next_id = if seg.v6 {
            0
        } else {
            get16(frame, ETH_HLEN + 4).wrapping_add(1)
        };
        s.closed = frame[seg.l4_off + 13] & TCP_PSH != 0;
        s.age = self.clock;
    }

    fn append(&mut self, i: usize, frame: &[u8], seg: &Seg) {
        self.stats.merged += 1;
        let s = &mut self.slots[i];
        let len = seg.end - seg.hlen;
        s.buf.extend_from_slice(&frame[seg.hlen..seg.end]);
        s.segs += 1;
        s.next_seq = s.next_seq.wrapping_add(len as u32);
        s.next_id = s.next_id.wrapping_add(1);
        if frame[seg.l4_off + 13] & TCP_PSH != 0 {
            s.buf[s.l4_off + 13] |= TCP_PSH;
            s.closed = true;
        }
        if len < s.gso_size {
            s.closed = true;
        }
    }

    fn emit_slot(&mut self, i: usize, out: &mut impl FnMut(&VirtioNetHdr, &[u8])) {
        self.stats.frames_out += 1;
        let s = &mut self.slots[i];
        s.active = false;
        if s.segs == 1 {
            out(&VirtioNetHdr::default(), &s.buf);
            return;
        }
        let l4 = s.l4_off;
        let l4_len = s.buf.len() - l4;
        let ip = &mut s.buf[ETH_HLEN..];
        if s.v6 {
            put16(ip, 4, (l4_len) as u16);
        } else {
            put16(ip, 2, (l4_len + 20) as u16);
            set_ipv4_checksum(ip, 20);
        }
        // The partial checksum the kernel expects: the pseudo-header sum with the
        // whole transport length, not complemented (as `tcp_gro_complete` leaves it).
        let pseudo = pseudo_sum(&s.buf[ETH_HLEN..], s.v6, PROTO_TCP, l4_len);
        put16(&mut s.buf, l4 + 16, pseudo);
        let hdr = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: if s.v6 {
                VirtioNetHdr::GSO_TCPV6
            } else {
                VirtioNetHdr::GSO_TCPV4
            },
            hdr_len: s.hlen as u16,
            gso_size: s.gso_size as u16,
            csum_start: l4 as u16,
            csum_offset: 16,
        };
        out(&hdr, &s.buf);
    }
}

/// Whether `frame` (classified as `seg`) has the 5-tuple of the slot's flow.
fn same_flow(s: &Slot, frame: &[u8], seg: &Seg) -> bool {
    if s.v6 != seg.v6 {
        return false;
    }
    let (a, b) = (&s.buf, frame);
    let addrs = if s.v6 {
        ETH_HLEN + 8..ETH_HLEN + 40
    } else {
        ETH_HLEN + 12..ETH_HLEN + 20
    };
    // Only IPv4 without options is merged, but a pass-through segment of the flow
    // may have options: compare the ports where they are in each frame.
    a[addrs.clone()] == b[addrs] && a[s.l4_off..s.l4_off + 4] == b[seg.l4_off..seg.l4_off + 4]
}

/// Whether a mergeable segment of the slot's flow can be appended (see
/// [`TcpCoalescer`] for the rules).
fn can_append(s: &Slot, f: &[u8], seg: &Seg) -> bool {
    if s.closed || seg.hlen != s.hlen || seg.l4_off != s.l4_off {
        return false;
    }
    let len = seg.end - seg.hlen;
    if len > s.gso_size || s.buf.len() - ETH_HLEN + len > MAX_IP_LEN + if s.v6 { 40 } else { 0 } {
        return false;
    }
    let b = &s.buf;
    let ip = ETH_HLEN;
    let l4 = s.l4_off;
    let ip_same = if s.v6 {
        // Version/class/flow label, next header, hop limit (addresses: same flow).
        b[ip..ip + 4] == f[ip..ip + 4] && b[ip + 6..ip + 8] == f[ip + 6..ip + 8]
    } else {
        // Version/IHL/TOS, flags/fragment, TTL, protocol; and the id sequence.
        b[ip..ip + 2] == f[ip..ip + 2]
            && b[ip + 6..ip + 10] == f[ip + 6..ip + 10]
            && get16(f, ip + 4) == s.next_id
    };
    ip_same
        && b[..ETH_HLEN] == f[..ETH_HLEN]
        && get32(f, l4 + 4) == s.next_seq
        // Ack number, data offset.
        && b[l4 + 8..l4 + 13] == f[l4 + 8..l4 + 13]
        // Flags except PSH (the slot has no PSH: it would be closed).
        && b[l4 + 13] == f[l4 + 13] & !TCP_PSH
        // Window; urgent pointer; options.
        && b[l4 + 14..l4 + 16] == f[l4 + 14..l4 + 16]
        && b[l4 + 18..s.hlen] == f[l4 + 18..seg.hlen]
}

#[cfg(test)]
mod tests {
    use super::*;

    // --- An independent checksum and packet builder/checker. -----------------------

    /// RFC 1071, the slow obvious way.
    fn naive_checksum(parts: &[&[u8]]) -> u16 {
        let mut bytes = Vec::new();
        for p in parts {
            bytes.extend_from_slice(p);
        }
        if bytes.len() % 2 == 1 {
            bytes.push(0);
        }
        let mut sum: u32 = 0;
        for w in bytes.chunks(2) {
            sum += (u32::from(w[0]) << 8) | u32::from(w[1]);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn pseudo(frame: &[u8], v6: bool, proto: u8, len: usize) -> Vec<u8> {
        let mut p = Vec::new();
        if v6 {
            p.extend_from_slice(&frame[22..54]);
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        } else {
            p.extend_from_slice(&frame[26..34]);
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        p
    }

    struct Tcp {
        v6: bool,
        seq: u32,
        flags: u8,
        id: u16,
        options: Vec<u8>,
        sport: u16,
    }

    impl Default for Tcp {
        fn default() -> Self {
            Tcp {
                v6: false,
                seq: 0xfffff000, // wraps inside a 64 KB packet
                flags: TCP_ACK,
                id: 0xfff0,
                // NOP NOP timestamps
                options: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
                sport: 40000,
            }
        }
    }

    /// An Ethernet frame with TCP; `partial`: the checksum field holds the
    /// pseudo-header sum (as the TAP gives it with NEEDS_CSUM), else it is complete.
    fn tcp_frame(t: &Tcp, payload: &[u8], partial: bool) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        let thl = 20 + t.options.len();
        let l4_len = thl + payload.len();
        if t.v6 {
            f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            f.extend_from_slice(&[0x60, 0x01, 0x23, 0x45]);
            f.extend_from_slice(&(l4_len as u16).to_be_bytes());
            f.extend_from_slice(&[PROTO_TCP, 64]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
            f.extend_from_slice(&t.id.to_be_bytes());
            f.extend_from_slice(&[0x40, 0, 64, PROTO_TCP, 0, 0]);
            f.extend_from_slice(&[10, 32, 0, 1, 10, 32, 0, 2]);
            let c = naive_checksum(&[&f[14..34]]);
            f[24..26].copy_from_slice(&c.to_be_bytes());
        }
        let l4 = f.len();
        f.extend_from_slice(&t.sport.to_be_bytes());
        f.extend_from_slice(&80u16.to_be_bytes());
        f.extend_from_slice(&t.seq.to_be_bytes());
        f.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        f.extend_from_slice(&[(thl as u8 / 4) << 4, t.flags, 0x01, 0xf5, 0, 0, 0, 0]);
        f.extend_from_slice(&t.options);
        f.extend_from_slice(payload);
        let ps = pseudo(&f, t.v6, PROTO_TCP, l4_len);
        let c = if partial {
            !naive_checksum(&[&ps])
        } else {
            naive_checksum(&[&ps, &f[l4..]])
        };
        f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        f
    }

    fn udp_frame(v6: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = tcp_frame(
            &Tcp {
                v6,
                options: vec![],
                ..Tcp::default()
            },
            &[],
            true,
        );
        // Rewrite as UDP: 8-byte header instead of TCP's 20.
        let l4 = if v6 { 54 } else { 34 };
        f.truncate(l4);
        let l4_len = 8 + payload.len();
        if v6 {
            f[20] = PROTO_UDP;
            f[18..20].copy_from_slice(&(l4_len as u16).to_be_bytes());
        } else {
            f[23] = PROTO_UDP;
            f[16..18].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
            f[24..26].copy_from_slice(&[0, 0]);
            let c = naive_checksum(&[&f[14..34]]);
            f[24..26].copy_from_slice(&c.to_be_bytes());
        }
        f.extend_from_slice(&5000u16.to_be_bytes());
        f.extend_from_slice(&6783u16.to_be_bytes());
        f.extend_from_slice(&(l4_len as u16).to_be_bytes());
        let ps = pseudo(&f, v6, PROTO_UDP, l4_len);
        f.extend_from_slice(&(!naive_checksum(&[&ps])).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Checks IP (v4) and transport checksums and lengths of a complete frame;
    /// returns (ip header offset of l4, transport header length).
    fn check_frame(f: &[u8], proto: u8) -> (usize, usize) {
        let v6 = get16(f, 12) == ETHERTYPE_IPV6;
        let l4 = if v6 { 54 } else { 34 };
        if v6 {
            assert_eq!(
                usize::from(get16(f, 18)),
                f.len() - 54,
                "ipv6 payload length"
            );
        } else {
            assert_eq!(usize::from(get16(f, 16)), f.len() - 14, "ipv4 total length");
            assert_eq!(naive_checksum(&[&f[14..34]]), 0, "ipv4 header checksum");
        }
        let ps = pseudo(f, v6, proto, f.len() - l4);
        assert_eq!(naive_checksum(&[&ps, &f[l4..]]), 0, "transport checksum");
        let thl = if proto == PROTO_TCP {
            usize::from(f[l4 + 12] >> 4) * 4
        } else {
            assert_eq!(usize::from(get16(f, l4 + 4)), f.len() - l4, "udp length");
            8
        };
        (l4, thl)
    }

    fn tso_hdr(v6: bool, mss: u16, f: &[u8]) -> VirtioNetHdr {
        let l4 = if v6 { 54 } else { 34 };
        VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: if v6 {
                VirtioNetHdr::GSO_TCPV6
            } else {
                VirtioNetHdr::GSO_TCPV4
            },
            // As the kernel reports it: the linear part, not the headers.
            hdr_len: 128,
            gso_size: mss,
            csum_start: l4,
            csum_offset: 16,
        }
        .with_len_check(f)
    }

    impl VirtioNetHdr {
        fn with_len_check(self, f: &[u8]) -> Self {
            assert!(usize::from(self.csum_start) < f.len());
            self
        }
    }

    fn segment_all(hdr: &VirtioNetHdr, f: &[u8], max: usize) -> Result<Vec<Vec<u8>>, OffloadError> {
        let mut segs = Vec::new();
        Segmenter::new().segment(hdr, f, max, &mut |s: &[u8]| segs.push(s.to_vec()))?;
        Ok(segs)
    }

    // --- Header. ----------------------------------------------------------------------

    #[test]
    fn vnet_header_round_trip() {
        let h = VirtioNetHdr {
            flags: 1,
            gso_type: VirtioNetHdr::GSO_TCPV6 | VirtioNetHdr::GSO_ECN,
            hdr_len: 0x1234,
            gso_size: 1398,
            csum_start: 54,
            csum_offset: 16,
        };
        let b = h.encode();
        assert_eq!(b, [1, 0x84, 0x34, 0x12, 0x76, 0x05, 54, 0, 16, 0]);
        assert_eq!(VirtioNetHdr::decode(&b), Ok(h));
        assert!(h.is_gso());
        assert_eq!(
            VirtioNetHdr::decode(&b[..9]),
            Err(OffloadError::ShortVnetHeader)
        );
    }

    #[test]
    fn checksum_matches_naive_for_all_lengths_and_offsets() {
        let data = payload(300);
        for start in 0..9 {
            for end in start..data.len() {
                let d = &data[start..end];
                assert_eq!(!csum_partial(d), naive_checksum(&[d]), "{start}..{end}");
            }
        }
        // Sums of even-offset pieces combine.
        let (a, b) = data.split_at(138);
        assert_eq!(
            !csum_combine(csum_partial(a), csum_partial(b)),
            naive_checksum(&[&data])
        );
        // All-ones data (end-around carry in every word).
        let ff = vec![0xffu8; 1001];
        assert_eq!(!csum_partial(&ff), naive_checksum(&[&ff]));
    }

    // --- Segmentation. --------------------------------------------------------------

    /// Segments a super-packet and checks everything about the segments; returns them.
    fn check_tso(t: &Tcp, len: usize, mss: u16, max: usize) -> Vec<Vec<u8>> {
        let data = payload(len);
        let f = tcp_frame(t, &data, true);
        let hdr = tso_hdr(t.v6, mss, &f);
        let segs = segment_all(&hdr, &f, max).expect("segments");
        let thl = 20 + t.options.len();
        let hl = if t.v6 { 54 } else { 34 } + thl;
        let eff = usize::from(mss).min(max - hl);
        assert_eq!(segs.len(), len.div_ceil(eff).max(1));
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert!(s.len() <= max, "segment {i} too long");
            let (l4, sthl) = check_frame(s, PROTO_TCP);
            assert_eq!(sthl, thl);
            assert_eq!(s[..14], f[..14], "ethernet header");
            let last = i + 1 == segs.len();
            if !last {
                assert_eq!(s.len() - l4 - thl, eff, "full segments of mss");
            }
            assert_eq!(
                get32(s, l4 + 4),
                t.seq.wrapping_add((i * eff) as u32),
                "seq"
            );
            let mut want = t.flags;
            if !last {
                want &= !(TCP_FIN | TCP_PSH);
            }
            if i != 0 {
                want &= !TCP_CWR;
            }
            assert_eq!(s[l4 + 13], want, "flags of segment {i}");
            assert_eq!(s[l4 + 20..l4 + thl], t.options[..], "options");
            if !t.v6 {
                assert_eq!(get16(s, 18), t.id.wrapping_add(i as u16), "ip id");
                assert_eq!(s[20..24], f[20..24], "ip flags/ttl/proto");
            } else {
                assert_eq!(s[14..18], f[14..18], "ipv6 class/flow");
            }
            joined.extend_from_slice(&s[l4 + thl..]);
        }
        assert_eq!(joined, data, "payload concatenation");
        segs
    }

    #[test]
    fn tso_v4_64k() {
        let t = Tcp {
            flags: TCP_ACK | TCP_PSH,
            ..Tcp::default()
        };
        // 65535 - 20 - 32: the largest IPv4 super-packet.
        let segs = check_tso(&t, 65483, 1448, 1500);
        assert_eq!(segs.len(), 46);
        // The sleeve's frame limit is below gso_size + headers: cut to fit.
        check_tso(&t, 65483, 1448, 1438);
        check_tso(&t, 65483, 1448, 9000);
    }

    #[test]
    fn tso_v6_64k() {
        let t = Tcp {
            v6: true,
            flags: TCP_ACK | TCP_PSH | TCP_FIN,
            ..Tcp::default()
        };
        check_tso(&t, 65503, 1428, 1514);
        check_tso(&t, 65503, 1428, 1438);
    }

    #[test]
    fn tso_edge_sizes_and_flags() {
        for v6 in [false, true] {
            for flags in [
                TCP_ACK,
                TCP_ACK | TCP_PSH,
                TCP_ACK | TCP_CWR | TCP_PSH | TCP_FIN,
            ] {
                for len in [1, 999, 1000, 1001, 2000, 2001, 12345] {
                    let t = Tcp {
                        v6,
                        flags,
                        options: vec![],
                        ..Tcp::default()
                    };
                    check_tso(&t, len, 1000, 1500);
                }
            }
        }
    }

    #[test]
    fn tso_ecn_type_bit_is_accepted() {
        let t = Tcp {
            flags: TCP_ACK | TCP_CWR,
            ..Tcp::default()
        };
        let f = tcp_frame(&t, &payload(5000), true);
        let mut hdr = tso_hdr(false, 1000, &f);
        hdr.gso_type |= VirtioNetHdr::GSO_ECN;
        let segs = segment_all(&hdr, &f, 1500).unwrap();
        assert_eq!(segs.len(), 5);
        assert_eq!(segs[0][34 + 13] & TCP_CWR, TCP_CWR);
        assert!(segs[1..].iter().all(|s| s[34 + 13] & TCP_CWR == 0));
    }

    #[test]
    fn uso_v4_and_v6() {
        for v6 in [false, true] {
            let data = payload(10_000);
            let f = udp_frame(v6, &data);
            let l4 = if v6 { 54 } else { 34 };
            let hdr = VirtioNetHdr {
                flags: VirtioNetHdr::F_NEEDS_CSUM,
                gso_type: VirtioNetHdr::GSO_UDP_L4,
                hdr_len: 0,
                gso_size: 1200,
                csum_start: l4 as u16,
                csum_offset: 6,
            };
            let segs = segment_all(&hdr, &f, 1438).unwrap();
            assert_eq!(segs.len(), 9);
            let mut joined = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                check_frame(s, PROTO_UDP);
                if !v6 {
                    assert_eq!(get16(s, 18), 0xfff0u16.wrapping_add(i as u16));
                }
                joined.extend_from_slice(&s[l4 + 8..]);
            }
            assert_eq!(joined, data);
            // Datagrams cannot be cut further.
            assert_eq!(
                segment_all(&hdr, &f, 1200),
                Err(OffloadError::DatagramTooBig(l4 + 8 + 1200, 1200))
            );
        }
    }

    #[test]
    fn needs_csum_without_gso_is_completed() {
        for v6 in [false, true] {
            let f = tcp_frame(
                &Tcp {
                    v6,
                    ..Tcp::default()
                },
                &payload(777),
                true,
            );
            let l4 = if v6 { 54 } else { 34 };
            let hdr = VirtioNetHdr {
                flags: VirtioNetHdr::F_NEEDS_CSUM,
                csum_start: l4,
                csum_offset: 16,
                ..VirtioNetHdr::default()
            };
            let segs = segment_all(&hdr, &f, 1500).unwrap();
            assert_eq!(segs.len(), 1);
            check_frame(&segs[0], PROTO_TCP);
            assert_eq!(segs[0][..l4 as usize + 16], f[..l4 as usize + 16]);

            let u = udp_frame(v6, &payload(33));
            let hdr = VirtioNetHdr {
                csum_offset: 6,
                ..hdr
            };
            let segs = segment_all(&hdr, &u, 1500).unwrap();
            check_frame(&segs[0], PROTO_UDP);
        }
        // Without NEEDS_CSUM the frame passes untouched, even if larger than the limit.
        let f = tcp_frame(&Tcp::default(), &payload(3000), false);
        assert_eq!(
            segment_all(&VirtioNetHdr::default(), &f, 1500).unwrap(),
            vec![f.clone()]
        );
        // A checksum field out of the frame.
        let hdr = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            csum_start: f.len() as u16 - 1,
            csum_offset: 0,
            ..VirtioNetHdr::default()
        };
        assert_eq!(
            segment_all(&hdr, &f, 1500),
            Err(OffloadError::BadChecksumOffset)
        );
    }

    #[test]
    fn segmentation_errors() {
        let f = tcp_frame(&Tcp::default(), &payload(3000), true);
        let hdr = tso_hdr(false, 1000, &f);
        let mut vlan = f.clone();
        vlan[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
        assert_eq!(
            segment_all(&hdr, &vlan, 1500),
            Err(OffloadError::UnsupportedEthertype(0x8100))
        );
        assert_eq!(
            segment_all(&VirtioNetHdr { gso_size: 0, ..hdr }, &f, 1500),
            Err(OffloadError::ZeroGsoSize)
        );
        assert_eq!(
            segment_all(
                &VirtioNetHdr {
                    gso_type: VirtioNetHdr::GSO_TCPV6,
                    ..hdr
                },
                &f,
                1500
            ),
            Err(OffloadError::GsoMismatch)
        );
        assert_eq!(
            segment_all(
                &VirtioNetHdr {
                    gso_type: VirtioNetHdr::GSO_UDP,
                    ..hdr
                },
                &f,
                1500
            ),
            Err(OffloadError::UnsupportedGso(VirtioNetHdr::GSO_UDP))
        );
        assert_eq!(
            segment_all(&hdr, &f, 66),
            Err(OffloadError::FrameLimitTooSmall(66))
        );
        assert_eq!(
            segment_all(&hdr, &f[..1000], 1500),
            Err(OffloadError::Truncated)
        );
        let mut frag = f.clone();
        frag[20] |= 0x20; // MF
        assert_eq!(
            segment_all(&hdr, &frag, 1500),
            Err(OffloadError::UnsupportedIp)
        );
    }

    /// Arbitrary bytes and headers never panic the segmenter or the coalescer.
    #[test]
    fn garbage_never_panics() {
        let base = tcp_frame(&Tcp::default(), &payload(4000), true);
        let base6 = tcp_frame(
            &Tcp {
                v6: true,
                ..Tcp::default()
            },
            &payload(4000),
            true,
        );
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut seg = Segmenter::new();
        let mut co = TcpCoalescer::with_flows(2);
        for round in 0..20_000 {
            let mut f = if round % 2 == 0 {
                base.clone()
            } else {
                base6.clone()
            };
            for _ in 0..(rnd() % 4) {
                let i = (rnd() as usize) % 80;
                f[i] = rnd() as u8;
            }
            f.truncate((rnd() as usize) % (f.len() + 1));
            let r = rnd();
            let hdr = VirtioNetHdr {
                flags: (r & 3) as u8,
                gso_type: [0, 1, 3, 4, 5, 0x81, 9][(r >> 2) as usize % 7],
                hdr_len: (r >> 8) as u16,
                gso_size: [0, 1, 7, 1000, 65535][(r >> 24) as usize % 5],
                csum_start: [0, 34, 54, 65535][(r >> 32) as usize % 4],
                csum_offset: [0, 6, 16, 65535][(r >> 40) as usize % 4],
            };
            let _ = seg.segment(
                &hdr,
                &f,
                [0, 60, 1500][(r >> 48) as usize % 3],
                &mut |_: &[u8]| {},
            );
            co.push(&f, &mut |_: &VirtioNetHdr, _: &[u8]| {});
        }
        co.flush(&mut |_: &VirtioNetHdr, _: &[u8]| {});
    }

    // --- Coalescing. ----------------------------------------------------------------

    fn coalesce(frames: &[Vec<u8>], flows: usize) -> Vec<(VirtioNetHdr, Vec<u8>)> {
        let mut co = TcpCoalescer::with_flows(flows);
        let mut out = Vec::new();
        let mut sink = |h: &VirtioNetHdr, f: &[u8]| out.push((*h, f.to_vec()));
        for f in frames {
            co.push(f, &mut sink);
        }
        co.flush(&mut sink);
        let st = co.stats();
        assert_eq!(st.frames_in, frames.len() as u64);
        assert_eq!(st.frames_out, out.len() as u64);
        out
    }

    /// Re-segments the coalescer's output (as a TAP reader would see it).
    fn resegment(out: &[(VirtioNetHdr, Vec<u8>)]) -> Vec<Vec<u8>> {
        let mut segs = Vec::new();
        for (h, f) in out {
            segs.extend(segment_all(h, f, 65535 + 14).unwrap());
        }
        segs
    }

    fn segments(t: &Tcp, len: usize, mss: u16) -> Vec<Vec<u8>> {
        let f = tcp_frame(t, &payload(len), true);
        segment_all(&tso_hdr(t.v6, mss, &f), &f, 1500).unwrap()
    }

    #[test]
    fn coalesce_then_segment_gives_the_original_segments() {
        for v6 in [false, true] {
            for flags in [TCP_ACK, TCP_ACK | TCP_PSH] {
                let t = Tcp {
                    v6,
                    flags,
                    ..Tcp::default()
                };
                let len = if v6 { 65503 } else { 65483 };
                let segs = segments(&t, len, 1400);
                let out = coalesce(&segs, 8);
                assert_eq!(out.len(), 1, "one super-packet");
                let (h, f) = &out[0];
                let l4: u16 = if v6 { 54 } else { 34 };
                assert_eq!(h.flags, VirtioNetHdr::F_NEEDS_CSUM);
                assert_eq!(
                    h.gso_type,
                    if v6 {
                        VirtioNetHdr::GSO_TCPV6
                    } else {
                        VirtioNetHdr::GSO_TCPV4
                    }
                );
                assert_eq!(
                    (h.gso_size, h.hdr_len, h.csum_start, h.csum_offset),
                    (1400, l4 + 32, l4, 16)
                );
                // The partial checksum: the pseudo-header sum over the whole length.
                let ps = pseudo(f, v6, PROTO_TCP, f.len() - usize::from(l4));
                let field = get16(f, usize::from(l4) + 16);
                assert_eq!(field, !naive_checksum(&[&ps]));
                if !v6 {
                    assert_eq!(naive_checksum(&[&f[14..34]]), 0);
                }
                assert_eq!(resegment(&out), segs, "v6={v6} flags={flags:#x}");
            }
        }
    }

    #[test]
    fn a_lone_segment_passes_unchanged() {
        let segs = segments(&Tcp::default(), 500, 1400);
        let out = coalesce(&segs, 8);
        assert_eq!(out, vec![(VirtioNetHdr::default(), segs[0].clone())]);
        // Ethernet padding is trimmed.
        let mut ack = tcp_frame(&Tcp::default(), &[], false);
        ack.extend_from_slice(&[0; 6]);
        let out = coalesce(&[ack.clone()], 8);
        assert_eq!(out[0].1, ack, "no payload: passed as is");
    }

    #[test]
    fn the_64k_limit_splits() {
        // 100 KB in 1000-byte segments, from two super-packets: 65 segments fit in an
        // IPv4 packet (20 + 32 + 65 * 1000 <= 65535).
        let t = Tcp::default();
        let mut segs = segments(&t, 50_000, 1000);
        let t2 = Tcp {
            seq: t.seq.wrapping_add(50_000),
            id: t.id.wrapping_add(50),
            ..Tcp::default()
        };
        segs.extend(segments(&t2, 50_000, 1000));
        let out = coalesce(&segs, 8);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1.len(), 14 + 20 + 32 + 65_000);
        assert_eq!(resegment(&out), segs);
    }

    #[test]
    fn interleaved_flows_merge_separately() {
        let a = segments(&Tcp::default(), 20_000, 1000);
        let b = segments(
            &Tcp {
                sport: 40001,
                ..Tcp::default()
            },
            20_000,
            1000,
        );
        let c = segments(
            &Tcp {
                v6: true,
                ..Tcp::default()
            },
            20_000,
            1000,
        );
        let mut mixed = Vec::new();
        for i in 0..20 {
            mixed.push(a[i].clone());
            mixed.push(b[i].clone());
            mixed.push(c[i].clone());
        }
        let out = coalesce(&mixed, 8);
        assert_eq!(out.len(), 3);
        let r = resegment(&out);
        assert_eq!(r[..20], a[..]);
        assert_eq!(r[20..40], b[..]);
        assert_eq!(r[40..], c[..]);
        // With room for one flow only, each switch hands out the flow being merged.
        let out = coalesce(&mixed, 1);
        assert_eq!(out.len(), 60);
    }

    /// Positions (in the output) where merging broke, given a modified stream.
    fn breaks(frames: &[Vec<u8>]) -> Vec<usize> {
        coalesce(frames, 8)
            .iter()
            .map(|(h, f)| {
                if h.is_gso() {
                    (f.len() - usize::from(h.hdr_len)).div_ceil(usize::from(h.gso_size))
                } else {
                    1
                }
            })
            .collect()
    }

    #[test]
    fn what_breaks_a_merge() {
        let t = Tcp::default();
        let segs = segments(&t, 6000, 1000);
        assert_eq!(breaks(&segs), vec![6]);

        // Out of order: 0 1 3 2 4 5.
        let mut s = segs.clone();
        s.swap(2, 3);
        assert_eq!(breaks(&s), vec![2, 1, 1, 2]);
        // A lost segment.
        let mut s = segs.clone();
        s.remove(2);
        assert_eq!(breaks(&s), vec![2, 3]);
        // A duplicate.
        let mut s = segs.clone();
        s.insert(2, segs[1].clone());
        assert_eq!(breaks(&s), vec![2, 5]);

        // Changed fields (checksums fixed up), at segment 3.
        let l4 = 34;
        type Fixup = Box<dyn Fn(&mut Vec<u8>)>;
        let fixups: Vec<(&str, Fixup)> = vec![
            ("ack", Box::new(move |f: &mut Vec<u8>| f[l4 + 11] ^= 1)),
            ("window", Box::new(move |f: &mut Vec<u8>| f[l4 + 15] ^= 1)),
            (
                "timestamp",
                Box::new(move |f: &mut Vec<u8>| f[l4 + 31] ^= 1),
            ),
            ("ece", Box::new(move |f: &mut Vec<u8>| f[l4 + 13] |= 0x40)),
            (
                "cwr",
                Box::new(move |f: &mut Vec<u8>| f[l4 + 13] |= TCP_CWR),
            ),
            (
                "fin",
                Box::new(move |f: &mut Vec<u8>| f[l4 + 13] |= TCP_FIN),
            ),
            (
                "syn",
                Box::new(move |f: &mut Vec<u8>| f[l4 + 13] |= TCP_SYN),
            ),
            (
                "urg",
                Box::new(move |f: &mut Vec<u8>| f[l4 + 13] |= TCP_URG),
            ),
            ("tos", Box::new(move |f: &mut Vec<u8>| f[15] = 4)),
            ("ttl", Box::new(move |f: &mut Vec<u8>| f[22] = 63)),
            ("df", Box::new(move |f: &mut Vec<u8>| f[20] = 0)),
            ("ip id", Box::new(move |f: &mut Vec<u8>| f[19] ^= 8)),
            ("mac", Box::new(move |f: &mut Vec<u8>| f[0] = 4)),
        ];
        for (what, fix) in &fixups {
            let mut s = segs.clone();
            fix(&mut s[3]);
            refresh_checksums(&mut s[3]);
            let b = breaks(&s);
            assert_eq!(b[0], 3, "{what}: {b:?}");
            assert!(b.len() >= 2, "{what}: {b:?}");
        }

        // PSH in the middle closes the super-packet after it.
        let mut s = segs.clone();
        s[2][l4 + 13] |= TCP_PSH;
        refresh_checksums(&mut s[2]);
        assert_eq!(breaks(&s), vec![3, 3]);
        // A short segment closes it too, and a longer one cannot follow.
        let short = segments(&t, 5500, 1000);
        assert_eq!(breaks(&short), vec![6]);
        let mut s = short[..5].to_vec();
        s.push(short[5].clone());
        s.extend(segments(
            &Tcp {
                seq: t.seq.wrapping_add(5500),
                id: t.id.wrapping_add(6),
                ..t
            },
            2000,
            1000,
        ));
        assert_eq!(breaks(&s), vec![6, 2]);

        // A bad checksum: passed through alone, counted.
        let mut s = segs.clone();
        s[3][100] ^= 0xff;
        assert_eq!(breaks(&s), vec![3, 1, 2]);
        let mut co = TcpCoalescer::new();
        for f in &s {
            co.push(f, &mut |_: &VirtioNetHdr, _: &[u8]| {});
        }
        assert_eq!(co.stats().bad_checksum, 1);

        // Non-TCP frames in between pass through and do not break the flow.
        let mut s = segs.clone();
        s.insert(3, udp_frame(false, b"hello"));
        s.insert(1, vec![0xff; 60]);
        assert_eq!(breaks(&s), vec![1, 1, 6]);
    }

    /// Recomputes the IPv4 and TCP checksums of a complete IPv4 TCP frame.
    fn refresh_checksums(f: &mut [u8]) {
        f[24..26].copy_from_slice(&[0, 0]);
        let c = naive_checksum(&[&f[14..34]]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f[50..52].copy_from_slice(&[0, 0]);
        let ps = pseudo(f, false, PROTO_TCP, f.len() - 34);
        let c = naive_checksum(&[&ps, &f[34..]]);
        f[50..52].copy_from_slice(&c.to_be_bytes());
    }

    /// Single-core throughput of segment + coalesce on 64 KB super-packets (printed,
    /// not asserted; `cargo test --release -- --nocapture offload_throughput`).
    #[test]
    fn offload_throughput() {
        let t = Tcp::default();
        let f = tcp_frame(&t, &payload(65483), true);
        let hdr = tso_hdr(false, 1448, &f);
        let mut seg = Segmenter::new();
        let mut co = TcpCoalescer::new();
        let rounds = if cfg!(debug_assertions) { 20 } else { 2000 };
        let mut segs: Vec<Vec<u8>> = Vec::new();
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            let mut n = 0;
            seg.segment(&hdr, &f, 1438, &mut |s: &[u8]| {
                if segs.len() <= n {
                    segs.push(Vec::with_capacity(1500));
                }
                segs[n].clear();
                segs[n].extend_from_slice(s);
                n += 1;
            })
            .unwrap();
        }
        let t_seg = start.elapsed();
        let start = std::time::Instant::now();
        let mut total = 0;
        for _ in 0..rounds {
            for s in &segs {
                co.push(s, &mut |_: &VirtioNetHdr, f: &[u8]| total += f.len());
            }
            co.flush(&mut |_: &VirtioNetHdr, f: &[u8]| total += f.len());
        }
        let t_co = start.elapsed();
        assert!(total > 0);
        let bits = (65483 * rounds * 8) as f64;
        println!(
            "offload ({} build): segment {:.1} Gbit/s, coalesce {:.1} Gbit/s (64 KB, {} segments)",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            bits / t_seg.as_secs_f64() / 1e9,
            bits / t_co.as_secs_f64() / 1e9,
            segs.len()
        );
    }
}
