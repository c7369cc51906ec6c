//! Records stored in weft's BPF maps, and the maps' names and sizes.
//!
//! Addresses are kept as the four bytes seen on the wire (`[u8; 4]`), never as host
//! integers, so neither side has to think about byte order.

use crate::wire::ShortId;

/// Name of the [`DatapathConfig`] array (one entry, index 0).
pub const CONFIG_MAP: &str = "WEFT_CONFIG";
/// Name of the peer table: an array indexed by ShortID of [`PeerEntry`]; an entry
/// whose address is 0.0.0.0 is no peer. (ShortIDs are dense 12-bit numbers, so an
/// array costs 64 KiB and saves a hash lookup per packet in both directions.)
pub const PEERS_MAP: &str = "WEFT_PEERS";
/// Name of the flood list: index (`u32`) -> ShortID (`u32`), the first
/// [`DatapathConfig::flood_count`] entries valid.
pub const FLOOD_MAP: &str = "WEFT_FLOOD";
/// Name of the learned MAC table: [`MacKey`] -> [`MacEntry`] (LRU hash).
pub const MACS_MAP: &str = "WEFT_MACS";
/// Name of the per-CPU per-peer counters, indexed by ShortID: [`PeerStats`].
pub const PEER_STATS_MAP: &str = "WEFT_PEER_STATS";
/// Name of the per-CPU datapath counters, indexed by [`Counter`]: `u64`.
pub const COUNTERS_MAP: &str = "WEFT_COUNTERS";

/// Size of the peer table (every possible ShortID).
pub const MAX_PEERS: u32 = 4096;
/// Capacity of the learned MAC table.
pub const MAX_MACS: u32 = 131_072;

/// Default age after which a learned MAC is forgotten (the Linux bridge's default).
pub const DEFAULT_MAC_AGE_SECS: u32 = 300;

/// Version of the maps' layout (names, types, sizes and record formats). The agent
/// pins the maps under a directory named after it, so an agent of another layout
/// never opens maps it would misread: it creates its own and swaps the programs
/// over atomically. Bump it whenever a record or a map definition changes.
pub const MAP_LAYOUT_VERSION: u32 = 9;

/// Programs' names in the eBPF object. The first two run on weft's metadata-mode
/// VXLAN device, a port of the bridge; the guards run on the underlay interface,
/// only while the fast datapath is encrypted.
pub mod programs {
    /// TC egress: picks the peer(s) of each frame the bridge sends to the device and
    /// sets the tunnel key the kernel's VXLAN driver encapsulates with.
    pub const EGRESS: &str = "weft_encap";
    /// TC ingress: checks the tunnel key of each frame the kernel's VXLAN socket
    /// decapsulated, learns its source MAC, and lets it into the bridge.
    pub const INGRESS: &str = "weft_decap";
    /// TC egress of the underlay (encrypted fast datapath only): drops fast-datapath
    /// VXLAN or heartbeats carrying [`super::IPSEC_MARK`] that leave as plain UDP
    /// (XFRM did not turn them into ESP).
    pub const GUARD_EGRESS: &str = "weft_guard_egress";
    /// TC ingress of the underlay (encrypted fast datapath only): drops plaintext
    /// fast-datapath VXLAN from a [`super::PEER_ENCRYPTED`] peer's address before
    /// the kernel's VXLAN socket (and its GRO) sees it.
    pub const GUARD_INGRESS: &str = "weft_guard_ingress";
}

/// Datapath-wide settings, written by the agent (map [`CONFIG_MAP`], index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Nonzero once the agent has filled this record; until then both programs drop
    /// (and count) everything on weft's tunnel device.
    pub enabled: u32,
    /// ifindex of weft's metadata-mode VXLAN device (`weft-vxlan`): flooded copies are
    /// sent out of it once per peer, each with its own tunnel key.
    pub vxlan_ifindex: u32,
    /// This host's underlay address: the outer source of everything it sends.
    pub local_addr: [u8; 4],
    /// This host's ShortID.
    pub local_short_id: ShortId,
    /// Overlay MTU: largest inner IP packet (inner frame = MTU + 14).
    pub mtu: u16,
    /// Number of valid entries in the flood list.
    pub flood_count: u16,
    /// The fast datapath's UDP port (Weave's 6784 unless `--port` moved it), which
    /// the underlay guards judge.
    pub vxlan_port: u16,
    /// Seconds after which a learned MAC no longer steers unicast (then it floods).
    pub mac_age_secs: u32,
    /// ifindex of the sleeve's TAP device (a port of the bridge, read by the agent),
    /// or 0 when there is no sleeve (static peers): unicast frames to a peer marked
    /// [`PEER_SLEEVE`] are redirected out of it, and fast-datapath heartbeats
    /// received from peers are handed to the agent through it.
    pub sleeve_ifindex: u32,
}

