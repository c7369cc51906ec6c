//! The mesh-level state machine: targets and reconnects, accepting or rejecting
//! connections, topology gossip (what to send, when, to whom), peer discovery.
//!
//! Sans-I/O: every event carries `now`; each call returns the [`Action`]s the I/O
//! layer must carry out (dial, send a topology update on a connection, close one).
//! Randomness comes from a caller-supplied [`RandomSource`]. Behaviour restated from
//! Weave Net 2.8.1's mesh library (connection maker, local peer, gossip channel).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use thiserror::Error;

pub use super::topology::RandomSource;
use super::{ConnectionSummary, PeerName, PeerSummary, PeerUpdate, ShortId, topology::Topology};

/// An opaque connection id, allocated by the I/O layer.
pub type ConnKey = u64;

/// Weave's TCP (and UDP) port.
pub const DEFAULT_PORT: u16 = 6783;
/// Weave's default `--conn-limit`.
pub const DEFAULT_CONN_LIMIT: usize = 200;

/// First reconnect interval.
const INITIAL_INTERVAL: Duration = Duration::from_secs(2);
/// Largest reconnect interval.
const MAX_INTERVAL: Duration = Duration::from_secs(6 * 60);
/// A connection that fails this long after its planned try resets the backoff.
const RESET_AFTER: Duration = Duration::from_secs(60);
/// Changes are held back this long and broadcast together.
const BROADCAST_DELAY: Duration = Duration::from_secs(1);
/// Full topology gossip period.
const GOSSIP_INTERVAL: Duration = Duration::from_secs(30);
/// Garbage collection runs this long after a received update.
const GC_DELAY: Duration = Duration::from_secs(1);
/// Accept token bucket: capacity.
const ACCEPT_BURST: u32 = 20;
/// Accept token bucket: one token per this interval.
const ACCEPT_INTERVAL: Duration = Duration::from_millis(50);

/// Settings of the local peer and its mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Our peer name.
    pub name: PeerName,
    /// Our nickname (usually the host name).
    pub nickname: String,
    /// Our incarnation: random, non-zero.
    pub uid: u64,
    /// Our initial ShortID (random; re-picked on a clash we lose).
    pub short_id: ShortId,
    /// The port we listen on, used for targets given without one and for discovered
    /// inbound connections.
    pub port: u16,
    /// Maximum number of connections (0: no limit).
    pub conn_limit: usize,
    /// Whether to dial peers other peers are connected to (Weave's peer discovery).
    pub discovery: bool,
}

impl MeshConfig {
    /// A configuration with Weave's defaults (port 6783, limit 200, discovery on).
    pub fn new(name: PeerName, nickname: impl Into<String>, uid: u64, short_id: ShortId) -> Self {
        MeshConfig {
            name,
            nickname: nickname.into(),
            uid,
            short_id,
            port: DEFAULT_PORT,
            conn_limit: DEFAULT_CONN_LIMIT,
            discovery: true,
        }
    }
}

/// What the handshake of a connection told us about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// The remote peer's name (features `Name`).
    pub name: PeerName,
    /// Its nickname (features `NickName`).
    pub nickname: String,
    /// Its UID (features `UID`).
    pub uid: u64,
    /// Its ShortID, if it sent one (features `ShortID`).
    pub short_id: Option<ShortId>,
    /// Our ConnID XOR theirs.
    pub conn_uid: u64,
    /// Outbound: the address we dialled (as in [`Action::Dial`]); inbound: the
    /// remote source address.
    pub remote_addr: SocketAddr,
    /// Whether we dialled.
    pub outbound: bool,
}

/// What the I/O layer must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection to this address and run the handshake; report
    /// [`Mesh::connection_ready`], [`Mesh::dial_failed`] or [`Mesh::handshake_failed`].
    Dial(SocketAddr),
    /// Send these peers as one topology gossip message (tag 4, channel `topology`,
    /// source = our name) on the connection.
    SendTopology {
        /// The connection.
        conn: ConnKey,
        /// The peers to encode, in this order.
        updates: Vec<PeerUpdate>,
    },
    /// Close the connection (already forgotten by the mesh: reporting it closed
    /// afterwards is harmless).
    Close {
        /// The connection.
        conn: ConnKey,
        /// Why, in Weave's words.
        reason: String,
    },
    /// Peers, ShortIDs or connection states changed: re-sync the datapath.
    TopologyChanged,
}

/// A `host[:port]` that cannot be a target.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid peer name {0:?}, should be host[:port]")]
pub struct TargetError(pub String);

/// Splits `host[:port]` (`[v6]:port` and bare IPv6 too); the port is `None` if absent.
pub fn parse_host_port(spec: &str) -> Result<(String, Option<u16>), TargetError> {
    let err = || TargetError(spec.to_owned());
    if let Some(rest) = spec.strip_prefix('[') {
        let (host, tail) = rest.split_once(']').ok_or_else(err)?;
        if host.is_empty() {
            return Err(err());
        }
        return match tail {
            "" => Ok((host.to_owned(), None)),
            _ => {
                let port = tail.strip_prefix(':').ok_or_else(err)?;
                Ok((host.to_owned(), Some(port.parse().map_err(|_| err())?)))
            }
        };
    }
    if spec.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok((spec.to_owned(), None));
    }
    match spec.rsplit_once(':') {
        None if !spec.is_empty() => Ok((spec.to_owned(), None)),
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            Ok((host.to_owned(), Some(port.parse().map_err(|_| err())?)))
        }
        _ => Err(err()),
    }
}

/// A target given by the user (`weave connect`), its host already resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectPeer {
    /// The text the user gave (`forget` names it the same way).
    pub spec: String,
    /// The resolved address.
    pub ip: IpAddr,
    /// The port, if the user gave one (else our own port, and no dial while that
    /// IP has an inbound connection to us).
    pub port: Option<u16>,
}

impl DirectPeer {
    /// A target whose host is an IP literal (`ip`, `ip:port`, `[v6]:port`).
    pub fn parse_literal(spec: &str) -> Result<Self, TargetError> {
        let (host, port) = parse_host_port(spec)?;
        let ip = host.parse().map_err(|_| TargetError(spec.to_owned()))?;
        Ok(DirectPeer {
            spec: spec.to_owned(),
            ip,
            port,
        })
    }
}

/// A target's state (Weave's connection maker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// Waiting for its next try (or for ever after a name collision).
    Waiting,
    /// Being dialled.
    Attempting,
    /// A connection to it is up.
    Connected,
    /// A direct target not tried now (its peer is reachable some other way).
    Suspended,
}

/// One target, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetStatus {
    /// The address dialled.
    pub addr: SocketAddr,
    /// Given by the user (not discovered).
    pub direct: bool,
    /// Its state.
    pub state: TargetState,
    /// Why the last attempt or connection ended.
    pub last_error: Option<String>,
    /// When it is tried next (`None`: never).
    pub next_try: Option<Instant>,
}

