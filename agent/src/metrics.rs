//! Prometheus metrics (`/metrics` on `--status-addr`), built from a [`Status`]
//! snapshot at scrape time so that status and metrics never disagree.
//!
//! Weave Net's metric names are kept where weft has the same thing:
//! `weave_connections{state,type,encryption}` (a gauge per connection state, overlay
//! type and encryption, counted as weaver counts them) and
//! `weave_connection_terminations_total`. weft's own metrics carry a `weft_` prefix:
//!
//! - `weft_info{version,name,nickname}`: always 1.
//! - `weft_peers`: known peers, this one included.
//! - `weft_peer_{tx,rx}_{packets,bytes}_total{peer="name(nick)",overlay}`: traffic per
//!   peer and overlay (`fastdp` from the eBPF datapath, `sleeve` when sleeve ran).
//! - `weft_datapath_drops_total{reason}` and `weft_sleeve_drops_total{reason}`: the
//!   counters named `drop_<reason>`; `weft_datapath_events_total{event}` and
//!   `weft_sleeve_events_total{event}`: the other counters.
//!
//! The text is OpenMetrics ([`CONTENT_TYPE`]), which Prometheus scrapes natively.

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::status::{ConnectionState, Status};

/// The `Content-Type` of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A label set: `(name, value)` pairs.
type Labels = Vec<(String, String)>;

/// A family of counters (its samples get `_total` appended to the name).
type Counters = Family<Labels, Counter>;
/// A family of gauges.
type Gauges = Family<Labels, Gauge>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A gauge value from a count (saturating: counts never come near `i64::MAX`).
fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Counters named `drop_<reason>` go to `drops` as `reason`, the rest to `events`.
fn split_counters(
    counters: &std::collections::BTreeMap<String, u64>,
    drops: &Counters,
    events: &Counters,
) {
    for (name, value) in counters {
        match name.strip_prefix("drop_") {
            Some(reason) => drops.get_or_create(&labels(&[("reason", reason)])),
            None => events.get_or_create(&labels(&[("event", name)])),
        }
        .inc_by(*value);
    }
}

