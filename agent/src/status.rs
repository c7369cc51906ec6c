//! The agent's status snapshot (`weft status --json`) and its Weave-style text forms
//! (`weft status`, `weft status connections`, `weft status peers`).
//!
//! The text follows Weave Net's `weave status` templates (column widths included), so
//! scripts and eyes used to Weave read it the same way.

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
};

use serde::{Deserialize, Serialize};

use crate::peers::PeerName;

/// Weave protocol versions weft speaks (shown as `Protocol: weave 1..2`).
pub const PROTOCOL: &str = "weave 1..2";

/// Width of the right-aligned labels of the summary (Weave's template).
const LABEL_WIDTH: usize = 15;
/// Width of the address column of connection lines (Weave's `%-21v`).
const ADDRESS_WIDTH: usize = 21;
/// Width of the state column of connection lines (Weave's `%-11v`).
const STATE_WIDTH: usize = 11;
/// Width of the `name(nickname)` column of `status peers` (Weave's `%-37v`).
const PEER_WIDTH: usize = 37;

/// Everything `weft status` shows: the local peer, its connections, the datapath counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The agent's version.
    pub version: String,
    /// The local peer's name.
    pub name: PeerName,
    /// The local peer's nickname.
    pub nickname: String,
    /// The local peer's ShortID.
    pub short_id: u16,
    /// The local underlay address.
    pub address: Ipv4Addr,
    /// The control port (VXLAN is on `port + 1`).
    pub port: u16,
    /// The overlay MTU.
    pub mtu: u16,
    /// Whether traffic between peers is encrypted.
    pub encryption: bool,
    /// One entry per remote peer.
    pub connections: Vec<Connection>,
    /// Datapath counters by name (see `weft_common::maps::Counter::name`).
    pub counters: BTreeMap<String, u64>,
}

impl Status {
    /// The status of a peer that has no connections yet.
    pub fn default_for(name: PeerName, nickname: &str) -> Self {
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            name,
            nickname: nickname.to_owned(),
            short_id: 0,
            address: Ipv4Addr::UNSPECIFIED,
            port: 0,
            mtu: 0,
            encryption: false,
            connections: Vec::new(),
            counters: BTreeMap::new(),
        }
    }
}

/// The local peer's link to one remote peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// Which side dialled.
    pub direction: Direction,
    /// The remote end: underlay address and control port.
    pub address: SocketAddrV4,
    /// Whether the fast path from that peer is proven.
    pub state: ConnectionState,
    /// The overlay carrying the traffic.
    pub overlay: Overlay,
    /// The remote peer's name.
    pub name: PeerName,
    /// The remote peer's nickname.
    pub nickname: String,
    /// The remote peer's ShortID.
    pub short_id: u16,
    /// The MTU used towards that peer.
    pub mtu: u16,
    /// Frames sent to the peer.
    pub tx_packets: u64,
    /// Inner bytes sent to the peer.
    pub tx_bytes: u64,
    /// Frames received from the peer.
    pub rx_packets: u64,
    /// Inner bytes received from the peer.
    pub rx_bytes: u64,
}

/// Which side of a connection dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// This peer dialled (shown `->`).
    Outbound,
    /// The remote peer dialled (shown `<-`).
    Inbound,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Outbound => "->",
            Direction::Inbound => "<-",
        })
    }
}

/// Whether a connection carries traffic yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    /// At least one frame from the peer has been decapsulated: its fast path reaches us.
    Established,
    /// Nothing received from the peer yet.
    Pending,
}

impl ConnectionState {
    /// The lowercase name, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Established => "established",
            ConnectionState::Pending => "pending",
        }
    }
}

