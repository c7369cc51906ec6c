//! What the mesh knows: every peer's summary and connection list, merged from
//! topology gossip with Weave's rules; ShortID ownership; garbage collection of peers
//! nothing connects us to; routes over the connection graph.
//!
//! Pure data: no clock, no I/O. The [`router`](super::router) feeds it and decides
//! what to send.

use std::collections::{BTreeMap, BTreeSet, btree_map::Entry};

use super::{ConnectionSummary, MAX_SHORT_ID, PeerName, PeerSummary, PeerUpdate, ShortId};

/// How many random ShortIDs to try before counting the free ones (as Weave does).
const SHORT_ID_RANDOM_TRIES: usize = 10;

/// A source of random numbers supplied by the caller (tests pass a deterministic one).
pub trait RandomSource {
    /// The next random 64-bit number.
    fn next_u64(&mut self) -> u64;

    /// A random number in `0..bound` (`bound` > 0; 0 gives 0).
    fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            self.next_u64() % bound
        }
    }
}

impl<F: FnMut() -> u64> RandomSource for F {
    fn next_u64(&mut self) -> u64 {
        self()
    }
}

/// What a merge of received updates changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeOutcome {
    /// Peers that were added or replaced (the change set to relay), sorted.
    pub changed: Vec<PeerName>,
    /// Placeholders created for peers only named in connection lists, sorted.
    pub placeholders: Vec<PeerName>,
    /// The update held an older incarnation of ourselves: our version was raised
    /// above it, so our own summary must be gossiped.
    pub local_version_raised: bool,
    /// A peer with a lower name now holds our ShortID: we must pick another one
    /// ([`Topology::reassign_local_short_id`]).
    pub short_id_lost: bool,
    /// Which peer holds which ShortID may have changed.
    pub short_ids_changed: bool,
}

impl MergeOutcome {
    /// Whether anything in the topology changed.
    pub fn is_change(&self) -> bool {
        !self.changed.is_empty()
            || !self.placeholders.is_empty()
            || self.local_version_raised
            || self.short_ids_changed
    }
}

/// Result of registering the peer at the other end of a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotedPeer {
    /// The peer was not known and has been added (Version 0).
    pub added: bool,
    /// The peer was known under another UID (a restart, or a placeholder).
    pub restarted: bool,
}

/// The mesh's topology as seen by the local peer: every known peer (ourselves
/// included) with the connection list it last gossiped.
#[derive(Debug, Clone)]
pub struct Topology {
    local: PeerName,
    peers: BTreeMap<PeerName, PeerUpdate>,
}

/// Whether summary `new` replaces `old` (Weave's rule): a higher Version; or the same
/// Version and a higher UID; or both equal and `new` has a ShortID that `old` lacks.
pub fn supersedes(new: &PeerSummary, old: &PeerSummary) -> bool {
    new.version > old.version
        || (new.version == old.version
            && (new.uid > old.uid
                || (new.uid == old.uid && new.short_id.is_some() && old.short_id.is_none())))
}

/// A connection list with one entry per remote peer (the last one wins, as in
/// Weave's map).
fn dedup_connections(conns: &[ConnectionSummary]) -> Vec<ConnectionSummary> {
    let mut by_name: BTreeMap<PeerName, &ConnectionSummary> = BTreeMap::new();
    for c in conns {
        by_name.insert(c.name, c);
    }
    if by_name.len() == conns.len() {
        return conns.to_vec();
    }
    // Keep the original order of the surviving (last) entries.
    conns
        .iter()
        .enumerate()
        .filter(|(i, c)| {
            let last = conns.iter().rposition(|d| d.name == c.name);
            last == Some(*i)
        })
        .map(|(_, c)| c.clone())
        .collect()
}

impl Topology {
    /// A topology holding only ourselves, with no connections.
    pub fn new(local: PeerSummary) -> Self {
        let name = local.name;
        let mut peers = BTreeMap::new();
        peers.insert(
            name,
            PeerUpdate {
                summary: local,
                connections: Vec::new(),
            },
        );
        Topology { local: name, peers }
    }

