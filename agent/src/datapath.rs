//! Keeps the datapath maps equal to the desired state: this host's settings and the
//! set of remote peers.
//!
//! [`Datapath::apply`] is idempotent and touches only what changed, so a SIGHUP that
//! re-reads an unchanged peers file writes nothing, and traffic to unchanged peers
//! never sees a transient state. Write order keeps every intermediate state valid for
//! the programs: peers are inserted before they are named in the flood list, and
//! removed only after the flood list no longer names them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use weft_common::maps::{
    Counter, DatapathConfig, PEER_ENCRYPTED, PEER_NO_FASTDP, PEER_SLEEVE, PeerEntry, PeerStats,
};

use crate::maps::{DatapathMaps, MapsError};

/// This host's side of the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalSettings {
    /// This host's ShortID.
    pub short_id: u16,
    /// This host's underlay address (outer source).
    pub addr: Ipv4Addr,
    /// ifindex of weft's VXLAN device.
    pub vxlan_ifindex: u32,
    /// Overlay MTU.
    pub mtu: u16,
    /// Seconds before a learned MAC is forgotten.
    pub mac_age_secs: u32,
    /// ifindex of the sleeve's TAP device, 0 without a sleeve.
    pub sleeve_ifindex: u32,
    /// The fast datapath's UDP port (the underlay guards judge it).
    pub vxlan_port: u16,
}

/// A remote peer as the datapath needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemotePeer {
    /// The peer's ShortID.
    pub short_id: u16,
    /// The peer's underlay address.
    pub addr: Ipv4Addr,
    /// Whether the sleeve carries this peer (else the fast datapath does).
    pub sleeve: bool,
    /// Whether the fast datapath is not used with this peer at all: VXLAN from it
    /// is dropped.
    pub no_fastdp: bool,
    /// Whether fast-datapath traffic with this peer is IPsec-encrypted: frames to it
    /// carry the IPsec mark (they leave inside ESP or not at all), VXLAN from it that
    /// no inbound SA decrypted is dropped.
    pub encrypted: bool,
}

/// What one [`Datapath::apply`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// ShortIDs added.
    pub added: Vec<u16>,
    /// ShortIDs whose address changed.
    pub changed: Vec<u16>,
    /// ShortIDs removed.
    pub removed: Vec<u16>,
    /// Peers left untouched.
    pub unchanged: usize,
}

/// The datapath's desired state and the maps that carry it.
pub struct Datapath<M> {
    maps: M,
    local: Option<LocalSettings>,
    peers: BTreeMap<u16, PeerEntry>,
    flood: Vec<u16>,
}

impl<M: DatapathMaps> Datapath<M> {
    /// Wraps freshly loaded (empty) maps.
    pub fn new(maps: M) -> Self {
        Self {
            maps,
            local: None,
            peers: BTreeMap::new(),
            flood: Vec::new(),
        }
    }

    /// Wraps maps an earlier run filled (pinned, while its programs kept
    /// forwarding): what they hold becomes the known state, so the next
    /// [`Datapath::apply`] writes only what differs from it. Empty maps give the
    /// same as [`Datapath::new`]. Returns how many peers were found.
    pub fn adopt(maps: M) -> Result<(Self, usize), MapsError> {
        let mut dp = Self::new(maps);
        let cfg = dp.maps.config()?;
        dp.peers = dp.maps.peers()?.into_iter().collect();
        if cfg.enabled != 0 {
            dp.flood = dp.maps.flood(cfg.flood_count)?;
            dp.local = Some(LocalSettings {
                short_id: cfg.local_short_id,
                addr: Ipv4Addr::from(cfg.local_addr),
                vxlan_ifindex: cfg.vxlan_ifindex,
                mtu: cfg.mtu,
                mac_age_secs: cfg.mac_age_secs,
                sleeve_ifindex: cfg.sleeve_ifindex,
                vxlan_port: cfg.vxlan_port,
            });
        }
        let n = dp.peers.len();
        Ok((dp, n))
    }

    /// The local settings the maps hold (after [`Datapath::adopt`]: an earlier run's).
    pub fn local(&self) -> Option<LocalSettings> {
        self.local
    }

