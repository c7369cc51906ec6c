//! The agent's status snapshot (`weft status --json`) and its Weave-style text forms
//! (`weft status`, `weft status connections`, `weft status peers`, and the HTTP
//! endpoints of [`crate::api`]).
//!
//! [`Status`] is the one source of truth: the text forms, the `/report` JSON and the
//! Prometheus metrics are all derived from it. It describes the mesh the way Weave
//! Net 2.8.1's router status does: the live connections, the targets being dialled,
//! every known peer with the connections *it* reports, and the datapath counters.
//!
//! The text follows weaver's templates (labels, column widths, the order of the
//! summary lines), so scripts and eyes used to Weave read it the same way. One
//! deliberate difference, chosen per [`Style`]: Weave prints a connection's attributes
//! with no separator (`encrypted=truemtu=1414`) and leaves a trailing space on lines
//! without attributes. The HTTP endpoints keep those exact bytes ([`Style::Weave`]),
//! because Weave tooling reads them; weft's own CLI separates attributes with a space
//! and trims the line ([`Style::Weft`]).

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    net::IpAddr,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use weft::mesh::{
    PeerName, PeerUpdate,
    router::{ConnectionStatus, TargetState as MeshTargetState, TargetStatus},
    topology::Topology,
};

/// Weave protocol versions weft speaks (shown as `Protocol: weave 1..2`).
pub const PROTOCOL: &str = "weave 1..2";

/// Width of the right-aligned labels of the summary (Weave's template).
const LABEL_WIDTH: usize = 15;
/// Width of the address column of connection lines (Weave's `%-21v`).
const ADDRESS_WIDTH: usize = 21;
/// Width of the state column of connection lines (Weave's `%-11v`).
const STATE_WIDTH: usize = 11;
/// Width of the `encrypted`/`unencrypted` column (Weave's `%-11v`).
const ENCRYPTION_WIDTH: usize = 11;
/// Width of the overlay name column (Weave's `%-6v`).
const OVERLAY_WIDTH: usize = 6;
/// Width of the `name(nickname)` column of `status peers` (Weave's `%-37v`).
const PEER_WIDTH: usize = 37;

/// Everything `weft status` shows: the local peer, its connections and targets, the
/// peers of the mesh, the datapath and sleeve counters.
///
/// Fields added after the first release have serde defaults, and unknown fields are
/// ignored, so an older `weft status` reads a newer agent's answer and vice versa.
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
    /// The local peer's UID (its incarnation; 0 in static mode, which has no mesh).
    #[serde(default)]
    pub uid: u64,
    /// The version of the local peer's topology entry (0 in static mode).
    #[serde(default)]
    pub peer_version: u64,
    /// The local underlay address.
    pub address: IpAddr,
    /// The control port (VXLAN is on `port + 1`).
    pub port: u16,
    /// The overlay MTU.
    pub mtu: u16,
    /// Whether a password is set (traffic to untrusted peers is encrypted).
    pub encryption: bool,
    /// Whether peers learnt from gossip are dialled (Weave's peer discovery).
    #[serde(default)]
    pub peer_discovery: bool,
    /// Subnets trusted to carry unencrypted traffic (weft has none).
    #[serde(default)]
    pub trusted_subnets: Vec<String>,
    /// The targets the user gave (`weft connect`, the command line), as given: Weave's
    /// `Targets`.
    #[serde(default)]
    pub targets: Vec<String>,
    /// Every address being dialled (given or discovered), with its state.
    #[serde(default)]
    pub target_states: Vec<Target>,
    /// The live connections, one per remote peer.
    pub connections: Vec<Connection>,
    /// Every known peer (this one included) with its connections as it reports them.
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// Connections ended so far (Weave's `TerminationCount`).
    #[serde(default)]
    pub termination_count: u64,
    /// Datapath counters by name (see `weft_common::maps::Counter::name`); names
    /// starting with `drop_` count dropped frames by reason.
    pub counters: BTreeMap<String, u64>,
    /// Sleeve overlay counters by name; names starting with `drop_` count dropped
    /// datagrams by reason (decryption failures, replays, unknown senders, bad frames).
    #[serde(default)]
    pub sleeve_counters: BTreeMap<String, u64>,
}

impl Status {
    /// The status of a peer that has no connections yet.
    pub fn default_for(name: PeerName, nickname: &str) -> Self {
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            name,
            nickname: nickname.to_owned(),
            short_id: 0,
            uid: 0,
            peer_version: 0,
            address: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            port: 0,
            mtu: 0,
            encryption: false,
            peer_discovery: true,
            trusted_subnets: Vec::new(),
            targets: Vec::new(),
            target_states: Vec::new(),
            connections: Vec::new(),
            peers: Vec::new(),
            termination_count: 0,
            counters: BTreeMap::new(),
            sleeve_counters: BTreeMap::new(),
        }
    }
}

/// The local peer's link to one remote peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// Which side dialled.
    pub direction: Direction,
    /// The remote end, `ip:port` (`[ip]:port` for IPv6): the address dialled
    /// (outbound) or the remote source (inbound).
    pub address: String,
    /// How far the connection got.
    pub state: ConnectionState,
    /// Why the connection is in its state, when there is something to say (say, the
    /// reason a pending overlay is not established yet). Only in the JSON; Weave's text
    /// has no place for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<String>,
    /// Whether its traffic is encrypted.
    #[serde(default)]
    pub encrypted: bool,
    /// The overlay carrying the traffic now; `None` while no overlay is up (Weave
    /// shows `none`).
    #[serde(default)]
    pub overlay: Option<Overlay>,
    /// The remote peer's name.
    pub name: PeerName,
    /// The remote peer's nickname.
    pub nickname: String,
    /// The remote peer's ShortID, if known.
    #[serde(default)]
    pub short_id: Option<u16>,
    /// The MTU used towards that peer.
    pub mtu: u16,
    /// Frames the fast datapath sent to the peer.
    pub tx_packets: u64,
    /// Inner bytes the fast datapath sent to the peer.
    pub tx_bytes: u64,
    /// Frames the fast datapath received from the peer.
    pub rx_packets: u64,
    /// Inner bytes the fast datapath received from the peer.
    pub rx_bytes: u64,
    /// What the sleeve overlay carried for this peer, when sleeve runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleeve: Option<Traffic>,
    /// The fast datapath's IPsec SAs with this peer, when it is encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipsec: Option<IpsecStatus>,
}

