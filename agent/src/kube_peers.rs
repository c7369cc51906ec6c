//! Peers from the Kubernetes API server (`weft run --kube-peers`), as Weave's
//! DaemonSet finds them: every node's `InternalIP` is a peer, this node's excepted.
//! The node list is read at start and then every [`INTERVAL`]; nodes that appear
//! become targets, nodes that go are forgotten, through the same path as `weft
//! connect` and `weft forget`. The API server being down or answering garbage is
//! logged and retried, never fatal; only a missing configuration (neither in a pod
//! nor a KUBECONFIG) stops the agent at start.
//!
//! The client is the `kube` crate with in-cluster configuration (the pod's service
//! account) or KUBECONFIG (`~/.kube/config`), behind the `kubernetes` cargo feature.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

/// How often the node list is read when it was read fine.
pub const INTERVAL: Duration = Duration::from_secs(60);
/// How soon a failed read is retried.
pub const RETRY: Duration = Duration::from_secs(10);
/// How long one read may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A node as the API server lists it (the part weft reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    /// `metadata.name`.
    pub name: String,
    /// The `InternalIP` addresses of `status.addresses`.
    pub internal_ips: Vec<IpAddr>,
}

/// Who this node is, to leave it out of its own peers.
#[derive(Debug, Clone, Default)]
pub struct Me {
    /// This node's name (Weave's DaemonSet sets HOSTNAME to it).
    pub node_name: String,
    /// This host's addresses.
    pub addresses: Vec<Ipv4Addr>,
}

/// The peers a node list gives: each other node's first IPv4 `InternalIP` (the
/// mesh is IPv4), as a target string.
pub fn peers_of(nodes: &[NodeEntry], me: &Me) -> BTreeSet<String> {
    nodes
        .iter()
        .filter(|n| n.name != me.node_name)
        .filter_map(|n| {
            let ip = n.internal_ips.iter().find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            });
            if ip.is_none() {
                tracing::debug!(node = %n.name, "node has no IPv4 InternalIP: not a peer");
            }
            ip
        })
        .filter(|ip| !me.addresses.contains(ip))
        .map(|ip| ip.to_string())
        .collect()
}

/// What changed between two peer sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// New peers, to connect to.
    pub added: Vec<String>,
    /// Peers whose nodes went, to forget.
    pub removed: Vec<String>,
}

impl Change {
    /// From `old` to `new`; peers in `keep` (given on the command line or in
    /// KUBE_PEERS) are never forgotten.
    pub fn between(old: &BTreeSet<String>, new: &BTreeSet<String>, keep: &[String]) -> Self {
        Change {
            added: new.difference(old).cloned().collect(),
            removed: old
                .difference(new)
                .filter(|p| !keep.contains(p))
                .cloned()
                .collect(),
        }
    }

    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

pub use client::Follower;

/// The API client (the module's pure part above is what the unit tests check).
mod client {
    use std::collections::BTreeSet;

    use anyhow::Context;
    use serde::Deserialize;

    use super::{Change, INTERVAL, Me, NodeEntry, READ_TIMEOUT, RETRY, peers_of};

    /// The node list. `resourceVersion=0`: any version will do, so the API server
    /// answers from its watch cache instead of a quorum read of etcd (every node
    /// asks, every interval).
    const NODES: &str = "/api/v1/nodes?resourceVersion=0";

    /// The part of a `NodeList` weft reads. Decoding only this, rather than
    /// k8s-openapi's whole `Node`, keeps ~1 MB of deserialisers out of the agent.
    #[derive(Debug, Deserialize)]
    struct NodeList {
        items: Vec<NodeItem>,
    }

    #[derive(Debug, Deserialize)]
    struct NodeItem {
        #[serde(default)]
        metadata: Metadata,
        #[serde(default)]
        status: Option<NodeStatus>,
    }

    #[derive(Debug, Default, Deserialize)]
    struct Metadata {
        #[serde(default)]
        name: String,
    }

    #[derive(Debug, Deserialize)]
    struct NodeStatus {
        #[serde(default)]
        addresses: Vec<NodeAddress>,
    }

    #[derive(Debug, Deserialize)]
    struct NodeAddress {
        #[serde(rename = "type")]
        kind: String,
        address: String,
    }

    /// Follows the node list.
    pub struct Follower {
        client: kube::Client,
        me: Me,
        keep: Vec<String>,
        interval: std::time::Duration,
        known: BTreeSet<String>,
    }

