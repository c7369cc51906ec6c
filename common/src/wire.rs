//! Wire layouts of Weave Net's fast datapath, as weft writes and reads them.
//!
//! An encapsulated frame on the underlay:
//!
//! ```text
//!  0               14                    34          42          50              64
//!  +---------------+---------------------+-----------+-----------+---------------+------
//!  | outer Ethernet| outer IPv4 (no opts)| UDP       | VXLAN     | inner Ethernet| inner
//!  | (filled by the| TTL 64, TOS 0, DF,  | dst 6784, | I flag,   | the pod's     | payload
//!  |  neighbour    | proto UDP           | csum 0,   | VNI       | frame as it   |
//!  |  subsystem)   |                     | src/flow  |           | left the pod  |
//!  +---------------+---------------------+-----------+-----------+---------------+------
//! ```
//!
//! The 24-bit VNI names both ends by ShortID: `VNI = (dst << 12) | src`. As the three
//! VNI bytes: `b0 = dst >> 4`, `b1 = (dst & 0xf) << 4 | src >> 8`, `b2 = src & 0xff`.

/// A 12-bit peer ShortID, unique in the mesh.
pub type ShortId = u16;

/// Largest valid ShortID (12 bits).
pub const MAX_SHORT_ID: ShortId = 0x0fff;

/// Weave's control port (TCP) and sleeve port (UDP).
pub const CONTROL_PORT: u16 = 6783;
/// Weave's fast-datapath VXLAN port: always the control port + 1.
pub const VXLAN_PORT: u16 = CONTROL_PORT + 1;

/// Default fast-datapath MTU: 1460 - 20 (IP) - 8 (UDP) - 8 (VXLAN) - 14 (Ethernet) - 34 (ESP).
pub const DEFAULT_MTU: u16 = 1376;

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// IPv4 header length without options (the only form weft sends or accepts).
pub const IPV4_LEN: usize = 20;
/// UDP header length.
pub const UDP_LEN: usize = 8;
/// VXLAN header length.
pub const VXLAN_LEN: usize = 8;
/// Bytes added in front of the inner Ethernet frame: outer IPv4 + UDP + VXLAN. The outer
/// Ethernet header replaces the inner one's place, so this is also what the underlay
/// MTU must carry on top of the overlay MTU plus the inner Ethernet header.
pub const ENCAP_OVERHEAD: usize = IPV4_LEN + UDP_LEN + VXLAN_LEN + ETH_LEN;
/// Offset of the inner Ethernet header in an encapsulated frame.
pub const INNER_ETH_OFFSET: usize = ETH_LEN + IPV4_LEN + UDP_LEN + VXLAN_LEN;
/// Length of all headers up to and including the inner Ethernet header.
pub const ENCAP_HEADERS_LEN: usize = INNER_ETH_OFFSET + ETH_LEN;

/// Shortest inner payload (after the inner Ethernet header) weft decapsulates: an
/// IPv4 header's worth. Real frames are longer (ARP is 28 bytes); the kernel cannot
/// shrink a packet below this anyway.
pub const MIN_INNER_PAYLOAD: usize = IPV4_LEN;
/// Longest inner frame (Ethernet header included) that fits one outer IPv4 packet:
/// the 16-bit IPv4 length covers IPv4 + UDP + VXLAN + the inner frame. (A GSO
/// super-packet larger than this only exists with BIG TCP, which weft refuses.)
pub const MAX_INNER_FRAME: u32 = 0xffff - (IPV4_LEN + UDP_LEN + VXLAN_LEN) as u32;

/// EtherType of IPv4.
pub const ETH_P_IPV4: u16 = 0x0800;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// Outer IPv4 TTL.
pub const OUTER_TTL: u8 = 64;
/// IPv4 flags/fragment-offset field with only DF set.
pub const IPV4_DF: u16 = 0x4000;
/// Mask of the MF flag and fragment offset: nonzero means a fragment.
pub const IPV4_FRAG_MASK: u16 = 0x3fff;
/// VXLAN flags byte with the I (valid VNI) flag set.
pub const VXLAN_FLAG_I: u8 = 0x08;

