//! The sleeve's data path: pod frames between the bridge (through the sleeve's TAP
//! device) and peers (UDP 6783, Weave's sleeve datagrams).
//!
//! STUB: the interface the node drives; the threads come next.

use std::{collections::BTreeMap, io, net::SocketAddr};

use tokio::sync::mpsc;
use weft::mesh::{PeerName, SessionKey};

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
    /// Whether the sleeve carries this peer's pod traffic now (floods and unicast
    /// frames read from the TAP device go to it).
    pub carries: bool,
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
pub struct DataplaneStats {
    /// Per peer.
    pub peers: BTreeMap<PeerName, PeerCounters>,
    /// Dropped frames and datagrams, by reason.
    pub drops: BTreeMap<&'static str, u64>,
}

/// The running data path.
#[derive(Debug)]
pub struct Dataplane {
    ifindex: u32,
}

impl Dataplane {
    /// Starts the data path on `tap` and UDP `port`.
    pub fn start(
        tap: crate::tap::Tap,
        _port: u16,
        _local: PeerName,
        _events: mpsc::UnboundedSender<DataplaneEvent>,
    ) -> io::Result<Self> {
        Ok(Self {
            ifindex: tap.ifindex().map_err(io::Error::other)?,
        })
    }

    /// The TAP device's ifindex.
    pub fn tap_ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Replaces the peer table.
    pub fn set_peers(&self, _peers: Vec<PeerSpec>) {}

    /// Sends one special frame to a peer, sealed as its data is.
    pub fn send_special(
        &self,
        _peer: PeerName,
        _frame: &[u8],
        _df: bool,
    ) -> Result<(), SpecialSendError> {
        Err(SpecialSendError::UnknownPeer)
    }

    /// Counters.
    pub fn stats(&self) -> DataplaneStats {
        DataplaneStats::default()
    }
}