/// The metrics of `status` in the OpenMetrics text format.
pub fn render(status: &Status) -> String {
    let mut registry = Registry::default();

    // weaver's `weave_connections`: for every state it knows and every overlay type
    // seen in that state, one gauge for encrypted (`yes`) and one for unencrypted
    // (empty) connections. Targets have no overlay: type `unknown`.
    let connections = Gauges::default();
    let lines = status.connection_lines();
    for state in ConnectionState::counted() {
        let mut types: Vec<&str> = lines
            .iter()
            .filter(|l| l.state == *state)
            .map(|l| l.attrs.map_or("unknown", |a| a.overlay.as_str()))
            .collect();
        types.sort_unstable();
        types.dedup();
        for ty in types {
            let of_type = lines.iter().filter(|l| {
                l.state == *state && l.attrs.map_or("unknown", |a| a.overlay.as_str()) == ty
            });
            let encrypted = of_type
                .clone()
                .filter(|l| l.attrs.is_some_and(|a| a.encrypted))
                .count();
            let total = of_type.count();
            for (encryption, n) in [("yes", encrypted), ("", total - encrypted)] {
                connections
                    .get_or_create(&labels(&[
                        ("state", state.as_str()),
                        ("type", ty),
                        ("encryption", encryption),
                    ]))
                    .set(gauge_value(n as u64));
            }
        }
    }
    registry.register(
        "weave_connections",
        "Number of peer-to-peer connections",
        connections,
    );

    let terminations = Counter::<u64>::default();
    terminations.inc_by(status.termination_count);
    registry.register(
        "weave_connection_terminations",
        "Number of peer-to-peer connections terminated",
        terminations,
    );

    let info = Gauges::default();
    info.get_or_create(&labels(&[
        ("version", &status.version),
        ("name", &status.name.to_string()),
        ("nickname", &status.nickname),
    ]))
    .set(1);
    registry.register("weft_info", "The agent's version and peer name", info);

    let peers = Gauge::<i64>::default();
    peers.set(gauge_value(status.peers.len() as u64));
    registry.register("weft_peers", "Known peers, this one included", peers);

    let traffic: [(&str, &str, Counters); 4] = [
        (
            "weft_peer_tx_packets",
            "Frames sent to a peer",
            Counters::default(),
        ),
        (
            "weft_peer_tx_bytes",
            "Inner bytes sent to a peer",
            Counters::default(),
        ),
        (
            "weft_peer_rx_packets",
            "Frames received from a peer",
            Counters::default(),
        ),
        (
            "weft_peer_rx_bytes",
            "Inner bytes received from a peer",
            Counters::default(),
        ),
    ];
    for c in &status.connections {
        let peer = format!("{}({})", c.name, c.nickname);
        let fastdp = [c.tx_packets, c.tx_bytes, c.rx_packets, c.rx_bytes];
        let sleeve = c
            .sleeve
            .map(|s| [s.tx_packets, s.tx_bytes, s.rx_packets, s.rx_bytes]);
        for (overlay, values) in [("fastdp", Some(fastdp)), ("sleeve", sleeve)] {
            let Some(values) = values else { continue };
            for ((_, _, family), value) in traffic.iter().zip(values) {
                family
                    .get_or_create(&labels(&[("peer", &peer), ("overlay", overlay)]))
                    .inc_by(value);
            }
        }
    }
    for (name, help, family) in traffic {
        registry.register(name, help, family);
    }

    for (overlay, counters) in [
        ("datapath", &status.counters),
        ("sleeve", &status.sleeve_counters),
    ] {
        let (drops, events) = (Counters::default(), Counters::default());
        split_counters(counters, &drops, &events);
        registry.register(
            format!("weft_{overlay}_drops"),
            format!("Frames the {overlay} dropped, by reason"),
            drops,
        );
        registry.register(
            format!("weft_{overlay}_events"),
            format!("Other {overlay} counters, by event"),
            events,
        );
    }

    // The encoder ends each help text with a full stop.
    let mut out = String::new();
    // Writing to a String cannot fail; label values are escaped by the encoder.
    let _ = encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::status::{
        Overlay, Target, TargetState, Traffic,
        tests::{live_password_run, sample},
    };

    /// One sample line: name, labels, value.
    type Sample = (String, BTreeMap<String, String>, f64);

    /// A small parser of the exposition's sample lines (no escapes in these tests'
    /// label values).
    fn parse(text: &str) -> Vec<Sample> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("name value");
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => {
                        let body = rest.strip_suffix('}').expect("closing brace");
                        let labels = body
                            .split("\",")
                            .map(|kv| {
                                let (k, v) = kv.split_once("=\"").expect("k=\"v\"");
                                (k.to_owned(), v.trim_end_matches('"').to_owned())
                            })
                            .collect();
                        (name.to_owned(), labels)
                    }
                    None => (series.to_owned(), BTreeMap::new()),
                };
                (name, labels, value.parse().expect("a number"))
            })
            .collect()
    }

    fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = want
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        samples
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
    }

    #[test]
    fn weave_names_and_weft_counters() {
        let mut status = sample();
        status.termination_count = 4;
        status.counters.insert("drop_too_big".to_owned(), 7);
        status.sleeve_counters = BTreeMap::from([
            ("drop_decrypt".to_owned(), 3),
            ("drop_replay".to_owned(), 2),
            ("rx_frames".to_owned(), 11),
        ]);
        status.connections[0].sleeve = Some(Traffic {
            tx_packets: 5,
            tx_bytes: 500,
            rx_packets: 6,
            rx_bytes: 600,
        });
        status.target_states.push(Target {
            address: "192.168.48.99:6783".to_owned(),
            direct: true,
            state: TargetState::Failed,
            last_error: Some("refused".to_owned()),
            retry_at_ms: None,
        });
        let text = render(&status);
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("# HELP weave_connections Number of peer-to-peer connections.\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE weave_connections gauge\n"), "{text}");
        assert!(
            text.contains("# TYPE weave_connection_terminations counter\n"),
            "{text}"
        );
        let s = parse(&text);
        let conns = |state, ty, enc| {
            value(
                &s,
                "weave_connections",
                &[("state", state), ("type", ty), ("encryption", enc)],
            )
        };
        assert_eq!(conns("established", "fastdp", ""), Some(1.0));
        assert_eq!(conns("established", "fastdp", "yes"), Some(0.0));
        assert_eq!(conns("pending", "fastdp", ""), Some(1.0));
        assert_eq!(conns("failed", "unknown", ""), Some(1.0));
        assert_eq!(conns("retrying", "unknown", ""), None);
        assert_eq!(
            value(&s, "weave_connection_terminations_total", &[]),
            Some(4.0)
        );
        assert_eq!(value(&s, "weft_peers", &[]), Some(2.0));
        let host2 = "aa:00:00:00:00:02(host2)";
        let peer = |name, overlay| value(&s, name, &[("peer", host2), ("overlay", overlay)]);
        assert_eq!(peer("weft_peer_tx_packets_total", "fastdp"), Some(10.0));
        assert_eq!(peer("weft_peer_tx_bytes_total", "fastdp"), Some(1000.0));
        assert_eq!(peer("weft_peer_rx_packets_total", "fastdp"), Some(20.0));
        assert_eq!(peer("weft_peer_rx_bytes_total", "fastdp"), Some(2000.0));
        assert_eq!(peer("weft_peer_rx_bytes_total", "sleeve"), Some(600.0));
        assert_eq!(peer("weft_peer_tx_packets_total", "sleeve"), Some(5.0));
        let host3 = "aa:00:00:00:00:03(host3)";
        assert_eq!(
            value(
                &s,
                "weft_peer_rx_packets_total",
                &[("peer", host3), ("overlay", "sleeve")]
            ),
            None,
            "no sleeve series for a peer sleeve never carried"
        );
        let drops = |name, reason| value(&s, name, &[("reason", reason)]);
        assert_eq!(drops("weft_datapath_drops_total", "too_big"), Some(7.0));
        assert_eq!(
            drops("weft_datapath_drops_total", "unknown_source"),
            Some(0.0)
        );
        assert_eq!(drops("weft_sleeve_drops_total", "decrypt"), Some(3.0));
        assert_eq!(drops("weft_sleeve_drops_total", "replay"), Some(2.0));
        assert_eq!(
            value(
                &s,
                "weft_datapath_events_total",
                &[("event", "rx_delivered")]
            ),
            Some(20.0)
        );
        assert_eq!(
            value(&s, "weft_sleeve_events_total", &[("event", "rx_frames")]),
            Some(11.0)
        );
        assert_eq!(
            value(
                &s,
                "weft_info",
                &[
                    ("version", "0.1.0"),
                    ("name", "aa:00:00:00:00:01"),
                    ("nickname", "host1")
                ]
            ),
            Some(1.0)
        );
    }

    #[test]
    fn encrypted_sleeve_connections_count_as_weave_does() {
        let s = parse(&render(&live_password_run()));
        let conns = |enc| {
            value(
                &s,
                "weave_connections",
                &[
                    ("state", "established"),
                    ("type", "sleeve"),
                    ("encryption", enc),
                ],
            )
        };
        assert_eq!(conns("yes"), Some(1.0));
        assert_eq!(conns(""), Some(0.0));
        assert_eq!(
            s.iter()
                .filter(|(n, _, _)| n == "weave_connections")
                .count(),
            2
        );
    }

    #[test]
    fn nothing_connected_still_renders() {
        let mut status = sample();
        status.connections.clear();
        status.peers.truncate(1);
        status.counters.clear();
        let text = render(&status);
        let s = parse(&text);
        assert!(
            !s.iter().any(|(n, _, _)| n == "weave_connections"),
            "{text}"
        );
        assert_eq!(value(&s, "weft_peers", &[]), Some(1.0));
        // Overlay names are what Weave calls them.
        assert_eq!(Overlay::Sleeve.as_str(), "sleeve");
    }
}