/// A connection's IPsec SAs (the encrypted fast datapath), by SPI: what `ip xfrm
/// state` shows for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpsecStatus {
    /// The SPI traffic to the peer is encrypted with, once installed.
    #[serde(default)]
    pub outbound_spi: Option<u32>,
    /// The SPIs accepted from the peer (two while a rekey's grace period runs).
    #[serde(default)]
    pub inbound_spis: Vec<u32>,
}

/// Frame and byte counts of one overlay towards one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Frames sent.
    pub tx_packets: u64,
    /// Inner bytes sent.
    pub tx_bytes: u64,
    /// Frames received.
    pub rx_packets: u64,
    /// Inner bytes received.
    pub rx_bytes: u64,
}

/// One address being dialled (Weave's connection-maker target).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// `ip:port` (`[ip]:port` for IPv6).
    pub address: String,
    /// Given by the user (not discovered through gossip).
    #[serde(default)]
    pub direct: bool,
    /// Its state.
    pub state: TargetState,
    /// Why the last attempt or connection ended.
    #[serde(default)]
    pub last_error: Option<String>,
    /// When it is tried next, in milliseconds since the Unix epoch (`None`: never).
    #[serde(default)]
    pub retry_at_ms: Option<u64>,
}

/// A target's state, in the words Weave's status uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetState {
    /// Waiting for its first try.
    Waiting,
    /// Waiting for its next try after an error.
    Failed,
    /// Being dialled.
    Connecting,
    /// Being dialled again after an error.
    Retrying,
    /// A connection to it is up.
    Connected,
    /// Not tried now (its peer is reachable some other way).
    Suspended,
}

/// A known peer and its connections as it reports them (from topology gossip; for
/// this peer, its own connections).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The peer's name.
    pub name: PeerName,
    /// Its nickname.
    pub nickname: String,
    /// Its incarnation.
    #[serde(default)]
    pub uid: u64,
    /// Its ShortID, if it has one.
    #[serde(default)]
    pub short_id: Option<u16>,
    /// The version of its topology entry.
    #[serde(default)]
    pub version: u64,
    /// Its connections, as it reports them.
    #[serde(default)]
    pub connections: Vec<PeerConnection>,
}

/// One connection of a peer as that peer reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerConnection {
    /// The peer at the other end.
    pub name: PeerName,
    /// Its nickname, as the topology knows it (empty if unknown).
    pub nickname: String,
    /// `ip:port`: the address dialled (outbound) or the remote source (inbound).
    pub address: String,
    /// Whether the reporting peer dialled.
    pub outbound: bool,
    /// Whether the reporting peer's overlay to the other end is established.
    pub established: bool,
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

impl Direction {
    #[allow(
        dead_code,
        reason = "used by the mesh runtime, which fills the status from the mesh"
    )]
    /// `Outbound` for true.
    pub fn from_outbound(outbound: bool) -> Self {
        if outbound {
            Direction::Outbound
        } else {
            Direction::Inbound
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(arrow(*self == Direction::Outbound))
    }
}

/// The state of a connection line, in Weave's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    /// The overlay to the peer works.
    Established,
    /// Connected, the overlay not proven yet.
    Pending,
    /// Being dialled again after an error (a target).
    Retrying,
    /// The last attempt failed; waiting to retry (a target).
    Failed,
    /// Being dialled (a target).
    Connecting,
    /// Waiting for a first try (a target; Weave says this should not happen).
    Waiting,
}

/// The states Weave counts in the summary, in its order.
const COUNTED_STATES: [ConnectionState; 5] = [
    ConnectionState::Established,
    ConnectionState::Pending,
    ConnectionState::Retrying,
    ConnectionState::Failed,
    ConnectionState::Connecting,
];

impl ConnectionState {
    /// The lowercase name, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Established => "established",
            ConnectionState::Pending => "pending",
            ConnectionState::Retrying => "retrying",
            ConnectionState::Failed => "failed",
            ConnectionState::Connecting => "connecting",
            ConnectionState::Waiting => "waiting",
        }
    }

    /// Every state Weave's metrics and summary count, in its order.
    pub fn counted() -> &'static [ConnectionState] {
        &COUNTED_STATES
    }
}

impl fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` so that width flags (`{:<11}`) apply.
        f.pad(self.as_str())
    }
}

/// The overlay carrying a connection's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlay {
    /// In-kernel VXLAN (the eBPF datapath).
    Fastdp,
    /// Weave's UDP encapsulation, in user space.
    Sleeve,
}

impl Overlay {
    /// The lowercase name (Weave's overlay names).
    pub fn as_str(self) -> &'static str {
        match self {
            Overlay::Fastdp => "fastdp",
            Overlay::Sleeve => "sleeve",
        }
    }
}

impl fmt::Display for Overlay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The attributes Weave shows for a connection (its overlay forwarder's `Attrs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attrs {
    /// The overlay (`name`).
    pub overlay: Overlay,
    /// `mtu`.
    pub mtu: u16,
    /// `encrypted=true`, present only for encrypted connections of a router with a
    /// password.
    pub encrypted: bool,
}

impl Attrs {
    /// The attributes as Weave prints them: `key=value` in key order, `name` left out.
    fn printed(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(2);
        if self.encrypted {
            out.push("encrypted=true".to_owned());
        }
        out.push(format!("mtu={}", self.mtu));
        out
    }
}

