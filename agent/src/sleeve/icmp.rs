//! ICMP "fragmentation needed" for DF frames larger than the sleeve MTU.
//!
//! Weave answers a pod's DF IPv4 frame that does not fit the sleeve MTU with a locally
//! made ICMP type 3 code 4 frame delivered back to the sending pod (it drops such frames
//! when they are broadcast instead). As Weave builds it: MACs swapped; IPv4 source = the
//! original *destination* address (the pod the frame was for; there is no router address
//! on a flat L2 overlay), destination = the original source; TOS copied; ID 0, no flags,
//! TTL 64; the ICMP next-hop MTU = the sleeve MTU; the payload is the original IP header
//! and the first 8 bytes after it. Checksums are computed.

use thiserror::Error;

use super::frame::ETH_HEADER_LEN;

const ETHERTYPE_IPV4: u16 = 0x0800;
const IPV4_DF: u16 = 0x4000;

/// A frame that cannot be answered with frag-needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum IcmpError {
    /// Not an IPv4 Ethernet frame with a complete IPv4 header.
    #[error("not an IPv4 frame")]
    NotIpv4,
}

/// The IPv4 header of an Ethernet frame: (header, header length, whole-frame checks ok).
fn ipv4_header(frame: &[u8]) -> Option<(&[u8], usize)> {
    if frame.len() < ETH_HEADER_LEN + 20
        || u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_IPV4
    {
        return None;
    }
    let ip = &frame[ETH_HEADER_LEN..];
    if ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < 20 || ip.len() < ihl {
        return None;
    }
    Some((ip, ihl))
}

