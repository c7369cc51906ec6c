//! The bytes of a mesh TCP connection: the protocol header, the encryption byte, the
//! features map and the messages that follow (`[tag][payload]`).
//!
//! Only protocol version 2 is spoken. Error texts are Weave's where Weave has one, so
//! that logs on both sides read alike.

use thiserror::Error;

use super::{
    MAX_SHORT_ID, PeerName, ShortId,
    gob::{self, Decoder, GobError, Reader, TypeDef, Value},
};

/// The protocol header's magic.
pub const PROTOCOL_MAGIC: &[u8; 5] = b"weave";
/// Length of the protocol header (`weave` + min + max).
pub const HEADER_LEN: usize = 7;
/// Lowest protocol version we negotiate (Weave's range is 1..2).
pub const PROTOCOL_MIN_VERSION: u8 = 1;
/// Highest protocol version, and the only one this code speaks.
pub const PROTOCOL_MAX_VERSION: u8 = 2;
/// Largest message body Weave accepts on TCP (10 MiB).
pub const MAX_TCP_MSG_SIZE: usize = 10 * 1024 * 1024;
/// Length of a NaCl box public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// The only peer-name flavour Weave 2.x uses.
pub const PEER_NAME_FLAVOUR: &str = "mac";
/// The gob type id used for the features map (the one weaver's own streams carry).
pub const FEATURES_MAP_TYPE_ID: i64 = 66;

/// Message tags (the first plaintext byte of every message after the features).
pub mod tag {
    /// TCP heartbeat, no payload.
    pub const HEARTBEAT: u8 = 0;
    /// Compat-mode sleeve ConnectionEstablished.
    pub const RESERVED1: u8 = 1;
    /// Compat-mode sleeve FragmentationReceived.
    pub const RESERVED2: u8 = 2;
    /// Compat-mode sleeve PMTUVerified.
    pub const RESERVED3: u8 = 3;
    /// Gossip to some neighbours.
    pub const GOSSIP: u8 = 4;
    /// Gossip to one peer.
    pub const GOSSIP_UNICAST: u8 = 5;
    /// Gossip to every peer.
    pub const GOSSIP_BROADCAST: u8 = 6;
    /// Overlay control message `[index][sub-tag][body]`.
    pub const OVERLAY_CONTROL: u8 = 7;
}

/// A protocol error in the header, the features or a message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// The first five bytes are not `weave`.
    #[error("remote protocol header not recognised: {}", go_bytes(.0))]
    HeaderNotRecognised([u8; 5]),
    /// No version both sides speak.
    #[error(
        "remote version range [{their_min},{their_max}] is incompatible with ours [{our_min},{our_max}]"
    )]
    IncompatibleVersion {
        /// Remote minimum.
        their_min: u8,
        /// Remote maximum.
        their_max: u8,
        /// Our minimum.
        our_min: u8,
        /// Our maximum.
        our_max: u8,
    },
    /// The negotiated version is one this code does not speak (only 2 is).
    #[error("protocol version {0} negotiated, but only version 2 is supported")]
    UnsupportedVersion(u8),
    /// An encryption byte other than 0 or 1.
    #[error("Bad encryption flag {0}")]
    BadEncryptionFlag(u8),
    /// A required feature is absent.
    #[error("field {0} is missing")]
    MissingField(&'static str),
    /// The remote uses another peer-name flavour.
    #[error("Peer name flavour mismatch (ours: 'mac', theirs: '{0}')")]
    FlavourMismatch(String),
    /// The remote's name does not parse.
    #[error("invalid peer name format: {0:?}")]
    InvalidPeerName(String),
    /// A number in the features does not parse (as Go's strconv words it).
    #[error("strconv.{func}: parsing {value:?}: {reason}")]
    BadNumber {
        /// `ParseUint` or `ParseBool`.
        func: &'static str,
        /// The text.
        value: String,
        /// `invalid syntax` or `value out of range`.
        reason: &'static str,
    },
    /// The features are not a gob `map[string]string`.
    #[error("features are not a map of strings")]
    FeaturesNotAMap,
    /// A tag-7 message without its index and sub-tag.
    #[error("overlay control message too short ({0} bytes)")]
    ShortOverlayControl(usize),
    /// A gossip envelope whose values have the wrong types.
    #[error("malformed gossip message: {0}")]
    BadGossip(&'static str),
    /// Malformed gob.
    #[error(transparent)]
    Gob(#[from] GobError),
}

/// Bytes as Go's `%v` prints a byte slice: `[119 101 97]`.
fn go_bytes(b: &[u8]) -> String {
    let parts: Vec<String> = b.iter().map(u8::to_string).collect();
    format!("[{}]", parts.join(" "))
}

// ---------------------------------------------------------------------------------------
// Header and encryption byte

/// The 7-byte protocol header we send: `weave`, min 1, max 2 (as weaver does).
pub fn protocol_header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..5].copy_from_slice(PROTOCOL_MAGIC);
    h[5] = PROTOCOL_MIN_VERSION;
    h[6] = PROTOCOL_MAX_VERSION;
    h
}

