//! weft's kernel side: two TC programs that carry bridge frames between hosts in
//! VXLAN, wire-compatible with Weave Net's fast datapath.
//!
//! - [`weft_encap`] runs on ingress of `vethwe-datapath`, where every frame the `weave`
//!   bridge sends towards other hosts arrives. It picks the peer from the learned MAC
//!   table (or floods), writes outer IPv4/UDP/VXLAN headers in front of the frame, and
//!   redirects it out of the underlay interface.
//! - [`weft_decap`] runs on ingress of the underlay interface. It passes everything
//!   that is not VXLAN to weft's port untouched, checks that the VNI names this host
//!   and a known peer sending from its own address, learns the inner source MAC,
//!   strips the outer headers and redirects the inner frame into the bridge.
//!
//! Both keep GSO packets whole: growing and shrinking go through
//! `bpf_skb_adjust_room` with the tunnel flags, so the kernel segments (or the NIC
//! offloads) encapsulated TCP exactly as it does for its own VXLAN device.
#![no_std]
#![no_main]

mod maps;
mod packet;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_STOLEN},
    helpers::{bpf_get_hash_recalc, bpf_redirect, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use weft_common::{
    maps::{Counter, DatapathConfig, MAX_FLOOD_PEERS, PeerEntry},
    wire::{
        ENCAP_HEADERS_LEN, ENCAP_OVERHEAD, ETH_LEN, EncapHeaders, INNER_ETH_OFFSET, IPPROTO_UDP,
        IPV4_FRAG_MASK, IPV4_LEN, VXLAN_FLAG_I, ipv4_checksum, src_port_from_hash, vni, vni_dst,
        vni_src,
    },
};

use crate::{
    maps::{FLOOD, config, count, count_peer, peer},
    packet::{
        grow, is_ip, learn_mac, lookup_mac, next_hop_mac, read_at, shrink, skb, store_headers,
    },
};

/// Encapsulates a frame from the bridge and sends it to its peer(s).
#[classifier]
pub fn weft_encap(ctx: TcContext) -> i32 {
    match try_encap(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT as i32
        }
    }
}

fn try_encap(ctx: &TcContext) -> Result<i32, Counter> {
    let cfg = config().ok_or(Counter::DropNotConfigured)?;
    let len = ctx.len();
    // SAFETY: `skb` points at the program's context for the whole run.
    let gso = unsafe { (*skb(ctx)).gso_size } != 0;
    if !gso && len > cfg.mtu as u32 + ETH_LEN as u32 {
        return Err(Counter::DropTooBig);
    }
    let inner_eth: [u8; ETH_LEN] = ctx.load(0).map_err(|_| Counter::DropTruncated)?;
    // SAFETY: as above; the hash only reads the skb.
    let hash = unsafe { bpf_get_hash_recalc(skb(ctx)) };
    let mut headers = EncapHeaders::new(
        &inner_eth,
        len,
        cfg.local_addr,
        [0; 4],
        src_port_from_hash(hash),
        cfg.vxlan_port,
        0,
    );

    let dst_mac = [
        inner_eth[0],
        inner_eth[1],
        inner_eth[2],
        inner_eth[3],
        inner_eth[4],
        inner_eth[5],
    ];
    let unicast = if dst_mac[0] & 1 == 0 {
        lookup_mac(&dst_mac, &cfg)
    } else {
        None
    };
    match unicast {
        Some((short_id, peer)) => unicast_to(ctx, &cfg, &mut headers, short_id, &peer, len),
        None => flood(ctx, &cfg, &mut headers, len),
    }
}

/// Sends the frame to one peer.
#[inline(always)]
fn unicast_to(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    headers: &mut EncapHeaders,
    short_id: u32,
    peer: &PeerEntry,
    len: u32,
) -> Result<i32, Counter> {
    headers.set_destination(peer.addr, vni(short_id as u16, cfg.local_short_id));
    let ip = is_ip(ctx);
    // Non-IP frames (ARP replies) cannot use bpf_redirect_neigh, which needs an IP
    // skb: they go straight to the next hop's known MAC instead.
    let next_hop = if ip {
        None
    } else {
        Some(next_hop_mac(peer).ok_or(Counter::FloodNoNeighbour)?)
    };
    grow(ctx, ip)?;
    if let Some(mac) = &next_hop {
        headers.set_outer_macs(&cfg.underlay_mac, mac);
    }
    store_headers(ctx, headers)?;
    count_peer(short_id, len, true);
    count(Counter::TxUnicast);
    // SAFETY: plain helper calls with map-derived arguments.
    let action = match next_hop {
        None => unsafe { bpf_redirect_neigh(cfg.underlay_ifindex, core::ptr::null_mut(), 0, 0) },
        Some(_) => unsafe { bpf_redirect(cfg.underlay_ifindex, 0) },
    };
    Ok(action as i32)
}