/// One line of Weave's connection list (its `LocalConnectionStatus`): a live
/// connection, or a target that is not connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLine {
    /// `ip:port`.
    pub address: String,
    /// Whether this peer dialled (always true for targets).
    pub outbound: bool,
    /// The state.
    pub state: ConnectionState,
    /// Weave's `Info`: for a connection `[encrypted|unencrypted] overlay name(nick)`,
    /// for a target the error and the retry time.
    pub info: String,
    /// The overlay attributes (`None` without an overlay, and for targets).
    pub attrs: Option<Attrs>,
    /// weft's note on a connection (say, why the fast datapath does not carry it);
    /// printed by weft's own layout only.
    pub note: Option<String>,
}

/// `->` for outbound, `<-` for inbound.
fn arrow(outbound: bool) -> &'static str {
    if outbound { "->" } else { "<-" }
}

/// `name(nickname)`, as Weave prints peers.
fn peer_label(name: &PeerName, nickname: &str) -> String {
    format!("{name}({nickname})")
}

impl Status {
    /// Weave's connection list: the live connections, then the targets being dialled
    /// or waiting to be (connected and suspended targets are left out, as Weave does).
    pub fn connection_lines(&self) -> Vec<ConnectionLine> {
        let mut lines: Vec<ConnectionLine> = self
            .connections
            .iter()
            .map(|c| {
                let overlay = c.overlay.map_or("none", Overlay::as_str);
                let mut info = format!(
                    "{overlay:<OVERLAY_WIDTH$} {}",
                    peer_label(&c.name, &c.nickname)
                );
                if self.encryption {
                    let word = if c.encrypted {
                        "encrypted"
                    } else {
                        "unencrypted"
                    };
                    info = format!("{word:<ENCRYPTION_WIDTH$} {info}");
                }
                ConnectionLine {
                    address: c.address.clone(),
                    outbound: c.direction == Direction::Outbound,
                    state: c.state,
                    info,
                    attrs: c.overlay.map(|overlay| Attrs {
                        overlay,
                        mtu: c.mtu,
                        encrypted: self.encryption && c.encrypted,
                    }),
                    note: c.info.clone(),
                }
            })
            .collect();
        for t in &self.target_states {
            let retry = || {
                t.retry_at_ms
                    .map_or_else(|| "never".to_owned(), format_time)
            };
            let error = t.last_error.as_deref();
            let (state, info) = match (t.state, error) {
                (TargetState::Waiting, None) => {
                    (ConnectionState::Waiting, format!("until: {}", retry()))
                }
                (TargetState::Waiting | TargetState::Failed, Some(e)) => {
                    (ConnectionState::Failed, format!("{e}, retry: {}", retry()))
                }
                (TargetState::Failed, None) => {
                    (ConnectionState::Failed, format!("retry: {}", retry()))
                }
                (TargetState::Connecting | TargetState::Retrying, None) => {
                    (ConnectionState::Connecting, String::new())
                }
                (TargetState::Connecting | TargetState::Retrying, Some(e)) => {
                    (ConnectionState::Retrying, e.to_owned())
                }
                (TargetState::Connected | TargetState::Suspended, _) => continue,
            };
            lines.push(ConnectionLine {
                address: t.address.clone(),
                outbound: true,
                state,
                info,
                attrs: None,
                note: None,
            });
        }
        lines
    }

    #[allow(
        dead_code,
        reason = "used by the mesh runtime, which fills the status from the mesh"
    )]
    /// Fills [`Status::peers`] from the mesh's topology: this peer first, then the
    /// others by name, each with the connection list it gossips. Nicknames of the far
    /// ends come from the topology (empty when unknown).
    pub fn set_peers_from_topology(&mut self, topology: &Topology) {
        let local = topology.local_name();
        let nickname = |name: &PeerName| {
            topology
                .peer(name)
                .map(|p| p.summary.nickname.clone())
                .unwrap_or_default()
        };
        let peer = |u: &PeerUpdate| Peer {
            name: u.summary.name,
            nickname: u.summary.nickname.clone(),
            uid: u.summary.uid,
            short_id: u.summary.short_id,
            version: u.summary.version,
            connections: u
                .connections
                .iter()
                .map(|c| PeerConnection {
                    name: c.name,
                    nickname: nickname(&c.name),
                    address: c.remote_tcp_addr.clone(),
                    outbound: c.outbound,
                    established: c.established,
                })
                .collect(),
        };
        self.peers = std::iter::once(topology.local())
            .chain(topology.peers().filter(|p| p.summary.name != local))
            .map(peer)
            .collect();
    }
}

impl Target {
    #[allow(
        dead_code,
        reason = "used by the mesh runtime, which fills the status from the mesh"
    )]
    /// A mesh target as status shows it; `now` and `wall_now` are the same moment on
    /// the monotonic and the wall clock (to turn the next try into a wall time).
    pub fn from_mesh(t: &TargetStatus, now: Instant, wall_now: SystemTime) -> Self {
        let state = match t.label() {
            "failed" => TargetState::Failed,
            "connecting" => TargetState::Connecting,
            "retrying" => TargetState::Retrying,
            _ => match t.state {
                MeshTargetState::Waiting => TargetState::Waiting,
                MeshTargetState::Attempting => TargetState::Connecting,
                MeshTargetState::Connected => TargetState::Connected,
                MeshTargetState::Suspended => TargetState::Suspended,
            },
        };
        let retry_at_ms = t.next_try.map(|at| {
            let wall = if at >= now {
                wall_now + (at - now)
            } else {
                wall_now - (now - at)
            };
            let ms = wall
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis();
            u64::try_from(ms).unwrap_or(u64::MAX)
        });
        Target {
            address: t.addr.to_string(),
            direct: t.direct,
            state,
            last_error: t.last_error.clone(),
            retry_at_ms,
        }
    }
}