/// Checks the remote's header and returns the protocol version both sides use (always 2
/// when it succeeds).
pub fn negotiate_version(header: &[u8; HEADER_LEN]) -> Result<u8, WireError> {
    if &header[..5] != PROTOCOL_MAGIC {
        let mut magic = [0u8; 5];
        magic.copy_from_slice(&header[..5]);
        return Err(WireError::HeaderNotRecognised(magic));
    }
    let (their_min, their_max) = (header[5], header[6]);
    let version = their_max.min(PROTOCOL_MAX_VERSION);
    if their_min.max(PROTOCOL_MIN_VERSION) > version {
        return Err(WireError::IncompatibleVersion {
            their_min,
            their_max,
            our_min: PROTOCOL_MIN_VERSION,
            our_max: PROTOCOL_MAX_VERSION,
        });
    }
    if version != 2 {
        return Err(WireError::UnsupportedVersion(version));
    }
    Ok(version)
}

/// What follows the header in version 2: `00`, or `01` and a 32-byte public key.
pub fn encryption_announcement(public_key: Option<&[u8; PUBLIC_KEY_LEN]>) -> Vec<u8> {
    match public_key {
        None => vec![0],
        Some(k) => {
            let mut v = Vec::with_capacity(1 + PUBLIC_KEY_LEN);
            v.push(1);
            v.extend_from_slice(k);
            v
        }
    }
}

// ---------------------------------------------------------------------------------------
// Peer names as Weave parses them

fn hex_group(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 2 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// Parses a peer name the way Weave does: six hex groups of one or two digits separated
/// by `:`, or a shorter form with one `::` standing for the zero groups between its
/// sides (`::1`, `aa::1`, `aa:01::`).
pub fn parse_peer_name(s: &str) -> Result<PeerName, WireError> {
    let err = || WireError::InvalidPeerName(s.to_owned());
    let mut groups = [0u64; 6];
    if let Some((left, right)) = s.split_once("::") {
        let split = |part: &str| -> Option<Vec<u64>> {
            if part.is_empty() {
                Some(Vec::new())
            } else {
                part.split(':').map(hex_group).collect()
            }
        };
        let l = split(left).ok_or_else(err)?;
        let r = split(right).ok_or_else(err)?;
        let n = l.len() + r.len();
        if n == 0 || n > 4 {
            return Err(err());
        }
        groups[..l.len()].copy_from_slice(&l);
        groups[6 - r.len()..].copy_from_slice(&r);
    } else {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(err());
        }
        for (g, p) in groups.iter_mut().zip(parts) {
            *g = hex_group(p).ok_or_else(err)?;
        }
    }
    Ok(PeerName::from_u64(
        groups.iter().fold(0u64, |acc, &g| (acc << 8) | g),
    ))
}

// ---------------------------------------------------------------------------------------
// Features