    /// Our own name.
    pub fn local_name(&self) -> PeerName {
        self.local
    }

    /// Our own entry: summary and the connection list we gossip.
    pub fn local(&self) -> &PeerUpdate {
        &self.peers[&self.local]
    }

    fn local_mut(&mut self) -> &mut PeerUpdate {
        self.peers
            .get_mut(&self.local)
            .expect("local peer is always present")
    }

    /// One peer's entry, ourselves included.
    pub fn peer(&self, name: &PeerName) -> Option<&PeerUpdate> {
        self.peers.get(name)
    }

    /// All known peers (ourselves included, placeholders too), ordered by name.
    pub fn peers(&self) -> impl Iterator<Item = &PeerUpdate> {
        self.peers.values()
    }

    /// Number of known peers, ourselves included.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Always false: we know ourselves.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Raises our Version by one (any change to what we gossip about ourselves).
    pub fn raise_local_version(&mut self) {
        let s = &mut self.local_mut().summary;
        s.version = s.version.saturating_add(1);
    }

    /// Replaces our connection list; raises our Version if it changed. Returns whether
    /// it changed.
    pub fn set_local_connections(&mut self, connections: Vec<ConnectionSummary>) -> bool {
        let connections = dedup_connections(&connections);
        if self.local().connections == connections {
            return false;
        }
        self.local_mut().connections = connections;
        self.raise_local_version();
        true
    }

    /// Registers the peer at the other end of a new connection from the summary its
    /// handshake gave (Weave creates it at Version 0). A known peer is left as it is.
    pub fn note_peer(&mut self, summary: PeerSummary) -> NotedPeer {
        match self.peers.get(&summary.name) {
            Some(known) => NotedPeer {
                added: false,
                restarted: known.summary.uid != summary.uid,
            },
            None => {
                self.peers.insert(
                    summary.name,
                    PeerUpdate {
                        summary,
                        connections: Vec::new(),
                    },
                );
                NotedPeer {
                    added: true,
                    restarted: false,
                }
            }
        }
    }

    /// Merges received peer updates with Weave's rules and returns what changed.
    ///
    /// Unknown peers are added; a known peer is replaced only if [`supersedes`] holds
    /// (its nickname, UID, Version, ShortID and whole connection list are taken);
    /// peers only named in connection lists become placeholders (UID 0, Version 0, no
    /// ShortID); a summary of ourselves with another UID raises our Version above it.
    pub fn merge(&mut self, updates: &[PeerUpdate]) -> MergeOutcome {
        let mut out = MergeOutcome::default();
        // Peers this update introduces, waiting for their first summary to be applied.
        let mut fresh: BTreeSet<PeerName> = BTreeSet::new();
        for u in updates {
            let name = u.summary.name;
            if let Entry::Vacant(slot) = self.peers.entry(name) {
                fresh.insert(name);
                slot.insert(PeerUpdate {
                    summary: u.summary.clone(),
                    connections: Vec::new(),
                });
            }
        }
        let mut placeholders = BTreeSet::new();
        for c in updates.iter().flat_map(|u| &u.connections) {
            if let Entry::Vacant(slot) = self.peers.entry(c.name) {
                placeholders.insert(c.name);
                slot.insert(PeerUpdate {
                    summary: PeerSummary {
                        name: c.name,
                        nickname: String::new(),
                        uid: 0,
                        version: 0,
                        short_id: None,
                    },
                    connections: Vec::new(),
                });
            }
        }

        let mut changed = BTreeSet::new();
        for u in updates {
            let name = u.summary.name;
            if name == self.local {
                let ours = &mut self.local_mut().summary;
                if u.summary.uid != ours.uid && u.summary.version >= ours.version {
                    ours.version = u.summary.version.saturating_add(1);
                    out.local_version_raised = true;
                }
                continue;
            }
            let entry = self.peers.get_mut(&name).expect("inserted above");
            if fresh.remove(&name) {
                entry.connections = dedup_connections(&u.connections);
                if entry.summary.short_id.is_some() {
                    out.short_ids_changed = true;
                }
                changed.insert(name);
                continue;
            }
            if !supersedes(&u.summary, &entry.summary) {
                continue;
            }
            if entry.summary.short_id != u.summary.short_id {
                out.short_ids_changed = true;
            }
            entry.summary = u.summary.clone();
            entry.connections = dedup_connections(&u.connections);
            changed.insert(name);
        }
        out.changed = changed.into_iter().collect();
        out.placeholders = placeholders.into_iter().collect();
        out.short_id_lost = self.local_short_id_lost();
        out
    }

