//! Reads the UDP datagrams of a pcap file (Ethernet, IPv4), reassembling IPv4 fragments,
//! for the golden tests over captures of real Weave routers.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use pcap_file::pcap::PcapReader;

/// One UDP datagram as captured.
#[derive(Debug, Clone)]
pub struct UdpDatagram {
    /// Capture timestamp.
    pub time: Duration,
    /// Source address.
    pub src: SocketAddrV4,
    /// Destination address.
    pub dst: SocketAddrV4,
    /// Whether the (first) IP packet had DF set.
    pub df: bool,
    /// The UDP checksum field (Weave's DF sender leaves it 0).
    pub checksum: u16,
    /// Whether it was reassembled from IP fragments.
    #[allow(dead_code)]
    pub reassembled: bool,
    /// The payload length the UDP header claims.
    pub claimed_len: usize,
    /// Whether `payload` is whole: `false` for a fragmented datagram whose later
    /// fragments are not in the capture (only the first one's bytes are given).
    pub complete: bool,
    /// The UDP payload (or the part of it in the first fragment).
    pub payload: Vec<u8>,
}

/// The UDP datagrams of a capture.
#[derive(Debug, Default)]
pub struct UdpCapture {
    /// Datagrams in capture order (a reassembled one at its last fragment; an
    /// incomplete one at its first fragment, with `complete == false`).
    pub datagrams: Vec<UdpDatagram>,
    /// Fragment sets left incomplete whose first fragment is missing too (skipped).
    pub lost: usize,
}

struct Partial {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    first_time: Option<Duration>,
    df: bool,
    pieces: Vec<(usize, Vec<u8>)>,
    total: Option<usize>,
}

impl Partial {
    fn assemble(&mut self) -> Option<Vec<u8>> {
        let total = self.total?;
        self.pieces.sort_by_key(|p| p.0);
        let mut out = Vec::with_capacity(total);
        for (off, data) in &self.pieces {
            if *off > out.len() {
                return None;
            }
            let skip = out.len() - off;
            if skip < data.len() {
                out.extend_from_slice(&data[skip..]);
            }
        }
        (out.len() == total).then_some(out)
    }
}

fn udp_from_ip_payload(
    time: Duration,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    df: bool,
    reassembled: bool,
    l4: &[u8],
) -> Option<UdpDatagram> {
    if l4.len() < 8 {
        return None;
    }
    let sp = u16::from_be_bytes([l4[0], l4[1]]);
    let dp = u16::from_be_bytes([l4[2], l4[3]]);
    let len = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
    let checksum = u16::from_be_bytes([l4[6], l4[7]]);
    if len < 8 {
        return None;
    }
    let complete = len <= l4.len();
    Some(UdpDatagram {
        time,
        src: SocketAddrV4::new(src, sp),
        dst: SocketAddrV4::new(dst, dp),
        df,
        checksum,
        reassembled,
        claimed_len: len - 8,
        complete,
        payload: l4[8..len.min(l4.len())].to_vec(),
    })
}

/// Reads every UDP datagram to or from `port` in the pcap file at `path`.
pub fn read_udp(path: &Path, port: u16) -> UdpCapture {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = PcapReader::new(file).expect("pcap header");
    let mut out = UdpCapture::default();
    let mut partials: HashMap<(Ipv4Addr, Ipv4Addr, u16), Partial> = HashMap::new();
    while let Some(pkt) = reader.next_packet() {
        let pkt = pkt.expect("pcap packet");
        let f = &pkt.data[..];
        assert_eq!(pkt.orig_len as usize, f.len(), "truncated capture");
        if f.len() < 34 || u16::from_be_bytes([f[12], f[13]]) != 0x0800 {
            continue;
        }
        let ip = &f[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if ip[9] != 17 || total > ip.len() || ihl < 20 || total < ihl {
            continue;
        }
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let flags = u16::from_be_bytes([ip[6], ip[7]]);
        let df = flags & 0x4000 != 0;
        let mf = flags & 0x2000 != 0;
        let offset = usize::from(flags & 0x1fff) * 8;
        let body = &ip[ihl..total];
        let dgram = if !mf && offset == 0 {
            udp_from_ip_payload(pkt.timestamp, src, dst, df, false, body)
        } else {
            let id = u16::from_be_bytes([ip[4], ip[5]]);
            let p = partials.entry((src, dst, id)).or_insert_with(|| Partial {
                src,
                dst,
                first_time: None,
                df: false,
                pieces: Vec::new(),
                total: None,
            });
            if offset == 0 {
                p.first_time = Some(pkt.timestamp);
                p.df = df;
            }
            p.pieces.push((offset, body.to_vec()));
            if !mf {
                p.total = Some(offset + body.len());
            }
            match p.assemble() {
                Some(whole) => {
                    let df = partials.remove(&(src, dst, id)).is_some_and(|p| p.df);
                    udp_from_ip_payload(pkt.timestamp, src, dst, df, true, &whole)
                }
                None => None,
            }
        };
        if let Some(d) = dgram
            && (d.src.port() == port || d.dst.port() == port)
        {
            out.datagrams.push(d);
        }
    }
    for p in partials.into_values() {
        let first = p.pieces.iter().find(|(off, _)| *off == 0);
        match (p.first_time, first) {
            (Some(time), Some((_, data))) => {
                if let Some(d) = udp_from_ip_payload(time, p.src, p.dst, p.df, false, data)
                    && (d.src.port() == port || d.dst.port() == port)
                {
                    out.datagrams.push(d);
                }
            }
            _ => out.lost += 1,
        }
    }
    out.datagrams.sort_by_key(|d| d.time);
    out
}
