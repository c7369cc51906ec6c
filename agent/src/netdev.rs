//! Network devices, addresses and neighbours, through rtnetlink.
//!
//! weft owns few kernel objects: the veth pair `vethwe-bridge`/`vethwe-datapath`
//! between the bridge and the eBPF datapath, the `weave` bridge when it had to
//! create it, and one managed neighbour entry per peer next hop (so flooded frames
//! always find a resolved MAC). Every netlink call goes through [`Netdev`].

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::{
    Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
        neighbour::{NeighbourAttribute, NeighbourExtFlags, NeighbourState},
        route::{RouteAddress, RouteAttribute},
        tc::TcAttribute,
    },
};

/// Name of the bridge side of the datapath veth pair.
pub const BRIDGE_PORT: &str = "vethwe-bridge";
/// Name of the datapath side of the veth pair (where `weft_encap` runs).
pub const DATAPATH_PORT: &str = "vethwe-datapath";

/// A failed netlink operation.
#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    /// Opening the netlink socket failed.
    #[error("opening a netlink socket failed")]
    Connect(#[source] std::io::Error),
    /// A request failed.
    #[error("{0} failed")]
    Request(String, #[source] rtnetlink::Error),
    /// An interface does not exist.
    #[error("interface {0} does not exist")]
    NoSuchInterface(String),
    /// An interface exists but is not what weft needs.
    #[error("interface {0} exists but is not a bridge")]
    NotABridge(String),
}

/// What weft needs to know about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// ifindex.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Link kind (`bridge`, `veth`, ...), if any.
    pub kind: Option<String>,
    /// ifindex of the bridge it is enslaved to.
    pub controller: Option<u32>,
    /// MTU.
    pub mtu: u32,
    /// Ethernet address (all zero if the link has none).
    pub mac: [u8; 6],
}

fn link_from_message(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        controller: None,
        mtu: 0,
        mac: [0; 6],
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::Address(a) if a.len() == 6 => link.mac.copy_from_slice(a),
            LinkAttribute::Controller(c) => link.controller = Some(*c),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        link.kind = Some(match kind {
                            InfoKind::Bridge => "bridge".to_owned(),
                            InfoKind::Veth => "veth".to_owned(),
                            other => format!("{other:?}").to_lowercase(),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    link
}

/// Whether an rtnetlink error is the kernel's "no such object" (ENOENT/ENODEV/ESRCH).
fn is_not_found(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m)
        if m.code.is_some_and(|c| [-libc::ENOENT, -libc::ENODEV, -libc::ESRCH].contains(&c.get())))
}

/// A netlink connection (its I/O task runs on the current tokio runtime).
#[derive(Clone)]
pub struct Netdev {
    handle: Handle,
}

