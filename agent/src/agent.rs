//! The agent's lifecycle: set up, serve, reload, tear down.
//!
//! Setup order is chosen so that a failure at any step leaves nothing behind: the
//! peers file and interface are validated and the control socket is claimed before
//! the kernel is touched, and every kernel object created is recorded in
//! [`Teardown`], which runs on every exit path (error, SIGINT, SIGTERM).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::signal::unix::{Signal, SignalKind, signal};
use weft_common::{
    maps::{DEFAULT_MAC_AGE_SECS, PeerStats},
    wire::ENCAP_OVERHEAD,
};

use crate::{
    cli::RunArgs,
    control,
    datapath::{Datapath, LocalSettings, RemotePeer, monotonic_ns},
    loader,
    maps::BpfMaps,
    netdev::{self, Netdev},
    peers::{Peer, PeersFile},
    status::{Connection, ConnectionState, Direction, Overlay, Status},
};

/// How often learned MACs are swept for expiry.
const MAC_SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// How often peers' next-hop MACs are refreshed from the neighbour table.
const NEXT_HOP_REFRESH_INTERVAL: Duration = Duration::from_secs(2);

/// Kernel objects this run created, removed in reverse on exit.
#[derive(Default)]
struct Teardown {
    /// The loaded object: dropping it detaches and unloads the programs.
    ebpf: Option<aya::Ebpf>,
    /// The datapath veth pair exists.
    veth_pair: bool,
    /// The bridge, if this run created it: (ifindex, name).
    bridge: Option<(u32, String)>,
    /// Managed neighbour entries added: (ifindex, address).
    neighbours: Vec<(u32, Ipv4Addr)>,
    /// Links on which a `clsact` qdisc was added (netlink TC mode).
    clsact: Vec<u32>,
}

impl Teardown {
    async fn run(mut self, net: &Netdev) {
        // Programs first, so nothing redirects into devices that are going away.
        drop(self.ebpf.take());
        for (index, addr) in self.neighbours.drain(..) {
            if let Err(e) = net.delete_neighbour(index, addr).await {
                tracing::warn!(error = %format!("{e:#}"), "cleanup");
            }
        }
        for index in self.clsact.drain(..) {
            if let Err(e) = net.delete_clsact(index).await {
                tracing::warn!(error = %format!("{e:#}"), "cleanup");
            }
        }
        if self.veth_pair
            && let Err(e) = net.delete_datapath_pair().await
        {
            tracing::warn!(error = %format!("{e:#}"), "cleanup");
        }
        if let Some((index, name)) = self.bridge.take() {
            // Remove a bridge we created only if nothing else (pods) uses it.
            match net.bridge_ports(index).await {
                Ok(ports) if ports.is_empty() => {
                    if let Err(e) = net.delete_link(index, &name).await {
                        tracing::warn!(error = %format!("{e:#}"), "cleanup");
                    }
                }
                Ok(ports) => {
                    tracing::info!(bridge = %name, ?ports, "bridge still has ports; left in place")
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "cleanup"),
            }
        }
        tracing::info!("datapath removed");
    }
}

/// What the status snapshot and reloads share.
struct State {
    me: Peer,
    remotes: Vec<Peer>,
    settings: LocalSettings,
    port: u16,
    datapath: Datapath<BpfMaps>,
}

type Shared = Arc<Mutex<State>>;

/// `weft run`: runs the agent until SIGINT or SIGTERM.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    // 1. Everything that can be checked without changing the system.
    let peers = PeersFile::load(&args.peers_file)?;
    let (me, remotes) = peers.split(&args.name)?;
    let net = Netdev::connect()?;
    let underlay_name = match &args.iface {
        Some(name) => name.clone(),
        None => default_route_iface(&net).await?,
    };
    let underlay = net
        .link(&underlay_name)
        .await?
        .with_context(|| format!("interface {underlay_name} does not exist (--iface)"))?;
    let addrs = net.ipv4_addresses(underlay.index).await?;
    if !addrs.iter().any(|(a, _)| *a == me.address) {
        tracing::warn!(
            iface = %underlay_name,
            address = %me.address,
            "this peer's address from the peers file is not on the underlay interface; \
             peers will send to an address this host may not receive on"
        );
    }
    let needed = u32::from(args.mtu) + ENCAP_OVERHEAD as u32;
    if underlay.mtu < needed {
        bail!(
            "--mtu {} needs an underlay MTU of at least {needed} (MTU + {ENCAP_OVERHEAD} bytes of \
             VXLAN encapsulation), but {} has {}: lower --mtu or raise the underlay MTU",
            args.mtu,
            underlay.name,
            underlay.mtu
        );
    }
    // Creating the maps proves the BPF privileges; nothing is attached yet.
    let ebpf = loader::load()?;
    let socket = control::bind(&args.socket)?;
    // From here on a signal must not kill the process before teardown: catch them
    // now (tokio queues what arrives until the loop listens).
    let signals = Signals::install()?;

    // 2. Kernel state, recorded for teardown.
    let mut teardown = Teardown {
        ebpf: Some(ebpf),
        ..Teardown::default()
    };
    let result = serve(
        &args,
        &net,
        me,
        remotes,
        &underlay,
        socket,
        signals,
        &mut teardown,
    )
    .await;
    teardown.run(&net).await;
    result
}