impl TargetStatus {
    /// The word Weave's status shows: `waiting`, `failed` (waiting after an error),
    /// `connecting`, `retrying` (attempting after an error), `connected`, `suspended`.
    pub fn label(&self) -> &'static str {
        match (self.state, self.last_error.is_some()) {
            (TargetState::Waiting, false) => "waiting",
            (TargetState::Waiting, true) => "failed",
            (TargetState::Attempting, false) => "connecting",
            (TargetState::Attempting, true) => "retrying",
            (TargetState::Connected, _) => "connected",
            (TargetState::Suspended, _) => "suspended",
        }
    }
}

/// One live connection, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionStatus {
    /// Its key.
    pub conn: ConnKey,
    /// The peer at the other end.
    pub peer: PeerName,
    /// That peer's nickname as the topology knows it.
    pub nickname: String,
    /// The address dialled (outbound) or the remote source (inbound).
    pub remote_addr: SocketAddr,
    /// Whether we dialled.
    pub outbound: bool,
    /// Whether its overlay is established (`established`, else `pending`).
    pub established: bool,
    /// The ConnUID both ends share.
    pub conn_uid: u64,
}

#[derive(Debug, Clone)]
struct Target {
    state: TargetState,
    last_error: Option<String>,
    try_after: Option<Instant>,
    try_interval: Duration,
}

impl Target {
    fn new(now: Instant) -> Self {
        Target {
            state: TargetState::Waiting,
            last_error: None,
            try_after: Some(now),
            try_interval: INITIAL_INTERVAL,
        }
    }

    fn try_now(&mut self, now: Instant) {
        self.try_after = Some(now);
        self.try_interval = INITIAL_INTERVAL;
    }

    fn try_never(&mut self) {
        self.try_after = None;
        self.try_interval = MAX_INTERVAL;
    }

    /// Waits interval/2 + random(interval), then the interval grows by half, up to
    /// the maximum.
    fn try_later(&mut self, now: Instant, rng: &mut dyn RandomSource) {
        let nanos = self.try_interval.as_nanos().min(u128::from(u64::MAX)) as u64;
        let jitter = Duration::from_nanos(rng.below(nanos));
        self.try_after = Some(now + self.try_interval / 2 + jitter);
        self.try_interval = (self.try_interval * 3 / 2).min(MAX_INTERVAL);
    }
}

#[derive(Debug, Clone)]
struct LiveConn {
    info: ConnInfo,
    established: bool,
}

/// How a connection ended, for the reconnect policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndKind {
    Other,
    NameCollision,
    SelfConnect,
}

#[derive(Debug, Clone)]
struct AcceptBucket {
    tokens: u32,
    last: Instant,
}

/// The mesh's state machine. See the module documentation.
pub struct Mesh {
    config: MeshConfig,
    topology: Topology,
    rng: Box<dyn RandomSource + Send>,
    conns: BTreeMap<ConnKey, LiveConn>,
    direct: BTreeMap<String, DirectPeer>,
    targets: BTreeMap<SocketAddr, Target>,
    local_ips: BTreeSet<IpAddr>,
    pending_broadcast: Option<(Instant, BTreeSet<PeerName>)>,
    gc_at: Option<Instant>,
    next_gossip: Instant,
    accept: AcceptBucket,
    termination_count: u64,
    dirty: bool,
}

impl fmt::Debug for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mesh")
            .field("name", &self.config.name)
            .field("peers", &self.topology.len())
            .field("connections", &self.conns.len())
            .field("targets", &self.targets.len())
            .finish_non_exhaustive()
    }
}

fn peer_label(name: PeerName, nickname: &str) -> String {
    format!("{name}({nickname})")
}

impl Mesh {
    /// A mesh holding only ourselves (Version 0: the first connection raises it).
    pub fn new(config: MeshConfig, now: Instant, rng: Box<dyn RandomSource + Send>) -> Self {
        let topology = Topology::new(PeerSummary {
            name: config.name,
            nickname: config.nickname.clone(),
            uid: config.uid,
            version: 0,
            short_id: Some(config.short_id),
        });
        Mesh {
            config,
            topology,
            rng,
            conns: BTreeMap::new(),
            direct: BTreeMap::new(),
            targets: BTreeMap::new(),
            local_ips: BTreeSet::new(),
            pending_broadcast: None,
            gc_at: None,
            next_gossip: now + GOSSIP_INTERVAL,
            accept: AcceptBucket {
                tokens: ACCEPT_BURST,
                last: now,
            },
            termination_count: 0,
            dirty: false,
        }
    }

    /// Our own addresses: discovered targets on them are never dialled.
    pub fn set_local_addresses(&mut self, ips: impl IntoIterator<Item = IpAddr>) {
        self.local_ips = ips.into_iter().collect();
    }

    /// Adds targets (Weave's `connect`); with `replace`, the previous direct targets
    /// are forgotten first. A target already known is tried again at once.
    pub fn add_targets(
        &mut self,
        now: Instant,
        peers: Vec<DirectPeer>,
        replace: bool,
    ) -> Vec<Action> {
        if replace {
            self.direct.clear();
        }
        for dp in peers {
            let addr = self.complete(&dp);
            self.direct.insert(dp.spec.clone(), dp);
            if let Some(t) = self.targets.get_mut(&addr) {
                t.try_now(now);
            }
        }
        self.finish(now, Vec::new())
    }

    /// Forgets targets by the text they were given with (Weave's `forget`). A live
    /// connection stays; it is not redialled once it ends.
    pub fn forget_targets(&mut self, now: Instant, specs: &[String]) -> Vec<Action> {
        for s in specs {
            self.direct.remove(s);
        }
        self.finish(now, Vec::new())
    }

    /// A dial did not produce a connection (TCP connect failed): retry later.
    pub fn dial_failed(&mut self, now: Instant, addr: SocketAddr, reason: &str) -> Vec<Action> {
        if let Some(t) = self.targets.get_mut(&addr) {
            t.state = TargetState::Waiting;
            t.last_error = Some(reason.to_owned());
            t.try_later(now, &mut *self.rng);
        }
        self.finish(now, Vec::new())
    }

    /// An outbound connection failed during its handshake, before
    /// [`connection_ready`](Self::connection_ready).
    pub fn handshake_failed(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        reason: &str,
    ) -> Vec<Action> {
        self.ended(now, addr, true, reason, EndKind::Other);
        self.finish(now, Vec::new())
    }

