//! Network devices and addresses, through rtnetlink.
//!
//! weft owns few kernel objects: its metadata-mode VXLAN device (`weft-vxlan`, a
//! port of the bridge, where both programs run) and the `weave` bridge when it had
//! to create it. Each carries the interface alias [`OWNER_ALIAS`], so weft never
//! removes or adopts a device that is not its own (Weave's included). Every netlink
//! call goes through [`Netdev`].

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressMessage},
        link::{
            BridgePortState, InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVxlan,
            LinkAttribute, LinkInfo, LinkMessage,
        },
        route::{RouteAddress, RouteAttribute},
        tc::TcAttribute,
    },
};

/// Name of weft's metadata-mode VXLAN device.
pub const VXLAN_DEVICE: &str = "weft-vxlan";
/// The name weft's device has between its creation and its marking as weft's.
const VXLAN_DEVICE_TEMP: &str = "weft-vxlan.new";
/// Interface alias (`ip link show` prints it) marking a device weft created.
pub const OWNER_ALIAS: &str = "weft";

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
    /// An interface of weft's name exists but was not created by weft.
    #[error(
        "interface {0} exists but was not created by weft (no alias \"{OWNER_ALIAS}\"): \
         remove it or rename it"
    )]
    NotOurs(String),
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
    /// Interface alias, if set.
    pub alias: Option<String>,
    /// For a VXLAN device: (UDP port, metadata mode).
    pub vxlan: Option<(u16, bool)>,
    /// As a bridge port: whether it is in the forwarding state.
    pub forwarding: bool,
}

impl Link {
    /// Whether weft created this link.
    pub fn is_ours(&self) -> bool {
        self.alias.as_deref() == Some(OWNER_ALIAS)
    }
}