/// The features map a peer sends first on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    /// The peer's name.
    pub name: PeerName,
    /// Its nickname (may be empty).
    pub nickname: String,
    /// Its incarnation UID.
    pub uid: u64,
    /// This connection's random id (ConnUID = XOR of both sides' ids).
    pub conn_id: u64,
    /// Its ShortID; `None` when the feature is absent.
    pub short_id: Option<ShortId>,
    /// Whether it trusts us (`Trusted`), false when absent.
    pub trusted: bool,
    /// Its overlays in its order; `None` when the feature is absent (compat mode).
    pub overlays: Option<Vec<String>>,
    /// A weft's own feature ([`crate::fastdp::FEATURE`]): it sends fast-datapath
    /// heartbeats every 500 ms, so 2.5 s of silence means its fast path is down.
    /// Weave ignores features it does not know.
    pub fast_heartbeat: bool,
}

fn parse_u64(value: &str, bits: u32) -> Result<u64, WireError> {
    let bad = |reason| WireError::BadNumber {
        func: "ParseUint",
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("invalid syntax"));
    }
    let v: u64 = value.parse().map_err(|_| bad("value out of range"))?;
    if bits < 64 && v >> bits != 0 {
        return Err(bad("value out of range"));
    }
    Ok(v)
}

fn parse_bool(value: &str) -> Result<bool, WireError> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(WireError::BadNumber {
            func: "ParseBool",
            value: value.to_owned(),
            reason: "invalid syntax",
        }),
    }
}

impl Features {
    /// The features as the key/value pairs sent, in a fixed order (that of h1's
    /// captured features message, so its encoding can be compared byte for byte).
    pub fn to_pairs(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![("ConnID", self.conn_id.to_string())];
        v.push(("Trusted", self.trusted.to_string()));
        if let Some(o) = &self.overlays {
            v.push(("Overlays", o.join(" ")));
        }
        v.push(("PeerNameFlavour", PEER_NAME_FLAVOUR.to_owned()));
        v.push(("Name", self.name.to_string()));
        v.push(("NickName", self.nickname.clone()));
        if let Some(s) = self.short_id {
            v.push(("ShortID", s.to_string()));
        }
        v.push(("UID", self.uid.to_string()));
        if self.fast_heartbeat {
            v.push((crate::fastdp::FEATURE, "true".to_owned()));
        }
        v
    }

    /// The features message body: a fresh gob stream holding the `map[string]string`
    /// type definition and the map.
    pub fn encode(&self) -> Vec<u8> {
        let pairs = self.to_pairs();
        let mut out = Vec::new();
        TypeDef::Map {
            key: gob::STRING_ID,
            elem: gob::STRING_ID,
        }
        .put_definition(&mut out, FEATURES_MAP_TYPE_ID);
        gob::put_singleton(&mut out, FEATURES_MAP_TYPE_ID, |b| {
            gob::put_uint(b, pairs.len() as u64);
            for (k, v) in &pairs {
                gob::put_string(b, k);
                gob::put_string(b, v);
            }
        });
        out
    }

    /// Decodes a features message body into its key/value pairs (wire order).
    pub fn decode_map(body: &[u8]) -> Result<Vec<(String, String)>, WireError> {
        let mut d = Decoder::new();
        let v = d.expect_value(&mut Reader::new(body), "features map")?;
        let Value::Map(entries) = v else {
            return Err(WireError::FeaturesNotAMap);
        };
        entries
            .into_iter()
            .map(|(k, v)| match (k, v) {
                (Value::String(k), Value::String(v)) => Ok((k, v)),
                _ => Err(WireError::FeaturesNotAMap),
            })
            .collect()
    }