    /// The owner of a ShortID: among the peers holding it, the one with the lowest
    /// name.
    pub fn short_id_owner(&self, id: ShortId) -> Option<PeerName> {
        // Peers are ordered by name: the first holder is the owner.
        self.peers
            .values()
            .find(|p| p.summary.short_id == Some(id))
            .map(|p| p.summary.name)
    }

    /// Whether a peer with a lower name holds our ShortID (or we have none).
    pub fn local_short_id_lost(&self) -> bool {
        match self.local().summary.short_id {
            Some(id) => self.short_id_owner(id) != Some(self.local),
            None => true,
        }
    }

    /// If we lost our ShortID, picks a free one as Weave does (10 random tries, then a
    /// random one among the free ones), sets it and raises our Version. Returns the new
    /// ShortID, or `None` if we kept ours or every ShortID is taken (try again after
    /// the next garbage collection).
    pub fn reassign_local_short_id(&mut self, rng: &mut dyn RandomSource) -> Option<ShortId> {
        if !self.local_short_id_lost() {
            return None;
        }
        let taken: BTreeSet<ShortId> = self
            .peers
            .values()
            .filter_map(|p| p.summary.short_id)
            .collect();
        let space = u64::from(MAX_SHORT_ID) + 1;
        let mut chosen = None;
        for _ in 0..SHORT_ID_RANDOM_TRIES {
            let id = rng.below(space) as ShortId;
            if !taken.contains(&id) {
                chosen = Some(id);
                break;
            }
        }
        if chosen.is_none() {
            let free = space - taken.len() as u64;
            if free == 0 {
                return None;
            }
            let n = rng.below(free) as usize;
            chosen = (0..=MAX_SHORT_ID).filter(|id| !taken.contains(id)).nth(n);
        }
        let id = chosen?;
        self.local_mut().summary.short_id = Some(id);
        self.raise_local_version();
        Some(id)
    }

    /// Removes the peers we cannot reach over any connections (established or not),
    /// starting from our own connection list. Returns the names removed.
    pub fn gc(&mut self) -> Vec<PeerName> {
        let reached = self.routes(false);
        let removed: Vec<PeerName> = self
            .peers
            .keys()
            .filter(|n| **n != self.local && !reached.contains_key(n))
            .copied()
            .collect();
        for n in &removed {
            self.peers.remove(n);
        }
        removed
    }

    /// Next hops from us to every peer we can reach (ourselves excluded): a
    /// breadth-first widening over peers in name order, as Weave computes it, so that
    /// every peer derives the same routes from the same data. With
    /// `established_and_symmetric`, a link counts only if both ends list it as
    /// established.
    pub fn routes(&self, established_and_symmetric: bool) -> BTreeMap<PeerName, PeerName> {
        let mut routes: BTreeMap<PeerName, PeerName> = BTreeMap::new();
        let mut seen: BTreeSet<PeerName> = BTreeSet::from([self.local]);
        let mut next = vec![self.local];
        while !next.is_empty() {
            let mut worklist = std::mem::take(&mut next);
            worklist.sort();
            for cur in worklist {
                let Some(cur_peer) = self.peers.get(&cur) else {
                    continue;
                };
                for c in &cur_peer.connections {
                    if established_and_symmetric && !c.established {
                        continue;
                    }
                    if seen.contains(&c.name) {
                        continue;
                    }
                    let Some(remote) = self.peers.get(&c.name) else {
                        continue;
                    };
                    if established_and_symmetric
                        && !remote
                            .connections
                            .iter()
                            .any(|back| back.name == cur && back.established)
                    {
                        continue;
                    }
                    seen.insert(c.name);
                    next.push(c.name);
                    let hop = if cur == self.local {
                        c.name
                    } else {
                        routes[&cur]
                    };
                    routes.insert(c.name, hop);
                }
            }
        }
        routes
    }

