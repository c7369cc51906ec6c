//! The sleeve's data path: pod frames between the bridge (through the sleeve's TAP
//! device) and peers (UDP 6783, Weave's sleeve datagrams).
//!
//! Two threads, each owning its half:
//!
//! - **TX** reads the TAP (one read per GSO super-packet), routes the frame by its
//!   destination MAC ([`MacTable`], learnt from what peers send us), segments it to the
//!   peer's sleeve MTU ([`Segmenter`]) straight into that peer's datagram lane (one copy
//!   per frame), seals each datagram in place, and sends every pending datagram with one
//!   `sendmmsg` per socket (DF and non-DF), a run of equal-sized datagrams to one peer
//!   going as one `UDP_SEGMENT` message. Frames are batched while the TAP has more to
//!   read, so small frames share datagrams and syscalls too.
//! - **RX** receives with `recvmmsg` and UDP GRO, opens each datagram in place (replay
//!   window after the authenticator), hands special frames to the node, learns source
//!   MACs, and feeds data frames to a [`TcpCoalescer`] that writes super-packets into
//!   the TAP (flushed at the end of each receive batch).
//!
//! The peer table is swapped whole by [`Dataplane::set_peers`]; each peer's crypto state
//! (sealer counters, replay windows) survives a swap while its name, ConnUID, key and
//! direction stay the same. weft does not relay: data frames addressed to another peer
//! are dropped.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use weft::{
    mesh::{PeerName, SessionKey},
    sleeve::{
        SleeveError, SleeveRx, SleeveTx,
        crypto::OpenError,
        frame::{
            self, DatagramBuilder, ENTRY_HEADER_LEN, ETH_HEADER_LEN, MAX_DATAGRAM_LEN,
            MAX_FRAMES_PER_DATAGRAM, OVERHEAD_ENCRYPTED, OVERHEAD_PLAIN, PLAIN_HEADER_LEN,
            SEALED_HEADER_LEN, UDP_OVERHEAD,
        },
        icmp,
    },
};

use crate::{
    offload::{OffloadError, Segmenter, TcpCoalescer, VIRTIO_NET_HDR_LEN, VirtioNetHdr},
    tap::{READ_BUF_LEN, Tap},
    udp::{self, BatchSocket, GRO_BUF_LEN, MAX_GSO_SEGMENTS, RecvBatch, SendMsg, SleeveSockets},
};

/// One peer the sleeve may carry traffic to.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    /// The peer.
    pub name: PeerName,
    /// The control connection's ConnUID (a new one means a new crypto state).
    pub conn_uid: u64,
    /// Whether we dialled the control connection (the nonces' polarity).
    pub outbound: bool,
    /// The session key: datagrams are sealed with it; `None` is plain.
    pub key: Option<SessionKey>,
    /// Where the peer receives sleeve datagrams, once known.
    pub addr: Option<SocketAddr>,
    /// The sleeve MTU towards it (largest inner IP packet).
    pub mtu: u16,
    /// Whether the sleeve carries this peer's pod traffic now: floods read from the
    /// TAP device go to it (else the fast datapath floods to it).
    pub carries: bool,
    /// Whether the sleeve to this peer works (established): unicast frames read from
    /// the TAP device go to it even while the fast datapath carries its traffic (the
    /// bridge may still know a MAC on the TAP port from before a switch; dropping
    /// them would keep it so).
    pub established: bool,
}

/// What the data path hands to the node.
#[derive(Debug)]
pub enum DataplaneEvent {
    /// A special frame (heartbeat, frag test, MTU probe) from a known peer to us.
    Special {
        /// The datagram's sender.
        sender: PeerName,
        /// Its UDP source address.
        from: SocketAddr,
        /// The frame.
        frame: Vec<u8>,
    },
    /// A fast-datapath heartbeat the eBPF program handed over through the TAP device.
    FastdpHeartbeat {
        /// Its ConnUID.
        conn_uid: u64,
        /// Its sender hears our heartbeats ([`weft::fastdp::heartbeat_hears`]).
        hears_us: bool,
    },
}

/// Why a special frame was not sent.
#[derive(Debug, thiserror::Error)]
pub enum SpecialSendError {
    /// EMSGSIZE: the frame does not fit the path (DF); the path MTU if the kernel
    /// told it.
    #[error("message too long for the path (path MTU {path_mtu:?})")]
    MessageTooBig {
        /// The kernel's path MTU towards the peer.
        path_mtu: Option<usize>,
    },
    /// The peer's UDP address is not known yet.
    #[error("the peer's UDP address is not known yet")]
    NoAddress,
    /// Not a peer of the data path.
    #[error("unknown peer")]
    UnknownPeer,
    /// Another send error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Traffic counters of one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Frames sent.
    pub tx_packets: u64,
    /// Frame bytes sent.
    pub tx_bytes: u64,
    /// Frames received.
    pub rx_packets: u64,
    /// Frame bytes received.
    pub rx_bytes: u64,
}

/// The data path's counters.
#[derive(Debug, Clone, Default)]
// The node reads the per-peer counters; the drop and I/O counters are for metrics.
#[cfg_attr(not(test), allow(dead_code))]
pub struct DataplaneStats {
    /// Per peer.
    pub peers: BTreeMap<PeerName, PeerCounters>,
    /// Dropped frames and datagrams, by reason (every reason, zeros included).
    pub drops: BTreeMap<&'static str, u64>,
    /// System-call level counters (how well frames are batched).
    pub io: IoCounters,
}

/// How many system calls moved how much (batching: frames per read or write,
/// datagrams per send or receive call).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCounters {
    /// TAP reads that returned a frame (a GSO super-packet counts once).
    pub tap_reads: u64,
    /// TAP writes (a coalesced super-packet counts once).
    pub tap_writes: u64,
    /// `sendmmsg` calls on the data path.
    pub send_calls: u64,
    /// Datagrams handed to the kernel (each UDP GSO segment counts).
    pub datagrams_sent: u64,
    /// `recvmmsg` calls that returned datagrams.
    pub recv_calls: u64,
    /// Datagrams received (each GRO segment counts).
    pub datagrams_received: u64,
}

/// The shared form of [`IoCounters`].
#[derive(Debug, Default)]
struct IoStats {
    tap_reads: AtomicU64,
    tap_writes: AtomicU64,
    send_calls: AtomicU64,
    datagrams_sent: AtomicU64,
    recv_calls: AtomicU64,
    datagrams_received: AtomicU64,
}

impl IoStats {
    fn snapshot(&self) -> IoCounters {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IoCounters {
            tap_reads: l(&self.tap_reads),
            tap_writes: l(&self.tap_writes),
            send_calls: l(&self.send_calls),
            datagrams_sent: l(&self.datagrams_sent),
            recv_calls: l(&self.recv_calls),
            datagrams_received: l(&self.datagrams_received),
        }
    }
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------
// Drop reasons and counters.

/// Why the data path dropped a frame (or, for the receive and send reasons, a
/// datagram). The names are stable: they are metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// TX: a frame shorter than an Ethernet header.
    Runt,
    /// TX: a frame with a zero Ethernet header that is not a fast-datapath heartbeat.
    BadSpecial,
    /// TX: unknown or group destination and no peer carried by the sleeve.
    NoRoute,
    /// TX: the destination MAC is behind a peer the sleeve does not carry.
    PeerNotCarried,
    /// TX: the peer's UDP address is not known yet.
    NoAddress,
    /// TX: an IPv4 DF frame over the sleeve MTU, answered with ICMP frag-needed.
    FragNeeded,
    /// TX: a frame that cannot be carried (DF over the MTU, flooded or IPv6).
    TooBig,
    /// TX: a GSO frame the segmenter refused.
    OffloadError,
    /// TX: sealing failed (sequence numbers exhausted).
    SealFailed,
    /// TX: the kernel refused a DF datagram as larger than the path MTU.
    SendTooBig,
    /// TX: another send error.
    SendError,
    /// RX: a datagram from a peer name the data path does not know.
    UnknownSender,
    /// RX: a sealed datagram that did not authenticate.
    DecryptFailed,
    /// RX: an authentic datagram already seen or too old.
    Replay,
    /// RX: a datagram or frame list that does not parse.
    Malformed,
    /// RX: a data frame addressed to another peer (weft does not relay).
    NotForUs,
    /// RX: a special frame whose src/dst are not the sender and us.
    SpecialMisaddressed,
    /// RX: writing into the TAP device failed.
    TapWriteError,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 18] = [
        DropReason::Runt,
        DropReason::BadSpecial,
        DropReason::NoRoute,
        DropReason::PeerNotCarried,
        DropReason::NoAddress,
        DropReason::FragNeeded,
        DropReason::TooBig,
        DropReason::OffloadError,
        DropReason::SealFailed,
        DropReason::SendTooBig,
        DropReason::SendError,
        DropReason::UnknownSender,
        DropReason::DecryptFailed,
        DropReason::Replay,
        DropReason::Malformed,
        DropReason::NotForUs,
        DropReason::SpecialMisaddressed,
        DropReason::TapWriteError,
    ];

    /// The snake_case name (a metric label).
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Runt => "runt",
            DropReason::BadSpecial => "bad_special",
            DropReason::NoRoute => "no_route",
            DropReason::PeerNotCarried => "peer_not_carried",
            DropReason::NoAddress => "no_address",
            DropReason::FragNeeded => "frag_needed",
            DropReason::TooBig => "too_big",
            DropReason::OffloadError => "offload_error",
            DropReason::SealFailed => "seal_failed",
            DropReason::SendTooBig => "send_too_big",
            DropReason::SendError => "send_error",
            DropReason::UnknownSender => "unknown_sender",
            DropReason::DecryptFailed => "decrypt_failed",
            DropReason::Replay => "replay",
            DropReason::Malformed => "malformed",
            DropReason::NotForUs => "not_for_us",
            DropReason::SpecialMisaddressed => "special_misaddressed",
            DropReason::TapWriteError => "tap_write_error",
        }
    }
}