/// Lowest and highest outer UDP source port: the kernel's default ephemeral range,
/// from which Linux's VXLAN driver picks a port per flow.
pub const SRC_PORT_MIN: u16 = 32768;
/// See [`SRC_PORT_MIN`].
pub const SRC_PORT_MAX: u16 = 60999;

/// Builds the VNI for a frame from `src` to `dst`.
#[inline(always)]
pub const fn vni(dst: ShortId, src: ShortId) -> u32 {
    (((dst & MAX_SHORT_ID) as u32) << 12) | (src & MAX_SHORT_ID) as u32
}

/// Destination ShortID of a VNI (bits 12-23).
#[inline(always)]
pub const fn vni_dst(vni: u32) -> ShortId {
    ((vni >> 12) & MAX_SHORT_ID as u32) as ShortId
}

/// Source ShortID of a VNI (bits 0-11).
#[inline(always)]
pub const fn vni_src(vni: u32) -> ShortId {
    (vni & MAX_SHORT_ID as u32) as ShortId
}

/// The RFC 1071 checksum of an IPv4 header whose checksum field is zero.
#[inline(always)]
pub fn ipv4_checksum(header: &[u8; IPV4_LEN]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < IPV4_LEN {
        sum += u16::from_be_bytes([header[i], header[i + 1]]) as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Everything weft writes in front of the payload of an encapsulated frame: outer
/// Ethernet, IPv4, UDP and VXLAN headers and the inner Ethernet header, as bytes.
///
/// The kernel's VXLAN driver writes these bytes for weft (the programs only set the
/// tunnel key); this is their reference encoding, which the tests build frames with
/// and check [`Vxlan`], the decoder of captured frames, against.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncapHeaders {
    /// The frame's bytes `0..ENCAP_HEADERS_LEN`.
    pub bytes: [u8; ENCAP_HEADERS_LEN],
}

/// Byte ranges inside [`EncapHeaders`].
mod field {
    pub const ETH_DST: usize = 0;
    pub const ETH_SRC: usize = 6;
    pub const ETH_TYPE: usize = 12;
    pub const IP: usize = 14;
    pub const IP_TOTAL_LEN: usize = IP + 2;
    pub const IP_FLAGS: usize = IP + 6;
    pub const IP_TTL: usize = IP + 8;
    pub const IP_PROTO: usize = IP + 9;
    pub const IP_CSUM: usize = IP + 10;
    pub const IP_SRC: usize = IP + 12;
    pub const IP_DST: usize = IP + 16;
    pub const UDP: usize = 34;
    pub const UDP_SRC: usize = UDP;
    pub const UDP_DST: usize = UDP + 2;
    pub const UDP_LEN: usize = UDP + 4;
    pub const VXLAN: usize = 42;
    pub const VNI: usize = VXLAN + 4;
    pub const INNER_ETH: usize = 50;
}

impl EncapHeaders {
    /// Builds the headers for an inner frame of `inner_len` bytes (inner Ethernet header
    /// included) from underlay address `src_ip` to `dst_ip` (both as on the wire),
    /// with outer UDP source port `src_port`, destination port `dst_port` and `vni`.
    /// `inner_eth` is the inner frame's own Ethernet header. The outer MACs are zero:
    /// the kernel's neighbour subsystem (or a FIB lookup) fills them on the way out.
    #[inline(always)]
    pub fn new(
        inner_eth: &[u8; ETH_LEN],
        inner_len: u32,
        src_ip: [u8; 4],
        dst_ip: [u8; 4],
        src_port: u16,
        dst_port: u16,
        vni: u32,
    ) -> Self {
        let mut headers =
            Self::without_destination(inner_eth, inner_len, src_ip, src_port, dst_port);
        headers.set_destination(dst_ip, vni);
        headers
    }

    /// Like [`EncapHeaders::new`], but with the outer destination, the VNI and the
    /// IPv4 checksum left zero: the datapath builds the headers once per frame and
    /// then calls [`EncapHeaders::set_destination`] once per copy it sends.
    #[inline(always)]
    pub fn without_destination(
        inner_eth: &[u8; ETH_LEN],
        inner_len: u32,
        src_ip: [u8; 4],
        src_port: u16,
        dst_port: u16,
    ) -> Self {
        let mut b = [0u8; ENCAP_HEADERS_LEN];
        b[field::ETH_TYPE..field::ETH_TYPE + 2].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
        // IPv4: version 4, IHL 5; TOS 0; ID 0 (atomic datagram, RFC 6864).
        b[field::IP] = 0x45;
        let ip_len = (inner_len as usize + IPV4_LEN + UDP_LEN + VXLAN_LEN) as u16;
        b[field::IP_TOTAL_LEN..field::IP_TOTAL_LEN + 2].copy_from_slice(&ip_len.to_be_bytes());
        b[field::IP_FLAGS..field::IP_FLAGS + 2].copy_from_slice(&IPV4_DF.to_be_bytes());
        b[field::IP_TTL] = OUTER_TTL;
        b[field::IP_PROTO] = IPPROTO_UDP;
        b[field::IP_SRC..field::IP_SRC + 4].copy_from_slice(&src_ip);
        b[field::UDP_SRC..field::UDP_SRC + 2].copy_from_slice(&src_port.to_be_bytes());
        b[field::UDP_DST..field::UDP_DST + 2].copy_from_slice(&dst_port.to_be_bytes());
        let udp_len = ip_len - IPV4_LEN as u16;
        b[field::UDP_LEN..field::UDP_LEN + 2].copy_from_slice(&udp_len.to_be_bytes());
        b[field::VXLAN] = VXLAN_FLAG_I;
        b[field::INNER_ETH..field::INNER_ETH + ETH_LEN].copy_from_slice(inner_eth);
        Self { bytes: b }
    }

    /// Points the headers at another peer: outer destination address and VNI, with the
    /// IPv4 checksum recomputed. Used to fan one flooded frame out to every peer.
    #[inline(always)]
    pub fn set_destination(&mut self, dst_ip: [u8; 4], vni: u32) {
        let b = &mut self.bytes;
        b[field::IP_DST..field::IP_DST + 4].copy_from_slice(&dst_ip);
        b[field::VNI] = (vni >> 16) as u8;
        b[field::VNI + 1] = (vni >> 8) as u8;
        b[field::VNI + 2] = vni as u8;
        b[field::IP_CSUM] = 0;
        b[field::IP_CSUM + 1] = 0;
        let mut ip = [0u8; IPV4_LEN];
        ip.copy_from_slice(&b[field::IP..field::IP + IPV4_LEN]);
        b[field::IP_CSUM..field::IP_CSUM + 2].copy_from_slice(&ipv4_checksum(&ip).to_be_bytes());
    }

    /// Sets the outer Ethernet addresses (when a FIB lookup resolved them).
    #[inline(always)]
    pub fn set_outer_macs(&mut self, src: &[u8; 6], dst: &[u8; 6]) {
        self.bytes[field::ETH_DST..field::ETH_DST + 6].copy_from_slice(dst);
        self.bytes[field::ETH_SRC..field::ETH_SRC + 6].copy_from_slice(src);
    }
}

/// A read-only view of an encapsulated frame's headers, checked for length once.
///
/// [`Vxlan::new_checked`] fails unless the buffer holds at least the outer IPv4 (without
/// options), UDP and VXLAN headers and an inner Ethernet header; after that the
/// accessors never panic.
#[derive(Clone, Copy, Debug)]
pub struct Vxlan<'a> {
    buf: &'a [u8],
}