fn link_from_message(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        controller: None,
        mtu: 0,
        mac: [0; 6],
        alias: None,
        vxlan: None,
        forwarding: false,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::Address(a) if a.len() == 6 => link.mac.copy_from_slice(a),
            LinkAttribute::Controller(c) => link.controller = Some(*c),
            LinkAttribute::IfAlias(a) => link.alias = Some(a.clone()),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(kind) => {
                            link.kind = Some(match kind {
                                InfoKind::Bridge => "bridge".to_owned(),
                                InfoKind::Veth => "veth".to_owned(),
                                InfoKind::Vxlan => "vxlan".to_owned(),
                                other => format!("{other:?}").to_lowercase(),
                            });
                        }
                        LinkInfo::Data(InfoData::Vxlan(attrs)) => {
                            let (mut port, mut external) = (0, false);
                            for a in attrs {
                                match a {
                                    InfoVxlan::Port(p) => port = *p,
                                    InfoVxlan::CollectMetadata(m) => external = *m,
                                    _ => {}
                                }
                            }
                            link.vxlan = Some((port, external));
                        }
                        LinkInfo::PortData(InfoPortData::BridgePort(attrs)) => {
                            link.forwarding = attrs.iter().any(|a| {
                                matches!(a, InfoBridgePort::State(BridgePortState::Forwarding))
                            });
                        }
                        _ => {}
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

    /// Returns the bridge `name`, creating it (with `mtu`, up, marked as weft's) if
    /// absent. The flag says whether it was created.
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
        if let Err(e) = self.mark_ours(link.index, name).await {
            let _ = self.delete_link(link.index, name).await;
            return Err(e);
        }
        Ok((link, true))
    }

    /// Returns weft's metadata-mode VXLAN device on UDP `port` and whether this call
    /// created it. A device of weft's from an earlier run is kept as it is when its
    /// port matches (its programs keep forwarding meanwhile), else replaced. A new
    /// device is left down and outside the bridge: in metadata mode it would accept
    /// VXLAN of any VNI from anyone, so it must not carry traffic before its programs
    /// are attached ([`Netdev::activate`]). It is created under a temporary name,
    /// marked as weft's, then renamed, so a crash never leaves an unmarked device of
    /// weft's name. A device of that name that is not weft's is an error.
    pub async fn ensure_vxlan_device(
        &self,
        port: u16,
        mtu: u32,
    ) -> Result<(Link, bool), NetdevError> {
        if let Some(link) = self.link(VXLAN_DEVICE).await? {
            if !link.is_ours() {
                return Err(NetdevError::NotOurs(VXLAN_DEVICE.to_owned()));
            }
            if link.vxlan == Some((port, true)) {
                return Ok((link, false));
            }
            self.delete_link(link.index, VXLAN_DEVICE).await?;
        }
        if let Some(stale) = self.link(VXLAN_DEVICE_TEMP).await? {
            // Only weft uses this name, and only between two steps of this function.
            self.delete_link(stale.index, VXLAN_DEVICE_TEMP).await?;
        }
        // Metadata mode (`external`): one device carries every peer, the tunnel key
        // of each frame names the peer. No learning: the programs decide. IPv4 UDP
        // checksums are zero unless a tunnel key asks for them.
        self.handle
            .link()
            .add(
                LinkVxlan::new(VXLAN_DEVICE_TEMP, 0)
                    .port(port)
                    .collect_metadata(true)
                    .learning(false)
                    .udp_csum(false)
                    .mtu(mtu)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| NetdevError::Request(format!("creating {VXLAN_DEVICE}"), e))?;
        let link = self
            .link(VXLAN_DEVICE_TEMP)
            .await?
            .ok_or_else(|| NetdevError::NoSuchInterface(VXLAN_DEVICE_TEMP.to_owned()))?;
        let named = async {
            self.mark_ours(link.index, VXLAN_DEVICE).await?;
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(link.index)
                        .name(VXLAN_DEVICE.to_owned())
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| NetdevError::Request(format!("naming {VXLAN_DEVICE}"), e))
        };
        if let Err(e) = named.await {
            let _ = self.delete_link(link.index, VXLAN_DEVICE_TEMP).await;
            return Err(e);
        }
        let link = self
            .link(VXLAN_DEVICE)
            .await?
            .ok_or_else(|| NetdevError::NoSuchInterface(VXLAN_DEVICE.to_owned()))?;
        Ok((link, true))
    }

    /// Puts weft's device into the bridge and brings it up (once its programs are
    /// attached). Up opens the UDP socket: this is where a port taken by another
    /// VXLAN device fails.
    pub async fn activate(
        &self,
        index: u32,
        port: u16,
        mtu: u32,
        bridge: u32,
    ) -> Result<(), NetdevError> {
        self.set_up(index, Some(mtu), Some(bridge))
            .await
            .map_err(|e| match e {
                NetdevError::Request(_, source) => NetdevError::Request(
                    format!("bringing {VXLAN_DEVICE} up on UDP port {port}"),
                    source,
                ),
                other => other,
            })
    }

    /// Makes a bridge port isolated (`bridge_slave isolated on`): the bridge never
    /// forwards between two isolated ports. weft's two overlay ports (the VXLAN device
    /// and the sleeve's TAP device) are isolated so that a frame one overlay delivers
    /// is never sent on by the other (weft does not relay between peers: the sender
    /// reaches every peer itself), while pods reach both.
    pub async fn set_isolated(&self, index: u32) -> Result<(), NetdevError> {
        let msg = LinkBridgePort::new(index)
            .append_info_data(InfoBridgePort::Isolated(true))
            .build();
        self.handle
            .link()
            .set_port(msg)
            .execute()
            .await
            .map_err(|e| NetdevError::Request(format!("isolating bridge port {index}"), e))
    }

    /// Turns hairpin mode on for a bridge port (`bridge_slave hairpin on`): the bridge
    /// may send a frame back out of the port it came in on, which a pod reaching its
    /// own Service address (DNAT back to itself on the host) needs.
    pub async fn set_hairpin(&self, index: u32) -> Result<(), NetdevError> {
        let msg = LinkBridgePort::new(index)
            .append_info_data(InfoBridgePort::HairpinMode(true))
            .build();
        self.handle
            .link()
            .set_port(msg)
            .execute()
            .await
            .map_err(|e| NetdevError::Request(format!("hairpin mode on bridge port {index}"), e))
    }

    /// Sets a link's Ethernet address.
    pub async fn set_mac(&self, index: u32, mac: [u8; 6]) -> Result<(), NetdevError> {
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .address(mac.to_vec())
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| NetdevError::Request(format!("setting the address of link {index}"), e))
    }

    /// Sets a link down.
    pub async fn set_down(&self, index: u32) -> Result<(), NetdevError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(|e| NetdevError::Request(format!("setting link {index} down"), e))
    }

    /// The root qdisc of a link, by kind (`noqueue` when it has none configured).
    pub async fn root_qdisc(&self, index: u32) -> Result<Option<String>, NetdevError> {
        let mut qdiscs = self.handle.qdisc().get().index(index as i32).execute();
        while let Some(msg) = qdiscs
            .try_next()
            .await
            .map_err(|e| NetdevError::Request("listing qdiscs".to_owned(), e))?
        {
            if msg.header.index != index as i32 || msg.header.parent != 0xffff_ffff.into() {
                continue;
            }
            for attr in &msg.attributes {
                if let TcAttribute::Kind(kind) = attr {
                    return Ok(Some(kind.clone()));
                }
            }
        }
        Ok(None)
    }

    /// Sets the alias [`OWNER_ALIAS`] on a link weft created (the kernel ignores an
    /// alias in the request that creates a link).
    async fn mark_ours(&self, index: u32, name: &str) -> Result<(), NetdevError> {
        let msg = LinkUnspec::new_with_index(index)
            .append_extra_attribute(LinkAttribute::IfAlias(OWNER_ALIAS.to_owned()))
            .build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| NetdevError::Request(format!("marking {name} as weft's"), e))
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
        Ok(self
            .ipv4_address_messages(index)
            .await?
            .into_iter()
            .map(|(addr, prefix, _)| (addr, prefix))
            .collect())
    }

    /// The address messages of a link's IPv4 addresses, with the address and prefix.
    async fn ipv4_address_messages(
        &self,
        index: u32,
    ) -> Result<Vec<(Ipv4Addr, u8, AddressMessage)>, NetdevError> {
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
            let addr = msg.attributes.iter().find_map(|attr| match attr {
                AddressAttribute::Address(IpAddr::V4(a)) => Some(*a),
                _ => None,
            });
            if let Some(a) = addr
                && msg.header.index == index
            {
                let prefix = msg.header.prefix_len;
                out.push((a, prefix, msg));
            }
        }
        Ok(out)
    }

    /// Puts `addr/prefix` on a link, removing the link's other IPv4 addresses for
    /// which `stale` holds (an earlier block's address, say). Returns whether
    /// anything changed.
    pub async fn set_ipv4_address(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
        stale: impl Fn(Ipv4Addr) -> bool,
    ) -> Result<bool, NetdevError> {
        let mut present = false;
        let mut changed = false;
        for (a, p, msg) in self.ipv4_address_messages(index).await? {
            if a == addr && p == prefix {
                present = true;
            } else if stale(a) || a == addr {
                match self.handle.address().del(msg).execute().await {
                    Err(e) if !is_not_found(&e) => {
                        return Err(NetdevError::Request(
                            format!("removing {a}/{p} from link {index}"),
                            e,
                        ));
                    }
                    _ => changed = true,
                }
            }
        }
        if !present {
            self.add_ipv4_address(index, addr, prefix).await?;
            changed = true;
        }
        Ok(changed)
    }

    /// Adds `addr/prefix` to a link.
    pub async fn add_ipv4_address(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetdevError> {
        self.handle
            .address()
            .add(index, IpAddr::V4(addr), prefix)
            .execute()
            .await
            .map_err(|e| NetdevError::Request(format!("adding {addr}/{prefix} to link {index}"), e))
    }

    /// Creates a veth pair `name` - `peer` (both down) and returns the link `name`.
    pub async fn create_veth(&self, name: &str, peer: &str) -> Result<Link, NetdevError> {
        self.handle
            .link()
            .add(LinkVeth::new(name, peer).build())
            .execute()
            .await
            .map_err(|e| NetdevError::Request(format!("creating veth {name}"), e))?;
        self.link(name)
            .await?
            .ok_or_else(|| NetdevError::NoSuchInterface(name.to_owned()))
    }

    /// Moves a link into the network namespace open as `netns_fd`, renaming it to
    /// `new_name` on the way (the kernel does both in one step).
    pub async fn move_to_netns(
        &self,
        index: u32,
        netns_fd: std::os::fd::RawFd,
        new_name: &str,
    ) -> Result<(), NetdevError> {
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .setns_by_fd(netns_fd)
                    .name(new_name.to_owned())
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| {
                NetdevError::Request(
                    format!("moving link {index} into the container as {new_name}"),
                    e,
                )
            })
    }

    /// Adds the IPv4 default route via `gateway`, out of link `index`.
    pub async fn add_default_route(
        &self,
        index: u32,
        gateway: Ipv4Addr,
    ) -> Result<(), NetdevError> {
        self.handle
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .output_interface(index)
                    .gateway(gateway)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| NetdevError::Request(format!("adding the default route via {gateway}"), e))
    }
}
