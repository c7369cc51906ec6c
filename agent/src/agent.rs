//! The agent's lifecycle: set up or adopt the datapath, serve, reload, stop; and
//! `weft reset`.
//!
//! The datapath outlives the agent. Its devices are ordinary kernel objects, its
//! programs stay attached through links pinned on bpffs and its maps are pinned
//! too ([`loader`]), so forwarding goes on while no agent runs: SIGTERM and SIGINT
//! stop the agent and leave the datapath as it is, and a starting agent adopts what
//! it finds (maps, programs, devices) instead of rebuilding it. `weft reset`
//! removes everything weft created, as `weave reset` does.
//!
//! Setup order is chosen so that a failure leaves nothing behind: the peers file and
//! interface are validated and the namespace's pin directory is locked (one agent
//! per network namespace) before anything else, and what
//! this run created is recorded in [`Rollback`], undone if setup fails or a stop
//! signal arrives before the datapath is ready. Anything adopted from an earlier
//! run is left as it was. weft's device is never up without its programs: a new one
//! joins the bridge only once they are attached, and rollback and reset delete it
//! before unpinning them.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::{Context, bail};
use tokio::signal::unix::{Signal, SignalKind, signal};
use weft_common::{
    maps::{DEFAULT_MAC_AGE_SECS, PeerStats},
    wire::ENCAP_OVERHEAD,
};

use crate::{
    api,
    cli::{ResetArgs, RunArgs},
    control,
    datapath::{Datapath, LocalSettings, RemotePeer},
    ipam::Blocks,
    loader::{self, PinDir},
    maps::BpfMaps,
    netdev::{self, Netdev},
    peers::{Peer, PeersFile},
    status::{
        Connection, ConnectionState, Direction, Overlay, Peer as StatusPeer, PeerConnection, Status,
    },
};

/// What this run created, removed again if setup does not complete.
#[derive(Default)]
pub(crate) struct Rollback {
    /// The bridge: (ifindex, name).
    bridge: Option<(u32, String)>,
    /// weft's VXLAN device: ifindex.
    vxlan: Option<u32>,
    /// The pin directory, if this run created it.
    pins: Option<PinDir>,
    /// The pin directory whose current-layout maps this run created (the directory
    /// itself existed).
    maps: Option<PinDir>,
}

impl Rollback {
    /// Undoes what was recorded.
    pub(crate) async fn run(self, net: &Netdev) {
        // The device first: without its programs it would accept any VXLAN, so it
        // must never outlive their links (its links go defunct with it).
        if let Some(index) = self.vxlan
            && let Err(e) = net.delete_link(index, netdev::VXLAN_DEVICE).await
        {
            tracing::warn!(error = %format!("{e:#}"), "cleanup");
        }
        if let Some(pins) = self.pins
            && let Err(e) = pins.remove()
        {
            tracing::warn!(error = %e, "cleanup: removing pins");
        }
        if let Some(pins) = self.maps
            && let Err(e) = pins.remove_maps()
        {
            tracing::warn!(error = %e, "cleanup: removing pinned maps");
        }
        if let Some((index, name)) = self.bridge {
            delete_bridge_if_unused(net, index, &name).await;
        }
    }
}

/// Deletes a bridge weft created, unless something other than weft's own device
/// is attached to it (pods).
async fn delete_bridge_if_unused(net: &Netdev, index: u32, name: &str) {
    match net.bridge_ports(index).await {
        Ok(ports) if ports.iter().all(|p| p == netdev::VXLAN_DEVICE) => {
            if let Err(e) = net.delete_link(index, name).await {
                tracing::warn!(error = %format!("{e:#}"), "cleanup");
            }
        }
        Ok(ports) => {
            tracing::info!(bridge = %name, ?ports, "bridge still has ports; left in place")
        }
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "cleanup"),
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

/// `weft run`: sets up (or adopts) the datapath and runs the agent until SIGINT or
/// SIGTERM, which leave the datapath forwarding.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    args.ipam()?;
    let (Some(peers_file), Some(name)) = (&args.peers_file, &args.name) else {
        return crate::node::run(args).await;
    };
    if args.encrypt_network == Some(true) {
        bail!(
            "static mode (--peers-file) has no encryption, but --encrypt-network=true (or \
             WEFT_ENCRYPT_NETWORK) asks for it"
        );
    }
    // 1. Everything that can be checked without changing the system.
    let peers = PeersFile::load(peers_file)?;
    let (me, remotes) = peers.split(name)?;
    let net = Netdev::connect()?;
    let (underlay, addrs) = underlay(&args, &net).await?;
    if !addrs.iter().any(|(a, _)| *a == me.address) {
        tracing::warn!(
            iface = %underlay.name,
            address = %me.address,
            "this peer's address from the peers file is not on the underlay interface; \
             peers will send to an address this host may not receive on"
        );
    }
    let Prepared {
        pins,
        lock: _lock,
        mut rollback,
        ebpf,
        socket,
        signals,
        http,
    } = prepare(&args, &net).await?;

    // 2. Kernel state; what this run creates is recorded for rollback.
    serve(
        &args,
        &net,
        me,
        remotes,
        &pins,
        ebpf,
        (socket, http),
        signals,
        &mut rollback,
    )
    .await
}