impl Connection {
    #[allow(
        dead_code,
        reason = "used by the mesh runtime, which fills the status from the mesh"
    )]
    /// A mesh connection as status shows it, before the overlay's part (overlay,
    /// encryption, MTU, counters) is filled in: no overlay, pending or established as
    /// the mesh says, counters zero.
    pub fn from_mesh(c: &ConnectionStatus, short_id: Option<u16>, mtu: u16) -> Self {
        Connection {
            direction: Direction::from_outbound(c.outbound),
            address: c.remote_addr.to_string(),
            state: if c.established {
                ConnectionState::Established
            } else {
                ConnectionState::Pending
            },
            info: None,
            encrypted: false,
            overlay: None,
            name: c.peer,
            nickname: c.nickname.clone(),
            short_id,
            mtu,
            tx_packets: 0,
            tx_bytes: 0,
            rx_packets: 0,
            rx_bytes: 0,
            sleeve: None,
            ipsec: None,
        }
    }
}

/// A wall time (milliseconds since the Unix epoch) the way Go prints a `time.Time`
/// in UTC: `2024-05-01 12:00:00.5 +0000 UTC` (fraction trimmed of trailing zeros,
/// left out when zero).
pub fn format_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let ms = unix_ms % 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let mut out = format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    if ms != 0 {
        let frac = format!("{ms:03}");
        let _ = write!(out, ".{}", frac.trim_end_matches('0'));
    }
    out.push_str(" +0000 UTC");
    out
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// How connection lines are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// weaver's exact bytes: attributes run together (`encrypted=truemtu=1414`) and a
    /// trailing space where there are none. For the HTTP endpoints Weave tooling reads.
    Weave,
    /// weft's CLI: attributes separated by spaces, no trailing space.
    Weft,
}