    /// A connection finished its handshake. Accepts it (sending our full topology at
    /// once if the peer is new or restarted) or rejects it with an [`Action::Close`];
    /// a duplicate may also close the older connection.
    pub fn connection_ready(&mut self, now: Instant, conn: ConnKey, info: ConnInfo) -> Vec<Action> {
        let mut actions = Vec::new();
        let local = self.topology.local().summary.clone();
        let reject = |me: &mut Self, actions: &mut Vec<Action>, reason: String, kind: EndKind| {
            me.ended(now, info.remote_addr, info.outbound, &reason, kind);
            actions.push(Action::Close { conn, reason });
        };

        if info.outbound
            && !self.direct_addrs().contains(&info.remote_addr)
            && self.topology.peer(&info.name).is_none()
        {
            let reason = format!(
                "Found unknown remote name: {} at {}",
                info.name, info.remote_addr
            );
            reject(self, &mut actions, reason, EndKind::Other);
            return self.finish(now, actions);
        }
        if info.name == local.name {
            if info.uid != local.uid {
                let reason = format!(
                    "local \"{}\" and remote \"{}\" peer names collision",
                    peer_label(local.name, &local.nickname),
                    peer_label(info.name, &info.nickname)
                );
                reject(self, &mut actions, reason, EndKind::NameCollision);
            } else {
                let reason = "cannot connect to ourself".to_owned();
                reject(self, &mut actions, reason, EndKind::SelfConnect);
            }
            return self.finish(now, actions);
        }

        let noted = self.topology.note_peer(PeerSummary {
            name: info.name,
            nickname: info.nickname.clone(),
            uid: info.uid,
            version: 0,
            short_id: info.short_id,
        });
        if noted.added {
            self.dirty = true;
            self.check_short_id(now);
        }

        if let Some((&old_key, old)) = self.conns.iter().find(|(_, c)| c.info.name == info.name) {
            let remote_nick = self
                .topology
                .peer(&info.name)
                .map(|p| p.summary.nickname.clone())
                .unwrap_or_default();
            let reason = format!(
                "Multiple connections to {} added to {}",
                peer_label(info.name, &remote_nick),
                peer_label(local.name, &local.nickname)
            );
            let old_uid = old.info.conn_uid;
            if info.conn_uid <= old_uid {
                // The new one has the lower ConnUID (or a tie): the old one goes.
                // No GC here: the peer must stay for the new connection.
                self.drop_conn(now, old_key, &reason, false);
                actions.push(Action::Close {
                    conn: old_key,
                    reason: reason.clone(),
                });
            }
            if info.conn_uid >= old_uid {
                reject(self, &mut actions, reason, EndKind::Other);
                return self.finish(now, actions);
            }
        }

        if self.config.conn_limit != 0 && self.conns.len() >= self.config.conn_limit {
            let reason = format!("Connection limit reached ({})", self.config.conn_limit);
            reject(self, &mut actions, reason, EndKind::Other);
            return self.finish(now, actions);
        }

        let connected_before = self.topology.routes(true).contains_key(&info.name);
        let (name, outbound, addr) = (info.name, info.outbound, info.remote_addr);
        self.conns.insert(
            conn,
            LiveConn {
                info,
                established: false,
            },
        );
        self.sync_local();
        if noted.restarted || !connected_before {
            actions.push(Action::SendTopology {
                conn,
                updates: self.topology.all_updates(),
            });
        }
        self.broadcast_later(now, Some(name));
        if let (true, Some(t)) = (outbound, self.targets.get_mut(&addr)) {
            t.state = TargetState::Connected;
        }
        self.finish(now, actions)
    }

    /// The connection's overlay is established: our Version goes up and the new
    /// state is gossiped (held back like every change).
    pub fn connection_established(&mut self, now: Instant, conn: ConnKey) -> Vec<Action> {
        if let Some(c) = self.conns.get_mut(&conn).filter(|c| !c.established) {
            c.established = true;
            self.sync_local();
            self.broadcast_later(now, None);
        }
        self.finish(now, Vec::new())
    }

    /// A connection ended (for any reason the I/O layer saw). Unknown keys are
    /// ignored (connections the mesh closed itself are already forgotten).
    pub fn connection_closed(&mut self, now: Instant, conn: ConnKey, reason: &str) -> Vec<Action> {
        self.drop_conn(now, conn, reason, true);
        self.finish(now, Vec::new())
    }

    /// Topology gossip arrived on a connection: merge it, relay what was new to other
    /// neighbours, re-pick our ShortID if we lost it.
    pub fn topology_received(
        &mut self,
        now: Instant,
        conn: ConnKey,
        updates: Vec<PeerUpdate>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(src) = self.conns.get(&conn).map(|c| c.info.name) else {
            return self.finish(now, actions);
        };
        let out = self.topology.merge(&updates);
        if out.is_change() {
            self.dirty = true;
        }
        if out.local_version_raised {
            self.broadcast_later(now, None);
        }
        self.check_short_id(now);
        if !out.changed.is_empty() {
            let relay = self.topology.updates_for(&out.changed);
            for k in self.random_neighbours(Some(src)) {
                actions.push(Action::SendTopology {
                    conn: k,
                    updates: relay.clone(),
                });
            }
        }
        self.gc_at.get_or_insert(now + GC_DELAY);
        self.finish(now, actions)
    }

    /// Whether an inbound connection may be accepted now (token bucket: 20 at once,
    /// one more every 50 ms). Takes a token when it says yes.
    pub fn accept_allowed(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.accept.tokens > 0 {
            self.accept.tokens -= 1;
            true
        } else {
            false
        }
    }