/// The underlay interface (`--iface`, or the default route's) and its IPv4
/// addresses, checked to carry the overlay MTU plus VXLAN's overhead.
pub(crate) async fn underlay(
    args: &RunArgs,
    net: &Netdev,
) -> anyhow::Result<(netdev::Link, Vec<(Ipv4Addr, u8)>)> {
    let underlay_name = match &args.iface {
        Some(name) => name.clone(),
        None => default_route_iface(net).await?,
    };
    let underlay = net
        .link(&underlay_name)
        .await?
        .with_context(|| format!("interface {underlay_name} does not exist (--iface)"))?;
    let addrs = net.ipv4_addresses(underlay.index).await?;
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
    tracing::info!(underlay = %underlay.name, mtu = underlay.mtu, "underlay checked");
    Ok((underlay, addrs))
}

/// What both modes hold once the checks passed: the namespace's pin directory
/// (locked: one agent per network namespace, until this process ends), the loaded
/// programs, the control socket and the signal handlers.
pub(crate) struct Prepared {
    pub(crate) pins: PinDir,
    pub(crate) lock: std::fs::File,
    pub(crate) rollback: Rollback,
    pub(crate) ebpf: aya::Ebpf,
    pub(crate) socket: control::ControlSocket,
    pub(crate) signals: Signals,
    /// Weave's HTTP endpoints, bound (not yet serving).
    pub(crate) http: Vec<api::Server>,
}

/// Locks the pin directory, loads the programs and binds the control socket,
/// undoing what it did if a step fails.
pub(crate) async fn prepare(args: &RunArgs, net: &Netdev) -> anyhow::Result<Prepared> {
    let pins = PinDir::for_current_netns(&args.bpffs)
        .context("reading this network namespace's cookie")?;
    let lock = pins.lock()?;
    // Under the lock, what is there is an earlier run's, and what this run adds is
    // its own to roll back.
    let rollback = Rollback {
        pins: pins.is_empty().then(|| pins.clone()),
        maps: (!pins.is_empty() && !pins.maps_exist()).then(|| pins.clone()),
        ..Rollback::default()
    };
    // Creating (or opening) the maps proves the BPF privileges (first, so a user
    // without them hears that); nothing is attached.
    let ebpf = match loader::load(&pins, args.ebpf_object.as_deref()) {
        Ok(ebpf) => ebpf,
        Err(e) => {
            rollback.run(net).await;
            return Err(e.into());
        }
    };
    let socket = match control::bind(&args.socket) {
        Ok(socket) => socket,
        Err(e) => {
            drop(ebpf);
            rollback.run(net).await;
            return Err(e.into());
        }
    };
    // Weave's HTTP endpoints, bound now so that a taken port fails the start cleanly.
    let mut http = Vec::new();
    for (endpoint, addr) in [
        (api::Endpoint::Http, args.http_addr.0),
        (api::Endpoint::Status, args.status_addr.0),
    ] {
        let Some(addr) = addr else { continue };
        match api::Server::bind(endpoint, addr).await {
            Ok(server) => http.push(server),
            Err(e) => {
                drop(socket);
                drop(ebpf);
                rollback.run(net).await;
                return Err(e.into());
            }
        }
    }
    // From here on a signal must not kill the process before cleanup: catch them
    // now (tokio queues what arrives until the loop listens). Setup itself is never
    // cut short (that could leave a step half done); a stop signal that arrives
    // meanwhile undoes it afterwards.
    let signals = Signals::install()?;
    Ok(Prepared {
        pins,
        lock,
        rollback,
        ebpf,
        socket,
        signals,
        http,
    })
}

