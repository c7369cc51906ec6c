//! The mesh topology fed arbitrary decoded gossip: `merge` of arbitrary peer updates
//! (names drawn from a small set so that they collide), ShortID reassignment, garbage
//! collection and routes. No panics, and Weave's invariants hold: merging the same
//! updates twice changes nothing the second time; every peer named in a merged
//! connection list is known; after GC every peer is reachable; ShortID owners are the
//! lowest-named holders; a reassigned ShortID is free.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use weft::mesh::{
    ConnectionSummary, MAX_SHORT_ID, PeerName, PeerSummary, PeerUpdate,
    topology::{RandomSource, Topology},
};

fn name(n: u8) -> PeerName {
    PeerName([0xaa, 0, 0, 0, 0, n % 8])
}

#[derive(Debug, Arbitrary)]
struct Summary {
    name: u8,
    uid: u8,
    version: u8,
    short_id: Option<u16>,
}

impl Summary {
    fn build(&self) -> PeerSummary {
        PeerSummary {
            name: name(self.name),
            nickname: format!("n{}", self.name),
            uid: u64::from(self.uid % 4),
            version: u64::from(self.version % 8),
            short_id: self
                .short_id
                .map(|s| s % 8 + (s & 0x8000 != 0) as u16 * MAX_SHORT_ID),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Update {
    summary: Summary,
    connections: Vec<(u8, bool, bool)>,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Merge(Vec<Update>),
    Gc,
    Reassign(u64),
    SetLocalConnections(Vec<(u8, bool)>),
}

#[derive(Debug, Arbitrary)]
struct Input {
    local_short_id: Option<u16>,
    ops: Vec<Op>,
}

fn check(t: &Topology) {
    let local = t.local_name();
    assert_eq!(t.local().summary.name, local);
    assert!(t.peer(&local).is_some());
    for p in t.peers() {
        if let Some(id) = p.summary.short_id {
            let owner = t.short_id_owner(id).expect("a held ShortID has an owner");
            assert!(owner <= p.summary.name);
            assert_eq!(t.short_id_owners().get(&id), Some(&owner));
        }
    }
    let routes = t.routes(false);
    assert!(!routes.contains_key(&local));
    for (dest, hop) in &routes {
        assert!(t.peer(dest).is_some());
        assert!(
            t.local().connections.iter().any(|c| c.name == *hop),
            "next hop {hop} is a neighbour"
        );
    }
    for dest in t.routes(true).keys() {
        assert!(routes.contains_key(dest), "an established route is a route");
    }
}

fuzz_target!(|input: Input| {
    let mut t = Topology::new(PeerSummary {
        name: name(1),
        nickname: "local".into(),
        uid: 2,
        version: 1,
        short_id: input.local_short_id.map(|s| s % 8),
    });
    for op in input.ops.into_iter().take(64) {
        match op {
            Op::Merge(updates) => {
                let updates: Vec<PeerUpdate> = updates
                    .iter()
                    .take(32)
                    .map(|u| PeerUpdate {
                        summary: u.summary.build(),
                        connections: u
                            .connections
                            .iter()
                            .take(16)
                            .map(|&(n, outbound, established)| ConnectionSummary {
                                name: name(n),
                                remote_tcp_addr: format!("192.0.2.{n}:6783"),
                                outbound,
                                established,
                            })
                            .collect(),
                    })
                    .collect();
                let before = t.local().summary.version;
                let out = t.merge(&updates);
                assert!(t.local().summary.version >= before);
                assert_eq!(out.local_version_raised, t.local().summary.version > before);
                assert_eq!(out.short_id_lost, t.local_short_id_lost());
                for u in &updates {
                    assert!(t.peer(&u.summary.name).is_some());
                    for c in &u.connections {
                        assert!(t.peer(&c.name).is_some(), "{} is known", c.name);
                    }
                }
                for n in out.changed.iter().chain(&out.placeholders) {
                    assert!(t.peer(n).is_some());
                }
                let again = t.merge(&updates);
                assert!(!again.is_change(), "merging twice changed {again:?}");
            }
            Op::Gc => {
                let removed = t.gc();
                assert!(!removed.contains(&t.local_name()));
                for p in t.peers() {
                    assert!(
                        t.reachable(&p.summary.name),
                        "{} survived GC",
                        p.summary.name
                    );
                }
            }
            Op::Reassign(seed) => {
                let mut state = seed;
                let mut rng = move || {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    state >> 16
                };
                let lost = t.local_short_id_lost();
                let taken: Vec<_> = t
                    .peers()
                    .filter(|p| p.summary.name != t.local_name())
                    .filter_map(|p| p.summary.short_id)
                    .collect();
                match t.reassign_local_short_id(&mut rng as &mut dyn RandomSource) {
                    Some(id) => {
                        assert!(lost);
                        assert!(id <= MAX_SHORT_ID);
                        assert!(!taken.contains(&id), "reassigned to a taken ShortID {id}");
                        assert!(!t.local_short_id_lost());
                    }
                    None => assert!(!lost || taken.len() > usize::from(MAX_SHORT_ID)),
                }
            }
            Op::SetLocalConnections(conns) => {
                let conns = conns
                    .iter()
                    .take(16)
                    .map(|&(n, established)| ConnectionSummary {
                        name: name(n),
                        remote_tcp_addr: String::new(),
                        outbound: true,
                        established,
                    })
                    .collect();
                let before = t.local().summary.version;
                let changed = t.set_local_connections(conns);
                assert_eq!(changed, t.local().summary.version > before);
            }
        }
        check(&t);
    }
});