/// Drop counters, one per [`DropReason`].
#[derive(Debug, Default)]
struct Drops([AtomicU64; DropReason::ALL.len()]);

impl Drops {
    fn add(&self, r: DropReason, n: u64) {
        self.0[r as usize].fetch_add(n, Ordering::Relaxed);
    }

    fn get(&self, r: DropReason) -> u64 {
        self.0[r as usize].load(Ordering::Relaxed)
    }
}

/// One peer's traffic counters (shared by both threads).
#[derive(Debug, Default)]
struct Counters {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> PeerCounters {
        PeerCounters {
            tx_packets: self.tx_packets.load(Ordering::Relaxed),
            tx_bytes: self.tx_bytes.load(Ordering::Relaxed),
            rx_packets: self.rx_packets.load(Ordering::Relaxed),
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
        }
    }
}

// ---------------------------------------------------------------------------------
// The peer table.

/// One peer as the threads see it: its spec and its crypto state and counters, which
/// outlive table swaps.
struct Peer {
    name: PeerName,
    conn_uid: u64,
    outbound: bool,
    key: Option<SessionKey>,
    addr: Option<SocketAddr>,
    mtu: u16,
    carries: bool,
    established: bool,
    tx: Arc<SleeveTx>,
    rx: Arc<Mutex<SleeveRx>>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("name", &self.name)
            .field("conn_uid", &self.conn_uid)
            .field("sealed", &self.key.is_some())
            .field("addr", &self.addr)
            .field("mtu", &self.mtu)
            .field("carries", &self.carries)
            .finish_non_exhaustive()
    }
}

impl Peer {
    /// The largest datagram (UDP payload) for frames of this peer: what
    /// `SleeveForwarder::max_df_payload` gives, `mtu + overhead - 28`.
    fn datagram_limit(&self) -> usize {
        let overhead = if self.key.is_some() {
            OVERHEAD_ENCRYPTED
        } else {
            OVERHEAD_PLAIN
        };
        (usize::from(self.mtu) + overhead - UDP_OVERHEAD).min(MAX_DATAGRAM_LEN)
    }

    fn header_len(&self) -> usize {
        if self.key.is_some() {
            SEALED_HEADER_LEN
        } else {
            PLAIN_HEADER_LEN
        }
    }
}

/// An immutable peer table; replaced whole.
#[derive(Debug, Default)]
struct Table {
    peers: Vec<Peer>,
    by_name: HashMap<PeerName, usize>,
}

impl Table {
    /// The table for `specs`, keeping from `old` the crypto state of every peer whose
    /// name, ConnUID, key and direction are unchanged, and the counters by name.
    fn build(specs: Vec<PeerSpec>, old: &Table) -> Table {
        let mut t = Table::default();
        for s in specs {
            if t.by_name.contains_key(&s.name) {
                continue;
            }
            let prev = old.get(s.name);
            let same = prev
                .filter(|p| p.conn_uid == s.conn_uid && p.outbound == s.outbound && p.key == s.key);
            let (tx, rx) = match same {
                Some(p) => (p.tx.clone(), p.rx.clone()),
                None => (
                    Arc::new(SleeveTx::new(s.key.as_ref(), s.outbound)),
                    Arc::new(Mutex::new(SleeveRx::new(s.key.as_ref(), s.outbound))),
                ),
            };
            let counters = prev.map_or_else(Default::default, |p| p.counters.clone());
            t.by_name.insert(s.name, t.peers.len());
            t.peers.push(Peer {
                name: s.name,
                conn_uid: s.conn_uid,
                outbound: s.outbound,
                key: s.key,
                addr: s.addr,
                mtu: s.mtu,
                carries: s.carries,
                established: s.established,
                tx,
                rx,
                counters,
            });
        }
        t
    }

    fn get(&self, name: PeerName) -> Option<&Peer> {
        self.by_name.get(&name).map(|&i| &self.peers[i])
    }
}

// ---------------------------------------------------------------------------------
// MAC learning and routing (no I/O).

/// A MAC address.
type Mac = [u8; 6];

/// How long a learnt MAC stays valid without traffic (the bridge's default is 5 min).
pub const MAC_AGING: Duration = Duration::from_secs(300);
/// Most MACs remembered (the table is fed by network input: it must stay bounded).
const MAC_TABLE_MAX: usize = 16384;

/// MAC -> the peer it was last seen behind, with aging.
#[derive(Debug, Default)]
pub struct MacTable {
    map: HashMap<Mac, (PeerName, Instant)>,
}

impl MacTable {
    /// Records that `mac` was the source of a frame from `peer` at `now`. Group MACs
    /// are not learnt. When full, expired entries go; if it is still full the MAC is
    /// not learnt (its frames are flooded).
    pub fn learn(&mut self, mac: Mac, peer: PeerName, now: Instant) {
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return;
        }
        if self.map.len() >= MAC_TABLE_MAX && !self.map.contains_key(&mac) {
            self.expire(now);
            if self.map.len() >= MAC_TABLE_MAX {
                return;
            }
        }
        self.map.insert(mac, (peer, now));
    }

    /// The peer `mac` was learnt behind, unless it aged out.
    pub fn lookup(&self, mac: &Mac, now: Instant) -> Option<PeerName> {
        self.map
            .get(mac)
            .filter(|(_, seen)| now.saturating_duration_since(*seen) < MAC_AGING)
            .map(|(p, _)| *p)
    }

    /// Forgets aged-out entries.
    pub fn expire(&mut self, now: Instant) {
        self.map
            .retain(|_, (_, seen)| now.saturating_duration_since(*seen) < MAC_AGING);
    }
}

/// Where a frame read from the TAP goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// To the peer at this table index.
    Unicast(usize),
    /// A copy to every carried peer.
    Flood,
    /// Nowhere.
    Drop(DropReason),
}

fn is_group(mac: &Mac) -> bool {
    mac[0] & 1 != 0
}

/// Routes a frame by its destination MAC.
fn route(table: &Table, macs: &MacTable, dst: &Mac, now: Instant) -> Route {
    let flood = || {
        if table.peers.iter().any(|p| p.carries) {
            Route::Flood
        } else {
            Route::Drop(DropReason::NoRoute)
        }
    };
    if is_group(dst) {
        return flood();
    }
    match macs.lookup(dst, now).and_then(|p| table.by_name.get(&p)) {
        Some(&i) if table.peers[i].carries || table.peers[i].established => Route::Unicast(i),
        Some(_) => Route::Drop(DropReason::PeerNotCarried),
        None => flood(),
    }
}

/// Whether a frame goes in a DF datagram: IPv4 with DF set, or IPv6.
fn frame_df(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        Some([0x08, 0x00]) => frame
            .get(ETH_HEADER_LEN + 6)
            .is_some_and(|flags| flags & 0x40 != 0),
        Some([0x86, 0xdd]) => true,
        _ => false,
    }
}

fn is_ipv4(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&[0x08, 0x00])
}

// ---------------------------------------------------------------------------------
// Packing (no I/O).