impl Netdev {
    /// Opens a netlink connection in the current network namespace.
    pub fn connect() -> Result<Self, NetdevError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetdevError::Connect)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Looks a link up by name.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetdevError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(link_from_message(&msg))),
            Ok(None) => Ok(None),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(NetdevError::Request(format!("looking up link {name}"), e)),
        }
    }

    /// Every link.
    pub async fn links(&self) -> Result<Vec<Link>, NetdevError> {
        self.handle
            .link()
            .get()
            .execute()
            .map_ok(|m| link_from_message(&m))
            .try_collect()
            .await
            .map_err(|e| NetdevError::Request("listing links".to_owned(), e))
    }

    /// Returns the bridge `name`, creating it (with `mtu`, up) if absent. The flag
    /// says whether it was created.
    pub async fn ensure_bridge(&self, name: &str, mtu: u32) -> Result<(Link, bool), NetdevError> {
        if let Some(link) = self.link(name).await? {
            if link.kind.as_deref() != Some("bridge") {
                return Err(NetdevError::NotABridge(name.to_owned()));
            }
            self.set_up(link.index, Some(mtu), None).await?;
            return Ok((link, false));
        }
        self.handle
            .link()
            .add(LinkBridge::new(name).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(|e| NetdevError::Request(format!("creating bridge {name}"), e))?;
        let link = self
            .link(name)
            .await?
            .ok_or_else(|| NetdevError::NoSuchInterface(name.to_owned()))?;
        Ok((link, true))
    }

    /// (Re)creates the datapath veth pair with `mtu`, the bridge end enslaved to
    /// `bridge`, both up. A pair left by an earlier run is deleted first. Returns
    /// (bridge end, datapath end).
    pub async fn create_datapath_pair(
        &self,
        bridge: u32,
        mtu: u32,
    ) -> Result<(Link, Link), NetdevError> {
        self.delete_datapath_pair().await?;
        self.handle
            .link()
            .add(LinkVeth::new(BRIDGE_PORT, DATAPATH_PORT).mtu(mtu).build())
            .execute()
            .await
            .map_err(|e| NetdevError::Request(format!("creating veth pair {BRIDGE_PORT}"), e))?;
        let port = self
            .link(BRIDGE_PORT)
            .await?
            .ok_or_else(|| NetdevError::NoSuchInterface(BRIDGE_PORT.to_owned()))?;
        let datapath = self
            .link(DATAPATH_PORT)
            .await?
            .ok_or_else(|| NetdevError::NoSuchInterface(DATAPATH_PORT.to_owned()))?;
        self.set_up(datapath.index, Some(mtu), None).await?;
        self.set_up(port.index, Some(mtu), Some(bridge)).await?;
        Ok((port, datapath))
    }

    /// Deletes the datapath veth pair if it exists.
    pub async fn delete_datapath_pair(&self) -> Result<bool, NetdevError> {
        if let Some(link) = self.link(DATAPATH_PORT).await? {
            self.delete_link(link.index, DATAPATH_PORT).await?;
            return Ok(true);
        }
        if let Some(link) = self.link(BRIDGE_PORT).await? {
            self.delete_link(link.index, BRIDGE_PORT).await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Sets a link up, optionally with an MTU and a bridge to join.
    pub async fn set_up(
        &self,
        index: u32,
        mtu: Option<u32>,
        controller: Option<u32>,
    ) -> Result<(), NetdevError> {
        let mut msg = LinkUnspec::new_with_index(index).up();
        if let Some(mtu) = mtu {
            msg = msg.mtu(mtu);
        }
        if let Some(c) = controller {
            msg = msg.controller(c);
        }
        self.handle
            .link()
            .set(msg.build())
            .execute()
            .await
            .map_err(|e| NetdevError::Request(format!("configuring link {index}"), e))
    }

    /// Deletes a link (absent is not an error).
    pub async fn delete_link(&self, index: u32, name: &str) -> Result<(), NetdevError> {
        match self.handle.link().del(index).execute().await {
            Err(e) if !is_not_found(&e) => {
                Err(NetdevError::Request(format!("deleting link {name}"), e))
            }
            _ => Ok(()),
        }
    }

    /// Names of the links enslaved to `bridge`.
    pub async fn bridge_ports(&self, bridge: u32) -> Result<Vec<String>, NetdevError> {
        Ok(self
            .links()
            .await?
            .into_iter()
            .filter(|l| l.controller == Some(bridge))
            .map(|l| l.name)
            .collect())
    }

    /// The main table's IPv4 default route: (output interface, gateway).
    pub async fn default_route(&self) -> Result<Option<(u32, Option<Ipv4Addr>)>, NetdevError> {
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(route) = routes
            .try_next()
            .await
            .map_err(|e| NetdevError::Request("listing routes".to_owned(), e))?
        {
            if route.header.destination_prefix_length != 0 {
                continue;
            }
            let mut oif = None;
            let mut gateway = None;
            for attr in &route.attributes {
                match attr {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
                    _ => {}
                }
            }
            if let Some(oif) = oif {
                return Ok(Some((oif, gateway)));
            }
        }
        Ok(None)
    }

    /// IPv4 addresses and prefix lengths on a link.
    pub async fn ipv4_addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetdevError> {
        let mut out = Vec::new();
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(|e| NetdevError::Request("listing addresses".to_owned(), e))?
        {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(IpAddr::V4(a)) = attr {
                    out.push((*a, msg.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    /// Adds a managed neighbour entry for `addr` on `index`: the kernel resolves it
    /// and keeps it resolved (Linux 5.16+), so the datapath's FIB lookups for
    /// flooded frames find a MAC. Returns false if an entry already existed.
    pub async fn add_managed_neighbour(
        &self,
        index: u32,
        addr: Ipv4Addr,
    ) -> Result<bool, NetdevError> {
        let mut req = self
            .handle
            .neighbours()
            .add(index, IpAddr::V4(addr))
            .state(NeighbourState::None);
        req.message_mut()
            .attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        match req.execute().await {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(m))
                if m.code.is_some_and(|c| c.get() == -libc::EEXIST) =>
            {
                Ok(false)
            }
            Err(e) => Err(NetdevError::Request(
                format!("adding a managed neighbour for {addr}"),
                e,
            )),
        }
    }

    /// Resolved IPv4 neighbours on `index` (entries in a valid state) with their MACs.
    pub async fn neighbours(&self, index: u32) -> Result<Vec<(Ipv4Addr, [u8; 6])>, NetdevError> {
        let mut out = Vec::new();
        let mut entries = self
            .handle
            .neighbours()
            .get()
            .set_address_family(rtnetlink::packet_route::AddressFamily::Inet)
            .execute();
        while let Some(msg) = entries
            .try_next()
            .await
            .map_err(|e| NetdevError::Request("listing neighbours".to_owned(), e))?
        {
            let valid = matches!(
                msg.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
                    | NeighbourState::Noarp
            );
            if msg.header.ifindex != index || !valid {
                continue;
            }
            let mut addr = None;
            let mut mac = None;
            for attr in &msg.attributes {
                match attr {
                    NeighbourAttribute::Destination(
                        rtnetlink::packet_route::neighbour::NeighbourAddress::Inet(a),
                    ) => addr = Some(*a),
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                        let mut m = [0; 6];
                        m.copy_from_slice(l);
                        mac = Some(m);
                    }
                    _ => {}
                }
            }
            if let (Some(a), Some(m)) = (addr, mac) {
                out.push((a, m));
            }
        }
        Ok(out)
    }

    /// Deletes the neighbour entry for `addr` on `index` (absent is not an error).
    pub async fn delete_neighbour(&self, index: u32, addr: Ipv4Addr) -> Result<(), NetdevError> {
        let mut msg = rtnetlink::packet_route::neighbour::NeighbourMessage::default();
        msg.header.family = rtnetlink::packet_route::AddressFamily::Inet;
        msg.header.ifindex = index;
        msg.attributes.push(NeighbourAttribute::Destination(
            rtnetlink::packet_route::neighbour::NeighbourAddress::Inet(addr),
        ));
        match self.handle.neighbours().del(msg).execute().await {
            Err(e) if !is_not_found(&e) => Err(NetdevError::Request(
                format!("deleting the neighbour entry for {addr}"),
                e,
            )),
            _ => Ok(()),
        }
    }

    /// Deletes the `clsact` qdisc of a link (netlink TC mode cleanup).
    pub async fn delete_clsact(&self, index: u32) -> Result<(), NetdevError> {
        let mut req = self.handle.qdisc().del(index as i32);
        let msg = req.message_mut();
        msg.header.parent = 0xffff_fff1.into();
        msg.header.handle = 0xffff_0000.into();
        msg.attributes.push(TcAttribute::Kind("clsact".to_owned()));
        match req.execute().await {
            Err(e) if !is_not_found(&e) => Err(NetdevError::Request(
                format!("deleting the clsact qdisc of link {index}"),
                e,
            )),
            _ => Ok(()),
        }
    }
}

/// The next hop towards `peer` from an interface with `addrs`: the peer itself if
/// it is on a connected prefix, else `gateway`.
pub fn next_hop(
    peer: Ipv4Addr,
    addrs: &[(Ipv4Addr, u8)],
    gateway: Option<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let on_link = addrs.iter().any(|&(a, len)| {
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len.min(32)))
        };
        u32::from(a) & mask == u32::from(peer) & mask
    });
    if on_link { Some(peer) } else { gateway }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_hop_prefers_connected_prefixes() {
        let addrs = [(Ipv4Addr::new(192, 168, 48, 11), 24)];
        let gw = Some(Ipv4Addr::new(192, 168, 48, 1));
        assert_eq!(
            next_hop(Ipv4Addr::new(192, 168, 48, 12), &addrs, gw),
            Some(Ipv4Addr::new(192, 168, 48, 12))
        );
        assert_eq!(next_hop(Ipv4Addr::new(10, 1, 2, 3), &addrs, gw), gw);
        assert_eq!(next_hop(Ipv4Addr::new(10, 1, 2, 3), &addrs, None), None);
        let host_route = [(Ipv4Addr::new(10, 0, 0, 5), 32)];
        assert_eq!(
            next_hop(Ipv4Addr::new(10, 0, 0, 6), &host_route, None),
            None
        );
    }
}
