//! Packet access, tunnel keys and the MAC table, as the programs share them, each
//! written for the verifier: every read is bounds-checked against `data_end`.

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, BPF_F_DONT_FRAGMENT, BPF_F_ZERO_CSUM_TX, bpf_tunnel_key},
    helpers::{
        bpf_ktime_get_coarse_ns, bpf_redirect, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key,
    },
    programs::TcContext,
};
use weft_common::{
    maps::{Counter, DatapathConfig, IPSEC_MARK, MacEntry, MacKey, PEER_ENCRYPTED, PeerEntry},
    wire::{OUTER_TTL, vni},
};

use crate::maps::{MACS, peer};

/// A learned MAC is refreshed in the map at most this often (keeps the receive
/// path from writing a shared hash entry on every packet). MAC times come from the
/// coarse monotonic clock: a few milliseconds of resolution is plenty for ageing
/// measured in minutes, and it costs no clock-source read per packet.
#[cfg(not(weft_variant))]
const MAC_REFRESH_NS: u64 = 1_000_000_000;
/// The variant build (`--cfg weft_variant`, made only to test upgrades between
/// different programs) refreshes half as often: other code, same maps.
#[cfg(weft_variant)]
const MAC_REFRESH_NS: u64 = 2_000_000_000;

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

/// The tunnel key the kernel's VXLAN driver attached to a received frame (or that
/// this program set on a copy it made), if there is one.
#[inline(always)]
pub fn tunnel_key(ctx: &TcContext) -> Option<bpf_tunnel_key> {
    // SAFETY: all-zero bytes are a valid `bpf_tunnel_key` (integers and unions of them).
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: a helper call writing at most `size_of::<bpf_tunnel_key>()` bytes into
    // `key`, which lives on this stack frame.
    let ret = unsafe {
        bpf_skb_get_tunnel_key(skb(ctx), &mut key, size_of::<bpf_tunnel_key>() as u32, 0)
    };
    (ret == 0).then_some(key)
}

/// Sets the tunnel key the VXLAN driver encapsulates the frame with: Weave's VNI,
/// the peer as outer destination, this host as outer source, TTL 64, DF, and a UDP
/// checksum of zero. The driver picks the per-flow UDP source port.
#[inline(always)]
pub fn set_tunnel_key(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    short_id: u32,
    peer: &PeerEntry,
) -> Result<(), Counter> {
    // SAFETY: as in `tunnel_key`.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = vni(short_id as u16, cfg.local_short_id);
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(peer.addr);
    key.__bindgen_anon_3.local_ipv4 = u32::from_be_bytes(cfg.local_addr);
    key.tunnel_ttl = OUTER_TTL;
    // SAFETY: a helper call reading `size_of::<bpf_tunnel_key>()` bytes from `key`.
    let ret = unsafe {
        bpf_skb_set_tunnel_key(
            skb(ctx),
            &mut key,
            size_of::<bpf_tunnel_key>() as u32,
            (BPF_F_ZERO_CSUM_TX | BPF_F_DONT_FRAGMENT) as u64,
        )
    };
    if ret != 0 {
        return Err(Counter::DropSetTunnelKey);
    }
    // The IPsec mark: set for an encrypted peer (its XFRM policy, or the agent's
    // catch-all block policy, matches it: the frame leaves inside ESP or not at all),
    // cleared for any other (a marked frame would hit the block policy).
    // SAFETY: `skb` points at the program's context; TC programs may write `mark`.
    unsafe {
        let skb = skb(ctx);
        (*skb).mark = if peer.flags & PEER_ENCRYPTED != 0 {
            (*skb).mark | IPSEC_MARK
        } else {
            (*skb).mark & !IPSEC_MARK
        };
    }
    Ok(())
}

/// Whether the frame was decrypted by one of the agent's inbound SAs: they mark
/// what they decrypt with [`IPSEC_MARK`], and the mark survives the VXLAN driver's
/// decapsulation.
#[inline(always)]
pub fn decrypted(ctx: &TcContext) -> bool {
    // SAFETY: `skb` points at the program's context for the whole run.
    unsafe { (*skb(ctx)).mark & IPSEC_MARK != 0 }
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

/// Sends the frame out of device `ifindex` once the program returns: the
/// `TC_ACT_REDIRECT` verdict, or `TC_ACT_SHOT` if the device is not usable.
#[inline(always)]
pub fn redirect_out(ifindex: u32) -> i32 {
    // SAFETY: plain helper call; it only records the target for the verdict.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// Clears [`IPSEC_MARK`] from a received frame.
#[inline(always)]
pub fn clear_ipsec_mark(ctx: &TcContext) {
    // SAFETY: `skb` points at the program's context; TC programs may write `mark`.
    unsafe {
        let skb = skb(ctx);
        (*skb).mark &= !IPSEC_MARK;
    }
}
