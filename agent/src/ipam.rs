//! IP address management: the allocation range split into one block per ShortID.
//!
//! The range (Weave's `--ipalloc-range`, default 10.32.0.0/12) is cut into
//! [`BLOCKS`] equal blocks; the peer with ShortID `s` owns block `s` and hands out
//! addresses only from it, so no two peers ever allocate the same address and no
//! consensus round is needed (the mesh keeps ShortIDs unique). Pods and the bridge
//! get the prefix of the *subnet* (Weave's `--ipalloc-default-subnet`, which must
//! contain the range, default the range itself): a weft range and a Weave range that
//! are disjoint parts of one subnet make one L2 segment. The subnet's network and
//! broadcast addresses are never handed out. The first usable address of a block is
//! the bridge's (Weave's `weave expose`), the pods' gateway.
//!
//! Everything here is arithmetic, free of I/O; [`crate::cni`] keeps the allocations.

use std::{fmt, net::Ipv4Addr, str::FromStr};

/// How many blocks a range is cut into: one per 12-bit ShortID.
pub const BLOCKS: u32 = 4096;
/// Longest accepted range prefix: a /18 leaves blocks of 4 addresses.
pub const MAX_RANGE_PREFIX: u8 = 18;
/// Weave's default allocation range.
pub const DEFAULT_RANGE: &str = "10.32.0.0/12";

/// A bad range, subnet or address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// Not `a.b.c.d/n`.
    #[error("{0:?} is not an IPv4 CIDR (like 10.32.0.0/12)")]
    Syntax(String),
    /// Host bits set below the prefix.
    #[error("{given} has host bits set (did you mean {network}?)")]
    HostBits {
        /// What was given.
        given: String,
        /// The network it lies in.
        network: Ipv4Net,
    },
    /// A range too small for 4096 blocks.
    #[error(
        "allocation range {0} is too small: it is split into {BLOCKS} blocks, one per \
         peer, so its prefix must be /{MAX_RANGE_PREFIX} or shorter (Weave's default is \
         {DEFAULT_RANGE})"
    )]
    RangeTooSmall(Ipv4Net),
    /// The subnet does not contain the range.
    #[error("the default subnet {subnet} does not contain the allocation range {range}")]
    SubnetMismatch {
        /// The range.
        range: Ipv4Net,
        /// The subnet.
        subnet: Ipv4Net,
    },
    /// An address outside the range.
    #[error("{addr} is not in the allocation range {range}")]
    OutsideRange {
        /// The address.
        addr: Ipv4Addr,
        /// The range.
        range: Ipv4Net,
    },
}

/// An IPv4 network: an address with no host bits set, and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// The network `addr/prefix` (host bits are an error).
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, IpamError> {
        if prefix > 32 {
            return Err(IpamError::Syntax(format!("{addr}/{prefix}")));
        }
        let network = Self::containing(addr, prefix);
        if network.addr != addr {
            return Err(IpamError::HostBits {
                given: format!("{addr}/{prefix}"),
                network,
            });
        }
        Ok(network)
    }

    /// The network of prefix length `prefix` (at most 32) that holds `addr`.
    pub fn containing(addr: Ipv4Addr, prefix: u8) -> Self {
        let prefix = prefix.min(32);
        Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        }
    }

    /// The network address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// How many addresses it spans.
    pub fn size(&self) -> u64 {
        1u64 << (32 - self.prefix)
    }

    /// The last (broadcast) address.
    pub fn last(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !mask(self.prefix))
    }

    /// Whether it holds `addr`.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix) == u32::from(self.addr)
    }

    /// Whether it holds all of `other`.
    pub fn contains_net(&self, other: &Ipv4Net) -> bool {
        self.prefix <= other.prefix && self.contains(other.addr)
    }
}

fn mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = IpamError;

    fn from_str(s: &str) -> Result<Self, IpamError> {
        let syntax = || IpamError::Syntax(s.to_owned());
        let (addr, prefix) = s.trim().split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        if prefix > 32 {
            return Err(syntax());
        }
        Self::new(addr, prefix)
    }
}