    /// Checks and parses a features map as Weave does: required keys in Weave's order
    /// (PeerNameFlavour, Name, NickName, UID, ConnID), then the flavour, the name,
    /// ShortID (12 bits), Trusted, UID and ConnID.
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<Features, WireError> {
        let get = |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        for key in ["PeerNameFlavour", "Name", "NickName", "UID", "ConnID"] {
            if get(key).is_none() {
                return Err(WireError::MissingField(key));
            }
        }
        let flavour = get("PeerNameFlavour").unwrap_or_default();
        if flavour != PEER_NAME_FLAVOUR {
            return Err(WireError::FlavourMismatch(flavour.to_owned()));
        }
        let name = parse_peer_name(get("Name").unwrap_or_default())?;
        let nickname = get("NickName").unwrap_or_default().to_owned();
        let short_id = match get("ShortID") {
            Some(s) => {
                let v = parse_u64(s, 12)?;
                debug_assert!(v <= u64::from(MAX_SHORT_ID));
                Some(v as ShortId)
            }
            None => None,
        };
        let trusted = match get("Trusted") {
            Some(t) => parse_bool(t)?,
            None => false,
        };
        let uid = parse_u64(get("UID").unwrap_or_default(), 64)?;
        let conn_id = parse_u64(get("ConnID").unwrap_or_default(), 64)?;
        let overlays = get("Overlays").map(|o| o.split_whitespace().map(str::to_owned).collect());
        let fast_heartbeat = get(crate::fastdp::FEATURE).is_some_and(|v| parse_bool(v) == Ok(true));
        Ok(Features {
            name,
            nickname,
            uid,
            conn_id,
            short_id,
            trusted,
            overlays,
            fast_heartbeat,
        })
    }

    /// Decodes and checks a features message body.
    pub fn decode(body: &[u8]) -> Result<Features, WireError> {
        Self::from_pairs(&Self::decode_map(body)?)
    }
}

// ---------------------------------------------------------------------------------------
// Messages after the features

/// One message after the features (its plaintext is `[tag][payload]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Tag 0.
    Heartbeat,
    /// Tags 1, 2, 3: sleeve control in compat mode (the peer sent no `Overlays`).
    CompatSleeve {
        /// 1, 2 or 3.
        tag: u8,
        /// The payload (the u16 MTU for tag 3).
        body: Vec<u8>,
    },
    /// Tag 4: gossip to neighbours.
    Gossip {
        /// Gossip channel (`topology`, `IPallocation`, ...).
        channel: String,
        /// The sender.
        source: PeerName,
        /// The channel's payload.
        payload: Vec<u8>,
    },
    /// Tag 5: gossip to one peer.
    GossipUnicast {
        /// Gossip channel.
        channel: String,
        /// The sender.
        source: PeerName,
        /// The peer it is for.
        destination: PeerName,
        /// The channel's payload.
        payload: Vec<u8>,
    },
    /// Tag 6: gossip to every peer.
    GossipBroadcast {
        /// Gossip channel.
        channel: String,
        /// The peer that started the broadcast.
        origin: PeerName,
        /// The channel's payload.
        payload: Vec<u8>,
    },
    /// Tag 7: a control message of overlay number `index`.
    OverlayControl {
        /// Position of the overlay in weaver's order of the shared overlays.
        index: u8,
        /// The overlay's own message type.
        subtag: u8,
        /// The rest.
        body: Vec<u8>,
    },
}

fn name_from_value(v: Value, what: &'static str) -> Result<PeerName, WireError> {
    match v {
        Value::Uint(n) if n >> 48 == 0 => Ok(PeerName::from_u64(n)),
        Value::Uint(_) => Err(WireError::BadGossip("peer name wider than 48 bits")),
        _ => Err(WireError::BadGossip(what)),
    }
}

impl Message {
    /// The plaintext `[tag][payload]`.
    pub fn encode(&self) -> Vec<u8> {
        fn envelope(tag: u8, channel: &str, names: &[PeerName], payload: &[u8]) -> Vec<u8> {
            let mut out = vec![tag];
            gob::put_singleton(&mut out, gob::STRING_ID, |b| gob::put_string(b, channel));
            for n in names {
                gob::put_singleton(&mut out, gob::UINT_ID, |b| gob::put_uint(b, n.to_u64()));
            }
            gob::put_singleton(&mut out, gob::BYTES_ID, |b| gob::put_bytes(b, payload));
            out
        }
        match self {
            Message::Heartbeat => vec![tag::HEARTBEAT],
            Message::CompatSleeve { tag, body } => {
                let mut v = vec![*tag];
                v.extend_from_slice(body);
                v
            }
            Message::Gossip {
                channel,
                source,
                payload,
            } => envelope(tag::GOSSIP, channel, &[*source], payload),
            Message::GossipUnicast {
                channel,
                source,
                destination,
                payload,
            } => envelope(
                tag::GOSSIP_UNICAST,
                channel,
                &[*source, *destination],
                payload,
            ),
            Message::GossipBroadcast {
                channel,
                origin,
                payload,
            } => envelope(tag::GOSSIP_BROADCAST, channel, &[*origin], payload),
            Message::OverlayControl {
                index,
                subtag,
                body,
            } => {
                let mut v = vec![tag::OVERLAY_CONTROL, *index, *subtag];
                v.extend_from_slice(body);
                v
            }
        }
    }

