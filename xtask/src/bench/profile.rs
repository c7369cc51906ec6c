//! Underlay profiles: how each host's underlay link (a veth pair: `eth0` in the
//! host's namespace, a port of the underlay switch at the other end) treats
//! super-packets.
//!
//! - `veth`: the veth defaults. TSO and GSO on, GRO off: a sender's GSO super-packet
//!   crosses the underlay whole, so a datapath's per-packet costs are paid once per
//!   ~64 KB. Flattering, and unlike any real network.
//! - `nic`: a wire with MTU-sized frames, as with a physical NIC. TSO and GSO off on
//!   both ends of every link, so senders segment before the wire and the switch
//!   forwards frames as they came; GRO on on the hosts' `eth0`, so receivers coalesce
//!   what they can (the kernel merges tunnelled TCP only for a UDP port it has a
//!   tunnel socket on). Both ends matter: a veth hands packets to GRO only when the
//!   device sending into it has no TSO.
//!
//! Every mode's links are switched to a profile together, before any mode is
//! measured under it, and the settings are read back with `ethtool -k`.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use weft_testbed::cmd::run_in;

use super::modes::Port;

/// The underlay interface of every host.
pub const UNDERLAY_DEV: &str = "eth0";

/// Which end of a host's underlay link an interface is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The host's `eth0`.
    Host,
    /// The underlay switch's port.
    Switch,
}

/// An underlay profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Profile {
    /// Offloads on: super-packets cross the wire whole.
    Veth,
    /// Senders segment on the wire (TSO, GSO off), receivers coalesce (GRO on).
    Nic,
}

/// `--profile`: one profile or both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// Offloads on: super-packets cross the wire whole.
    Veth,
    /// Senders segment on the wire (TSO, GSO off), receivers coalesce (GRO on).
    Nic,
    /// Both, `veth` then `nic`, interleaved in every round.
    #[default]
    All,
}

impl Choice {
    /// The profiles it stands for, in the order a round runs them.
    pub fn profiles(self) -> Vec<Profile> {
        match self {
            Choice::Veth => vec![Profile::Veth],
            Choice::Nic => vec![Profile::Nic],
            Choice::All => Profile::ALL.to_vec(),
        }
    }
}

impl Profile {
    /// Every profile, in run order.
    pub const ALL: [Profile; 2] = [Profile::Veth, Profile::Nic];

    /// Its name on the command line, in the tables and in bench.json.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Veth => "veth",
            Profile::Nic => "nic",
        }
    }

    /// One line on what it is.
    pub fn about(self) -> &'static str {
        match self {
            Profile::Veth => {
                "veth defaults on both ends of each host's underlay link (TSO, GSO on; \
                 GRO off): super-packets cross the wire whole"
            }
            Profile::Nic => {
                "TSO, UDP segmentation offload and GSO off on both ends of each host's \
                 underlay link (the host's eth0, the switch's port), GRO on on the host's \
                 eth0: senders segment to MTU-sized frames on the wire (TCP and UDP GSO \
                 alike), receivers coalesce"
            }
        }
    }

    /// The `ethtool -K` settings of one end of a link: (short name, on).
    fn settings(self, end: End) -> [(&'static str, bool); 4] {
        let nic = self == Profile::Nic;
        [
            ("tso", !nic),
            // UDP GSO (the sleeve's batches) is a feature of its own: without this a
            // 64 KB UDP super-packet would still cross the wire whole.
            ("tx-udp-segmentation", !nic),
            ("gso", !nic),
            ("gro", nic && end == End::Host),
        ]
    }

    /// The `ethtool -k` features that must then be active or not: (name, active).
    fn expected(self, end: End) -> Vec<(&'static str, bool)> {
        let mut out = Vec::new();
        for (short, on) in self.settings(end) {
            let names: &[&'static str] = match short {
                "tso" => &["tx-tcp-segmentation", "tx-tcp6-segmentation"],
                "tx-udp-segmentation" => &["tx-udp-segmentation"],
                "gso" => &["generic-segmentation-offload"],
                _ => &["generic-receive-offload"],
            };
            out.extend(names.iter().map(|n| (*n, on)));
        }
        out
    }

    /// `ethtool -K` on `port`, the `end` of a link, then reads the features back and
    /// fails unless every one is in effect.
    pub fn apply(self, port: &Port, end: End) -> Result<()> {
        let (ns, dev) = (port.ns.as_str(), port.dev.as_str());
        let mut args = vec!["-K", dev];
        for (short, on) in self.settings(end) {
            args.extend([short, if on { "on" } else { "off" }]);
        }
        run_in(ns, "ethtool", &args)
            .with_context(|| format!("{ns}: setting underlay profile {}", self.name()))?;
        let text = run_in(ns, "ethtool", &["--json", "-k", dev])?;
        let features: Value = serde_json::from_str(&text)
            .with_context(|| format!("`ethtool --json -k` printed {text}"))?;
        let wrong = self.mismatches(end, &features[0]);
        if !wrong.is_empty() {
            bail!(
                "{ns}: underlay profile {} not in effect on {dev}: {}",
                self.name(),
                wrong.join(", ")
            );
        }
        Ok(())
    }

    /// The expected features of `end` that `features` (one interface of `ethtool
    /// --json -k`) shows otherwise, as `name=active` (or `name=missing`).
    fn mismatches(self, end: End, features: &Value) -> Vec<String> {
        self.expected(end)
            .into_iter()
            .filter_map(|(name, want)| match features[name]["active"].as_bool() {
                Some(active) if active == want => None,
                Some(active) => Some(format!("{name}={active}")),
                None => Some(format!("{name}=missing")),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(tso: bool, gso: bool, gro: bool) -> Value {
        serde_json::json!({
            "tx-tcp-segmentation": {"active": tso},
            "tx-tcp6-segmentation": {"active": tso},
            "tx-udp-segmentation": {"active": tso},
            "generic-segmentation-offload": {"active": gso},
            "generic-receive-offload": {"active": gro},
        })
    }

    #[test]
    fn nic_turns_segmentation_off_and_gro_on_at_the_host_only() {
        let (nic, veth) = (Profile::Nic, Profile::Veth);
        assert!(
            nic.mismatches(End::Host, &features(false, false, true))
                .is_empty()
        );
        assert!(
            nic.mismatches(End::Switch, &features(false, false, false))
                .is_empty()
        );
        assert_eq!(
            nic.mismatches(End::Switch, &features(false, false, true)),
            ["generic-receive-offload=true"]
        );
        for end in [End::Host, End::Switch] {
            assert!(
                veth.mismatches(end, &features(true, true, false))
                    .is_empty()
            );
        }
        assert_eq!(
            nic.mismatches(End::Host, &features(true, false, true)),
            [
                "tx-tcp-segmentation=true",
                "tx-tcp6-segmentation=true",
                "tx-udp-segmentation=true"
            ]
        );
        assert_eq!(
            veth.mismatches(End::Host, &serde_json::json!({})).len(),
            5,
            "absent features count as wrong"
        );
    }

    #[test]
    fn choice_expands_in_run_order() {
        assert_eq!(Choice::default().profiles(), [Profile::Veth, Profile::Nic]);
        assert_eq!(Choice::Nic.profiles(), [Profile::Nic]);
    }
}