impl fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` so that width flags (`{:<11}`) apply.
        f.pad(self.as_str())
    }
}

/// The overlay carrying a connection's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlay {
    /// In-kernel VXLAN (the eBPF datapath).
    Fastdp,
}

impl fmt::Display for Overlay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Overlay::Fastdp => "fastdp",
        })
    }
}

/// `name(nickname)`, as Weave prints peers.
fn peer_label(name: &PeerName, nickname: &str) -> String {
    format!("{name}({nickname})")
}

/// Weave's count list: `2 established, 1 pending`, zero counts left out.
fn state_counts(connections: &[Connection]) -> String {
    let count = |state| connections.iter().filter(|c| c.state == state).count();
    [ConnectionState::Established, ConnectionState::Pending]
        .into_iter()
        .map(|s| (count(s), s))
        .filter(|(n, _)| *n > 0)
        .map(|(n, s)| format!("{n} {s}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `weft status` summary, laid out like `weave status`:
///
/// ```text
///         Version: 0.1.0
///        Protocol: weave 1..2
///            Name: aa:00:00:00:00:01(host1)
///      Encryption: disabled
///     Connections: 2 (1 established, 1 pending)
///           Peers: 3 (with 1 established, 1 pending connections)
/// ```
///
/// Peers counts this host and every connected peer.
pub fn render_summary(status: &Status) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: &dyn fmt::Display| {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{label:>LABEL_WIDTH$}: {value}");
    };
    line("Version", &status.version);
    line("Protocol", &PROTOCOL);
    line("Name", &peer_label(&status.name, &status.nickname));
    line(
        "Encryption",
        &if status.encryption {
            "enabled"
        } else {
            "disabled"
        },
    );
    let counts = state_counts(&status.connections);
    let n = status.connections.len();
    if counts.is_empty() {
        line("Connections", &n);
        line("Peers", &(n + 1));
    } else {
        line("Connections", &format!("{n} ({counts})"));
        line("Peers", &format!("{} (with {counts} connections)", n + 1));
    }
    out
}

/// `weft status connections`: one line per connection, like `weave status connections`:
///
/// ```text
/// -> 192.168.48.12:6783    established fastdp aa:00:00:00:00:02(host2) mtu=1376
/// ```
///
/// With [`Status::encryption`] on, every connection is encrypted (weft has no trusted
/// subnets), so `encrypted` follows the state and `encrypted=true` joins the attributes
/// (attributes are in name order), as Weave shows it.
pub fn render_connections(status: &Status) -> String {
    let mut out = String::new();
    for c in &status.connections {
        let _ = write!(
            out,
            "{} {:<ADDRESS_WIDTH$} {:<STATE_WIDTH$} ",
            c.direction,
            c.address.to_string(),
            c.state
        );
        if status.encryption {
            let _ = write!(out, "{:<11} ", "encrypted");
        }
        let _ = write!(out, "{:<6} {}", c.overlay, peer_label(&c.name, &c.nickname));
        if status.encryption {
            out.push_str(" encrypted=true");
        }
        let _ = writeln!(out, " mtu={}", c.mtu);
    }
    out
}