/// Why a buffer is not a VXLAN frame weft would accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VxlanError {
    /// Shorter than the headers up to the inner Ethernet header.
    Truncated,
    /// Not Ethernet/IPv4.
    NotIpv4,
    /// The IPv4 header carries options.
    IpOptions,
    /// Not UDP.
    NotUdp,
    /// The VXLAN I flag is not set.
    BadFlags,
}

impl<'a> Vxlan<'a> {
    /// Checks that `buf` starts with Ethernet + IPv4 (no options) + UDP + VXLAN + inner
    /// Ethernet and returns a view of it.
    pub fn new_checked(buf: &'a [u8]) -> Result<Self, VxlanError> {
        if buf.len() < ETH_LEN + IPV4_LEN {
            return Err(VxlanError::Truncated);
        }
        if u16::from_be_bytes([buf[field::ETH_TYPE], buf[field::ETH_TYPE + 1]]) != ETH_P_IPV4
            || buf[field::IP] >> 4 != 4
        {
            return Err(VxlanError::NotIpv4);
        }
        if buf[field::IP] & 0x0f != 5 {
            return Err(VxlanError::IpOptions);
        }
        if buf[field::IP_PROTO] != IPPROTO_UDP {
            return Err(VxlanError::NotUdp);
        }
        if buf.len() < ENCAP_HEADERS_LEN {
            return Err(VxlanError::Truncated);
        }
        if buf[field::VXLAN] & VXLAN_FLAG_I == 0 {
            return Err(VxlanError::BadFlags);
        }
        Ok(Self { buf })
    }