    /// Whether a peer can be reached over connections (established or not).
    pub fn reachable(&self, name: &PeerName) -> bool {
        *name == self.local || self.routes(false).contains_key(name)
    }

    /// Whether a peer can be reached over established, symmetric links (the routes
    /// Weave carries traffic on).
    pub fn established(&self, name: &PeerName) -> bool {
        *name == self.local || self.routes(true).contains_key(name)
    }

    /// Every peer that has a ShortID, with it (clashing holders included; see
    /// [`short_id_owner`](Self::short_id_owner)).
    pub fn short_ids(&self) -> BTreeMap<PeerName, ShortId> {
        self.peers
            .values()
            .filter_map(|p| p.summary.short_id.map(|id| (p.summary.name, id)))
            .collect()
    }

    /// ShortID to owning peer (one owner per ShortID: the lowest name).
    pub fn short_id_owners(&self) -> BTreeMap<ShortId, PeerName> {
        let mut owners = BTreeMap::new();
        for p in self.peers.values() {
            if let Some(id) = p.summary.short_id {
                owners.entry(id).or_insert(p.summary.name);
            }
        }
        owners
    }

    /// The full state to gossip: ourselves first, then every other peer by name.
    pub fn all_updates(&self) -> Vec<PeerUpdate> {
        let mut v = Vec::with_capacity(self.peers.len());
        v.push(self.local().clone());
        v.extend(
            self.peers
                .values()
                .filter(|p| p.summary.name != self.local)
                .cloned(),
        );
        v
    }