    /// The peers the maps hold.
    pub fn peers(&self) -> Vec<RemotePeer> {
        self.peers
            .iter()
            .map(|(&short_id, e)| RemotePeer {
                short_id,
                addr: Ipv4Addr::from(e.addr),
                sleeve: e.flags & PEER_SLEEVE != 0,
                no_fastdp: e.flags & PEER_NO_FASTDP != 0,
                encrypted: e.flags & PEER_ENCRYPTED != 0,
            })
            .collect()
    }

    /// Makes the maps describe `local` and exactly `peers`.
    ///
    /// On error the maps may hold part of the change; calling `apply` again with
    /// the same arguments completes it.
    pub fn apply(
        &mut self,
        local: &LocalSettings,
        peers: &[RemotePeer],
    ) -> Result<ApplyReport, MapsError> {
        let desired: BTreeMap<u16, PeerEntry> = peers
            .iter()
            .map(|p| {
                let entry = PeerEntry {
                    addr: p.addr.octets(),
                    flags: if p.sleeve { PEER_SLEEVE } else { 0 }
                        | if p.no_fastdp { PEER_NO_FASTDP } else { 0 }
                        | if p.encrypted { PEER_ENCRYPTED } else { 0 },
                };
                (p.short_id, entry)
            })
            .collect();
        let mut report = ApplyReport::default();
        let mut moved = Vec::new();

        // 1. New and changed peers first: nothing names them yet, or they keep working
        //    with either address while the entry is replaced.
        for (&id, entry) in &desired {
            match self.peers.get(&id) {
                Some(old) if old == entry => report.unchanged += 1,
                old => {
                    self.maps.set_peer(id, entry)?;
                    if let Some(old) = old {
                        if old.addr != entry.addr {
                            moved.push(id);
                        }
                        report.changed.push(id);
                    } else {
                        report.added.push(id);
                    }
                    self.peers.insert(id, *entry);
                }
            }
        }

        // 2. The flood list (every fast-datapath peer: ShortIDs are unique and below
        //    MAX_PEERS, so it always fits; the agent floods to sleeve peers) and the
        //    configuration that counts it.
        let flood: Vec<u16> = desired
            .iter()
            .filter(|(_, e)| e.flags & PEER_SLEEVE == 0)
            .map(|(&id, _)| id)
            .collect();
        if flood != self.flood || self.local.as_ref() != Some(local) {
            let shrinking = flood.len() < self.flood.len();
            if shrinking {
                self.write_config(local, flood.len())?;
            }
            for (i, &id) in flood.iter().enumerate() {
                if self.flood.get(i) != Some(&id) {
                    self.maps.set_flood_slot(i as u32, id)?;
                }
            }
            if !shrinking {
                self.write_config(local, flood.len())?;
            }
            self.flood = flood;
            self.local = Some(*local);
        }

        // 3. Gone peers last, with their learned MACs and counters. A ShortID that
        //    moved to another address forgets its MACs too: they were the old
        //    host's pods.
        let gone: Vec<u16> = self
            .peers
            .keys()
            .filter(|id| !desired.contains_key(id))
            .copied()
            .collect();
        let forget: BTreeSet<u32> = gone.iter().chain(&moved).map(|&id| u32::from(id)).collect();
        if !forget.is_empty() {
            for (key, entry) in self.maps.macs()? {
                if forget.contains(&entry.short_id) {
                    self.maps.forget_mac(&key)?;
                }
            }
        }
        for id in gone {
            self.maps.remove_peer(id)?;
            self.maps.reset_peer_stats(id)?;
            self.peers.remove(&id);
            report.removed.push(id);
        }
        Ok(report)
    }

    fn write_config(&mut self, local: &LocalSettings, flood_count: usize) -> Result<(), MapsError> {
        self.maps.set_config(&DatapathConfig {
            enabled: 1,
            vxlan_ifindex: local.vxlan_ifindex,
            local_addr: local.addr.octets(),
            local_short_id: local.short_id,
            mtu: local.mtu,
            flood_count: flood_count as u16,
            vxlan_port: local.vxlan_port,
            mac_age_secs: local.mac_age_secs,
            sleeve_ifindex: local.sleeve_ifindex,
        })
    }

    /// A peer's traffic counters.
    pub fn peer_stats(&self, short_id: u16) -> Result<PeerStats, MapsError> {
        self.maps.peer_stats(short_id)
    }