/// Datagrams being built for one peer on one socket (DF or not), back to back in one
/// buffer, so a run of equal-sized ones goes as one UDP GSO message without a copy.
#[derive(Debug, Default)]
struct Lane {
    buf: Vec<u8>,
    /// Closed (sealed) datagrams: start and length in `buf`.
    dgrams: Vec<(usize, usize)>,
    /// The open datagram: its start and frame count.
    open: Option<(usize, usize)>,
}

/// Why a frame was not packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PackError {
    /// It does not fit a datagram (DF over the limit, or over 64 KB).
    TooBig,
    /// Sealing the previous datagram failed.
    Seal,
}

/// What a lane needs to know about its peer.
struct LaneCtx<'a> {
    local: PeerName,
    peer: PeerName,
    tx: &'a SleeveTx,
    header: usize,
    limit: usize,
    df: bool,
}

impl Lane {
    /// Appends a frame entry `[local][peer][len][frame]` to the open datagram, closing
    /// it first if the frame does not fit. A non-DF frame larger than the limit goes
    /// alone in a datagram of up to 64 KB (the kernel fragments it).
    fn push(&mut self, ctx: &LaneCtx<'_>, frame: &[u8]) -> Result<(), PackError> {
        let need = ENTRY_HEADER_LEN + frame.len();
        if let Some((start, count)) = self.open
            && (count >= MAX_FRAMES_PER_DATAGRAM || self.buf.len() - start + need > ctx.limit)
        {
            self.close(ctx)?;
        }
        let jumbo = ctx.header + need > ctx.limit;
        if jumbo && (ctx.df || ctx.header + need > MAX_DATAGRAM_LEN) {
            return Err(PackError::TooBig);
        }
        let (start, count) = match self.open {
            Some(o) => o,
            None => {
                let start = self.buf.len();
                self.buf.extend_from_slice(&ctx.local.0);
                self.buf.resize(start + ctx.header, 0);
                (start, 0)
            }
        };
        self.buf.extend_from_slice(&ctx.local.0);
        self.buf.extend_from_slice(&ctx.peer.0);
        self.buf
            .extend_from_slice(&(frame.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(frame);
        self.open = Some((start, count + 1));
        if jumbo {
            self.close(ctx)?;
        }
        Ok(())
    }

    /// Closes (seals) the open datagram.
    fn close(&mut self, ctx: &LaneCtx<'_>) -> Result<(), PackError> {
        let Some((start, _)) = self.open.take() else {
            return Ok(());
        };
        if let SleeveTx::Sealed(s) = ctx.tx
            && s.seal_datagram(&mut self.buf[start..], ctx.df).is_err()
        {
            self.buf.truncate(start);
            return Err(PackError::Seal);
        }
        self.dgrams.push((start, self.buf.len() - start));
        Ok(())
    }

    /// Hands out the closed datagrams as sends: runs of equal-sized datagrams (the
    /// last may be shorter) as one GSO message each, within the kernel's limits.
    fn for_each_send<'a>(&'a self, gso: bool, mut f: impl FnMut(&'a [u8], Option<u16>)) {
        let mut i = 0;
        while i < self.dgrams.len() {
            let (start, size) = self.dgrams[i];
            let mut end = start + size;
            let mut j = i + 1;
            if gso {
                while j < self.dgrams.len() && j - i < MAX_GSO_SEGMENTS {
                    let (s, l) = self.dgrams[j];
                    if s != end || l > size || end + l - start > MAX_DATAGRAM_LEN {
                        break;
                    }
                    end += l;
                    j += 1;
                    if l < size {
                        break;
                    }
                }
            }
            let seg = (j - i > 1).then_some(size as u16);
            f(&self.buf[start..end], seg);
            i = j;
        }
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.dgrams.clear();
        self.open = None;
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// The transmit side's state, free of I/O: routing, segmentation and packing into
/// per-peer lanes (index 0: non-DF, 1: DF).
#[derive(Debug)]
struct TxPath {
    local: PeerName,
    table: Arc<Table>,
    lanes: Vec<[Lane; 2]>,
    segmenter: Segmenter,
    targets: Vec<usize>,
    icmp: Vec<u8>,
    pending: usize,
}

/// What [`TxPath::process`] wants done besides packing.
#[derive(Debug, PartialEq, Eq)]
enum TxOutcome {
    /// Packed (or dropped and counted).
    Done,
    /// A fast-datapath heartbeat with this ConnUID (and whether it hears us).
    FastdpHeartbeat(u64, bool),
}

impl TxPath {
    fn new(local: PeerName) -> Self {
        TxPath {
            local,
            table: Arc::default(),
            lanes: Vec::new(),
            segmenter: Segmenter::new(),
            targets: Vec::new(),
            icmp: Vec::new(),
            pending: 0,
        }
    }

    /// Switches to a new table (flush first: the lanes are dropped).
    fn set_table(&mut self, table: Arc<Table>) {
        self.lanes.resize_with(table.peers.len(), Default::default);
        for l in self.lanes.iter_mut().flatten() {
            l.clear();
        }
        self.pending = 0;
        self.table = table;
    }

    /// Routes, segments and packs one frame read from the TAP. ICMP frag-needed frames
    /// for the TAP go to `to_tap`.
    fn process(
        &mut self,
        hdr: &VirtioNetHdr,
        frame: &[u8],
        now: Instant,
        macs: &MacTable,
        drops: &Drops,
        to_tap: &mut dyn FnMut(&[u8]),
    ) -> TxOutcome {
        if frame.len() < ETH_HEADER_LEN {
            drops.add(DropReason::Runt, 1);
            return TxOutcome::Done;
        }
        if frame[..ETH_HEADER_LEN] == [0; ETH_HEADER_LEN] {
            return match weft::fastdp::parse_heartbeat(frame) {
                Some(uid) => TxOutcome::FastdpHeartbeat(uid, weft::fastdp::heartbeat_hears(frame)),
                None => {
                    drops.add(DropReason::BadSpecial, 1);
                    TxOutcome::Done
                }
            };
        }
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&frame[..6]);
        let table = &*self.table;
        self.targets.clear();
        match route(table, macs, &dst, now) {
            Route::Unicast(i) => self.targets.push(i),
            Route::Flood => self
                .targets
                .extend((0..table.peers.len()).filter(|&i| table.peers[i].carries)),
            Route::Drop(r) => {
                drops.add(r, 1);
                return TxOutcome::Done;
            }
        }
        self.targets.retain(|&i| {
            let ok = table.peers[i].addr.is_some();
            if !ok {
                drops.add(DropReason::NoAddress, 1);
            }
            ok
        });
        let Some(mtu) = self.targets.iter().map(|&i| table.peers[i].mtu).min() else {
            return TxOutcome::Done;
        };
        let max_frame = usize::from(mtu) + ETH_HEADER_LEN;
        let df = frame_df(frame);
        let unicast = !is_group(&dst);
        let TxPath {
            local,
            lanes,
            segmenter,
            targets,
            icmp,
            pending,
            ..
        } = self;
        let mut out = |seg: &[u8]| {
            if seg.len() > max_frame && df {
                if unicast && is_ipv4(seg) && icmp::build_frag_needed(seg, mtu, icmp).is_ok() {
                    to_tap(icmp);
                    drops.add(DropReason::FragNeeded, 1);
                } else {
                    drops.add(DropReason::TooBig, 1);
                }
                return;
            }
            for &i in targets.iter() {
                let p = &table.peers[i];
                let ctx = LaneCtx {
                    local: *local,
                    peer: p.name,
                    tx: &p.tx,
                    header: p.header_len(),
                    limit: p.datagram_limit(),
                    df,
                };
                let lane = &mut lanes[i][usize::from(df)];
                let before = lane.buf.len();
                match lane.push(&ctx, seg) {
                    Ok(()) => {
                        *pending += lane.buf.len() - before;
                        p.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                        p.counters
                            .tx_bytes
                            .fetch_add(seg.len() as u64, Ordering::Relaxed);
                    }
                    Err(PackError::TooBig) => drops.add(DropReason::TooBig, 1),
                    Err(PackError::Seal) => drops.add(DropReason::SealFailed, 1),
                }
            }
        };
        match segmenter.segment(hdr, frame, max_frame, &mut out) {
            Ok(_) => {}
            Err(OffloadError::DatagramTooBig(..)) if df => {
                // A USO super-packet whose datagrams exceed the MTU: frag-needed from
                // its headers, as the kernel would have sent.
                if unicast && is_ipv4(frame) && icmp::build_frag_needed(frame, mtu, icmp).is_ok() {
                    to_tap(icmp);
                    drops.add(DropReason::FragNeeded, 1);
                } else {
                    drops.add(DropReason::TooBig, 1);
                }
            }
            Err(_) => drops.add(DropReason::OffloadError, 1),
        }
        TxOutcome::Done
    }

    /// Closes every open datagram (sealing it).
    fn close_all(&mut self, drops: &Drops) {
        for (i, lanes) in self.lanes.iter_mut().enumerate() {
            let p = &self.table.peers[i];
            for (df, lane) in lanes.iter_mut().enumerate() {
                let ctx = LaneCtx {
                    local: self.local,
                    peer: p.name,
                    tx: &p.tx,
                    header: p.header_len(),
                    limit: p.datagram_limit(),
                    df: df == 1,
                };
                if lane.close(&ctx).is_err() {
                    drops.add(DropReason::SealFailed, 1);
                }
            }
        }
    }

    /// The sends of one socket (`df`), for every peer with datagrams.
    fn sends(&self, df: bool, gso: bool) -> Vec<SendMsg<'_>> {
        let mut msgs = Vec::new();
        for (i, lanes) in self.lanes.iter().enumerate() {
            let lane = &lanes[usize::from(df)];
            let Some(dst) = self.table.peers[i].addr else {
                continue;
            };
            lane.for_each_send(gso, |data, segment_size| {
                msgs.push(SendMsg {
                    dst,
                    data,
                    segment_size,
                })
            });
        }
        msgs
    }

    fn clear(&mut self) {
        for l in self.lanes.iter_mut().flatten() {
            if !l.is_empty() {
                l.clear();
            }
        }
        self.pending = 0;
    }
}

// ---------------------------------------------------------------------------------
// The threads.

/// State shared by the threads and the handle.
struct Shared {
    local: PeerName,
    tap: Tap,
    sockets: SleeveSockets,
    table: RwLock<Arc<Table>>,
    generation: AtomicU64,
    macs: RwLock<MacTable>,
    drops: Drops,
    io: IoStats,
    stop: AtomicBool,
    events: mpsc::UnboundedSender<DataplaneEvent>,
}

impl Shared {
    fn table(&self) -> Arc<Table> {
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// How long a thread waits for I/O before looking at the stop flag.
const POLL_TIMEOUT_MS: libc::c_int = 100;
/// Pending datagram bytes after which the TX thread sends without waiting for the TAP
/// to run dry.
const TX_FLUSH_BYTES: usize = 256 * 1024;
/// Receive buffers per `recvmmsg` (each holds a GRO run of up to 64 KB).
const RX_BATCH: usize = 32;
/// Socket buffer size asked for (the kernel caps it at `net.core.*mem_max`).
const SOCKET_BUFFER: usize = 4 << 20;
/// How often the RX thread refreshes a MAC it keeps seeing in the shared table.
const LEARN_REFRESH: Duration = Duration::from_secs(1);

/// Waits until `fd` is readable or the timeout passes.
fn poll_in(fd: libc::c_int, timeout_ms: libc::c_int) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    r > 0
}

/// Sends `msgs` on `sock`, going past failed messages (counted); a failed GSO run is
/// retried datagram by datagram.
fn send_all(sock: &BatchSocket, msgs: &[SendMsg<'_>], drops: &Drops, io: &IoStats) {
    let mut i = 0;
    while i < msgs.len() {
        bump(&io.send_calls, 1);
        match sock.send_batch(&msgs[i..]) {
            Ok(n) => {
                let sent: usize = msgs[i..i + n].iter().map(datagram_count).sum();
                bump(&io.datagrams_sent, sent as u64);
                i += n.max(1);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let m = msgs[i];
                match m.segment_size {
                    Some(size) if e.raw_os_error() != Some(libc::EMSGSIZE) => {
                        for d in m.data.chunks(usize::from(size).max(1)) {
                            let one = [SendMsg {
                                dst: m.dst,
                                data: d,
                                segment_size: None,
                            }];
                            bump(&io.send_calls, 1);
                            match sock.send_batch(&one) {
                                Ok(_) => bump(&io.datagrams_sent, 1),
                                Err(e) => count_send_error(&e, 1, drops),
                            }
                        }
                    }
                    Some(_) => count_send_error(&e, datagram_count(&m) as u64, drops),
                    None => count_send_error(&e, 1, drops),
                }
                i += 1;
            }
        }
    }
}

/// Datagrams in one send (a GSO run counts each).
fn datagram_count(m: &SendMsg<'_>) -> usize {
    match m.segment_size {
        Some(s) => m.data.len().div_ceil(usize::from(s).max(1)),
        None => 1,
    }
}

fn count_send_error(e: &io::Error, n: u64, drops: &Drops) {
    if e.raw_os_error() == Some(libc::EMSGSIZE) {
        drops.add(DropReason::SendTooBig, n);
    } else {
        tracing::debug!("sleeve send: {e}");
        drops.add(DropReason::SendError, n);
    }
}

fn tx_thread(shared: Arc<Shared>) {
    let mut tx = TxPath::new(shared.local);
    let mut generation = u64::MAX;
    let mut buf = vec![0u8; READ_BUF_LEN];
    let tap_fd = shared.tap.as_raw_fd();
    let mut last_expire = Instant::now();
    let flush = |tx: &mut TxPath| {
        if tx.pending == 0 {
            return;
        }
        tx.close_all(&shared.drops);
        for df in [false, true] {
            let msgs = tx.sends(df, true);
            send_all(shared.sockets.sender(df), &msgs, &shared.drops, &shared.io);
        }
        tx.clear();
    };
    while !shared.stop.load(Ordering::Relaxed) {
        if !poll_in(tap_fd, POLL_TIMEOUT_MS) {
            continue;
        }
        loop {
            let g = shared.generation.load(Ordering::Acquire);
            if g != generation {
                flush(&mut tx);
                generation = g;
                tx.set_table(shared.table());
            }
            let (hdr, n) = match shared.tap.read(&mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    shared.drops.add(DropReason::Runt, 1);
                    continue;
                }
                Err(e) => {
                    tracing::warn!("sleeve: reading the TAP device: {e}");
                    std::thread::sleep(Duration::from_millis(POLL_TIMEOUT_MS as u64));
                    break;
                }
            };
            bump(&shared.io.tap_reads, 1);
            let now = Instant::now();
            let frame = &buf[VIRTIO_NET_HDR_LEN..][..n];
            let outcome = {
                let macs = shared.macs.read().unwrap_or_else(PoisonError::into_inner);
                tx.process(&hdr, frame, now, &macs, &shared.drops, &mut |f| {
                    if shared.tap.write(&VirtioNetHdr::default(), f).is_err() {
                        shared.drops.add(DropReason::TapWriteError, 1);
                    }
                })
            };
            if let TxOutcome::FastdpHeartbeat(conn_uid, hears_us) = outcome {
                let _ = shared
                    .events
                    .send(DataplaneEvent::FastdpHeartbeat { conn_uid, hears_us });
            }
            if tx.pending >= TX_FLUSH_BYTES {
                flush(&mut tx);
            }
        }
        flush(&mut tx);
        let now = Instant::now();
        if now.duration_since(last_expire) > Duration::from_secs(30) {
            last_expire = now;
            shared
                .macs
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .expire(now);
        }
    }
    flush(&mut tx);
}

fn rx_thread(shared: Arc<Shared>) {
    let mut batch = RecvBatch::new(RX_BATCH, GRO_BUF_LEN);
    let mut coalescer = TcpCoalescer::new();
    let mut generation = u64::MAX;
    let mut table = Arc::new(Table::default());
    // What this thread last wrote into the shared MAC table, to take its write lock
    // only for news and once a second per busy MAC.
    let mut learnt: HashMap<Mac, (PeerName, Instant)> = HashMap::new();
    let local = shared.local;
    let sock = &shared.sockets.main;
    let drops = &shared.drops;
    let mut write = |h: &VirtioNetHdr, f: &[u8]| {
        bump(&shared.io.tap_writes, 1);
        if shared.tap.write(h, f).is_err() {
            drops.add(DropReason::TapWriteError, 1);
        }
    };
    while !shared.stop.load(Ordering::Relaxed) {
        if !poll_in(sock.as_raw_fd(), POLL_TIMEOUT_MS) {
            continue;
        }
        let n = match sock.recv_batch(&mut batch) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                tracing::warn!("sleeve: receiving: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        bump(&shared.io.recv_calls, 1);
        let g = shared.generation.load(Ordering::Acquire);
        if g != generation {
            generation = g;
            table = shared.table();
        }
        let now = Instant::now();
        for i in 0..n {
            let from = batch.meta()[i].src;
            for d in batch.datagrams_mut(i) {
                bump(&shared.io.datagrams_received, 1);
                let Ok(sender) = frame::datagram_sender(d) else {
                    drops.add(DropReason::Malformed, 1);
                    continue;
                };
                let Some(peer) = table.get(sender) else {
                    drops.add(DropReason::UnknownSender, 1);
                    continue;
                };
                let frames = {
                    let mut rx = peer.rx.lock().unwrap_or_else(PoisonError::into_inner);
                    rx.open(d)
                };
                let frames = match frames {
                    Ok(f) => f,
                    Err(e) if e.is_replay() => {
                        drops.add(DropReason::Replay, 1);
                        continue;
                    }
                    Err(SleeveError::Open(OpenError::Decrypt | OpenError::TooShort(_))) => {
                        drops.add(DropReason::DecryptFailed, 1);
                        continue;
                    }
                    Err(_) => {
                        drops.add(DropReason::Malformed, 1);
                        continue;
                    }
                };
                for f in frames {
                    let Ok(f) = f else {
                        drops.add(DropReason::Malformed, 1);
                        break;
                    };
                    if f.is_special() {
                        if f.src == sender && f.dst == local {
                            let _ = shared.events.send(DataplaneEvent::Special {
                                sender,
                                from,
                                frame: f.frame.to_vec(),
                            });
                        } else {
                            drops.add(DropReason::SpecialMisaddressed, 1);
                        }
                        continue;
                    }
                    if f.dst != local {
                        drops.add(DropReason::NotForUs, 1);
                        continue;
                    }
                    if f.frame.len() < ETH_HEADER_LEN {
                        drops.add(DropReason::Malformed, 1);
                        continue;
                    }
                    let mut src = [0u8; 6];
                    src.copy_from_slice(&f.frame[6..12]);
                    let fresh = learnt.get(&src).is_some_and(|(p, at)| {
                        *p == sender && now.saturating_duration_since(*at) < LEARN_REFRESH
                    });
                    if !fresh {
                        shared
                            .macs
                            .write()
                            .unwrap_or_else(PoisonError::into_inner)
                            .learn(src, sender, now);
                        if learnt.len() >= MAC_TABLE_MAX {
                            learnt.clear();
                        }
                        learnt.insert(src, (sender, now));
                    }
                    peer.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
                    peer.counters
                        .rx_bytes
                        .fetch_add(f.frame.len() as u64, Ordering::Relaxed);
                    coalescer.push(f.frame, &mut write);
                }
            }
        }
        coalescer.flush(&mut write);
    }
}

/// The running data path.
pub struct Dataplane {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    ifindex: u32,
    local_addr: SocketAddr,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("ifindex", &self.ifindex)
            .field("local_addr", &self.local_addr)
            .field("running", &!self.threads.is_empty())
            .finish_non_exhaustive()
    }
}

impl Dataplane {
    /// Starts the data path on `tap` and UDP `port` (all IPv4 addresses; 0 picks a
    /// free port, see [`Self::local_addr`]).
    pub fn start(
        tap: Tap,
        port: u16,
        local: PeerName,
        events: mpsc::UnboundedSender<DataplaneEvent>,
    ) -> io::Result<Self> {
        let ifindex = tap.ifindex().map_err(io::Error::other)?;
        Self::start_with_ifindex(tap, ifindex, port, local, events)
    }

    /// [`Self::start`] for a TAP device whose index is known (it may be in another
    /// network namespace than the calling thread).
    pub(crate) fn start_with_ifindex(
        tap: Tap,
        ifindex: u32,
        port: u16,
        local: PeerName,
        events: mpsc::UnboundedSender<DataplaneEvent>,
    ) -> io::Result<Self> {
        tap.set_nonblocking(true)?;
        let sockets = SleeveSockets::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
        for s in [&sockets.main, &sockets.df] {
            if let Err(e) = s.set_buffers(SOCKET_BUFFER) {
                tracing::debug!("sleeve socket buffers: {e}");
            }
        }
        let local_addr = sockets.main.local_addr()?;
        let shared = Arc::new(Shared {
            local,
            tap,
            sockets,
            table: RwLock::new(Arc::new(Table::default())),
            generation: AtomicU64::new(0),
            macs: RwLock::new(MacTable::default()),
            drops: Drops::default(),
            io: IoStats::default(),
            stop: AtomicBool::new(false),
            events,
        });
        let mut dp = Dataplane {
            shared: shared.clone(),
            threads: Vec::new(),
            ifindex,
            local_addr,
        };
        for (name, f) in [
            ("weft-sleeve-tx", tx_thread as fn(Arc<Shared>)),
            ("weft-sleeve-rx", rx_thread),
        ] {
            let s = shared.clone();
            let h = std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || f(s))?;
            dp.threads.push(h);
        }
        Ok(dp)
    }

    /// The TAP device's ifindex.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn tap_ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The UDP address the data path receives on.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Replaces the peer table. A peer keeps its crypto state (sealer counters, replay
    /// windows) while its name, ConnUID, key and direction are unchanged.
    pub fn set_peers(&self, peers: Vec<PeerSpec>) {
        let mut t = self
            .shared
            .table
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        *t = Arc::new(Table::build(peers, &t));
        self.shared.generation.fetch_add(1, Ordering::Release);
    }

    /// Sends one special frame to a peer, sealed as its data is (same sequence
    /// counters), with DF through the DF socket.
    pub fn send_special(
        &self,
        peer: PeerName,
        frame: &[u8],
        df: bool,
    ) -> Result<(), SpecialSendError> {
        let table = self.shared.table();
        let p = table.get(peer).ok_or(SpecialSendError::UnknownPeer)?;
        let addr = p.addr.ok_or(SpecialSendError::NoAddress)?;
        let mut b = DatagramBuilder::new(self.shared.local, p.tx.is_sealed());
        b.try_push(self.shared.local, peer, frame)
            .map_err(|e| SpecialSendError::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let data =
            p.tx.finish(&mut b, df)
                .map_err(|e| SpecialSendError::Io(io::Error::other(e)))?;
        let msg = [SendMsg {
            dst: addr,
            data,
            segment_size: None,
        }];
        match self.shared.sockets.sender(df).send_batch(&msg) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                Err(SpecialSendError::MessageTooBig {
                    path_mtu: udp::path_mtu(addr).ok().map(|m| m as usize),
                })
            }
            Err(e) => Err(SpecialSendError::Io(e)),
        }
    }

    /// Counters.
    pub fn stats(&self) -> DataplaneStats {
        let table = self.shared.table();
        DataplaneStats {
            peers: table
                .peers
                .iter()
                .map(|p| (p.name, p.counters.snapshot()))
                .collect(),
            drops: DropReason::ALL
                .iter()
                .map(|&r| (r.name(), self.shared.drops.get(r)))
                .collect(),
            io: self.shared.io.snapshot(),
        }
    }

    /// Stops the threads and waits for them (also done on drop).
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
    };