pub(crate) async fn default_route_iface(net: &Netdev) -> anyhow::Result<String> {
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
pub(crate) struct Signals {
    pub(crate) term: Signal,
    pub(crate) int: Signal,
    pub(crate) hup: Signal,
}

impl Signals {
    pub(crate) fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// SIGTERM or SIGINT if one arrived already (without waiting).
    pub(crate) async fn pending_stop(&mut self) -> Option<&'static str> {
        tokio::select! {
            biased;
            _ = self.term.recv() => Some("SIGTERM"),
            _ = self.int.recv() => Some("SIGINT"),
            () = std::future::ready(()) => None,
        }
    }
}

/// Sets up the devices, maps and programs (rolling back on failure or a stop
/// signal during setup), then serves until stopped.
#[expect(
    clippy::too_many_arguments,
    reason = "the agent's state, handed over once"
)]
async fn serve(
    args: &RunArgs,
    net: &Netdev,
    me: Peer,
    remotes: Vec<Peer>,
    pins: &PinDir,
    mut ebpf: aya::Ebpf,
    (socket, http): (control::ControlSocket, Vec<api::Server>),
    mut signals: Signals,
    rollback: &mut Rollback,
) -> anyhow::Result<()> {
    let local = LocalPeer {
        name: me.name,
        short_id: Some(me.short_id),
        address: me.address,
        sleeve_ifindex: 0,
    };
    let outcome = setup(
        args,
        net,
        &local,
        Some(&remote_peers(&remotes)),
        pins,
        &mut ebpf,
        rollback,
    )
    .await;
    let stop = match &outcome {
        Ok(_) => signals.pending_stop().await,
        Err(_) => None,
    };
    let (datapath, settings) = match (outcome, stop) {
        (Ok(ready), None) => ready,
        (outcome, stop) => {
            if let Some(sig) = stop {
                tracing::info!("{sig} during setup: undoing it");
            }
            drop(ebpf);
            std::mem::take(rollback).run(net).await;
            return outcome.map(drop);
        }
    };
    // The datapath is complete: from here on it outlives this process.
    *rollback = Rollback::default();
    drop(ebpf);

    let state: Shared = Arc::new(Mutex::new(State {
        me,
        remotes,
        settings,
        port: args.port,
        datapath,
    }));
    let server = tokio::spawn(socket.serve(StaticHandler(state.clone())));
    let source: Arc<dyn api::StatusSource> = {
        let state = state.clone();
        Arc::new(move || snapshot(&state))
    };
    let http = serve_http(http, source);

    loop {
        let sig = tokio::select! {
            _ = signals.term.recv() => "SIGTERM",
            _ = signals.int.recv() => "SIGINT",
            _ = signals.hup.recv() => "SIGHUP",
        };
        if sig == "SIGHUP" {
            if let Err(e) = reload(args, &state) {
                tracing::error!(error = %format!("{e:#}"), "reload failed; keeping the previous peers");
            }
            continue;
        }
        tracing::info!(
            "{sig}: stopping the agent; the datapath keeps forwarding (weft reset removes it)"
        );
        break;
    }
    server.abort();
    for task in &http {
        task.abort();
    }
    // Wait for the task to drop its socket, which removes the socket file.
    let _ = server.await;
    Ok(())
}

/// Serves Weave's HTTP endpoints from `source`; abort the tasks to stop.
pub(crate) fn serve_http(
    servers: Vec<api::Server>,
    source: Arc<dyn api::StatusSource>,
) -> Vec<tokio::task::JoinHandle<()>> {
    servers
        .into_iter()
        .map(|s| {
            if let Ok(addr) = s.local_addr() {
                tracing::info!(%addr, "serving Weave's status endpoints over HTTP");
            }
            tokio::spawn(s.serve(source.clone()))
        })
        .collect()
}