/// An allocation range and the subnet pods live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocks {
    range: Ipv4Net,
    subnet: Ipv4Net,
}

impl Blocks {
    /// Checks a range (prefix at most [`MAX_RANGE_PREFIX`]) and a subnet holding it
    /// (default: the range).
    pub fn new(range: Ipv4Net, subnet: Option<Ipv4Net>) -> Result<Self, IpamError> {
        if range.prefix > MAX_RANGE_PREFIX {
            return Err(IpamError::RangeTooSmall(range));
        }
        let subnet = subnet.unwrap_or(range);
        if !subnet.contains_net(&range) {
            return Err(IpamError::SubnetMismatch { range, subnet });
        }
        Ok(Self { range, subnet })
    }

    /// The allocation range.
    pub fn range(&self) -> Ipv4Net {
        self.range
    }

    /// The subnet (its prefix is the pods' and the bridge's).
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// Addresses per block.
    pub fn block_size(&self) -> u32 {
        (self.range.size() / u64::from(BLOCKS)) as u32
    }

    /// First and last address of the block of `short_id` (its low 12 bits).
    pub fn block(&self, short_id: u16) -> (Ipv4Addr, Ipv4Addr) {
        let first = u32::from(self.range.addr()) + u32::from(short_id & 0x0fff) * self.block_size();
        (
            Ipv4Addr::from(first),
            Ipv4Addr::from(first + self.block_size() - 1),
        )
    }

    /// The block (ShortID) an address of the range lies in.
    pub fn block_of(&self, addr: Ipv4Addr) -> Result<u16, IpamError> {
        if !self.range.contains(addr) {
            return Err(IpamError::OutsideRange {
                addr,
                range: self.range,
            });
        }
        Ok(((u32::from(addr) - u32::from(self.range.addr)) / self.block_size()) as u16)
    }

    /// The addresses of a block that may be handed out, in order: all but the
    /// subnet's network and broadcast addresses.
    pub fn usable(&self, short_id: u16) -> impl Iterator<Item = Ipv4Addr> + Clone + use<> {
        let (first, last) = self.block(short_id);
        let (network, broadcast) = (self.subnet.addr, self.subnet.last());
        (u32::from(first)..=u32::from(last))
            .map(Ipv4Addr::from)
            .filter(move |a| *a != network && *a != broadcast)
    }

    /// The bridge's address in the block of `short_id`: its first usable one.
    pub fn bridge_address(&self, short_id: u16) -> Ipv4Addr {
        // Blocks have at least 4 addresses, of which at most one is the network and
        // one the broadcast address (only a block at an edge of the subnet has either).
        self.usable(short_id)
            .next()
            .unwrap_or_else(|| self.block(short_id).0)
    }

    /// The addresses a pod may get in the block of `short_id`: the usable ones but
    /// the bridge's.
    pub fn pod_addresses(&self, short_id: u16) -> impl Iterator<Item = Ipv4Addr> + Clone + use<> {
        self.usable(short_id).skip(1)
    }
}

/// Who holds an address: a container's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The runtime's container id.
    pub container_id: String,
    /// The interface's name inside the container.
    pub ifname: String,
}

impl Owner {
    /// The content of an allocation file.
    fn record(&self) -> String {
        format!("{}\n{}\n", self.container_id, self.ifname)
    }
}

/// The allocations of one network on this node: one file per address, named by the
/// address and holding its owner, in one directory (as the reference host-local
/// plugin keeps them). A file appears complete or not at all (written aside, then
/// hard-linked to its name, which fails if the name exists), so two plugins running
/// at once never hand out one address, without a lock; the files outlive restarts of
/// the agent and of the node.
#[derive(Debug)]
pub struct Store {
    dir: std::path::PathBuf,
}