    /// The current entries of the named peers (unknown names are skipped), ourselves
    /// first if named.
    pub fn updates_for<'a>(
        &self,
        names: impl IntoIterator<Item = &'a PeerName>,
    ) -> Vec<PeerUpdate> {
        let names: BTreeSet<PeerName> = names.into_iter().copied().collect();
        let mut v = Vec::with_capacity(names.len());
        if names.contains(&self.local) {
            v.push(self.local().clone());
        }
        v.extend(
            names
                .iter()
                .filter(|n| **n != self.local)
                .filter_map(|n| self.peers.get(n))
                .cloned(),
        );
        v
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn name(last: u8) -> PeerName {
        PeerName([0xaa, 0, 0, 0, 0, last])
    }

    pub(crate) fn summary(
        last: u8,
        uid: u64,
        version: u64,
        short_id: Option<ShortId>,
    ) -> PeerSummary {
        PeerSummary {
            name: name(last),
            nickname: format!("h{last}"),
            uid,
            version,
            short_id,
        }
    }

    pub(crate) fn conn(
        last: u8,
        addr: &str,
        outbound: bool,
        established: bool,
    ) -> ConnectionSummary {
        ConnectionSummary {
            name: name(last),
            remote_tcp_addr: addr.to_owned(),
            outbound,
            established,
        }
    }

    fn upd(s: PeerSummary, conns: Vec<ConnectionSummary>) -> PeerUpdate {
        PeerUpdate {
            summary: s,
            connections: conns,
        }
    }

    /// A topology of peer 1 (us) connected to peer 2.
    fn topo() -> Topology {
        let mut t = Topology::new(summary(1, 111, 1, Some(100)));
        t.note_peer(summary(2, 222, 0, Some(200)));
        t.set_local_connections(vec![conn(2, "10.0.0.2:6783", true, false)]);
        t
    }

    #[test]
    fn unknown_peer_is_added_and_relayed() {
        let mut t = topo();
        let out = t.merge(&[upd(
            summary(3, 333, 5, Some(300)),
            vec![conn(2, "10.0.0.2:6783", true, true)],
        )]);
        assert_eq!(out.changed, vec![name(3)]);
        assert!(out.placeholders.is_empty());
        assert!(out.short_ids_changed);
        let p = t.peer(&name(3)).unwrap();
        assert_eq!(p.summary.version, 5);
        assert_eq!(p.connections.len(), 1);
    }

    #[test]
    fn replace_only_if_newer() {
        let mut t = topo();
        let base = upd(
            summary(2, 222, 5, Some(200)),
            vec![conn(1, "10.0.0.1:40000", false, true)],
        );
        assert_eq!(t.merge(std::slice::from_ref(&base)).changed, vec![name(2)]);

        // Older version: ignored even with a higher UID.
        let mut older = upd(summary(2, 999, 4, Some(7)), vec![]);
        older.summary.nickname = "older".into();
        assert!(t.merge(&[older]).changed.is_empty());
        assert_eq!(t.peer(&name(2)).unwrap(), &base);

        // Same version, same UID, both with ShortID: ignored.
        let same = upd(summary(2, 222, 5, Some(9)), vec![]);
        assert!(t.merge(&[same]).changed.is_empty());
        assert_eq!(t.peer(&name(2)).unwrap().summary.short_id, Some(200));

        // Same version, lower UID: ignored.
        assert!(
            t.merge(&[upd(summary(2, 221, 5, Some(9)), vec![])])
                .changed
                .is_empty()
        );

        // Same version, higher UID: replaces everything, connection list included.
        let mut higher_uid = upd(summary(2, 223, 5, Some(201)), vec![]);
        higher_uid.summary.nickname = "new".into();
        let out = t.merge(&[higher_uid.clone()]);
        assert_eq!(out.changed, vec![name(2)]);
        assert!(out.short_ids_changed);
        assert_eq!(t.peer(&name(2)).unwrap(), &higher_uid);

        // Higher version: replaces (connection list overwritten, not merged).
        let newer = upd(
            summary(2, 223, 6, Some(201)),
            vec![conn(1, "10.0.0.1:1", false, false)],
        );
        let out = t.merge(std::slice::from_ref(&newer));
        assert_eq!(out.changed, vec![name(2)]);
        assert!(!out.short_ids_changed);
        assert_eq!(t.peer(&name(2)).unwrap(), &newer);
    }

    #[test]
    fn equal_version_and_uid_gains_short_id() {
        let mut t = topo();
        t.merge(&[upd(
            summary(3, 333, 2, None),
            vec![conn(2, "x:1", true, true)],
        )]);
        assert_eq!(t.peer(&name(3)).unwrap().summary.short_id, None);
        // Same version and UID, still no ShortID: ignored.
        assert!(
            t.merge(&[upd(summary(3, 333, 2, None), vec![])])
                .changed
                .is_empty()
        );
        // Same version and UID, now with a ShortID: replaces.
        let out = t.merge(&[upd(summary(3, 333, 2, Some(5)), vec![])]);
        assert_eq!(out.changed, vec![name(3)]);
        assert!(out.short_ids_changed);
        assert_eq!(t.peer(&name(3)).unwrap().summary.short_id, Some(5));
        // Losing the ShortID at equal version and UID is not newer.
        assert!(
            t.merge(&[upd(summary(3, 333, 2, None), vec![])])
                .changed
                .is_empty()
        );
    }

    #[test]
    fn placeholders_for_peers_only_in_connection_lists() {
        let mut t = topo();
        let out = t.merge(&[upd(
            summary(2, 222, 3, Some(200)),
            vec![
                conn(1, "10.0.0.1:5", false, true),
                conn(4, "10.0.0.4:6783", true, false),
            ],
        )]);
        assert_eq!(out.changed, vec![name(2)]);
        assert_eq!(out.placeholders, vec![name(4)]);
        let p = t.peer(&name(4)).unwrap();
        assert_eq!(p.summary.uid, 0);
        assert_eq!(p.summary.version, 0);
        assert_eq!(p.summary.short_id, None);
        assert!(p.connections.is_empty());
        // A real summary (Version 0 but UID > 0) replaces the placeholder.
        let out = t.merge(&[upd(summary(4, 444, 0, Some(400)), vec![])]);
        assert_eq!(out.changed, vec![name(4)]);
        assert_eq!(t.peer(&name(4)).unwrap().summary.uid, 444);
    }

    #[test]
    fn summary_of_old_incarnation_of_ourselves_raises_our_version() {
        let mut t = topo();
        let v = t.local().summary.version;
        // Same UID: it is our own gossip coming back, nothing happens.
        let out = t.merge(&[upd(summary(1, 111, v + 10, Some(100)), vec![])]);
        assert!(!out.local_version_raised);
        assert_eq!(t.local().summary.version, v);
        // Other UID with a higher version: we go above it.
        let out = t.merge(&[upd(summary(1, 5, v + 10, Some(100)), vec![])]);
        assert!(out.local_version_raised);
        assert!(out.changed.is_empty());
        assert_eq!(t.local().summary.version, v + 11);
        assert_eq!(t.local().summary.uid, 111);
        // Other UID with a lower version: nothing to do.
        let out = t.merge(&[upd(summary(1, 5, 3, Some(100)), vec![])]);
        assert!(!out.local_version_raised);
        assert_eq!(t.local().summary.version, v + 11);
    }

    #[test]
    fn local_connection_changes_raise_version() {
        let mut t = topo();
        let v = t.local().summary.version;
        assert!(!t.set_local_connections(vec![conn(2, "10.0.0.2:6783", true, false)]));
        assert_eq!(t.local().summary.version, v);
        assert!(t.set_local_connections(vec![conn(2, "10.0.0.2:6783", true, true)]));
        assert_eq!(t.local().summary.version, v + 1);
    }

    #[test]
    fn gc_removes_unreachable_peers() {
        let mut t = topo();
        // 2 lists 3 (unestablished), 3 lists 4; 5 and 6 know each other only.
        t.merge(&[
            upd(
                summary(2, 222, 1, Some(200)),
                vec![conn(3, "a:1", true, false)],
            ),
            upd(
                summary(3, 333, 1, Some(300)),
                vec![conn(4, "b:1", false, false)],
            ),
            upd(
                summary(5, 555, 1, Some(500)),
                vec![conn(6, "c:1", true, true)],
            ),
            upd(
                summary(6, 666, 1, Some(600)),
                vec![conn(5, "d:1", false, true)],
            ),
        ]);
        assert_eq!(t.len(), 6);
        assert!(t.reachable(&name(4)));
        assert!(!t.reachable(&name(5)));
        let removed = t.gc();
        assert_eq!(removed, vec![name(5), name(6)]);
        assert!(t.peer(&name(4)).is_some());
        // Dropping our connection leaves only ourselves.
        t.set_local_connections(vec![]);
        assert_eq!(t.gc(), vec![name(2), name(3), name(4)]);
        assert_eq!(t.len(), 1);
        assert!(t.gc().is_empty());
    }

    #[test]
    fn established_needs_both_ends() {
        let mut t = topo();
        t.set_local_connections(vec![conn(2, "10.0.0.2:6783", true, true)]);
        t.merge(&[upd(
            summary(2, 222, 1, Some(200)),
            vec![
                conn(1, "10.0.0.1:5", false, false),
                conn(3, "x:1", true, true),
            ],
        )]);
        t.merge(&[upd(
            summary(3, 333, 1, Some(300)),
            vec![conn(2, "y:1", false, true)],
        )]);
        assert!(t.reachable(&name(3)));
        assert!(!t.established(&name(2)));
        assert!(!t.established(&name(3)));
        t.merge(&[upd(
            summary(2, 222, 2, Some(200)),
            vec![
                conn(1, "10.0.0.1:5", false, true),
                conn(3, "x:1", true, true),
            ],
        )]);
        assert!(t.established(&name(2)));
        assert!(t.established(&name(3)));
        assert_eq!(t.routes(true)[&name(3)], name(2));
    }

    #[test]
    fn short_id_clash_we_lose_to_lower_name() {
        // We are ...:05 holding 100; ...:02 (lower) claims 100 too.
        let mut t = Topology::new(summary(5, 555, 3, Some(100)));
        t.note_peer(summary(6, 666, 0, Some(600)));
        t.set_local_connections(vec![conn(6, "x:1", true, true)]);
        let v = t.local().summary.version;
        let out = t.merge(&[upd(
            summary(2, 222, 1, Some(100)),
            vec![conn(6, "y:1", true, true)],
        )]);
        assert!(out.short_id_lost);
        assert_eq!(t.short_id_owner(100), Some(name(2)));
        // The first random tries hit taken ids (100, 600), then 77 is free.
        let mut seq = [100u64, 600, 4096 + 600, 77].into_iter();
        let mut rng = move || seq.next().unwrap();
        assert_eq!(t.reassign_local_short_id(&mut rng), Some(77));
        assert_eq!(t.local().summary.short_id, Some(77));
        assert_eq!(t.local().summary.version, v + 1);
        assert!(!t.local_short_id_lost());
        assert_eq!(t.short_id_owners()[&100], name(2));
        assert_eq!(t.short_id_owners()[&77], name(5));
    }

    #[test]
    fn short_id_clash_we_win_against_higher_name() {
        let mut t = Topology::new(summary(2, 222, 3, Some(100)));
        let out = t.merge(&[upd(summary(9, 999, 1, Some(100)), vec![])]);
        assert!(!out.short_id_lost);
        let mut rng = || -> u64 { panic!("no new ShortID must be drawn") };
        assert_eq!(t.reassign_local_short_id(&mut rng), None);
        assert_eq!(t.local().summary.short_id, Some(100));
        assert_eq!(t.local().summary.version, 3);
        assert_eq!(t.short_id_owner(100), Some(name(2)));
    }

    #[test]
    fn short_id_falls_back_to_counting_free_ids() {
        let mut t = Topology::new(summary(0xff, 1, 1, Some(0)));
        // Every ShortID but 4000 and 4001 taken by lower-named peers.
        let updates: Vec<PeerUpdate> = (0..=MAX_SHORT_ID)
            .filter(|id| *id != 4000 && *id != 4001)
            .map(|id| {
                let mut s = summary(0, 10, 1, Some(id));
                s.name = PeerName::from_u64(u64::from(id) + 1);
                upd(s, vec![])
            })
            .collect();
        assert!(t.merge(&updates).short_id_lost);
        // Ten random tries at taken ids, then pick the 2nd free one (index 1).
        let mut calls = 0;
        let mut rng = || {
            calls += 1;
            if calls <= 10 { 5 } else { 1 }
        };
        assert_eq!(t.reassign_local_short_id(&mut rng), Some(4001));
    }

    #[test]
    fn duplicate_connection_entries_collapse() {
        let mut t = topo();
        t.merge(&[upd(
            summary(2, 222, 3, Some(200)),
            vec![conn(1, "a:1", true, false), conn(1, "b:1", false, true)],
        )]);
        assert_eq!(
            t.peer(&name(2)).unwrap().connections,
            vec![conn(1, "b:1", false, true)]
        );
    }

    #[test]
    fn updates_for_puts_ourselves_first_and_skips_unknown() {
        let t = topo();
        let u = t.updates_for(&[name(2), name(9), name(1)]);
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].summary.name, name(1));
        assert_eq!(u[1].summary.name, name(2));
        assert_eq!(t.all_updates()[0].summary.name, name(1));
    }
}
