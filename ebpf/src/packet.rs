//! Packet access and the kernel calls the programs share, each written for the
//! verifier: every read is bounds-checked against `data_end`, every loop is bounded.

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        __sk_buff, BPF_ADJ_ROOM_ENCAP_L2_MASK, BPF_ADJ_ROOM_ENCAP_L2_SHIFT,
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::bpf_ktime_get_coarse_ns,
    programs::TcContext,
};
use weft_common::{
    maps::{Counter, DatapathConfig, MacEntry, MacKey, PeerEntry},
    wire::{ENCAP_OVERHEAD, ETH_LEN, EncapHeaders},
};

use crate::maps::{MACS, peer};

/// A learned MAC is refreshed in the map at most this often (keeps the receive
/// path from writing a shared hash entry on every packet). MAC times come from the
/// coarse monotonic clock: a few milliseconds of resolution is plenty for ageing
/// measured in minutes, and it costs no clock-source read per packet.
const MAC_REFRESH_NS: u64 = 1_000_000_000;

/// The raw `__sk_buff` behind a TC context.
#[inline(always)]
pub fn skb(ctx: &TcContext) -> *mut __sk_buff {
    ctx.as_ptr().cast()
}

/// Reads a `T` at `offset` from the linear part of the packet, if it is there.
#[inline(always)]
pub fn read_at<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: the range [start + offset, start + offset + size_of::<T>()) was just
    // checked against data_end; `T` is plain bytes (`Copy`, read unaligned).
    Some(unsafe { ((start + offset) as *const T).read_unaligned() })
}

/// Whether the skb carries IPv4 or IPv6 (`skb->protocol`), which is what
/// `bpf_skb_adjust_room` and `bpf_redirect_neigh` accept.
#[inline(always)]
pub fn is_ip(ctx: &TcContext) -> bool {
    // SAFETY: reading a context field.
    let proto = u16::from_be(unsafe { (*skb(ctx)).protocol } as u16);
    proto == 0x0800 || proto == 0x86dd
}

/// Makes room for the outer headers in front of the inner Ethernet header.
///
/// IP frames grow with `bpf_skb_adjust_room` and the UDP-tunnel flags, so a GSO
/// packet stays one packet and is segmented as VXLAN later. Other frames (ARP) are
/// never GSO and grow at the head instead. Either way the packet then starts with 50
/// bytes of room followed by (a copy of) the inner Ethernet header.
#[inline(always)]
pub fn grow(ctx: &TcContext, ip: bool) -> Result<(), Counter> {
    let res = if ip {
        let flags = (BPF_F_ADJ_ROOM_FIXED_GSO
            | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
            | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
            | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) as u64
            | ((ETH_LEN as u64 & BPF_ADJ_ROOM_ENCAP_L2_MASK as u64)
                << BPF_ADJ_ROOM_ENCAP_L2_SHIFT as u64);
        ctx.adjust_room(ENCAP_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, flags)
    } else {
        ctx.skb.change_head(ENCAP_OVERHEAD as u32, 0)
    };
    res.map_err(|_| Counter::DropResizeFailed)
}

/// Removes `len` bytes after the outer Ethernet header (the decapsulation).
#[inline(always)]
pub fn shrink(ctx: &TcContext, len: i32) -> Result<(), Counter> {
    ctx.adjust_room(-len, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO as u64)
        .map_err(|_| Counter::DropResizeFailed)
}

/// Writes the outer headers and the inner Ethernet header at the packet's start.
#[inline(always)]
pub fn store_headers(ctx: &TcContext, headers: &EncapHeaders) -> Result<(), Counter> {
    ctx.store(0, headers, 0)
        .map_err(|_| Counter::DropResizeFailed)
}

/// The resolved Ethernet address of the next hop towards `peer`, if known.
#[inline(always)]
pub fn next_hop_mac(peer: &PeerEntry) -> Option<[u8; 6]> {
    if peer.next_hop_mac == [0; 6] {
        None
    } else {
        Some(peer.next_hop_mac)
    }
}

/// Finds the peer behind a unicast MAC, unless it is unknown, aged out or its peer gone.
#[inline(always)]
pub fn lookup_mac(mac: &[u8; 6], cfg: &DatapathConfig) -> Option<(u32, PeerEntry)> {
    let key = MacKey::new(*mac);
    // SAFETY: the entry is copied out at once (see `maps::peer`).
    let entry = unsafe { MACS.get(&key) }.copied()?;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.saturating_sub(entry.seen_ns) > cfg.mac_age_secs as u64 * 1_000_000_000 {
        return None;
    }
    let peer = peer(entry.short_id)?;
    Some((entry.short_id, peer))
}

/// Records that `mac` lives behind peer `short_id`.
#[inline(always)]
pub fn learn_mac(mac: &[u8; 6], short_id: u32) {
    if mac[0] & 1 != 0 || *mac == [0; 6] {
        return; // a group address is never a source; all-zero is Weave's heartbeat
    }
    let key = MacKey::new(*mac);
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: the entry is copied out at once (see `maps::peer`).
    if let Some(old) = unsafe { MACS.get(&key) }.copied()
        && old.short_id == short_id
        && now.saturating_sub(old.seen_ns) < MAC_REFRESH_NS
    {
        return;
    }
    let _ = MACS.insert(
        &key,
        &MacEntry {
            short_id,
            pad: 0,
            seen_ns: now,
        },
        0,
    );
}
