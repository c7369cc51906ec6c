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
/// Name of the encapsulation program's jump table: a program array whose slot 0
/// the agent sets to `weft_encap` itself, so a flood to more peers than one run
/// may copy to ([`FLOOD_PEERS_PER_RUN`]) continues in a tail call.
pub const JUMP_MAP: &str = "WEFT_JUMP";
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
/// How many flood copies one run of `weft_encap` makes (its loop is bounded by this
/// for the verifier). Longer flood lists continue in tail calls of the program
/// itself; with the kernel's limit of 33 tail calls, every possible peer
/// ([`MAX_PEERS`] = 32 runs x 128) is reached.
pub const FLOOD_PEERS_PER_RUN: u32 = 128;

/// Default age after which a learned MAC is forgotten (the Linux bridge's default).
pub const DEFAULT_MAC_AGE_SECS: u32 = 300;

/// Programs' names in the eBPF object.
pub mod programs {
    /// TC program on the bridge's datapath port (`vethwe-bridge`, egress):
    /// encapsulates frames the bridge sends towards other hosts.
    pub const EGRESS: &str = "weft_encap";
    /// TC program on the underlay interface (ingress): decapsulates VXLAN for this host
    /// and hands the inner frame to the bridge.
    pub const INGRESS: &str = "weft_decap";
}

/// Datapath-wide settings, written by the agent (map [`CONFIG_MAP`], index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Nonzero once the agent has filled this record; until then both programs pass
    /// or drop everything without touching it.
    pub enabled: u32,
    /// ifindex of the underlay interface that carries VXLAN.
    pub underlay_ifindex: u32,
    /// ifindex of the datapath end of the bridge's veth pair (`vethwe-datapath`):
    /// decapsulated frames are sent out of it, into the bridge.
    pub datapath_ifindex: u32,
    /// This host's underlay address (outer source of everything it sends).
    pub local_addr: [u8; 4],
    /// This host's ShortID.
    pub local_short_id: ShortId,
    /// UDP port VXLAN is sent to and received on (6784, or control port + 1).
    pub vxlan_port: u16,
    /// Overlay MTU: largest inner IP packet (inner frame = MTU + 14).
    pub mtu: u16,
    /// Number of valid entries in the flood list.
    pub flood_count: u16,
    /// Seconds after which a learned MAC no longer steers unicast (then it floods).
    pub mac_age_secs: u32,
    /// MAC address of the underlay interface (outer source of flooded copies).
    pub underlay_mac: [u8; 6],
    /// Padding, zero.
    pub pad: [u8; 2],
}

/// One remote peer (map [`PEERS_MAP`], index = ShortID).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerEntry {
    /// The peer's underlay address: outer destination towards it, and the only outer
    /// source accepted from it. 0.0.0.0 marks an empty slot.
    pub addr: [u8; 4],
    /// Reserved for per-peer flags (encryption, overlay in use); zero for now.
    pub flags: u32,
    /// Ethernet address of the next hop towards the peer (the peer itself on a
    /// shared segment, else the gateway), kept current by the agent from the
    /// kernel's neighbour table. All zero while unresolved: flooded copies to the
    /// peer are then counted in [`Counter::FloodNoNeighbour`] instead of sent.
    /// Unicast IP frames do not need it (the kernel resolves their next hop).
    pub next_hop_mac: [u8; 6],
    /// Padding, zero.
    pub pad: [u8; 2],
}

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
    /// Underlay traffic that is not weft's (not IPv4/UDP to the VXLAN port): passed to
    /// the host's stack untouched.
    PassNotOverlay = 0,
    /// VXLAN frames decapsulated and delivered to the bridge.
    RxDelivered,
    /// Frames encapsulated to one peer (unicast).
    TxUnicast,
    /// Frames flooded (broadcast, multicast, unknown or stale unicast).
    TxFlood,
    /// Dropped: shorter than Ethernet + IPv4 + UDP + VXLAN + Ethernet + a minimal
    /// payload, or shorter than its IPv4 length says.
    DropTruncated,
    /// Dropped: IPv4 with options addressed to the VXLAN port.
    DropIpOptions,
    /// Dropped: the outer IPv4 header checksum is wrong.
    DropBadChecksum,
    /// Dropped: an IPv4 fragment addressed to the VXLAN port.
    DropFragment,
    /// Dropped: VXLAN header without the I flag.
    DropBadVxlan,
    /// Dropped: the VNI's destination ShortID is not this host.
    DropWrongDestination,
    /// Dropped: the VNI's source ShortID is not a known peer.
    DropUnknownSource,
    /// Dropped: the outer source address is not the address of the peer the VNI names.
    DropSourceMismatch,
    /// Dropped: a non-GSO frame larger than MTU + Ethernet header, or any frame
    /// too large for one outer IPv4 packet.
    DropTooBig,
    /// Dropped: the kernel refused to grow or shrink the packet.
    DropResizeFailed,
    /// Dropped: no peers to flood to.
    DropNoPeers,
    /// A flood copy (or a non-IP unicast frame) was not sent: the next hop towards
    /// that peer has no resolved Ethernet address yet.
    FloodNoNeighbour,
    /// A flood stopped early: the tail call that continues it failed (the jump
    /// table is not set up).
    FloodTruncated,
    /// Dropped: the agent has not configured the datapath (yet).
    DropNotConfigured,
}

impl Counter {
    /// Number of counters (size of the counters map).
    pub const COUNT: u32 = Counter::DropNotConfigured as u32 + 1;

    /// Every counter, in index order.
    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::PassNotOverlay,
        Counter::RxDelivered,
        Counter::TxUnicast,
        Counter::TxFlood,
        Counter::DropTruncated,
        Counter::DropIpOptions,
        Counter::DropBadChecksum,
        Counter::DropFragment,
        Counter::DropBadVxlan,
        Counter::DropWrongDestination,
        Counter::DropUnknownSource,
        Counter::DropSourceMismatch,
        Counter::DropTooBig,
        Counter::DropResizeFailed,
        Counter::DropNoPeers,
        Counter::FloodNoNeighbour,
        Counter::FloodTruncated,
        Counter::DropNotConfigured,
    ];

    /// A stable snake_case name (status output, metrics).
    pub const fn name(self) -> &'static str {
        match self {
            Counter::PassNotOverlay => "pass_not_overlay",
            Counter::RxDelivered => "rx_delivered",
            Counter::TxUnicast => "tx_unicast",
            Counter::TxFlood => "tx_flood",
            Counter::DropTruncated => "drop_truncated",
            Counter::DropIpOptions => "drop_ip_options",
            Counter::DropBadChecksum => "drop_bad_checksum",
            Counter::DropFragment => "drop_fragment",
            Counter::DropBadVxlan => "drop_bad_vxlan",
            Counter::DropWrongDestination => "drop_wrong_destination",
            Counter::DropUnknownSource => "drop_unknown_source",
            Counter::DropSourceMismatch => "drop_source_mismatch",
            Counter::DropTooBig => "drop_too_big",
            Counter::DropResizeFailed => "drop_resize_failed",
            Counter::DropNoPeers => "drop_no_peers",
            Counter::FloodNoNeighbour => "flood_no_neighbour",
            Counter::FloodTruncated => "flood_truncated",
            Counter::DropNotConfigured => "drop_not_configured",
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
        assert_eq!(size_of::<DatapathConfig>(), 36);
        assert_eq!(size_of::<PeerEntry>(), 16);
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