async fn default_route_iface(net: &Netdev) -> anyhow::Result<String> {
    let Some((index, _)) = net.default_route().await? else {
        bail!("no IPv4 default route to take the underlay interface from: pass --iface");
    };
    let links = net.links().await?;
    links
        .into_iter()
        .find(|l| l.index == index)
        .map(|l| l.name)
        .context("the default route's interface disappeared: pass --iface")
}

/// The signals the agent acts on.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "the agent's state, handed over once"
)]
async fn serve(
    args: &RunArgs,
    net: &Netdev,
    me: Peer,
    remotes: Vec<Peer>,
    underlay: &netdev::Link,
    socket: control::ControlSocket,
    mut signals: Signals,
    teardown: &mut Teardown,
) -> anyhow::Result<()> {
    let mtu = u32::from(args.mtu);
    let (bridge, created) = net.ensure_bridge(&args.bridge, mtu).await?;
    if created {
        teardown.bridge = Some((bridge.index, bridge.name.clone()));
    }
    teardown.veth_pair = true;
    let (port_link, datapath_link) = net.create_datapath_pair(bridge.index, mtu).await?;

    let routes = UnderlayRoutes::read(net, underlay.index).await;
    sync_neighbours(net, underlay.index, &routes, &remotes, teardown).await;
    let settings = LocalSettings {
        short_id: me.short_id,
        addr: me.address,
        underlay_ifindex: underlay.index,
        datapath_ifindex: datapath_link.index,
        vxlan_port: args.port + 1,
        mtu: args.mtu,
        mac_age_secs: DEFAULT_MAC_AGE_SECS,
        underlay_mac: underlay.mac,
    };
    let resolved = resolve(net, underlay.index, &routes, &remotes).await;
    let ebpf = teardown
        .ebpf
        .as_mut()
        .context("the eBPF object is loaded before serving")?;
    let mut datapath = Datapath::new(BpfMaps::take(ebpf)?);
    // Maps first, then programs: the programs never run unconfigured.
    datapath.apply(&settings, &resolved)?;
    let attached = loader::attach(ebpf, port_link.index, underlay.index)?;
    teardown.clsact.extend(attached.clsact_added);

    tracing::info!(
        name = %me.name,
        short_id = me.short_id,
        underlay = %underlay.name,
        bridge = %args.bridge,
        peers = remotes.len(),
        tcx = loader::uses_tcx(),
        "weft: datapath ready"
    );

    let state: Shared = Arc::new(Mutex::new(State {
        me,
        remotes,
        settings,
        port: args.port,
        datapath,
    }));
    let snapshot_state = state.clone();
    let server = tokio::spawn(socket.serve(move || snapshot(&snapshot_state)));

    let mut sweep = tokio::time::interval(MAC_SWEEP_INTERVAL);
    let mut refresh = tokio::time::interval(NEXT_HOP_REFRESH_INTERVAL);
    loop {
        tokio::select! {
            _ = signals.term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = signals.int.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = signals.hup.recv() => {
                if let Err(e) = reload(args, net, underlay.index, &state, teardown).await {
                    tracing::error!(error = %format!("{e:#}"), "reload failed; keeping the previous peers");
                }
            }
            _ = refresh.tick() => {
                let remotes = state.lock().unwrap_or_else(PoisonError::into_inner).remotes.clone();
                let routes = UnderlayRoutes::read(net, underlay.index).await;
                let resolved = resolve(net, underlay.index, &routes, &remotes).await;
                let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
                // A reload may have replaced the peers meanwhile: apply only if not.
                if s.remotes == remotes {
                    let settings = s.settings;
                    match s.datapath.apply(&settings, &resolved) {
                        Ok(r) if !r.changed.is_empty() => tracing::debug!(peers = ?r.changed, "next hops updated"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "updating next hops failed"),
                    }
                }
            }
            _ = sweep.tick() => {
                let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
                match s.datapath.expire_macs(monotonic_ns()) {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(expired = n, "forgot aged MACs"),
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "MAC sweep failed"),
                }
            }
        }
    }
    server.abort();
    // Wait for the task to drop its socket, which removes the socket file.
    let _ = server.await;
    Ok(())
}

/// What decides a peer's next hop: the underlay's connected prefixes and the
/// default gateway. A failed read leaves them empty (then no next hop is known).
struct UnderlayRoutes {
    addrs: Vec<(Ipv4Addr, u8)>,
    gateway: Option<Ipv4Addr>,
}

impl UnderlayRoutes {
    async fn read(net: &Netdev, underlay: u32) -> Self {
        let addrs = net.ipv4_addresses(underlay).await.unwrap_or_default();
        let gateway = net
            .default_route()
            .await
            .ok()
            .flatten()
            .and_then(|(_, gw)| gw);
        Self { addrs, gateway }
    }

    fn next_hop(&self, peer: Ipv4Addr) -> Option<Ipv4Addr> {
        netdev::next_hop(peer, &self.addrs, self.gateway)
    }
}

