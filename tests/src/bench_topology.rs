//! Topology helpers for the benchmark, on top of [`Testbed`].
//!
//! [`add_flat_kernel_vxlan`] gives a host the kernel-VXLAN layout that Flannel's
//! VXLAN backend and Weave's kernel fast path reduce to: ONE VXLAN device per host,
//! one fixed VNI, UDP 6784, as a port of bridge `weave`. It is the benchmark's kernel
//! baseline. (The testbed's own [`Testbed::make_kernel_vxlan_host`] lays out Weave's
//! per-pair VNIs instead, one device per remote peer, for interop tests.)

use anyhow::{Result, ensure};

use crate::{
    cmd::run_in,
    testbed::{Testbed, add_bridged_vxlan},
};

/// Name of the device [`add_flat_kernel_vxlan`] creates.
pub const FLAT_VXLAN_DEV: &str = "vxlan0";

/// Puts one kernel VXLAN device [`FLAT_VXLAN_DEV`] on host `n`, VNI `vni`, UDP
/// [`crate::testbed::VXLAN_PORT`], bound to the host's underlay address, with the
/// outer headers weft writes too (TTL 64, DF set, UDP checksum 0), as a port of
/// bridge `weave` (MTU [`crate::testbed::OVERLAY_MTU`]). Every host in `peers` gets
/// an all-zero FDB entry, so frames the bridge sends out of the device go to them.
///
/// With one peer the device does not learn (the all-zero entry is the only
/// destination, the cheapest kernel path). With several it learns remote MACs from
/// received frames, so known unicast goes to one peer and the rest is replicated to
/// all. The host is not marked as a kernel-VXLAN host: do not start an agent on it.
pub fn add_flat_kernel_vxlan(tb: &Testbed, n: u8, peers: &[u8], vni: u32) -> Result<()> {
    ensure!(!peers.is_empty(), "host {n}: a VXLAN device needs peers");
    ensure!(
        vni > 0 && vni < 1 << 24,
        "VNI {vni} is not a 24-bit value above 0"
    );
    ensure!(!peers.contains(&n), "host {n} cannot be its own VXLAN peer");
    let host = tb.host(n)?;
    let ns = host.ns.as_str();
    let vni_s = vni.to_string();
    let local = host.addr.to_string();
    add_bridged_vxlan(ns, FLAT_VXLAN_DEV, &vni_s, &local, peers.len() != 1)?;
    for &p in peers {
        let dst = tb.host(p)?.addr.to_string();
        run_in(
            ns,
            "bridge",
            &[
                "fdb",
                "append",
                "00:00:00:00:00:00",
                "dev",
                FLAT_VXLAN_DEV,
                "dst",
                &dst,
                "self",
                "permanent",
            ],
        )?;
    }
    Ok(())
}