    /// The datapath counters by name, as status shows them (empty if the maps cannot
    /// be read: status must still answer).
    pub fn counters_by_name(&self) -> BTreeMap<String, u64> {
        self.counters()
            .map(|cs| {
                cs.into_iter()
                    .map(|(c, v)| (c.name().to_owned(), v))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The datapath counters.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, MapsError> {
        Ok(Counter::ALL
            .iter()
            .copied()
            .zip(self.maps.counters()?)
            .collect())
    }

    /// The maps, for tests.
    #[cfg(test)]
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// The maps, for tests.
    #[cfg(test)]
    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }
}

#[cfg(test)]
mod tests {
    use weft_common::maps::{MacEntry, MacKey};

    use super::*;
    use crate::maps::fake::FakeMaps;

    fn local() -> LocalSettings {
        LocalSettings {
            short_id: 1,
            addr: Ipv4Addr::new(192, 168, 48, 11),
            vxlan_ifindex: 7,
            mtu: 1376,
            mac_age_secs: 300,
            sleeve_ifindex: 0,
            vxlan_port: 6784,
        }
    }

    fn peer(id: u16, last: u8) -> RemotePeer {
        RemotePeer {
            short_id: id,
            addr: Ipv4Addr::new(192, 168, 48, last),
            sleeve: false,
            no_fastdp: false,
            encrypted: false,
        }
    }

    #[test]
    fn sleeve_peers_are_left_out_of_the_flood_list_and_keep_their_macs() {
        let mut dp = Datapath::new(FakeMaps::default());
        dp.apply(&local(), &[peer(2, 12), peer(3, 13)]).unwrap();
        let seen = MacEntry {
            short_id: 3,
            pad: 0,
            seen_ns: 1,
        };
        dp.maps_mut()
            .macs
            .insert(MacKey::new([2, 0, 0, 0, 0, 3]), seen);
        let sleeve3 = RemotePeer {
            sleeve: true,
            ..peer(3, 13)
        };
        let r = dp.apply(&local(), &[peer(2, 12), sleeve3]).unwrap();
        assert_eq!(r.changed, vec![3]);
        let m = dp.maps();
        assert_eq!(m.peers[&3].flags, PEER_SLEEVE);
        assert_eq!(m.config.unwrap().flood_count, 1);
        assert_eq!(m.flood.get(&0), Some(&2));
        // Same host, other overlay: its pods' MACs still steer unicast (now to the
        // sleeve).
        assert_eq!(m.macs.len(), 1);
        // And back to the fast datapath.
        let r = dp.apply(&local(), &[peer(2, 12), peer(3, 13)]).unwrap();
        assert_eq!(r.changed, vec![3]);
        assert_eq!(dp.maps().config.unwrap().flood_count, 2);
        assert_eq!(dp.maps().peers[&3].flags, 0);
    }

    #[test]
    fn first_apply_writes_everything() {
        let mut dp = Datapath::new(FakeMaps::default());
        let r = dp.apply(&local(), &[peer(3, 13), peer(2, 12)]).unwrap();
        assert_eq!(r.added, vec![2, 3]);
        let m = dp.maps();
        let cfg = m.config.unwrap();
        assert_eq!(cfg.enabled, 1);
        assert_eq!(cfg.flood_count, 2);
        assert_eq!(cfg.local_addr, [192, 168, 48, 11]);
        assert_eq!(cfg.local_short_id, 1);
        assert_eq!(cfg.vxlan_ifindex, 7);
        assert_eq!(m.peers[&2].addr, [192, 168, 48, 12]);
        assert_eq!(m.flood.get(&0), Some(&2));
        assert_eq!(m.flood.get(&1), Some(&3));
    }

    #[test]
    fn reapplying_the_same_state_writes_nothing() {
        let mut dp = Datapath::new(FakeMaps::default());
        dp.apply(&local(), &[peer(2, 12), peer(3, 13)]).unwrap();
        let writes = dp.maps().peer_writes;
        let r = dp.apply(&local(), &[peer(3, 13), peer(2, 12)]).unwrap();
        assert_eq!(r.unchanged, 2);
        assert!(r.added.is_empty() && r.changed.is_empty() && r.removed.is_empty());
        assert_eq!(dp.maps().peer_writes, writes);
    }

    #[test]
    fn reload_adds_changes_and_removes_only_what_differs() {
        let mut dp = Datapath::new(FakeMaps::default());
        dp.apply(&local(), &[peer(2, 12), peer(3, 13), peer(4, 14)])
            .unwrap();
        let seen = MacEntry {
            short_id: 4,
            pad: 0,
            seen_ns: 1,
        };
        dp.maps_mut()
            .macs
            .insert(MacKey::new([2, 0, 0, 0, 0, 4]), seen);
        dp.maps_mut().macs.insert(
            MacKey::new([2, 0, 0, 0, 0, 2]),
            MacEntry {
                short_id: 2,
                ..seen
            },
        );
        dp.maps_mut().macs.insert(
            MacKey::new([2, 0, 0, 0, 0, 3]),
            MacEntry {
                short_id: 3,
                ..seen
            },
        );
        let writes = dp.maps().peer_writes;
        let r = dp
            .apply(&local(), &[peer(2, 12), peer(3, 99), peer(5, 15)])
            .unwrap();
        assert_eq!(r.added, vec![5]);
        assert_eq!(r.changed, vec![3]);
        assert_eq!(r.removed, vec![4]);
        assert_eq!(r.unchanged, 1);
        assert_eq!(dp.maps().peer_writes, writes + 2);
        let m = dp.maps();
        assert!(!m.peers.contains_key(&4));
        assert_eq!(m.peers[&3].addr, [192, 168, 48, 99]);
        assert_eq!(m.config.unwrap().flood_count, 3);
        assert_eq!(m.flood.get(&2), Some(&5));
        // The removed peer's MAC and the moved peer's are forgotten, the unchanged
        // peer's kept.
        assert_eq!(m.macs.len(), 1);
        assert!(m.macs.contains_key(&MacKey::new([2, 0, 0, 0, 0, 2])));
    }

    #[test]
    fn adopting_an_earlier_runs_maps_rewrites_nothing_unchanged() {
        let mut first = Datapath::new(FakeMaps::default());
        first
            .apply(&local(), &[peer(2, 12), peer(3, 13), peer(4, 14)])
            .unwrap();
        let maps = std::mem::take(first.maps_mut());
        let config_before = maps.config;
        let (mut dp, found) = Datapath::adopt(maps).unwrap();
        assert_eq!(found, 3);
        let writes = dp.maps().peer_writes;
        // The restarted agent's peers: one gone, one moved, one new.
        let r = dp
            .apply(&local(), &[peer(2, 12), peer(3, 99), peer(5, 15)])
            .unwrap();
        assert_eq!(r.unchanged, 1);
        assert_eq!(r.changed, vec![3]);
        assert_eq!(r.added, vec![5]);
        assert_eq!(r.removed, vec![4]);
        assert_eq!(dp.maps().peer_writes, writes + 2);
        assert_eq!(dp.maps().config.unwrap().flood_count, 3);
        assert_eq!(config_before.unwrap().flood_count, 3);
        // Adopting the same state again finds nothing to do at all.
        let maps = std::mem::take(dp.maps_mut());
        let (mut dp, _) = Datapath::adopt(maps).unwrap();
        let writes = dp.maps().peer_writes;
        let r = dp
            .apply(&local(), &[peer(2, 12), peer(3, 99), peer(5, 15)])
            .unwrap();
        assert_eq!(r.unchanged, 3);
        assert_eq!(dp.maps().peer_writes, writes);
    }

    #[test]
    fn flood_list_names_every_peer() {
        let mut dp = Datapath::new(FakeMaps::default());
        let many: Vec<RemotePeer> = (2..4096).map(|i| peer(i, (i % 250) as u8)).collect();
        dp.apply(&local(), &many).unwrap();
        assert_eq!(dp.maps().config.unwrap().flood_count, 4094);
        assert_eq!(dp.maps().flood.len(), 4094);
        assert_eq!(dp.maps().flood.get(&4093), Some(&4095));
        assert_eq!(dp.maps().peers.len(), 4094);
    }

    #[test]
    fn failed_write_is_reported_and_retry_completes() {
        let mut dp = Datapath::new(FakeMaps::default());
        dp.maps_mut().fail_peer_writes = true;
        assert!(dp.apply(&local(), &[peer(2, 12)]).is_err());
        assert!(dp.maps().config.is_none());
        dp.maps_mut().fail_peer_writes = false;
        let r = dp.apply(&local(), &[peer(2, 12)]).unwrap();
        assert_eq!(r.added, vec![2]);
        assert_eq!(dp.maps().config.unwrap().flood_count, 1);
    }
}
