//! Weave's mesh protocol (TCP 6783): the connection handshake, the framing (plain or
//! NaCl secretbox), the messages, topology gossip and the mesh's own state.
//!
//! Wire facts are restated from Weave Net 2.8.1 and checked against captures of real
//! routers (`agent/testdata/weave/`).

pub mod connection;
pub mod crypto;
pub mod gob;
pub mod gossip;
pub mod name;
pub mod router;
pub mod topology;
pub mod wire;

pub use name::{PeerName, PeerNameError};

/// A peer's 12-bit ShortID (0..=4095), the part of the VXLAN VNI that names it.
pub type ShortId = u16;

/// Largest ShortID.
pub const MAX_SHORT_ID: ShortId = 0x0fff;

/// The 32-byte session key both ends of a password-protected connection derive
/// (SHA-256 of the NaCl box shared key and the password). It keys the TCP framing,
/// the sleeve datagrams and (later) the IPsec SAs. Never printed: `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey(pub [u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

/// One peer as topology gossip describes it (Weave's `peerSummary`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSummary {
    /// The peer's name.
    pub name: PeerName,
    /// Its nickname (usually the host name); may be empty.
    pub nickname: String,
    /// Its incarnation: random, non-zero, fixed for the life of its process.
    pub uid: u64,
    /// Raised by the peer on every change it gossips about itself.
    pub version: u64,
    /// Its ShortID, if it has one (placeholders do not).
    pub short_id: Option<ShortId>,
}

/// One connection of a peer as topology gossip describes it (Weave's
/// `connectionSummary`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSummary {
    /// The peer at the other end.
    pub name: PeerName,
    /// `"ip:port"`: the address dialled (outbound) or the remote source (inbound).
    pub remote_tcp_addr: String,
    /// Whether the describing peer dialled.
    pub outbound: bool,
    /// Whether the describing peer's overlay to that peer is established.
    pub established: bool,
}

/// One peer's entry in a topology update: its summary and its connection list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUpdate {
    /// The peer.
    pub summary: PeerSummary,
    /// Its connections, as it reports them.
    pub connections: Vec<ConnectionSummary>,
}
