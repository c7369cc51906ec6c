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

use weft_common::maps::{Counter, DatapathConfig, PeerEntry, PeerStats};

use crate::maps::{DatapathMaps, MapsError};

/// This host's side of the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalSettings {
    /// This host's ShortID.
    pub short_id: u16,
    /// This host's underlay address (outer source).
    pub addr: Ipv4Addr,
    /// ifindex of the underlay interface.
    pub underlay_ifindex: u32,
    /// ifindex of `vethwe-datapath`.
    pub datapath_ifindex: u32,
    /// UDP port VXLAN uses.
    pub vxlan_port: u16,
    /// Overlay MTU.
    pub mtu: u16,
    /// Seconds before a learned MAC is forgotten.
    pub mac_age_secs: u32,
    /// MAC address of the underlay interface.
    pub underlay_mac: [u8; 6],
}

/// A remote peer as the datapath needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemotePeer {
    /// The peer's ShortID.
    pub short_id: u16,
    /// The peer's underlay address.
    pub addr: Ipv4Addr,
    /// Resolved MAC of the next hop towards it, all zero if unresolved.
    pub next_hop_mac: [u8; 6],
}

/// What one [`Datapath::apply`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// ShortIDs added.
    pub added: Vec<u16>,
    /// ShortIDs whose address or next-hop MAC changed.
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
                    flags: 0,
                    next_hop_mac: p.next_hop_mac,
                    pad: [0; 2],
                };
                (p.short_id, entry)
            })
            .collect();
        let mut report = ApplyReport::default();

        // 1. New and changed peers first: nothing names them yet, or they keep working
        //    with either address while the entry is replaced.
        for (&id, entry) in &desired {
            match self.peers.get(&id) {
                Some(old) if old == entry => report.unchanged += 1,
                old => {
                    self.maps.set_peer(id, entry)?;
                    if old.is_some() {
                        report.changed.push(id);
                    } else {
                        report.added.push(id);
                    }
                    self.peers.insert(id, *entry);
                }
            }
        }

        // 2. The flood list (every peer: ShortIDs are unique and below MAX_PEERS, so
        //    it always fits) and the configuration that counts it.
        let flood: Vec<u16> = desired.keys().copied().collect();
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

        // 3. Gone peers last, with their learned MACs and counters.
        let gone: Vec<u16> = self
            .peers
            .keys()
            .filter(|id| !desired.contains_key(id))
            .copied()
            .collect();
        if !gone.is_empty() {
            let gone_set: BTreeSet<u32> = gone.iter().map(|&id| u32::from(id)).collect();
            for (key, entry) in self.maps.macs()? {
                if gone_set.contains(&entry.short_id) {
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
            underlay_ifindex: local.underlay_ifindex,
            datapath_ifindex: local.datapath_ifindex,
            local_addr: local.addr.octets(),
            local_short_id: local.short_id,
            vxlan_port: local.vxlan_port,
            mtu: local.mtu,
            flood_count: flood_count as u16,
            mac_age_secs: local.mac_age_secs,
            underlay_mac: local.underlay_mac,
            pad: [0; 2],
        })
    }

    /// Forgets learned MACs not refreshed within the MAC age, as of `now_ns`
    /// (`CLOCK_MONOTONIC`). Returns how many were removed.
    pub fn expire_macs(&mut self, now_ns: u64) -> Result<usize, MapsError> {
        let Some(local) = self.local else {
            return Ok(0);
        };
        let age_ns = u64::from(local.mac_age_secs) * 1_000_000_000;
        let mut removed = 0;
        for (key, entry) in self.maps.macs()? {
            if now_ns.saturating_sub(entry.seen_ns) > age_ns {
                self.maps.forget_mac(&key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Number of learned MACs.
    pub fn mac_count(&self) -> Result<usize, MapsError> {
        Ok(self.maps.macs()?.len())
    }

    /// A peer's traffic counters.
    pub fn peer_stats(&self, short_id: u16) -> Result<PeerStats, MapsError> {
        self.maps.peer_stats(short_id)
    }

    /// The datapath counters by name.
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

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
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
            underlay_ifindex: 2,
            datapath_ifindex: 7,
            vxlan_port: 6784,
            mtu: 1376,
            mac_age_secs: 300,
            underlay_mac: [2, 0, 0, 0, 0, 0x11],
        }
    }

    fn peer(id: u16, last: u8) -> RemotePeer {
        RemotePeer {
            short_id: id,
            addr: Ipv4Addr::new(192, 168, 48, last),
            next_hop_mac: [2, 0, 0, 0, 0, last],
        }
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
        assert_eq!(cfg.datapath_ifindex, 7);
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
        // The removed peer's MAC is forgotten, the others' are kept.
        assert_eq!(m.macs.len(), 1);
        assert!(m.macs.contains_key(&MacKey::new([2, 0, 0, 0, 0, 2])));
    }

    #[test]
    fn a_resolved_next_hop_rewrites_only_that_peer() {
        let mut dp = Datapath::new(FakeMaps::default());
        let mut peers = vec![peer(2, 12), peer(3, 13)];
        peers[1].next_hop_mac = [0; 6];
        dp.apply(&local(), &peers).unwrap();
        assert_eq!(dp.maps().peers[&3].next_hop_mac, [0; 6]);
        peers[1].next_hop_mac = [2, 0, 0, 0, 0, 0x33];
        let r = dp.apply(&local(), &peers).unwrap();
        assert_eq!(r.changed, vec![3]);
        assert_eq!(r.unchanged, 1);
        assert_eq!(dp.maps().peers[&3].next_hop_mac, [2, 0, 0, 0, 0, 0x33]);
        assert_eq!(
            dp.maps().config.unwrap().underlay_mac,
            [2, 0, 0, 0, 0, 0x11]
        );
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

    #[test]
    fn macs_expire_after_their_age() {
        let mut dp = Datapath::new(FakeMaps::default());
        dp.apply(&local(), &[peer(2, 12)]).unwrap();
        let old = MacKey::new([2, 0, 0, 0, 0, 1]);
        let fresh = MacKey::new([2, 0, 0, 0, 0, 2]);
        dp.maps_mut().macs.insert(
            old,
            MacEntry {
                short_id: 2,
                pad: 0,
                seen_ns: 1_000_000_000,
            },
        );
        dp.maps_mut().macs.insert(
            fresh,
            MacEntry {
                short_id: 2,
                pad: 0,
                seen_ns: 250_000_000_000,
            },
        );
        let now = 302_000_000_000;
        assert_eq!(dp.expire_macs(now).unwrap(), 1);
        assert!(dp.maps().macs.contains_key(&fresh));
        assert!(!dp.maps().macs.contains_key(&old));
    }
}