    impl Follower {
        /// A client from the pod's service account or KUBECONFIG; fails only when
        /// there is no usable configuration (nothing is contacted yet).
        pub async fn new(me: Me, keep: Vec<String>) -> anyhow::Result<Self> {
            let mut config = kube::Config::infer().await.context(
                "--kube-peers: no Kubernetes API configuration (neither in a pod with a \
                 service account nor a KUBECONFIG)",
            )?;
            config.read_timeout = Some(READ_TIMEOUT);
            config.connect_timeout = Some(READ_TIMEOUT);
            tracing::info!(server = %config.cluster_url, "peers from the Kubernetes API's node list");
            let client = kube::Client::try_from(config)
                .context("--kube-peers: creating the Kubernetes API client")?;
            Ok(Follower {
                client,
                me,
                keep,
                interval: INTERVAL,
                known: BTreeSet::new(),
            })
        }

        /// Reads the node list every `interval` instead of [`INTERVAL`].
        pub fn with_interval(mut self, interval: std::time::Duration) -> Self {
            self.interval = interval;
            self
        }

        /// Lists the nodes.
        async fn nodes(&self) -> anyhow::Result<Vec<NodeEntry>> {
            let request = http::Request::get(NODES)
                .body(Vec::new())
                .context("building the request")?;
            let text = self
                .client
                .request_text(request)
                .await
                .context("listing the nodes")?;
            let list: NodeList = serde_json::from_str(&text)
                .context("listing the nodes: the answer is not a NodeList")?;
            Ok(list
                .items
                .into_iter()
                .map(|n| NodeEntry {
                    name: n.metadata.name,
                    internal_ips: n
                        .status
                        .map(|s| s.addresses)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|a| a.kind == "InternalIP")
                        .filter_map(|a| a.address.parse().ok())
                        .collect(),
                })
                .collect())
        }

        /// Reads the node list once and returns what changed since the last read.
        pub async fn poll(&mut self) -> anyhow::Result<Change> {
            let nodes = self.nodes().await?;
            let peers = peers_of(&nodes, &self.me);
            let change = Change::between(&self.known, &peers, &self.keep);
            self.known = peers;
            Ok(change)
        }

        /// Runs until `apply` fails (the agent is stopping): each change goes to
        /// `apply`; failures are logged and retried after [`RETRY`].
        pub async fn run(mut self, mut apply: impl FnMut(Change) -> Result<(), String>) {
            loop {
                let wait = match self.poll().await {
                    Ok(change) => {
                        if !change.is_empty() {
                            tracing::info!(
                                added = ?change.added,
                                removed = ?change.removed,
                                "peers from the Kubernetes node list changed"
                            );
                            if apply(change).is_err() {
                                return;
                            }
                        }
                        self.interval
                    }
                    Err(e) => {
                        let retry = RETRY.min(self.interval);
                        tracing::warn!(
                            "Kubernetes API: {:#}; retrying in {} s",
                            e,
                            retry.as_secs_f32()
                        );
                        retry
                    }
                };
                // ±20 %, so that the agents a rollout started together do not ask
                // the API server in step.
                let jitter = 0.8 + (crate::node::random_u64() % 401) as f64 / 1000.0;
                tokio::time::sleep(wait.mul_f64(jitter)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ips: &[&str]) -> NodeEntry {
        NodeEntry {
            name: name.to_owned(),
            internal_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn peers_are_other_nodes_first_ipv4() {
        let me = Me {
            node_name: "n1".into(),
            addresses: vec!["10.0.0.9".parse().unwrap()],
        };
        let nodes = [
            node("n1", &["10.0.0.1"]),
            node("n2", &["fd00::2", "10.0.0.2", "10.0.1.2"]),
            node("n3", &[]),
            node("n4", &["fd00::4"]),
            // Another name, but one of this host's addresses.
            node("n1-alias", &["10.0.0.9"]),
            node("n5", &["10.0.0.5"]),
        ];
        let peers: Vec<String> = peers_of(&nodes, &me).into_iter().collect();
        assert_eq!(peers, ["10.0.0.2", "10.0.0.5"]);
    }

    #[test]
    fn changes_add_and_forget_but_keep_static_peers() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let c = Change::between(&set(&[]), &set(&["a", "b"]), &[]);
        assert_eq!(c.added, ["a", "b"]);
        assert!(c.removed.is_empty());
        let c = Change::between(&set(&["a", "b", "s"]), &set(&["b", "c"]), &["s".into()]);
        assert_eq!(c.added, ["c"]);
        assert_eq!(c.removed, ["a"]);
        assert!(Change::between(&set(&["a"]), &set(&["a"]), &[]).is_empty());
    }
}