/// This host as the datapath set-up needs it.
pub(crate) struct LocalPeer {
    /// Its name (for the log).
    pub(crate) name: crate::peers::PeerName,
    /// Its ShortID; `None`: keep an earlier run's, else pick one.
    pub(crate) short_id: Option<u16>,
    /// Its underlay address.
    pub(crate) address: Ipv4Addr,
    /// The sleeve's TAP device, 0 without one.
    pub(crate) sleeve_ifindex: u32,
}

/// The bridge (created if absent, recorded in `rollback` then).
pub(crate) async fn bridge(
    args: &RunArgs,
    net: &Netdev,
    rollback: &mut Rollback,
) -> anyhow::Result<netdev::Link> {
    let (bridge, created) = net.ensure_bridge(&args.bridge, u32::from(args.mtu)).await?;
    if created {
        rollback.bridge = Some((bridge.index, bridge.name.clone()));
    }
    Ok(bridge)
}

/// Brings the datapath to the desired state: bridge, VXLAN device, maps (adopted
/// from an earlier run where they exist), then the programs.
pub(crate) async fn setup(
    args: &RunArgs,
    net: &Netdev,
    me: &LocalPeer,
    remotes: Option<&[RemotePeer]>,
    pins: &PinDir,
    ebpf: &mut aya::Ebpf,
    rollback: &mut Rollback,
) -> anyhow::Result<(Datapath<BpfMaps>, LocalSettings)> {
    let mtu = u32::from(args.mtu);
    let bridge = bridge(args, net, rollback).await?;
    let port = args.port + 1;
    let (vxlan, created) = net.ensure_vxlan_device(port, mtu).await?;
    if created {
        rollback.vxlan = Some(vxlan.index);
    } else if !pins.has_links() {
        // weft's device without its programs (a run that died between creating it
        // and pinning their links): it must not carry traffic until they are back.
        net.set_down(vxlan.index).await?;
    }
    let (mut datapath, adopted) = Datapath::adopt(BpfMaps::take(ebpf)?)?;
    // Without a ShortID of its own (mesh mode), this host keeps the one an earlier
    // run on this address had (peers' datapaths name it), else picks one at random.
    let short_id = me.short_id.unwrap_or_else(|| {
        datapath
            .local()
            .filter(|l| l.addr == me.address)
            .map(|l| l.short_id)
            .unwrap_or_else(|| (crate::node::random_u64() & 0x0fff) as u16)
    });
    let settings = LocalSettings {
        short_id,
        addr: me.address,
        vxlan_ifindex: vxlan.index,
        mtu: args.mtu,
        mac_age_secs: DEFAULT_MAC_AGE_SECS,
        sleeve_ifindex: me.sleeve_ifindex,
        vxlan_port: port,
    };
    // Without peers given (mesh mode), the peers an earlier run left stay until the
    // mesh has its own view.
    let kept;
    let remotes = match remotes {
        Some(r) => r,
        None => {
            kept = datapath.peers();
            &kept
        }
    };
    // Maps first, then programs: the programs never run unconfigured.
    let report = datapath.apply(&settings, remotes)?;
    let attached = loader::attach(ebpf, pins, vxlan.index)?;
    net.activate(vxlan.index, port, mtu, bridge.index).await?;
    if me.sleeve_ifindex != 0 {
        // Two overlay ports: split horizon between them (see `set_isolated`).
        net.set_isolated(vxlan.index).await?;
        net.set_isolated(me.sleeve_ifindex).await?;
    }
    match net.root_qdisc(vxlan.index).await {
        Ok(None) => {}
        Ok(Some(kind)) if kind == "noqueue" => {}
        Ok(Some(kind)) => tracing::error!(
            device = netdev::VXLAN_DEVICE,
            qdisc = %kind,
            "a queueing qdisc on weft's device: queued frames may be sent with another \
             frame's tunnel key (the kernel shares one per CPU); remove it"
        ),
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "reading the device's qdisc"),
    }
    if let Some(blocks) = args.ipam()? {
        expose(net, &bridge, &blocks, short_id).await?;
    }
    tracing::info!(
        name = %me.name,
        short_id,
        device = netdev::VXLAN_DEVICE,
        bridge = %args.bridge,
        peers = remotes.len(),
        adopted_peers = adopted,
        written = report.added.len() + report.changed.len() + report.removed.len(),
        replaced_programs = ?attached.replaced,
        tcx = loader::uses_tcx(),
        "weft: datapath ready"
    );
    Ok((datapath, settings))
}

