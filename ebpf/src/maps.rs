//! The BPF maps both programs share. Names and record types come from
//! `weft_common::maps`, where each map is documented; the agent opens them by name.
//!
//! Every map is pinned by name (under a directory the agent chooses), so the
//! datapath keeps its state while no agent runs and a restarted agent adopts it.

use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray},
};
use weft_common::{
    maps::{Counter, DatapathConfig, MAX_MACS, MAX_PEERS, MacEntry, MacKey, PeerEntry, PeerStats},
    wire::VXLAN_PORT,
};

/// Datapath settings (one entry). See [`DatapathConfig`].
#[map(name = "WEFT_CONFIG")]
pub static CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);

/// Remote peers, indexed by ShortID (empty slots have address 0.0.0.0).
#[map(name = "WEFT_PEERS")]
pub static PEERS: Array<PeerEntry> = Array::pinned(MAX_PEERS, 0);

/// ShortIDs a flooded frame is copied to (first `flood_count` entries).
#[map(name = "WEFT_FLOOD")]
pub static FLOOD: Array<u32> = Array::pinned(MAX_PEERS, 0);

/// Whether `weft_encap` is sending a flood copy on this CPU right now (per CPU, one
/// entry).
///
/// Set just before `bpf_clone_redirect`, which transmits the copy through the
/// device's TC egress hook (this program again) synchronously on the same CPU with
/// bottom halves disabled, and cleared when it returns: no other packet can see it.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct FloodState {
    /// Nonzero while a flood copy is being sent (its own run must let it pass).
    pub copying: u32,
}

// A pinned record: a change to it must bump `MAP_LAYOUT_VERSION`.
const _: () = assert!(size_of::<FloodState>() == 4);

/// Per-CPU [`FloodState`] (one entry).
#[map(name = "WEFT_FLOOD_STATE")]
pub static FLOOD_STATE: PerCpuArray<FloodState> = PerCpuArray::pinned(1, 0);

/// Inner MAC -> peer, learned from decapsulated frames.
#[map(name = "WEFT_MACS")]
pub static MACS: LruHashMap<MacKey, MacEntry> = LruHashMap::pinned(MAX_MACS, 0);

/// Per-CPU traffic counters per peer, indexed by ShortID.
#[map(name = "WEFT_PEER_STATS")]
pub static PEER_STATS: PerCpuArray<PeerStats> = PerCpuArray::pinned(MAX_PEERS, 0);

/// Per-CPU pass/drop counters, indexed by [`Counter`].
#[map(name = "WEFT_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

/// Adds one to counter `c` on this CPU.
#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU array slot is only touched by this CPU while the program runs.
        unsafe { *p += 1 };
    }
}

/// Reads the datapath configuration, or `None` until the agent has enabled it.
#[inline(always)]
pub fn config() -> Option<DatapathConfig> {
    let cfg = CONFIG.get(0)?;
    if cfg.enabled == 0 {
        return None;
    }
    Some(*cfg)
}

/// The fast datapath's UDP port the underlay guards judge: the configured one, or
/// Weave's 6784 before the agent has written it.
#[inline(always)]
pub fn guard_port() -> u16 {
    match CONFIG.get(0) {
        Some(cfg) if cfg.vxlan_port != 0 => cfg.vxlan_port,
        _ => VXLAN_PORT,
    }
}

/// Looks up a peer by ShortID (an array slot: no hashing, inlined by the verifier).
#[inline(always)]
pub fn peer(short_id: u32) -> Option<PeerEntry> {
    let entry = PEERS.get(short_id)?;
    if entry.addr == [0; 4] {
        return None;
    }
    // A copy: the agent replaces whole entries, so at worst one packet sees a mix
    // of the old and new next-hop MAC.
    Some(*entry)
}

/// Adds one frame of `bytes` to a peer's transmit (`tx = true`) or receive counters.
#[inline(always)]
pub fn count_peer(short_id: u32, bytes: u32, tx: bool) {
    if let Some(p) = PEER_STATS.get_ptr_mut(short_id) {
        // SAFETY: per-CPU slot, as in `count`.
        let s = unsafe { &mut *p };
        if tx {
            s.tx_packets += 1;
            s.tx_bytes += bytes as u64;
        } else {
            s.rx_packets += 1;
            s.rx_bytes += bytes as u64;
        }
    }
}

/// This CPU's [`FloodState`], read and written only through volatile accesses:
/// the compiler must not drop a store that only a helper call (a clone that
/// re-enters the program) is there to see.
#[derive(Clone, Copy)]
pub struct Flood(*mut FloodState);

impl Flood {
    /// This CPU's entry.
    #[inline(always)]
    pub fn this_cpu() -> Option<Self> {
        FLOOD_STATE.get_ptr_mut(0).map(Self)
    }

    /// Whether a flood copy is being sent right now.
    #[inline(always)]
    pub fn copying(self) -> bool {
        // SAFETY: the pointer is this CPU's map slot, valid for the program's run;
        // runs on one CPU never interleave on it (see `FloodState`).
        unsafe { (&raw const (*self.0).copying).read_volatile() != 0 }
    }

    /// Marks (or unmarks) that a flood copy is being sent.
    #[inline(always)]
    pub fn set_copying(self, on: bool) {
        // SAFETY: as in `copying`.
        unsafe { (&raw mut (*self.0).copying).write_volatile(u32::from(on)) }
    }
}