    /// When the next accept token is available.
    pub fn accept_ready_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.accept.tokens > 0 {
            now
        } else {
            self.accept.last + ACCEPT_INTERVAL
        }
    }

    fn refill(&mut self, now: Instant) {
        let b = &mut self.accept;
        let elapsed = now.saturating_duration_since(b.last);
        let n = (elapsed.as_nanos() / ACCEPT_INTERVAL.as_nanos()) as u64;
        if n == 0 {
            return;
        }
        let tokens = u64::from(b.tokens) + n;
        if tokens >= u64::from(ACCEPT_BURST) {
            b.tokens = ACCEPT_BURST;
            b.last = now;
        } else {
            b.tokens = tokens as u32;
            b.last += ACCEPT_INTERVAL * n as u32;
        }
    }

    /// Runs what is due: reconnects, the held-back change broadcast, garbage
    /// collection, the periodic full gossip.
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        self.finish(now, Vec::new())
    }

    /// When [`poll`](Self::poll) next has something to do.
    pub fn next_deadline(&self) -> Instant {
        let mut at = self.next_gossip;
        let timers = [self.gc_at, self.pending_broadcast.as_ref().map(|(t, _)| *t)];
        for t in timers.into_iter().flatten() {
            at = at.min(t);
        }
        for t in self.targets.values() {
            if let (TargetState::Waiting, Some(when)) = (t.state, t.try_after) {
                at = at.min(when);
            }
        }
        at
    }

    /// The topology (peers, their connections, ShortIDs, routes).
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Our own summary as we gossip it.
    pub fn local(&self) -> &PeerSummary {
        &self.topology.local().summary
    }

    /// Live (accepted) connections, by key.
    pub fn connections(&self) -> Vec<ConnectionStatus> {
        self.conns
            .iter()
            .map(|(k, c)| ConnectionStatus {
                conn: *k,
                peer: c.info.name,
                nickname: self
                    .topology
                    .peer(&c.info.name)
                    .map(|p| p.summary.nickname.clone())
                    .unwrap_or_default(),
                remote_addr: c.info.remote_addr,
                outbound: c.info.outbound,
                established: c.established,
                conn_uid: c.info.conn_uid,
            })
            .collect()
    }

    /// Every target (direct and discovered) with its state.
    pub fn targets(&self) -> Vec<TargetStatus> {
        let direct = self.direct_addrs();
        self.targets
            .iter()
            .map(|(addr, t)| TargetStatus {
                addr: *addr,
                direct: direct.contains(addr),
                state: t.state,
                last_error: t.last_error.clone(),
                next_try: t.try_after,
            })
            .collect()
    }

    /// The direct targets as the user gave them (Weave's `status/targets`), sorted.
    pub fn direct_targets(&self) -> Vec<String> {
        self.direct.keys().cloned().collect()
    }

    /// Connections ended so far (self-connections not counted), as Weave's
    /// `TerminationCount`.
    pub fn termination_count(&self) -> u64 {
        self.termination_count
    }

    // ---- internals ----

    fn complete(&self, dp: &DirectPeer) -> SocketAddr {
        SocketAddr::new(dp.ip, dp.port.unwrap_or(self.config.port))
    }

    fn direct_addrs(&self) -> BTreeSet<SocketAddr> {
        self.direct.values().map(|dp| self.complete(dp)).collect()
    }

    /// Our connection list from the live connections; raises our Version if changed.
    fn sync_local(&mut self) {
        let mut list: Vec<ConnectionSummary> = self
            .conns
            .values()
            .map(|c| ConnectionSummary {
                name: c.info.name,
                remote_tcp_addr: c.info.remote_addr.to_string(),
                outbound: c.info.outbound,
                established: c.established,
            })
            .collect();
        list.sort_by_key(|c| c.name);
        if self.topology.set_local_connections(list) {
            self.dirty = true;
        }
    }

    /// Re-picks our ShortID if a lower-named peer holds it.
    fn check_short_id(&mut self, now: Instant) {
        if self
            .topology
            .reassign_local_short_id(&mut *self.rng)
            .is_some()
        {
            self.dirty = true;
            self.broadcast_later(now, None);
        }
    }

    /// Queues names for the held-back broadcast (ourselves are always added).
    fn broadcast_later(&mut self, now: Instant, name: Option<PeerName>) {
        let (_, names) = self
            .pending_broadcast
            .get_or_insert_with(|| (now + BROADCAST_DELAY, BTreeSet::new()));
        names.extend(name);
    }

    /// Removes a live connection (if known): our list changes, unreachable peers go,
    /// the change is broadcast, the target learns how it ended.
    fn drop_conn(&mut self, now: Instant, conn: ConnKey, reason: &str, gc: bool) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        self.sync_local();
        if gc {
            self.run_gc(now);
        }
        self.broadcast_later(now, None);
        self.ended(
            now,
            c.info.remote_addr,
            c.info.outbound,
            reason,
            EndKind::Other,
        );
    }

    /// Weave's connection-terminated bookkeeping.
    fn ended(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        outbound: bool,
        reason: &str,
        kind: EndKind,
    ) {
        if kind != EndKind::SelfConnect {
            self.termination_count += 1;
        }
        if !outbound {
            return;
        }
        let Some(t) = self.targets.get_mut(&addr) else {
            return;
        };
        t.state = TargetState::Waiting;
        t.last_error = Some(reason.to_owned());
        match kind {
            EndKind::NameCollision | EndKind::SelfConnect => t.try_never(),
            EndKind::Other => match t.try_after {
                Some(planned) if now <= planned + RESET_AFTER => t.try_later(now, &mut *self.rng),
                _ => t.try_now(now),
            },
        }
    }

    fn run_gc(&mut self, now: Instant) {
        let removed = self.topology.gc();
        if !removed.is_empty() {
            self.dirty = true;
            if let Some((_, names)) = &mut self.pending_broadcast {
                for n in &removed {
                    names.remove(n);
                }
            }
            self.check_short_id(now);
        }
    }

    /// Weave's fan-out: min(2·log2(peers), neighbours) neighbours, drawn at random,
    /// weighted by how many peers each one is the next hop to. `except` is left out.
    fn random_neighbours(&mut self, except: Option<PeerName>) -> Vec<ConnKey> {
        let routes = self.topology.routes(false);
        let mut weights: BTreeMap<PeerName, u64> = BTreeMap::new();
        for hop in routes.values() {
            if Some(*hop) != except {
                *weights.entry(*hop).or_default() += 1;
            }
        }
        let peers = (routes.len() + 1) as f64;
        let needed = ((2.0 * peers.log2()).floor() as usize).min(weights.len());
        let mut total: u64 = weights.values().sum();
        let mut chosen = BTreeSet::new();
        while chosen.len() < needed && total > 0 {
            let mut point = self.rng.below(total);
            let mut pick = None;
            for (name, count) in &weights {
                if point < *count {
                    pick = Some((*name, *count));
                    break;
                }
                point -= count;
            }
            let Some((name, count)) = pick else { break };
            weights.remove(&name);
            total -= count;
            chosen.insert(name);
        }
        self.conns
            .iter()
            .filter(|(_, c)| chosen.contains(&c.info.name))
            .map(|(k, _)| *k)
            .collect()
    }

    fn send_to_neighbours(&mut self, updates: Vec<PeerUpdate>, actions: &mut Vec<Action>) {
        for k in self.random_neighbours(None) {
            actions.push(Action::SendTopology {
                conn: k,
                updates: updates.clone(),
            });
        }
    }

    /// Timers, targets, and the change notice; appended to `actions`.
    fn finish(&mut self, now: Instant, mut actions: Vec<Action>) -> Vec<Action> {
        if self.gc_at.is_some_and(|t| t <= now) {
            self.gc_at = None;
            self.run_gc(now);
        }
        if self
            .pending_broadcast
            .as_ref()
            .is_some_and(|(t, _)| *t <= now)
        {
            let (_, mut names) = self.pending_broadcast.take().expect("checked");
            names.insert(self.config.name);
            let updates = self.topology.updates_for(&names);
            self.send_to_neighbours(updates, &mut actions);
        }
        if self.next_gossip <= now {
            self.next_gossip += GOSSIP_INTERVAL;
            if self.next_gossip <= now {
                self.next_gossip = now + GOSSIP_INTERVAL;
            }
            let updates = self.topology.all_updates();
            self.send_to_neighbours(updates, &mut actions);
        }
        self.connect_to_targets(now, &mut actions);
        if std::mem::take(&mut self.dirty) {
            actions.push(Action::TopologyChanged);
        }
        actions
    }

    /// Weave's connection maker: which addresses to try, and dialling those due.
    fn connect_to_targets(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let connected_peers: BTreeSet<PeerName> =
            self.conns.values().map(|c| c.info.name).collect();
        let connected_addrs: BTreeSet<SocketAddr> =
            self.conns.values().map(|c| c.info.remote_addr).collect();
        let inbound_ips: BTreeSet<IpAddr> = self
            .conns
            .values()
            .filter(|c| !c.info.outbound)
            .map(|c| c.info.remote_addr.ip())
            .collect();

        let mut wanted: Vec<SocketAddr> = Vec::new();
        let mut direct_set = BTreeSet::new();
        for dp in self.direct.values() {
            let addr = self.complete(dp);
            direct_set.insert(addr);
            // Without a port: not while that IP has an inbound connection to us.
            if dp.port.is_some() || !inbound_ips.contains(&dp.ip) {
                wanted.push(addr);
            }
        }
        if self.config.discovery {
            for p in self.topology.peers() {
                if p.summary.name == self.config.name {
                    continue;
                }
                for c in &p.connections {
                    if c.name == self.config.name || connected_peers.contains(&c.name) {
                        continue;
                    }
                    let Ok(addr) = c.remote_tcp_addr.parse::<SocketAddr>() else {
                        continue;
                    };
                    let addr = if c.outbound {
                        addr
                    } else {
                        // An inbound connection's port is ephemeral: try our port.
                        SocketAddr::new(addr.ip(), self.config.port)
                    };
                    if !self.local_ips.contains(&addr.ip()) {
                        wanted.push(addr);
                    }
                }
            }
        }
        let mut valid = BTreeSet::new();
        for addr in wanted {
            if connected_addrs.contains(&addr) {
                continue;
            }
            valid.insert(addr);
            self.targets.entry(addr).or_insert_with(|| Target::new(now));
        }

        let limit_reached =
            self.config.conn_limit != 0 && self.conns.len() >= self.config.conn_limit;
        let mut forget = Vec::new();
        for (addr, t) in self.targets.iter_mut() {
            if !matches!(t.state, TargetState::Waiting | TargetState::Suspended) {
                continue;
            }
            if !valid.contains(addr) {
                if direct_set.contains(addr) {
                    t.state = TargetState::Suspended;
                } else {
                    forget.push(*addr);
                }
                continue;
            }
            let Some(when) = t.try_after else { continue };
            t.state = TargetState::Waiting;
            if when <= now {
                if limit_reached {
                    t.last_error = Some(format!(
                        "Connection limit reached ({})",
                        self.config.conn_limit
                    ));
                    t.try_later(now, &mut *self.rng);
                } else {
                    t.state = TargetState::Attempting;
                    actions.push(Action::Dial(*addr));
                }
            }
        }
        for addr in forget {
            self.targets.remove(&addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::mesh::topology::tests::{conn as csum, name, summary};

    fn rng_const(v: u64) -> Box<dyn RandomSource + Send> {
        Box::new(move || v)
    }

    /// splitmix64, deterministic.
    fn rng_seeded(mut state: u64) -> Box<dyn RandomSource + Send> {
        Box::new(move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn sa(last: u8, port: u16) -> SocketAddr {
        SocketAddr::new(ip(last), port)
    }

    fn config(last: u8, short_id: ShortId) -> MeshConfig {
        MeshConfig::new(
            name(last),
            format!("h{last}"),
            1000 + u64::from(last),
            short_id,
        )
    }

    fn mesh(last: u8, now: Instant) -> Mesh {
        Mesh::new(config(last, u16::from(last) * 10), now, rng_const(0))
    }

    fn info(last: u8, conn_uid: u64, remote_addr: SocketAddr, outbound: bool) -> ConnInfo {
        ConnInfo {
            name: name(last),
            nickname: format!("h{last}"),
            uid: 1000 + u64::from(last),
            short_id: Some(u16::from(last) * 10),
            conn_uid,
            remote_addr,
            outbound,
        }
    }

    fn dials(actions: &[Action]) -> Vec<SocketAddr> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Dial(addr) => Some(*addr),
                _ => None,
            })
            .collect()
    }

    fn sends(actions: &[Action]) -> Vec<(ConnKey, Vec<PeerUpdate>)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendTopology { conn, updates } => Some((*conn, updates.clone())),
                _ => None,
            })
            .collect()
    }

    fn closes(actions: &[Action]) -> Vec<(ConnKey, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Close { conn, reason } => Some((*conn, reason.clone())),
                _ => None,
            })
            .collect()
    }

    fn direct(spec: &str) -> Vec<DirectPeer> {
        vec![DirectPeer::parse_literal(spec).unwrap()]
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn host_port_parsing() {
        assert_eq!(parse_host_port("h1").unwrap(), ("h1".into(), None));
        assert_eq!(
            parse_host_port("h1:6000").unwrap(),
            ("h1".into(), Some(6000))
        );
        assert_eq!(parse_host_port("[::1]:7").unwrap(), ("::1".into(), Some(7)));
        assert_eq!(
            parse_host_port("fe80::1").unwrap(),
            ("fe80::1".into(), None)
        );
        for bad in ["", ":6783", "h1:x", "[::1", "[]:1", "h1:99999"] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
        let dp = DirectPeer::parse_literal("10.0.0.2").unwrap();
        assert_eq!((dp.ip, dp.port), (ip(2), None));
        assert!(DirectPeer::parse_literal("example.org:1").is_err());
    }

    #[test]
    fn backoff_sequence() {
        let t0 = Instant::now();
        // Random source at its maximum: each wait sits at the top of its range.
        let mut m = Mesh::new(config(1, 10), t0, rng_const(u64::MAX));
        let addr = sa(2, DEFAULT_PORT);
        assert_eq!(
            dials(&m.add_targets(t0, direct("10.0.0.2"), false)),
            vec![addr]
        );
        assert_eq!(m.targets()[0].label(), "connecting");
        let mut now = t0;
        let mut interval = INITIAL_INTERVAL;
        for i in 0..30 {
            assert!(dials(&m.dial_failed(now, addr, "connection refused")).is_empty());
            let t = &m.targets()[0];
            assert_eq!(t.label(), "failed");
            assert_eq!(t.last_error.as_deref(), Some("connection refused"));
            let wait = t.next_try.unwrap() - now;
            assert!(
                wait >= interval / 2 && wait < interval / 2 + interval,
                "step {i}: {wait:?}"
            );
            let due = t.next_try.unwrap();
            assert!(m.next_deadline() <= due);
            assert!(dials(&m.poll(due - Duration::from_millis(1))).is_empty());
            assert_eq!(dials(&m.poll(due)), vec![addr], "step {i}");
            assert_eq!(m.targets()[0].label(), "retrying");
            now = due;
            interval = (interval * 3 / 2).min(MAX_INTERVAL);
        }
        assert_eq!(interval, MAX_INTERVAL);

        // Exact values with a zero random source: 1 s, 1.5 s, 2.25 s, ...
        let mut m = mesh(1, t0);
        m.add_targets(t0, direct("10.0.0.2"), false);
        let mut now = t0;
        for expect in [1.0, 1.5, 2.25, 3.375] {
            m.dial_failed(now, addr, "refused");
            let due = m.targets()[0].next_try.unwrap();
            assert_eq!(due - now, secs(expect));
            assert_eq!(dials(&m.poll(due)), vec![addr]);
            now = due;
        }
    }

    #[test]
    fn backoff_resets_after_a_long_lived_connection() {
        let t0 = Instant::now();
        let mut m = mesh(1, t0);
        let addr = sa(2, DEFAULT_PORT);
        m.add_targets(t0, direct("10.0.0.2"), false);
        // Two failures grow the interval to 4.5 s.
        m.dial_failed(t0, addr, "refused");
        let t1 = m.targets()[0].next_try.unwrap();
        m.poll(t1);
        m.dial_failed(t1, addr, "refused");
        let t2 = m.targets()[0].next_try.unwrap();
        assert_eq!(t2 - t1, secs(1.5));
        m.poll(t2);
        m.connection_ready(t2, 1, info(2, 5, addr, true));
        assert_eq!(m.targets()[0].state, TargetState::Connected);
        // Ends 30 s after the planned try: back off further (4.5 s / 2).
        let a = m.connection_closed(t2 + secs(30.0), 1, "EOF");
        assert!(dials(&a).is_empty());
        let t3 = m.targets()[0].next_try.unwrap();
        assert_eq!(t3 - (t2 + secs(30.0)), secs(2.25));
        m.poll(t3);
        m.connection_ready(t3, 2, info(2, 6, addr, true));
        // Ends more than a minute after the planned try: redial at once.
        let end = t3 + secs(61.0);
        let a = m.connection_closed(end, 2, "EOF");
        assert_eq!(dials(&a), vec![addr]);
        m.dial_failed(end, addr, "refused");
        assert_eq!(m.targets()[0].next_try.unwrap() - end, secs(1.0));
    }

    #[test]
    fn name_collision_and_self_connection_are_never_retried() {
        let t0 = Instant::now();
        let mut m = mesh(1, t0);
        let addr = sa(9, DEFAULT_PORT);
        m.add_targets(t0, direct("10.0.0.9"), false);
        let mut clash = info(1, 5, addr, true);
        clash.uid = 77;
        clash.nickname = "other".into();
        let a = m.connection_ready(t0, 1, clash);
        assert_eq!(
            closes(&a),
            vec![(
                1,
                "local \"aa:00:00:00:00:01(h1)\" and remote \"aa:00:00:00:00:01(other)\" peer names collision"
                    .to_owned()
            )]
        );
        assert!(m.connections().is_empty());
        assert_eq!(m.termination_count(), 1);
        let t = &m.targets()[0];
        assert_eq!((t.label(), t.next_try), ("failed", None));
        assert!(dials(&m.poll(t0 + Duration::from_secs(3600))).is_empty());
        // `connect` again curtails the wait, as in Weave.
        assert_eq!(
            dials(&m.add_targets(t0, direct("10.0.0.9"), false)),
            vec![addr]
        );

        let mut m = mesh(1, t0);
        let addr = sa(1, DEFAULT_PORT);
        m.add_targets(t0, direct("10.0.0.1"), false);
        let a = m.connection_ready(t0, 1, info(1, 5, addr, true));
        assert_eq!(
            closes(&a),
            vec![(1, "cannot connect to ourself".to_owned())]
        );
        assert_eq!(m.termination_count(), 0);
        assert_eq!(m.targets()[0].next_try, None);
        assert!(dials(&m.poll(t0 + Duration::from_secs(3600))).is_empty());
        assert_eq!(m.topology().len(), 1);
    }

    #[test]
    fn duplicate_connections_keep_the_lower_conn_uid() {
        let t0 = Instant::now();
        let mut m = mesh(1, t0);
        let dup = "Multiple connections to aa:00:00:00:00:02(h2) added to aa:00:00:00:00:01(h1)";
        assert!(closes(&m.connection_ready(t0, 1, info(2, 50, sa(2, 40001), false))).is_empty());
        // Lower ConnUID: the older connection goes.
        let a = m.connection_ready(t0, 2, info(2, 40, sa(2, 40002), false));
        assert_eq!(closes(&a), vec![(1, dup.to_owned())]);
        assert_eq!(
            m.connections().iter().map(|c| c.conn).collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(m.topology().local().connections.len(), 1);
        assert!(m.topology().peer(&name(2)).is_some());
        // Higher ConnUID: the new one goes.
        let a = m.connection_ready(t0, 3, info(2, 60, sa(2, 40003), false));
        assert_eq!(closes(&a), vec![(3, dup.to_owned())]);
        assert_eq!(
            m.connections().iter().map(|c| c.conn).collect::<Vec<_>>(),
            vec![2]
        );
        // A tie: both go.
        let a = m.connection_ready(t0, 4, info(2, 40, sa(2, 40004), false));
        assert_eq!(closes(&a), vec![(2, dup.to_owned()), (4, dup.to_owned())]);
        assert!(m.connections().is_empty());
        assert!(m.topology().local().connections.is_empty());
        // Reporting the closed ones again is harmless.
        assert!(m.connection_closed(t0, 2, "closed").is_empty());
    }

    #[test]
    fn connection_limit() {
        let t0 = Instant::now();
        assert_eq!(MeshConfig::new(name(1), "", 1, 1).conn_limit, 200);
        let mut cfg = config(1, 10);
        cfg.conn_limit = 2;
        let mut m = Mesh::new(cfg, t0, rng_const(0));
        assert!(closes(&m.connection_ready(t0, 1, info(2, 1, sa(2, 40000), false))).is_empty());
        assert!(closes(&m.connection_ready(t0, 2, info(3, 1, sa(3, 40000), false))).is_empty());
        let a = m.connection_ready(t0, 3, info(4, 1, sa(4, 40000), false));
        assert_eq!(
            closes(&a),
            vec![(3, "Connection limit reached (2)".to_owned())]
        );
        assert_eq!(m.connections().len(), 2);
        // A target due while at the limit is not dialled.
        let a = m.add_targets(t0, direct("10.0.0.5"), false);
        assert!(dials(&a).is_empty());
        let t = &m.targets()[0];
        assert_eq!(
            t.last_error.as_deref(),
            Some("Connection limit reached (2)")
        );
        assert_eq!(t.label(), "failed");
    }

    #[test]
    fn full_topology_on_ready_then_established_gossip() {
        let t0 = Instant::now();
        let mut m = mesh(1, t0);
        let a = m.connection_ready(t0, 7, info(2, 1, sa(2, 40000), false));
        assert!(a.contains(&Action::TopologyChanged));
        let s = sends(&a);
        assert_eq!(s.len(), 1);
        let (k, updates) = &s[0];
        assert_eq!(*k, 7);
        assert_eq!(updates[0].summary.name, name(1));
        let v1 = updates[0].summary.version;
        assert!(v1 >= 1);
        assert_eq!(updates[0].summary.short_id, Some(10));
        assert_eq!(
            updates[0].connections,
            vec![csum(2, "10.0.0.2:40000", false, false)]
        );
        assert_eq!(
            updates[1].summary,
            PeerSummary {
                version: 0,
                ..summary(2, 1002, 0, Some(20))
            }
        );

        let a = m.connection_established(t0 + secs(0.2), 7);
        assert!(sends(&a).is_empty(), "held back");
        assert!(m.local().version > v1);
        assert!(sends(&m.poll(t0 + secs(0.99))).is_empty());
        let s = sends(&m.poll(t0 + secs(1.0)));
        assert_eq!(s.len(), 1);
        let ours = &s[0].1[0];
        assert_eq!(ours.summary.name, name(1));
        assert!(ours.summary.version > v1);
        assert_eq!(
            ours.connections,
            vec![csum(2, "10.0.0.2:40000", false, true)]
        );
        assert!(m.connections()[0].established);
    }

    #[test]
    fn discovery_dials_advertised_addresses() {
        let t0 = Instant::now();
        let mut m = mesh(1, t0);
        m.set_local_addresses([ip(1)]);
        let b = sa(2, DEFAULT_PORT);
        assert_eq!(
            dials(&m.add_targets(t0, direct("10.0.0.2"), false)),
            vec![b]
        );
        m.connection_ready(t0, 1, info(2, 1, b, true));
        let gossip = vec![
            PeerUpdate {
                summary: summary(2, 1002, 3, Some(20)),
                connections: vec![
                    csum(1, "10.0.0.1:45000", false, true),
                    csum(3, "10.0.0.3:6783", true, true),
                    csum(5, "10.0.0.1:6783", true, true),
                ],
            },
            PeerUpdate {
                summary: summary(3, 1003, 2, Some(30)),
                connections: vec![
                    csum(2, "10.0.0.2:41000", false, true),
                    csum(4, "10.0.0.4:42000", false, true),
                ],
            },
        ];
        let a = m.topology_received(t0, 1, gossip);
        let mut d = dials(&a);
        d.sort();
        // C's outbound address as advertised; D (inbound at C) on our port; never
        // ourselves (by name or by address), never B (connected).
        assert_eq!(d, vec![sa(3, DEFAULT_PORT), sa(4, DEFAULT_PORT)]);
        assert!(m.targets().iter().all(|t| t.addr.ip() != ip(1)));
        // A discovered address must lead to a peer we know.
        let a = m.connection_ready(t0, 2, info(6, 1, sa(4, DEFAULT_PORT), true));
        assert_eq!(
            closes(&a),
            vec![(
                2,
                "Found unknown remote name: aa:00:00:00:00:06 at 10.0.0.4:6783".to_owned()
            )]
        );
        // Once connected to C by name, its address stops being a target (when the
        // attempt in flight ends).
        m.connection_ready(t0, 3, info(3, 1, sa(3, 9999), false));
        let a = m.dial_failed(t0, sa(3, DEFAULT_PORT), "connection refused");
        assert!(dials(&a).is_empty());
        assert!(m.targets().iter().all(|t| t.addr != sa(3, DEFAULT_PORT)));
        assert!(
            dials(&m.poll(t0 + secs(600.0)))
                .iter()
                .all(|d| *d != sa(3, DEFAULT_PORT))
        );
    }

    #[test]
    fn relay_change_set_to_other_neighbours() {
        let t0 = Instant::now();
        let mut m = mesh(1, t0);
        m.connection_ready(t0, 1, info(2, 1, sa(2, 40000), false));
        m.connection_ready(t0, 2, info(3, 1, sa(3, 40000), false));
        let d = PeerUpdate {
            summary: summary(4, 1004, 1, Some(40)),
            connections: vec![csum(2, "10.0.0.2:6783", true, false)],
        };
        let b = PeerUpdate {
            summary: summary(2, 1002, 1, Some(20)),
            connections: vec![
                csum(1, "10.0.0.1:6783", true, false),
                csum(4, "10.0.0.4:1", false, false),
            ],
        };
        let a = m.topology_received(t0, 1, vec![b.clone(), d.clone()]);
        let s = sends(&a);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, 2, "not back to the sender");
        assert_eq!(s[0].1, vec![b.clone(), d.clone()]);
        assert!(a.contains(&Action::TopologyChanged));
        // Nothing new: nothing relayed.
        assert!(sends(&m.topology_received(t0, 1, vec![b, d])).is_empty());
        // Unknown connection: ignored.
        assert!(m.topology_received(t0, 99, vec![]).is_empty());
    }

    #[test]
    fn full_gossip_every_30_seconds() {
        let t0 = Instant::now();
        let mut m = mesh(1, t0);
        m.connection_ready(t0, 1, info(2, 1, sa(2, 40000), false));
        m.connection_ready(t0, 2, info(3, 1, sa(3, 40000), false));
        assert_eq!(sends(&m.poll(t0 + secs(1.0))).len(), 2, "held-back change");
        assert!(sends(&m.poll(t0 + secs(29.9))).is_empty());
        assert_eq!(m.next_deadline(), t0 + secs(30.0));
        let s = sends(&m.poll(t0 + secs(30.0)));
        assert_eq!(s.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![1, 2]);
        assert!(s.iter().all(|(_, u)| *u == m.topology().all_updates()));
        assert!(sends(&m.poll(t0 + secs(59.9))).is_empty());
        assert_eq!(sends(&m.poll(t0 + secs(60.0))).len(), 2);
    }

    #[test]
    fn fan_out_follows_weaves_rule() {
        // Ten neighbours, eleven peers: 2·log2(11) = 6.9, so six neighbours.
        let t0 = Instant::now();
        let mut m = Mesh::new(config(1, 10), t0, rng_seeded(3));
        for i in 0..10u8 {
            m.connection_ready(t0, u64::from(i), info(10 + i, 1, sa(10 + i, 40000), false));
        }
        m.poll(t0 + secs(1.0));
        let s = sends(&m.poll(t0 + secs(30.0)));
        assert!(s.iter().all(|(_, u)| u.len() == 11));
        let targets: BTreeSet<ConnKey> = s.iter().map(|(k, _)| *k).collect();
        assert_eq!(targets.len(), 6);
    }

    #[test]
    fn losing_our_short_id_repicks_and_gossips() {
        let t0 = Instant::now();
        // We are ...:05 with ShortID 50; ...:02 also claims 50.
        let mut m = Mesh::new(config(5, 50), t0, rng_const(123));
        m.connection_ready(t0, 1, info(6, 1, sa(6, 40000), false));
        m.poll(t0 + secs(1.0));
        let v = m.local().version;
        let clash = PeerUpdate {
            summary: summary(2, 1002, 1, Some(50)),
            connections: vec![csum(6, "10.0.0.6:6783", true, true)],
        };
        let a = m.topology_received(t0 + secs(2.0), 1, vec![clash]);
        assert!(a.contains(&Action::TopologyChanged));
        assert_eq!(m.local().short_id, Some(123));
        assert!(m.local().version > v);
        assert_eq!(m.topology().short_id_owners()[&50], name(2));
        let s = sends(&m.poll(t0 + secs(3.0)));
        assert_eq!(s[0].1[0].summary.short_id, Some(123));
    }

    #[test]
    fn accept_token_bucket() {
        let t0 = Instant::now();
        let mut m = mesh(1, t0);
        for _ in 0..20 {
            assert!(m.accept_allowed(t0));
        }
        assert!(!m.accept_allowed(t0));
        assert_eq!(m.accept_ready_at(t0), t0 + ACCEPT_INTERVAL);
        assert!(!m.accept_allowed(t0 + Duration::from_millis(49)));
        assert!(m.accept_allowed(t0 + Duration::from_millis(50)));
        assert!(!m.accept_allowed(t0 + Duration::from_millis(60)));
        // After a long pause the bucket holds 20 again, not more.
        let later = t0 + Duration::from_secs(10);
        assert_eq!((0..30).filter(|_| m.accept_allowed(later)).count(), 20);
    }

    #[test]
    fn gc_after_connection_loss() {
        let t0 = Instant::now();
        let mut m = mesh(1, t0);
        m.connection_ready(t0, 1, info(2, 1, sa(2, 40000), false));
        m.topology_received(
            t0,
            1,
            vec![PeerUpdate {
                summary: summary(2, 1002, 1, Some(20)),
                connections: vec![csum(3, "10.0.0.3:6783", true, false)],
            }],
        );
        assert_eq!(m.topology().len(), 3);
        let a = m.connection_closed(t0 + secs(0.5), 1, "EOF");
        assert!(a.contains(&Action::TopologyChanged));
        assert_eq!(m.topology().len(), 1);
    }

    /// Routers wired to each other in memory: dials reach the router at that IP,
    /// topology messages go straight into the other end's `topology_received`.
    struct Sim {
        meshes: Vec<Mesh>,
        links: BTreeMap<(usize, ConnKey), (usize, ConnKey)>,
        queue: VecDeque<(usize, Action)>,
        establish: Vec<((usize, ConnKey), (usize, ConnKey))>,
        next_key: ConnKey,
        next_port: u16,
        rng: Box<dyn RandomSource + Send>,
        now: Instant,
    }

    impl Sim {
        fn new(ids: &[(u8, ShortId)], now: Instant) -> Self {
            let meshes = ids
                .iter()
                .map(|(last, sid)| {
                    let mut m = Mesh::new(config(*last, *sid), now, rng_seeded(u64::from(*last)));
                    m.set_local_addresses([ip(*last)]);
                    m
                })
                .collect();
            Sim {
                meshes,
                links: BTreeMap::new(),
                queue: VecDeque::new(),
                establish: Vec::new(),
                next_key: 1,
                next_port: 40000,
                rng: rng_seeded(99),
                now,
            }
        }

        fn push(&mut self, i: usize, actions: Vec<Action>) {
            self.queue.extend(actions.into_iter().map(|a| (i, a)));
        }

        fn index_of(&self, addr: SocketAddr) -> Option<usize> {
            self.meshes.iter().position(|m| {
                let last = m.local().name.0[5];
                addr == sa(last, DEFAULT_PORT)
            })
        }

        fn info_of(
            &self,
            i: usize,
            conn_uid: u64,
            remote_addr: SocketAddr,
            outbound: bool,
        ) -> ConnInfo {
            let s = self.meshes[i].local();
            ConnInfo {
                name: s.name,
                nickname: s.nickname.clone(),
                uid: s.uid,
                short_id: s.short_id,
                conn_uid,
                remote_addr,
                outbound,
            }
        }

        fn dial(&mut self, i: usize, addr: SocketAddr) {
            let now = self.now;
            let Some(j) = self.index_of(addr) else {
                let a = self.meshes[i].dial_failed(now, addr, "no route to host");
                self.push(i, a);
                return;
            };
            let (ka, kb) = (self.next_key, self.next_key + 1);
            self.next_key += 2;
            self.next_port += 1;
            let src = sa(self.meshes[i].local().name.0[5], self.next_port);
            let conn_uid = self.rng.next_u64();
            self.links.insert((i, ka), (j, kb));
            self.links.insert((j, kb), (i, ka));
            let to_j = self.info_of(j, conn_uid, addr, true);
            let to_i = self.info_of(i, conn_uid, src, false);
            let a = self.meshes[i].connection_ready(now, ka, to_j);
            self.push(i, a);
            let b = self.meshes[j].connection_ready(now, kb, to_i);
            self.push(j, b);
            self.establish.push(((i, ka), (j, kb)));
        }

        fn run(&mut self) {
            let now = self.now;
            loop {
                while let Some((i, action)) = self.queue.pop_front() {
                    match action {
                        Action::Dial(addr) => self.dial(i, addr),
                        Action::SendTopology { conn, updates } => {
                            if let Some(&(j, k)) = self.links.get(&(i, conn)) {
                                let a = self.meshes[j].topology_received(now, k, updates);
                                self.push(j, a);
                            }
                        }
                        Action::Close { conn, .. } => {
                            if let Some((j, k)) = self.links.remove(&(i, conn)) {
                                self.links.remove(&(j, k));
                                let a = self.meshes[j].connection_closed(now, k, "EOF");
                                self.push(j, a);
                            }
                        }
                        Action::TopologyChanged => {}
                    }
                }
                let Some((x, y)) = self.establish.pop() else {
                    break;
                };
                if self.links.contains_key(&x) {
                    for (i, k) in [x, y] {
                        let a = self.meshes[i].connection_established(now, k);
                        self.push(i, a);
                    }
                }
            }
        }

        fn advance(&mut self, total: Duration) {
            let end = self.now + total;
            while self.now < end {
                self.now += Duration::from_millis(100);
                for i in 0..self.meshes.len() {
                    let a = self.meshes[i].poll(self.now);
                    self.push(i, a);
                }
                self.run();
            }
        }
    }

    #[test]
    fn three_routers_converge_and_resolve_a_short_id_clash() {
        let t0 = Instant::now();
        // A and C start with the same ShortID; A has the lower name and keeps it.
        let mut sim = Sim::new(&[(1, 7), (2, 20), (3, 7)], t0);
        let a = sim.meshes[0].add_targets(t0, direct("10.0.0.2"), false);
        sim.push(0, a);
        let b = sim.meshes[1].add_targets(t0, direct("10.0.0.3"), false);
        sim.push(1, b);
        sim.run();
        sim.advance(Duration::from_secs(70));

        let names: BTreeSet<PeerName> = [name(1), name(2), name(3)].into();
        for m in &sim.meshes {
            let known: BTreeSet<PeerName> = m.topology().peers().map(|p| p.summary.name).collect();
            assert_eq!(known, names, "peer set at {}", m.local().name);
            // Discovery made the mesh complete; every link is established.
            assert_eq!(m.connections().len(), 2, "at {}", m.local().name);
            assert!(m.connections().iter().all(|c| c.established));
            for n in &names {
                assert!(m.topology().established(n));
            }
        }
        // Everyone holds the same view of everyone.
        let views: Vec<Vec<PeerUpdate>> = sim
            .meshes
            .iter()
            .map(|m| m.topology().peers().cloned().collect())
            .collect();
        assert_eq!(views[0], views[1]);
        assert_eq!(views[1], views[2]);
        // The clash is resolved: A kept 7, C moved, all ShortIDs differ.
        let ids = sim.meshes[0].topology().short_ids();
        assert_eq!(ids[&name(1)], 7);
        assert_ne!(ids[&name(3)], 7);
        let distinct: BTreeSet<ShortId> = ids.values().copied().collect();
        assert_eq!(distinct.len(), 3);
        for m in &sim.meshes {
            assert!(!m.topology().local_short_id_lost());
            assert_eq!(m.topology().short_ids(), ids);
        }
        // Quiet afterwards: only the periodic full gossip, nothing changes.
        let before = views[0].clone();
        sim.advance(Duration::from_secs(35));
        let after: Vec<PeerUpdate> = sim.meshes[0].topology().peers().cloned().collect();
        assert_eq!(before, after);
    }
}