/// One remote peer (map [`PEERS_MAP`], index = ShortID).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerEntry {
    /// The peer's underlay address: outer destination towards it, and the only outer
    /// source accepted from it. 0.0.0.0 marks an empty slot.
    pub addr: [u8; 4],
    /// Per-peer flags: [`PEER_SLEEVE`], [`PEER_NO_FASTDP`], [`PEER_ENCRYPTED`].
    pub flags: u32,
}

/// [`PeerEntry::flags`]: the fast datapath is not in use with this peer at all (not
/// offered: a mesh password, `--no-fastdp`, or a peer without one). Everything it
/// sends to UDP 6784 is dropped and counted, heartbeats included: where the overlay
/// is meant to be encrypted, plaintext VXLAN with a peer's address must not reach the
/// bridge.
pub const PEER_NO_FASTDP: u32 = 2;

/// [`PeerEntry::flags`]: the peer is reached through the sleeve (the agent's UDP
/// tunnel) rather than the fast datapath: unicast frames to it are redirected to the
/// sleeve's TAP device, and it is left out of the flood list (the bridge floods to
/// the TAP device too, and the agent floods to sleeve peers).
pub const PEER_SLEEVE: u32 = 1;

/// [`PeerEntry::flags`]: traffic with the peer is IPsec-encrypted. Frames sent to it
/// carry [`IPSEC_MARK`], which the agent's XFRM policies (and its catch-all block
/// policy) match, so they leave inside ESP or not at all; VXLAN received from it
/// without the mark (that is, not decrypted by one of the agent's inbound SAs) is
/// dropped and counted.
pub const PEER_ENCRYPTED: u32 = 4;

/// The packet mark of encrypted fast-datapath traffic, in both directions: set by
/// `weft_encap` on frames to [`PEER_ENCRYPTED`] peers (the outbound XFRM policies
/// select it) and by the agent's inbound SAs on what they decrypt. Weave Net's value,
/// so a Weave host's firewall rules and weft's agree.
pub const IPSEC_MARK: u32 = 0x20000;

/// Key of the learned MAC table: an Ethernet address padded to 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MacKey {
    /// The Ethernet address.
    pub mac: [u8; 6],
    /// Always zero (hash keys compare every byte).
    pub pad: [u8; 2],
}

impl MacKey {
    /// Key for `mac`.
    #[inline(always)]
    pub const fn new(mac: [u8; 6]) -> Self {
        Self { mac, pad: [0; 2] }
    }
}

/// Where a learned MAC lives (map [`MACS_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MacEntry {
    /// ShortID of the peer behind which the MAC was last seen.
    pub short_id: u32,
    /// Padding, zero.
    pub pad: u32,
    /// `CLOCK_MONOTONIC` nanoseconds (coarse) of the last refresh (refreshed at most
    /// about once a second per MAC to keep the hot path write-free).
    pub seen_ns: u64,
}

/// Per-peer traffic counters (map [`PEER_STATS_MAP`], per CPU, index = ShortID).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Frames encapsulated towards the peer (flood copies included).
    pub tx_packets: u64,
    /// Inner bytes encapsulated towards the peer.
    pub tx_bytes: u64,
    /// Frames decapsulated from the peer.
    pub rx_packets: u64,
    /// Inner bytes decapsulated from the peer.
    pub rx_bytes: u64,
}

impl PeerStats {
    /// Adds another CPU's counters to these.
    pub fn add(&mut self, other: &Self) {
        self.tx_packets += other.tx_packets;
        self.tx_bytes += other.tx_bytes;
        self.rx_packets += other.rx_packets;
        self.rx_bytes += other.rx_bytes;
    }
}