/// Puts the first address of this peer's IPAM block on the bridge, with the subnet's
/// prefix (Weave's `weave expose`): the pods' gateway, and how the CNI plugin finds
/// this node's block. Another address of the range (an earlier ShortID's block's) is
/// removed.
///
/// The bridge's MAC address is pinned first: a bridge whose address was never set
/// takes the lowest of its ports' addresses, so attaching a pod's veth (random MAC)
/// would change the gateway's MAC, and deleting that pod would leave every other
/// pod's ARP entry for the gateway pointing at a MAC nobody has.
pub(crate) async fn expose(
    net: &Netdev,
    bridge: &netdev::Link,
    blocks: &Blocks,
    short_id: u16,
) -> anyhow::Result<Ipv4Addr> {
    // Setting it, even to its current value, marks it as set: the kernel keeps it.
    let mac = net
        .link(&bridge.name)
        .await?
        .map_or(bridge.mac, |now| now.mac);
    net.set_mac(bridge.index, mac)
        .await
        .context("pinning the bridge's MAC address")?;
    let bridge = bridge.index;
    let addr = blocks.bridge_address(short_id);
    let prefix = blocks.subnet().prefix();
    let range = blocks.range();
    let changed = net
        .set_ipv4_address(bridge, addr, prefix, |a| range.contains(a))
        .await
        .with_context(|| format!("putting {addr}/{prefix} on the bridge"))?;
    let (first, last) = blocks.block(short_id);
    tracing::info!(
        bridge_address = %format!("{addr}/{prefix}"),
        block = %format!("{first}-{last}"),
        changed,
        "IPAM: this peer's block"
    );
    Ok(addr)
}

/// The peers as the datapath needs them.
fn remote_peers(remotes: &[Peer]) -> Vec<RemotePeer> {
    remotes
        .iter()
        .map(|p| RemotePeer {
            short_id: p.short_id,
            addr: p.address,
            sleeve: false,
            no_fastdp: false,
            encrypted: false,
        })
        .collect()
}

/// SIGHUP: re-reads the peers file and applies the difference.
fn reload(args: &RunArgs, state: &Shared) -> anyhow::Result<()> {
    let (Some(peers_file), Some(name)) = (&args.peers_file, &args.name) else {
        bail!("no peers file to reload");
    };
    let peers = PeersFile::load(peers_file)?;
    let (me, remotes) = peers.split(name)?;
    let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
    let settings = LocalSettings {
        short_id: me.short_id,
        addr: me.address,
        ..s.settings
    };
    let report = s.datapath.apply(&settings, &remote_peers(&remotes))?;
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

/// Control requests in static mode: status only (there is no mesh to connect to).
struct StaticHandler(Shared);

impl control::Handler for StaticHandler {
    fn status(&self) -> Status {
        snapshot(&self.0)
    }

    fn connect(&self, _: Vec<String>) -> Result<(), String> {
        Err("this agent runs with a static peers file: edit it and send SIGHUP".to_owned())
    }

    fn forget(&self, peers: Vec<String>) -> Result<(), String> {
        self.connect(peers)
    }
}

/// The status the control socket serves. It reads one counter slot per peer and
/// the reason counters; it never walks the MAC table.
fn snapshot(state: &Shared) -> Status {
    let s = state.lock().unwrap_or_else(PoisonError::into_inner);
    let connections: Vec<Connection> = s
        .remotes
        .iter()
        .map(|p| {
            let stats = s.datapath.peer_stats(p.short_id).unwrap_or_else(|e| {
                tracing::warn!(error = %format!("{e:#}"), "reading peer counters");
                PeerStats::default()
            });
            Connection {
                direction: Direction::Outbound,
                address: SocketAddrV4::new(p.address, s.port).to_string(),
                state: if stats.rx_packets > 0 {
                    ConnectionState::Established
                } else {
                    ConnectionState::Pending
                },
                info: None,
                encrypted: false,
                overlay: Some(Overlay::Fastdp),
                name: p.name,
                nickname: p.nickname.clone(),
                short_id: Some(p.short_id),
                mtu: s.settings.mtu,
                tx_packets: stats.tx_packets,
                tx_bytes: stats.tx_bytes,
                rx_packets: stats.rx_packets,
                rx_bytes: stats.rx_bytes,
                sleeve: None,
                ipsec: None,
            }
        })
        .collect();
    let counters = s.datapath.counters_by_name();
    // Without a mesh, the peers are the peers file: this peer lists its connections;
    // what the others see is unknown here, so they list none.
    let local = StatusPeer {
        name: s.me.name,
        nickname: s.me.nickname.clone(),
        uid: 0,
        short_id: Some(s.me.short_id),
        version: 0,
        connections: connections
            .iter()
            .map(|c| PeerConnection {
                name: c.name,
                nickname: c.nickname.clone(),
                address: c.address.clone(),
                outbound: true,
                established: c.state == ConnectionState::Established,
            })
            .collect(),
    };
    let peers = std::iter::once(local)
        .chain(s.remotes.iter().map(|p| StatusPeer {
            name: p.name,
            nickname: p.nickname.clone(),
            uid: 0,
            short_id: Some(p.short_id),
            version: 0,
            connections: Vec::new(),
        }))
        .collect();
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        name: s.me.name,
        nickname: s.me.nickname.clone(),
        short_id: s.me.short_id,
        uid: 0,
        peer_version: 0,
        address: s.me.address.into(),
        port: s.port,
        mtu: s.settings.mtu,
        encryption: false,
        peer_discovery: false,
        trusted_subnets: Vec::new(),
        targets: Vec::new(),
        target_states: Vec::new(),
        connections,
        peers,
        termination_count: 0,
        counters,
        sleeve_counters: Default::default(),
    }
}