/// Copies the frame to every peer in the flood list.
#[inline(always)]
fn flood(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    headers: &mut EncapHeaders,
    len: u32,
) -> Result<i32, Counter> {
    let n = cfg.flood_count as u32;
    if n == 0 {
        return Err(Counter::DropNoPeers);
    }
    grow(ctx, is_ip(ctx))?;
    for i in 0..MAX_FLOOD_PEERS {
        if i >= n {
            break;
        }
        let Some(&short_id) = FLOOD.get(i) else {
            break;
        };
        let Some(peer) = peer(short_id) else {
            continue;
        };
        let Some(mac) = next_hop_mac(&peer) else {
            count(Counter::FloodNoNeighbour);
            continue;
        };
        headers.set_destination(peer.addr, vni(short_id as u16, cfg.local_short_id));
        headers.set_outer_macs(&cfg.underlay_mac, &mac);
        store_headers(ctx, headers)?;
        if ctx.clone_redirect(cfg.underlay_ifindex, 0).is_ok() {
            count_peer(short_id, len, true);
        }
    }
    if n > MAX_FLOOD_PEERS {
        count(Counter::FloodTruncated);
    }
    count(Counter::TxFlood);
    Ok(TC_ACT_STOLEN as i32)
}

/// Decapsulates VXLAN addressed to this host; passes everything else.
#[classifier]
pub fn weft_decap(ctx: TcContext) -> i32 {
    match try_decap(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT as i32
        }
    }
}

/// Counts and passes a packet that is not weft's.
#[inline(always)]
fn pass() -> Result<i32, Counter> {
    count(Counter::PassNotOverlay);
    Ok(TC_ACT_OK as i32)
}

fn try_decap(ctx: &TcContext) -> Result<i32, Counter> {
    let Some(cfg) = config() else {
        // Not configured: the host's own traffic must keep flowing.
        return Ok(TC_ACT_OK as i32);
    };
    if ctx.data() + ENCAP_HEADERS_LEN > ctx.data_end() {
        // Headers not all in the linear area (or a short packet): pull what exists.
        let want = if ctx.len() < ENCAP_HEADERS_LEN as u32 {
            ctx.len()
        } else {
            ENCAP_HEADERS_LEN as u32
        };
        let _ = ctx.pull_data(want);
    }
    let Some(eth_type) = read_at::<[u8; 2]>(ctx, 12) else {
        return pass();
    };
    if eth_type != [0x08, 0x00] {
        return pass();
    }
    let Some(ip) = read_at::<[u8; IPV4_LEN]>(ctx, ETH_LEN) else {
        return pass();
    };
    if ip[0] >> 4 != 4 || ip[9] != IPPROTO_UDP {
        return pass();
    }
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if ihl != IPV4_LEN {
        // Weave never sends options; drop them only when they hide weft's port.
        if ihl > IPV4_LEN
            && frag & 0x1fff == 0
            && let Ok(port) = ctx.load::<[u8; 2]>(ETH_LEN + ihl + 2)
            && u16::from_be_bytes(port) == cfg.vxlan_port
        {
            return Err(Counter::DropIpOptions);
        }
        return pass();
    }
    if frag & 0x1fff != 0 {
        // A later fragment: no UDP header to judge by.
        return pass();
    }
    let Some(udp) = read_at::<[u8; 8]>(ctx, ETH_LEN + IPV4_LEN) else {
        return pass();
    };
    if u16::from_be_bytes([udp[2], udp[3]]) != cfg.vxlan_port {
        return pass();
    }
    // From here on the packet is addressed to weft: it is delivered or dropped.
    // The stack has not checked the outer header yet (TC runs before ip_rcv).
    if ipv4_checksum(&ip) != 0 {
        return Err(Counter::DropBadChecksum);
    }
    if frag & IPV4_FRAG_MASK != 0 {
        return Err(Counter::DropFragment);
    }
    let vxlan = read_at::<[u8; 8]>(ctx, ETH_LEN + IPV4_LEN + 8).ok_or(Counter::DropTruncated)?;
    let inner_eth =
        read_at::<[u8; ETH_LEN]>(ctx, INNER_ETH_OFFSET).ok_or(Counter::DropTruncated)?;
    if vxlan[0] & VXLAN_FLAG_I == 0 {
        return Err(Counter::DropBadVxlan);
    }
    let vni = u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]);
    if vni_dst(vni) != cfg.local_short_id {
        return Err(Counter::DropWrongDestination);
    }
    let src = vni_src(vni) as u32;
    let peer = peer(src).ok_or(Counter::DropUnknownSource)?;
    if peer.addr != [ip[12], ip[13], ip[14], ip[15]] {
        return Err(Counter::DropSourceMismatch);
    }
    learn_mac(
        &[
            inner_eth[6],
            inner_eth[7],
            inner_eth[8],
            inner_eth[9],
            inner_eth[10],
            inner_eth[11],
        ],
        src,
    );
    let inner_len = ctx.len() - INNER_ETH_OFFSET as u32;
    shrink(ctx, ENCAP_OVERHEAD as i32)?;
    ctx.store(0, &inner_eth, 0)
        .map_err(|_| Counter::DropResizeFailed)?;
    count_peer(src, inner_len, false);
    count(Counter::RxDelivered);
    // SAFETY: plain helper call with a map-derived ifindex.
    Ok(unsafe { bpf_redirect(cfg.datapath_ifindex, 0) } as i32)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // eBPF programs cannot unwind; the verifier rejects any path that reaches here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