    /// Outer IPv4 source address.
    pub fn src_ip(&self) -> [u8; 4] {
        let mut a = [0; 4];
        a.copy_from_slice(&self.buf[field::IP_SRC..field::IP_SRC + 4]);
        a
    }

    /// Outer IPv4 destination address.
    pub fn dst_ip(&self) -> [u8; 4] {
        let mut a = [0; 4];
        a.copy_from_slice(&self.buf[field::IP_DST..field::IP_DST + 4]);
        a
    }

    /// Outer IPv4 TTL.
    pub fn ttl(&self) -> u8 {
        self.buf[field::IP_TTL]
    }

    /// Whether the outer IPv4 header has DF set.
    pub fn dont_fragment(&self) -> bool {
        u16::from_be_bytes([self.buf[field::IP_FLAGS], self.buf[field::IP_FLAGS + 1]]) & IPV4_DF
            != 0
    }

    /// Outer UDP source port.
    pub fn src_port(&self) -> u16 {
        u16::from_be_bytes([self.buf[field::UDP_SRC], self.buf[field::UDP_SRC + 1]])
    }

    /// Outer UDP destination port.
    pub fn dst_port(&self) -> u16 {
        u16::from_be_bytes([self.buf[field::UDP_DST], self.buf[field::UDP_DST + 1]])
    }

    /// Outer UDP checksum (weft sends 0).
    pub fn udp_checksum(&self) -> u16 {
        u16::from_be_bytes([self.buf[field::UDP + 6], self.buf[field::UDP + 7]])
    }

    /// The 24-bit VNI.
    pub fn vni(&self) -> u32 {
        u32::from_be_bytes([
            0,
            self.buf[field::VNI],
            self.buf[field::VNI + 1],
            self.buf[field::VNI + 2],
        ])
    }