/// `weft reset`: removes everything weft created in this network namespace: the
/// pinned programs' links and maps (the programs detach), the underlay guards,
/// weft's VXLAN device, and the bridge if weft created it. Refuses while an agent
/// answers on the socket.
pub async fn reset(args: ResetArgs) -> anyhow::Result<()> {
    if control::query(&args.socket).await.is_ok() {
        bail!(
            "an agent is running on {}: stop it first (SIGTERM), then reset",
            args.socket.display()
        );
    }
    let net = Netdev::connect()?;
    let pins = PinDir::for_current_netns(&args.bpffs)
        .context("reading this network namespace's cookie")?;
    let _lock = pins.lock()?;
    // The device before the pins: it must never be up without its programs.
    if let Some(link) = net.link(netdev::VXLAN_DEVICE).await? {
        if link.is_ours() {
            net.delete_link(link.index, &link.name).await?;
        } else {
            tracing::warn!(
                device = netdev::VXLAN_DEVICE,
                "not created by weft (no weft alias); left in place"
            );
        }
    }
    // The underlay guards (netlink filters: on whichever interface was the underlay;
    // TCX links go with the pins).
    let ifindexes = match loader::uses_tcx() {
        true => Vec::new(),
        false => net.links().await?.into_iter().map(|l| l.index).collect(),
    };
    let guards = loader::detach_guards(&pins, ifindexes);
    if guards > 0 {
        tracing::info!("weft reset: removed {guards} underlay guard attachments");
    }
    pins.remove()
        .with_context(|| format!("removing {}", pins.root().display()))?;
    if let Some(bridge) = net.link(&args.bridge).await?
        && bridge.is_ours()
    {
        delete_bridge_if_unused(&net, bridge.index, &bridge.name).await;
    }
    remove_stale_socket(&args.socket);
    // The IPsec state goes last: until the device is gone, its marked frames to
    // encrypted peers must meet the block policy rather than leave in clear.
    match crate::esp::Esp::remove_all() {
        Ok(0) => {}
        Ok(n) => tracing::info!("weft reset: removed {n} XFRM entries (IPsec)"),
        Err(e) => bail!("removing weft's XFRM state (IPsec SAs and policies): {e}"),
    }
    tracing::info!("weft reset: datapath removed");
    Ok(())
}

/// Removes a control socket file nobody answers on (left by a killed agent).
fn remove_stale_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(socket = %path.display(), error = %e, "removing stale socket")
        }
        _ => {}
    }
}
