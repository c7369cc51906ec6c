//! The agent's view of the datapath's BPF maps.
//!
//! Every map read and write goes through [`DatapathMaps`], so the peer bookkeeping
//! in [`crate::datapath`] is tested against [`fake::FakeMaps`] without a kernel, and
//! [`BpfMaps`] is the only code that touches the real maps.

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
};
use weft_common::maps::{
    CONFIG_MAP, COUNTERS_MAP, Counter, DatapathConfig, FLOOD_MAP, MACS_MAP, MacEntry, MacKey,
    PEER_STATS_MAP, PEERS_MAP, PeerEntry, PeerStats,
};

/// A failed map operation, naming the map and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// The eBPF object has no map of that name (a build mismatch).
    #[error("eBPF object has no map {0}")]
    Missing(&'static str),
    /// A map exists but has the wrong type or record size.
    #[error("map {name} has an unexpected type or layout")]
    Layout {
        /// The map.
        name: &'static str,
        /// What aya said.
        #[source]
        source: MapError,
    },
    /// A lookup, update or delete failed.
    #[error("{op} on map {name} failed")]
    Op {
        /// The operation.
        op: &'static str,
        /// The map.
        name: &'static str,
        /// What the kernel said.
        #[source]
        source: MapError,
    },
}

/// The operations the agent performs on the datapath maps.
pub trait DatapathMaps {
    /// Writes the datapath configuration.
    fn set_config(&mut self, cfg: &DatapathConfig) -> Result<(), MapsError>;
    /// Inserts or replaces a peer.
    fn set_peer(&mut self, short_id: u16, entry: &PeerEntry) -> Result<(), MapsError>;
    /// Removes a peer (clears its slot; absent is not an error).
    fn remove_peer(&mut self, short_id: u16) -> Result<(), MapsError>;
    /// Writes slot `index` of the flood list.
    fn set_flood_slot(&mut self, index: u32, short_id: u16) -> Result<(), MapsError>;
    /// A peer's counters summed over CPUs.
    fn peer_stats(&self, short_id: u16) -> Result<PeerStats, MapsError>;
    /// Zeroes a peer's counters (when its ShortID is given up).
    fn reset_peer_stats(&mut self, short_id: u16) -> Result<(), MapsError>;
    /// Every datapath counter summed over CPUs, in [`Counter::ALL`] order.
    fn counters(&self) -> Result<Vec<u64>, MapsError>;
    /// Every learned MAC.
    fn macs(&self) -> Result<Vec<(MacKey, MacEntry)>, MapsError>;
    /// Forgets a learned MAC (absent is not an error).
    fn forget_mac(&mut self, key: &MacKey) -> Result<(), MapsError>;
    /// The configuration as the maps hold it (what an earlier run left).
    fn config(&self) -> Result<DatapathConfig, MapsError>;
    /// Every occupied peer slot (ShortID and entry).
    fn peers(&self) -> Result<Vec<(u16, PeerEntry)>, MapsError>;
    /// The first `count` slots of the flood list.
    fn flood(&self, count: u16) -> Result<Vec<u16>, MapsError>;
}

/// The real maps of a loaded eBPF object.
pub struct BpfMaps {
    config: Array<MapData, DatapathConfig>,
    peers: Array<MapData, PeerEntry>,
    flood: Array<MapData, u32>,
    macs: HashMap<MapData, MacKey, MacEntry>,
    peer_stats: PerCpuArray<MapData, PeerStats>,
    counters: PerCpuArray<MapData, u64>,
}

/// Takes map `name` out of `ebpf` as type `T`.
fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, MapsError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(MapsError::Missing(name))?;
    T::try_from(map).map_err(|source| MapsError::Layout { name, source })
}

/// Maps "key not found" to success, for idempotent deletes.
fn ignore_missing(res: Result<(), MapError>) -> Result<(), MapError> {
    match res {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl BpfMaps {
    /// Takes the datapath's maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(Self {
            config: take(ebpf, CONFIG_MAP)?,
            peers: take(ebpf, PEERS_MAP)?,
            flood: take(ebpf, FLOOD_MAP)?,
            macs: take(ebpf, MACS_MAP)?,
            peer_stats: take(ebpf, PEER_STATS_MAP)?,
            counters: take(ebpf, COUNTERS_MAP)?,
        })
    }
}

impl DatapathMaps for BpfMaps {
    fn set_config(&mut self, cfg: &DatapathConfig) -> Result<(), MapsError> {
        self.config.set(0, cfg, 0).map_err(|source| MapsError::Op {
            op: "update",
            name: CONFIG_MAP,
            source,
        })
    }

    fn set_peer(&mut self, short_id: u16, entry: &PeerEntry) -> Result<(), MapsError> {
        self.peers
            .set(u32::from(short_id), entry, 0)
            .map_err(|source| MapsError::Op {
                op: "update",
                name: PEERS_MAP,
                source,
            })
    }

    fn remove_peer(&mut self, short_id: u16) -> Result<(), MapsError> {
        self.peers
            .set(u32::from(short_id), &PeerEntry::default(), 0)
            .map_err(|source| MapsError::Op {
                op: "clear",
                name: PEERS_MAP,
                source,
            })
    }

    fn set_flood_slot(&mut self, index: u32, short_id: u16) -> Result<(), MapsError> {
        self.flood
            .set(index, &u32::from(short_id), 0)
            .map_err(|source| MapsError::Op {
                op: "update",
                name: FLOOD_MAP,
                source,
            })
    }