/// `weft status peers`, like `weave status peers`: this peer, then one indented line
/// per connection:
///
/// ```text
/// aa:00:00:00:00:01(host1)
///    -> 192.168.48.12:6783    aa:00:00:00:00:02(host2)              established
/// ```
pub fn render_peers(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", peer_label(&status.name, &status.nickname));
    for c in &status.connections {
        let _ = writeln!(
            out,
            "   {} {:<ADDRESS_WIDTH$} {:<PEER_WIDTH$} {}",
            c.direction,
            c.address.to_string(),
            peer_label(&c.name, &c.nickname),
            c.state
        );
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A snapshot of host1 with an established outbound and a pending inbound peer.
    pub(crate) fn sample() -> Status {
        Status {
            version: "0.1.0".to_owned(),
            name: "aa:00:00:00:00:01".parse().unwrap(),
            nickname: "host1".to_owned(),
            short_id: 1,
            address: Ipv4Addr::new(192, 168, 48, 11),
            port: 6783,
            mtu: 1376,
            encryption: false,
            connections: vec![
                Connection {
                    direction: Direction::Outbound,
                    address: "192.168.48.12:6783".parse().unwrap(),
                    state: ConnectionState::Established,
                    overlay: Overlay::Fastdp,
                    name: "aa:00:00:00:00:02".parse().unwrap(),
                    nickname: "host2".to_owned(),
                    short_id: 2,
                    mtu: 1376,
                    tx_packets: 10,
                    tx_bytes: 1000,
                    rx_packets: 20,
                    rx_bytes: 2000,
                },
                Connection {
                    direction: Direction::Inbound,
                    address: "192.168.48.13:44321".parse().unwrap(),
                    state: ConnectionState::Pending,
                    overlay: Overlay::Fastdp,
                    name: "aa:00:00:00:00:03".parse().unwrap(),
                    nickname: "host3".to_owned(),
                    short_id: 3,
                    mtu: 1376,
                    tx_packets: 0,
                    tx_bytes: 0,
                    rx_packets: 0,
                    rx_bytes: 0,
                },
            ],
            counters: BTreeMap::from([
                ("rx_delivered".to_owned(), 20),
                ("drop_unknown_source".to_owned(), 0),
            ]),
        }
    }

    #[test]
    fn json_matches_the_contract() {
        let mut status = sample();
        status.connections.truncate(1);
        let value = serde_json::to_value(&status).unwrap();
        let expected = serde_json::json!({
            "version": "0.1.0", "name": "aa:00:00:00:00:01", "nickname": "host1",
            "short_id": 1, "address": "192.168.48.11", "port": 6783, "mtu": 1376,
            "encryption": false,
            "connections": [{
                "direction": "outbound", "address": "192.168.48.12:6783",
                "state": "established", "overlay": "fastdp", "name": "aa:00:00:00:00:02",
                "nickname": "host2", "short_id": 2, "mtu": 1376,
                "tx_packets": 10, "tx_bytes": 1000, "rx_packets": 20, "rx_bytes": 2000
            }],
            "counters": {"drop_unknown_source": 0, "rx_delivered": 20}
        });
        assert_eq!(value, expected);
    }

    #[test]
    fn json_round_trips_and_ignores_unknown_fields() {
        let status = sample();
        let text = serde_json::to_string(&status).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&text).unwrap(), status);
        // Fields added by a newer agent do not break an older `weft status`.
        let mut value = serde_json::to_value(&status).unwrap();
        value["future"] = serde_json::json!(1);
        value["connections"][0]["encrypted"] = serde_json::json!(true);
        assert_eq!(serde_json::from_value::<Status>(value).unwrap(), status);
    }

    #[test]
    fn json_rejects_unknown_enum_values() {
        let mut value = serde_json::to_value(sample()).unwrap();
        value["connections"][0]["state"] = serde_json::json!("exploded");
        assert!(serde_json::from_value::<Status>(value).is_err());
    }

    #[test]
    fn summary_is_aligned_like_weave() {
        assert_eq!(
            render_summary(&sample()),
            "        Version: 0.1.0\n\
             \x20      Protocol: weave 1..2\n\
             \x20          Name: aa:00:00:00:00:01(host1)\n\
             \x20    Encryption: disabled\n\
             \x20   Connections: 2 (1 established, 1 pending)\n\
             \x20         Peers: 3 (with 1 established, 1 pending connections)\n"
        );
    }

    #[test]
    fn summary_counts_only_nonzero_states() {
        let mut status = sample();
        status.connections[1].state = ConnectionState::Established;
        status.encryption = true;
        let text = render_summary(&status);
        assert!(text.contains("     Encryption: enabled\n"), "{text}");
        assert!(
            text.contains("    Connections: 2 (2 established)\n"),
            "{text}"
        );
        assert!(
            text.contains("          Peers: 3 (with 2 established connections)\n"),
            "{text}"
        );

        status.connections.clear();
        let text = render_summary(&status);
        assert!(
            text.ends_with("    Connections: 0\n          Peers: 1\n"),
            "{text}"
        );
    }

    #[test]
    fn connections_lines() {
        assert_eq!(
            render_connections(&sample()),
            "-> 192.168.48.12:6783    established fastdp aa:00:00:00:00:02(host2) mtu=1376\n\
             <- 192.168.48.13:44321   pending     fastdp aa:00:00:00:00:03(host3) mtu=1376\n"
        );
    }

    #[test]
    fn connections_lines_with_encryption() {
        let mut status = sample();
        status.encryption = true;
        assert_eq!(
            render_connections(&status),
            "-> 192.168.48.12:6783    established encrypted   fastdp aa:00:00:00:00:02(host2) encrypted=true mtu=1376\n\
             <- 192.168.48.13:44321   pending     encrypted   fastdp aa:00:00:00:00:03(host3) encrypted=true mtu=1376\n"
        );
    }

    #[test]
    fn connections_empty() {
        let mut status = sample();
        status.connections.clear();
        assert_eq!(render_connections(&status), "");
    }

    #[test]
    fn peers_listing() {
        assert_eq!(
            render_peers(&sample()),
            "aa:00:00:00:00:01(host1)\n   \
             -> 192.168.48.12:6783    aa:00:00:00:00:02(host2)              established\n   \
             <- 192.168.48.13:44321   aa:00:00:00:00:03(host3)              pending\n"
        );
        let mut status = sample();
        status.connections.clear();
        assert_eq!(render_peers(&status), "aa:00:00:00:00:01(host1)\n");
    }
}