impl Store {
    /// The store in `dir` (created on first use).
    pub fn new(dir: std::path::PathBuf) -> Self {
        Self { dir }
    }

    /// The addresses held by `owner`, in order.
    pub fn held_by(&self, owner: &Owner) -> std::io::Result<Vec<Ipv4Addr>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let record = owner.record();
        let mut held = Vec::new();
        for entry in entries {
            let entry = entry?;
            let Some(addr) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            match std::fs::read_to_string(entry.path()) {
                Ok(content) if content == record => held.push(addr),
                Ok(_) => {}
                // Released meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        held.sort();
        Ok(held)
    }

    /// Allocates the first free address of `candidates` to `owner`; an address of
    /// `candidates` it already holds (a repeated ADD) is returned as it is. `None`:
    /// every candidate is taken. The flag says whether the address is new.
    pub fn allocate(
        &self,
        candidates: impl Iterator<Item = Ipv4Addr> + Clone,
        owner: &Owner,
    ) -> std::io::Result<Option<(Ipv4Addr, bool)>> {
        let held = self.held_by(owner)?;
        if let Some(addr) = candidates.clone().find(|a| held.contains(a)) {
            return Ok(Some((addr, false)));
        }
        create_private_dir(&self.dir)?;
        // Unique among plugins running at once, even in other PID namespaces sharing
        // the directory (a temp file two of them wrote would be one owner's twice).
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let temp = self
            .dir
            .join(format!(".new-{}-{nanos}", std::process::id()));
        let written = (|| {
            use std::{io::Write, os::unix::fs::OpenOptionsExt};
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)?;
            f.write_all(owner.record().as_bytes())?;
            // On disk before it has its name: after a power loss an allocation is
            // there with its owner, or not at all (an empty file would be an address
            // nobody could release).
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        let mut found = None;
        for addr in candidates {
            match std::fs::hard_link(&temp, self.path(addr)) {
                Ok(()) => {
                    found = Some((addr, true));
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    let _ = std::fs::remove_file(&temp);
                    return Err(e);
                }
            }
        }
        std::fs::remove_file(&temp)?;
        if found.is_some() {
            std::fs::File::open(&self.dir)?.sync_all()?;
        }
        Ok(found)
    }

    /// Releases `addr` if `owner` holds it.
    pub fn release_addr(&self, addr: Ipv4Addr, owner: &Owner) -> std::io::Result<bool> {
        match std::fs::read_to_string(self.path(addr)) {
            Ok(content) if content == owner.record() => {
                match std::fs::remove_file(self.path(addr)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(true),
                }
            }
            Ok(_) => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Releases every address `owner` holds; returns them.
    pub fn release(&self, owner: &Owner) -> std::io::Result<Vec<Ipv4Addr>> {
        let held = self.held_by(owner)?;
        for addr in &held {
            self.release_addr(*addr, owner)?;
        }
        Ok(held)
    }

    fn path(&self, addr: Ipv4Addr) -> std::path::PathBuf {
        self.dir.join(addr.to_string())
    }
}

/// Creates `dir` and its missing parents, readable by root only (container ids and
/// addresses are nobody else's business); an existing directory is left as it is.
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(net("10.32.0.0/12").addr(), ip("10.32.0.0"));
        assert_eq!(net("10.32.0.0/12").prefix(), 12);
        assert_eq!(net("0.0.0.0/0").size(), 1 << 32);
        assert_eq!(net("10.32.0.0/12").last(), ip("10.47.255.255"));
        assert_eq!(net("1.2.3.4/32").last(), ip("1.2.3.4"));
        for bad in [
            "",
            "10.32.0.0",
            "10.32.0.0/",
            "10.32.0.0/33",
            "10.32.0.0/-1",
            "10.32.0.0/+12",
            "10.32.0.0/012",
            "10.32.0/12",
            "fe80::/64",
            "10.32.0.0/12/1",
            "x/12",
        ] {
            assert!(
                matches!(bad.parse::<Ipv4Net>(), Err(IpamError::Syntax(_))),
                "{bad:?}"
            );
        }
        let err = "10.32.0.1/12".parse::<Ipv4Net>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "10.32.0.1/12 has host bits set (did you mean 10.32.0.0/12?)"
        );
    }

    #[test]
    fn containment() {
        let n = net("10.32.0.0/12");
        assert!(n.contains(ip("10.47.255.255")));
        assert!(!n.contains(ip("10.48.0.0")));
        assert!(!n.contains(ip("10.31.255.255")));
        assert!(n.contains_net(&net("10.40.0.0/13")));
        assert!(n.contains_net(&n));
        assert!(!net("10.40.0.0/13").contains_net(&n));
        assert!(!n.contains_net(&net("10.48.0.0/13")));
        assert_eq!(
            Ipv4Net::containing(ip("10.40.3.1"), 12),
            net("10.32.0.0/12")
        );
    }

    #[test]
    fn default_range_blocks_are_24s() {
        let b = Blocks::new(net(DEFAULT_RANGE), None).unwrap();
        assert_eq!(b.block_size(), 256);
        assert_eq!(b.block(0), (ip("10.32.0.0"), ip("10.32.0.255")));
        assert_eq!(b.block(1), (ip("10.32.1.0"), ip("10.32.1.255")));
        assert_eq!(b.block(4095), (ip("10.47.255.0"), ip("10.47.255.255")));
        // Only the low 12 bits count.
        assert_eq!(b.block(4096 + 1), b.block(1));
        assert_eq!(b.block_of(ip("10.32.1.77")), Ok(1));
        assert_eq!(b.block_of(ip("10.47.255.255")), Ok(4095));
        assert!(matches!(
            b.block_of(ip("10.48.0.0")),
            Err(IpamError::OutsideRange { .. })
        ));
    }

    #[test]
    fn edge_blocks_skip_network_and_broadcast() {
        let b = Blocks::new(net(DEFAULT_RANGE), None).unwrap();
        // Block 0 holds the subnet's network address, block 4095 its broadcast.
        assert_eq!(b.usable(0).next(), Some(ip("10.32.0.1")));
        assert_eq!(b.usable(0).count(), 255);
        assert_eq!(b.bridge_address(0), ip("10.32.0.1"));
        assert_eq!(b.pod_addresses(0).next(), Some(ip("10.32.0.2")));
        assert_eq!(b.usable(4095).last(), Some(ip("10.47.255.254")));
        assert_eq!(b.usable(4095).count(), 255);
        assert_eq!(b.bridge_address(4095), ip("10.47.255.0"));
        // Inner blocks keep .0 and .255: they are ordinary addresses of a /12.
        assert_eq!(b.bridge_address(7), ip("10.32.7.0"));
        assert_eq!(b.usable(7).count(), 256);
        assert_eq!(b.pod_addresses(7).last(), Some(ip("10.32.7.255")));
    }

    #[test]
    fn range_inside_a_bigger_subnet() {
        // weft's half of a subnet shared with Weave routers.
        let b = Blocks::new(net("10.40.0.0/13"), Some(net("10.32.0.0/12"))).unwrap();
        assert_eq!(b.block_size(), 128);
        assert_eq!(b.block(0), (ip("10.40.0.0"), ip("10.40.0.127")));
        // 10.40.0.0 is not the subnet's network address: it is usable.
        assert_eq!(b.bridge_address(0), ip("10.40.0.0"));
        assert_eq!(b.block(4095).1, ip("10.47.255.255"));
        assert_eq!(b.usable(4095).last(), Some(ip("10.47.255.254")));
        assert_eq!(b.subnet().prefix(), 12);
        // The lower half: its block 0 starts at the subnet's network address.
        let w = Blocks::new(net("10.32.0.0/13"), Some(net("10.32.0.0/12"))).unwrap();
        assert_eq!(w.bridge_address(0), ip("10.32.0.1"));
        assert_eq!(w.usable(4095).last(), Some(ip("10.39.255.255")));
    }

    #[test]
    fn smallest_range() {
        let b = Blocks::new(net("10.0.0.0/18"), None).unwrap();
        assert_eq!(b.block_size(), 4);
        assert_eq!(b.usable(0).collect::<Vec<_>>().len(), 3);
        assert_eq!(b.pod_addresses(0).count(), 2);
        assert_eq!(b.pod_addresses(4095).count(), 2);
        assert_eq!(b.pod_addresses(5).count(), 3);
        let err = Blocks::new(net("10.0.0.0/19"), None).unwrap_err();
        assert_eq!(err, IpamError::RangeTooSmall(net("10.0.0.0/19")));
        assert!(err.to_string().contains("/18 or shorter"), "{err}");
    }

    #[test]
    fn subnet_must_contain_range() {
        for (range, subnet) in [
            ("10.40.0.0/13", "10.32.0.0/13"),
            ("10.32.0.0/12", "10.32.0.0/13"),
            ("10.32.0.0/12", "192.168.0.0/16"),
        ] {
            let err = Blocks::new(net(range), Some(net(subnet))).unwrap_err();
            assert!(
                matches!(err, IpamError::SubnetMismatch { .. }),
                "{range} {subnet}: {err}"
            );
        }
        assert!(Blocks::new(net("10.32.0.0/12"), Some(net("10.0.0.0/8"))).is_ok());
    }

    #[test]
    fn store_allocates_lowest_free_and_releases() {
        let dir = std::env::temp_dir().join(format!("weft-ipam-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::new(dir.join("net"));
        let b = Blocks::new(net(DEFAULT_RANGE), None).unwrap();
        let owner = |id: &str| Owner {
            container_id: id.to_owned(),
            ifname: "eth0".to_owned(),
        };
        assert!(store.held_by(&owner("a")).unwrap().is_empty());
        assert!(store.release(&owner("a")).unwrap().is_empty());
        let a = store.allocate(b.pod_addresses(3), &owner("a")).unwrap();
        assert_eq!(a, Some((ip("10.32.3.1"), true)));
        let c = store.allocate(b.pod_addresses(3), &owner("c")).unwrap();
        assert_eq!(c, Some((ip("10.32.3.2"), true)));
        // A repeated ADD gets the same address.
        let again = store.allocate(b.pod_addresses(3), &owner("a")).unwrap();
        assert_eq!(again, Some((ip("10.32.3.1"), false)));
        // Another owner's address is not released.
        assert!(!store.release_addr(ip("10.32.3.2"), &owner("a")).unwrap());
        assert_eq!(store.release(&owner("a")).unwrap(), vec![ip("10.32.3.1")]);
        assert!(store.held_by(&owner("a")).unwrap().is_empty());
        // The lowest free address comes back.
        let d = store.allocate(b.pod_addresses(3), &owner("d")).unwrap();
        assert_eq!(d, Some((ip("10.32.3.1"), true)));
        // A full block.
        let tiny = Blocks::new(net("10.0.0.0/18"), None).unwrap();
        assert!(
            store
                .allocate(tiny.pod_addresses(0), &owner("x"))
                .unwrap()
                .is_some()
        );
        assert!(
            store
                .allocate(tiny.pod_addresses(0), &owner("y"))
                .unwrap()
                .is_some()
        );
        assert_eq!(
            store.allocate(tiny.pod_addresses(0), &owner("z")).unwrap(),
            None
        );
        // Root's only: the directories made and the allocation files.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("net")), 0o700);
        assert_eq!(mode(&dir.join("net").join("10.0.0.2")), 0o600);
        // Only files named by an address count; no temp file is left.
        std::fs::write(dir.join("net").join("lock"), "").unwrap();
        assert_eq!(store.held_by(&owner("x")).unwrap(), vec![ip("10.0.0.2")]);
        let names: Vec<_> = std::fs::read_dir(dir.join("net"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(names.is_empty(), "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