/// The peers as the datapath needs them, with each next hop's MAC from the
/// neighbour table (zero while unresolved). A failed lookup leaves MACs zero: only
/// flooded frames suffer, and the next refresh tries again.
async fn resolve(
    net: &Netdev,
    underlay: u32,
    routes: &UnderlayRoutes,
    remotes: &[Peer],
) -> Vec<RemotePeer> {
    let neighbours: std::collections::HashMap<Ipv4Addr, [u8; 6]> = net
        .neighbours(underlay)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), "reading the neighbour table");
            Vec::new()
        })
        .into_iter()
        .collect();
    remotes
        .iter()
        .map(|p| {
            let next_hop_mac = routes
                .next_hop(p.address)
                .and_then(|hop| neighbours.get(&hop).copied())
                .unwrap_or([0; 6]);
            RemotePeer {
                short_id: p.short_id,
                addr: p.address,
                next_hop_mac,
            }
        })
        .collect()
}

/// Makes sure every peer's next hop has a managed neighbour entry, and removes the
/// entries this run added for next hops no peer uses any more (after a reload).
/// Failures only cost flooded frames to that peer, so they are logged.
async fn sync_neighbours(
    net: &Netdev,
    underlay: u32,
    routes: &UnderlayRoutes,
    remotes: &[Peer],
    teardown: &mut Teardown,
) {
    let mut needed = Vec::new();
    for peer in remotes {
        match routes.next_hop(peer.address) {
            Some(hop) => needed.push((underlay, hop)),
            None => tracing::warn!(
                peer = %peer.address,
                "no route to peer: flooded frames cannot reach it"
            ),
        }
    }
    let mut kept = Vec::new();
    for (index, hop) in std::mem::take(&mut teardown.neighbours) {
        if needed.contains(&(index, hop)) {
            kept.push((index, hop));
        } else if let Err(e) = net.delete_neighbour(index, hop).await {
            tracing::warn!(error = %format!("{e:#}"), "removing an unused neighbour entry");
        }
    }
    teardown.neighbours = kept;
    for (index, hop) in needed {
        if teardown.neighbours.contains(&(index, hop)) {
            continue;
        }
        match net.add_managed_neighbour(index, hop).await {
            Ok(true) => teardown.neighbours.push((index, hop)),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "neighbour"),
        }
    }
}

/// SIGHUP: re-reads the peers file and applies the difference.
async fn reload(
    args: &RunArgs,
    net: &Netdev,
    underlay: u32,
    state: &Shared,
    teardown: &mut Teardown,
) -> anyhow::Result<()> {
    let peers = PeersFile::load(&args.peers_file)?;
    let (me, remotes) = peers.split(&args.name)?;
    let routes = UnderlayRoutes::read(net, underlay).await;
    sync_neighbours(net, underlay, &routes, &remotes, teardown).await;
    let resolved = resolve(net, underlay, &routes, &remotes).await;
    let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
    let settings = LocalSettings {
        short_id: me.short_id,
        addr: me.address,
        ..s.settings
    };
    let report = s.datapath.apply(&settings, &resolved)?;
    tracing::info!(
        added = ?report.added,
        changed = ?report.changed,
        removed = ?report.removed,
        unchanged = report.unchanged,
        "peers file reloaded"
    );
    s.settings = settings;
    s.me = me;
    s.remotes = remotes;
    Ok(())
}

/// The status the control socket serves.
fn snapshot(state: &Shared) -> Status {
    let s = state.lock().unwrap_or_else(PoisonError::into_inner);
    let connections = s
        .remotes
        .iter()
        .map(|p| {
            let stats = s.datapath.peer_stats(p.short_id).unwrap_or_else(|e| {
                tracing::warn!(error = %format!("{e:#}"), "reading peer counters");
                PeerStats::default()
            });
            Connection {
                direction: Direction::Outbound,
                address: SocketAddrV4::new(p.address, s.port),
                state: if stats.rx_packets > 0 {
                    ConnectionState::Established
                } else {
                    ConnectionState::Pending
                },
                overlay: Overlay::Fastdp,
                name: p.name,
                nickname: p.nickname.clone(),
                short_id: p.short_id,
                mtu: s.settings.mtu,
                tx_packets: stats.tx_packets,
                tx_bytes: stats.tx_bytes,
                rx_packets: stats.rx_packets,
                rx_bytes: stats.rx_bytes,
            }
        })
        .collect();
    let mut counters: std::collections::BTreeMap<String, u64> = s
        .datapath
        .counters()
        .map(|cs| {
            cs.into_iter()
                .map(|(c, v)| (c.name().to_owned(), v))
                .collect()
        })
        .unwrap_or_default();
    if let Ok(n) = s.datapath.mac_count() {
        counters.insert("learned_macs".to_owned(), n as u64);
    }
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        name: s.me.name,
        nickname: s.me.nickname.clone(),
        short_id: s.me.short_id,
        address: s.me.address,
        port: s.port,
        mtu: s.settings.mtu,
        encryption: false,
        connections,
        counters,
    }
}