/// Whether `frame` is an IPv4 frame with DF set that is longer than the sleeve MTU
/// allows (`len > mtu + 14`, Weave's test), so it must get frag-needed instead of being
/// sent.
pub fn frame_needs_frag_needed(frame: &[u8], mtu: usize) -> bool {
    let Some((ip, _)) = ipv4_header(frame) else {
        return false;
    };
    let flags = u16::from_be_bytes([ip[6], ip[7]]);
    flags & IPV4_DF != 0 && frame.len() > mtu + ETH_HEADER_LEN
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let (pairs, rest) = data.as_chunks::<2>();
    for c in pairs {
        sum += u32::from(u16::from_be_bytes(*c));
    }
    if let [last] = rest {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes into `out` (cleared first) the Ethernet frame carrying ICMP "fragmentation
/// needed" (next-hop MTU `mtu`) that answers `frame`, to be delivered to the frame's
/// sender.
pub fn build_frag_needed(frame: &[u8], mtu: u16, out: &mut Vec<u8>) -> Result<(), IcmpError> {
    let (ip, ihl) = ipv4_header(frame).ok_or(IcmpError::NotIpv4)?;
    let quoted = &ip[..ip.len().min(ihl + 8)];
    let icmp_len = 8 + quoted.len();
    let total = 20 + icmp_len;
    out.clear();
    out.reserve(ETH_HEADER_LEN + total);
    // Ethernet: dst = original src, src = original dst, same type.
    out.extend_from_slice(&frame[6..12]);
    out.extend_from_slice(&frame[0..6]);
    out.extend_from_slice(&frame[12..14]);
    // IPv4 header.
    let ip_start = out.len();
    out.extend_from_slice(&[0x45, ip[1]]);
    out.extend_from_slice(&(total as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    out.extend_from_slice(&ip[16..20]); // source = original destination
    out.extend_from_slice(&ip[12..16]); // destination = original source
    let ck = internet_checksum(&out[ip_start..]);
    out[ip_start + 10..ip_start + 12].copy_from_slice(&ck.to_be_bytes());
    // ICMP.
    let icmp_start = out.len();
    out.extend_from_slice(&[3, 4, 0, 0, 0, 0]);
    out.extend_from_slice(&mtu.to_be_bytes());
    out.extend_from_slice(quoted);
    let ck = internet_checksum(&out[icmp_start..]);
    out[icmp_start + 2..icmp_start + 4].copy_from_slice(&ck.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DF ICMP echo of `ip_len` bytes (IP packet) from 10.32.0.1 to 10.32.0.2.
    fn df_echo(ip_len: usize, df: bool) -> Vec<u8> {
        let mut f = vec![
            0x02, 0, 0, 0, 0, 2, // dst mac
            0x02, 0, 0, 0, 0, 1, // src mac
            0x08, 0x00,
        ];
        let mut ip = vec![0u8; ip_len];
        ip[0] = 0x45;
        ip[1] = 0x10;
        ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&[0x12, 0x34]);
        if df {
            ip[6] = 0x40;
        }
        ip[8] = 64;
        ip[9] = 1;
        ip[12..16].copy_from_slice(&[10, 32, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 32, 0, 2]);
        let ck = internet_checksum(&ip[..20]);
        ip[10..12].copy_from_slice(&ck.to_be_bytes());
        ip[20] = 8;
        for (i, b) in ip.iter_mut().skip(28).enumerate() {
            *b = i as u8;
        }
        f.extend_from_slice(&ip);
        f
    }

    #[test]
    fn needs_frag_needed_only_for_big_df_ipv4() {
        assert!(frame_needs_frag_needed(&df_echo(1439, true), 1438));
        assert!(!frame_needs_frag_needed(&df_echo(1438, true), 1438));
        assert!(!frame_needs_frag_needed(&df_echo(1439, false), 1438));
        let mut v6 = df_echo(1500, true);
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert!(!frame_needs_frag_needed(&v6, 1438));
        assert!(!frame_needs_frag_needed(&[0; 20], 0));
        let mut bad_ihl = df_echo(1500, true);
        bad_ihl[14] = 0x44;
        assert!(!frame_needs_frag_needed(&bad_ihl, 1438));
    }

    #[test]
    fn frag_needed_bytes() {
        let orig = df_echo(1500, true);
        let mut out = Vec::new();
        build_frag_needed(&orig, 1414, &mut out).unwrap();
        assert_eq!(out.len(), 14 + 20 + 8 + 28);
        assert_eq!(&out[0..6], &orig[6..12]);
        assert_eq!(&out[6..12], &orig[0..6]);
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        let ip = &out[14..];
        assert_eq!(ip[0], 0x45);
        assert_eq!(ip[1], 0x10);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 56);
        assert_eq!(&ip[4..8], &[0, 0, 0, 0]);
        assert_eq!((ip[8], ip[9]), (64, 1));
        assert_eq!(&ip[12..16], &[10, 32, 0, 2]);
        assert_eq!(&ip[16..20], &[10, 32, 0, 1]);
        assert_eq!(internet_checksum(&ip[..20]), 0);
        let icmp = &ip[20..];
        assert_eq!((icmp[0], icmp[1]), (3, 4));
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1414);
        assert_eq!(&icmp[8..], &orig[14..14 + 28]);
        assert_eq!(internet_checksum(icmp), 0);
        assert_eq!(
            build_frag_needed(&[0; 10], 1000, &mut out),
            Err(IcmpError::NotIpv4)
        );
    }

    #[test]
    fn short_payload_and_garbage_do_not_panic() {
        let orig = df_echo(24, true);
        let mut out = Vec::new();
        build_frag_needed(&orig, 552, &mut out).unwrap();
        assert_eq!(out.len(), 14 + 20 + 8 + 24);
        assert_eq!(internet_checksum(&out[34..]), 0);
        for n in 0..64 {
            let _ = build_frag_needed(&orig[..n.min(orig.len())], 552, &mut out);
            let _ = frame_needs_frag_needed(&orig[..n.min(orig.len())], 0);
        }
    }

    #[test]
    fn checksum_known_value() {
        // RFC 1071 example bytes.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(&d), !0xddf2);
        assert_eq!(internet_checksum(&[0xff]), !0xff00);
    }
}