    /// Decodes a plaintext. `Ok(None)` for what Weave ignores: an empty message and an
    /// unknown tag.
    pub fn decode(plain: &[u8]) -> Result<Option<Message>, WireError> {
        let Some((&t, payload)) = plain.split_first() else {
            return Ok(None);
        };
        let msg = match t {
            tag::HEARTBEAT => Message::Heartbeat,
            tag::RESERVED1 | tag::RESERVED2 | tag::RESERVED3 => Message::CompatSleeve {
                tag: t,
                body: payload.to_vec(),
            },
            tag::GOSSIP | tag::GOSSIP_UNICAST | tag::GOSSIP_BROADCAST => {
                let mut d = Decoder::new();
                let mut r = Reader::new(payload);
                let channel = match d.expect_value(&mut r, "gossip channel")? {
                    Value::String(s) => s,
                    _ => return Err(WireError::BadGossip("channel is not a string")),
                };
                let source = name_from_value(
                    d.expect_value(&mut r, "gossip source")?,
                    "source is not a uint",
                )?;
                let destination = if t == tag::GOSSIP_UNICAST {
                    Some(name_from_value(
                        d.expect_value(&mut r, "gossip destination")?,
                        "destination is not a uint",
                    )?)
                } else {
                    None
                };
                let payload = match d.expect_value(&mut r, "gossip payload")? {
                    Value::Bytes(b) => b,
                    _ => return Err(WireError::BadGossip("payload is not a []byte")),
                };
                match (t, destination) {
                    (tag::GOSSIP, _) => Message::Gossip {
                        channel,
                        source,
                        payload,
                    },
                    (tag::GOSSIP_UNICAST, Some(destination)) => Message::GossipUnicast {
                        channel,
                        source,
                        destination,
                        payload,
                    },
                    _ => Message::GossipBroadcast {
                        channel,
                        origin: source,
                        payload,
                    },
                }
            }
            tag::OVERLAY_CONTROL => {
                if payload.len() < 2 {
                    return Err(WireError::ShortOverlayControl(payload.len()));
                }
                Message::OverlayControl {
                    index: payload[0],
                    subtag: payload[1],
                    body: payload[2..].to_vec(),
                }
            }
            _ => return Ok(None),
        };
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::gob::tests::bytes_of;

    fn h1_features_body() -> Vec<u8> {
        bytes_of(
            r#"0e ff 83 04 01 02 ff 84 00 01 0c 01 0c 00 00
            ff 9b ff 84 00 08
            06 "ConnID" 14 "13784400271047743565" 07 "Trusted" 05 "false"
            08 "Overlays" 06 "sleeve" 0f "PeerNameFlavour" 03 "mac"
            04 "Name" 11 "aa:00:00:00:00:01" 08 "NickName" 02 "h1"
            07 "ShortID" 04 "3170" 03 "UID" 14 "16197672966706867023""#,
        )
    }

    fn h1() -> Features {
        Features {
            name: PeerName([0xaa, 0, 0, 0, 0, 1]),
            nickname: "h1".into(),
            uid: 16197672966706867023,
            conn_id: 13784400271047743565,
            short_id: Some(3170),
            trusted: false,
            overlays: Some(vec!["sleeve".into()]),
            fast_heartbeat: false,
        }
    }

    #[test]
    fn header_negotiation() {
        assert_eq!(protocol_header(), *b"weave\x01\x02");
        assert_eq!(negotiate_version(b"weave\x01\x02"), Ok(2));
        assert_eq!(negotiate_version(b"weave\x02\x02"), Ok(2));
        assert_eq!(negotiate_version(b"weave\x01\x05"), Ok(2));
        let e = negotiate_version(b"weave\x03\x04").unwrap_err();
        assert_eq!(
            e.to_string(),
            "remote version range [3,4] is incompatible with ours [1,2]"
        );
        assert_eq!(
            negotiate_version(b"weave\x01\x01"),
            Err(WireError::UnsupportedVersion(1))
        );
        let e = negotiate_version(b"GET / \x01").unwrap_err();
        assert_eq!(
            e.to_string(),
            "remote protocol header not recognised: [71 69 84 32 47]"
        );
    }

    #[test]
    fn h1_features_decode_and_encode_byte_exact() {
        let body = h1_features_body();
        assert_eq!(body.len(), 172);
        assert_eq!(Features::decode(&body).unwrap(), h1());
        // Encoded in the same key order, the bytes are those of the capture.
        assert_eq!(h1().encode(), body);
    }

    #[test]
    fn features_round_trip_and_optional_keys() {
        let mut f = h1();
        f.short_id = None;
        f.overlays = None;
        f.trusted = true;
        f.nickname = String::new();
        let pairs = Features::decode_map(&f.encode()).unwrap();
        assert!(!pairs.iter().any(|(k, _)| k == "ShortID" || k == "Overlays"));
        assert_eq!(Features::decode(&f.encode()).unwrap(), f);
        let mut f = h1();
        f.overlays = Some(vec!["fastdp".into(), "sleeve".into()]);
        f.short_id = Some(4095);
        assert_eq!(Features::decode(&f.encode()).unwrap(), f);
    }

    fn pairs(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn features_errors_are_weaves() {
        let full = [
            ("PeerNameFlavour", "mac"),
            ("Name", "aa:00:00:00:00:01"),
            ("NickName", "h1"),
            ("UID", "1"),
            ("ConnID", "2"),
        ];
        assert!(Features::from_pairs(&pairs(&full)).is_ok());
        // Missing fields in Weave's order.
        let e = Features::from_pairs(&pairs(&full[1..])).unwrap_err();
        assert_eq!(e.to_string(), "field PeerNameFlavour is missing");
        let e = Features::from_pairs(&pairs(&[full[0], full[1], full[3]])).unwrap_err();
        assert_eq!(e.to_string(), "field NickName is missing");
        let e = Features::from_pairs(&pairs(&full[..4])).unwrap_err();
        assert_eq!(e.to_string(), "field ConnID is missing");

        let with = |k: &str, v: &str| {
            let mut p = pairs(&full);
            match p.iter_mut().find(|(kk, _)| kk == k) {
                Some(e) => e.1 = v.to_owned(),
                None => p.push((k.to_owned(), v.to_owned())),
            }
            Features::from_pairs(&p)
        };
        assert_eq!(
            with("PeerNameFlavour", "uuid").unwrap_err().to_string(),
            "Peer name flavour mismatch (ours: 'mac', theirs: 'uuid')"
        );
        assert_eq!(
            with("Name", "nope").unwrap_err().to_string(),
            "invalid peer name format: \"nope\""
        );
        assert_eq!(
            with("ShortID", "4096").unwrap_err().to_string(),
            "strconv.ParseUint: parsing \"4096\": value out of range"
        );
        assert_eq!(with("ShortID", "4095").unwrap().short_id, Some(4095));
        assert_eq!(
            with("ShortID", "-1").unwrap_err().to_string(),
            "strconv.ParseUint: parsing \"-1\": invalid syntax"
        );
        assert_eq!(
            with("UID", "18446744073709551616").unwrap_err().to_string(),
            "strconv.ParseUint: parsing \"18446744073709551616\": value out of range"
        );
        assert_eq!(
            with("Trusted", "yes").unwrap_err().to_string(),
            "strconv.ParseBool: parsing \"yes\": invalid syntax"
        );
        assert!(with("Trusted", "T").unwrap().trusted);
        // A features message that is not a map.
        let mut s = Vec::new();
        gob::put_singleton(&mut s, gob::STRING_ID, |b| gob::put_string(b, "x"));
        assert_eq!(Features::decode(&s), Err(WireError::FeaturesNotAMap));
    }

    #[test]
    fn peer_names_parse_like_weave() {
        let ok = |s: &str| parse_peer_name(s).unwrap().to_u64();
        assert_eq!(ok("aa:00:00:00:00:01"), 0xaa00_0000_0001);
        assert_eq!(ok("AA:0:0:0:0:1"), 0xaa00_0000_0001);
        assert_eq!(ok("::1"), 1);
        assert_eq!(ok("aa::1"), 0xaa00_0000_0001);
        assert_eq!(ok("aa:01::"), 0xaa01_0000_0000);
        assert_eq!(ok("::1:2:3:4"), 0x0102_0304);
        for bad in [
            "",
            "::",
            "1:2:3:4:5",
            "1::2:3:4:5",
            "::1::",
            "aaa::1",
            "g::1",
            "1:2:3:4:5:6:7",
        ] {
            assert!(parse_peer_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_round_trip_and_match_the_capture() {
        // h2's gossip envelope head, from the capture.
        let msg = Message::Gossip {
            channel: "topology".into(),
            source: PeerName([0xaa, 0, 0, 0, 0, 2]),
            payload: vec![7; 311],
        };
        let enc = msg.encode();
        let head = bytes_of(
            r#"04 0b 0c 00 08 "topology" 09 06 00 fa aa 00 00 00 00 02 fe 01 3c 0a 00 fe 01 37"#,
        );
        assert_eq!(enc[..head.len()], head[..]);
        assert_eq!(enc.len(), head.len() + 311);
        assert_eq!(Message::decode(&enc).unwrap(), Some(msg));

        let a = PeerName([0xaa, 0, 0, 0, 0, 1]);
        let b = PeerName([0xaa, 0, 0, 0, 0, 2]);
        for m in [
            Message::Heartbeat,
            Message::CompatSleeve {
                tag: 3,
                body: vec![5, 0x9e],
            },
            Message::GossipUnicast {
                channel: "IPallocation".into(),
                source: a,
                destination: b,
                payload: vec![],
            },
            Message::GossipBroadcast {
                channel: "nameserver".into(),
                origin: b,
                payload: vec![1, 2, 3],
            },
            Message::OverlayControl {
                index: 0,
                subtag: 3,
                body: vec![5, 0x9e],
            },
        ] {
            assert_eq!(Message::decode(&m.encode()).unwrap(), Some(m));
        }
        assert_eq!(Message::Heartbeat.encode(), [0]);
        assert_eq!(
            Message::OverlayControl {
                index: 0,
                subtag: 1,
                body: vec![]
            }
            .encode(),
            [7, 0, 1]
        );
    }

    #[test]
    fn ignored_and_bad_messages() {
        assert_eq!(Message::decode(&[]), Ok(None));
        assert_eq!(Message::decode(&[8, 1, 2]), Ok(None));
        assert_eq!(Message::decode(&[0xff]), Ok(None));
        assert_eq!(
            Message::decode(&[7]),
            Err(WireError::ShortOverlayControl(0))
        );
        assert_eq!(
            Message::decode(&[7, 0]),
            Err(WireError::ShortOverlayControl(1))
        );
        assert!(Message::decode(&[4]).is_err());
        assert!(Message::decode(&[4, 0x03, 0x06, 0x00, 0x01]).is_err());
        // A source that is a string, not a uint.
        let mut m = vec![4];
        gob::put_singleton(&mut m, gob::STRING_ID, |b| gob::put_string(b, "topology"));
        gob::put_singleton(&mut m, gob::STRING_ID, |b| gob::put_string(b, "x"));
        assert_eq!(
            Message::decode(&m),
            Err(WireError::BadGossip("source is not a uint"))
        );
        // Unicast without its destination.
        let mut m = Message::Gossip {
            channel: "c".into(),
            source: PeerName([1; 6]),
            payload: vec![1],
        }
        .encode();
        m[0] = 5;
        assert!(Message::decode(&m).is_err());
    }
}