    use weft::sleeve::frame::SleeveFrame;

    use super::*;
    use crate::tap::testnet;

    const US: PeerName = PeerName([0xaa, 0, 0, 0, 0, 1]);
    const B: PeerName = PeerName([0xaa, 0, 0, 0, 0, 2]);
    const C: PeerName = PeerName([0xaa, 0, 0, 0, 0, 3]);
    const D: PeerName = PeerName([0xaa, 0, 0, 0, 0, 4]);
    const MAC_B: Mac = [2, 0, 0, 0, 0, 0xb];
    const MAC_C: Mac = [2, 0, 0, 0, 0, 0xc];
    const MAC_D: Mac = [2, 0, 0, 0, 0, 0xd];
    const MAC_POD: Mac = [2, 0, 0, 0, 0, 0x1];
    const BROADCAST: Mac = [0xff; 6];
    const KEY: SessionKey = SessionKey([9; 32]);

    fn spec(name: PeerName, carries: bool, key: Option<SessionKey>) -> PeerSpec {
        let established = carries;
        PeerSpec {
            name,
            conn_uid: 7,
            outbound: true,
            key,
            addr: Some(SocketAddr::from(([127, 0, 0, 1], 6783))),
            mtu: 1438,
            carries,
            established,
        }
    }

    /// An IPv4 UDP frame from the pod to `dst` with `ip_len` bytes of IP packet.
    fn ipv4_frame(dst: Mac, ip_len: usize, df: bool) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&MAC_POD);
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0u8; ip_len];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
        ip[6] = if df { 0x40 } else { 0 };
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[10, 32, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 32, 0, 2]);
        let c = icmp::internet_checksum(&ip[..20]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f
    }

    fn tx_with(specs: Vec<PeerSpec>, macs: &mut MacTable, now: Instant) -> TxPath {
        let mut tx = TxPath::new(US);
        tx.set_table(Arc::new(Table::build(specs, &Table::default())));
        macs.learn(MAC_B, B, now);
        macs.learn(MAC_C, C, now);
        macs.learn(MAC_D, D, now);
        tx
    }

    /// The frames of every datagram in a lane, opened as the peer would.
    fn lane_frames(lane: &Lane, key: Option<&SessionKey>) -> Vec<Vec<(PeerName, Vec<u8>)>> {
        let mut rx = SleeveRx::new(key, false);
        lane.dgrams
            .iter()
            .map(|&(s, l)| {
                let mut d = lane.buf[s..s + l].to_vec();
                assert_eq!(frame::datagram_sender(&d).unwrap(), US);
                rx.open(&mut d)
                    .unwrap()
                    .map(|f| {
                        let f: SleeveFrame<'_> = f.unwrap();
                        assert_eq!(f.src, US);
                        (f.dst, f.frame.to_vec())
                    })
                    .collect()
            })
            .collect()
    }

    fn process(
        tx: &mut TxPath,
        frame: &[u8],
        macs: &MacTable,
        drops: &Drops,
        now: Instant,
    ) -> (TxOutcome, Vec<Vec<u8>>) {
        let mut icmps = Vec::new();
        let out = tx.process(
            &VirtioNetHdr::default(),
            frame,
            now,
            macs,
            drops,
            &mut |f| icmps.push(f.to_vec()),
        );
        tx.close_all(drops);
        (out, icmps)
    }

    #[test]
    fn routing_carried_flood_and_aging() {
        let now = Instant::now();
        let mut macs = MacTable::default();
        let t = Table::build(
            vec![spec(B, true, None), spec(C, false, None)],
            &Table::default(),
        );
        macs.learn(MAC_B, B, now);
        macs.learn(MAC_C, C, now);
        macs.learn(BROADCAST, C, now);
        assert_eq!(route(&t, &macs, &MAC_B, now), Route::Unicast(0));
        assert_eq!(
            route(&t, &macs, &MAC_C, now),
            Route::Drop(DropReason::PeerNotCarried)
        );
        // Not carried (the fast datapath carries its traffic) but its sleeve works:
        // unicast still goes (a stale bridge entry must not black-hole it).
        let t2 = Table::build(
            vec![
                spec(B, true, None),
                PeerSpec {
                    established: true,
                    ..spec(C, false, None)
                },
            ],
            &Table::default(),
        );
        assert_eq!(route(&t2, &macs, &MAC_C, now), Route::Unicast(1));
        assert_eq!(route(&t, &macs, &MAC_D, now), Route::Flood);
        assert_eq!(
            route(&t, &macs, &BROADCAST, now),
            Route::Flood,
            "never learnt"
        );
        assert_eq!(
            route(&t, &macs, &[0x33, 0x33, 0, 0, 0, 1], now),
            Route::Flood
        );
        // Aged out: unknown again (flooded); expire forgets it.
        let later = now + MAC_AGING + Duration::from_secs(1);
        assert_eq!(route(&t, &macs, &MAC_B, later), Route::Flood);
        assert_eq!(
            route(&t, &macs, &MAC_C, later),
            Route::Flood,
            "no longer pinned"
        );
        macs.learn(MAC_D, B, later);
        macs.expire(later);
        assert_eq!(macs.map.len(), 1);
        // Re-learning moves a MAC.
        macs.learn(MAC_D, C, later);
        assert_eq!(macs.lookup(&MAC_D, later), Some(C));
        // Nothing carried: floods and unknown unicast go nowhere.
        let none = Table::build(vec![spec(B, false, None)], &Table::default());
        assert_eq!(
            route(&none, &macs, &BROADCAST, now),
            Route::Drop(DropReason::NoRoute)
        );
        assert_eq!(
            route(&none, &macs, &[2, 9, 9, 9, 9, 9], now),
            Route::Drop(DropReason::NoRoute)
        );
        // A learnt MAC of a peer no longer in the table is unknown.
        assert_eq!(
            route(&none, &macs, &MAC_D, later),
            Route::Drop(DropReason::NoRoute)
        );
    }

    #[test]
    fn tx_unicast_flood_and_not_carried() {
        let now = Instant::now();
        let drops = Drops::default();
        let mut macs = MacTable::default();
        for key in [None, Some(KEY)] {
            let mut no_addr = spec(D, true, key.clone());
            no_addr.addr = None;
            let mut tx = tx_with(
                vec![
                    spec(B, true, key.clone()),
                    spec(C, true, key.clone()),
                    no_addr,
                ],
                &mut macs,
                now,
            );
            let uni = ipv4_frame(MAC_B, 100, true);
            assert_eq!(
                process(&mut tx, &uni, &macs, &drops, now).0,
                TxOutcome::Done
            );
            let got = lane_frames(&tx.lanes[0][1], key.as_ref());
            assert_eq!(got, vec![vec![(B, uni.clone())]], "one DF datagram to B");
            assert!(tx.lanes[1].iter().all(|l| l.dgrams.is_empty()));
            tx.clear();

            // A broadcast (not DF): a copy to each carried peer with an address.
            let mut arp = vec![0xff; 6];
            arp.extend_from_slice(&MAC_POD);
            arp.extend_from_slice(&[0x08, 0x06]);
            arp.extend_from_slice(&[1; 28]);
            let before = drops.get(DropReason::NoAddress);
            process(&mut tx, &arp, &macs, &drops, now);
            for (i, p) in [B, C].into_iter().enumerate() {
                let got = lane_frames(&tx.lanes[i][0], key.as_ref());
                assert_eq!(got, vec![vec![(p, arp.clone())]]);
            }
            assert!(tx.lanes[2][0].dgrams.is_empty());
            assert_eq!(drops.get(DropReason::NoAddress), before + 1);
            let c = tx.table.peers[0].counters.snapshot();
            assert_eq!(
                (c.tx_packets, c.tx_bytes),
                (2, (uni.len() + arp.len()) as u64)
            );
            tx.clear();
        }

        // Not carried: dropped; a zero-header frame is a heartbeat or dropped.
        let mut tx = tx_with(
            vec![spec(B, true, None), spec(C, false, None)],
            &mut macs,
            now,
        );
        let before = drops.get(DropReason::PeerNotCarried);
        process(&mut tx, &ipv4_frame(MAC_C, 100, true), &macs, &drops, now);
        assert_eq!(drops.get(DropReason::PeerNotCarried), before + 1);
        assert!(tx.lanes.iter().flatten().all(Lane::is_empty));
        let hb = weft::fastdp::heartbeat(0x1234, 1376, true);
        assert_eq!(
            process(&mut tx, &hb, &macs, &drops, now).0,
            TxOutcome::FastdpHeartbeat(0x1234, true)
        );
        process(&mut tx, &[0; 30], &macs, &drops, now);
        assert_eq!(drops.get(DropReason::BadSpecial), 1);
        process(&mut tx, &[1; 10], &macs, &drops, now);
        assert_eq!(drops.get(DropReason::Runt), 1);
        assert!(tx.lanes.iter().flatten().all(Lane::is_empty));
    }

    #[test]
    fn df_too_big_gets_frag_needed_and_non_df_goes_whole() {
        let now = Instant::now();
        let drops = Drops::default();
        let mut macs = MacTable::default();
        let mut tx = tx_with(vec![spec(B, true, None)], &mut macs, now);
        // Fits exactly: 1438-byte IP packet.
        let (_, icmps) = process(&mut tx, &ipv4_frame(MAC_B, 1438, true), &macs, &drops, now);
        assert!(icmps.is_empty());
        assert_eq!(
            tx.lanes[0][1].dgrams,
            vec![(0, 1472)],
            "a full 1472-byte datagram"
        );
        tx.clear();
        // One byte more with DF: ICMP frag-needed back to the pod, nothing sent.
        let big = ipv4_frame(MAC_B, 1439, true);
        let (_, icmps) = process(&mut tx, &big, &macs, &drops, now);
        assert_eq!(icmps.len(), 1);
        let i = &icmps[0];
        assert_eq!(&i[..6], &MAC_POD, "to the sending pod");
        assert_eq!((i[14 + 20], i[14 + 21]), (3, 4), "type 3 code 4");
        assert_eq!(u16::from_be_bytes([i[40], i[41]]), 1438, "next-hop MTU");
        assert_eq!(drops.get(DropReason::FragNeeded), 1);
        assert!(tx.lanes[0].iter().all(Lane::is_empty));
        // Broadcast DF too big: dropped, no ICMP.
        let (_, icmps) = process(
            &mut tx,
            &ipv4_frame(BROADCAST, 1439, true),
            &macs,
            &drops,
            now,
        );
        assert!(icmps.is_empty());
        assert_eq!(drops.get(DropReason::TooBig), 1);
        // Without DF: one non-DF datagram of its own, larger than the MTU budget.
        let small = ipv4_frame(MAC_B, 100, false);
        process(&mut tx, &small, &macs, &drops, now);
        let big = ipv4_frame(MAC_B, 4000, false);
        process(&mut tx, &big, &macs, &drops, now);
        let got = lane_frames(&tx.lanes[0][0], None);
        assert_eq!(got, vec![vec![(B, small)], vec![(B, big)]]);
        assert_eq!(tx.lanes[0][0].dgrams[1].1, 6 + 14 + 4014);
        let mut sends = Vec::new();
        tx.lanes[0][0].for_each_send(true, |d, s| sends.push((d.len(), s)));
        assert_eq!(sends, vec![(6 + 14 + 114, None), (6 + 14 + 4014, None)]);
    }

    /// A 64 KB TCP super-packet: segmented to the MTU, one frame per datagram, and
    /// handed to the kernel as one UDP GSO run; small frames share datagrams.
    #[test]
    fn super_packet_packs_into_one_gso_run() {
        let now = Instant::now();
        let drops = Drops::default();
        let mut macs = MacTable::default();
        for key in [None, Some(KEY)] {
            let mut s = spec(B, true, key.clone());
            s.mtu = if key.is_some() { 1414 } else { 1438 };
            let mut tx = tx_with(vec![s], &mut macs, now);
            let payload_len = 63000;
            let mut f = ipv4_frame(MAC_B, 40 + payload_len, true);
            f[14 + 9] = 6; // TCP
            f[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
            let c = icmp::internet_checksum(&f[14..34]);
            f[24..26].copy_from_slice(&c.to_be_bytes());
            f[34 + 12] = 5 << 4;
            f[34 + 13] = 0x18; // ACK|PSH
            for (i, b) in f[54..].iter_mut().enumerate() {
                *b = i as u8;
            }
            let hdr = VirtioNetHdr {
                flags: 0,
                gso_type: VirtioNetHdr::GSO_TCPV4,
                hdr_len: 54,
                gso_size: 1398,
                csum_start: 34,
                csum_offset: 16,
            };
            let mut icmps = 0;
            tx.process(&hdr, &f, now, &macs, &drops, &mut |_| icmps += 1);
            tx.close_all(&drops);
            assert_eq!(icmps, 0);
            let lane = &tx.lanes[0][1];
            let mss = usize::from(s_mtu(&tx)) - 40;
            assert_eq!(lane.dgrams.len(), payload_len.div_ceil(mss));
            assert!(lane.dgrams.iter().all(|d| d.1 <= 1472));
            assert_eq!(lane.dgrams[0].1, 1472, "full datagrams");
            let mut sends = Vec::new();
            lane.for_each_send(true, |d, s| sends.push((d.len(), s)));
            // 46 datagrams of 1472 bytes exceed one GSO message (65507 bytes): two
            // messages, one sendmmsg.
            assert_eq!(sends.len(), 2, "{sends:?}");
            assert_eq!(sends[0], (44 * 1472, Some(1472)));
            assert_eq!(sends[0].0 + sends[1].0, lane.buf.len());
            // The payload survives, in order.
            let got: Vec<u8> = lane_frames(lane, key.as_ref())
                .into_iter()
                .flatten()
                .flat_map(|(_, fr)| fr[54..].to_vec())
                .collect();
            assert_eq!(got, f[54..]);
            tx.clear();

            // Small frames: several per datagram, at most 100.
            for _ in 0..250 {
                let f = ipv4_frame(MAC_B, 20, true);
                tx.process(
                    &VirtioNetHdr::default(),
                    &f,
                    now,
                    &macs,
                    &drops,
                    &mut |_| {},
                );
            }
            tx.close_all(&drops);
            let counts: Vec<usize> = lane_frames(&tx.lanes[0][1], key.as_ref())
                .iter()
                .map(Vec::len)
                .collect();
            assert_eq!(counts.iter().sum::<usize>(), 250);
            assert!(
                counts.len() < 10 && counts.iter().all(|&c| c <= 100),
                "{counts:?}"
            );
        }

        fn s_mtu(tx: &TxPath) -> u16 {
            tx.table.peers[0].mtu
        }
    }

    #[test]
    fn gso_runs_respect_kernel_limits() {
        let ctx_tx = SleeveTx::Plain;
        let ctx = LaneCtx {
            local: US,
            peer: B,
            tx: &ctx_tx,
            header: PLAIN_HEADER_LEN,
            limit: 1000,
            df: true,
        };
        let mut lane = Lane::default();
        // 100 equal datagrams of 1000 bytes, then a shorter one, then a larger one.
        for _ in 0..100 {
            lane.push(&ctx, &[7; 1000 - 20]).unwrap();
        }
        lane.push(&ctx, &[7; 500]).unwrap();
        lane.push(&ctx, &[7; 10]).unwrap();
        lane.close(&ctx).unwrap();
        let mut sends = Vec::new();
        lane.for_each_send(true, |d, s| sends.push((d.len(), s)));
        // 65 x 1000 = 65000 (< 65507, 64 segments max) -> 64; then 36 + the shorter.
        assert_eq!(
            sends,
            vec![(64_000, Some(1000)), (36 * 1000 + 520 + 20 + 4, Some(1000))]
                .into_iter()
                .map(|(l, s)| (l - if l > 64_000 { 24 } else { 0 }, s))
                .collect::<Vec<_>>()
        );
        let total: usize = sends.iter().map(|s| s.0).sum();
        assert_eq!(total, lane.buf.len());
        let mut singles = 0;
        lane.for_each_send(false, |_, s| {
            assert!(s.is_none());
            singles += 1;
        });
        assert_eq!(singles, lane.dgrams.len());
        assert_eq!(lane.push(&ctx, &[0; 1000]), Err(PackError::TooBig));
    }

    #[test]
    fn table_swap_keeps_crypto_state_per_connection() {
        let t1 = Table::build(
            vec![spec(B, true, Some(KEY)), spec(C, true, None)],
            &Table::default(),
        );
        let b1 = t1.get(B).unwrap();
        b1.counters.tx_packets.store(5, Ordering::Relaxed);
        let mut changed = spec(B, false, Some(KEY));
        changed.mtu = 1200;
        changed.addr = None;
        let t2 = Table::build(vec![changed, spec(C, true, None)], &t1);
        let b2 = t2.get(B).unwrap();
        assert!(Arc::ptr_eq(&b1.tx, &b2.tx) && Arc::ptr_eq(&b1.rx, &b2.rx));
        assert_eq!((b2.mtu, b2.carries, b2.addr), (1200, false, None));
        let mut reconnected = spec(B, true, Some(KEY));
        reconnected.conn_uid = 8;
        let t3 = Table::build(vec![reconnected], &t2);
        let b3 = t3.get(B).unwrap();
        assert!(!Arc::ptr_eq(&b2.tx, &b3.tx) && !Arc::ptr_eq(&b2.rx, &b3.rx));
        assert_eq!(b3.counters.snapshot().tx_packets, 5, "counters by name");
        assert!(t3.get(C).is_none());
        let rekeyed = Table::build(vec![spec(B, true, Some(SessionKey([1; 32])))], &t3);
        assert!(!Arc::ptr_eq(&b3.tx, &rekeyed.get(B).unwrap().tx));
        let dbg = format!("{:?}", rekeyed);
        assert!(!dbg.contains("1, 1, 1"), "{dbg}");
    }

    #[test]
    fn drop_reason_names_are_unique_snake_case() {
        let names: std::collections::BTreeSet<_> =
            DropReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), DropReason::ALL.len());
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert!(r.name().chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        }
    }

    // -----------------------------------------------------------------------------
    // Two data paths in a network namespace.

    fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Streams for `secs` and returns (bytes, MB/s).
    fn stream(client: &mut TcpStream, secs: f64) -> (u64, f64) {
        let chunk: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            client.write_all(&chunk).unwrap();
            sent += chunk.len() as u64;
        }
        (sent, sent as f64 / start.elapsed().as_secs_f64() / 1e6)
    }

    /// Reads everything, checking the pattern `stream` writes.
    fn sink(mut s: TcpStream) -> u64 {
        const PERIOD: usize = 256 * 1024;
        let pattern: Vec<u8> = (0..2 * PERIOD as u32)
            .map(|i| (i % PERIOD as u32 % 251) as u8)
            .collect();
        let mut buf = vec![0u8; PERIOD];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                return total;
            }
            let off = (total % PERIOD as u64) as usize;
            assert!(buf[..n] == pattern[off..off + n], "bytes at {total}");
            total += n as u64;
        }
    }

    /// A pod on TAP A (this namespace) and one on TAP B (its own namespace) talk over
    /// two data paths on loopback: ARP, a special frame, and a TCP stream whose bytes
    /// are checked, plain and sealed. Prints the throughput next to plain loopback TCP.
    #[test]
    fn two_dataplanes_in_a_netns() {
        testnet::in_netns("two_dataplanes_in_a_netns", || {
            testnet::set_up("lo", 0);
            testnet::set_mtu("lo", 1500);
            // The underlay's raw speed, for comparison.
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let server = std::thread::spawn(move || sink(l.accept().unwrap().0));
            let mut c = TcpStream::connect(addr).unwrap();
            let (sent, raw) = stream(&mut c, 1.0);
            drop(c);
            assert_eq!(server.join().unwrap(), sent);
            println!("loopback TCP (MTU 1500): {raw:.0} MB/s");
            for sealed in [false, true] {
                crossing(sealed, raw);
            }
        });
    }

    /// A device's transmit drops in this thread's namespace (a TAP whose reader falls
    /// behind drops here).
    fn tx_dropped(dev: &str) -> u64 {
        let s = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
        s.lines()
            .find_map(|l| {
                let (name, rest) = l.split_once(':')?;
                (name.trim() == dev).then(|| {
                    rest.split_whitespace()
                        .nth(11)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                })
            })
            .unwrap_or(0)
    }

    fn crossing(sealed: bool, raw: f64) {
        let mtu: u16 = if sealed { 1414 } else { 1438 };
        let key = sealed.then_some(KEY);
        let (name_a, name_b) = if sealed {
            ("weft-sa", "weft-sb")
        } else {
            ("weft-pa", "weft-pb")
        };
        let port = if sealed { 5001 } else { 5000 };
        // Pod B: its own namespace, its TAP handed back to this thread.
        let (tap_tx, tap_rx) = std::sync::mpsc::channel();
        let pod_b = std::thread::spawn(move || {
            // SAFETY: unshare affects only this thread's namespaces.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let tap = Tap::create(name_b, Some(u32::from(mtu))).unwrap();
            testnet::set_ipv4(name_b, Ipv4Addr::new(10, 99, 0, 2), 24);
            testnet::set_up(name_b, 0);
            let l = TcpListener::bind(("10.99.0.2", port)).unwrap();
            let ifindex = tap.ifindex().unwrap();
            tap_tx.send((tap, ifindex)).unwrap();
            sink(l.accept().unwrap().0)
        });
        let (tap_b, ifindex_b) = tap_rx.recv().unwrap();
        let tap_a = Tap::create(name_a, Some(u32::from(mtu))).unwrap();
        testnet::set_ipv4(name_a, Ipv4Addr::new(10, 99, 0, 1), 24);
        testnet::set_up(name_a, 0);

        let (ev_a, mut events_a) = mpsc::unbounded_channel();
        let (ev_b, mut events_b) = mpsc::unbounded_channel();
        let mut dp_a = Dataplane::start(tap_a, 0, US, ev_a).unwrap();
        // The TAP is in another namespace: its index is given.
        let mut dp_b = Dataplane::start_with_ifindex(tap_b, ifindex_b, 0, B, ev_b).unwrap();
        assert!(dp_a.tap_ifindex() > 0);
        let loopback = |dp: &Dataplane| SocketAddr::from(([127, 0, 0, 1], dp.local_addr().port()));
        let peer = |name, outbound, addr| PeerSpec {
            name,
            conn_uid: 42,
            outbound,
            key: key.clone(),
            addr: Some(addr),
            mtu,
            carries: true,
            established: true,
        };
        dp_a.set_peers(vec![peer(B, true, loopback(&dp_b))]);
        dp_b.set_peers(vec![peer(US, false, loopback(&dp_a))]);

        // A special frame: sealed as data, handed to the node with its source.
        let hb = frame::heartbeat(42);
        dp_a.send_special(B, &hb, true).unwrap();
        match wait_for("the special frame", || events_b.try_recv().ok()) {
            DataplaneEvent::Special {
                sender,
                from,
                frame,
            } => {
                assert_eq!((sender, from, &frame[..]), (US, loopback(&dp_a), &hb[..]));
            }
            e => panic!("unexpected {e:?}"),
        }
        // Too big for the path with DF: the kernel's path MTU comes back.
        match dp_a.send_special(B, &[0; frame::PMTU_DISCOVERY_LEN], true) {
            Err(SpecialSendError::MessageTooBig { path_mtu }) => assert_eq!(path_mtu, Some(1500)),
            r => panic!("expected EMSGSIZE, got {r:?}"),
        }
        assert!(matches!(
            dp_a.send_special(C, &hb, true),
            Err(SpecialSendError::UnknownPeer)
        ));

        // Pod A -> pod B: ARP floods across, then the stream.
        let mut client = TcpStream::connect_timeout(
            &SocketAddr::from(([10, 99, 0, 2], port)),
            Duration::from_secs(5),
        )
        .expect("TCP over the sleeve");
        client.set_nodelay(false).unwrap();
        let (sent, mbps) = stream(&mut client, 1.0);
        drop(client);
        assert_eq!(pod_b.join().unwrap(), sent, "every byte, in order");
        let (sa, sb) = (dp_a.stats(), dp_b.stats());
        let mode = if sealed { "sealed" } else { "plain" };
        println!(
            "sleeve {mode} (MTU {mtu}): {mbps:.0} MB/s = {:.2}x loopback TCP",
            mbps / raw
        );
        println!("  A: {:?}", sa.peers[&B]);
        println!("  A io: {:?}", sa.io);
        println!("  B: {:?}", sb.peers[&US]);
        println!("  B io: {:?}", sb.io);
        let nonzero = |s: &DataplaneStats| {
            s.drops
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
        };
        println!(
            "  drops A {:?} B {:?}; TAP A tx_dropped {}",
            nonzero(&sa),
            nonzero(&sb),
            tx_dropped(name_a)
        );
        assert!(sa.peers[&B].tx_bytes > sent && sb.peers[&US].rx_bytes > sent);
        for s in [&sa, &sb] {
            for r in ["decrypt_failed", "replay", "unknown_sender", "malformed"] {
                assert_eq!(s.drops[r], 0, "{r}");
            }
        }
        // How much is coalesced and batched depends on how busy the machine is (the
        // printout above shows it); that it happens at all is what must hold.
        assert!(
            sb.io.tap_writes < sb.peers[&US].rx_packets,
            "received segments are coalesced into super-packets"
        );
        assert!(
            sa.io.datagrams_sent > sa.io.send_calls,
            "datagrams are batched"
        );
        dp_a.stop();
        dp_b.stop();
        assert!(events_a.try_recv().is_err());
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// Prints how fast one core seals and opens full-sized datagrams (no assertion).
    #[test]
    fn seal_and_open_speed() {
        let key = SessionKey([5; 32]);
        let tx = SleeveTx::new(Some(&key), true);
        let mut rx = SleeveRx::new(Some(&key), false);
        let mut b = DatagramBuilder::new(PeerName([1; 6]), true);
        b.set_limit(1472);
        b.try_push(PeerName([1; 6]), PeerName([2; 6]), &[0x5a; 1428])
            .unwrap();
        let plain = b.datagram_mut().to_vec();
        let mut d = plain.clone();
        let (mut sealed, mut opened) = (0usize, 0usize);
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(200) {
            d.copy_from_slice(&plain);
            if let SleeveTx::Sealed(s) = &tx {
                s.seal_datagram(&mut d, true).unwrap();
            }
            sealed += d.len();
            assert!(rx.open(&mut d).is_ok());
            opened += d.len();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "seal+open of 1472-byte datagrams: {:.0} MB/s ({} MB sealed and opened)",
            sealed as f64 / secs / 1e6,
            opened / 1_000_000
        );
    }
}