    /// The inner Ethernet frame (header and payload).
    pub fn inner(&self) -> &'a [u8] {
        &self.buf[INNER_ETH_OFFSET..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vni_layout_matches_weave() {
        // src 0x001, dst 0x002 -> VNI 0x002001 (from Weave's fastdp.go layout).
        assert_eq!(vni(0x002, 0x001), 0x002001);
        assert_eq!(vni(0xabc, 0x123), 0xabc123);
        let v = vni(0xabc, 0x123);
        let bytes = [(v >> 16) as u8, (v >> 8) as u8, v as u8];
        // b0 = dst >> 4; b1 = (dst & 0xf) << 4 | src >> 8; b2 = src & 0xff.
        assert_eq!(bytes, [0xab, 0xc1, 0x23]);
        assert_eq!(vni_dst(v), 0xabc);
        assert_eq!(vni_src(v), 0x123);
    }

    #[test]
    fn vni_masks_out_of_range_ids() {
        assert_eq!(vni(0x1fff, 0x1fff), 0xffffff);
        assert_eq!(vni_dst(0xff_ffff), MAX_SHORT_ID);
    }

    #[test]
    fn ipv4_checksum_known_vector() {
        // Wikipedia's IPv4 header checksum example.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_checksum(&h), 0xb861);
    }

    #[test]
    fn encap_headers_layout() {
        let inner_eth = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0x08, 0x06];
        let h = EncapHeaders::new(
            &inner_eth,
            100,
            [192, 168, 1, 1],
            [192, 168, 1, 2],
            40000,
            VXLAN_PORT,
            vni(2, 1),
        );
        let b = &h.bytes;
        assert_eq!(&b[12..14], &[0x08, 0x00]);
        assert_eq!(b[14], 0x45);
        assert_eq!(u16::from_be_bytes([b[16], b[17]]), 136);
        assert_eq!(&b[20..22], &[0x40, 0x00]);
        assert_eq!(b[22], 64);
        assert_eq!(b[23], 17);
        let mut ip = [0u8; 20];
        ip.copy_from_slice(&b[14..34]);
        // A correct checksum makes the header sum to 0xffff, i.e. recomputing gives 0.
        assert_eq!(ipv4_checksum(&ip), 0);
        assert_eq!(u16::from_be_bytes([b[38], b[39]]), 116);
        assert_eq!(&b[40..42], &[0, 0]);
        assert_eq!(&b[42..50], &[0x08, 0, 0, 0, 0x00, 0x20, 0x01, 0]);
        assert_eq!(&b[50..64], &inner_eth);

        let v = Vxlan::new_checked(b).unwrap();
        assert_eq!(v.src_ip(), [192, 168, 1, 1]);
        assert_eq!(v.dst_ip(), [192, 168, 1, 2]);
        assert_eq!(v.src_port(), 40000);
        assert_eq!(v.dst_port(), VXLAN_PORT);
        assert_eq!(v.vni(), 0x002001);
        assert_eq!(v.ttl(), 64);
        assert!(v.dont_fragment());
        assert_eq!(v.udp_checksum(), 0);
        assert_eq!(v.inner(), &inner_eth);
    }

    #[test]
    fn set_destination_rewrites_and_rechecksums() {
        let mut h = EncapHeaders::new(&[0; 14], 60, [10, 0, 0, 1], [10, 0, 0, 2], 1, 2, 3);
        h.set_destination([10, 0, 0, 9], vni(9, 1));
        let v = Vxlan::new_checked(&h.bytes).unwrap();
        assert_eq!(v.dst_ip(), [10, 0, 0, 9]);
        assert_eq!(v.vni(), vni(9, 1));
        let mut ip = [0u8; 20];
        ip.copy_from_slice(&h.bytes[14..34]);
        assert_eq!(ipv4_checksum(&ip), 0);
    }

    #[test]
    fn vxlan_rejects_bad_input() {
        let good = EncapHeaders::new(&[0; 14], 60, [10, 0, 0, 1], [10, 0, 0, 2], 1, 2, 3).bytes;
        assert_eq!(
            Vxlan::new_checked(&good[..40]).unwrap_err(),
            VxlanError::Truncated
        );
        assert_eq!(
            Vxlan::new_checked(&good[..10]).unwrap_err(),
            VxlanError::Truncated
        );
        let mut b = good;
        b[12] = 0x86;
        assert_eq!(Vxlan::new_checked(&b).unwrap_err(), VxlanError::NotIpv4);
        let mut b = good;
        b[14] = 0x46;
        assert_eq!(Vxlan::new_checked(&b).unwrap_err(), VxlanError::IpOptions);
        let mut b = good;
        b[23] = 6;
        assert_eq!(Vxlan::new_checked(&b).unwrap_err(), VxlanError::NotUdp);
        let mut b = good;
        b[42] = 0;
        assert_eq!(Vxlan::new_checked(&b).unwrap_err(), VxlanError::BadFlags);
    }
}