    fn peer_stats(&self, short_id: u16) -> Result<PeerStats, MapsError> {
        let per_cpu = self
            .peer_stats
            .get(&u32::from(short_id), 0)
            .map_err(|source| MapsError::Op {
                op: "lookup",
                name: PEER_STATS_MAP,
                source,
            })?;
        let mut total = PeerStats::default();
        for s in per_cpu.iter() {
            total.add(s);
        }
        Ok(total)
    }

    fn reset_peer_stats(&mut self, short_id: u16) -> Result<(), MapsError> {
        let op_err = |source| MapsError::Op {
            op: "update",
            name: PEER_STATS_MAP,
            source,
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| op_err(MapError::IoError(e)))?;
        let zeros =
            aya::maps::PerCpuValues::try_from(vec![PeerStats::default(); cpus.get() as usize])
                .map_err(|e| op_err(MapError::IoError(e)))?;
        self.peer_stats
            .set(u32::from(short_id), zeros, 0)
            .map_err(op_err)
    }

    fn counters(&self) -> Result<Vec<u64>, MapsError> {
        Counter::ALL
            .iter()
            .map(|c| {
                self.counters
                    .get(&(*c as u32), 0)
                    .map(|v| v.iter().sum())
                    .map_err(|source| MapsError::Op {
                        op: "lookup",
                        name: COUNTERS_MAP,
                        source,
                    })
            })
            .collect()
    }

    fn macs(&self) -> Result<Vec<(MacKey, MacEntry)>, MapsError> {
        self.macs
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| MapsError::Op {
                op: "iterate",
                name: MACS_MAP,
                source,
            })
    }

    fn forget_mac(&mut self, key: &MacKey) -> Result<(), MapsError> {
        ignore_missing(self.macs.remove(key)).map_err(|source| MapsError::Op {
            op: "delete",
            name: MACS_MAP,
            source,
        })
    }

    fn config(&self) -> Result<DatapathConfig, MapsError> {
        self.config.get(&0, 0).map_err(|source| MapsError::Op {
            op: "lookup",
            name: CONFIG_MAP,
            source,
        })
    }

    fn peers(&self) -> Result<Vec<(u16, PeerEntry)>, MapsError> {
        let mut out = Vec::new();
        for (i, entry) in self.peers.iter().enumerate() {
            let entry = entry.map_err(|source| MapsError::Op {
                op: "lookup",
                name: PEERS_MAP,
                source,
            })?;
            if entry.addr != [0; 4] {
                out.push((i as u16, entry));
            }
        }
        Ok(out)
    }

    fn flood(&self, count: u16) -> Result<Vec<u16>, MapsError> {
        (0..u32::from(count))
            .map(|i| {
                self.flood
                    .get(&i, 0)
                    .map(|id| id as u16)
                    .map_err(|source| MapsError::Op {
                        op: "lookup",
                        name: FLOOD_MAP,
                        source,
                    })
            })
            .collect()
    }
}

/// An in-memory stand-in for the maps, for tests.
#[cfg(test)]
pub mod fake {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    /// Records every write; `fail_peer_writes` makes `set_peer` fail.
    #[derive(Default, Debug)]
    pub struct FakeMaps {
        /// Last written configuration.
        pub config: Option<DatapathConfig>,
        /// Peers by ShortID.
        pub peers: BTreeMap<u16, PeerEntry>,
        /// Flood slots.
        pub flood: BTreeMap<u32, u16>,
        /// Learned MACs.
        pub macs: HashMap<MacKey, MacEntry>,
        /// Per-peer counters.
        pub stats: BTreeMap<u16, PeerStats>,
        /// Number of `set_peer` calls (to check unchanged peers are left alone).
        pub peer_writes: usize,
        /// When set, `set_peer` fails.
        pub fail_peer_writes: bool,
    }

    impl DatapathMaps for FakeMaps {
        fn set_config(&mut self, cfg: &DatapathConfig) -> Result<(), MapsError> {
            self.config = Some(*cfg);
            Ok(())
        }
        fn set_peer(&mut self, short_id: u16, entry: &PeerEntry) -> Result<(), MapsError> {
            if self.fail_peer_writes {
                return Err(MapsError::Op {
                    op: "update",
                    name: PEERS_MAP,
                    source: MapError::KeyNotFound,
                });
            }
            self.peer_writes += 1;
            self.peers.insert(short_id, *entry);
            Ok(())
        }
        fn remove_peer(&mut self, short_id: u16) -> Result<(), MapsError> {
            self.peers.remove(&short_id);
            Ok(())
        }
        fn set_flood_slot(&mut self, index: u32, short_id: u16) -> Result<(), MapsError> {
            self.flood.insert(index, short_id);
            Ok(())
        }
        fn peer_stats(&self, short_id: u16) -> Result<PeerStats, MapsError> {
            Ok(self.stats.get(&short_id).copied().unwrap_or_default())
        }
        fn reset_peer_stats(&mut self, short_id: u16) -> Result<(), MapsError> {
            self.stats.remove(&short_id);
            Ok(())
        }
        fn counters(&self) -> Result<Vec<u64>, MapsError> {
            Ok(vec![0; Counter::ALL.len()])
        }
        fn macs(&self) -> Result<Vec<(MacKey, MacEntry)>, MapsError> {
            Ok(self.macs.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn forget_mac(&mut self, key: &MacKey) -> Result<(), MapsError> {
            self.macs.remove(key);
            Ok(())
        }
        fn config(&self) -> Result<DatapathConfig, MapsError> {
            Ok(self.config.unwrap_or_default())
        }
        fn peers(&self) -> Result<Vec<(u16, PeerEntry)>, MapsError> {
            Ok(self.peers.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn flood(&self, count: u16) -> Result<Vec<u16>, MapsError> {
            Ok((0..u32::from(count))
                .map(|i| self.flood.get(&i).copied().unwrap_or_default())
                .collect())
        }
    }
}