/// Weave's count list (`2 established, 1 pending`), zero counts left out.
fn counts(states: impl Iterator<Item = ConnectionState> + Clone) -> String {
    COUNTED_STATES
        .iter()
        .map(|s| (states.clone().filter(|t| t == s).count(), s))
        .filter(|(n, _)| *n > 0)
        .map(|(n, s)| format!("{n} {s}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `weft status` summary, laid out like weaver 2.8.1's router part of
/// `weave status`:
///
/// ```text
///         Version: weft 0.1.0
///
///         Service: router
///        Protocol: weave 1..2
///            Name: aa:00:00:00:00:01(h1)
///      Encryption: enabled
///   PeerDiscovery: enabled
///         Targets: 0
///     Connections: 1 (1 established)
///           Peers: 2 (with 2 established connections)
///  TrustedSubnets: none
/// ```
///
/// `Connections` counts the lines of [`Status::connection_lines`]; `Peers` counts
/// the known peers, and its connection counts run over every peer's list (so a link
/// both ends report established counts twice), as Weave's do.
pub fn render_summary(status: &Status) -> String {
    let mut out = String::new();
    summary_line(&mut out, "Version", format!("weft {}", status.version));
    // Weave leaves a blank line before each service.
    out.push('\n');
    let enabled = |on| if on { "enabled" } else { "disabled" };
    summary_line(&mut out, "Service", "router");
    summary_line(&mut out, "Protocol", PROTOCOL);
    summary_line(&mut out, "Name", peer_label(&status.name, &status.nickname));
    summary_line(&mut out, "Encryption", enabled(status.encryption));
    summary_line(&mut out, "PeerDiscovery", enabled(status.peer_discovery));
    summary_line(&mut out, "Targets", status.targets.len());
    let lines = status.connection_lines();
    let with_counts = |n: usize, counts: String, fmt: fn(usize, &str) -> String| {
        if counts.is_empty() {
            n.to_string()
        } else {
            fmt(n, &counts)
        }
    };
    summary_line(
        &mut out,
        "Connections",
        with_counts(
            lines.len(),
            counts(lines.iter().map(|l| l.state)),
            |n, c| format!("{n} ({c})"),
        ),
    );
    let peer_states = status.peers.iter().flat_map(|p| {
        p.connections.iter().map(|c| {
            if c.established {
                ConnectionState::Established
            } else {
                ConnectionState::Pending
            }
        })
    });
    summary_line(
        &mut out,
        "Peers",
        with_counts(status.peers.len(), counts(peer_states), |n, c| {
            format!("{n} (with {c} connections)")
        }),
    );
    summary_line(
        &mut out,
        "TrustedSubnets",
        if status.trusted_subnets.is_empty() {
            "none".to_owned()
        } else {
            status.trusted_subnets.join(", ")
        },
    );
    out
}

/// One right-aligned `label: value` line of the summary.
fn summary_line(out: &mut String, label: &str, value: impl fmt::Display) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{label:>LABEL_WIDTH$}: {value}");
}

/// `weft status connections` and `/status/connections`: one line per connection
/// and per target not connected, like weaver's:
///
/// ```text
/// <- 192.168.77.2:42439    established encrypted   sleeve aa:00:00:00:00:f2(foreign) encrypted=truemtu=1414
/// -> 192.168.48.99:6783    failed      dial tcp 192.168.48.99:6783: connect: no route to host, retry: 2024-05-01 12:00:00 +0000 UTC
/// ```
///
/// Arrow, address padded to 21, state padded to 11, then Weave's info: with a
/// password `encrypted` or `unencrypted` padded to 11, the overlay padded to 6 and
/// `name(nickname)`; for targets the error and the retry time. Then the attributes
/// in key order, `name` left out, separated as `style` says.
pub fn render_connections(status: &Status, style: Style) -> String {
    let mut out = String::new();
    for l in status.connection_lines() {
        let attrs = l.attrs.map(|a| a.printed()).unwrap_or_default();
        let mut line = format!(
            "{} {:<ADDRESS_WIDTH$} {:<STATE_WIDTH$} {}",
            arrow(l.outbound),
            l.address,
            l.state,
            l.info
        );
        match style {
            Style::Weave => {
                line.push(' ');
                line.push_str(&attrs.concat());
            }
            Style::Weft => {
                for a in attrs {
                    line.push(' ');
                    line.push_str(&a);
                }
                line.truncate(line.trim_end().len());
                if let Some(note) = &l.note {
                    line.push_str(&format!(" ({note})"));
                }
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `weft status peers` and `/status/peers`, like weaver's: each peer, then one
/// indented line per connection as *that* peer reports it:
///
/// ```text
/// aa:00:00:00:00:01(h1)
///    <- 192.168.77.2:42439    aa:00:00:00:00:f2(foreign)            established
/// aa:00:00:00:00:f2(foreign)
///    -> 192.168.77.1:6783     aa:00:00:00:00:01(h1)                 established
/// ```
pub fn render_peers(status: &Status) -> String {
    let mut out = String::new();
    for p in &status.peers {
        let _ = writeln!(out, "{}", peer_label(&p.name, &p.nickname));
        for c in &p.connections {
            let _ = writeln!(
                out,
                "   {} {:<ADDRESS_WIDTH$} {:<PEER_WIDTH$} {}",
                arrow(c.outbound),
                c.address,
                peer_label(&c.name, &c.nickname),
                if c.established {
                    "established"
                } else {
                    "pending"
                }
            );
        }
    }
    out
}

/// `/status/targets`: the targets the user gave, one a line (Weave's template).
pub fn render_targets(status: &Status) -> String {
    status.targets.iter().map(|t| format!("{t}\n")).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn name(s: &str) -> PeerName {
        s.parse().unwrap()
    }

    fn conn(
        dir: Direction,
        addr: &str,
        state: ConnectionState,
        peer: &str,
        nick: &str,
    ) -> Connection {
        Connection {
            direction: dir,
            address: addr.to_owned(),
            state,
            info: None,
            encrypted: false,
            overlay: Some(Overlay::Fastdp),
            name: name(peer),
            nickname: nick.to_owned(),
            short_id: None,
            mtu: 1376,
            tx_packets: 0,
            tx_bytes: 0,
            rx_packets: 0,
            rx_bytes: 0,
            sleeve: None,
            ipsec: None,
        }
    }

    fn peer_conn(
        peer: &str,
        nick: &str,
        addr: &str,
        outbound: bool,
        established: bool,
    ) -> PeerConnection {
        PeerConnection {
            name: name(peer),
            nickname: nick.to_owned(),
            address: addr.to_owned(),
            outbound,
            established,
        }
    }

    /// A snapshot of host1 with an established outbound and a pending inbound peer.
    pub(crate) fn sample() -> Status {
        let mut c2 = conn(
            Direction::Outbound,
            "192.168.48.12:6783",
            ConnectionState::Established,
            "aa:00:00:00:00:02",
            "host2",
        );
        c2.short_id = Some(2);
        (c2.tx_packets, c2.tx_bytes, c2.rx_packets, c2.rx_bytes) = (10, 1000, 20, 2000);
        let mut c3 = conn(
            Direction::Inbound,
            "192.168.48.13:44321",
            ConnectionState::Pending,
            "aa:00:00:00:00:03",
            "host3",
        );
        c3.short_id = Some(3);
        Status {
            version: "0.1.0".to_owned(),
            name: name("aa:00:00:00:00:01"),
            nickname: "host1".to_owned(),
            short_id: 1,
            uid: 0,
            peer_version: 0,
            address: "192.168.48.11".parse().unwrap(),
            port: 6783,
            mtu: 1376,
            encryption: false,
            peer_discovery: true,
            trusted_subnets: vec![],
            targets: vec![],
            target_states: vec![],
            connections: vec![c2, c3],
            peers: vec![
                Peer {
                    name: name("aa:00:00:00:00:01"),
                    nickname: "host1".to_owned(),
                    uid: 0,
                    short_id: Some(1),
                    version: 0,
                    connections: vec![
                        peer_conn(
                            "aa:00:00:00:00:02",
                            "host2",
                            "192.168.48.12:6783",
                            true,
                            true,
                        ),
                        peer_conn(
                            "aa:00:00:00:00:03",
                            "host3",
                            "192.168.48.13:44321",
                            false,
                            false,
                        ),
                    ],
                },
                Peer {
                    name: name("aa:00:00:00:00:02"),
                    nickname: "host2".to_owned(),
                    uid: 0,
                    short_id: Some(2),
                    version: 0,
                    connections: vec![],
                },
            ],
            termination_count: 0,
            counters: BTreeMap::from([
                ("rx_delivered".to_owned(), 20),
                ("drop_unknown_source".to_owned(), 0),
            ]),
            sleeve_counters: BTreeMap::new(),
        }
    }

    /// weaver's live password run (the reference's section 7): h1 accepted a
    /// connection from `foreign`, carried by sleeve, established both ways.
    pub(crate) fn live_password_run() -> Status {
        let mut c = conn(
            Direction::Inbound,
            "192.168.77.2:42439",
            ConnectionState::Established,
            "aa:00:00:00:00:f2",
            "foreign",
        );
        c.encrypted = true;
        c.overlay = Some(Overlay::Sleeve);
        c.mtu = 1414;
        Status {
            version: "0.1.0".to_owned(),
            name: name("aa:00:00:00:00:01"),
            nickname: "h1".to_owned(),
            short_id: 1,
            uid: 0x1234_5678_9abc_def0,
            peer_version: 3,
            address: "192.168.77.1".parse().unwrap(),
            port: 6783,
            mtu: 1414,
            encryption: true,
            peer_discovery: true,
            trusted_subnets: vec![],
            targets: vec![],
            target_states: vec![],
            connections: vec![c],
            peers: vec![
                Peer {
                    name: name("aa:00:00:00:00:01"),
                    nickname: "h1".to_owned(),
                    uid: 0x1234_5678_9abc_def0,
                    short_id: Some(1),
                    version: 3,
                    connections: vec![peer_conn(
                        "aa:00:00:00:00:f2",
                        "foreign",
                        "192.168.77.2:42439",
                        false,
                        true,
                    )],
                },
                Peer {
                    name: name("aa:00:00:00:00:f2"),
                    nickname: "foreign".to_owned(),
                    uid: 42,
                    short_id: Some(0xf2),
                    version: 2,
                    connections: vec![peer_conn(
                        "aa:00:00:00:00:01",
                        "h1",
                        "192.168.77.1:6783",
                        true,
                        true,
                    )],
                },
            ],
            termination_count: 0,
            counters: BTreeMap::new(),
            sleeve_counters: BTreeMap::new(),
        }
    }

    #[test]
    fn json_matches_the_contract() {
        let mut status = sample();
        status.connections.truncate(1);
        status.peers.clear();
        let value = serde_json::to_value(&status).unwrap();
        let expected = serde_json::json!({
            "version": "0.1.0", "name": "aa:00:00:00:00:01", "nickname": "host1",
            "short_id": 1, "uid": 0, "peer_version": 0,
            "address": "192.168.48.11", "port": 6783, "mtu": 1376,
            "encryption": false, "peer_discovery": true, "trusted_subnets": [],
            "targets": [], "target_states": [],
            "connections": [{
                "direction": "outbound", "address": "192.168.48.12:6783",
                "state": "established", "encrypted": false, "overlay": "fastdp",
                "name": "aa:00:00:00:00:02", "nickname": "host2", "short_id": 2,
                "mtu": 1376,
                "tx_packets": 10, "tx_bytes": 1000, "rx_packets": 20, "rx_bytes": 2000
            }],
            "peers": [], "termination_count": 0,
            "counters": {"drop_unknown_source": 0, "rx_delivered": 20},
            "sleeve_counters": {}
        });
        assert_eq!(value, expected);
    }

    #[test]
    fn json_of_targets_peers_and_sleeve() {
        let mut status = live_password_run();
        status.connections[0].info = Some("overlay fell back".to_owned());
        status.connections[0].sleeve = Some(Traffic {
            tx_packets: 1,
            tx_bytes: 2,
            rx_packets: 3,
            rx_bytes: 4,
        });
        status.target_states.push(Target {
            address: "[fd00::9]:6783".to_owned(),
            direct: true,
            state: TargetState::Failed,
            last_error: Some("connection refused".to_owned()),
            retry_at_ms: Some(1_700_000_000_000),
        });
        let v = serde_json::to_value(&status).unwrap();
        assert_eq!(v["connections"][0]["overlay"], "sleeve");
        assert_eq!(v["connections"][0]["encrypted"], true);
        assert_eq!(v["connections"][0]["info"], "overlay fell back");
        assert_eq!(v["connections"][0]["sleeve"]["rx_bytes"], 4);
        assert_eq!(
            v["target_states"][0],
            serde_json::json!({"address": "[fd00::9]:6783", "direct": true, "state": "failed",
                "last_error": "connection refused", "retry_at_ms": 1_700_000_000_000u64})
        );
        assert_eq!(
            v["peers"][1]["connections"][0],
            serde_json::json!({"name": "aa:00:00:00:00:01", "nickname": "h1",
                "address": "192.168.77.1:6783", "outbound": true, "established": true})
        );
        assert_eq!(v["peers"][1]["short_id"], 0xf2);
        assert_eq!(serde_json::from_value::<Status>(v).unwrap(), status);
    }

    #[test]
    fn json_round_trips_and_ignores_unknown_fields() {
        let status = sample();
        let text = serde_json::to_string(&status).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&text).unwrap(), status);
        // Fields added by a newer agent do not break an older `weft status`.
        let mut value = serde_json::to_value(&status).unwrap();
        value["future"] = serde_json::json!(1);
        value["connections"][0]["future"] = serde_json::json!(true);
        value["peers"][0]["future"] = serde_json::json!("x");
        assert_eq!(serde_json::from_value::<Status>(value).unwrap(), status);
    }

    #[test]
    fn json_from_an_older_agent_reads_with_defaults() {
        // What the first release sent: no mesh fields.
        let old = serde_json::json!({
            "version": "0.1.0", "name": "aa:00:00:00:00:01", "nickname": "host1",
            "short_id": 1, "address": "192.168.48.11", "port": 6783, "mtu": 1376,
            "encryption": false,
            "connections": [{
                "direction": "outbound", "address": "192.168.48.12:6783",
                "state": "established", "overlay": "fastdp", "name": "aa:00:00:00:00:02",
                "nickname": "host2", "short_id": 2, "mtu": 1376,
                "tx_packets": 10, "tx_bytes": 1000, "rx_packets": 20, "rx_bytes": 2000
            }],
            "counters": {"rx_delivered": 20}
        });
        let s: Status = serde_json::from_value(old).unwrap();
        assert_eq!(s.connections[0].short_id, Some(2));
        assert_eq!(s.connections[0].overlay, Some(Overlay::Fastdp));
        assert!(!s.connections[0].encrypted);
        assert!(s.peers.is_empty() && s.target_states.is_empty() && !s.peer_discovery);
    }

    #[test]
    fn json_rejects_unknown_enum_values() {
        let mut value = serde_json::to_value(sample()).unwrap();
        value["connections"][0]["state"] = serde_json::json!("exploded");
        assert!(serde_json::from_value::<Status>(value).is_err());
    }

    /// Section 7's live summary, from `Service:` on (weft prints its own version).
    #[test]
    fn summary_matches_weaver_live() {
        let live = "            Version: 2.8.1 (version check update disabled)

            Service: router
           Protocol: weave 1..2
               Name: aa:00:00:00:00:01(h1)
         Encryption: enabled
      PeerDiscovery: enabled
            Targets: 0
        Connections: 1 (1 established)
              Peers: 2 (with 2 established connections)
     TrustedSubnets: none
";
        // The reference indents its code blocks by four spaces.
        let live: String = live
            .lines()
            .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
            .collect();
        let ours = render_summary(&live_password_run());
        assert_eq!(ours.lines().next(), Some("        Version: weft 0.1.0"));
        let after_version = |s: &str| s.split_once('\n').unwrap().1.to_owned();
        assert_eq!(after_version(&ours), after_version(&live));
    }

    #[test]
    fn summary_counts_every_state_in_weaves_order() {
        let mut status = sample();
        status.encryption = true;
        status.peer_discovery = false;
        status.targets = vec!["192.168.48.99".to_owned(), "host5:7000".to_owned()];
        status.trusted_subnets = vec!["10.0.0.0/8".to_owned(), "fd00::/8".to_owned()];
        status.target_states = vec![
            target("192.168.48.99:6783", TargetState::Failed, Some("refused")),
            target("192.168.48.98:6783", TargetState::Retrying, Some("refused")),
            target("192.168.48.97:6783", TargetState::Connecting, None),
            target("192.168.48.96:6783", TargetState::Connected, None),
            target("192.168.48.95:6783", TargetState::Waiting, None),
        ];
        assert_eq!(
            render_summary(&status),
            "        Version: weft 0.1.0\n\
             \n\
             \x20       Service: router\n\
             \x20      Protocol: weave 1..2\n\
             \x20          Name: aa:00:00:00:00:01(host1)\n\
             \x20    Encryption: enabled\n\
             \x20 PeerDiscovery: disabled\n\
             \x20       Targets: 2\n\
             \x20   Connections: 6 (1 established, 1 pending, 1 retrying, 1 failed, 1 connecting)\n\
             \x20         Peers: 2 (with 1 established, 1 pending connections)\n\
             \x20TrustedSubnets: 10.0.0.0/8, fd00::/8\n"
        );
        status.connections.clear();
        status.target_states.clear();
        status.peers.truncate(1);
        status.peers[0].connections.clear();
        let text = render_summary(&status);
        assert!(
            text.contains("\n    Connections: 0\n          Peers: 1\n"),
            "{text}"
        );
    }

    fn target(addr: &str, state: TargetState, error: Option<&str>) -> Target {
        Target {
            address: addr.to_owned(),
            direct: true,
            state,
            last_error: error.map(str::to_owned),
            retry_at_ms: Some(1_714_564_800_250),
        }
    }

    /// Section 7's live `/status/connections` lines, byte for byte.
    #[test]
    fn connections_match_weaver_live() {
        let live = "<- 192.168.77.2:42439    established encrypted   sleeve aa:00:00:00:00:f2(foreign) encrypted=truemtu=1414\n";
        let status = live_password_run();
        assert_eq!(render_connections(&status, Style::Weave), live);
        assert_eq!(
            render_connections(&status, Style::Weft),
            "<- 192.168.77.2:42439    established encrypted   sleeve aa:00:00:00:00:f2(foreign) encrypted=true mtu=1414\n"
        );

        // The plain run: no encryption column, no encrypted attribute.
        let mut plain = live_password_run();
        plain.encryption = false;
        plain.connections[0].encrypted = false;
        plain.connections[0].address = "192.168.77.2:49175".to_owned();
        plain.connections[0].mtu = 1438;
        let live =
            "<- 192.168.77.2:49175    established sleeve aa:00:00:00:00:f2(foreign) mtu=1438\n";
        assert_eq!(render_connections(&plain, Style::Weave), live);
        assert_eq!(render_connections(&plain, Style::Weft), live);
    }

    #[test]
    fn connections_with_targets_and_without_overlay() {
        let mut status = sample();
        status.encryption = true;
        status.connections[0].encrypted = true;
        status.connections[1].overlay = None;
        status.target_states = vec![
            target(
                "192.168.48.99:6783",
                TargetState::Failed,
                Some("dial tcp4 192.168.48.99:6783: connect: connection refused"),
            ),
            target(
                "192.168.48.98:6783",
                TargetState::Retrying,
                Some("no route to host"),
            ),
            target("192.168.48.97:6783", TargetState::Connecting, None),
            target("192.168.48.96:6783", TargetState::Connected, None),
            target("192.168.48.94:6783", TargetState::Suspended, None),
            Target {
                retry_at_ms: None,
                ..target("192.168.48.95:6783", TargetState::Waiting, None)
            },
        ];
        assert_eq!(
            render_connections(&status, Style::Weave),
            "-> 192.168.48.12:6783    established encrypted   fastdp aa:00:00:00:00:02(host2) encrypted=truemtu=1376\n\
             <- 192.168.48.13:44321   pending     unencrypted none   aa:00:00:00:00:03(host3) \n\
             -> 192.168.48.99:6783    failed      dial tcp4 192.168.48.99:6783: connect: connection refused, retry: 2024-05-01 12:00:00.25 +0000 UTC \n\
             -> 192.168.48.98:6783    retrying    no route to host \n\
             -> 192.168.48.97:6783    connecting   \n\
             -> 192.168.48.95:6783    waiting     until: never \n"
        );
        assert_eq!(
            render_connections(&status, Style::Weft),
            "-> 192.168.48.12:6783    established encrypted   fastdp aa:00:00:00:00:02(host2) encrypted=true mtu=1376\n\
             <- 192.168.48.13:44321   pending     unencrypted none   aa:00:00:00:00:03(host3)\n\
             -> 192.168.48.99:6783    failed      dial tcp4 192.168.48.99:6783: connect: connection refused, retry: 2024-05-01 12:00:00.25 +0000 UTC\n\
             -> 192.168.48.98:6783    retrying    no route to host\n\
             -> 192.168.48.97:6783    connecting\n\
             -> 192.168.48.95:6783    waiting     until: never\n"
        );
    }

    #[test]
    fn connections_lines_of_the_static_sample() {
        assert_eq!(
            render_connections(&sample(), Style::Weft),
            "-> 192.168.48.12:6783    established fastdp aa:00:00:00:00:02(host2) mtu=1376\n\
             <- 192.168.48.13:44321   pending     fastdp aa:00:00:00:00:03(host3) mtu=1376\n"
        );
        let mut status = sample();
        status.connections.clear();
        assert_eq!(render_connections(&status, Style::Weave), "");
    }

    #[test]
    fn ipv6_addresses_pad_like_the_rest() {
        let mut status = sample();
        status.connections.truncate(1);
        status.connections[0].address = "[fd00::12]:6783".to_owned();
        assert_eq!(
            render_connections(&status, Style::Weft),
            "-> [fd00::12]:6783       established fastdp aa:00:00:00:00:02(host2) mtu=1376\n"
        );
    }

    /// Section 7's live `/status/peers`, byte for byte.
    #[test]
    fn peers_match_weaver_live() {
        let live = "aa:00:00:00:00:01(h1)\n   \
                    <- 192.168.77.2:42439    aa:00:00:00:00:f2(foreign)            established\n\
                    aa:00:00:00:00:f2(foreign)\n   \
                    -> 192.168.77.1:6783     aa:00:00:00:00:01(h1)                 established\n";
        assert_eq!(render_peers(&live_password_run()), live);
        assert_eq!(
            render_peers(&sample()),
            "aa:00:00:00:00:01(host1)\n   \
             -> 192.168.48.12:6783    aa:00:00:00:00:02(host2)              established\n   \
             <- 192.168.48.13:44321   aa:00:00:00:00:03(host3)              pending\n\
             aa:00:00:00:00:02(host2)\n"
        );
    }

    #[test]
    fn targets_listing() {
        let mut status = sample();
        assert_eq!(render_targets(&status), "");
        status.targets = vec!["192.168.48.12".to_owned(), "host3:7000".to_owned()];
        assert_eq!(render_targets(&status), "192.168.48.12\nhost3:7000\n");
    }

    #[test]
    fn times_print_like_go() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 +0000 UTC");
        assert_eq!(
            format_time(1_714_564_800_250),
            "2024-05-01 12:00:00.25 +0000 UTC"
        );
        assert_eq!(
            format_time(951_782_400_001),
            "2000-02-29 00:00:00.001 +0000 UTC"
        );
        assert_eq!(
            format_time(4_107_542_399_999),
            "2100-02-28 23:59:59.999 +0000 UTC"
        );
    }

    #[test]
    fn built_from_the_mesh() {
        use std::net::SocketAddr;

        use weft::mesh::{ConnectionSummary, PeerSummary};
        let now = Instant::now();
        let wall = UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let t = TargetStatus {
            addr: "192.168.48.99:6783".parse::<SocketAddr>().unwrap(),
            direct: true,
            state: MeshTargetState::Waiting,
            last_error: Some("refused".to_owned()),
            next_try: Some(now + std::time::Duration::from_millis(1500)),
        };
        let target = Target::from_mesh(&t, now, wall);
        assert_eq!(target.state, TargetState::Failed);
        assert_eq!(target.retry_at_ms, Some(1_001_500));
        assert_eq!(target.address, "192.168.48.99:6783");
        let t = TargetStatus {
            state: MeshTargetState::Attempting,
            last_error: None,
            next_try: None,
            ..t
        };
        let target = Target::from_mesh(&t, now, wall);
        assert_eq!(
            (target.state, target.retry_at_ms),
            (TargetState::Connecting, None)
        );

        let local = PeerSummary {
            name: name("aa:00:00:00:00:01"),
            nickname: "h1".to_owned(),
            uid: 7,
            version: 2,
            short_id: Some(1),
        };
        let mut topology = Topology::new(local.clone());
        topology.set_local_connections(vec![ConnectionSummary {
            name: name("aa:00:00:00:00:f2"),
            remote_tcp_addr: "192.168.77.2:42439".to_owned(),
            outbound: false,
            established: true,
        }]);
        let foreign = PeerUpdate {
            summary: PeerSummary {
                name: name("aa:00:00:00:00:f2"),
                nickname: "foreign".to_owned(),
                uid: 42,
                version: 2,
                short_id: Some(0xf2),
            },
            connections: vec![ConnectionSummary {
                name: local.name,
                remote_tcp_addr: "192.168.77.1:6783".to_owned(),
                outbound: true,
                established: true,
            }],
        };
        topology.merge(&[foreign]);
        let mut status = live_password_run();
        let expected = status.peers.clone();
        status.peers.clear();
        status.set_peers_from_topology(&topology);
        assert_eq!(status.peers.len(), 2);
        assert_eq!(render_peers(&status), render_peers(&live_password_run()));
        assert_eq!(status.peers[1].uid, expected[1].uid);

        let c = ConnectionStatus {
            conn: 1,
            peer: name("aa:00:00:00:00:f2"),
            nickname: "foreign".to_owned(),
            remote_addr: "[fd00::2]:42439".parse().unwrap(),
            outbound: false,
            established: true,
            conn_uid: 9,
        };
        let c = Connection::from_mesh(&c, Some(0xf2), 1414);
        assert_eq!(c.address, "[fd00::2]:42439");
        assert_eq!(
            (c.direction, c.state),
            (Direction::Inbound, ConnectionState::Established)
        );
    }
}