/// Datapath counters (map [`COUNTERS_MAP`], per CPU, index = the variant's value):
/// what the programs passed on or dropped, by reason.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// VXLAN frames decapsulated (by the kernel's VXLAN socket, after GRO) and
    /// delivered into the bridge.
    RxDelivered = 0,
    /// Frames encapsulated to one peer (unicast).
    TxUnicast,
    /// Frames flooded (broadcast, multicast, unknown or stale unicast).
    TxFlood,
    /// Dropped: an inner frame shorter than an Ethernet header.
    DropTruncated,
    /// Dropped: a received frame without tunnel metadata (not from the VXLAN
    /// socket), or a tunnel key the kernel would not read.
    DropNoTunnelKey,
    /// Dropped: the VNI's destination ShortID is not this host.
    DropWrongDestination,
    /// Dropped: the VNI's source ShortID is not a known peer.
    DropUnknownSource,
    /// Dropped: the outer source address is not the address of the peer the VNI names.
    DropSourceMismatch,
    /// Dropped: a non-GSO frame larger than MTU + Ethernet header, or any frame
    /// too large for one outer IPv4 packet.
    DropTooBig,
    /// Dropped: the kernel refused the tunnel key for a frame to send.
    DropSetTunnelKey,
    /// Dropped: no peers to flood to.
    DropNoPeers,
    /// A flood copy to one peer could not be made (`bpf_clone_redirect` failed).
    FloodCopyFailed,
    /// Dropped: the agent has not configured the datapath (yet).
    DropNotConfigured,
    /// ICMP "fragmentation needed" / ICMPv6 "packet too big" that the VXLAN driver
    /// made for a local pod whose frame did not fit the path to a peer, delivered.
    RxPmtuReply,
    /// Unicast frames to a sleeve-carried peer, redirected to the sleeve's TAP device.
    TxSleeve,
    /// Dropped: a unicast frame to a sleeve-carried peer while there is no sleeve.
    DropNoSleeve,
    /// Fast-datapath heartbeats (frames with an all-zero Ethernet header) from a known
    /// peer, handed to the agent through the sleeve's TAP device.
    RxHeartbeat,
    /// Dropped: VXLAN from a peer the fast datapath is not used with
    /// ([`PEER_NO_FASTDP`]).
    DropNoFastdp,
    /// Dropped: VXLAN from a [`PEER_ENCRYPTED`] peer that no inbound SA of the agent
    /// decrypted (plaintext where ESP is required), or plaintext VXLAN from such a
    /// peer's address that the underlay's ingress guard dropped.
    DropNotEncrypted,
    /// Dropped by the underlay's egress guard: a packet carrying [`IPSEC_MARK`] about
    /// to leave as plaintext UDP to the fast datapath's port (XFRM did not encrypt
    /// it: its policies were flushed or overridden).
    DropLeakGuard,
}

impl Counter {
    /// Number of counters (size of the counters map).
    pub const COUNT: u32 = Counter::DropLeakGuard as u32 + 1;

    /// Every counter, in index order.
    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::RxDelivered,
        Counter::TxUnicast,
        Counter::TxFlood,
        Counter::DropTruncated,
        Counter::DropNoTunnelKey,
        Counter::DropWrongDestination,
        Counter::DropUnknownSource,
        Counter::DropSourceMismatch,
        Counter::DropTooBig,
        Counter::DropSetTunnelKey,
        Counter::DropNoPeers,
        Counter::FloodCopyFailed,
        Counter::DropNotConfigured,
        Counter::RxPmtuReply,
        Counter::TxSleeve,
        Counter::DropNoSleeve,
        Counter::RxHeartbeat,
        Counter::DropNoFastdp,
        Counter::DropNotEncrypted,
        Counter::DropLeakGuard,
    ];

    /// A stable snake_case name (status output, metrics).
    pub const fn name(self) -> &'static str {
        match self {
            Counter::RxDelivered => "rx_delivered",
            Counter::TxUnicast => "tx_unicast",
            Counter::TxFlood => "tx_flood",
            Counter::DropTruncated => "drop_truncated",
            Counter::DropNoTunnelKey => "drop_no_tunnel_key",
            Counter::DropWrongDestination => "drop_wrong_destination",
            Counter::DropUnknownSource => "drop_unknown_source",
            Counter::DropSourceMismatch => "drop_source_mismatch",
            Counter::DropTooBig => "drop_too_big",
            Counter::DropSetTunnelKey => "drop_set_tunnel_key",
            Counter::DropNoPeers => "drop_no_peers",
            Counter::FloodCopyFailed => "flood_copy_failed",
            Counter::DropNotConfigured => "drop_not_configured",
            Counter::RxPmtuReply => "rx_pmtu_reply",
            Counter::TxSleeve => "tx_sleeve",
            Counter::DropNoSleeve => "drop_no_sleeve",
            Counter::RxHeartbeat => "rx_heartbeat",
            Counter::DropNoFastdp => "drop_no_fastdp",
            Counter::DropNotEncrypted => "drop_not_encrypted",
            Counter::DropLeakGuard => "drop_leak_guard",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and byte arrays,
    // with explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for DatapathConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PeerEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MacKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MacEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PeerStats {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn records_have_no_implicit_padding() {
        // A change here changes the pinned maps: bump MAP_LAYOUT_VERSION with it.
        assert_eq!(size_of::<DatapathConfig>(), 28);
        assert_eq!(size_of::<PeerEntry>(), 8);
        assert_eq!(size_of::<MacKey>(), 8);
        assert_eq!(size_of::<MacEntry>(), 16);
        assert_eq!(size_of::<PeerStats>(), 32);
    }

    #[test]
    fn counters_are_dense_and_named_uniquely() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            for other in &Counter::ALL[i + 1..] {
                assert_ne!(c.name(), other.name());
            }
        }
    }
}
